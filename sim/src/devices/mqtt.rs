//! Simulated MQTT-native devices: one MQTT client connection that publishes,
//! every tick, one [`MqttDevicePayload`] per device to the device's topic,
//! with the values of its points' [`signal`](crate::signal) models.
//!
//! [`start_broker`] runs an embedded rumqttd on a free 127.0.0.1 port for
//! tests and scenarios. rumqttd has no shutdown API: the broker thread lives
//! until the process ends (one per test process is plenty).
//!
//! # Invariants
//! - A message carries `ts_ms` = the clock at the tick and, per point, the
//!   model's value at `ts_ms - epoch` (epoch: the clock at start).
//! - The served log of a point records `(ts_ms, value)` for every message
//!   the broker acknowledged (QoS 1 PUBACK), i.e. every value that any
//!   subscriber could have received. Unlike the Modbus and OPC UA logs it is
//!   not run-length compacted: a subscriber sees every message, so every
//!   published value is an input sample of the edge node.
//! - While [`go_down`](MqttSim::go_down) is in effect nothing is published
//!   and nothing is logged (the device is off).
//! - [`publish_raw`](MqttSim::publish_raw) sends arbitrary bytes (fault
//!   injection); they are not logged.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use edge_node::clock::Clock;
use futures::future::BoxFuture;
use protocols::MqttDevicePayload;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::devices::SimDeviceError;
use crate::signal::{Model, ModelState};
use crate::truth::Obs;

/// One point of a simulated MQTT device.
#[derive(Debug, Clone)]
pub struct MqttSimPoint {
    /// Key in the served log (use the point's node-wide index); unique per sim.
    pub id: u32,
    /// Key in the payload's `values` (the point's [`protocols::PointAddress::Mqtt`] key).
    pub key: String,
    /// Engineering-value model (published as is: use scale 1, offset 0).
    pub model: Model,
}

/// One simulated device: a topic and its points.
#[derive(Debug, Clone)]
pub struct MqttSimDevice {
    /// Topic the device publishes on.
    pub topic: String,
    /// Its points.
    pub points: Vec<MqttSimPoint>,
}

/// Configuration of [`MqttSim::start`].
#[derive(Debug, Clone)]
pub struct MqttSimConfig {
    /// Broker address.
    pub broker: SocketAddr,
    /// MQTT client id of the simulator's connection.
    pub client_id: String,
    /// The devices.
    pub devices: Vec<MqttSimDevice>,
    /// Publish period.
    pub tick: Duration,
    /// Time source for timestamps and models.
    pub clock: Clock,
    /// Model seed (each point uses `seed ^ id`).
    pub seed: u64,
    /// Keep a served-values log.
    pub record: bool,
    /// How long [`MqttSim::start`] waits for the broker's CONNACK.
    pub connect_timeout: Duration,
    /// Start in the down state (publish nothing until
    /// [`MqttSim::come_up`]), e.g. until subscribers are ready.
    pub start_down: bool,
}

impl MqttSimConfig {
    /// Defaults: client id `edgefleet-sim-mqtt`, 1 s tick, system clock,
    /// seed 1, recording on, 5 s connect timeout, publishing from the start.
    pub fn new(broker: SocketAddr, devices: Vec<MqttSimDevice>) -> Self {
        Self {
            broker,
            client_id: "edgefleet-sim-mqtt".to_owned(),
            devices,
            tick: Duration::from_secs(1),
            clock: Clock::system(),
            seed: 1,
            record: true,
            connect_timeout: Duration::from_secs(5),
            start_down: false,
        }
    }
}

/// Why the simulator did not start or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum MqttSimError {
    /// Two points share an id.
    #[error("devices[{device}].points[{point}].id: {id} is used by another point")]
    DuplicateId {
        /// Device position.
        device: usize,
        /// Point position.
        point: usize,
        /// The id.
        id: u32,
    },
    /// No CONNACK within the connect timeout.
    #[error("broker {addr}: no connection within {timeout:?}: {detail}")]
    Connect {
        /// Broker address.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
        /// Last error seen.
        detail: String,
    },
    /// A publish could not be queued (the simulator is stopping).
    #[error("publish to {topic}: {detail}")]
    Publish {
        /// The topic.
        topic: String,
        /// rumqttc's error.
        detail: String,
    },
    /// No free port or the broker thread could not start.
    #[error("embedded broker: {0}")]
    Broker(String),
}

/// What one queued message will log once the broker acknowledges it.
type Pending = Vec<(u32, u64, f64)>;

#[derive(Debug, Default)]
struct Shared {
    /// Served log per point id.
    log: HashMap<u32, Vec<(u64, f64)>>,
    /// Latest value per point id.
    current: HashMap<u32, f64>,
    /// Messages queued in publish order, not yet given a packet id; `None`
    /// for raw (unlogged) publishes.
    queued: VecDeque<Option<Pending>>,
    /// Sent, waiting for PUBACK, by packet id.
    inflight: HashMap<u16, Option<Pending>>,
}

