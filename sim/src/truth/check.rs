//! Comparing what the devices served with what the hub stored.
//!
//! Two layers:
//! - the oracle's matching ([`compare_point`], [`compare_point_with`]):
//!   replays the served values through a reference [`Filter`] and matches
//!   its output against the stored samples ([`PointVerdict`]); the
//!   reconstruction error of the stored signal
//!   ([`reconstruct_max_error`]); sequence numbers ([`seq_analysis`]);
//! - the runner's check of one point ([`check_point`] → [`PointCheck`]):
//!   the oracle's counts where the deployed [`PointFilter`]'s config parses,
//!   and [`local`]'s reconstruction error, which anchors each stored sample
//!   at the read it came from and so tolerates a Modbus driver's
//!   stamp-after-read.

use std::collections::HashMap;

use serde::Serialize;

use super::{Filter, Obs, reference_detailed};
use crate::scenario::Guest;

// ------------------------------------------------------------------ matching

/// How stored samples are identified with served observations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchOptions {
    /// Largest difference between a served timestamp and the stored sample's
    /// timestamp (read latency). Keep it below half the sampling interval.
    pub skew_ms: u64,
    /// Largest difference between the served and the stored value, relative
    /// to `max(1, |served|)` (decoding may round).
    pub value_tolerance: f64,
}

impl Default for MatchOptions {
    /// 250 ms skew, values equal to 1e-9 relative.
    fn default() -> Self {
        Self {
            skew_ms: 250,
            value_tolerance: 1e-9,
        }
    }
}

fn same_value(served: f64, stored: f64, tol: f64) -> bool {
    if served.is_nan() || stored.is_nan() {
        return served.is_nan() && stored.is_nan();
    }
    if served.is_infinite() || stored.is_infinite() {
        #[allow(clippy::float_cmp, reason = "infinities compare exactly")]
        return served == stored;
    }
    (served - stored).abs() <= tol * served.abs().max(1.0)
}

/// Indexes of `served` within `skew` of `ts` with the same value and quality.
fn candidates(served: &[Obs], s: &Obs, opts: &MatchOptions) -> Vec<usize> {
    let lo = s.ts_ms.saturating_sub(opts.skew_ms);
    let hi = s.ts_ms.saturating_add(opts.skew_ms);
    let start = served.partition_point(|o| o.ts_ms < lo);
    served[start..]
        .iter()
        .enumerate()
        .take_while(|(_, o)| o.ts_ms <= hi)
        .filter(|(_, o)| {
            o.quality == s.quality && same_value(o.value, s.value, opts.value_tolerance)
        })
        .map(|(k, _)| start + k)
        .collect()
}

/// The outcome of matching one point.
#[derive(Debug, Clone, Default)]
struct Matching {
    verdict: PointVerdict,
    /// (served index, stored obs) of the first stored sample matched to each
    /// served observation, in served order.
    matched: Vec<(usize, Obs)>,
}

