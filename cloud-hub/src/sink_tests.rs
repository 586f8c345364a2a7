//! Tests of the sink's range set (the stored runs above `contiguous`) and of
//! the watermark rules built on it: out-of-order runs, floors, duplicates,
//! gaps, a floor that jumps past stored runs, and reopening. The last test
//! replays seeded random edge traffic against a model that keeps every stored
//! sequence number in a `BTreeSet`.
//!
//! The range set lives in `StreamEntry` next to its sled tree, so the direct
//! tests build an entry over a temporary database.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use protocols::{Quality, Sample};

use super::*;

fn temp_db() -> sled::Db {
    sled::Config::new().temporary(true).open().unwrap()
}

fn entry(db: &sled::Db) -> StreamEntry {
    StreamEntry::new(db.open_tree("t").unwrap())
}

/// Ingests `b` as a node whose reported state already confirmed the batch's
/// floor (the normal order: the edge reports its outbox floor every few
/// seconds, and the tests of the floor rules below are about the rules, not
/// the wait).
fn ingest(sink: &Sink, b: &TelemetryBatch) -> Ingested {
    sink.confirm_floor("n", &b.stream, b.floor_seq).unwrap();
    sink.ingest("n", b).unwrap()
}

fn runs(e: &StreamEntry) -> Vec<(u64, u64)> {
    e.above.iter().map(|(&a, &b)| (a, b)).collect()
}

/// A batch whose sample values are their sequence numbers, as an edge that
/// resends the same data under the same numbers would send it.
fn batch(first_seq: u64, floor_seq: u64, n: u64) -> TelemetryBatch {
    TelemetryBatch {
        stream: "raw".into(),
        first_seq,
        floor_seq,
        samples: (first_seq..first_seq + n)
            .map(|seq| Sample {
                point: (seq % 5) as u32,
                ts_ms: seq.wrapping_add(2_000),
                value: seq as f64,
                quality: Quality::GOOD,
            })
            .collect(),
    }
}

fn stats(sink: &Sink) -> StreamStats {
    sink.streams("n").remove("raw").unwrap_or_default()
}

fn stored_seqs(sink: &Sink) -> Vec<u64> {
    sink.query("n", "raw", 0, None, None, usize::MAX)
        .unwrap()
        .iter()
        .map(|s| s.seq)
        .collect()
}

#[test]
fn out_of_order_runs_merge_with_both_neighbours() {
    let db = temp_db();
    let mut e = entry(&db);
    e.add_run(20, 25);
    e.add_run(1, 5);
    e.add_run(10, 12);
    assert_eq!(runs(&e), [(1, 5), (10, 12), (20, 25)]);
    // Adjacent on both sides: one run.
    e.add_run(6, 9);
    assert_eq!(runs(&e), [(1, 12), (20, 25)]);
    // Adjacent above only, then a run that overlaps two runs and the gap.
    e.add_run(26, 30);
    assert_eq!(runs(&e), [(1, 12), (20, 30)]);
    e.add_run(11, 22);
    assert_eq!(runs(&e), [(1, 30)]);
    // A run inside a stored one changes nothing.
    e.add_run(3, 4);
    assert_eq!(runs(&e), [(1, 30)]);
    assert!(e.covered(1) && e.covered(30) && !e.covered(31));
}

#[test]
fn a_run_swallowing_several_runs_keeps_the_highest_end() {
    let db = temp_db();
    let mut e = entry(&db);
    for (a, b) in [(5, 6), (9, 9), (12, 40), (50, 51)] {
        e.add_run(a, b);
    }
    e.add_run(4, 20);
    assert_eq!(runs(&e), [(4, 40), (50, 51)]);
    assert_eq!(e.stored_above, 37 + 2);
    e.raise_watermark(45);
    assert_eq!((runs(&e), e.stored_above), (vec![(50, 51)], 2));
}

