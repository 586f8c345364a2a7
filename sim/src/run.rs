//! `fleet-sim run`: executes a [`Scenario`] against the real hub and real
//! edge agents and reports from ground truth.
//!
//! Order of a run:
//! 1. start the simulated device servers of every node (Modbus servers with
//!    many unit ids, OPC UA servers with one variable folder per device,
//!    MQTT-native devices publishing to a device broker — an embedded
//!    rumqttd shared by the run, separate from the hub's);
//! 2. start the hub (child process `fleet-sim hub`, or in-process), one TCP
//!    [`Proxy`] per node in front of the broker, and one real
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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use edge_node::drivers::decode::Format;
use edge_node::{Agent, Clock, EdgeConfig};
use indicatif::{ProgressBar, ProgressStyle};
use protocols::{
    ByteOrder, DataType, DesiredState, Device, DeviceProtocol, FunctionLimits, FunctionSpec,
    ModbusTable, NodeConfig, OpcUaSecurity, Point, PointAddress, PointGroup, WordOrder,
};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::devices::modbus::{ModbusSim, ModbusSimConfig, SimPoint, UnitConfig};
use crate::devices::mqtt::{MqttSim, MqttSimConfig, MqttSimDevice, MqttSimPoint};
use crate::devices::opcua::{OpcUaSim, OpcUaSimConfig, SimVariable, VarKind};
use crate::proxy::{LinkMode, Proxy};
use crate::report::{self, FilterError, Obs, PointFilter, Report, Totals};
use crate::scenario::{
    EdgeMode, Fault, Guest, HubMode, NodeLayout, PartitionClock, PartitionMode, Protocol, Scenario,
};
use crate::virtual_time::{Outage, VirtualNode};

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

/// Added to the moment a re-deploy was seen applied, to bound when the
/// function instances were actually swapped.
const RESTART_SLACK: Duration = Duration::from_secs(1);

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

/// Where a point's ground truth lives.
#[derive(Debug, Clone, Copy)]
enum Source {
    Modbus { server: usize, unit: u8 },
    Opcua { server: usize },
    Mqtt { client: usize },
}

impl Source {
    fn protocol(self) -> Protocol {
        match self {
            Self::Modbus { .. } => Protocol::Modbus,
            Self::Opcua { .. } => Protocol::Opcua,
            Self::Mqtt { .. } => Protocol::Mqtt,
        }
    }
}

/// One node's simulated devices and what the agent is told about them.
struct NodeDevices {
    modbus: Vec<ModbusSim>,
    opcua: Vec<OpcUaSim>,
    mqtt: Vec<MqttSim>,
    devices: Vec<Device>,
    points: Vec<PointInfo>,
    /// Driver connections the agent opens to them.
    connections: usize,
}

#[derive(Debug, Clone)]
struct PointInfo {
    index: u32,
    slot: u32,
    source: Source,
}

struct NodeRt {
    layout: NodeLayout,
    cfg: EdgeConfig,
    proxy: Proxy,
    agent: Option<AgentRt>,
    /// `Some(fleet-sim executable)` when agents run as child processes.
    agent_exe: Option<PathBuf>,
    modbus: Vec<Arc<ModbusSim>>,
    opcua: Vec<OpcUaSim>,
    mqtt: Vec<MqttSim>,
    points: Vec<PointInfo>,
    devices: Vec<Device>,
    /// The node's own runtime when it has a virtual-time partition.
    vnode: Option<VirtualNode>,
    /// In-memory routes to this node's device servers (virtual-time nodes).
    transports: edge_node::drivers::transport::DeviceTransports,
    /// The node's clock minus the wall clock (non-zero after a virtual-time
    /// outage): added to wall-clock instants compared with node timestamps.
    clock_offset_ms: i64,
}

/// A running agent: a task of this process, or a `fleet-sim agent` child.
enum AgentRt {
    Task(
        CancellationToken,
        tokio::task::JoinHandle<Result<(), edge_node::AgentError>>,
    ),
    Process(tokio::process::Child),
}

/// Hub child process or in-process app.
#[allow(clippy::large_enum_variant, reason = "one per run")]
enum HubRt {
    Process {
        exe: PathBuf,
        config: PathBuf,
        log: PathBuf,
        child: Option<tokio::process::Child>,
    },
    InProcess {
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), cloud_hub::HubError>>,
    },
}

struct HubCtl {
    base: String,
    mqtt: SocketAddr,
    public_key: String,
    rt: HubRt,
    http: reqwest::Client,
}

/// Per-node state as the monitor last saw it at the hub.
#[derive(Debug, Clone, Default)]
struct NodeSeen {
    reported: Option<ReportedLite>,
    stored: u64,
}

#[derive(Debug, Default)]
struct Monitor {
    nodes: HashMap<String, NodeSeen>,
    /// (node, revision) → when it was put.
    pending: HashMap<(String, u64), Instant>,
    /// (node, revision) → wall ms when the hub first showed it applied.
    applied_at_ms: HashMap<(String, u64), u64>,
    convergence_ms: Vec<f64>,
    hub_rss_max: u64,
    edge_rss_max: u64,
    polls_failed: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Deserialize)]
struct NodeViewLite {
    node: String,
    reported: Option<ReportedLite>,
    telemetry: TelemetryLite,
}

/// The part of a node's reported state the runner uses.
#[derive(Debug, Clone, Deserialize)]
struct ReportedLite {
    applied_revision: u64,
    /// Windows in which the agent may have lost samples (after a crash).
    #[serde(default)]
    loss_windows: Vec<protocols::LossWindow>,
    backlog: protocols::Backlog,
    at_ms: u64,
}

#[derive(Deserialize)]
struct TelemetryLite {
    samples: u64,
}

#[derive(Deserialize)]
struct ArtifactInfoLite {
    sha256: String,
    size: u64,
}

#[derive(Deserialize)]
struct SampleLite {
    seq: u64,
    point: u32,
    ts_ms: u64,
    value: f64,
    quality: u8,
}

#[derive(Deserialize)]
struct SamplePageLite {
    samples: Vec<SampleLite>,
    next_seq: Option<u64>,
}

/// RSS in bytes of a process from `/proc/{pid}/status` (`self` for this one).
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn now_ms() -> u64 {
    Clock::system().now_ms()
}

impl HubCtl {
    async fn start(
        s: &Scenario,
        dir: &Path,
        hub_exe: Option<PathBuf>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let mut cfg = cloud_hub::HubConfig {
            data_dir: dir.join("hub"),
            http_listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            ack_interval: s.hub.ack_interval,
            cache_capacity_bytes: s.hub.cache_capacity_bytes,
            ..cloud_hub::HubConfig::default()
        };
        if let Some(b) = cfg.embedded_broker.as_mut() {
            b.listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        }
        cfg.validate().context("hub config")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let (rt, base, mqtt) = match s.hub.mode {
            HubMode::Process => {
                let exe = match hub_exe {
                    Some(e) => e,
                    None => std::env::current_exe().context("locating fleet-sim")?,
                };
                std::fs::create_dir_all(dir).context("creating the work directory")?;
                let config = dir.join("hub.toml");
                std::fs::write(&config, toml::to_string(&cfg).context("hub config")?)
                    .context("writing hub.toml")?;
                let mqtt = cfg
                    .embedded_broker
                    .as_ref()
                    .map_or(SocketAddr::from(([127, 0, 0, 1], 1883)), |b| b.listen);
                let mut rt = HubRt::Process {
                    exe,
                    config,
                    log: dir.join("hub.log"),
                    child: None,
                };
                let base = format!("http://{}", cfg.http_listen);
                rt.spawn_child()?;
                (rt, base, mqtt)
            }
            HubMode::InProcess => {
                let token = cancel.child_token();
                let app = cloud_hub::App::start(cfg, token.clone())
                    .await
                    .context("starting cloud-hub")?;
                let base = format!("http://{}", app.http_addr());
                let (host, port) = app.mqtt_addr();
                let mqtt: SocketAddr = format!("{host}:{port}").parse()?;
                let task = tokio::spawn(app.run());
                (
                    HubRt::InProcess {
                        cancel: token,
                        task,
                    },
                    base,
                    mqtt,
                )
            }
        };
        let mut hub = Self {
            base,
            mqtt,
            public_key: String::new(),
            rt,
            http,
        };
        hub.wait_healthy(Duration::from_secs(60)).await?;
        let info: serde_json::Value = hub
            .http
            .get(format!("{}/v1/hub", hub.base))
            .send()
            .await?
            .json()
            .await?;
        info["public_key"]
            .as_str()
            .context("hub did not tell its public key")?
            .clone_into(&mut hub.public_key);
        Ok(hub)
    }

