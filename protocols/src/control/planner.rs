//! The rollout planner: pure functions from a rollout's state to the next
//! actions, and folds of what happened back into that state.
//!
//! The hub's loop is: [`plan`] → perform each [`Action`] (publish, count,
//! persist) → [`apply`] it; when the fleet answers, [`observe`] the
//! [`Observation`]; operator requests go through [`command`]. [`tick`] is
//! `plan` followed by `apply` of every action. Nothing here reads a clock
//! (`now_ms` is passed in) or does I/O, so every rule below is
//! property-tested (`protocols/tests/control_props.rs`).
//!
//! # Invariants
//! - Never more than `max_concurrent` nodes delivering, applying or baking:
//!   only [`Action::Deliver`] puts a node in flight, and `plan` emits at most
//!   the free slots. An acknowledgement from a node that is not in flight is
//!   ignored (it is delivered again when its turn comes).
//! - A wave advances only when every node in it is settled and its gate
//!   passed (failed ≤ `health.max_failed_percent` of those that ran);
//!   otherwise the rollout aborts.
//! - An offline node never counts as failed unless the policy is `fail`.
//!   `skip` marks it skipped and delivers when it is back (also after the
//!   rollout finished `succeeded_with_skipped`); `wait` holds its wave up to
//!   `max_ms`, then skips it. A node that is online but leaves a delivery
//!   unacknowledged for `ack_timeout_ms` is handled the same way (with
//!   `skip` it is delivered again, at most once per `ack_timeout_ms`).
//! - The apply timeout starts at the node's acknowledgement, never at
//!   delivery or creation.
//! - Paused, cancelled, superseded, failed and succeeded rollouts emit
//!   nothing; a rolled-back one emits only [`Action::RollBack`], each to the
//!   node's last healthy revision before the rollout, once per node it ever
//!   delivered to.
//! - Restart-safe: state is the (status, progress) pair the hub persists
//!   after each `apply`/`observe`. If the hub dies between performing an
//!   action and persisting it, `plan` emits it again; delivery is a retained,
//!   revision-numbered document, so a repeat changes no outcome.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::gate::HealthVerdict;
use super::node::NodeView;
use super::rollout::{
    FailureKind, NodeProgress, NodeRolloutState as S, OfflinePolicy, OnAbort, RolloutPhase,
    RolloutProgress, RolloutSpec, RolloutStatus, Strategy, WaveSize,
};

/// What the planner asks the hub to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Start wave `wave` with the next `size` nodes (in name order).
    AdvanceWave {
        /// The wave's index.
        wave: u32,
        /// Nodes in it.
        size: u32,
    },
    /// Publish the rollout's revision to the node.
    Deliver {
        /// The node.
        node: String,
        /// The deployment revision.
        revision: u64,
    },
    /// The node's bake is over: judge it ([`super::gate::judge`]) and
    /// observe the verdict. Repeated each plan until the verdict arrives.
    JudgeHealth {
        /// The node.
        node: String,
    },
    /// The node is offline and its wave waits for it (policy `wait`).
    MarkOffline {
        /// The node.
        node: String,
    },
    /// The node is skipped (offline or paused); it is caught up later.
    MarkSkipped {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// The node failed.
    MarkFailed {
        /// The node.
        node: String,
        /// How.
        kind: FailureKind,
        /// For people.
        reason: String,
    },
    /// Send the node back to its last healthy revision.
    RollBack {
        /// The node.
        node: String,
        /// The deployment revision to render for it.
        to_revision: u64,
    },
    /// Stop the rollout (then roll back or halt, per `on_abort`).
    Abort {
        /// Why.
        reason: String,
    },
    /// The rollout is done, in this phase.
    Complete {
        /// `succeeded` or `succeeded_with_skipped`.
        phase: RolloutPhase,
    },
}

