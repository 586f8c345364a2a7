//! Capabilities the embedder provides: the traits behind the guest imports.
//!
//! `device-runtime` knows no sled, Modbus or OPC UA client. The edge-node
//! implements these traits over its store and drivers and passes them in a
//! [`Capabilities`] bundle. The host checks grants *before* calling them, so
//! an implementation only ever sees requests the function is allowed to make.
//!
//! In-memory implementations for tests live in [`crate::memory`].

use std::fmt;
use std::sync::Arc;

use crate::spec::PointRef;

/// Why a capability call failed, as the embedder reports it. Mapped onto the
/// WIT `capability-error` the guest sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// The thing asked for does not exist (unknown model, node or key space).
    #[error("not found")]
    NotFound,
    /// The backing device or store failed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request or its answer is larger than the embedder allows.
    #[error("too large")]
    TooLarge,
}

/// A sample read from a single point or node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointValue {
    /// Source timestamp, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Engineering value.
    pub value: f64,
    /// 0 good, 1 uncertain, 2 bad.
    pub quality: u8,
}

/// Modbus register table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegisterKind {
    /// Holding registers (function code 3).
    Holding,
    /// Input registers (function code 4).
    Input,
}

/// Persistent key-value store, one namespace per function name.
///
/// # Invariants
/// Namespaces are disjoint: the host always passes the calling function's
/// name, so a function can never see another function's keys.
pub trait KvStore: Send + Sync {
    /// Value of `key` in `namespace`, `None` if absent.
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, CapabilityError>;
    /// Stores `value` under `key`.
    fn put(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), CapabilityError>;
    /// Removes `key`; absent keys are not an error.
    fn delete(&self, namespace: &str, key: &str) -> Result<(), CapabilityError>;
}

/// Model bytes pushed over the air, by name.
pub trait ModelSource: Send + Sync {
    /// Bytes of model `name`.
    fn read_model(&self, name: &str) -> Result<Vec<u8>, CapabilityError>;
}

/// Reads from field devices through the edge-node's drivers.
pub trait DeviceReader: Send + Sync {
    /// Latest value of a declared point.
    fn read_point(&self, point: &PointRef) -> Result<PointValue, CapabilityError>;
    /// Raw Modbus registers.
    fn read_registers(
        &self,
        device: &str,
        kind: RegisterKind,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, CapabilityError>;
    /// Numeric value of an OPC UA node.
    fn read_node(&self, device: &str, node_id: &str) -> Result<f64, CapabilityError>;
}

/// The capability implementations shared by all functions of a runtime.
#[derive(Clone)]
pub struct Capabilities {
    /// Backs the `kv` interface.
    pub kv: Arc<dyn KvStore>,
    /// Backs the `models` interface.
    pub models: Arc<dyn ModelSource>,
    /// Backs the `points` and `devices` interfaces.
    pub devices: Arc<dyn DeviceReader>,
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capabilities").finish_non_exhaustive()
    }
}