#[test]
fn advance_moves_over_runs_that_touch_the_watermark_only() {
    let db = temp_db();
    let mut e = entry(&db);
    e.add_run(2, 5);
    e.advance();
    assert_eq!(e.stats.contiguous, 0, "1 is missing");
    e.add_run(1, 1);
    e.add_run(8, 9);
    e.advance();
    assert_eq!(e.stats.contiguous, 5);
    assert_eq!(runs(&e), [(8, 9)]);
    e.add_run(6, 7);
    e.advance();
    assert_eq!((e.stats.contiguous, runs(&e)), (9, vec![]));
}

#[test]
fn a_raised_watermark_forgets_runs_below_it_and_cuts_the_one_across_it() {
    let db = temp_db();
    let mut e = entry(&db);
    for (a, b) in [(3, 5), (8, 12), (20, 22)] {
        e.add_run(a, b);
    }
    e.raise_watermark(10);
    assert_eq!(e.stats.contiguous, 10);
    assert_eq!(runs(&e), [(11, 12), (20, 22)]);
    // Never backwards.
    e.raise_watermark(4);
    assert_eq!(e.stats.contiguous, 10);
    // Exactly to a run's end; `advance` then joins the run that touches it.
    e.raise_watermark(12);
    assert_eq!(runs(&e), [(20, 22)]);
    e.raise_watermark(19);
    e.advance();
    assert_eq!((e.stats.contiguous, runs(&e)), (22, vec![]));
    // A cut that leaves a single number keeps it.
    e.add_run(30, 31);
    e.raise_watermark(30);
    assert_eq!(runs(&e), [(31, 31)]);
}

#[test]
fn missing_counts_only_unstored_numbers_above_the_watermark() {
    let db = temp_db();
    let mut e = entry(&db);
    e.stats.contiguous = 4;
    e.stats.max_seen = 20;
    e.add_run(7, 9);
    e.add_run(15, 20);
    e.refresh_missing();
    // 5, 6, 10..=14
    assert_eq!(e.stats.missing_now, 7);
    // A watermark above everything seen: nothing is missing.
    e.raise_watermark(30);
    e.refresh_missing();
    assert_eq!(e.stats.missing_now, 0);
}

#[test]
fn duplicates_inside_and_around_runs_are_cut_off() {
    let db = temp_db();
    let sink = Sink::open(&db).unwrap();
    ingest(&sink, &batch(10, 1, 5)); // 10..=14 above a gap
    ingest(&sink, &batch(20, 1, 3)); // 20..=22
    // 8..=23: new are 8, 9, 15..=19, 23; 10..=14 and 20..=22 are duplicates.
    let r = ingest(&sink, &batch(8, 1, 16));
    assert_eq!((r.stored, r.duplicates), (8, 8));
    let st = stats(&sink);
    assert_eq!((st.contiguous, st.missing_now, st.stored), (0, 7, 16));
    assert_eq!(stored_seqs(&sink), (8..=23).collect::<Vec<_>>());
    // The same batch twice: all duplicates, nothing written.
    let r = ingest(&sink, &batch(8, 1, 16));
    assert_eq!((r.stored, r.duplicates), (0, 16));
    assert_eq!(stats(&sink).duplicates, 24);
}

#[test]
fn gaps_are_counted_once_per_batch_that_opens_one() {
    let db = temp_db();
    let sink = Sink::open(&db).unwrap();
    ingest(&sink, &batch(1, 1, 3));
    ingest(&sink, &batch(10, 1, 2)); // gap 4..=9
    ingest(&sink, &batch(11, 1, 2)); // overlaps, no new gap
    ingest(&sink, &batch(30, 1, 1)); // gap 13..=29
    // A batch whose floor declares the gap dropped does not count as a gap.
    ingest(&sink, &batch(40, 40, 1));
    let st = stats(&sink);
    assert_eq!(st.gaps_seen, 2);
    assert_eq!(st.contiguous, 40);
    assert_eq!(st.max_seen, 40);
    // 4..=9, 13..=29 and 31..=39 were never stored: declared drops.
    assert_eq!(st.dropped_by_edge, 6 + 17 + 9);
    assert_eq!(st.missing_now, 0);
}

