//! Rollouts: how one deployment revision reaches its nodes, and where it
//! stands.
//!
//! [`RolloutSpec`] is what the operator asks for (strategy, concurrency,
//! timeouts, health gate, abort criteria, offline policy). [`RolloutStatus`]
//! is the bounded summary the hub stores and serves: phase, current wave,
//! counts and the first [`MAX_FAILURES_KEPT`] failures. Per-node progress
//! lives in a separate [`RolloutProgress`] map the hub stores per node, so
//! no object grows with the fleet.
//!
//! # Invariants
//! - `status.counts` is always the sum of [`NodeProgress::contribution`] over
//!   the progress map (the planner keeps it so incrementally).
//! - A node is in at most one wave, assigned when that wave starts, and
//!   never moves; the last wave takes every node left, so it is 100 %.
//! - `status.failures` holds at most [`MAX_FAILURES_KEPT`] entries, the
//!   earliest ones; `counts.failed` counts them all.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::{Collector, Path, ValidationErrors, check_name};

/// The 48 h autonomy window: the longest any rollout wait or timeout may be.
pub const MAX_WAIT_MS: u64 = 48 * 60 * 60 * 1000;

/// Failures kept in [`RolloutStatus::failures`].
pub const MAX_FAILURES_KEPT: usize = 20;

/// Most entries in a waves strategy or abort criteria list.
pub const MAX_WAVES: usize = 100;

/// Most abort criteria of one rollout.
pub const MAX_ABORT_CRITERIA: usize = 8;

/// One rollout of a deployment revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The deployment being rolled out.
    pub deployment: String,
    /// The deployment revision every targeted node should end on.
    pub revision: u64,
    /// How many nodes change at a time.
    pub strategy: Strategy,
    /// Most nodes being delivered, applying or baking at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// How long a node has to apply the revision, counted from its
    /// acknowledgement of the delivery (never from creation: a node that has
    /// not heard of the revision cannot be late).
    #[serde(default = "default_node_timeout_ms")]
    pub node_timeout_ms: u64,
    /// How long an online node may leave a delivery unacknowledged before it
    /// is handled by the offline policy.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// What "healthy" means after a node applied the revision.
    #[serde(default)]
    pub health: HealthGate,
    /// Fleet-level thresholds that stop the rollout mid-wave.
    #[serde(default = "default_abort")]
    pub abort: Vec<AbortCriterion>,
    /// What an abort does to nodes already reached.
    #[serde(default)]
    pub on_abort: OnAbort,
    /// What happens to nodes that are offline when their turn comes.
    #[serde(default)]
    pub offline: OfflinePolicy,
}

fn default_max_concurrent() -> u32 {
    100
}
fn default_node_timeout_ms() -> u64 {
    10 * 60 * 1000
}
fn default_ack_timeout_ms() -> u64 {
    60 * 1000
}
fn default_abort() -> Vec<AbortCriterion> {
    vec![AbortCriterion {
        kind: None,
        threshold_percent: 20,
        min_executed: 5,
    }]
}

/// How the rollout grows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    /// Fixed waves; each entry is the cumulative share of the targeted nodes
    /// reached by the end of that wave. If the last entry does not reach
    /// every node, one more wave takes the rest.
    Waves {
        /// Cumulative wave sizes, increasing.
        waves: Vec<WaveSize>,
    },
    /// Waves that grow: `base` nodes first; each next wave is `factor` times
    /// the previous (at most `max`) once `after_succeeded` nodes in all are
    /// healthy, otherwise the same size again.
    Exponential {
        /// Size of the first wave.
        base: u32,
        /// Growth factor, in (1, 10].
        factor: f64,
        /// Healthy nodes needed before waves grow.
        after_succeeded: u32,
        /// Largest wave.
        max: u32,
    },
}

/// The cumulative size of a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WaveSize {
    /// This many nodes in all (at most every node).
    Count(u32),
    /// This percentage of the targeted nodes, rounded up (1..=100).
    Percent(u8),
}

