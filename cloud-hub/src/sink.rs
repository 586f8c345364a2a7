//! The telemetry sink (standalone mode: sled): dedup, durable store, acks.
//!
//! # Layout
//! One sled tree per (node, stream). A key is the first sequence number of a
//! stored run (8 bytes, big-endian, so key order is sequence order); its value
//! is a [`protocols::record`] (the same record the edge's outbox stores: a
//! 20-byte header with sample count and min/max timestamp, then the run in
//! the binary telemetry encoding, about 10 bytes per sample). A run is
//! usually one batch as the edge sent it; storing runs rather than one key per
//! sample keeps sled's memory and disk use proportional to batches, not
//! samples (one key per sample grew the hub past 10 GiB while draining a
//! 12-hour backlog).
//!
//! # Invariants
//! - A sequence number is stored at most once: the parts of a batch already
//!   stored (or at or below `contiguous`) count as duplicates and are cut off
//!   before the rest is written.
//! - `contiguous` is the highest sequence number such that every number at or
//!   below it is stored or was declared dropped by the edge (below a batch's
//!   `floor_seq`). It only grows. Runs above it are tracked in memory as a
//!   range set (rebuilt from the keys at open).
//! - An ack for `contiguous` is sent only after a flush that covers it, so an
//!   acked sample survives a hub crash.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use protocols::{TelemetryBatch, record};

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
    /// A stored run could not be decoded.
    #[error("sink record {what} is corrupt: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

fn db(op: &'static str) -> impl FnOnce(sled::Error) -> SinkError {
    move |source| SinkError::Db { op, source }
}

fn db_err(op: &'static str) -> impl FnOnce(sled::Error) -> SinkError {
    db(op)
}

pub use protocols::api::{StoredSample, StreamStats};

/// What one ingest did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// New samples stored.
    pub stored: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
}

#[derive(Debug)]
struct StreamEntry {
    tree: sled::Tree,
    stats: StreamStats,
    /// Stored runs above `stats.contiguous`: first seq → last seq, disjoint,
    /// not adjacent to each other.
    above: BTreeMap<u64, u64>,
}

impl StreamEntry {
    /// Whether `seq` is stored or at or below the watermark.
    fn covered(&self, seq: u64) -> bool {
        seq <= self.stats.contiguous
            || self
                .above
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, &last)| seq <= last)
    }

    /// How many sequence numbers in `[from, to]` are stored above the watermark.
    fn stored_in(&self, from: u64, to: u64) -> u64 {
        self.above
            .iter()
            .map(|(&a, &b)| {
                let (lo, hi) = (a.max(from), b.min(to));
                if lo <= hi { hi - lo + 1 } else { 0 }
            })
            .sum()
    }

    /// Records the run `[first, last]` as stored, merging neighbours.
    fn add_run(&mut self, first: u64, last: u64) {
        let (mut lo, mut hi) = (first, last);
        if let Some((&a, &b)) = self.above.range(..first).next_back()
            && b + 1 >= first
        {
            lo = a;
            hi = hi.max(b);
            self.above.remove(&a);
        }
        while let Some((&a, &b)) = self.above.range(lo..).next() {
            if a > hi + 1 {
                break;
            }
            hi = hi.max(b);
            self.above.remove(&a);
        }
        self.above.insert(lo, hi);
    }

    /// Moves `contiguous` to `to` (if higher), forgetting runs below it.
    fn raise_watermark(&mut self, to: u64) {
        if to <= self.stats.contiguous {
            return;
        }
        self.stats.contiguous = to;
        let below: Vec<u64> = self.above.range(..=to).map(|(&a, _)| a).collect();
        for a in below {
            if let Some(b) = self.above.remove(&a)
                && b > to
            {
                self.above.insert(to + 1, b);
            }
        }
    }

    /// Recomputes `missing_now`: numbers in `(contiguous, max_seen]` not stored.
    fn refresh_missing(&mut self) {
        self.stats.missing_now = self.stats.max_seen.saturating_sub(self.stats.contiguous)
            - self.stored_in(self.stats.contiguous + 1, self.stats.max_seen);
    }

    /// Advances `contiguous` over stored runs that now touch it.
    fn advance(&mut self) {
        while let Some((&a, &b)) = self.above.first_key_value() {
            if a > self.stats.contiguous + 1 {
                break;
            }
            self.above.remove(&a);
            self.stats.contiguous = self.stats.contiguous.max(b);
        }
    }
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

