//! Scenarios: what `fleet-sim run` builds and does, read from TOML.
//!
//! A [`Scenario`] names the hub settings, groups of edge nodes (real
//! `edge_node::Agent`s, in this process), the devices each node has and
//! their protocol mix, points per device and their seeded signal models, the
//! WASM functions deployed (by point slot), how long the devices run, and a
//! fault plan (partitions, latency, broker restarts, node restarts, device
//! outages, re-deploys).
//!
//! Parsing goes through `serde_path_to_error`, so a type error or an unknown
//! key names its path (`nodes[0].devices.modbuss: unknown field`);
//! [`Scenario::validate`] names the path of every value that parses but
//! makes no sense (`nodes[2].devices.modbus: must be > 0`).
//!
//! Devices and points are laid out deterministically from the scenario (see
//! [`Scenario::nodes`]): device `d` of a node has points
//! `d · points_per_device + slot`, and slot `s` is driven by
//! `signals[s % signals.len()]` with seed `seed ^ node ^ point`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::signal::Model;

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, shown in progress and the report.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Seed of every signal model.
    #[serde(default)]
    pub seed: u64,
    /// How long devices serve values (wall time) once every node applied
    /// its desired state.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Device update period and edge polling / subscription interval.
    #[serde(with = "humantime_serde", default = "default_sampling")]
    pub sampling_interval: Duration,
    /// Longest wait for the edge nodes to drain their outboxes after the
    /// devices stopped.
    #[serde(with = "humantime_serde", default = "default_drain_timeout")]
    pub drain_timeout: Duration,
    /// Longest wait for every node to apply its first desired state.
    #[serde(with = "humantime_serde", default = "default_converge_timeout")]
    pub converge_timeout: Duration,
    /// Hub settings.
    #[serde(default)]
    pub hub: HubSettings,
    /// Settings shared by all edge nodes.
    #[serde(default)]
    pub edge: EdgeSettings,
    /// Groups of identical edge nodes.
    pub nodes: Vec<NodeGroup>,
    /// Signal models, assigned to point slots round-robin.
    pub signals: Vec<Model>,
    /// WASM functions deployed on every node.
    #[serde(default)]
    pub functions: Vec<FunctionDef>,
    /// Fault plan.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

fn default_sampling() -> Duration {
    Duration::from_secs(1)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_converge_timeout() -> Duration {
    Duration::from_secs(120)
}

/// Where the hub runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HubMode {
    /// A child process (`fleet-sim hub`): its own RSS, and broker restarts
    /// are real (the process is killed and started again on the same ports).
    #[default]
    Process,
    /// In this process (`cloud_hub::App`). The embedded broker cannot be
    /// stopped in-process, so `broker-restart` faults are refused.
    InProcess,
}

/// Hub settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubSettings {
    /// Where the hub runs.
    pub mode: HubMode,
    /// Ack coalescing interval.
    #[serde(with = "humantime_serde")]
    pub ack_interval: Duration,
    /// sled page cache.
    pub cache_capacity_bytes: u64,
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            mode: HubMode::Process,
            ack_interval: Duration::from_millis(100),
            cache_capacity_bytes: 128 * 1024 * 1024,
        }
    }
}

/// Settings of every edge node (desired-state `config` and agent config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeSettings {
    /// Where the agents run: `in-process` (default; tasks of the fleet-sim
    /// process) or `process` (one `fleet-sim agent` child process per node,
    /// so `kill-node` is a real SIGKILL).
    pub mode: EdgeMode,
    /// Largest telemetry batch.
    pub batch_max_samples: u32,
    /// Longest a sample waits for its batch.
    #[serde(with = "humantime_serde")]
    pub batch_max_age: Duration,
    /// Reported-state interval.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// Outbox group-commit interval.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Backlog drain rate, samples/s per stream.
    pub drain_rate: u64,
    /// Longest MQTT reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// sled page cache per node.
    pub cache_capacity_bytes: u64,
}