    async fn wait_healthy(&self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "the hub did not become healthy at {} within {limit:?}",
                    self.base
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> Option<u32> {
        match &self.rt {
            HubRt::Process { child, .. } => child.as_ref().and_then(tokio::process::Child::id),
            HubRt::InProcess { .. } => None,
        }
    }

    /// Kills the hub process (SIGKILL: broker, sessions and unflushed sled
    /// data go with it).
    async fn kill(&mut self) -> anyhow::Result<()> {
        if let HubRt::Process { child, .. } = &mut self.rt
            && let Some(mut c) = child.take()
        {
            c.kill().await.context("killing the hub")?;
        }
        Ok(())
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        if matches!(self.rt, HubRt::Process { .. }) {
            // The ports were just released; retry while the OS frees them.
            let start = Instant::now();
            loop {
                self.rt.spawn_child()?;
                if self.wait_healthy(Duration::from_secs(10)).await.is_ok() {
                    return Ok(());
                }
                self.kill().await?;
                if start.elapsed() > Duration::from_secs(60) {
                    bail!("the hub did not come back on {}", self.base);
                }
            }
        }
        Ok(())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        match &mut self.rt {
            HubRt::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    // Ask politely, then insist.
                    sigterm(&c).await;
                    if tokio::time::timeout(Duration::from_secs(15), c.wait())
                        .await
                        .is_err()
                    {
                        c.kill().await?;
                    }
                }
            }
            HubRt::InProcess { cancel, task } => {
                cancel.cancel();
                match tokio::time::timeout(Duration::from_secs(20), task).await {
                    Ok(Ok(r)) => r.context("cloud-hub")?,
                    Ok(Err(e)) => bail!("hub task: {e}"),
                    Err(_) => bail!("the hub did not stop within 20 s"),
                }
            }
        }
        Ok(())
    }

    async fn upload(&self, bytes: &'static [u8]) -> anyhow::Result<ArtifactInfoLite> {
        let r = self
            .http
            .put(format!("{}/v1/artifacts", self.base))
            .body(bytes)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("artifact upload refused: {}", r.text().await?);
        }
        Ok(r.json().await?)
    }

    async fn put_desired(&self, d: &DesiredState) -> anyhow::Result<()> {
        let r = self
            .http
            .put(format!("{}/v1/nodes/{}/desired", self.base, d.node))
            .json(d)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "hub refused desired state of {} rev {}: {}",
                d.node,
                d.revision,
                r.text().await?
            );
        }
        Ok(())
    }

    async fn streams(&self, node: &str) -> anyhow::Result<Vec<String>> {
        let v: BTreeMap<String, serde_json::Value> = self
            .http
            .get(format!("{}/v1/nodes/{node}/streams", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v.into_keys().collect())
    }

    async fn samples(&self, node: &str, stream: &str) -> anyhow::Result<Vec<SampleLite>> {
        let mut out = Vec::new();
        let mut from = 1u64;
        loop {
            let page: SamplePageLite = self
                .http
                .get(format!(
                    "{}/v1/nodes/{node}/streams/{stream}/samples?from_seq={from}&limit=200000",
                    self.base
                ))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            out.extend(page.samples);
            match page.next_seq {
                Some(n) => from = n,
                None => return Ok(out),
            }
        }
    }
}

impl HubRt {
    fn spawn_child(&mut self) -> anyhow::Result<()> {
        if let Self::Process {
            exe,
            config,
            log,
            child,
        } = self
        {
            let c = spawn_logged(exe, "hub", config, log)
                .with_context(|| format!("starting the hub: {} hub", exe.display()))?;
            *child = Some(c);
        }
        Ok(())
    }
}

/// Starts `exe SUBCOMMAND --config CONFIG` (a `fleet-sim` child: hub or
/// agent) with stdout and stderr appended to `log`, killed if dropped.
fn spawn_logged(
    exe: &Path,
    subcommand: &str,
    config: &Path,
    log: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    Ok(tokio::process::Command::new(exe)
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .kill_on_drop(true)
        .spawn()?)
}

/// Asks a child process to stop (SIGTERM, through `kill`); the caller waits.
async fn sigterm(c: &tokio::process::Child) {
    if let Some(pid) = c.id() {
        let _ = tokio::process::Command::new("kill")
            .arg(pid.to_string())
            .status()
            .await;
    }
}

