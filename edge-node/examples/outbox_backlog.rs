//! Fills one outbox with a backlog as an offline node would and prints the
//! process RSS and on-disk size as it grows: how much memory holding a long
//! backlog costs, separately from the rest of the agent.
//!
//! ```text
//! cargo run --release -p edge-node --example outbox_backlog -- [HOURS] [SAMPLES_PER_S] [BATCH] [CACHE_MIB]
//! ```
//! Defaults: 48 h at 100 samples/s in entries of 5 000 samples, 64 MiB sled
//! cache (the edge default). Group commit after every entry.

#![allow(clippy::expect_used, reason = "example: failing loudly is the point")]

use std::time::{Duration, Instant};

use edge_node::store::{OutboxLimits, OverflowPolicy, Store, StoreConfig};
use protocols::{Quality, Sample};

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.filter_map(Result::ok)
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => disk_bytes(&e.path()),
                Ok(_) => e.metadata().map_or(0, |m| m.len()),
                Err(_) => 0,
            })
            .sum()
    })
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let hours = arg(1, 48);
    let rate = arg(2, 100);
    let batch = arg(3, 5_000);
    let cache_mib = arg(4, 64);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&StoreConfig {
        path: dir.path().join("db"),
        cache_capacity_bytes: cache_mib * 1024 * 1024,
        outbox: OutboxLimits {
            max_bytes: u64::MAX / 2,
            max_age: Duration::from_secs(365 * 24 * 3600),
            policy: OverflowPolicy::DropOldest,
        },
    })
    .expect("open store");
    let outbox = store.outbox("raw").expect("outbox");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "{hours} h at {rate} samples/s, entries of {batch}, sled cache {cache_mib} MiB; start RSS {:.1} MiB",
        rss_mib()
    );
    let per_hour = rate * 3600;
    let t0_ms = 1_764_300_000_000u64;
    let started = Instant::now();
    let mut seq = 0u64;
    for h in 1..=hours {
        let end = per_hour * h;
        while seq < end {
            let n = batch.min(end - seq);
            let samples: Vec<Sample> = (seq..seq + n)
                .map(|i| Sample {
                    point: (i % 10) as u32,
                    ts_ms: t0_ms + i * 1_000 / rate,
                    value: (i as f64 * 0.001).sin() * 50.0 + 20.0,
                    quality: Quality::GOOD,
                })
                .collect();
            outbox
                .append(&samples, t0_ms + seq * 1_000 / rate)
                .expect("append");
            rt.block_on(store.commit()).expect("commit");
            seq += n;
        }
        if h % 6 == 0 || h == hours {
            let s = outbox.stats();
            println!(
                "  {h:>3} h: {} samples, {:.1} MiB payload, {:.1} MiB on disk, RSS {:.1} MiB, {:.0} samples/s appended",
                s.samples,
                s.bytes as f64 / 1_048_576.0,
                disk_bytes(dir.path()) as f64 / 1_048_576.0,
                rss_mib(),
                seq as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
}
