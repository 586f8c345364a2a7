//! The MQTT link to the hub: connection options, TLS, and the event-loop task.
//!
//! The event loop is polled by one task that does nothing else: it never
//! publishes (rumqttc can deadlock when the polling task publishes) and hands
//! every event to the agent through a bounded [`link_channel`]
//! ([`LINK_CHANNEL_CAPACITY`]). The polling task never waits on it (a
//! stalled poll would miss keep-alives), so a full channel coalesces, by the
//! rules of [`LinkQueue`]: what the hub sends a node is desired state (only
//! the newest per topic matters; it is also retained) and cumulative acks
//! (the newest per stream wins; the hub acks again), so keeping the newest
//! loses nothing that matters. Coalesced messages are counted
//! (`link_messages_coalesced`).
//!
//! Reconnects use jittered exponential backoff; the session is persistent
//! (fixed client id, clean session off), but nothing relies on rumqttc's
//! in-memory queue: the outbox resends everything past the last ack. After a
//! certificate renewal ([`crate::renewal`]) the loop drops its connection
//! the same way a failure does (`EventLoop::clean`: in-flight publishes move
//! to the resend queue) and reconnects at once with the new certificate.

use protocols::backoff::{Backoff, BackoffPolicy};
use protocols::limits::MAX_SYNC_PACKET_BYTES;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use protocols::codec::encode_json;
use protocols::{NodeState, NodeStatus, TopicKind, Topics};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, Transport};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{EdgeConfig, TlsConfig};
use crate::metrics::Counters;

/// Link state as the agent's tasks see it (the control task sets it from
/// the session's `LinkUp`/`LinkDown`; the uplink follows it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conn {
    /// Whether the broker link is up.
    pub up: bool,
    /// Incremented on every (re)connect.
    pub epoch: u64,
}

/// What the link tells the agent.
#[derive(Debug)]
pub enum LinkEvent {
    /// A CONNACK arrived.
    Connected {
        /// Whether the broker kept our session.
        session_present: bool,
    },
    /// The connection failed or dropped; the link retries by itself.
    Disconnected {
        /// Why.
        error: String,
    },
    /// A PUBLISH arrived.
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Bytes,
    },
}

/// Why the link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A TLS file could not be read or parsed.
    #[error("mqtt.tls: {what} {path}: {detail}")]
    Tls {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// `mqtt.password_file` could not be read.
    #[error("mqtt.password_file {path}: {detail}")]
    Password {
        /// Its path.
        path: String,
        /// What went wrong.
        detail: String,
    },
}

/// In-flight window of the agent's link (QoS 1 publishes awaiting PUBACK).
pub const AGENT_INFLIGHT: u16 = 200;

/// What a node's link to the hub is made of, whoever runs the node: the
/// agent builds it from its config ([`LinkSettings::from_config`]), the
/// simulator's hollow nodes fill it in directly. [`LinkSettings::options`]
/// turns it into MQTT options the same way for both.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// MQTT client id (fixed per node: the session is persistent).
    pub client_id: String,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT keep-alive.
    pub keep_alive: std::time::Duration,
    /// In-flight window.
    pub inflight: u16,
    /// Last will: topic and payload (the node's offline status, retained).
    pub last_will: (String, Vec<u8>),
    /// TLS (with the node's client certificate inside); plain TCP when
    /// `None`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Username and password, for brokers that want them.
    pub login: Option<(String, String)>,
}

impl LinkSettings {
    /// The agent's settings: from its config, with the offline status as of
    /// `now_ms` as last will.
    pub fn from_config(cfg: &EdgeConfig, topics: &Topics, now_ms: u64) -> Self {
        let will = NodeStatus {
            node: cfg.node.clone(),
            state: NodeState::Offline,
            at_ms: now_ms,
        };
        Self {
            client_id: cfg.client_id().to_owned(),
            host: cfg.mqtt.host.clone(),
            port: cfg.mqtt.port,
            keep_alive: cfg.mqtt.keep_alive,
            inflight: AGENT_INFLIGHT,
            last_will: (
                topics.node(&cfg.node, TopicKind::Status),
                encode_json("status", &will).unwrap_or_default(),
            ),
            tls: None,
            login: None,
        }
    }

