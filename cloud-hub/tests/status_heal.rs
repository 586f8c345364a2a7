#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code"
)]
//! A hub that subscribes while nodes are already connected learns their
//! `status` from retained messages, and rumqttd 0.20 replays at most one
//! inflight window (100) of them to a new subscription. The nodes' live
//! reported states must bring the rest online in the hub's registry.

use std::time::Duration;

use cloud_hub::HubConfig;
use cloud_hub::ca::Identity;
use cloud_hub::config::MqttConfig;
use edgefleet_testkit::{HubHarness, wait_until};
use protocols::codec::encode_json;
use protocols::{NodeState, NodeStatus, ReportedState, TopicKind, Topics};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

const N: usize = 150;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A node that announces itself online (retained) on every connect and
/// publishes a reported state every 300 ms, like an agent (faster). `o`:
/// its MQTT options (client id = name, TLS with its certificate).
fn spawn_node(name: String, mut o: MqttOptions, cancel: CancellationToken) {
    let topics = Topics::default();
    let status = |state| {
        encode_json(
            "status",
            &NodeStatus {
                node: name.clone(),
                state,
                at_ms: now_ms(),
            },
        )
        .unwrap()
    };
    o.set_keep_alive(Duration::from_secs(15));
    o.set_last_will(LastWill::new(
        topics.node(&name, TopicKind::Status),
        status(NodeState::Offline),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut el) = AsyncClient::new(o, 16);
    let (c, t, n, online) = (
        client.clone(),
        topics.clone(),
        name.clone(),
        status(NodeState::Online),
    );
    let cancel2 = cancel.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                () = cancel2.cancelled() => return,
                ev = el.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let topic = t.node(&n, TopicKind::Status);
                    let _ = c.try_publish(topic, QoS::AtLeastOnce, true, online.clone());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
            let r = ReportedState {
                node: name.clone(),
                at_ms: now_ms(),
                ..ReportedState::default()
            };
            let _ = client.try_publish(
                topics.node(&name, TopicKind::Reported),
                QoS::AtLeastOnce,
                true,
                encode_json("reported", &r).unwrap(),
            );
        }
    });
}

fn online(hub: &cloud_hub::Hub) -> usize {
    hub.registry
        .all()
        .unwrap()
        .iter()
        .filter(|(_, r)| r.status.as_ref().map(|s| s.state) == Some(NodeState::Online))
        .count()
}

/// Waits until `count()` is `want`; the failure names the last count.
async fn eventually(what: &str, within: Duration, want: usize, mut count: impl FnMut() -> usize) {
    let mut last = 0;
    let r = wait_until(what, within, || {
        last = count();
        std::future::ready((last == want).then_some(()))
    })
    .await;
    assert!(r.is_ok(), "{what}: {last}, not {want}, after {within:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_subscribes_after_its_nodes_learns_every_one_online() {
    let dir = tempfile::tempdir().unwrap();
    // Hub A owns the embedded broker; its nodes connect after it subscribed.
    let mut a_cfg = HubHarness::config(&dir.path().join("a"));
    a_cfg.ack_interval = HubConfig::default().ack_interval;
    let a = HubHarness::start(a_cfg).await.unwrap();
    let (host, port) = a.mqtt.clone();
    let hub_a = a.hub.clone();
    eventually("hub A ready", Duration::from_secs(10), 1, || {
        usize::from(hub_a.mqtt_ready())
    })
    .await;
    let nodes = CancellationToken::new();
    for i in 0..N {
        let name = format!("late-{i:03}");
        let o = a.mqtt_options(&name, &Identity::node(&name)).unwrap();
        spawn_node(name, o, nodes.clone());
    }
    eventually("nodes online in hub A", Duration::from_secs(30), N, || {
        online(&hub_a)
    })
    .await;

    // Hub B subscribes now, to the same broker, with an empty registry: it
    // gets at most 100 retained statuses.
    let b_cfg = HubConfig {
        embedded_broker: None,
        mqtt: MqttConfig {
            host: host.clone(),
            port,
            client_id: "hub-b".into(),
            // Hub A's broker is the mTLS gate: hub B comes with a hub
            // certificate from hub A's CA.
            tls: Some(
                a.write_mqtt_files(&Identity::hub("hub:hub-b"), &dir.path().join("b-tls"))
                    .unwrap(),
            ),
            ..MqttConfig::default()
        },
        ack_interval: HubConfig::default().ack_interval,
        ..HubHarness::config(&dir.path().join("b"))
    };
    let b = HubHarness::start(b_cfg).await.unwrap();
    let hub_b = b.hub.clone();
    eventually("nodes online in hub B", Duration::from_secs(20), N, || {
        online(&hub_b)
    })
    .await;
    let inferred = hub_b
        .metrics
        .status_inferred_online
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        inferred >= (N - 100) as u64,
        "the broker replayed more than 100 retained statuses ({inferred} inferred): this test no longer shows the gap"
    );

    // Nodes going away: their last wills win over their last reports.
    nodes.cancel();
    eventually(
        "nodes still online in hub B after they left",
        Duration::from_secs(30),
        0,
        || online(&hub_b),
    )
    .await;

    b.stop().await.unwrap();
    a.stop().await.unwrap();
}
