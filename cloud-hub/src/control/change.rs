//! One change of the control plane: check it against every node it
//! affects ([`plan`]), store it, and publish what changed ([`publish`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use protocols::control::{
    Deployment, MergeConflict, Node, RenderError, Rendered, Renderer, RolloutSpec, Template,
};

use super::store::{Control, DeploymentMeta, Pin, RenderedRecord, StoreError};
use crate::hub::{Hub, SetDesiredError};
use crate::metrics::Metrics;

/// A change an operator asks for.
#[derive(Debug, Clone)]
pub enum Change {
    /// Replace a node's labels, annotations and paused flag.
    Node(Node),
    /// Create or replace a deployment (already validated): at once when
    /// `rollout` is `None`, else as a new revision a rollout delivers.
    PutDeployment {
        /// The deployment.
        deployment: Deployment,
        /// How to roll it out (its `deployment` and `revision` are filled
        /// in by the hub).
        rollout: Option<Box<RolloutSpec>>,
        /// Set when this re-issues an earlier revision (`undo`).
        undo_of: Option<u64>,
    },
    /// Delete the deployment of this name.
    DeleteDeployment(String),
}

/// Why a change was refused or failed. Refusals store nothing.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Two deployments would give a node the same item at the same priority.
    #[error("node {node:?}: {conflict}")]
    Conflict {
        /// The first node found with the conflict.
        node: String,
        /// The item and both deployments.
        conflict: MergeConflict,
    },
    /// The merged document of a node would not validate, or a stored
    /// deployment cannot be evaluated.
    #[error(transparent)]
    Render(RenderError),
    /// `limits.max_deployments` deployments are stored already.
    #[error(
        "name: the hub holds {limit} deployments (limits.max_deployments); deployment {name:?} refused"
    )]
    TooMany {
        /// The refused deployment.
        name: String,
        /// The limit.
        limit: usize,
    },
    /// `limits.max_nodes` nodes are labelled already.
    #[error(
        "node: the hub holds labels of {limit} nodes (limits.max_nodes); node {node:?} refused"
    )]
    TooManyNodes {
        /// The refused node.
        node: String,
        /// The limit.
        limit: usize,
    },
    /// No deployment of that name.
    #[error("name: no deployment {0:?}")]
    NotFound(String),
    /// A rollout spec or request that does not validate (the message
    /// names the field).
    #[error(transparent)]
    Invalid(#[from] protocols::validate::ValidationErrors),
    /// No rollout of that id.
    #[error("id: no rollout {0:?}")]
    NoRollout(String),
    /// An operator command that does not apply to the rollout's phase.
    #[error(transparent)]
    Command(#[from] protocols::control::CommandError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Signing, storing or publishing a rendered document failed.
    #[error("node {node:?}: publishing the rendered document failed: {source}")]
    Publish {
        /// The node.
        node: String,
        /// What failed.
        #[source]
        source: SetDesiredError,
    },
    /// The node's artifact grants could not be stored.
    #[error("node {node:?}: artifact grants not stored: {source}")]
    Grant {
        /// The node.
        node: String,
        /// What failed.
        #[source]
        source: crate::auth::AuthError,
    },
    /// The change could not be made durable.
    #[error(transparent)]
    Commit(#[from] crate::commit::CommitError),
}

/// One node's render in a [`Plan`].
#[derive(Debug, Clone)]
pub struct NodeRender {
    /// The node as it will be stored.
    pub node: Node,
    /// The deployments that select it, by name.
    pub deployments: Vec<String>,
    /// Its merged content; `None` when no deployment selects it (it keeps
    /// its last document).
    pub rendered: Option<Rendered>,
}

/// Every affected node, rendered from the deployments as they will be.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// By node name.
    pub nodes: Vec<NodeRender>,
}

/// What a change did to one node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeOutcome {
    /// The node.
    pub node: String,
    /// Its desired revision after the change (0: none).
    pub revision: u64,
    /// Whether a new revision was published.
    pub published: bool,
}

pub(crate) fn selected_by(
    d: &Deployment,
    nodes: &BTreeMap<String, Node>,
) -> Result<Vec<String>, ChangeError> {
    let s = d.selector.compile().map_err(|errors| {
        ChangeError::Render(RenderError::InvalidDeployment {
            deployment: d.name.clone(),
            errors,
        })
    })?;
    Ok(nodes
        .values()
        .filter(|n| s.matches(&n.labels))
        .map(|n| n.name.clone())
        .collect())
}

