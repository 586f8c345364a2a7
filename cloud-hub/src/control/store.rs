//! Persistence of the control plane: labelled nodes, deployments and the
//! last render published to each node, in three sled trees of the hub
//! database. Only valid objects are stored (the API validates first), so
//! everything read back renders.

use std::collections::{BTreeMap, BTreeSet};

use protocols::FunctionSpec;
use protocols::control::{
    Deployment, Node, NodeProgress, NodeView, RolloutProgress, RolloutSpec, RolloutStatus,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a control-plane store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("control store {op}: {source}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The sled error.
        #[source]
        source: sled::Error,
    },
    /// A stored record does not decode.
    #[error("control store: record {key:?} of {tree} is corrupt: {detail}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// The record's key.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

/// What was last rendered and published to one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RenderedRecord {
    /// Content digest of the published render ([`protocols::control::Rendered::digest`]).
    pub digest: String,
    /// The revision it was published at.
    pub revision: u64,
    /// The deployments that select the node now (empty: none; the node keeps
    /// its last document).
    pub deployments: Vec<String>,
    /// Which deployment each item came from (`functions/NAME` → deployment).
    pub sources: BTreeMap<String, String>,
}

/// Revision bookkeeping of one deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentMeta {
    /// The latest revision (what `GET /v1/deployments/{name}` shows).
    pub revision: u64,
    /// The revision nodes get that no rollout pins: the last one that was
    /// applied at once or whose rollout succeeded (0: none yet, the
    /// deployment contributes nothing to such nodes).
    pub stable: u64,
    /// The rollout in progress (or done with skipped nodes still to catch
    /// up), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
}

/// One stored revision of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevisionRecord {
    /// The revision number, from 1.
    pub revision: u64,
    /// The deployment as it was put.
    pub deployment: Deployment,
    /// When it was stored, ms since epoch.
    pub created_ms: u64,
    /// The rollout that delivered it (absent: applied at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// Set when this revision re-issues an earlier one (`undo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_of: Option<u64>,
}

/// Which revision of one deployment one node renders, when a rollout
/// decided it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Pin {
    /// The revision rendered for the node (0: the deployment gives it
    /// nothing).
    pub revision: u64,
    /// The last revision that was healthy on the node: where a rollback
    /// sends it.
    pub last_healthy: u64,
}

/// One rollout as stored: what was asked and where it stands. Per-node
/// progress is stored per node beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutRecord {
    /// `{deployment}-r{revision}`.
    pub id: String,
    /// What the operator asked for.
    pub spec: RolloutSpec,
    /// Where it stands.
    pub status: RolloutStatus,
    /// The functions of the revision that differ from the revision it
    /// replaces: what the health gate judges.
    #[serde(default)]
    pub changed: Vec<FunctionSpec>,
}

/// The control-plane store. Changes are serialised by its
/// internal async lock.
#[derive(Debug)]
pub struct Control {
    nodes: sled::Tree,
    deployments: sled::Tree,
    rendered: sled::Tree,
    meta: sled::Tree,
    revisions: sled::Tree,
    pins: sled::Tree,
    rollouts: sled::Tree,
    progress: sled::Tree,
    baselines: sled::Tree,
    /// Held across check, store and publish of one change (an async mutex,
    /// held across `.await` on purpose), so two changes never check against
    /// the same old state and a hand `PUT …/desired` cannot slip between.
    pub(crate) lock: tokio::sync::Mutex<()>,
    /// `limits.max_deployments`.
    pub max_deployments: usize,
    /// Bumped by every change of rollouts made outside the loop (new,
    /// superseded, commanded), so the loop reloads them.
    pub(crate) generation: std::sync::atomic::AtomicU64,
    /// Every stored change of a rollout's status, for watchers (SSE).
    pub(crate) watch: tokio::sync::broadcast::Sender<RolloutRecord>,
    /// Wakes the rollout loop early: a node reported, or an operator
    /// changed something.
    pub(crate) poke: tokio::sync::Notify,
}

fn db(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Db { op, source }
}

