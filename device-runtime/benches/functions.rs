//! Benchmarks: throughput of each reference function, instantiation, and
//! compile cold vs from the disk cache.
//!
//! ```text
//! CARGO_TARGET_DIR=... cargo bench -p device-runtime --bench functions
//! ```

#![allow(
    clippy::expect_used,
    clippy::cast_precision_loss,
    reason = "bench setup: failing loudly is the point"
)]

use std::hint::black_box;

use device_runtime::memory::MemoryCapabilities;
use device_runtime::{Batch, DeviceRuntime, FunctionSpec, RuntimeConfig, digest_hex};
use divan::counter::ItemsCount;
use divan::{Bencher, bench};

const POINTS: u32 = 100;
const PER_POINT: usize = 100;
const BATCH: usize = POINTS as usize * PER_POINT;

fn main() {
    divan::main();
}

fn guest(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guests")
        .join(name)
        .join(format!("{name}.wasm"));
    std::fs::read(path).expect("committed guest")
}

/// Sine + noise per point; consecutive batches continue in time.
fn batch(round: u64) -> Batch {
    let mut b = Batch::with_capacity(BATCH);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ round;
    for i in 0..PER_POINT {
        let t = round * PER_POINT as u64 + i as u64;
        for p in 0..POINTS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            let v = 10.0 * (t as f64 / 300.0 + f64::from(p)).sin() + 0.1 * noise;
            b.push(p, 1_700_000_000_000 + t * 1000, v, 0);
        }
    }
    b
}

fn loaded(name: &str, config: &str) -> DeviceRuntime {
    let caps = MemoryCapabilities::default();
    caps.models.insert("limits", "* range -9.5 9.5\n");
    let mut rt =
        DeviceRuntime::new(RuntimeConfig::default(), caps.capabilities()).expect("runtime");
    let bytes = guest(name);
    let mut spec = FunctionSpec::new(name, digest_hex(&bytes), config);
    spec.models.insert("limits".into());
    spec.outputs = vec!["a".into(), "b".into(), "c".into(), "d".into()];
    rt.load(spec, &bytes, 0).expect("load");
    rt
}

fn throughput(bencher: Bencher, name: &str, config: &str) {
    let mut rt = loaded(name, config);
    let batches: Vec<Batch> = (0..16).map(batch).collect();
    let mut round = 0usize;
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        let b = &batches[round % batches.len()];
        round += 1;
        black_box(rt.process(name, b, 0).expect("process"))
    });
}

/// Samples/s through `deadband` (deadband 0.5 on amplitude-10 sines).
#[bench(sample_count = 50)]
fn process_deadband(bencher: Bencher) {
    throughput(bencher, "deadband", "deadband=0.5");
}

/// Samples/s through `swinging-door` (deviation 0.5).
#[bench(sample_count = 50)]
fn process_swinging_door(bencher: Bencher) {
    throughput(bencher, "swinging-door", "deviation=0.5");
}

/// Samples/s through `window` (60 s tumbling windows).
#[bench(sample_count = 50)]
fn process_window(bencher: Bencher) {
    throughput(bencher, "window", "window_ms=60000");
}

/// Samples/s through `anomaly` (range model, ~5 % anomalous).
#[bench(sample_count = 50)]
fn process_anomaly(bencher: Bencher) {
    throughput(bencher, "anomaly", "model=limits");
}

/// Link + instantiate + `init` of an already compiled component (pooling
/// allocator slot), then remove.
#[bench(sample_count = 50)]
fn instantiate_deadband(bencher: Bencher) {
    let caps = MemoryCapabilities::default();
    let mut rt =
        DeviceRuntime::new(RuntimeConfig::default(), caps.capabilities()).expect("runtime");
    let bytes = guest("deadband");
    let spec = FunctionSpec::new("db", digest_hex(&bytes), "deadband=0.5");
    rt.compile(&spec.module_digest, &bytes).expect("compile");
    bencher.bench_local(|| {
        rt.load(spec.clone(), &bytes, 0).expect("load");
        rt.remove("db");
    });
}

/// Compile `deadband` in a fresh engine with no cache.
#[bench(sample_count = 10)]
fn compile_cold(bencher: Bencher) {
    let bytes = guest("deadband");
    let digest = digest_hex(&bytes);
    bencher
        .with_inputs(|| {
            DeviceRuntime::new(
                RuntimeConfig::default(),
                MemoryCapabilities::default().capabilities(),
            )
            .expect("runtime")
        })
        .bench_local_values(|mut rt| {
            black_box(rt.compile(&digest, &bytes).expect("compile"));
            rt
        });
}

/// Compile `deadband` in a fresh engine whose disk cache already holds it
/// (what an edge-node restart does).
#[bench(sample_count = 10)]
fn compile_from_disk_cache(bencher: Bencher) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_owned()),
        ..RuntimeConfig::default()
    };
    let bytes = guest("deadband");
    let digest = digest_hex(&bytes);
    let mut warm = DeviceRuntime::new(config.clone(), MemoryCapabilities::default().capabilities())
        .expect("runtime");
    warm.compile(&digest, &bytes).expect("compile");
    drop(warm);
    bencher
        .with_inputs(|| {
            DeviceRuntime::new(config.clone(), MemoryCapabilities::default().capabilities())
                .expect("runtime")
        })
        .bench_local_values(|mut rt| {
            black_box(rt.compile(&digest, &bytes).expect("compile"));
            rt
        });
}
