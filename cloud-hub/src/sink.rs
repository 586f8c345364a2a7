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
//! - A floor declared in a batch moves `contiguous` only as far as the node
//!   has confirmed that floor in its reported state ([`Sink::confirm_floor`]):
//!   a forged batch alone cannot make the hub skip (and then ack away) data
//!   the node still holds. Until then the floor waits, counted.
//!
//! # Bounds (hostile input)
//! Every sequence number is at most [`protocols::limits::MAX_SEQ`], so no
//! `+ 1` here overflows. Streams per node, streams in all and separate runs
//! above a watermark are capped by [`SinkLimits`]; a batch past a cap is
//! refused whole ([`Refusal`]), stored nowhere and never acked, so the edge
//! keeps it. Bookkeeping per batch is `O(k log r)` for `k` samples and `r`
//! runs: the count of samples stored above the watermark is kept, not summed.

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
    /// The batch was refused (hostile or past a bound): nothing stored.
    #[error("telemetry refused: {0}")]
    Refused(#[from] Refusal),
    /// A stored run could not be decoded.
    #[error("sink record {what} is corrupt: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

/// Why the sink refused a whole batch. The batch is not stored and not
/// acked; the edge keeps it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A sequence number above [`protocols::limits::MAX_SEQ`].
    #[error(
        "sequence numbers {first}..={last} or floor {floor} pass the largest sequence number {max} (limits::MAX_SEQ)",
        max = protocols::limits::MAX_SEQ
    )]
    SeqOutOfRange {
        /// First seq of the batch.
        first: u64,
        /// Last seq of the batch.
        last: u64,
        /// Its floor.
        floor: u64,
    },
    /// The node already has `limit` streams.
    #[error(
        "node {node} already has {limit} streams (limits.max_streams_per_node); stream {stream} refused"
    )]
    StreamsPerNode {
        /// The node.
        node: String,
        /// The refused stream.
        stream: String,
        /// The limit.
        limit: usize,
    },
    /// The hub already holds `limit` streams.
    #[error(
        "the hub already holds {limit} streams (limits.max_streams); stream {node}/{stream} refused"
    )]
    Streams {
        /// The node.
        node: String,
        /// The refused stream.
        stream: String,
        /// The limit.
        limit: usize,
    },
    /// The stream would have more than `limit` separate runs above its watermark.
    #[error(
        "stream {node}/{stream} would hold more than {limit} separate runs above its watermark (limits.max_runs_per_stream)"
    )]
    Runs {
        /// The node.
        node: String,
        /// The stream.
        stream: String,
        /// The limit.
        limit: usize,
    },
}

impl Refusal {
    /// The `reason` label of the refusal counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SeqOutOfRange { .. } => "seq_out_of_range",
            Self::StreamsPerNode { .. } => "streams_per_node",
            Self::Streams { .. } => "streams",
            Self::Runs { .. } => "runs_per_stream",
        }
    }
}

/// Bounds of the sink (`[limits]` in the hub config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkLimits {
    /// Streams one node may have.
    pub max_streams_per_node: usize,
    /// Streams the hub holds in all.
    pub max_streams: usize,
    /// Separate stored runs above one stream's watermark (gaps waiting for
    /// a resend); a real edge has a handful.
    pub max_runs_per_stream: usize,
}

impl Default for SinkLimits {
    fn default() -> Self {
        Self {
            max_streams_per_node: 64,
            max_streams: 200_000,
            max_runs_per_stream: 4_096,
        }
    }
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
    /// The batch declared a floor the node has not confirmed yet: the
    /// watermark waits at the confirmed floor.
    pub floor_held: bool,
}

#[derive(Debug)]
struct StreamEntry {
    tree: sled::Tree,
    stats: StreamStats,
    /// Stored runs above `stats.contiguous`: first seq → last seq, disjoint,
    /// not adjacent to each other.
    above: BTreeMap<u64, u64>,
    /// Sequence numbers stored in `above` (kept, not summed per batch).
    stored_above: u64,
    /// Highest floor a batch declared (in memory: every batch carries it).
    declared_floor: u64,
    /// Highest floor the node confirmed in its reported state.
    confirmed_floor: u64,
}

