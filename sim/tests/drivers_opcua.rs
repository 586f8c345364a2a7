//! OPC UA driver against the simulated async-opcua server: many monitored
//! items in one subscription, deadband filters, polling fallback, server
//! restarts (subscriptions re-created) and Basic256Sha256 security.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::float_cmp
)]

mod drivers_support;

use std::collections::{HashMap, HashSet};

use std::path::Path;
use std::time::Duration;

use drivers_support::*;
use edge_node::clock::Clock;
use edge_node::drivers::backoff::BackoffConfig;
use edge_node::drivers::health::counter;
use edge_node::drivers::opcua::{MONITORED_ITEMS, POLLED_POINTS, SUBSCRIPTIONS};
use edge_node::drivers::{self, DriverOptions, OpcUaMode, OpcUaOptions};
use protocols::{Device, DeviceProtocol, OpcUaSecurity, Point, PointAddress, PointGroup, Quality};
use sim::devices::opcua::{OpcUaSim, OpcUaSimConfig, SimVariable, VarKind};
use sim::signal::Model;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn kinds(i: u32) -> VarKind {
    match i % 5 {
        0 => VarKind::Double,
        1 => VarKind::Float,
        2 => VarKind::Int32,
        3 => VarKind::UInt16,
        _ => VarKind::Boolean,
    }
}

async fn start_sim(n: u32, pki: &Path) -> OpcUaSim {
    init_tracing();
    let variables = (0..n)
        .map(|i| SimVariable {
            id: i,
            name: format!("v{i}"),
            kind: kinds(i),
            model: if kinds(i) == VarKind::Boolean {
                Model::sine(1.0, 0.5, 0.0) // toggles every 250 ms
            } else {
                Model::sine(100.0, 1.0 + f64::from(i % 7), 200.0)
            },
        })
        .collect();
    OpcUaSim::start(OpcUaSimConfig {
        variables,
        tick: Duration::from_millis(50),
        seed: 11,
        pki_dir: pki.join("server"),
        ..OpcUaSimConfig::default()
    })
    .await
    .unwrap()
}

fn options(pki: &Path) -> DriverOptions {
    DriverOptions {
        backoff: BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            factor: 2.0,
            jitter: 0.3,
        },
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        jitter_seed: Some(9),
        opcua: OpcUaOptions {
            pki_dir: pki.join("client"),
            trust_server_certs: true,
            ..OpcUaOptions::default()
        },
        ..DriverOptions::default()
    }
}

fn point(sim: &OpcUaSim, index: u32, var: u32, deadband: Option<f64>) -> Point {
    Point {
        index,
        name: format!("p{index}"),
        address: PointAddress::OpcUa {
            node_id: sim.node_id(&format!("v{var}")),
            deadband,
        },
        scale: 1.0,
        offset: 0.0,
        range: None,
        unit: None,
    }
}

fn opc_device(sim: &OpcUaSim, security: OpcUaSecurity, groups: Vec<PointGroup>) -> Device {
    Device {
        id: "ua".into(),
        protocol: DeviceProtocol::OpcUa {
            endpoint: sim.endpoint(),
            security,
            username: None,
            password_file: None,
        },
        groups,
    }
}

