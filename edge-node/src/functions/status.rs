//! The function status reported state shows.

use std::collections::{BTreeMap, HashMap};

use device_runtime::FunctionState;
use protocols::FunctionStatus;

use super::FunctionHost;
use super::slots::HostState;

impl FunctionHost {
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
