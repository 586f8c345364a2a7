//! Desired state: what the hub wants one edge node to run.
//!
//! The hub renders one [`DesiredState`] per node, signs it (see
//! [`crate::signing`]) and publishes it retained on the node's `desired` topic.
//! Revisions are monotonic per node: an edge node refuses a revision that is not
//! greater than the one it has applied. Large blobs (WASM modules, models) are
//! named by sha256 digest only; the edge downloads them separately.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::limits;
use crate::validate::{Collector, Path, ValidationErrors, check_name};

/// Everything an edge node should run, at one revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// The node this document is for.
    pub node: String,
    /// Monotonic per node, starting at 1.
    pub revision: u64,
    /// WASM device functions.
    #[serde(default)]
    pub functions: Vec<FunctionSpec>,
    /// Devices and their points.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// Models (opaque blobs) functions may read by name.
    #[serde(default)]
    pub models: Vec<ModelRef>,
    /// Node-wide settings.
    #[serde(default)]
    pub config: NodeConfig,
}

/// A WASM device function to run on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Unique per node.
    pub name: String,
    /// sha256 (lower-case hex) of the component.
    pub module_sha256: String,
    /// Size of the component in bytes.
    pub module_size: u64,
    /// Function-specific configuration, passed to the guest's `init` as JSON text.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Point indexes the function receives (and may read).
    pub inputs: Vec<u32>,
    /// Device ids whose raw registers / OPC UA nodes the function may read.
    #[serde(default)]
    pub granted_devices: Vec<String>,
    /// Model names the function may read.
    #[serde(default)]
    pub granted_models: Vec<String>,
    /// Streams the function may emit to.
    pub outputs: Vec<String>,
    /// Resource limits.
    #[serde(default)]
    pub limits: FunctionLimits,
}

/// Per-instance resource limits of a device function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct FunctionLimits {
    /// Linear memory cap in bytes.
    pub memory_bytes: u64,
    /// Fuel (roughly, wasm instructions) per call.
    pub fuel_per_call: u64,
    /// Wall-clock budget per call in milliseconds (epoch watchdog),
    /// 1..=[`limits::MAX_FUNCTION_DEADLINE_MS`] (1 s).
    pub deadline_ms: u64,
}

impl Default for FunctionLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 16 * 1024 * 1024,
            fuel_per_call: 500_000_000,
            deadline_ms: 1_000,
        }
    }
}

/// A model blob named by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Name functions use to read it.
    pub name: String,
    /// sha256 (lower-case hex).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Node-wide settings that travel with desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Largest telemetry batch, in samples.
    pub batch_max_samples: u32,
    /// Longest a sample waits before its batch is sent, in milliseconds.
    pub batch_max_age_ms: u64,
    /// Interval of reported-state updates, in milliseconds.
    pub report_interval_ms: u64,
    /// Samples of device data that are not routed through a function go to
    /// this stream (`None`: they are dropped after the functions saw them).
    pub raw_stream: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            batch_max_samples: 1_000,
            batch_max_age_ms: 1_000,
            report_interval_ms: 5_000,
            raw_stream: Some("raw".to_owned()),
        }
    }
}