impl WaveSize {
    /// The cumulative number of nodes out of `targeted`: percentages round
    /// up, so a non-empty fleet's first wave has at least one node.
    pub fn resolve(self, targeted: u32) -> u32 {
        match self {
            WaveSize::Count(c) => c.min(targeted),
            WaveSize::Percent(p) => {
                let n = u64::from(targeted) * u64::from(p.min(100));
                n.div_ceil(100) as u32
            }
        }
    }
}

/// What a node must show after applying to count as healthy. Judged by
/// [`super::gate::judge`] after `bake_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct HealthGate {
    /// How long a node runs the revision before it is judged.
    pub bake_ms: u64,
    /// Highest share of samples the node may drop over the bake (0..=1).
    pub max_drop_rate: f64,
    /// Highest share of failed function calls over the bake (0..=1).
    pub max_error_rate: f64,
    /// Every output stream of each changed function must advance at the
    /// hub (its watermark moves) during the bake.
    pub require_streams_advance: bool,
    /// Failed nodes a wave may have, in percent of its nodes that ran, and
    /// still pass its gate.
    pub max_failed_percent: u8,
}

impl Default for HealthGate {
    fn default() -> Self {
        Self {
            bake_ms: 60_000,
            max_drop_rate: 0.01,
            max_error_rate: 0.01,
            require_streams_advance: true,
            max_failed_percent: 0,
        }
    }
}

/// Why a node failed its part of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The node refused or could not apply the revision.
    ApplyFailed,
    /// The node acknowledged the delivery but did not apply within
    /// `node_timeout_ms`.
    ApplyTimeout,
    /// The node applied the revision and failed its health gate.
    Unhealthy,
    /// The node was offline and the offline policy says `fail`.
    Offline,
}

/// Abort the rollout once this share of executed nodes failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AbortCriterion {
    /// Count only failures of this kind (absent: every kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FailureKind>,
    /// Failed nodes in percent of executed nodes (healthy + failed), 1..=100.
    pub threshold_percent: u8,
    /// The criterion applies only once this many nodes executed (≥ 1).
    pub min_executed: u32,
}

/// What an abort does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnAbort {
    /// Stop sending; reached nodes keep what they have (phase `failed`).
    Halt,
    /// Stop sending and send every reached node back to its last healthy
    /// revision (phase `rolled_back`).
    #[default]
    Rollback,
}

/// What happens to a node that is offline (or never acknowledges) when its
/// turn comes. Offline never counts as failed unless this says `fail`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum OfflinePolicy {
    /// Mark it skipped and move on; deliver when it comes back (even after
    /// the rollout finished `succeeded_with_skipped`).
    #[default]
    Skip,
    /// Hold its wave for up to `max_ms` (≤ 48 h), then skip it.
    Wait {
        /// Longest wait, in ms.
        max_ms: u64,
    },
    /// Count it as failed (kind `offline`).
    Fail,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Waves are running.
    Progressing,
    /// The operator paused it: nothing new is sent.
    Paused,
    /// Every targeted node is healthy on the revision (within the wave
    /// tolerance).
    Succeeded,
    /// Done, but some nodes were skipped; they get the revision when they
    /// come back, and the phase becomes `succeeded` once none is left.
    SucceededWithSkipped,
    /// Aborted with `on_abort: halt`.
    Failed,
    /// Aborted with `on_abort: rollback`: reached nodes were sent back.
    RolledBack,
    /// A newer rollout of the same deployment replaced it.
    Superseded,
    /// The operator cancelled it. Reached nodes keep what they have.
    Cancelled,
}

impl RolloutPhase {
    /// Whether the rollout will never deliver its revision again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::RolledBack | Self::Superseded | Self::Cancelled
        )
    }
}

/// The bounded summary of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RolloutStatus {
    /// Where it stands.
    pub phase: RolloutPhase,
    /// The wave in progress (index into the strategy's waves; the implicit
    /// last wave of a waves strategy has index `waves.len()`); `None` before
    /// the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_wave: Option<u32>,
    /// Nodes in the current wave.
    #[serde(default)]
    pub wave_size: u32,
    /// When the current wave started, ms since epoch.
    #[serde(default)]
    pub wave_started_ms: u64,
    /// Per-state node counts.
    pub counts: RolloutCounts,
    /// The first [`MAX_FAILURES_KEPT`] failures.
    #[serde(default)]
    pub failures: Vec<FailureRecord>,
    /// When the rollout was created, ms since epoch.
    pub created_ms: u64,
    /// When it reached a final or `succeeded_with_skipped` phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Why it was aborted, cancelled or superseded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Node counts of a rollout. `delivered`, `applied` and `failed` count