#[test]
fn a_floor_that_jumps_past_stored_runs_counts_only_unstored_numbers() {
    let db = temp_db();
    let sink = Sink::open(&db).unwrap();
    ingest(&sink, &batch(1, 1, 5));
    ingest(&sink, &batch(8, 1, 2)); // 8, 9
    ingest(&sink, &batch(12, 1, 3)); // 12..=14
    ingest(&sink, &batch(30, 1, 2)); // 30, 31: above the coming floor
    // Floor 20 with a batch starting at 20: 6..=19 is final.
    ingest(&sink, &batch(20, 20, 2));
    let st = stats(&sink);
    // 6, 7, 10, 11, 15..=19 dropped; 20, 21 stored; 22..=29 still missing.
    assert_eq!(st.dropped_by_edge, 9);
    assert_eq!((st.contiguous, st.missing_now), (21, 8));
    // The floor passes the run at 30 as well: contiguous moves over it.
    ingest(&sink, &batch(35, 35, 1));
    let st = stats(&sink);
    assert_eq!(st.dropped_by_edge, 9 + 8 + 3);
    assert_eq!((st.contiguous, st.missing_now, st.stored), (35, 0, 15));
    // A late copy of a declared drop is a duplicate, not stored.
    let r = ingest(&sink, &batch(16, 16, 2));
    assert_eq!((r.stored, r.duplicates), (0, 2));
}

#[tokio::test]
async fn acks_follow_contiguous_only_and_survive_reopen() {
    let db = temp_db();
    let sink = Sink::open(&db).unwrap();
    ingest(&sink, &batch(5, 1, 5));
    assert!(sink.flush_and_collect_acks().await.unwrap().is_empty());
    ingest(&sink, &batch(1, 1, 4));
    let acks = sink.flush_and_collect_acks().await.unwrap();
    assert_eq!(acks, [("n".to_owned(), "raw".to_owned(), 9)]);
    assert!(sink.flush_and_collect_acks().await.unwrap().is_empty());
    ingest(&sink, &batch(12, 1, 2));
    drop(sink);
    let sink = Sink::open(&db).unwrap();
    let st = stats(&sink);
    assert_eq!(
        (st.contiguous, st.acked, st.stored, st.max_seen),
        (9, 9, 11, 13)
    );
    assert_eq!(st.missing_now, 2);
    ingest(&sink, &batch(10, 1, 2));
    let acks = sink.flush_and_collect_acks().await.unwrap();
    assert_eq!(acks, [("n".to_owned(), "raw".to_owned(), 13)]);
}

/// The sink's promises over a plain set of stored sequence numbers.
#[derive(Debug, Default)]
struct Model {
    stored: BTreeSet<u64>,
    stats: StreamStats,
    /// The stats as last written to `sink-meta` (by a flush with an ack due).
    saved: Option<StreamStats>,
}

impl Model {
    fn ingest(&mut self, b: &TelemetryBatch) -> Ingested {
        let mut out = Ingested::default();
        let before = self.stats.contiguous;
        for (seq, _) in b.iter_seq() {
            if seq <= before || !self.stored.insert(seq) {
                out.duplicates += 1;
            } else {
                out.stored += 1;
            }
        }
        let s = &mut self.stats;
        if b.first_seq > s.max_seen.max(s.contiguous) + 1 && b.floor_seq < b.first_seq {
            s.gaps_seen += 1;
        }
        if let Some(last) = b.last_seq() {
            s.max_seen = s.max_seen.max(last);
        }
        s.stored += out.stored;
        s.duplicates += out.duplicates;
        if b.floor_seq > s.contiguous + 1 {
            let gap = s.contiguous + 1..b.floor_seq;
            s.dropped_by_edge += gap.filter(|q| !self.stored.contains(q)).count() as u64;
            s.contiguous = b.floor_seq - 1;
        }
        self.settle();
        out
    }

    /// Moves `contiguous` over stored numbers and recounts `missing_now`.
    fn settle(&mut self) {
        let s = &mut self.stats;
        while self.stored.contains(&(s.contiguous + 1)) {
            s.contiguous += 1;
        }
        s.missing_now = (s.contiguous + 1..=s.max_seen)
            .filter(|q| !self.stored.contains(q))
            .count() as u64;
    }

