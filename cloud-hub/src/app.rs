//! The hub process: registry, sink, MQTT session, ack loop and REST API.
//!
//! Start here: [`App::start`] opens the database, starts the embedded broker
//! when configured, connects to the broker, and spawns every task into one
//! `JoinSet`; [`App::run`] waits until cancellation or the first failure.
//!
//! The MQTT event loop is polled by a task that never publishes; it forwards
//! telemetry and documents to the ingest task over a bounded channel and
//! connection changes to the control task. Acks are published by the ack task
//! after the sink has flushed, at most one per stream per `ack_interval`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use protocols::codec::{decode_batch, decode_json, encode_json};
use protocols::signing::SigningKey;
use protocols::{
    Ack, DesiredState, Event, NodeState, NodeStatus, ReportedState, SignedDesired, TopicKind,
    Topics,
};
use rand::Rng as _;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::commit::GroupCommit;
use crate::config::HubConfig;
use crate::keys::{self, KeyError};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryError};
use crate::sink::{Sink, SinkError};

/// Why the hub failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The database could not be opened.
    #[error("cannot open hub database at {path}: {source}")]
    Open {
        /// Path.
        path: String,
        /// sled error.
        #[source]
        source: sled::Error,
    },
    /// Registry failure.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Sink failure.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// Signing key failure.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Embedded broker failure.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// The artifact store could not be opened.
    #[error(transparent)]
    Artifacts(#[from] crate::artifacts::ArtifactError),
    /// The HTTP listener could not bind.
    #[error("http_listen {addr}: {source}")]
    Http {
        /// Address.
        addr: SocketAddr,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A document could not be encoded or signed.
    #[error(transparent)]
    Codec(#[from] protocols::CodecError),
    /// The MQTT client is gone (shutting down).
    #[error("mqtt client closed: {0}")]
    Mqtt(String),
    /// Desired state could not be made durable.
    #[error(transparent)]
    Commit(#[from] crate::commit::CommitError),
    /// A task panicked.
    #[error("hub task failed: {0}")]
    Task(String),
}

/// Shared state of a running hub.
#[derive(Debug)]
pub struct Hub {
    /// Signs desired state.
    pub key: SigningKey,
    /// Topic scheme.
    pub topics: Topics,
    /// Node registry.
    pub registry: Registry,
    /// Telemetry sink.
    pub sink: Sink,
    /// Counters.
    pub metrics: Metrics,
    /// Content-addressed blobs (WASM modules, models).
    pub artifacts: Arc<crate::artifacts::ArtifactStore>,
    /// Most recent events per node.
    pub events: EventLog,
    /// Set when the broker acknowledged the hub's subscriptions; cleared
    /// when the connection drops.
    mqtt_subscribed: AtomicBool,
    /// Set when desired state was republished after a connect; cleared when
    /// the connection drops.
    desired_republished: AtomicBool,
    client: AsyncClient,
    commit: GroupCommit,
    db: sled::Db,
}

impl Hub {
    /// Whether the hub's MQTT session is up, subscribed, and has republished
    /// desired state. Clients that connect nodes should wait for this
    /// (`GET /readyz`): a broker may hand a later wildcard subscription only
    /// part of the retained messages (rumqttd forwards at most one inflight
    /// window, 100, of them), so node status published before the hub
    /// subscribed can be missed.
    pub fn mqtt_ready(&self) -> bool {
        self.mqtt_subscribed.load(Ordering::Acquire)
            && self.desired_republished.load(Ordering::Acquire)
    }

    /// Signs, stores (durably) and publishes a node's new desired state.
    pub async fn set_desired(&self, desired: &DesiredState) -> Result<(), HubError> {
        let doc = SignedDesired::sign(desired, &self.key)?;
        self.registry
            .set_desired(&desired.node, desired.revision, doc.clone())?;
        self.commit.commit().await?;
        self.publish_desired(&desired.node, &doc).await
    }

    async fn publish_desired(&self, node: &str, doc: &SignedDesired) -> Result<(), HubError> {
        let payload = doc.encode()?;
        self.client
            .publish(
                self.topics.node(node, TopicKind::Desired),
                QoS::AtLeastOnce,
                true,
                payload,
            )
            .await
            .map_err(|e| HubError::Mqtt(e.to_string()))?;
        Metrics::inc(&self.metrics.desired_published);
        Ok(())
    }
}

/// The most recent events of each node, in memory (an operator's view, not
/// an audit log: the hub keeps [`EventLog::PER_NODE`] per node and forgets
/// them on restart).
#[derive(Debug, Default)]
pub struct EventLog {
    nodes: Mutex<HashMap<String, VecDeque<Event>>>,
}

impl EventLog {
    /// Events kept per node.
    pub const PER_NODE: usize = 256;

    /// Records an event of `node`, forgetting the oldest beyond the bound.
    pub fn push(&self, node: &str, ev: Event) {
        let mut m = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let q = m.entry(node.to_owned()).or_default();
        if q.len() >= Self::PER_NODE {
            q.pop_front();
        }
        q.push_back(ev);
    }

    /// Recent events of `node`, oldest first.
    pub fn recent(&self, node: &str) -> Vec<Event> {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// A running hub.
#[derive(Debug)]
pub struct App {
    hub: Arc<Hub>,
    tasks: JoinSet<Result<(), HubError>>,
    http_addr: SocketAddr,
    mqtt_addr: (String, u16),
    cancel: CancellationToken,
}

enum Control {
    Connected,
}

impl App {
    /// Opens storage, starts the broker (if embedded), connects, serves HTTP.
    pub async fn start(mut cfg: HubConfig, cancel: CancellationToken) -> Result<Self, HubError> {
        let data_dir = cfg.data_dir.clone();
        let cache = cfg.cache_capacity_bytes;
        let db = tokio::task::spawn_blocking(move || {
            sled::Config::new()
                .path(data_dir.join("db"))
                .cache_capacity(cache)
                .flush_every_ms(Some(1_000))
                .open()
                .map_err(|source| HubError::Open {
                    path: data_dir.join("db").display().to_string(),
                    source,
                })
        })
        .await
        .map_err(|e| HubError::Task(e.to_string()))??;
        let key = keys::load_or_create(&cfg.data_dir)?;
        let artifacts = {
            let dir = cfg.data_dir.join("artifacts");
            tokio::task::spawn_blocking(move || crate::artifacts::ArtifactStore::open(&dir))
                .await
                .map_err(|e| HubError::Task(e.to_string()))??
        };
        let registry = Registry::open(&db)?;
        let sink = Sink::open(&db)?;
        if let Some(b) = &mut cfg.embedded_broker {
            if b.listen.port() == 0 {
                b.listen = free_port(b.listen)?;
            }
            crate::broker::start(b)?;
            info!(listen = %b.listen, "embedded MQTT broker started");
        }
        let mqtt_addr = cfg.broker_address();
        let topics = Topics::new(&cfg.topic_root);
        let mut opts =
            MqttOptions::new(cfg.mqtt.client_id.clone(), mqtt_addr.0.clone(), mqtt_addr.1);
        opts.set_clean_session(false);
        opts.set_keep_alive(std::time::Duration::from_secs(15));
        opts.set_max_packet_size(
            crate::broker::MAX_PAYLOAD_BYTES,
            crate::broker::MAX_PAYLOAD_BYTES,
        );
        opts.set_inflight(500);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let hub = Arc::new(Hub {
            key,
            topics,
            registry,
            sink,
            metrics: Metrics::default(),
            artifacts: Arc::new(artifacts),
            events: EventLog::default(),
            mqtt_subscribed: AtomicBool::new(false),
            desired_republished: AtomicBool::new(false),
            client,
            commit: GroupCommit::new(db.clone()),
            db,
        });

        let listener = tokio::net::TcpListener::bind(cfg.http_listen)
            .await
            .map_err(|source| HubError::Http {
                addr: cfg.http_listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| HubError::Http {
            addr: cfg.http_listen,
            source,
        })?;

        let mut tasks = JoinSet::new();
        let (msg_tx, mut msg_rx) = mpsc::channel::<(String, Bytes, Delivery)>(4096);
        let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Control>();
        {
            let cancel = cancel.clone();
            let hub = hub.clone();
            tasks.spawn(async move {
                let mut delay = std::time::Duration::from_millis(100);
                loop {
                    let polled = tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        p = eventloop.poll() => p,
                    };
                    match polled {
                        Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                            delay = std::time::Duration::from_millis(100);
                            let _ = ctl_tx.send(Control::Connected);
                        }
                        Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                            // The hub subscribes only after a connect.
                            hub.mqtt_subscribed.store(true, Ordering::Release);
                        }
                        Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                            tokio::select! {
                                () = cancel.cancelled() => return Ok(()),
                                r = msg_tx.send((p.topic, p.payload, Delivery::of(p.retain))) => if r.is_err() { return Ok(()) },
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            hub.mqtt_subscribed.store(false, Ordering::Release);
                            hub.desired_republished.store(false, Ordering::Release);
                            warn!(error = %e, "hub MQTT connection error; retrying");
                            // Jittered, so hub replicas do not reconnect in lockstep.
                            let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
                            tokio::select! {
                                () = cancel.cancelled() => return Ok(()),
                                () = tokio::time::sleep(jittered) => {}
                            }
                            delay = (delay * 2).min(std::time::Duration::from_secs(10));
                        }
                    }
                }
            });
        }
        {
            let hub = hub.clone();
            let cancel = cancel.clone();
            let shared = cfg.shared_group.clone();
            tasks.spawn(async move {
                loop {
                    let ev = tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        ev = ctl_rx.recv() => ev,
                    };
                    let Some(Control::Connected) = ev else {
                        return Ok(());
                    };
                    let telemetry = match &shared {
                        Some(g) => hub.topics.shared_all_nodes(g, TopicKind::Telemetry),
                        None => hub.topics.all_nodes(TopicKind::Telemetry),
                    };
                    let filters = vec![
                        SubscribeFilter::new(telemetry, QoS::AtLeastOnce),
                        SubscribeFilter::new(
                            hub.topics.all_nodes(TopicKind::Reported),
                            QoS::AtLeastOnce,
                        ),
                        SubscribeFilter::new(
                            hub.topics.all_nodes(TopicKind::Status),
                            QoS::AtLeastOnce,
                        ),
                        SubscribeFilter::new(
                            hub.topics.all_nodes(TopicKind::Events),
                            QoS::AtLeastOnce,
                        ),
                    ];
                    hub.client
                        .subscribe_many(filters)
                        .await
                        .map_err(|e| HubError::Mqtt(e.to_string()))?;
                    // The broker may have lost retained messages (rumqttd keeps
                    // them in memory): publish every node's desired state again.
                    for (node, rec) in hub.registry.all()? {
                        if let Some(doc) = rec.desired {
                            hub.publish_desired(&node, &doc).await?;
                        }
                    }
                    hub.desired_republished.store(true, Ordering::Release);
                    info!("hub subscribed and desired state republished");
                }
            });
        }
        {
            let hub = hub.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                loop {
                    let msg = tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        m = msg_rx.recv() => m,
                    };
                    let Some((topic, payload, delivery)) = msg else {
                        return Ok(());
                    };
                    handle_message(&hub, &topic, &payload, delivery)?;
                }
            });
        }
        {
            let hub = hub.clone();
            let cancel = cancel.clone();
            let every = cfg.ack_interval;
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(every) => {}
                    }
                    for (node, stream, up_to) in hub.sink.flush_and_collect_acks().await? {
                        let payload = encode_json(
                            "ack",
                            &Ack {
                                stream,
                                up_to_seq: up_to,
                            },
                        )?;
                        hub.client
                            .publish(
                                hub.topics.node(&node, TopicKind::Ack),
                                QoS::AtLeastOnce,
                                false,
                                payload,
                            )
                            .await
                            .map_err(|e| HubError::Mqtt(e.to_string()))?;
                        Metrics::inc(&hub.metrics.acks_published);
                    }
                }
            });
        }
        {
            let router = crate::api::router(hub.clone());
            let cancel = cancel.clone();
            tasks.spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { cancel.cancelled().await })
                    .await
                    .map_err(|source| HubError::Http {
                        addr: http_addr,
                        source,
                    })
            });
        }
        info!(http = %http_addr, mqtt = ?mqtt_addr, "cloud-hub running");
        Ok(Self {
            hub,
            tasks,
            http_addr,
            mqtt_addr,
            cancel,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The broker the hub uses (host, port).
    pub fn mqtt_addr(&self) -> (String, u16) {
        self.mqtt_addr.clone()
    }

    /// Shared state (for tests and embedding).
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    /// Runs until cancelled or a task fails.
    pub async fn run(mut self) -> Result<(), HubError> {
        let mut first = None;
        while let Some(j) = self.tasks.join_next().await {
            let r = j.map_err(|e| HubError::Task(e.to_string())).and_then(|r| r);
            if let Err(e) = r {
                warn!(error = %e, "hub task failed; stopping");
                first.get_or_insert(e);
                self.cancel.cancel();
            }
        }
        let _ = self.hub.db.flush_async().await;
        first.map_or(Ok(()), Err)
    }
}

fn free_port(addr: SocketAddr) -> Result<SocketAddr, HubError> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|source| crate::broker::BrokerError::Bind { addr, source })?;
    l.local_addr()
        .map_err(|source| HubError::Broker(crate::broker::BrokerError::Bind { addr, source }))
}