/// nodes that reached that point in this rollout; the others count nodes in
/// that state now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RolloutCounts {
    /// Nodes the rollout covers.
    pub targeted: u32,
    /// Nodes that acknowledged the delivery.
    pub delivered: u32,
    /// Nodes that applied the revision.
    pub applied: u32,
    /// Nodes healthy on the revision.
    pub healthy: u32,
    /// Nodes that failed (also when later rolled back).
    pub failed: u32,
    /// Nodes waiting offline (policy `wait`).
    pub offline: u32,
    /// Nodes skipped (offline or paused), to be caught up.
    pub skipped: u32,
    /// Nodes back on their last healthy revision.
    pub rolled_back: u32,
    /// Nodes being delivered, applying or baking.
    pub in_flight: u32,
    /// `failed`, by kind.
    pub failed_by_kind: FailureCounts,
}

/// Failed nodes by [`FailureKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct FailureCounts {
    /// [`FailureKind::ApplyFailed`].
    pub apply_failed: u32,
    /// [`FailureKind::ApplyTimeout`].
    pub apply_timeout: u32,
    /// [`FailureKind::Unhealthy`].
    pub unhealthy: u32,
    /// [`FailureKind::Offline`].
    pub offline: u32,
}

impl FailureCounts {
    /// The count of one kind, or of all kinds.
    pub fn get(&self, kind: Option<FailureKind>) -> u32 {
        match kind {
            None => self.apply_failed + self.apply_timeout + self.unhealthy + self.offline,
            Some(FailureKind::ApplyFailed) => self.apply_failed,
            Some(FailureKind::ApplyTimeout) => self.apply_timeout,
            Some(FailureKind::Unhealthy) => self.unhealthy,
            Some(FailureKind::Offline) => self.offline,
        }
    }

    fn slot(&mut self, kind: FailureKind) -> &mut u32 {
        match kind {
            FailureKind::ApplyFailed => &mut self.apply_failed,
            FailureKind::ApplyTimeout => &mut self.apply_timeout,
            FailureKind::Unhealthy => &mut self.unhealthy,
            FailureKind::Offline => &mut self.offline,
        }
    }
}

impl RolloutCounts {
    /// Adds (`sign` 1) or removes (`sign` -1) one node's contribution.
    pub fn add(&mut self, c: &RolloutCounts, sign: i8) {
        let f = |a: &mut u32, b: u32| {
            *a = if sign >= 0 {
                a.saturating_add(b)
            } else {
                a.saturating_sub(b)
            };
        };
        f(&mut self.targeted, c.targeted);
        f(&mut self.delivered, c.delivered);
        f(&mut self.applied, c.applied);
        f(&mut self.healthy, c.healthy);
        f(&mut self.failed, c.failed);
        f(&mut self.offline, c.offline);
        f(&mut self.skipped, c.skipped);
        f(&mut self.rolled_back, c.rolled_back);
        f(&mut self.in_flight, c.in_flight);
        f(
            &mut self.failed_by_kind.apply_failed,
            c.failed_by_kind.apply_failed,
        );
        f(
            &mut self.failed_by_kind.apply_timeout,
            c.failed_by_kind.apply_timeout,
        );
        f(
            &mut self.failed_by_kind.unhealthy,
            c.failed_by_kind.unhealthy,
        );
        f(&mut self.failed_by_kind.offline, c.failed_by_kind.offline);
    }
}

/// One failure, as kept in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FailureRecord {
    /// The node.
    pub node: String,
    /// What kind of failure.
    pub kind: FailureKind,
    /// What happened, for people.
    pub reason: String,
    /// When, ms since epoch.
    pub at_ms: u64,
}

