//! The function supervisor: loads, replaces and removes functions as the
//! desired state says, routes batches to them, and restarts crashed ones
//! with exponential backoff.
//!
//! All methods take `&mut self` and are synchronous: a batch is processed by
//! exactly one instance, and [`DeviceRuntime::apply`] switches versions
//! between two calls. That is what makes hot swap lossless — see
//! [`DeviceRuntime::apply`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Cache, Engine};

use crate::Batch;
use crate::backoff::Backoff;
use crate::bindings::DeviceFunctionPre;
use crate::bindings::edgefleet::device::{
    devices, kv, log, metrics, models, output, points, types,
};
use crate::budget::Throttle;
use crate::cache::{CacheStats, ComponentCache};
use crate::capability::Capabilities;
use crate::engine::{EpochTicker, RuntimeConfig, build_engine};
use crate::error::{BoxError, CallError, LoadError, RuntimeError, boxed};
use crate::host::HostState;
use crate::instance::{Emitted, Instance};
use crate::spec::{FunctionSpec, digest_hex};

/// WIT package prefix of every import this host can provide.
const PACKAGE: &str = "edgefleet:device/";
const VERSION: &str = "@0.1.0";

/// Where [`DeviceRuntime::apply`] gets component bytes from (the edge-node's
/// content-addressed artifact store).
pub trait ModuleSource {
    /// Bytes of the component with sha256 `digest` (lowercase hex).
    fn module_bytes(&self, digest: &str) -> Result<Vec<u8>, BoxError>;
}

impl<S: std::hash::BuildHasher> ModuleSource for HashMap<String, Vec<u8>, S> {
    fn module_bytes(&self, digest: &str) -> Result<Vec<u8>, BoxError> {
        self.get(digest)
            .cloned()
            .ok_or_else(|| format!("no module with digest {digest}").into())
    }
}

/// Samples emitted by one call, per output stream.
#[derive(Debug, Clone, PartialEq)]
pub struct CallOutput {
    /// Function name.
    pub function: String,
    /// Digest of the module version that produced the output.
    pub digest: String,
    /// One entry per declared output stream that received samples.
    pub streams: Vec<StreamOutput>,
}

impl CallOutput {
    /// Total samples over all streams.
    pub fn len(&self) -> usize {
        self.streams.iter().map(|s| s.samples.len()).sum()
    }

    /// Whether nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples of stream `name`, if any were emitted.
    pub fn stream(&self, name: &str) -> Option<&Batch> {
        self.streams
            .iter()
            .find(|s| s.stream == name)
            .map(|s| &s.samples)
    }
}

/// Samples emitted on one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOutput {
    /// Output stream name from [`FunctionSpec::outputs`].
    pub stream: String,
    /// The samples, in emit order.
    pub samples: Batch,
}

/// Lifecycle and health events, for the edge-node's `events` topic and
/// reported state. Drain them with [`DeviceRuntime::drain_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// A new function started.
    Loaded {
        /// Function name.
        function: String,
        /// Module digest.
        digest: String,
    },
    /// A function was hot-swapped to a new spec (module and/or config).
    Replaced {
        /// Function name.
        function: String,
        /// Old module digest.
        from: String,
        /// New module digest.
        to: String,
    },
    /// A function was removed.
    Removed {
        /// Function name.
        function: String,
        /// Module digest.
        digest: String,
    },
    /// Loading (or replacing) failed; a replaced function keeps running its
    /// old version.
    LoadFailed {
        /// Function name.
        function: String,
        /// Module digest that failed.
        digest: String,
        /// Error chain, rendered.
        error: String,
    },
    /// A call failed fatally; the instance was dropped and a restart is
    /// scheduled.
    Crashed {
        /// Function name.
        function: String,
        /// Module digest.
        digest: String,
        /// Error chain, rendered.
        error: String,
        /// Consecutive failures.
        failures: u32,
        /// When the restart is due (ms, caller's clock).
        restart_at_ms: u64,
    },
    /// A crashed function was restarted.
    Restarted {
        /// Function name.
        function: String,
        /// Consecutive failures before this restart.
        failures: u32,
    },
    /// A function overdrew its CPU budget ([`RuntimeConfig::cpu`]) and is
    /// held back: its calls return [`CallError::Unavailable`] until
    /// `until_ms`; the instance and its state stay.
    Throttled {
        /// Function name.
        function: String,
        /// Wall-clock time of the call that overdrew the budget (ms).
        call_ms: u64,
        /// Times it was held back so far.
        times: u64,
        /// When it is released (ms, caller's clock).
        until_ms: u64,
    },
    /// A function asked for something it was not granted.
    CapabilityDenied {
        /// Function name.
        function: String,
        /// Interface and function called.
        call: String,
        /// Device, point, model or stream asked for.
        target: String,
    },
}

