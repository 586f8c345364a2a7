//! Certificate rotation without restart, against a real hub and a real
//! edge node on loopback: a node streaming telemetry renews its short-lived
//! certificate (new key each time) at least twice, its MQTT link and
//! artifact fetcher switch to it in place, and every sample it appended
//! reaches the hub exactly once. A revoked node's renewal is refused and it
//! is cut off.
//!
//! The hub's `[security] node_cert_validity` must be at least 1 minute in a
//! config file (`HubConfig::validate`, what the binary runs); these tests
//! build the config in process and set a few seconds so two rotations fit
//! in a test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    clippy::needless_pass_by_value,
    reason = "test code"
)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use edge_node::Clock;
use edgefleet_testkit::{EdgeHarness, HubHarness, eventually};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(90);
const VALIDITY: Duration = Duration::from_secs(8);

fn desired(node: &str, devices: serde_json::Value) -> serde_json::Value {
    json!({
        "node": node,
        "revision": 0,
        "devices": devices,
        "config": {"batch_max_samples": 20, "batch_max_age_ms": 50, "report_interval_ms": 200, "raw_stream": "raw"}
    })
}

fn synthetic() -> serde_json::Value {
    json!([{"id": "gen", "protocol": {"kind": "synthetic"},
            "groups": [{"name": "fast", "interval_ms": 10, "points": [
                {"index": 0, "name": "p0", "address": {"kind": "synthetic",
                 "signal": {"shape": "sine", "amplitude": 10.0, "period_s": 5.0}}},
                {"index": 1, "name": "p1", "address": {"kind": "synthetic",
                 "signal": {"shape": "sine", "amplitude": 3.0, "period_s": 2.0}}}]}]}])
}

/// A hub issuing `VALIDITY` certificates and an edge joined with one.
async fn start(dir: &std::path::Path) -> (HubHarness, EdgeHarness) {
    let mut cfg = HubHarness::config(&dir.join("hub"));
    cfg.security.node_cert_validity = VALIDITY;
    let hub = HubHarness::start(cfg).await.unwrap();
    hub.wait_ready(DEADLINE).await.unwrap();
    let edge_dir = dir.join("edge");
    let mut ecfg = hub.edge_config("n1", &edge_dir);
    // Replace the harness's day-long certificate by a short one.
    let keyed = hub
        .hub
        .ca
        .issue_keyed(&cloud_hub::ca::Identity::node("n1"), VALIDITY)
        .unwrap();
    edge_node::identity::Identity {
        key_pem: keyed.key_pem,
        cert_pem: keyed.cert_pem,
        ca_pem: hub.hub.ca.cert_pem().to_owned(),
        hub_public_key: hub.public_key.clone(),
    }
    .write(&edge_dir)
    .unwrap();
    ecfg.identity.retry_min = Duration::from_millis(200);
    ecfg.identity.retry_max = Duration::from_secs(1);
    let edge = EdgeHarness::start(ecfg, Clock::system()).await.unwrap();
    (hub, edge)
}

