//! Modbus TCP / RTU poller.
//!
//! One task per device owns one connection and sends **one request at a
//! time** (many devices and pymodbus answer only the first of pipelined
//! requests). Each [`PointGroup`](protocols::PointGroup) is polled at its own
//! interval through the reads planned by [`coalesce::plan`]; one batch of
//! samples per group per cycle goes to the output channel.
//!
//! Failure handling, per request:
//!
//! | outcome | quality | counted as | connection |
//! | --- | --- | --- | --- |
//! | exception reply | `BAD_DEVICE_EXCEPTION` | `exceptions` | kept |
//! | wrong length / type | `BAD_MALFORMED` | `malformed` | kept |
//! | undecodable frame, header mismatch | `BAD_MALFORMED` | `malformed` | reopened |
//! | no reply in time (after `retries`) | `BAD_TIMEOUT` | `timeouts` | reopened (TCP) |
//! | I/O error, reset, EOF | `BAD_NOT_CONNECTED` | `errors` | reopened |
//!
//! Reopening waits for the jittered backoff ([`super::backoff`]); while the
//! connection is down every cycle still emits its samples, with
//! `BAD_NOT_CONNECTED`. A merged read refused with "illegal data address" is
//! split into single-point reads for the rest of the connection's life (a
//! gap register is unmapped on that device).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use protocols::{Device, ModbusTable, PointAddress, Quality, Sample};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::{Client as _, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;

use super::DriverOptions;
use super::backoff::Backoff;
use super::coalesce::{self, Read, Wanted};
use super::decode::{self, Format};
use super::health::{Health, counter};
use crate::clock::Clock;

type OpenFuture = Pin<Box<dyn Future<Output = io::Result<Context>> + Send>>;
type OpenFn = Box<dyn FnMut() -> OpenFuture + Send>;

/// Opens Modbus client connections for a driver (again after each loss).
pub struct Connector {
    describe: String,
    open: OpenFn,
    reopen_on_timeout: bool,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("describe", &self.describe)
            .field("reopen_on_timeout", &self.reopen_on_timeout)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Modbus TCP to `host:port`, unit `unit`.
    pub fn tcp(host: String, port: u16, unit: u8) -> Self {
        let describe = format!("modbus-tcp://{host}:{port}/{unit}");
        Self {
            describe,
            open: Box::new(move || {
                let host = host.clone();
                Box::pin(async move {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    stream.set_nodelay(true)?;
                    Ok(tokio_modbus::client::tcp::attach_slave(stream, Slave(unit)))
                })
            }),
            reopen_on_timeout: true,
        }
    }

    /// Modbus RTU over whatever byte stream `open` returns (a serial port, a
    /// TCP tunnel, an in-memory pipe in tests). `open` is called again after
    /// every transport error.
    pub fn stream<F, Fut, S>(describe: impl Into<String>, unit: u8, open: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::over(
            describe,
            unit,
            false,
            open,
            tokio_modbus::client::rtu::attach_slave,
        )
    }

    /// Modbus TCP (MBAP framing) over whatever byte stream `open` returns
    /// instead of a TCP connection (see [`super::transport`]). Behaves like
    /// [`tcp`](Self::tcp): a timed-out request reopens the stream. `open` is
    /// called again after every loss.
    pub fn tcp_over<F, Fut, S>(describe: impl Into<String>, unit: u8, open: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug + 'static,
    {
        Self::over(
            describe,
            unit,
            true,
            open,
            tokio_modbus::client::tcp::attach_slave,
        )
    }

    /// A connector that frames the streams `open` returns with `attach`.
    fn over<F, Fut, S>(
        describe: impl Into<String>,
        unit: u8,
        reopen_on_timeout: bool,
        mut open: F,
        attach: fn(S, Slave) -> Context,
    ) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: Send + 'static,
    {
        Self {
            describe: describe.into(),
            open: Box::new(move || {
                let fut = open();
                Box::pin(async move { Ok(attach(fut.await?, Slave(unit))) })
            }),
            reopen_on_timeout,
        }
    }

    /// Modbus RTU over a serial device opened as a plain file (no baud
    /// configuration: set the line up beforehand, e.g. with `stty`).
    pub fn serial_file(path: String, unit: u8) -> Self {
        let describe = format!("modbus-rtu://{path}/{unit}");
        Self::stream(describe, unit, move || {
            let path = path.clone();
            async move {
                tokio::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .await
            }
        })
    }

    /// Where it connects, for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }
}

/// A planned point.
struct PointMeta {
    index: u32,
    format: Format,
    scale: f64,
    offset: f64,
    last: f64,
}

struct Group {
    interval: Duration,
    next: Instant,
    points: Vec<PointMeta>,
    reads: Vec<Read>,
    /// Points that cannot be read (bad address for this protocol).
    unreadable: Vec<usize>,
    /// Reads as first planned, restored on reconnect.
    planned: Vec<Read>,
}

/// Why a read produced no values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    NotConnected,
    Timeout,
    Exception(ExceptionCode),
    Malformed,
}