fn match_point(filter: &Filter, served: &[Obs], stored: &[Obs], opts: &MatchOptions) -> Matching {
    // 1. Candidates per stored sample; unmatched bad samples are markers.
    let cands: Vec<Vec<usize>> = stored.iter().map(|s| candidates(served, s, opts)).collect();
    let mut markers: Vec<Obs> = stored
        .iter()
        .zip(&cands)
        .filter(|(s, c)| c.is_empty() && s.quality >= 0x80)
        .map(|(s, _)| *s)
        .collect();
    markers.sort_by_key(|m| m.ts_ms);
    markers.dedup_by(|a, b| a.ts_ms == b.ts_ms && a.quality == b.quality);

    // 2. Reference input: served merged with markers by time. `origin[k]` is
    // Ok(served index) or Err(marker index).
    let mut input = Vec::with_capacity(served.len() + markers.len());
    let mut origin: Vec<Result<usize, usize>> = Vec::with_capacity(input.capacity());
    let (mut i, mut m) = (0, 0);
    while i < served.len() || m < markers.len() {
        if m < markers.len() && (i == served.len() || markers[m].ts_ms < served[i].ts_ms) {
            input.push(markers[m]);
            origin.push(Err(m));
            m += 1;
        } else {
            input.push(served[i]);
            origin.push(Ok(i));
            i += 1;
        }
    }
    let expected = reference_detailed(filter, &input);

    // 3. What the reference emits, per served index: Some(optional).
    let mut emits: HashMap<usize, bool> = HashMap::new();
    let mut marker_emitted = vec![false; markers.len()];
    for r in &expected {
        match origin[r.index] {
            Ok(si) => {
                emits.insert(si, r.optional);
            }
            Err(mi) => marker_emitted[mi] = true,
        }
    }

    // 4. Match.
    let mut v = PointVerdict {
        served: served.len() as u64,
        stored: stored.len() as u64,
        ..PointVerdict::default()
    };
    let mut first_match: HashMap<usize, Obs> = HashMap::new();
    let mut marker_seen = vec![false; markers.len()];
    for (s, c) in stored.iter().zip(&cands) {
        if c.is_empty() {
            if s.quality >= 0x80 {
                let mi = markers
                    .iter()
                    .position(|m| m.ts_ms == s.ts_ms && m.quality == s.quality);
                match mi {
                    Some(mi) if marker_seen[mi] => v.duplicates += 1,
                    Some(mi) => {
                        marker_seen[mi] = true;
                        v.bad_markers += 1;
                        if !marker_emitted[mi] {
                            v.unexpected += 1;
                        }
                    }
                    None => v.unexpected += 1,
                }
            } else {
                v.unexpected += 1;
            }
            continue;
        }
        let by_distance = |&&k: &&usize| served[k].ts_ms.abs_diff(s.ts_ms);
        let fresh = c
            .iter()
            .filter(|k| emits.contains_key(k) && !first_match.contains_key(k))
            .min_by_key(by_distance);
        if let Some(&k) = fresh {
            first_match.insert(k, *s);
        } else if c.iter().any(|k| first_match.contains_key(k)) {
            v.duplicates += 1;
        } else {
            v.unexpected += 1;
        }
    }
    for (si, optional) in &emits {
        let stored_it = first_match.contains_key(si);
        if !optional || stored_it {
            v.expected += 1;
        }
        if !optional && !stored_it {
            v.lost += 1;
        }
    }
    let mut matched: Vec<(usize, Obs)> = first_match.into_iter().collect();
    matched.sort_by_key(|(k, _)| *k);
    Matching {
        verdict: v,
        matched,
    }
}

fn max_error(filter: &Filter, served: &[Obs], matched: &[(usize, Obs)]) -> f64 {
    let mut err: f64 = 0.0;
    let (Some(&(first, _)), Some(&(last, _))) = (matched.first(), matched.last()) else {
        return err;
    };
    let mut k = 0;
    for (i, o) in served.iter().enumerate().take(last + 1).skip(first) {
        while k + 1 < matched.len() && matched[k + 1].0 <= i {
            k += 1;
        }
        if !o.value.is_finite() {
            continue;
        }
        let (ai, a) = matched[k];
        let recon = if !filter.is_linear() || ai == i || k + 1 == matched.len() {
            a.value
        } else {
            let (bi, b) = matched[k + 1];
            let (ta, tb) = (served[ai].ts_ms, served[bi].ts_ms);
            if tb == ta || !a.value.is_finite() || !b.value.is_finite() {
                a.value
            } else {
                a.value + (b.value - a.value) * (o.ts_ms - ta) as f64 / (tb - ta) as f64
            }
        };
        if recon.is_finite() {
            err = err.max((o.value - recon).abs());
        }
    }
    err
}

/// Largest |served − reconstructed| over the served observations, with the
/// signal rebuilt from `stored` (see the module doc), default matching.
pub fn reconstruct_max_error(filter: &Filter, served: &[Obs], stored: &[Obs]) -> f64 {
    let m = match_point(filter, served, stored, &MatchOptions::default());
    max_error(filter, served, &m.matched)
}

/// Ground-truth verdict for one point.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PointVerdict {
    /// Observations the device served.
    pub served: u64,
    /// Samples the reference says reach the hub (a trailing held-back sample
    /// counts only if it was stored).
    pub expected: u64,
    /// Samples the hub stored, duplicates and markers included.
    pub stored: u64,
    /// Expected samples the hub does not have.
    pub lost: u64,
    /// Stored samples matching a served observation (or marker) that an
    /// earlier stored sample already matched.
    pub duplicates: u64,
    /// Stored samples that match no served observation, or one the
    /// reference does not emit.
    pub unexpected: u64,
    /// Largest reconstruction error (see [`reconstruct_max_error`]).
    pub max_abs_error: f64,
    /// Bad-quality samples the agent made itself (failed reads), stored.
    pub bad_markers: u64,
}

