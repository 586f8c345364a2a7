//! Model-based test of the durable outbox (`edge_node::store::outbox`).
//!
//! Random sequences of append / group commit / ack / reopen (drop the real
//! sled store in a temp dir and open it again) / clock ticks run against the
//! real store and against [`Model`], a plain `BTreeMap` of entries that follows
//! the rules the outbox documents (entry chunking, the overflow policy with its
//! disk cap and age limit, cumulative acks, the floor). After every step the
//! test compares what the outbox would replay (`pending`), its stats (acked
//! floor, drop counter, sizes, sequence numbers) and checks, independently of
//! the model:
//! - every unacked sequence number at or above the floor and covered by a
//!   commit is replayed, with the sample that was appended under it;
//! - nothing unacked disappears without being counted: each step raises
//!   `dropped` by exactly the samples it refused plus the unacked sequence
//!   numbers the floor moved past; steps other than appends never drop.
//!
//! A "reopen" is a clean drop: sled flushes when its last handle goes. An
//! unclean crash (losing what no commit covered) cannot be expressed through
//! the public API in one process; `tests/crash.rs` covers it with SIGKILL.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::BTreeMap;
use std::time::Duration;

use edge_node::store::outbox::{MAX_ENTRY_BYTES, MAX_ENTRY_SAMPLES};
use edge_node::store::{Outbox, OutboxLimits, OutboxStats, OverflowPolicy, Store, StoreConfig};
use proptest::prelude::*;
use protocols::codec::encode_batch;
use protocols::{Quality, Sample, TelemetryBatch};

const STREAM: &str = "raw";
/// Bytes in front of the encoded batch of every stored entry (n u32, min and
/// max timestamp u64), as documented in `store/outbox.rs`.
const ENTRY_HEADER: u64 = 20;
const START_MS: u64 = 1_764_300_000_000;
const MAX_AGE: Duration = Duration::from_secs(60);

/// One step of a test case.
#[derive(Debug, Clone)]
enum Op {
    /// A pipeline flush: a few samples, one entry.
    Append(Vec<(u32, u64, i32, u8)>),
    /// A large flush (more than one entry's worth), generated from a seed.
    AppendBig { n: usize, seed: u64 },
    /// A group commit.
    Commit,
    /// A cumulative ack; where it points is chosen from the state (see [`ack_target`]).
    Ack { kind: u8, pick: u64 },
    /// Drop the store and open it again.
    Reopen,
    /// Advance the clock (samples age out after [`MAX_AGE`]).
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let small = prop::collection::vec((0u32..8, 0u64..5_000, -1_000i32..1_000, 0u8..3), 0..40);
    prop_oneof![
        8 => small.prop_map(Op::Append),
        1 => (MAX_ENTRY_SAMPLES + 1..2_600, any::<u64>())
            .prop_map(|(n, seed)| Op::AppendBig { n, seed }),
        4 => Just(Op::Commit),
        4 => (0u8..4, any::<u64>()).prop_map(|(kind, pick)| Op::Ack { kind, pick }),
        1 => Just(Op::Reopen),
        2 => (0u64..25_000).prop_map(Op::Tick),
    ]
}

fn quality(q: u8) -> Quality {
    [Quality::GOOD, Quality::UNCERTAIN, Quality::BAD_TIMEOUT][usize::from(q % 3)]
}

fn small_samples(raw: &[(u32, u64, i32, u8)], now: u64) -> Vec<Sample> {
    raw.iter()
        .map(|&(point, back, v, q)| Sample {
            point,
            ts_ms: now - back,
            value: f64::from(v) / 8.0,
            quality: quality(q),
        })
        .collect()
}

/// `n` samples from a tiny LCG: cheap to generate, no shrinking of thousands of values.
fn big_samples(n: usize, seed: u64, now: u64) -> Vec<Sample> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let r = x >> 33;
            Sample {
                point: (r % 16) as u32,
                ts_ms: now - (r % 4_000),
                value: (r % 100_000) as f64 * 0.25,
                quality: quality((r >> 20) as u8),
            }
        })
        .collect()
}

/// Where an ack points: mostly what the hub would send (up to a durable
/// sequence number, cumulative), sometimes stale or beyond anything assigned.
fn ack_target(kind: u8, pick: u64, m: &Model) -> u64 {
    match kind {
        0 => m.durable,
        1 => m.acked + pick % (m.durable.saturating_sub(m.acked) + 1),
        2 => m.acked.saturating_sub(pick % 3),
        _ => m.next_seq + pick % 5,
    }
}

