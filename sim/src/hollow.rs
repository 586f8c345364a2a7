//! Hollow-node mode: thousands of edge-node stand-ins that speak the real
//! sync protocol with no devices, to measure the hub at fleet scale.
//!
//! Each hollow node is one `rumqttc` client with the agent's connection
//! settings (fixed client id = node name, persistent session, last will =
//! offline status) driving the agent's own sans-IO sync session
//! ([`edge_node::session::Session`]) with no store: it verifies the hub's
//! signature, validates, refuses stale or foreign documents and reports
//! `applied_revision` with the same code as a real agent. The hub cannot tell
//! them from real agents; the simulator pays one socket and a few kilobytes
//! per node.
//!
//! [`run`] measures one fleet against a running hub:
//! 1. wait for the hub's `/readyz`, connect `nodes` hollow nodes, at most
//!    `connect_concurrency` connecting at once, and wait until the hub's
//!    registry shows every one online;
//! 2. for each round, PUT a new desired revision for every node through the
//!    REST API (`put_concurrency` requests in flight) and record, per node,
//!    the time from sending its PUT to (a) the node holding the verified new
//!    revision and (b) the hub's registry (`GET /v1/nodes`, polled every
//!    `registry_poll`) showing it as the node's `applied_revision`;
//! 3. report percentiles, wall time and the peak memory of hub and simulator
//!    ([`HollowReport`]).
//!
//! Times start when the PUT is sent, not when its response arrives: the hub
//! publishes before it answers, so a node can hold the document before the
//! client hears "accepted". The PUT latency is reported on its own.
//!
//! The hub normally runs as a separate process ([`hub::HubProcess`]) so the
//! two ends of 10,000 connections do not share one descriptor table. The
//! broker is the hub's embedded rumqttd or, for large fleets, a Mosquitto
//! process ([`broker::Mosquitto`]) that the hub uses as an external broker.

pub mod broker;
pub mod hub;
pub mod stack;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cloud_hub::api::NodeView;
use edge_node::session::{Input, Output, Session, encode_report};
use futures::StreamExt as _;
use protocols::signing::{VerifyingKey, key_from_hex};
use protocols::{DesiredState, NodeConfig, NodeState, Topics};
use rand::Rng as _;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use broker::{BrokerKind, Mosquitto, MosquittoOptions};
pub use hub::{HubEndpoint, HubProcess, Memory};
pub use stack::{Stack, StackOptions};

/// Why a hollow run failed (as opposed to finishing with nodes that did not
/// converge, which the report shows).
#[derive(Debug, thiserror::Error)]
pub enum HollowError {
    /// An option is out of range; the message names it.
    #[error("{0}")]
    Config(String),
    /// Not enough file descriptors for the sockets this run needs.
    #[error(
        "file descriptor limit {limit} is too low for {needed} sockets in this process (raise `ulimit -n` or run the hub as a separate process)"
    )]
    FileLimit {
        /// Soft limit after trying to raise it.
        limit: u64,
        /// What this run needs.
        needed: u64,
    },
    /// Local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The hub's REST API failed or answered something unexpected.
    #[error("hub API {what}: {detail}")]
    Api {
        /// Which call.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// The hub process failed.
    #[error("{0}")]
    Hub(String),
    /// The external broker process could not be started or failed.
    #[error("{0}")]
    Broker(String),
    /// Nodes did not connect (or the hub did not see them) in time.
    #[error("{0}")]
    Timeout(String),
}

/// Settings of a hollow run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HollowOptions {
    /// Hollow nodes to run.
    pub nodes: usize,
    /// Node names are `{node_prefix}{index}` with a zero-padded index.
    pub node_prefix: String,
    /// Most nodes connecting (CONNECT sent, CONNACK not yet seen) at once.
    pub connect_concurrency: usize,
    /// Most `PUT /v1/nodes/{node}/desired` requests in flight.
    pub put_concurrency: usize,
    /// Desired-state changes pushed to every node, one after the other.
    pub rounds: u32,
    /// `config.report_interval_ms` of the pushed desired state: how often each
    /// node re-publishes its reported state (the agent's default is 5 s).
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// MQTT keep-alive of each node (the agent's default is 15 s).
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long a node waits for CONNACK (and for a write to flush) before
    /// it drops the attempt and retries (rumqttc's default, which the agent
    /// uses, is 5 s).
    #[serde(with = "humantime_serde")]
    pub mqtt_connect_timeout: Duration,
    /// How often the hub registry is polled during a round (the resolution
    /// of the registry round-trip figures).
    #[serde(with = "humantime_serde")]
    pub registry_poll: Duration,
    /// Longest wait for every node to connect and show up online in the hub.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for one round to converge.
    #[serde(with = "humantime_serde")]
    pub round_timeout: Duration,
    /// Print progress lines on stderr.
    pub progress: bool,
}

