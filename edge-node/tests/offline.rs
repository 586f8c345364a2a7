//! 48 hours without a cloud link, in virtual time, then reconnect: the hub
//! must end up with every sample exactly once, in per-stream order.
//!
//! The agent runs on tokio's paused clock (auto-advancing) with the broker
//! unreachable. Before the outage it had accepted a desired revision, which it
//! re-applies from disk at start (a restart with no link). After 48 virtual
//! hours the clock resumes, the hub (embedded broker on the port the agent has
//! been trying) starts in real time on its own runtime, and the backlog drains.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code"
)]

mod common;

use std::time::Duration;

use edge_node::Clock;
use edge_node::store::Store;
use edgefleet_testkit::{EdgeHarness, HubHarness, edge_config, eventually, free_port};
use protocols::signing::key_to_hex;
use protocols::{NodeConfig, SignedDesired};

const POINTS: u32 = 10;
const INTERVAL_MS: u64 = 100; // 10 points every 100 ms: 100 samples/s on one stream
const OUTAGE_HOURS: u64 = 48;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes of all files under `dir` (the sled database as it sits on disk).
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

fn desired() -> protocols::DesiredState {
    common::random_walk_desired(
        "offline-1",
        POINTS,
        INTERVAL_MS,
        NodeConfig {
            batch_max_samples: 1_000,
            batch_max_age_ms: 5_000,
            report_interval_ms: 2_000,
            raw_stream: Some("raw".into()),
        },
    )
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario (48 h outage, reconnect, drain, checks), read top to bottom"
)]
async fn outage_48h_then_reconnect_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let key = cloud_hub::keys::load_or_create(&dir.path().join("hub")).unwrap();

    let hub_key = key_to_hex(&key.verifying_key());
    // The node joined before the outage: its identity (from the hub's CA,
    // made now in the hub's data directory) is what the mTLS broker wants.
    edgefleet_testkit::enrol_offline(
        &dir.path().join("hub"),
        "offline-1",
        &dir.path().join("edge"),
    )
    .unwrap();
    let mut cfg = edge_config("offline-1", &dir.path().join("edge"), port, &hub_key);
    cfg.mqtt.reconnect_max = Duration::from_secs(1);
    cfg.uplink.drain_rate = 50_000_000;
    cfg.uplink.max_in_flight_samples = 500_000;
    cfg.validate().unwrap();

    // The node accepted revision 1 before the link went down.
    {
        let store = Store::open(&cfg.store_config()).unwrap();
        store
            .put_desired(&SignedDesired::sign(&desired(), &key).unwrap())
            .await
            .unwrap();
    }

    let clock = Clock::system();
    let edge = EdgeHarness::start(cfg.clone(), clock).await.unwrap();
    let store = edge.store.clone();

    let hours: u64 = std::env::var("EDGEFLEET_OUTAGE_HOURS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(OUTAGE_HOURS);
    let outage = Duration::from_secs(hours * 3600);
    let wall = std::time::Instant::now();
    for h in 0..hours {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        if h % 6 == 5 || hours < 12 {
            println!(
                "  +{}h virtual, {:.1}s wall, RSS {} MiB",
                h + 1,
                wall.elapsed().as_secs_f64(),
                rss_kb() / 1024
            );
        }
    }
    let outage_wall = wall.elapsed();
    let raw = store.outbox("raw").unwrap();
    let during = raw.stats();
    let expected_min = outage.as_millis() as u64 / INTERVAL_MS * u64::from(POINTS)
        - 60_000 / INTERVAL_MS * u64::from(POINTS);
    assert!(
        during.samples >= expected_min,
        "outbox holds {} samples after 48 h, expected at least {expected_min}",
        during.samples
    );
    assert_eq!(during.acked, 0);
    assert_eq!(during.dropped, 0);
    let on_disk = disk_bytes(&cfg.data_dir);
    println!(
        "{hours} h outage simulated in {:.1} s wall: {} samples buffered, {} payload bytes, \
         {} bytes on disk ({:.1} B/sample), RSS {} MiB",
        outage_wall.as_secs_f64(),
        during.samples,
        during.bytes,
        on_disk,
        on_disk as f64 / during.samples as f64,
        rss_kb() / 1024
    );

    // The link returns.
    tokio::time::resume();
    let mut hub_cfg = HubHarness::config(&dir.path().join("hub"));
    hub_cfg.embedded_broker.as_mut().unwrap().listen = format!("127.0.0.1:{port}").parse().unwrap();
    hub_cfg.ack_interval = Duration::from_millis(100);
    let harness = HubHarness::start_on_thread(hub_cfg).await.unwrap();
    let hub = harness.hub.clone();
    let drain_start = std::time::Instant::now();
    let reconnect_ms = clock.now_ms();
    let target = during.next_seq - 1;
    // While the backlog drains: new samples must overtake it (live first), and
    // reported state must keep flowing (control traffic is not starved).
    let (mut live_first, mut reported_during_drain) = (false, false);
    loop {
        let s = hub
            .sink
            .streams("offline-1")
            .get("raw")
            .cloned()
            .unwrap_or_default();
        if s.contiguous < target {
            live_first |= s.max_seen > target;
            let rep = hub
                .registry
                .get("offline-1")
                .unwrap()
                .and_then(|r| r.reported);
            reported_during_drain |=
                rep.is_some_and(|r| r.at_ms > reconnect_ms + 1_000 && r.backlog.samples > 0);
        }
        if s.contiguous >= target && raw.stats().acked >= target {
            break;
        }
        assert!(
            drain_start.elapsed() < Duration::from_secs(900),
            "drain stalled at {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain = drain_start.elapsed();
    println!(
        "drained {target} samples in {:.1} s ({:.0} samples/s) through broker and hub, RSS {} MiB",
        drain.as_secs_f64(),
        target as f64 / drain.as_secs_f64(),
        rss_kb() / 1024
    );
    assert!(
        live_first,
        "no live sample overtook the backlog during the drain"
    );
    assert!(
        reported_during_drain,
        "no reported state reached the hub during the drain"
    );

    // Stop the edge cleanly; then check the hub's store: seq 1..=N exactly once,
    // and per point a sample every INTERVAL_MS with no hole during the outage.
    edge.stop().await.unwrap();
    // The ordered stop sends what the last commit covered; let the hub take
    // the batches still on their way before comparing its count with what
    // it serves (stable over 10 polls, 0.5 s).
    let mut last = (u64::MAX, 0u32);
    let stats = eventually(
        "the hub's ingest to settle",
        Duration::from_secs(30),
        || {
            let st = hub.sink.streams("offline-1")["raw"].clone();
            last = if st.stored == last.0 {
                (st.stored, last.1 + 1)
            } else {
                (st.stored, 0)
            };
            std::future::ready((last.1 >= 10).then_some(st))
        },
    )
    .await;
    assert_eq!(stats.dropped_by_edge, 0);
    let mut next = 1u64;
    let mut last_ts = vec![None::<u64>; POINTS as usize];
    loop {
        let page = hub
            .sink
            .query("offline-1", "raw", next, None, None, 1_000_000)
            .unwrap();
        if page.is_empty() {
            break;
        }
        for s in &page {
            assert_eq!(s.seq, next, "gap or duplicate at seq {next}");
            next += 1;
            let p = s.point as usize;
            if let Some(prev) = last_ts[p] {
                if s.seq <= target {
                    assert_eq!(
                        s.ts_ms,
                        prev + INTERVAL_MS,
                        "point {p}: hole before seq {}",
                        s.seq
                    );
                } else {
                    assert!(s.ts_ms > prev, "point {p}: out of order at seq {}", s.seq);
                }
            }
            last_ts[p] = Some(s.ts_ms);
        }
    }
    assert!(
        next > target,
        "hub holds {} samples, edge buffered {target}",
        next - 1
    );
    assert_eq!(stats.stored, next - 1);
    harness.stop().await.unwrap();
}