impl StreamEntry {
    fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            stats: StreamStats::default(),
            above: BTreeMap::new(),
            stored_above: 0,
            declared_floor: 0,
            confirmed_floor: 0,
        }
    }

    /// Whether `seq` is stored or at or below the watermark.
    fn covered(&self, seq: u64) -> bool {
        seq <= self.stats.contiguous
            || self
                .above
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, &last)| seq <= last)
    }

    /// Whether the run `[first, last]` would touch (overlap or abut) a
    /// stored run above the watermark, or the watermark itself.
    fn touches(&self, first: u64, last: u64) -> bool {
        first <= self.stats.contiguous + 1
            || self
                .above
                .range(..=last + 1)
                .next_back()
                .is_some_and(|(_, &b)| b + 1 >= first)
    }

    /// Records the run `[first, last]` (not yet covered) as stored, merging
    /// neighbours.
    fn add_run(&mut self, first: u64, last: u64) {
        let (mut lo, mut hi) = (first, last);
        let mut merged = 0;
        if let Some((&a, &b)) = self.above.range(..first).next_back()
            && b + 1 >= first
        {
            lo = a;
            hi = hi.max(b);
            merged += b - a + 1;
            self.above.remove(&a);
        }
        while let Some((&a, &b)) = self.above.range(lo..).next() {
            if a > hi + 1 {
                break;
            }
            hi = hi.max(b);
            merged += b - a + 1;
            self.above.remove(&a);
        }
        self.above.insert(lo, hi);
        self.stored_above = self.stored_above - merged + (hi - lo + 1);
    }

    /// Moves `contiguous` to `to` (if higher), forgetting runs below it;
    /// returns how many stored sequence numbers it passed.
    fn raise_watermark(&mut self, to: u64) -> u64 {
        if to <= self.stats.contiguous {
            return 0;
        }
        self.stats.contiguous = to;
        let mut passed = 0;
        let below: Vec<u64> = self.above.range(..=to).map(|(&a, _)| a).collect();
        for a in below {
            if let Some(b) = self.above.remove(&a) {
                let kept = if b > to {
                    self.above.insert(to + 1, b);
                    b - to
                } else {
                    0
                };
                let gone = b - a + 1 - kept;
                passed += gone;
                self.stored_above -= gone;
            }
        }
        passed
    }

    /// Recomputes `missing_now`: numbers in `(contiguous, max_seen]` not stored.
    fn refresh_missing(&mut self) {
        self.stats.missing_now = self
            .stats
            .max_seen
            .saturating_sub(self.stats.contiguous)
            .saturating_sub(self.stored_above);
    }

    /// Advances `contiguous` over stored runs that now touch it.
    fn advance(&mut self) {
        while let Some((&a, &b)) = self.above.first_key_value() {
            if a > self.stats.contiguous + 1 {
                break;
            }
            self.above.remove(&a);
            self.stored_above -= b - a + 1;
            self.stats.contiguous = self.stats.contiguous.max(b);
        }
    }

    /// Moves the watermark over the declared drops below the floor, as far
    /// as the node confirmed it; returns whether a declared floor waits.
    fn apply_floor(&mut self) -> bool {
        let floor = self.declared_floor.min(self.confirmed_floor);
        if floor > self.stats.contiguous + 1 {
            let from = self.stats.contiguous + 1;
            let to = floor - 1;
            let passed = self.raise_watermark(to);
            self.stats.dropped_by_edge += (to - from + 1).saturating_sub(passed);
        }
        self.advance();
        self.refresh_missing();
        self.declared_floor > self.confirmed_floor
            && self.declared_floor > self.stats.contiguous + 1
    }
}

/// The sink.
#[derive(Debug)]
pub struct Sink {
    db: sled::Db,
    meta: sled::Tree,
    limits: SinkLimits,
    streams: Mutex<Streams>,
}

/// The streams in memory, with a count per node for the caps.
#[derive(Debug, Default)]
struct Streams {
    /// By (node, stream), ordered so one node's streams are a range.
    map: BTreeMap<(String, String), StreamEntry>,
    per_node: HashMap<String, usize>,
}

