//! The durable outbox of one telemetry stream.
//!
//! Samples reach MQTT only through here: `append` → (group commit) → publish
//! QoS 1 → delete only after the hub's cumulative ack covers them.
//!
//! # Invariants
//! - Sequence numbers are assigned here, per stream, starting at 1, gap-free
//!   and never reused: `next_seq` is recovered from what is on disk, and only
//!   durable entries are ever published (see the loss window in
//!   [`crate::store`]), so a sequence number the hub has seen is on disk.
//! - An entry is a run of consecutive samples keyed by its first sequence
//!   number (big-endian, so key order is sequence order).
//! - Entries are removed only when acked (`last_seq <= acked`) or dropped by
//!   the overflow policy; every dropped sample is counted in `dropped` and
//!   raises `floor`, the lowest sequence number that may still be sent. The
//!   floor travels with every batch, so the hub learns which gaps are final.
//! - `acked`, `dropped` and `floor` are persisted in the same atomic batch as
//!   the entry changes that move them.
//! - An ack never deletes beyond what was handed to the link. `published` is
//!   the highest sequence number such that every number up to it was handed
//!   to the MQTT client by the uplink, acked, or dropped (a gap-free prefix:
//!   live data sent ahead of a backlog does not make the backlog ackable).
//!   [`Outbox::mark_published`] is called *before* the hand-over, so a fast
//!   ack can never find it lower than what it acks, and [`Outbox::ack`]
//!   clamps to it (counted as `acks_beyond_published` by the caller). It
//!   never exceeds `durable`, and never goes down.
//! - Across a restart: `published` is persisted (`m:published`) when it
//!   moves and made durable by the next group commit, and reloaded at open
//!   (at least `acked`). The persisted value is never above what was really
//!   handed over, only possibly below it (a crash before the commit). So
//!   after a crash the hub may ack more than the reloaded mark; that ack is
//!   clamped (safe: nothing unsent is deleted), the uplink resends from the
//!   clamp, which raises the mark again, and the hub re-acks a resent,
//!   already-acked batch (`cloud-hub/src/sink.rs`), so the outbox still
//!   drains. What was on disk but never handed to the link can never be
//!   deleted by an ack, before or after a restart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use protocols::{Sample, TelemetryBatch, record};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{StoreError, io};

const ACKED: &[u8] = b"m:acked";
const DROPPED: &[u8] = b"m:dropped";
const FLOOR: &[u8] = b"m:floor";
const PUBLISHED: &[u8] = b"m:published";
const ENTRY: u8 = b'e';
/// Samples per entry at most. With sled 0.34, values above roughly 16 KiB
/// are kept in memory however small the page cache is set: a 48 h backlog in
/// 50 KB entries held its whole payload resident (RSS grew 1:1 with it),
/// while entries of ≤ 10 KB keep RSS flat (`examples/outbox_backlog.rs`).
pub const MAX_ENTRY_SAMPLES: usize = 1024;
/// Published runs above the gap-free published prefix remembered at most.
pub const MAX_PUBLISHED_RUNS: usize = 64;
/// Bytes per entry at most (header + encoded batch); a larger chunk is split.
pub const MAX_ENTRY_BYTES: usize = 12 * 1024;

/// What to do when the outbox is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Drop the oldest unacknowledged samples to make room (counted, evented).
    #[default]
    DropOldest,
    /// Refuse new samples while full (counted, evented).
    RejectNew,
}

/// Capacity of one stream's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Payload bytes held at most.
    pub max_bytes: u64,
    /// Samples older than this (by timestamp) are dropped.
    pub max_age: Duration,
    /// What happens when full.
    pub policy: OverflowPolicy,
}

/// A snapshot of an outbox's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Unacknowledged samples.
    pub samples: u64,
    /// Their payload bytes on disk.
    pub bytes: u64,
    /// Timestamp of the oldest unacknowledged sample.
    pub oldest_ts_ms: Option<u64>,
    /// Samples dropped by the overflow policy, ever.
    pub dropped: u64,
    /// Highest acknowledged sequence number.
    pub acked: u64,
    /// Next sequence number to assign.
    pub next_seq: u64,
    /// Highest sequence number known to be on disk.
    pub durable: u64,
    /// Lowest sequence number that may still be sent.
    pub floor: u64,
    /// Highest sequence number handed to the link (acks clamp to it).
    pub published: u64,
}

/// What one [`Outbox::ack`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Samples released (deleted).
    pub released: u64,
    /// Whether the ack was above the published mark and was clamped to it.
    pub clamped: bool,
}

