//! The simulated fleet: each node's device servers and points
//! ([`start_devices`], one builder per protocol), its agent ([`SimNode`]
//! with an [`AgentProc`]: a task of this process or a `fleet-sim agent`
//! child) and its desired state ([`Deployment`], [`desired_for`]).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use cloud_hub::artifacts::ArtifactInfo;
use edge_node::drivers::decode::Format;
use edge_node::drivers::transport::DeviceTransports;
use edge_node::{Agent, Clock, EdgeConfig};
use protocols::{
    ByteOrder, DataType, DesiredState, Device, DeviceProtocol, FunctionLimits, FunctionSpec,
    ModbusTable, NodeConfig, OpcUaSecurity, Point, PointAddress, PointGroup, WordOrder,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use edgefleet_testkit::wait_until;

use super::hub::{Hub, sigterm, spawn_logged};
use super::{Restart, RunState, lock, now_ms};
use crate::devices::SimDevice;
use crate::devices::modbus::{ModbusSim, ModbusSimConfig, SimPoint, UnitConfig};
use crate::devices::mqtt::{MqttSim, MqttSimConfig, MqttSimDevice, MqttSimPoint};
use crate::devices::opcua::{OpcUaSim, OpcUaSimConfig, SimVariable, VarKind};
use crate::proxy::Proxy;
use crate::scenario::{EdgeMode, Fault, Guest, NodeGroup, NodeLayout, Protocol, Scenario};
use crate::signal::Model;
use crate::virtual_time::VirtualNode;

/// Where a point's ground truth lives: the node's `server`-th simulator of
/// `protocol` (a Modbus or OPC UA server, an MQTT simulator connection).
#[derive(Debug, Clone, Copy)]
pub(super) struct Source {
    pub(super) protocol: Protocol,
    pub(super) server: usize,
}

impl Source {
    fn new(protocol: Protocol, server: usize) -> Self {
        Self { protocol, server }
    }
}

/// One node's simulated devices and what the agent is told about them.
pub(super) struct NodeDevices {
    modbus: Vec<ModbusSim>,
    opcua: Vec<OpcUaSim>,
    mqtt: Vec<MqttSim>,
    devices: Vec<Device>,
    points: Vec<PointInfo>,
    /// Driver connections the agent opens to them.
    pub(super) connections: usize,
}

#[derive(Debug, Clone)]
pub(super) struct PointInfo {
    pub(super) index: u32,
    pub(super) slot: u32,
    pub(super) source: Source,
}

/// One simulated edge node: its proxy, agent, device servers and points.
pub(super) struct SimNode {
    pub(super) layout: NodeLayout,
    cfg: EdgeConfig,
    pub(super) proxy: Proxy,
    agent: Option<AgentProc>,
    /// `Some(fleet-sim executable)` when agents run as child processes.
    agent_exe: Option<PathBuf>,
    /// The device simulators by protocol, numbered as [`Source::server`].
    servers: BTreeMap<Protocol, Vec<Arc<dyn SimDevice>>>,
    pub(super) points: Vec<PointInfo>,
    devices: Vec<Device>,
    /// The node's own runtime when it has a virtual-time partition.
    pub(super) vnode: Option<VirtualNode>,
    /// In-memory routes to this node's device servers (virtual-time nodes).
    transports: DeviceTransports,
    /// The node's clock minus the wall clock (non-zero after a virtual-time
    /// outage): added to wall-clock instants compared with node timestamps.
    pub(super) clock_offset_ms: i64,
}

/// A running agent: a task of this process, or a `fleet-sim agent` child.
/// Every start and stop of an agent goes through this type.
enum AgentProc {
    Task(
        CancellationToken,
        tokio::task::JoinHandle<Result<(), edge_node::AgentError>>,
    ),
    Process(tokio::process::Child),
}

impl AgentProc {
    /// Stops cleanly (cancel, or SIGTERM to the process), bounded by 60 s.
    async fn stop(self, name: &str) -> anyhow::Result<()> {
        match self {
            Self::Task(token, task) => {
                token.cancel();
                match tokio::time::timeout(Duration::from_secs(60), task).await {
                    Ok(Ok(r)) => r.with_context(|| format!("edge node {name}"))?,
                    Ok(Err(e)) => bail!("edge node {name} task: {e}"),
                    Err(_) => bail!("edge node {name} did not stop within 60 s"),
                }
            }
            Self::Process(mut c) => {
                sigterm(&c).await;
                match tokio::time::timeout(Duration::from_secs(60), c.wait()).await {
                    Ok(Ok(st)) if st.success() => {}
                    Ok(Ok(st)) => bail!("edge node {name} exited with {st}"),
                    Ok(Err(e)) => bail!("edge node {name}: {e}"),
                    Err(_) => {
                        c.kill().await?;
                        bail!("edge node {name} did not stop within 60 s");
                    }
                }
            }
        }
        Ok(())
    }

    /// SIGKILL when it is a process (nothing flushed, the outbox keeps what
    /// was committed), a clean stop when it is a task of this process.
    async fn kill(self, name: &str) -> anyhow::Result<()> {
        match self {
            Self::Process(mut c) => c
                .kill()
                .await
                .with_context(|| format!("killing edge node {name}")),
            task @ Self::Task(..) => task.stop(name).await,
        }
    }
}

/// How a node's devices are numbered and built: shared by the per-protocol
/// builders of [`start_devices`].
struct DeviceBuilder<'a> {
    s: &'a Scenario,
    g: &'a NodeGroup,
    layout: &'a NodeLayout,
    clock: Clock,
    node_seed: u64,
    interval_ms: u64,
    /// Points per device.
    ppd: u32,
    /// Next device number on the node.
    dev: u32,
    points: Vec<PointInfo>,
    devices: Vec<Device>,
    connections: usize,
}

