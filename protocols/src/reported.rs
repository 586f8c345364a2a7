//! Reported state: what an edge node says about itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Published retained on the node's `reported` topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedState {
    /// The node.
    pub node: String,
    /// Highest desired revision the node has accepted and applied (0: none).
    pub applied_revision: u64,
    /// Per-function status, by function name.
    #[serde(default)]
    pub functions: BTreeMap<String, FunctionStatus>,
    /// Per-device status, by device id.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceStatus>,
    /// Samples waiting in the outbox.
    #[serde(default)]
    pub backlog: Backlog,
    /// When the node last lost its broker link, ms since epoch; `None` while the
    /// link has been up since the last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since_ms: Option<u64>,
    /// Monotonic counters (`samples_in`, `samples_dropped_overflow`, …).
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    /// The most recent unclean restarts (kill, power cut, crash), oldest
    /// first: samples timestamped inside a window may be missing. This is how
    /// the group-commit loss window is reported, never silently absorbed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loss_windows: Vec<LossWindow>,
    /// When this report was made, ms since epoch.
    pub at_ms: u64,
}

/// A time range in which samples may have been lost because the agent
/// stopped without a clean shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossWindow {
    /// Samples timestamped at or after this (ms since epoch) and not yet
    /// covered by a completed group commit may be missing: the last commit
    /// time minus the pipeline's maximum batch age.
    pub from_ms: u64,
    /// When the agent started again, ms since epoch.
    pub to_ms: u64,
}

/// Status of one device function.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionStatus {
    /// sha256 of the module running.
    pub module_sha256: String,
    /// `running`, `backoff`, `failed`, `loading`.
    pub state: String,
    /// Last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Samples in, samples out, errors, restarts.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// Status of one device connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStatus {
    /// Whether the driver is connected.
    pub connected: bool,
    /// Last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Mean request latency in ms over the last report interval.
    #[serde(default)]
    pub latency_ms: f64,
    /// Fraction of successful reads over the last report interval (0..=1).
    #[serde(default)]
    pub success_ratio: f64,
    /// Counters (`reads`, `errors`, `reconnects`, …).
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// Outbox backlog.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backlog {
    /// Samples not yet acknowledged.
    pub samples: u64,
    /// Bytes those samples use on disk.
    pub bytes: u64,
    /// Age of the oldest unacknowledged sample, in ms.
    pub oldest_age_ms: u64,
    /// Samples dropped by the overflow policy, ever.
    pub dropped: u64,
}
