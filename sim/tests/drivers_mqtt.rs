//! MQTT-native devices: the simulated devices publish to an embedded broker,
//! the edge node's MQTT driver subscribes. Every value the broker accepted
//! arrives exactly once with the right point, value and timestamp; garbage
//! payloads are counted, not fatal; a message stamped far in the future is
//! refused and does not silence its point.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::field_reassign_with_default,
    clippy::float_cmp,
    reason = "test code"
)]

mod drivers_support;

use std::collections::BTreeMap;
use std::time::Duration;

use drivers_support::*;
use edge_node::clock::Clock;
use edge_node::drivers::health::counter;
use edge_node::drivers::{self, DeviceHandle};
use protocols::{DeviceProtocol, Point, PointAddress, Quality, Sample};
use sim::devices::mqtt::{MqttSim, MqttSimConfig, MqttSimDevice, MqttSimPoint, start_broker};
use sim::signal::Model;
use sim::truth::{self, Filter, Obs};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEVICES: u32 = 3;
const POINTS: u32 = 4;
/// Values per point to collect before stopping the devices.
const VALUES: usize = 40;

fn index(d: u32, p: u32) -> u32 {
    100 + d * 10 + p
}

fn topic(d: u32) -> String {
    format!("plant/mqtt-{d}/values")
}

fn model(d: u32, p: u32) -> Model {
    let mut m = Model::sine(
        10.0 + f64::from(p),
        2.0 + f64::from(d),
        f64::from(100 * d + p),
    );
    m.noise = 0.5;
    m
}

