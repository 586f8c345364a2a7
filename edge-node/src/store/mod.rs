//! All on-disk state of an edge node, in one sled database.
//!
//! Nothing outside this module sees a sled type. Trees:
//! - `desired`: the current and previous signed desired-state documents;
//! - `outbox/{stream}`: telemetry waiting for the hub's ack (see [`outbox`]);
//! - `kv/{function}`: device-function key-value state;
//! - `artifacts`: index of downloaded blobs (the blobs are files named by digest);
//! - `meta`: the pinned hub key and bookkeeping.
//!
//! # Durability and the loss window
//! sled buffers writes in memory and writes them out on `flush`. This module
//! flushes synchronously for desired state and artifacts (rare, must survive),
//! and in group commits for the outbox: the committer ([`commit`],
//! [`Store::run_committer`]) calls [`Store::commit`] every `flush_interval`
//! (default 100 ms), and the uplink only publishes
//! samples that a completed commit covers. Consequences:
//! - a `kill -9` or power cut loses at most the samples not yet covered by a
//!   completed commit: those still batched in the pipeline (at most the
//!   desired state's `batch_max_age_ms`) and those appended after the last
//!   commit (at most `flush_interval`). None of them was ever published, so
//!   the hub never sees a sequence number twice with different samples and
//!   never sees a gap. (A device function may hold a few more samples by
//!   design, e.g. swinging door's open segment; those are lost with it.)
//! - the loss is never silent: each commit records the time it covered, a
//!   clean stop leaves a marker, and a start without that marker records a
//!   [`protocols::LossWindow`] `[last commit − batch_max_age, restart]`. The
//!   last [`LOSS_WINDOWS_KEPT`] windows are kept here and sent in every
//!   reported state, and an `unclean-restart` event is raised;
//! - sled does not `fsync` on every flush; an OS crash (not a process crash)
//!   can lose more. That is sled's documented limit, measured by our crash tests.

pub mod commit;
pub mod outbox;
pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use protocols::SignedDesired;

pub use outbox::{AckOutcome, Outbox, OutboxLimits, OutboxStats, OverflowPolicy};
pub use writer::OutboxWriter;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the database lock.
    #[error(
        "store at {path} is locked by another process (is another edge-node running with the same data_dir?)"
    )]
    Locked {
        /// Database directory.
        path: PathBuf,
    },
    /// The database could not be opened (corrupt, unreadable, disk full…).
    #[error("cannot open store at {path}: {source}")]
    Open {
        /// Database directory.
        path: PathBuf,
        /// The sled error.
        #[source]
        source: sled::Error,
    },
    /// A read or write failed (disk full, I/O error, corruption).
    #[error("store {op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The sled error.
        #[source]
        source: sled::Error,
    },
    /// A stored record could not be decoded.
    #[error("store record {what} is corrupt: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

pub(crate) fn io(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Io { op, source }
}

/// Index entry of one downloaded, verified artifact (the blob itself is the
/// file `{data_dir}/artifacts/{sha256}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// Size in bytes.
    pub size: u64,
    /// When it was verified and stored, ms since the Unix epoch.
    pub stored_at_ms: u64,
}

fn decode_artifact(sha256: &str, v: &[u8]) -> Result<ArtifactRecord, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("artifacts/{sha256}"),
        detail: format!("{} bytes, expected 16", v.len()),
    };
    let size = v
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(corrupt)?;
    let at = v
        .get(8..16)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(corrupt)?;
    Ok(ArtifactRecord {
        size: u64::from_be_bytes(size),
        stored_at_ms: u64::from_be_bytes(at),
    })
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Database directory.
    pub path: PathBuf,
    /// sled page cache size in bytes.
    pub cache_capacity_bytes: u64,
    /// Outbox capacity.
    pub outbox: OutboxLimits,
}

/// The edge node's database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    desired: sled::Tree,
    meta: sled::Tree,
    artifacts: sled::Tree,
    path: PathBuf,
    outbox_limits: OutboxLimits,
    outboxes: Mutex<HashMap<String, Outbox>>,
}

