//! Online/offline status of a node; the offline form is also the MQTT last will.

use serde::{Deserialize, Serialize};

/// Whether a node's agent is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Connected.
    Online,
    /// Disconnected (set by the agent on clean shutdown, or by the broker via LWT).
    Offline,
}

/// Published retained on the node's `status` topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    /// The node.
    pub node: String,
    /// Online or offline.
    pub state: NodeState,
    /// When the agent said so, ms since the Unix epoch. For a last will this is
    /// the time the session connected, since the will is fixed at connect time.
    pub at_ms: u64,
}
