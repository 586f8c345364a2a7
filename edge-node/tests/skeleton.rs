//! Walking skeleton: a real hub (embedded broker, sled registry, REST API) and a
//! real edge node in one process, talking MQTT over 127.0.0.1.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code"
)]

use std::time::Duration;

use cloud_hub::api::{NodeView, SampleQuery};
use edge_node::Clock;
use edgefleet_testkit::{EdgeHarness, HubHarness, eventually};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

fn desired(revision: u64, points: u32) -> serde_json::Value {
    let pts: Vec<_> = (0..points)
        .map(|i| {
            json!({"index": i, "name": format!("p{i}"),
                   "address": {"kind": "synthetic", "signal": {"shape": "sine", "amplitude": 10.0, "period_s": 5.0}}})
        })
        .collect();
    json!({
        "node": "n1",
        "revision": revision,
        "devices": [{"id": "gen", "protocol": {"kind": "synthetic"},
                     "groups": [{"name": "fast", "interval_ms": 50, "points": pts}]}],
        "config": {"batch_max_samples": 50, "batch_max_age_ms": 200, "report_interval_ms": 200, "raw_stream": "raw"}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_edge_converge_and_telemetry_flows() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubHarness::start(HubHarness::config(&dir.path().join("hub")))
        .await
        .unwrap();
    let edge = EdgeHarness::start(
        hub.edge_config("n1", &dir.path().join("edge")),
        Clock::system(),
    )
    .await
    .unwrap();

    let put = |body: serde_json::Value| {
        let client = hub.client.clone();
        async move { client.put_desired_json("n1", &body).await }
    };
    let node = || async { hub.client.node("n1").await.ok().flatten() };

    put(desired(1, 1)).await.unwrap();
    eventually("revision 1 applied", DEADLINE, || async {
        node()
            .await
            .filter(|n| n.reported.as_ref().is_some_and(|r| r.applied_revision == 1))
    })
    .await;

    // Bad input: errors name the field; stale revisions conflict.
    let mut bad = desired(3, 1);
    bad["devices"][0]["groups"][0]["interval_ms"] = json!(1);
    let e = put(bad).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        e.to_string()
            .contains("devices[0].groups[0].interval_ms: 1 is out of range"),
        "{e}"
    );
    let e = put(desired(1, 2)).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");

    put(desired(2, 3)).await.unwrap();
    let n = eventually(
        "revision 2 applied and telemetry counted",
        DEADLINE,
        || async {
            node().await.filter(|n: &NodeView| {
                n.reported.as_ref().is_some_and(|r| r.applied_revision == 2)
                    && n.telemetry.samples >= 100
                    && n.status
                        .as_ref()
                        .is_some_and(|s| s.state == protocols::NodeState::Online)
            })
        },
    )
    .await;
    assert_eq!(n.desired_revision, 2);
    assert_eq!(n.telemetry.bad_payloads, 0);

    // The edge's outbox drains as the hub acks.
    eventually("acks reach the edge", DEADLINE, || async {
        let n = node().await?;
        (n.reported?
            .counters
            .get("samples_acked")
            .copied()
            .unwrap_or(0)
            > 0)
        .then_some(())
    })
    .await;

    // Every stored sample is there once, sequence numbers gap-free from 1.
    let page = hub
        .client
        .samples(
            "n1",
            "raw",
            &SampleQuery {
                limit: Some(SampleQuery::MAX_LIMIT),
                ..SampleQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(page.samples.len() >= 100);
    for (i, s) in page.samples.iter().enumerate() {
        assert_eq!(s.seq, i as u64 + 1, "gap or duplicate at position {i}");
    }
    // Revision 2 added points 1 and 2: their samples arrived.
    assert!(page.samples.iter().any(|s| s.point == 2));

    tokio::time::timeout(Duration::from_secs(10), edge.stop())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), hub.stop())
        .await
        .unwrap()
        .unwrap();
}
