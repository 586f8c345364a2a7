//! The run report and the ground-truth comparison behind it.
//!
//! [`compare_point`] takes, for one point, the values the simulated device
//! served (its log) and the samples the hub stored, plus the filter deployed
//! on the point, and returns a [`PointVerdict`]; [`seq_analysis`] checks one
//! stored stream's sequence numbers. [`Totals`] sums verdicts into the
//! figures of the [`Report`].
//!
//! # Where the truth module plugs in
//! The independent reference filters live in `crate::truth` (built on the
//! `sim-truth` branch). Until that is merged, [`local`] below is the only
//! comparison: it is exact for pass-through points (served values against
//! stored values, in order) and, for filtered points, checks that every
//! stored value was served and measures the reconstruction error (step-hold
//! for deadband, linear for swinging door), but cannot count *lost* samples
//! without a reference filter — such points are counted in
//! [`Report::points_unverified`]. Wiring truth means replacing the body of
//! [`compare_point`] and [`seq_analysis`] (the only two calls) with
//! `truth::compare_point(&truth::Filter::from_guest(..)?, ..)` and
//! `truth::seq_analysis(..)`.

use serde::{Deserialize, Serialize};

use crate::scenario::Guest;

/// One observation: a served value or a stored sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Obs {
    /// Timestamp, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Engineering value.
    pub value: f64,
    /// Quality byte (0 = good).
    pub quality: u8,
}

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

/// Outcome of comparing one point.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PointVerdict {
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

/// Outcome of the sequence analysis of one stored stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqVerdict {
    /// Samples.
    pub count: u64,
    /// Gaps (runs of missing sequence numbers).
    pub gaps: u64,
    /// Missing sequence numbers in total.
    pub missing: u64,
    /// Repeated sequence numbers.
    pub duplicates: u64,
}

/// Compares one point. `tolerance_ms`: how much later than the served
/// timestamp a stored sample of the same read may be stamped (Modbus
/// drivers stamp on reply, the simulator logs on request); `jitter_ms`: how
/// far a served timestamp may be off the driver's stamp after alignment
/// (0 for OPC UA, whose samples carry the server's source timestamp).
///
/// TRUTH PLUG-IN POINT (1 of 2): replace with `crate::truth::compare_point`.
pub fn compare_point(
    filter: &PointFilter,
    served: &[Obs],
    stored: &[Obs],
    tolerance_ms: u64,
    jitter_ms: u64,
) -> PointVerdict {
    local::compare_point(filter, served, stored, tolerance_ms, jitter_ms)
}

/// Sequence analysis of one stream's stored sequence numbers (in order).
///
/// TRUTH PLUG-IN POINT (2 of 2): replace with `crate::truth::seq_analysis`.
pub fn seq_analysis(seqs: &[u64]) -> SeqVerdict {
    local::seq_analysis(seqs)
}

/// The minimal comparison used until `crate::truth` is merged.
pub mod local {
    use super::{Obs, PointFilter, PointVerdict, SeqVerdict};
    use crate::scenario::Guest;

