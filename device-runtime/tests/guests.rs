//! Behaviour of the reference guests and the capability imports, through
//! the real host and the committed components.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "test code: failing loudly is the point; signal sizes are small"
)]

mod common;

use common::*;
use device_runtime::memory::MemoryCapabilities;
use device_runtime::{Batch, FunctionSpec, LoadError, PointRef, PointValue};

#[test]
fn deadband_passes_quality_changes_and_heartbeats() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let bytes = guest("deadband");
    rt.load(
        spec("db", &bytes, "deadband=1;max_interval_ms=10000"),
        &bytes,
        0,
    )
    .unwrap();
    let mut b = Batch::new();
    b.push(0, 0, 5.0, 0); // first: passes
    b.push(0, 1000, 5.5, 0); // within deadband: dropped
    b.push(0, 2000, 5.5, 2); // quality change: passes
    b.push(0, 3000, 5.6, 2); // dropped
    b.push(0, 4000, 6.6, 2); // > 1 away from 5.5: passes
    b.push(1, 4000, 100.0, 0); // other point, first: passes
    b.push(0, 14000, 6.7, 2); // 10 s since last sent: heartbeat passes
    b.push(0, 15000, 6.8, 2); // dropped, held for tick
    let out = out0(&rt.process("db", &b, 0).unwrap());
    assert_eq!(out.timestamps, vec![0, 2000, 4000, 4000, 14000]);
    assert_eq!(out.points, vec![0, 0, 0, 1, 0]);
    // tick: point 0's held sample is due 10 s after 14000.
    let ticked = rt.tick(23_999);
    assert!(out0(ticked[0].1.as_ref().unwrap()).is_empty());
    let ticked = rt.tick(24_000);
    let hb = out0(ticked[0].1.as_ref().unwrap());
    assert_eq!((hb.timestamps, hb.values), (vec![15000], vec![6.8]));
}

#[test]
fn deadband_rejects_bad_config() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let bytes = guest("deadband");
    for bad in ["", "deadband=x", "mode=percent;percent=5", "colour=red"] {
        let err = rt.load(spec("db", &bytes, bad), &bytes, 0).unwrap_err();
        assert!(matches!(err, LoadError::Init(_)), "{bad}: {err:?}");
    }
}

#[test]
fn window_emits_min_max_mean_count_per_tumbling_window() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let bytes = guest("window");
    let mut s = spec("win", &bytes, "window_ms=1000");
    s.outputs = vec!["min".into(), "max".into(), "mean".into(), "count".into()];
    rt.load(s, &bytes, 0).unwrap();
    let mut b = Batch::new();
    for (ts, v) in [
        (0, 1.0),
        (250, 3.0),
        (500, 2.0),
        (999, 6.0),
        (1000, 10.0),
        (1500, 20.0),
    ] {
        b.push(0, ts, v, 0);
    }
    b.push(3, 700, -1.0, 1);
    let out = rt.process("win", &b, 0).unwrap();
    // Point 0's first window closed when the 1000 ms sample arrived.
    assert_eq!(out.stream("min").unwrap().values, vec![1.0]);
    assert_eq!(out.stream("max").unwrap().values, vec![6.0]);
    assert_eq!(out.stream("mean").unwrap().values, vec![3.0]);
    assert_eq!(out.stream("count").unwrap().values, vec![4.0]);
    assert_eq!(out.stream("count").unwrap().timestamps, vec![0]);
    // tick at 2000 closes point 0's [1000, 2000) and point 3's [0, 1000).
    let (_, result) = rt.tick(2000).pop().unwrap();
    let out = result.unwrap();
    let mean = out.stream("mean").unwrap();
    assert_eq!(mean.points, vec![0, 3]);
    assert_eq!(mean.values, vec![15.0, -1.0]);
    assert_eq!(mean.qualities, vec![0, 1], "worst quality of the window");
    // Late sample: dropped and counted.
    let mut late = Batch::new();
    late.push(0, 2500, 1.0, 0);
    late.push(0, 100, 1.0, 0);
    rt.process("win", &late, 0).unwrap();
    assert_eq!(rt.status()[0].counters.get("late_samples"), Some(&1));
}

