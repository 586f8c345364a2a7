//! Simulated Modbus devices: one TCP server (and any number of RTU byte
//! streams) serving many unit ids, each with register banks whose values are
//! driven by [`signal`](crate::signal) models.
//!
//! Start with [`ModbusSim::start`]; the returned handle gives the
//! [`local_addr`](ModbusSim::local_addr), fault injection
//! ([`ModbusSim::set_fault`], [`ModbusSim::go_down`] / [`ModbusSim::come_up`]),
//! RTU over any stream ([`ModbusSim::attach_rtu`]) and the ground truth of
//! what was served ([`ModbusSim::served`]).
//!
//! The framing is implemented here rather than with tokio-modbus's server
//! because fault injection needs to send what a correct server never would
//! (garbage, truncated replies, silence) and because tokio-modbus's RTU
//! server needs a serial port.
//!
//! # Invariants
//! - Values change only at ticks ([`ModbusSimConfig::tick`]); a reply is
//!   built under one lock of the unit, so it is a consistent snapshot.
//! - The served log of a point records `(ts_ms, value)` for every read that
//!   covered the whole point, repeats included: one entry per value a
//!   client received, which is one input sample of the agent's function per
//!   successful poll. The value served at time `t` is the last entry with
//!   `ts_ms <= t`.

pub mod pdu;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use edge_node::clock::Clock;
use edge_node::drivers::decode::{self, Format};
use futures::future::BoxFuture;
use protocols::{ModbusTable, Point, PointAddress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::devices::SimDeviceError;
use crate::signal::{Model, ModelState};
use pdu::Bank;

/// A simulated point: where it lives, how it is encoded, what drives it.
#[derive(Debug, Clone)]
pub struct SimPoint {
    /// Key in the served log (use the point's node-wide index).
    pub id: u32,
    /// Table.
    pub table: ModbusTable,
    /// First address.
    pub address: u16,
    /// Encoding.
    pub format: Format,
    /// Engineering = raw · scale + offset (the sim stores raw values).
    pub scale: f64,
    /// See `scale`.
    pub offset: f64,
    /// Engineering-value model.
    pub model: Model,
}

impl SimPoint {
    /// A simulated twin of a configured Modbus point, driven by `model`.
    /// `None` if the point has no Modbus address.
    pub fn from_point(p: &Point, model: Model) -> Option<Self> {
        let PointAddress::Modbus {
            table,
            address,
            data_type,
            byte_order,
            word_order,
        } = &p.address
        else {
            return None;
        };
        Some(Self {
            id: p.index,
            table: *table,
            address: u16::try_from(*address).ok()?,
            format: Format {
                data_type: *data_type,
                byte_order: *byte_order,
                word_order: *word_order,
            },
            scale: p.scale,
            offset: p.offset,
            model,
        })
    }

    fn width(&self) -> u16 {
        if self.table.is_bit() {
            1
        } else {
            self.format.data_type.registers()
        }
    }
}

/// One simulated unit (slave id).
#[derive(Debug, Clone, Default)]
pub struct UnitConfig {
    /// Unit id (0 and 255 also accepted on TCP, as many gateways do).
    pub unit: u8,
    /// Points.
    pub points: Vec<SimPoint>,
    /// Minimum size of every table (grown to fit the points).
    pub size: u16,
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ModbusSimConfig {
    /// Listen address (`127.0.0.1:0` for an ephemeral port).
    pub bind: SocketAddr,
    /// Units.
    pub units: Vec<UnitConfig>,
    /// Value update period.
    pub tick: Duration,
    /// Time source (timestamps of the served log; model time is ms since
    /// the server started).
    pub clock: Clock,
    /// Seed of all signal models (each point uses `seed ^ id`).
    pub seed: u64,
    /// Keep a served-values log.
    pub record: bool,
}

impl Default for ModbusSimConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            units: Vec::new(),
            tick: Duration::from_millis(100),
            clock: Clock::system(),
            seed: 0,
            record: true,
        }
    }
}

/// Injected misbehaviour (applies to TCP and RTU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Answer correctly.
    #[default]
    None,
    /// Answer every request with this exception code.
    Exception(u8),
    /// Answer with bytes that are not a Modbus frame.
    Garbage,
    /// Answer reads with a well-formed reply carrying one register (or bit
    /// byte) too few.
    ShortReply,
    /// Never answer.
    Silent,
    /// Answer after this many milliseconds.
    DelayMs(u64),
}