    /// MQTT options: persistent session (clean session off), the sync
    /// link's packet limit, retained QoS 1 last will.
    pub fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_clean_session(false);
        o.set_max_packet_size(MAX_SYNC_PACKET_BYTES, MAX_SYNC_PACKET_BYTES);
        o.set_inflight(self.inflight);
        let (topic, payload) = self.last_will.clone();
        o.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, true));
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        if let Some((user, password)) = &self.login {
            o.set_credentials(user.clone(), password.clone());
        }
        o
    }
}

/// How the agent's link is secured, as [`options`] chose it (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkSecurity {
    /// `[mqtt.tls]` as configured.
    Configured,
    /// TLS with the joined identity (`{data_dir}/identity`).
    Identity,
    /// Plain TCP (no identity, or `mqtt.plaintext = true`).
    Plain,
}

/// Builds the agent's MQTT options: [`LinkSettings::from_config`], plus TLS
/// from `[mqtt.tls]` when set (explicit config wins), else from the node's
/// joined `identity` (unless `mqtt.plaintext`), plus the username and the
/// password from `mqtt.password_file`.
///
/// With the identity, the client certificate is whatever `slot` holds at
/// each handshake (so a renewal needs no new options); `None` makes a slot
/// of the identity's current files.
pub fn options(
    cfg: &EdgeConfig,
    topics: &Topics,
    now_ms: u64,
    identity: Option<&crate::identity::Identity>,
    slot: Option<Arc<crate::identity::ClientCertSlot>>,
) -> Result<(MqttOptions, LinkSecurity), LinkError> {
    let mut settings = LinkSettings::from_config(cfg, topics, now_ms);
    let security = match (&cfg.mqtt.tls, identity) {
        (Some(tls), _) => {
            settings.tls = Some(Arc::new(tls_config(tls)?));
            LinkSecurity::Configured
        }
        (None, Some(id)) if !cfg.mqtt.plaintext => {
            let err = |e: crate::identity::IdentityError| LinkError::Tls {
                what: "identity",
                path: crate::identity::dir(&cfg.data_dir).display().to_string(),
                detail: e.to_string(),
            };
            let tls = match slot {
                Some(slot) => id.mqtt_tls_config_with(slot),
                None => id.mqtt_tls_config(),
            }
            .map_err(err)?;
            settings.tls = Some(Arc::new(tls));
            LinkSecurity::Identity
        }
        _ => LinkSecurity::Plain,
    };
    if let Some(user) = &cfg.mqtt.username {
        let password = match &cfg.mqtt.password_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| LinkError::Password {
                    path: p.display().to_string(),
                    detail: e.to_string(),
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            None => String::new(),
        };
        settings.login = Some((user.clone(), password));
    }
    Ok((settings.options(), security))
}

