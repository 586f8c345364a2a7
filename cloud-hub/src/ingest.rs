//! Ingest: every message the session forwards, applied to the hub's state.
//! Telemetry goes to the sink ([`crate::sink::Sink::ingest`]: dedup, store),
//! reported state and status to the registry, events to the
//! [`crate::hub::EventLog`]. Acks for what the sink stored are
//! [`crate::acks`]' business.
//!
//! # Invariants
//! - A bad payload is counted and logged, never fatal; only a failing sink
//!   or registry ends the task (and with it the hub).
//! - Messages are applied in the order the session received them, so a
//!   node's last will (published after its last report) lands after it.

use std::sync::Arc;

use protocols::codec::{decode_batch, decode_json};
use protocols::{Event, NodeState, NodeStatus, ReportedState, TopicKind};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::hub::{Hub, HubError};
use crate::metrics::Metrics;
use crate::session::{Delivery, Message};

/// The ingest task: applies each forwarded message until the session closes
/// the channel (when intake stops, after which the messages already handed
/// over are still applied).
pub(crate) async fn run(
    hub: Arc<Hub>,
    mut messages: mpsc::Receiver<Message>,
) -> Result<(), HubError> {
    while let Some(m) = messages.recv().await {
        handle_message(&hub, &m.topic, &m.payload, m.delivery)?;
    }
    Ok(())
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
