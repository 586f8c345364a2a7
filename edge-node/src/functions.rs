//! The function reconciler: runs the WASM device functions desired state
//! names, feeds them their input points and appends what they emit to the
//! outbox.
//!
//! Start at [`FunctionHost::run`]. The host owns one
//! [`device_runtime::DeviceRuntime`] (created lazily, when the first
//! function is wanted, so a node without functions never builds a wasmtime
//! engine). Every call into it — `apply`, `process`, `tick` — happens in
//! `spawn_blocking` with the runtime moved in and back out, so wasm never
//! runs on a reactor thread and calls stay sequential.
//!
//! Data flow: the pipeline sends every sample whose point is an input of a
//! desired function (`Routing::function_inputs`) to the host. The host buffers them per function and calls `process` when
//! a buffer holds `batch_max_samples` or its oldest sample waited
//! `batch_max_age`; the emitted samples are appended to the outbox stream(s)
//! the function names, with the function's local point indexes mapped back
//! to node-wide ones. Samples of points no loaded function consumes (after a
//! routing change) go to the raw stream, so none is lost in the hand-over.
//!
//! # Invariants
//! - Every input sample is processed by exactly one version of a function:
//!   before a new desired revision is applied, all buffered input is run
//!   through the running versions; the outgoing versions' `flush` output is
//!   appended before anything the new versions emit.
//! - A function waiting for a restart (backoff), or whose module is still
//!   downloading, keeps its input buffered, up to
//!   [`MAX_BUFFERED_PER_FUNCTION`] samples; beyond that the oldest are
//!   dropped, counted (`input_dropped`) and reported with an
//!   `overflow-drop` event on stream `{function}.input`.
//! - A batch whose call fails fatally (trap, fuel, timeout, memory) is not
//!   retried (it may be what kills the guest): its samples are counted in
//!   `samples_failed` and the crash raises a `function-failed` event.
//! - A desired function whose new module is not downloaded yet keeps
//!   running its previous version.
//!
//! Time comes from the injected [`Clock`]; the runtime never reads a clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use device_runtime::{
    ApplyReport, Batch, BoxError, CallError, CallOutput, Capabilities, CapabilityError,
    DeviceReader, DeviceRuntime, FunctionState, KvStore, Limits, ModelSource, ModuleSource,
    PointRef, PointValue, RegisterKind, RuntimeConfig, RuntimeEvent,
};
use protocols::{DesiredState, Event, EventKind, FunctionStatus, Quality, Sample};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::artifacts::{ArtifactFetcher, DesiredPair, read_blob};
use crate::clock::Clock;
use crate::metrics::Counters;
use crate::pipeline::Appender;
use crate::store::{Store, StoreError};

/// Input samples buffered per function at most (while it backs off or its
/// module downloads).
pub const MAX_BUFFERED_PER_FUNCTION: usize = 100_000;

/// How often `tick` is called and buffer ages are checked.
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// Why the function host stopped.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// Appending emitted samples to the outbox failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blocking task running the wasm runtime panicked.
    #[error("function runtime task failed: {0}")]
    Task(String),
}

/// Function status as reported state shows it, shared with the agent's
/// control loop.
#[derive(Debug, Clone, Default)]
pub struct FunctionsView {
    inner: Arc<Mutex<BTreeMap<String, FunctionStatus>>>,
}

impl FunctionsView {
    /// Status of every desired function, by name.
    pub fn snapshot(&self) -> BTreeMap<String, FunctionStatus> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, v: BTreeMap<String, FunctionStatus>) {
        *self.inner.lock().unwrap_or_else(PoisonError::into_inner) = v;
    }
}

