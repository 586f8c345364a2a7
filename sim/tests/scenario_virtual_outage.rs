//! A virtual-time partition end to end (the path `outage-48h.toml` takes,
//! scaled down): real hub (child process), two real agents, Modbus devices,
//! deadband and swinging door deployed; node 0 and its devices run on their
//! own paused runtime for a 2 h virtual partition, node 1 keeps its link.
//! Checked against the devices' ground truth.

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

const SCENARIO: &str = r#"
name = "virtual-outage-small"
seed = 3
duration = "10s"
sampling_interval = "5s"
drain_timeout = "60s"

[hub]
mode = "process"
ack_interval = "50ms"

[edge]
batch_max_samples = 500
batch_max_age = "500ms"
report_interval = "500ms"
flush_interval = "500ms"
reconnect_max = "2s"
drain_rate = 20000

[[nodes]]
count = 2
points_per_device = 3
devices = { modbus = 2 }

[[signals]]
base = { shape = "sine", amplitude = 10.0, period_s = 600.0, offset = 50.0 }
noise = 0.05
# Wide noise on the swinging-door slot: the Modbus served log is run-length
# compacted, so two reads returning the same F32 value would hide one input
# from the reference replay (see sim/README.md, outage-48h).
[[signals]]
base = { shape = "random-walk", start = 5.0, step = 0.2 }
noise = 0.2
[[signals]]
base = { shape = "steps", height = 1.0, every_s = 60.0 }
noise = 0.05

[[functions]]
name = "db"
guest = "deadband"
config = "deadband=0.5"
slots = [0]
max_error = 0.5

[[functions]]
name = "sd"
guest = "swinging-door"
config = "deviation=0.3"
slots = [1]
max_error = 0.3

[[faults]]
kind = "partition"
at = "3s"
duration = "2h"
node = 0
clock = "virtual"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_two_hour_partition_loses_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scenario = Scenario::from_toml(SCENARIO, "virtual-outage-small").unwrap();
    let r = run(RunOptions {
        scenario,
        work_dir: None,
        progress: false,
        hub_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_fleet-sim"))),
    })
    .await
    .unwrap();
    let json = serde_json::to_string_pretty(&r).unwrap();

    assert!(r.outage_virtual, "{json}");
    assert!((r.outage_seconds - 7200.0).abs() < 1e-6, "{json}");
    assert!(r.drained, "the edge nodes did not drain: {json}");
    // Node 0 alone served 2 devices x 3 points every 5 s for 2 h.
    assert!(r.samples_generated > 6 * 1440, "{json}");
    assert_eq!(r.samples_lost, 0, "{json}");
    assert_eq!(r.duplicates, 0, "{json}");
    assert_eq!(r.unexpected, 0, "{json}");
    assert_eq!(r.seq_missing, 0, "{json}");
    assert_eq!(r.points, 12, "{json}");
    assert_eq!(r.points_unverified, 0, "{json}");
    for f in &r.filter_errors {
        assert!(
            f.within,
            "{} error {} > {}: {json}",
            f.function, f.max_abs_error, f.configured
        );
    }
    assert!(r.reduction_ratio > 0.2 && r.reduction_ratio < 1.0, "{json}");
    assert!(
        r.faults
            .iter()
            .any(|l| l.contains("virtual outage of node 0 ended")),
        "{json}"
    );
}