/// Errors starting or restarting the server.
#[derive(Debug, thiserror::Error)]
pub enum ModbusSimError {
    /// Could not bind the listen address.
    #[error("bind {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

struct Unit {
    bank: Bank,
    points: Vec<(SimPoint, ModelState)>,
    /// (table, address) → indexes into `points`, for served-log lookups.
    by_addr: BTreeMap<(u8, u16), Vec<usize>>,
    log: HashMap<u32, Vec<(u64, f64)>>,
    /// Current engineering value per point (as encoded in the bank).
    current: Vec<f64>,
}

fn table_key(t: ModbusTable) -> u8 {
    match t {
        ModbusTable::Coil => 0,
        ModbusTable::DiscreteInput => 1,
        ModbusTable::Holding => 2,
        ModbusTable::Input => 3,
    }
}

impl Unit {
    fn new(cfg: &UnitConfig, seed: u64) -> Self {
        let mut bank = Bank::with_size(usize::from(cfg.size));
        let mut by_addr: BTreeMap<(u8, u16), Vec<usize>> = BTreeMap::new();
        let mut points = Vec::with_capacity(cfg.points.len());
        for (i, p) in cfg.points.iter().enumerate() {
            bank.ensure(p.table, p.address, p.width());
            by_addr
                .entry((table_key(p.table), p.address))
                .or_default()
                .push(i);
            points.push((p.clone(), p.model.start(seed ^ u64::from(p.id))));
        }
        let n = points.len();
        Self {
            bank,
            points,
            by_addr,
            log: HashMap::new(),
            current: vec![0.0; n],
        }
    }

    fn tick(&mut self, t_ms: u64) {
        for (i, (p, state)) in self.points.iter_mut().enumerate() {
            let eng = state.value_at(t_ms);
            let raw = decode::raw_from_engineering(eng, p.scale, p.offset);
            let words = if p.table.is_bit() {
                vec![u16::from(raw != 0.0)]
            } else {
                decode::encode(raw, p.format)
            };
            self.bank.put(p.table, p.address, &words);
            // What a client will decode from those registers.
            let back = if p.table.is_bit() {
                if raw == 0.0 { 0.0 } else { 1.0 }
            } else {
                decode::decode(&words, p.format).unwrap_or(f64::NAN)
            };
            self.current[i] = decode::engineering(back, p.scale, p.offset);
        }
    }

    fn record(&mut self, served: pdu::Served, ts_ms: u64) {
        let key = table_key(served.table);
        let end = u32::from(served.start) + u32::from(served.count);
        let lo = (key, served.start);
        let hi = (
            key,
            u16::try_from(end.saturating_sub(1)).unwrap_or(u16::MAX),
        );
        for (_, idxs) in self.by_addr.range(lo..=hi) {
            for &i in idxs {
                let Some((p, _)) = self.points.get(i) else {
                    continue;
                };
                if u32::from(p.address) + u32::from(p.width()) > end {
                    continue;
                }
                let v = self.current[i];
                self.log.entry(p.id).or_default().push((ts_ms, v));
            }
        }
    }
}

struct Shared {
    units: HashMap<u8, Mutex<Unit>>,
    fault: Mutex<Fault>,
    clock: Clock,
    record: bool,
    requests: AtomicU64,
    garbage_seed: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn fault(&self) -> Fault {
        *lock(&self.fault)
    }

    /// Processes one request for `unit`. `None`: stay silent.
    async fn answer(&self, unit: u8, pdu: &[u8]) -> Option<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let fault = self.fault();
        match fault {
            Fault::Silent => return None,
            Fault::Exception(code) => {
                return Some(pdu::exception(pdu.first().copied().unwrap_or(0), code));
            }
            Fault::DelayMs(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Fault::None | Fault::Garbage | Fault::ShortReply => {}
        }
        let u = self.units.get(&unit).or_else(|| {
            if unit == 0 || unit == 255 {
                self.units.values().next()
            } else {
                None
            }
        });
        let Some(u) = u else {
            // Gateway semantics: target device failed to respond.
            return Some(pdu::exception(pdu.first().copied().unwrap_or(0), 0x0B));
        };
        let mut resp = {
            let mut g = lock(u);
            let (resp, served) = g.bank.process(pdu);
            if let (true, Some(s)) = (self.record, served) {
                g.record(s, self.clock.now_ms());
            }
            resp
        };
        if fault == Fault::ShortReply && matches!(resp.first(), Some(1..=4)) && resp.len() > 2 {
            let drop = if matches!(resp.first(), Some(1 | 2)) {
                1
            } else {
                2
            };
            resp.truncate(resp.len() - drop);
            resp[1] = resp[1].saturating_sub(u8::try_from(drop).unwrap_or(0));
        }
        Some(resp)
    }

