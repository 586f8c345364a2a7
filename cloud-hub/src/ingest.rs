//! Ingest: every message the session forwards, applied to the hub's state.
//! Telemetry goes to the sink ([`crate::sink::Sink::ingest`]: dedup, store),
//! reported state and status to the registry, events to the
//! [`crate::hub::EventLog`]. Acks for what the sink stored are
//! [`crate::acks`]' business.
//!
//! # Invariants
//! - A bad or hostile payload is counted and logged, never fatal: node
//!   names from topics must be valid names, documents are size-capped
//!   (`[limits]`), a document must name the node of its topic, and the sink
//!   refuses batches past its bounds (`edgefleet_hub_refused_total{reason}`).
//! - A storage failure is counted (`edgefleet_hub_storage_errors_total`)
//!   and logged; the message is not acked, so the edge keeps it, and the
//!   hub stays up (a full disk degrades the hub, it does not stop it).
//! - Messages are applied in the order the session received them, so a
//!   node's last will (published after its last report) lands after it.

use std::sync::Arc;

use protocols::codec::{decode_batch, decode_json};
use protocols::validate::is_valid_name;
use protocols::{Event, NodeState, NodeStatus, ReportedState, TopicKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::hub::{Hub, HubError};
use crate::metrics::Metrics;
use crate::registry::RegistryError;
use crate::session::{Delivery, Message};
use crate::sink::SinkError;

/// The ingest task: applies each forwarded message until the session closes
/// the channel (when intake stops, after which the messages already handed
/// over are still applied). Nothing a message carries, and no storage
/// failure, ends it: a message the hub cannot store is counted, logged and
/// not acked, so the edge keeps it.
pub(crate) async fn run(
    hub: Arc<Hub>,
    mut messages: mpsc::Receiver<Message>,
) -> Result<(), HubError> {
    while let Some(m) = messages.recv().await {
        if let Err(e) = handle_message(&hub, &m.topic, &m.payload, m.delivery) {
            Metrics::inc(&hub.metrics.storage_errors);
            error!(topic = %m.topic.escape_debug(), error = %e, "message not applied (storage failed); not acked, the edge keeps it");
        }
    }
    Ok(())
}

/// Counts and logs a refused message.
fn refuse(hub: &Hub, node: &str, reason: &'static str, detail: &dyn std::fmt::Display) {
    hub.metrics.refuse(reason);
    warn!(node = %node.escape_debug(), reason, %detail, "message refused");
}

/// Handles one incoming message; bad or hostile payloads are counted and
/// logged, never fatal. Only a storage failure is an error (the caller
/// counts it and goes on).
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
    if !is_valid_name(node) {
        refuse(
            hub,
            node,
            "node_name",
            &"the topic's node name is not a valid name",
        );
        return Ok(());
    }
    match kind {
        TopicKind::Telemetry => on_telemetry(hub, node, payload),
        TopicKind::Reported => on_reported(hub, node, payload, delivery),
        TopicKind::Status => match decode_json::<NodeStatus>("status", payload) {
            Ok(s) if s.node == node => update(hub, node, |rec| rec.status = Some(s)),
            Ok(_) | Err(_) => {
                Metrics::inc(&hub.metrics.bad_documents);
                Ok(())
            }
        },
        TopicKind::Events => {
            on_event(hub, node, payload);
            Ok(())
        }
        TopicKind::Desired | TopicKind::Ack => {
            Metrics::inc(&hub.metrics.unexpected_messages);
            Ok(())
        }
    }
}

/// Read-modify-write of `node`'s registry record; a new node past
/// `limits.max_nodes` is refused (counted), not an error.
fn update(
    hub: &Hub,
    node: &str,
    f: impl FnOnce(&mut crate::registry::NodeRecord),
) -> Result<(), HubError> {
    match hub.registry.update(node, |rec| {
        f(rec);
        Ok(())
    }) {
        Err(e @ RegistryError::TooManyNodes { .. }) => {
            refuse(hub, node, "nodes", &e);
            Ok(())
        }
        r => r.map_err(HubError::from),
    }
}

