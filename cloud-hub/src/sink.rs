//! The telemetry sink (standalone mode: sled): dedup, durable store, acks.
//!
//! # Invariants
//! - Samples are stored per (node, stream) keyed by sequence number; a
//!   sequence number is stored at most once (later copies count as duplicates).
//! - `contiguous` is the highest sequence number such that every number at or
//!   below it is stored or was declared dropped by the edge (below a batch's
//!   `floor_seq`). It only grows.
//! - An ack for `contiguous` is sent only after a flush that covers it, so an
//!   acked sample survives a hub crash.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use protocols::{Quality, Sample, TelemetryBatch};
use serde::{Deserialize, Serialize};

/// Why a sink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// sled failed.
    #[error("sink {op}: {source}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The sled error.
        #[source]
        source: sled::Error,
    },
}

fn db(op: &'static str) -> impl FnOnce(sled::Error) -> SinkError {
    move |source| SinkError::Db { op, source }
}

/// Counters and watermark of one (node, stream).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    /// Every sequence number up to here is stored or declared dropped.
    pub contiguous: u64,
    /// Highest sequence number acked to the edge.
    pub acked: u64,
    /// Highest sequence number seen.
    pub max_seen: u64,
    /// Distinct samples stored.
    pub stored: u64,
    /// Samples received again and dropped.
    pub duplicates: u64,
    /// Samples the edge declared dropped by its overflow policy.
    pub dropped_by_edge: u64,
}

/// What one ingest did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// New samples stored.
    pub stored: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
}

/// A stored sample with its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StoredSample {
    /// Sequence number.
    pub seq: u64,
    /// Point index.
    pub point: u32,
    /// Timestamp, ms since epoch.
    pub ts_ms: u64,
    /// Value.
    pub value: f64,
    /// Quality byte.
    pub quality: u8,
}

#[derive(Debug)]
struct StreamEntry {
    tree: sled::Tree,
    stats: StreamStats,
}

