//! The run report and the ground-truth comparison behind it.
//!
//! [`compare_point`] takes, for one point, the values the simulated device
//! served (its log) and the samples the hub stored, plus the filter deployed
//! on the point, and returns a [`PointVerdict`]; [`seq_analysis`] checks one
//! stored stream's sequence numbers. [`Totals`] sums verdicts into the
//! figures of the [`Report`].
//!
//! # Ground truth
//! [`compare_point`] replays the served values through the independent
//! reference filters of [`crate::truth`] (checked bit-identical against the
//! WASM guests in `tests/truth_vs_guest.rs`) to count expected, lost,
//! duplicate and unexpected samples; [`local`] measures the reconstruction
//! error (step-hold for deadband, linear for swinging door).

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

/// Compares one point: `served` is the device's log, `stored` the samples
/// the hub stored (any quality), both in time order.
///
/// Expected, lost, duplicate and unexpected samples come from replaying
/// `served` through the independent reference filter in [`crate::truth`]
/// and matching its output against `stored`. The reconstruction error is
/// [`local`]'s, which matches stored samples to served values by order and
/// value and so tolerates the read latency between a Modbus server logging a
/// value and the agent stamping it. A filter config the reference cannot
/// parse falls back to [`local`] entirely (its `lost` is `None`, counted as
/// unverified).
pub fn compare_point(filter: &PointFilter, served: &[Obs], stored: &[Obs]) -> PointVerdict {
    // Bad-quality samples are the agent's outage markers (a failed read):
    // the filter saw them, so the reference gets them too; the counts and
    // the reconstruction use the good ones.
    let good: Vec<Obs> = stored.iter().filter(|o| o.quality == 0).copied().collect();
    let local = local::compare_point(filter, served, &good);
    let reference = match filter {
        // Every served log holds one entry per value a client received (a
        // Modbus read, an OPC UA notification, an MQTT message), so the
        // identity filter is the exact reference for unfiltered points.
        PointFilter::Passthrough => crate::truth::Filter::Passthrough,
        PointFilter::Guest { guest, config } => {
            match crate::truth::Filter::from_guest_text(guest.name(), config) {
                Ok(f) => f,
                Err(_) => return local,
            }
        }
    };
    let conv = |o: &Obs| crate::truth::Obs {
        ts_ms: o.ts_ms,
        value: o.value,
        quality: o.quality,
    };
    let served_t: Vec<_> = served.iter().map(conv).collect();
    let stored_t: Vec<_> = stored.iter().map(conv).collect();
    let v = crate::truth::compare_point(&reference, &served_t, &stored_t);
    PointVerdict {
        served: v.served,
        expected: Some(v.expected),
        stored: good.len() as u64,
        lost: Some(v.lost),
        duplicates: v.duplicates,
        unexpected: v.unexpected,
        max_abs_error: local.max_abs_error,
    }
}

/// Sequence analysis of one stream's stored sequence numbers (in order),
/// by [`crate::truth::seq_analysis`].
pub fn seq_analysis(seqs: &[u64]) -> SeqVerdict {
    let v = crate::truth::seq_analysis(seqs);
    SeqVerdict {
        count: v.count,
        gaps: v.gaps,
        missing: v.missing,
        duplicates: v.duplicates,
    }
}

/// The runner's own comparison: exact for pass-through points, and the
/// reconstruction error for filtered ones.
pub mod local {
    use super::{Obs, PointFilter, PointVerdict, SeqVerdict};

    /// How far an agent's timestamp may lie before the device's for the same
    /// observation: both read `edge_node::Clock::system()` instances of one
    /// process, whose bases are taken at different moments.
    pub const CLOCK_SLACK_MS: u64 = 5;
    use crate::scenario::Guest;

    /// See [`super::compare_point`].
    pub fn compare_point(filter: &PointFilter, served: &[Obs], stored: &[Obs]) -> PointVerdict {
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
    /// The same figures per (device protocol, function).
    pub by_source: std::collections::BTreeMap<(String, String), SourceTotals>,
    /// Served values inside function-restart windows (not compared).
    pub in_restart_windows: u64,
}

/// Point-level figures of one (device protocol, function) pair.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceTotals {
    /// Device protocol (`modbus`, `opcua`, `mqtt`).
    pub protocol: String,
    /// Function name (`raw` for pass-through points).
    pub function: String,
    /// Points.
    pub points: u64,
    /// Values served.
    pub served: u64,
    /// Good samples stored.
    pub stored: u64,
    /// Samples the reference emits that the hub does not have.
    pub lost: u64,
    /// Stored samples the reference does not emit.
    pub unexpected: u64,
    /// Stored more than once.
    pub duplicates: u64,
    /// Largest reconstruction error.
    pub max_abs_error: f64,
}

impl Totals {
    /// Adds one point's verdict, filed under `function` (empty: pass-through).
    pub fn add_point(&mut self, function: &str, v: &PointVerdict) {
        self.add_point_of("", function, v);
    }

    /// As [`add_point`](Self::add_point), also filed under the device
    /// `protocol` in [`by_source`](Self::by_source).
    pub fn add_point_of(&mut self, protocol: &str, function: &str, v: &PointVerdict) {
        if !protocol.is_empty() {
            let b = self
                .by_source
                .entry((protocol.to_owned(), function.to_owned()))
                .or_insert_with(|| SourceTotals {
                    protocol: protocol.to_owned(),
                    function: if function.is_empty() {
                        "raw".to_owned()
                    } else {
                        function.to_owned()
                    },
                    ..SourceTotals::default()
                });
            b.points += 1;
            b.served += v.served;
            b.stored += v.stored;
            b.lost += v.lost.unwrap_or(0);
            b.unexpected += v.unexpected;
            b.duplicates += v.duplicates;
            if v.max_abs_error.is_nan() || v.max_abs_error > b.max_abs_error {
                b.max_abs_error = v.max_abs_error;
            }
        }
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
    /// Point-level figures per (device protocol, function), so a mismatch
    /// can be traced to a protocol path.
    #[serde(default)]
    pub by_source: Vec<SourceTotals>,
    /// Served values between a function restart (agent restart, re-deploy)
    /// and the first sample the new instance stored: the documented restart
    /// window, not compared (see `run::compare_segmented`).
    #[serde(default)]
    pub samples_in_restart_windows: u64,
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
    /// Time some node was cut from the broker, or the broker was down
    /// (virtual time for a virtual-time partition, see `outage_virtual`).
    pub outage_seconds: f64,
    /// Whether a partition ran in virtual time (`clock = "virtual"`): its
    /// share of `outage_seconds` is virtual time on the node's paused clock.
    #[serde(default)]
    pub outage_virtual: bool,
    /// Wall time the virtual-time outages took.
    #[serde(default)]
    pub virtual_outage_wall_seconds: f64,
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