/// What the hub learned about a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "observed", rename_all = "snake_case", deny_unknown_fields)]
pub enum Observation {
    /// The node acknowledged the delivered revision.
    Acked {
        /// The node.
        node: String,
    },
    /// The node reports it applied the revision.
    Applied {
        /// The node.
        node: String,
    },
    /// The node refused or failed to apply the revision.
    ApplyFailed {
        /// The node.
        node: String,
        /// Its error.
        reason: String,
    },
    /// The verdict of a [`Action::JudgeHealth`] (an `unhealthy` verdict may
    /// also come early, e.g. on a trap during the bake).
    Health {
        /// The node.
        node: String,
        /// Healthy or not, and why.
        verdict: HealthVerdict,
    },
    /// The node's session went down.
    Offline {
        /// The node.
        node: String,
    },
    /// The node's session came up.
    Online {
        /// The node.
        node: String,
    },
    /// The node is back on its rollback revision.
    RolledBack {
        /// The node.
        node: String,
    },
}

/// An operator's request, e.g. `{"command":"supersede","by":"r2"}`. Extra
/// fields are refused on `supersede`; on the tag-only commands (`pause`,
/// `resume`, `cancel`) serde cannot refuse them (internally tagged unit
/// variants), so the REST layer should check the body has only `command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Stop sending until resumed.
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Stop for good; always accepted.
    Cancel,
    /// A newer rollout of the same deployment replaces this one; always
    /// accepted.
    Supersede {
        /// The newer rollout.
        by: String,
    },
}

/// A command that does not apply to the rollout's phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} a rollout that is {phase:?}")]
pub struct CommandError {
    /// `pause` or `resume`.
    pub command: &'static str,
    /// The rollout's phase.
    pub phase: RolloutPhase,
}

/// What folding an action or observation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folded {
    /// The state changed.
    Changed,
    /// Nothing changed, and why (the hub counts these; e.g. a late
    /// acknowledgement, an unknown node).
    Unchanged(&'static str),
}

/// The next actions. Pure; call [`apply`] for each after performing it.
pub fn plan(
    spec: &RolloutSpec,
    status: &RolloutStatus,
    progress: &RolloutProgress,
    nodes: &BTreeMap<String, NodeView>,
    now_ms: u64,
) -> Vec<Action> {
    match status.phase {
        RolloutPhase::RolledBack => rollbacks(progress),
        RolloutPhase::Progressing | RolloutPhase::SucceededWithSkipped => {
            plan_active(spec, status, progress, nodes, now_ms)
        }
        RolloutPhase::Paused
        | RolloutPhase::Succeeded
        | RolloutPhase::Failed
        | RolloutPhase::Superseded
        | RolloutPhase::Cancelled => Vec::new(),
    }
}

/// [`plan`], then [`apply`] of every action it returned.
pub fn tick(
    spec: &RolloutSpec,
    status: &mut RolloutStatus,
    progress: &mut RolloutProgress,
    nodes: &BTreeMap<String, NodeView>,
    now_ms: u64,
) -> Vec<Action> {
    let actions = plan(spec, status, progress, nodes, now_ms);
    for a in &actions {
        apply(spec, status, progress, a, now_ms);
    }
    actions
}

fn rollbacks(progress: &RolloutProgress) -> Vec<Action> {
    progress
        .iter()
        .filter(|(_, p)| {
            p.delivered_ms.is_some() && !matches!(p.state, S::RollingBack | S::RolledBack)
        })
        .filter_map(|(n, p)| {
            p.rollback_to.map(|to| Action::RollBack {
                node: n.clone(),
                to_revision: to,
            })
        })
        .collect()
}

fn abort(spec: &RolloutSpec, progress: &RolloutProgress, reason: String) -> Vec<Action> {
    let mut out = vec![Action::Abort { reason }];
    if spec.on_abort == OnAbort::Rollback {
        out.extend(rollbacks(progress));
    }
    out
}