impl Failure {
    fn quality(self) -> Quality {
        match self {
            Self::NotConnected => Quality::BAD_NOT_CONNECTED,
            Self::Timeout => Quality::BAD_TIMEOUT,
            Self::Exception(_) => Quality::BAD_DEVICE_EXCEPTION,
            Self::Malformed => Quality::BAD_MALFORMED,
        }
    }
}

enum Values {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

struct Poller {
    connector: Connector,
    options: DriverOptions,
    conn: Option<Context>,
    next_connect: Instant,
    backoff: Backoff,
    health: Health,
    clock: Clock,
}

fn request_for(r: &Read) -> Request<'static> {
    match r.table {
        ModbusTable::Coil => Request::ReadCoils(r.start, r.count),
        ModbusTable::DiscreteInput => Request::ReadDiscreteInputs(r.start, r.count),
        ModbusTable::Holding => Request::ReadHoldingRegisters(r.start, r.count),
        ModbusTable::Input => Request::ReadInputRegisters(r.start, r.count),
    }
}

/// Checks that a response answers `r` with the right amount of data.
fn values_from(r: &Read, resp: Response) -> Option<Values> {
    let n = usize::from(r.count);
    match (r.table, resp) {
        (ModbusTable::Coil, Response::ReadCoils(mut b))
        | (ModbusTable::DiscreteInput, Response::ReadDiscreteInputs(mut b)) => {
            // Bits come padded to whole bytes.
            if b.len() < n || b.len() >= n + 8 {
                return None;
            }
            b.truncate(n);
            Some(Values::Bits(b))
        }
        (ModbusTable::Holding, Response::ReadHoldingRegisters(w))
        | (ModbusTable::Input, Response::ReadInputRegisters(w)) => {
            (w.len() == n).then_some(Values::Words(w))
        }
        _ => None,
    }
}

impl Poller {
    fn drop_connection(&mut self, why: &str, immediate: bool) {
        self.conn = None;
        self.health.disconnected(why.to_owned());
        let delay = if immediate {
            Duration::ZERO
        } else {
            self.backoff.next_delay()
        };
        self.next_connect = self.clock.instant() + delay;
        tracing::info!(
            target = self.connector.describe(),
            reason = why,
            ?delay,
            "modbus connection dropped"
        );
    }

    async fn connect(&mut self) {
        let t = self.options.connect_timeout;
        let res = tokio::time::timeout(t, (self.connector.open)()).await;
        let err = match res {
            Ok(Ok(ctx)) => {
                self.conn = Some(ctx);
                self.health.connected();
                tracing::info!(target = self.connector.describe(), "modbus connected");
                return;
            }
            Ok(Err(e)) => format!("connect {}: {e}", self.connector.describe()),
            Err(_) => format!(
                "connect {}: timed out after {t:?}",
                self.connector.describe()
            ),
        };
        let delay = self.backoff.next_delay();
        self.next_connect = self.clock.instant() + delay;
        tracing::debug!(error = %err, ?delay, "modbus connect failed");
        self.health.connect_failed(err);
    }