/// What each node renders: the latest deployments, the revision each one
/// gives nodes no rollout pinned, and the pins of the nodes at hand.
#[derive(Debug, Default)]
pub struct Contents {
    latest: BTreeMap<String, Deployment>,
    metas: BTreeMap<String, DeploymentMeta>,
    templates: HashMap<(String, u64), Template>,
    pins: BTreeMap<String, BTreeMap<String, Pin>>,
}

impl Contents {
    /// Loads what rendering `nodes` needs, with `deployments` as they will
    /// be and `metas` overriding the stored bookkeeping.
    pub fn load<'a>(
        control: &Control,
        deployments: &BTreeMap<String, Deployment>,
        metas: &BTreeMap<String, DeploymentMeta>,
        nodes: impl IntoIterator<Item = &'a String>,
    ) -> Result<Self, StoreError> {
        let mut c = Self {
            latest: deployments.clone(),
            ..Self::default()
        };
        for name in deployments.keys() {
            let m = match metas.get(name) {
                Some(m) => m.clone(),
                None => control.meta(name)?.unwrap_or(DeploymentMeta {
                    revision: 1,
                    stable: 1,
                    rollout: None,
                }),
            };
            c.metas.insert(name.clone(), m);
        }
        for n in nodes {
            let pins = control.pins_of(n)?;
            for (d, pin) in &pins {
                c.template(control, d, pin.revision)?;
            }
            c.pins.insert(n.clone(), pins);
        }
        let stable: Vec<(String, u64)> =
            c.metas.iter().map(|(n, m)| (n.clone(), m.stable)).collect();
        for (d, r) in stable {
            c.template(control, &d, r)?;
        }
        Ok(c)
    }

    fn template(&mut self, control: &Control, d: &str, revision: u64) -> Result<(), StoreError> {
        let key = (d.to_owned(), revision);
        if revision == 0 || self.templates.contains_key(&key) {
            return Ok(());
        }
        let latest = self.metas.get(d).map_or(0, |m| m.revision);
        let t = if revision == latest {
            self.latest.get(d).map(|x| x.template.clone())
        } else {
            control
                .revision(d, revision)?
                .map(|r| r.deployment.template)
        };
        if let Some(t) = t {
            self.templates.insert(key, t);
        }
        Ok(())
    }

    /// The same, with no node pinned on `deployment`.
    fn without_pins_of(mut self, deployment: &str) -> Self {
        for p in self.pins.values_mut() {
            p.remove(deployment);
        }
        self
    }

    /// The revision of `deployment` that `node` renders (0: none).
    pub fn effective(&self, node: &str, deployment: &str) -> u64 {
        self.pins
            .get(node)
            .and_then(|p| p.get(deployment))
            .map(|p| p.revision)
            .or_else(|| self.metas.get(deployment).map(|m| m.stable))
            .unwrap_or(0)
    }

    /// The deployments as `node` renders them: selector and priority of the
    /// latest revision, template of the revision it is on; deployments at
    /// revision 0 are left out.
    pub fn list_for(&self, node: &str) -> Vec<Deployment> {
        self.latest
            .values()
            .filter_map(|d| {
                let rev = self.effective(node, &d.name);
                let t = self.templates.get(&(d.name.clone(), rev))?;
                Some(Deployment {
                    template: t.clone(),
                    ..d.clone()
                })
            })
            .collect()
    }
}

/// Renders the `affected` nodes of `nodes` from `contents`; the first
/// conflict or invalid document refuses the whole change.
pub fn plan(
    nodes: &BTreeMap<String, Node>,
    contents: &Contents,
    affected: &BTreeSet<String>,
) -> Result<Plan, ChangeError> {
    let list: Vec<Deployment> = contents.latest.values().cloned().collect();
    let renderer = Renderer::new(&list).map_err(ChangeError::Render)?;
    let mut out = Plan::default();
    for name in affected {
        let Some(node) = nodes.get(name) else {
            continue;
        };
        let selecting: Vec<String> = renderer
            .selecting(node)
            .iter()
            .map(|d| d.name.clone())
            .collect();
        let own = contents.list_for(name);
        // Selected only by deployments that give it nothing yet (a new
        // deployment its rollout has not reached): it keeps its document.
        let rendered = if own.iter().any(|d| selecting.contains(&d.name)) {
            Some(protocols::control::render(node, &own).map_err(|e| match e {
                RenderError::Conflict(conflict) => ChangeError::Conflict {
                    node: name.clone(),
                    conflict,
                },
                e => ChangeError::Render(e),
            })?)
        } else {
            None
        };
        out.nodes.push(NodeRender {
            node: node.clone(),
            deployments: selecting,
            rendered,
        });
    }
    Ok(out)
}

