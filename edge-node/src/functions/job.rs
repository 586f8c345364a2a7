//! One blocking job on the runtime (`apply`, `process`, `tick`) and what the
//! host does with its results: outputs to the outbox, counters, events.

use std::collections::HashMap;

use device_runtime::{ApplyReport, Batch, CallError, CallOutput, DeviceRuntime, RuntimeEvent};
use protocols::{Event, EventKind, Quality, Sample};
use tracing::{info, warn};

use super::caps::BlobModules;
use super::slots::HostState;
use super::{FunctionError, FunctionHost, render};

/// One `process` call to make: function, its input (node-wide) and that
/// input as a batch of the function's local point indexes.
type PendingCall = (String, Vec<Sample>, Batch);

/// One `process` call: function, its input (node-wide), the result and the
/// time it took in microseconds.
type CallResult = (String, Vec<Sample>, Result<CallOutput, CallError>, u64);

/// What one blocking job does.
struct Job {
    apply: Option<Vec<device_runtime::FunctionSpec>>,
    calls: Vec<PendingCall>,
    tick: bool,
    now: u64,
}

/// What one blocking job did.
struct JobResult {
    rt: DeviceRuntime,
    apply: Option<ApplyReport>,
    calls: Vec<CallResult>,
    ticks: Vec<(String, Result<CallOutput, CallError>)>,
    events: Vec<RuntimeEvent>,
    status: Vec<device_runtime::FunctionStatus>,
    cache: device_runtime::CacheStats,
}

impl Job {
    /// Runs on the blocking pool: `apply`, then every `process` call (timed),
    /// then `tick`; collects events and status.
    fn run(self, mut rt: DeviceRuntime, modules: &BlobModules) -> JobResult {
        let report = self.apply.map(|specs| rt.apply(&specs, modules, self.now));
        let mut results = Vec::with_capacity(self.calls.len());
        for (name, samples, batch) in self.calls {
            let t0 = tokio::time::Instant::now();
            let r = rt.process(&name, &batch, self.now);
            let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
            results.push((name, samples, r, us));
        }
        let ticks = if self.tick {
            rt.tick(self.now)
        } else {
            Vec::new()
        };
        let events = rt.drain_events();
        let status = rt.status();
        let cache = rt.component_cache_stats();
        JobResult {
            cache,
            rt,
            apply: report,
            calls: results,
            ticks,
            events,
            status,
        }
    }
}

/// One emitted batch with node-wide point indexes.
#[derive(Debug, Default, PartialEq)]
struct Mapped {
    /// The samples whose local index names one of the function's inputs.
    samples: Vec<Sample>,
    /// Samples dropped: their local index is outside the inputs.
    dropped: u64,
    /// The first local index that was out of range.
    first_bad: Option<u32>,
}

/// Maps the local point indexes of `batch` (positions in the function's
/// declared inputs) to node-wide indexes through `inputs`. A local index
/// outside `inputs` is never passed through as a node-wide index (it would
/// label the sample as some other device's point): the sample is dropped.
fn to_node_points(batch: &Batch, inputs: &[u32]) -> Mapped {
    let mut m = Mapped {
        samples: Vec::with_capacity(batch.len()),
        ..Mapped::default()
    };
    for i in 0..batch.len() {
        let Some((p, ts, v, q)) = batch.get(i) else {
            continue;
        };
        if let Some(&point) = usize::try_from(p).ok().and_then(|l| inputs.get(l)) {
            m.samples.push(Sample {
                point,
                ts_ms: ts,
                value: v,
                quality: Quality(q),
            });
        } else {
            m.dropped += 1;
            m.first_bad.get_or_insert(p);
        }
    }
    m
}