impl DeviceBuilder<'_> {
    fn model(&self, slot: u32) -> Model {
        self.s.signals[slot as usize % self.s.signals.len()].clone()
    }

    /// Modbus: servers of up to `modbus_units_per_server` units.
    async fn modbus(&mut self) -> anyhow::Result<Vec<ModbusSim>> {
        let (g, ppd) = (self.g, self.ppd);
        let per = g.devices.modbus_units_per_server;
        let format = Format {
            data_type: DataType::F32,
            byte_order: ByteOrder::BigEndian,
            word_order: WordOrder::HighFirst,
        };
        let mut out = Vec::new();
        for (server, chunk_start) in (0..g.devices.modbus).step_by(per).enumerate() {
            let n = per.min(g.devices.modbus - chunk_start);
            let mut units = Vec::with_capacity(n);
            let mut unit_points = Vec::with_capacity(n);
            for u in 0..n {
                let unit = u8::try_from(u + 1).context("unit id")?;
                let mut pts = Vec::with_capacity(ppd as usize);
                let mut sim_pts = Vec::with_capacity(ppd as usize);
                for slot in 0..ppd {
                    let index = self.dev * ppd + slot;
                    pts.push(Point {
                        index,
                        name: format!("p{slot}"),
                        address: PointAddress::Modbus {
                            table: ModbusTable::Holding,
                            address: slot * 2,
                            data_type: format.data_type,
                            byte_order: format.byte_order,
                            word_order: format.word_order,
                        },
                        scale: 1.0,
                        offset: 0.0,
                        range: None,
                        unit: None,
                    });
                    sim_pts.push(SimPoint {
                        id: index,
                        table: ModbusTable::Holding,
                        address: u16::try_from(slot * 2).context("address")?,
                        format,
                        scale: 1.0,
                        offset: 0.0,
                        model: self.model(slot),
                    });
                    self.points.push(PointInfo {
                        index,
                        slot,
                        source: Source::new(Protocol::Modbus, server),
                    });
                }
                units.push(UnitConfig {
                    unit,
                    points: sim_pts,
                    size: 0,
                });
                unit_points.push((unit, self.dev, pts));
                self.dev += 1;
            }
            let sim = ModbusSim::start(ModbusSimConfig {
                units,
                tick: self.s.sampling_interval,
                seed: self.node_seed,
                clock: self.clock,
                ..ModbusSimConfig::default()
            })
            .await
            .context("starting a Modbus device server")?;
            let port = sim.local_addr().port();
            for (unit, d, pts) in unit_points {
                self.devices.push(Device {
                    id: format!("mb{d}"),
                    protocol: DeviceProtocol::ModbusTcp {
                        host: "127.0.0.1".into(),
                        port,
                        unit,
                    },
                    groups: vec![group(self.interval_ms, pts)],
                });
                self.connections += 1;
            }
            out.push(sim);
        }
        Ok(out)
    }

    /// OPC UA: servers of up to `opcua_devices_per_server` variable folders;
    /// the agent opens one session per `opcua_devices_per_session` devices.
    async fn opcua(&mut self, dir: &Path) -> anyhow::Result<Vec<OpcUaSim>> {
        let (g, ppd) = (self.g, self.ppd);
        let per = g.devices.opcua_devices_per_server;
        let per_session = g.devices.opcua_devices_per_session;
        let mut out = Vec::new();
        for (server, chunk_start) in (0..g.devices.opcua).step_by(per).enumerate() {
            let n = per.min(g.devices.opcua - chunk_start);
            let first_dev = self.dev;
            let mut vars = Vec::with_capacity(n * ppd as usize);
            for k in 0..n {
                let d = first_dev + u32::try_from(k)?;
                for slot in 0..ppd {
                    let index = d * ppd + slot;
                    vars.push(SimVariable {
                        id: index,
                        name: format!("d{d}.p{slot}"),
                        kind: VarKind::Double,
                        model: self.model(slot),
                    });
                    self.points.push(PointInfo {
                        index,
                        slot,
                        source: Source::new(Protocol::Opcua, server),
                    });
                }
            }
            let sim = OpcUaSim::start(OpcUaSimConfig {
                variables: vars,
                tick: self.s.sampling_interval,
                seed: self.node_seed,
                pki_dir: dir.join("opcua-pki"),
                secure_endpoints: false,
                clock: self.clock,
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
                // The server samples monitored items at this interval: twice
                // per device update, so no update is skipped.
                let group = group((self.interval_ms / 2).max(10), pts);
                self.devices.push(Device {
                    id: format!("ua{server}-{sess}"),
                    protocol: DeviceProtocol::OpcUa {
                        endpoint: sim.endpoint(),
                        security: OpcUaSecurity::None,
                        username: None,
                        password_file: None,
                    },
                    groups: vec![group],
                });
                self.connections += 1;
            }
            self.dev += u32::try_from(n)?;
            out.push(sim);
        }
        Ok(out)
    }

    /// MQTT: one simulator connection per `mqtt_devices_per_client` devices,
    /// each device on its own topic with keys unique to it; the agent
    /// subscribes to the group with one `+` filter (one edge `Device`).
    async fn mqtt(&mut self, broker: Option<SocketAddr>) -> anyhow::Result<Vec<MqttSim>> {
        let (g, ppd) = (self.g, self.ppd);
        let per = g.devices.mqtt_devices_per_client;
        let layout = self.layout;
        let name = &layout.name;
        let mut out = Vec::new();
        for (client, chunk_start) in (0..g.devices.mqtt).step_by(per).enumerate() {
            let broker = broker.context("MQTT devices need the device broker")?;
            let n = per.min(g.devices.mqtt - chunk_start);
            let base = format!("sim/{name}/mqtt{client}");
            let mut sim_devices = Vec::with_capacity(n);
            let mut pts = Vec::with_capacity(n * ppd as usize);
            for _ in 0..n {
                let dev = self.dev;
                let mut dpts = Vec::with_capacity(ppd as usize);
                for slot in 0..ppd {
                    let index = dev * ppd + slot;
                    let key = format!("d{dev}.p{slot}");
                    dpts.push(MqttSimPoint {
                        id: index,
                        key: key.clone(),
                        model: self.model(slot),
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
                    self.points.push(PointInfo {
                        index,
                        slot,
                        source: Source::new(Protocol::Mqtt, client),
                    });
                }
                sim_devices.push(MqttSimDevice {
                    topic: format!("{base}/d{dev}"),
                    points: dpts,
                });
                self.dev += 1;
            }
            let mut cfg = MqttSimConfig::new(broker, sim_devices);
            cfg.client_id = format!("sim-{name}-mqtt{client}");
            cfg.tick = self.s.sampling_interval;
            cfg.seed = self.node_seed;
            cfg.clock = self.clock;
            cfg.connect_timeout = Duration::from_secs(30);
            let sim = MqttSim::start(cfg)
                .await
                .context("starting an MQTT device simulator")?;
            self.devices.push(Device {
                id: format!("mq{client}"),
                protocol: DeviceProtocol::Mqtt {
                    host: broker.ip().to_string(),
                    port: broker.port(),
                    topic: format!("{base}/+"),
                    qos: 1,
                    client_id: Some(format!("{name}-mq{client}")),
                    ca_file: None,
                    username: None,
                    password_file: None,
                },
                groups: vec![group(self.interval_ms, pts)],
            });
            self.connections += 1;
            out.push(sim);
        }
        Ok(out)
    }
}

/// The one point group of a simulated device.
fn group(interval_ms: u64, points: Vec<Point>) -> PointGroup {
    PointGroup {
        name: "g".into(),
        interval_ms,
        points,
    }
}

/// Builds one node's device servers, devices and points. `broker` is the
/// device broker MQTT-native devices publish to (needed when the node has
/// any).
pub(super) async fn start_devices(
    s: &Scenario,
    layout: &NodeLayout,
    dir: &Path,
    broker: Option<SocketAddr>,
    clock: Clock,
) -> anyhow::Result<NodeDevices> {
    let g = &s.nodes[layout.group];
    let mut b = DeviceBuilder {
        s,
        g,
        layout,
        clock,
        node_seed: s.seed ^ (layout.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        interval_ms: s.sampling_interval.as_millis() as u64,
        ppd: g.points_per_device,
        dev: 0,
        points: Vec::new(),
        devices: Vec::new(),
        connections: 0,
    };
    let modbus = b.modbus().await?;
    let opcua = b.opcua(dir).await?;
    let mqtt = b.mqtt(broker).await?;
    Ok(NodeDevices {
        modbus,
        opcua,
        mqtt,
        devices: b.devices,
        points: b.points,
        connections: b.connections,
    })
}

/// Phase 1: every node's device servers (a virtual-time node's on its own
/// paused-clock runtime), with the device broker MQTT devices publish to.
pub(super) async fn start_all_devices(
    s: &Scenario,
    dir: &Path,
) -> anyhow::Result<Vec<(NodeLayout, NodeDevices, Option<VirtualNode>)>> {
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
            let (s2, l2, d2, clock) = (s.clone(), l.clone(), dir.to_owned(), vn.clock());
            let devs = vn
                .run(async move { start_devices(&s2, &l2, &d2, broker, clock).await })
                .await??;
            pre.push((l.clone(), devs, Some(vn)));
        } else {
            pre.push((
                l.clone(),
                start_devices(s, l, dir, broker, Clock::system()).await?,
                None,
            ));
        }
    }
    Ok(pre)
}

/// The agent config of one node: its own data directory, the broker through
/// its proxy, the hub's key.
fn edge_config(
    s: &Scenario,
    dir: &Path,
    layout: &NodeLayout,
    proxy: &Proxy,
    hub: &Hub,
) -> anyhow::Result<EdgeConfig> {
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
    hub.base().clone_into(&mut cfg.hub.http_url);
    cfg.outbox.flush_interval = s.edge.flush_interval;
    cfg.uplink.drain_rate = s.edge.drain_rate;
    cfg.uplink.ack_timeout = Duration::from_secs(10);
    // The gateway's own policy, as a site would write it: the simulated
    // devices listen on loopback, and a partitioned node on a virtual clock
    // reaches its devices in memory under `{node}-mb{i}.mem`
    // (`crate::virtual_time`).
    cfg.policy.device_endpoints.push("*.mem".into());
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("edge config of {}: {e}", layout.name))?;
    Ok(cfg)
}