impl Default for HollowOptions {
    fn default() -> Self {
        Self {
            nodes: 100,
            node_prefix: "hollow-".into(),
            connect_concurrency: 200,
            put_concurrency: 32,
            rounds: 1,
            report_interval: Duration::from_secs(5),
            keep_alive: Duration::from_secs(15),
            mqtt_connect_timeout: Duration::from_secs(5),
            registry_poll: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(600),
            round_timeout: Duration::from_secs(600),
            progress: false,
        }
    }
}

impl HollowOptions {
    /// Checks ranges; errors name the option.
    pub fn validate(&self) -> Result<(), HollowError> {
        let bad = |m: String| Err(HollowError::Config(m));
        if self.nodes == 0 || self.nodes > 1_000_000 {
            return bad(format!("nodes: {} is out of range 1..=1000000", self.nodes));
        }
        let width = self.nodes.to_string().len();
        if !protocols::validate::is_valid_name(&format!(
            "{}{}",
            self.node_prefix,
            "0".repeat(width)
        )) {
            return bad(format!(
                "node_prefix: {:?} does not make valid node names (1..=64 of A-Z a-z 0-9 . _ -)",
                self.node_prefix
            ));
        }
        if self.connect_concurrency == 0 {
            return bad("connect_concurrency: must be at least 1".into());
        }
        if self.put_concurrency == 0 {
            return bad("put_concurrency: must be at least 1".into());
        }
        if self.rounds == 0 {
            return bad("rounds: must be at least 1".into());
        }
        if self.report_interval < Duration::from_millis(100) {
            return bad("report_interval: must be at least 100ms".into());
        }
        if self.keep_alive < Duration::from_secs(5) {
            return bad("keep_alive: must be at least 5s".into());
        }
        if self.mqtt_connect_timeout < Duration::from_secs(1) {
            return bad("mqtt_connect_timeout: must be at least 1s".into());
        }
        if self.registry_poll < Duration::from_millis(10) {
            return bad("registry_poll: must be at least 10ms".into());
        }
        Ok(())
    }

