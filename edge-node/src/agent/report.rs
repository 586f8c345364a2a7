//! What the agent adds to the session's reported state: the outbox backlog,
//! device and function status, and the artifact fetcher's counters.

use protocols::{Backlog, ReportedState};

use crate::store::Store;

/// The backlog over every outbox at `now_ms`.
pub(super) fn backlog(store: &Store, now_ms: u64) -> Backlog {
    let mut backlog = Backlog::default();
    for o in store.outboxes() {
        let s = o.stats();
        backlog.samples += s.samples;
        backlog.bytes += s.bytes;
        backlog.dropped += s.dropped;
        if s.floor > 1 {
            backlog.floors.insert(o.stream().to_owned(), s.floor);
        }
        if let Some(ts) = s.oldest_ts_ms {
            backlog.oldest_age_ms = backlog.oldest_age_ms.max(now_ms.saturating_sub(ts));
        }
    }
    backlog
}

/// Fills in the parts of `r` only the agent knows.
pub(super) fn complete(r: &mut ReportedState, control: &super::control::Control) {
    r.backlog = backlog(&control.ctx.store, r.at_ms);
    r.devices = control.devices.statuses();
    r.functions = control.functions.snapshot();
    r.counters.extend(control.fetcher.counters().snapshot());
}