fn plan_active(
    spec: &RolloutSpec,
    status: &RolloutStatus,
    progress: &RolloutProgress,
    nodes: &BTreeMap<String, NodeView>,
    now_ms: u64,
) -> Vec<Action> {
    let progressing = status.phase == RolloutPhase::Progressing;
    if progressing && let Some(reason) = abort_reason(spec, status) {
        return abort(spec, progress, reason);
    }
    let mut actions = Vec::new();
    let mut eligible = Vec::new();
    let mut marked = false;
    for (name, p) in progress {
        if p.wave.is_none() {
            continue;
        }
        // A skipped node is caught up once its wave is behind (or the
        // rollout is done); until then only an `online` observation (which
        // makes it pending) brings it back, so it never holds its own wave.
        let catch_up = !progressing || p.wave < status.current_wave;
        match node_step(spec, name, p, nodes.get(name), catch_up, now_ms) {
            Step::Nothing => {}
            Step::Eligible => eligible.push((catch_up, p.delivered_ms, name)),
            Step::Act(a) => {
                // Only what changes the current wave defers its gate;
                // catch-ups of earlier waves never hold it.
                marked |= !catch_up && !matches!(a, Action::JudgeHealth { .. });
                actions.push(a);
            }
        }
    }
    let free = spec.max_concurrent.saturating_sub(status.counts.in_flight) as usize;
    // The current wave first, then catch-ups least recently tried first,
    // so neither a node that never answers nor a backlog of catch-ups
    // starves the rest.
    eligible.sort();
    let delivered = eligible.iter().take(free).filter(|(c, _, _)| !c).count();
    actions.extend(
        eligible
            .into_iter()
            .take(free)
            .map(|(_, _, n)| Action::Deliver {
                node: n.clone(),
                revision: spec.revision,
            }),
    );
    if marked || delivered > 0 {
        return actions;
    }
    if progressing {
        actions.extend(wave_control(spec, status, progress));
    } else if progress.values().all(|p| done(p.state)) {
        actions.push(Action::Complete {
            phase: RolloutPhase::Succeeded,
        });
    }
    actions
}

/// Healthy, failed or rolled back: nothing more will happen to the node.
fn done(s: S) -> bool {
    matches!(s, S::Healthy | S::Failed | S::RollingBack | S::RolledBack)
}

enum Step {
    Nothing,
    Eligible,
    Act(Action),
}

fn node_step(
    spec: &RolloutSpec,
    name: &str,
    p: &NodeProgress,
    view: Option<&NodeView>,
    catch_up: bool,
    now: u64,
) -> Step {
    let connected = view.is_some_and(|v| v.connected);
    let paused = view.is_some_and(|v| v.paused);
    let since = |t: Option<u64>| now.saturating_sub(t.unwrap_or(now));
    match p.state {
        S::Pending | S::Offline | S::Skipped if paused => {
            if p.state == S::Skipped {
                Step::Nothing
            } else {
                Step::Act(Action::MarkSkipped {
                    node: name.to_owned(),
                    reason: "the node is paused".to_owned(),
                })
            }
        }
        S::Pending | S::Offline if connected && wait_expired(spec, p, now) => {
            offline_step(spec, name, p, now)
        }
        S::Skipped if connected && !catch_up => Step::Nothing,
        S::Pending | S::Offline | S::Skipped if connected => Step::Eligible,
        S::Pending | S::Offline | S::Skipped => offline_step(spec, name, p, now),
        S::Delivering if !connected || since(p.delivered_ms) > spec.ack_timeout_ms => {
            offline_step(spec, name, p, now)
        }
        S::Applying | S::Baking if !connected => offline_step(spec, name, p, now),
        S::Applying if p.acked_ms.is_some() && since(p.acked_ms) > spec.node_timeout_ms => {
            Step::Act(Action::MarkFailed {
                node: name.to_owned(),
                kind: FailureKind::ApplyTimeout,
                reason: format!(
                    "acknowledged but not applied within {} ms",
                    spec.node_timeout_ms
                ),
            })
        }
        S::Baking if p.applied_ms.is_some() && since(p.applied_ms) >= spec.health.bake_ms => {
            Step::Act(Action::JudgeHealth {
                node: name.to_owned(),
            })
        }
        S::Delivering
        | S::Applying
        | S::Baking
        | S::Healthy
        | S::Failed
        | S::RollingBack
        | S::RolledBack => Step::Nothing,
    }
}

