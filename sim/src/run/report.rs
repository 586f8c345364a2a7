//! The end of a run: [`Totals`] and what the [`Monitor`] saw turned into
//! the [`Report`] (filter errors against their bounds, convergence
//! percentiles, and how the RSS figures were measured).

use std::collections::HashMap;

use crate::report::{self, FilterError, Report, Totals};
use crate::scenario::{EdgeMode, HubMode, Scenario};

use super::monitor::Monitor;

/// Run-level figures the report carries besides the comparison's totals.
pub(super) struct Measured {
    pub(super) device_connections: usize,
    /// Function name → the error bound in force at the end.
    pub(super) max_error_of: HashMap<String, f64>,
    pub(super) outage_seconds: f64,
    pub(super) outage_virtual: bool,
    pub(super) virtual_outage_wall_seconds: f64,
    pub(super) drain_seconds: f64,
    pub(super) final_drain_seconds: f64,
    pub(super) drained: bool,
    pub(super) wall_seconds: f64,
    pub(super) device_seconds: f64,
    pub(super) faults: Vec<String>,
}

/// Per function: the largest reconstruction error against its bound; and
/// the largest over all filtered points.
fn filter_errors(totals: &Totals, max_error_of: &HashMap<String, f64>) -> (Vec<FilterError>, f64) {
    let mut filter_errors = Vec::new();
    let mut max_err = 0.0f64;
    for (name, e) in &totals.max_abs_error {
        let (function, configured) = if name.is_empty() {
            ("raw".to_owned(), 0.0)
        } else {
            (name.clone(), max_error_of.get(name).copied().unwrap_or(0.0))
        };
        if !name.is_empty() {
            max_err = max_err.max(*e);
        }
        filter_errors.push(FilterError {
            function,
            configured,
            max_abs_error: *e,
            within: *e <= configured * (1.0 + 1e-9) + 1e-9,
        });
    }
    (filter_errors, max_err)
}

/// How the RSS figures of scenario `s` were measured.
fn rss_note(s: &Scenario) -> String {
    let rss_note = match s.hub.mode {
        HubMode::Process => "hub_rss_bytes_max: VmRSS of the hub child process (fleet-sim hub), sampled every 0.5 s; edge_rss_bytes_max: VmRSS of the fleet-sim process, which holds every edge agent AND the simulated device servers, so it over-states the agents".to_owned(),
        HubMode::InProcess => "hub and edge share this process: both figures are the VmRSS of the fleet-sim process (agents, hub and device servers together), sampled every 0.5 s".to_owned(),
    };
    if s.edge.mode == EdgeMode::Process {
        format!(
            "{rss_note}; the edge agents ran as separate processes (edge.mode = \"process\") and are not in edge_rss_bytes_max"
        )
    } else {
        rss_note
    }
}

/// The report of a run of `s`.
pub(super) fn build(s: &Scenario, totals: &Totals, mon: &Monitor, m: Measured) -> Report {
    let (filter_errors, max_err) = filter_errors(totals, &m.max_error_of);
    let mut conv = mon.convergence_ms.clone();
    let p50 = report::percentile(&mut conv, 50.0);
    let p99 = report::percentile(&mut conv, 99.0);
    let hub_rss = match s.hub.mode {
        HubMode::Process => mon.hub_rss_max,
        HubMode::InProcess => mon.edge_rss_max,
    };
    Report {
        scenario: s.name.clone(),
        devices: s.device_count() as u64,
        edge_nodes: s.node_count() as u64,
        device_connections: m.device_connections as u64,
        points: totals.points,
        samples_generated: totals.served,
        samples_upstream: totals.stored,
        reduction_ratio: if totals.served == 0 {
            0.0
        } else {
            1.0 - totals.stored as f64 / totals.served as f64
        },
        max_abs_error: max_err,
        filter_errors,
        by_source: totals.by_source.values().cloned().collect(),
        samples_in_restart_windows: totals.in_restart_windows,
        samples_lost: totals.lost + totals.seq_missing,
        duplicates: totals.duplicates,
        unexpected: totals.unexpected,
        seq_missing: totals.seq_missing,
        points_unverified: totals.points_unverified,
        desired_convergence_ms_p50: p50,
        desired_convergence_ms_p99: p99,
        desired_convergence_samples: mon.convergence_ms.len() as u64,
        outage_seconds: m.outage_seconds,
        outage_virtual: m.outage_virtual,
        virtual_outage_wall_seconds: m.virtual_outage_wall_seconds,
        drain_seconds: m.drain_seconds,
        final_drain_seconds: m.final_drain_seconds,
        drained: m.drained,
        edge_rss_bytes_max: mon.edge_rss_max,
        hub_rss_bytes_max: hub_rss,
        rss_note: rss_note(s),
        wall_seconds: m.wall_seconds,
        device_seconds: m.device_seconds,
        faults: m.faults,
    }
}