/// Where edge agents run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeMode {
    /// Tasks of the fleet-sim process; `kill-node` stops one cleanly.
    #[default]
    InProcess,
    /// One child process per node; `kill-node` sends SIGKILL.
    Process,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        Self {
            mode: EdgeMode::InProcess,
            batch_max_samples: 1_000,
            batch_max_age: Duration::from_millis(500),
            report_interval: Duration::from_secs(1),
            flush_interval: Duration::from_millis(100),
            drain_rate: 20_000,
            reconnect_max: Duration::from_secs(2),
            cache_capacity_bytes: 16 * 1024 * 1024,
        }
    }
}

/// `count` identical edge nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGroup {
    /// Node names are `{prefix}-{k}`, k counting from 1 across groups with
    /// the same prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How many nodes.
    #[serde(default = "one")]
    pub count: usize,
    /// Points per device.
    #[serde(default = "default_points")]
    pub points_per_device: u32,
    /// Devices of each node.
    pub devices: DeviceMix,
}

fn default_prefix() -> String {
    "edge".into()
}
fn one() -> usize {
    1
}
fn default_points() -> u32 {
    4
}

/// Devices of one node, by protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMix {
    /// Modbus TCP devices (one unit id each; one TCP connection each from the agent).
    #[serde(default)]
    pub modbus: usize,
    /// OPC UA devices (one variable folder each).
    #[serde(default)]
    pub opcua: usize,
    /// MQTT-native devices (each publishes its points as one JSON message
    /// per sampling interval to its own topic on the scenario's device
    /// broker).
    #[serde(default)]
    pub mqtt: usize,
    /// Unit ids per simulated Modbus server (1..=247).
    #[serde(default = "default_units")]
    pub modbus_units_per_server: usize,
    /// OPC UA devices per simulated server.
    #[serde(default = "default_opcua_per_server")]
    pub opcua_devices_per_server: usize,
    /// OPC UA devices sharing one agent session (one edge `Device`, one
    /// subscription); must divide into `opcua_devices_per_server` groups.
    #[serde(default = "default_opcua_per_session")]
    pub opcua_devices_per_session: usize,
    /// MQTT devices per simulator connection and per agent subscription (one
    /// edge `Device` subscribed to a `+` topic filter over all of them).
    #[serde(default = "default_mqtt_per_client")]
    pub mqtt_devices_per_client: usize,
}

fn default_units() -> usize {
    200
}
fn default_opcua_per_server() -> usize {
    500
}
fn default_opcua_per_session() -> usize {
    100
}
fn default_mqtt_per_client() -> usize {
    100
}

/// A committed WASM guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Guest {
    /// `device-runtime/guests/deadband` (config `deadband=<abs>`).
    Deadband,
    /// `device-runtime/guests/swinging-door` (config `deviation=<d>`).
    SwingingDoor,
}

impl Guest {
    /// Name as used by the guest directory and by the truth module.
    pub fn name(self) -> &'static str {
        match self {
            Self::Deadband => "deadband",
            Self::SwingingDoor => "swinging-door",
        }
    }

    /// The committed component.
    pub fn wasm(self) -> &'static [u8] {
        match self {
            Self::Deadband => {
                include_bytes!("../../device-runtime/guests/deadband/deadband.wasm")
            }
            Self::SwingingDoor => {
                include_bytes!("../../device-runtime/guests/swinging-door/swinging-door.wasm")
            }
        }
    }
}

/// A function deployed on every node, fed by some point slots of every device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    /// Function name (unique).
    pub name: String,
    /// Which guest.
    pub guest: Guest,
    /// Guest config text, e.g. `deadband=0.5`.
    pub config: String,
    /// Point slots (0-based, `< points_per_device`) routed through it.
    pub slots: Vec<u32>,
    /// Device protocols whose points (of those slots) it takes; all when
    /// absent. A swinging door decides on slopes, so it is exactly
    /// reproducible only on device-timestamped points (OPC UA source
    /// timestamps, MQTT payload `ts_ms`); polled Modbus values carry the
    /// agent's read time, jittered by the poll latency (see [`crate::truth`]).
    #[serde(default = "all_protocols")]
    pub protocols: Vec<Protocol>,
    /// Output stream.
    #[serde(default = "default_output")]
    pub output: String,
    /// The configured maximum reconstruction error this filter promises
    /// (deadband or deviation); the report checks `max_abs_error` against it.
    pub max_error: f64,
}

