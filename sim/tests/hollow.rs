#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    reason = "test code"
)]
//! Hollow nodes against a real hub (in this process, embedded broker; or a
//! hub process on a Mosquitto broker): every node converges to each pushed
//! revision, and the hub's registry and event log agree with what the nodes
//! did.

use std::time::Duration;

use cloud_hub::HubConfig;
use cloud_hub::api::NodeView;
use cloud_hub::client::HubClient;
use edgefleet_testkit::{HubHarness, wait_until};
use protocols::{EventKind, NodeState};
use sim::hollow::{BrokerKind, HollowOptions, HubEndpoint, MosquittoOptions, Stack, StackOptions};

/// Two rounds (revisions 1 and 2), each PUT accepted and each of `n` nodes
/// holding it, at the node and in the hub's registry.
fn assert_rounds_converged(report: &sim::hollow::HollowReport, n: usize) {
    assert_eq!(report.rounds.len(), 2);
    for (r, want) in report.rounds.iter().zip([1, 2]) {
        assert_eq!(r.revision, want);
        assert_eq!(r.put_errors, 0, "{:?}", r.first_put_error);
        assert_eq!(r.converged_nodes, n, "round {want}");
        assert_eq!(r.converged_registry, n, "round {want}");
        assert_eq!(r.registry_agrees, n, "round {want}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_hollow_nodes_converge_and_the_hub_registry_agrees() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubHarness::config(&dir.path().join("hub"));
    cfg.ack_interval = HubConfig::default().ack_interval;
    let harness = HubHarness::start(cfg).await.unwrap();
    let hub = HubEndpoint {
        http_base: harness.base().to_owned(),
        mqtt_host: harness.mqtt.0.clone(),
        mqtt_port: harness.mqtt.1,
        // The harness runs the secure default: the mTLS gate.
        mqtt_tls: true,
        pid: Some(std::process::id()),
        broker_pid: None,
        broker: BrokerKind::Embedded,
        in_process: true,
        data_dir: Some(harness.data_dir.clone()),
    };
    let client = &harness.client;

    let opts = HollowOptions {
        nodes: 50,
        rounds: 2,
        connect_concurrency: 16,
        put_concurrency: 32,
        registry_poll: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(20),
        round_timeout: Duration::from_secs(20),
        ..HollowOptions::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(60), sim::hollow::run(&opts, &hub))
        .await
        .expect("hollow run timed out")
        .unwrap();
    assert_eq!(report.nodes, 50);
    assert_eq!(report.connected, 50);
    assert_eq!(report.rounds.len(), 2);
    assert_rounds_converged(&report, 50);
    for r in &report.rounds {
        assert_eq!(r.node.count, 50);
        assert!(r.node.p50_ms <= r.node.p99_ms && r.node.p99_ms <= r.node.max_ms);
    }
    assert!(report.all_converged);
    assert_eq!(report.desired_rejected, 0);
    assert_eq!(report.publish_dropped, 0);
    assert!(report.hub_rss_bytes_max > 0 && report.hub_in_process);
    assert!(report.summary().contains("every node converged"));
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "desired_convergence_ms_p50",
        "desired_convergence_ms_p99",
        "hub_rss_bytes_max",
        "wall_seconds",
    ] {
        assert!(json[key].is_number(), "{key} missing from the report");
    }

    // Independently of the run's own bookkeeping: the hub's registry holds
    // every hollow node as a real agent would appear, and its event log has
    // the nodes' own `desired-applied` events.
    let views = client.nodes().await.unwrap();
    let hollow: Vec<&NodeView> = views
        .iter()
        .filter(|v| v.node.starts_with("hollow-"))
        .collect();
    assert_eq!(hollow.len(), 50);
    for v in &hollow {
        assert_eq!(v.desired_revision, 2, "{}", v.node);
        let rep = v.reported.as_ref().unwrap();
        assert_eq!(rep.applied_revision, 2, "{}", v.node);
        assert_eq!(rep.counters["desired_applied"], 2, "{}", v.node);
        assert!(v.status.is_some(), "{}", v.node);
    }
    let events = client.events("hollow-07").await.unwrap();
    let applied: Vec<&EventKind> = events
        .iter()
        .map(|e| &e.kind)
        .filter(|k| matches!(k, EventKind::DesiredApplied { .. }))
        .collect();
    assert_eq!(
        applied,
        [
            &EventKind::DesiredApplied { revision: 1 },
            &EventKind::DesiredApplied { revision: 2 }
        ]
    );

    assert!(client.ready().await.unwrap());

    // The run has dropped its nodes' connections: the broker publishes each
    // node's last will, and the registry shows them offline, as for agents.
    wait_until(
        "all 50 hollow nodes to go offline after the run",
        Duration::from_secs(15),
        || async {
            let views = client.nodes().await.ok()?;
            let offline = views
                .iter()
                .filter(|v| v.node.starts_with("hollow-"))
                .filter(|v| v.status.as_ref().map(|s| s.state) == Some(NodeState::Offline))
                .count();
            (offline == 50).then_some(())
        },
    )
    .await
    .unwrap();

    tokio::time::timeout(Duration::from_secs(10), harness.stop())
        .await
        .unwrap()
        .unwrap();
}

/// 300 hollow nodes against a hub process that uses a Mosquitto process as
/// its external broker, started and stopped the way `fleet-sim hollow
/// --broker mosquitto` does. Needs `mosquitto` (apt-get install mosquitto):
/// run by `.ci/run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the mosquitto broker (apt-get install mosquitto); run by .ci/run"]
async fn hollow_external_mosquitto() {
    const N: usize = 300;
    let _ = rustls::crypto::ring::default_provider().install_default();
    sim::hollow::raise_fd_limit().unwrap();
    let so = StackOptions {
        hub_bin: env!("CARGO_BIN_EXE_fleet-sim").into(),
        hub_args: vec!["hub".into()],
        hub_config: HubConfig::default(),
        hub_log: "warn".into(),
        hub_ready_timeout: Duration::from_secs(30),
        broker: BrokerKind::Mosquitto,
        mosquitto: MosquittoOptions::for_fleet(N),
        nodes: N,
        // Mosquitto with the shipped deploy/mosquitto config (mTLS, ACL);
        // the hub connects with a hub certificate, every node with its own.
        mqtt_tls: true,
    };
    let stack = Stack::start(&so).await.unwrap();
    let hub = stack.endpoint().clone();
    let m = stack.mosquitto().unwrap();
    let (broker_pid, broker_dir) = (m.pid().unwrap(), m.dir().unwrap().to_owned());
    assert_eq!(hub.broker, BrokerKind::Mosquitto);
    assert_eq!(hub.broker_pid, Some(broker_pid));
    assert_eq!(hub.mqtt_port, m.port());
    assert!(
        stack
            .broker_version()
            .unwrap()
            .starts_with("mosquitto version"),
        "{:?}",
        stack.broker_version()
    );
    // The hub was started without its embedded broker, pointing at Mosquitto.
    let hub_toml = std::fs::read_to_string(stack.hub_log().with_file_name("hub.toml")).unwrap();
    let hub_cfg: HubConfig = toml::from_str(&hub_toml).unwrap();
    assert_eq!(hub_cfg.embedded_broker, None);
    assert_eq!(hub_cfg.broker_address(), ("127.0.0.1".to_owned(), m.port()));

    let opts = HollowOptions {
        nodes: N,
        rounds: 2,
        connect_concurrency: 100,
        put_concurrency: 32,
        registry_poll: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(40),
        round_timeout: Duration::from_secs(30),
        ..HollowOptions::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(120), sim::hollow::run(&opts, &hub))
        .await
        .expect("hollow run timed out")
        .unwrap();
    assert_rounds_converged(&report, N);
    assert!(report.all_converged, "{}", report.summary());
    assert_eq!(report.broker, BrokerKind::Mosquitto);
    assert!(report.broker_rss_bytes_max > 0 && report.broker_rss_bytes_idle > 0);
    assert!(report.hub_rss_bytes_max > 0 && !report.hub_in_process);
    assert!(report.summary().contains("broker ("));

    // The hub's own registry, read independently of the run's bookkeeping:
    // every node applied revision 2 twice over Mosquitto.
    let views: Vec<NodeView> = HubClient::local_admin(
        hub.http_base.clone(),
        hub.data_dir.as_deref().unwrap(),
        HubClient::DEFAULT_TIMEOUT,
    )
    .unwrap()
    .nodes()
    .await
    .unwrap();
    let applied = views
        .iter()
        .filter(|v| v.node.starts_with("hollow-"))
        .filter(|v| {
            v.desired_revision == 2
                && v.reported.as_ref().is_some_and(|r| {
                    r.applied_revision == 2 && r.counters.get("desired_applied") == Some(&2)
                })
                && v.status.is_some()
        })
        .count();
    assert_eq!(applied, N);

    let kept = stack.stop(false).await;
    assert!(kept.is_empty());
    // Killed and reaped; its directory (config, log) removed.
    assert!(!std::path::Path::new(&format!("/proc/{broker_pid}")).exists());
    assert!(!broker_dir.exists());
}

/// The refusal's text; panics if the client got in.
fn refused<T>(r: Result<T, String>) -> String {
    match r {
        Ok(_) => panic!("the broker let the client in"),
        Err(e) => e,
    }
}

/// Polls until CONNACK (`Ok`) or a connection error (`Err`, its text).
async fn mqtt_connect(
    o: rumqttc::MqttOptions,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), String> {
    let (c, mut el) = rumqttc::AsyncClient::new(o, 32);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK in time".to_owned())??;
    Ok((c, el))
}

/// Every topic `el` receives, until the test ends.
fn record(mut el: rumqttc::EventLoop) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                s.lock().unwrap().push(p.topic);
            }
        }
    });
    seen
}