/// State shared by the handle, the publisher and the event-loop task.
#[derive(Debug, Default)]
struct Inner {
    shared: Mutex<Shared>,
    down: AtomicBool,
    published: AtomicU64,
    acked: AtomicU64,
    /// Held from queueing a log entry until the publish is queued in the
    /// client, so log entries and packets stay in the same order.
    order: tokio::sync::Mutex<()>,
    /// Held by the publisher for the whole of a tick.
    ticking: tokio::sync::Mutex<()>,
}

impl Inner {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running MQTT device simulator.
#[derive(Debug)]
pub struct MqttSim {
    client: AsyncClient,
    inner: Arc<Inner>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl MqttSim {
    /// Connects to the broker (waiting for CONNACK) and starts publishing.
    pub async fn start(config: MqttSimConfig) -> Result<Self, MqttSimError> {
        let mut seen = std::collections::HashSet::new();
        for (di, d) in config.devices.iter().enumerate() {
            for (pi, p) in d.points.iter().enumerate() {
                if !seen.insert(p.id) {
                    return Err(MqttSimError::DuplicateId {
                        device: di,
                        point: pi,
                        id: p.id,
                    });
                }
            }
        }
        let mut opts = MqttOptions::new(
            config.client_id.clone(),
            config.broker.ip().to_string(),
            config.broker.port(),
        );
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_clean_session(true);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        // Wait for the first CONNACK.
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let mut last_err = String::from("timed out");
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Err(_) => {
                    return Err(MqttSimError::Connect {
                        addr: config.broker,
                        timeout: config.connect_timeout,
                        detail: last_err,
                    });
                }
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    last_err = e.to_string();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let inner = Arc::new(Inner {
            down: AtomicBool::new(config.start_down),
            ..Inner::default()
        });
        let cancel = CancellationToken::new();
        let ev_task = tokio::spawn(event_loop(
            eventloop,
            Arc::clone(&inner),
            config.record,
            cancel.clone(),
        ));
        let sim = Self {
            client: client.clone(),
            inner: Arc::clone(&inner),
            cancel: cancel.clone(),
            tasks: Mutex::new(vec![ev_task]),
        };
        let pub_task = tokio::spawn(publisher(config, client, inner, cancel));
        sim.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pub_task);
        Ok(sim)
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.inner.shared()
    }

    /// Values served for point `id`: `(ts_ms, value)` of every acknowledged
    /// message, in publish order.
    pub fn served(&self, id: u32) -> Vec<(u64, f64)> {
        self.shared().log.get(&id).cloned().unwrap_or_default()
    }

    /// The value last computed for point `id`.
    pub fn current(&self, id: u32) -> Option<f64> {
        self.shared().current.get(&id).copied()
    }

    /// Messages queued for publishing so far (device messages, not raw).
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// Messages the broker acknowledged so far (raw ones included).
    pub fn acknowledged(&self) -> u64 {
        self.inner.acked.load(Ordering::Relaxed)
    }

    /// Messages queued or in flight, not yet acknowledged.
    pub fn unacknowledged(&self) -> usize {
        let s = self.shared();
        s.queued.len() + s.inflight.len()
    }

    /// Stops publishing (the devices are off) until [`come_up`](Self::come_up).
    /// Returns once a tick in progress has queued its last message: nothing
    /// is published after that.
    pub async fn go_down(&self) {
        self.inner.down.store(true, Ordering::Relaxed);
        drop(self.inner.ticking.lock().await);
    }

    /// Resumes publishing.
    pub fn come_up(&self) {
        self.inner.down.store(false, Ordering::Relaxed);
    }

    /// Publishes `payload` on `topic` as is (QoS 1), not logged: for garbage
    /// and protocol-violation injection.
    pub async fn publish_raw(&self, topic: &str, payload: Vec<u8>) -> Result<(), MqttSimError> {
        let _order = self.inner.order.lock().await;
        self.shared().queued.push_back(None);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| {
                self.shared().queued.pop_back();
                MqttSimError::Publish {
                    topic: topic.to_owned(),
                    detail: e.to_string(),
                }
            })
    }

    /// Stops publishing and closes the connection.
    pub async fn stop(&self) {
        self.cancel.cancel();
        let _ = self.client.try_disconnect();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

impl crate::devices::SimDevice for MqttSim {
    fn go_down(&self) -> BoxFuture<'_, ()> {
        Box::pin(MqttSim::go_down(self))
    }

    fn come_up(&self) -> BoxFuture<'_, Result<(), SimDeviceError>> {
        MqttSim::come_up(self);
        Box::pin(std::future::ready(Ok(())))
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(MqttSim::stop(self))
    }

    fn served(&self, id: u32) -> Vec<(u64, f64)> {
        MqttSim::served(self, id)
    }

