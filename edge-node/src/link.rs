//! The MQTT link to the hub: connection options, TLS, and the event-loop task.
//!
//! The event loop is polled by one task that does nothing else: it never
//! publishes (rumqttc can deadlock when the polling task publishes) and hands
//! every event to the agent through an unbounded channel, which is bounded in
//! practice because the hub sends an edge node little (desired state, acks).
//! Reconnects use jittered exponential backoff; the session is persistent
//! (fixed client id, clean session off), but nothing relies on rumqttc's
//! in-memory queue: the outbox resends everything past the last ack.

use protocols::backoff::{Backoff, BackoffPolicy};
use protocols::limits::MAX_SYNC_PACKET_BYTES;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocols::codec::encode_json;
use protocols::{NodeState, NodeStatus, TopicKind, Topics};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{EdgeConfig, TlsConfig};

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
}

/// Builds the MQTT options: persistent session, last will = offline status.
pub fn options(cfg: &EdgeConfig, topics: &Topics, now_ms: u64) -> Result<MqttOptions, LinkError> {
    let mut o = MqttOptions::new(cfg.client_id(), cfg.mqtt.host.clone(), cfg.mqtt.port);
    o.set_keep_alive(cfg.mqtt.keep_alive);
    o.set_clean_session(false);
    o.set_max_packet_size(MAX_SYNC_PACKET_BYTES, MAX_SYNC_PACKET_BYTES);
    o.set_inflight(200);
    let will = NodeStatus {
        node: cfg.node.clone(),
        state: NodeState::Offline,
        at_ms: now_ms,
    };
    let will_payload = encode_json("status", &will).unwrap_or_default();
    o.set_last_will(LastWill::new(
        topics.node(&cfg.node, TopicKind::Status),
        will_payload,
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(tls) = &cfg.mqtt.tls {
        o.set_transport(Transport::tls_with_config(tls_config(tls)?));
    }
    Ok(o)
}

fn tls_config(tls: &TlsConfig) -> Result<rumqttc::TlsConfiguration, LinkError> {
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
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
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
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

/// Creates the client and spawns nothing: call [`run_event_loop`] in a task.
pub fn client(options: MqttOptions) -> (AsyncClient, EventLoop) {
    AsyncClient::new(options, 256)
}

/// Polls the event loop until cancelled, reconnecting with jittered
/// exponential backoff between `min` and `max`.
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    events: mpsc::UnboundedSender<LinkEvent>,
    min: Duration,
    max: Duration,
    cancel: CancellationToken,
) {
    // Each delay jittered down by up to half, so a fleet that lost its
    // broker does not reconnect in lockstep.
    let policy = BackoffPolicy {
        initial: min,
        max,
        factor: 2.0,
        jitter: 0.5,
    };
    let mut backoff = Backoff::new(policy, rand::random());
    loop {
        let polled = tokio::select! {
            () = cancel.cancelled() => return,
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
