//! Reduction with fidelity: `deadband` and `swinging-door` each drop at least
//! 90 % of the samples of four reference signals while the reconstruction
//! error stays within the configured deviation.
//!
//! Reconstruction: zero-order hold (last sent value) for deadband, linear
//! interpolation between consecutive emitted samples for swinging door.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "test code: failing loudly is the point; signal sizes are small"
)]

mod common;

use std::collections::BTreeMap;

use common::*;
use device_runtime::memory::MemoryCapabilities;
use device_runtime::{Batch, DeviceRuntime};

const N: usize = 20_000;
const STEP_MS: u64 = 1000;
const T0: u64 = 1_700_000_000_000;
const DEVIATION: f64 = 0.5;
const MAX_INTERVAL_MS: u64 = 600_000;

struct Signal {
    name: &'static str,
    values: Vec<f64>,
}

fn signals() -> Vec<Signal> {
    let mut rng = Rng::new(42);
    let sine = (0..N)
        .map(|i| {
            10.0 * (2.0 * std::f64::consts::PI * i as f64 / 3600.0).sin() + 0.05 * rng.normal()
        })
        .collect();
    let mut level = 50.0;
    let walk = (0..N)
        .map(|_| {
            level += 0.05 * rng.normal();
            level
        })
        .collect();
    let mut step = 20.0;
    let steps = (0..N)
        .map(|i| {
            if i % 500 == 0 {
                step += 10.0 * rng.uniform() - 5.0;
            }
            step + 0.02 * rng.normal()
        })
        .collect();
    let drift = (0..N)
        .map(|i| 20.0 + 0.0005 * i as f64 + 0.02 * rng.normal())
        .collect();
    vec![
        Signal {
            name: "sine+noise",
            values: sine,
        },
        Signal {
            name: "random walk",
            values: walk,
        },
        Signal {
            name: "steps",
            values: steps,
        },
        Signal {
            name: "slow drift",
            values: drift,
        },
    ]
}

/// All signals interleaved (point index = signal index), in batches of 1000.
fn batches(signals: &[Signal]) -> Vec<Batch> {
    let mut all = Batch::with_capacity(N * signals.len());
    for i in 0..N {
        for (p, s) in signals.iter().enumerate() {
            all.push(p as u32, T0 + i as u64 * STEP_MS, s.values[i], 0);
        }
    }
    let mut out = Vec::new();
    for start in (0..all.len()).step_by(1000) {
        let end = (start + 1000).min(all.len());
        out.push(Batch {
            points: all.points[start..end].to_vec(),
            timestamps: all.timestamps[start..end].to_vec(),
            values: all.values[start..end].to_vec(),
            qualities: all.qualities[start..end].to_vec(),
        });
    }
    out
}

/// Runs every batch, then a tick far enough in the future to release held
/// samples; returns emitted (timestamp, value) per point.
fn run(rt: &mut DeviceRuntime, name: &str, signals: &[Signal]) -> BTreeMap<u32, Vec<(u64, f64)>> {
    let mut emitted: BTreeMap<u32, Vec<(u64, f64)>> = BTreeMap::new();
    let mut collect = |b: &Batch| {
        for i in 0..b.len() {
            emitted
                .entry(b.points[i])
                .or_default()
                .push((b.timestamps[i], b.values[i]));
        }
    };
    for batch in batches(signals) {
        let out = rt.process(name, &batch, 0).unwrap();
        collect(&out0(&out));
    }
    let end = T0 + N as u64 * STEP_MS + MAX_INTERVAL_MS;
    for (fname, result) in rt.tick(end) {
        if fname == name {
            collect(&out0(&result.unwrap()));
        }
    }
    emitted
}

fn reduction(emitted: usize) -> f64 {
    1.0 - emitted as f64 / N as f64
}

