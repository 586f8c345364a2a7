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
//! desired function (`Routing::function_inputs`) to the host. The host
//! buffers them per function and calls `process` when
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
//!
//! # Layout
//! - this module: [`FunctionHost`] and its select loop ([`FunctionHost::run`]),
//!   [`FunctionError`], [`FunctionsView`];
//! - `plan`: the pure decision what each function does under a new desired
//!   state (start, reload, keep, keep the previous version, wait, stop, forget);
//! - `reconcile`: applying a new desired state (drain, plan, apply, forget);
//! - `slots`: per-function bookkeeping, input buffering and routing;
//! - `job`: one blocking call into the runtime and what is done with its
//!   results;
//! - `caps`: the capabilities guests get (kv, models, device reads);
//! - [`kv`]: the guests' key-value store and its per-function quota;
//! - `spec`: desired-state function -> runtime spec ([`runtime_spec`],
//!   [`guest_config`]);
//! - `status`: the reported function status.

mod caps;
mod job;
pub mod kv;
mod plan;
mod reconcile;
mod slots;
mod spec;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use protocols::{FunctionStatus, Sample};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::artifacts::{ArtifactFetcher, DesiredPair};
use crate::context::AgentContext;
use crate::store::OutboxWriter;
use crate::store::StoreError;

use slots::HostState;
pub use spec::{guest_config, runtime_spec};

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

/// The function host task. Build it, then call [`run`](Self::run).
pub struct FunctionHost {
    /// What the agent's tasks share (store, clock, node, events).
    pub ctx: AgentContext,
    /// Downloaded modules and models.
    pub fetcher: Arc<ArtifactFetcher>,
    /// Appends emitted samples to the outbox (shared with the pipeline).
    pub writer: OutboxWriter,
    /// Reported function status.
    pub view: FunctionsView,
    /// Compiled-code cache directory.
    pub cache_dir: PathBuf,
    /// The gateway's bounds on functions (`[functions]`).
    pub limits: crate::config::FunctionsConfig,
}

impl std::fmt::Debug for FunctionHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionHost")
            .field("node", &self.ctx.node)
            .finish_non_exhaustive()
    }
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
            kv: Arc::new(kv::GuestKv::new(
                self.ctx.store.clone(),
                kv::KvQuota::from(&self.limits),
                self.ctx.counters.clone(),
            )),
            raw_stream: None,
            batch_max_samples: 1_000,
            batch_max_age_ms: 1_000,
            runtime_error: None,
            evictions_seen: 0,
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
                    let now = self.ctx.clock.now_ms();
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