fn on_telemetry(hub: &Hub, node: &str, payload: &[u8]) -> Result<(), HubError> {
    match decode_batch(payload) {
        Ok(batch) => match hub.sink.ingest(node, &batch) {
            Ok(r) => {
                if r.floor_held {
                    Metrics::inc(&hub.metrics.floor_held);
                }
                hub.metrics.node(node, |t| {
                    t.batches += 1;
                    t.samples += r.stored;
                    t.duplicates += r.duplicates;
                });
            }
            Err(SinkError::Refused(r)) => {
                refuse(hub, node, r.reason(), &r);
                hub.metrics.node(node, |t| t.refused += 1);
            }
            Err(e) => return Err(e.into()),
        },
        Err(e) => {
            warn!(node = %node, error = %e, "bad telemetry payload");
            hub.metrics.node(node, |t| t.bad_payloads += 1);
        }
    }
    Ok(())
}

/// Refuses (counted as `reason`) a payload longer than `limit`, the value
/// of `limits.{key}`; returns whether it did.
fn too_large(
    hub: &Hub,
    node: &str,
    payload: &[u8],
    limit: usize,
    key: &str,
    reason: &'static str,
) -> bool {
    if payload.len() <= limit {
        return false;
    }
    let detail = format!("{} bytes, more than limits.{key} = {limit}", payload.len());
    refuse(hub, node, reason, &detail);
    true
}

fn on_reported(hub: &Hub, node: &str, payload: &[u8], delivery: Delivery) -> Result<(), HubError> {
    if too_large(
        hub,
        node,
        payload,
        hub.limits.max_reported_bytes,
        "max_reported_bytes",
        "reported_too_large",
    ) {
        return Ok(());
    }
    let r = match decode_json::<ReportedState>("reported state", payload) {
        Ok(r) if r.node == node => r,
        Ok(r) => {
            warn!(node = %node, claimed = %r.node.escape_debug(), "reported state names another node; ignored");
            Metrics::inc(&hub.metrics.bad_documents);
            return Ok(());
        }
        Err(e) => {
            warn!(node = %node, error = %e, "bad reported state");
            Metrics::inc(&hub.metrics.bad_documents);
            return Ok(());
        }
    };
    let floors = r.backlog.floors.clone();
    update(hub, node, |rec| {
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
    })?;
    // A running rollout may be waiting for exactly this report.
    hub.control.poke.notify_one();
    // The node confirms its outbox floors: declared drops up to them are final.
    for (stream, floor) in floors {
        match hub.sink.confirm_floor(node, &stream, floor) {
            Ok(_) => {}
            Err(SinkError::Refused(r)) => refuse(hub, node, r.reason(), &r),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn on_event(hub: &Hub, node: &str, payload: &[u8]) {
    if too_large(
        hub,
        node,
        payload,
        hub.limits.max_event_bytes,
        "max_event_bytes",
        "event_too_large",
    ) {
        return;
    }
    match decode_json::<Event>("event", payload) {
        Ok(ev) if ev.node == node => {
            Metrics::inc(&hub.metrics.events);
            info!(node = %node, kind = ?ev.kind, message = %ev.message.escape_debug(), "edge event");
            if !hub.events.push(node, ev) {
                refuse(
                    hub,
                    node,
                    "nodes",
                    &"the event log holds limits.max_nodes nodes",
                );
            }
        }
        Ok(ev) => {
            warn!(node = %node, claimed = %ev.node.escape_debug(), "event names another node; ignored");
            Metrics::inc(&hub.metrics.bad_documents);
        }
        Err(_) => Metrics::inc(&hub.metrics.bad_documents),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use std::sync::atomic::Ordering;

    use protocols::codec::encode_json;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::app::App;
    use crate::config::HubConfig;

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
