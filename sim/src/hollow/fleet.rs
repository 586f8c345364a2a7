//! The hollow nodes: one MQTT client per node driving the agent's sans-IO
//! [`Session`], and the per-node results ([`Fleet`], [`Slot`]) the
//! measurement reads.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use edge_node::link::LinkSettings;
use edge_node::session::{Input, Output, Session, encode_report};
use protocols::Topics;
use protocols::backoff::{Backoff, BackoffPolicy};
use protocols::signing::VerifyingKey;
use rand::Rng as _;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Per-node results shared by the node tasks and the measurement.
#[derive(Debug, Default)]
pub(super) struct Slot {
    /// Latest revision applied (written after `applied_at_us`).
    pub(super) revision: AtomicU64,
    /// When it was applied, µs since the run started.
    pub(super) applied_at_us: AtomicU64,
}

#[derive(Debug)]
pub(super) struct Fleet {
    pub(super) t0: Instant,
    pub(super) slots: Vec<Slot>,
    /// Nodes whose link is up now.
    pub(super) up: AtomicUsize,
    /// Nodes that saw at least one CONNACK.
    pub(super) connected_once: AtomicUsize,
    pub(super) reconnects: AtomicU64,
    pub(super) connect_errors: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) publish_dropped: AtomicU64,
}

impl Fleet {
    pub(super) fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) struct NodeLink {
    pub(super) host: String,
    pub(super) port: u16,
    /// Issues each node its certificate when the broker wants mTLS.
    pub(super) certs: Option<NodeCerts>,
    pub(super) topics: Topics,
    pub(super) key: VerifyingKey,
    pub(super) keep_alive: Duration,
    pub(super) connect_timeout_s: u64,
}

/// Per-node client certificates from the hub CA, issued in this process
/// (ECDSA P-256: a key and a signature per node, well under a millisecond,
/// so 10,000 nodes take seconds).
pub(super) struct NodeCerts {
    ca: cloud_hub::ca::Ca,
}

impl NodeCerts {
    /// The CA of the local hub whose data directory is `data_dir`.
    pub(super) fn open(data_dir: &std::path::Path) -> Result<Self, super::HollowError> {
        let ca = cloud_hub::ca::Ca::open_detached(&data_dir.join("ca")).map_err(|e| {
            super::HollowError::Hub(format!("hub CA for the nodes' certificates: {e}"))
        })?;
        Ok(Self { ca })
    }

    /// A TLS config presenting a fresh certificate for node `name`.
    pub(super) fn tls_for(
        &self,
        name: &str,
    ) -> Result<Arc<rustls::ClientConfig>, super::HollowError> {
        let fail = |e: String| super::HollowError::Hub(format!("certificate for {name}: {e}"));
        let keyed = self
            .ca
            .issue_keyed(
                &cloud_hub::ca::Identity::node(name),
                Duration::from_secs(7 * 24 * 3600),
            )
            .map_err(|e| fail(e.to_string()))?;
        let cfg = cloud_hub::tls::mqtt_client_config(
            self.ca.cert_pem(),
            Some((&keyed.cert_pem, &keyed.key_pem)),
        )
        .map_err(|(part, e)| fail(format!("{part}: {e}")))?;
        Ok(Arc::new(cfg))
    }
}