impl DesiredState {
    /// Checks everything that parses but makes no sense. Errors name the field.
    #[expect(
        clippy::too_many_lines,
        reason = "one collector walks the whole document in field order, so every error is reported with its path in one pass; the per-section checks are short loops that read best in that order"
    )]
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector::new();
        let root = Path::Root;
        check_name(&mut c, &root.field("node"), &self.node);
        if self.revision == 0 {
            c.push(&root.field("revision"), "revisions start at 1");
        }
        for (field, n, max, name) in [
            (
                "devices",
                self.devices.len(),
                limits::MAX_DESIRED_DEVICES,
                "MAX_DESIRED_DEVICES",
            ),
            (
                "functions",
                self.functions.len(),
                limits::MAX_DESIRED_FUNCTIONS,
                "MAX_DESIRED_FUNCTIONS",
            ),
            (
                "models",
                self.models.len(),
                limits::MAX_DESIRED_MODELS,
                "MAX_DESIRED_MODELS",
            ),
        ] {
            if n > max {
                c.push(
                    &root.field(field),
                    format!("{n} entries, more than the limit of {max} (limits::{name})"),
                );
            }
        }
        let points: usize = self
            .devices
            .iter()
            .flat_map(|d| &d.groups)
            .map(|g| g.points.len())
            .sum();
        if points > limits::MAX_DESIRED_POINTS {
            c.push(
                &root.field("devices"),
                format!("{points} points in all, more than the limit of {} (limits::MAX_DESIRED_POINTS)", limits::MAX_DESIRED_POINTS),
            );
        }

        let devices = root.field("devices");
        let mut device_ids = BTreeSet::new();
        let mut point_indexes = BTreeMap::new();
        for (di, d) in self.devices.iter().enumerate() {
            let dp = devices.index(di);
            if !device_ids.insert(d.id.as_str()) {
                c.push(&dp.field("id"), format!("duplicate device id {:?}", d.id));
            }
            d.validate_at(&mut c, &dp);
            for (gi, g) in d.groups.iter().enumerate() {
                for (pi, p) in g.points.iter().enumerate() {
                    if let Some(first) = point_indexes.insert(p.index, (di, gi, pi)) {
                        let gp = dp.field("groups");
                        let gpi = gp.index(gi);
                        let pts = gpi.field("points");
                        let ppi = pts.index(pi);
                        c.push(
                            &ppi.field("index"),
                            format!(
                                "point index {} is already used by devices[{}].groups[{}].points[{}]",
                                p.index, first.0, first.1, first.2
                            ),
                        );
                    }
                }
            }
        }

        let models = root.field("models");
        let mut model_names = BTreeSet::new();
        for (mi, m) in self.models.iter().enumerate() {
            let mp = models.index(mi);
            check_name(&mut c, &mp.field("name"), &m.name);
            if !model_names.insert(m.name.as_str()) {
                c.push(
                    &mp.field("name"),
                    format!("duplicate model name {:?}", m.name),
                );
            }
            check_sha256(&mut c, &mp.field("sha256"), &m.sha256);
            if m.size > limits::MAX_ARTIFACT_BYTES {
                c.push(
                    &mp.field("size"),
                    format!(
                        "{} is more than {} (limits::MAX_ARTIFACT_BYTES)",
                        m.size,
                        limits::MAX_ARTIFACT_BYTES
                    ),
                );
            }
        }

        let functions = root.field("functions");
        let mut function_names = BTreeSet::new();
        for (fi, f) in self.functions.iter().enumerate() {
            let fp = functions.index(fi);
            check_name(&mut c, &fp.field("name"), &f.name);
            if !function_names.insert(f.name.as_str()) {
                c.push(
                    &fp.field("name"),
                    format!("duplicate function name {:?}", f.name),
                );
            }
            check_sha256(&mut c, &fp.field("module_sha256"), &f.module_sha256);
            if f.module_size == 0 || f.module_size > limits::MAX_ARTIFACT_BYTES {
                c.push(
                    &fp.field("module_size"),
                    format!(
                        "{} is out of range 1..={} (limits::MAX_ARTIFACT_BYTES)",
                        f.module_size,
                        limits::MAX_ARTIFACT_BYTES
                    ),
                );
            }
            let inputs = fp.field("inputs");
            for (ii, i) in f.inputs.iter().enumerate() {
                if !point_indexes.contains_key(i) {
                    c.push(
                        &inputs.index(ii),
                        format!("point index {i} is not defined by any device"),
                    );
                }
            }
            let gd = fp.field("granted_devices");
            for (gi, g) in f.granted_devices.iter().enumerate() {
                if !device_ids.contains(g.as_str()) {
                    c.push(&gd.index(gi), format!("device {g:?} is not defined"));
                }
            }
            let gm = fp.field("granted_models");
            for (gi, g) in f.granted_models.iter().enumerate() {
                if !model_names.contains(g.as_str()) {
                    c.push(&gm.index(gi), format!("model {g:?} is not defined"));
                }
            }
            let outs = fp.field("outputs");
            if f.outputs.is_empty() {
                c.push(&outs, "a function needs at least one output stream");
            }
            if f.outputs.len() > limits::MAX_FUNCTION_OUTPUTS {
                c.push(
                    &outs,
                    format!(
                        "{} streams, more than the limit of {} (limits::MAX_FUNCTION_OUTPUTS)",
                        f.outputs.len(),
                        limits::MAX_FUNCTION_OUTPUTS
                    ),
                );
            }
            for (oi, o) in f.outputs.iter().enumerate() {
                check_name(&mut c, &outs.index(oi), o);
            }
            let lp = fp.field("limits");
            if !(64 * 1024..=limits::MAX_FUNCTION_MEMORY_BYTES).contains(&f.limits.memory_bytes) {
                c.push(
                    &lp.field("memory_bytes"),
                    format!(
                        "{} is out of range 65536..={} (limits::MAX_FUNCTION_MEMORY_BYTES, the edge's instance pool)",
                        f.limits.memory_bytes,
                        limits::MAX_FUNCTION_MEMORY_BYTES
                    ),
                );
            }
            if !(1..=limits::MAX_FUEL_PER_CALL).contains(&f.limits.fuel_per_call) {
                c.push(
                    &lp.field("fuel_per_call"),
                    format!(
                        "{} is out of range 1..={} (limits::MAX_FUEL_PER_CALL)",
                        f.limits.fuel_per_call,
                        limits::MAX_FUEL_PER_CALL
                    ),
                );
            }
            if !(1..=limits::MAX_FUNCTION_DEADLINE_MS).contains(&f.limits.deadline_ms) {
                c.push(
                    &lp.field("deadline_ms"),
                    format!(
                        "{} is out of range 1..={} (limits::MAX_FUNCTION_DEADLINE_MS)",
                        f.limits.deadline_ms,
                        limits::MAX_FUNCTION_DEADLINE_MS
                    ),
                );
            }
        }

        let cp = root.field("config");
        if !(1..=100_000).contains(&self.config.batch_max_samples) {
            c.push(
                &cp.field("batch_max_samples"),
                format!(
                    "{} is out of range 1..=100000",
                    self.config.batch_max_samples
                ),
            );
        }
        if !(1..=3_600_000).contains(&self.config.batch_max_age_ms) {
            c.push(
                &cp.field("batch_max_age_ms"),
                format!(
                    "{} is out of range 1..=3600000",
                    self.config.batch_max_age_ms
                ),
            );
        }
        if !(100..=3_600_000).contains(&self.config.report_interval_ms) {
            c.push(
                &cp.field("report_interval_ms"),
                format!(
                    "{} is out of range 100..=3600000",
                    self.config.report_interval_ms
                ),
            );
        }
        if let Some(s) = &self.config.raw_stream {
            check_name(&mut c, &cp.field("raw_stream"), s);
        }
        c.finish()
    }

    /// All points of all devices, in document order.
    pub fn points(
        &self,
    ) -> impl Iterator<Item = (&Device, &crate::device::PointGroup, &crate::device::Point)> {
        self.devices.iter().flat_map(|d| {
            d.groups
                .iter()
                .flat_map(move |g| g.points.iter().map(move |p| (d, g, p)))
        })
    }
}

fn check_sha256(c: &mut Collector, path: &Path<'_>, value: &str) {
    if value.len() != 64
        || !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        c.push(
            path,
            format!("{value:?} is not a lower-case hex sha256 digest (64 characters)"),
        );
    }
}