fn seq_of(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

/// `(n, min_ts, max_ts)` of a stored run.
fn header(v: &[u8]) -> Option<(u64, u64, u64)> {
    record::header(v).map(|h| (h.samples, h.min_ts_ms, h.max_ts_ms))
}

impl Sink {
    /// Opens the sink in `db`, restoring stream watermarks and the stored
    /// runs above them.
    pub fn open(db: &sled::Db) -> Result<Self, SinkError> {
        let meta = db
            .open_tree("sink-meta")
            .map_err(db_err("open sink-meta"))?;
        let mut streams = HashMap::new();
        // Every stream tree, including one written before its first meta update.
        for tree_name in db.tree_names() {
            let Some(name) = tree_name.strip_prefix(b"sink/") else {
                continue;
            };
            let name = String::from_utf8_lossy(name).into_owned();
            let Some((node, stream)) = name.split_once('/') else {
                continue;
            };
            let stats: StreamStats = match meta
                .get(name.as_bytes())
                .map_err(db_err("read sink-meta"))?
            {
                Some(v) => serde_json::from_slice(&v).map_err(|e| SinkError::Corrupt {
                    what: format!("sink-meta/{name}"),
                    detail: e.to_string(),
                })?,
                None => StreamStats::default(),
            };
            let tree = db
                .open_tree(format!("sink/{name}"))
                .map_err(db_err("open stream"))?;
            let mut e = StreamEntry {
                tree,
                stats,
                above: BTreeMap::new(),
            };
            // Runs written after the last meta update are on disk but not in
            // the stats: recount from the runs themselves.
            let (mut stored, mut max_seen) = (0, e.stats.max_seen);
            for kv in &e.tree {
                let (k, v) = kv.map_err(db_err("scan stream"))?;
                let (Some(first), Some((n, _, _))) = (seq_of(&k), header(&v)) else {
                    return Err(SinkError::Corrupt {
                        what: format!("sink/{name}"),
                        detail: format!("run with a {}-byte key", k.len()),
                    });
                };
                stored += n;
                let last = first + n.max(1) - 1;
                max_seen = max_seen.max(last);
                if last > e.stats.contiguous {
                    e.add_run(first.max(e.stats.contiguous + 1), last);
                }
            }
            e.stats.stored = stored;
            e.stats.max_seen = max_seen;
            e.advance();
            e.refresh_missing();
            streams.insert((node.to_owned(), stream.to_owned()), e);
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
                    above: BTreeMap::new(),
                },
            );
        }
        let Some(e) = map.get_mut(&k) else {
            return Ok(Ingested::default());
        };
        // Cut the batch into maximal runs of sequence numbers not yet stored.
        let mut out = Ingested::default();
        let mut runs: Vec<(u64, usize, usize)> = Vec::new(); // (first seq, start, end)
        for (i, (seq, _)) in batch.iter_seq().enumerate() {
            if e.covered(seq) {
                out.duplicates += 1;
                continue;
            }
            match runs.last_mut() {
                Some((_, _, end)) if *end == i => *end = i + 1,
                _ => runs.push((seq, i, i + 1)),
            }
        }
        if !runs.is_empty() {
            let mut wb = sled::Batch::default();
            for &(first, start, end) in &runs {
                wb.insert(
                    &key(first),
                    record::encode(&batch.stream, first, &batch.samples[start..end]),
                );
            }
            e.tree.apply_batch(wb).map_err(db("store samples"))?;
            for &(first, start, end) in &runs {
                let n = (end - start) as u64;
                e.add_run(first, first + n - 1);
                out.stored += n;
            }
        }
        if batch.first_seq > e.stats.max_seen.max(e.stats.contiguous) + 1
            && batch.floor_seq < batch.first_seq
        {
            e.stats.gaps_seen += 1;
        }
        if let Some(last) = batch.last_seq() {
            e.stats.max_seen = e.stats.max_seen.max(last);
        }
        e.stats.stored += out.stored;
        e.stats.duplicates += out.duplicates;
        // Declared drops below the floor are final: move past them.
        if batch.floor_seq > e.stats.contiguous + 1 {
            let from = e.stats.contiguous + 1;
            let to = batch.floor_seq - 1;
            let gap = to - from + 1;
            e.stats.dropped_by_edge += gap.saturating_sub(e.stored_in(from, to));
            e.raise_watermark(to);
        }
        e.advance();
        e.refresh_missing();
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

    /// Stored samples of (node, stream) with `seq >= from_seq`, in sequence
    /// order, optionally filtered by timestamp `[from_ms, to_ms)`, at most `limit`.
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
        // Start at the run that contains `from_seq`, if any.
        let start = match tree.range(..=key(from_seq)).next_back() {
            Some(kv) => {
                let (k, _) = kv.map_err(db("query"))?;
                seq_of(&k).unwrap_or(from_seq)
            }
            None => from_seq,
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for kv in tree.range(key(start)..) {
            let (k, v) = kv.map_err(db("query"))?;
            let corrupt = |detail: String| SinkError::Corrupt {
                what: format!("sink/{node}/{stream}/{}", seq_of(&k).unwrap_or(0)),
                detail,
            };
            let (n, min_ts, max_ts) = header(&v).ok_or_else(|| corrupt("short header".into()))?;
            let first = seq_of(&k).ok_or_else(|| corrupt("bad key".into()))?;
            if first + n <= from_seq
                || from_ms.is_some_and(|f| max_ts < f)
                || to_ms.is_some_and(|t| min_ts >= t)
            {
                continue;
            }
            let run = record::decode(&v).map_err(|e| corrupt(e.to_string()))?;
            for (seq, s) in run.iter_seq() {
                if seq < from_seq
                    || from_ms.is_some_and(|f| s.ts_ms < f)
                    || to_ms.is_some_and(|t| s.ts_ms >= t)
                {
                    continue;
                }
                out.push(StoredSample {
                    seq,
                    point: s.point,
                    ts_ms: s.ts_ms,
                    value: s.value,
                    quality: s.quality.0,
                });
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocols::{Quality, Sample};

    fn batch(first_seq: u64, floor_seq: u64, n: u64) -> TelemetryBatch {
        TelemetryBatch {
            stream: "raw".into(),
            first_seq,
            floor_seq,
            samples: (first_seq..first_seq + n)
                .map(|seq| Sample {
                    point: (seq % 3) as u32,
                    ts_ms: 1_000 + seq * 10,
                    value: seq as f64,
                    quality: Quality::GOOD,
                })
                .collect(),
        }
    }

    /// Opens the sink's database; a reopen retries while the dropped
    /// handle's background flusher still holds sled's file lock.
    fn open(dir: &std::path::Path) -> (sled::Db, Sink) {
        let mut tries = 0;
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => break db,
                Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("opening the sink db: {e}"),
            }
        };
        let sink = Sink::open(&db).unwrap();
        (db, sink)
    }

    fn seqs(sink: &Sink) -> Vec<u64> {
        sink.query("n", "raw", 0, None, None, usize::MAX)
            .unwrap()
            .iter()
            .map(|s| s.seq)
            .collect()
    }

    #[test]
    fn in_order_out_of_order_and_overlapping_batches_store_each_seq_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, sink) = open(dir.path());
        assert_eq!(sink.ingest("n", &batch(1, 1, 10)).unwrap().stored, 10);
        // Ahead of the watermark: stored, watermark waits, the gap is counted.
        assert_eq!(sink.ingest("n", &batch(21, 1, 10)).unwrap().stored, 10);
        let st = &sink.streams("n")["raw"];
        assert_eq!((st.contiguous, st.gaps_seen, st.missing_now), (10, 1, 10));
        // Overlaps both sides: only 11..=20 is new.
        let r = sink.ingest("n", &batch(8, 1, 16)).unwrap();
        assert_eq!((r.stored, r.duplicates), (10, 6));
        // A full resend is all duplicates.
        assert_eq!(sink.ingest("n", &batch(1, 1, 30)).unwrap().duplicates, 30);
        let st = &sink.streams("n")["raw"];
        assert_eq!((st.contiguous, st.stored, st.duplicates), (30, 30, 36));
        assert_eq!((st.gaps_seen, st.missing_now), (1, 0));
        assert_eq!(seqs(&sink), (1..=30).collect::<Vec<_>>());
        // Values survive the round trip, and a query can start mid-run.
        let q = sink.query("n", "raw", 15, None, None, 3).unwrap();
        assert_eq!(q.iter().map(|s| s.seq).collect::<Vec<_>>(), [15, 16, 17]);
        assert!(
            q.iter()
                .all(|s| (s.value - s.seq as f64).abs() < f64::EPSILON)
        );
    }

    #[test]
    fn floor_declares_drops_without_counting_stored_samples() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, sink) = open(dir.path());
        sink.ingest("n", &batch(1, 1, 5)).unwrap();
        sink.ingest("n", &batch(9, 9, 2)).unwrap(); // 9, 10 stored
        // Floor 20: 6..=19 is final; 9 and 10 are stored, so 12 were dropped.
        sink.ingest("n", &batch(20, 20, 5)).unwrap();
        let st = &sink.streams("n")["raw"];
        assert_eq!((st.contiguous, st.dropped_by_edge, st.stored), (24, 12, 12));
        // Late copies below the watermark are duplicates, never stored.
        let r = sink.ingest("n", &batch(6, 6, 3)).unwrap();
        assert_eq!((r.stored, r.duplicates), (0, 3));
    }

    #[test]
    fn time_range_query_filters_by_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, sink) = open(dir.path());
        sink.ingest("n", &batch(1, 1, 100)).unwrap();
        let q = sink
            .query(
                "n",
                "raw",
                0,
                Some(1_000 + 50 * 10),
                Some(1_000 + 60 * 10),
                1000,
            )
            .unwrap();
        assert_eq!(
            q.iter().map(|s| s.seq).collect::<Vec<_>>(),
            (50..60).collect::<Vec<_>>()
        );
        assert!(
            sink.query("n", "other", 0, None, None, 10)
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn reopen_restores_watermark_and_runs_above_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, sink) = open(dir.path());
            sink.ingest("n", &batch(1, 1, 10)).unwrap();
            let acks = sink.flush_and_collect_acks().await.unwrap();
            assert_eq!(acks, vec![("n".to_owned(), "raw".to_owned(), 10)]);
            // Written after the last meta update: must be found again at open.
            sink.ingest("n", &batch(11, 1, 5)).unwrap();
            sink.ingest("n", &batch(30, 1, 5)).unwrap();
            sink.ingest("m", &batch(1, 1, 3)).unwrap();
            db.flush().unwrap();
        }
        let (_db, sink) = open(dir.path());
        let st = &sink.streams("n")["raw"];
        assert_eq!(
            (st.contiguous, st.acked, st.stored, st.max_seen),
            (15, 10, 20, 34)
        );
        // A stream that crashed before its first meta update is found too.
        assert_eq!(sink.streams("m")["raw"].contiguous, 3);
        assert_eq!(sink.ingest("n", &batch(16, 1, 14)).unwrap().stored, 14);
        assert_eq!(sink.streams("n")["raw"].contiguous, 34);
        assert_eq!(seqs(&sink), (1..=34).collect::<Vec<_>>());
    }
}

#[cfg(test)]
#[path = "sink_tests.rs"]
mod range_set_tests;