fn tls_config(tls: &TlsConfig) -> Result<rustls::ClientConfig, LinkError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |what: &'static str, path: &std::path::Path, detail: String| LinkError::Tls {
        what,
        path: path.display().to_string(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&tls.ca_file)
        .map_err(|e| err("ca_file", &tls.ca_file, e.to_string()))?;
    for ca in cas {
        let ca = ca.map_err(|e| err("ca_file", &tls.ca_file, e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| err("ca_file", &tls.ca_file, e.to_string()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err("ca_file", &tls.ca_file, e.to_string()))?
    .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .map_err(|e| err("cert_file", cert, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err("cert_file", cert, e.to_string()))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| err("key_file", key, e.to_string()))?;
            builder
                .with_client_auth_cert(certs, key_der)
                .map_err(|e| err("key_file", key, e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// Creates the client and spawns nothing: call [`run_event_loop`] in a task.
pub fn client(options: MqttOptions) -> (AsyncClient, EventLoop) {
    AsyncClient::new(options, 256)
}

/// Capacity of the link's channel to the control task (M6).
pub const LINK_CHANNEL_CAPACITY: usize = 256;

/// The queue behind [`link_channel`]: pure, no locking, no I/O.
///
/// # Invariants
/// - Events leave in the order they came, except what a full queue
///   coalesces (below).
/// - It holds at most `capacity` events plus two link-state events.
/// - A full queue makes room for a message by removing, in this order: an
///   older message with the same [`coalescing key`](coalescing_key) (the
///   topic; for acks topic and stream), else the oldest ack, else the
///   oldest message; each removal is counted.
/// - Link-state events are never lost as a transition: a full queue
///   collapses the state events it holds with the new one into
///   `Disconnected` (if any was one) followed by the new `Connected` (if it
///   is one), at the tail, so the control task still sees the link go down
///   and come back up, once.
#[derive(Debug)]
pub struct LinkQueue {
    items: VecDeque<LinkEvent>,
    capacity: usize,
}

impl LinkQueue {
    /// An empty queue for `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            items: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Events queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queues `ev`; returns how many queued messages it replaced (0 unless
    /// the queue was full).
    pub fn push(&mut self, ev: LinkEvent) -> u64 {
        if self.items.len() < self.capacity {
            self.items.push_back(ev);
            return 0;
        }
        match ev {
            LinkEvent::Message { .. } => {
                let key = coalescing_key(&ev);
                let is_msg = |e: &LinkEvent| matches!(e, LinkEvent::Message { .. });
                let is_ack = |e: &LinkEvent| matches!(e, LinkEvent::Message { topic, .. } if topic.ends_with("/ack"));
                let victim = self
                    .items
                    .iter()
                    .position(|e| is_msg(e) && coalescing_key(e) == key)
                    .or_else(|| self.items.iter().position(is_ack))
                    .or_else(|| self.items.iter().position(is_msg));
                let removed = victim.and_then(|i| self.items.remove(i)).is_some();
                self.items.push_back(ev);
                u64::from(removed)
            }
            state => {
                let mut down = matches!(state, LinkEvent::Disconnected { .. });
                let mut last_error = None;
                self.items.retain_mut(|e| match e {
                    LinkEvent::Message { .. } => true,
                    LinkEvent::Disconnected { error } => {
                        down = true;
                        last_error = Some(std::mem::take(error));
                        false
                    }
                    LinkEvent::Connected { .. } => false,
                });
                match state {
                    LinkEvent::Disconnected { error } => {
                        self.items.push_back(LinkEvent::Disconnected { error });
                    }
                    connected => {
                        if down {
                            self.items.push_back(LinkEvent::Disconnected {
                                error: last_error.unwrap_or_default(),
                            });
                        }
                        self.items.push_back(connected);
                    }
                }
                0
            }
        }
    }

    /// The oldest event.
    pub fn pop(&mut self) -> Option<LinkEvent> {
        self.items.pop_front()
    }
}

/// What a full [`LinkQueue`] coalesces on: the topic; for an ack also the
/// stream it names (read, not verified: only the control task verifies,
/// and a forged ack can at worst displace a real one, which the hub's next
/// cumulative ack replaces).
pub fn coalescing_key(ev: &LinkEvent) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        payload: String,
    }
    #[derive(serde::Deserialize)]
    struct Claim {
        stream: String,
    }
    let LinkEvent::Message { topic, payload } = ev else {
        return String::new();
    };
    if topic.ends_with("/ack")
        && let Ok(env) = serde_json::from_slice::<Envelope>(payload)
        && let Ok(claim) = serde_json::from_str::<Claim>(&env.payload)
    {
        return format!("{topic}\n{}", claim.stream);
    }
    topic.clone()
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<LinkQueue>,
    notify: Notify,
    counters: Arc<Counters>,
    sender_gone: std::sync::atomic::AtomicBool,
    receiver_gone: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, LinkQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The link task's end of [`link_channel`]: never waits.
#[derive(Debug)]
pub struct LinkSender(Arc<Shared>);

/// The control task's end of [`link_channel`].
#[derive(Debug)]
pub struct LinkReceiver(Arc<Shared>);

/// The receiver is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// A bounded channel from the link task to the control task with the
/// coalescing policy of [`LinkQueue`]; coalesced messages are counted in
/// `counters.link_messages_coalesced`.
pub fn link_channel(capacity: usize, counters: Arc<Counters>) -> (LinkSender, LinkReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(LinkQueue::new(capacity)),
        notify: Notify::new(),
        counters,
        sender_gone: false.into(),
        receiver_gone: false.into(),
    });
    (LinkSender(shared.clone()), LinkReceiver(shared))
}

impl LinkSender {
    /// Queues `ev` without waiting.
    pub fn send(&self, ev: LinkEvent) -> Result<(), Closed> {
        use std::sync::atomic::Ordering;
        if self.0.receiver_gone.load(Ordering::Acquire) {
            return Err(Closed);
        }
        let coalesced = self.0.queue().push(ev);
        if coalesced > 0 {
            Counters::add(&self.0.counters.link_messages_coalesced, coalesced);
            tracing::debug!(
                capacity = LINK_CHANNEL_CAPACITY,
                "link channel full: an older message was replaced by a newer one"
            );
        }
        self.0.notify.notify_one();
        Ok(())
    }
}

impl Drop for LinkSender {
    fn drop(&mut self) {
        self.0
            .sender_gone
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.notify.notify_one();
    }
}

impl LinkReceiver {
    /// The next event; `None` once the sender is gone and all is read.
    pub async fn recv(&mut self) -> Option<LinkEvent> {
        loop {
            if let Some(ev) = self.0.queue().pop() {
                return Some(ev);
            }
            if self
                .0
                .sender_gone
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return self.0.queue().pop();
            }
            // A notify_one between the check and here leaves a permit.
            self.0.notify.notified().await;
        }
    }
}

impl Drop for LinkReceiver {
    fn drop(&mut self) {
        self.0
            .receiver_gone
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

async fn rotation(rotated: &mut Option<watch::Receiver<u64>>) {
    match rotated {
        Some(rx) => {
            if rx.changed().await.is_err() {
                // The renewal task is gone: no more rotations.
                *rotated = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Polls the event loop until cancelled, reconnecting with jittered
/// exponential backoff between `min` and `max`. When `rotated` changes (a
/// renewed client certificate), drops the connection as a failure would
/// (in-flight publishes are kept for the resend) and reconnects at once.
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    events: LinkSender,
    min: Duration,
    max: Duration,
    mut rotated: Option<watch::Receiver<u64>>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(BackoffPolicy::reconnect(min, max), rand::random());
    loop {
        let polled = tokio::select! {
            () = cancel.cancelled() => return,
            () = rotation(&mut rotated) => {
                eventloop.clean();
                backoff.reset();
                let error = "client certificate renewed: reconnecting with it".to_owned();
                if events.send(LinkEvent::Disconnected { error }).is_err() {
                    return;
                }
                continue;
            }
            p = eventloop.poll() => p,
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                LinkEvent::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Message {
                topic: p.topic,
                payload: p.payload,
            },
            Ok(_) => continue,
            Err(e) => {
                if events
                    .send(LinkEvent::Disconnected {
                        error: e.to_string(),
                    })
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
                continue;
            }
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn identity() -> crate::identity::Identity {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let cert = rcgen::CertificateParams::new(vec!["n1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        crate::identity::Identity {
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            ca_pem: ca.pem(),
            hub_public_key: "11".repeat(32),
        }
    }

    fn is_tls(o: &MqttOptions) -> bool {
        matches!(o.transport(), Transport::Tls(_))
    }

    #[test]
    fn a_joined_node_uses_tls_with_its_identity_unless_told_otherwise() {
        let topics = Topics::default();
        let mut cfg = EdgeConfig::default();
        let id = identity();
        // Not joined: plain TCP.
        let (o, s) = options(&cfg, &topics, 0, None, None).unwrap();
        assert_eq!(s, LinkSecurity::Plain);
        assert!(!is_tls(&o));
        // Joined: TLS with the identity, by default.
        let (o, s) = options(&cfg, &topics, 0, Some(&id), None).unwrap();
        assert_eq!(s, LinkSecurity::Identity);
        assert!(is_tls(&o));
        // The explicit lab opt-out.
        cfg.mqtt.plaintext = true;
        let (o, s) = options(&cfg, &topics, 0, Some(&id), None).unwrap();
        assert_eq!(s, LinkSecurity::Plain);
        assert!(!is_tls(&o));
        // Explicit [mqtt.tls] wins over the identity.
        cfg.mqtt.plaintext = false;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &id.ca_pem).unwrap();
        cfg.mqtt.tls = Some(TlsConfig {
            ca_file: ca,
            cert_file: None,
            key_file: None,
        });
        let (o, s) = options(&cfg, &topics, 0, Some(&id), None).unwrap();
        assert_eq!(s, LinkSecurity::Configured);
        assert!(is_tls(&o));
        // A bad identity is an error that names it.
        let bad = crate::identity::Identity {
            cert_pem: "junk".into(),
            ..id
        };
        cfg.mqtt.tls = None;
        let e = options(&cfg, &topics, 0, Some(&bad), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("mqtt.tls: identity"), "{e}");
    }

    #[test]
    fn username_and_password_file_become_credentials() {
        let topics = Topics::default();
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\nignored\n").unwrap();
        let mut cfg = EdgeConfig::default();
        cfg.mqtt.username = Some("line-1".into());
        cfg.mqtt.password_file = Some(pw);
        let (o, _) = options(&cfg, &topics, 0, None, None).unwrap();
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("line-1", "s3cret")
        );
        cfg.mqtt.password_file = Some(dir.path().join("missing"));
        let e = options(&cfg, &topics, 0, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("mqtt.password_file"), "{e}");
    }

    fn msg(topic: &str, payload: &str) -> LinkEvent {
        LinkEvent::Message {
            topic: topic.into(),
            payload: Bytes::from(payload.to_owned()),
        }
    }

    fn ack(stream: &str, up_to: u64) -> LinkEvent {
        let claim = serde_json::json!({"node": "n1", "stream": stream, "up_to_seq": up_to});
        let env = serde_json::json!({"payload": claim.to_string(), "signature": "x"});
        msg("r/nodes/n1/ack", &env.to_string())
    }

    fn drain(q: &mut LinkQueue) -> Vec<String> {
        std::iter::from_fn(|| q.pop())
            .map(|e| match e {
                LinkEvent::Message { payload, .. } => String::from_utf8(payload.to_vec()).unwrap(),
                LinkEvent::Connected { .. } => "C".into(),
                LinkEvent::Disconnected { .. } => "D".into(),
            })
            .collect()
    }

    #[test]
    fn a_full_queue_keeps_the_newest_desired_and_the_newest_ack_per_stream() {
        let mut q = LinkQueue::new(3);
        assert_eq!(q.push(msg("r/nodes/n1/desired", "d1")), 0);
        assert_eq!(q.push(ack("a", 1)), 0);
        assert_eq!(q.push(ack("b", 1)), 0);
        // Full: a newer desired replaces the older one.
        assert_eq!(q.push(msg("r/nodes/n1/desired", "d2")), 1);
        // A newer ack of stream a replaces a's, not b's.
        assert_eq!(q.push(ack("a", 9)), 1);
        assert_eq!(q.len(), 3);
        let out = drain(&mut q);
        assert!(out[0].contains("\\\"stream\\\":\\\"b\\\""), "{out:?}");
        assert_eq!(out[1], "d2");
        assert!(out[2].contains("\\\"up_to_seq\\\":9"), "{out:?}");
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_queue_without_a_match_drops_the_oldest_ack_first() {
        let mut q = LinkQueue::new(2);
        q.push(msg("r/nodes/n1/desired", "d1"));
        q.push(ack("a", 1));
        assert_eq!(q.push(ack("c", 5)), 1);
        let out = drain(&mut q);
        assert_eq!(out[0], "d1", "the desired document is kept");
        assert!(out[1].contains("up_to_seq\\\":5"), "{out:?}");
    }

    #[test]
    fn link_state_survives_a_full_queue_as_one_down_up_transition() {
        let mut q = LinkQueue::new(2);
        q.push(msg("r/nodes/n1/desired", "d1"));
        q.push(msg("r/nodes/n1/desired", "d1b"));
        for _ in 0..10 {
            q.push(LinkEvent::Disconnected { error: "x".into() });
            q.push(LinkEvent::Connected {
                session_present: true,
            });
        }
        // Bounded: capacity plus one transition.
        assert_eq!(drain(&mut q), vec!["d1", "d1b", "D", "C"]);
        q.push(msg("t", "m"));
        q.push(LinkEvent::Connected {
            session_present: true,
        });
        q.push(LinkEvent::Disconnected { error: "y".into() });
        assert_eq!(drain(&mut q), vec!["m", "D"]);
    }

    #[tokio::test]
    async fn the_channel_never_blocks_the_sender_and_counts_what_it_coalesced() {
        let counters = Arc::new(Counters::default());
        let (tx, mut rx) = link_channel(4, counters.clone());
        for i in 0..100 {
            tx.send(msg("r/nodes/n1/desired", &format!("d{i}")))
                .unwrap();
        }
        assert_eq!(
            counters
                .link_messages_coalesced
                .load(std::sync::atomic::Ordering::Relaxed),
            96
        );
        let mut got = Vec::new();
        for _ in 0..4 {
            let Some(LinkEvent::Message { payload, .. }) = rx.recv().await else {
                panic!("a message")
            };
            got.push(String::from_utf8(payload.to_vec()).unwrap());
        }
        // The newest document is among what is left, and last.
        assert_eq!(got.last().map(String::as_str), Some("d99"));
        drop(tx);
        assert!(rx.recv().await.is_none());
        let (tx, rx) = link_channel(4, counters);
        drop(rx);
        assert_eq!(tx.send(msg("t", "m")), Err(Closed));
    }
}