#[derive(Debug, Clone)]
struct Entry {
    samples: Vec<Sample>,
    bytes: u64,
}

impl Entry {
    fn last(&self, first: u64) -> u64 {
        first + self.samples.len() as u64 - 1
    }

    fn max_ts(&self) -> u64 {
        self.samples.iter().map(|s| s.ts_ms).max().unwrap_or(0)
    }
}

/// The reference: what the outbox promises, with no disk.
#[derive(Debug)]
struct Model {
    limits: OutboxLimits,
    next_seq: u64,
    acked: u64,
    dropped: u64,
    floor: u64,
    durable: u64,
    /// What the test handed to the "link" (acks clamp to it).
    published: u64,
    entries: BTreeMap<u64, Entry>,
}

impl Model {
    fn new(limits: OutboxLimits) -> Self {
        Self {
            limits,
            next_seq: 1,
            acked: 0,
            dropped: 0,
            floor: 1,
            durable: 0,
            published: 0,
            entries: BTreeMap::new(),
        }
    }

    fn bytes(&self) -> u64 {
        self.entries.values().map(|e| e.bytes).sum()
    }

    /// `(first accepted seq, samples dropped or refused)` and the accepted `(seq, sample)`s.
    fn append(&mut self, samples: &[Sample], now: u64) -> (Option<u64>, u64, Vec<(u64, Sample)>) {
        let mut out = (None, 0, Vec::new());
        for chunk in samples.chunks(MAX_ENTRY_SAMPLES) {
            self.append_split(chunk, now, &mut out);
        }
        out
    }

    fn append_split(
        &mut self,
        samples: &[Sample],
        now: u64,
        out: &mut (Option<u64>, u64, Vec<(u64, Sample)>),
    ) {
        let body = encode_batch(&TelemetryBatch {
            stream: STREAM.into(),
            first_seq: self.next_seq,
            floor_seq: self.next_seq,
            samples: samples.to_vec(),
        });
        let bytes = ENTRY_HEADER + body.len() as u64;
        if bytes > MAX_ENTRY_BYTES as u64 && samples.len() > 1 {
            let (a, b) = samples.split_at(samples.len() / 2);
            self.append_split(a, now, out);
            self.append_split(b, now, out);
            return;
        }
        // Oldest entries go while they are too old, or (drop-oldest only)
        // while the new entry does not fit.
        let cutoff = now.saturating_sub(self.limits.max_age.as_millis() as u64);
        while let Some((&seq, e)) = self.entries.first_key_value() {
            let expired = e.max_ts() < cutoff;
            let full = self.bytes() + bytes > self.limits.max_bytes;
            if !(expired || full && self.limits.policy == OverflowPolicy::DropOldest) {
                break;
            }
            let last = e.last(seq);
            self.entries.remove(&seq);
            let lost = last - self.acked.max(seq - 1);
            out.1 += lost;
            self.dropped += lost;
            self.floor = self.floor.max(last + 1);
        }
        let fits = self.bytes() + bytes <= self.limits.max_bytes;
        if !fits && self.limits.policy == OverflowPolicy::RejectNew {
            out.1 += samples.len() as u64;
            self.dropped += samples.len() as u64;
            return;
        }
        let first = self.next_seq;
        out.0 = out.0.or(Some(first));
        out.2.extend(
            samples
                .iter()
                .enumerate()
                .map(|(i, s)| (first + i as u64, *s)),
        );
        self.next_seq += samples.len() as u64;
        self.entries.insert(
            first,
            Entry {
                samples: samples.to_vec(),
                bytes,
            },
        );
    }

    fn ack(&mut self, up_to: u64) -> u64 {
        if up_to <= self.acked {
            return 0;
        }
        let up_to = up_to.min(self.published);
        if up_to <= self.acked {
            return 0;
        }
        let done: Vec<u64> = self
            .entries
            .iter()
            .filter(|(seq, e)| e.last(**seq) <= up_to)
            .map(|(seq, _)| *seq)
            .collect();
        let mut released = 0;
        for seq in done {
            released += self
                .entries
                .remove(&seq)
                .map_or(0, |e| e.samples.len() as u64);
        }
        self.acked = up_to;
        released
    }