/// How a message reached the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Forwarded as it was published (MQTT 3.1.1 §3.3.1.3: retain flag 0
    /// on a matching, established subscription; also messages queued for
    /// the hub's persistent session while it was away).
    Live,
    /// A stored retained message, replayed because the hub (re)subscribed.
    Retained,
}

impl Delivery {
    fn of(retain: bool) -> Self {
        if retain { Self::Retained } else { Self::Live }
    }
}

/// Handles one incoming message; bad payloads are counted and logged, never fatal.
///
/// A node's `status` is published only when it connects (online) and as its
/// last will (offline). A hub that subscribes while nodes are connected
/// learns their status from retained messages, and a broker may replay only
/// part of them (rumqttd 0.20 forwards at most 100 to a new subscription).
/// So a *live* reported state — proof that the node is connected now — from
/// a node the registry holds as offline or unknown marks it online. A
/// retained reported state proves nothing (the node may have died since),
/// and ordering per subscription means a node's last will, published after
/// its last report, still lands after it.
fn handle_message(
    hub: &Hub,
    topic: &str,
    payload: &[u8],
    delivery: Delivery,
) -> Result<(), HubError> {
    let Some((node, kind)) = hub.topics.parse(topic) else {
        Metrics::inc(&hub.metrics.unexpected_messages);
        return Ok(());
    };
    match kind {
        TopicKind::Telemetry => match decode_batch(payload) {
            Ok(batch) => {
                let r = hub.sink.ingest(node, &batch)?;
                hub.metrics.node(node, |t| {
                    t.batches += 1;
                    t.samples += r.stored;
                    t.duplicates += r.duplicates;
                });
            }
            Err(e) => {
                warn!(%node, error = %e, "bad telemetry payload");
                hub.metrics.node(node, |t| t.bad_payloads += 1);
            }
        },
        TopicKind::Reported => match decode_json::<ReportedState>("reported state", payload) {
            Ok(r) if r.node == node => hub.registry.update(node, |rec| {
                let online = rec
                    .status
                    .as_ref()
                    .is_some_and(|s| s.state == NodeState::Online);
                if delivery == Delivery::Live && !online {
                    rec.status = Some(NodeStatus {
                        node: node.to_owned(),
                        state: NodeState::Online,
                        at_ms: r.at_ms,
                    });
                    Metrics::inc(&hub.metrics.status_inferred_online);
                }
                rec.reported = Some(r);
                Ok(())
            })?,
            Ok(r) => {
                warn!(%node, claimed = %r.node, "reported state names another node; ignored");
                Metrics::inc(&hub.metrics.bad_documents);
            }
            Err(e) => {
                warn!(%node, error = %e, "bad reported state");
                Metrics::inc(&hub.metrics.bad_documents);
            }
        },
        TopicKind::Status => match decode_json::<NodeStatus>("status", payload) {
            Ok(s) if s.node == node => hub.registry.update(node, |rec| {
                rec.status = Some(s);
                Ok(())
            })?,
            Ok(_) | Err(_) => Metrics::inc(&hub.metrics.bad_documents),
        },
        TopicKind::Events => match decode_json::<Event>("event", payload) {
            Ok(ev) => {
                Metrics::inc(&hub.metrics.events);
                info!(%node, kind = ?ev.kind, message = %ev.message, "edge event");
                hub.events.push(node, ev);
            }
            Err(_) => Metrics::inc(&hub.metrics.bad_documents),
        },
        TopicKind::Desired | TopicKind::Ack => Metrics::inc(&hub.metrics.unexpected_messages),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn status(node: &str, state: NodeState, at_ms: u64) -> Vec<u8> {
        encode_json(
            "status",
            &NodeStatus {
                node: node.into(),
                state,
                at_ms,
            },
        )
        .unwrap()
    }

    fn reported(node: &str, at_ms: u64) -> Vec<u8> {
        encode_json(
            "reported",
            &ReportedState {
                node: node.into(),
                applied_revision: 3,
                at_ms,
                ..ReportedState::default()
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_live_report_marks_a_node_with_missed_status_online_a_retained_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = HubConfig {
            data_dir: dir.path().to_owned(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            ..HubConfig::default()
        };
        cfg.embedded_broker.as_mut().unwrap().listen = "127.0.0.1:0".parse().unwrap();
        let cancel = CancellationToken::new();
        let app = App::start(cfg, cancel.clone()).await.unwrap();
        let hub = app.hub();
        let topics = hub.topics.clone();
        let rep_topic = |n: &str| topics.node(n, TopicKind::Reported);
        let st_topic = |n: &str| topics.node(n, TopicKind::Status);
        let state = |n: &str| {
            hub.registry
                .get(n)
                .unwrap()
                .and_then(|r| r.status)
                .map(|s| (s.state, s.at_ms))
        };
        let inferred = || hub.metrics.status_inferred_online.load(Ordering::Relaxed);

        // A retained report (replayed on subscribe) proves nothing.
        handle_message(
            &hub,
            &rep_topic("a"),
            &reported("a", 10),
            Delivery::Retained,
        )
        .unwrap();
        assert_eq!(state("a"), None);
        assert_eq!(
            hub.registry
                .get("a")
                .unwrap()
                .unwrap()
                .reported
                .unwrap()
                .applied_revision,
            3
        );
        // A live one means the node is connected: its missed status is healed.
        handle_message(&hub, &rep_topic("a"), &reported("a", 20), Delivery::Live).unwrap();
        assert_eq!(state("a"), Some((NodeState::Online, 20)));
        assert_eq!(inferred(), 1);
        // Its last will, published after its last report, wins.
        handle_message(
            &hub,
            &st_topic("a"),
            &status("a", NodeState::Offline, 5),
            Delivery::Live,
        )
        .unwrap();
        assert_eq!(state("a"), Some((NodeState::Offline, 5)));
        // A retained report of an offline node leaves it offline.
        handle_message(
            &hub,
            &rep_topic("a"),
            &reported("a", 20),
            Delivery::Retained,
        )
        .unwrap();
        assert_eq!(state("a"), Some((NodeState::Offline, 5)));
        // A node whose status arrived is left alone.
        handle_message(
            &hub,
            &st_topic("b"),
            &status("b", NodeState::Online, 7),
            Delivery::Live,
        )
        .unwrap();
        handle_message(&hub, &rep_topic("b"), &reported("b", 30), Delivery::Live).unwrap();
        assert_eq!(state("b"), Some((NodeState::Online, 7)));
        assert_eq!(inferred(), 1);
        assert!(
            hub.metrics
                .render()
                .contains("edgefleet_hub_status_inferred_online_total 1")
        );

        cancel.cancel();
        app.run().await.unwrap();
    }
}