/// Result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// First sequence number assigned (none if rejected).
    pub first_seq: Option<u64>,
    /// Samples dropped to make room (drop-oldest) or refused (reject-new).
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy)]
struct EntryInfo {
    n: u64,
    bytes: u64,
    min_ts: u64,
    max_ts: u64,
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    acked: u64,
    dropped: u64,
    floor: u64,
    bytes: u64,
    samples: u64,
    entries: BTreeMap<u64, EntryInfo>,
    /// Runs handed to the link above the published prefix: first → last.
    published_above: BTreeMap<u64, u64>,
}

/// One stream's outbox. Cheap to clone; all clones share state.
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    stream: String,
    tree: sled::Tree,
    limits: OutboxLimits,
    state: Mutex<State>,
    durable: AtomicU64,
    published: AtomicU64,
    /// Largest `now - oldest sample timestamp` of an append since the last
    /// commit took it ([`Outbox::take_append_lag`]): how far behind the
    /// samples' own time the pipeline runs.
    append_lag_ms: AtomicU64,
    notify: Notify,
}

fn entry_key(seq: u64) -> [u8; 9] {
    let mut k = [ENTRY; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    Ok(tree
        .get(key)
        .map_err(io("outbox read meta"))?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

impl Outbox {
    pub(super) fn open(
        stream: &str,
        tree: sled::Tree,
        limits: OutboxLimits,
    ) -> Result<Self, StoreError> {
        let acked = read_u64(&tree, ACKED)?;
        let dropped = read_u64(&tree, DROPPED)?;
        let floor = read_u64(&tree, FLOOR)?.max(1);
        let published = read_u64(&tree, PUBLISHED)?.max(acked);
        let mut entries = BTreeMap::new();
        let (mut bytes, mut samples) = (0, 0);
        let mut next_seq = acked.max(floor.saturating_sub(1)) + 1;
        for kv in tree.scan_prefix([ENTRY]) {
            let (k, v) = kv.map_err(io("outbox scan"))?;
            let seq = <[u8; 8]>::try_from(&k[1..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    what: format!("outbox/{stream} key"),
                    detail: format!("{} bytes", k.len()),
                })?;
            let info = parse_header(&v).ok_or_else(|| StoreError::Corrupt {
                what: format!("outbox/{stream}/{seq}"),
                detail: "short header".into(),
            })?;
            bytes += info.bytes;
            samples += info.n;
            next_seq = next_seq.max(seq + info.n);
            entries.insert(seq, info);
        }
        let durable = next_seq - 1;
        let published = published.min(durable);
        Ok(Self {
            inner: Arc::new(Inner {
                stream: stream.to_owned(),
                tree,
                limits,
                state: Mutex::new(State {
                    next_seq,
                    acked,
                    dropped,
                    floor,
                    bytes,
                    samples,
                    entries,
                    published_above: BTreeMap::new(),
                }),
                durable: AtomicU64::new(durable),
                published: AtomicU64::new(published),
                append_lag_ms: AtomicU64::new(0),
                notify: Notify::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The stream name.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// Appends samples as consecutive entries of at most
    /// [`MAX_ENTRY_SAMPLES`] samples and [`MAX_ENTRY_BYTES`] bytes, applying
    /// the overflow policy first. The samples become publishable after the
    /// next group commit.
    pub fn append(&self, samples: &[Sample], now_ms: u64) -> Result<Appended, StoreError> {
        let mut out = Appended {
            first_seq: None,
            dropped: 0,
        };
        for chunk in samples.chunks(MAX_ENTRY_SAMPLES) {
            self.append_split(chunk, now_ms, &mut out)?;
        }
        Ok(out)
    }

    fn append_split(
        &self,
        samples: &[Sample],
        now_ms: u64,
        out: &mut Appended,
    ) -> Result<(), StoreError> {
        if let Some(a) = self.append_entry(samples, now_ms)? {
            out.first_seq = out.first_seq.or(a.first_seq);
            out.dropped += a.dropped;
            return Ok(());
        }
        let (a, b) = samples.split_at(samples.len() / 2);
        self.append_split(a, now_ms, out)?;
        self.append_split(b, now_ms, out)
    }

    /// Appends one entry; `None` (nothing changed) if it would exceed
    /// [`MAX_ENTRY_BYTES`] and can be split.
    fn append_entry(
        &self,
        samples: &[Sample],
        now_ms: u64,
    ) -> Result<Option<Appended>, StoreError> {
        if samples.is_empty() {
            return Ok(Some(Appended {
                first_seq: None,
                dropped: 0,
            }));
        }
        let mut st = self.state();
        let first_seq = st.next_seq;
        let n = samples.len() as u64;
        let value = record::encode(&self.inner.stream, first_seq, samples);
        let min_ts = samples.iter().map(|s| s.ts_ms).min().unwrap_or(0);
        let max_ts = samples.iter().map(|s| s.ts_ms).max().unwrap_or(0);
        self.inner
            .append_lag_ms
            .fetch_max(now_ms.saturating_sub(min_ts), Ordering::Relaxed);
        if value.len() > MAX_ENTRY_BYTES && samples.len() > 1 {
            return Ok(None);
        }
        let new_bytes = value.len() as u64;

        // Which old entries must go?
        let limits = &self.inner.limits;
        let max_age_ms = u64::try_from(limits.max_age.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(max_age_ms);
        let mut victims = Vec::new();
        let mut freed = 0;
        for (&seq, info) in &st.entries {
            let too_old = info.max_ts < cutoff;
            let too_big = st.bytes - freed + new_bytes > limits.max_bytes;
            if !(too_old || too_big) {
                break;
            }
            if too_big && !too_old && limits.policy == OverflowPolicy::RejectNew {
                break;
            }
            victims.push((seq, *info));
            freed += info.bytes;
        }
        // Under reject-new the loop above only expired old entries; if the new
        // entry still does not fit it is refused and never gets a sequence number.
        let accept = st.bytes - freed + new_bytes <= limits.max_bytes
            || limits.policy == OverflowPolicy::DropOldest;

        let mut batch = sled::Batch::default();
        let mut dropped = if accept { 0 } else { n };
        let mut floor = st.floor;
        for (seq, info) in &victims {
            batch.remove(&entry_key(*seq));
            // Samples at or below `acked` were delivered; only the rest are lost.
            dropped += seq + info.n - 1 - st.acked.max(seq - 1);
            floor = floor.max(seq + info.n);
        }
        if accept {
            batch.insert(&entry_key(first_seq), value);
        }
        if dropped > 0 {
            batch.insert(DROPPED, &(st.dropped + dropped).to_be_bytes());
            batch.insert(FLOOR, &floor.to_be_bytes());
        }
        self.inner
            .tree
            .apply_batch(batch)
            .map_err(io("outbox append"))?;
        for (seq, info) in &victims {
            st.entries.remove(seq);
            st.bytes -= info.bytes;
            st.samples -= info.n;
        }
        st.dropped += dropped;
        st.floor = floor;
        if !accept {
            return Ok(Some(Appended {
                first_seq: None,
                dropped,
            }));
        }
        st.entries.insert(
            first_seq,
            EntryInfo {
                n,
                bytes: new_bytes,
                min_ts,
                max_ts,
            },
        );
        st.bytes += new_bytes;
        st.samples += n;
        st.next_seq += n;
        Ok(Some(Appended {
            first_seq: Some(first_seq),
            dropped,
        }))
    }

    /// Up to `max_entries` durable batches containing sequence numbers after
    /// `after`, in order, each carrying the current floor.
    pub fn pending(
        &self,
        after: u64,
        max_entries: usize,
    ) -> Result<Vec<TelemetryBatch>, StoreError> {
        let durable = self.durable_seq();
        let (keys, floor) = {
            let st = self.state();
            let start = st
                .entries
                .range(..=after.max(1))
                .next_back()
                .filter(|(seq, info)| *seq + info.n > after + 1)
                .map_or(after + 1, |(seq, _)| *seq);
            let keys: Vec<u64> = st
                .entries
                .range(start..)
                .take_while(|(seq, info)| *seq + info.n - 1 <= durable)
                .take(max_entries)
                .map(|(seq, _)| *seq)
                .collect();
            (keys, st.floor)
        };
        let mut out = Vec::with_capacity(keys.len());
        for seq in keys {
            // The entry may have been acked or dropped meanwhile: skip it then.
            let Some(v) = self
                .inner
                .tree
                .get(entry_key(seq))
                .map_err(io("outbox read"))?
            else {
                continue;
            };
            let mut b = record::decode(&v).map_err(|e| StoreError::Corrupt {
                what: format!("outbox/{}/{seq}", self.inner.stream),
                detail: e.to_string(),
            })?;
            b.floor_seq = floor.min(b.first_seq);
            out.push(b);
        }
        Ok(out)
    }

    /// Records that the run `[first, last]` is being handed to the link (call
    /// it before the hand-over). The mark is a gap-free prefix: it moves only
    /// over runs that touch it (or the floor), so a live cursor sending newest
    /// data first does not make the unsent backlog below it ackable; runs
    /// above the prefix are remembered (at most [`MAX_PUBLISHED_RUNS`]) and
    /// joined when the drain reaches them. Capped at `durable`; persisted
    /// when it moves (made durable by the next group commit).
    pub fn mark_published(&self, first: u64, last: u64) -> Result<(), StoreError> {
        let durable = self.durable_seq();
        let last = last.min(durable);
        if first > last {
            return Ok(());
        }
        let mut st = self.state();
        let before = self.published_seq();
        let mut mark = before.max(st.acked).max(st.floor.saturating_sub(1));
        st.published_above.insert(first, last);
        while let Some((&a, &b)) = st.published_above.first_key_value() {
            if a > mark.saturating_add(1) {
                break;
            }
            st.published_above.remove(&a);
            mark = mark.max(b);
        }
        while st.published_above.len() > MAX_PUBLISHED_RUNS {
            // Forgetting a run only lowers what an ack may delete: safe.
            st.published_above.pop_last();
        }
        let mark = mark.min(durable);
        if mark > before {
            self.inner.published.store(mark, Ordering::Release);
            self.inner
                .tree
                .insert(PUBLISHED, &mark.to_be_bytes())
                .map_err(io("outbox mark published"))?;
        }
        Ok(())
    }

    /// Highest sequence number handed to the link.
    pub fn published_seq(&self) -> u64 {
        self.inner.published.load(Ordering::Acquire)
    }

    /// Applies a cumulative ack: deletes every entry wholly at or below `up_to`,
    /// clamped to the published mark (see `# Invariants`).
    pub fn ack(&self, up_to: u64) -> Result<AckOutcome, StoreError> {
        let mut st = self.state();
        let published = self.published_seq().min(st.next_seq - 1);
        let clamped = up_to > published;
        let up_to = up_to.min(published);
        if up_to <= st.acked {
            return Ok(AckOutcome {
                released: 0,
                clamped,
            });
        }
        let done: Vec<(u64, EntryInfo)> = st
            .entries
            .range(..=up_to)
            .filter(|(seq, info)| *seq + info.n - 1 <= up_to)
            .map(|(s, i)| (*s, *i))
            .collect();
        let mut batch = sled::Batch::default();
        for (seq, _) in &done {
            batch.remove(&entry_key(*seq));
        }
        batch.insert(ACKED, &up_to.to_be_bytes());
        self.inner
            .tree
            .apply_batch(batch)
            .map_err(io("outbox ack"))?;
        let mut released = 0;
        for (seq, info) in &done {
            st.entries.remove(seq);
            st.bytes -= info.bytes;
            st.samples -= info.n;
            released += info.n;
        }
        st.acked = up_to;
        Ok(AckOutcome { released, clamped })
    }

    /// Highest sequence number assigned so far.
    pub fn appended_seq(&self) -> u64 {
        self.state().next_seq - 1
    }

    /// The largest append lag since the last call, and resets it.
    pub fn take_append_lag(&self) -> u64 {
        self.inner.append_lag_ms.swap(0, Ordering::Relaxed)
    }

    /// Highest sequence number known to be on disk.
    pub fn durable_seq(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    pub(super) fn mark_durable(&self, seq: u64) {
        let prev = self.inner.durable.fetch_max(seq, Ordering::AcqRel);
        if seq > prev {
            self.inner.notify.notify_waiters();
        }
    }

    /// Resolves after the next durability advance (or spuriously).
    pub async fn durable_changed(&self) {
        self.inner.notify.notified().await;
    }

    /// A snapshot of counters and sizes.
    pub fn stats(&self) -> OutboxStats {
        let st = self.state();
        OutboxStats {
            samples: st.samples,
            bytes: st.bytes,
            oldest_ts_ms: st.entries.values().next().map(|e| e.min_ts),
            dropped: st.dropped,
            acked: st.acked,
            next_seq: st.next_seq,
            durable: self.durable_seq(),
            floor: st.floor,
            published: self.published_seq(),
        }
    }
}

fn parse_header(v: &[u8]) -> Option<EntryInfo> {
    let h = record::header(v)?;
    Some(EntryInfo {
        n: h.samples,
        bytes: v.len() as u64,
        min_ts: h.min_ts_ms,
        max_ts: h.max_ts_ms,
    })
}
