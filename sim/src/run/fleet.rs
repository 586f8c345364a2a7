//! The simulated fleet: each node's device servers, its points, its
//! desired state and its agent (a task of this process or a child).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use edge_node::drivers::decode::Format;
use edge_node::{Agent, Clock, EdgeConfig};
use protocols::{
    ByteOrder, DataType, DesiredState, Device, DeviceProtocol, FunctionLimits, FunctionSpec,
    ModbusTable, NodeConfig, OpcUaSecurity, Point, PointAddress, PointGroup, WordOrder,
};
use tokio_util::sync::CancellationToken;

use super::hub::{sigterm, spawn_logged};
use super::monitor::ArtifactInfoLite;
use crate::devices::modbus::{ModbusSim, ModbusSimConfig, SimPoint, UnitConfig};
use crate::devices::mqtt::{MqttSim, MqttSimConfig, MqttSimDevice, MqttSimPoint};
use crate::devices::opcua::{OpcUaSim, OpcUaSimConfig, SimVariable, VarKind};
use crate::proxy::Proxy;
use crate::scenario::{Guest, NodeLayout, Protocol, Scenario};
use crate::virtual_time::VirtualNode;

/// Where a point's ground truth lives.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    Modbus { server: usize, unit: u8 },
    Opcua { server: usize },
    Mqtt { client: usize },
}

impl Source {
    pub(super) fn protocol(self) -> Protocol {
        match self {
            Self::Modbus { .. } => Protocol::Modbus,
            Self::Opcua { .. } => Protocol::Opcua,
            Self::Mqtt { .. } => Protocol::Mqtt,
        }
    }
}

/// One node's simulated devices and what the agent is told about them.
pub(super) struct NodeDevices {
    pub(super) modbus: Vec<ModbusSim>,
    pub(super) opcua: Vec<OpcUaSim>,
    pub(super) mqtt: Vec<MqttSim>,
    pub(super) devices: Vec<Device>,
    pub(super) points: Vec<PointInfo>,
    /// Driver connections the agent opens to them.
    pub(super) connections: usize,
}

#[derive(Debug, Clone)]
pub(super) struct PointInfo {
    pub(super) index: u32,
    pub(super) slot: u32,
    pub(super) source: Source,
}

pub(super) struct NodeRt {
    pub(super) layout: NodeLayout,
    pub(super) cfg: EdgeConfig,
    pub(super) proxy: Proxy,
    pub(super) agent: Option<AgentRt>,
    /// `Some(fleet-sim executable)` when agents run as child processes.
    pub(super) agent_exe: Option<PathBuf>,
    pub(super) modbus: Vec<Arc<ModbusSim>>,
    pub(super) opcua: Vec<OpcUaSim>,
    pub(super) mqtt: Vec<MqttSim>,
    pub(super) points: Vec<PointInfo>,
    pub(super) devices: Vec<Device>,
    /// The node's own runtime when it has a virtual-time partition.
    pub(super) vnode: Option<VirtualNode>,
    /// In-memory routes to this node's device servers (virtual-time nodes).
    pub(super) transports: edge_node::drivers::transport::DeviceTransports,
    /// The node's clock minus the wall clock (non-zero after a virtual-time
    /// outage): added to wall-clock instants compared with node timestamps.
    pub(super) clock_offset_ms: i64,
}

/// A running agent: a task of this process, or a `fleet-sim agent` child.
pub(super) enum AgentRt {
    Task(
        CancellationToken,
        tokio::task::JoinHandle<Result<(), edge_node::AgentError>>,
    ),
    Process(tokio::process::Child),
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

pub(super) fn desired_for(
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

pub(super) async fn start_agent(
    node: &mut NodeRt,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
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
pub(super) async fn stop_agent(node: &mut NodeRt) -> anyhow::Result<()> {
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
pub(super) async fn kill_agent(node: &mut NodeRt) -> anyhow::Result<()> {
    if let Some(AgentRt::Process(mut c)) = node.agent.take() {
        c.kill()
            .await
            .with_context(|| format!("killing edge node {}", node.layout.name))?;
        return Ok(());
    }
    stop_agent(node).await
}