/// Sampling and publishing interval of the big group.
const INTERVAL_MS: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_items_in_one_subscription_match_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2000;
    let sim = start_sim(n, dir.path()).await;
    let points: Vec<Point> = (0..n).map(|i| point(&sim, i, i, None)).collect();
    let dev = opc_device(
        &sim,
        OpcUaSecurity::None,
        vec![PointGroup {
            name: "all".into(),
            interval_ms: INTERVAL_MS,
            points,
        }],
    );
    let (tx, mut rx) = mpsc::channel(1024);
    let h = drivers::spawn_with(
        dev,
        options(dir.path()),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    let idx: Vec<u32> = (0..n).collect();
    let mut count: HashMap<u32, u32> = HashMap::new();
    let samples = until_all(&mut rx, &idx, |s| {
        assert_eq!(s.quality, Quality::GOOD, "{s:?}");
        let c = count.entry(s.point).or_default();
        *c += 1;
        *c >= 2
    })
    .await;
    let st = h.status();
    h.stop().await;
    assert_eq!(
        st.counters[SUBSCRIPTIONS], 1,
        "one subscription for the group: {st:?}"
    );
    assert_eq!(st.counters[MONITORED_ITEMS], u64::from(n));
    assert_eq!(st.counters.get(POLLED_POINTS).copied().unwrap_or(0), 0);
    assert!(st.counters[counter::NOTIFICATIONS] >= u64::from(2 * n));
    for i in [0u32, 1, 2, 3, 4, 999, 1999] {
        let served = sim.served(i);
        for s in samples.iter().filter(|s| s.point == i) {
            // The sample carries the device's source timestamp, and the value
            // it reports was the variable's current value at that time. The
            // server may shift the timestamp by up to one sampling interval
            // (it samples faster than the item's interval), so the value must
            // have been current at some instant in [ts - interval, ts]. No
            // wall-clock bound: under load the simulator's ticker can stall
            // for a second, and a value then stays current that long.
            let from = s.ts_ms.saturating_sub(INTERVAL_MS);
            let at_from = served.iter().rfind(|(t, _)| *t <= from).map(|(_, v)| *v);
            let current_in_window = at_from
                .into_iter()
                .chain(
                    served
                        .iter()
                        .filter(|(t, _)| *t > from && *t <= s.ts_ms)
                        .map(|(_, v)| *v),
                )
                .any(|v| v.to_bits() == s.value.to_bits());
            assert!(
                current_in_window,
                "v{i}: {} was not the served value at any time in [{from}, {}]; served: {:?}",
                s.value,
                s.ts_ms,
                served
                    .iter()
                    .filter(|(t, _)| t + 2_000 > s.ts_ms && *t < s.ts_ms + 1_000)
                    .collect::<Vec<_>>()
            );
        }
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_deadband_reduces_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(1, dir.path()).await; // v0: sine ±100 over 1 s, Double
    let points = vec![point(&sim, 0, 0, None), point(&sim, 1, 0, Some(60.0))];
    let dev = opc_device(
        &sim,
        OpcUaSecurity::None,
        vec![PointGroup {
            name: "g".into(),
            interval_ms: 50,
            points,
        }],
    );
    let (tx, mut rx) = mpsc::channel(1024);
    let h = drivers::spawn_with(
        dev,
        options(dir.path()),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    let mut n = [0u32; 2];
    let mut last_db: Option<f64> = None;
    // The predicate sees every sample of both points; it is done once the
    // undamped point has 40 samples.
    until_all(&mut rx, &[0, 1], |s| {
        n[s.point as usize] += 1;
        if s.point == 1 {
            if let Some(prev) = last_db {
                assert!(
                    (s.value - prev).abs() > 60.0,
                    "deadband violated: {prev} -> {}",
                    s.value
                );
            }
            last_db = Some(s.value);
        }
        n[0] >= 40
    })
    .await;
    h.stop().await;
    assert!(
        n[1] >= 1 && n[1] * 2 < n[0],
        "with deadband {} vs without {}",
        n[1],
        n[0]
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_mode_and_fallback_for_refused_items() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(10, dir.path()).await;
    // Subscribe mode: an unknown node is refused by the server and polled,
    // reporting bad quality, while the others are monitored.
    let mut pts: Vec<Point> = (0..5).map(|i| point(&sim, i, i, None)).collect();
    let mut missing = point(&sim, 99, 0, None);
    // No node manager owns namespace 77: the server refuses the item.
    missing.address = PointAddress::OpcUa {
        node_id: "ns=77;s=missing".into(),
        deadband: None,
    };
    pts.push(missing);
    let dev = opc_device(
        &sim,
        OpcUaSecurity::None,
        vec![PointGroup {
            name: "g".into(),
            interval_ms: 100,
            points: pts,
        }],
    );
    let (tx, mut rx) = mpsc::channel(256);
    let h = drivers::spawn_with(
        dev,
        options(dir.path()),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    until_all(&mut rx, &[0, 1, 2, 3, 4], good).await;
    let bad = until_any(&mut rx, |s| s.point == 99).await;
    assert_eq!(bad.quality, Quality::BAD);
    assert_eq!(h.health().counter(POLLED_POINTS), 1);
    h.stop().await;

    // Poll mode: Read requests only, no subscription.
    let mut o = options(dir.path());
    o.opcua.mode = OpcUaMode::Poll;
    let pts: Vec<Point> = (0..10).map(|i| point(&sim, i, i, None)).collect();
    let dev = opc_device(
        &sim,
        OpcUaSecurity::None,
        vec![PointGroup {
            name: "g".into(),
            interval_ms: 50,
            points: pts,
        }],
    );
    let (tx, mut rx) = mpsc::channel(256);
    let h = drivers::spawn_with(dev, o, tx, Clock::system(), CancellationToken::new());
    let idx: Vec<u32> = (0..10).collect();
    let samples = until_all(&mut rx, &idx, good).await;
    let st = h.status();
    h.stop().await;
    assert_eq!(st.counters.get(SUBSCRIPTIONS).copied().unwrap_or(0), 0);
    assert!(st.counters[counter::READS] >= 1);
    for s in samples.iter().filter(|s| s.quality == Quality::GOOD) {
        let served: HashSet<u64> = sim
            .served(s.point)
            .iter()
            .map(|(_, v)| v.to_bits())
            .collect();
        assert!(served.contains(&s.value.to_bits()));
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_recreates_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let n = 200;
    let sim = start_sim(n, dir.path()).await;
    let points: Vec<Point> = (0..n).map(|i| point(&sim, i, i, None)).collect();
    let dev = opc_device(
        &sim,
        OpcUaSecurity::None,
        vec![PointGroup {
            name: "g".into(),
            interval_ms: 100,
            points,
        }],
    );
    let (tx, mut rx) = mpsc::channel(1024);
    let h = drivers::spawn_with(
        dev,
        options(dir.path()),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    let idx: Vec<u32> = (0..n).collect();
    until_all(&mut rx, &idx, good).await;
    for round in 0..2 {
        sim.go_down().await;
        until_all(&mut rx, &idx, |s| s.quality == Quality::BAD_NOT_CONNECTED).await;
        eventually("driver sees the loss", || !h.status().connected).await;
        sim.come_up().await.unwrap();
        // Fresh server: no session, no subscription. Values flow again only
        // if the driver re-created them.
        until_all(&mut rx, &idx, good).await;
        assert!(h.status().connected, "round {round}");
    }
    let st = h.status();
    assert!(st.counters[counter::RECONNECTS] >= 2, "{st:?}");
    assert!(!h.is_finished());
    h.stop().await;
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic256sha256_sign_and_encrypt() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(20, dir.path()).await;
    for security in [OpcUaSecurity::Sign, OpcUaSecurity::SignAndEncrypt] {
        let points: Vec<Point> = (0..20).map(|i| point(&sim, i, i, None)).collect();
        let dev = opc_device(
            &sim,
            security,
            vec![PointGroup {
                name: "g".into(),
                interval_ms: 100,
                points,
            }],
        );
        let (tx, mut rx) = mpsc::channel(256);
        let h = drivers::spawn_with(
            dev,
            options(dir.path()),
            tx,
            Clock::system(),
            CancellationToken::new(),
        );
        let idx: Vec<u32> = (0..20).collect();
        until_all(&mut rx, &idx, good).await;
        assert!(h.status().connected, "{security:?}");
        h.stop().await;
    }
    // The client made its own key pair in its PKI directory.
    assert!(
        dir.path()
            .join("client")
            .join("own")
            .join("cert.der")
            .exists()
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_retried_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let sim = start_sim(5, dir.path()).await;
    sim.go_down().await;
    let points: Vec<Point> = (0..5).map(|i| point(&sim, i, i, None)).collect();
    let dev = opc_device(
        &sim,
        OpcUaSecurity::None,
        vec![PointGroup {
            name: "g".into(),
            interval_ms: 100,
            points,
        }],
    );
    let (tx, mut rx) = mpsc::channel(256);
    let h = drivers::spawn_with(
        dev,
        options(dir.path()),
        tx,
        Clock::system(),
        CancellationToken::new(),
    );
    eventually("connect failures counted", || {
        h.health().counter(counter::CONNECT_FAILURES) >= 2
    })
    .await;
    assert!(!h.status().connected);
    sim.come_up().await.unwrap();
    until_all(&mut rx, &[0, 1, 2, 3, 4], good).await;
    h.stop().await;
    sim.stop().await;
}