fn offline_step(spec: &RolloutSpec, name: &str, p: &NodeProgress, now: u64) -> Step {
    let node = name.to_owned();
    match spec.offline {
        OfflinePolicy::Skip if p.state == S::Skipped => Step::Nothing,
        OfflinePolicy::Skip => Step::Act(Action::MarkSkipped {
            node,
            reason: "offline when its turn came".to_owned(),
        }),
        OfflinePolicy::Fail => Step::Act(Action::MarkFailed {
            node,
            kind: FailureKind::Offline,
            reason: "offline when its turn came (offline policy: fail)".to_owned(),
        }),
        OfflinePolicy::Wait { max_ms } => match p.state {
            S::Skipped => Step::Nothing,
            _ if wait_expired(spec, p, now) => Step::Act(Action::MarkSkipped {
                node,
                reason: format!("unreachable for more than {max_ms} ms"),
            }),
            S::Offline => Step::Nothing,
            _ => Step::Act(Action::MarkOffline { node }),
        },
    }
}

/// Policy `wait` and the node has been unreachable (offline, or online but
/// silent) for longer than `max_ms`. The clock starts when it was first
/// found unreachable and survives re-deliveries, so a node that is online
/// but never answers cannot hold its wave forever.
fn wait_expired(spec: &RolloutSpec, p: &NodeProgress, now: u64) -> bool {
    match spec.offline {
        OfflinePolicy::Wait { max_ms } => p
            .offline_since_ms
            .is_some_and(|t| now.saturating_sub(t) > max_ms),
        OfflinePolicy::Skip | OfflinePolicy::Fail => false,
    }
}

fn abort_reason(spec: &RolloutSpec, status: &RolloutStatus) -> Option<String> {
    let c = &status.counts;
    let executed = c.healthy + c.failed;
    spec.abort.iter().enumerate().find_map(|(i, a)| {
        let failed = c.failed_by_kind.get(a.kind);
        let hit = executed >= a.min_executed
            && failed > 0
            && u64::from(failed) * 100 >= u64::from(a.threshold_percent) * u64::from(executed);
        hit.then(|| {
            let kind = a.kind.map(|k| format!(" ({k:?})")).unwrap_or_default();
            format!(
                "abort[{i}]: {failed} of {executed} executed nodes failed{kind}, at or above {} %",
                a.threshold_percent
            )
        })
    })
}

fn wave_control(
    spec: &RolloutSpec,
    status: &RolloutStatus,
    progress: &RolloutProgress,
) -> Vec<Action> {
    let Some(k) = status.current_wave else {
        return match next_wave(spec, status, progress) {
            Some((wave, size)) => vec![Action::AdvanceWave { wave, size }],
            None => vec![Action::Complete {
                phase: RolloutPhase::Succeeded,
            }],
        };
    };
    let in_wave = || progress.values().filter(move |p| p.wave == Some(k));
    if !in_wave().all(|p| p.state.settled()) {
        return Vec::new();
    }
    let failed = in_wave().filter(|p| p.failure.is_some()).count() as u64;
    let ran = failed + in_wave().filter(|p| p.state == S::Healthy).count() as u64;
    if failed * 100 > u64::from(spec.health.max_failed_percent) * ran {
        return abort(
            spec,
            progress,
            format!(
                "wave {k} failed its gate: {failed} of {ran} nodes failed, more than {} %",
                spec.health.max_failed_percent
            ),
        );
    }
    if let Some((wave, size)) = next_wave(spec, status, progress) {
        return vec![Action::AdvanceWave { wave, size }];
    }
    let phase = if progress.values().all(|p| done(p.state)) {
        RolloutPhase::Succeeded
    } else {
        RolloutPhase::SucceededWithSkipped
    };
    vec![Action::Complete { phase }]
}

