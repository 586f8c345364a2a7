//! Real processes: an `edge-node` under load is killed with SIGKILL at random
//! moments, 24 times, a third of them while it drains a backlog after a link
//! cut. Afterwards the hub's sequence numbers must be gap-free and duplicate-
//! free, every hole in the sampled data must lie inside a loss window the
//! node reported, and most kills lose no more than the documented window
//! (pipeline batch age + group-commit interval + scheduling slack).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code"
)]

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgefleet_testkit::HubHarness;
use protocols::NodeConfig;
use rand::{Rng as _, SeedableRng as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const KILLS: usize = 24;
const INTERVAL_MS: u64 = 20;
const BATCH_AGE_MS: u64 = 100;
const FLUSH_MS: u64 = 100;
/// Loss window per kill: buffered in the pipeline + not yet group-committed,
/// plus scheduling slack on a loaded 2-core machine.
const WINDOW_MS: u64 = BATCH_AGE_MS + FLUSH_MS + 400;
/// Sampling-schedule slack when matching holes to reported windows.
const SLACK_MS: u64 = 2 * INTERVAL_MS + 50;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn desired() -> protocols::DesiredState {
    common::random_walk_desired(
        "crash-1",
        5,
        INTERVAL_MS,
        NodeConfig {
            batch_max_samples: 100,
            batch_max_age_ms: BATCH_AGE_MS,
            report_interval_ms: 500,
            raw_stream: Some("raw".into()),
        },
    )
}

/// A TCP proxy to the broker that the test can cut and restore.
async fn proxy(listener: TcpListener, upstream: String, mut cut: watch::Receiver<bool>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        if *cut.borrow_and_update() {
            drop(inbound);
            continue;
        }
        let upstream = upstream.clone();
        let mut cut = cut.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.wait_for(|c| *c) => {}
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario (24 kills, then the checks over all of them), read top to bottom"
)]
async fn sigkill_at_random_moments_loses_only_the_documented_window() {
    let dir = tempfile::tempdir().unwrap();
    let harness = HubHarness::start(HubHarness::config(&dir.path().join("hub")))
        .await
        .unwrap();
    let hub = harness.hub.clone();
    let (host, port) = harness.mqtt.clone();
    hub.set_desired(&desired()).await.unwrap();

    let (cut_tx, cut_rx) = watch::channel(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    tokio::spawn(proxy(listener, format!("{host}:{port}"), cut_rx));

    // The node's identity from the hub CA: the agent uses it for the
    // broker's mTLS by default.
    harness
        .write_identity("crash-1", &dir.path().join("edge"))
        .unwrap();
    let cfg_path = dir.path().join("edge.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "node = \"crash-1\"\ndata_dir = {:?}\n[mqtt]\nport = {proxy_port}\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\
             [hub]\npublic_key = \"{}\"\n[outbox]\nflush_interval = \"{FLUSH_MS}ms\"\n[uplink]\ndrain_rate = 3000\nack_timeout = \"3s\"\n",
            dir.path().join("edge").display().to_string(),
            harness.public_key,
        ),
    )
    .unwrap();
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-node"))
            .args(["run", "--config"])
            .arg(&cfg_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x00C0_FFEE);
    let mut windows = Vec::new(); // (kill_ms, restart_ms)
    let mut starts = Vec::new(); // when each killed process was spawned
    let mut during_drain = 0;
    for i in 0..KILLS {
        let mut child = spawn();
        let started = now_ms();
        starts.push(started);
        if let Some((_, restart)) = windows.last_mut() {
            *restart = started;
        }
        if i % 3 == 2 {
            // Build a backlog behind a cut link, restore it, kill mid-drain.
            tokio::time::sleep(Duration::from_millis(500)).await;
            cut_tx.send_replace(true);
            tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..3_000))).await;
            cut_tx.send_replace(false);
            tokio::time::sleep(Duration::from_millis(rng.random_range(600..1_200))).await;
            let backlog = hub
                .registry
                .get("crash-1")
                .unwrap()
                .and_then(|r| r.reported)
                .map_or(0, |r| r.backlog.samples);
            if backlog > 0 {
                during_drain += 1;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        }
        child.start_kill().unwrap(); // SIGKILL
        let killed = now_ms();
        child.wait().await.unwrap();
        windows.push((killed, u64::MAX));
    }
    assert!(
        during_drain >= 3,
        "only {during_drain} kills happened during a drain"
    );

    // Last run: let it drain completely, then stop it cleanly.
    let mut child = spawn();
    if let Some((_, restart)) = windows.last_mut() {
        *restart = now_ms();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let rep = hub
            .registry
            .get("crash-1")
            .unwrap()
            .and_then(|r| r.reported);
        let st = hub
            .sink
            .streams("crash-1")
            .get("raw")
            .cloned()
            .unwrap_or_default();
        if rep
            .is_some_and(|r| r.backlog.samples < 500 && r.at_ms > windows.last().unwrap().1 + 1_000)
            && st.contiguous == st.max_seen
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no convergence: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = now_ms();
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    // Sequence numbers: gap-free and duplicate-free at the hub.
    let st = hub.sink.streams("crash-1")["raw"].clone();
    let stored = hub
        .sink
        .query("crash-1", "raw", 1, None, None, 10_000_000)
        .unwrap();
    assert_eq!(st.dropped_by_edge, 0);
    assert_eq!(stored.len() as u64, st.contiguous);
    for (i, s) in stored.iter().enumerate() {
        assert_eq!(s.seq, i as u64 + 1, "gap or duplicate at position {i}");
    }

    // Loss is never silent: every kill lies inside a reported loss window,
    // and each window ends while a run was up (the run that recorded it, at
    // its start). The agent records the window right after opening its
    // store, so a window per kill is the rule; a kill that lands before the
    // restarted agent had opened its store (nothing sampled in that run) is
    // covered by the next run's window, which then spans both kills.
    let reported = hub
        .registry
        .get("crash-1")
        .unwrap()
        .and_then(|r| r.reported)
        .unwrap();
    let lw = &reported.loss_windows;
    let merged = KILLS.saturating_sub(lw.len());
    assert!(
        lw.len() <= KILLS && lw.len() >= KILLS / 2,
        "{} loss windows for {KILLS} kills: {lw:?}",
        lw.len()
    );
    for &(k, r) in &windows {
        assert!(
            lw.iter().any(|w| w.from_ms <= k && k <= w.to_ms),
            "kill at {k} (restart {r}) is inside no reported loss window: {lw:?}"
        );
    }
    // (start, end) of every run: each killed one, then the last.
    let runs: Vec<(u64, u64)> = starts
        .iter()
        .zip(&windows)
        .map(|(&s, &(k, _))| (s, k))
        .chain(std::iter::once((windows.last().unwrap().1, end)))
        .collect();
    for w in lw {
        assert!(
            runs.iter().any(|&(s, e)| s <= w.to_ms && w.to_ms <= e),
            "window {w:?} ends while no run was up; runs {runs:?}"
        );
    }

    // Every hole in sampled time lies inside a reported loss window.
    let mut by_point: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut seq_of: BTreeMap<(u32, u64), u64> = BTreeMap::new();
    for s in &stored {
        by_point.entry(s.point).or_default().push(s.ts_ms);
        seq_of.insert((s.point, s.ts_ms), s.seq);
    }
    let (mut lost_estimate, mut max_lost_ms, mut jitter_gaps) = (0u64, 0u64, 0u64);
    let (mut judged, mut over_window) = (0usize, Vec::new());
    for (p, ts) in &by_point {
        for w in ts.windows(2) {
            assert!(
                w[1] > w[0],
                "point {p}: timestamps not increasing: {} (seq {:?}) then {} (seq {:?}); kills {windows:?}",
                w[0],
                seq_of.get(&(*p, w[0])),
                w[1],
                seq_of.get(&(*p, w[1]))
            );
            if w[1] - w[0] <= 2 * INTERVAL_MS || w[1] >= end {
                continue;
            }
            // A gap that spans no kill is polling jitter on a loaded machine
            // (a tick late by more than an interval is skipped): the process
            // kept running, so nothing it sampled can have been lost.
            if !windows.iter().any(|&(k, _)| w[0] <= k && k <= w[1]) {
                jitter_gaps += 1;
                continue;
            }
            // Missing: the samples after w[0] and before w[1]. Those taken
            // before the kill must lie in a reported window; the rest of the
            // hole is downtime and start-up (the agent restarted at `to_ms`
            // and samples again once its drivers run), not loss.
            let first_missing = w[0] + INTERVAL_MS;
            let covered = lw.iter().any(|x| {
                first_missing + SLACK_MS >= x.from_ms
                    && first_missing <= x.to_ms + SLACK_MS
                    && w[1] + SLACK_MS >= x.to_ms
            });
            assert!(
                covered,
                "point {p}: hole {}..{} ms (seq {:?}..{:?}) spans a kill but is not inside a reported loss window; windows {lw:?}; kills {windows:?}",
                w[0],
                w[1],
                seq_of.get(&(*p, w[0])),
                seq_of.get(&(*p, w[1]))
            );
        }
        // Samples taken but lost to each kill (the rest of a hole is downtime),
        // once the process has been up a while. That each loss is reported
        // is checked above, whatever its size; its size depends on how far
        // the pipeline lags behind a loaded CPU, so it is measured here, and
        // only most kills (not every one) must stay within the documented
        // window: one late commit under a CPU spike is not a bug, group
        // commit not working at all would be.
        for (&(k, _), &started) in windows.iter().zip(&starts) {
            let before = ts.iter().rev().find(|&&t| t <= k).copied().unwrap_or(k);
            lost_estimate += k.saturating_sub(before) / INTERVAL_MS;
            if before >= started && k - started >= 2_000 {
                max_lost_ms = max_lost_ms.max(k - before);
                judged += 1;
                if k - before > WINDOW_MS {
                    over_window.push((*p, k, k - before));
                }
            }
        }
    }
    assert!(
        over_window.len() * 4 <= judged,
        "{} of {judged} (point, kill) losses over the documented {WINDOW_MS} ms: {over_window:?}",
        over_window.len()
    );
    println!(
        "{KILLS} SIGKILLs ({during_drain} during a drain): hub holds {} samples, seq gap-free and \
         duplicate-free; {} loss windows reported ({merged} kills before the store opened shared the next window); samples lost in them ≈ {lost_estimate}, \
         worst {max_lost_ms} ms before a kill (documented bound {WINDOW_MS} ms, exceeded {} times of {judged}); \
         {jitter_gaps} polling-jitter gaps outside kills",
        stored.len(),
        lw.len(),
        over_window.len(),
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), harness.stop()).await;
}