/// What a change did.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Applied {
    /// Every affected node.
    pub nodes: Vec<NodeOutcome>,
    /// The deployment's revision after a put.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The rollout a put started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
}

/// Checks a put of `d` (already in `deployments`) as if every node were on
/// its new revision; returns its bookkeeping with the revision bumped.
fn check_put(
    hub: &Hub,
    d: &Deployment,
    mut m: DeploymentMeta,
    nodes: &BTreeMap<String, Node>,
    deployments: &BTreeMap<String, Deployment>,
    affected: &BTreeSet<String>,
) -> Result<DeploymentMeta, ChangeError> {
    m.revision += 1;
    let all_new = BTreeMap::from([(
        d.name.clone(),
        DeploymentMeta {
            stable: m.revision,
            ..m.clone()
        },
    )]);
    let check = Contents::load(&hub.control, deployments, &all_new, affected)?;
    plan(nodes, &check.without_pins_of(&d.name), affected)?;
    Ok(m)
}

/// Checks, stores and publishes `change`. Returns what happened to each
/// affected node.
pub async fn apply(hub: &Hub, change: Change) -> Result<Applied, ChangeError> {
    let _serialised = hub.control.lock.lock().await;
    let mut nodes = hub.control.nodes()?;
    let mut deployments = hub.control.deployments()?;
    let mut affected = BTreeSet::new();
    let mut metas = BTreeMap::new();
    let mut out = Applied::default();
    let mut same = false;
    match &change {
        Change::Node(n) => {
            if !nodes.contains_key(&n.name) && nodes.len() >= hub.limits.max_nodes {
                hub.metrics.refuse("max_nodes");
                return Err(ChangeError::TooManyNodes {
                    node: n.name.clone(),
                    limit: hub.limits.max_nodes,
                });
            }
            affected.insert(n.name.clone());
            nodes.insert(n.name.clone(), n.clone());
        }
        Change::PutDeployment { deployment: d, .. } => {
            if let Some(old) = deployments.get(&d.name) {
                if old == d {
                    // The same content again: no new revision, no rollout.
                    same = true;
                }
                affected.extend(selected_by(old, &nodes)?);
            } else if deployments.len() >= hub.control.max_deployments {
                hub.metrics.refuse("max_deployments");
                return Err(ChangeError::TooMany {
                    name: d.name.clone(),
                    limit: hub.control.max_deployments,
                });
            }
            affected.extend(selected_by(d, &nodes)?);
            deployments.insert(d.name.clone(), d.clone());
            let m = hub.control.meta(&d.name)?.unwrap_or_default();
            if same {
                out.revision = Some(m.revision);
                out.rollout = m.rollout;
            } else {
                let m = check_put(hub, d, m, &nodes, &deployments, &affected)?;
                metas.insert(d.name.clone(), m);
            }
        }
        Change::DeleteDeployment(name) => {
            let old = deployments
                .remove(name)
                .ok_or_else(|| ChangeError::NotFound(name.clone()))?;
            affected.extend(selected_by(&old, &nodes)?);
        }
    }
    // Node and delete changes are checked whole before anything is stored.
    let checked = if let Change::PutDeployment { .. } = &change {
        None
    } else {
        let contents = Contents::load(&hub.control, &deployments, &metas, &affected)?;
        Some(plan(&nodes, &contents, &affected)?)
    };
    match &change {
        Change::Node(n) => hub.control.put_node(n)?,
        Change::PutDeployment { .. } if same => {}
        Change::PutDeployment {
            deployment,
            rollout,
            undo_of,
        } => {
            let (revision, id) = super::rollouts::store_revision(
                hub,
                deployment,
                rollout.as_deref(),
                *undo_of,
                &nodes,
                &mut metas,
            )?;
            out.revision = Some(revision);
            out.rollout = id;
        }
        Change::DeleteDeployment(name) => {
            super::rollouts::cancel_for(hub, name)?;
            hub.control.delete_deployment(name)?;
            hub.control.forget_deployment(name)?;
        }
    }
    let plan = if let Some(p) = checked {
        p
    } else {
        let contents = Contents::load(&hub.control, &deployments, &metas, &affected)?;
        plan(&nodes, &contents, &affected)?
    };
    out.nodes = publish(hub, &plan).await?;
    hub.commit().await?;
    Ok(out)
}