impl Streams {
    /// The entry of (node, stream), opening its tree if it is new and the
    /// caps allow it.
    fn entry(
        &mut self,
        db: &sled::Db,
        limits: SinkLimits,
        node: &str,
        stream: &str,
    ) -> Result<&mut StreamEntry, SinkError> {
        let k = (node.to_owned(), stream.to_owned());
        if !self.map.contains_key(&k) {
            let count = self.per_node.get(node).copied().unwrap_or(0);
            if count >= limits.max_streams_per_node {
                return Err(Refusal::StreamsPerNode {
                    node: node.into(),
                    stream: stream.into(),
                    limit: limits.max_streams_per_node,
                }
                .into());
            }
            if self.map.len() >= limits.max_streams {
                return Err(Refusal::Streams {
                    node: node.into(),
                    stream: stream.into(),
                    limit: limits.max_streams,
                }
                .into());
            }
            let tree = db
                .open_tree(format!("sink/{node}/{stream}"))
                .map_err(db_err("open stream"))?;
            self.insert(k.clone(), StreamEntry::new(tree));
        }
        self.map.get_mut(&k).ok_or_else(|| SinkError::Corrupt {
            what: format!("sink/{node}/{stream}"),
            detail: "stream vanished while opened".into(),
        })
    }

    fn insert(&mut self, k: (String, String), e: StreamEntry) {
        *self.per_node.entry(k.0.clone()).or_default() += 1;
        self.map.insert(k, e);
    }
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
    /// Opens the sink in `db` with the default [`SinkLimits`].
    pub fn open(db: &sled::Db) -> Result<Self, SinkError> {
        Self::open_with(db, SinkLimits::default())
    }

