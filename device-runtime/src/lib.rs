//! `device-runtime`: the wasmtime host for edgefleet WASM device functions.
//!
//! It owns the WIT world (`wit/device.wit`, package `edgefleet:device@0.1.0`),
//! the engine configuration (pooling allocator, fuel, epoch watchdog,
//! compiled-code disk cache), the capability imports with their grant
//! checks, the function lifecycle (load, hot swap, remove, restart with
//! backoff) and the reference guests in `guests/`.
//!
//! It knows no MQTT, sled, Modbus or OPC UA: the embedder (edge-node)
//! implements [`KvStore`], [`ModelSource`] and [`DeviceReader`], describes
//! each function as a [`FunctionSpec`], and forwards the [`CallOutput`]s it
//! gets back.
//!
//! Start with [`DeviceRuntime`]: `new` → `apply` → `process` / `tick` →
//! `drain_events` / `status`.

mod backoff;
pub mod bindings;
mod budget;
mod cache;
mod capability;
mod engine;
mod error;
mod host;
mod instance;
pub mod memory;
mod runtime;
mod spec;
mod throttle;

pub use backoff::{Backoff, BackoffConfig};
pub use bindings::edgefleet::device::types::Batch;
pub use budget::CpuBudget;
pub use cache::{CacheLimits, CacheStats};
pub use capability::{
    Capabilities, CapabilityError, DeviceReader, KvStore, ModelSource, PointValue, RegisterKind,
};
pub use engine::{PoolConfig, RuntimeConfig};
pub use error::{BoxError, CallError, LoadError, RuntimeError};
pub use host::Denial;
pub use runtime::{
    ApplyReport, CallOutput, DeviceRuntime, FunctionState, FunctionStatus, ModuleSource,
    RuntimeEvent, StreamOutput,
};
pub use spec::{FunctionSpec, Limits, PointRef, digest_hex};
pub use throttle::LogLimits;

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty batch with room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            points: Vec::with_capacity(n),
            timestamps: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
            qualities: Vec::with_capacity(n),
        }
    }

    /// Number of samples (length of the `points` column).
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Appends one sample.
    pub fn push(&mut self, point: u32, timestamp_ms: u64, value: f64, quality: u8) {
        self.points.push(point);
        self.timestamps.push(timestamp_ms);
        self.values.push(value);
        self.qualities.push(quality);
    }

    /// Removes all samples, keeping capacity.
    pub fn clear(&mut self) {
        self.points.clear();
        self.timestamps.clear();
        self.values.clear();
        self.qualities.clear();
    }

    /// Moves all samples of `other` to the end of `self`.
    pub fn append(&mut self, mut other: Batch) {
        if self.is_empty() {
            *self = other;
            return;
        }
        self.points.append(&mut other.points);
        self.timestamps.append(&mut other.timestamps);
        self.values.append(&mut other.values);
        self.qualities.append(&mut other.qualities);
    }

    /// Sample `i` as `(point, timestamp, value, quality)`.
    pub fn get(&self, i: usize) -> Option<(u32, u64, f64, u8)> {
        Some((
            *self.points.get(i)?,
            *self.timestamps.get(i)?,
            *self.values.get(i)?,
            *self.qualities.get(i)?,
        ))
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

// The edge-node moves the runtime into a dedicated (blocking) task.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<DeviceRuntime>();
};
