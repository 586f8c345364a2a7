//! Prints bytes per sample of the JSON and the binary telemetry encodings on
//! reference batches (sine with noise on 20 points at 100 ms, 1 000 samples).
//!
//! `cargo run --release -p protocols --example encoding_size`

use protocols::codec::{encode_batch, encode_json};
use protocols::{Quality, Sample, TelemetryBatch};

fn batch(n: u32, points: u32, step_ms: u64) -> TelemetryBatch {
    let mut seed = 0x9E37_79B9_u64;
    let samples = (0..n)
        .map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let noise = (seed % 1000) as f64 / 10_000.0;
            let t = u64::from(i / points) * step_ms;
            Sample {
                point: i % points,
                ts_ms: 1_764_300_000_000 + t,
                value: 20.0 + 5.0 * (t as f64 / 10_000.0).sin() + noise,
                quality: Quality::GOOD,
            }
        })
        .collect();
    TelemetryBatch {
        stream: "raw".into(),
        first_seq: 1_000_000,
        floor_seq: 1_000_000,
        samples,
    }
}

fn main() {
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "batch", "json B/smp", "bin B/smp", "ratio"
    );
    for (label, n, points, step) in [
        ("1000 samples, 20 points, 100 ms", 1000, 20, 100),
        ("100 samples, 1 point, 1 s", 100, 1, 1000),
        ("10000 samples, 500 points, 1 s", 10_000, 500, 1000),
    ] {
        let b = batch(n, points, step);
        let json = encode_json("batch", &b).map_or(0, |v| v.len()) as f64 / f64::from(n);
        let bin = encode_batch(&b).len() as f64 / f64::from(n);
        println!("{label:<34} {json:>10.1} {bin:>10.1} {:>7.1}x", json / bin);
    }
}
