//! The attacks of `../shared/design/reviews/security.md`, played against a
//! real hub and a real edge node on loopback, each asserted refused and
//! counted, with the ground truth checked at the end: every sample the edge
//! durably appended reaches the hub exactly once, and nothing else below it.
//!
//! The broker's gate refuses a node that publishes on another node's topics
//! (`cloud-hub/tests/broker_gate.rs`). The attacker here holds a hub-role
//! certificate, which the gate lets publish anything: the powers anyone has
//! on a misconfigured broker (an external broker without the shipped ACL, or
//! a leaked hub credential). These are the defence-in-depth layers that must
//! hold even then: signed acks, the published clamp, the confirmed
//! floor, sequence bounds, document bounds, name checks, signed desired
//! state without trust on first use, hub-assigned revisions and the
//! gateway's own policy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    clippy::needless_pass_by_value,
    reason = "test code"
)]

use std::time::Duration;

use edge_node::Clock;
use edgefleet_testkit::{EdgeHarness, HubHarness, eventually};
use protocols::codec::{encode_batch, encode_json};
use protocols::signing::SigningKey;
use protocols::{Ack, Quality, Sample, SignedAck, SignedDesired, TelemetryBatch, TopicKind};
use rumqttc::{AsyncClient, QoS};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

fn desired(node: &str, revision: u64, devices: serde_json::Value) -> serde_json::Value {
    json!({
        "node": node,
        "revision": revision,
        "devices": devices,
        "config": {"batch_max_samples": 20, "batch_max_age_ms": 100, "report_interval_ms": 200, "raw_stream": "raw"}
    })
}

fn synthetic() -> serde_json::Value {
    json!([{"id": "gen", "protocol": {"kind": "synthetic"},
            "groups": [{"name": "fast", "interval_ms": 20, "points": [
                {"index": 0, "name": "p0", "address": {"kind": "synthetic",
                 "signal": {"shape": "sine", "amplitude": 10.0, "period_s": 5.0}}}]}]}])
}

/// An MQTT client of the attacker with a hub-role certificate (the broker
/// lets it publish anywhere); its event loop runs on its own task (never
/// publish from the polling task).
fn attacker(hub: &HubHarness, id: &str) -> AsyncClient {
    let mut opts = hub
        .mqtt_options(id, &cloud_hub::ca::Identity::hub(id))
        .unwrap();
    opts.set_max_packet_size(
        protocols::limits::MAX_SYNC_PACKET_BYTES,
        protocols::limits::MAX_SYNC_PACKET_BYTES,
    );
    let (client, mut lp) = AsyncClient::new(opts, 64);
    tokio::spawn(async move { while lp.poll().await.is_ok() {} });
    client
}

fn batch(first_seq: u64, floor_seq: u64, n: u64) -> TelemetryBatch {
    TelemetryBatch {
        stream: "raw".into(),
        first_seq,
        floor_seq,
        samples: (0..n)
            .map(|i| Sample {
                point: 0,
                ts_ms: 1_000 + i,
                value: -1.0,
                quality: Quality::GOOD,
            })
            .collect(),
    }
}