/// Builds one node's device servers, devices and points. `broker` is the
/// device broker MQTT-native devices publish to (needed when the node has
/// any).
async fn start_devices(
    s: &Scenario,
    layout: &NodeLayout,
    dir: &Path,
    broker: Option<SocketAddr>,
    clock: Clock,
) -> anyhow::Result<NodeDevices> {
    let g = &s.nodes[layout.group];
    let ppd = g.points_per_device;
    let interval_ms = s.sampling_interval.as_millis() as u64;
    let node_seed = s.seed ^ (layout.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let model = |slot: u32| s.signals[slot as usize % s.signals.len()].clone();
    let mut points = Vec::new();
    let mut devices = Vec::new();
    let mut modbus = Vec::new();
    let mut opcua = Vec::new();
    let mut connections = 0;
    let mut dev = 0u32; // device number on the node

    // Modbus: servers of up to `modbus_units_per_server` units.
    let per = g.devices.modbus_units_per_server;
    for (server, chunk_start) in (0..g.devices.modbus).step_by(per).enumerate() {
        let n = per.min(g.devices.modbus - chunk_start);
        let mut units = Vec::with_capacity(n);
        let mut unit_points = Vec::with_capacity(n);
        for u in 0..n {
            let unit = u8::try_from(u + 1).context("unit id")?;
            let mut pts = Vec::with_capacity(ppd as usize);
            let mut sim_pts = Vec::with_capacity(ppd as usize);
            for slot in 0..ppd {
                let index = dev * ppd + slot;
                let p = Point {
                    index,
                    name: format!("p{slot}"),
                    address: PointAddress::Modbus {
                        table: ModbusTable::Holding,
                        address: slot * 2,
                        data_type: DataType::F32,
                        byte_order: ByteOrder::BigEndian,
                        word_order: WordOrder::HighFirst,
                    },
                    scale: 1.0,
                    offset: 0.0,
                    range: None,
                    unit: None,
                };
                sim_pts.push(SimPoint {
                    id: index,
                    table: ModbusTable::Holding,
                    address: u16::try_from(slot * 2).context("address")?,
                    format: Format {
                        data_type: DataType::F32,
                        byte_order: ByteOrder::BigEndian,
                        word_order: WordOrder::HighFirst,
                    },
                    scale: 1.0,
                    offset: 0.0,
                    model: model(slot),
                });
                points.push(PointInfo {
                    index,
                    slot,
                    source: Source::Modbus { server, unit },
                });
                pts.push(p);
            }
            units.push(UnitConfig {
                unit,
                points: sim_pts,
                size: 0,
            });
            unit_points.push((unit, dev, pts));
            dev += 1;
        }
        let sim = ModbusSim::start(ModbusSimConfig {
            units,
            tick: s.sampling_interval,
            seed: node_seed,
            clock,
            ..ModbusSimConfig::default()
        })
        .await
        .context("starting a Modbus device server")?;
        let port = sim.local_addr().port();
        for (unit, d, pts) in unit_points {
            devices.push(Device {
                id: format!("mb{d}"),
                protocol: DeviceProtocol::ModbusTcp {
                    host: "127.0.0.1".into(),
                    port,
                    unit,
                },
                groups: vec![PointGroup {
                    name: "g".into(),
                    interval_ms,
                    points: pts,
                }],
            });
            connections += 1;
        }
        modbus.push(sim);
    }

    // OPC UA: servers of up to `opcua_devices_per_server` variable folders;
    // the agent opens one session per `opcua_devices_per_session` devices.
    let per = g.devices.opcua_devices_per_server;
    let per_session = g.devices.opcua_devices_per_session;
    for (server, chunk_start) in (0..g.devices.opcua).step_by(per).enumerate() {
        let n = per.min(g.devices.opcua - chunk_start);
        let first_dev = dev;
        let mut vars = Vec::with_capacity(n * ppd as usize);
        for k in 0..n {
            let d = first_dev + u32::try_from(k)?;
            for slot in 0..ppd {
                let index = d * ppd + slot;
                vars.push(SimVariable {
                    id: index,
                    name: format!("d{d}.p{slot}"),
                    kind: VarKind::Double,
                    model: model(slot),
                });
                points.push(PointInfo {
                    index,
                    slot,
                    source: Source::Opcua { server },
                });
            }
        }
        let sim = OpcUaSim::start(OpcUaSimConfig {
            variables: vars,
            tick: s.sampling_interval,
            seed: node_seed,
            pki_dir: dir.join("opcua-pki"),
            secure_endpoints: false,
            clock,
            ..OpcUaSimConfig::default()
        })
        .await
        .context("starting an OPC UA device server")?;
        for (sess, k0) in (0..n).step_by(per_session).enumerate() {
            let k1 = (k0 + per_session).min(n);
            let mut pts = Vec::new();
            for k in k0..k1 {
                let d = first_dev + u32::try_from(k)?;
                for slot in 0..ppd {
                    pts.push(Point {
                        index: d * ppd + slot,
                        name: format!("d{d}.p{slot}"),
                        address: PointAddress::OpcUa {
                            node_id: sim.node_id(&format!("d{d}.p{slot}")),
                            deadband: None,
                        },
                        scale: 1.0,
                        offset: 0.0,
                        range: None,
                        unit: None,
                    });
                }
            }
            devices.push(Device {
                id: format!("ua{server}-{sess}"),
                protocol: DeviceProtocol::OpcUa {
                    endpoint: sim.endpoint(),
                    security: OpcUaSecurity::None,
                },
                groups: vec![PointGroup {
                    name: "g".into(),
                    // The server samples monitored items at this interval:
                    // twice per device update, so no update is skipped.
                    interval_ms: (interval_ms / 2).max(10),
                    points: pts,
                }],
            });
            connections += 1;
        }
        dev += u32::try_from(n)?;
        opcua.push(sim);
    }

    // MQTT: one simulator connection per `mqtt_devices_per_client` devices,
    // each device on its own topic with keys unique to it; the agent
    // subscribes to the group with one `+` filter (one edge `Device`).
    let per = g.devices.mqtt_devices_per_client;
    let mut mqtt = Vec::new();
    for (client, chunk_start) in (0..g.devices.mqtt).step_by(per).enumerate() {
        let broker = broker.context("MQTT devices need the device broker")?;
        let n = per.min(g.devices.mqtt - chunk_start);
        let base = format!("sim/{}/mqtt{client}", layout.name);
        let mut sim_devices = Vec::with_capacity(n);
        let mut pts = Vec::with_capacity(n * ppd as usize);
        for _ in 0..n {
            let mut dpts = Vec::with_capacity(ppd as usize);
            for slot in 0..ppd {
                let index = dev * ppd + slot;
                let key = format!("d{dev}.p{slot}");
                dpts.push(MqttSimPoint {
                    id: index,
                    key: key.clone(),
                    model: model(slot),
                });
                pts.push(Point {
                    index,
                    name: key.clone(),
                    address: PointAddress::Mqtt { key },
                    scale: 1.0,
                    offset: 0.0,
                    range: None,
                    unit: None,
                });
                points.push(PointInfo {
                    index,
                    slot,
                    source: Source::Mqtt { client },
                });
            }
            sim_devices.push(MqttSimDevice {
                topic: format!("{base}/d{dev}"),
                points: dpts,
            });
            dev += 1;
        }
        let mut cfg = MqttSimConfig::new(broker, sim_devices);
        cfg.client_id = format!("sim-{}-mqtt{client}", layout.name);
        cfg.tick = s.sampling_interval;
        cfg.seed = node_seed;
        cfg.clock = clock;
        cfg.connect_timeout = Duration::from_secs(30);
        let sim = MqttSim::start(cfg)
            .await
            .context("starting an MQTT device simulator")?;
        devices.push(Device {
            id: format!("mq{client}"),
            protocol: DeviceProtocol::Mqtt {
                host: broker.ip().to_string(),
                port: broker.port(),
                topic: format!("{base}/+"),
                qos: 1,
                client_id: Some(format!("{}-mq{client}", layout.name)),
            },
            groups: vec![PointGroup {
                name: "g".into(),
                interval_ms,
                points: pts,
            }],
        });
        connections += 1;
        mqtt.push(sim);
    }
    Ok(NodeDevices {
        modbus,
        opcua,
        mqtt,
        devices,
        points,
        connections,
    })
}

/// Compares one point whose function instances restarted at `restarts`
/// (`(lo, hi)` wall ms: the restart happened between them), each segment
/// with the filter in force then (`filter(segment start)`).
///
/// A restarted instance starts with fresh state, which the reference cannot
/// place exactly in time. But the state of both reference filters right
/// after they emit a sample is fully determined by that sample (deadband:
/// the last value sent; swinging door: the archived point, the door reopened
/// from it), so the comparison restarts the reference at an *anchor*: the
/// first stored sample at or after `hi`, which only the new instance can
/// have emitted. Served values and stored samples from `lo` to the anchor
/// are not compared; they are counted in `excluded` (the documented restart
/// window), never as lost.
fn compare_segmented(
    filter: impl Fn(u64) -> PointFilter,
    served: &[Obs],
    stored: &[Obs],
    restarts: &[(u64, u64)],
    interval_ms: u64,
    excluded: &mut u64,
) -> report::PointVerdict {
    let slack = report::local::CLOCK_SLACK_MS;
    let mut total = report::PointVerdict::default();
    let (mut ss, mut ts) = (0usize, 0usize); // segment starts in served / stored
    let mut seg_at = 0u64;
    let mut first = true;
    let mut owned: Vec<Obs>;
    for &(lo, hi) in restarts {
        // The segment ends before `lo`; a Modbus sample is stamped after its
        // read, so stored samples up to half an interval after the last
        // served value of the segment belong to it.
        let se = served.partition_point(|o| o.ts_ms < lo).max(ss);
        let te_limit = served[ss..se].last().map_or(lo, |o| {
            (o.ts_ms + interval_ms / 2).min(lo + interval_ms / 2)
        });
        let te = stored.partition_point(|o| o.ts_ms <= te_limit).max(ts);
        // (a good sample: a bad one is an outage marker, not a value)
        let a = stored.partition_point(|o| o.ts_ms < hi).max(te);
        let a = stored[a..]
            .iter()
            .position(|o| o.quality == 0)
            .map_or(stored.len(), |i| a + i);
        let seg_filter = filter(seg_at);
        let v = report::compare_point(&seg_filter, &served[ss..se], &stored[ts..te]);
        merge(&mut total, &v, first);
        first = false;
        // Restart at the anchor: the served observation it came from is the
        // latest with its value served at or before it.
        let Some(anchor) = stored.get(a) else {
            *excluded += (served.len() - se) as u64;
            return total;
        };
        let k = served[se..].partition_point(|o| o.ts_ms <= anchor.ts_ms + slack);
        let k = served[se..se + k]
            .iter()
            .rposition(|o| o.value.to_bits() == anchor.value.to_bits())
            .map_or(se + k, |i| se + i);
        *excluded += (k - se) as u64;
        ss = k;
        ts = a;
        seg_at = lo;
    }
    // Last segment; its first served value takes the anchor's timestamp
    // (the observation it came from, as the agent stamped it: an OPC UA
    // re-subscription delivers the current value with the latest tick).
    owned = served[ss..].to_vec();
    if ss > 0
        && let (Some(f), Some(a)) = (owned.first_mut(), stored.get(ts))
        && f.value.to_bits() == a.value.to_bits()
        && a.ts_ms > f.ts_ms
    {
        f.ts_ms = a.ts_ms;
    }
    let v = report::compare_point(&filter(seg_at), &owned, &stored[ts..]);
    merge(&mut total, &v, first);
    total
}

/// Adds segment verdict `v` to `total`.
fn merge(total: &mut report::PointVerdict, v: &report::PointVerdict, first: bool) {
    total.served += v.served;
    total.stored += v.stored;
    total.duplicates += v.duplicates;
    total.unexpected += v.unexpected;
    total.expected = match (first, total.expected, v.expected) {
        (true, _, e) => e,
        (false, Some(a), Some(b)) => Some(a + b),
        _ => None,
    };
    total.lost = match (first, total.lost, v.lost) {
        (true, _, l) => l,
        (false, Some(a), Some(b)) => Some(a + b),
        _ => None,
    };
    if v.max_abs_error.is_nan() || v.max_abs_error > total.max_abs_error {
        total.max_abs_error = v.max_abs_error;
    }
}

fn desired_for(
    s: &Scenario,
    node: &NodeRt,
    revision: u64,
    modules: &HashMap<Guest, ArtifactInfoLite>,
    overrides: &HashMap<String, String>,
) -> anyhow::Result<DesiredState> {
    let mut functions = Vec::new();
    for f in &s.functions {
        let inputs: Vec<u32> = node
            .points
            .iter()
            .filter(|p| {
                s.function_of(p.slot, p.source.protocol())
                    .is_some_and(|g| g.name == f.name)
            })
            .map(|p| p.index)
            .collect();
        if inputs.is_empty() {
            continue;
        }
        let m = modules
            .get(&f.guest)
            .with_context(|| format!("module of {} not uploaded", f.guest.name()))?;
        let config = overrides.get(&f.name).unwrap_or(&f.config);
        functions.push(FunctionSpec {
            name: f.name.clone(),
            module_sha256: m.sha256.clone(),
            module_size: m.size,
            config: serde_json::Value::String(config.clone()),
            inputs,
            granted_devices: Vec::new(),
            granted_models: Vec::new(),
            outputs: vec![f.output.clone()],
            limits: FunctionLimits::default(),
        });
    }
    let d = DesiredState {
        node: node.layout.name.clone(),
        revision,
        functions,
        devices: node.devices.clone(),
        models: Vec::new(),
        config: NodeConfig {
            batch_max_samples: s.edge.batch_max_samples,
            batch_max_age_ms: s.edge.batch_max_age.as_millis() as u64,
            report_interval_ms: s.edge.report_interval.as_millis() as u64,
            raw_stream: Some("raw".into()),
        },
    };
    d.validate()
        .map_err(|e| anyhow::anyhow!("desired state of {}: {e}", d.node))?;
    Ok(d)
}

async fn start_agent(node: &mut NodeRt, cancel: &CancellationToken) -> anyhow::Result<()> {
    let token = cancel.child_token();
    if let Some(vn) = &node.vnode {
        let options = edge_node::AgentOptions {
            device_transports: node.transports.clone(),
        };
        let (cfg, clock, t) = (node.cfg.clone(), vn.clock(), token.clone());
        let agent = vn
            .run(async move { Agent::start_with(cfg, clock, t, options).await })
            .await?
            .with_context(|| format!("starting edge node {}", node.layout.name))?;
        node.agent = Some(AgentRt::Task(token, vn.handle().spawn(agent.run())));
        return Ok(());
    }
    if let Some(exe) = &node.agent_exe {
        let dir = node
            .cfg
            .data_dir
            .parent()
            .map_or_else(|| node.cfg.data_dir.clone(), Path::to_path_buf);
        std::fs::create_dir_all(&dir).context("node directory")?;
        let config = dir.join(format!("{}.toml", node.layout.name));
        let text = toml::to_string(&node.cfg).context("writing the agent config")?;
        std::fs::write(&config, text).context("writing the agent config")?;
        let log = dir.join(format!("{}.log", node.layout.name));
        let child = spawn_logged(exe, "agent", &config, &log).with_context(|| {
            format!(
                "starting edge node {}: {} agent",
                node.layout.name,
                exe.display()
            )
        })?;
        node.agent = Some(AgentRt::Process(child));
        return Ok(());
    }
    let agent = Agent::start(node.cfg.clone(), Clock::system(), token.clone())
        .await
        .with_context(|| format!("starting edge node {}", node.layout.name))?;
    node.agent = Some(AgentRt::Task(token, tokio::spawn(agent.run())));
    Ok(())
}

/// Stops a node's agent cleanly (cancel, or SIGTERM to its process).
async fn stop_agent(node: &mut NodeRt) -> anyhow::Result<()> {
    match node.agent.take() {
        Some(AgentRt::Task(token, task)) => {
            token.cancel();
            match tokio::time::timeout(Duration::from_secs(60), task).await {
                Ok(Ok(r)) => r.with_context(|| format!("edge node {}", node.layout.name))?,
                Ok(Err(e)) => bail!("edge node {} task: {e}", node.layout.name),
                Err(_) => bail!("edge node {} did not stop within 60 s", node.layout.name),
            }
        }
        Some(AgentRt::Process(mut c)) => {
            sigterm(&c).await;
            match tokio::time::timeout(Duration::from_secs(60), c.wait()).await {
                Ok(Ok(st)) if st.success() => {}
                Ok(Ok(st)) => bail!("edge node {} exited with {st}", node.layout.name),
                Ok(Err(e)) => bail!("edge node {}: {e}", node.layout.name),
                Err(_) => {
                    c.kill().await?;
                    bail!("edge node {} did not stop within 60 s", node.layout.name);
                }
            }
        }
        None => {}
    }
    Ok(())
}

/// Takes a node's agent down for a `kill-node` fault: SIGKILL when it is a
/// process (nothing flushed, the outbox keeps what was committed), a clean
/// stop when it is a task of this process.
async fn kill_agent(node: &mut NodeRt) -> anyhow::Result<()> {
    if let Some(AgentRt::Process(mut c)) = node.agent.take() {
        c.kill()
            .await
            .with_context(|| format!("killing edge node {}", node.layout.name))?;
        return Ok(());
    }
    stop_agent(node).await
}

/// One step of the fault timeline.
#[derive(Debug, Clone)]
enum Action {
    Link {
        node: usize,
        mode: LinkMode,
        outage: bool,
    },
    HubDown,
    HubUp,
    AgentDown(usize),
    AgentUp(usize),
    Devices {
        node: usize,
        protocol: Protocol,
        server: Option<usize>,
        up: bool,
    },
    Redeploy {
        function: String,
        config: String,
    },
    /// Cut `node`'s link and let `duration` pass on its paused clock; the
    /// link heals when the virtual time has passed.
    VirtualOutage {
        node: usize,
        duration: Duration,
    },
}

fn timeline(s: &Scenario) -> Vec<(Duration, Action)> {
    let mut t = Vec::new();
    for f in &s.faults {
        match f.clone() {
            Fault::Partition {
                at,
                duration,
                node,
                clock: PartitionClock::Virtual,
                ..
            } => t.push((at, Action::VirtualOutage { node, duration })),
            Fault::Partition {
                at,
                duration,
                node,
                mode,
                clock: PartitionClock::Real,
            } => {
                let m = match mode {
                    PartitionMode::Cut => LinkMode::Cut,
                    PartitionMode::Blackhole => LinkMode::Blackhole,
                };
                t.push((
                    at,
                    Action::Link {
                        node,
                        mode: m,
                        outage: true,
                    },
                ));
                t.push((
                    at + duration,
                    Action::Link {
                        node,
                        mode: LinkMode::Pass,
                        outage: true,
                    },
                ));
            }
            Fault::Latency {
                at,
                duration,
                node,
                delay,
            } => {
                t.push((
                    at,
                    Action::Link {
                        node,
                        mode: LinkMode::Delay(delay),
                        outage: false,
                    },
                ));
                t.push((
                    at + duration,
                    Action::Link {
                        node,
                        mode: LinkMode::Pass,
                        outage: false,
                    },
                ));
            }
            Fault::BrokerRestart { at, down } => {
                t.push((at, Action::HubDown));
                t.push((at + down, Action::HubUp));
            }
            Fault::KillNode { at, node, down } => {
                t.push((at, Action::AgentDown(node)));
                t.push((at + down, Action::AgentUp(node)));
            }
            Fault::DevicesDown {
                at,
                duration,
                node,
                protocol,
                server,
            } => {
                t.push((
                    at,
                    Action::Devices {
                        node,
                        protocol,
                        server,
                        up: false,
                    },
                ));
                t.push((
                    at + duration,
                    Action::Devices {
                        node,
                        protocol,
                        server,
                        up: true,
                    },
                ));
            }
            Fault::Redeploy {
                at,
                function,
                config,
                ..
            } => t.push((at, Action::Redeploy { function, config })),
        }
    }
    t.sort_by_key(|(at, _)| *at);
    t
}

async fn monitor_loop(
    hub_base: String,
    hub_pid: Arc<Mutex<Option<u32>>>,
    state: Arc<Mutex<Monitor>>,
    cancel: CancellationToken,
) {
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        if n.is_multiple_of(5) {
            let me = rss_bytes("self").unwrap_or(0);
            let pid = *lock(&hub_pid);
            let hub = pid.and_then(|p| rss_bytes(&p.to_string())).unwrap_or(0);
            let mut st = lock(&state);
            st.edge_rss_max = st.edge_rss_max.max(me);
            st.hub_rss_max = st.hub_rss_max.max(hub);
        }
        // The whole fleet once a second (reported states of big nodes are
        // large); nodes with a pending desired revision every 100 ms.
        let views: Vec<NodeViewLite> = if n.is_multiple_of(10) {
            let Some(v) = get_json(&http, format!("{hub_base}/v1/nodes")).await else {
                lock(&state).polls_failed += 1;
                continue;
            };
            v
        } else {
            let pending: std::collections::BTreeSet<String> = lock(&state)
                .pending
                .keys()
                .map(|(n, _)| n.clone())
                .collect();
            let mut v = Vec::new();
            for node in pending {
                if let Some(one) = get_json(&http, format!("{hub_base}/v1/nodes/{node}")).await {
                    v.push(one);
                }
            }
            v
        };
        let now = Instant::now();
        let mut st = lock(&state);
        for v in views {
            if let Some(rep) = &v.reported {
                let applied = rep.applied_revision;
                let done: Vec<(String, u64)> = st
                    .pending
                    .keys()
                    .filter(|(n, r)| *n == v.node && *r <= applied)
                    .cloned()
                    .collect();
                for k in done {
                    if let Some(t) = st.pending.remove(&k) {
                        st.applied_at_ms.insert(k.clone(), now_ms());
                        st.convergence_ms
                            .push(now.duration_since(t).as_secs_f64() * 1_000.0);
                    }
                }
            }
            let seen = st.nodes.entry(v.node).or_default();
            if v.reported.is_some() {
                seen.reported = v.reported;
            }
            seen.stored = seen.stored.max(v.telemetry.samples);
        }
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: String,
) -> Option<T> {
    let r = http
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Whether every node reported, after `after_ms`, that everything stamped
/// before `before_ms` has been acked. With `before_ms = None`: that its
/// oldest unacked sample is younger than `fresh_ms` (caught up with live).
fn drained(
    st: &Monitor,
    nodes: &[NodeRt],
    after_ms: u64,
    before_ms: Option<u64>,
    fresh_ms: u64,
) -> bool {
    nodes.iter().all(|n| {
        let Some(rep) = st
            .nodes
            .get(&n.layout.name)
            .and_then(|s| s.reported.as_ref())
        else {
            return false;
        };
        // Wall-clock instants in the node's time.
        let after_ms = after_ms.saturating_add_signed(n.clock_offset_ms);
        let before_ms = before_ms.map(|b| b.saturating_add_signed(n.clock_offset_ms));
        if rep.at_ms <= after_ms {
            return false;
        }
        let acked_before = if rep.backlog.samples == 0 {
            rep.at_ms
        } else {
            rep.at_ms.saturating_sub(rep.backlog.oldest_age_ms)
        };
        match before_ms {
            Some(b) => acked_before > b,
            None => rep.backlog.samples == 0 || rep.backlog.oldest_age_ms <= fresh_ms,
        }
    })
}

struct Progress {
    bar: ProgressBar,
    show: bool,
    next_line: u64,
}

impl Progress {
    fn new(show: bool, len: u64) -> Self {
        let bar = if show {
            ProgressBar::new(len)
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}",
        ) {
            bar.set_style(style);
        }
        Self {
            bar,
            show,
            next_line: 0,
        }
    }

    /// A line above the bar; plain stderr when there is no terminal
    /// (indicatif draws nothing then) unless progress is off.
    fn println(&self, msg: impl AsRef<str>) {
        if !self.show {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{}", msg.as_ref());
        } else {
            self.bar.println(msg.as_ref());
        }
    }

    /// Progress without a terminal: one line every 10 s of device time.
    fn status(&mut self, secs: u64, msg: &str) {
        if self.show && self.bar.is_hidden() && secs >= self.next_line {
            eprintln!("[{secs:>5}s] {msg}");
            self.next_line = secs + 10;
        }
    }
}

/// Runs a scenario and returns its report.
pub async fn run(opts: RunOptions) -> anyhow::Result<Report> {
    let s = opts.scenario.clone();
    let wall = Instant::now();
    let tmp;
    let dir = if let Some(d) = &opts.work_dir {
        d.clone()
    } else {
        tmp = tempfile::tempdir().context("creating a temporary directory")?;
        tmp.path().to_owned()
    };
    std::fs::create_dir_all(&dir).context("creating the work directory")?;
    let cancel = CancellationToken::new();
    let mut progress = Progress::new(opts.progress, s.duration.as_secs());
    progress.println(s.summary());

    // 1. Devices.
    let layouts = s.nodes();
    let broker = if s.nodes.iter().any(|g| g.devices.mqtt > 0) {
        Some(
            crate::devices::mqtt::start_broker()
                .await
                .context("starting the MQTT device broker")?,
        )
    } else {
        None
    };
    let virtual_nodes = s.virtual_partitions();
    let mut pre = Vec::with_capacity(layouts.len());
    for l in &layouts {
        if virtual_nodes.iter().any(|(n, _)| *n == l.index) {
            let vn = VirtualNode::start(&l.name)?;
            let (s2, l2, d2, clock) = (s.clone(), l.clone(), dir.clone(), vn.clock());
            let devs = vn
                .run(async move { start_devices(&s2, &l2, &d2, broker, clock).await })
                .await??;
            pre.push((l.clone(), devs, Some(vn)));
        } else {
            pre.push((
                l.clone(),
                start_devices(&s, l, &dir, broker, Clock::system()).await?,
                None,
            ));
        }
    }
    let device_connections: usize = pre.iter().map(|(_, d, _)| d.connections).sum();
    progress.println(format!(
        "devices up: {} devices, {} driver connections",
        s.device_count(),
        device_connections
    ));

    // 2. Hub, proxies, agents.
    let mut hub = HubCtl::start(&s, &dir, opts.hub_exe.clone(), &cancel).await?;
    let agent_exe = match s.edge.mode {
        EdgeMode::Process => Some(match &opts.hub_exe {
            Some(e) => e.clone(),
            None => std::env::current_exe().context("locating the fleet-sim executable")?,
        }),
        EdgeMode::InProcess => None,
    };
    let hub_pid = Arc::new(Mutex::new(hub.pid()));
    let mut nodes: Vec<NodeRt> = Vec::with_capacity(pre.len());
    for (layout, nd, vnode) in pre {
        let modbus: Vec<Arc<ModbusSim>> = nd.modbus.into_iter().map(Arc::new).collect();
        let mut devices = nd.devices;
        let transports = if vnode.is_some() {
            crate::virtual_time::in_memory_routes(&layout.name, &modbus, &mut devices)
        } else {
            edge_node::drivers::transport::DeviceTransports::default()
        };
        let proxy = Proxy::start(hub.mqtt).await.context("starting a proxy")?;
        let mut cfg = EdgeConfig {
            node: layout.name.clone(),
            data_dir: dir.join("nodes").join(&layout.name),
            cache_capacity_bytes: s.edge.cache_capacity_bytes,
            ..EdgeConfig::default()
        };
        cfg.mqtt.host = "127.0.0.1".into();
        cfg.mqtt.port = proxy.local_addr().port();
        cfg.mqtt.reconnect_max = s.edge.reconnect_max;
        cfg.mqtt.keep_alive = Duration::from_secs(5);
        cfg.hub.public_key = Some(hub.public_key.clone());
        cfg.hub.http_url.clone_from(&hub.base);
        cfg.outbox.flush_interval = s.edge.flush_interval;
        cfg.uplink.drain_rate = s.edge.drain_rate;
        cfg.uplink.ack_timeout = Duration::from_secs(10);
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("edge config of {}: {e}", layout.name))?;
        let mut n = NodeRt {
            layout,
            cfg,
            proxy,
            agent: None,
            agent_exe: agent_exe.clone(),
            modbus,
            opcua: nd.opcua,
            mqtt: nd.mqtt,
            points: nd.points,
            devices,
            vnode,
            transports,
            clock_offset_ms: 0,
        };
        start_agent(&mut n, &cancel).await?;
        nodes.push(n);
    }
    let monitor = Arc::new(Mutex::new(Monitor::default()));
    let mon_cancel = cancel.child_token();
    let mon_task = tokio::spawn(monitor_loop(
        hub.base.clone(),
        hub_pid.clone(),
        monitor.clone(),
        mon_cancel.clone(),
    ));

    // 3. Deploy.
    let mut modules = HashMap::new();
    for f in &s.functions {
        if let std::collections::hash_map::Entry::Vacant(e) = modules.entry(f.guest) {
            e.insert(hub.upload(f.guest.wasm()).await?);
        }
    }
    let mut overrides: HashMap<String, String> = HashMap::new();
    let mut max_error_of: HashMap<String, f64> = s
        .functions
        .iter()
        .map(|f| (f.name.clone(), f.max_error))
        .collect();
    let mut revision = 1u64;
    for n in &nodes {
        let d = desired_for(&s, n, revision, &modules, &overrides)?;
        lock(&monitor)
            .pending
            .insert((n.layout.name.clone(), revision), Instant::now());
        hub.put_desired(&d).await?;
    }
    let conv_start = Instant::now();
    loop {
        let left = lock(&monitor).pending.len();
        if left == 0 {
            break;
        }
        if conv_start.elapsed() > s.converge_timeout {
            bail!(
                "{left} of {} nodes did not apply their desired state within {:?}",
                nodes.len(),
                s.converge_timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress.println(format!(
        "desired state applied on {} nodes in {:.1} s",
        nodes.len(),
        conv_start.elapsed().as_secs_f64()
    ));

    // 4. Live phase with the fault plan.
    let live = Instant::now();
    // By then every subscription (OPC UA, MQTT) must be active: values
    // served later count against the agent even if it stored none at all.
    let subscribed_by_ms = now_ms() + SUBSCRIBE_GRACE.as_millis() as u64;
    let steps = timeline(&s);
    let mut restarts: Vec<Restart> = Vec::new();
    // (wall ms, function, config) of every re-deploy.
    let mut config_log: Vec<(u64, String, String)> = Vec::new();
    let mut next = 0usize;
    let mut fault_log = Vec::new();
    let mut outage_since: HashMap<String, Instant> = HashMap::new();
    let mut outage = Duration::ZERO;
    let mut drain_watch: Vec<(Instant, u64)> = Vec::new(); // outage ends
    let mut drain_max = 0.0f64;
    let mut had_outage = false;
    let fresh_ms = (s.edge.batch_max_age + s.hub.ack_interval + s.edge.report_interval).as_millis()
        as u64
        + 2_000;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Virtual-time outages in progress, and the wall time finished ones
    // took: the live phase is extended by it (`duration` counts wall time
    // outside virtual outages).
    let mut virtual_outages: Vec<(usize, Outage)> = Vec::new();
    let mut virtual_wall = Duration::ZERO;
    let mut live_for = s.duration;
    loop {
        let elapsed = live.elapsed();
        if elapsed >= live_for && next >= steps.len() && virtual_outages.is_empty() {
            break;
        }
        if elapsed >= live_for {
            // Run the remaining (healing) steps now; wait for virtual outages.
            if next >= steps.len() {
                tick.tick().await;
            }
        } else if next < steps.len() && steps[next].0 > elapsed {
            let wait = steps[next]
                .0
                .saturating_sub(elapsed)
                .min(Duration::from_millis(500));
            tokio::select! {
                _ = tick.tick() => {}
                () = tokio::time::sleep(wait) => {}
            }
        } else if next >= steps.len() {
            tick.tick().await;
        }
        // Progress and drain watches.
        {
            let st = lock(&monitor);
            let stored: u64 = st.nodes.values().map(|n| n.stored).sum();
            let backlog: u64 = st
                .nodes
                .values()
                .filter_map(|n| n.reported.as_ref())
                .map(|r| r.backlog.samples)
                .sum();
            progress
                .bar
                .set_position(live.elapsed().as_secs().min(live_for.as_secs()));
            let mut msg = format!(
                "hub stored {stored}  edge backlog {backlog}  rss {} MiB",
                rss_bytes("self").unwrap_or(0) >> 20
            );
            for (node, o) in &virtual_outages {
                use std::fmt::Write as _;
                let _ = write!(
                    msg,
                    "  node {node} virtual outage {:.1}/{:.1} h",
                    o.progress().as_secs_f64() / 3600.0,
                    o.duration().as_secs_f64() / 3600.0
                );
            }
            progress.status(live.elapsed().as_secs(), &msg);
            progress.bar.set_message(msg);
            let open_outages = !outage_since.is_empty() || !virtual_outages.is_empty();
            drain_watch.retain(|(end, end_ms)| {
                if !open_outages && drained(&st, &nodes, *end_ms, None, fresh_ms) {
                    drain_max = drain_max.max(end.elapsed().as_secs_f64());
                    false
                } else {
                    true
                }
            });
        }
        // Virtual-time outages that ended: heal the link.
        let mut k = 0;
        while k < virtual_outages.len() {
            if !virtual_outages[k].1.is_finished() {
                k += 1;
                continue;
            }
            let (node, o) = virtual_outages.remove(k);
            let virtual_for = o.duration();
            let took = o.finish().await?;
            let n = &mut nodes[node];
            if let Some(vn) = &n.vnode {
                n.clock_offset_ms = vn.clock_offset_ms().await?;
            }
            n.proxy.set_mode(LinkMode::Pass);
            outage += virtual_for;
            virtual_wall += took;
            live_for += took;
            had_outage = true;
            drain_watch.push((Instant::now(), now_ms()));
            let t = live.elapsed().as_secs_f64();
            let line = format!(
                "{t:>7.1}s virtual outage of node {node} ended: {:.1} h virtual in {:.1} s wall; node clock now {:+.1} s from wall clock; link healed",
                virtual_for.as_secs_f64() / 3600.0,
                took.as_secs_f64(),
                n.clock_offset_ms as f64 / 1000.0
            );
            progress.println(&line);
            fault_log.push(line);
        }
        // Due steps.
        while next < steps.len() && (steps[next].0 <= live.elapsed() || live.elapsed() >= live_for)
        {
            let (at, action) = steps[next].clone();
            next += 1;
            let t = live.elapsed().as_secs_f64();
            fault_log.push(format!(
                "{t:>7.1}s (planned {:.1}s) {action:?}",
                at.as_secs_f64()
            ));
            progress.println(format!("[{t:>6.1}s] {action:?}"));
            match action {
                Action::Link {
                    node,
                    mode,
                    outage: is_outage,
                } => {
                    let n = &nodes[node];
                    n.proxy.set_mode(mode);
                    let key = format!("link{node}");
                    if is_outage && mode != LinkMode::Pass {
                        outage_since.entry(key).or_insert_with(Instant::now);
                    } else if let Some(since) = outage_since.remove(&key) {
                        outage += since.elapsed();
                        had_outage = true;
                        drain_watch.push((Instant::now(), now_ms()));
                    }
                }
                Action::HubDown => {
                    hub.kill().await?;
                    *lock(&hub_pid) = None;
                    outage_since
                        .entry("hub".into())
                        .or_insert_with(Instant::now);
                }
                Action::HubUp => {
                    hub.restart().await?;
                    *lock(&hub_pid) = hub.pid();
                    if let Some(since) = outage_since.remove("hub") {
                        outage += since.elapsed();
                        had_outage = true;
                        drain_watch.push((Instant::now(), now_ms()));
                    }
                }
                Action::AgentDown(node) => kill_agent(&mut nodes[node]).await?,
                Action::AgentUp(node) => {
                    let lo_ms = now_ms();
                    start_agent(&mut nodes[node], &cancel).await?;
                    restarts.push(Restart {
                        node,
                        lo_ms,
                        revision: None,
                    });
                }
                Action::Devices {
                    node,
                    protocol,
                    server,
                    up,
                } => {
                    let n = &nodes[node];
                    match protocol {
                        Protocol::Modbus => {
                            for (i, m) in n.modbus.iter().enumerate() {
                                if server.is_none_or(|s| s == i) {
                                    if up {
                                        m.come_up().await?;
                                    } else {
                                        m.go_down();
                                    }
                                }
                            }
                        }
                        Protocol::Opcua => {
                            for (i, o) in n.opcua.iter().enumerate() {
                                if server.is_none_or(|s| s == i) {
                                    if up {
                                        o.come_up().await?;
                                    } else {
                                        o.go_down().await;
                                    }
                                }
                            }
                        }
                        Protocol::Mqtt => {
                            for (i, m) in n.mqtt.iter().enumerate() {
                                if server.is_none_or(|s| s == i) {
                                    if up {
                                        m.come_up();
                                    } else {
                                        m.go_down().await;
                                    }
                                }
                            }
                        }
                    }
                }
                Action::VirtualOutage { node, duration } => {
                    let n = &nodes[node];
                    let vn = n
                        .vnode
                        .as_ref()
                        .with_context(|| format!("node {node} has no virtual-time runtime"))?;
                    n.proxy.set_mode(LinkMode::Cut);
                    virtual_outages.push((node, vn.begin_outage(duration)));
                }
                Action::Redeploy { function, config } => {
                    if let Some(f) = s.faults.iter().find_map(|f| match f {
                        Fault::Redeploy {
                            function: ff,
                            config: c,
                            max_error,
                            ..
                        } if *ff == function && *c == config => Some(*max_error),
                        _ => None,
                    }) {
                        // The bound that applies from now on is the looser one.
                        let e = max_error_of.entry(function.clone()).or_insert(0.0);
                        *e = e.max(f);
                    }
                    config_log.push((now_ms(), function.clone(), config.clone()));
                    overrides.insert(function, config);
                    revision += 1;
                    for n in &nodes {
                        let d = desired_for(&s, n, revision, &modules, &overrides)?;
                        lock(&monitor)
                            .pending
                            .insert((n.layout.name.clone(), revision), Instant::now());
                        restarts.push(Restart {
                            node: n.layout.index,
                            lo_ms: now_ms(),
                            revision: Some(revision),
                        });
                        hub.put_desired(&d).await?;
                    }
                }
            }
        }
    }
    let device_seconds = live.elapsed().as_secs_f64();

    // 5. Stop devices, drain, compare.
    let end_ms = now_ms();
    let drain_start = Instant::now();
    for n in &nodes {
        for m in &n.modbus {
            m.stop().await;
        }
        for o in &n.opcua {
            o.stop().await;
        }
        for m in &n.mqtt {
            m.stop().await;
        }
    }
    progress.bar.finish_and_clear();
    progress.println(format!(
        "devices stopped after {device_seconds:.1} s; waiting for the edge nodes to drain"
    ));
    let margin_ms = s.edge.batch_max_age.as_millis() as u64 + 1_000;
    let mut is_drained = false;
    while drain_start.elapsed() < s.drain_timeout {
        if drained(
            &lock(&monitor),
            &nodes,
            end_ms + margin_ms,
            Some(end_ms + margin_ms),
            0,
        ) {
            is_drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let final_drain = drain_start.elapsed().as_secs_f64();
    // Outage drains still open at the end count up to now.
    for (end, _) in &drain_watch {
        drain_max = drain_max.max(end.elapsed().as_secs_f64());
    }
    let drain_seconds = if had_outage { drain_max } else { final_drain };
    progress.println(format!(
        "drain {} after {final_drain:.1} s; comparing with ground truth",
        if is_drained { "complete" } else { "TIMED OUT" }
    ));

    // Values served in the last moments before the devices stopped may not
    // have been delivered (an OPC UA publish cycle, a Modbus reply in
    // flight): the comparison window ends two sampling intervals earlier.
    let interval_ms = s.sampling_interval.as_millis() as u64;
    let cut_ms = end_ms.saturating_sub(2 * interval_ms);
    let mut totals = Totals::default();
    let mut flagged = [0u32; 4]; // points logged at debug level, per kind
    for n in &nodes {
        // In the node's time (shifted after a virtual-time outage).
        let cut_ms = cut_ms.saturating_add_signed(n.clock_offset_ms);
        let mut stored: HashMap<u32, Vec<Obs>> = HashMap::new();
        for stream in hub.streams(&n.layout.name).await? {
            let samples = hub.samples(&n.layout.name, &stream).await?;
            let seqs: Vec<u64> = samples.iter().map(|x| x.seq).collect();
            totals.add_stream(&report::seq_analysis(&seqs));
            for x in samples {
                if x.ts_ms <= cut_ms + interval_ms {
                    stored.entry(x.point).or_default().push(Obs {
                        ts_ms: x.ts_ms,
                        value: x.value,
                        quality: x.quality,
                    });
                }
            }
        }
        // Restart windows of this node: [lo, hi]. An agent restart is over
        // when `start_agent` returns. A re-deploy is reported applied when
        // the agent has handed the new functions to its function host, which
        // swaps the instances asynchronously right after (a cached module
        // instantiates in well under a millisecond): hi is when the monitor
        // saw it applied plus RESTART_SLACK.
        let mut node_restarts: Vec<(u64, u64)> = restarts
            .iter()
            .filter(|r| r.node == n.layout.index)
            .map(|r| {
                let hi = r.revision.map_or(r.lo_ms, |rev| {
                    lock(&monitor)
                        .applied_at_ms
                        .get(&(n.layout.name.clone(), rev))
                        .map_or(end_ms, |t| t + RESTART_SLACK.as_millis() as u64)
                });
                (r.lo_ms, hi.max(r.lo_ms))
            })
            .collect();
        // After a crash (SIGKILL) the agent reports the window in which
        // samples not yet committed may be lost; the restarted instance
        // begins at its end.
        if let Some(rep) = lock(&monitor)
            .nodes
            .get(&n.layout.name)
            .and_then(|v| v.reported.as_ref())
        {
            node_restarts.extend(rep.loss_windows.iter().map(|w| (w.from_ms, w.to_ms)));
        }
        node_restarts.sort_unstable();
        for p in &n.points {
            let mut st = stored.remove(&p.index).unwrap_or_default();
            st.sort_by_key(|o| o.ts_ms);
            let raw = match p.source {
                Source::Modbus { server, unit } => n.modbus[server].served(unit, p.index),
                Source::Opcua { server } => n.opcua[server].served(p.index),
                Source::Mqtt { client } => n.mqtt[client].served(p.index),
            };
            let mut served: Vec<Obs> = raw
                .into_iter()
                .filter(|(ts, _)| *ts <= cut_ms)
                .map(|(ts_ms, value)| Obs {
                    ts_ms,
                    value,
                    quality: 0,
                })
                .collect();
            // Subscriptions (OPC UA, MQTT): values served before the first
            // one a point delivered (or before every subscription had to be
            // active) reached no subscriber.
            let t0 = st
                .first()
                .map_or(subscribed_by_ms, |f| f.ts_ms.min(subscribed_by_ms));
            match p.source {
                Source::Opcua { .. } => {
                    // The first notification carries the value current at
                    // subscription time, stamped with the latest tick (the
                    // log has it at the tick that changed it): keep that
                    // entry, with the source timestamp the subscriber got.
                    let keep_from = served.partition_point(|o| o.ts_ms <= t0).saturating_sub(1);
                    served.drain(..keep_from);
                    if let (Some(f), Some(first)) = (st.first(), served.first_mut())
                        && f.value.to_bits() == first.value.to_bits()
                        && f.ts_ms > first.ts_ms
                        && f.ts_ms <= t0
                    {
                        first.ts_ms = f.ts_ms;
                    }
                }
                // Payload timestamps are exact: start at the first delivered.
                Source::Mqtt { .. } => {
                    served.drain(..served.partition_point(|o| o.ts_ms < t0));
                }
                Source::Modbus { .. } => {}
            }
            // The compared window ends at the last served value: a Modbus
            // sample is stamped after its read (by less than half an
            // interval), so stored samples up to there belong to it; later
            // ones belong to reads after the cut.
            let window_end = served.last().map_or(cut_ms, |o| o.ts_ms + interval_ms / 2);
            st.retain(|o| o.ts_ms <= window_end);
            let func = s.function_of(p.slot, p.source.protocol());
            let fname = func.map_or_else(String::new, |f| f.name.clone());
            // The filter in force from wall ms `at` on (re-deploys change it).
            let filter = |at: u64| match func {
                Some(f) => PointFilter::Guest {
                    guest: f.guest,
                    config: config_log
                        .iter()
                        .rev()
                        .find(|(t, name, _)| *t <= at && *name == f.name)
                        .map_or_else(|| f.config.clone(), |(_, _, c)| c.clone()),
                },
                None => PointFilter::Passthrough,
            };
            let v = compare_segmented(
                filter,
                &served,
                &st,
                &node_restarts,
                interval_ms,
                &mut totals.in_restart_windows,
            );
            let bound = func.map_or(0.0, |f| {
                max_error_of.get(&f.name).copied().unwrap_or(f.max_error)
            });
            let kind = if v.duplicates > 0 {
                0
            } else if v.unexpected > 0 {
                1
            } else if v.lost.is_some_and(|l| l > 0) {
                2
            } else if v.max_abs_error > bound {
                3
            } else {
                4
            };
            if kind < 4 && flagged[kind] < 10 {
                flagged[kind] += 1;
                let stray: Vec<_> = st
                    .iter()
                    .filter(|o| {
                        !served
                            .iter()
                            .any(|x| x.value.to_bits() == o.value.to_bits())
                    })
                    .take(3)
                    .collect();
                tracing::debug!(node = %n.layout.name, point = p.index, slot = p.slot, source = ?p.source, ?v, ?stray, first_served = ?served.first(), "point verdict");
            }
            totals.add_point_of(p.source.protocol().name(), &fname, &v);
        }
    }

    // Shut down.
    mon_cancel.cancel();
    let _ = mon_task.await;
    for n in &mut nodes {
        stop_agent(n).await?;
    }
    for mut n in nodes.drain(..) {
        n.proxy.stop().await;
        if let Some(vn) = n.vnode.take() {
            tokio::task::spawn_blocking(move || vn.shutdown())
                .await
                .context("stopping a virtual-time node")?;
        }
    }
    let mon = std::mem::take(&mut *lock(&monitor));
    hub.stop().await?;

    let mut filter_errors = Vec::new();
    let mut max_err = 0.0f64;
    for (name, e) in &totals.max_abs_error {
        let (function, configured) = if name.is_empty() {
            ("raw".to_owned(), 0.0)
        } else {
            (name.clone(), max_error_of.get(name).copied().unwrap_or(0.0))
        };
        if !name.is_empty() {
            max_err = max_err.max(*e);
        }
        filter_errors.push(FilterError {
            function,
            configured,
            max_abs_error: *e,
            within: *e <= configured * (1.0 + 1e-9) + 1e-9,
        });
    }
    let mut conv = mon.convergence_ms.clone();
    let p50 = report::percentile(&mut conv, 50.0);
    let p99 = report::percentile(&mut conv, 99.0);
    let rss_note = match s.hub.mode {
        HubMode::Process => "hub_rss_bytes_max: VmRSS of the hub child process (fleet-sim hub), sampled every 0.5 s; edge_rss_bytes_max: VmRSS of the fleet-sim process, which holds every edge agent AND the simulated device servers, so it over-states the agents".into(),
        HubMode::InProcess => "hub and edge share this process: both figures are the VmRSS of the fleet-sim process (agents, hub and device servers together), sampled every 0.5 s".into(),
    };
    let rss_note: String = if s.edge.mode == EdgeMode::Process {
        format!(
            "{rss_note}; the edge agents ran as separate processes (edge.mode = \"process\") and are not in edge_rss_bytes_max"
        )
    } else {
        rss_note
    };
    let hub_rss = match s.hub.mode {
        HubMode::Process => mon.hub_rss_max,
        HubMode::InProcess => mon.edge_rss_max,
    };
    Ok(Report {
        scenario: s.name.clone(),
        devices: s.device_count() as u64,
        edge_nodes: s.node_count() as u64,
        device_connections: device_connections as u64,
        points: totals.points,
        samples_generated: totals.served,
        samples_upstream: totals.stored,
        reduction_ratio: if totals.served == 0 {
            0.0
        } else {
            1.0 - totals.stored as f64 / totals.served as f64
        },
        max_abs_error: max_err,
        filter_errors,
        by_source: totals.by_source.values().cloned().collect(),
        samples_in_restart_windows: totals.in_restart_windows,
        samples_lost: totals.lost + totals.seq_missing,
        duplicates: totals.duplicates,
        unexpected: totals.unexpected,
        seq_missing: totals.seq_missing,
        points_unverified: totals.points_unverified,
        desired_convergence_ms_p50: p50,
        desired_convergence_ms_p99: p99,
        desired_convergence_samples: mon.convergence_ms.len() as u64,
        outage_seconds: outage.as_secs_f64(),
        outage_virtual: !virtual_nodes.is_empty(),
        virtual_outage_wall_seconds: virtual_wall.as_secs_f64(),
        drain_seconds,
        final_drain_seconds: final_drain,
        drained: is_drained,
        edge_rss_bytes_max: mon.edge_rss_max,
        hub_rss_bytes_max: hub_rss,
        rss_note,
        wall_seconds: wall.elapsed().as_secs_f64(),
        device_seconds,
        faults: fault_log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(i: u64) -> Obs {
        Obs {
            ts_ms: 10 * i,
            value: 0.4 * i as f64,
            quality: 0,
        }
    }

    /// A deadband instance restarted between reads 10 and 11: the old one
    /// sent every even read, the fresh one starts by sending read 11 and
    /// then every odd read.
    #[test]
    fn a_restart_window_restarts_the_reference_at_the_new_instance() {
        let served: Vec<Obs> = (0..=20).map(o).collect();
        let stored: Vec<Obs> = (0..=10)
            .step_by(2)
            .chain((11..=19).step_by(2))
            .map(o)
            .collect();
        let filter = |_| PointFilter::Guest {
            guest: Guest::Deadband,
            config: "deadband=0.5".into(),
        };
        let mut excluded = 0;
        let v = compare_segmented(filter, &served, &stored, &[(105, 110)], 10, &mut excluded);
        assert_eq!(v.lost, Some(0), "{v:?}");
        assert_eq!(v.unexpected, 0, "{v:?}");
        assert_eq!(v.stored, stored.len() as u64);
        assert_eq!(excluded, 0, "read 11 is the anchor itself");

        // Without the restart the continuous reference disagrees.
        let v = compare_segmented(filter, &served, &stored, &[], 10, &mut excluded);
        assert!(v.unexpected > 0 && v.lost.unwrap_or(0) > 0, "{v:?}");

        // A sample the new instance should have sent but that is missing
        // is still lost.
        let mut gappy = stored.clone();
        gappy.retain(|x| x.ts_ms != 150);
        let v = compare_segmented(filter, &served, &gappy, &[(105, 110)], 10, &mut excluded);
        assert_eq!(v.lost, Some(1), "{v:?}");
    }
}