/// Compares what the hub stored for one point with the reference output for
/// what the device served (default [`MatchOptions`]). `served` must be in
/// non-decreasing timestamp order (candidates are found by binary search).
pub fn compare_point(filter: &Filter, served: &[Obs], stored: &[Obs]) -> PointVerdict {
    compare_point_with(filter, served, stored, &MatchOptions::default())
}

/// [`compare_point`] with explicit matching options.
pub fn compare_point_with(
    filter: &Filter,
    served: &[Obs],
    stored: &[Obs],
    opts: &MatchOptions,
) -> PointVerdict {
    let m = match_point(filter, served, stored, opts);
    let mut v = m.verdict;
    v.max_abs_error = max_error(filter, served, &m.matched);
    v
}

// ------------------------------------------------------------------ sequences

/// Sequence-number analysis of one stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SeqVerdict {
    /// Sequence numbers seen (duplicates included).
    pub count: u64,
    /// Maximal runs of missing numbers in `1..=max`.
    pub gaps: u64,
    /// Missing numbers in `1..=max` (streams start at 1).
    pub missing: u64,
    /// Numbers seen more than once (each extra sighting counts).
    pub duplicates: u64,
    /// Numbers seen after a larger one (hub order not ascending).
    pub out_of_order: u64,
}

/// Gaps, missing numbers and duplicates of one stream's sequence numbers, in
/// the order the hub stored them. Streams start at 1 (protocol invariant),
/// so a first stored number of 5 means 1..=4 are missing.
pub fn seq_analysis(seqs: &[u64]) -> SeqVerdict {
    let mut v = SeqVerdict {
        count: seqs.len() as u64,
        ..SeqVerdict::default()
    };
    let mut max_seen = 0;
    for &s in seqs {
        if s < max_seen {
            v.out_of_order += 1;
        }
        max_seen = max_seen.max(s);
    }
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    let mut prev = 0u64;
    for (k, &s) in sorted.iter().enumerate() {
        if k > 0 && s == sorted[k - 1] {
            v.duplicates += 1;
            continue;
        }
        if s > prev + 1 {
            v.gaps += 1;
            v.missing += s - prev - 1;
        }
        prev = s;
    }
    v
}

// ------------------------------------------------------------------ the runner's check

/// The filter deployed on a point.
#[derive(Debug, Clone, PartialEq)]
pub enum PointFilter {
    /// No function: every sample goes to the raw stream.
    Passthrough,
    /// A committed guest with its config text.
    Guest {
        /// Which guest.
        guest: Guest,
        /// Its config (`deadband=0.5`).
        config: String,
    },
}

/// The runner's outcome for one point: [`PointVerdict`] where the
/// reference can verify it (`lost: None` where it cannot), with
/// [`local`]'s reconstruction error.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PointCheck {
    /// Values the device served (in the compared window).
    pub served: u64,
    /// Samples the reference filter emits for them (`None`: no reference).
    pub expected: Option<u64>,
    /// Good samples the hub stored.
    pub stored: u64,
    /// Expected samples missing from the store (`None`: not verifiable).
    pub lost: Option<u64>,
    /// Stored samples that repeat an earlier one (same timestamp and value).
    pub duplicates: u64,
    /// Stored samples whose value was never served.
    pub unexpected: u64,
    /// Largest |served − reconstructed-from-stored|.
    pub max_abs_error: f64,
}

/// Compares one point: `served` is the device's log, `stored` the samples
/// the hub stored (any quality), both in time order.
///
/// Expected, lost, duplicate and unexpected samples come from replaying
/// `served` through the independent reference [`Filter`] and matching its
/// output against `stored` ([`compare_point`]). The reconstruction error is
/// [`local`]'s, which matches stored samples to served values by order and
/// value and so tolerates the read latency between a Modbus server logging a
/// value and the agent stamping it. A filter config the reference cannot
/// parse falls back to [`local`] entirely (its `lost` is `None`, counted as
/// unverified).
pub fn check_point(filter: &PointFilter, served: &[Obs], stored: &[Obs]) -> PointCheck {
    // Bad-quality samples are the agent's outage markers (a failed read):
    // the filter saw them, so the reference gets them too; the counts and
    // the reconstruction use the good ones.
    let good: Vec<Obs> = stored.iter().filter(|o| o.quality == 0).copied().collect();
    let local = local::compare_point(filter, served, &good);
    let reference = match filter {
        // Every served log holds one entry per value a client received (a
        // Modbus read, an OPC UA notification, an MQTT message), so the
        // identity filter is the exact reference for unfiltered points.
        PointFilter::Passthrough => Filter::Passthrough,
        PointFilter::Guest { guest, config } => {
            match Filter::from_guest_text(guest.name(), config) {
                Ok(f) => f,
                Err(_) => return local,
            }
        }
    };
    let v = compare_point(&reference, served, stored);
    PointCheck {
        served: v.served,
        expected: Some(v.expected),
        stored: good.len() as u64,
        lost: Some(v.lost),
        duplicates: v.duplicates,
        unexpected: v.unexpected,
        max_abs_error: local.max_abs_error,
    }
}