    /// The name of node `i`.
    pub fn node_name(&self, i: usize) -> String {
        let width = self.nodes.to_string().len();
        format!("{}{i:0width$}", self.node_prefix)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft
/// limit. Child processes (a spawned hub) inherit it.
pub fn raise_fd_limit() -> Result<u64, HollowError> {
    rlimit::increase_nofile_limit(u64::MAX).map_err(|source| HollowError::Io {
        what: "raising RLIMIT_NOFILE".into(),
        source,
    })
}

/// Latency distribution in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl Latency {
    /// Summarises `samples` (milliseconds).
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        Self {
            count: v.len(),
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            max_ms: v[v.len() - 1],
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

/// One desired-state change pushed to every node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// The revision pushed to every node.
    pub revision: u64,
    /// PUT sent → response received, for accepted PUTs.
    pub put: Latency,
    /// PUTs that failed or were refused.
    pub put_errors: usize,
    /// First PUT error, if any.
    pub first_put_error: Option<String>,
    /// PUT sent → node holds the verified revision.
    pub node: Latency,
    /// PUT sent → hub registry shows the revision applied (upper bound: time
    /// the poll that first showed it returned).
    pub registry: Latency,
    /// Duration of each `GET /v1/nodes` poll during the round (the hub reads
    /// and serializes every node's record; its cost grows with the fleet).
    pub registry_get: Latency,
    /// Nodes that applied the revision.
    pub converged_nodes: usize,
    /// Nodes whose registry record showed it applied.
    pub converged_registry: usize,
    /// Nodes whose final registry record agrees: desired revision and
    /// reported `applied_revision` both equal `revision`, status online.
    pub registry_agrees: usize,
    /// First PUT sent → last node seen converged in the registry (or timeout).
    pub wall_ms: f64,
    /// Hub resident memory when the round ended.
    pub hub_rss_bytes: u64,
}

/// What a hollow run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HollowReport {
    /// Hollow nodes started.
    pub nodes: usize,
    /// Nodes connected when the rounds started.
    pub connected: usize,
    /// Start → every node had its first CONNACK.
    pub connect_seconds: f64,
    /// Start → the hub registry showed every node online.
    pub registry_online_seconds: f64,
    /// Per round.
    pub rounds: Vec<RoundReport>,
    /// Node convergence over all rounds, p50 (ms).
    pub desired_convergence_ms_p50: f64,
    /// Node convergence over all rounds, p99 (ms).
    pub desired_convergence_ms_p99: f64,
    /// Node convergence over all rounds, max (ms).
    pub desired_convergence_ms_max: f64,
    /// Registry round trip over all rounds, p50 (ms).
    pub registry_convergence_ms_p50: f64,
    /// Registry round trip over all rounds, p99 (ms).
    pub registry_convergence_ms_p99: f64,
    /// Registry round trip over all rounds, max (ms).
    pub registry_convergence_ms_max: f64,
    /// Every node converged in every round, and the registry agrees.
    pub all_converged: bool,
    /// Hub resident memory before any node connected.
    pub hub_rss_bytes_idle: u64,
    /// Hub resident memory once every node was online.
    pub hub_rss_bytes_connected: u64,
    /// Hub peak resident memory (`VmHWM`, or the sampled maximum if larger).
    pub hub_rss_bytes_max: u64,
    /// Simulator peak resident memory.
    pub sim_rss_bytes_max: u64,
    /// Whether the hub ran in the simulator's process (its memory figures
    /// then include the hollow nodes).
    pub hub_in_process: bool,
    /// The broker the nodes and the hub met on.
    pub broker: BrokerKind,
    /// Its version, when known (`mosquitto version 2.0.11`).
    pub broker_version: Option<String>,
    /// External broker's resident memory before any node connected (0 when
    /// the broker is embedded in the hub or not measured).
    pub broker_rss_bytes_idle: u64,
    /// External broker's resident memory once every node was online.
    pub broker_rss_bytes_connected: u64,
    /// External broker's peak resident memory (`VmHWM`, or the sampled
    /// maximum if larger).
    pub broker_rss_bytes_max: u64,
    /// `/proc/loadavg` (1, 5, 15 min) when the run started.
    pub load_average_start: [f64; 3],
    /// `/proc/loadavg` when the run ended.
    pub load_average_end: [f64; 3],
    /// Highest 1-minute load average sampled during the run.
    pub load_average_1m_max: f64,
    /// Reconnects after a first CONNACK, all nodes.
    pub reconnects: u64,
    /// Connection attempts that failed, all nodes.
    pub connect_errors: u64,
    /// Desired documents nodes refused (should be 0).
    pub desired_rejected: u64,
    /// Publishes nodes could not queue (client queue full).
    pub publish_dropped: u64,
    /// Start → end.
    pub wall_seconds: f64,
    /// The options of the run.
    pub options: HollowOptions,
}

impl HollowReport {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "hollow fleet: {} nodes, {} connected in {:.1} s, all online in the hub registry after {:.1} s",
            self.nodes, self.connected, self.connect_seconds, self.registry_online_seconds
        );
        for r in &self.rounds {
            let _ = writeln!(
                s,
                "round rev {}: {}/{} nodes applied, {}/{} in registry ({} agree), {:.1} s wall; PUT p50 {:.1} ms p99 {:.1} ms ({} errors)",
                r.revision,
                r.converged_nodes,
                self.nodes,
                r.converged_registry,
                self.nodes,
                r.registry_agrees,
                r.wall_ms / 1000.0,
                r.put.p50_ms,
                r.put.p99_ms,
                r.put_errors
            );
            let _ = writeln!(
                s,
                "  PUT → node verified:    p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
                r.node.p50_ms, r.node.p99_ms, r.node.max_ms
            );
            let _ = writeln!(
                s,
                "  PUT → hub registry:     p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms  (poll every {} ms; GET /v1/nodes p50 {:.0} ms, max {:.0} ms)",
                r.registry.p50_ms,
                r.registry.p99_ms,
                r.registry.max_ms,
                self.options.registry_poll.as_millis(),
                r.registry_get.p50_ms,
                r.registry_get.max_ms
            );
        }
        let _ = writeln!(
            s,
            "hub RSS: idle {:.0} MiB, {} nodes online {:.0} MiB, peak {:.0} MiB{}; fleet-sim peak {:.0} MiB",
            mb(self.hub_rss_bytes_idle),
            self.nodes,
            mb(self.hub_rss_bytes_connected),
            mb(self.hub_rss_bytes_max),
            if self.hub_in_process {
                " (hub in this process: includes the hollow nodes)"
            } else {
                ""
            },
            mb(self.sim_rss_bytes_max)
        );
        if self.broker == BrokerKind::Mosquitto {
            let _ = writeln!(
                s,
                "broker ({}) RSS: idle {:.0} MiB, {} nodes online {:.0} MiB, peak {:.0} MiB",
                self.broker_version.as_deref().unwrap_or("mosquitto"),
                mb(self.broker_rss_bytes_idle),
                self.nodes,
                mb(self.broker_rss_bytes_connected),
                mb(self.broker_rss_bytes_max),
            );
        }
        let l = |a: [f64; 3]| format!("{:.2} {:.2} {:.2}", a[0], a[1], a[2]);
        let _ = writeln!(
            s,
            "load average: start {}, end {}, highest 1-min {:.2}",
            l(self.load_average_start),
            l(self.load_average_end),
            self.load_average_1m_max
        );
        let _ = write!(
            s,
            "wall {:.1} s; reconnects {}, connect errors {}, rejected {}, dropped publishes {}; {}",
            self.wall_seconds,
            self.reconnects,
            self.connect_errors,
            self.desired_rejected,
            self.publish_dropped,
            if self.all_converged {
                "every node converged"
            } else {
                "NOT every node converged"
            }
        );
        s
    }
}