fn default_output() -> String {
    "filtered".into()
}

fn all_protocols() -> Vec<Protocol> {
    vec![Protocol::Modbus, Protocol::Opcua, Protocol::Mqtt]
}

/// Protocol of simulated devices (for device faults and function routing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Modbus servers.
    Modbus,
    /// OPC UA servers.
    Opcua,
    /// MQTT-native devices (one simulator connection per
    /// `mqtt_devices_per_client` devices counts as one "server").
    Mqtt,
}

impl Protocol {
    /// Name as written in scenarios.
    pub fn name(self) -> &'static str {
        match self {
            Self::Modbus => "modbus",
            Self::Opcua => "opcua",
            Self::Mqtt => "mqtt",
        }
    }
}

/// How a partition behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionMode {
    /// Connections are closed and new ones refused.
    #[default]
    Cut,
    /// Connections stay open but every byte is discarded (keep-alive
    /// timeouts detect it).
    Blackhole,
}

/// Which clock a partition runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionClock {
    /// Wall time: the partition lasts `duration` of real time.
    #[default]
    Real,
    /// Virtual time: the node (agent and its simulated devices) lives on
    /// its own single-threaded tokio runtime, reaches its devices over
    /// in-memory streams, and that runtime's clock is paused and
    /// auto-advances for the partition, so `duration` (48 h) passes in
    /// minutes. The node's clock is then ahead of the wall clock by about
    /// `duration`; the runner accounts for that offset. Needs a node with
    /// Modbus devices only and no other fault on it; `mode` must be `cut`.
    Virtual,
}

/// One planned fault. `at` is measured from the moment every node applied
/// its first desired state (the start of the device-time clock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// Cut node `node` off the broker (through its TCP proxy).
    Partition {
        /// When.
        #[serde(with = "humantime_serde")]
        at: Duration,
        /// How long.
        #[serde(with = "humantime_serde")]
        duration: Duration,
        /// Node index (0-based, across all groups).
        node: usize,
        /// Cut or blackhole.
        #[serde(default)]
        mode: PartitionMode,
        /// Real (default) or virtual time; see [`PartitionClock`].
        #[serde(default)]
        clock: PartitionClock,
    },
    /// Add latency between node `node` and the broker.
    Latency {
        /// When.
        #[serde(with = "humantime_serde")]
        at: Duration,
        /// How long.
        #[serde(with = "humantime_serde")]
        duration: Duration,
        /// Node index.
        node: usize,
        /// One-way delay added to every chunk.
        #[serde(with = "humantime_serde")]
        delay: Duration,
    },
    /// Kill the hub process (broker included) and start it again on the
    /// same ports after `down`. Needs `hub.mode = "process"`.
    BrokerRestart {
        /// When.
        #[serde(with = "humantime_serde")]
        at: Duration,
        /// How long the hub stays down.
        #[serde(with = "humantime_serde")]
        down: Duration,
    },
    /// Stop edge node `node` (in-process: cancel its agent) and start it
    /// again from its data directory after `down`.
    KillNode {
        /// When.
        #[serde(with = "humantime_serde")]
        at: Duration,
        /// Node index.
        node: usize,
        /// How long the node stays down.
        #[serde(with = "humantime_serde")]
        down: Duration,
    },
    /// Take simulated device servers of node `node` down for `duration`.
    DevicesDown {
        /// When.
        #[serde(with = "humantime_serde")]
        at: Duration,
        /// How long.
        #[serde(with = "humantime_serde")]
        duration: Duration,
        /// Node index.
        node: usize,
        /// Which servers.
        protocol: Protocol,
        /// Server index of that protocol on the node; all when absent.
        #[serde(default)]
        server: Option<usize>,
    },
    /// Push a new desired revision to every node with function `function`'s
    /// config replaced (measures desired-state convergence under load).
    Redeploy {
        /// When.
        #[serde(with = "humantime_serde")]
        at: Duration,
        /// Function name.
        function: String,
        /// New config text.
        config: String,
        /// New promised maximum error.
        max_error: f64,
    },
}