/// What one [`DeviceRuntime::apply`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Functions started for the first time.
    pub loaded: Vec<String>,
    /// Functions hot-swapped to a new spec.
    pub replaced: Vec<String>,
    /// Functions removed.
    pub removed: Vec<String>,
    /// Functions whose spec did not change.
    pub unchanged: Vec<String>,
    /// Functions that failed to load; replaced ones keep the old version.
    pub failed: Vec<(String, LoadError)>,
    /// What outgoing versions emitted from `flush` before they were dropped.
    /// Forward it like any other output: it precedes everything the new
    /// version emits.
    pub flushed: Vec<CallOutput>,
}

/// Health of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionState {
    /// Instance is live.
    Running,
    /// Crashed; the next restart is due at `due_ms`.
    Restarting {
        /// When the restart is due.
        due_ms: u64,
        /// The error that caused it.
        last_error: String,
    },
    /// Live, but held back for overdrawing its CPU budget until `until_ms`.
    Throttled {
        /// When it is released.
        until_ms: u64,
        /// Consecutive overdraws.
        strikes: u32,
    },
}

/// Status of one function, for reported state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionStatus {
    /// Function name.
    pub name: String,
    /// Running module digest.
    pub digest: String,
    /// Health.
    pub state: FunctionState,
    /// Consecutive failures (0 when healthy for `reset_after`).
    pub failures: u32,
    /// Restarts since load.
    pub restarts: u64,
    /// Samples passed to `process`.
    pub samples_in: u64,
    /// Samples emitted.
    pub samples_out: u64,
    /// Capability requests refused.
    pub denied: u64,
    /// Guest log lines dropped by the rate limit ([`RuntimeConfig::log`](crate::RuntimeConfig)).
    pub log_dropped: u64,
    /// Times it was held back for overdrawing its CPU budget.
    pub throttled: u64,
    /// Guest counters (`metrics.counter-add`).
    pub counters: BTreeMap<String, u64>,
}

/// Whether a function has a live instance.
enum SlotState {
    /// Live; calls go to this instance.
    Running(Box<Instance>),
    /// Crashed; no instance until `due_ms`, then [`DeviceRuntime::ensure_running`]
    /// starts a fresh one from `Slot::pre`.
    Restarting { due_ms: u64, last_error: String },
}

/// One loaded function.
///
/// # Invariants
/// - `pre` was linked for exactly `spec` (its grants), so a restart needs no
///   new link and can never gain capabilities.
/// - A `Running` instance has never returned a fatal [`CallError`]; the
///   first fatal error moves the slot to `Restarting` and drops the
///   instance.
/// - Statistics (`samples_*`, `counters`, `restarts`) belong to the slot,
///   not the instance, so they survive restarts but restart on a hot swap.
struct Slot {
    spec: Arc<FunctionSpec>,
    pre: DeviceFunctionPre<HostState>,
    state: SlotState,
    backoff: Backoff,
    throttle: Throttle,
    restarts: u64,
    samples_in: u64,
    samples_out: u64,
    denied: u64,
    log_dropped: u64,
    counters: BTreeMap<String, u64>,
}