    /// See [`subscription_window`].
    fn delivery_window(&self, served: &mut Vec<Obs>, _stored: &[Obs], t0_ms: u64) {
        subscription_window(served, t0_ms);
    }
}

/// The MQTT delivery rule ([`SimDevice::delivery_window`](crate::devices::SimDevice::delivery_window)):
/// values published before the subscription reached no subscriber; payload
/// timestamps are exact, so the window starts at `t0_ms`.
pub fn subscription_window(served: &mut Vec<Obs>, t0_ms: u64) {
    served.drain(..served.partition_point(|o| o.ts_ms < t0_ms));
}

impl Drop for MqttSim {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            t.abort();
        }
    }
}

async fn publisher(
    config: MqttSimConfig,
    client: AsyncClient,
    inner: Arc<Inner>,
    cancel: CancellationToken,
) {
    let epoch = config.clock.now_ms();
    let mut states: Vec<Vec<ModelState>> = config
        .devices
        .iter()
        .map(|d| {
            d.points
                .iter()
                .map(|p| p.model.start(config.seed ^ u64::from(p.id)))
                .collect()
        })
        .collect();
    let mut tick = tokio::time::interval(config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let _tick_guard = inner.ticking.lock().await;
        if inner.down.load(Ordering::Relaxed) {
            continue;
        }
        let ts_ms = config.clock.now_ms();
        let t = ts_ms.saturating_sub(epoch);
        for (d, st) in config.devices.iter().zip(states.iter_mut()) {
            let mut payload = MqttDevicePayload {
                ts_ms: Some(ts_ms),
                values: std::collections::BTreeMap::new(),
            };
            let mut pending = Vec::with_capacity(d.points.len());
            for (p, s) in d.points.iter().zip(st.iter_mut()) {
                let v = s.value_at(t);
                payload.values.insert(p.key.clone(), Some(v));
                pending.push((p.id, ts_ms, v));
            }
            let Ok(bytes) = serde_json::to_vec(&payload) else {
                continue;
            };
            let _order = inner.order.lock().await;
            {
                let mut sh = inner.shared();
                for &(id, _, v) in &pending {
                    sh.current.insert(id, v);
                }
                sh.queued.push_back(config.record.then_some(pending));
            }
            let r = tokio::select! {
                () = cancel.cancelled() => return,
                r = client.publish(d.topic.clone(), QoS::AtLeastOnce, false, bytes) => r,
            };
            if r.is_err() {
                // The event loop is gone: nothing more can be published.
                inner.shared().queued.pop_back();
                return;
            }
            inner.published.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Polls the client's event loop: maps packet ids to queued messages and logs
/// them on PUBACK; reconnects after errors (rumqttc resends unacknowledged
/// messages after a reconnect).
async fn event_loop(
    mut eventloop: rumqttc::EventLoop,
    inner: Arc<Inner>,
    record: bool,
    cancel: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut sh = inner.shared();
                // A packet id already in flight is a retransmission.
                if !sh.inflight.contains_key(&pkid)
                    && let Some(p) = sh.queued.pop_front()
                {
                    sh.inflight.insert(pkid, p);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                inner.acked.fetch_add(1, Ordering::Relaxed);
                let mut sh = inner.shared();
                if let Some(Some(p)) = sh.inflight.remove(&ack.pkid)
                    && record
                {
                    for (id, ts, v) in p {
                        sh.log.entry(id).or_default().push((ts, v));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "mqtt sim connection error; reconnecting");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

/// Starts an anonymous rumqttd (the devices' own broker, not the hub's: no
/// auth, no ACL, like a plant's device broker) on a free `127.0.0.1` port
/// and waits until it accepts connections. The broker cannot be stopped
/// (rumqttd has no shutdown API); it runs until the process exits.
pub async fn start_broker() -> Result<SocketAddr, MqttSimError> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| MqttSimError::Broker(format!("no free port: {e}")))?
        .port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let server = rumqttd::ServerSettings {
        name: "devices-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: protocols::limits::MAX_SYNC_PACKET_BYTES,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 1_000,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..rumqttd::RouterConfig::default()
        },
        v4: Some(std::iter::once(("v4".to_owned(), server)).collect()),
        ..rumqttd::Config::default()
    };
    std::thread::Builder::new()
        .name("rumqttd-devices".into())
        .spawn(move || {
            if let Err(e) = rumqttd::Broker::new(config).start() {
                tracing::error!(error = %e, "device broker stopped");
            }
        })
        .map_err(|e| MqttSimError::Broker(format!("cannot start the broker thread: {e}")))?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(listen);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(MqttSimError::Broker(format!(
        "{listen} does not accept connections"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_starts_at_the_subscription() {
        let mut served: Vec<Obs> = (0..4).map(|i| Obs::good(10 * i, i as f64)).collect();
        subscription_window(&mut served, 20);
        assert_eq!(served, vec![Obs::good(20, 2.0), Obs::good(30, 3.0)]);
    }
}