impl Control {
    /// Opens the control trees of `db`, holding at most `max_deployments`
    /// deployments.
    pub fn open(db_: &sled::Db, max_deployments: usize) -> Result<Self, StoreError> {
        Ok(Self {
            nodes: db_.open_tree("control_nodes").map_err(db("open"))?,
            deployments: db_.open_tree("control_deployments").map_err(db("open"))?,
            rendered: db_.open_tree("control_rendered").map_err(db("open"))?,
            meta: db_
                .open_tree("control_deployment_meta")
                .map_err(db("open"))?,
            revisions: db_.open_tree("control_revisions").map_err(db("open"))?,
            pins: db_.open_tree("control_pins").map_err(db("open"))?,
            rollouts: db_.open_tree("control_rollouts").map_err(db("open"))?,
            progress: db_.open_tree("control_progress").map_err(db("open"))?,
            baselines: db_.open_tree("control_baselines").map_err(db("open"))?,
            lock: tokio::sync::Mutex::new(()),
            max_deployments,
            generation: std::sync::atomic::AtomicU64::new(0),
            watch: tokio::sync::broadcast::channel(256).0,
            poke: tokio::sync::Notify::new(),
        })
    }

    /// One labelled node.
    pub fn node(&self, name: &str) -> Result<Option<Node>, StoreError> {
        get(&self.nodes, "control_nodes", name)
    }

    /// Every labelled node, by name.
    pub fn nodes(&self) -> Result<BTreeMap<String, Node>, StoreError> {
        scan(&self.nodes, "control_nodes")
    }

    /// Stores `node` (replacing its labels, annotations and paused flag).
    pub fn put_node(&self, node: &Node) -> Result<(), StoreError> {
        put(&self.nodes, "control_nodes", &node.name, node)
    }

    /// One deployment.
    pub fn deployment(&self, name: &str) -> Result<Option<Deployment>, StoreError> {
        get(&self.deployments, "control_deployments", name)
    }

    /// Every deployment, by name.
    pub fn deployments(&self) -> Result<BTreeMap<String, Deployment>, StoreError> {
        scan(&self.deployments, "control_deployments")
    }

    /// Stores `d`, replacing the deployment of that name.
    pub fn put_deployment(&self, d: &Deployment) -> Result<(), StoreError> {
        put(&self.deployments, "control_deployments", &d.name, d)
    }

    /// Deletes the deployment `name`; whether it existed.
    pub fn delete_deployment(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .deployments
            .remove(name)
            .map_err(db("remove"))?
            .is_some())
    }

    /// What was last rendered for `node`.
    pub fn rendered(&self, node: &str) -> Result<Option<RenderedRecord>, StoreError> {
        get(&self.rendered, "control_rendered", node)
    }

    /// Records what was rendered for `node`.
    pub fn put_rendered(&self, node: &str, rec: &RenderedRecord) -> Result<(), StoreError> {
        put(&self.rendered, "control_rendered", node, rec)
    }
}

/// Key of `b` under `a` in a two-level tree (names never hold `/`).
fn key2(a: &str, b: &str) -> String {
    format!("{a}/{b}")
}

fn rev_key(name: &str, revision: u64) -> String {
    format!("{name}/{revision:020}")
}

impl Control {
    /// Revision bookkeeping of a deployment. A deployment stored before
    /// revisions existed reads as revision 1, stable.
    pub fn meta(&self, name: &str) -> Result<Option<DeploymentMeta>, StoreError> {
        match get(&self.meta, "control_deployment_meta", name)? {
            Some(m) => Ok(Some(m)),
            None if self.deployments.contains_key(name).map_err(db("get"))? => {
                Ok(Some(DeploymentMeta {
                    revision: 1,
                    stable: 1,
                    rollout: None,
                }))
            }
            None => Ok(None),
        }
    }

    /// Stores the bookkeeping of a deployment.
    pub fn put_meta(&self, name: &str, m: &DeploymentMeta) -> Result<(), StoreError> {
        put(&self.meta, "control_deployment_meta", name, m)
    }

    /// One revision of a deployment. Revision 1 of a deployment stored
    /// before revisions existed is the stored deployment.
    pub fn revision(
        &self,
        name: &str,
        revision: u64,
    ) -> Result<Option<RevisionRecord>, StoreError> {
        let key = rev_key(name, revision);
        if let Some(r) = get(&self.revisions, "control_revisions", &key)? {
            return Ok(Some(r));
        }
        if revision == 1 && self.meta.get(name).map_err(db("get"))?.is_none() {
            return Ok(self.deployment(name)?.map(|deployment| RevisionRecord {
                revision: 1,
                deployment,
                created_ms: 0,
                rollout: None,
                undo_of: None,
            }));
        }
        Ok(None)
    }

