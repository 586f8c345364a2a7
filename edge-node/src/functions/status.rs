//! The function status reported state shows: the state of every desired
//! function ([`reported_state`]) with its module, last error and counters.

use std::collections::{BTreeMap, HashMap};

use device_runtime::FunctionState as RuntimeState;
use protocols::{FunctionState, FunctionStatus};

use super::FunctionHost;
use super::kv::KvStats;
use super::slots::{HostState, Slot};

impl FunctionHost {
    /// Publishes the status of every desired function to the view.
    /// `runtime` is the runtime's status right after a job; `None` between
    /// jobs (after a reconcile), when the last published state carries over.
    pub(super) fn publish_status(
        &self,
        st: &HostState,
        runtime: Option<&[device_runtime::FunctionStatus]>,
    ) {
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
            let rs = by_name.get(name.as_str()).copied();
            let (state, runtime_error) = reported_state(
                rs.map(|s| &s.state),
                runtime.is_some(),
                prev.remove(name),
                slot.loaded.is_some(),
                slot.load_failed || st.runtime_error.is_some(),
            );
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
                    state,
                    last_error: runtime_error
                        .or_else(|| slot.last_error.clone())
                        .or_else(|| st.runtime_error.clone()),
                    counters: counters(slot, rs, st.kv.stats(name)),
                    rolled_back: None,
                },
            );
        }
        self.view.set(out);
    }
}

/// The reported state of one desired function, and the runtime's error for
/// it if it backs off. `runtime` is its health in the runtime's status,
/// `fresh` whether that status was just taken (otherwise `previous`, what
/// was last published, carries over while the function stays `loaded`);
/// `failed`: its module failed to load or the runtime could not start.
fn reported_state(
    runtime: Option<&RuntimeState>,
    fresh: bool,
    previous: Option<FunctionStatus>,
    loaded: bool,
    failed: bool,
) -> (FunctionState, Option<String>) {
    match runtime {
        Some(RuntimeState::Restarting { last_error, .. }) => {
            (FunctionState::Backoff, Some(last_error.clone()))
        }
        Some(RuntimeState::Throttled { until_ms, strikes }) => (
            FunctionState::Backoff,
            Some(format!(
                "over its CPU budget ([functions] cpu_share_percent): held back until {until_ms} ms (overdraw {strikes} in a row); input stays buffered"
            )),
        ),
        Some(RuntimeState::Running) => (FunctionState::Running, None),
        // No fresh runtime status: keep the last one we published.
        None if !fresh && loaded => match previous {
            Some(p) if p.state == FunctionState::Backoff => (FunctionState::Backoff, p.last_error),
            Some(p) => (FunctionState::Running, p.last_error),
            None => (FunctionState::Running, None),
        },
        None if failed => (FunctionState::Failed, None),
        None => (FunctionState::Loading, None),
    }
}

/// The host's counters of a function, its kv usage and refusals
/// (`kv_keys`, `kv_bytes`, `kv_refused`) once it used its store, plus the
/// runtime's (`denied`, `log_dropped`, `guest.*`) when it has a status for it.
fn counters(
    slot: &Slot,
    runtime: Option<&device_runtime::FunctionStatus>,
    kv: Option<KvStats>,
) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::from([
        ("samples_in".to_owned(), slot.samples_in),
        ("samples_out".to_owned(), slot.samples_out),
        ("errors".to_owned(), slot.errors),
        ("restarts".to_owned(), slot.restarts),
        ("time_us".to_owned(), slot.time_us),
        ("samples_failed".to_owned(), slot.samples_failed),
        ("input_dropped".to_owned(), slot.input_dropped),
        ("input_buffered".to_owned(), slot.buffer.len() as u64),
        ("samples_bad_point".to_owned(), slot.samples_bad_point),
    ]);
    if let Some(kv) = kv {
        counters.insert("kv_keys".to_owned(), kv.usage.keys);
        counters.insert("kv_bytes".to_owned(), kv.usage.bytes);
        counters.insert("kv_refused".to_owned(), kv.refused);
    }
    if let Some(rs) = runtime {
        counters.insert("denied".to_owned(), rs.denied);
        counters.insert("log_dropped".to_owned(), rs.log_dropped);
        counters.insert("throttled".to_owned(), rs.throttled);
        for (k, v) in &rs.counters {
            counters.insert(format!("guest.{k}"), *v);
        }
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(state: FunctionState, last_error: Option<&str>) -> FunctionStatus {
        FunctionStatus {
            state,
            last_error: last_error.map(str::to_owned),
            ..FunctionStatus::default()
        }
    }

    #[test]
    fn the_runtime_status_decides_when_it_has_the_function() {
        let crashed = RuntimeState::Restarting {
            due_ms: 5,
            last_error: "trap".into(),
        };
        for fresh in [true, false] {
            assert_eq!(
                reported_state(Some(&crashed), fresh, None, true, false),
                (FunctionState::Backoff, Some("trap".into()))
            );
            let prev = Some(published(FunctionState::Backoff, Some("old")));
            assert_eq!(
                reported_state(Some(&RuntimeState::Running), fresh, prev, true, true),
                (FunctionState::Running, None)
            );
            let held = RuntimeState::Throttled {
                until_ms: 900,
                strikes: 2,
            };
            let (state, error) = reported_state(Some(&held), fresh, None, true, false);
            assert_eq!(state, FunctionState::Backoff);
            let error = error.unwrap_or_default();
            assert!(
                error.contains("CPU budget") && error.contains("900 ms"),
                "{error}"
            );
        }
    }

    #[test]
    fn without_a_fresh_status_a_loaded_function_keeps_what_was_published() {
        let prev = Some(published(FunctionState::Backoff, Some("trap")));
        assert_eq!(
            reported_state(None, false, prev, true, false),
            (FunctionState::Backoff, Some("trap".into()))
        );
        // Anything else published before reads as running once loaded.
        for was in [
            FunctionState::Loading,
            FunctionState::Failed,
            FunctionState::Running,
        ] {
            assert_eq!(
                reported_state(None, false, Some(published(was, None)), true, false).0,
                FunctionState::Running
            );
        }
        assert_eq!(
            reported_state(None, false, None, true, true),
            (FunctionState::Running, None)
        );
    }

    #[test]
    fn a_function_that_is_not_running_is_failed_or_loading() {
        for (fresh, loaded) in [(false, false), (true, false), (true, true)] {
            let prev = Some(published(FunctionState::Backoff, Some("trap")));
            assert_eq!(
                reported_state(None, fresh, prev.clone(), loaded, true),
                (FunctionState::Failed, None)
            );
            assert_eq!(
                reported_state(None, fresh, prev, loaded, false),
                (FunctionState::Loading, None)
            );
        }
    }
}