    fn garbage(&self, n: usize) -> Vec<u8> {
        let mut s = self.garbage_seed.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|_| {
                s = edge_node::drivers::backoff::mix64(s);
                s.to_le_bytes()[0]
            })
            .collect()
    }
}

/// A running simulated Modbus server.
#[derive(Debug)]
pub struct ModbusSim {
    addr: SocketAddr,
    inner: Arc<SharedHandle>,
    /// Cancels everything.
    cancel: CancellationToken,
    /// Cancels the current "up" generation (listener + connections).
    generation: Mutex<CancellationToken>,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
}

struct SharedHandle(Arc<Shared>);

impl std::fmt::Debug for SharedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("units", &self.0.units.len())
            .finish_non_exhaustive()
    }
}

impl ModbusSim {
    /// Binds and starts serving.
    pub async fn start(config: ModbusSimConfig) -> Result<Self, ModbusSimError> {
        let listener =
            TcpListener::bind(config.bind)
                .await
                .map_err(|source| ModbusSimError::Bind {
                    addr: config.bind,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ModbusSimError::Bind {
                addr: config.bind,
                source,
            })?;
        let units = config
            .units
            .iter()
            .map(|u| (u.unit, Mutex::new(Unit::new(u, config.seed))))
            .collect();
        let shared = Arc::new(Shared {
            units,
            fault: Mutex::new(Fault::None),
            clock: config.clock,
            record: config.record,
            requests: AtomicU64::new(0),
            garbage_seed: AtomicU64::new(config.seed),
        });
        let cancel = CancellationToken::new();
        let generation = cancel.child_token();
        let mut tasks = JoinSet::new();
        // Initial values before the first client can read.
        let epoch = config.clock.now_ms();
        for u in shared.units.values() {
            lock(u).tick(0);
        }
        tasks.spawn(ticker(shared.clone(), config.tick, epoch, cancel.clone()));
        tasks.spawn(accept_loop(listener, shared.clone(), generation.clone()));
        Ok(Self {
            addr,
            inner: Arc::new(SharedHandle(shared)),
            cancel,
            generation: Mutex::new(generation),
            tasks: tokio::sync::Mutex::new(tasks),
        })
    }

    /// The bound address (stable across [`go_down`](Self::go_down) /
    /// [`come_up`](Self::come_up)).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the injected fault.
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.inner.0.fault) = fault;
    }

    /// Requests received so far (all transports).
    pub fn requests(&self) -> u64 {
        self.inner.0.requests.load(Ordering::Relaxed)
    }

    /// Disappears: closes the listener and every open connection (TCP and
    /// RTU streams). Connection attempts are refused until
    /// [`come_up`](Self::come_up).
    pub fn go_down(&self) {
        let g = lock(&self.generation);
        g.cancel();
    }

    /// Comes back on the same address.
    pub async fn come_up(&self) -> Result<(), ModbusSimError> {
        let listener =
            TcpListener::bind(self.addr)
                .await
                .map_err(|source| ModbusSimError::Bind {
                    addr: self.addr,
                    source,
                })?;
        let token = self.cancel.child_token();
        *lock(&self.generation) = token.clone();
        self.tasks
            .lock()
            .await
            .spawn(accept_loop(listener, self.inner.0.clone(), token));
        Ok(())
    }

    /// Serves Modbus RTU on `stream` (e.g. one end of `tokio::io::duplex`)
    /// until it closes or the server goes down.
    pub async fn attach_rtu<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let token = lock(&self.generation).clone();
        if token.is_cancelled() {
            return; // down: the stream is dropped, the client sees EOF
        }
        let shared = self.inner.0.clone();
        self.tasks.lock().await.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                r = serve_rtu(stream, shared) => { let _ = r; }
            }
        });
    }

    /// Serves Modbus TCP (MBAP framing) on `stream`, e.g. one end of
    /// `tokio::io::duplex`, as if it were an accepted connection: an
    /// in-memory accept path for clients that must not use sockets (a node
    /// on tokio's paused clock). Ends when the stream closes or the server
    /// goes down; while down the stream is dropped at once (the client
    /// sees EOF).
    pub async fn attach_tcp<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let token = lock(&self.generation).clone();
        if token.is_cancelled() {
            return;
        }
        let shared = self.inner.0.clone();
        self.tasks.lock().await.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                r = serve_tcp(stream, shared) => { let _ = r; }
            }
        });
    }

    /// Values served for point `id` of `unit`: `(ts_ms, engineering value)`,
    /// one entry per read (see the module invariants).
    pub fn served(&self, unit: u8, id: u32) -> Vec<(u64, f64)> {
        self.inner
            .0
            .units
            .get(&unit)
            .map(|u| lock(u).log.get(&id).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The value point `id` of `unit` holds now (engineering, as a client
    /// decodes it).
    pub fn current(&self, unit: u8, id: u32) -> Option<f64> {
        let u = lock(self.inner.0.units.get(&unit)?);
        let i = u.points.iter().position(|(p, _)| p.id == id)?;
        u.current.get(i).copied()
    }

    /// Writes raw registers (or bits, `!= 0`) directly, bypassing the models
    /// until the next tick overwrites mapped points.
    pub fn poke(&self, unit: u8, table: ModbusTable, address: u16, words: &[u16]) {
        if let Some(u) = self.inner.0.units.get(&unit) {
            lock(u).bank.put(table, address, words);
        }
    }

    /// Stops serving and waits for all tasks.
    pub async fn stop(&self) {
        self.cancel.cancel();
        let mut tasks = self.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
    }
}

impl crate::devices::SimDevice for ModbusSim {
    fn go_down(&self) -> BoxFuture<'_, ()> {
        ModbusSim::go_down(self);
        Box::pin(std::future::ready(()))
    }

    fn come_up(&self) -> BoxFuture<'_, Result<(), SimDeviceError>> {
        Box::pin(async move { ModbusSim::come_up(self).await.map_err(SimDeviceError::from) })
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(ModbusSim::stop(self))
    }

    /// The log of the unit that has point `id`.
    fn served(&self, id: u32) -> Vec<(u64, f64)> {
        self.inner
            .0
            .units
            .values()
            .find_map(|u| lock(u).log.get(&id).cloned())
            .unwrap_or_default()
    }

    // A Modbus driver polls: every logged read reached it (the default
    // delivery window). It stamps a sample when the reply arrives, after
    // the read was logged; the comparison tolerates that (see
    // `crate::truth::local`).
}

