//! Reported state: what an edge node says about itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Published retained on the node's `reported` topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportedState {
    /// The node.
    pub node: String,
    /// Highest desired revision the node has accepted and applied (0: none).
    pub applied_revision: u64,
    /// Highest desired revision the node received, verified (signature,
    /// node, revision, validation) and persisted, whether or not it is
    /// applied yet (0: none). This is the node's acknowledgement of a
    /// delivery: a rollout's apply timeout starts when it moves.
    #[serde(default)]
    pub received_revision: u64,
    /// Highest received revision whose artifacts (modules, models) are all
    /// downloaded and verified on local disk (0: none). Activation of a
    /// revision never waits for the network once it is staged.
    #[serde(default)]
    pub staged_revision: u64,
    /// The last desired document the node refused, if any since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejection>,
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

/// A desired document the node refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Rejection {
    /// The revision it claimed, if it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Why, naming the field where one is at fault.
    pub reason: String,
    /// When, ms since epoch.
    pub at_ms: u64,
}

/// A time range in which samples may have been lost because the agent
/// stopped without a clean shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FunctionStatus {
    /// sha256 of the module running.
    pub module_sha256: String,
    /// Running, backing off, failed or loading.
    pub state: FunctionState,
    /// Last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Samples in, samples out, errors, restarts.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    /// Set when the node itself put the function back on its previous
    /// module because the desired one failed after activation; cleared when
    /// a new desired revision names a different module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<FunctionRollback>,
}

/// A node-level rollback of one function.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FunctionRollback {
    /// The desired module that failed.
    pub from_sha256: String,
    /// The module running instead (the previous revision's).
    pub to_sha256: String,
    /// What failed, e.g. the trap.
    pub reason: String,
    /// When, ms since epoch.
    pub at_ms: u64,
}

/// Health of one device function, as the node reports it. On the wire it is
/// one of the strings `running`, `backoff`, `failed`, `loading`; any other
/// string is a decoding error that names the field (like an unknown field,
/// since these documents are `deny_unknown_fields`): a new state is a
/// protocol change, not something to guess at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum FunctionState {
    /// An instance of the function is live and takes input (while a new
    /// module downloads, that is the previous version).
    Running,
    /// The instance crashed and waits for its restart; `last_error` says why.
    /// Input stays buffered.
    Backoff,
    /// Nothing runs: the module failed to load, or the node's wasm runtime
    /// could not start; `last_error` says why.
    Failed,
    /// Desired but not started yet: its module or a granted model is still
    /// downloading. Input stays buffered.
    #[default]
    Loading,
}

/// Status of one device connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Per stream, the outbox floor: the lowest sequence number the node may
    /// still send (everything below was acked or dropped by the overflow
    /// policy). Streams whose floor is still 1 are left out. The hub moves a
    /// stream's watermark over the drops a batch declares only as far as
    /// this confirms.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub floors: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_states_are_the_strings_of_the_wire() {
        for (state, text) in [
            (FunctionState::Running, "\"running\""),
            (FunctionState::Backoff, "\"backoff\""),
            (FunctionState::Failed, "\"failed\""),
            (FunctionState::Loading, "\"loading\""),
        ] {
            assert_eq!(serde_json::to_string(&state).unwrap(), text);
            assert_eq!(serde_json::from_str::<FunctionState>(text).unwrap(), state);
        }
    }

    #[test]
    fn an_unknown_function_state_is_an_error_that_lists_the_known_ones() {
        let e = serde_json::from_str::<FunctionState>("\"stopped\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `stopped`"), "{e}");
        assert!(
            e.contains("`running`, `backoff`, `failed`, `loading`"),
            "{e}"
        );
        assert!(serde_json::from_str::<FunctionState>("\"Running\"").is_err());
    }
}