#[test]
fn anomaly_passes_anomalies_and_drops_normal_data() {
    let caps = MemoryCapabilities::default();
    caps.models.insert(
        "limits-v1",
        "# thresholds pushed OTA\n0 range 10 20\n1 zscore 50 2 3\n* range -100 100\n",
    );
    let mut rt = runtime(&caps);
    let bytes = guest("anomaly");
    let mut s = spec("anom", &bytes, "model=limits-v1");
    s.models.insert("limits-v1".into());
    rt.load(s.clone(), &bytes, 0).unwrap();
    let mut b = Batch::new();
    b.push(0, 1, 15.0, 0); // normal
    b.push(0, 2, 25.0, 0); // above range
    b.push(1, 3, 55.0, 0); // |55-50| = 5 <= 6: normal
    b.push(1, 4, 57.0, 0); // 7 > 6: anomaly
    b.push(2, 5, 99.0, 0); // default range: normal
    b.push(2, 6, -101.0, 0); // default range: anomaly
    b.push(0, 7, 15.0, 2); // bad quality always passes
    let out = out0(&rt.process("anom", &b, 0).unwrap());
    assert_eq!(out.timestamps, vec![2, 4, 6, 7]);
    let counters = &rt.status()[0].counters;
    assert_eq!(counters.get("anomalies"), Some(&4));
    assert_eq!(counters.get("normal"), Some(&3));

    // A new model version pushed OTA takes effect when the function is
    // re-initialised with it.
    caps.models.insert("limits-v2", "0 range 0 30\n");
    s.config = "model=limits-v2;unknown=drop".into();
    s.models = ["limits-v2".to_owned()].into();
    rt.load(s, &bytes, 0).unwrap();
    let out = out0(&rt.process("anom", &b, 0).unwrap());
    assert_eq!(out.timestamps, vec![7]);
}

#[test]
fn anomaly_without_its_model_fails_to_init() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let bytes = guest("anomaly");
    let mut s = spec("anom", &bytes, "model=missing");
    s.models.insert("missing".into());
    let err = rt.load(s, &bytes, 0).unwrap_err();
    assert!(matches!(err, LoadError::Init(_)), "{err:?}");
    // A model name outside the grant is refused by the host.
    caps.models.insert("secret", "0 range 0 1\n");
    let mut s = spec("anom", &bytes, "model=secret");
    s.models.insert("other".into());
    let err = rt.load(s, &bytes, 0).unwrap_err();
    assert!(matches!(err, LoadError::Init(_)), "{err:?}");
}

fn probe_spec(bytes: &[u8], config: &str) -> FunctionSpec {
    let mut s = spec("probe", bytes, config);
    s.devices.insert("plc-1".into());
    s.kv = true;
    s.models.insert("m".into());
    s.outputs = vec!["pass".into(), "probe".into()];
    s.points = vec![
        PointRef::new("plc-1", "temp"),
        PointRef::new("plc-1", "rpm"),
    ];
    s
}

#[test]
fn kv_state_survives_reload_and_is_namespaced() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let bytes = guest("probe");
    rt.load(probe_spec(&bytes, "kv_counter=n"), &bytes, 0)
        .unwrap();
    for expected in 1..=3 {
        let out = rt.process("probe", &series(1, 1, |_| 0.0), 0).unwrap();
        assert_eq!(
            out.stream("probe").unwrap().values,
            vec![f64::from(expected)]
        );
    }
    rt.remove("probe");
    rt.load(probe_spec(&bytes, "kv_counter=n"), &bytes, 0)
        .unwrap();
    let out = rt.process("probe", &series(1, 1, |_| 0.0), 0).unwrap();
    assert_eq!(out.stream("probe").unwrap().values, vec![4.0]);
    assert_eq!(caps.kv.namespace("probe").len(), 1);
    assert!(caps.kv.namespace("other").is_empty());
}

#[test]
fn points_nodes_models_and_counters_reach_the_embedder() {
    let caps = MemoryCapabilities::default();
    caps.devices.set_point(
        PointRef::new("plc-1", "rpm"),
        PointValue {
            timestamp_ms: 5,
            value: 1500.0,
            quality: 0,
        },
    );
    // The probe's config uses ';' as separator, so its node id avoids it.
    caps.devices.set_node("plc-1", "ns=2|s=Temp", 21.5);
    caps.models.insert("m", vec![0u8; 123]);
    let mut rt = runtime(&caps);
    let bytes = guest("probe");
    let config = "point=1;node=plc-1:ns=2|s=Temp;model=m;log=1";
    rt.load(probe_spec(&bytes, config), &bytes, 0).unwrap();
    let out = rt.process("probe", &series(2, 1, |_| 0.0), 0).unwrap();
    let probe = out.stream("probe").unwrap();
    assert_eq!(probe.points, vec![1, 2, 4]);
    assert_eq!(probe.values, vec![21.5, 1500.0, 123.0]);
    assert_eq!(rt.status()[0].counters.get("batches"), Some(&1));

    // Point index outside the declared points: not granted.
    rt.load(probe_spec(&bytes, "point=2"), &bytes, 0).unwrap();
    let out = rt.process("probe", &series(1, 1, |_| 0.0), 0).unwrap();
    assert_eq!(out.stream("probe").unwrap().values, vec![-1.0]);
}
