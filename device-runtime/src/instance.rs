//! One running function: a `Store`, its instance and typed calls into it.

use std::sync::Arc;

use wasmtime::Store;
use wasmtime::Trap;

use crate::Batch;
use crate::bindings::{DeviceFunction, DeviceFunctionPre};
use crate::capability::Capabilities;
use crate::error::{CallError, LoadError, boxed};
use crate::host::{Denial, Fault, HostState};
use crate::spec::FunctionSpec;
use crate::throttle::LogLimits;

/// Samples one call emitted, per declared output stream (empty streams
/// included, in stream-index order).
pub(crate) type Emitted = Vec<Batch>;

/// A live instance. Dropping it returns its slot to the pool.
///
/// # Invariants
/// After any call returns an error with [`CallError::is_fatal`], the instance
/// must not be called again (a trapped component instance is poisoned).
pub(crate) struct Instance {
    store: Store<HostState>,
    bindings: DeviceFunction,
    epoch_ticks: u64,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("function", &self.store.data().spec.name)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Instantiates from `pre` in a fresh store and runs `init(config)` at
    /// `now_ms`.
    pub(crate) fn start(
        pre: &DeviceFunctionPre<HostState>,
        spec: &Arc<FunctionSpec>,
        caps: &Capabilities,
        epoch_tick: std::time::Duration,
        log: LogLimits,
        now_ms: u64,
    ) -> Result<Self, LoadError> {
        let engine = pre.engine();
        let state = HostState::new(spec.clone(), caps.clone(), log, now_ms);
        let mut store = Store::new(engine, state);
        store.limiter(|state| state);
        let tick_ms = epoch_tick.as_millis().max(1);
        let epoch_ticks = u64::try_from(spec.limits.epoch_deadline.as_millis().div_ceil(tick_ms))
            .unwrap_or(u64::MAX);
        let epoch_ticks = epoch_ticks.max(1);
        // Instantiation can run a start function: give it the per-call budget.
        arm(&mut store, spec, epoch_ticks).map_err(|e| LoadError::Instantiate(boxed(e)))?;
        let bindings = pre
            .instantiate(&mut store)
            .map_err(|e| LoadError::Instantiate(boxed(e)))?;
        let mut instance = Self {
            store,
            bindings,
            epoch_ticks,
        };
        instance.init().map_err(LoadError::Init)?;
        Ok(instance)
    }

    fn init(&mut self) -> Result<(), CallError> {
        self.begin()?;
        let spec = self.store.data().spec.clone();
        let result = self.bindings.call_init(&mut self.store, &spec.config);
        self.finish(result).map(|_| ())
    }

    /// Calls `process(batch)`.
    pub(crate) fn process(&mut self, batch: &Batch) -> Result<Emitted, CallError> {
        self.begin()?;
        let result = self.bindings.call_process(&mut self.store, batch);
        self.finish(result)
    }

    /// Calls `tick(now)`.
    pub(crate) fn tick(&mut self, now_ms: u64) -> Result<Emitted, CallError> {
        self.begin()?;
        let result = self.bindings.call_tick(&mut self.store, now_ms);
        self.finish(result)
    }

    /// Calls `flush()`.
    pub(crate) fn flush(&mut self) -> Result<Emitted, CallError> {
        self.begin()?;
        let result = self.bindings.call_flush(&mut self.store);
        self.finish(result)
    }

    /// Counter increments since the last call to this method.
    pub(crate) fn take_counters(&mut self) -> std::collections::BTreeMap<String, u64> {
        std::mem::take(&mut self.store.data_mut().counters)
    }

    /// Sets the embedder's time for the next calls (the log rate limit).
    pub(crate) fn set_now(&mut self, now_ms: u64) {
        self.store.data_mut().now_ms = now_ms;
    }

    /// Log lines dropped by the rate limit since the last call to this method.
    pub(crate) fn take_log_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.store.data_mut().log_dropped)
    }

    /// Refused capability requests since the last call to this method.
    pub(crate) fn take_denials(&mut self) -> Vec<Denial> {
        std::mem::take(&mut self.store.data_mut().denials)
    }

    fn begin(&mut self) -> Result<(), CallError> {
        self.store.data_mut().begin_call();
        let spec = self.store.data().spec.clone();
        arm(&mut self.store, &spec, self.epoch_ticks).map_err(|e| CallError::Trap(boxed(e)))
    }

    fn finish(
        &mut self,
        result: wasmtime::Result<Result<(), String>>,
    ) -> Result<Emitted, CallError> {
        let fault = self.store.data_mut().fault.take();
        match result {
            Ok(Ok(())) => {
                let streams = self.store.data().spec.outputs.len();
                let emitted = std::mem::replace(
                    &mut self.store.data_mut().emitted,
                    vec![Batch::new(); streams],
                );
                Ok(emitted)
            }
            Ok(Err(message)) => Err(CallError::Guest(message)),
            Err(err) => Err(classify(err, fault, &self.store.data().spec)),
        }
    }
}

/// Sets the fuel budget and epoch deadline for the next call.
fn arm(
    store: &mut Store<HostState>,
    spec: &FunctionSpec,
    epoch_ticks: u64,
) -> wasmtime::Result<()> {
    store.set_fuel(spec.limits.fuel_per_call.unwrap_or(u64::MAX))?;
    store.set_epoch_deadline(epoch_ticks);
    store.epoch_deadline_trap();
    Ok(())
}

fn classify(err: wasmtime::Error, fault: Option<Fault>, spec: &FunctionSpec) -> CallError {
    match fault {
        Some(Fault::Memory { limit, requested }) => {
            return CallError::MemoryLimit {
                limit,
                requested,
                source: boxed(err),
            };
        }
        Some(Fault::OversizedEmit { limit, attempted }) => {
            return CallError::OversizedEmit {
                limit,
                attempted,
                source: boxed(err),
            };
        }
        Some(Fault::MalformedEmit(reason)) => {
            return CallError::MalformedEmit {
                reason,
                source: boxed(err),
            };
        }
        None => {}
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => CallError::OutOfFuel {
            fuel: spec.limits.fuel_per_call.unwrap_or(u64::MAX),
            source: boxed(err),
        },
        Some(Trap::Interrupt) => CallError::Timeout {
            deadline: spec.limits.epoch_deadline,
            source: boxed(err),
        },
        _ => CallError::Trap(boxed(err)),
    }
}
