#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! The embedded broker's identity gate against real MQTT clients: who may
//! connect (a certificate from the hub CA, not revoked, client id = CN),
//! what a node may publish and subscribe (its own topics only), what a hub
//! identity may do (everything), lab mode (plain MQTT, client id as the
//! identity, the same rules, a WARN at start), the connection cap. Every
//! refusal closes the connection and is counted by reason.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud_hub::ca::Identity;
use cloud_hub::metrics::BrokerRefusal;
use edgefleet_testkit::{HubHarness, eventually};
use protocols::{TopicKind, Topics};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};

const WAIT: Duration = Duration::from_secs(10);
/// How long a message that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(1_500);

/// The refusal's text; panics if the client got in.
fn refused<T>(r: Result<T, String>) -> String {
    match r {
        Ok(_) => panic!("the broker let the client in"),
        Err(e) => e,
    }
}

/// Polls until CONNACK (`Ok`) or a connection error (`Err`, its text).
async fn connect(opts: MqttOptions) -> Result<(AsyncClient, EventLoop), String> {
    let (client, mut el) = AsyncClient::new(opts, 64);
    let r = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK and no error in time".to_owned())?;
    r.map(|()| (client, el))
}

/// Polls until the connection fails; `false` if it is still up after `within`.
async fn closed(el: &mut EventLoop, within: Duration) -> bool {
    tokio::time::timeout(within, async { while el.poll().await.is_ok() {} })
        .await
        .is_ok()
}

/// Polls until the broker acknowledged a subscription.
async fn suback(el: &mut EventLoop) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("no SubAck");
}

/// A hub-identity client subscribed to the whole topic root, recording
/// every topic it receives.
struct Watcher {
    seen: Arc<Mutex<Vec<String>>>,
    _client: AsyncClient,
}

impl Watcher {
    async fn start(opts: MqttOptions) -> Self {
        let (client, mut el) = connect(opts).await.unwrap();
        client
            .subscribe(format!("{}/#", Topics::DEFAULT_ROOT), QoS::AtLeastOnce)
            .await
            .unwrap();
        suback(&mut el).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    s.lock().unwrap().push(p.topic);
                }
            }
        });
        Self {
            seen,
            _client: client,
        }
    }

    fn saw(&self, topic: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|t| t == topic)
    }
}

fn refusals(h: &HubHarness, why: BrokerRefusal) -> u64 {
    h.hub.metrics.broker_refusals(why)
}

async fn counted(h: &HubHarness, why: BrokerRefusal, at_least: u64) {
    eventually(&format!("{} refusals counted", why.as_str()), WAIT, || {
        std::future::ready((refusals(h, why) >= at_least).then_some(()))
    })
    .await;
}

async fn hub(dir: &std::path::Path) -> HubHarness {
    let h = HubHarness::start(HubHarness::config(dir)).await.unwrap();
    h.wait_ready(WAIT).await.unwrap();
    h
}

fn node(h: &HubHarness, name: &str) -> MqttOptions {
    h.mqtt_options(name, &Identity::node(name)).unwrap()
}

