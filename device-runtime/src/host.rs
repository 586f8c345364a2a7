//! Per-instance host state: the capability imports the guest calls, with
//! grant checks, the emit buffer and the memory limiter.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::ResourceLimiter;

use crate::Batch;
use crate::bindings::edgefleet::device::{
    devices, kv, log, metrics, models, output, points, types,
};
use crate::capability::{Capabilities, CapabilityError, RegisterKind};
use crate::spec::FunctionSpec;
use crate::throttle::{LogLimits, LogThrottle, Verdict};

/// Longest log message kept; longer ones are truncated.
const MAX_LOG_BYTES: usize = 4096;
/// Largest kv value a guest may store.
const MAX_KV_VALUE_BYTES: usize = 1 << 20;
/// Longest kv key.
const MAX_KV_KEY_BYTES: usize = 256;
/// Distinct counter names per function; further names are ignored.
const MAX_COUNTERS: usize = 256;
/// Registers per raw read (Modbus allows 125 per request; drivers may batch).
const MAX_REGISTERS: u16 = 2000;
/// Table elements any guest table may grow to.
const MAX_TABLE_ELEMENTS: usize = 20_000;

/// A fault the host detected inside a call; it turns the call's trap into
/// the matching [`CallError`](crate::CallError) variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Fault {
    /// Memory growth beyond the cap.
    #[error("memory growth to {requested} bytes exceeds cap {limit}")]
    Memory {
        /// Cap.
        limit: u64,
        /// Requested size.
        requested: u64,
    },
    /// Too many samples emitted in one call.
    #[error("emitted {attempted} samples, limit {limit}")]
    OversizedEmit {
        /// Limit.
        limit: usize,
        /// Attempted total.
        attempted: usize,
    },
    /// Ill-formed emit.
    #[error("malformed emit: {0}")]
    MalformedEmit(String),
}

/// A capability request the host refused because it was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Interface and function, e.g. `devices.read-registers`.
    pub call: &'static str,
    /// What was asked for (device, point index, model name, stream).
    pub target: String,
}

/// Data of one function instance's `Store`.
pub(crate) struct HostState {
    pub(crate) spec: Arc<FunctionSpec>,
    caps: Capabilities,
    /// Emitted samples of the current call, one batch per declared stream.
    pub(crate) emitted: Vec<Batch>,
    pub(crate) emitted_samples: usize,
    pub(crate) fault: Option<Fault>,
    pub(crate) counters: BTreeMap<String, u64>,
    pub(crate) denials: Vec<Denial>,
    /// The embedder's time of the current call (for the log rate limit).
    pub(crate) now_ms: u64,
    log: LogThrottle,
    /// Log lines dropped by the rate limit since last taken.
    pub(crate) log_dropped: u64,
    /// Bytes of all the instance's linear memories together (a component
    /// may have more than one; the cap applies to their sum).
    memory_total: u64,
    /// Bytes the last permitted growth added (undone if it then failed).
    last_growth: u64,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("function", &self.spec.name)
            .field("emitted_samples", &self.emitted_samples)
            .field("fault", &self.fault)
            .finish_non_exhaustive()
    }
}

impl HostState {
    pub(crate) fn new(
        spec: Arc<FunctionSpec>,
        caps: Capabilities,
        log: LogLimits,
        now_ms: u64,
    ) -> Self {
        let emitted = vec![Batch::new(); spec.outputs.len()];
        Self {
            spec,
            caps,
            emitted,
            emitted_samples: 0,
            fault: None,
            counters: BTreeMap::new(),
            denials: Vec::new(),
            now_ms,
            log: LogThrottle::new(log, now_ms),
            log_dropped: 0,
            memory_total: 0,
            last_growth: 0,
        }
    }

    /// Clears per-call state before a call.
    pub(crate) fn begin_call(&mut self) {
        for batch in &mut self.emitted {
            batch.clear();
        }
        self.emitted_samples = 0;
        self.fault = None;
    }

    fn deny(&mut self, call: &'static str, target: impl Into<String>) -> types::CapabilityError {
        let target = target.into();
        tracing::warn!(function = %self.spec.name, call, %target, "capability denied");
        self.denials.push(Denial { call, target });
        types::CapabilityError::NotGranted
    }

    fn fail(&mut self, fault: Fault) -> wasmtime::Error {
        self.fault = Some(fault.clone());
        wasmtime::Error::new(fault)
    }
}

fn to_wit(err: CapabilityError) -> types::CapabilityError {
    match err {
        CapabilityError::NotFound => types::CapabilityError::NotFound,
        CapabilityError::Unavailable(msg) => types::CapabilityError::Unavailable(msg),
        CapabilityError::TooLarge => types::CapabilityError::TooLarge,
    }
}

type CapResult<T> = wasmtime::Result<Result<T, types::CapabilityError>>;

impl types::Host for HostState {}

impl points::Host for HostState {
    fn read_point(&mut self, point: u32) -> CapResult<types::Sample> {
        let Some(point_ref) = usize::try_from(point)
            .ok()
            .and_then(|i| self.spec.points.get(i))
            .cloned()
        else {
            return Ok(Err(self.deny("points.read-point", point.to_string())));
        };
        Ok(self
            .caps
            .devices
            .read_point(&point_ref)
            .map(|v| types::Sample {
                timestamp: v.timestamp_ms,
                value: v.value,
                quality: v.quality,
            })
            .map_err(to_wit))
    }
}