/// The runner's own comparison: exact for pass-through points, and the
/// reconstruction error for filtered ones.
pub mod local {
    use super::{Obs, PointCheck, PointFilter, SeqVerdict};

    /// How far an agent's timestamp may lie before the device's for the same
    /// observation: both read `edge_node::Clock::system()` instances of one
    /// process, whose bases are taken at different moments.
    pub const CLOCK_SLACK_MS: u64 = 5;
    use crate::scenario::Guest;

    /// See [`super::check_point`].
    pub fn compare_point(filter: &PointFilter, served: &[Obs], stored: &[Obs]) -> PointCheck {
        let mut v = PointCheck {
            served: served.len() as u64,
            stored: stored.len() as u64,
            ..PointCheck::default()
        };
        let mut last: Option<(u64, u64)> = None;
        for s in stored {
            let key = (s.ts_ms, s.value.to_bits());
            if last == Some(key) {
                v.duplicates += 1;
            }
            last = Some(key);
        }
        let served_bits: std::collections::HashSet<u64> =
            served.iter().map(|o| o.value.to_bits()).collect();
        v.unexpected = stored
            .iter()
            .filter(|s| !served_bits.contains(&s.value.to_bits()))
            .count() as u64;
        match filter {
            PointFilter::Passthrough => {
                // Every served value must be stored, in order; a poll may
                // read the same value twice (stored repeats are not
                // duplicates unless their timestamps are equal too).
                let mut j = 0;
                let mut lost = 0u64;
                for o in served {
                    let start = j;
                    while j < stored.len() && stored[j].value.to_bits() != o.value.to_bits() {
                        j += 1;
                    }
                    if j == stored.len() {
                        lost += 1;
                        j = start;
                    } else {
                        j += 1;
                    }
                }
                v.expected = Some(v.served);
                v.lost = Some(lost);
                v.max_abs_error = max_error(served, stored, false);
            }
            PointFilter::Guest { guest, .. } => {
                v.max_abs_error = max_error(served, stored, *guest == Guest::SwingingDoor);
            }
        }
        v
    }

    /// Largest error of the reconstruction from `stored` at every served
    /// observation: step-hold, or linear interpolation when `linear`.
    ///
    /// Each stored sample is anchored to the served observation it came
    /// from: the latest one with the same value served at or before the
    /// sample's timestamp (plus [`CLOCK_SLACK_MS`] for the two clocks of
    /// device and agent), and after the previous anchor. A device-stamped
    /// sample (OPC UA source timestamp, MQTT `ts_ms`) carries the served
    /// timestamp itself; a Modbus driver stamps its sample when the reply
    /// arrives, after the simulator logged the read and before the next
    /// read, so "latest at or before" finds that read even when the same
    /// value was served many times (a step signal). Between two anchors the
    /// linear reconstruction is evaluated on the served timeline. After the
    /// last anchor a swinging door holds an open segment whose end is not
    /// known yet: those values are not evaluated.
    fn max_error(served: &[Obs], stored: &[Obs], linear: bool) -> f64 {
        // anchors[i] = index into `served` of stored[i]'s observation.
        let mut anchors: Vec<usize> = Vec::with_capacity(stored.len());
        for s in stored {
            let from = anchors.last().map_or(0, |&a| a + 1);
            let to = served.partition_point(|o| o.ts_ms <= s.ts_ms.saturating_add(CLOCK_SLACK_MS));
            if to <= from {
                continue; // the same observation again (a duplicate), or before it
            }
            if let Some(k) = served[from..to]
                .iter()
                .rposition(|o| o.value.to_bits() == s.value.to_bits())
            {
                anchors.push(from + k);
            }
            // else: an unexpected value, counted elsewhere
        }
        let mut worst = 0.0f64;
        for (k, &a) in anchors.iter().enumerate() {
            let end = anchors.get(k + 1).copied();
            let Some(b) = end.or(if linear { None } else { Some(served.len()) }) else {
                break;
            };
            let (ta, va) = (served[a].ts_ms as f64, served[a].value);
            for o in &served[a + 1..b] {
                let r = match end {
                    Some(b) if linear && served[b].ts_ms > served[a].ts_ms => {
                        let (tb, vb) = (served[b].ts_ms as f64, served[b].value);
                        va + (o.ts_ms as f64 - ta) / (tb - ta) * (vb - va)
                    }
                    _ => va,
                };
                worst = worst.max((o.value - r).abs());
            }
        }
        worst
    }

