//! Per-function bookkeeping on the host side: what is desired and loaded,
//! the input buffer with its overflow limit, and the point -> function routes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use device_runtime::DeviceRuntime;
use protocols::{Event, EventKind, Sample};

use super::caps::CapState;
use super::{FunctionError, FunctionHost, MAX_BUFFERED_PER_FUNCTION};

/// Per-function bookkeeping on the host side.
#[derive(Debug, Default)]
pub(super) struct Slot {
    /// What desired state asks for.
    pub(super) desired: Option<protocols::FunctionSpec>,
    /// The runtime spec currently loaded and the node-wide indexes of its points.
    pub(super) loaded: Option<(device_runtime::FunctionSpec, Vec<u32>)>,
    /// Input waiting for `process` (node-wide indexes).
    pub(super) buffer: Vec<Sample>,
    /// When the oldest buffered sample arrived.
    pub(super) since_ms: u64,
    pub(super) last_error: Option<String>,
    pub(super) load_failed: bool,
    /// Cumulative counters (survive hot swaps and restarts).
    pub(super) samples_in: u64,
    pub(super) samples_out: u64,
    pub(super) errors: u64,
    pub(super) restarts: u64,
    pub(super) samples_failed: u64,
    pub(super) input_dropped: u64,
    pub(super) time_us: u64,
    /// Emitted samples dropped: point index outside the inputs (L3).
    pub(super) samples_bad_point: u64,
    /// When to log those.
    pub(super) bad_points: crate::burst::Burst,
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

pub(super) struct HostState {
    pub(super) rt: Option<DeviceRuntime>,
    pub(super) slots: BTreeMap<String, Slot>,
    pub(super) point_fns: HashMap<u32, Vec<String>>,
    pub(super) caps: Arc<Mutex<CapState>>,
    /// Guest key-value state with its quota (shared with the capabilities).
    pub(super) kv: Arc<super::kv::GuestKv>,
    pub(super) raw_stream: Option<String>,
    pub(super) batch_max_samples: usize,
    pub(super) batch_max_age_ms: u64,
    pub(super) runtime_error: Option<String>,
    /// Cache evictions the runtime reported so far (for the counter delta).
    pub(super) evictions_seen: u64,
}

impl FunctionHost {
    /// Routes incoming samples into function buffers (or raw, if no loaded
    /// or pending function consumes the point any more).
    pub(super) fn accept(
        &self,
        st: &mut HostState,
        samples: Vec<Sample>,
    ) -> Result<(), FunctionError> {
        let now = self.ctx.clock.now_ms();
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
                let _ = self.ctx.events.send(Event {
                    node: self.ctx.node.clone(),
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

    /// Samples no function takes go to the raw stream (or are counted as
    /// unrouted), through the writer the pipeline uses, which owns that rule.
    pub(super) fn to_raw(&self, st: &HostState, samples: &[Sample]) -> Result<(), FunctionError> {
        Ok(self.writer.append_raw(st.raw_stream.as_deref(), samples)?)
    }

    /// Makes the runtime match `pair.current`: drains buffered input
    pub(super) fn rebuild_routes(st: &mut HostState, leftovers: &mut Vec<Sample>) {
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
}