/// The waves of a waves strategy over `targeted` nodes: (wave index, size),
/// every size ≥ 1, sizes summing to `targeted`. Entries that add no node
/// (rounding) are left out; if the entries do not reach every node, a last
/// wave (index `waves.len()`) takes the rest.
pub fn wave_sizes(waves: &[WaveSize], targeted: u32) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut reached = 0;
    for (i, w) in waves.iter().enumerate() {
        let cum = w.resolve(targeted).max(reached);
        if cum > reached {
            out.push((i as u32, cum - reached));
            reached = cum;
        }
    }
    if reached < targeted {
        out.push((waves.len() as u32, targeted - reached));
    }
    out
}

fn next_wave(
    spec: &RolloutSpec,
    status: &RolloutStatus,
    progress: &RolloutProgress,
) -> Option<(u32, u32)> {
    let n = status.counts.targeted;
    let assigned = progress.values().filter(|p| p.wave.is_some()).count() as u32;
    if assigned >= n {
        return None;
    }
    match &spec.strategy {
        Strategy::Waves { waves } => wave_sizes(waves, n)
            .into_iter()
            .find(|(i, _)| status.current_wave.is_none_or(|k| *i > k)),
        Strategy::Exponential {
            base,
            factor,
            after_succeeded,
            max,
        } => {
            let size = match status.current_wave {
                None => *base,
                Some(_) if status.counts.healthy >= *after_succeeded => {
                    ((f64::from(status.wave_size) * factor).ceil() as u32).min(*max)
                }
                Some(_) => status.wave_size,
            };
            let wave = status.current_wave.map_or(0, |k| k + 1);
            Some((wave, size.clamp(1, n - assigned)))
        }
    }
}

/// Changes one node's progress, keeping `status.counts` its sum.
fn update(
    status: &mut RolloutStatus,
    progress: &mut RolloutProgress,
    node: &str,
    f: impl FnOnce(&mut NodeProgress) -> Folded,
) -> Folded {
    let Some(p) = progress.get_mut(node) else {
        return Folded::Unchanged("the node is not part of this rollout");
    };
    status.counts.add(&p.contribution(), -1);
    let r = f(p);
    status.counts.add(&p.contribution(), 1);
    r
}

fn fail(
    status: &mut RolloutStatus,
    progress: &mut RolloutProgress,
    node: &str,
    kind: FailureKind,
    reason: &str,
    now: u64,
) -> Folded {
    let r = update(status, progress, node, |p| {
        p.state = S::Failed;
        p.failure = Some(kind);
        Folded::Changed
    });
    if r == Folded::Changed {
        status.record_failure(node, kind, reason, now);
    }
    r
}

/// Records that the hub performed `action`.
pub fn apply(
    spec: &RolloutSpec,
    status: &mut RolloutStatus,
    progress: &mut RolloutProgress,
    action: &Action,
    now_ms: u64,
) -> Folded {
    let running = matches!(
        status.phase,
        RolloutPhase::Progressing | RolloutPhase::SucceededWithSkipped
    );
    match action {
        Action::AdvanceWave { wave, size } if status.phase == RolloutPhase::Progressing => {
            start_wave(status, progress, *wave, *size, now_ms);
            Folded::Changed
        }
        Action::Deliver { node, .. } if running => update(status, progress, node, |p| {
            if !matches!(p.state, S::Pending | S::Offline | S::Skipped) {
                return Folded::Unchanged("the node is not waiting for a delivery");
            }
            p.state = S::Delivering;
            p.delivered_ms = Some(now_ms);
            p.acked_ms = None;
            p.applied_ms = None;
            Folded::Changed
        }),
        Action::MarkOffline { node } if running => update(status, progress, node, |p| {
            p.state = S::Offline;
            p.offline_since_ms = Some(p.offline_since_ms.unwrap_or(now_ms));
            Folded::Changed
        }),
        Action::MarkSkipped { node, .. } if running => update(status, progress, node, |p| {
            p.state = S::Skipped;
            p.offline_since_ms = None;
            Folded::Changed
        }),
        Action::MarkFailed { node, kind, reason } if running => {
            fail(status, progress, node, *kind, reason, now_ms)
        }
        Action::RollBack { node, .. } => update(status, progress, node, |p| {
            p.state = S::RollingBack;
            Folded::Changed
        }),
        Action::Abort { reason } if status.phase == RolloutPhase::Progressing => {
            status.phase = match spec.on_abort {
                OnAbort::Halt => RolloutPhase::Failed,
                OnAbort::Rollback => RolloutPhase::RolledBack,
            };
            finish(status, Some(reason.clone()), now_ms);
            Folded::Changed
        }
        Action::Complete { phase } if running => {
            status.phase = *phase;
            finish(status, None, now_ms);
            Folded::Changed
        }
        Action::JudgeHealth { .. } => Folded::Unchanged("a request; the verdict is observed"),
        _ => Folded::Unchanged("the rollout's phase does not allow this action"),
    }
}