/// Phase 2 (after the hub): one proxy and one running agent per node.
/// `exe` is the `fleet-sim` executable agents run as when
/// `edge.mode = "process"` (the current one when `None`).
pub(super) async fn start_nodes(
    s: &Scenario,
    dir: &Path,
    hub: &Hub,
    pre: Vec<(NodeLayout, NodeDevices, Option<VirtualNode>)>,
    exe: Option<&Path>,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<SimNode>> {
    let agent_exe = match s.edge.mode {
        EdgeMode::Process => Some(match exe {
            Some(e) => e.to_path_buf(),
            None => std::env::current_exe().context("locating the fleet-sim executable")?,
        }),
        EdgeMode::InProcess => None,
    };
    let mut nodes: Vec<SimNode> = Vec::with_capacity(pre.len());
    for (layout, nd, vnode) in pre {
        let modbus: Vec<Arc<ModbusSim>> = nd.modbus.into_iter().map(Arc::new).collect();
        let mut devices = nd.devices;
        let transports = if vnode.is_some() {
            crate::virtual_time::in_memory_routes(&layout.name, &modbus, &mut devices)
        } else {
            DeviceTransports::default()
        };
        let proxy = Proxy::start(hub.mqtt).await.context("starting a proxy")?;
        let cfg = edge_config(s, dir, &layout, &proxy, hub)?;
        if !crate::run::hub_identity_exists(&cfg.data_dir) {
            hub.enroll(&layout.name, &cfg.data_dir).await?;
        }
        let servers = BTreeMap::from([
            (Protocol::Modbus, dyn_all(modbus)),
            (
                Protocol::Opcua,
                dyn_all(nd.opcua.into_iter().map(Arc::new).collect()),
            ),
            (
                Protocol::Mqtt,
                dyn_all(nd.mqtt.into_iter().map(Arc::new).collect()),
            ),
        ]);
        let mut n = SimNode {
            layout,
            cfg,
            proxy,
            agent: None,
            agent_exe: agent_exe.clone(),
            servers,
            points: nd.points,
            devices,
            vnode,
            transports,
            clock_offset_ms: 0,
        };
        n.start_agent(cancel).await?;
        nodes.push(n);
    }
    Ok(nodes)
}

/// The simulators as [`SimDevice`]s.
fn dyn_all<D: SimDevice + 'static>(v: Vec<Arc<D>>) -> Vec<Arc<dyn SimDevice>> {
    v.into_iter().map(|d| d as Arc<dyn SimDevice>).collect()
}

