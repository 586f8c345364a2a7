//! `sim/scenarios/smoke.toml` end to end: real hub (child process), two real
//! edge agents, Modbus and OPC UA device servers, deadband and swinging door
//! deployed, a partition of one node — and the report checked against the
//! devices' ground truth.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code"
)]

use std::path::PathBuf;

use sim::run::{RunOptions, run};
use sim::scenario::Scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_scenario_loses_nothing_and_stays_within_bounds() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
    let scenario = Scenario::load(&path).unwrap();
    let filtered_slots = (0..scenario.nodes[0].points_per_device)
        .filter(|s| {
            scenario
                .function_of(*s, sim::scenario::Protocol::Modbus)
                .is_some()
        })
        .count();
    assert!(filtered_slots > 0, "smoke deploys at least one filter");
    let r = run(RunOptions {
        scenario: scenario.clone(),
        work_dir: None,
        progress: false,
        hub_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_fleet-sim"))),
    })
    .await
    .unwrap();
    let json = serde_json::to_string_pretty(&r).unwrap();

    assert_eq!(r.devices, 12, "{json}");
    assert_eq!(r.edge_nodes, 2, "{json}");
    assert!(r.drained, "the edge nodes did not drain: {json}");
    assert!(r.samples_generated > 500, "{json}");
    assert_eq!(r.samples_lost, 0, "{json}");
    assert_eq!(r.duplicates, 0, "{json}");
    assert_eq!(r.unexpected, 0, "{json}");
    assert_eq!(r.seq_missing, 0, "{json}");
    // Every point is verified for loss: pass-through points in order,
    // filtered points against the reference filters in `sim::truth`.
    assert_eq!(r.points_unverified, 0, "{json}");
    for f in &r.filter_errors {
        assert!(
            f.within,
            "{} error {} > {}: {json}",
            f.function, f.max_abs_error, f.configured
        );
    }
    assert!(r.reduction_ratio > 0.2 && r.reduction_ratio < 1.0, "{json}");
    assert!(r.outage_seconds > 2.0, "the partition happened: {json}");
    assert_eq!(r.desired_convergence_samples, 2, "{json}");
    assert!(
        r.hub_rss_bytes_max > 0 && r.edge_rss_bytes_max > 0,
        "{json}"
    );
}
