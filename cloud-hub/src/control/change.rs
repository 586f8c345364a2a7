//! One change of the control plane: check it against every node it
//! affects ([`plan`]), store it, and publish what changed ([`publish`]).

use std::collections::{BTreeMap, BTreeSet};

use protocols::control::{Deployment, MergeConflict, Node, RenderError, Rendered, Renderer};

use super::store::{RenderedRecord, StoreError};
use crate::hub::{Hub, SetDesiredError};
use crate::metrics::Metrics;

/// A change an operator asks for.
#[derive(Debug, Clone)]
pub enum Change {
    /// Replace a node's labels, annotations and paused flag.
    Node(Node),
    /// Create or replace a deployment (already validated).
    PutDeployment(Deployment),
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeOutcome {
    /// The node.
    pub node: String,
    /// Its desired revision after the change (0: none).
    pub revision: u64,
    /// Whether a new revision was published.
    pub published: bool,
}

fn selected_by(d: &Deployment, nodes: &BTreeMap<String, Node>) -> Result<Vec<String>, ChangeError> {
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

/// Renders the `affected` nodes of `nodes` from `deployments`; the first
/// conflict or invalid document refuses the whole change.
pub fn plan(
    nodes: &BTreeMap<String, Node>,
    deployments: &BTreeMap<String, Deployment>,
    affected: &BTreeSet<String>,
) -> Result<Plan, ChangeError> {
    let list: Vec<Deployment> = deployments.values().cloned().collect();
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
        let rendered = if selecting.is_empty() {
            None
        } else {
            Some(renderer.render(node).map_err(|e| match e {
                RenderError::Conflict(conflict) => ChangeError::Conflict {
                    node: name.clone(),
                    conflict,
                },
                e => ChangeError::Render(e),
            })?)
        };
        out.nodes.push(NodeRender {
            node: node.clone(),
            deployments: selecting,
            rendered,
        });
    }
    Ok(out)
}

/// Checks, stores and publishes `change`. Returns what happened to each
/// affected node.
pub async fn apply(hub: &Hub, change: Change) -> Result<Vec<NodeOutcome>, ChangeError> {
    let _serialised = hub.control.lock.lock().await;
    let mut nodes = hub.control.nodes()?;
    let mut deployments = hub.control.deployments()?;
    let mut affected = BTreeSet::new();
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
        Change::PutDeployment(d) => {
            if let Some(old) = deployments.get(&d.name) {
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
        }
        Change::DeleteDeployment(name) => {
            let old = deployments
                .remove(name)
                .ok_or_else(|| ChangeError::NotFound(name.clone()))?;
            affected.extend(selected_by(&old, &nodes)?);
        }
    }
    let plan = plan(&nodes, &deployments, &affected)?;
    match &change {
        Change::Node(n) => hub.control.put_node(n)?,
        Change::PutDeployment(d) => hub.control.put_deployment(d)?,
        Change::DeleteDeployment(name) => {
            hub.control.delete_deployment(name)?;
        }
    }
    let out = publish(hub, &plan).await?;
    hub.commit().await?;
    Ok(out)
}

/// Publishes each node of `plan` whose rendered digest differs from the
/// last one published to it (or whose revision someone else moved), and
/// records what each node now gets. Paused nodes are skipped. This is where
/// the rollout loop will take over from "publish to every node now".
pub async fn publish(hub: &Hub, plan: &Plan) -> Result<Vec<NodeOutcome>, ChangeError> {
    let mut out = Vec::with_capacity(plan.nodes.len());
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
            let revision = hub
                .set_desired(&rendered.to_desired(name, 0))
                .await
                .map_err(|source| ChangeError::Publish {
                    node: name.clone(),
                    source,
                })?;
            crate::api::grant_after_publish(hub, name, previous_doc.as_ref()).map_err(
                |source| ChangeError::Grant {
                    node: name.clone(),
                    source,
                },
            )?;
            Metrics::inc(&hub.metrics.control_renders);
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
    let affected = nodes.keys().cloned().collect();
    let plan = plan(&nodes, &deployments, &affected)?;
    let out = publish(hub, &plan).await?;
    hub.commit().await?;
    Ok(out)
}