impl SimNode {
    /// The node's simulators of `protocol`.
    fn servers(&self, protocol: Protocol) -> &[Arc<dyn SimDevice>] {
        self.servers.get(&protocol).map_or(&[], Vec::as_slice)
    }

    /// The simulator a point's values come from.
    pub(super) fn device_of(&self, source: Source) -> Option<&dyn SimDevice> {
        self.servers(source.protocol)
            .get(source.server)
            .map(|d| &**d)
    }

    /// Starts the node's agent: on its virtual-time runtime, as a child
    /// process, or as a task of this process.
    pub(super) async fn start_agent(&mut self, cancel: &CancellationToken) -> anyhow::Result<()> {
        let token = cancel.child_token();
        let name = &self.layout.name;
        if let Some(vn) = &self.vnode {
            let options = edge_node::AgentOptions {
                device_transports: self.transports.clone(),
            };
            let (cfg, clock, t) = (self.cfg.clone(), vn.clock(), token.clone());
            let agent = vn
                .run(async move { Agent::start_with(cfg, clock, t, options).await })
                .await?
                .with_context(|| format!("starting edge node {name}"))?;
            self.agent = Some(AgentProc::Task(token, vn.handle().spawn(agent.run())));
            return Ok(());
        }
        if let Some(exe) = &self.agent_exe {
            let dir = self
                .cfg
                .data_dir
                .parent()
                .map_or_else(|| self.cfg.data_dir.clone(), Path::to_path_buf);
            std::fs::create_dir_all(&dir).context("node directory")?;
            let config = dir.join(format!("{name}.toml"));
            let text = toml::to_string(&self.cfg).context("writing the agent config")?;
            std::fs::write(&config, text).context("writing the agent config")?;
            let log = dir.join(format!("{name}.log"));
            let child = spawn_logged(exe, "agent", &config, &log)
                .with_context(|| format!("starting edge node {name}: {} agent", exe.display()))?;
            self.agent = Some(AgentProc::Process(child));
            return Ok(());
        }
        let agent = Agent::start(self.cfg.clone(), Clock::system(), token.clone())
            .await
            .with_context(|| format!("starting edge node {name}"))?;
        self.agent = Some(AgentProc::Task(token, tokio::spawn(agent.run())));
        Ok(())
    }