/// Does what `session` asked: queue publishes and subscriptions without
/// blocking (like the agent's control traffic), record applied revisions.
/// A hollow node has no store, devices or functions: what the agent would
/// persist or apply is only held in the session's memory.
fn perform(out: Vec<Output>, client: &AsyncClient, fleet: &Fleet, idx: usize) {
    for o in out {
        match o {
            Output::Subscribe(topics) => {
                let subs = topics
                    .into_iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
                if client.try_subscribe_many(subs).is_err() {
                    fleet.publish_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Output::Publish {
                topic,
                retain,
                payload,
            } => try_publish(client, fleet, topic, retain, payload),
            Output::Report { topic, state } => {
                try_publish(client, fleet, topic, true, encode_report(&state));
            }
            Output::Applied { revision } => {
                let slot = &fleet.slots[idx];
                slot.applied_at_us.store(fleet.now_us(), Ordering::Relaxed);
                slot.revision.store(revision, Ordering::Release);
            }
            Output::Rejected { revision, reason } => {
                fleet.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = idx, ?revision, %reason, "hollow node refused desired state");
            }
            Output::LinkUp
            | Output::LinkDown
            | Output::PinKey(_)
            | Output::PersistDesired(_)
            | Output::Apply { .. }
            | Output::RecordLossWindow(_)
            | Output::Ack { .. } => {}
        }
    }
}

fn try_publish(client: &AsyncClient, fleet: &Fleet, topic: String, retain: bool, payload: Vec<u8>) {
    if client
        .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        .is_err()
    {
        fleet.publish_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// One hollow node: a polling task that never does anything but poll and
/// hand events to the session (rumqttc's `poll` is not cancel-safe, so no
/// timer shares its `select!`), and a report ticker.
pub(super) fn spawn_node(
    tasks: &mut JoinSet<()>,
    idx: usize,
    name: String,
    link: &Arc<NodeLink>,
    fleet: &Arc<Fleet>,
    connecting: &Arc<Semaphore>,
    cancel: &CancellationToken,
) -> Result<(), super::HollowError> {
    let session = Arc::new(Mutex::new(
        Session::new(name.clone(), link.topics.clone(), Arc::default(), wall_ms())
            .trusting(link.key),
    ));
    let tls = link.certs.as_ref().map(|c| c.tls_for(&name)).transpose()?;
    let (client, eventloop) = mqtt_client(name, link, &session, tls);
    tasks.spawn(poll_loop(
        eventloop,
        session.clone(),
        fleet.clone(),
        client.clone(),
        connecting.clone(),
        cancel.clone(),
        idx,
    ));
    tasks.spawn(report_loop(
        session,
        fleet.clone(),
        client,
        cancel.clone(),
        idx,
    ));
    Ok(())
}

/// The node's MQTT client with the agent's connection settings (fixed
/// client id, persistent session, last will from the session).
fn mqtt_client(
    name: String,
    link: &NodeLink,
    session: &Mutex<Session>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> (AsyncClient, EventLoop) {
    let settings = LinkSettings {
        client_id: name,
        host: link.host.clone(),
        port: link.port,
        keep_alive: link.keep_alive,
        // A hollow node sends a handful of control messages: a small window
        // keeps the simulator's memory per node small (the agent uses
        // `edge_node::link::AGENT_INFLIGHT`).
        inflight: 16,
        last_will: session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_will(wall_ms()),
        tls,
        login: None,
    };
    let (client, mut eventloop) = AsyncClient::new(settings.options(), 32);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(link.connect_timeout_s);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// The polling task: waits for a connect permit, then polls the event loop
/// and hands every event to the session until cancelled; a link error
/// backs off (200 ms doubling to 30 s, jittered) before the next poll.
async fn poll_loop(
    mut eventloop: EventLoop,
    session: Arc<Mutex<Session>>,
    fleet: Arc<Fleet>,
    client: AsyncClient,
    connecting: Arc<Semaphore>,
    cancel: CancellationToken,
    idx: usize,
) {
    let mut permit = tokio::select! {
        () = cancel.cancelled() => return,
        p = connecting.acquire_owned() => p.ok(),
    };
    let policy = BackoffPolicy::reconnect(Duration::from_millis(200), Duration::from_secs(30));
    let mut backoff = Backoff::new(policy, rand::random());
    loop {
        let polled = tokio::select! {
            () = cancel.cancelled() => return,
            p = eventloop.poll() => p,
        };
        let input = match &polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                if permit.take().is_some() {
                    fleet.connected_once.fetch_add(1, Ordering::Relaxed);
                } else {
                    fleet.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                fleet.up.fetch_add(1, Ordering::Relaxed);
                Input::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Input::Message {
                topic: &p.topic,
                payload: &p.payload,
            },
            Ok(_) => continue,
            Err(e) => {
                link_lost(&session, &fleet, e);
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
                continue;
            }
        };
        let out = session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle(input, wall_ms());
        perform(out, &client, &fleet, idx);
    }
}

/// A link error: count it (a drop if the link was up, a failed connect
/// otherwise) and tell the session.
fn link_lost(session: &Mutex<Session>, fleet: &Fleet, e: &rumqttc::ConnectionError) {
    let mut s = session.lock().unwrap_or_else(PoisonError::into_inner);
    if s.is_up() {
        fleet.up.fetch_sub(1, Ordering::Relaxed);
    } else {
        fleet.connect_errors.fetch_add(1, Ordering::Relaxed);
    }
    tracing::debug!(node = s.node(), error = %e, "hollow node link error");
    s.handle(Input::Disconnected, wall_ms());
}

/// The report ticker: a `ReportTick` every `report_interval_ms` of the
/// session, the first at a random point of the interval.
async fn report_loop(
    session: Arc<Mutex<Session>>,
    fleet: Arc<Fleet>,
    client: AsyncClient,
    cancel: CancellationToken,
    idx: usize,
) {
    let period = |s: &Mutex<Session>| {
        Duration::from_millis(
            s.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .report_interval_ms(),
        )
    };
    let mut every = period(&session);
    // Spread the nodes' reports over the interval.
    let mut next = Instant::now() + every.mul_f64(rand::rng().random_range(0.0..1.0));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let out = session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle(Input::ReportTick, wall_ms());
        perform(out, &client, &fleet, idx);
        every = period(&session);
        next += every;
        if next < Instant::now() {
            next = Instant::now() + every;
        }
    }
}
