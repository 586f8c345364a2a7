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
    /// The new revision is not greater than the stored one.
    #[error("revision {got} is not greater than the current revision {current} of node {node}")]
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
    lock: Mutex<()>,
}

impl Registry {
    /// Opens the `nodes` tree of `db`.
    pub fn open(db: &sled::Db) -> Result<Self, RegistryError> {
        Ok(Self {
            nodes: db
                .open_tree("nodes")
                .map_err(|source| RegistryError::Db { op: "open", source })?,
            lock: Mutex::new(()),
        })
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
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rec = self.get(node)?.unwrap_or_default();
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
        Ok(out)
    }

    /// Stores a new desired document; refuses a revision that is not newer.
    pub fn set_desired(
        &self,
        node: &str,
        revision: u64,
        doc: SignedDesired,
    ) -> Result<(), RegistryError> {
        self.update(node, |rec| {
            if revision <= rec.desired_revision {
                return Err(RegistryError::StaleRevision {
                    node: node.into(),
                    got: revision,
                    current: rec.desired_revision,
                });
            }
            rec.desired = Some(doc);
            rec.desired_revision = revision;
            Ok(())
        })
    }
}