/// Per-node progress of one rollout, by node name. The hub stores each
/// entry under its node; only the planner walks the whole map.
pub type RolloutProgress = BTreeMap<String, NodeProgress>;

/// Where one node stands in a rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeProgress {
    /// The wave the node belongs to (`None`: not reached yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    /// Its state.
    pub state: NodeRolloutState,
    /// The last revision that was healthy on this node before the rollout:
    /// where a rollback sends it (`None`: nothing earlier was healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<u64>,
    /// When the revision was last sent, ms since epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_ms: Option<u64>,
    /// When the node acknowledged it (the apply timeout starts here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_ms: Option<u64>,
    /// When the node applied it (the bake starts here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_ms: Option<u64>,
    /// When the node was found offline (policy `wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since_ms: Option<u64>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
}

/// The state of one node in a rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeRolloutState {
    /// Not sent yet.
    #[default]
    Pending,
    /// Sent, not acknowledged.
    Delivering,
    /// Acknowledged, not applied.
    Applying,
    /// Applied, in its bake.
    Baking,
    /// Passed its health gate.
    Healthy,
    /// Failed (see [`NodeProgress::failure`]).
    Failed,
    /// Offline, waiting (policy `wait`).
    Offline,
    /// Skipped; caught up when it is back.
    Skipped,
    /// Sent back to its last healthy revision.
    RollingBack,
    /// Back on its last healthy revision.
    RolledBack,
}

impl NodeRolloutState {
    /// Delivering, applying or baking: counts against `max_concurrent`.
    pub fn in_flight(self) -> bool {
        matches!(self, Self::Delivering | Self::Applying | Self::Baking)
    }

    /// Whether the node is done as far as its wave's gate is concerned.
    pub fn settled(self) -> bool {
        matches!(
            self,
            Self::Healthy | Self::Failed | Self::Skipped | Self::RollingBack | Self::RolledBack
        )
    }
}

impl NodeProgress {
    /// A node not reached yet, rolled back to `rollback_to` on abort.
    pub fn new(rollback_to: Option<u64>) -> Self {
        Self {
            rollback_to,
            ..Self::default()
        }
    }

    /// This node's share of [`RolloutStatus::counts`].
    pub fn contribution(&self) -> RolloutCounts {
        let b = u32::from;
        let mut c = RolloutCounts {
            targeted: 1,
            delivered: b(self.acked_ms.is_some()),
            applied: b(self.applied_ms.is_some()),
            healthy: b(self.state == NodeRolloutState::Healthy),
            failed: b(self.failure.is_some()),
            offline: b(self.state == NodeRolloutState::Offline),
            skipped: b(self.state == NodeRolloutState::Skipped),
            rolled_back: b(self.state == NodeRolloutState::RolledBack),
            in_flight: b(self.state.in_flight()),
            failed_by_kind: FailureCounts::default(),
        };
        if let Some(k) = self.failure {
            *c.failed_by_kind.slot(k) = 1;
        }
        c
    }
}

impl RolloutStatus {
    /// A new rollout over `targets` (node name, last healthy revision),
    /// with its progress map.
    pub fn start(
        targets: impl IntoIterator<Item = (String, Option<u64>)>,
        now_ms: u64,
    ) -> (Self, RolloutProgress) {
        let progress: RolloutProgress = targets
            .into_iter()
            .map(|(n, r)| (n, NodeProgress::new(r)))
            .collect();
        let mut counts = RolloutCounts::default();
        for p in progress.values() {
            counts.add(&p.contribution(), 1);
        }
        let status = Self {
            phase: RolloutPhase::Progressing,
            current_wave: None,
            wave_size: 0,
            wave_started_ms: now_ms,
            counts,
            failures: Vec::new(),
            created_ms: now_ms,
            finished_ms: None,
            reason: None,
        };
        (status, progress)
    }

    /// The counts recomputed from scratch (what `counts` must equal).
    pub fn recount(progress: &RolloutProgress) -> RolloutCounts {
        let mut c = RolloutCounts::default();
        for p in progress.values() {
            c.add(&p.contribution(), 1);
        }
        c
    }