    /// Stops the node's agent cleanly (cancel, or SIGTERM to its process).
    pub(super) async fn stop_agent(&mut self) -> anyhow::Result<()> {
        match self.agent.take() {
            Some(a) => a.stop(&self.layout.name).await,
            None => Ok(()),
        }
    }

    /// A `devices-down` fault: takes the node's `protocol` simulators (all,
    /// or the one numbered `server`) down, or brings them back.
    pub(super) async fn set_devices(
        &self,
        protocol: Protocol,
        server: Option<usize>,
        up: bool,
    ) -> anyhow::Result<()> {
        for (_, d) in self
            .servers(protocol)
            .iter()
            .enumerate()
            .filter(|(i, _)| server.is_none_or(|s| s == *i))
        {
            if up {
                d.come_up().await?;
            } else {
                d.go_down().await;
            }
        }
        Ok(())
    }

    /// Stops every device simulator of the node.
    pub(super) async fn stop_devices(&self) {
        for d in self.servers.values().flatten() {
            d.stop().await;
        }
    }

    /// Takes the node's agent down for a `kill-node` fault (see
    /// [`AgentProc::kill`]).
    pub(super) async fn kill_agent(&mut self) -> anyhow::Result<()> {
        match self.agent.take() {
            Some(a) => a.kill(&self.layout.name).await,
            None => Ok(()),
        }
    }
}