    /// Performs one planned read, with retries on timeout.
    async fn execute(&mut self, read: &Read) -> Result<(Values, u64), Failure> {
        let attempts = self.options.retries.saturating_add(1);
        for attempt in 1..=attempts {
            let Some(ctx) = self.conn.as_mut() else {
                return Err(Failure::NotConnected);
            };
            let t0 = Instant::now();
            let res =
                tokio::time::timeout(self.options.request_timeout, ctx.call(request_for(read)))
                    .await;
            let latency = t0.elapsed();
            let what = || format!("{:?} {}+{}", read.table, read.start, read.count);
            match res {
                Ok(Ok(Ok(resp))) => {
                    if let Some(v) = values_from(read, resp) {
                        self.health.request(true, latency, None);
                        self.backoff.reset();
                        return Ok((v, self.clock.now_ms()));
                    }
                    self.health.request(
                        false,
                        latency,
                        Some((
                            counter::MALFORMED,
                            format!("{}: reply of wrong type or length", what()),
                        )),
                    );
                    return Err(Failure::Malformed);
                }
                Ok(Ok(Err(code))) => {
                    self.health.request(
                        false,
                        latency,
                        Some((counter::EXCEPTIONS, format!("{}: exception {code}", what()))),
                    );
                    return Err(Failure::Exception(code));
                }
                Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                    let msg = format!("{}: {e}", what());
                    self.health
                        .request(false, latency, Some((counter::MALFORMED, msg.clone())));
                    self.drop_connection(&msg, false);
                    return Err(Failure::Malformed);
                }
                Ok(Err(tokio_modbus::Error::Transport(e))) => {
                    let msg = format!("{}: {e}", what());
                    if e.kind() == io::ErrorKind::InvalidData {
                        self.health.request(
                            false,
                            latency,
                            Some((counter::MALFORMED, msg.clone())),
                        );
                        self.drop_connection(&msg, false);
                        return Err(Failure::Malformed);
                    }
                    self.health.request(false, latency, None);
                    // A reset or EOF: the device may be back already.
                    self.drop_connection(&msg, true);
                    return Err(Failure::NotConnected);
                }
                Err(_) => {
                    let msg = format!(
                        "{}: no reply within {:?} (attempt {attempt}/{attempts})",
                        what(),
                        self.options.request_timeout
                    );
                    self.health
                        .request(false, latency, Some((counter::TIMEOUTS, msg.clone())));
                    if attempt == attempts {
                        if self.connector.reopen_on_timeout {
                            self.drop_connection(&msg, false);
                        }
                        return Err(Failure::Timeout);
                    }
                }
            }
        }
        Err(Failure::Timeout)
    }

    async fn poll(&mut self, g: &mut Group) -> Vec<Sample> {
        let mut out = Vec::with_capacity(g.points.len());
        let mut i = 0;
        while i < g.reads.len() {
            let read = g.reads[i].clone();
            let result = self.execute(&read).await;
            if matches!(
                result,
                Err(Failure::Exception(ExceptionCode::IllegalDataAddress))
            ) && read.slots.len() > 1
            {
                // Some register inside the merged range may be unmapped: try
                // the points one by one. Keep the split only if it helps (a
                // device refusing everything keeps its merged reads).
                let parts = coalesce::split(&read);
                let mut any_ok = false;
                for part in &parts {
                    let r = self.execute(part).await;
                    any_ok |= r.is_ok();
                    self.emit(&mut g.points, part, r, &mut out);
                }
                if any_ok {
                    tracing::info!(table = ?read.table, start = read.start, count = read.count, "split a refused merged read");
                    let n = parts.len();
                    g.reads.splice(i..=i, parts).for_each(drop);
                    i += n;
                } else {
                    i += 1;
                }
                continue;
            }
            self.emit(&mut g.points, &read, result, &mut out);
            i += 1;
        }
        let ts_ms = self.clock.now_ms();
        for &slot in &g.unreadable {
            if let Some(p) = g.points.get(slot) {
                out.push(Sample {
                    point: p.index,
                    ts_ms,
                    value: p.last,
                    quality: Quality::BAD,
                });
            }
        }
        out
    }

    /// Appends the samples of one read's outcome.
    fn emit(
        &self,
        points: &mut [PointMeta],
        read: &Read,
        result: Result<(Values, u64), Failure>,
        out: &mut Vec<Sample>,
    ) {
        let (values, ts_ms) = match result {
            Ok(v) => v,
            Err(f) => {
                let ts_ms = self.clock.now_ms();
                for s in &read.slots {
                    if let Some(p) = points.get(s.slot) {
                        out.push(Sample {
                            point: p.index,
                            ts_ms,
                            value: p.last,
                            quality: f.quality(),
                        });
                    }
                }
                return;
            }
        };
        for s in &read.slots {
            let Some(p) = points.get_mut(s.slot) else {
                continue;
            };
            let raw = match &values {
                Values::Words(w) => w
                    .get(usize::from(s.offset)..)
                    .ok_or(())
                    .and_then(|w| decode::decode(w, p.format).map_err(|_| ())),
                Values::Bits(b) => b
                    .get(usize::from(s.offset))
                    .map(|&b| if b { 1.0 } else { 0.0 })
                    .ok_or(()),
            };
            let (value, quality) = match raw {
                Ok(raw) => {
                    let v = decode::engineering(raw, p.scale, p.offset);
                    if v.is_finite() {
                        p.last = v;
                        (v, Quality::GOOD)
                    } else {
                        (p.last, Quality::BAD_OUT_OF_RANGE)
                    }
                }
                Err(()) => (p.last, Quality::BAD_MALFORMED),
            };
            out.push(Sample {
                point: p.index,
                ts_ms,
                value,
                quality,
            });
        }
    }
}