impl Fault {
    /// When the fault starts.
    pub fn at(&self) -> Duration {
        match self {
            Self::Partition { at, .. }
            | Self::Latency { at, .. }
            | Self::BrokerRestart { at, .. }
            | Self::KillNode { at, .. }
            | Self::DevicesDown { at, .. }
            | Self::Redeploy { at, .. } => *at,
        }
    }

    /// Short label for progress output.
    pub fn label(&self) -> String {
        match self {
            Self::Partition { node, duration, .. } => {
                format!("partition node {node} for {duration:?}")
            }
            Self::Latency { node, delay, .. } => format!("latency {delay:?} on node {node}"),
            Self::BrokerRestart { down, .. } => format!("broker restart ({down:?} down)"),
            Self::KillNode { node, down, .. } => format!("kill node {node} ({down:?} down)"),
            Self::DevicesDown { node, protocol, .. } => {
                format!("{protocol:?} devices down on node {node}")
            }
            Self::Redeploy { function, .. } => format!("redeploy {function}"),
        }
    }
}

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or not this schema; the message names the key path.
    #[error("scenario {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// Key path and problem.
        message: String,
    },
    /// Values that parse but make no sense, one per line with its key path.
    #[error("scenario {path} is invalid:\n{problems}")]
    Invalid {
        /// The file.
        path: String,
        /// `key.path: problem` lines.
        problems: String,
    },
}

/// One edge node as laid out from a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayout {
    /// Global index (fault plans refer to it).
    pub index: usize,
    /// Node name.
    pub name: String,
    /// Index into [`Scenario::nodes`].
    pub group: usize,
}