/// Maps a desired-state function onto the runtime's spec. `points` resolves
/// node-wide point indexes to (device, point name).
pub fn runtime_spec<S: std::hash::BuildHasher>(
    f: &protocols::FunctionSpec,
    points: &HashMap<u32, PointRef, S>,
) -> device_runtime::FunctionSpec {
    device_runtime::FunctionSpec {
        name: f.name.clone(),
        module_digest: f.module_sha256.clone(),
        config: guest_config(&f.config),
        points: f
            .inputs
            .iter()
            .map(|i| {
                points
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| PointRef::new("", i.to_string()))
            })
            .collect(),
        devices: f.granted_devices.iter().cloned().collect(),
        outputs: f.outputs.clone(),
        kv: true,
        models: f.granted_models.iter().cloned().collect(),
        limits: Limits {
            memory_bytes: f.limits.memory_bytes,
            fuel_per_call: Some(f.limits.fuel_per_call),
            epoch_deadline: Duration::from_millis(f.limits.deadline_ms),
            ..Limits::default()
        },
    }
}

/// The text a guest's `init` receives. The reference guests parse
/// `key=value;key=value`: a JSON object of scalars is rendered that way (keys
/// in order), a JSON string is passed verbatim, `null` as an empty string,
/// anything else as JSON text.
pub fn guest_config(v: &serde_json::Value) -> String {
    use serde_json::Value;
    fn scalar(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Object(m) if m.values().all(|v| !v.is_object() && !v.is_array()) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar(v)))
            .collect::<Vec<_>>()
            .join(";"),
        other => other.to_string(),
    }
}

fn point_names(d: &DesiredState) -> HashMap<u32, PointRef> {
    d.points()
        .map(|(dev, _, p)| (p.index, PointRef::new(&dev.id, &p.name)))
        .collect()
}

// ---------------------------------------------------------------- capabilities

/// Shared, swappable state behind the capability traits.
#[derive(Debug, Default)]
struct CapState {
    /// Model name -> digest.
    models: HashMap<String, String>,
    /// (device, point name) -> node-wide index.
    points: HashMap<PointRef, u32>,
    /// Latest sample of every point a function consumes.
    latest: HashMap<u32, Sample>,
}

struct EdgeCaps {
    store: Store,
    artifacts_dir: PathBuf,
    state: Arc<Mutex<CapState>>,
}

impl EdgeCaps {
    fn state(&self) -> std::sync::MutexGuard<'_, CapState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unavailable(e: &StoreError) -> CapabilityError {
    CapabilityError::Unavailable(e.to_string())
}

impl KvStore for EdgeCaps {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, CapabilityError> {
        self.store
            .kv_get(namespace, key.as_bytes())
            .map_err(|e| unavailable(&e))
    }
    fn put(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), CapabilityError> {
        self.store
            .kv_put(namespace, key.as_bytes(), value)
            .map_err(|e| unavailable(&e))
    }
    fn delete(&self, namespace: &str, key: &str) -> Result<(), CapabilityError> {
        self.store
            .kv_delete(namespace, key.as_bytes())
            .map_err(|e| unavailable(&e))
    }
}

impl ModelSource for EdgeCaps {
    fn read_model(&self, name: &str) -> Result<Vec<u8>, CapabilityError> {
        let digest = self
            .state()
            .models
            .get(name)
            .cloned()
            .ok_or(CapabilityError::NotFound)?;
        read_blob(&self.artifacts_dir, &digest).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CapabilityError::NotFound,
            _ => CapabilityError::Unavailable(e.to_string()),
        })
    }
}

impl DeviceReader for EdgeCaps {
    fn read_point(&self, point: &PointRef) -> Result<PointValue, CapabilityError> {
        let st = self.state();
        let idx = st.points.get(point).ok_or(CapabilityError::NotFound)?;
        let s = st.latest.get(idx).ok_or(CapabilityError::NotFound)?;
        Ok(PointValue {
            timestamp_ms: s.ts_ms,
            value: s.value,
            quality: quality_class(s.quality),
        })
    }
    fn read_registers(
        &self,
        device: &str,
        _kind: RegisterKind,
        _address: u16,
        _count: u16,
    ) -> Result<Vec<u16>, CapabilityError> {
        Err(CapabilityError::Unavailable(format!(
            "raw register reads of {device} are not supported by this edge-node yet"
        )))
    }
    fn read_node(&self, device: &str, node_id: &str) -> Result<f64, CapabilityError> {
        Err(CapabilityError::Unavailable(format!(
            "raw OPC UA reads ({device}, {node_id}) are not supported by this edge-node yet"
        )))
    }
}