fn with_tls(h: &HubHarness, client_id: &str, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, h.mqtt.0.clone(), h.mqtt.1);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_from_the_hub_ca_that_name_the_client_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let h = hub(&dir.path().join("hub")).await;

    // A node with its own certificate and client id gets in.
    let (_a, _el) = connect(node(&h, "a")).await.unwrap();

    // No client certificate (the broker's own is trusted).
    let no_cert = cloud_hub::tls::mqtt_client_config(h.hub.ca.cert_pem(), None).unwrap();
    let e = refused(connect(with_tls(&h, "a2", Arc::new(no_cert))).await);
    counted(&h, BrokerRefusal::NoCert, 1).await;
    assert!(!e.is_empty());

    // A certificate for the same name from another CA.
    let other = cloud_hub::ca::Ca::open_offline(&dir.path().join("other")).unwrap();
    let forged = other
        .issue_keyed(&Identity::node("a3"), Duration::from_secs(3600))
        .unwrap();
    let tls = cloud_hub::tls::mqtt_client_config(
        h.hub.ca.cert_pem(),
        Some((&forged.cert_pem, &forged.key_pem)),
    )
    .unwrap();
    refused(connect(with_tls(&h, "a3", Arc::new(tls))).await);
    counted(&h, BrokerRefusal::BadCert, 1).await;

    // Plain MQTT on the TLS port.
    refused(connect(MqttOptions::new("a4", h.mqtt.0.clone(), h.mqtt.1)).await);
    counted(&h, BrokerRefusal::Tls, 1).await;

    // Node a's certificate with another client id (session takeover).
    refused(connect(h.mqtt_options("b", &Identity::node("a")).unwrap()).await);
    counted(&h, BrokerRefusal::ClientId, 1).await;
    // A node named like the hub's own session cannot take it over.
    refused(connect(node(&h, "cloud-hub")).await);
    counted(&h, BrokerRefusal::ClientId, 2).await;

    // A last will on another node's status.
    let mut o = node(&h, "a5");
    o.set_last_will(LastWill::new(
        Topics::default().node("b", TopicKind::Status),
        b"offline".to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    refused(connect(o).await);
    counted(&h, BrokerRefusal::WillAcl, 1).await;
    // Its own status is fine.
    let mut o = node(&h, "a5");
    o.set_last_will(LastWill::new(
        Topics::default().node("a5", TopicKind::Status),
        b"offline".to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    connect(o).await.unwrap();

    // An operator certificate is no MQTT identity.
    let op = Identity {
        kind: cloud_hub::ca::IdentityKind::Operator,
        name: "ops".into(),
    };
    refused(connect(h.mqtt_options("ops", &op).unwrap()).await);
    counted(&h, BrokerRefusal::Identity, 1).await;

    let metrics = h.client.metrics().await.unwrap();
    assert!(
        metrics.contains("edgefleet_hub_broker_refused_total{reason=\"no_cert\"} 1"),
        "{metrics}"
    );
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_and_refused_at_its_next_connect() {
    let dir = tempfile::tempdir().unwrap();
    let h = hub(&dir.path().join("hub")).await;
    let watcher = Watcher::start(
        h.mqtt_options("watcher", &Identity::hub("hub:watcher"))
            .unwrap(),
    )
    .await;
    let telemetry = Topics::default().node("r1", TopicKind::Telemetry);
    let (client, mut el) = connect(node(&h, "r1")).await.unwrap();
    h.client.revoke("r1").await.unwrap();
    // Connected when revoked: what it sends next is not forwarded, and the
    // connection is cut.
    client
        .publish(&telemetry, QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    assert!(closed(&mut el, WAIT).await);
    counted(&h, BrokerRefusal::Revoked, 1).await;
    tokio::time::sleep(QUIET).await;
    assert!(
        !watcher.saw(&telemetry),
        "a revoked node's publish got through"
    );
    let e = refused(connect(node(&h, "r1")).await);
    counted(&h, BrokerRefusal::Revoked, 2).await;
    assert!(e.contains("NotAuthorized") || e.contains("refused"), "{e}");
    // Another node is not affected.
    connect(node(&h, "r2")).await.unwrap();
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_publishing_as_another_is_cut_off_and_nothing_reaches_a_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let h = hub(&dir.path().join("hub")).await;
    let topics = Topics::default();
    let watcher = Watcher::start(
        h.mqtt_options("watcher", &Identity::hub("hub:watcher"))
            .unwrap(),
    )
    .await;
    let kinds = [
        TopicKind::Telemetry,
        TopicKind::Reported,
        TopicKind::Status,
        TopicKind::Events,
    ];
    for (i, kind) in kinds.into_iter().enumerate() {
        let (a, mut el) = connect(node(&h, "a")).await.unwrap();
        // Its own topic passes (and shows the watcher works).
        let own = topics.node("a", kind);
        a.publish(&own, QoS::AtLeastOnce, false, b"{}".to_vec())
            .await
            .unwrap();
        let forged = topics.node("b", kind);
        a.publish(&forged, QoS::AtLeastOnce, false, b"{}".to_vec())
            .await
            .unwrap();
        assert!(closed(&mut el, WAIT).await, "{kind:?}: still connected");
        counted(&h, BrokerRefusal::PublishAcl, i as u64 + 1).await;
        eventually(&format!("the watcher to see {own}"), WAIT, || {
            std::future::ready(watcher.saw(&own).then_some(()))
        })
        .await;
        tokio::time::sleep(QUIET).await;
        assert!(!watcher.saw(&forged), "{forged} reached a subscriber");
    }
    // Not even the hub's own session took anything for node b.
    assert!(h.hub.registry.get("b").unwrap().is_none());
    assert!(h.hub.sink.streams("b").is_empty());

    // Desired state and acks are the hub's alone.
    for kind in [TopicKind::Desired, TopicKind::Ack] {
        let (a, mut el) = connect(node(&h, "a")).await.unwrap();
        let t = topics.node("a", kind);
        a.publish(&t, QoS::AtLeastOnce, true, b"x".to_vec())
            .await
            .unwrap();
        assert!(closed(&mut el, WAIT).await, "{kind:?}: still connected");
        tokio::time::sleep(QUIET).await;
        assert!(!watcher.saw(&t), "{t} reached a subscriber");
    }
    counted(&h, BrokerRefusal::PublishAcl, 6).await;
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_subscribes_only_to_its_own_desired_and_ack() {
    let dir = tempfile::tempdir().unwrap();
    let h = hub(&dir.path().join("hub")).await;
    let topics = Topics::default();
    let (a, mut el) = connect(node(&h, "a")).await.unwrap();
    a.subscribe(topics.node("a", TopicKind::Desired), QoS::AtLeastOnce)
        .await
        .unwrap();
    a.subscribe(topics.node("a", TopicKind::Ack), QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut el).await;
    suback(&mut el).await;
    let bad = [
        topics.node("b", TopicKind::Desired),
        topics.node("b", TopicKind::Ack),
        "#".to_owned(),
        topics.all_nodes(TopicKind::Telemetry),
        topics.node("a", TopicKind::Telemetry),
    ];
    for (i, filter) in bad.iter().enumerate() {
        let (a, mut el) = connect(node(&h, "a")).await.unwrap();
        a.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        assert!(closed(&mut el, WAIT).await, "{filter}: still connected");
        counted(&h, BrokerRefusal::SubscribeAcl, i as u64 + 1).await;
    }
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_identity_may_do_everything() {
    let dir = tempfile::tempdir().unwrap();
    let h = hub(&dir.path().join("hub")).await;
    let topics = Topics::default();
    let watcher = Watcher::start(
        h.mqtt_options("watcher", &Identity::hub("hub:watcher"))
            .unwrap(),
    )
    .await;
    let (b, mut b_el) = connect(node(&h, "b")).await.unwrap();
    b.subscribe(topics.node("b", TopicKind::Desired), QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut b_el).await;
    let (hub2, mut el) = connect(
        h.mqtt_options("replica-2", &Identity::hub("hub:replica-2"))
            .unwrap(),
    )
    .await
    .unwrap();
    hub2.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut el).await;
    // Its event loop must run for its publishes to go out.
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cut.clone();
    tokio::spawn(async move {
        while el.poll().await.is_ok() {}
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    for kind in TopicKind::ALL {
        hub2.publish(
            topics.node("b", kind),
            QoS::AtLeastOnce,
            false,
            b"x".to_vec(),
        )
        .await
        .unwrap();
    }
    let desired = topics.node("b", TopicKind::Desired);
    let mut got_desired = false;
    let _ = tokio::time::timeout(WAIT, async {
        while let Ok(ev) = b_el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev
                && p.topic == desired
            {
                got_desired = true;
                return;
            }
        }
    })
    .await;
    assert!(got_desired, "node b did not get the hub identity's desired");
    for kind in TopicKind::ALL {
        let t = topics.node("b", kind);
        eventually(&format!("the watcher to see {t}"), WAIT, || {
            std::future::ready(watcher.saw(&t).then_some(()))
        })
        .await;
    }
    tokio::time::sleep(QUIET).await;
    assert!(
        !cut.load(std::sync::atomic::Ordering::Relaxed),
        "the hub identity was cut off"
    );
    assert_eq!(refusals(&h, BrokerRefusal::PublishAcl), 0);
    assert_eq!(refusals(&h, BrokerRefusal::SubscribeAcl), 0);
    h.stop().await.unwrap();
}

/// Log lines written while it is the default subscriber of this thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn lab_mode_warns_and_still_binds_topics_to_the_client_id() {
    let log = Capture::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubHarness::config(&dir.path().join("hub"));
    cfg.embedded_broker.as_mut().unwrap().tls = false;
    let h = HubHarness::start(cfg).await.unwrap();
    h.wait_ready(WAIT).await.unwrap();
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("embedded_broker.tls = false") && text.contains("impersonate"),
        "{text}"
    );
    let topics = Topics::default();
    let plain = |id: &str| MqttOptions::new(id, h.mqtt.0.clone(), h.mqtt.1);
    let (a, mut el) = connect(plain("a")).await.unwrap();
    a.publish(
        topics.node("a", TopicKind::Telemetry),
        QoS::AtLeastOnce,
        false,
        b"x".to_vec(),
    )
    .await
    .unwrap();
    a.publish(
        topics.node("b", TopicKind::Telemetry),
        QoS::AtLeastOnce,
        false,
        b"x".to_vec(),
    )
    .await
    .unwrap();
    assert!(closed(&mut el, WAIT).await);
    counted(&h, BrokerRefusal::PublishAcl, 1).await;
    let (a, mut el) = connect(plain("a")).await.unwrap();
    a.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    assert!(closed(&mut el, WAIT).await);
    counted(&h, BrokerRefusal::SubscribeAcl, 1).await;
    // Not a node name: no identity.
    refused(connect(plain("a/b")).await);
    counted(&h, BrokerRefusal::ClientId, 1).await;
    assert!(h.hub.sink.streams("b").is_empty());
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_refuses_clients_but_never_the_hub_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubHarness::config(&dir.path().join("hub"));
    cfg.embedded_broker.as_mut().unwrap().max_connections = 2;
    let h = HubHarness::start(cfg).await.unwrap();
    h.wait_ready(WAIT).await.unwrap();
    let _one = connect(node(&h, "c1")).await.unwrap();
    let _two = connect(node(&h, "c2")).await.unwrap();
    refused(connect(node(&h, "c3")).await);
    counted(&h, BrokerRefusal::Capacity, 1).await;
    // The hub's own session is not behind the cap.
    assert!(h.hub.mqtt_ready());
    h.stop().await.unwrap();
}

#[test]
fn every_refusal_reason_is_rendered() {
    let m = cloud_hub::metrics::Metrics::default();
    m.broker_refused(BrokerRefusal::WillAcl);
    let text = m.render();
    for why in BrokerRefusal::ALL {
        let want = u64::from(why == BrokerRefusal::WillAcl);
        let line = format!(
            "edgefleet_hub_broker_refused_total{{reason=\"{}\"}} {want}",
            why.as_str()
        );
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
}

#[tokio::test]
async fn an_external_broker_link_names_the_file_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubHarness::config(&dir.path().join("hub"));
    cfg.embedded_broker = None;
    cfg.mqtt.tls = Some(cloud_hub::config::MqttTls {
        ca_file: dir.path().join("missing-ca.crt"),
        cert_file: None,
        key_file: None,
    });
    let e = cloud_hub::App::start(cfg.clone(), tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("mqtt.tls.ca_file "), "{e}");
    std::fs::write(dir.path().join("ca.crt"), "not a certificate").unwrap();
    cfg.mqtt.tls.as_mut().unwrap().ca_file = dir.path().join("ca.crt");
    let e = cloud_hub::App::start(cfg.clone(), tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("mqtt.tls.ca_file "), "{e}");
    cfg.mqtt.tls = None;
    cfg.mqtt.username = Some("hub".into());
    cfg.mqtt.password_file = Some(dir.path().join("no-password"));
    let e = cloud_hub::App::start(cfg, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("mqtt.password_file "), "{e}");
}
