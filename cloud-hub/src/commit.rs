//! Group commit of the hub database: many concurrent "make my write durable"
//! requests share one flush.
//!
//! sled 0.34 runs `flush_async` on its own small I/O thread pool, and each
//! flush waits there for buffers that the same pool has to write: a few
//! dozen concurrent `flush_async` calls (one per `PUT /v1/nodes/{node}/desired`
//! under load) occupy every pool thread with waiters and deadlock the hub.
//! [`GroupCommit`] lets one flush run at a time and lets every request whose
//! write happened before that flush started return with it.
//!
//! # Invariants
//! - `requested` is incremented *after* the caller's write, so a flush that
//!   starts after reading `requested == n` covers every write with ticket ≤ n.
//! - `durable` only grows, and only to a value read before a successful flush.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a commit failed.
#[derive(Debug, thiserror::Error)]
#[error("database flush: {0}")]
pub struct CommitError(#[source] pub sled::Error);

/// Serialised, coalescing flushes of one sled database.
#[derive(Debug)]
pub struct GroupCommit {
    db: sled::Db,
    requested: AtomicU64,
    durable: AtomicU64,
    flushes: AtomicU64,
    lock: tokio::sync::Mutex<()>,
}

impl GroupCommit {
    /// Commits of `db`.
    pub fn new(db: sled::Db) -> Self {
        Self {
            db,
            requested: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Returns once every write this task made before the call is durable.
    pub async fn commit(&self) -> Result<(), CommitError> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _one_at_a_time = self.lock.lock().await;
        if self.durable.load(Ordering::SeqCst) >= ticket {
            return Ok(()); // a flush that started after our write covered it
        }
        let covers = self.requested.load(Ordering::SeqCst);
        self.db.flush_async().await.map_err(CommitError)?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.durable.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }

    /// Flushes actually performed.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_commits_share_flushes_and_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let gc = Arc::new(GroupCommit::new(db.clone()));
        // Hold the flush slot so that every request queues behind it.
        let guard = gc.lock.lock().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let (gc, db) = (gc.clone(), db.clone());
            tasks.spawn(async move {
                db.insert(i.to_be_bytes(), &b"v"[..]).unwrap();
                gc.commit().await.unwrap();
            });
        }
        while gc.requested.load(Ordering::SeqCst) < 200 {
            tokio::task::yield_now().await;
        }
        drop(guard);
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        })
        .await
        .unwrap();
        // All 200 writes were requested before the first flush began.
        assert_eq!(gc.flushes(), 1);
        assert_eq!(gc.durable.load(Ordering::SeqCst), 200);
        // A later request flushes again.
        db.insert(b"late", &b"v"[..]).unwrap();
        gc.commit().await.unwrap();
        assert_eq!(gc.flushes(), 2);
    }
}