impl devices::Host for HostState {
    fn read_registers(
        &mut self,
        device: String,
        kind: devices::RegisterKind,
        address: u16,
        count: u16,
    ) -> CapResult<Vec<u16>> {
        if !self.spec.devices.contains(&device) {
            return Ok(Err(self.deny("devices.read-registers", device)));
        }
        if count > MAX_REGISTERS {
            return Ok(Err(types::CapabilityError::TooLarge));
        }
        let kind = match kind {
            devices::RegisterKind::Holding => RegisterKind::Holding,
            devices::RegisterKind::Input => RegisterKind::Input,
        };
        Ok(self
            .caps
            .devices
            .read_registers(&device, kind, address, count)
            .map_err(to_wit))
    }

    fn read_node(&mut self, device: String, node_id: String) -> CapResult<f64> {
        if !self.spec.devices.contains(&device) {
            return Ok(Err(self.deny("devices.read-node", device)));
        }
        Ok(self
            .caps
            .devices
            .read_node(&device, &node_id)
            .map_err(to_wit))
    }
}

impl output::Host for HostState {
    fn emit(&mut self, stream: u32, samples: types::Batch) -> CapResult<()> {
        let n = samples.points.len();
        if samples.timestamps.len() != n
            || samples.values.len() != n
            || samples.qualities.len() != n
        {
            let reason = format!(
                "column lengths differ: points {n}, timestamps {}, values {}, qualities {}",
                samples.timestamps.len(),
                samples.values.len(),
                samples.qualities.len()
            );
            return Err(self.fail(Fault::MalformedEmit(reason)));
        }
        let Some(index) = usize::try_from(stream)
            .ok()
            .filter(|&i| i < self.emitted.len())
        else {
            return Ok(Err(self.deny("output.emit", format!("stream {stream}"))));
        };
        let attempted = self.emitted_samples.saturating_add(n);
        let limit = self.spec.limits.max_emit_samples;
        if attempted > limit {
            return Err(self.fail(Fault::OversizedEmit { limit, attempted }));
        }
        self.emitted_samples = attempted;
        if let Some(out) = self.emitted.get_mut(index) {
            out.append(samples);
        }
        Ok(Ok(()))
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> CapResult<Option<Vec<u8>>> {
        if key.len() > MAX_KV_KEY_BYTES {
            return Ok(Err(types::CapabilityError::TooLarge));
        }
        Ok(self.caps.kv.get(&self.spec.name, &key).map_err(to_wit))
    }

    fn put(&mut self, key: String, value: Vec<u8>) -> CapResult<()> {
        if key.len() > MAX_KV_KEY_BYTES || value.len() > MAX_KV_VALUE_BYTES {
            return Ok(Err(types::CapabilityError::TooLarge));
        }
        Ok(self
            .caps
            .kv
            .put(&self.spec.name, &key, &value)
            .map_err(to_wit))
    }

    fn delete(&mut self, key: String) -> CapResult<()> {
        if key.len() > MAX_KV_KEY_BYTES {
            return Ok(Err(types::CapabilityError::TooLarge));
        }
        Ok(self.caps.kv.delete(&self.spec.name, &key).map_err(to_wit))
    }
}

impl models::Host for HostState {
    fn read_model(&mut self, name: String) -> CapResult<Vec<u8>> {
        if !self.spec.models.contains(&name) {
            return Ok(Err(self.deny("models.read-model", name)));
        }
        Ok(self.caps.models.read_model(&name).map_err(to_wit))
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, mut message: String) -> wasmtime::Result<()> {
        if message.len() > MAX_LOG_BYTES {
            let mut end = MAX_LOG_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let function = self.spec.name.as_str();
        match self.log.admit(self.now_ms) {
            Verdict::Drop => {
                self.log_dropped += 1;
                return Ok(());
            }
            Verdict::Pass { dropped_before } if dropped_before > 0 => {
                tracing::warn!(
                    function,
                    dropped = dropped_before,
                    "{dropped_before} log lines dropped (guest log rate limit)"
                );
            }
            Verdict::Pass { .. } => {}
        }
        match level {
            log::Level::Trace => tracing::trace!(function, "{message}"),
            log::Level::Debug => tracing::debug!(function, "{message}"),
            log::Level::Info => tracing::info!(function, "{message}"),
            log::Level::Warn => tracing::warn!(function, "{message}"),
            log::Level::Error => tracing::error!(function, "{message}"),
        }
        Ok(())
    }
}

impl metrics::Host for HostState {
    fn counter_add(&mut self, name: String, delta: u64) -> wasmtime::Result<()> {
        if let Some(value) = self.counters.get_mut(&name) {
            *value = value.saturating_add(delta);
        } else if self.counters.len() < MAX_COUNTERS && name.len() <= MAX_KV_KEY_BYTES {
            self.counters.insert(name, delta);
        }
        Ok(())
    }
}

/// The memory cap applies to the sum of all linear memories of an instance:
/// wasmtime calls `memory_growing` when each memory is created (from 0) and
/// on every growth, so the sum of the growths is the total.
impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = self.spec.limits.memory_bytes;
        let growth = u64::try_from(desired.saturating_sub(current)).unwrap_or(u64::MAX);
        let requested = self.memory_total.saturating_add(growth);
        if requested > limit {
            return Err(self.fail(Fault::Memory { limit, requested }));
        }
        self.memory_total = requested;
        self.last_growth = growth;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_total = self.memory_total.saturating_sub(self.last_growth);
        self.last_growth = 0;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