/// What has been deployed: the uploaded modules, the current revision and
/// every re-deploy's config.
#[derive(Debug)]
pub(super) struct Deployment {
    modules: HashMap<Guest, ArtifactInfo>,
    /// Function name → config replacing the scenario's (re-deploys).
    overrides: HashMap<String, String>,
    /// The desired revision last put.
    revision: u64,
    /// Function name → the error bound in force (the loosest seen).
    pub(super) max_error_of: HashMap<String, f64>,
    /// (wall ms, function, config) of every re-deploy.
    pub(super) config_log: Vec<(u64, String, String)>,
}

impl Deployment {
    /// Uploads every guest the scenario's functions use.
    pub(super) async fn upload(s: &Scenario, hub: &Hub) -> anyhow::Result<Self> {
        let mut modules = HashMap::new();
        for f in &s.functions {
            if let std::collections::hash_map::Entry::Vacant(e) = modules.entry(f.guest) {
                e.insert(hub.upload(f.guest.wasm()).await?);
            }
        }
        Ok(Self {
            modules,
            overrides: HashMap::new(),
            revision: 0,
            max_error_of: s
                .functions
                .iter()
                .map(|f| (f.name.clone(), f.max_error))
                .collect(),
            config_log: Vec::new(),
        })
    }

    /// Records a re-deploy of `function` with `config`; the bound that
    /// applies from now on is the looser one of the old and the fault's.
    fn redeploy(&mut self, s: &Scenario, function: String, config: String) {
        if let Some(f) = s.faults.iter().find_map(|f| match f {
            Fault::Redeploy {
                function: ff,
                config: c,
                max_error,
                ..
            } if *ff == function && *c == config => Some(*max_error),
            _ => None,
        }) {
            let e = self.max_error_of.entry(function.clone()).or_insert(0.0);
            *e = e.max(f);
        }
        self.config_log
            .push((now_ms(), function.clone(), config.clone()));
        self.overrides.insert(function, config);
    }
}