/// Per-node results shared by the node tasks and the measurement.
#[derive(Debug, Default)]
struct Slot {
    /// Latest revision applied (written after `applied_at_us`).
    revision: AtomicU64,
    /// When it was applied, µs since the run started.
    applied_at_us: AtomicU64,
}

#[derive(Debug)]
struct Fleet {
    t0: Instant,
    slots: Vec<Slot>,
    /// Nodes whose link is up now.
    up: AtomicUsize,
    /// Nodes that saw at least one CONNACK.
    connected_once: AtomicUsize,
    reconnects: AtomicU64,
    connect_errors: AtomicU64,
    rejected: AtomicU64,
    publish_dropped: AtomicU64,
}

impl Fleet {
    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct NodeLink {
    host: String,
    port: u16,
    topics: Topics,
    key: VerifyingKey,
    keep_alive: Duration,
    connect_timeout_s: u64,
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
fn spawn_node(
    tasks: &mut JoinSet<()>,
    idx: usize,
    name: String,
    link: &Arc<NodeLink>,
    fleet: &Arc<Fleet>,
    connecting: &Arc<Semaphore>,
    cancel: &CancellationToken,
) {
    let session = Arc::new(Mutex::new(
        Session::new(name.clone(), link.topics.clone(), Arc::default(), wall_ms())
            .trusting(link.key),
    ));
    let mut opts = MqttOptions::new(name, link.host.clone(), link.port);
    opts.set_keep_alive(link.keep_alive);
    opts.set_clean_session(false);
    opts.set_max_packet_size(
        edge_node::link::MAX_PACKET_BYTES,
        edge_node::link::MAX_PACKET_BYTES,
    );
    // A hollow node sends a handful of control messages: a small window
    // keeps the simulator's memory per node small (the agent uses 200).
    opts.set_inflight(16);
    let (will_topic, will) = session
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .last_will(wall_ms());
    opts.set_last_will(LastWill::new(will_topic, will, QoS::AtLeastOnce, true));
    let (client, mut eventloop) = AsyncClient::new(opts, 32);
    let mut net = eventloop.network_options();
    net.set_connection_timeout(link.connect_timeout_s);
    eventloop.set_network_options(net);
    {
        let (session, fleet, client, cancel) = (
            session.clone(),
            fleet.clone(),
            client.clone(),
            cancel.clone(),
        );
        let connecting = connecting.clone();
        tasks.spawn(async move {
            let mut permit = tokio::select! {
                () = cancel.cancelled() => return,
                p = connecting.acquire_owned() => p.ok(),
            };
            let (min, max) = (Duration::from_millis(200), Duration::from_secs(30));
            let mut delay = min;
            loop {
                let polled = tokio::select! {
                    () = cancel.cancelled() => return,
                    p = eventloop.poll() => p,
                };
                let input = match &polled {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        delay = min;
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
                        {
                            let mut s = session.lock().unwrap_or_else(PoisonError::into_inner);
                            if s.is_up() {
                                fleet.up.fetch_sub(1, Ordering::Relaxed);
                            } else {
                                fleet.connect_errors.fetch_add(1, Ordering::Relaxed);
                            }
                            tracing::debug!(node = s.node(), error = %e, "hollow node link error");
                            s.handle(Input::Disconnected, wall_ms());
                        }
                        let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(jittered) => {}
                        }
                        delay = (delay * 2).min(max);
                        continue;
                    }
                };
                let out = session
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .handle(input, wall_ms());
                perform(out, &client, &fleet, idx);
            }
        });
    }
    {
        let (fleet, cancel) = (fleet.clone(), cancel.clone());
        tasks.spawn(async move {
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
        });
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn err(what: &str, e: impl std::fmt::Display) -> HollowError {
        HollowError::Api {
            what: what.into(),
            detail: e.to_string(),
        }
    }

    async fn hub_key(&self) -> Result<(VerifyingKey, Topics), HollowError> {
        let what = "GET /v1/hub";
        let v: serde_json::Value = self
            .http
            .get(format!("{}/v1/hub", self.base))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Self::err(what, e))?
            .json()
            .await
            .map_err(|e| Self::err(what, e))?;
        let key = v["public_key"]
            .as_str()
            .ok_or_else(|| Self::err(what, "no public_key in the answer"))?;
        let key = key_from_hex(key).map_err(|e| Self::err(what, e))?;
        let root = v["topic_root"]
            .as_str()
            .ok_or_else(|| Self::err(what, "no topic_root in the answer"))?;
        Ok((key, Topics::new(root)))
    }