impl Scenario {
    /// Parses TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ScenarioError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let s: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ScenarioError::Parse {
                path: origin.to_owned(),
                message: format!("{path}: {}", inner.message()),
            }
        })?;
        s.validate().map_err(|problems| ScenarioError::Invalid {
            path: origin.to_owned(),
            problems: problems.join("\n"),
        })?;
        Ok(s)
    }

    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Every problem as `key.path: message`.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        self.validate_top(&mut errs);
        let min_points = self.validate_nodes(&mut errs);
        self.validate_signals(&mut errs);
        let names = self.validate_functions(min_points, &mut errs);
        self.validate_faults(&names, &mut errs);
        self.validate_virtual(&mut errs);
        if self.edge.mode == EdgeMode::Process && !self.virtual_partitions().is_empty() {
            errs.push(
                "edge.mode: a virtual-time partition needs in-process agents (its agent shares a paused runtime with its devices)"
                    .to_owned(),
            );
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// Run-level keys (`name`, durations, `edge.*`, non-empty lists).
    fn validate_top(&self, errs: &mut Vec<String>) {
        let mut e = |path: &str, msg: &str| errs.push(format!("{path}: {msg}"));
        if self.name.trim().is_empty() {
            e("name", "must not be empty");
        }
        if self.duration.is_zero() {
            e("duration", "must be > 0");
        }
        if self.sampling_interval < Duration::from_millis(10) {
            e("sampling_interval", "must be >= 10ms");
        }
        if self.drain_timeout.is_zero() {
            e("drain_timeout", "must be > 0");
        }
        if self.edge.batch_max_samples == 0 {
            e("edge.batch_max_samples", "must be > 0");
        }
        if self.edge.drain_rate == 0 {
            e("edge.drain_rate", "must be > 0");
        }
        if self.edge.report_interval < Duration::from_millis(100) {
            e("edge.report_interval", "must be >= 100ms");
        }
        if self.nodes.is_empty() {
            e("nodes", "at least one node group is needed");
        }
        if self.signals.is_empty() {
            e("signals", "at least one signal model is needed");
        }
    }

    /// `nodes[*]`; returns the smallest `points_per_device` of any group.
    fn validate_nodes(&self, errs: &mut Vec<String>) -> u32 {
        let mut e = |path: &str, msg: &str| errs.push(format!("{path}: {msg}"));
        let mut min_points = u32::MAX;
        for (i, g) in self.nodes.iter().enumerate() {
            let p = format!("nodes[{i}]");
            if g.count == 0 {
                e(&format!("{p}.count"), "must be > 0");
            }
            if g.prefix.is_empty()
                || !g
                    .prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                e(&format!("{p}.prefix"), "must be [A-Za-z0-9_-]+");
            }
            if g.points_per_device == 0 {
                e(&format!("{p}.points_per_device"), "must be > 0");
            }
            if g.points_per_device > 64 {
                e(&format!("{p}.points_per_device"), "must be <= 64");
            }
            min_points = min_points.min(g.points_per_device);
            let d = &g.devices;
            if d.modbus + d.opcua + d.mqtt == 0 {
                e(
                    &format!("{p}.devices"),
                    "a node needs at least one device (modbus, opcua or mqtt must be > 0)",
                );
            }
            if d.mqtt_devices_per_client == 0 {
                e(
                    &format!("{p}.devices.mqtt_devices_per_client"),
                    "must be > 0",
                );
            }
            if !(1..=247).contains(&d.modbus_units_per_server) {
                e(
                    &format!("{p}.devices.modbus_units_per_server"),
                    "must be in 1..=247",
                );
            }
            if d.opcua_devices_per_server == 0 {
                e(
                    &format!("{p}.devices.opcua_devices_per_server"),
                    "must be > 0",
                );
            }
            if d.opcua_devices_per_session == 0
                || d.opcua_devices_per_session > d.opcua_devices_per_server.max(1)
            {
                e(
                    &format!("{p}.devices.opcua_devices_per_session"),
                    "must be in 1..=opcua_devices_per_server",
                );
            }
            let per_device = u64::from(g.points_per_device);
            let total = (d.modbus + d.opcua + d.mqtt) as u64 * per_device;
            if total > u64::from(u32::MAX) {
                e(&format!("{p}.devices"), "too many points for one node");
            }
        }
        min_points
    }

    /// `signals[*]`.
    fn validate_signals(&self, errs: &mut Vec<String>) {
        let mut e = |path: &str, msg: &str| errs.push(format!("{path}: {msg}"));
        for (i, m) in self.signals.iter().enumerate() {
            if let protocols::Signal::Sine { period_s, .. } = m.base
                && period_s <= 0.0
            {
                e(&format!("signals[{i}].base.period_s"), "must be > 0");
            }
            if let protocols::Signal::Steps { every_s, .. } = m.base
                && every_s <= 0.0
            {
                e(&format!("signals[{i}].base.every_s"), "must be > 0");
            }
        }
    }

    /// `functions[*]` (slots below `min_points`, each slot and protocol
    /// routed once); returns the function names.
    fn validate_functions(
        &self,
        min_points: u32,
        errs: &mut Vec<String>,
    ) -> std::collections::BTreeSet<&str> {
        let mut e = |path: &str, msg: &str| errs.push(format!("{path}: {msg}"));
        let mut names = std::collections::BTreeSet::new();
        let mut used_slots = std::collections::BTreeMap::new();
        for (i, f) in self.functions.iter().enumerate() {
            let p = format!("functions[{i}]");
            if !names.insert(f.name.as_str()) {
                e(
                    &format!("{p}.name"),
                    &format!("duplicate function {:?}", f.name),
                );
            }
            if f.name.is_empty() {
                e(&format!("{p}.name"), "must not be empty");
            }
            if f.output == "raw" {
                e(&format!("{p}.output"), "\"raw\" is the unfiltered stream");
            }
            if f.slots.is_empty() {
                e(&format!("{p}.slots"), "a function needs at least one slot");
            }
            if f.protocols.is_empty() {
                e(
                    &format!("{p}.protocols"),
                    "a function needs at least one protocol (leave the key out for all)",
                );
            }
            if !(f.max_error >= 0.0 && f.max_error.is_finite()) {
                e(&format!("{p}.max_error"), "must be a finite number >= 0");
            }
            for (k, s) in f.slots.iter().enumerate() {
                if *s >= min_points {
                    e(
                        &format!("{p}.slots[{k}]"),
                        &format!("slot {s} >= points_per_device ({min_points}) of some node group"),
                    );
                }
                for proto in &f.protocols {
                    if let Some(other) = used_slots.insert((*s, *proto), i)
                        && other != i
                    {
                        e(
                            &format!("{p}.slots[{k}]"),
                            &format!(
                                "slot {s} of {proto:?} devices is already routed to functions[{other}]"
                            ),
                        );
                    }
                }
            }
        }
        names
    }

    /// `faults[*]` against the node count, the hub mode and the function
    /// `names`.
    fn validate_faults(&self, names: &std::collections::BTreeSet<&str>, errs: &mut Vec<String>) {
        let mut e = |path: &str, msg: &str| errs.push(format!("{path}: {msg}"));
        let nodes = self.node_count();
        for (i, f) in self.faults.iter().enumerate() {
            let p = format!("faults[{i}]");
            if f.at() > self.duration {
                e(&format!("{p}.at"), "is after the end of `duration`");
            }
            match f {
                Fault::Partition { node, duration, .. }
                | Fault::Latency { node, duration, .. }
                | Fault::DevicesDown { node, duration, .. } => {
                    if *node >= nodes {
                        e(
                            &format!("{p}.node"),
                            &format!("{node} is out of range (the scenario has {nodes} nodes)"),
                        );
                    }
                    if duration.is_zero() {
                        e(&format!("{p}.duration"), "must be > 0");
                    }
                }
                Fault::KillNode { node, .. } => {
                    if *node >= nodes {
                        e(
                            &format!("{p}.node"),
                            &format!("{node} is out of range (the scenario has {nodes} nodes)"),
                        );
                    }
                }
                Fault::BrokerRestart { .. } => {
                    if self.hub.mode == HubMode::InProcess {
                        e(
                            &format!("{p}.kind"),
                            "broker-restart needs hub.mode = \"process\" (the embedded broker cannot stop in-process)",
                        );
                    }
                }
                Fault::Redeploy {
                    function,
                    max_error,
                    ..
                } => {
                    if !names.contains(function.as_str()) {
                        e(
                            &format!("{p}.function"),
                            &format!("no function named {function:?}"),
                        );
                    }
                    if !(*max_error >= 0.0 && max_error.is_finite()) {
                        e(&format!("{p}.max_error"), "must be a finite number >= 0");
                    }
                }
            }
            self.validate_fault_server(&p, f, &mut e);
        }
    }

    /// `faults[i].server` of a `devices-down` fault (`p` = `faults[i]`):
    /// within the node's simulators of that protocol.
    fn validate_fault_server(&self, p: &str, f: &Fault, e: &mut impl FnMut(&str, &str)) {
        if let Fault::DevicesDown {
            node,
            protocol,
            server: Some(s),
            ..
        } = f
            && let Some(layout) = self.nodes().get(*node)
        {
            let d = &self.nodes[layout.group].devices;
            let servers = match protocol {
                Protocol::Modbus => d.modbus.div_ceil(d.modbus_units_per_server.max(1)),
                Protocol::Opcua => d.opcua.div_ceil(d.opcua_devices_per_server.max(1)),
                Protocol::Mqtt => d.mqtt.div_ceil(d.mqtt_devices_per_client.max(1)),
            };
            if *s >= servers {
                e(
                    &format!("{p}.server"),
                    &format!(
                        "{s} is out of range (node {node} has {servers} {protocol:?} servers)"
                    ),
                );
            }
        }
    }

    /// Rules of virtual-time partitions (see [`PartitionClock::Virtual`]).
    fn validate_virtual(&self, errs: &mut Vec<String>) {
        let layouts = self.nodes();
        let virtual_nodes = self.virtual_partitions();
        for (i, f) in self.faults.iter().enumerate() {
            let p = format!("faults[{i}]");
            if let Fault::Partition {
                node,
                mode,
                clock: PartitionClock::Virtual,
                ..
            } = f
            {
                if *mode != PartitionMode::Cut {
                    errs.push(format!(
                        "{p}.mode: a virtual-time partition must be \"cut\" (a blackholed link keeps a socket in flight, which the paused clock cannot wait for)"
                    ));
                }
                if let Some(l) = layouts.get(*node) {
                    let d = &self.nodes[l.group].devices;
                    if d.opcua > 0 || d.mqtt > 0 {
                        errs.push(format!(
                            "{p}.clock: virtual time needs devices reachable over in-memory streams; node {node} (nodes[{}]) has OPC UA or MQTT devices, only Modbus supports in-memory transport (set nodes[{}].devices.opcua and .mqtt to 0 or use clock = \"real\")",
                            l.group, l.group
                        ));
                    }
                }
                if virtual_nodes.iter().filter(|(n, _)| n == node).count() > 1 {
                    errs.push(format!(
                        "{p}.node: node {node} has more than one virtual-time partition"
                    ));
                }
            }
        }
        for (i, f) in self.faults.iter().enumerate() {
            let node = match f {
                Fault::Partition {
                    clock: PartitionClock::Virtual,
                    ..
                }
                | Fault::BrokerRestart { .. }
                | Fault::Redeploy { .. } => continue,
                Fault::Partition { node, .. }
                | Fault::Latency { node, .. }
                | Fault::KillNode { node, .. }
                | Fault::DevicesDown { node, .. } => *node,
            };
            if virtual_nodes.iter().any(|(n, _)| *n == node) {
                errs.push(format!(
                    "faults[{i}].node: node {node} has a virtual-time partition; other faults on that node are not supported"
                ));
            }
        }
        if !virtual_nodes.is_empty() {
            for (i, f) in self.faults.iter().enumerate() {
                if matches!(f, Fault::BrokerRestart { .. } | Fault::Redeploy { .. }) {
                    errs.push(format!(
                        "faults[{i}].kind: not supported in a scenario with a virtual-time partition (it would reach the virtual node at an undefined virtual time)"
                    ));
                }
            }
        }
    }

    /// Nodes with a virtual-time partition, with the partition's duration.
    pub fn virtual_partitions(&self) -> Vec<(usize, Duration)> {
        self.faults
            .iter()
            .filter_map(|f| match f {
                Fault::Partition {
                    node,
                    duration,
                    clock: PartitionClock::Virtual,
                    ..
                } => Some((*node, *duration)),
                _ => None,
            })
            .collect()
    }

    /// Number of edge nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.iter().map(|g| g.count).sum()
    }

    /// Number of simulated devices.
    pub fn device_count(&self) -> usize {
        self.nodes
            .iter()
            .map(|g| g.count * (g.devices.modbus + g.devices.opcua + g.devices.mqtt))
            .sum()
    }

    /// Every node, in global index order.
    pub fn nodes(&self) -> Vec<NodeLayout> {
        let mut next: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        let mut out = Vec::new();
        for (gi, g) in self.nodes.iter().enumerate() {
            for _ in 0..g.count {
                let k = next.entry(g.prefix.as_str()).or_insert(0);
                *k += 1;
                out.push(NodeLayout {
                    index: out.len(),
                    name: format!("{}-{}", g.prefix, k),
                    group: gi,
                });
            }
        }
        out
    }

    /// The function a point slot of a device speaking `protocol` is routed
    /// through, if any.
    pub fn function_of(&self, slot: u32, protocol: Protocol) -> Option<&FunctionDef> {
        self.functions
            .iter()
            .find(|f| f.slots.contains(&slot) && f.protocols.contains(&protocol))
    }

    /// A one-paragraph human summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} nodes, {} devices, sampling {:?}, duration {:?}",
            self.name,
            self.node_count(),
            self.device_count(),
            self.sampling_interval,
            self.duration
        );
        for f in &self.functions {
            let _ = write!(
                s,
                ", {} {} on slots {:?}",
                f.guest.name(),
                f.config,
                f.slots
            );
            if f.protocols.len() < all_protocols().len() {
                let _ = write!(s, " of {:?}", f.protocols);
            }
        }
        if !self.faults.is_empty() {
            let _ = write!(s, ", {} faults", self.faults.len());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
duration = "10s"
[[nodes]]
count = 2
devices = { modbus = 3, opcua = 1 }
[[signals]]
base = { shape = "sine", amplitude = 1.0, period_s = 10.0 }
[[functions]]
name = "db"
guest = "deadband"
config = "deadband=0.1"
slots = [0, 1]
max_error = 0.1
[[faults]]
kind = "partition"
at = "2s"
duration = "3s"
node = 1
"#;

    #[test]
    fn parses_and_lays_out() {
        let s = Scenario::from_toml(MINIMAL, "t.toml").unwrap();
        assert_eq!(s.node_count(), 2);
        assert_eq!(s.device_count(), 8);
        let n = s.nodes();
        assert_eq!(n[1].name, "edge-2");
        assert_eq!(s.function_of(1, Protocol::Mqtt).unwrap().name, "db");
        assert!(s.function_of(2, Protocol::Modbus).is_none());
    }

    #[test]
    fn functions_can_be_scoped_to_protocols() {
        let scoped = MINIMAL.replace(
            "[[faults]]",
            "[[functions]]\nname = \"sd\"\nguest = \"swinging-door\"\nconfig = \"deviation=0.1\"\nslots = [2]\nprotocols = [\"opcua\", \"mqtt\"]\nmax_error = 0.1\n[[faults]]",
        );
        let s = Scenario::from_toml(&scoped, "t.toml").unwrap();
        assert_eq!(s.function_of(2, Protocol::Opcua).unwrap().name, "sd");
        assert!(s.function_of(2, Protocol::Modbus).is_none());
        assert_eq!(s.function_of(0, Protocol::Modbus).unwrap().name, "db");
        // The same slot of the same protocol cannot go to two functions.
        let clash = scoped.replace("slots = [2]", "slots = [1]");
        let err = Scenario::from_toml(&clash, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "functions[1].slots[0]: slot 1 of Opcua devices is already routed to functions[0]"
            ),
            "{err}"
        );
        let none = scoped.replace("protocols = [\"opcua\", \"mqtt\"]", "protocols = []");
        let err = Scenario::from_toml(&none, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("functions[1].protocols"), "{err}");
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = MINIMAL.replace("modbus = 3", "modbuss = 3");
        let err = Scenario::from_toml(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nodes[0].devices"), "{err}");
        assert!(err.contains("modbuss"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_path() {
        let text = MINIMAL
            .replace("node = 1", "node = 7")
            .replace("slots = [0, 1]", "slots = [0, 9]")
            .replace(
                "opcua = 1",
                "opcua = 1, mqtt = 2, mqtt_devices_per_client = 0",
            );
        let err = Scenario::from_toml(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("faults[0].node: 7 is out of range"), "{err}");
        assert!(err.contains("functions[0].slots[1]"), "{err}");
        assert!(
            err.contains("nodes[0].devices.mqtt_devices_per_client"),
            "{err}"
        );
    }

    #[test]
    fn virtual_partition_parses_and_is_checked() {
        let text = MINIMAL.replace("node = 1", "node = 1\nclock = \"virtual\"");
        let err = Scenario::from_toml(&text, "t.toml")
            .unwrap_err()
            .to_string();
        // The nodes have an OPC UA device: no in-memory transport for it.
        assert!(err.contains("faults[0].clock: virtual time needs"), "{err}");
        let ok = text.replace("opcua = 1", "opcua = 0");
        let s = Scenario::from_toml(&ok, "t.toml").unwrap();
        assert_eq!(s.virtual_partitions(), vec![(1, Duration::from_secs(3))]);
        let bad = ok.replace(
            "clock = \"virtual\"",
            "clock = \"virtual\"\nmode = \"blackhole\"",
        );
        let err = Scenario::from_toml(&bad, "t.toml").unwrap_err().to_string();
        assert!(err.contains("faults[0].mode"), "{err}");
        let typo = ok.replace("clock = \"virtual\"", "clock = \"virtua\"");
        let err = Scenario::from_toml(&typo, "t.toml")
            .unwrap_err()
            .to_string();
        // Fault kinds are an internally tagged enum: the path stops at the
        // fault, the message names the bad value.
        assert!(err.contains("faults[0]") && err.contains("virtua"), "{err}");
        let unknown = ok.replace("clock = \"virtual\"", "clok = \"virtual\"");
        let err = Scenario::from_toml(&unknown, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("faults[0]") && err.contains("clok"), "{err}");
        let other = format!(
            "{ok}\n[[faults]]\nkind = \"kill-node\"\nat = \"1s\"\nnode = 1\ndown = \"1s\"\n"
        );
        let err = Scenario::from_toml(&other, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("faults[1].node: node 1 has a virtual-time"),
            "{err}"
        );
    }

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(
            n >= 4,
            "expected the shipped scenarios in {}",
            dir.display()
        );
    }
}