impl RunState {
    /// Puts the next desired revision of every node. With `redeploy` each
    /// node's function instances may restart: recorded as a [`Restart`].
    pub(super) async fn put_desired_everywhere(&mut self, redeploy: bool) -> anyhow::Result<()> {
        self.deploy.revision += 1;
        let revision = self.deploy.revision;
        for n in &self.nodes {
            let d = desired_for(&self.s, n, revision, &self.deploy)?;
            lock(&self.monitor)
                .pending
                .insert((n.layout.name.clone(), revision), Instant::now());
            if redeploy {
                self.restarts.push(Restart {
                    node: n.layout.index,
                    lo_ms: now_ms(),
                    revision: Some(revision),
                });
            }
            self.hub.put_desired(&d).await?;
        }
        Ok(())
    }

    /// A `redeploy` fault: the new config, then a new revision everywhere.
    pub(super) async fn redeploy(
        &mut self,
        function: String,
        config: String,
    ) -> anyhow::Result<()> {
        self.deploy.redeploy(&self.s, function, config);
        self.put_desired_everywhere(true).await
    }

    /// Waits until the monitor saw every put revision applied.
    pub(super) async fn wait_converged(&mut self) -> anyhow::Result<()> {
        let conv_start = Instant::now();
        let converged = wait_until(
            "every node to apply its desired state",
            self.s.converge_timeout,
            || async { lock(&self.monitor).pending.is_empty().then_some(()) },
        )
        .await;
        if converged.is_err() {
            bail!(
                "{} of {} nodes did not apply their desired state within {:?}",
                lock(&self.monitor).pending.len(),
                self.nodes.len(),
                self.s.converge_timeout
            );
        }
        self.progress.println(format!(
            "desired state applied on {} nodes in {:.1} s",
            self.nodes.len(),
            conv_start.elapsed().as_secs_f64()
        ));
        Ok(())
    }
}

/// Node `node`'s desired state at `revision`: every function with inputs on
/// the node, with the module uploaded for its guest and its current config.
pub(super) fn desired_for(
    s: &Scenario,
    node: &SimNode,
    revision: u64,
    deploy: &Deployment,
) -> anyhow::Result<DesiredState> {
    let mut functions = Vec::new();
    for f in &s.functions {
        let inputs: Vec<u32> = node
            .points
            .iter()
            .filter(|p| {
                s.function_of(p.slot, p.source.protocol)
                    .is_some_and(|g| g.name == f.name)
            })
            .map(|p| p.index)
            .collect();
        if inputs.is_empty() {
            continue;
        }
        let m = deploy
            .modules
            .get(&f.guest)
            .with_context(|| format!("module of {} not uploaded", f.guest.name()))?;
        let config = deploy.overrides.get(&f.name).unwrap_or(&f.config);
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
