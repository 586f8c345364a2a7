//! What to run: the plain-Rust description of one device function.
//!
//! The edge-node maps its desired-state types onto [`FunctionSpec`]; this
//! crate never sees the wire format.

use std::collections::BTreeSet;
use std::time::Duration;

/// A point the function declares as input. Its position in
/// [`FunctionSpec::points`] is the `u32` point index used in batches and by
/// the `points.read-point` import.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointRef {
    /// Device id as named by the desired state.
    pub device: String,
    /// Point id within the device.
    pub point: String,
}

impl PointRef {
    /// Convenience constructor.
    pub fn new(device: impl Into<String>, point: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            point: point.into(),
        }
    }
}

/// Per-instance resource limits. Every call (`init`, `process`, `tick`) gets
/// a fresh fuel budget and a fresh epoch deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Cap on the guest's linear memory, in bytes. Growing beyond it traps
    /// with [`CallError::MemoryLimit`](crate::CallError::MemoryLimit). Must
    /// not exceed [`PoolConfig::max_memory_bytes`](crate::PoolConfig).
    ///
    /// Size it for the largest batch: the input batch is copied into guest
    /// memory (21 bytes per sample) and the reference guests buffer their
    /// output the same way, so allow about 50 bytes per sample of the
    /// largest batch plus per-point state. The 16 MiB default fits batches
    /// of about 300 000 samples.
    pub memory_bytes: u64,
    /// Fuel (roughly: wasm instructions) per call; `None` means unlimited
    /// (the epoch deadline still applies).
    pub fuel_per_call: Option<u64>,
    /// Wall-clock budget per call, enforced by the epoch watchdog with the
    /// granularity of [`RuntimeConfig::epoch_tick`](crate::RuntimeConfig).
    pub epoch_deadline: Duration,
    /// Maximum number of samples one call may emit, over all streams.
    pub max_emit_samples: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 16 << 20,
            fuel_per_call: Some(2_000_000_000),
            epoch_deadline: Duration::from_millis(500),
            max_emit_samples: 1 << 20,
        }
    }
}

/// Everything the host needs to run one device function.
///
/// Two specs with the same `name` but any other field different describe two
/// versions of the function: applying the new one hot-swaps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    /// Unique name on this node; also the key-value namespace.
    pub name: String,
    /// sha256 of the component bytes, lowercase hex.
    pub module_digest: String,
    /// Passed verbatim to the guest's `init`.
    pub config: String,
    /// Declared input points, in point-index order.
    pub points: Vec<PointRef>,
    /// Devices the function may read raw (Modbus registers, OPC UA nodes).
    /// Empty: the `devices` interface is not linked at all.
    pub devices: BTreeSet<String>,
    /// Output stream names, in stream-index order.
    pub outputs: Vec<String>,
    /// Whether the `kv` interface is linked.
    pub kv: bool,
    /// Models the function may read. Empty: `models` is not linked.
    pub models: BTreeSet<String>,
    /// Resource limits.
    pub limits: Limits,
}

impl FunctionSpec {
    /// A spec with no grants beyond the always-linked interfaces, one output
    /// stream named `out` and default limits.
    pub fn new(
        name: impl Into<String>,
        module_digest: impl Into<String>,
        config: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            module_digest: module_digest.into(),
            config: config.into(),
            points: Vec::new(),
            devices: BTreeSet::new(),
            outputs: vec!["out".to_owned()],
            kv: false,
            models: BTreeSet::new(),
            limits: Limits::default(),
        }
    }
}

/// sha256 of `bytes` as lowercase hex, the form [`FunctionSpec::module_digest`] uses.
pub fn digest_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}