    /// See [`super::compare_point`].
    pub fn compare_point(
        filter: &PointFilter,
        served: &[Obs],
        stored: &[Obs],
        tolerance_ms: u64,
        jitter_ms: u64,
    ) -> PointVerdict {
        let mut v = PointVerdict {
            served: served.len() as u64,
            stored: stored.len() as u64,
            ..PointVerdict::default()
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
                v.max_abs_error = max_error(served, stored, tolerance_ms, jitter_ms, false);
            }
            PointFilter::Guest { guest, .. } => {
                v.max_abs_error = max_error(
                    served,
                    stored,
                    tolerance_ms,
                    jitter_ms,
                    *guest == Guest::SwingingDoor,
                );
            }
        }
        v
    }

    /// Linear interpolation of `stored` at `t` (held at the ends).
    fn linear_at(stored: &[Obs], t: u64) -> f64 {
        let j = stored.partition_point(|s| s.ts_ms <= t);
        match (j.checked_sub(1).map(|i| stored[i]), stored.get(j)) {
            (Some(a), Some(b)) if b.ts_ms > a.ts_ms => {
                let f = (t as f64 - a.ts_ms as f64) / (b.ts_ms as f64 - a.ts_ms as f64);
                a.value + f * (b.value - a.value)
            }
            (Some(a), _) => a.value,
            (None, Some(b)) => b.value,
            (None, None) => f64::NAN,
        }
    }

    /// Largest error of the reconstruction from `stored` at every served
    /// observation: step-hold, or linear interpolation when `linear`.
    fn max_error(
        served: &[Obs],
        stored: &[Obs],
        tolerance_ms: u64,
        jitter_ms: u64,
        linear: bool,
    ) -> f64 {
        let mut worst = 0.0f64;
        let mut j = 0usize; // first stored with ts > t + tolerance
        for o in served {
            let t = o.ts_ms;
            // Exact hit within the tolerance window: no error.
            let lo = stored.partition_point(|s| s.ts_ms < t);
            let hit = stored[lo..]
                .iter()
                .take_while(|s| s.ts_ms <= t + tolerance_ms)
                .any(|s| s.value.to_bits() == o.value.to_bits());
            if hit {
                continue;
            }
            while j < stored.len() && stored[j].ts_ms <= t + tolerance_ms {
                j += 1;
            }
            let Some(prev) = j.checked_sub(1).map(|i| stored[i]) else {
                continue; // before the first stored sample: nothing to reconstruct
            };
            if linear && j == stored.len() {
                // After the last stored sample a swinging door holds an
                // open segment whose end is not known yet.
                break;
            }
            let e = if linear {
                // The served timestamp is known to `jitter_ms`: take the
                // smallest error over that window (the error is piecewise
                // linear in t, so endpoints, vertices and sign changes
                // bound it).
                let lo_t = t.saturating_sub(jitter_ms);
                let hi_t = t + jitter_ms;
                let mut ts: Vec<u64> = vec![lo_t, t, hi_t];
                ts.extend(
                    stored
                        .iter()
                        .map(|s| s.ts_ms)
                        .skip_while(|&x| x < lo_t)
                        .take_while(|&x| x <= hi_t),
                );
                let errs: Vec<f64> = ts.iter().map(|&x| o.value - linear_at(stored, x)).collect();
                let crosses = errs.iter().any(|e| *e >= 0.0) && errs.iter().any(|e| *e <= 0.0);
                if crosses {
                    0.0
                } else {
                    errs.iter().map(|e| e.abs()).fold(f64::INFINITY, f64::min)
                }
            } else {
                (o.value - prev.value).abs()
            };
            worst = worst.max(e);
        }
        worst
    }

    /// See [`super::seq_analysis`].
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
            let v = compare_point(&PointFilter::Passthrough, &served, &stored, 5, 0);
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
            let v = compare_point(&db, &served, &stored, 5, 0);
            assert!((v.max_abs_error - 0.8).abs() < 1e-12);
            assert_eq!(v.lost, None);
            let sd = PointFilter::Guest {
                guest: Guest::SwingingDoor,
                config: "deviation=1".into(),
            };
            let v = compare_point(&sd, &served, &stored, 5, 0);
            assert!(v.max_abs_error < 0.05, "{}", v.max_abs_error);
            let stray = [o(1, 0.0), o(15, 9.0)];
            assert_eq!(compare_point(&db, &served, &stray, 5, 0).unexpected, 1);
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

/// Sums of point and stream verdicts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Points compared.
    pub points: u64,
    /// Points whose lost count could not be verified (no reference filter).
    pub points_unverified: u64,
    /// Served values.
    pub served: u64,
    /// Stored good samples of compared points.
    pub stored: u64,
    /// Lost samples over verified points, plus sequence gaps.
    pub lost: u64,
    /// Duplicates (point level plus repeated sequence numbers).
    pub duplicates: u64,
    /// Stored values never served.
    pub unexpected: u64,
    /// Sequence gaps over all streams.
    pub seq_missing: u64,
    /// Largest error per function name (`""` for pass-through points).
    pub max_abs_error: std::collections::BTreeMap<String, f64>,
}

