//! `fleet-sim run`: executes a [`Scenario`] against the real hub and real
//! edge agents and reports from ground truth.
//!
//! Order of a run:
//! 1. start the simulated device servers of every node (Modbus servers with
//!    many unit ids, OPC UA servers with one variable folder per device,
//!    MQTT-native devices publishing to a device broker — an embedded
//!    rumqttd shared by the run, separate from the hub's);
//! 2. start the hub (child process `fleet-sim hub`, or in-process), one TCP
//!    [`Proxy`](crate::proxy::Proxy) per node in front of the broker, and one real
//!    `edge_node::Agent` per node (in this process, own sled directory);
//! 3. upload the WASM guests and put every node's desired state through
//!    the hub's REST API; wait until every node reports it applied;
//! 4. let devices run for `duration` while the fault plan executes and a
//!    monitor polls `GET /v1/nodes` (convergence, backlog, progress);
//! 5. stop the device servers, wait (bounded) until every node has
//!    uploaded everything stamped before that moment, read every stored
//!    stream back through `GET …/samples`, and compare point by point with
//!    the servers' logs ([`crate::report`]).
//!
//! A node with a virtual-time partition (`clock = "virtual"`) runs its
//! device servers and agent on its own paused-clock runtime and reaches the
//! devices in memory ([`crate::virtual_time`]); its partition heals when
//! the virtual duration has passed, and comparisons with its timestamps are
//! shifted by its clock's offset from the wall clock.
//!
//! Everything listens on 127.0.0.1 with ephemeral ports. Work files (hub
//! and node data) go to a temporary directory unless one is given.
//!
//! # Layout
//! [`run`] calls the phases in order over one `RunState` (what the phases
//! share: hub, nodes, monitor, deployment, restarts, outages, fault log):
//! - `fleet`: phases 1–3 — device servers per protocol, `SimNode` (proxy,
//!   agent through `AgentProc`), desired state and the `Deployment`;
//! - `hub`: the hub (`Hub`, started and stopped through `HubProc`) and its
//!   REST calls, all through `cloud_hub::client::HubClient`;
//! - `monitor`: the polling task, drain checks and the progress line;
//! - `faults`: phase 4 — the fault timeline, one `execute` per action, the
//!   outage and drain accounting;
//! - `compare`: phase 5 — drain, read back, per-point comparison across
//!   function restarts;
//! - `report`: the [`Report`] from the totals and the monitor.

mod compare;
mod faults;
mod fleet;
mod hub;
mod monitor;
mod report;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use edge_node::Clock;
use tokio_util::sync::CancellationToken;

use crate::report::Report;
use crate::scenario::Scenario;
use faults::Outages;
use fleet::{Deployment, SimNode};
use hub::Hub;
pub use monitor::rss_bytes;
use monitor::{Monitor, Progress, monitor_loop};

/// Options of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The scenario.
    pub scenario: Scenario,
    /// Where hub and node data go; a temporary directory when `None`.
    pub work_dir: Option<PathBuf>,
    /// Show live progress on stderr.
    pub progress: bool,
    /// The `fleet-sim` executable that serves the hub in process mode
    /// (`fleet-sim hub --config …`); the current executable when `None`.
    pub hub_exe: Option<PathBuf>,
}

/// How long after the desired state is applied everywhere (the start of
/// device time) every OPC UA and MQTT subscription must be active. Values
/// served before the first one a point delivered, and before this, went to
/// no subscriber and are not compared.
const SUBSCRIBE_GRACE: Duration = Duration::from_secs(10);

/// A moment a node's function instances may have restarted with fresh state
/// (an agent restart, or a new desired revision that re-deploys them).
#[derive(Debug, Clone, Copy)]
struct Restart {
    node: usize,
    /// Wall ms before the restart could begin.
    lo_ms: u64,
    /// For a re-deploy: the revision, whose applied time (seen by the
    /// monitor) bounds when it happened.
    revision: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    Clock::system().now_ms()
}

/// What the phases of a run share.
struct RunState {
    s: Scenario,
    /// Parent of every agent's and the in-process hub's cancellation.
    cancel: CancellationToken,
    hub: Hub,
    /// The hub's pid for the monitor's RSS readings (`None` while down).
    hub_pid: Arc<Mutex<Option<u32>>>,
    nodes: Vec<SimNode>,
    monitor: Arc<Mutex<Monitor>>,
    progress: Progress,
    deploy: Deployment,
    /// Every moment some node's function instances may have restarted.
    restarts: Vec<Restart>,
    outages: Outages,
    /// Faults executed, with wall time offsets (the report's `faults`).
    fault_log: Vec<String>,
}