    fn flush(&mut self) -> Vec<(String, String, u64)> {
        if self.stats.contiguous <= self.stats.acked {
            return Vec::new();
        }
        self.stats.acked = self.stats.contiguous;
        self.saved = Some(self.stats.clone());
        vec![("n".into(), "raw".into(), self.stats.contiguous)]
    }

    /// What a reopen recovers: the saved stats, with the stored runs recounted.
    fn reopen(&mut self) {
        let mut s = self.saved.clone().unwrap_or_default();
        s.stored = self.stored.len() as u64;
        s.max_seen = s.max_seen.max(self.stored.last().copied().unwrap_or(0));
        self.stats = s;
        self.settle();
    }
}

/// Edge-like traffic: resends from behind, jumps ahead, a floor that only
/// rises and sometimes declares a stretch dropped, flushes and reopens.
fn random_traffic(seed: u64, steps: usize) {
    let db = temp_db();
    let mut sink = Sink::open(&db).unwrap();
    let mut model = Model::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (mut floor, mut hi) = (1u64, 0u64);
    for step in 0..steps {
        match rng.random_range(0..20) {
            0..=1 => {
                let acks = rt.block_on(sink.flush_and_collect_acks()).unwrap();
                assert_eq!(acks, model.flush(), "seed {seed} step {step}: acks");
            }
            2 => {
                drop(sink);
                sink = Sink::open(&db).unwrap();
                model.reopen();
            }
            _ => {
                if rng.random_bool(0.1) {
                    floor = rng.random_range(floor..=hi + 5);
                }
                let first = rng.random_range(floor..=hi.max(floor) + 8);
                let n = rng.random_range(0..12);
                let b = batch(first, floor, n);
                hi = hi.max(first + n);
                let got = ingest(&sink, &b);
                assert_eq!(got, model.ingest(&b), "seed {seed} step {step}: {b:?}");
            }
        }
        assert_eq!(stats(&sink), model.stats, "seed {seed} step {step}");
    }
    let want: Vec<u64> = model.stored.iter().copied().collect();
    assert_eq!(stored_seqs(&sink), want, "seed {seed}");
    let values_match = sink
        .query("n", "raw", 0, None, None, usize::MAX)
        .unwrap()
        .iter()
        .all(|s| (s.value - s.seq as f64).abs() < f64::EPSILON);
    assert!(values_match, "seed {seed}: a stored value moved");
}

#[test]
fn random_traffic_matches_a_set_model() {
    for seed in 0..48 {
        random_traffic(seed, 150);
    }
}

// ---- hostile input ----------------------------------------------------

#[test]
fn a_declared_floor_waits_until_the_node_confirms_it() {
    let db = temp_db();
    let sink = Sink::open(&db).unwrap();
    ingest(&sink, &batch(1, 1, 5));
    // A forged batch declaring everything below 1,000,000 dropped: stored as
    // a run above the watermark, but the watermark (and so the acks) stays.
    let r = sink.ingest("n", &batch(1_000_000, 1_000_000, 1)).unwrap();
    assert!(r.floor_held);
    let st = stats(&sink);
    assert_eq!((st.contiguous, st.dropped_by_edge), (5, 0));
    // The real edge keeps sending; its data is stored, not taken as duplicates.
    assert_eq!(sink.ingest("n", &batch(6, 1, 4)).unwrap().stored, 4);
    assert_eq!(stats(&sink).contiguous, 9);
    // The node confirms a floor of 20 only: drops up to 19 are final.
    assert!(sink.confirm_floor("n", "raw", 20).unwrap());
    let st = stats(&sink);
    assert_eq!((st.contiguous, st.dropped_by_edge), (19, 10));
    // A confirmation never moves the watermark past what a batch declared:
    // up to the declared floor, then over the stored run at 1,000,000.
    assert!(sink.confirm_floor("n", "raw", 5_000_000).unwrap());
    let st = stats(&sink);
    assert_eq!(
        (st.contiguous, st.dropped_by_edge),
        (1_000_000, 10 + 999_980)
    );
}