async fn wait_malformed(h: &DeviceHandle, at_least: u64) {
    eventually("malformed counted", || {
        h.health().counter(counter::MALFORMED) >= at_least
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario read top to bottom; each check depends on the state the previous step left"
)]
async fn every_published_value_arrives_once_and_garbage_is_counted() {
    init_tracing();
    let broker = start_broker().await.unwrap();
    let clock = Clock::system();

    // Edge side: one driver per device, subscribed before the devices speak.
    let (tx, mut rx) = mpsc::channel::<Vec<Sample>>(1024);
    let cancel = CancellationToken::new();
    let mut handles = Vec::new();
    for d in 0..DEVICES {
        let points: Vec<Point> = (0..POINTS)
            .map(|p| Point {
                index: index(d, p),
                name: format!("p{p}"),
                address: PointAddress::Mqtt {
                    key: format!("k{p}"),
                },
                scale: 1.0,
                offset: 0.0,
                range: None,
                unit: None,
            })
            .collect();
        let dev = device(
            &format!("mqtt-{d}"),
            DeviceProtocol::Mqtt {
                host: broker.ip().to_string(),
                port: broker.port(),
                topic: topic(d),
                qos: 1,
                client_id: Some(format!("edge-test-mqtt-{d}")),
                ca_file: None,
                username: None,
                password_file: None,
            },
            50,
            points,
        );
        handles.push(drivers::spawn(dev, tx.clone(), clock, cancel.clone()));
    }
    drop(tx);

    // Device side, off until the subscriptions are known to be active.
    let devices = (0..DEVICES)
        .map(|d| MqttSimDevice {
            topic: topic(d),
            points: (0..POINTS)
                .map(|p| MqttSimPoint {
                    id: index(d, p),
                    key: format!("k{p}"),
                    model: model(d, p),
                })
                .collect(),
        })
        .collect();
    let mut cfg = MqttSimConfig::new(broker, devices);
    cfg.tick = Duration::from_millis(50);
    cfg.clock = clock;
    cfg.start_down = true;
    let sim = MqttSim::start(cfg).await.unwrap();

    // A garbage message reaching a driver proves its subscription is active.
    for (d, h) in (0..DEVICES).zip(&handles) {
        eventually("driver connected", || h.health().is_connected()).await;
        let probe = async {
            loop {
                sim.publish_raw(&topic(d), b"probe: not json".to_vec())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                if h.health().counter(counter::MALFORMED) > 0 {
                    return;
                }
            }
        };
        tokio::time::timeout(DEADLINE, probe)
            .await
            .expect("subscription active");
    }
    let malformed0: Vec<u64> = handles
        .iter()
        .map(|h| h.health().counter(counter::MALFORMED))
        .collect();

    sim.come_up();
    // Receive while the devices publish; inject garbage on device 1 midway.
    let mut got: BTreeMap<u32, Vec<Sample>> = BTreeMap::new();
    let mut garbage_sent = false;
    let collect = async {
        while let Some(batch) = rx.recv().await {
            for s in batch {
                got.entry(s.point).or_default().push(s);
            }
            let least = (0..DEVICES)
                .flat_map(|d| (0..POINTS).map(move |p| index(d, p)))
                .map(|i| got.get(&i).map_or(0, Vec::len))
                .min()
                .unwrap_or(0);
            if !garbage_sent && least >= VALUES / 2 {
                garbage_sent = true;
                for bad in [
                    // Stamped at the end of time: refused (M10); without
                    // that, every later value of k0 was a "duplicate".
                    &br#"{"ts_ms":18446744073709551615,"values":{"k0":1.0}}"#[..],
                    &b"\xff\xfe\x00garbage"[..],
                    br#"{"ts_ms":1,"values":{"k0":"high"}}"#,
                    br#"{"values":{"k0":1.0},"colour":"red"}"#,
                ] {
                    sim.publish_raw(&topic(1), bad.to_vec()).await.unwrap();
                }
            }
            if least >= VALUES {
                return;
            }
        }
        panic!("sample channel closed");
    };
    tokio::time::timeout(DEADLINE, collect)
        .await
        .expect("values arrive");
    sim.go_down().await;
    eventually("broker acknowledged everything", || {
        sim.unacknowledged() == 0
    })
    .await;

    // The served logs are final now; wait until the drivers delivered as many.
    let want: BTreeMap<u32, Vec<(u64, f64)>> = (0..DEVICES)
        .flat_map(|d| (0..POINTS).map(move |p| index(d, p)))
        .map(|i| (i, sim.served(i)))
        .collect();
    let drain = async {
        while want
            .iter()
            .any(|(i, w)| got.get(i).map_or(0, Vec::len) < w.len())
        {
            let Some(batch) = rx.recv().await else {
                panic!("sample channel closed")
            };
            for s in batch {
                got.entry(s.point).or_default().push(s);
            }
        }
    };
    tokio::time::timeout(DEADLINE, drain)
        .await
        .expect("every served value delivered");
    // Anything still in flight would be a duplicate or a stray.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(batch) = rx.try_recv() {
        for s in batch {
            got.entry(s.point).or_default().push(s);
        }
    }

    assert_eq!(
        got.len(),
        want.len(),
        "points with samples: {:?}",
        got.keys()
    );
    for (i, w) in &want {
        let g = &got[i];
        assert!(w.len() >= VALUES, "point {i}: only {} served", w.len());
        let g_pairs: Vec<(u64, f64)> = g.iter().map(|s| (s.ts_ms, s.value)).collect();
        assert_eq!(&g_pairs, w, "point {i}: received != served");
        assert!(g.iter().all(|s| s.quality == Quality::GOOD), "point {i}");
        // The same verdict from the ground-truth module.
        let served: Vec<Obs> = w.iter().map(|&(t, v)| Obs::good(t, v)).collect();
        let stored: Vec<Obs> = g
            .iter()
            .map(|s| Obs {
                ts_ms: s.ts_ms,
                value: s.value,
                quality: s.quality.0,
            })
            .collect();
        let v = truth::compare_point(&Filter::Passthrough, &served, &stored);
        assert_eq!((v.lost, v.duplicates, v.unexpected), (0, 0, 0), "{v:?}");
    }

    // Garbage: counted exactly, the driver kept going.
    for (d, h) in handles.iter().enumerate() {
        let extra = if d == 1 { 3 } else { 0 };
        wait_malformed(h, malformed0[d] + extra).await;
        assert_eq!(
            h.health().counter(counter::MALFORMED),
            malformed0[d] + extra,
            "device {d}"
        );
        assert_eq!(
            h.health().counter(drivers::mqtt::FUTURE_TIMESTAMP),
            u64::from(d == 1),
            "device {d}"
        );
        assert!(!h.is_finished(), "device {d} driver stopped");
        let st = h.status();
        assert!(st.connected);
        if d == 1 {
            assert!(
                st.last_error
                    .as_deref()
                    .unwrap_or("")
                    .contains("malformed payload"),
                "{st:?}"
            );
        }
    }

    sim.stop().await;
    cancel.cancel();
    for h in handles {
        h.stop().await;
    }
}