    /// Records a failure if fewer than [`MAX_FAILURES_KEPT`] are kept.
    pub fn record_failure(&mut self, node: &str, kind: FailureKind, reason: &str, at_ms: u64) {
        if self.failures.len() < MAX_FAILURES_KEPT {
            self.failures.push(FailureRecord {
                node: node.to_owned(),
                kind,
                reason: reason.to_owned(),
                at_ms,
            });
        }
    }
}

impl RolloutSpec {
    /// Checks every field; errors name the path under `rollout`, e.g.
    /// `rollout.strategy.waves[2]`.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector::new();
        let root = Path::Root;
        let r = root.field("rollout");
        check_name(&mut c, &r.field("deployment"), &self.deployment);
        if self.revision == 0 {
            c.push(&r.field("revision"), "revisions start at 1");
        }
        self.strategy.validate_at(&mut c, &r.field("strategy"));
        if !(1..=100_000).contains(&self.max_concurrent) {
            c.push(
                &r.field("max_concurrent"),
                format!("{} is out of range 1..=100000", self.max_concurrent),
            );
        }
        for (field, v) in [
            ("node_timeout_ms", self.node_timeout_ms),
            ("ack_timeout_ms", self.ack_timeout_ms),
        ] {
            if !(1_000..=MAX_WAIT_MS).contains(&v) {
                c.push(
                    &r.field(field),
                    format!("{v} is out of range 1000..={MAX_WAIT_MS} (48 h)"),
                );
            }
        }
        self.health.validate_at(&mut c, &r.field("health"));
        let ap = r.field("abort");
        if self.abort.len() > MAX_ABORT_CRITERIA {
            c.push(
                &ap,
                format!(
                    "{} criteria, more than {MAX_ABORT_CRITERIA}",
                    self.abort.len()
                ),
            );
        }
        for (i, a) in self.abort.iter().enumerate() {
            let ai = ap.index(i);
            if !(1..=100).contains(&a.threshold_percent) {
                c.push(
                    &ai.field("threshold_percent"),
                    format!("{} is out of range 1..=100", a.threshold_percent),
                );
            }
            if a.min_executed == 0 {
                c.push(&ai.field("min_executed"), "must be at least 1");
            }
        }
        if let OfflinePolicy::Wait { max_ms } = self.offline
            && !(1..=MAX_WAIT_MS).contains(&max_ms)
        {
            let op = r.field("offline");
            c.push(
                &op.field("max_ms"),
                format!("{max_ms} is out of range 1..={MAX_WAIT_MS} (the 48 h autonomy window)"),
            );
        }
        c.finish()
    }
}

impl Strategy {
    fn validate_at(&self, c: &mut Collector, path: &Path<'_>) {
        match self {
            Strategy::Waves { waves } => validate_waves(c, &path.field("waves"), waves),
            Strategy::Exponential {
                base,
                factor,
                after_succeeded: _,
                max,
            } => {
                if *base == 0 {
                    c.push(&path.field("base"), "must be at least 1");
                }
                if !(factor.is_finite() && *factor > 1.0 && *factor <= 10.0) {
                    c.push(
                        &path.field("factor"),
                        format!("{factor} is out of range (1, 10]"),
                    );
                }
                if max < base {
                    c.push(
                        &path.field("max"),
                        format!("{max} is less than base ({base})"),
                    );
                }
            }
        }
    }
}

fn validate_waves(c: &mut Collector, wp: &Path<'_>, waves: &[WaveSize]) {
    if waves.is_empty() {
        c.push(wp, "needs at least one wave");
    }
    if waves.len() > MAX_WAVES {
        c.push(wp, format!("{} waves, more than {MAX_WAVES}", waves.len()));
    }
    let (mut last_count, mut last_pct) = (0u32, 0u8);
    for (i, w) in waves.iter().enumerate() {
        let p = wp.index(i);
        if last_pct == 100 {
            c.push(
                &p,
                "comes after a 100 % wave, which already reaches every node",
            );
            continue;
        }
        match *w {
            WaveSize::Count(n) => {
                if n <= last_count {
                    c.push(
                        &p,
                        format!("count {n} must be more than the previous count ({last_count}): sizes are cumulative"),
                    );
                }
                last_count = last_count.max(n);
            }
            WaveSize::Percent(n) => {
                if !(1..=100).contains(&n) {
                    c.push(&p, format!("percent {n} is out of range 1..=100"));
                } else if n <= last_pct {
                    c.push(
                        &p,
                        format!("percent {n} must be more than the previous percent ({last_pct}): sizes are cumulative"),
                    );
                }
                last_pct = last_pct.max(n);
            }
        }
    }
}