impl RunState {
    /// Stops agents, proxies, virtual-time runtimes and the hub; returns
    /// what the monitor saw.
    async fn shutdown(&mut self) -> anyhow::Result<Monitor> {
        for n in &mut self.nodes {
            n.stop_agent().await?;
        }
        for mut n in self.nodes.drain(..) {
            n.proxy.stop().await;
            if let Some(vn) = n.vnode.take() {
                tokio::task::spawn_blocking(move || vn.shutdown())
                    .await
                    .context("stopping a virtual-time node")?;
            }
        }
        let mon = std::mem::take(&mut *lock(&self.monitor));
        self.hub.stop().await?;
        Ok(mon)
    }
}

/// Per-request timeout of the monitor's polls (a slow answer is a missed
/// poll, not a stalled monitor).
const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a scenario and returns its report.
pub async fn run(opts: RunOptions) -> anyhow::Result<Report> {
    let s = opts.scenario.clone();
    let wall = tokio::time::Instant::now();
    let tmp;
    let dir = if let Some(d) = &opts.work_dir {
        d.clone()
    } else {
        tmp = tempfile::tempdir().context("creating a temporary directory")?;
        tmp.path().to_owned()
    };
    std::fs::create_dir_all(&dir).context("creating the work directory")?;
    let cancel = CancellationToken::new();
    let progress = Progress::new(opts.progress, s.duration.as_secs());
    progress.println(s.summary());

    // 1. Devices.
    let pre = fleet::start_all_devices(&s, &dir).await?;
    let device_connections: usize = pre.iter().map(|(_, d, _)| d.connections).sum();
    progress.println(format!(
        "devices up: {} devices, {} driver connections",
        s.device_count(),
        device_connections
    ));

    // 2. Hub, proxies, agents.
    let hub = Hub::start(&s, &dir, opts.hub_exe.clone(), &cancel).await?;
    let hub_pid = Arc::new(Mutex::new(hub.pid()));
    let nodes = fleet::start_nodes(&s, &dir, &hub, pre, opts.hub_exe.as_deref(), &cancel).await?;
    let monitor = Arc::new(Mutex::new(Monitor::default()));
    let mon_cancel = cancel.child_token();
    let mon_task = tokio::spawn(monitor_loop(
        hub.admin_client(MONITOR_TIMEOUT)?,
        hub_pid.clone(),
        monitor.clone(),
        mon_cancel.clone(),
    ));

    // 3. Deploy.
    let deploy = Deployment::upload(&s, &hub).await?;
    let mut st = RunState {
        s: s.clone(),
        cancel,
        hub,
        hub_pid,
        nodes,
        monitor,
        progress,
        deploy,
        restarts: Vec::new(),
        outages: Outages::default(),
        fault_log: Vec::new(),
    };
    st.put_desired_everywhere(false).await?;
    st.wait_converged().await?;

    // 4. Live phase with the fault plan.
    let live = st.live().await?;

    // 5. Stop devices, drain, compare.
    let drain = st.stop_and_drain(live.device_seconds).await;
    let drain_seconds = st.outages.drain_seconds(drain.seconds);
    let totals = st.compare(drain.end_ms, live.subscribed_by_ms).await?;

    // Shut down.
    mon_cancel.cancel();
    let _ = mon_task.await;
    let mon = st.shutdown().await?;
    let measured = report::Measured {
        device_connections,
        max_error_of: std::mem::take(&mut st.deploy.max_error_of),
        outage_seconds: st.outages.total.as_secs_f64(),
        outage_virtual: !s.virtual_partitions().is_empty(),
        virtual_outage_wall_seconds: st.outages.virtual_wall.as_secs_f64(),
        drain_seconds,
        final_drain_seconds: drain.seconds,
        drained: drain.complete,
        wall_seconds: wall.elapsed().as_secs_f64(),
        device_seconds: live.device_seconds,
        faults: std::mem::take(&mut st.fault_log),
    };
    Ok(report::build(&s, &totals, &mon, measured))
}

/// Whether a node with data in `data_dir` already joined (a rerun keeps it).
pub(crate) fn hub_identity_exists(data_dir: &std::path::Path) -> bool {
    edge_node::identity::dir(data_dir).join("node.crt").exists()
}