fn finish(status: &mut RolloutStatus, reason: Option<String>, now: u64) {
    status.finished_ms = Some(now);
    if reason.is_some() {
        status.reason = reason;
    }
}

fn start_wave(
    status: &mut RolloutStatus,
    progress: &mut RolloutProgress,
    wave: u32,
    size: u32,
    now: u64,
) {
    status.current_wave = Some(wave);
    status.wave_size = size;
    status.wave_started_ms = now;
    for p in progress
        .values_mut()
        .filter(|p| p.wave.is_none())
        .take(size as usize)
    {
        p.wave = Some(wave);
    }
}

/// Folds what the hub learned about a node into the rollout.
pub fn observe(
    spec: &RolloutSpec,
    status: &mut RolloutStatus,
    progress: &mut RolloutProgress,
    observation: &Observation,
    now_ms: u64,
) -> Folded {
    match observation {
        Observation::Acked { node } => update(status, progress, node, |p| {
            if p.state != S::Delivering {
                return Folded::Unchanged("not waiting for an acknowledgement");
            }
            p.state = S::Applying;
            p.acked_ms = Some(now_ms);
            Folded::Changed
        }),
        Observation::Applied { node } => update(status, progress, node, |p| {
            if !matches!(p.state, S::Delivering | S::Applying) {
                return Folded::Unchanged("not waiting for the node to apply");
            }
            p.state = S::Baking;
            p.acked_ms = Some(p.acked_ms.unwrap_or(now_ms));
            p.applied_ms = Some(now_ms);
            Folded::Changed
        }),
        Observation::ApplyFailed { node, reason } => {
            if !progress.get(node).is_some_and(|p| p.state.in_flight()) {
                return Folded::Unchanged("not in flight");
            }
            fail(
                status,
                progress,
                node,
                FailureKind::ApplyFailed,
                reason,
                now_ms,
            )
        }
        Observation::Health { node, verdict } => {
            health(spec, status, progress, node, verdict, now_ms)
        }
        Observation::Offline { node } => update(status, progress, node, |p| {
            if p.wave.is_none() || !(p.state == S::Pending || p.state.in_flight()) {
                return Folded::Unchanged("the node has nothing pending or in flight");
            }
            p.state = S::Offline;
            p.offline_since_ms = Some(now_ms);
            Folded::Changed
        }),
        Observation::Online { node } => update(status, progress, node, |p| {
            if !matches!(p.state, S::Offline | S::Skipped) {
                return Folded::Unchanged("the node was not offline or skipped");
            }
            p.state = S::Pending;
            p.offline_since_ms = None;
            Folded::Changed
        }),
        Observation::RolledBack { node } => update(status, progress, node, |p| {
            if p.state != S::RollingBack {
                return Folded::Unchanged("the node is not rolling back");
            }
            p.state = S::RolledBack;
            Folded::Changed
        }),
    }
}

fn health(
    spec: &RolloutSpec,
    status: &mut RolloutStatus,
    progress: &mut RolloutProgress,
    node: &str,
    verdict: &HealthVerdict,
    now: u64,
) -> Folded {
    let Some(p) = progress.get(node) else {
        return Folded::Unchanged("the node is not part of this rollout");
    };
    if p.state != S::Baking {
        return Folded::Unchanged("the node is not baking");
    }
    match verdict {
        HealthVerdict::Unhealthy { reason } => {
            fail(status, progress, node, FailureKind::Unhealthy, reason, now)
        }
        HealthVerdict::Healthy => {
            let baked = p
                .applied_ms
                .is_some_and(|t| now.saturating_sub(t) >= spec.health.bake_ms);
            if !baked {
                return Folded::Unchanged("the bake is not over");
            }
            update(status, progress, node, |p| {
                p.state = S::Healthy;
                Folded::Changed
            })
        }
    }
}