/// Takes the buffers of the loaded functions among `names` as batches.
fn take_batches(st: &mut HostState, names: &[String]) -> Vec<PendingCall> {
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
    calls
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
        let Some(rt) = st.rt.take() else {
            return Ok(None);
        };
        let job = Job {
            now: self.ctx.clock.now_ms(),
            calls: take_batches(st, names),
            apply,
            tick,
        };
        if job.apply.is_none() && job.calls.is_empty() && !job.tick {
            st.rt = Some(rt);
            return Ok(None);
        }
        let modules = BlobModules(self.fetcher.dir().to_owned());
        let r = tokio::task::spawn_blocking(move || job.run(rt, &modules))
            .await
            .map_err(|e| FunctionError::Task(e.to_string()))?;
        st.rt = Some(r.rt);
        let evicted = r.cache.evictions.saturating_sub(st.evictions_seen);
        st.evictions_seen = r.cache.evictions;
        crate::metrics::Counters::add(&self.ctx.counters.function_modules_evicted, evicted);
        let mut report = r.apply;
        // Outputs of outgoing versions first.
        if let Some(rep) = &mut report {
            for out in std::mem::take(&mut rep.flushed) {
                self.emit_for(st, &out.function, &out)?;
            }
        }
        self.record_calls(st, r.calls)?;
        self.record_ticks(st, r.ticks)?;
        for ev in r.events {
            self.on_runtime_event(st, ev);
        }
        self.publish_status(st, Some(&r.status));
        Ok(report)
    }

    /// Forwards what the `process` calls emitted and counts what they took,
    /// failed or (while the function backs off) put back into the buffer.
    fn record_calls(
        &self,
        st: &mut HostState,
        calls: Vec<CallResult>,
    ) -> Result<(), FunctionError> {
        for (name, samples, result, us) in calls {
            let Some(slot) = st.slots.get_mut(&name) else {
                continue;
            };
            slot.time_us += us;
            match result {
                Ok(out) => {
                    slot.samples_in += samples.len() as u64;
                    self.emit_for(st, &name, &out)?;
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
        Ok(())
    }

    /// Forwards what the `tick` calls emitted and counts their errors.
    fn record_ticks(
        &self,
        st: &mut HostState,
        ticks: Vec<(String, Result<CallOutput, CallError>)>,
    ) -> Result<(), FunctionError> {
        for (name, result) in ticks {
            match result {
                Ok(out) => self.emit_for(st, &name, &out)?,
                Err(e) => {
                    if let Some(slot) = st.slots.get_mut(&name) {
                        slot.errors += 1;
                        slot.last_error = Some(render(&e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Appends `out`, emitted by `function` (with its loaded version's point
    /// mapping), and counts it in the function's `samples_out`; samples with
    /// a point index outside the function's inputs are dropped and counted
    /// (`samples_bad_point`, L3).
    fn emit_for(
        &self,
        st: &mut HostState,
        function: &str,
        out: &CallOutput,
    ) -> Result<(), FunctionError> {
        let inputs = st
            .slots
            .get(function)
            .and_then(|s| s.loaded.as_ref().map(|(_, i)| i.clone()))
            .unwrap_or_default();
        let mut appended = 0;
        let mut dropped = 0;
        let mut first_bad = None;
        for s in &out.streams {
            if s.samples.is_empty() {
                continue;
            }
            let mapped = to_node_points(&s.samples, &inputs);
            dropped += mapped.dropped;
            first_bad = first_bad.or(mapped.first_bad);
            appended += mapped.samples.len() as u64;
            self.writer.append(&s.stream, &mapped.samples)?;
        }
        let Some(slot) = st.slots.get_mut(function) else {
            return Ok(());
        };
        slot.samples_out += appended;
        if dropped > 0 {
            slot.samples_bad_point += dropped;
            crate::metrics::Counters::add(&self.ctx.counters.function_samples_bad_point, dropped);
            let bad = first_bad.unwrap_or_default();
            let msg = format!(
                "emitted {dropped} sample(s) with point index {bad} (or others) outside its {} input(s); dropped",
                inputs.len()
            );
            if slot.bad_points.refuse(dropped) {
                warn!(%function, dropped, point = bad, inputs = inputs.len(),
                    "device function emitted samples for points it does not declare; dropped (further ones are counted, not logged, until it stops)");
            }
            slot.last_error = Some(msg);
        } else if appended > 0
            && let Some(n) = slot.bad_points.accept()
        {
            info!(%function, dropped = n, "device function emits declared points again; samples with undeclared points dropped in that burst");
        }
        Ok(())
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
            RuntimeEvent::Throttled {
                function,
                call_ms,
                times,
                until_ms,
            } => {
                crate::metrics::Counters::add(&self.ctx.counters.function_throttled, 1);
                warn!(%function, call_ms, times, until_ms, "device function over its CPU budget; held back");
                let m = format!(
                    "function {function} is over its CPU budget (a call took {call_ms} ms): held back until {until_ms} ms, {times} time(s) so far; its input stays buffered"
                );
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
        let _ = self.ctx.events.send(Event {
            node: self.ctx.node.clone(),
            at_ms: self.ctx.clock.now_ms(),
            kind: EventKind::FunctionFailed { function },
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_indexes_outside_the_inputs_are_dropped_not_passed_through() {
        let mut b = Batch::new();
        b.push(0, 10, 1.0, 0);
        b.push(1, 11, 2.0, 0);
        // Without the check, 7 went out as node-wide point 7 (another device's).
        b.push(7, 12, 3.0, 0);
        b.push(u32::MAX, 13, 4.0, 0);
        let m = to_node_points(&b, &[40, 41]);
        let points: Vec<(u32, u64)> = m.samples.iter().map(|s| (s.point, s.ts_ms)).collect();
        assert_eq!(points, vec![(40, 10), (41, 11)]);
        assert_eq!((m.dropped, m.first_bad), (2, Some(7)));
        // A function without inputs cannot emit any point.
        let m = to_node_points(&b, &[]);
        assert_eq!((m.samples.len(), m.dropped, m.first_bad), (0, 4, Some(0)));
    }
}