    /// Waits until `GET /readyz` answers 200 (the hub's MQTT session is
    /// subscribed), or returns `false` at once if the hub has no such route.
    async fn wait_ready(&self, timeout: Duration) -> Result<bool, HollowError> {
        let what = "GET /readyz";
        let deadline = Instant::now() + timeout;
        loop {
            let r = self
                .http
                .get(format!("{}/readyz", self.base))
                .send()
                .await
                .map_err(|e| Self::err(what, e))?;
            match r.status() {
                s if s.is_success() => return Ok(true),
                reqwest::StatusCode::NOT_FOUND => return Ok(false),
                s if Instant::now() >= deadline => {
                    return Err(HollowError::Timeout(format!(
                        "{what}: hub not ready within {timeout:?} (last answer {s})"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeView>, HollowError> {
        let what = "GET /v1/nodes";
        self.http
            .get(format!("{}/v1/nodes", self.base))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Self::err(what, e))?
            .json()
            .await
            .map_err(|e| Self::err(what, e))
    }

    async fn put_desired(&self, d: &DesiredState) -> Result<(), String> {
        let r = self
            .http
            .put(format!("{}/v1/nodes/{}/desired", self.base, d.node))
            .json(d)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(())
        } else {
            let status = r.status();
            Err(format!(
                "{status}: {}",
                r.text().await.unwrap_or_default().trim()
            ))
        }
    }
}

/// Samples resident memory of the hub, the external broker and this
/// process, and the load average.
#[derive(Debug, Default)]
struct MemWatch {
    hub_pid: Option<u32>,
    broker_pid: Option<u32>,
    hub_max: AtomicU64,
    broker_max: AtomicU64,
    sim_max: AtomicU64,
    /// Highest 1-minute load average, `f64` bits.
    load_max: AtomicU64,
}

/// What one [`MemWatch::sample`] read (0: not measured).
#[derive(Debug, Clone, Copy, Default)]
struct MemSample {
    hub_rss: u64,
    broker_rss: u64,
}

impl MemWatch {
    fn sample(&self) -> MemSample {
        let peak = |m: Memory| m.rss_bytes.max(m.hwm_bytes);
        if let Some(m) = hub::memory(std::process::id()) {
            self.sim_max.fetch_max(peak(m), Ordering::Relaxed);
        }
        let mut out = MemSample::default();
        if let Some(m) = self.hub_pid.and_then(hub::memory) {
            self.hub_max.fetch_max(peak(m), Ordering::Relaxed);
            out.hub_rss = m.rss_bytes;
        }
        if let Some(m) = self.broker_pid.and_then(hub::memory) {
            self.broker_max.fetch_max(peak(m), Ordering::Relaxed);
            out.broker_rss = m.rss_bytes;
        }
        if let Some([one, ..]) = load_average() {
            // Non-negative floats order like their bits.
            self.load_max.fetch_max(one.to_bits(), Ordering::Relaxed);
        }
        out
    }
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures (`None` off Linux).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    parse_loadavg(&text)
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    let mut next = || it.next()?.ok().filter(|x| *x >= 0.0);
    Some([next()?, next()?, next()?])
}

fn say(opts: &HollowOptions, msg: &str) {
    if opts.progress {
        eprintln!("{msg}");
    }
}

/// Runs a hollow fleet against `hub` and measures it. Nodes that do not
/// converge are reported, not an error; an error means the run could not be
/// carried out (hub unreachable, nodes never connected, …).
pub async fn run(opts: &HollowOptions, hub: &HubEndpoint) -> Result<HollowReport, HollowError> {
    opts.validate()?;
    let t0 = Instant::now();
    let limit = raise_fd_limit()?;
    let per_node = if hub.in_process { 2 } else { 1 };
    let needed = (opts.nodes * per_node) as u64 + 256;
    if limit < needed {
        return Err(HollowError::FileLimit { limit, needed });
    }
    let api = Arc::new(Api {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(opts.put_concurrency + 4)
            .build()
            .map_err(|e| Api::err("client", e))?,
        base: hub.http_base.trim_end_matches('/').to_owned(),
    });
    // Nodes that connect before the hub subscribed may have their retained
    // status missed by it (see `cloud_hub::Hub::mqtt_ready`).
    if !api.wait_ready(opts.connect_timeout).await? {
        say(
            opts,
            "hub has no /readyz: connecting nodes without knowing whether it subscribed",
        );
    }
    let (key, topics) = api.hub_key().await?;
    let names: Vec<String> = (0..opts.nodes).map(|i| opts.node_name(i)).collect();
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    // Revisions the hub already holds for these names (a reused hub).
    let base_revision = api
        .nodes()
        .await?
        .iter()
        .filter(|v| index.contains_key(v.node.as_str()))
        .map(|v| v.desired_revision)
        .max()
        .unwrap_or(0);

    let load_average_start = load_average().unwrap_or_default();
    let mem = Arc::new(MemWatch {
        hub_pid: hub.pid,
        broker_pid: hub.broker_pid,
        ..MemWatch::default()
    });
    let cancel = CancellationToken::new();
    let sampler = {
        let (mem, cancel) = (mem.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                mem.sample();
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        })
    };
    let idle = mem.sample();

    let fleet = Arc::new(Fleet {
        t0,
        slots: (0..opts.nodes).map(|_| Slot::default()).collect(),
        up: AtomicUsize::new(0),
        connected_once: AtomicUsize::new(0),
        reconnects: AtomicU64::new(0),
        connect_errors: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        publish_dropped: AtomicU64::new(0),
    });
    let link = Arc::new(NodeLink {
        host: hub.mqtt_host.clone(),
        port: hub.mqtt_port,
        topics,
        key,
        keep_alive: opts.keep_alive,
        connect_timeout_s: opts.mqtt_connect_timeout.as_secs(),
    });
    let connecting = Arc::new(Semaphore::new(opts.connect_concurrency));
    let mut tasks = JoinSet::new();
    say(
        opts,
        &format!(
            "starting {} hollow nodes against {} (MQTT {}:{}), {} connecting at once",
            opts.nodes, hub.http_base, hub.mqtt_host, hub.mqtt_port, opts.connect_concurrency
        ),
    );
    for (i, name) in names.iter().enumerate() {
        spawn_node(
            &mut tasks,
            i,
            name.clone(),
            &link,
            &fleet,
            &connecting,
            &cancel,
        );
    }

    let result = measure(opts, &api, &fleet, &names, &index, base_revision, &mem).await;
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = sampler.await;
    let mut report = result?;
    mem.sample();
    report.hub_rss_bytes_idle = idle.hub_rss;
    report.hub_rss_bytes_max = mem.hub_max.load(Ordering::Relaxed);
    report.broker_rss_bytes_idle = idle.broker_rss;
    report.broker_rss_bytes_max = mem.broker_max.load(Ordering::Relaxed);
    report.sim_rss_bytes_max = mem.sim_max.load(Ordering::Relaxed);
    report.hub_in_process = hub.in_process;
    report.broker = hub.broker;
    report.load_average_start = load_average_start;
    report.load_average_end = load_average().unwrap_or_default();
    report.load_average_1m_max = f64::from_bits(mem.load_max.load(Ordering::Relaxed));
    report.reconnects = fleet.reconnects.load(Ordering::Relaxed);
    report.connect_errors = fleet.connect_errors.load(Ordering::Relaxed);
    report.desired_rejected = fleet.rejected.load(Ordering::Relaxed);
    report.publish_dropped = fleet.publish_dropped.load(Ordering::Relaxed);
    report.wall_seconds = t0.elapsed().as_secs_f64();
    report.options = opts.clone();
    Ok(report)
}

async fn measure(
    opts: &HollowOptions,
    api: &Arc<Api>,
    fleet: &Arc<Fleet>,
    names: &[String],
    index: &HashMap<&str, usize>,
    base_revision: u64,
    mem: &MemWatch,
) -> Result<HollowReport, HollowError> {
    let n = names.len();
    let t0 = fleet.t0;
    let deadline = t0 + opts.connect_timeout;
    // 1. Every node connected.
    let mut last_print = Instant::now();
    loop {
        let c = fleet.connected_once.load(Ordering::Relaxed);
        if c == n {
            break;
        }
        if Instant::now() >= deadline {
            return Err(HollowError::Timeout(format!(
                "only {c} of {n} nodes connected within {:?} ({} connect errors)",
                opts.connect_timeout,
                fleet.connect_errors.load(Ordering::Relaxed)
            )));
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            say(
                opts,
                &format!(
                    "[{:>6.1}s] connected {c}/{n} (up {}, connect errors {})",
                    t0.elapsed().as_secs_f64(),
                    fleet.up.load(Ordering::Relaxed),
                    fleet.connect_errors.load(Ordering::Relaxed)
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_seconds = t0.elapsed().as_secs_f64();
    say(
        opts,
        &format!("[{connect_seconds:>6.1}s] all {n} nodes connected"),
    );
    // 2. The hub sees every node online (and holding the base revision).
    loop {
        let views = api.nodes().await?;
        let ready = views
            .iter()
            .filter(|v| index.contains_key(v.node.as_str()))
            .filter(|v| {
                v.status
                    .as_ref()
                    .is_some_and(|s| s.state == NodeState::Online)
            })
            .filter(|v| v.reported.as_ref().map_or(0, |r| r.applied_revision) == base_revision)
            .count();
        if ready == n {
            break;
        }
        if Instant::now() >= deadline {
            return Err(HollowError::Timeout(format!(
                "the hub registry showed only {ready} of {n} nodes online within {:?}",
                opts.connect_timeout
            )));
        }
        say(
            opts,
            &format!(
                "[{:>6.1}s] hub registry: {ready}/{n} online",
                t0.elapsed().as_secs_f64()
            ),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let registry_online_seconds = t0.elapsed().as_secs_f64();
    let online = mem.sample();
    let mib = |b: u64| b as f64 / 1_048_576.0;
    say(
        opts,
        &format!(
            "[{registry_online_seconds:>6.1}s] hub registry shows all {n} nodes online; hub RSS {:.0} MiB{}",
            mib(online.hub_rss),
            if mem.broker_pid.is_some() {
                format!(", broker RSS {:.0} MiB", mib(online.broker_rss))
            } else {
                String::new()
            }
        ),
    );

    let mut rounds = Vec::new();
    let (mut all_node, mut all_reg) = (Vec::new(), Vec::new());
    for r in 1..=u64::from(opts.rounds) {
        let revision = base_revision + r;
        let round = round(opts, api, fleet, names, index, revision).await?;
        let mut round = round;
        round.0.hub_rss_bytes = mem.sample().hub_rss;
        say(
            opts,
            &format!(
                "[{:>6.1}s] round rev {revision}: {}/{n} nodes, {}/{n} registry; node p50 {:.1} ms p99 {:.1} ms; registry p50 {:.1} ms p99 {:.1} ms",
                t0.elapsed().as_secs_f64(),
                round.0.converged_nodes,
                round.0.converged_registry,
                round.0.node.p50_ms,
                round.0.node.p99_ms,
                round.0.registry.p50_ms,
                round.0.registry.p99_ms
            ),
        );
        all_node.extend(round.1);
        all_reg.extend(round.2);
        rounds.push(round.0);
    }
    let node = Latency::of(&all_node);
    let reg = Latency::of(&all_reg);
    let all_converged = rounds
        .iter()
        .all(|r| r.converged_nodes == n && r.converged_registry == n && r.registry_agrees == n);
    Ok(HollowReport {
        nodes: n,
        connected: fleet.connected_once.load(Ordering::Relaxed),
        connect_seconds,
        registry_online_seconds,
        rounds,
        desired_convergence_ms_p50: node.p50_ms,
        desired_convergence_ms_p99: node.p99_ms,
        desired_convergence_ms_max: node.max_ms,
        registry_convergence_ms_p50: reg.p50_ms,
        registry_convergence_ms_p99: reg.p99_ms,
        registry_convergence_ms_max: reg.max_ms,
        all_converged,
        hub_rss_bytes_connected: online.hub_rss,
        broker_rss_bytes_connected: online.broker_rss,
        ..HollowReport::default()
    })
}

/// One round: PUT `revision` for every node and wait for convergence.
/// Returns the round report and the raw node / registry samples (ms).
async fn round(
    opts: &HollowOptions,
    api: &Arc<Api>,
    fleet: &Arc<Fleet>,
    names: &[String],
    index: &HashMap<&str, usize>,
    revision: u64,
) -> Result<(RoundReport, Vec<f64>, Vec<f64>), HollowError> {
    let n = names.len();
    let t_start = fleet.now_us();
    let deadline = Instant::now() + opts.round_timeout;
    let unset = u64::MAX;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(unset)).collect());
    let puts = {
        let (api, fleet, sent_at) = (api.clone(), fleet.clone(), sent_at.clone());
        let config = NodeConfig {
            report_interval_ms: opts.report_interval.as_millis() as u64,
            ..NodeConfig::default()
        };
        let docs: Vec<DesiredState> = names
            .iter()
            .map(|node| DesiredState {
                node: node.clone(),
                revision,
                functions: Vec::new(),
                devices: Vec::new(),
                models: Vec::new(),
                config: config.clone(),
            })
            .collect();
        let conc = opts.put_concurrency;
        tokio::spawn(async move {
            futures::stream::iter(docs.into_iter().enumerate())
                .map(|(i, d)| {
                    let (api, fleet, sent_at) = (api.clone(), fleet.clone(), sent_at.clone());
                    async move {
                        let t = fleet.now_us();
                        sent_at[i].store(t, Ordering::Release);
                        let r = api.put_desired(&d).await;
                        (r, (fleet.now_us() - t) as f64 / 1000.0)
                    }
                })
                .buffer_unordered(conc)
                .collect::<Vec<_>>()
                .await
        })
    };
    let mut node_ms: Vec<Option<f64>> = vec![None; n];
    let mut reg_ms: Vec<Option<f64>> = vec![None; n];
    let mut last_reg_us = t_start;
    let mut get_ms = Vec::new();
    let mut last_print = Instant::now();
    loop {
        for (i, slot) in fleet.slots.iter().enumerate() {
            if node_ms[i].is_none() && slot.revision.load(Ordering::Acquire) >= revision {
                let at = slot.applied_at_us.load(Ordering::Relaxed);
                let sent = sent_at[i].load(Ordering::Acquire);
                if sent != unset {
                    node_ms[i] = Some(at.saturating_sub(sent) as f64 / 1000.0);
                }
            }
        }
        let reg_done = reg_ms.iter().filter(|x| x.is_some()).count();
        if reg_done < n {
            let asked = fleet.now_us();
            let views = api.nodes().await?;
            let now = fleet.now_us();
            get_ms.push(now.saturating_sub(asked) as f64 / 1000.0);
            for v in views {
                let Some(&i) = index.get(v.node.as_str()) else {
                    continue;
                };
                let applied = v.reported.as_ref().map_or(0, |r| r.applied_revision);
                let sent = sent_at[i].load(Ordering::Acquire);
                if reg_ms[i].is_none() && applied >= revision && sent != unset {
                    reg_ms[i] = Some(now.saturating_sub(sent) as f64 / 1000.0);
                    last_reg_us = now;
                }
            }
        }
        let node_done = node_ms.iter().filter(|x| x.is_some()).count();
        let reg_done = reg_ms.iter().filter(|x| x.is_some()).count();
        if (node_done == n && reg_done == n) || Instant::now() >= deadline {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let sent = sent_at
                .iter()
                .filter(|t| t.load(Ordering::Relaxed) != unset)
                .count();
            say(
                opts,
                &format!(
                    "[{:>6.1}s] rev {revision}: PUT sent {sent}/{n}, nodes applied {node_done}/{n}, registry {reg_done}/{n}",
                    fleet.t0.elapsed().as_secs_f64()
                ),
            );
        }
        tokio::time::sleep(opts.registry_poll).await;
    }
    let put_results = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(30),
        puts,
    )
    .await
    .map_err(|_| HollowError::Timeout(format!("PUTs of revision {revision} did not finish")))?
    .map_err(|e| HollowError::Hub(format!("PUT task failed: {e}")))?;
    let mut put_ms = Vec::with_capacity(n);
    let mut put_errors = 0;
    let mut first_put_error = None;
    for (r, ms) in put_results {
        match r {
            Ok(()) => put_ms.push(ms),
            Err(e) => {
                put_errors += 1;
                first_put_error.get_or_insert(e);
            }
        }
    }
    // The final word of the registry.
    let views = api.nodes().await?;
    let registry_agrees = views
        .iter()
        .filter(|v| index.contains_key(v.node.as_str()))
        .filter(|v| {
            v.desired_revision == revision
                && v.reported.as_ref().map(|r| r.applied_revision) == Some(revision)
                && v.status.as_ref().map(|s| s.state) == Some(NodeState::Online)
        })
        .count();
    let node_samples: Vec<f64> = node_ms.iter().flatten().copied().collect();
    let reg_samples: Vec<f64> = reg_ms.iter().flatten().copied().collect();
    let report = RoundReport {
        revision,
        put: Latency::of(&put_ms),
        put_errors,
        first_put_error,
        node: Latency::of(&node_samples),
        registry: Latency::of(&reg_samples),
        registry_get: Latency::of(&get_ms),
        converged_nodes: node_samples.len(),
        converged_registry: reg_samples.len(),
        registry_agrees,
        wall_ms: last_reg_us.saturating_sub(t_start) as f64 / 1000.0,
        hub_rss_bytes: 0,
    };
    Ok((report, node_samples, reg_samples))
}

/// Runs a hub in this process from a TOML config file until killed or
/// Ctrl-C: the body of the hidden `fleet-sim hub` subcommand, so a hollow
/// run can start a separate hub process built from the same sources.
pub async fn serve_hub(config: &std::path::Path) -> anyhow::Result<()> {
    let cfg = cloud_hub::HubConfig::load(Some(config), |_| None)?;
    cfg.validate()?;
    let cancel = CancellationToken::new();
    let app = cloud_hub::App::start(cfg, cancel.clone()).await?;
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        cancel.cancel();
    });
    app.run().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = Latency::of(&v);
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert!((l.mean_ms - 50.5).abs() < 1e-9);
        let one = Latency::of(&[7.0]);
        assert_eq!((one.p50_ms, one.p99_ms, one.count), (7.0, 7.0, 1));
        assert_eq!(Latency::of(&[]), Latency::default());
    }

    #[test]
    fn load_average_is_parsed_from_proc() {
        assert_eq!(
            parse_loadavg("0.23 1.27 1.72 1/79 11951\n"),
            Some([0.23, 1.27, 1.72])
        );
        assert_eq!(parse_loadavg("0.2 x 1"), None);
        assert_eq!(parse_loadavg(""), None);
    }

    #[test]
    fn options_are_validated_by_name() {
        HollowOptions::default().validate().unwrap();
        let o = HollowOptions {
            node_prefix: "bad/".into(),
            ..HollowOptions::default()
        };
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .starts_with("node_prefix")
        );
        let o = HollowOptions {
            nodes: 0,
            ..HollowOptions::default()
        };
        assert!(o.validate().unwrap_err().to_string().starts_with("nodes"));
        let o = HollowOptions {
            nodes: 10_000,
            ..HollowOptions::default()
        };
        assert_eq!(o.node_name(7), "hollow-00007");
        assert_eq!(o.node_name(9_999), "hollow-09999");
    }
}