impl Totals {
    /// Adds one point's verdict, filed under `function` (empty: pass-through).
    pub fn add_point(&mut self, function: &str, v: &PointVerdict) {
        self.points += 1;
        self.served += v.served;
        self.stored += v.stored;
        match v.lost {
            Some(l) => self.lost += l,
            None => self.points_unverified += 1,
        }
        self.duplicates += v.duplicates;
        self.unexpected += v.unexpected;
        let e = self.max_abs_error.entry(function.to_owned()).or_insert(0.0);
        if v.max_abs_error.is_nan() || v.max_abs_error > *e {
            *e = v.max_abs_error;
        }
    }

    /// Adds one stream's sequence verdict.
    pub fn add_stream(&mut self, v: &SeqVerdict) {
        self.seq_missing += v.missing;
        self.duplicates += v.duplicates;
    }
}

/// Maximum error of one function, against what it promises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterError {
    /// Function name (`raw` for pass-through points).
    pub function: String,
    /// Configured bound (deadband or deviation; 0 for raw).
    pub configured: f64,
    /// Measured maximum.
    pub max_abs_error: f64,
    /// `max_abs_error <= configured` (plus floating-point slack).
    pub within: bool,
}

/// The JSON report of `fleet-sim run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Simulated devices.
    pub devices: u64,
    /// Edge nodes.
    pub edge_nodes: u64,
    /// Edge driver connections / sessions to the simulated devices.
    pub device_connections: u64,
    /// Points compared.
    pub points: u64,
    /// Values the simulated devices served (their logs), in the compared window.
    pub samples_generated: u64,
    /// Good samples the hub stored for those points (its query API).
    pub samples_upstream: u64,
    /// `1 − upstream / generated`.
    pub reduction_ratio: f64,
    /// Largest reconstruction error over all filtered points.
    pub max_abs_error: f64,
    /// Per function: configured bound and measured error.
    pub filter_errors: Vec<FilterError>,
    /// Samples expected by the reference but not stored, plus sequence gaps.
    pub samples_lost: u64,
    /// Duplicates (same sample twice, or a repeated sequence number).
    pub duplicates: u64,
    /// Stored values that no device ever served.
    pub unexpected: u64,
    /// Missing sequence numbers over all stored streams.
    pub seq_missing: u64,
    /// Points whose lost count has no reference filter yet (see the
    /// module docs); 0 once `truth` is wired.
    pub points_unverified: u64,
    /// Desired-state convergence (PUT at the hub → applied revision seen in
    /// reported state via the hub), median.
    pub desired_convergence_ms_p50: f64,
    /// Same, 99th percentile.
    pub desired_convergence_ms_p99: f64,
    /// Convergence samples (node × revision).
    pub desired_convergence_samples: u64,
    /// Time some node was cut from the broker, or the broker was down.
    pub outage_seconds: f64,
    /// Longest time, after an outage ended, until every node's oldest
    /// unacked sample was fresh again (backlog drained to live); the final
    /// drain when there was no outage.
    pub drain_seconds: f64,
    /// From the devices stopping until every node had uploaded everything
    /// up to then.
    pub final_drain_seconds: f64,
    /// Whether the final drain finished within `drain_timeout`.
    pub drained: bool,
    /// Peak RSS attributed to the edge side (see `rss_note`).
    pub edge_rss_bytes_max: u64,
    /// Peak RSS of the hub (see `rss_note`).
    pub hub_rss_bytes_max: u64,
    /// How the RSS figures were derived.
    pub rss_note: String,
    /// Wall time of the whole run.
    pub wall_seconds: f64,
    /// Device time (live data) of the run.
    pub device_seconds: f64,
    /// Faults executed, with wall time offsets.
    pub faults: Vec<String>,
}

/// Percentile (nearest rank) of `v` (sorted in place); 0 when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&mut v, 50.0) - 50.0).abs() < 1e-9);
        assert!((percentile(&mut v, 99.0) - 99.0).abs() < 1e-9);
        assert!(percentile(&mut [], 50.0).abs() < 1e-9);
    }
}
