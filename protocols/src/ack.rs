//! Cumulative acknowledgement of telemetry.

use serde::{Deserialize, Serialize};

/// The hub has made every sample of `stream` up to and including `up_to_seq`
/// durable. Acks are cumulative and idempotent: an older ack arriving late
/// changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// Stream name.
    pub stream: String,
    /// Highest sequence number made durable.
    pub up_to_seq: u64,
}
