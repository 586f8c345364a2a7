//! The node registry (standalone mode: embedded sled): desired documents,
//! last reported state and online status per node.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use protocols::{NodeStatus, ReportedState, SignedDesired};
use serde::{Deserialize, Serialize};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// sled failed.
    #[error("registry {op}: {source}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The sled error.
        #[source]
        source: sled::Error,
    },
    /// A stored record does not decode.
    #[error("registry record for node {node} is corrupt: {detail}")]
    Corrupt {
        /// The node.
        node: String,
        /// What is wrong.
        detail: String,
    },
    /// The registry holds `limit` nodes; a record for one more is refused.
    #[error("the registry holds {limit} nodes (limits.max_nodes); node {node} refused")]
    TooManyNodes {
        /// The refused node.
        node: String,
        /// The limit.
        limit: usize,
    },
    /// The document could not be signed.
    #[error("desired state cannot be signed: {0}")]
    Sign(String),
    /// The requested revision is not the next one (the hub assigns
    /// revisions; a client may name the next one to detect a concurrent change).
    #[error(
        "revision {got} is not the next revision of node {node} (current {current}); send revision 0 to let the hub assign it"
    )]
    StaleRevision {
        /// The node.
        node: String,
        /// Revision offered.
        got: u64,
        /// Revision stored.
        current: u64,
    },
}

/// What the hub knows about one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Current signed desired document.
    pub desired: Option<SignedDesired>,
    /// Its revision (0: none).
    pub desired_revision: u64,
    /// Last reported state received.
    pub reported: Option<ReportedState>,
    /// Last status received.
    pub status: Option<NodeStatus>,
}

/// The registry. All updates of one node are serialised by an internal lock.
#[derive(Debug)]
pub struct Registry {
    nodes: sled::Tree,
    /// Guards read-modify-write; holds the node count.
    lock: Mutex<usize>,
    max_nodes: usize,
}

impl Registry {
    /// Opens the `nodes` tree of `db` with no node cap.
    pub fn open(db: &sled::Db) -> Result<Self, RegistryError> {
        Self::open_with(db, usize::MAX)
    }

    /// Opens the `nodes` tree of `db`, refusing records for more than
    /// `max_nodes` nodes (nodes already stored are kept).
    pub fn open_with(db: &sled::Db, max_nodes: usize) -> Result<Self, RegistryError> {
        let nodes = db
            .open_tree("nodes")
            .map_err(|source| RegistryError::Db { op: "open", source })?;
        let count = nodes.len();
        Ok(Self {
            nodes,
            lock: Mutex::new(count),
            max_nodes,
        })
    }

    /// Whether `node` has a record.
    pub fn contains(&self, node: &str) -> Result<bool, RegistryError> {
        self.nodes
            .contains_key(node)
            .map_err(|source| RegistryError::Db { op: "get", source })
    }

    /// One node's record.
    pub fn get(&self, node: &str) -> Result<Option<NodeRecord>, RegistryError> {
        let Some(v) = self
            .nodes
            .get(node)
            .map_err(|source| RegistryError::Db { op: "get", source })?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| RegistryError::Corrupt {
                node: node.into(),
                detail: e.to_string(),
            })
    }

    /// Every node, by name.
    pub fn all(&self) -> Result<BTreeMap<String, NodeRecord>, RegistryError> {
        let mut out = BTreeMap::new();
        for kv in &self.nodes {
            let (k, v) = kv.map_err(|source| RegistryError::Db { op: "scan", source })?;
            let node = String::from_utf8_lossy(&k).into_owned();
            let rec = serde_json::from_slice(&v).map_err(|e| RegistryError::Corrupt {
                node: node.clone(),
                detail: e.to_string(),
            })?;
            out.insert(node, rec);
        }
        Ok(out)
    }

    /// Read-modify-write of one record.
    pub fn update<T>(
        &self,
        node: &str,
        f: impl FnOnce(&mut NodeRecord) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut count = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let existing = self.get(node)?;
        let is_new = existing.is_none();
        if is_new && *count >= self.max_nodes {
            return Err(RegistryError::TooManyNodes {
                node: node.into(),
                limit: self.max_nodes,
            });
        }
        let mut rec = existing.unwrap_or_default();
        let out = f(&mut rec)?;
        let bytes = serde_json::to_vec(&rec).map_err(|e| RegistryError::Corrupt {
            node: node.into(),
            detail: e.to_string(),
        })?;
        self.nodes
            .insert(node, bytes)
            .map_err(|source| RegistryError::Db {
                op: "insert",
                source,
            })?;
        if is_new {
            *count += 1;
        }
        Ok(out)
    }

    /// Stores a new desired document at the next revision of `node`, which
    /// the hub assigns: `requested` is 0 (assign) or must be exactly the
    /// next revision (optimistic concurrency: the client saw the current
    /// one). `sign` makes the document for the assigned revision. Returns
    /// the revision and the document.
    pub fn set_desired(
        &self,
        node: &str,
        requested: u64,
        sign: impl FnOnce(u64) -> Result<SignedDesired, String>,
    ) -> Result<(u64, SignedDesired), RegistryError> {
        self.update(node, |rec| {
            let current = rec.desired_revision;
            let Some(next) = current.checked_add(1) else {
                return Err(RegistryError::Sign(format!(
                    "node {node} is at the last revision {current}"
                )));
            };
            if requested != 0 && requested != next {
                return Err(RegistryError::StaleRevision {
                    node: node.into(),
                    got: requested,
                    current,
                });
            }
            let doc = sign(next).map_err(RegistryError::Sign)?;
            rec.desired = Some(doc.clone());
            rec.desired_revision = next;
            Ok((next, doc))
        })
    }
}