/// Applies an operator's request. Cancel and supersede are always accepted
/// (a finished rollout stays as it is: `Ok(false)`); pause and resume apply
/// to a progressing or paused rollout. `Ok(true)` when the phase changed.
pub fn command(
    status: &mut RolloutStatus,
    command: &Command,
    now_ms: u64,
) -> Result<bool, CommandError> {
    let phase = status.phase;
    let (to, reason) = match command {
        Command::Pause => match phase {
            RolloutPhase::Progressing => (RolloutPhase::Paused, None),
            RolloutPhase::Paused => return Ok(false),
            _ => {
                return Err(CommandError {
                    command: "pause",
                    phase,
                });
            }
        },
        Command::Resume => match phase {
            RolloutPhase::Paused => (RolloutPhase::Progressing, None),
            RolloutPhase::Progressing => return Ok(false),
            _ => {
                return Err(CommandError {
                    command: "resume",
                    phase,
                });
            }
        },
        _ if phase.is_final() => return Ok(false),
        Command::Cancel => (
            RolloutPhase::Cancelled,
            Some("cancelled by the operator".to_owned()),
        ),
        Command::Supersede { by } => (
            RolloutPhase::Superseded,
            Some(format!("superseded by rollout {by:?}")),
        ),
    };
    status.phase = to;
    if reason.is_some() {
        finish(status, reason, now_ms);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::rollout::HealthGate;

    fn spec(waves: Vec<WaveSize>) -> RolloutSpec {
        RolloutSpec {
            deployment: "d".into(),
            revision: 2,
            strategy: Strategy::Waves { waves },
            max_concurrent: 2,
            node_timeout_ms: 10_000,
            ack_timeout_ms: 10_000,
            health: HealthGate::default(),
            abort: Vec::new(),
            on_abort: OnAbort::Rollback,
            offline: OfflinePolicy::Skip,
        }
    }

    fn views(n: usize) -> BTreeMap<String, NodeView> {
        (0..n)
            .map(|i| {
                let name = format!("n{i}");
                let v = NodeView {
                    name: name.clone(),
                    connected: true,
                    ..NodeView::default()
                };
                (name, v)
            })
            .collect()
    }

    #[test]
    fn wave_sizes_round_up_skip_empty_entries_and_take_the_rest() {
        use WaveSize::{Count, Percent};
        assert_eq!(
            wave_sizes(
                &[Percent(1), Percent(10), Percent(50), Percent(100)],
                10_000
            ),
            [(0, 100), (1, 900), (2, 4_000), (3, 5_000)]
        );
        assert_eq!(
            wave_sizes(&[Percent(1), Percent(2), Percent(100)], 30),
            [(0, 1), (2, 29)]
        );
        assert_eq!(
            wave_sizes(&[Count(1), Count(5)], 30),
            [(0, 1), (1, 4), (2, 25)]
        );
        assert_eq!(wave_sizes(&[Count(50)], 3), [(0, 3)]);
        assert!(wave_sizes(&[Percent(10)], 0).is_empty());
    }

    #[test]
    fn first_tick_starts_wave_zero_then_delivers_up_to_the_bound() {
        let s = spec(vec![WaveSize::Percent(100)]);
        let v = views(5);
        let (mut st, mut pr) = RolloutStatus::start(v.keys().map(|k| (k.clone(), Some(1))), 0);
        assert_eq!(
            tick(&s, &mut st, &mut pr, &v, 1),
            [Action::AdvanceWave { wave: 0, size: 5 }]
        );
        let a = tick(&s, &mut st, &mut pr, &v, 2);
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(
            a.iter()
                .all(|a| matches!(a, Action::Deliver { revision: 2, .. }))
        );
        assert!(tick(&s, &mut st, &mut pr, &v, 3).is_empty(), "no slot free");
        assert_eq!(st.counts.in_flight, 2);
    }

    #[test]
    fn stale_and_unknown_observations_are_reported_unchanged() {
        let s = spec(vec![WaveSize::Percent(100)]);
        let (mut st, mut pr) = RolloutStatus::start([("n0".to_owned(), Some(1))], 0);
        let ack = |n: &str| Observation::Acked { node: n.to_owned() };
        assert_eq!(
            observe(&s, &mut st, &mut pr, &ack("nx"), 1),
            Folded::Unchanged("the node is not part of this rollout")
        );
        assert!(matches!(
            observe(&s, &mut st, &mut pr, &ack("n0"), 1),
            Folded::Unchanged(_)
        ));
        assert_eq!(st.counts.delivered, 0);
    }

    #[test]
    fn actions_observations_and_commands_have_a_tagged_json_form() {
        let a = Action::MarkFailed {
            node: "n1".into(),
            kind: FailureKind::ApplyTimeout,
            reason: "late".into(),
        };
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(
            j,
            r#"{"action":"mark_failed","node":"n1","kind":"apply_timeout","reason":"late"}"#
        );
        assert_eq!(serde_json::from_str::<Action>(&j).unwrap(), a);
        let o: Observation = serde_json::from_str(
            r#"{"observed":"health","node":"n1","verdict":{"verdict":"unhealthy","reason":"trap"}}"#,
        )
        .unwrap();
        assert!(matches!(
            o,
            Observation::Health {
                verdict: HealthVerdict::Unhealthy { .. },
                ..
            }
        ));
        let c: Command = serde_json::from_str(r#"{"command":"supersede","by":"r2"}"#).unwrap();
        assert_eq!(c, Command::Supersede { by: "r2".into() });
        assert!(
            serde_json::from_str::<Command>(r#"{"command":"supersede","by":"r2","at":1}"#).is_err()
        );
        assert!(
            serde_json::from_str::<Action>(r#"{"action":"deliver","node":"n","revision":1,"x":0}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Command>(r#"{"command":"restart"}"#).is_err());
    }

    #[test]
    fn commands_follow_the_phase() {
        let (mut st, _) = RolloutStatus::start([("n0".to_owned(), None)], 0);
        assert_eq!(command(&mut st, &Command::Resume, 1), Ok(false));
        assert_eq!(command(&mut st, &Command::Pause, 1), Ok(true));
        assert_eq!(st.phase, RolloutPhase::Paused);
        assert_eq!(
            command(&mut st, &Command::Supersede { by: "r9".into() }, 2),
            Ok(true)
        );
        assert_eq!(st.phase, RolloutPhase::Superseded);
        assert_eq!(st.reason.as_deref(), Some("superseded by rollout \"r9\""));
        assert_eq!(
            command(&mut st, &Command::Cancel, 3),
            Ok(false),
            "accepted, stays superseded"
        );
        let e = command(&mut st, &Command::Resume, 3).unwrap_err();
        assert_eq!(e.to_string(), "cannot resume a rollout that is Superseded");
    }

    #[test]
    fn planning_ten_thousand_nodes_stays_bounded() {
        let mut s = spec(vec![
            WaveSize::Percent(1),
            WaveSize::Percent(10),
            WaveSize::Percent(100),
        ]);
        s.max_concurrent = 500;
        let v = views(10_000);
        let (mut st, mut pr) = RolloutStatus::start(v.keys().map(|k| (k.clone(), Some(1))), 0);
        tick(&s, &mut st, &mut pr, &v, 1);
        let a = tick(&s, &mut st, &mut pr, &v, 2);
        assert_eq!(a.len(), 100, "wave 0 is 1 % of 10,000");
        let t = std::time::Instant::now();
        let a = plan(&s, &st, &pr, &v, 3);
        let took = t.elapsed();
        assert!(a.is_empty());
        eprintln!("plan over 10,000 nodes: {took:?} (debug build)");
    }
}