fn zero_order_hold_error(values: &[f64], emitted: &[(u64, f64)]) -> f64 {
    let mut k = 0;
    let mut max_err: f64 = 0.0;
    for (i, v) in values.iter().enumerate() {
        let ts = T0 + i as u64 * STEP_MS;
        while k + 1 < emitted.len() && emitted[k + 1].0 <= ts {
            k += 1;
        }
        assert!(emitted[k].0 <= ts, "first sample must be emitted");
        max_err = max_err.max((v - emitted[k].1).abs());
    }
    max_err
}

fn linear_error(values: &[f64], emitted: &[(u64, f64)]) -> f64 {
    let mut k = 0;
    let mut max_err: f64 = 0.0;
    let last_ts = T0 + (values.len() as u64 - 1) * STEP_MS;
    assert_eq!(
        emitted.first().map(|e| e.0),
        Some(T0),
        "first sample emitted"
    );
    assert_eq!(
        emitted.last().map(|e| e.0),
        Some(last_ts),
        "last sample emitted"
    );
    for (i, v) in values.iter().enumerate() {
        let ts = T0 + i as u64 * STEP_MS;
        while k + 1 < emitted.len() && emitted[k + 1].0 <= ts {
            k += 1;
        }
        let (t0, v0) = emitted[k];
        let recon = if t0 == ts {
            v0
        } else {
            let (t1, v1) = emitted[k + 1];
            v0 + (v1 - v0) * (ts - t0) as f64 / (t1 - t0) as f64
        };
        max_err = max_err.max((v - recon).abs());
    }
    max_err
}

#[test]
fn deadband_reduces_90_percent_within_deviation() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let bytes = guest("deadband");
    let config = format!("deadband={DEVIATION};max_interval_ms={MAX_INTERVAL_MS}");
    rt.load(spec("deadband", &bytes, &config), &bytes, 0)
        .unwrap();
    let signals = signals();
    let emitted = run(&mut rt, "deadband", &signals);
    for (p, s) in signals.iter().enumerate() {
        let e = &emitted[&(p as u32)];
        let red = reduction(e.len());
        let err = zero_order_hold_error(&s.values, e);
        println!(
            "deadband {:12} sent {:5}/{N} reduction {:.2}% max error {err:.4} (deviation {DEVIATION})",
            s.name,
            e.len(),
            red * 100.0
        );
        assert!(red >= 0.90, "{}: reduction {red}", s.name);
        assert!(err <= DEVIATION, "{}: error {err}", s.name);
    }

    // Percent-of-range mode with the same effective deadband (0.5 % of
    // 0..100) must send exactly the same samples.
    let pct = format!(
        "mode=percent;percent=0.5;range_low=0;range_high=100;max_interval_ms={MAX_INTERVAL_MS}"
    );
    rt.load(spec("deadband-pct", &bytes, &pct), &bytes, 0)
        .unwrap();
    let emitted_pct = run(&mut rt, "deadband-pct", &signals);
    assert_eq!(emitted_pct, emitted);
}

#[test]
fn swinging_door_reduces_90_percent_within_deviation() {
    let caps = MemoryCapabilities::default();
    let mut rt = runtime(&caps);
    let bytes = guest("swinging-door");
    let config = format!("deviation={DEVIATION};max_time_ms={MAX_INTERVAL_MS}");
    rt.load(spec("sdt", &bytes, &config), &bytes, 0).unwrap();
    let signals = signals();
    let emitted = run(&mut rt, "sdt", &signals);
    for (p, s) in signals.iter().enumerate() {
        let e = &emitted[&(p as u32)];
        let red = reduction(e.len());
        let err = linear_error(&s.values, e);
        println!(
            "swinging-door {:12} sent {:5}/{N} reduction {:.2}% max error {err:.4} (deviation {DEVIATION})",
            s.name,
            e.len(),
            red * 100.0
        );
        assert!(red >= 0.90, "{}: reduction {red}", s.name);
        // Slopes are compared in f64; allow rounding at the 1e-9 level.
        assert!(err <= DEVIATION + 1e-9, "{}: error {err}", s.name);
        // Emitted timestamps strictly increase (no duplicates).
        assert!(e.windows(2).all(|w| w[0].0 < w[1].0), "{}", s.name);
    }
}