#[test]
fn sequence_numbers_past_max_seq_are_refused_whole() {
    let db = temp_db();
    let sink = Sink::open(&db).unwrap();
    let max = protocols::limits::MAX_SEQ;
    for b in [
        batch(max, 1, 2),
        batch(u64::MAX - 1, 1, 1),
        batch(5, max + 2, 0),
    ] {
        let err = sink.ingest("n", &b).unwrap_err();
        assert!(
            matches!(&err, SinkError::Refused(r) if r.reason() == "seq_out_of_range"),
            "{err}"
        );
        assert!(err.to_string().contains("limits::MAX_SEQ"), "{err}");
    }
    // The last number itself is fine, and the arithmetic above it holds.
    sink.confirm_floor("n", "raw", max).unwrap();
    let r = sink.ingest("n", &batch(max, max, 1)).unwrap();
    assert_eq!(r.stored, 1);
    assert_eq!(stats(&sink).contiguous, max);
    assert_eq!(sink.ingest("n", &batch(max, max, 1)).unwrap().duplicates, 1);
    let q = sink.query("n", "raw", max, None, None, 10).unwrap();
    assert_eq!(q.iter().map(|s| s.seq).collect::<Vec<_>>(), [max]);
}

#[test]
fn streams_past_the_caps_are_refused_and_existing_ones_keep_working() {
    let db = temp_db();
    let limits = SinkLimits {
        max_streams_per_node: 2,
        max_streams: 3,
        max_runs_per_stream: 8,
    };
    let sink = Sink::open_with(&db, limits).unwrap();
    let named = |stream: &str| TelemetryBatch {
        stream: stream.into(),
        ..batch(1, 1, 1)
    };
    sink.ingest("a", &named("s1")).unwrap();
    sink.ingest("a", &named("s2")).unwrap();
    let err = sink.ingest("a", &named("s3")).unwrap_err();
    assert!(matches!(&err, SinkError::Refused(r) if r.reason() == "streams_per_node"));
    assert!(
        err.to_string().contains("limits.max_streams_per_node"),
        "{err}"
    );
    sink.ingest("b", &named("s1")).unwrap();
    let err = sink.ingest("c", &named("s1")).unwrap_err();
    assert!(matches!(&err, SinkError::Refused(r) if r.reason() == "streams"));
    // A confirmation cannot open a stream past the caps either.
    assert!(sink.confirm_floor("c", "s1", 5).is_err());
    // Known streams still take data, also after a reopen.
    assert_eq!(
        sink.ingest(
            "a",
            &TelemetryBatch {
                first_seq: 2,
                floor_seq: 1,
                ..named("s2")
            }
        )
        .unwrap()
        .stored,
        1
    );
    drop(sink);
    let sink = Sink::open_with(&db, limits).unwrap();
    assert_eq!(sink.streams("a").len(), 2);
    assert!(sink.ingest("a", &named("s9")).is_err());
}

