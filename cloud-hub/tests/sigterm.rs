#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]
//! SIGTERM drains the real `cloud-hub` binary. A node publishes telemetry
//! over MQTT; the hub's periodic acks are 10 s apart (the longest interval
//! the config allows), and the hub is stopped before the first one, so
//! every ack the node sees comes from the drain. After `kill -TERM` the hub
//! must exit 0,
//! the node must have received an ack for everything it sent before the
//! connection closed, and a hub restarted on the same data directory must
//! serve every acked sample through the REST API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud_hub::api::SamplePage;
use cloud_hub::client::HubClient;
use cloud_hub::sink::StreamStats;
use protocols::codec::encode_batch;
use protocols::signing::VerifyingKey;
use protocols::{Ack, Quality, Sample, SignedAck, TelemetryBatch, TopicKind, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

const NODE: &str = "node-sigterm";
const STREAM: &str = "raw";
const BATCHES: u64 = 20;
const PER_BATCH: u64 = 50;
const TOTAL: u64 = BATCHES * PER_BATCH;
/// `ack_interval` of the first hub.
const ACK_INTERVAL: Duration = Duration::from_secs(10);
/// Until this long after the start, the first hub's first periodic ack round
/// (at `ACK_INTERVAL`) cannot have run yet.
const BEFORE_FIRST_ROUND: Duration = Duration::from_secs(8);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `cloud-hub serve` child process.
struct HubProcess {
    child: Child,
    http: String,
    data: PathBuf,
    mqtt: u16,
    log: PathBuf,
}

impl HubProcess {
    async fn start(dir: &Path, run: &str) -> Self {
        let (http_port, mqtt) = (free_port(), free_port());
        let log = dir.join(format!("hub-{run}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
            .arg("serve")
            .arg("--config")
            .arg(dir.join("hub.toml"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
            .env("RUST_LOG", "info,rumqttd=warn,rumqttc=warn,sled=warn")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let hub = Self {
            child,
            http: format!("https://127.0.0.1:{http_port}"),
            data: dir.join("data"),
            mqtt,
            log,
        };
        hub.wait_ready().await;
        hub
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // The admin token and CA exist once the hub started.
            if let Ok(c) = self.try_client()
                && c.ready().await.unwrap_or(false)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "hub not ready in 30 s; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn try_client(&self) -> Result<HubClient, cloud_hub::client::ClientError> {
        HubClient::local_admin(self.http.clone(), &self.data, HubClient::DEFAULT_TIMEOUT)
    }

    async fn stats(&self) -> Option<StreamStats> {
        let mut all: BTreeMap<String, StreamStats> =
            self.try_client().unwrap().streams(NODE).await.unwrap();
        all.remove(STREAM)
    }

    /// `kill -TERM`, then the exit status (within 30 s).
    async fn sigterm(mut self) -> ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(kill.success());
        let waited = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        let log = self.log();
        waited
            .unwrap_or_else(|_| panic!("hub still running 30 s after SIGTERM; log:\n{log}"))
            .unwrap()
    }
}

fn batch(first_seq: u64) -> TelemetryBatch {
    TelemetryBatch {
        stream: STREAM.into(),
        first_seq,
        floor_seq: 1,
        samples: (first_seq..first_seq + PER_BATCH)
            .map(|seq| Sample {
                point: (seq % 7) as u32,
                ts_ms: 1_700_000_000_000 + seq,
                value: seq as f64 * 0.5,
                quality: Quality::GOOD,
            })
            .collect(),
    }
}

/// A node's MQTT client that records every ack until its connection closes.
struct Node {
    client: AsyncClient,
    acks: Arc<Mutex<Vec<Ack>>>,
    closed: tokio::task::JoinHandle<()>,
}

impl Node {
    /// `hub_key`: the hub's key; every ack must be signed with it for this
    /// node. `tls`: the node's certificate (the broker is the mTLS gate).
    async fn connect(port: u16, hub_key: VerifyingKey, tls: Arc<rustls::ClientConfig>) -> Self {
        let topics = Topics::default();
        let mut o = MqttOptions::new(NODE, "127.0.0.1", port);
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 64);
        client
            .subscribe(topics.node(NODE, TopicKind::Ack), QoS::AtLeastOnce)
            .await
            .unwrap();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let (subscribed, suback) = oneshot::channel();
        let seen = acks.clone();
        let closed = tokio::spawn(async move {
            let mut subscribed = Some(subscribed);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(s) = subscribed.take() {
                            let _ = s.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let ack = SignedAck::open(&p.payload, &hub_key, NODE).unwrap();
                        seen.lock().unwrap().push(ack);
                    }
                    Ok(_) => {}
                    // The hub (and its embedded broker) is gone.
                    Err(_) => return,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), suback)
            .await
            .expect("no SubAck for the ack topic")
            .unwrap();
        Self {
            client,
            acks,
            closed,
        }
    }

    async fn publish(&self, batch: &TelemetryBatch) {
        self.client
            .publish(
                Topics::default().node(NODE, TopicKind::Telemetry),
                QoS::AtLeastOnce,
                false,
                encode_batch(batch),
            )
            .await
            .unwrap();
    }

    fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }
}

async fn drain_then_restart(dir: &Path) {
    std::fs::write(
        dir.join("hub.toml"),
        format!("ack_interval = \"{}s\"\n", ACK_INTERVAL.as_secs()),
    )
    .unwrap();
    let started = tokio::time::Instant::now();
    let hub = HubProcess::start(dir, "1").await;
    // The hub created its signing key in its data dir at start.
    let hub_key = cloud_hub::keys::load_or_create(&dir.join("data"))
        .unwrap()
        .verifying_key();
    let tls = edgefleet_testkit::join_mqtt_tls(&hub.try_client().unwrap(), NODE)
        .await
        .unwrap();
    let node = Node::connect(hub.mqtt, hub_key, tls).await;
    for b in 0..BATCHES {
        node.publish(&batch(1 + b * PER_BATCH)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let st = hub.stats().await;
        if let Some(st) = st.as_ref().filter(|s| s.contiguous == TOTAL) {
            break st.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hub stored {st:?} of {TOTAL} samples in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Everything stored, nothing acked yet: the first periodic round is
    // `ACK_INTERVAL` after the hub started (a machine too slow to get here
    // well before it cannot tell the drain's acks from the periodic ones).
    if started.elapsed() < BEFORE_FIRST_ROUND {
        assert_eq!(stored.acked, 0, "{stored:?}");
        assert!(node.acks().is_empty(), "acked before the drain");
    } else {
        eprintln!("slow start: the first periodic ack round may have run");
    }

    let log = hub.log.clone();
    let status = hub.sigterm().await;
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("last acks delivered"), "log:\n{log}");
    // The node's connection ends with the hub's broker; every ack it got
    // arrived on it, that is before the hub exited.
    tokio::time::timeout(Duration::from_secs(10), node.closed)
        .await
        .expect("node still connected after the hub exited")
        .unwrap();
    let acks = node.acks.lock().unwrap().clone();
    assert!(acks.iter().all(|a| a.stream == STREAM), "{acks:?}");
    let acked = acks.iter().map(|a| a.up_to_seq).max();
    assert_eq!(acked, Some(TOTAL), "last acks before exit: {acks:?}");

    // Restarted on the same data: every acked sample is there.
    let hub = HubProcess::start(dir, "2").await;
    let st = hub.stats().await.unwrap();
    assert_eq!((st.contiguous, st.acked, st.stored), (TOTAL, TOTAL, TOTAL));
    let page: SamplePage = hub
        .try_client()
        .unwrap()
        .samples(
            NODE,
            STREAM,
            &cloud_hub::api::SampleQuery {
                from_seq: Some(1),
                limit: Some(100_000),
                ..cloud_hub::api::SampleQuery::default()
            },
        )
        .await
        .unwrap();
    let sent: Vec<Sample> = (0..BATCHES)
        .flat_map(|b| batch(1 + b * PER_BATCH).samples)
        .collect();
    assert_eq!(
        page.samples.iter().map(|s| s.seq).collect::<Vec<_>>(),
        (1..=TOTAL).collect::<Vec<_>>()
    );
    assert_eq!(
        page.samples
            .iter()
            .map(cloud_hub::sink::StoredSample::sample)
            .collect::<Vec<_>>(),
        sent
    );
    let status = hub.sigterm().await;
    assert!(status.success(), "second hub: exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_hub_and_every_acked_sample_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    tokio::time::timeout(Duration::from_secs(120), drain_then_restart(dir.path()))
        .await
        .expect("the SIGTERM test took more than 120 s");
}