/// Mosquitto with the shipped `deploy/mosquitto` config and ACL: a client
/// without a certificate from the hub CA is refused; node A may publish its
/// own topics but not node B's, cannot read B's desired state, and cannot
/// take over B's session; the hub certificate reads and writes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the mosquitto broker (apt-get install mosquitto); run by .ci/run"]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario against one broker (refusals, own topics, forgeries, takeover), read top to bottom"
)]
async fn mosquitto_acl_binds_topics_to_the_certificate() {
    use cloud_hub::ca::{Ca, Identity};
    use protocols::{TopicKind, Topics};
    use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
    use std::sync::Arc;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::open_offline(&dir.path().join("hub")).unwrap();
    let server = ca
        .issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap();
    let mut mo = MosquittoOptions::for_fleet(10);
    mo.tls = Some(sim::hollow::broker::MosquittoTls {
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
    });
    let m = sim::hollow::Mosquitto::spawn(&mo).await.unwrap();
    let opts = |client_id: &str, id: Option<&Identity>| {
        let client = id.map(|id| ca.issue_keyed(id, Duration::from_secs(3600)).unwrap());
        let tls = cloud_hub::tls::mqtt_client_config(
            ca.cert_pem(),
            client
                .as_ref()
                .map(|k| (k.cert_pem.as_str(), k.key_pem.as_str())),
        )
        .unwrap();
        let mut o = MqttOptions::new(client_id, "127.0.0.1", m.port());
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
        o
    };
    let topics = Topics::default();

    // No client certificate, or plain MQTT: refused.
    refused(mqtt_connect(opts("anon", None)).await);
    refused(mqtt_connect(MqttOptions::new("plain", "127.0.0.1", m.port())).await);

    // The hub reads everything.
    let (hub, mut hub_el) = mqtt_connect(opts(
        "cloud-hub",
        Some(&Identity::hub(sim::hollow::stack::HUB_MQTT_NAME)),
    ))
    .await
    .unwrap();
    hub.subscribe(format!("{}/#", topics.root()), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) =
                hub_el.poll().await.unwrap()
            {
                return;
            }
        }
    })
    .await
    .unwrap();
    let hub_seen = record(hub_el);

    // Node b, subscribed to its own desired state.
    let (b, b_el) = mqtt_connect(opts("b", Some(&Identity::node("b"))))
        .await
        .unwrap();
    b.subscribe(topics.node("b", TopicKind::Desired), QoS::AtLeastOnce)
        .await
        .unwrap();
    let b_seen = record(b_el);

    // Node a: its own topics pass, b's do not; it cannot read b's desired.
    let (a, a_el) = mqtt_connect(opts("a", Some(&Identity::node("a"))))
        .await
        .unwrap();
    a.subscribe(topics.node("b", TopicKind::Desired), QoS::AtLeastOnce)
        .await
        .unwrap();
    let a_seen = record(a_el);
    for kind in [
        TopicKind::Telemetry,
        TopicKind::Reported,
        TopicKind::Status,
        TopicKind::Events,
    ] {
        a.publish(
            topics.node("a", kind),
            QoS::AtLeastOnce,
            false,
            b"x".to_vec(),
        )
        .await
        .unwrap();
        a.publish(
            topics.node("b", kind),
            QoS::AtLeastOnce,
            false,
            b"x".to_vec(),
        )
        .await
        .unwrap();
    }
    // Only the hub may publish desired state.
    a.publish(
        topics.node("b", TopicKind::Desired),
        QoS::AtLeastOnce,
        true,
        b"forged".to_vec(),
    )
    .await
    .unwrap();
    hub.publish(
        topics.node("b", TopicKind::Desired),
        QoS::AtLeastOnce,
        false,
        b"{}".to_vec(),
    )
    .await
    .unwrap();
    let saw = |seen: &Arc<std::sync::Mutex<Vec<String>>>, t: &str| {
        seen.lock().unwrap().iter().filter(|x| *x == t).count()
    };
    wait_until(
        "the hub to see node a's own topics",
        Duration::from_secs(10),
        || {
            let ok = [
                TopicKind::Telemetry,
                TopicKind::Reported,
                TopicKind::Status,
                TopicKind::Events,
            ]
            .iter()
            .all(|k| saw(&hub_seen, &topics.node("a", *k)) == 1)
                && saw(&b_seen, &topics.node("b", TopicKind::Desired)) == 1;
            std::future::ready(ok.then_some(()))
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for kind in [
        TopicKind::Telemetry,
        TopicKind::Reported,
        TopicKind::Status,
        TopicKind::Events,
    ] {
        let t = topics.node("b", kind);
        assert_eq!(saw(&hub_seen, &t), 0, "{t}: node a's forgery arrived");
    }
    // b got the hub's desired document only, not a's forgery; a got neither.
    assert_eq!(saw(&b_seen, &topics.node("b", TopicKind::Desired)), 1);
    assert_eq!(saw(&hub_seen, &topics.node("b", TopicKind::Desired)), 1);
    assert_eq!(saw(&a_seen, &topics.node("b", TopicKind::Desired)), 0);

    // a's certificate with b's client id: the broker uses the certificate's
    // name as client id, so b's session is not taken over.
    let (_a2, _a2_el) = mqtt_connect(opts("b", Some(&Identity::node("a"))))
        .await
        .unwrap();
    hub.publish(
        topics.node("b", TopicKind::Desired),
        QoS::AtLeastOnce,
        false,
        b"{}".to_vec(),
    )
    .await
    .unwrap();
    wait_until(
        "b to get the second desired document",
        Duration::from_secs(10),
        || {
            std::future::ready(
                (saw(&b_seen, &topics.node("b", TopicKind::Desired)) == 2).then_some(()),
            )
        },
    )
    .await
    .unwrap();
    m.stop().await;
}