/// Publishes each node of `plan` whose rendered digest differs from the
/// last one published to it (or whose revision someone else moved), and
/// records what each node now gets. Paused nodes are skipped. Every
/// document is signed and stored first, made durable with one commit, and
/// only then published, so a change to many nodes costs one flush.
pub async fn publish(hub: &Hub, plan: &Plan) -> Result<Vec<NodeOutcome>, ChangeError> {
    let mut out = Vec::with_capacity(plan.nodes.len());
    let mut docs = Vec::new();
    for nr in &plan.nodes {
        let name = &nr.node.name;
        let prev = hub.control.rendered(name)?;
        let reg = hub.registry.get(name)?;
        let current = reg.as_ref().map_or(0, |r| r.desired_revision);
        let Some(rendered) = nr.rendered.as_ref().filter(|_| !nr.node.paused) else {
            if let Some(mut p) = prev.filter(|p| !p.deployments.is_empty() && !nr.node.paused) {
                // Selected by nothing any more: keep the document, say so.
                p.deployments.clear();
                p.sources.clear();
                hub.control.put_rendered(name, &p)?;
            }
            out.push(outcome(name, current, false));
            continue;
        };
        let digest = rendered.digest();
        let unchanged = prev
            .as_ref()
            .is_some_and(|p| p.digest == digest && p.revision == current);
        let revision = if unchanged {
            current
        } else {
            let previous_doc = reg.and_then(|r| r.desired);
            let publish_err = |source| ChangeError::Publish {
                node: name.clone(),
                source,
            };
            let (revision, doc) = hub
                .store_desired(&rendered.to_desired(name, 0))
                .map_err(publish_err)?;
            crate::api::grant_after_publish(hub, name, previous_doc.as_ref()).map_err(
                |source| ChangeError::Grant {
                    node: name.clone(),
                    source,
                },
            )?;
            docs.push((name.clone(), doc));
            revision
        };
        let rec = RenderedRecord {
            digest,
            revision,
            deployments: nr.deployments.clone(),
            sources: rendered.sources.clone(),
        };
        if prev.as_ref() != Some(&rec) {
            hub.control.put_rendered(name, &rec)?;
        }
        out.push(outcome(name, revision, !unchanged));
    }
    if !docs.is_empty() {
        hub.commit().await?;
    }
    for (name, doc) in docs {
        hub.publish_desired(&name, &doc)
            .await
            .map_err(|e| ChangeError::Publish {
                node: name.clone(),
                source: e.into(),
            })?;
        Metrics::inc(&hub.metrics.control_renders);
    }
    Ok(out)
}

fn outcome(node: &str, revision: u64, published: bool) -> NodeOutcome {
    NodeOutcome {
        node: node.to_owned(),
        revision,
        published,
    }
}

/// The deployments that select `node` now (empty when it is not labelled
/// or nothing selects it). Callers hold the control lock.
pub fn owners(hub: &Hub, node: &str) -> Result<Vec<String>, ChangeError> {
    let Some(n) = hub.control.node(node)? else {
        return Ok(Vec::new());
    };
    let list: Vec<Deployment> = hub.control.deployments()?.into_values().collect();
    let renderer = Renderer::new(&list).map_err(ChangeError::Render)?;
    Ok(renderer
        .selecting(&n)
        .iter()
        .map(|d| d.name.clone())
        .collect())
}

/// Re-renders every managed node and publishes what differs from the last
/// render (nothing, after a clean shutdown). Run at start so a crash between
/// storing a change and publishing it heals; a store that does not render
/// changes nothing and is logged.
pub async fn reconcile(hub: &Hub) -> Result<Vec<NodeOutcome>, ChangeError> {
    let _serialised = hub.control.lock.lock().await;
    let nodes = hub.control.nodes()?;
    let deployments = hub.control.deployments()?;
    let affected: BTreeSet<String> = nodes.keys().cloned().collect();
    let contents = Contents::load(&hub.control, &deployments, &BTreeMap::new(), &affected)?;
    let plan = plan(&nodes, &contents, &affected)?;
    let out = publish(hub, &plan).await?;
    hub.commit().await?;
    Ok(out)
}