fn counter(n: &cloud_hub::api::NodeView, name: &str) -> u64 {
    n.reported
        .as_ref()
        .and_then(|r| r.counters.get(name).copied())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acks_telemetry_floors_and_documents_are_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubHarness::start(HubHarness::config(&dir.path().join("hub")))
        .await
        .unwrap();
    hub.wait_ready(DEADLINE).await.unwrap();
    let edge = EdgeHarness::start(
        hub.edge_config("n1", &dir.path().join("edge")),
        Clock::system(),
    )
    .await
    .unwrap();
    hub.client
        .put_desired_json("n1", &desired("n1", 0, synthetic()))
        .await
        .unwrap();
    eventually(
        "telemetry flows and acks reach the edge",
        DEADLINE,
        || async {
            let n = hub.client.node("n1").await.ok().flatten()?;
            (n.telemetry.samples >= 50 && counter(&n, "samples_acked") > 0).then_some(())
        },
    )
    .await;

    let evil = attacker(&hub, "mallory");
    let topic = |kind| hub.hub.topics.node("n1", kind);
    let attacker_key = SigningKey::from_bytes(&[66; 32]);

    // 1. Forged acks (C3): a bare ack for everything, an ack signed by the
    //    wrong key, and a properly signed ack for another node replayed here.
    let bare = encode_json(
        "ack",
        &Ack {
            stream: "raw".into(),
            up_to_seq: u64::MAX,
        },
    )
    .unwrap();
    let wrong_key = SignedAck::sign(
        "n1",
        &Ack {
            stream: "raw".into(),
            up_to_seq: u64::MAX,
        },
        &attacker_key,
    )
    .unwrap()
    .encode()
    .unwrap();
    let other_node = SignedAck::sign(
        "n2",
        &Ack {
            stream: "raw".into(),
            up_to_seq: u64::MAX,
        },
        &hub.hub.key,
    )
    .unwrap()
    .encode()
    .unwrap();
    // H6: acks for invented streams never create outboxes.
    let invented: Vec<Vec<u8>> = (0..50)
        .map(|i| {
            encode_json(
                "ack",
                &Ack {
                    stream: format!("junk{i}"),
                    up_to_seq: 1,
                },
            )
            .unwrap()
        })
        .collect();
    for p in [bare, wrong_key, other_node].into_iter().chain(invented) {
        evil.publish(topic(TopicKind::Ack), QoS::AtLeastOnce, false, p)
            .await
            .unwrap();
    }

    // 2. Forged telemetry (C4, H3): a floor jump, sequence numbers past the
    //    bound, and a batch on an invented stream.
    let jump = encode_batch(&batch(1_000_000, 1_000_000, 1));
    let top = {
        // Built by hand: the encoder refuses nothing, the hub's decoder must.
        let b = batch(protocols::limits::MAX_SEQ, 1, 2);
        encode_batch(&b)
    };
    for p in [jump, top] {
        evil.publish(topic(TopicKind::Telemetry), QoS::AtLeastOnce, false, p)
            .await
            .unwrap();
    }

    // 3. Oversized and misattributed documents (H4, M1, M5).
    let huge_event = vec![b'x'; 64 * 1024];
    evil.publish(
        topic(TopicKind::Events),
        QoS::AtLeastOnce,
        false,
        huge_event,
    )
    .await
    .unwrap();
    let other_event = encode_json(
        "event",
        &protocols::Event {
            node: "n9".into(),
            at_ms: 1,
            kind: protocols::EventKind::DesiredApplied { revision: 1 },
            message: "forged".into(),
        },
    )
    .unwrap();
    evil.publish(
        topic(TopicKind::Events),
        QoS::AtLeastOnce,
        false,
        other_event,
    )
    .await
    .unwrap();
    let bad_name = format!("{}/nodes/a%22b/telemetry", protocols::Topics::DEFAULT_ROOT);
    evil.publish(
        bad_name,
        QoS::AtLeastOnce,
        false,
        encode_batch(&batch(1, 1, 1)),
    )
    .await
    .unwrap();

    // Refused and counted, at the hub and at the edge.
    eventually("the hub counts every refusal", DEADLINE, || async {
        let m = &hub.hub.metrics;
        (m.floor_held.load(std::sync::atomic::Ordering::Relaxed) >= 1
            && m.refused("event_too_large") >= 1
            && m.refused("node_name") >= 1
            && hub.hub.metrics.node_telemetry("n1").bad_payloads >= 1)
            .then_some(())
    })
    .await;
    let n = eventually("the edge counts every refused ack", DEADLINE, || async {
        let n = hub.client.node("n1").await.ok().flatten()?;
        (counter(&n, "acks_refused_unsigned") >= 51
            && counter(&n, "acks_refused_bad_signature") >= 1
            && counter(&n, "acks_refused_wrong_node") >= 1)
            .then_some(n)
    })
    .await;
    assert!(
        hub.hub.events.recent("n9").is_empty(),
        "an event naming another node is not filed under it"
    );
    let metrics = hub.client.metrics().await.unwrap();
    assert!(
        metrics.contains("edgefleet_hub_refused_total{reason=\"event_too_large\"}"),
        "{metrics}"
    );
    // The floor jump did not move the watermark: the hub still acks only
    // what it stored, and the real data keeps arriving.
    let st = hub.client.streams("n1").await.unwrap()["raw"].clone();
    assert!(st.contiguous < 1_000_000, "{st:?}");
    assert_eq!(st.dropped_by_edge, 0, "{st:?}");
    let before = n.telemetry.samples;
    eventually("real telemetry keeps flowing", DEADLINE, || async {
        let n = hub.client.node("n1").await.ok().flatten()?;
        (n.telemetry.samples > before + 20).then_some(())
    })
    .await;

    // Ground truth: the devices stop (a desired state without them), the
    // edge's outbox drains, and then every sample it appended is at the hub
    // once, under its own sequence number, and acked.
    let store = edge.store.clone();
    hub.client
        .put_desired_json("n1", &desired("n1", 0, json!([])))
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
        .filter(|&q| q <= appended)
        .collect();
    assert_eq!(
        stored,
        (1..=appended).collect::<Vec<_>>(),
        "exactly once, gap-free"
    );
    edge.stop().await.unwrap();
    let outboxes: Vec<String> = store
        .outboxes()
        .iter()
        .map(|o| o.stream().to_owned())
        .collect();
    assert_eq!(outboxes, ["raw"], "no outbox was created by a forged ack");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_are_assigned_by_the_hub_so_no_client_can_lock_a_node_out() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubHarness::start(HubHarness::config(&dir.path().join("hub")))
        .await
        .unwrap();
    let put = |rev: serde_json::Value| {
        let mut body = desired("n1", 0, synthetic());
        body["revision"] = rev;
        let client = hub.client.clone();
        async move { client.put_desired_json("n1", &body).await }
    };
    // H1: 2^64-1 is refused, not stored.
    let e = put(json!(u64::MAX)).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("not the next revision"), "{e}");
    // 0 (or no revision at all) takes the next one.
    assert_eq!(put(json!(0)).await.unwrap().revision, 1);
    assert_eq!(put(serde_json::Value::Null).await.unwrap().revision, 2);
    // Naming the next one is optimistic concurrency: a stale writer learns.
    assert_eq!(put(json!(3)).await.unwrap().revision, 3);
    let e = put(json!(3)).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("current 3"), "{e}");
    let e = put(json!("three")).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert_eq!(
        hub.client
            .node("n1")
            .await
            .unwrap()
            .unwrap()
            .desired_revision,
        3
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_retained_desired_state_does_not_own_a_new_node_and_policy_refuses_pivots() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubHarness::start(HubHarness::config(&dir.path().join("hub")))
        .await
        .unwrap();
    hub.wait_ready(DEADLINE).await.unwrap();
    // C5: before n2 ever starts, the attacker leaves a retained document
    // signed by its own key, pointing the node at a device of its choice.
    let evil = attacker(&hub, "mallory");
    let forged: protocols::DesiredState =
        serde_json::from_value(desired("n2", 1_000, synthetic())).unwrap();
    let forged = SignedDesired::sign(&forged, &SigningKey::from_bytes(&[66; 32]))
        .unwrap()
        .encode()
        .unwrap();
    evil.publish(
        hub.hub.topics.node("n2", TopicKind::Desired),
        QoS::AtLeastOnce,
        true,
        forged,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let edge = EdgeHarness::start(
        hub.edge_config("n2", &dir.path().join("edge")),
        Clock::system(),
    )
    .await
    .unwrap();
    eventually("the forged document is refused", DEADLINE, || async {
        let evs = hub.client.events("n2").await.ok()?;
        evs.iter()
            .any(|e| matches!(e.kind, protocols::EventKind::DesiredRejected { .. }))
            .then_some(())
    })
    .await;
    // The real hub's document is applied: the node was not taken.
    hub.client
        .put_desired_json("n2", &desired("n2", 0, synthetic()))
        .await
        .unwrap();
    eventually("the hub's revision 1 is applied", DEADLINE, || async {
        let n = hub.client.node("n2").await.ok().flatten()?;
        (n.reported?.applied_revision == 1).then_some(())
    })
    .await;
    // M7/H2: even the real hub cannot point the gateway outside its policy
    // (default: loopback devices only, no serial device).
    let pivot = json!([
        {"id": "scan", "protocol": {"kind": "modbus-tcp", "host": "10.0.0.5", "port": 22},
         "groups": [{"name": "g", "interval_ms": 1000, "points": [
            {"index": 0, "name": "p", "address": {"kind": "modbus", "table": "holding", "address": 0}}]}]},
        {"id": "file", "protocol": {"kind": "modbus-rtu", "path": "/etc/passwd", "unit": 1},
         "groups": [{"name": "g", "interval_ms": 1000, "points": [
            {"index": 1, "name": "q", "address": {"kind": "modbus", "table": "holding", "address": 0}}]}]}
    ]);
    hub.client
        .put_desired_json("n2", &desired("n2", 0, pivot))
        .await
        .unwrap();
    let ev = eventually(
        "the gateway refuses the pivot, naming the fields",
        DEADLINE,
        || async {
            let evs = hub.client.events("n2").await.ok()?;
            evs.into_iter().find(|e| {
                matches!(
                    e.kind,
                    protocols::EventKind::DesiredRejected { revision: Some(2) }
                )
            })
        },
    )
    .await;
    assert!(
        ev.message.contains("devices[0].protocol.host: 10.0.0.5:22"),
        "{}",
        ev.message
    );
    assert!(
        ev.message.contains("devices[1].protocol.path"),
        "{}",
        ev.message
    );
    let n = hub.client.node("n2").await.unwrap().unwrap();
    assert_eq!(
        n.reported.unwrap().applied_revision,
        1,
        "revision 1 keeps running"
    );
    edge.stop().await.unwrap();
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_uploads_are_streamed_bounded_and_unreferenced_blobs_collectable() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubHarness::config(&dir.path().join("hub"));
    cfg.limits.max_artifact_bytes = 1 << 20;
    cfg.limits.artifact_gc_grace = Duration::ZERO;
    let hub = HubHarness::start(cfg).await.unwrap();
    // H8: a body past the limit is refused while it streams, and leaves nothing.
    // (The hub answers 400 naming the limit as soon as it passes it, and
    // closes; a client still sending may see the closed connection first.)
    let e = hub.client.put_artifact(vec![7; 2 << 20]).await.unwrap_err();
    assert!(
        e.status().is_none()
            || (e.status() == Some(400) && e.to_string().contains("limits.max_artifact_bytes")),
        "{e}"
    );
    let kept = hub.client.put_artifact(vec![1; 1000]).await.unwrap();
    let loose = hub.client.put_artifact(vec![2; 1000]).await.unwrap();
    let blobs = || {
        std::fs::read_dir(dir.path().join("hub/artifacts"))
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count()
    };
    assert_eq!(blobs(), 2, "the refused upload left nothing");
    // A blob a node's desired state names cannot be deleted.
    let mut d = desired("n1", 0, json!([]));
    d["models"] = json!([{"name": "m", "sha256": kept.sha256, "size": kept.size}]);
    hub.client.put_desired_json("n1", &d).await.unwrap();
    let e = hub.client.delete_artifact(&kept.sha256).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(
        hub.client.gc_artifacts().await.unwrap(),
        vec![loose.sha256.clone()]
    );
    assert_eq!(blobs(), 1);
    assert_eq!(hub.client.artifact(&kept.sha256).await.unwrap().len(), 1000);
    hub.stop().await.unwrap();
}
