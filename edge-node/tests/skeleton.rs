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

use cloud_hub::api::{NodeView, SamplePage};
use cloud_hub::{App, HubConfig};
use edge_node::{Agent, Clock, EdgeConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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
    let cancel = CancellationToken::new();
    let mut hub_cfg = HubConfig::default();
    hub_cfg.data_dir = dir.path().join("hub");
    hub_cfg.http_listen = "127.0.0.1:0".parse().unwrap();
    hub_cfg.embedded_broker.as_mut().unwrap().listen = "127.0.0.1:0".parse().unwrap();
    hub_cfg.ack_interval = Duration::from_millis(50);
    let app = App::start(hub_cfg, cancel.clone()).await.unwrap();
    let base = format!("http://{}", app.http_addr());
    let (host, port) = app.mqtt_addr();
    let hub_key: serde_json::Value = reqwest::get(format!("{base}/v1/hub"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hub_task = tokio::spawn(app.run());

    let mut edge_cfg = EdgeConfig::default();
    edge_cfg.node = "n1".into();
    edge_cfg.data_dir = dir.path().join("edge");
    edge_cfg.mqtt.host = host;
    edge_cfg.mqtt.port = port;
    edge_cfg.hub.public_key = Some(hub_key["public_key"].as_str().unwrap().to_owned());
    edge_cfg.validate().unwrap();
    let agent = Agent::start(edge_cfg, Clock::system(), cancel.clone())
        .await
        .unwrap();
    let edge_task = tokio::spawn(agent.run());

    let http = reqwest::Client::new();
    let put = |body: serde_json::Value| {
        let http = http.clone();
        let url = format!("{base}/v1/nodes/n1/desired");
        async move { http.put(url).json(&body).send().await.unwrap() }
    };
    let node = |base: String| async move {
        let r = reqwest::get(format!("{base}/v1/nodes/n1")).await.ok()?;
        r.status().is_success().then_some(())?;
        r.json::<NodeView>().await.ok()
    };

    assert!(put(desired(1, 1)).await.status().is_success());
    wait_for("revision 1 applied", || async {
        node(base.clone())
            .await
            .filter(|n| n.reported.as_ref().is_some_and(|r| r.applied_revision == 1))
    })
    .await;

    // Bad input: errors name the field; stale revisions conflict.
    let mut bad = desired(3, 1);
    bad["devices"][0]["groups"][0]["interval_ms"] = json!(1);
    let r = put(bad).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("devices[0].groups[0].interval_ms: 1 is out of range"),
        "{text}"
    );
    let r = put(desired(1, 2)).await;
    assert_eq!(r.status(), 409, "{}", r.text().await.unwrap());

    assert!(put(desired(2, 3)).await.status().is_success());
    let n = wait_for("revision 2 applied and telemetry counted", || async {
        node(base.clone()).await.filter(|n| {
            n.reported.as_ref().is_some_and(|r| r.applied_revision == 2)
                && n.telemetry.samples >= 100
                && n.status
                    .as_ref()
                    .is_some_and(|s| s.state == protocols::NodeState::Online)
        })
    })
    .await;
    assert_eq!(n.desired_revision, 2);
    assert_eq!(n.telemetry.bad_payloads, 0);

    // The edge's outbox drains as the hub acks.
    wait_for("acks reach the edge", || async {
        let n = node(base.clone()).await?;
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
    let page: SamplePage = reqwest::get(format!(
        "{base}/v1/nodes/n1/streams/raw/samples?limit=1000000"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(page.samples.len() >= 100);
    for (i, s) in page.samples.iter().enumerate() {
        assert_eq!(s.seq, i as u64 + 1, "gap or duplicate at position {i}");
    }
    // Revision 2 added points 1 and 2: their samples arrived.
    assert!(page.samples.iter().any(|s| s.point == 2));

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), edge_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), hub_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