#[test]
fn sparse_batches_past_the_run_cap_are_refused_and_gap_fillers_are_not() {
    let db = temp_db();
    let limits = SinkLimits {
        max_runs_per_stream: 4,
        ..SinkLimits::default()
    };
    let sink = Sink::open_with(&db, limits).unwrap();
    // 1-sample batches at 10, 20, 30, 40: four separate runs.
    for first in [10, 20, 30, 40] {
        sink.ingest("n", &batch(first, 1, 1)).unwrap();
    }
    let err = sink.ingest("n", &batch(50, 1, 1)).unwrap_err();
    assert!(
        matches!(&err, SinkError::Refused(r) if r.reason() == "runs_per_stream"),
        "{err}"
    );
    // Extending a run, filling a gap and the watermark's own edge still work.
    assert_eq!(sink.ingest("n", &batch(41, 1, 2)).unwrap().stored, 2);
    assert_eq!(sink.ingest("n", &batch(11, 1, 9)).unwrap().stored, 9);
    assert_eq!(sink.ingest("n", &batch(1, 1, 9)).unwrap().stored, 9);
    let st = stats(&sink);
    assert_eq!((st.contiguous, st.missing_now), (20, 9 + 9));
    // Room again: a new run is accepted.
    sink.ingest("n", &batch(50, 1, 1)).unwrap();
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// Sequence numbers an attacker would pick: tiny, near the bound, past
    /// it, at the top of u64.
    fn seq() -> impl Strategy<Value = u64> {
        let max = protocols::limits::MAX_SEQ;
        prop_oneof![
            0..64u64,
            (max - 64)..=max,
            (max + 1)..(max + 64),
            (u64::MAX - 64)..=u64::MAX,
            any::<u64>(),
        ]
    }

    #[derive(Debug, Clone)]
    enum Step {
        Batch {
            first: u64,
            floor_back: u64,
            n: u64,
            forged_floor: Option<u64>,
        },
        Confirm(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (seq(), 0..8u64, 0..6u64, proptest::option::of(seq())).prop_map(
                |(first, floor_back, n, forged_floor)| Step::Batch { first, floor_back, n, forged_floor }
            ),
            1 => seq().prop_map(Step::Confirm),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever arrives, the sink never panics, refuses only with a
        /// reason, never stores a number twice, keeps every number at or
        /// below MAX_SEQ, and its watermark never falls and never passes a
        /// floor the node did not confirm (unless the numbers are stored).
        #[test]
        fn extreme_sequence_numbers_never_break_the_sink(steps in proptest::collection::vec(step(), 1..40)) {
            let db = temp_db();
            let limits = SinkLimits { max_runs_per_stream: 16, ..SinkLimits::default() };
            let sink = Sink::open_with(&db, limits).unwrap();
            let mut stored = BTreeSet::new();
            let (mut confirmed, mut last_contiguous) = (0u64, 0u64);
            for s in steps {
                match s {
                    Step::Confirm(f) => {
                        if sink.confirm_floor("n", "raw", f).is_ok() {
                            confirmed = confirmed.max(f.min(protocols::limits::MAX_SEQ + 1));
                        }
                    }
                    Step::Batch { first, floor_back, n, forged_floor } => {
                        let n = n.min(u64::MAX - first);
                        let mut b = TelemetryBatch {
                            stream: "raw".into(),
                            first_seq: first,
                            floor_seq: first.saturating_sub(floor_back),
                            samples: (0..n).map(|i| Sample {
                                point: 0, ts_ms: i, value: 0.0, quality: Quality::GOOD,
                            }).collect(),
                        };
                        if let Some(f) = forged_floor {
                            b.floor_seq = f;
                        }
                        match sink.ingest("n", &b) {
                            Ok(r) => {
                                let fresh = b.iter_seq().filter(|&(q, _)| q > last_contiguous && stored.insert(q)).count() as u64;
                                prop_assert_eq!(r.stored, fresh);
                            }
                            Err(SinkError::Refused(r)) => { prop_assert!(!r.reason().is_empty()); }
                            Err(e) => prop_assert!(false, "not a refusal: {e}"),
                        }
                    }
                }
                let st = stats(&sink);
                prop_assert!(st.contiguous >= last_contiguous);
                prop_assert!(st.contiguous <= protocols::limits::MAX_SEQ);
                prop_assert!(st.max_seen <= protocols::limits::MAX_SEQ);
                // Past the confirmed floor only over stored numbers.
                if st.contiguous >= confirmed.max(1) {
                    let over = (confirmed.max(1)..=st.contiguous).take(1_000);
                    for q in over {
                        prop_assert!(stored.contains(&q) || q <= last_contiguous, "contiguous {} passed unconfirmed, unstored {q}", st.contiguous);
                    }
                }
                last_contiguous = st.contiguous;
            }
            let q = sink.query("n", "raw", 0, None, None, 100_000).unwrap();
            let mut seen = BTreeSet::new();
            for s in &q {
                prop_assert!(seen.insert(s.seq), "seq {} stored twice", s.seq);
            }
        }
    }
}