    fn pending(&self, after: u64, max: usize) -> Vec<TelemetryBatch> {
        self.entries
            .iter()
            .filter(|(seq, e)| e.last(**seq) > after && e.last(**seq) <= self.durable)
            .take(max)
            .map(|(&seq, e)| TelemetryBatch {
                stream: STREAM.into(),
                first_seq: seq,
                floor_seq: self.floor.min(seq),
                samples: e.samples.clone(),
            })
            .collect()
    }

    fn stats(&self) -> OutboxStats {
        OutboxStats {
            samples: self.entries.values().map(|e| e.samples.len() as u64).sum(),
            bytes: self.bytes(),
            oldest_ts_ms: self
                .entries
                .values()
                .next()
                .and_then(|e| e.samples.iter().map(|s| s.ts_ms).min()),
            dropped: self.dropped,
            acked: self.acked,
            next_seq: self.next_seq,
            durable: self.durable,
            floor: self.floor,
            published: self.published,
        }
    }
}

/// The system under test: a real store in a temp dir.
struct Sut {
    config: StoreConfig,
    store: Option<Store>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Sut {
    fn new(limits: OutboxLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            path: dir.path().join("db"),
            cache_capacity_bytes: 1024 * 1024,
            outbox: limits,
        };
        let store = Store::open(&config).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        Self {
            config,
            store: Some(store),
            rt,
            _dir: dir,
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn outbox(&self) -> Outbox {
        self.store().outbox(STREAM).unwrap()
    }

    fn commit(&self) {
        self.rt.block_on(self.store().commit()).unwrap();
    }

    fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(Store::open(&self.config).unwrap());
    }
}

/// Compares the outbox with the model and checks the invariants that hold
/// regardless of the model. `ledger` maps each assigned seq to its sample.
fn check(
    outbox: &Outbox,
    m: &Model,
    ledger: &BTreeMap<u64, Sample>,
    probe: (u64, usize),
) -> Result<(), TestCaseError> {
    let st = outbox.stats();
    prop_assert_eq!(&st, &m.stats());
    let replay = outbox.pending(0, usize::MAX).unwrap();
    prop_assert_eq!(&replay, &m.pending(0, usize::MAX));
    let (after, max) = probe;
    prop_assert_eq!(
        outbox.pending(after, max).unwrap(),
        m.pending(after, max),
        "pending({}, {})",
        after,
        max
    );

    // Independent of the model: the replay is in order, carries the floor,
    // holds what was appended, and misses no unacked durable seq above the floor.
    let mut unacked = Vec::new();
    let mut prev_last = 0;
    for b in &replay {
        prop_assert_eq!(b.stream.as_str(), STREAM);
        prop_assert!(b.first_seq > prev_last, "replay out of order");
        prop_assert_eq!(b.floor_seq, st.floor.min(b.first_seq));
        for (seq, s) in b.iter_seq() {
            prop_assert!(
                seq <= st.durable,
                "seq {} replayed before a commit covered it",
                seq
            );
            prop_assert_eq!(ledger.get(&seq), Some(s), "seq {}", seq);
            if seq > st.acked {
                unacked.push(seq);
            }
        }
        prev_last = b.last_seq().unwrap_or(prev_last);
    }
    let from = st.floor.max(st.acked + 1);
    let want: Vec<u64> = (from..=st.durable).collect();
    prop_assert_eq!(unacked, want, "unacked durable seqs at or above the floor");
    prop_assert!(st.floor <= st.next_seq && st.acked < st.next_seq);
    Ok(())
}

fn limits() -> impl Strategy<Value = OutboxLimits> {
    (
        prop::sample::select(vec![700u64, 2_500, 9_000, 10_000_000]),
        prop_oneof![
            Just(OverflowPolicy::DropOldest),
            Just(OverflowPolicy::RejectNew)
        ],
    )
        .prop_map(|(max_bytes, policy)| OutboxLimits {
            max_bytes,
            max_age: MAX_AGE,
            policy,
        })
}

/// Appends to both sides and compares what each says it did.
fn append(
    sut: &Sut,
    m: &mut Model,
    ledger: &mut BTreeMap<u64, Sample>,
    samples: &[Sample],
    now: u64,
) -> Result<(), TestCaseError> {
    let got = sut.outbox().append(samples, now).unwrap();
    let (first, dropped, accepted) = m.append(samples, now);
    prop_assert_eq!((got.first_seq, got.dropped), (first, dropped));
    ledger.extend(accepted);
    Ok(())
}

fn run(limits: OutboxLimits, ops: &[(Op, u64, usize)]) -> Result<(), TestCaseError> {
    let mut sut = Sut::new(limits.clone());
    let mut m = Model::new(limits);
    let mut ledger = BTreeMap::new();
    let mut now = START_MS;
    for (i, (op, probe_after, probe_max)) in ops.iter().enumerate() {
        let before = sut.outbox().stats();
        let mut requested = 0;
        match op {
            Op::Append(raw) => {
                let samples = small_samples(raw, now);
                requested = samples.len() as u64;
                append(&sut, &mut m, &mut ledger, &samples, now)?;
            }
            Op::AppendBig { n, seed } => {
                let samples = big_samples(*n, *seed, now);
                requested = samples.len() as u64;
                append(&sut, &mut m, &mut ledger, &samples, now)?;
            }
            Op::Commit => {
                sut.commit();
                m.durable = m.next_seq - 1;
            }
            Op::Ack { kind, pick } => {
                // Acks clamp to what was published (issue 12, C3): as the
                // uplink would, hand everything durable to the link first.
                sut.outbox().mark_published(1, m.durable).unwrap();
                m.published = m.published.max(m.durable);
                let to = ack_target(*kind, *pick, &m);
                let done = sut.outbox().ack(to).unwrap();
                prop_assert_eq!(done.released, m.ack(to), "ack({}) at step {}", to, i);
                prop_assert_eq!(
                    done.clamped,
                    to > m.published,
                    "clamp of ack({}) at step {}",
                    to,
                    i
                );
            }
            Op::Reopen => {
                sut.reopen();
                // Everything on disk is publishable after a restart.
                m.durable = m.next_seq - 1;
            }
            Op::Tick(ms) => now += ms,
        }
        let outbox = sut.outbox();
        let after = outbox.stats();
        // Nothing unacked vanishes uncounted: `dropped` grows by the samples
        // refused (asked for, given no number) plus the unacked numbers the
        // floor moved past. Only appends drop.
        let refused = requested - (after.next_seq - before.next_seq);
        let passed = after
            .floor
            .saturating_sub(before.floor.max(before.acked + 1));
        prop_assert_eq!(
            after.dropped - before.dropped,
            refused + passed,
            "step {} ({:?}): drop accounting",
            i,
            op
        );
        if requested == 0 {
            prop_assert_eq!(after.floor, before.floor, "step {}: floor moved", i);
        }
        prop_assert!(after.acked >= before.acked, "step {}: acked went back", i);
        let probe = (probe_after % (after.next_seq + 2), *probe_max);
        check(&outbox, &m, &ledger, probe)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 40,
        ..ProptestConfig::default()
    })]

    #[test]
    fn outbox_matches_model(
        limits in limits(),
        ops in prop::collection::vec((op(), any::<u64>(), 1usize..4), 1..60),
    ) {
        run(limits, &ops)?;
    }
}

/// A fixed sequence through every kind of step, so a regression shows up
/// with a readable history even before proptest shrinks anything.
#[test]
fn drop_oldest_then_ack_then_reopen() {
    let limits = OutboxLimits {
        max_bytes: 700,
        max_age: MAX_AGE,
        policy: OverflowPolicy::DropOldest,
    };
    let raw: Vec<(u32, u64, i32, u8)> = (0..30u8)
        .map(|i| (u32::from(i % 4), 0, i32::from(i), 0))
        .collect();
    let ops = vec![
        (Op::Append(raw.clone()), 0, 1),
        (Op::Commit, 0, 1),
        (Op::Ack { kind: 1, pick: 10 }, 0, 1),
        (Op::Append(raw.clone()), 0, 1),
        (Op::Append(raw.clone()), 0, 1),
        (Op::Commit, 5, 2),
        (Op::Reopen, 40, 1),
        (Op::Tick(61_000), 0, 3),
        (Op::Append(raw), 0, 3),
        (Op::Ack { kind: 0, pick: 0 }, 0, 1),
        (Op::Reopen, 0, 1),
    ];
    run(limits, &ops).unwrap();
}