const CURRENT: &[u8] = b"current";
const PREVIOUS: &[u8] = b"previous";
const HUB_KEY: &[u8] = b"hub_key";
const LAST_COMMIT_MS: &[u8] = b"last_commit_ms";
const LAST_COMMIT_LAG_MS: &[u8] = b"last_commit_lag_ms";
const CLEAN_STOP: &[u8] = b"clean_stop";
const LOSS_WINDOWS: &[u8] = b"loss_windows";
/// How long [`Store::open`] waits for another holder to release the lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Unclean restarts remembered (and reported) per node.
pub const LOSS_WINDOWS_KEPT: usize = 64;

impl Store {
    /// Opens (or creates) the database. A lock still held by a previous
    /// instance that is exiting (or by this process's own store being
    /// dropped: sled releases it from a background thread) is retried for up
    /// to [`LOCK_WAIT`] before [`StoreError::Locked`] is returned.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            let opened = sled::Config::new()
                .path(&config.path)
                .cache_capacity(config.cache_capacity_bytes)
                // We flush ourselves (group commit); sled's own timer stays as a backstop.
                .flush_every_ms(Some(1_000))
                .open();
            match opened {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("could not acquire lock") =>
                {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked {
                            path: config.path.clone(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: config.path.clone(),
                        source,
                    });
                }
            }
        };
        let desired = db.open_tree("desired").map_err(io("open desired tree"))?;
        let meta = db.open_tree("meta").map_err(io("open meta tree"))?;
        let artifacts = db
            .open_tree("artifacts")
            .map_err(io("open artifacts tree"))?;
        let store = Self {
            inner: Arc::new(Inner {
                db,
                desired,
                meta,
                artifacts,
                path: config.path.clone(),
                outbox_limits: config.outbox.clone(),
                outboxes: Mutex::new(HashMap::new()),
            }),
        };
        // Re-open every outbox that has data so backlog stats are right from the start.
        for name in store.inner.db.tree_names() {
            if let Some(stream) = name.strip_prefix(b"outbox/") {
                let stream = String::from_utf8_lossy(stream).into_owned();
                store.outbox(&stream)?;
            }
        }
        Ok(store)
    }

    /// Database directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The current desired document, if any was ever accepted.
    pub fn desired_current(&self) -> Result<Option<SignedDesired>, StoreError> {
        self.read_desired(CURRENT)
    }

    /// The desired document before the current one.
    pub fn desired_previous(&self) -> Result<Option<SignedDesired>, StoreError> {
        self.read_desired(PREVIOUS)
    }

    fn read_desired(&self, key: &[u8]) -> Result<Option<SignedDesired>, StoreError> {
        let Some(v) = self.inner.desired.get(key).map_err(io("read desired"))? else {
            return Ok(None);
        };
        SignedDesired::decode(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                what: format!("desired/{}", String::from_utf8_lossy(key)),
                detail: e.to_string(),
            })
    }

    /// Makes `doc` the current desired document (the old one becomes previous)
    /// and waits until it is on disk. Call before acting on it.
    pub async fn put_desired(&self, doc: &SignedDesired) -> Result<(), StoreError> {
        let bytes = doc.encode().map_err(|e| StoreError::Corrupt {
            what: "desired (encoding)".into(),
            detail: e.to_string(),
        })?;
        let mut batch = sled::Batch::default();
        if let Some(old) = self
            .inner
            .desired
            .get(CURRENT)
            .map_err(io("read desired"))?
        {
            batch.insert(PREVIOUS, old);
        }
        batch.insert(CURRENT, bytes);
        self.inner
            .desired
            .apply_batch(batch)
            .map_err(io("write desired"))?;
        self.commit().await
    }

    /// The hub public key this node trusts (hex), if pinned.
    pub fn hub_key(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .inner
            .meta
            .get(HUB_KEY)
            .map_err(io("read hub key"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Pins the hub public key (trust on first use) and waits until it is on disk.
    pub async fn pin_hub_key(&self, hex: &str) -> Result<(), StoreError> {
        self.inner
            .meta
            .insert(HUB_KEY, hex.as_bytes())
            .map_err(io("write hub key"))?;
        self.commit().await
    }

    /// The outbox of `stream`, created on first use.
    pub fn outbox(&self, stream: &str) -> Result<Outbox, StoreError> {
        let mut map = self
            .inner
            .outboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(o) = map.get(stream) {
            return Ok(o.clone());
        }
        let tree = self
            .inner
            .db
            .open_tree(format!("outbox/{stream}"))
            .map_err(io("open outbox tree"))?;
        let o = Outbox::open(stream, tree, self.inner.outbox_limits.clone())?;
        map.insert(stream.to_owned(), o.clone());
        Ok(o)
    }

    /// The outbox of `stream` if it exists (open, or on disk since the
    /// start); never creates one. Acks go through here: a forged ack for a
    /// new name must not create a tree (H6).
    pub fn existing_outbox(&self, stream: &str) -> Option<Outbox> {
        self.inner
            .outboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(stream)
            .cloned()
    }

    /// Every outbox opened so far (all that have data, plus new ones).
    pub fn outboxes(&self) -> Vec<Outbox> {
        let map = self
            .inner
            .outboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<Outbox> = map.values().cloned().collect();
        v.sort_by(|a, b| a.stream().cmp(b.stream()));
        v
    }

    /// Group commit: flushes everything written so far and then marks every
    /// outbox's appended samples as durable (publishable).
    pub async fn commit(&self) -> Result<(), StoreError> {
        let outboxes = self.outboxes();
        let marks: Vec<u64> = outboxes.iter().map(Outbox::appended_seq).collect();
        self.inner.db.flush_async().await.map_err(io("flush"))?;
        for (o, m) in outboxes.iter().zip(marks) {
            o.mark_durable(m);
        }
        Ok(())
    }

    /// Records the time a commit covered and how far behind the samples'
    /// own time the appends it covers ran (for crash-window reporting).
    pub fn record_commit_time(&self, now_ms: u64) -> Result<(), StoreError> {
        let lag = self
            .outboxes()
            .iter()
            .map(Outbox::take_append_lag)
            .max()
            .unwrap_or(0);
        self.inner
            .meta
            .insert(LAST_COMMIT_MS, &now_ms.to_be_bytes())
            .map_err(io("write commit time"))?;
        self.inner
            .meta
            .insert(LAST_COMMIT_LAG_MS, &lag.to_be_bytes())
            .map_err(io("write commit lag"))?;
        Ok(())
    }

    /// The append lag recorded with the last commit (0 if none).
    pub fn last_commit_lag(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .meta
            .get(LAST_COMMIT_LAG_MS)
            .map_err(io("read commit lag"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Marks the stop as clean (everything buffered was committed) and flushes.
    pub async fn mark_clean_stop(&self) -> Result<(), StoreError> {
        self.inner
            .meta
            .insert(CLEAN_STOP, &[1u8])
            .map_err(io("write clean-stop marker"))?;
        self.inner.db.flush_async().await.map_err(io("flush"))?;
        Ok(())
    }

    /// Whether the last stop was clean; clears the marker (durably), so a
    /// later kill is not mistaken for a clean stop.
    pub fn take_clean_stop(&self) -> Result<bool, StoreError> {
        let was = self
            .inner
            .meta
            .remove(CLEAN_STOP)
            .map_err(io("clear clean-stop marker"))?
            .is_some();
        self.inner.db.flush().map_err(io("flush"))?;
        Ok(was)
    }

    /// Remembers an unclean restart (durably), keeping the most recent
    /// [`LOSS_WINDOWS_KEPT`].
    pub fn record_loss_window(&self, w: protocols::LossWindow) -> Result<(), StoreError> {
        let mut all = self.loss_windows()?;
        all.push(w);
        let excess = all.len().saturating_sub(LOSS_WINDOWS_KEPT);
        all.drain(..excess);
        let v = serde_json::to_vec(&all).map_err(|e| StoreError::Corrupt {
            what: "meta/loss_windows".into(),
            detail: e.to_string(),
        })?;
        self.inner
            .meta
            .insert(LOSS_WINDOWS, v)
            .map_err(io("write loss windows"))?;
        self.inner.db.flush().map_err(io("flush"))?;
        Ok(())
    }

    /// The remembered unclean restarts, oldest first.
    pub fn loss_windows(&self) -> Result<Vec<protocols::LossWindow>, StoreError> {
        match self
            .inner
            .meta
            .get(LOSS_WINDOWS)
            .map_err(io("read loss windows"))?
        {
            None => Ok(Vec::new()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                what: "meta/loss_windows".into(),
                detail: e.to_string(),
            }),
        }
    }

    /// The time the last commit covered, if any.
    pub fn last_commit_time(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .inner
            .meta
            .get(LAST_COMMIT_MS)
            .map_err(io("read commit time"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok().map(u64::from_be_bytes)))
    }

    /// Reads a function's key-value entry.
    pub fn kv_get(&self, function: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.kv_tree(function)?;
        Ok(t.get(key).map_err(io("kv get"))?.map(|v| v.to_vec()))
    }

    /// Writes a function's key-value entry (durable at the next commit).
    pub fn kv_put(&self, function: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.kv_tree(function)?
            .insert(key, value)
            .map_err(io("kv put"))?;
        Ok(())
    }

    /// Length of a function's key-value entry, `None` if absent.
    pub fn kv_value_len(&self, function: &str, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let t = self.kv_tree(function)?;
        Ok(t.get(key).map_err(io("kv get"))?.map(|v| v.len() as u64))
    }

    /// Deletes a function's key-value entry; returns the length of the value
    /// it had, `None` if it was absent.
    pub fn kv_delete(&self, function: &str, key: &[u8]) -> Result<Option<u64>, StoreError> {
        Ok(self
            .kv_tree(function)?
            .remove(key)
            .map_err(io("kv delete"))?
            .map(|v| v.len() as u64))
    }

    /// Number of entries of a function's key-value store and their total
    /// size (keys plus values), by reading every entry.
    pub fn kv_usage(&self, function: &str) -> Result<(u64, u64), StoreError> {
        let (mut keys, mut bytes) = (0u64, 0u64);
        for kv in &self.kv_tree(function)? {
            let (k, v) = kv.map_err(io("kv scan"))?;
            keys += 1;
            bytes = bytes.saturating_add((k.len() + v.len()) as u64);
        }
        Ok((keys, bytes))
    }

    fn kv_tree(&self, function: &str) -> Result<sled::Tree, StoreError> {
        self.inner
            .db
            .open_tree(format!("kv/{function}"))
            .map_err(io("open kv tree"))
    }

    /// Records that artifact `sha256` (verified, `size` bytes) is stored as a
    /// file, and waits until the record is on disk.
    pub async fn artifact_put(
        &self,
        sha256: &str,
        record: ArtifactRecord,
    ) -> Result<(), StoreError> {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&record.size.to_be_bytes());
        v[8..].copy_from_slice(&record.stored_at_ms.to_be_bytes());
        self.inner
            .artifacts
            .insert(sha256.as_bytes(), &v)
            .map_err(io("write artifact record"))?;
        self.commit().await
    }

    /// The index record of artifact `sha256`, if it was stored.
    pub fn artifact_get(&self, sha256: &str) -> Result<Option<ArtifactRecord>, StoreError> {
        self.inner
            .artifacts
            .get(sha256.as_bytes())
            .map_err(io("read artifact record"))?
            .map(|v| decode_artifact(sha256, &v))
            .transpose()
    }

    /// Every indexed artifact, by digest.
    pub fn artifacts(&self) -> Result<Vec<(String, ArtifactRecord)>, StoreError> {
        let mut out = Vec::new();
        for kv in &self.inner.artifacts {
            let (k, v) = kv.map_err(io("list artifacts"))?;
            let digest = String::from_utf8_lossy(&k).into_owned();
            let rec = decode_artifact(&digest, &v)?;
            out.push((digest, rec));
        }
        Ok(out)
    }

    /// Forgets artifact `sha256` (call before deleting its file).
    pub fn artifact_remove(&self, sha256: &str) -> Result<(), StoreError> {
        self.inner
            .artifacts
            .remove(sha256.as_bytes())
            .map_err(io("remove artifact record"))?;
        Ok(())
    }

    /// Bytes the database uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.db.size_on_disk().map_err(io("size on disk"))
    }
}