    /// Every stored revision of a deployment, oldest first.
    pub fn revisions(&self, name: &str) -> Result<Vec<RevisionRecord>, StoreError> {
        let prefix = format!("{name}/");
        let mut out = Vec::new();
        for kv in self.revisions.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv.map_err(db("scan"))?;
            out.push(decode(
                "control_revisions",
                &String::from_utf8_lossy(&k),
                &v,
            )?);
        }
        if out.is_empty()
            && let Some(r) = self.revision(name, 1)?
        {
            out.push(r);
        }
        Ok(out)
    }

    /// Stores a revision.
    pub fn put_revision(&self, name: &str, r: &RevisionRecord) -> Result<(), StoreError> {
        put(
            &self.revisions,
            "control_revisions",
            &rev_key(name, r.revision),
            r,
        )
    }

    /// Deletes a deployment's revisions, pins and bookkeeping.
    pub fn forget_deployment(&self, name: &str) -> Result<(), StoreError> {
        remove_prefix(&self.revisions, &format!("{name}/"))?;
        self.meta.remove(name).map_err(db("remove"))?;
        let suffix = format!("/{name}");
        for kv in &self.pins {
            let (k, _) = kv.map_err(db("scan"))?;
            if k.ends_with(suffix.as_bytes()) {
                self.pins.remove(k).map_err(db("remove"))?;
            }
        }
        Ok(())
    }

    /// The pin of `deployment` on `node`, if a rollout set one.
    pub fn pin(&self, node: &str, deployment: &str) -> Result<Option<Pin>, StoreError> {
        get(&self.pins, "control_pins", &key2(node, deployment))
    }

    /// Every pin of `node`, by deployment.
    pub fn pins_of(&self, node: &str) -> Result<BTreeMap<String, Pin>, StoreError> {
        let prefix = format!("{node}/");
        let mut out = BTreeMap::new();
        for kv in self.pins.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv.map_err(db("scan"))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let pin = decode("control_pins", &key, &v)?;
            out.insert(key[prefix.len()..].to_owned(), pin);
        }
        Ok(out)
    }

    /// Sets the pins of many nodes for one deployment in one batch.
    pub fn put_pins<'a>(
        &self,
        deployment: &str,
        pins: impl IntoIterator<Item = (&'a str, Pin)>,
    ) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for (node, pin) in pins {
            b.insert(
                key2(node, deployment).as_bytes(),
                encode("control_pins", node, &pin)?,
            );
        }
        self.pins.apply_batch(b).map_err(db("batch"))
    }

    /// Drops every pin of `deployment` (it is applied at once to all).
    pub fn clear_pins(&self, deployment: &str) -> Result<(), StoreError> {
        let suffix = format!("/{deployment}");
        let mut b = sled::Batch::default();
        for kv in &self.pins {
            let (k, _) = kv.map_err(db("scan"))?;
            if k.ends_with(suffix.as_bytes()) {
                b.remove(k);
            }
        }
        self.pins.apply_batch(b).map_err(db("batch"))
    }

    /// Tells watchers a rollout's status changed (nobody listening is fine).
    pub fn notify(&self, r: &RolloutRecord) {
        let _ = self.watch.send(r.clone());
    }

    /// Follows status changes of every rollout.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<RolloutRecord> {
        self.watch.subscribe()
    }

    /// One rollout.
    pub fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        get(&self.rollouts, "control_rollouts", id)
    }

    /// Every rollout, by id.
    pub fn rollouts(&self) -> Result<BTreeMap<String, RolloutRecord>, StoreError> {
        scan(&self.rollouts, "control_rollouts")
    }

    /// Stores a rollout's spec and status.
    pub fn put_rollout(&self, r: &RolloutRecord) -> Result<(), StoreError> {
        put(&self.rollouts, "control_rollouts", &r.id, r)
    }

    /// The per-node progress of a rollout.
    pub fn progress(&self, id: &str) -> Result<RolloutProgress, StoreError> {
        let prefix = format!("{id}/");
        let mut out = RolloutProgress::new();
        for kv in self.progress.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv.map_err(db("scan"))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let p: NodeProgress = decode("control_progress", &key, &v)?;
            out.insert(key[prefix.len()..].to_owned(), p);
        }
        Ok(out)
    }

    /// Stores the progress of the given nodes of a rollout in one batch.
    pub fn put_progress<'a>(
        &self,
        id: &str,
        entries: impl IntoIterator<Item = (&'a String, &'a NodeProgress)>,
    ) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for (node, p) in entries {
            b.insert(
                key2(id, node).as_bytes(),
                encode("control_progress", node, p)?,
            );
        }
        self.progress.apply_batch(b).map_err(db("batch"))
    }

    /// The health baselines of a rollout (what each node reported when it
    /// applied), by node.
    pub fn baselines(&self, id: &str) -> Result<BTreeMap<String, NodeView>, StoreError> {
        let prefix = format!("{id}/");
        let mut out = BTreeMap::new();
        for kv in self.baselines.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv.map_err(db("scan"))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let b: NodeView = decode("control_baselines", &key, &v)?;
            out.insert(key[prefix.len()..].to_owned(), b);
        }
        Ok(out)
    }

    /// Stores one node's health baseline.
    pub fn put_baseline(&self, id: &str, node: &str, view: &NodeView) -> Result<(), StoreError> {
        put(&self.baselines, "control_baselines", &key2(id, node), view)
    }

    /// Deletes a rollout: its record, progress and baselines.
    pub fn delete_rollout(&self, id: &str) -> Result<(), StoreError> {
        self.rollouts.remove(id).map_err(db("remove"))?;
        remove_prefix(&self.progress, &format!("{id}/"))?;
        remove_prefix(&self.baselines, &format!("{id}/"))
    }

    /// Deletes one revision of a deployment.
    pub fn delete_revision(&self, name: &str, revision: u64) -> Result<(), StoreError> {
        self.revisions
            .remove(rev_key(name, revision))
            .map_err(db("remove"))?;
        Ok(())
    }

    /// The revisions of `deployment` some node is pinned on.
    pub fn pinned_revisions(&self, deployment: &str) -> Result<BTreeSet<u64>, StoreError> {
        let suffix = format!("/{deployment}");
        let mut out = BTreeSet::new();
        for kv in &self.pins {
            let (k, v) = kv.map_err(db("scan"))?;
            if k.ends_with(suffix.as_bytes()) {
                let key = String::from_utf8_lossy(&k).into_owned();
                let p: Pin = decode("control_pins", &key, &v)?;
                out.insert(p.revision);
                out.insert(p.last_healthy);
            }
        }
        Ok(out)
    }

    /// Drops a finished rollout's baselines (its progress and status stay
    /// for history).
    pub fn drop_baselines(&self, id: &str) -> Result<(), StoreError> {
        remove_prefix(&self.baselines, &format!("{id}/"))
    }
}

