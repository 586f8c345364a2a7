//! Benchmarks of the durable outbox (sled): append with group commit, the
//! drain read path, and acks.
//!
//! ```text
//! cargo bench -p edge-node --bench outbox
//! ```
//! Throughput is in samples; a batch is 500 samples of 10 points, the
//! pipeline's default entry size at 100 samples/s is smaller, so this is the
//! outbox's ceiling, not the agent's sampling rate.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "bench setup: failing loudly is the point"
)]

use std::time::Duration;

use divan::counter::ItemsCount;
use divan::{Bencher, bench};
use edge_node::store::{OutboxLimits, OverflowPolicy, Store, StoreConfig};
use protocols::{Quality, Sample};

const BATCH: usize = 500;

fn main() {
    divan::main();
}

fn samples(round: u64) -> Vec<Sample> {
    (0..BATCH as u64)
        .map(|i| Sample {
            point: (i % 10) as u32,
            ts_ms: 1_764_300_000_000 + round * 1_000 + i,
            value: ((round * BATCH as u64 + i) as f64 * 0.01).sin() * 50.0 + 20.0,
            quality: Quality::GOOD,
        })
        .collect()
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(&StoreConfig {
        path: dir.join("db"),
        cache_capacity_bytes: 64 * 1024 * 1024,
        outbox: OutboxLimits {
            max_bytes: 8 * 1024 * 1024 * 1024,
            max_age: Duration::from_secs(365 * 24 * 3600),
            policy: OverflowPolicy::DropOldest,
        },
    })
    .expect("open store")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Append `commit_every` batches, then one group commit (flush).
#[bench(args = [1, 20])]
fn append_then_commit(bencher: Bencher, commit_every: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let outbox = store.outbox("raw").unwrap();
    let rt = rt();
    let mut round = 0;
    bencher
        .counter(ItemsCount::new(BATCH * commit_every as usize))
        .bench_local(|| {
            for _ in 0..commit_every {
                round += 1;
                outbox.append(&samples(round), 0).unwrap();
            }
            rt.block_on(store.commit()).unwrap();
        });
}

/// Read 100 durable entries (50 000 samples) for the drain.
#[bench]
fn pending_100_entries(bencher: Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let outbox = store.outbox("raw").unwrap();
    for round in 0..1_000 {
        outbox.append(&samples(round), 0).unwrap();
    }
    rt().block_on(store.commit()).unwrap();
    let mut after = 0;
    bencher
        .counter(ItemsCount::new(100 * BATCH))
        .bench_local(|| {
            let got = outbox.pending(after, 100).unwrap();
            after = (after + 100 * BATCH as u64) % (900 * BATCH as u64);
            got
        });
}