/// The wasmtime host for all device functions of one edge node.
///
/// Start here: [`DeviceRuntime::new`], then [`apply`](Self::apply) the
/// desired functions, feed batches with [`process`](Self::process), call
/// [`tick`](Self::tick) periodically (it also performs due restarts), and
/// publish [`drain_events`](Self::drain_events) and
/// [`status`](Self::status).
pub struct DeviceRuntime {
    engine: Engine,
    cache: Option<Cache>,
    config: RuntimeConfig,
    caps: Capabilities,
    components: ComponentCache,
    /// Module digests of the last two applied desired states (current,
    /// previous): pinned in the component cache.
    desired_digests: [HashSet<String>; 2],
    functions: BTreeMap<String, Slot>,
    events: Vec<RuntimeEvent>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for DeviceRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRuntime")
            .field("config", &self.config)
            .field("functions", &self.functions.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl DeviceRuntime {
    /// Builds the engine (pooling allocator, fuel, epochs, optional disk
    /// cache) and starts the epoch watchdog thread.
    pub fn new(config: RuntimeConfig, caps: Capabilities) -> Result<Self, RuntimeError> {
        let (engine, cache) = build_engine(&config)?;
        let ticker = EpochTicker::start(&engine, config.epoch_tick)?;
        Ok(Self {
            components: ComponentCache::new(config.component_cache),
            desired_digests: [HashSet::new(), HashSet::new()],
            engine,
            cache,
            config,
            caps,
            functions: BTreeMap::new(),
            events: Vec::new(),
            _ticker: ticker,
        })
    }

    /// The wasmtime engine (for benches and diagnostics).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiled-code cache hits and misses so far (`None` without a cache).
    pub fn cache_stats(&self) -> Option<(usize, usize)> {
        self.cache
            .as_ref()
            .map(|c| (c.cache_hits(), c.cache_misses()))
    }

    /// Statistics of the in-memory compiled-component cache.
    pub fn component_cache_stats(&self) -> CacheStats {
        self.components.stats()
    }

    /// Whether the component of `digest` is in the in-memory cache.
    pub fn is_component_cached(&self, digest: &str) -> bool {
        self.components.contains(digest)
    }

    /// Verifies `bytes` against `digest` and compiles them (or loads the
    /// compiled code from the disk cache). Compiled components are also kept
    /// in memory, keyed by digest, for later loads, within
    /// [`RuntimeConfig::component_cache`]; what neither the running
    /// functions nor the current or previous desired state use is evicted,
    /// least recently used first.
    pub fn compile(&mut self, digest: &str, bytes: &[u8]) -> Result<Component, LoadError> {
        if let Some(component) = self.components.get(digest) {
            return Ok(component.clone());
        }
        let actual = digest_hex(bytes);
        if !actual.eq_ignore_ascii_case(digest) {
            return Err(LoadError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        check_component_header(bytes)?;
        let component =
            Component::new(&self.engine, bytes).map_err(|e| LoadError::Malformed(boxed(e)))?;
        let pinned = self.pinned_digests();
        self.components.insert(digest, component.clone(), &pinned);
        Ok(component)
    }

    /// Digests the cache must keep: running functions' and those of the
    /// current and previous desired state.
    fn pinned_digests(&self) -> HashSet<String> {
        let mut pinned: HashSet<String> = self
            .functions
            .values()
            .map(|slot| slot.spec.module_digest.clone())
            .collect();
        for set in &self.desired_digests {
            pinned.extend(set.iter().cloned());
        }
        pinned
    }

    /// Makes the running set equal `desired`: loads new functions, hot-swaps
    /// changed ones, removes the rest. `now_ms` is the caller's clock.
    ///
    /// A replacement is built completely (compiled, linked, instantiated,
    /// `init` succeeded) before the old version is flushed and dropped; if it
    /// fails the old version keeps running. Because calls are serialised by
    /// `&mut self`, every batch is processed by exactly one version: none is
    /// lost or duplicated, and the old version's `flush` output (in
    /// [`ApplyReport::flushed`]) comes before the new version's first output.
    pub fn apply(
        &mut self,
        desired: &[FunctionSpec],
        modules: &dyn ModuleSource,
        now_ms: u64,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        let digests: HashSet<String> = desired.iter().map(|s| s.module_digest.clone()).collect();
        if digests != self.desired_digests[0] {
            let previous = std::mem::replace(&mut self.desired_digests[0], digests);
            self.desired_digests[1] = previous;
        }
        let wanted: HashSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
        let stale: Vec<String> = self
            .functions
            .keys()
            .filter(|name| !wanted.contains(name.as_str()))
            .cloned()
            .collect();
        for name in stale {
            if let Some(flushed) = self.remove(&name) {
                report.flushed.push(flushed);
            }
            report.removed.push(name);
        }
        for spec in desired {
            if self
                .functions
                .get(&spec.name)
                .is_some_and(|slot| *slot.spec == *spec)
            {
                report.unchanged.push(spec.name.clone());
                continue;
            }
            let replacing = self.functions.contains_key(&spec.name);
            let bytes = match modules.module_bytes(&spec.module_digest) {
                Ok(bytes) => bytes,
                Err(source) => {
                    let err = LoadError::ModuleUnavailable {
                        digest: spec.module_digest.clone(),
                        source,
                    };
                    self.load_failed(&spec.name, &spec.module_digest, &err);
                    report.failed.push((spec.name.clone(), err));
                    continue;
                }
            };
            match self.load(spec.clone(), &bytes, now_ms) {
                Ok(flushed) => {
                    if let Some(out) = flushed {
                        report.flushed.push(out);
                    }
                    if replacing {
                        report.replaced.push(spec.name.clone());
                    } else {
                        report.loaded.push(spec.name.clone());
                    }
                }
                Err(err) => report.failed.push((spec.name.clone(), err)),
            }
        }
        let pinned = self.pinned_digests();
        self.components.evict(&pinned);
        report
    }

    /// Loads `spec` from `bytes`, replacing a running function of the same
    /// name only once the new one has started. Returns what the old version
    /// emitted from `flush`, if there was an old version and it was running.
    pub fn load(
        &mut self,
        spec: FunctionSpec,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<Option<CallOutput>, LoadError> {
        let name = spec.name.clone();
        let digest = spec.module_digest.clone();
        let slot = match self.start_slot(spec, bytes, now_ms) {
            Ok(slot) => slot,
            Err(err) => {
                self.load_failed(&name, &digest, &err);
                return Err(err);
            }
        };
        let old = self.functions.insert(name.clone(), slot);
        let Some(old) = old else {
            tracing::info!(function = %name, %digest, "function loaded");
            self.events.push(RuntimeEvent::Loaded {
                function: name,
                digest,
            });
            return Ok(None);
        };
        tracing::info!(function = %name, from = %old.spec.module_digest, to = %digest, "function replaced");
        self.events.push(RuntimeEvent::Replaced {
            function: name,
            from: old.spec.module_digest.clone(),
            to: digest,
        });
        Ok(flush_slot(old))
    }

    /// Flushes and drops function `name`. Returns its flush output.
    pub fn remove(&mut self, name: &str) -> Option<CallOutput> {
        let slot = self.functions.remove(name)?;
        tracing::info!(function = %name, "function removed");
        self.events.push(RuntimeEvent::Removed {
            function: name.to_owned(),
            digest: slot.spec.module_digest.clone(),
        });
        flush_slot(slot)
    }

    /// Runs `batch` through function `name`.
    ///
    /// On a fatal error (trap, fuel, timeout, memory, oversized emit) the
    /// instance is dropped, nothing it emitted in this call is returned, a
    /// [`RuntimeEvent::Crashed`] is recorded and a restart is scheduled. A
    /// function that is waiting for its restart returns
    /// [`CallError::Unavailable`] until the restart is due; the restart
    /// happens here or in [`tick`](Self::tick), whichever comes first.
    pub fn process(
        &mut self,
        name: &str,
        batch: &Batch,
        now_ms: u64,
    ) -> Result<CallOutput, CallError> {
        self.ensure_running(name, now_ms)?;
        let samples = batch.len() as u64;
        self.call(name, now_ms, |instance| instance.process(batch))
            .inspect(|_| {
                if let Some(slot) = self.functions.get_mut(name) {
                    slot.samples_in += samples;
                }
            })
    }

    /// Calls `tick(now_ms)` on every function, restarting those whose
    /// backoff has expired first. Functions still backing off are skipped.
    pub fn tick(&mut self, now_ms: u64) -> Vec<(String, Result<CallOutput, CallError>)> {
        let names: Vec<String> = self.functions.keys().cloned().collect();
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            match self.ensure_running(&name, now_ms) {
                Ok(()) => {}
                Err(CallError::Unavailable { .. }) => continue,
                Err(err) => {
                    results.push((name, Err(err)));
                    continue;
                }
            }
            if self
                .functions
                .get_mut(&name)
                .is_some_and(|slot| slot.throttle.held_until(now_ms).is_some())
            {
                continue;
            }
            let result = self.call(&name, now_ms, |instance| instance.tick(now_ms));
            results.push((name, result));
        }
        results
    }

    /// Events since the last drain, oldest first.
    pub fn drain_events(&mut self) -> Vec<RuntimeEvent> {
        std::mem::take(&mut self.events)
    }

    /// Status of every function, by name.
    pub fn status(&self) -> Vec<FunctionStatus> {
        self.functions
            .iter()
            .map(|(name, slot)| FunctionStatus {
                name: name.clone(),
                digest: slot.spec.module_digest.clone(),
                state: match &slot.state {
                    SlotState::Running(_) => match slot.throttle.until_ms() {
                        Some(until_ms) => FunctionState::Throttled {
                            until_ms,
                            strikes: slot.throttle.strikes(),
                        },
                        None => FunctionState::Running,
                    },
                    SlotState::Restarting { due_ms, last_error } => FunctionState::Restarting {
                        due_ms: *due_ms,
                        last_error: last_error.clone(),
                    },
                },
                failures: slot.backoff.failures(),
                restarts: slot.restarts,
                samples_in: slot.samples_in,
                samples_out: slot.samples_out,
                denied: slot.denied,
                log_dropped: slot.log_dropped,
                throttled: slot.throttle.times,
                counters: slot.counters.clone(),
            })
            .collect()
    }

    /// Names of loaded functions (running or restarting).
    pub fn functions(&self) -> impl Iterator<Item = &str> {
        self.functions.keys().map(String::as_str)
    }

    fn start_slot(
        &mut self,
        spec: FunctionSpec,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<Slot, LoadError> {
        if spec.limits.memory_bytes > self.config.pool.max_memory_bytes {
            return Err(LoadError::LimitTooLarge {
                requested: spec.limits.memory_bytes,
                pool_max: self.config.pool.max_memory_bytes,
            });
        }
        let component = self.compile(&spec.module_digest, bytes)?;
        let pre = self.link(&spec, &component)?;
        let spec = Arc::new(spec);
        let instance = Instance::start(
            &pre,
            &spec,
            &self.caps,
            self.config.epoch_tick,
            self.config.log,
            now_ms,
        )?;
        let mut backoff = Backoff::default();
        backoff.on_start(now_ms);
        Ok(Slot {
            spec,
            pre,
            state: SlotState::Running(Box::new(instance)),
            backoff,
            throttle: Throttle::new(&self.config.cpu, now_ms),
            restarts: 0,
            samples_in: 0,
            samples_out: 0,
            denied: 0,
            log_dropped: 0,
            counters: BTreeMap::new(),
        })
    }

    /// Builds a linker with exactly the interfaces `spec` grants, after
    /// checking that the component imports nothing else.
    fn link(
        &self,
        spec: &FunctionSpec,
        component: &Component,
    ) -> Result<DeviceFunctionPre<HostState>, LoadError> {
        let granted = granted_interfaces(spec);
        let ty = component.component_type();
        for (import, _) in ty.imports(&self.engine) {
            let allowed = import
                .strip_prefix(PACKAGE)
                .and_then(|rest| rest.strip_suffix(VERSION))
                .is_some_and(|iface| granted.contains(&iface));
            if !allowed {
                return Err(LoadError::ImportNotGranted {
                    import: import.to_owned(),
                });
            }
        }
        let mut linker: Linker<HostState> = Linker::new(&self.engine);
        let link = |e| LoadError::Link(boxed(e));
        types::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(link)?;
        points::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(link)?;
        output::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(link)?;
        log::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(link)?;
        metrics::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(link)?;
        if granted.contains(&"devices") {
            devices::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                .map_err(link)?;
        }
        if granted.contains(&"kv") {
            kv::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(link)?;
        }
        if granted.contains(&"models") {
            models::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
                .map_err(link)?;
        }
        let instance_pre = linker.instantiate_pre(component).map_err(link)?;
        DeviceFunctionPre::new(instance_pre).map_err(link)
    }

    fn load_failed(&mut self, name: &str, digest: &str, err: &LoadError) {
        let error = render(err);
        tracing::warn!(function = %name, %digest, %error, "function load failed");
        self.events.push(RuntimeEvent::LoadFailed {
            function: name.to_owned(),
            digest: digest.to_owned(),
            error,
        });
    }

    /// Restarts `name` if it is due; errors if it is unknown or not due.
    fn ensure_running(&mut self, name: &str, now_ms: u64) -> Result<(), CallError> {
        let slot = self
            .functions
            .get_mut(name)
            .ok_or_else(|| CallError::UnknownFunction(name.to_owned()))?;
        let SlotState::Restarting { due_ms, .. } = &slot.state else {
            return Ok(());
        };
        if now_ms < *due_ms {
            return Err(CallError::Unavailable {
                function: name.to_owned(),
                until_ms: *due_ms,
                attempt: slot.backoff.failures(),
            });
        }
        match Instance::start(
            &slot.pre,
            &slot.spec,
            &self.caps,
            self.config.epoch_tick,
            self.config.log,
            now_ms,
        ) {
            Ok(instance) => {
                slot.state = SlotState::Running(Box::new(instance));
                slot.restarts += 1;
                slot.backoff.on_start(now_ms);
                tracing::info!(function = %name, failures = slot.backoff.failures(), "function restarted");
                self.events.push(RuntimeEvent::Restarted {
                    function: name.to_owned(),
                    failures: slot.backoff.failures(),
                });
                Ok(())
            }
            Err(err) => {
                let error = render(&err);
                let due_ms = slot.backoff.on_failure(&self.config.backoff, now_ms);
                slot.state = SlotState::Restarting {
                    due_ms,
                    last_error: error.clone(),
                };
                tracing::warn!(function = %name, %error, due_ms, "function restart failed");
                self.events.push(RuntimeEvent::Crashed {
                    function: name.to_owned(),
                    digest: slot.spec.module_digest.clone(),
                    error,
                    failures: slot.backoff.failures(),
                    restart_at_ms: due_ms,
                });
                Err(CallError::Restart(Box::new(err)))
            }
        }
    }

    /// Calls into a running function and does the bookkeeping: counters,
    /// denials, crash handling.
    fn call(
        &mut self,
        name: &str,
        now_ms: u64,
        f: impl FnOnce(&mut Instance) -> Result<Emitted, CallError>,
    ) -> Result<CallOutput, CallError> {
        let slot = self
            .functions
            .get_mut(name)
            .ok_or_else(|| CallError::UnknownFunction(name.to_owned()))?;
        let SlotState::Running(instance) = &mut slot.state else {
            return Err(CallError::Unavailable {
                function: name.to_owned(),
                until_ms: now_ms,
                attempt: slot.backoff.failures(),
            });
        };
        if let Some(until_ms) = slot.throttle.held_until(now_ms) {
            return Err(CallError::Unavailable {
                function: name.to_owned(),
                until_ms,
                attempt: slot.throttle.strikes(),
            });
        }
        instance.set_now(now_ms);
        let started = std::time::Instant::now();
        let result = f(instance);
        let used = started.elapsed();
        if let Some(until_ms) = slot.throttle.record(&self.config.cpu, now_ms, used) {
            let call_ms = u64::try_from(used.as_millis()).unwrap_or(u64::MAX);
            let times = slot.throttle.times;
            tracing::warn!(function = %name, call_ms, times, until_ms, "function over its CPU budget; held back");
            self.events.push(RuntimeEvent::Throttled {
                function: name.to_owned(),
                call_ms,
                times,
                until_ms,
            });
        }
        slot.log_dropped = slot.log_dropped.saturating_add(instance.take_log_dropped());
        for (counter, delta) in instance.take_counters() {
            let value = slot.counters.entry(counter).or_default();
            *value = value.saturating_add(delta);
        }
        for denial in instance.take_denials() {
            slot.denied += 1;
            self.events.push(RuntimeEvent::CapabilityDenied {
                function: name.to_owned(),
                call: denial.call.to_owned(),
                target: denial.target,
            });
        }
        match result {
            Ok(emitted) => {
                slot.backoff.on_success(&self.config.backoff, now_ms);
                let output = to_output(&slot.spec, emitted);
                slot.samples_out += output.len() as u64;
                Ok(output)
            }
            Err(err) if err.is_fatal() => {
                let error = render(&err);
                let due_ms = slot.backoff.on_failure(&self.config.backoff, now_ms);
                slot.state = SlotState::Restarting {
                    due_ms,
                    last_error: error.clone(),
                };
                tracing::warn!(function = %name, %error, due_ms, "function crashed");
                self.events.push(RuntimeEvent::Crashed {
                    function: name.to_owned(),
                    digest: slot.spec.module_digest.clone(),
                    error,
                    failures: slot.backoff.failures(),
                    restart_at_ms: due_ms,
                });
                Err(err)
            }
            Err(err) => Err(err),
        }
    }
}

fn flush_slot(mut slot: Slot) -> Option<CallOutput> {
    let SlotState::Running(instance) = &mut slot.state else {
        return None;
    };
    match instance.flush() {
        Ok(emitted) => Some(to_output(&slot.spec, emitted)),
        Err(err) => {
            tracing::warn!(function = %slot.spec.name, error = %render(&err), "flush failed");
            None
        }
    }
}

fn to_output(spec: &FunctionSpec, emitted: Emitted) -> CallOutput {
    let streams = spec
        .outputs
        .iter()
        .zip(emitted)
        .filter(|(_, samples)| !samples.is_empty())
        .map(|(stream, samples)| StreamOutput {
            stream: stream.clone(),
            samples,
        })
        .collect();
    CallOutput {
        function: spec.name.clone(),
        digest: spec.module_digest.clone(),
        streams,
    }
}

/// Interfaces linked for `spec` (short names, e.g. `kv`).
fn granted_interfaces(spec: &FunctionSpec) -> Vec<&'static str> {
    let mut granted = vec!["types", "points", "output", "log", "metrics"];
    if !spec.devices.is_empty() {
        granted.push("devices");
    }
    if spec.kv {
        granted.push("kv");
    }
    if !spec.models.is_empty() {
        granted.push("models");
    }
    granted
}

/// Rejects non-wasm bytes and core modules before compiling.
fn check_component_header(bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    match bytes.get(..8) {
        Some(header) if header.starts_with(MAGIC) => {
            // Bytes 4..6: version; 6..8: layer (0 = core module, 1 = component).
            if header[6..8] == [0, 0] {
                Err(LoadError::NotAComponent)
            } else {
                Ok(())
            }
        }
        _ => Err(LoadError::Malformed(
            "not a WebAssembly binary (bad magic)".into(),
        )),
    }
}

/// Renders an error with its whole source chain.
pub(crate) fn render(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
