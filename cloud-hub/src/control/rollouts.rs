//! The rollout loop of the standalone hub: it drives the pure planner
//! ([`protocols::control::plan`]) over what nodes report, delivers
//! revisions by pinning them per node and re-rendering, and persists every
//! step so a restart resumes where it was.
//!
//! # Revisions and pins
//! Every put of a deployment with new content is a new revision (stored in
//! `control_revisions`). A node renders each deployment that selects it at
//! the revision its pin says (`control_pins`, set by rollouts), or else at
//! the deployment's `stable` revision: the last one applied at once or
//! whose rollout succeeded. Selector and priority always come from the
//! latest revision. A put without `rollout` makes the new revision stable
//! and drops the pins (every node gets it now); a put with `rollout` pins
//! every selected node on what it runs and starts a rollout that moves the
//! pins node by node.
//!
//! # The loop
//! Every `tick` (under the control lock, so API changes never interleave):
//! 1. build a [`NodeView`] for every node the planner looks at, from the
//!    registry (reported state, status) and, when a health judgement needs
//!    them, the sink's stream watermarks;
//! 2. fold what changed into [`Observation`]s: `received_revision` reaching
//!    the node's desired revision is the acknowledgement, `applied_revision`
//!    the apply (the health baseline is taken then), a `rejected` revision
//!    the apply failure, a function the node rolled back or that trapped an
//!    early unhealthy verdict, and a node coming online again;
//! 3. [`plan`], perform each action (deliveries and rollbacks re-render and
//!    publish the node; judgements run [`judge`]) and [`apply`] it;
//! 4. persist the changed per-node progress, the status and baselines, and
//!    make them durable with one commit.
//!
//! # One driver
//! The loop assumes it is the only one driving rollouts: one standalone hub
//! process. Several replicas sharing a store need a leader that alone runs
//! it (the Kubernetes mode's job); two loops would both deliver.
//!
//! # Restart safety
//! State is what was persisted in step 4. A hub killed between a publish
//! and step 4 plans the same delivery again: the render is unchanged, so
//! nothing is published twice (the digest gate in
//! [`super::change::publish`]), and the node's reports move the rollout on.
//! Bakes resume with their stored baselines.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocols::FunctionSpec;
use protocols::control::{
    Action, Command, Deployment, Folded, Node, NodeRolloutState as S, NodeView, Observation,
    RolloutPhase, RolloutProgress, RolloutSpec, RolloutStatus, apply, command, early, judge,
    observe, plan,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::change::{ChangeError, Contents, NodeOutcome, selected_by};
use super::store::{DeploymentMeta, Pin, RevisionRecord, RolloutRecord};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Finished rollouts kept per deployment (with their per-node progress);
/// older ones are deleted when a new one starts.
pub const ROLLOUTS_KEPT: usize = 10;

/// Revisions kept per deployment beyond those a node, the stable revision
/// or a kept rollout still needs; older ones are deleted.
pub const REVISIONS_KEPT: usize = 50;

/// The id of the rollout of `deployment` at `revision`.
pub fn rollout_id(deployment: &str, revision: u64) -> String {
    format!("{deployment}-r{revision}")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether the loop still has work for a rollout in this state.
fn active(status: &RolloutStatus, progress: &RolloutProgress) -> bool {
    match status.phase {
        RolloutPhase::Progressing | RolloutPhase::Paused | RolloutPhase::SucceededWithSkipped => {
            true
        }
        RolloutPhase::RolledBack => progress.values().any(|p| {
            p.state == S::RollingBack
                || (p.delivered_ms.is_some() && p.state != S::RolledBack && p.rollback_to.is_some())
        }),
        _ => false,
    }
}

/// Stores the new revision of `d` (its number is already in `metas`) and,
/// with `rollout`, starts its rollout over the nodes `d` selects. A running
/// rollout of the deployment is superseded. Returns the revision and the
/// new rollout's id. Callers hold the control lock.
pub(crate) fn store_revision(
    hub: &Hub,
    d: &Deployment,
    rollout: Option<&RolloutSpec>,
    undo_of: Option<u64>,
    nodes: &BTreeMap<String, Node>,
    metas: &mut BTreeMap<String, DeploymentMeta>,
) -> Result<(u64, Option<String>), ChangeError> {
    let mut m = metas.get(&d.name).cloned().unwrap_or_default();
    let now = now_ms();
    let spec = rollout
        .map(|r| {
            let spec = RolloutSpec {
                deployment: d.name.clone(),
                revision: m.revision,
                ..r.clone()
            };
            spec.validate().map(|()| spec)
        })
        .transpose()?;
    let id = spec.as_ref().map(|_| rollout_id(&d.name, m.revision));
    // A deployment stored before revisions existed: keep its revision 1.
    if m.revision == 2
        && let Some(r1) = hub.control.revision(&d.name, 1)?
    {
        hub.control.put_revision(&d.name, &r1)?;
    }
    let previous_stable = m.stable;
    if let Some(old) = m.rollout.take() {
        let by = id
            .clone()
            .unwrap_or_else(|| format!("{}-r{}", d.name, m.revision));
        end(hub, &old, &Command::Supersede { by }, now)?;
    }
    hub.control.put_deployment(d)?;
    hub.control.put_revision(
        &d.name,
        &RevisionRecord {
            revision: m.revision,
            deployment: d.clone(),
            created_ms: now,
            rollout: id.clone(),
            undo_of,
        },
    )?;
    if let (Some(spec), Some(id)) = (spec, &id) {
        start(hub, d, spec, id, previous_stable, &m, nodes, now)?;
        m.rollout = Some(id.clone());
    } else {
        m.stable = m.revision;
        hub.control.clear_pins(&d.name)?;
    }
    hub.control.put_meta(&d.name, &m)?;
    prune(hub, &d.name, &m)?;
    let revision = m.revision;
    metas.insert(d.name.clone(), m);
    hub.control.generation.fetch_add(1, Ordering::SeqCst);
    hub.control.poke.notify_one();
    Ok((revision, id))
}

/// Bounds what a deployment's history holds: the newest [`ROLLOUTS_KEPT`]
/// finished rollouts, and revisions that are latest, stable, pinned by a
/// node, delivered by a kept rollout, or among the newest
/// [`REVISIONS_KEPT`].
fn prune(hub: &Hub, name: &str, m: &DeploymentMeta) -> Result<(), ChangeError> {
    let mut finished: Vec<(u64, String)> = hub
        .control
        .rollouts()?
        .into_values()
        .filter(|r| r.spec.deployment == name && r.status.phase.is_final())
        .map(|r| (r.spec.revision, r.id))
        .collect();
    finished.sort();
    let drop = finished.len().saturating_sub(ROLLOUTS_KEPT);
    for (_, id) in &finished[..drop] {
        hub.control.delete_rollout(id)?;
    }
    let mut keep = hub.control.pinned_revisions(name)?;
    keep.extend([m.revision, m.stable]);
    keep.extend(finished[drop..].iter().map(|(r, _)| *r));
    let revisions = hub.control.revisions(name)?;
    let old = revisions.len().saturating_sub(REVISIONS_KEPT);
    for r in &revisions[..old] {
        if !keep.contains(&r.revision) {
            hub.control.delete_revision(name, r.revision)?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments, reason = "one call site, all needed")]
fn start(
    hub: &Hub,
    d: &Deployment,
    spec: RolloutSpec,
    id: &str,
    previous_stable: u64,
    m: &DeploymentMeta,
    nodes: &BTreeMap<String, Node>,
    now: u64,
) -> Result<(), ChangeError> {
    let targets = selected_by(d, nodes)?;
    let mut pins = Vec::with_capacity(targets.len());
    for n in &targets {
        let pin = hub.control.pin(n, &d.name)?.unwrap_or(Pin {
            revision: m.stable,
            last_healthy: m.stable,
        });
        pins.push((n.as_str(), pin));
    }
    hub.control.put_pins(&d.name, pins.iter().copied())?;
    let before: Vec<FunctionSpec> = if previous_stable == 0 {
        Vec::new()
    } else {
        hub.control
            .revision(&d.name, previous_stable)?
            .map(|r| r.deployment.template.functions)
            .unwrap_or_default()
    };
    let changed = d
        .template
        .functions
        .iter()
        .filter(|f| !before.contains(f))
        .cloned()
        .collect();
    let (status, progress) = RolloutStatus::start(
        pins.iter()
            .map(|(n, p)| ((*n).to_owned(), Some(p.last_healthy))),
        now,
    );
    hub.control.put_progress(id, progress.iter())?;
    hub.control.put_rollout(&RolloutRecord {
        id: id.to_owned(),
        spec,
        status,
        changed,
    })?;
    Metrics::inc(&hub.metrics.rollouts_started);
    info!(rollout = id, nodes = targets.len(), "rollout started");
    Ok(())
}

/// Applies an operator command (or a supersede) to a stored rollout and
/// clears the deployment's active rollout when it ends. Callers hold the
/// control lock.
pub(crate) fn end(hub: &Hub, id: &str, c: &Command, now: u64) -> Result<bool, ChangeError> {
    let mut rec = hub
        .control
        .rollout(id)?
        .ok_or_else(|| ChangeError::NoRollout(id.to_owned()))?;
    let changed = command(&mut rec.status, c, now)?;
    if changed {
        hub.control.put_rollout(&rec)?;
        if rec.status.phase.is_final() {
            hub.control.drop_baselines(id)?;
            clear_active(hub, &rec.spec.deployment, id)?;
        }
        hub.control.generation.fetch_add(1, Ordering::SeqCst);
        hub.control.notify(&rec);
    }
    Ok(changed)
}

/// Clears the deployment's active rollout if it is `id`.
fn clear_active(hub: &Hub, deployment: &str, id: &str) -> Result<(), ChangeError> {
    if let Some(mut m) = hub.control.meta(deployment)?
        && m.rollout.as_deref() == Some(id)
    {
        m.rollout = None;
        hub.control.put_meta(deployment, &m)?;
    }
    Ok(())
}

/// Cancels the running rollout of `deployment`, if any.
pub(crate) fn cancel_for(hub: &Hub, deployment: &str) -> Result<(), ChangeError> {
    if let Some(id) = hub.control.meta(deployment)?.and_then(|m| m.rollout) {
        end(hub, &id, &Command::Cancel, now_ms())?;
    }
    Ok(())
}

/// A pause, resume or cancel from the API.
pub async fn operator_command(
    hub: &Hub,
    id: &str,
    c: Command,
) -> Result<RolloutRecord, ChangeError> {
    let _serialised = hub.control.lock.lock().await;
    end(hub, id, &c, now_ms())?;
    hub.commit().await?;
    hub.control
        .rollout(id)?
        .ok_or_else(|| ChangeError::NoRollout(id.to_owned()))
}

/// One rollout the loop drives, as held in memory between ticks.
struct Live {
    rec: RolloutRecord,
    progress: RolloutProgress,
    baselines: BTreeMap<String, NodeView>,
    connected: BTreeMap<String, bool>,
}

/// The loop's state: live rollouts, reloaded when the store's generation
/// moves (an API change or a new rollout).
#[derive(Default)]
pub struct Engine {
    live: BTreeMap<String, Live>,
    generation: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("live", &self.live.keys().collect::<Vec<_>>())
            .field("generation", &self.generation)
            .finish()
    }
}

/// The shortest time between two ticks woken by reports.
pub const MIN_TICK: Duration = Duration::from_millis(100);

/// Runs the loop every `tick`, or sooner (at most every [`MIN_TICK`]) when
/// a node reports or an operator acts, until `cancel`. A failed tick is logged,
/// counted and retried; the loop itself never fails.
pub async fn run(
    hub: Arc<Hub>,
    tick: Duration,
    cancel: CancellationToken,
) -> Result<(), crate::hub::HubError> {
    let mut engine = Engine {
        generation: u64::MAX,
        ..Engine::default()
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(tick) => {}
            () = hub.control.poke.notified() => {
                // Let a burst of reports land, and never tick more often
                // than MIN_TICK.
                tokio::time::sleep(MIN_TICK.min(tick)).await;
            }
        }
        if let Err(e) = engine.tick(&hub).await {
            Metrics::inc(&hub.metrics.rollout_errors);
            warn!(error = %e, "rollout tick failed; retried next tick");
            engine.generation = u64::MAX;
        }
    }
}

impl Engine {
    /// One pass over every live rollout.
    pub async fn tick(&mut self, hub: &Hub) -> Result<(), ChangeError> {
        let _serialised = hub.control.lock.lock().await;
        let started = std::time::Instant::now();
        let generation = hub.control.generation.load(Ordering::SeqCst);
        if generation != self.generation {
            self.reload(hub)?;
            self.generation = generation;
        }
        let now = now_ms();
        let ids: Vec<String> = self.live.keys().cloned().collect();
        let mut any = false;
        for id in ids {
            let Some(mut live) = self.live.remove(&id) else {
                continue;
            };
            any |= step(hub, &mut live, now).await?;
            if active(&live.rec.status, &live.progress) {
                self.live.insert(id, live);
            } else {
                finished(hub, &live)?;
            }
        }
        if any {
            hub.commit().await?;
        }
        hub.metrics
            .rollout_tick_us
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn reload(&mut self, hub: &Hub) -> Result<(), ChangeError> {
        let mut live = BTreeMap::new();
        for (id, rec) in hub.control.rollouts()? {
            let progress = hub.control.progress(&id)?;
            if !active(&rec.status, &progress) {
                continue;
            }
            let baselines = hub.control.baselines(&id)?;
            let connected = self
                .live
                .remove(&id)
                .map(|l| l.connected)
                .unwrap_or_default();
            live.insert(
                id,
                Live {
                    rec,
                    progress,
                    baselines,
                    connected,
                },
            );
        }
        self.live = live;
        Ok(())
    }
}

fn finished(hub: &Hub, live: &Live) -> Result<(), ChangeError> {
    hub.control.drop_baselines(&live.rec.id)?;
    clear_active(hub, &live.rec.spec.deployment, &live.rec.id)?;
    info!(rollout = %live.rec.id, phase = ?live.rec.status.phase, "rollout finished");
    Ok(())
}

/// Nodes whose view the planner or the observations need.
fn watched(progress: &RolloutProgress) -> Vec<String> {
    progress
        .iter()
        .filter(|(_, p)| {
            p.wave.is_some() && !matches!(p.state, S::Healthy | S::Failed | S::RolledBack)
        })
        .map(|(n, _)| n.clone())
        .collect()
}

fn views(hub: &Hub, names: &[String]) -> Result<BTreeMap<String, NodeView>, ChangeError> {
    let mut out = BTreeMap::new();
    for name in names {
        let node = hub.control.node(name)?.unwrap_or_else(|| Node {
            name: name.clone(),
            ..Node::default()
        });
        let rec = hub.registry.get(name)?.unwrap_or_default();
        let v = NodeView::derive(
            &node,
            rec.desired_revision,
            rec.reported.as_ref(),
            rec.status.as_ref(),
            &BTreeMap::new(),
        );
        out.insert(name.clone(), v);
    }
    Ok(out)
}

fn with_watermarks(hub: &Hub, mut v: NodeView) -> NodeView {
    v.watermarks = hub
        .sink
        .streams(&v.name)
        .into_iter()
        .map(|(s, st)| (s, st.contiguous))
        .collect();
    v
}

/// What the views say happened, as observations.
fn observations(
    hub: &Hub,
    live: &mut Live,
    views: &BTreeMap<String, NodeView>,
) -> Vec<Observation> {
    let mut out = Vec::new();
    for (name, v) in views {
        let Some(p) = live.progress.get(name) else {
            continue;
        };
        let was = live.connected.insert(name.clone(), v.connected);
        let node = name.clone();
        let target = v.desired_revision;
        let rejected = v
            .rejected
            .as_ref()
            .filter(|(r, _)| r.is_some_and(|r| target != 0 && r >= target));
        match p.state {
            S::Delivering | S::Applying => {
                if let Some((_, reason)) = rejected {
                    out.push(Observation::ApplyFailed {
                        node,
                        reason: reason.clone(),
                    });
                } else if target != 0 && v.applied_revision >= target {
                    live.baselines
                        .insert(name.clone(), with_watermarks(hub, v.clone()));
                    out.push(Observation::Applied { node });
                } else if p.state == S::Delivering && target != 0 && v.received_revision >= target {
                    out.push(Observation::Acked { node });
                }
            }
            S::Baking => {
                let base = live.baselines.get(name).cloned().unwrap_or_default();
                if let Some(verdict) = early(&base, v, &live.rec.changed) {
                    out.push(Observation::Health { node, verdict });
                }
            }
            S::RollingBack if target != 0 && v.applied_revision >= target => {
                out.push(Observation::RolledBack { node });
            }
            S::Offline | S::Skipped if v.connected && was == Some(false) => {
                out.push(Observation::Online { node });
            }
            _ => {}
        }
    }
    out
}

/// One tick of one rollout; whether anything changed.
/// Most plan passes in one tick: a wave that passes its gate starts the
/// next one, and its deliveries go out, in the same tick.
const MAX_PASSES: usize = 4;

/// One tick of one rollout; whether anything changed.
async fn step(hub: &Hub, live: &mut Live, now: u64) -> Result<bool, ChangeError> {
    if live.rec.status.phase == RolloutPhase::Paused {
        return Ok(false);
    }
    let mut views = views(hub, &watched(&live.progress))?;
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut status_changed = fold_observations(hub, live, &views, now, &mut dirty)?;
    for _ in 0..MAX_PASSES {
        // Nodes a wave started in the previous pass need their views.
        let missing: Vec<String> = watched(&live.progress)
            .into_iter()
            .filter(|n| !views.contains_key(n))
            .collect();
        views.extend(self::views(hub, &missing)?);
        let (changed, again) = pass(hub, live, &views, now, &mut dirty).await?;
        status_changed |= changed;
        if !again {
            break;
        }
    }
    healthy_pins(hub, live, &dirty)?;
    if status_changed {
        hub.control.put_progress(
            &live.rec.id,
            dirty.iter().filter_map(|n| live.progress.get_key_value(n)),
        )?;
        hub.control.put_rollout(&live.rec)?;
        hub.control.notify(&live.rec);
    }
    Ok(status_changed)
}

/// One plan, performed: whether anything changed, and whether a wave
/// advanced or a node settled (so planning again may do more now).
async fn pass(
    hub: &Hub,
    live: &mut Live,
    views: &BTreeMap<String, NodeView>,
    now: u64,
    dirty: &mut BTreeSet<String>,
) -> Result<(bool, bool), ChangeError> {
    let actions = plan(&live.rec.spec, &live.rec.status, &live.progress, views, now);
    let mut renders: BTreeMap<String, u64> = BTreeMap::new();
    for a in &actions {
        match a {
            Action::Deliver { node, revision } => {
                renders.insert(node.clone(), *revision);
            }
            Action::RollBack { node, to_revision } => {
                renders.insert(node.clone(), *to_revision);
            }
            _ => {}
        }
    }
    let published = deliver(hub, &live.rec.spec.deployment, &renders).await?;
    let (mut changed, mut again) = (false, false);
    for a in &actions {
        let node = action_node(a);
        if let Some(n) = node
            && renders.contains_key(n)
            && !published.contains(n)
        {
            // Not delivered (paused, or the publish failed): planned again.
            continue;
        }
        let folded = if let Action::JudgeHealth { node } = a {
            let base = live.baselines.get(node).cloned().unwrap_or_default();
            let now_view = views
                .get(node)
                .cloned()
                .map(|v| with_watermarks(hub, v))
                .unwrap_or_default();
            let verdict = judge(&live.rec.spec.health, &base, &now_view, &live.rec.changed);
            let o = Observation::Health {
                node: node.clone(),
                verdict,
            };
            observe(
                &live.rec.spec,
                &mut live.rec.status,
                &mut live.progress,
                &o,
                now,
            )
        } else {
            apply(
                &live.rec.spec,
                &mut live.rec.status,
                &mut live.progress,
                a,
                now,
            )
        };
        if folded != Folded::Changed {
            continue;
        }
        changed = true;
        again |= matches!(
            a,
            Action::AdvanceWave { .. }
                | Action::JudgeHealth { .. }
                | Action::MarkFailed { .. }
                | Action::MarkSkipped { .. }
        );
        if let Some(n) = node {
            dirty.insert(n.to_owned());
        }
        count(hub, a);
        if let Action::Complete { .. } = a {
            complete(hub, &live.rec)?;
        }
    }
    Ok((changed, again))
}

/// Folds what the views say into the rollout; whether anything changed.
fn fold_observations(
    hub: &Hub,
    live: &mut Live,
    views: &BTreeMap<String, NodeView>,
    now: u64,
    dirty: &mut BTreeSet<String>,
) -> Result<bool, ChangeError> {
    let mut changed = false;
    for o in observations(hub, live, views) {
        let node = observed_node(&o).to_owned();
        if observe(
            &live.rec.spec,
            &mut live.rec.status,
            &mut live.progress,
            &o,
            now,
        ) == Folded::Changed
        {
            changed = true;
            if matches!(o, Observation::Applied { .. })
                && let Some(b) = live.baselines.get(&node)
            {
                hub.control.put_baseline(&live.rec.id, &node, b)?;
            }
            dirty.insert(node);
        }
    }
    Ok(changed)
}

fn observed_node(o: &Observation) -> &str {
    match o {
        Observation::Acked { node }
        | Observation::Applied { node }
        | Observation::ApplyFailed { node, .. }
        | Observation::Health { node, .. }
        | Observation::Offline { node }
        | Observation::Online { node }
        | Observation::RolledBack { node } => node,
    }
}

fn action_node(a: &Action) -> Option<&String> {
    match a {
        Action::Deliver { node, .. }
        | Action::JudgeHealth { node }
        | Action::MarkOffline { node }
        | Action::MarkSkipped { node, .. }
        | Action::MarkFailed { node, .. }
        | Action::RollBack { node, .. } => Some(node),
        Action::AdvanceWave { .. } | Action::Abort { .. } | Action::Complete { .. } => None,
    }
}

fn count(hub: &Hub, a: &Action) {
    let m = &hub.metrics;
    match a {
        Action::Deliver { .. } => Metrics::inc(&m.rollout_deliveries),
        Action::RollBack { .. } => Metrics::inc(&m.rollout_rollbacks),
        Action::MarkFailed { .. } => Metrics::inc(&m.rollout_node_failures),
        Action::Abort { .. } => Metrics::inc(&m.rollouts_aborted),
        _ => {}
    }
}

/// A node that turned healthy on the revision: that revision is now where a
/// later rollback sends it.
fn healthy_pins(hub: &Hub, live: &Live, dirty: &BTreeSet<String>) -> Result<(), ChangeError> {
    let d = &live.rec.spec.deployment;
    let mut pins = Vec::new();
    for n in dirty {
        if live.progress.get(n).is_some_and(|p| p.state == S::Healthy) {
            let pin = hub.control.pin(n, d)?.unwrap_or_default();
            if pin.last_healthy != live.rec.spec.revision {
                pins.push((
                    n.as_str(),
                    Pin {
                        revision: pin.revision,
                        last_healthy: live.rec.spec.revision,
                    },
                ));
            }
        }
    }
    hub.control.put_pins(d, pins)?;
    Ok(())
}

/// The rollout succeeded (maybe with skipped nodes): its revision becomes
/// what unpinned nodes get.
fn complete(hub: &Hub, rec: &RolloutRecord) -> Result<(), ChangeError> {
    let d = &rec.spec.deployment;
    if let Some(mut m) = hub.control.meta(d)?
        && m.rollout.as_deref() == Some(rec.id.as_str())
    {
        m.stable = rec.spec.revision;
        hub.control.put_meta(d, &m)?;
    }
    Ok(())
}

/// Pins each node of `renders` on its revision of `deployment`, re-renders
/// them and publishes what changed. Returns the nodes that now have their
/// document (published or unchanged); a node whose render fails is left
/// out, logged and counted, and planned again next tick.
async fn deliver(
    hub: &Hub,
    deployment: &str,
    renders: &BTreeMap<String, u64>,
) -> Result<BTreeSet<String>, ChangeError> {
    if renders.is_empty() {
        return Ok(BTreeSet::new());
    }
    let mut pins = Vec::with_capacity(renders.len());
    for (n, rev) in renders {
        let pin = hub.control.pin(n, deployment)?.unwrap_or_default();
        pins.push((
            n.as_str(),
            Pin {
                revision: *rev,
                last_healthy: pin.last_healthy,
            },
        ));
    }
    hub.control.put_pins(deployment, pins)?;
    let nodes = hub.control.nodes()?;
    let deployments = hub.control.deployments()?;
    let affected: BTreeSet<String> = renders.keys().cloned().collect();
    let contents = Contents::load(&hub.control, &deployments, &BTreeMap::new(), &affected)?;
    // Rendered one by one so a node whose render fails (a conflict with a
    // deployment changed since the rollout started) holds back only itself;
    // published together, with one commit.
    let mut batch = super::change::Plan::default();
    for name in &affected {
        let one = BTreeSet::from([name.clone()]);
        match super::change::plan(&nodes, &contents, &one) {
            Ok(p) => batch
                .nodes
                .extend(p.nodes.into_iter().filter(|n| !n.node.paused)),
            Err(e) => {
                Metrics::inc(&hub.metrics.rollout_errors);
                warn!(node = %name, error = %e, "rollout delivery not rendered; planned again next tick");
            }
        }
    }
    let outcomes = super::change::publish(hub, &batch).await?;
    Ok(outcomes
        .into_iter()
        .filter(|o: &NodeOutcome| o.revision != 0)
        .map(|o| o.node)
        .collect())
}
