//! Persistence of the control plane: labelled nodes, deployments and the
//! last render published to each node, in three sled trees of the hub
//! database. Only valid objects are stored (the API validates first), so
//! everything read back renders.

use std::collections::BTreeMap;

use protocols::control::{Deployment, Node};
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// The control-plane store. Changes are serialised by its
/// internal async lock.
#[derive(Debug)]
pub struct Control {
    nodes: sled::Tree,
    deployments: sled::Tree,
    rendered: sled::Tree,
    /// Held across check, store and publish of one change (an async mutex,
    /// held across `.await` on purpose), so two changes never check against
    /// the same old state and a hand `PUT …/desired` cannot slip between.
    pub(crate) lock: tokio::sync::Mutex<()>,
    /// `limits.max_deployments`.
    pub max_deployments: usize,
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
            lock: tokio::sync::Mutex::new(()),
            max_deployments,
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
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_owned(),
        detail: e.to_string(),
    })?;
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