impl HealthGate {
    fn validate_at(&self, c: &mut Collector, path: &Path<'_>) {
        if self.bake_ms > MAX_WAIT_MS {
            c.push(
                &path.field("bake_ms"),
                format!("{} is more than {MAX_WAIT_MS} (48 h)", self.bake_ms),
            );
        }
        for (field, v) in [
            ("max_drop_rate", self.max_drop_rate),
            ("max_error_rate", self.max_error_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                c.push(&path.field(field), format!("{v} is out of range 0..=1"));
            }
        }
        if self.max_failed_percent > 100 {
            c.push(
                &path.field("max_failed_percent"),
                format!("{} is out of range 0..=100", self.max_failed_percent),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> RolloutSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_sane_and_valid() {
        let s = spec(
            r#"{"deployment":"d","revision":1,"strategy":{"kind":"waves","waves":[{"percent":10},{"percent":100}]}}"#,
        );
        s.validate().unwrap();
        assert_eq!(s.on_abort, OnAbort::Rollback);
        assert_eq!(s.offline, OfflinePolicy::Skip);
        assert!(s.health.require_streams_advance && s.health.bake_ms > 0);
    }

    #[test]
    fn errors_name_the_path() {
        let s = spec(
            r#"{"deployment":"d","revision":0,
            "strategy":{"kind":"waves","waves":[{"count":5},{"percent":50},{"count":5},{"percent":100},{"count":9}]},
            "max_concurrent":0,"node_timeout_ms":5,
            "health":{"max_drop_rate":1.5},
            "abort":[{"threshold_percent":0,"min_executed":0}],
            "offline":{"policy":"wait","max_ms":172800001}}"#,
        );
        let e = s.validate().unwrap_err();
        let paths: Vec<&str> = e.errors().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "rollout.revision",
                "rollout.strategy.waves[2]",
                "rollout.strategy.waves[4]",
                "rollout.max_concurrent",
                "rollout.node_timeout_ms",
                "rollout.health.max_drop_rate",
                "rollout.abort[0].threshold_percent",
                "rollout.abort[0].min_executed",
                "rollout.offline.max_ms",
            ],
            "{e}"
        );
        let e = spec(r#"{"deployment":"d","revision":1,"strategy":{"kind":"exponential","base":0,"factor":1.0,"after_succeeded":1,"max":0}}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rollout.strategy.base") && e.contains("rollout.strategy.factor"),
            "{e}"
        );
        assert!(serde_json::from_str::<RolloutSpec>(r#"{"deployment":"d","revision":1,"strategy":{"kind":"waves","waves":[]},"colour":1}"#).is_err());
    }

    #[test]
    fn percentages_round_up() {
        assert_eq!(WaveSize::Percent(1).resolve(30), 1);
        assert_eq!(WaveSize::Percent(10).resolve(30), 3);
        assert_eq!(WaveSize::Percent(34).resolve(3), 2);
        assert_eq!(WaveSize::Percent(100).resolve(7), 7);
        assert_eq!(WaveSize::Count(50).resolve(7), 7);
        assert_eq!(WaveSize::Percent(5).resolve(0), 0);
    }

    #[test]
    fn failures_are_bounded() {
        let (mut s, _) = RolloutStatus::start([("a".to_owned(), None)], 0);
        for i in 0..50 {
            s.record_failure(&format!("n{i}"), FailureKind::Unhealthy, "trap", i);
        }
        assert_eq!(s.failures.len(), MAX_FAILURES_KEPT);
        assert_eq!(s.failures[0].node, "n0");
    }
}