/// The sink.
#[derive(Debug)]
pub struct Sink {
    db: sled::Db,
    meta: sled::Tree,
    streams: Mutex<HashMap<(String, String), StreamEntry>>,
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn encode(s: &Sample) -> [u8; 21] {
    let mut b = [0u8; 21];
    b[0..4].copy_from_slice(&s.point.to_be_bytes());
    b[4..12].copy_from_slice(&s.ts_ms.to_be_bytes());
    b[12..20].copy_from_slice(&s.value.to_be_bytes());
    b[20] = s.quality.0;
    b
}

fn decode(seq: u64, b: &[u8]) -> Option<StoredSample> {
    Some(StoredSample {
        seq,
        point: u32::from_be_bytes(b.get(0..4)?.try_into().ok()?),
        ts_ms: u64::from_be_bytes(b.get(4..12)?.try_into().ok()?),
        value: f64::from_be_bytes(b.get(12..20)?.try_into().ok()?),
        quality: *b.get(20)?,
    })
}

impl Sink {
    /// Opens the sink in `db`, restoring stream watermarks.
    pub fn open(db: &sled::Db) -> Result<Self, SinkError> {
        let meta = db
            .open_tree("sink-meta")
            .map_err(db_err("open sink-meta"))?;
        let mut streams = HashMap::new();
        for kv in &meta {
            let (k, v) = kv.map_err(db_err("scan sink-meta"))?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let Some((node, stream)) = name.split_once('/') else {
                continue;
            };
            let stats: StreamStats = serde_json::from_slice(&v).unwrap_or_default();
            let tree = db
                .open_tree(format!("sink/{name}"))
                .map_err(db_err("open stream"))?;
            streams.insert(
                (node.to_owned(), stream.to_owned()),
                StreamEntry { tree, stats },
            );
        }
        Ok(Self {
            db: db.clone(),
            meta,
            streams: Mutex::new(streams),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), StreamEntry>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores the new samples of `batch`, dropping duplicates, and advances the watermark.
    pub fn ingest(&self, node: &str, batch: &TelemetryBatch) -> Result<Ingested, SinkError> {
        let mut map = self.lock();
        let k = (node.to_owned(), batch.stream.clone());
        if !map.contains_key(&k) {
            let tree = self
                .db
                .open_tree(format!("sink/{node}/{}", batch.stream))
                .map_err(db("open stream"))?;
            map.insert(
                k.clone(),
                StreamEntry {
                    tree,
                    stats: StreamStats::default(),
                },
            );
        }
        let Some(e) = map.get_mut(&k) else {
            return Ok(Ingested::default());
        };
        let st = &mut e.stats;
        let mut out = Ingested::default();
        let mut wb = sled::Batch::default();
        let in_order = batch.first_seq == st.contiguous + 1 && st.max_seen <= st.contiguous;
        for (seq, s) in batch.iter_seq() {
            let dup = seq <= st.contiguous
                || (!in_order && e.tree.contains_key(key(seq)).map_err(db("lookup"))?);
            if dup {
                out.duplicates += 1;
            } else {
                wb.insert(&key(seq), &encode(s));
                out.stored += 1;
            }
        }
        e.tree.apply_batch(wb).map_err(db("store samples"))?;
        if let Some(last) = batch.last_seq() {
            st.max_seen = st.max_seen.max(last);
        }
        st.stored += out.stored;
        st.duplicates += out.duplicates;
        // Declared drops below the floor are final: move past them.
        if batch.floor_seq > st.contiguous + 1 {
            let gap = batch.floor_seq - st.contiguous - 1;
            let present = e
                .tree
                .range(key(st.contiguous + 1)..key(batch.floor_seq))
                .count() as u64;
            st.dropped_by_edge += gap.saturating_sub(present);
            st.contiguous = batch.floor_seq - 1;
        }
        if in_order && batch.first_seq == st.contiguous + 1 {
            st.contiguous = batch.last_seq().unwrap_or(st.contiguous).max(st.contiguous);
        }
        for kv in e.tree.range(key(st.contiguous + 1)..) {
            let (kk, _) = kv.map_err(db("scan"))?;
            if kk.as_ref() == key(st.contiguous + 1) {
                st.contiguous += 1;
            } else {
                break;
            }
        }
        Ok(out)
    }

    /// Flushes everything and returns the (node, stream, seq) acks now due.
    pub async fn flush_and_collect_acks(&self) -> Result<Vec<(String, String, u64)>, SinkError> {
        let due: Vec<((String, String), StreamStats)> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.stats.contiguous > e.stats.acked)
            .map(|(k, e)| (k.clone(), e.stats.clone()))
            .collect();
        for ((node, stream), stats) in &due {
            let mut s = stats.clone();
            s.acked = s.contiguous;
            let v = serde_json::to_vec(&s).unwrap_or_default();
            self.meta
                .insert(format!("{node}/{stream}"), v)
                .map_err(db("write stream meta"))?;
        }
        self.db.flush_async().await.map_err(db("flush"))?;
        let mut map = self.lock();
        let mut acks = Vec::with_capacity(due.len());
        for ((node, stream), stats) in due {
            if let Some(e) = map.get_mut(&(node.clone(), stream.clone())) {
                e.stats.acked = e.stats.acked.max(stats.contiguous);
            }
            acks.push((node, stream, stats.contiguous));
        }
        Ok(acks)
    }

    /// Streams of one node with their stats.
    pub fn streams(&self, node: &str) -> BTreeMap<String, StreamStats> {
        self.lock()
            .iter()
            .filter(|((n, _), _)| n == node)
            .map(|((_, s), e)| (s.clone(), e.stats.clone()))
            .collect()
    }

    /// Stored samples of (node, stream) with `seq >= from_seq`, optionally
    /// filtered by timestamp `[from_ms, to_ms)`, at most `limit`.
    pub fn query(
        &self,
        node: &str,
        stream: &str,
        from_seq: u64,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredSample>, SinkError> {
        let tree = {
            let map = self.lock();
            match map.get(&(node.to_owned(), stream.to_owned())) {
                Some(e) => e.tree.clone(),
                None => return Ok(Vec::new()),
            }
        };
        let mut out = Vec::new();
        for kv in tree.range(key(from_seq)..) {
            let (k, v) = kv.map_err(db("query"))?;
            let Some(seq) = <[u8; 8]>::try_from(k.as_ref()).ok().map(u64::from_be_bytes) else {
                continue;
            };
            let Some(s) = decode(seq, &v) else { continue };
            if from_ms.is_some_and(|f| s.ts_ms < f) || to_ms.is_some_and(|t| s.ts_ms >= t) {
                continue;
            }
            out.push(s);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

fn db_err(op: &'static str) -> impl FnOnce(sled::Error) -> SinkError {
    db(op)
}

impl StoredSample {
    /// The sample without its sequence number.
    pub fn sample(&self) -> Sample {
        Sample {
            point: self.point,
            ts_ms: self.ts_ms,
            value: self.value,
            quality: Quality(self.quality),
        }
    }
}
