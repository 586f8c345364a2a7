//! Applying a new desired state: drain buffered input through the running
//! versions, [`plan`] what runs, apply that to the runtime, forget what is
//! neither desired nor loaded.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use device_runtime::{
    ApplyReport, BackoffConfig, CacheLimits, Capabilities, CpuBudget, DeviceRuntime, LogLimits,
    RuntimeConfig,
};
use protocols::{Event, EventKind};
use tracing::{info, warn};

use super::caps::EdgeCaps;
use super::plan::{Plan, Run, plan};
use super::slots::HostState;
use super::{FunctionError, FunctionHost, render};
use crate::artifacts::DesiredPair;

impl FunctionHost {
    /// Makes the runtime match `pair.current`: drains buffered input
    /// through the running versions, then plans and applies.
    pub(super) async fn reconcile(
        &self,
        st: &mut HostState,
        pair: &DesiredPair,
    ) -> Result<(), FunctionError> {
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
        let plan = plan(desired, pair.previous.as_deref(), &st.slots, |d| {
            self.fetcher.has(d)
        });
        let runs = adopt(st, plan);
        self.apply(st, runs).await?;

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

    /// Hands `runs` to the runtime (creating it if this is the first
    /// function) and records what it loaded, swapped, kept, removed or
    /// failed to load.
    async fn apply(&self, st: &mut HostState, runs: Vec<Run>) -> Result<(), FunctionError> {
        if runs.is_empty() && st.rt.is_none() {
            return Ok(());
        }
        if st.rt.is_none() {
            self.create_runtime(st);
        }
        if st.rt.is_none() {
            return Ok(());
        }
        let specs = runs.iter().map(|r| r.spec.clone()).collect();
        let requested: HashMap<String, Run> =
            runs.into_iter().map(|r| (r.spec.name.clone(), r)).collect();
        if let Some(report) = self.work(st, &[], Some(specs), false).await? {
            record(st, &report, &requested);
        }
        Ok(())
    }

    fn create_runtime(&self, st: &mut HostState) {
        let caps = Arc::new(EdgeCaps {
            kv: st.kv.clone(),
            artifacts_dir: self.fetcher.dir().to_owned(),
            state: st.caps.clone(),
        });
        let config = RuntimeConfig {
            cache_dir: Some(self.cache_dir.clone()),
            log: LogLimits {
                lines_per_second: self.limits.log_lines_per_second,
                burst: self.limits.log_burst,
            },
            component_cache: CacheLimits {
                max_entries: self.limits.component_cache_entries,
                max_bytes: self.limits.component_cache_bytes,
            },
            cpu: CpuBudget {
                share_percent: self.limits.cpu_share_percent,
                burst: self.limits.cpu_burst,
                backoff: BackoffConfig {
                    max: self.limits.cpu_backoff_max,
                    ..CpuBudget::default().backoff
                },
            },
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
                info!(node = %self.ctx.node, "wasm runtime started");
                st.rt = Some(rt);
                st.runtime_error = None;
            }
            Err(e) => {
                let msg = render(&e);
                warn!(node = %self.ctx.node, error = %msg, "cannot start the wasm runtime");
                let _ = self.ctx.events.send(Event {
                    node: self.ctx.node.clone(),
                    at_ms: self.ctx.clock.now_ms(),
                    kind: EventKind::FunctionFailed {
                        function: "runtime".into(),
                    },
                    message: format!("cannot start the wasm runtime: {msg}"),
                });
                st.runtime_error = Some(msg);
            }
        }
    }
}

/// Takes over `plan`'s decisions into the slots and the capabilities' view
/// (models, point names); returns what to request from the runtime, in
/// desired order.
fn adopt(st: &mut HostState, plan: Plan) -> Vec<Run> {
    {
        let mut caps = st.caps.lock().unwrap_or_else(PoisonError::into_inner);
        caps.models = plan.models;
        caps.points = plan.points.into_iter().map(|(i, p)| (p, i)).collect();
    }
    for name in plan.stop.iter().chain(&plan.forget) {
        if let Some(slot) = st.slots.get_mut(name) {
            slot.desired = None;
        }
    }
    let mut runs = Vec::new();
    for f in plan.functions {
        runs.extend(f.run().cloned());
        let slot = st.slots.entry(f.desired.name.clone()).or_default();
        if f.changed {
            slot.load_failed = false;
            slot.last_error = None;
        }
        slot.desired = Some(f.desired);
    }
    runs
}

/// Records an apply report in the slots: what runs now and what failed.
fn record(st: &mut HostState, report: &ApplyReport, requested: &HashMap<String, Run>) {
    for name in report
        .loaded
        .iter()
        .chain(&report.replaced)
        .chain(&report.unchanged)
    {
        if let (Some(slot), Some(run)) = (st.slots.get_mut(name), requested.get(name)) {
            slot.loaded = Some((run.spec.clone(), run.inputs.clone()));
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