fn remove_prefix(t: &sled::Tree, prefix: &str) -> Result<(), StoreError> {
    let mut b = sled::Batch::default();
    for kv in t.scan_prefix(prefix.as_bytes()) {
        let (k, _) = kv.map_err(db("scan"))?;
        b.remove(k);
    }
    t.apply_batch(b).map_err(db("batch"))
}

fn encode<T: Serialize>(tree: &'static str, key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &str, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

fn get<T: DeserializeOwned>(
    t: &sled::Tree,
    tree: &'static str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    t.get(key)
        .map_err(db("get"))?
        .map(|v| decode(tree, key, &v))
        .transpose()
}

fn scan<T: DeserializeOwned>(
    t: &sled::Tree,
    tree: &'static str,
) -> Result<BTreeMap<String, T>, StoreError> {
    let mut out = BTreeMap::new();
    for kv in t {
        let (k, v) = kv.map_err(db("scan"))?;
        let key = String::from_utf8_lossy(&k).into_owned();
        let value = decode(tree, &key, &v)?;
        out.insert(key, value);
    }
    Ok(out)
}

fn put<T: Serialize>(
    t: &sled::Tree,
    tree: &'static str,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let bytes = encode(tree, key, value)?;
    t.insert(key, bytes).map_err(db("insert"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn objects_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node {
            name: "n1".into(),
            labels: BTreeMap::from([("site".into(), "lyon".into())]),
            ..Node::default()
        };
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "name": "base", "selector": {}, "priority": 3}))
        .unwrap();
        let rec = RenderedRecord {
            digest: "ab".into(),
            revision: 2,
            deployments: vec!["base".into()],
            sources: BTreeMap::new(),
        };
        // No background flusher: it would hold the lock for a moment after
        // the first handle is dropped, and the reopen would race it.
        let open = |p: &std::path::Path| {
            sled::Config::new()
                .path(p)
                .flush_every_ms(None)
                .open()
                .unwrap()
        };
        {
            let db_ = open(dir.path());
            let c = Control::open(&db_, 10).unwrap();
            c.put_node(&node).unwrap();
            c.put_deployment(&d).unwrap();
            c.put_rendered("n1", &rec).unwrap();
            db_.flush().unwrap();
        }
        let db_ = open(dir.path());
        let c = Control::open(&db_, 10).unwrap();
        assert_eq!(c.node("n1").unwrap(), Some(node));
        assert_eq!(c.deployments().unwrap()["base"], d);
        assert_eq!(c.rendered("n1").unwrap(), Some(rec));
        assert!(c.delete_deployment("base").unwrap());
        assert!(!c.delete_deployment("base").unwrap());
        assert!(c.deployment("base").unwrap().is_none());
    }
}
