//! The outbox limit is reached while offline: drop-oldest removes exactly the
//! oldest samples, counts them, reports them, and tells the hub which sequence
//! numbers are gone for good; nothing crashes and nothing else is lost.

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
use edgefleet_testkit::{EdgeHarness, HubHarness, edge_config, free_port};
use protocols::signing::key_to_hex;
use protocols::{NodeConfig, SignedDesired};

fn desired() -> protocols::DesiredState {
    common::random_walk_desired(
        "cap-1",
        10,
        100,
        NodeConfig {
            batch_max_samples: 500,
            batch_max_age_ms: 5_000,
            report_interval_ms: 500,
            raw_stream: Some("raw".into()),
        },
    )
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn drop_oldest_is_exact_counted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let key = cloud_hub::keys::load_or_create(&dir.path().join("hub")).unwrap();
    let hub_key = key_to_hex(&key.verifying_key());
    // The node joined before the outage: its identity (from the hub's CA,
    // made now in the hub's data directory) is what the mTLS broker wants.
    edgefleet_testkit::enrol_offline(&dir.path().join("hub"), "cap-1", &dir.path().join("edge"))
        .unwrap();
    let mut cfg = edge_config("cap-1", &dir.path().join("edge"), port, &hub_key);
    cfg.mqtt.reconnect_max = Duration::from_secs(1);
    cfg.outbox.max_bytes = Some(64 * 1024);
    cfg.validate().unwrap();
    {
        let store = Store::open(&cfg.store_config()).unwrap();
        store
            .put_desired(&SignedDesired::sign(&desired(), &key).unwrap())
            .await
            .unwrap();
    }
    let edge = EdgeHarness::start(cfg, Clock::system()).await.unwrap();
    let store = edge.store.clone();

    // One offline hour at 100 samples/s: 360 000 samples into a 64 KiB outbox.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let raw = store.outbox("raw").unwrap();
    let s = raw.stats();
    let assigned = s.next_seq - 1;
    assert!(assigned >= 359_000, "only {assigned} samples appended");
    assert!(
        s.bytes <= 64 * 1024,
        "outbox holds {} bytes over its limit",
        s.bytes
    );
    assert!(s.dropped > 0);
    assert_eq!(
        s.dropped + s.samples,
        assigned,
        "every assigned sample is either held or counted as dropped"
    );
    // The oldest went: what is held is the newest, contiguous run.
    assert_eq!(s.floor, assigned - s.samples + 1);

    // Link returns: the hub learns the drop count from reported state and the
    // final gap from the batches' floor; what was held arrives intact.
    tokio::time::resume();
    let mut hub_cfg = HubHarness::config(&dir.path().join("hub"));
    hub_cfg.embedded_broker.as_mut().unwrap().listen = format!("127.0.0.1:{port}").parse().unwrap();
    hub_cfg.ack_interval = Duration::from_millis(50);
    let harness = HubHarness::start_on_thread(hub_cfg).await.unwrap();
    let hub = harness.hub.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let st = hub
            .sink
            .streams("cap-1")
            .get("raw")
            .cloned()
            .unwrap_or_default();
        let rep = hub.registry.get("cap-1").unwrap().and_then(|r| r.reported);
        if st.contiguous >= assigned && rep.as_ref().is_some_and(|r| r.backlog.dropped >= s.dropped)
        {
            // Drops keep happening? No: online, the outbox drains, so the count is final.
            let now = raw.stats();
            assert_eq!(
                st.dropped_by_edge, now.dropped,
                "hub and edge agree on the drop count"
            );
            assert_eq!(rep.unwrap().backlog.dropped, now.dropped);
            let stored = hub
                .sink
                .query("cap-1", "raw", 1, None, None, 1_000_000)
                .unwrap();
            assert_eq!(
                stored.first().map(|x| x.seq),
                Some(now.dropped + 1),
                "first kept sample follows the dropped ones"
            );
            for w in stored.windows(2) {
                assert_eq!(w[1].seq, w[0].seq + 1, "gap after seq {}", w[0].seq);
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hub did not converge: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    edge.stop().await.unwrap();
    harness.stop().await.unwrap();
}