fn build_groups(device: &Device, options: &DriverOptions, start: Instant) -> Vec<Group> {
    device
        .groups
        .iter()
        .map(|g| {
            let mut points = Vec::with_capacity(g.points.len());
            let mut wanted = Vec::with_capacity(g.points.len());
            let mut unreadable = Vec::new();
            for (slot, p) in g.points.iter().enumerate() {
                let mut format = Format {
                    data_type: protocols::DataType::U16,
                    byte_order: protocols::ByteOrder::BigEndian,
                    word_order: protocols::WordOrder::HighFirst,
                };
                match &p.address {
                    PointAddress::Modbus {
                        table,
                        address,
                        data_type,
                        byte_order,
                        word_order,
                    } => {
                        format = Format {
                            data_type: *data_type,
                            byte_order: *byte_order,
                            word_order: *word_order,
                        };
                        let width = if table.is_bit() {
                            1
                        } else {
                            data_type.registers()
                        };
                        match u16::try_from(*address) {
                            Ok(address) => wanted.push(Wanted {
                                slot,
                                table: *table,
                                address,
                                width,
                            }),
                            Err(_) => unreadable.push(slot),
                        }
                    }
                    _ => unreadable.push(slot),
                }
                points.push(PointMeta {
                    index: p.index,
                    format,
                    scale: p.scale,
                    offset: p.offset,
                    last: 0.0,
                });
            }
            let (reads, rejected) = coalesce::plan(&wanted, options.coalesce);
            unreadable.extend(rejected);
            Group {
                interval: Duration::from_millis(g.interval_ms.max(1)),
                next: start,
                points,
                planned: reads.clone(),
                reads,
                unreadable,
            }
        })
        .collect()
}

/// Runs the poller until `cancel` fires or `out` is closed.
pub(crate) async fn run(
    device: Device,
    connector: Connector,
    options: DriverOptions,
    out: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    health: Health,
    cancel: CancellationToken,
) {
    let start = clock.instant();
    let mut groups = build_groups(&device, &options, start);
    let seed = options.jitter_seed.unwrap_or_else(rand::random);
    let mut p = Poller {
        backoff: Backoff::new(options.backoff, seed),
        connector,
        options,
        conn: None,
        next_connect: start,
        health,
        clock,
    };
    'run: loop {
        let Some(mut wake) = groups.iter().map(|g| g.next).min() else {
            cancel.cancelled().await;
            break;
        };
        if p.conn.is_none() {
            wake = wake.min(p.next_connect);
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(wake) => {}
        }
        if p.conn.is_none() && p.clock.instant() >= p.next_connect {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = p.connect() => {}
            }
            if p.conn.is_some() {
                // A new connection may map registers differently.
                for g in &mut groups {
                    g.reads.clone_from(&g.planned);
                }
            }
        }
        let now = p.clock.instant();
        for g in &mut groups {
            if g.next > now {
                continue;
            }
            let batch = tokio::select! {
                () = cancel.cancelled() => break 'run,
                b = p.poll(g) => b,
            };
            g.next += g.interval;
            let after = p.clock.instant();
            if g.next <= after {
                // Fell behind (slow device): skip missed cycles, keep the phase.
                let behind =
                    after.duration_since(g.next).as_nanos() / g.interval.as_nanos().max(1) + 1;
                g.next += g.interval * u32::try_from(behind).unwrap_or(u32::MAX);
            }
            let bad = batch.iter().filter(|s| s.quality.is_bad()).count();
            p.health.samples(batch.len(), bad);
            if batch.is_empty() {
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => break 'run,
                r = out.send(batch) => if r.is_err() { break 'run; },
            }
        }
    }
    if let Some(mut ctx) = p.conn.take() {
        let _ = tokio::time::timeout(Duration::from_millis(200), ctx.disconnect()).await;
    }
    p.health.disconnected("stopped");
}
