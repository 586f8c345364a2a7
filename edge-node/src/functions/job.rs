//! One blocking job on the runtime (`apply`, `process`, `tick`) and what the
//! host does with its results: outputs to the outbox, counters, events.

use std::collections::HashMap;

use device_runtime::{ApplyReport, Batch, CallError, CallOutput, DeviceRuntime, RuntimeEvent};
use protocols::{Event, EventKind, Quality, Sample};
use tracing::{info, warn};

use super::caps::BlobModules;
use super::slots::HostState;
use super::{FunctionError, FunctionHost, render};

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

impl FunctionHost {
    /// One blocking job: optionally `apply`, then `process` the buffers of
    /// `names`, then optionally `tick`; then forwards outputs, events and
    /// status. Returns the apply report, if any.
    pub(super) async fn work(
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
}
