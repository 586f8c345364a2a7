//! Applying a new desired state: drain buffered input through the running
//! versions, apply what can run, forget what is neither desired nor loaded.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError};

use device_runtime::{Capabilities, DeviceRuntime, RuntimeConfig};
use protocols::{Event, EventKind};
use tracing::{info, warn};

use super::caps::EdgeCaps;
use super::slots::HostState;
use super::spec::{point_names, runtime_spec};
use super::{FunctionError, FunctionHost, render};
use crate::artifacts::DesiredPair;

impl FunctionHost {
    /// Makes the runtime match `pair.current`: drains buffered input
    /// through the running versions, then applies.
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
}
