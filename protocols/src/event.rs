//! Events: things that happened on a node that an operator should know about.

use serde::{Deserialize, Serialize};

/// Published (QoS 1, not retained) on the node's `events` topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The node.
    pub node: String,
    /// When, ms since epoch.
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// Human-readable detail.
    pub message: String,
}

/// Kinds of events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum EventKind {
    /// A desired-state document was refused (stale, unsigned, invalid).
    DesiredRejected {
        /// The revision it claimed, if it could be read.
        revision: Option<u64>,
    },
    /// A desired revision was applied.
    DesiredApplied {
        /// The revision.
        revision: u64,
    },
    /// A device function trapped, timed out, or failed to load.
    FunctionFailed {
        /// The function.
        function: String,
    },
    /// A device driver reported a fault.
    DriverFault {
        /// The device.
        device: String,
    },
    /// The outbox overflow policy dropped samples.
    OverflowDrop {
        /// The stream.
        stream: String,
        /// How many samples.
        dropped: u64,
    },
    /// A function or model was rolled back to its previous version.
    Rollback {
        /// What was rolled back.
        target: String,
    },
    /// The agent started after an unclean stop; samples in the window may be missing.
    UncleanRestart {
        /// Start of the window, ms since epoch.
        from_ms: u64,
        /// End of the window (the restart), ms since epoch.
        to_ms: u64,
    },
    /// A message from the hub could not be decoded.
    BadMessage {
        /// The topic it came on.
        topic: String,
    },
}
