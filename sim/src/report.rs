//! The schema of a run's results: the JSON [`Report`] of `fleet-sim run`,
//! and the [`Totals`] it is summed from.
//!
//! The comparison behind the figures lives in [`crate::truth`]: the runner
//! checks each point with [`truth::check_point`](crate::truth::check_point)
//! (the independent reference filters, checked bit-identical against the
//! WASM guests in `tests/truth_vs_guest.rs`, count expected, lost,
//! duplicate and unexpected samples; [`truth::local`](crate::truth::local)
//! measures the reconstruction error) and each stream's sequence numbers
//! with [`truth::seq_analysis`](crate::truth::seq_analysis); [`Totals`] sums
//! those verdicts into the figures of the [`Report`].

use serde::{Deserialize, Serialize};

use crate::truth::{PointCheck, SeqVerdict};

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
    pub fn add_point(&mut self, function: &str, v: &PointCheck) {
        self.add_point_of("", function, v);
    }

    /// As [`add_point`](Self::add_point), also filed under the device
    /// `protocol` in [`by_source`](Self::by_source).
    pub fn add_point_of(&mut self, protocol: &str, function: &str, v: &PointCheck) {
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
    /// window, not compared (see the `run` module, phase 5).
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