/// A TCP forwarder to the broker whose connections can be cut.
struct Proxy {
    addr: std::net::SocketAddr,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(to: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (r, c) = (refuse.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let t = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(t);
            }
        });
        Self {
            addr,
            refuse,
            conns,
            accept,
        }
    }

    /// Closes every connection and refuses new ones until `restore`.
    fn cut(&self) {
        self.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn restore(&self) {
        self.refuse
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The driver's connection to the device broker is cut for a while: it
/// reports one BAD_NOT_CONNECTED marker per point, reconnects with backoff
/// and, thanks to the persistent session, still receives every value the
/// devices published during the cut, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario read top to bottom; each check depends on the state the previous step left"
)]
async fn values_published_during_a_driver_disconnect_are_not_lost() {
    init_tracing();
    let broker = start_broker().await.unwrap();
    let proxy = Proxy::start(broker).await;
    let clock = Clock::system();
    let points: Vec<Point> = (0..POINTS)
        .map(|p| Point {
            index: index(0, p),
            name: format!("p{p}"),
            address: PointAddress::Mqtt {
                key: format!("k{p}"),
            },
            scale: 1.0,
            offset: 0.0,
            range: None,
            unit: None,
        })
        .collect();
    let dev = device(
        "mqtt-cut",
        DeviceProtocol::Mqtt {
            host: proxy.addr.ip().to_string(),
            port: proxy.addr.port(),
            topic: topic(0),
            qos: 1,
            client_id: Some("edge-test-mqtt-cut".into()),
            ca_file: None,
            username: None,
            password_file: None,
        },
        50,
        points,
    );
    let mut options = drivers::DriverOptions::default();
    options.backoff.initial = Duration::from_millis(50);
    options.backoff.max = Duration::from_millis(200);
    let (tx, mut rx) = mpsc::channel::<Vec<Sample>>(1024);
    let cancel = CancellationToken::new();
    let h = drivers::spawn_with(dev, options, tx, clock, cancel.clone());

    let mut cfg = MqttSimConfig::new(
        broker,
        vec![MqttSimDevice {
            topic: topic(0),
            points: (0..POINTS)
                .map(|p| MqttSimPoint {
                    id: index(0, p),
                    key: format!("k{p}"),
                    model: model(0, p),
                })
                .collect(),
        }],
    );
    cfg.client_id = "sim-mqtt-cut".into();
    cfg.tick = Duration::from_millis(50);
    cfg.clock = clock;
    cfg.start_down = true;
    let sim = MqttSim::start(cfg).await.unwrap();
    eventually("driver connected", || h.health().is_connected()).await;
    let probe = async {
        while h.health().counter(counter::MALFORMED) == 0 {
            sim.publish_raw(&topic(0), b"probe".to_vec()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(DEADLINE, probe)
        .await
        .expect("subscribed");

    let mut got: Vec<Sample> = Vec::new();
    let first = index(0, 0);
    sim.come_up();
    let before = async {
        while got.iter().filter(|s| s.point == first).count() < 10 {
            got.extend(rx.recv().await.expect("channel open"));
        }
    };
    tokio::time::timeout(DEADLINE, before)
        .await
        .expect("values before the cut");

    proxy.cut();
    let marker = async {
        loop {
            let batch = rx.recv().await.expect("channel open");
            let done = batch
                .iter()
                .any(|s| s.quality == Quality::BAD_NOT_CONNECTED);
            got.extend(batch);
            if done {
                return;
            }
        }
    };
    tokio::time::timeout(DEADLINE, marker)
        .await
        .expect("not-connected marker");
    // Let the devices publish for a while with the driver away.
    let during = sim.served(first).len();
    eventually("devices publish during the cut", || {
        sim.served(first).len() >= during + 10
    })
    .await;
    let reconnects = h.health().counter(counter::RECONNECTS);
    proxy.restore();
    eventually("driver reconnected", || {
        h.health().counter(counter::RECONNECTS) > reconnects
    })
    .await;
    let after = sim.served(first).len() + 10;
    eventually("devices publish after the cut", || {
        sim.served(first).len() >= after
    })
    .await;
    sim.go_down().await;
    eventually("broker acknowledged everything", || {
        sim.unacknowledged() == 0
    })
    .await;

    let ids: Vec<u32> = (0..POINTS).map(|p| index(0, p)).collect();
    let want: BTreeMap<u32, Vec<(u64, f64)>> = ids.iter().map(|&i| (i, sim.served(i))).collect();
    let good_count = |got: &[Sample], i: u32| {
        got.iter()
            .filter(|s| s.point == i && s.quality == Quality::GOOD)
            .count()
    };
    let drain = async {
        while want.iter().any(|(&i, w)| good_count(&got, i) < w.len()) {
            got.extend(rx.recv().await.expect("channel open"));
        }
    };
    tokio::time::timeout(DEADLINE, drain)
        .await
        .expect("values published during the cut delivered after it");
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(batch) = rx.try_recv() {
        got.extend(batch);
    }

    for (&i, w) in &want {
        let good: Vec<(u64, f64)> = got
            .iter()
            .filter(|s| s.point == i && s.quality == Quality::GOOD)
            .map(|s| (s.ts_ms, s.value))
            .collect();
        assert_eq!(&good, w, "point {i}: good samples != served");
        let markers = got
            .iter()
            .filter(|s| s.point == i && s.quality == Quality::BAD_NOT_CONNECTED)
            .count();
        assert_eq!(markers, 1, "point {i}: one marker per outage");
        let served: Vec<Obs> = w.iter().map(|&(t, v)| Obs::good(t, v)).collect();
        let stored: Vec<Obs> = got
            .iter()
            .filter(|s| s.point == i)
            .map(|s| Obs {
                ts_ms: s.ts_ms,
                value: s.value,
                quality: s.quality.0,
            })
            .collect();
        let v = truth::compare_point(&Filter::Passthrough, &served, &stored);
        assert_eq!(
            (v.lost, v.duplicates, v.unexpected, v.bad_markers),
            (0, 0, 0, 1),
            "{v:?}"
        );
    }
    sim.stop().await;
    cancel.cancel();
    h.stop().await;
}

/// A device broker that requires TLS and a login (M10): rumqttd with a
/// certificate from a test CA and a user table, on a free loopback port.
fn start_tls_broker(dir: &std::path::Path, user: &str, password: &str) -> std::net::SocketAddr {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let (cert_path, key_path) = (dir.join("broker.crt"), dir.join("broker.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = ServerSettings {
        name: "device-tls".into(),
        listen,
        tls: Some(TlsConfig::Rustls {
            capath: None,
            certpath: cert_path.display().to_string(),
            keypath: key_path.display().to_string(),
        }),
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: Some(std::iter::once((user.to_owned(), password.to_owned())).collect()),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 1 << 20,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(std::iter::once(("v4".to_owned(), server)).collect()),
        ..Config::default()
    };
    std::thread::spawn(move || {
        let _ = Broker::new(config).start();
    });
    listen
}

/// The device's own publisher over TLS with the login.
fn tls_publisher(
    broker: std::net::SocketAddr,
    ca_pem: &std::path::Path,
    user: &str,
    password: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut o = rumqttc::MqttOptions::new("device-pub", broker.ip().to_string(), broker.port());
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    o.set_credentials(user, password);
    rumqttc::AsyncClient::new(o, 16)
}

/// An MQTT device whose broker needs TLS and a login (M10): the driver
/// reaches it with the CA file and password file the device names, looked
/// up in the gateway's secrets directory; the same device naming a wrong
/// password file never connects and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_broker_with_tls_and_a_login_is_reached_with_the_gateways_secrets() {
    init_tracing();
    // rumqttd builds its TLS config with the process default provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let secrets = tempfile::tempdir().unwrap();
    let broker = start_tls_broker(secrets.path(), "edge", "s3cret");
    // A site's secrets directory: only the gateway's user may enter (M10).
    std::fs::set_permissions(
        secrets.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(secrets.path().join("broker.pw"), "s3cret\n").unwrap();
    std::fs::write(secrets.path().join("wrong.pw"), "guess\n").unwrap();
    let clock = Clock::system();
    let mut options = drivers::DriverOptions::default();
    options.mqtt.secrets_dir = Some(secrets.path().to_owned());
    options.backoff.initial = Duration::from_millis(50);
    let point = Point {
        index: 7,
        name: "t".into(),
        address: PointAddress::Mqtt { key: "t".into() },
        scale: 1.0,
        offset: 0.0,
        range: None,
        unit: None,
    };
    let dev = |id: &str, password_file: &str| {
        device(
            id,
            DeviceProtocol::Mqtt {
                host: broker.ip().to_string(),
                port: broker.port(),
                topic: "plant/tls/values".into(),
                qos: 1,
                client_id: Some(format!("edge-{id}")),
                ca_file: Some("ca.pem".into()),
                username: Some("edge".into()),
                password_file: Some(password_file.into()),
            },
            100,
            vec![point.clone()],
        )
    };
    let (tx, mut rx) = mpsc::channel::<Vec<Sample>>(64);
    let (wrong_tx, mut wrong_rx) = mpsc::channel::<Vec<Sample>>(64);
    let cancel = CancellationToken::new();
    let good = drivers::spawn_with(
        dev("tls-good", "broker.pw"),
        options.clone(),
        tx,
        clock,
        cancel.clone(),
    );
    let wrong = drivers::spawn_with(
        dev("tls-wrong", "wrong.pw"),
        options,
        wrong_tx,
        clock,
        cancel.clone(),
    );
    eventually("driver connected over TLS", || good.health().is_connected()).await;

    let (publisher, mut events) =
        tls_publisher(broker, &secrets.path().join("ca.pem"), "edge", "s3cret");
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let receive = async {
        let mut n = 0.0;
        loop {
            n += 1.0;
            let payload = serde_json::to_vec(&serde_json::json!({"values": {"t": n}})).unwrap();
            publisher
                .publish(
                    "plant/tls/values",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
            if let Ok(Some(batch)) =
                tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
                && batch
                    .iter()
                    .any(|s| s.point == 7 && s.quality == Quality::GOOD)
            {
                return;
            }
        }
    };
    tokio::time::timeout(DEADLINE, receive)
        .await
        .expect("a good sample over TLS");

    // The wrong password: refused by the broker, reported, never a sample.
    eventually("wrong login refused", || {
        wrong.health().counter(counter::CONNECT_FAILURES) > 0
    })
    .await;
    assert!(!wrong.health().is_connected());
    assert!(wrong_rx.try_recv().is_err());
    assert!(wrong.status().last_error.is_some(), "{:?}", wrong.status());

    pump.abort();
    cancel.cancel();
    good.stop().await;
    wrong.stop().await;
}