async fn ticker(shared: Arc<Shared>, tick: Duration, epoch: u64, cancel: CancellationToken) {
    let mut iv = tokio::time::interval(tick.max(Duration::from_millis(1)));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = iv.tick() => {}
        }
        let t = shared.clock.now_ms().saturating_sub(epoch);
        for u in shared.units.values() {
            lock(u).tick(t);
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    let shared = shared.clone();
                    let token = token.clone();
                    conns.spawn(async move {
                        tokio::select! {
                            () = token.cancelled() => {}
                            r = serve_tcp(s, shared) => { let _ = r; }
                        }
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_tcp<S>(mut s: S, shared: Arc<Shared>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hdr = [0u8; 7];
    let mut buf = vec![0u8; 260];
    loop {
        s.read_exact(&mut hdr).await?;
        let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
        if u16::from_be_bytes([hdr[2], hdr[3]]) != 0 || !(2..=254).contains(&len) {
            return Ok(()); // not Modbus: hang up
        }
        let pdu = &mut buf[..len - 1];
        s.read_exact(pdu).await?;
        let Some(resp) = shared.answer(hdr[6], pdu).await else {
            continue;
        };
        if shared.fault() == Fault::Garbage {
            let g = shared.garbage(9 + resp.len());
            s.write_all(&g).await?;
            continue;
        }
        let mut out = Vec::with_capacity(7 + resp.len());
        out.extend_from_slice(&hdr[..4]);
        out.extend_from_slice(
            &u16::try_from(resp.len() + 1)
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        out.push(hdr[6]);
        out.extend_from_slice(&resp);
        s.write_all(&out).await?;
    }
}

async fn serve_rtu<S>(mut s: S, shared: Arc<Shared>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(len) = pdu::rtu_request_len(&buf) {
            if len == 0 || len > 256 {
                buf.clear(); // cannot delimit: wait for the line to go quiet
                break;
            }
            if buf.len() < len {
                break;
            }
            let frame: Vec<u8> = buf.drain(..len).collect();
            let (body, crc) = frame.split_at(len - 2);
            if pdu::crc16(body).to_le_bytes() != [crc[0], crc[1]] {
                buf.clear();
                break;
            }
            let unit = body[0];
            if !shared.units.contains_key(&unit) {
                continue; // another slave on the bus
            }
            let Some(resp) = shared.answer(unit, &body[1..]).await else {
                continue;
            };
            let out = if shared.fault() == Fault::Garbage {
                shared.garbage(3 + resp.len())
            } else {
                let mut out = Vec::with_capacity(3 + resp.len());
                out.push(unit);
                out.extend_from_slice(&resp);
                let crc = pdu::crc16(&out).to_le_bytes();
                out.extend_from_slice(&crc);
                out
            };
            s.write_all(&out).await?;
        }
    }
}