/// Guest quality: 0 good, 1 uncertain, 2 bad.
fn quality_class(q: Quality) -> u8 {
    if q.is_good() {
        0
    } else if q.is_bad() {
        2
    } else {
        1
    }
}

/// Component bytes from the artifact directory (called on the blocking pool).
struct BlobModules(PathBuf);

impl ModuleSource for BlobModules {
    fn module_bytes(&self, digest: &str) -> Result<Vec<u8>, BoxError> {
        read_blob(&self.0, digest).map_err(|e| Box::new(e) as BoxError)
    }
}

// ---------------------------------------------------------------- host

/// Per-function bookkeeping on the host side.
#[derive(Debug, Default)]
struct Slot {
    /// What desired state asks for.
    desired: Option<protocols::FunctionSpec>,
    /// The runtime spec currently loaded and the node-wide indexes of its points.
    loaded: Option<(device_runtime::FunctionSpec, Vec<u32>)>,
    /// Input waiting for `process` (node-wide indexes).
    buffer: Vec<Sample>,
    /// When the oldest buffered sample arrived.
    since_ms: u64,
    last_error: Option<String>,
    load_failed: bool,
    /// Cumulative counters (survive hot swaps and restarts).
    samples_in: u64,
    samples_out: u64,
    errors: u64,
    restarts: u64,
    samples_failed: u64,
    input_dropped: u64,
    time_us: u64,
}

impl Slot {
    /// Node-wide point indexes routed to this function.
    fn inputs(&self) -> &[u32] {
        match (&self.loaded, &self.desired) {
            (Some((_, inputs)), _) => inputs,
            (None, Some(d)) => &d.inputs,
            (None, None) => &[],
        }
    }
}

/// One `process` call: function, its input (node-wide), the result and the
/// time it took in microseconds.
type CallResult = (String, Vec<Sample>, Result<CallOutput, CallError>, u64);

/// What one blocking job did.
struct JobResult {
    rt: DeviceRuntime,
    apply: Option<ApplyReport>,
    calls: Vec<CallResult>,
    ticks: Vec<(String, Result<CallOutput, CallError>)>,
    events: Vec<RuntimeEvent>,
    status: Vec<device_runtime::FunctionStatus>,
}

/// The function host task. Build it, then call [`run`](Self::run).
pub struct FunctionHost {
    /// Store (kv and outbox).
    pub store: Store,
    /// Injected time.
    pub clock: Clock,
    /// Node name for events.
    pub node: String,
    /// Downloaded modules and models.
    pub fetcher: Arc<ArtifactFetcher>,
    /// Appends emitted samples to the outbox (shared with the pipeline).
    pub appender: Appender,
    /// Agent counters.
    pub counters: Arc<Counters>,
    /// Events to publish.
    pub events: mpsc::UnboundedSender<Event>,
    /// Reported function status.
    pub view: FunctionsView,
    /// Compiled-code cache directory.
    pub cache_dir: PathBuf,
}

impl std::fmt::Debug for FunctionHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionHost")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

struct HostState {
    rt: Option<DeviceRuntime>,
    slots: BTreeMap<String, Slot>,
    point_fns: HashMap<u32, Vec<String>>,
    caps: Arc<Mutex<CapState>>,
    raw_stream: Option<String>,
    batch_max_samples: usize,
    batch_max_age_ms: u64,
    runtime_error: Option<String>,
}

