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
//!
//! # Layout
//!
//! - `mod.rs`: [`HollowOptions`], [`HollowError`] and [`run`] (set-up, spawn
//!   the fleet, measure, collect the totals);
//! - `fleet.rs`: the hollow nodes (`spawn_node`: MQTT client, poll loop,
//!   report ticker; `perform` of the session's outputs) and the per-node
//!   results they share with the measurement (`Fleet`, `Slot`);
//! - `measure.rs`: waiting for the fleet to connect and show up online, and
//!   the timed desired-state rounds;
//! - `api.rs`: the hub's REST API through [`cloud_hub::client::HubClient`];
//! - `proc.rs`: `/proc` readings (peak memory of hub, broker and simulator;
//!   [`load_average`]);
//! - `report.rs`: [`Latency`], [`RoundReport`], [`HollowReport`];
//! - [`hub`], [`broker`], [`stack`]: the hub and broker processes a run
//!   starts.

mod api;
pub mod broker;
mod fleet;
pub mod hub;
mod measure;
mod proc;
mod report;
pub mod rollout;
pub mod stack;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use broker::{BrokerKind, Mosquitto, MosquittoOptions};
pub use hub::{HubEndpoint, HubProcess, Memory};
pub use proc::load_average;
pub use report::{HollowReport, Latency, RoundReport};
pub use stack::{Stack, StackOptions};

use api::Api;
use fleet::{Fleet, NodeLink, Slot, spawn_node};
use measure::measure;
use proc::MemWatch;

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
    /// After the rounds, label every node and measure a staged rollout
    /// ([`rollout`]).
    pub rollout: Option<rollout::RolloutOptions>,
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
            rollout: None,
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

pub(super) fn say(opts: &HollowOptions, msg: &str) {
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
    check_fd_limit(opts, hub)?;
    let api = connect_api(opts, hub).await?;
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
    let sampler = spawn_sampler(&mem, &cancel);
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
    let certs = match (hub.mqtt_tls, hub.data_dir.as_deref()) {
        (true, Some(d)) => Some(fleet::NodeCerts::open(d)?),
        (true, None) => {
            return Err(HollowError::Config(
                "mqtt_tls: the nodes' certificates come from the hub CA in its data directory, and this hub has none here".into(),
            ));
        }
        (false, _) => None,
    };
    let link = Arc::new(NodeLink {
        host: hub.mqtt_host.clone(),
        port: hub.mqtt_port,
        certs,
        topics,
        key,
        keep_alive: opts.keep_alive,
        connect_timeout_s: opts.mqtt_connect_timeout.as_secs(),
    });
    let mut tasks = spawn_fleet(opts, hub, &names, &link, &fleet, &cancel)?;

    let mut result = measure(opts, &api, &fleet, &names, &index, base_revision, &mem).await;
    if let (Ok(report), Some(ro)) = (&mut result, &opts.rollout) {
        match rollout::rollout(opts, ro, &api, &names, hub.pid).await {
            Ok(r) => report.rollout = Some(r),
            Err(e) => result = Err(e),
        }
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = sampler.await;
    let mut report = result?;
    mem.sample();
    report.hub_rss_bytes_idle = idle.hub_rss;
    report.broker_rss_bytes_idle = idle.broker_rss;
    report.load_average_start = load_average_start;
    totals(&mut report, &mem, &fleet, hub);
    report.wall_seconds = t0.elapsed().as_secs_f64();
    report.options = opts.clone();
    Ok(report)
}

/// Fails unless this process may open a socket per node (two with the hub
/// in this process) plus some spare.
fn check_fd_limit(opts: &HollowOptions, hub: &HubEndpoint) -> Result<(), HollowError> {
    let limit = raise_fd_limit()?;
    let per_node = if hub.in_process { 2 } else { 1 };
    let needed = (opts.nodes * per_node) as u64 + 256;
    if limit < needed {
        return Err(HollowError::FileLimit { limit, needed });
    }
    Ok(())
}

/// The hub's REST API, once the hub is ready for nodes.
async fn connect_api(opts: &HollowOptions, hub: &HubEndpoint) -> Result<Arc<Api>, HollowError> {
    // No per-request bound tighter than the run's own waits.
    let timeout = opts.connect_timeout.max(opts.round_timeout);
    let api = Arc::new(Api::new(&hub.http_base, hub.data_dir.as_deref(), timeout)?);
    // Nodes that connect before the hub subscribed may have their retained
    // status missed by it (see `cloud_hub::Hub::mqtt_ready`).
    if !api.wait_ready(opts.connect_timeout).await? {
        say(
            opts,
            "hub has no /readyz: connecting nodes without knowing whether it subscribed",
        );
    }
    Ok(api)
}

/// Samples `mem` every 250 ms until `cancel`.
fn spawn_sampler(mem: &Arc<MemWatch>, cancel: &CancellationToken) -> tokio::task::JoinHandle<()> {
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
}

/// Spawns one hollow node per name, at most `connect_concurrency`
/// connecting at once.
fn spawn_fleet(
    opts: &HollowOptions,
    hub: &HubEndpoint,
    names: &[String],
    link: &Arc<NodeLink>,
    fleet: &Arc<Fleet>,
    cancel: &CancellationToken,
) -> Result<JoinSet<()>, HollowError> {
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
            link,
            fleet,
            &connecting,
            cancel,
        )?;
    }
    Ok(tasks)
}

/// Copies the run-wide figures (peak memory, load, the fleet's counters)
/// into `report`.
fn totals(report: &mut HollowReport, mem: &MemWatch, fleet: &Fleet, hub: &HubEndpoint) {
    report.hub_rss_bytes_max = mem.hub_max.load(Ordering::Relaxed);
    report.broker_rss_bytes_max = mem.broker_max.load(Ordering::Relaxed);
    report.sim_rss_bytes_max = mem.sim_max.load(Ordering::Relaxed);
    report.hub_in_process = hub.in_process;
    report.broker = hub.broker;
    report.load_average_end = load_average().unwrap_or_default();
    report.load_average_1m_max = f64::from_bits(mem.load_max.load(Ordering::Relaxed));
    report.reconnects = fleet.reconnects.load(Ordering::Relaxed);
    report.connect_errors = fleet.connect_errors.load(Ordering::Relaxed);
    report.desired_rejected = fleet.rejected.load(Ordering::Relaxed);
    report.publish_dropped = fleet.publish_dropped.load(Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

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