fn counter(n: &cloud_hub::api::NodeView, name: &str) -> u64 {
    n.reported
        .as_ref()
        .and_then(|r| r.counters.get(name).copied())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_node_rotates_twice_in_place_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, edge) = start(dir.path()).await;
    let id_dir = edge_node::identity::dir(&dir.path().join("edge"));
    let first_key = std::fs::read_to_string(id_dir.join("node.key")).unwrap();
    hub.client
        .put_desired_json("n1", &desired("n1", synthetic()))
        .await
        .unwrap();
    eventually("telemetry flows", DEADLINE, || async {
        let n = hub.client.node("n1").await.ok().flatten()?;
        (n.telemetry.samples >= 50).then_some(())
    })
    .await;
    // Two renewals while the devices stream; each one reconnects the link
    // with the new certificate, and the hub keeps receiving.
    let mut keys = vec![first_key];
    for round in 1..=2u64 {
        eventually(&format!("renewal {round}"), DEADLINE, || async {
            (edge.counters.cert_renewals.load(Ordering::Relaxed) >= round).then_some(())
        })
        .await;
        let key = std::fs::read_to_string(id_dir.join("node.key")).unwrap();
        assert!(!keys.contains(&key), "renewal {round} made a new key");
        keys.push(key);
        let before = hub
            .client
            .node("n1")
            .await
            .unwrap()
            .unwrap()
            .telemetry
            .samples;
        eventually(
            &format!("telemetry flows after renewal {round}"),
            DEADLINE,
            || async {
                let n = hub.client.node("n1").await.ok().flatten()?;
                (n.telemetry.samples > before + 50).then_some(())
            },
        )
        .await;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(id_dir.join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(!id_dir.join("node.crt.new").exists());
    // The counters reach the hub in reported state.
    eventually("renewals are reported", DEADLINE, || async {
        let n = hub.client.node("n1").await.ok().flatten()?;
        (counter(&n, "cert_renewals") >= 2).then_some(())
    })
    .await;
    assert_eq!(
        edge.counters.cert_renewal_failures.load(Ordering::Relaxed),
        0
    );
    // The current certificate on disk is what the hub issued last and
    // still valid well after the first one expired.
    let id = edge_node::identity::Identity::load(&dir.path().join("edge"))
        .unwrap()
        .unwrap();
    id.certified_key().unwrap();

    // Ground truth: the devices stop (a desired state without them), the
    // edge's outbox drains, and then every sample it appended is at the hub
    // once, under its own sequence number, and acked.
    let store = edge.store.clone();
    hub.client
        .put_desired_json("n1", &desired("n1", json!([])))
        .await
        .unwrap();
    let appended = eventually("the edge's outbox is fully acked", DEADLINE, || async {
        let n = hub.client.node("n1").await.ok().flatten()?;
        let ob = store.outbox("raw").ok()?.stats();
        (n.reported?.applied_revision == 2 && ob.next_seq > 1 && ob.acked == ob.next_seq - 1)
            .then_some(ob.next_seq - 1)
    })
    .await;
    let ob = store.outbox("raw").unwrap().stats();
    assert_eq!((ob.dropped, ob.next_seq - 1), (0, appended), "{ob:?}");
    let stored: Vec<u64> = hub
        .client
        .all_samples("n1", "raw", 0)
        .await
        .unwrap()
        .iter()
        .map(|s| s.seq)
        .collect();
    assert_eq!(
        stored,
        (1..=appended).collect::<Vec<_>>(),
        "exactly once, gap-free"
    );
    edge.stop().await.unwrap();
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_cannot_renew_and_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, edge) = start(dir.path()).await;
    hub.client
        .put_desired_json("n1", &desired("n1", synthetic()))
        .await
        .unwrap();
    eventually("telemetry flows", DEADLINE, || async {
        let n = hub.client.node("n1").await.ok().flatten()?;
        (n.telemetry.samples >= 50).then_some(())
    })
    .await;
    hub.client.revoke("n1").await.unwrap();
    let renewed = edge.counters.cert_renewals.load(Ordering::Relaxed);
    eventually("the renewal is refused", DEADLINE, || async {
        (edge.counters.cert_renewal_failures.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await;
    assert_eq!(
        edge.counters.cert_renewals.load(Ordering::Relaxed),
        renewed,
        "no renewal after the revocation"
    );
    eventually("the gate cut the node off", DEADLINE, || async {
        let m = hub.client.metrics().await.ok()?;
        m.lines()
            .any(|l| {
                l.starts_with("edgefleet_hub_broker_refused_total{reason=\"revoked\"}")
                    && !l.ends_with(" 0")
            })
            .then_some(())
    })
    .await;
    // Nothing more arrives from it (after what was already in the hub's
    // ingest when the gate cut it off).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = hub
        .client
        .node("n1")
        .await
        .unwrap()
        .unwrap()
        .telemetry
        .samples;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = hub
        .client
        .node("n1")
        .await
        .unwrap()
        .unwrap()
        .telemetry
        .samples;
    assert_eq!(
        settled, later,
        "a revoked node's telemetry is not forwarded"
    );
    assert!(edge.store.outbox("raw").unwrap().stats().next_seq > 1);
    edge.stop().await.unwrap();
    hub.stop().await.unwrap();
}