impl FunctionHost {
    /// Runs until `cancel`: applies desired functions when `desired` or
    /// `ready` (a new artifact) changes, processes `input`, ticks.
    pub async fn run(
        self,
        mut desired: watch::Receiver<DesiredPair>,
        mut ready: watch::Receiver<u64>,
        mut input: mpsc::Receiver<Vec<Sample>>,
        cancel: CancellationToken,
    ) -> Result<(), FunctionError> {
        let mut st = HostState {
            rt: None,
            slots: BTreeMap::new(),
            point_fns: HashMap::new(),
            caps: Arc::default(),
            raw_stream: None,
            batch_max_samples: 1_000,
            batch_max_age_ms: 1_000,
            runtime_error: None,
        };
        let mut current = desired.borrow_and_update().clone();
        ready.borrow_and_update();
        self.reconcile(&mut st, &current).await?;
        let mut tick = tokio::time::interval(TICK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // A new desired state is applied before the input that follows it.
                biased;
                () = cancel.cancelled() => break,
                r = desired.changed() => {
                    if r.is_err() { break; }
                    current = desired.borrow_and_update().clone();
                    self.reconcile(&mut st, &current).await?;
                }
                r = ready.changed() => {
                    if r.is_err() { break; }
                    ready.borrow_and_update();
                    self.reconcile(&mut st, &current).await?;
                }
                msg = input.recv() => {
                    let Some(samples) = msg else { break };
                    self.accept(&mut st, samples)?;
                    let full: Vec<String> = st.slots.iter()
                        .filter(|(_, s)| s.loaded.is_some() && s.buffer.len() >= st.batch_max_samples)
                        .map(|(n, _)| n.clone())
                        .collect();
                    if !full.is_empty() {
                        self.work(&mut st, &full, None, false).await?;
                    }
                }
                _ = tick.tick() => {
                    let now = self.clock.now_ms();
                    let due: Vec<String> = st.slots.iter()
                        .filter(|(_, s)| s.loaded.is_some() && !s.buffer.is_empty()
                            && now.saturating_sub(s.since_ms) >= st.batch_max_age_ms)
                        .map(|(n, _)| n.clone())
                        .collect();
                    self.work(&mut st, &due, None, true).await?;
                }
            }
        }
        // Clean stop: whatever arrived goes through the functions, then flush them.
        while let Ok(samples) = input.try_recv() {
            self.accept(&mut st, samples)?;
        }
        let all: Vec<String> = st.slots.keys().cloned().collect();
        self.work(&mut st, &all, None, false).await?;
        self.work(&mut st, &[], Some(Vec::new()), false).await?;
        // What is still buffered (functions that never loaded) goes raw.
        let left: Vec<Sample> = st
            .slots
            .values_mut()
            .flat_map(|s| std::mem::take(&mut s.buffer))
            .collect();
        self.to_raw(&st, &left)?;
        Ok(())
    }

    /// Routes incoming samples into function buffers (or raw, if no loaded
    /// or pending function consumes the point any more).
    fn accept(&self, st: &mut HostState, samples: Vec<Sample>) -> Result<(), FunctionError> {
        let now = self.clock.now_ms();
        let mut orphans = Vec::new();
        {
            let mut caps = st.caps.lock().unwrap_or_else(PoisonError::into_inner);
            for s in &samples {
                caps.latest.insert(s.point, *s);
            }
        }
        for s in samples {
            let Some(names) = st.point_fns.get(&s.point) else {
                orphans.push(s);
                continue;
            };
            for name in names {
                if let Some(slot) = st.slots.get_mut(name) {
                    if slot.buffer.is_empty() {
                        slot.since_ms = now;
                    }
                    slot.buffer.push(s);
                }
            }
        }
        for (name, slot) in &mut st.slots {
            let over = slot.buffer.len().saturating_sub(MAX_BUFFERED_PER_FUNCTION);
            if over > 0 {
                slot.buffer.drain(..over);
                slot.input_dropped += over as u64;
                let _ = self.events.send(Event {
                    node: self.node.clone(),
                    at_ms: now,
                    kind: EventKind::OverflowDrop {
                        stream: format!("{name}.input"),
                        dropped: over as u64,
                    },
                    message: format!(
                        "function {name} is not taking input (backoff or not loaded); \
                         {over} buffered input samples dropped (limit {MAX_BUFFERED_PER_FUNCTION})"
                    ),
                });
            }
        }
        self.to_raw(st, &orphans)
    }

    fn to_raw(&self, st: &HostState, samples: &[Sample]) -> Result<(), FunctionError> {
        if samples.is_empty() {
            return Ok(());
        }
        match &st.raw_stream {
            Some(raw) => self.appender.append(raw, samples)?,
            None => Counters::add(&self.counters.samples_unrouted, samples.len() as u64),
        }
        Ok(())
    }

    /// Makes the runtime match `pair.current`: drains buffered input
    /// through the running versions, then applies.
    async fn reconcile(&self, st: &mut HostState, pair: &DesiredPair) -> Result<(), FunctionError> {
        let Some(desired) = pair.current.as_deref() else {
            return Ok(());
        };
        st.raw_stream.clone_from(&desired.config.raw_stream);
        st.batch_max_samples = desired.config.batch_max_samples as usize;
        st.batch_max_age_ms = desired.config.batch_max_age_ms;
        // 1. Everything received so far goes through the versions that run now.
        let loaded: Vec<String> = st
            .slots
            .iter()
            .filter(|(_, s)| s.loaded.is_some() && !s.buffer.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        self.work(st, &loaded, None, false).await?;

        // 2. What to run: new specs whose module is here; otherwise keep the old one.
        let names = point_names(desired);
        {
            let mut caps = st.caps.lock().unwrap_or_else(PoisonError::into_inner);
            caps.models.clear();
            for m in pair.previous.iter().flat_map(|p| p.models.iter()) {
                caps.models.insert(m.name.clone(), m.sha256.clone());
            }
            for m in &desired.models {
                caps.models.insert(m.name.clone(), m.sha256.clone());
            }
            caps.points = names.iter().map(|(i, p)| (p.clone(), *i)).collect();
        }
        let wanted: BTreeSet<&str> = desired.functions.iter().map(|f| f.name.as_str()).collect();
        for (name, slot) in &mut st.slots {
            if !wanted.contains(name.as_str()) {
                slot.desired = None;
            }
        }
        let mut specs = Vec::new();
        let mut spec_inputs = HashMap::new();
        for f in &desired.functions {
            let slot = st.slots.entry(f.name.clone()).or_default();
            if slot.desired.as_ref() != Some(f) {
                slot.load_failed = false;
                slot.last_error = None;
            }
            slot.desired = Some(f.clone());
            let models_here = f.granted_models.iter().all(|m| {
                desired
                    .models
                    .iter()
                    .find(|r| &r.name == m)
                    .is_none_or(|r| self.fetcher.has(&r.sha256))
            });
            if self.fetcher.has(&f.module_sha256) && models_here {
                let spec = runtime_spec(f, &names);
                spec_inputs.insert(f.name.clone(), f.inputs.clone());
                specs.push(spec);
            } else if let Some((spec, inputs)) = &slot.loaded {
                spec_inputs.insert(f.name.clone(), inputs.clone());
                specs.push(spec.clone());
            }
        }
        let need_runtime = !specs.is_empty() || st.rt.is_some();
        if need_runtime {
            if st.rt.is_none() {
                self.create_runtime(st);
            }
            if st.rt.is_some() {
                let requested: HashMap<String, device_runtime::FunctionSpec> =
                    specs.iter().map(|s| (s.name.clone(), s.clone())).collect();
                let report = self.work(st, &[], Some(specs), false).await?;
                if let Some(report) = report {
                    for name in report
                        .loaded
                        .iter()
                        .chain(&report.replaced)
                        .chain(&report.unchanged)
                    {
                        if let (Some(slot), Some(spec), Some(inputs)) = (
                            st.slots.get_mut(name),
                            requested.get(name),
                            spec_inputs.get(name),
                        ) {
                            slot.loaded = Some((spec.clone(), inputs.clone()));
                            slot.load_failed = false;
                        }
                    }
                    for (name, err) in &report.failed {
                        if let Some(slot) = st.slots.get_mut(name) {
                            slot.load_failed = true;
                            slot.last_error = Some(render(err));
                        }
                    }
                    for name in &report.removed {
                        if let Some(slot) = st.slots.get_mut(name) {
                            slot.loaded = None;
                        }
                    }
                }
            }
        }
        // 3. Forget functions that are neither desired nor loaded; their
        // leftover input (if any) goes raw.
        let gone: Vec<String> = st
            .slots
            .iter()
            .filter(|(_, s)| s.desired.is_none() && s.loaded.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        let mut leftovers = Vec::new();
        for name in gone {
            if let Some(s) = st.slots.remove(&name) {
                leftovers.extend(s.buffer);
            }
        }
        Self::rebuild_routes(st, &mut leftovers);
        self.to_raw(st, &leftovers)?;
        self.publish_status(st, None);
        Ok(())
    }

    fn rebuild_routes(st: &mut HostState, leftovers: &mut Vec<Sample>) {
        let mut point_fns: HashMap<u32, Vec<String>> = HashMap::new();
        for (name, slot) in &mut st.slots {
            let inputs: BTreeSet<u32> = slot.inputs().iter().copied().collect();
            for i in &inputs {
                point_fns.entry(*i).or_default().push(name.clone());
            }
            // Buffered samples of points the function no longer takes go raw.
            let (keep, drop): (Vec<Sample>, Vec<Sample>) = std::mem::take(&mut slot.buffer)
                .into_iter()
                .partition(|s| inputs.contains(&s.point));
            slot.buffer = keep;
            leftovers.extend(drop);
        }
        st.point_fns = point_fns;
    }

    fn create_runtime(&self, st: &mut HostState) {
        let caps = Arc::new(EdgeCaps {
            store: self.store.clone(),
            artifacts_dir: self.fetcher.dir().to_owned(),
            state: st.caps.clone(),
        });
        let config = RuntimeConfig {
            cache_dir: Some(self.cache_dir.clone()),
            ..RuntimeConfig::default()
        };
        match DeviceRuntime::new(
            config,
            Capabilities {
                kv: caps.clone(),
                models: caps.clone(),
                devices: caps,
            },
        ) {
            Ok(rt) => {
                info!(node = %self.node, "wasm runtime started");
                st.rt = Some(rt);
                st.runtime_error = None;
            }
            Err(e) => {
                let msg = render(&e);
                warn!(node = %self.node, error = %msg, "cannot start the wasm runtime");
                let _ = self.events.send(Event {
                    node: self.node.clone(),
                    at_ms: self.clock.now_ms(),
                    kind: EventKind::FunctionFailed {
                        function: "runtime".into(),
                    },
                    message: format!("cannot start the wasm runtime: {msg}"),
                });
                st.runtime_error = Some(msg);
            }
        }
    }

    /// One blocking job: optionally `apply`, then `process` the buffers of
    /// `names`, then optionally `tick`; then forwards outputs, events and
    /// status. Returns the apply report, if any.
    async fn work(
        &self,
        st: &mut HostState,
        names: &[String],
        apply: Option<Vec<device_runtime::FunctionSpec>>,
        tick: bool,
    ) -> Result<Option<ApplyReport>, FunctionError> {
        let Some(mut rt) = st.rt.take() else {
            return Ok(None);
        };
        let now = self.clock.now_ms();
        let mut calls = Vec::new();
        for name in names {
            let Some(slot) = st.slots.get_mut(name) else {
                continue;
            };
            let Some((_, inputs)) = &slot.loaded else {
                continue;
            };
            if slot.buffer.is_empty() {
                continue;
            }
            let local: HashMap<u32, u32> = inputs
                .iter()
                .enumerate()
                .map(|(i, p)| (*p, i as u32))
                .collect();
            let samples = std::mem::take(&mut slot.buffer);
            let mut batch = Batch::with_capacity(samples.len());
            for s in &samples {
                if let Some(l) = local.get(&s.point) {
                    batch.push(*l, s.ts_ms, s.value, s.quality.0);
                }
            }
            calls.push((name.clone(), samples, batch));
        }
        if apply.is_none() && calls.is_empty() && !tick {
            st.rt = Some(rt);
            return Ok(None);
        }
        let modules = BlobModules(self.fetcher.dir().to_owned());
        let job = tokio::task::spawn_blocking(move || {
            let report = apply.map(|specs| rt.apply(&specs, &modules, now));
            let mut results = Vec::with_capacity(calls.len());
            for (name, samples, batch) in calls {
                let t0 = tokio::time::Instant::now();
                let r = rt.process(&name, &batch, now);
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                results.push((name, samples, r, us));
            }
            let ticks = if tick { rt.tick(now) } else { Vec::new() };
            let events = rt.drain_events();
            let status = rt.status();
            JobResult {
                rt,
                apply: report,
                calls: results,
                ticks,
                events,
                status,
            }
        });
        let r = job.await.map_err(|e| FunctionError::Task(e.to_string()))?;
        st.rt = Some(r.rt);
        let mut report = r.apply;
        // Outputs of outgoing versions first.
        if let Some(rep) = &mut report {
            for out in std::mem::take(&mut rep.flushed) {
                let inputs = st
                    .slots
                    .get(&out.function)
                    .and_then(|s| s.loaded.as_ref().map(|(_, i)| i.clone()))
                    .unwrap_or_default();
                let n = self.emit(&out, &inputs)?;
                if let Some(slot) = st.slots.get_mut(&out.function) {
                    slot.samples_out += n;
                }
            }
        }
        for (name, samples, result, us) in r.calls {
            let Some(slot) = st.slots.get_mut(&name) else {
                continue;
            };
            slot.time_us += us;
            match result {
                Ok(out) => {
                    slot.samples_in += samples.len() as u64;
                    let inputs = slot
                        .loaded
                        .as_ref()
                        .map(|(_, i)| i.clone())
                        .unwrap_or_default();
                    let n = self.emit(&out, &inputs)?;
                    if let Some(slot) = st.slots.get_mut(&name) {
                        slot.samples_out += n;
                    }
                }
                Err(CallError::Unavailable { .. }) => {
                    // Backing off: keep the input, in order, ahead of newer samples.
                    let newer = std::mem::take(&mut slot.buffer);
                    slot.buffer = samples;
                    slot.buffer.extend(newer);
                }
                Err(e) => {
                    slot.errors += 1;
                    if e.is_fatal() {
                        slot.samples_failed += samples.len() as u64;
                    } else {
                        slot.samples_in += samples.len() as u64;
                    }
                    slot.last_error = Some(render(&e));
                }
            }
        }
        for (name, result) in r.ticks {
            match result {
                Ok(out) => {
                    let inputs = st
                        .slots
                        .get(&name)
                        .and_then(|s| s.loaded.as_ref().map(|(_, i)| i.clone()))
                        .unwrap_or_default();
                    let n = self.emit(&out, &inputs)?;
                    if let Some(slot) = st.slots.get_mut(&name) {
                        slot.samples_out += n;
                    }
                }
                Err(e) => {
                    if let Some(slot) = st.slots.get_mut(&name) {
                        slot.errors += 1;
                        slot.last_error = Some(render(&e));
                    }
                }
            }
        }
        for ev in r.events {
            self.on_runtime_event(st, ev);
        }
        self.publish_status(st, Some(&r.status));
        Ok(report)
    }

    /// Appends one call's output to its streams; returns the samples appended.
    fn emit(&self, out: &CallOutput, inputs: &[u32]) -> Result<u64, FunctionError> {
        let mut n = 0;
        for s in &out.streams {
            if s.samples.is_empty() {
                continue;
            }
            let mut samples = Vec::with_capacity(s.samples.len());
            for i in 0..s.samples.len() {
                if let Some((p, ts, v, q)) = s.samples.get(i) {
                    let point = inputs.get(p as usize).copied().unwrap_or(p);
                    samples.push(Sample {
                        point,
                        ts_ms: ts,
                        value: v,
                        quality: Quality(q),
                    });
                }
            }
            n += samples.len() as u64;
            self.appender.append(&s.stream, &samples)?;
        }
        Ok(n)
    }

    fn on_runtime_event(&self, st: &mut HostState, ev: RuntimeEvent) {
        let (function, message) = match ev {
            RuntimeEvent::Crashed {
                function,
                digest,
                error,
                failures,
                restart_at_ms,
            } => {
                warn!(%function, %digest, %error, failures, "device function crashed");
                let m = format!(
                    "function {function} ({digest}) crashed: {error}; failure {failures}, restart at {restart_at_ms} ms"
                );
                (function, m)
            }
            RuntimeEvent::LoadFailed {
                function,
                digest,
                error,
            } => {
                warn!(%function, %digest, %error, "device function failed to load");
                let m = format!(
                    "function {function} failed to load module {digest}: {error}; a previous version (if any) keeps running"
                );
                (function, m)
            }
            RuntimeEvent::Restarted { function, failures } => {
                if let Some(slot) = st.slots.get_mut(&function) {
                    slot.restarts += 1;
                }
                info!(%function, failures, "device function restarted");
                let m = format!("function {function} restarted after {failures} failure(s)");
                (function, m)
            }
            RuntimeEvent::Loaded { function, digest } => {
                info!(%function, %digest, "device function loaded");
                return;
            }
            RuntimeEvent::Replaced { function, from, to } => {
                info!(%function, %from, %to, "device function hot-swapped");
                return;
            }
            RuntimeEvent::Removed { function, digest } => {
                info!(%function, %digest, "device function removed");
                return;
            }
            RuntimeEvent::CapabilityDenied {
                function,
                call,
                target,
            } => {
                warn!(%function, %call, %target, "device function capability denied");
                return;
            }
        };
        let _ = self.events.send(Event {
            node: self.node.clone(),
            at_ms: self.clock.now_ms(),
            kind: EventKind::FunctionFailed { function },
            message,
        });
    }

    fn publish_status(&self, st: &HostState, runtime: Option<&[device_runtime::FunctionStatus]>) {
        let mut prev = self.view.snapshot();
        let by_name: HashMap<&str, &device_runtime::FunctionStatus> = runtime
            .unwrap_or_default()
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut out = BTreeMap::new();
        for (name, slot) in &st.slots {
            let Some(desired) = &slot.desired else {
                continue;
            };
            let rs = by_name.get(name.as_str());
            let (state, runtime_error) = match rs.map(|s| &s.state) {
                Some(FunctionState::Restarting { last_error, .. }) => {
                    ("backoff", Some(last_error.clone()))
                }
                Some(FunctionState::Running) => ("running", None),
                None if runtime.is_none() => {
                    // No fresh runtime status: keep the last one we published.
                    if let Some(p) = prev.remove(name)
                        && slot.loaded.is_some()
                    {
                        (
                            if p.state == "backoff" {
                                "backoff"
                            } else {
                                "running"
                            },
                            p.last_error,
                        )
                    } else if slot.loaded.is_some() {
                        ("running", None)
                    } else if slot.load_failed || st.runtime_error.is_some() {
                        ("failed", None)
                    } else {
                        ("loading", None)
                    }
                }
                None if slot.load_failed || st.runtime_error.is_some() => ("failed", None),
                None => ("loading", None),
            };
            let mut counters = BTreeMap::from([
                ("samples_in".to_owned(), slot.samples_in),
                ("samples_out".to_owned(), slot.samples_out),
                ("errors".to_owned(), slot.errors),
                ("restarts".to_owned(), slot.restarts),
                ("time_us".to_owned(), slot.time_us),
                ("samples_failed".to_owned(), slot.samples_failed),
                ("input_dropped".to_owned(), slot.input_dropped),
                ("input_buffered".to_owned(), slot.buffer.len() as u64),
            ]);
            if let Some(rs) = rs {
                counters.insert("denied".to_owned(), rs.denied);
                for (k, v) in &rs.counters {
                    counters.insert(format!("guest.{k}"), *v);
                }
            }
            let module = slot
                .loaded
                .as_ref()
                .map_or(desired.module_sha256.clone(), |(s, _)| {
                    s.module_digest.clone()
                });
            out.insert(
                name.clone(),
                FunctionStatus {
                    module_sha256: module,
                    state: state.to_owned(),
                    last_error: runtime_error
                        .or_else(|| slot.last_error.clone())
                        .or_else(|| st.runtime_error.clone()),
                    counters,
                },
            );
        }
        self.view.set(out);
    }
}

fn render(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_config_renders_key_values() {
        assert_eq!(
            guest_config(&serde_json::json!({"deadband": 0.5, "max_interval_ms": 1000})),
            "deadband=0.5;max_interval_ms=1000"
        );
        assert_eq!(guest_config(&serde_json::json!("deadband=2")), "deadband=2");
        assert_eq!(guest_config(&serde_json::Value::Null), "");
        assert_eq!(guest_config(&serde_json::json!({"a": [1]})), "{\"a\":[1]}");
    }
}