    /// The runner's older sequence check (ascending order assumed; see
    /// [`super::seq_analysis`] for the one the report uses).
    pub fn seq_analysis(seqs: &[u64]) -> SeqVerdict {
        let mut v = SeqVerdict {
            count: seqs.len() as u64,
            ..SeqVerdict::default()
        };
        let mut expect = 1u64;
        for &s in seqs {
            if s < expect {
                v.duplicates += 1;
                continue;
            }
            if s > expect {
                v.gaps += 1;
                v.missing += s - expect;
            }
            expect = s + 1;
        }
        v
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn o(ts_ms: u64, value: f64) -> Obs {
            Obs {
                ts_ms,
                value,
                quality: 0,
            }
        }

        #[test]
        fn passthrough_counts_lost_and_duplicates() {
            let served = [o(0, 1.0), o(10, 2.0), o(20, 3.0), o(30, 4.0)];
            let stored = [o(1, 1.0), o(11, 2.0), o(11, 2.0), o(31, 4.0)];
            let v = compare_point(&PointFilter::Passthrough, &served, &stored);
            assert_eq!(v.lost, Some(1));
            assert_eq!(v.duplicates, 1);
            assert_eq!(v.unexpected, 0);
            // 3.0 at t=20 reconstructs as 2.0 (step-hold).
            assert!((v.max_abs_error - 1.0).abs() < 1e-12);
        }

        #[test]
        fn filtered_error_is_step_hold_or_linear() {
            let served = [o(0, 0.0), o(10, 0.4), o(20, 0.8), o(30, 1.2)];
            let stored = [o(1, 0.0), o(31, 1.2)];
            let db = PointFilter::Guest {
                guest: Guest::Deadband,
                config: "deadband=1".into(),
            };
            let v = compare_point(&db, &served, &stored);
            assert!((v.max_abs_error - 0.8).abs() < 1e-12);
            assert_eq!(v.lost, None);
            let sd = PointFilter::Guest {
                guest: Guest::SwingingDoor,
                config: "deviation=1".into(),
            };
            let v = compare_point(&sd, &served, &stored);
            assert!(v.max_abs_error < 0.05, "{}", v.max_abs_error);
            let stray = [o(1, 0.0), o(15, 9.0)];
            assert_eq!(compare_point(&db, &served, &stray).unexpected, 1);
        }

        #[test]
        fn repeated_values_anchor_at_the_read_they_came_from() {
            // A step signal read every 10 ms: a swinging door stores the
            // last 1.0 before the step (t=20), not the first one.
            let served = [o(0, 1.0), o(10, 1.0), o(20, 1.0), o(30, 2.0), o(40, 2.0)];
            let stored = [o(2, 1.0), o(22, 1.0), o(33, 2.0), o(41, 2.0)];
            let sd = PointFilter::Guest {
                guest: Guest::SwingingDoor,
                config: "deviation=0.1".into(),
            };
            let v = compare_point(&sd, &served, &stored);
            assert!(v.max_abs_error < 1e-12, "{}", v.max_abs_error);
            // Anchored at the first 1.0 instead, t=10 and t=20 would be
            // interpolated towards 2.0.
            let wrong = [o(2, 1.0), o(33, 2.0), o(41, 2.0)];
            let v = compare_point(&sd, &served, &wrong);
            assert!(v.max_abs_error > 0.6, "{}", v.max_abs_error);
        }

        #[test]
        fn seq_gaps_and_duplicates() {
            let v = seq_analysis(&[1, 2, 2, 5, 6, 9]);
            assert_eq!(v.count, 6);
            assert_eq!(v.duplicates, 1);
            assert_eq!(v.gaps, 2);
            assert_eq!(v.missing, 4);
        }
    }
}
