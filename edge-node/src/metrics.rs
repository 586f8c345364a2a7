//! The agent's counters, in one place. They go into reported state
//! (`counters`) and the log; names are stable and documented here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Monotonic counters of one agent.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// All counters by name.
            pub fn snapshot(&self) -> BTreeMap<String, u64> {
                let mut m = BTreeMap::new();
                $(m.insert(stringify!($name).to_owned(), self.$name.load(Ordering::Relaxed));)*
                m
            }
        }
    };
}

counters! {
    /// Samples received from drivers.
    samples_in,
    /// Samples appended to an outbox.
    samples_appended,
    /// Samples that could not be appended (store error) — never silent.
    samples_append_failed,
    /// Samples with no destination (no function and no raw stream).
    samples_unrouted,
    /// Telemetry batches published.
    batches_published,
    /// Samples published (including resends).
    samples_published,
    /// Times the uplink rewound to the last ack and resent.
    resends,
    /// Acks applied.
    acks,
    /// Acks refused: no hub key is trusted yet, so nothing can be verified.
    acks_refused_no_key,
    /// Acks refused: not a signed ack envelope (e.g. a bare, unsigned ack).
    acks_refused_unsigned,
    /// Acks refused: the signature does not verify with the trusted hub key.
    acks_refused_bad_signature,
    /// Acks refused: signed for another node (replayed from its topic).
    acks_refused_wrong_node,
    /// Acks refused: signed, but the claim or its stream name is invalid.
    acks_refused_invalid,
    /// Verified acks for a stream with no outbox: ignored, no outbox created.
    acks_unknown_stream,
    /// Verified acks above the highest sequence number handed to the link:
    /// clamped to it.
    acks_beyond_published,
    /// Samples released by acks.
    samples_acked,
    /// Incoming messages that did not decode.
    bad_messages,
    /// Desired documents refused (stale, unsigned, invalid, outside the policy).
    desired_rejected,
    /// Of those, refused by the gateway's own `[policy]`.
    desired_refused_policy,
    /// Desired revisions applied.
    desired_applied,
    /// Events that could not be queued for publishing.
    events_dropped,
    /// Broker connections made.
    connects,
    /// Broker connections lost or refused.
    disconnects,
    /// Samples device functions emitted with a point index outside their
    /// declared inputs: dropped (per function: `samples_bad_point`).
    function_samples_bad_point,
    /// Guest kv puts refused: the function's quota (`[functions]
    /// kv_max_keys`, `kv_max_bytes`) is full (per function: `kv_refused`).
    function_kv_refused,
    /// Compiled device-function modules evicted from the in-memory cache
    /// (`[functions] component_cache_entries`, `component_cache_bytes`).
    function_modules_evicted,
    /// Times a device function was held back for exceeding its CPU budget
    /// (per function: `throttled`).
    function_throttled,
    /// Node certificates renewed and swapped in ([`crate::renewal`]).
    cert_renewals,
    /// Renewal attempts that failed (retried with backoff).
    cert_renewal_failures,
    /// Incoming messages the full link channel replaced by a newer one
    /// ([`crate::link::LinkQueue`]).
    link_messages_coalesced,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