    /// Opens the sink in `db`, restoring stream watermarks and the stored
    /// runs above them. Streams already stored are kept even past the caps
    /// (the caps refuse only new ones).
    pub fn open_with(db: &sled::Db, limits: SinkLimits) -> Result<Self, SinkError> {
        let meta = db
            .open_tree("sink-meta")
            .map_err(db_err("open sink-meta"))?;
        let mut streams = Streams::default();
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
            let mut e = StreamEntry::new(tree);
            e.stats = stats;
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
                // Written by a hub without the MAX_SEQ bound: keep the
                // arithmetic in range rather than refuse to start.
                let last = first
                    .saturating_add(n.max(1) - 1)
                    .min(protocols::limits::MAX_SEQ);
                max_seen = max_seen.max(last);
                let first = first.max(e.stats.contiguous + 1);
                if first <= last {
                    e.add_run(first, last);
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
            limits,
            streams: Mutex::new(streams),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node confirms (in its reported state) that its outbox for
    /// `stream` holds nothing below `floor`: declared drops up to there are
    /// final. Returns whether the watermark moved.
    pub fn confirm_floor(&self, node: &str, stream: &str, floor: u64) -> Result<bool, SinkError> {
        let floor = floor.min(protocols::limits::MAX_SEQ + 1);
        let mut streams = self.lock();
        let e = streams.entry(&self.db, self.limits, node, stream)?;
        if floor <= e.confirmed_floor {
            return Ok(false);
        }
        e.confirmed_floor = floor;
        let before = e.stats.contiguous;
        e.apply_floor();
        Ok(e.stats.contiguous != before)
    }

    /// Stores the new samples of `batch`, dropping duplicates, and advances
    /// the watermark; refuses ([`SinkError::Refused`]) a batch past a bound.
    pub fn ingest(&self, node: &str, batch: &TelemetryBatch) -> Result<Ingested, SinkError> {
        let max = protocols::limits::MAX_SEQ;
        let last = batch.last_seq().unwrap_or(batch.first_seq);
        if last > max || batch.first_seq > max || batch.floor_seq > max + 1 {
            return Err(Refusal::SeqOutOfRange {
                first: batch.first_seq,
                last,
                floor: batch.floor_seq,
            }
            .into());
        }
        let mut streams = self.lock();
        let e = streams.entry(&self.db, self.limits, node, &batch.stream)?;
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
        // Runs that touch nothing stored open a gap each: cap them.
        let new_runs = runs
            .iter()
            .filter(|&&(first, start, end)| !e.touches(first, first + (end - start) as u64 - 1))
            .count();
        if new_runs > 0 && e.above.len() + new_runs > self.limits.max_runs_per_stream {
            return Err(Refusal::Runs {
                node: node.into(),
                stream: batch.stream.clone(),
                limit: self.limits.max_runs_per_stream,
            }
            .into());
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
        // Declared drops below the floor are final once the node confirms them.
        e.declared_floor = e.declared_floor.max(batch.floor_seq);
        out.floor_held = e.apply_floor();
        Ok(out)
    }

    /// Flushes everything and returns the (node, stream, seq) acks now due.
    pub async fn flush_and_collect_acks(&self) -> Result<Vec<(String, String, u64)>, SinkError> {
        let due: Vec<((String, String), StreamStats)> = self
            .lock()
            .map
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
            if let Some(e) = map.map.get_mut(&(node.clone(), stream.clone())) {
                e.stats.acked = e.stats.acked.max(stats.contiguous);
            }
            acks.push((node, stream, stats.contiguous));
        }
        Ok(acks)
    }

    /// Streams of one node with their stats.
    pub fn streams(&self, node: &str) -> BTreeMap<String, StreamStats> {
        let from = (node.to_owned(), String::new());
        self.lock()
            .map
            .range(from..)
            .take_while(|((n, _), _)| n == node)
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
            match map.map.get(&(node.to_owned(), stream.to_owned())) {
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
            if first.saturating_add(n) <= from_seq
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

    /// Ingests `b` with its floor already confirmed by the node.
    fn ingest(sink: &Sink, node: &str, b: &TelemetryBatch) -> Ingested {
        sink.confirm_floor(node, &b.stream, b.floor_seq).unwrap();
        sink.ingest(node, b).unwrap()
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
        assert_eq!(ingest(&sink, "n", &batch(1, 1, 10)).stored, 10);
        // Ahead of the watermark: stored, watermark waits, the gap is counted.
        assert_eq!(ingest(&sink, "n", &batch(21, 1, 10)).stored, 10);
        let st = &sink.streams("n")["raw"];
        assert_eq!((st.contiguous, st.gaps_seen, st.missing_now), (10, 1, 10));
        // Overlaps both sides: only 11..=20 is new.
        let r = ingest(&sink, "n", &batch(8, 1, 16));
        assert_eq!((r.stored, r.duplicates), (10, 6));
        // A full resend is all duplicates.
        assert_eq!(ingest(&sink, "n", &batch(1, 1, 30)).duplicates, 30);
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
        ingest(&sink, "n", &batch(1, 1, 5));
        ingest(&sink, "n", &batch(9, 9, 2)); // 9, 10 stored
        // Floor 20: 6..=19 is final; 9 and 10 are stored, so 12 were dropped.
        ingest(&sink, "n", &batch(20, 20, 5));
        let st = &sink.streams("n")["raw"];
        assert_eq!((st.contiguous, st.dropped_by_edge, st.stored), (24, 12, 12));
        // Late copies below the watermark are duplicates, never stored.
        let r = ingest(&sink, "n", &batch(6, 6, 3));
        assert_eq!((r.stored, r.duplicates), (0, 3));
    }

    #[test]
    fn time_range_query_filters_by_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, sink) = open(dir.path());
        ingest(&sink, "n", &batch(1, 1, 100));
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
            ingest(&sink, "n", &batch(1, 1, 10));
            let acks = sink.flush_and_collect_acks().await.unwrap();
            assert_eq!(acks, vec![("n".to_owned(), "raw".to_owned(), 10)]);
            // Written after the last meta update: must be found again at open.
            ingest(&sink, "n", &batch(11, 1, 5));
            ingest(&sink, "n", &batch(30, 1, 5));
            ingest(&sink, "m", &batch(1, 1, 3));
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
        assert_eq!(ingest(&sink, "n", &batch(16, 1, 14)).stored, 14);
        assert_eq!(sink.streams("n")["raw"].contiguous, 34);
        assert_eq!(seqs(&sink), (1..=34).collect::<Vec<_>>());
    }
}

#[cfg(test)]
#[path = "sink_tests.rs"]
mod range_set_tests;
