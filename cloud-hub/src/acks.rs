//! The hub end of the ack loop: what gets acked, and when.
//!
//! An edge deletes outbox entries only when the hub acks them, so an ack must
//! never run ahead of durability. Every `ack_interval` the ack task ([`run`])
//! flushes the sink and publishes, per (node, stream) whose watermark moved
//! (or that an edge resent after its ack was lost), one cumulative [`Ack`]
//! `{stream, up_to_seq}` on the node's `ack` topic (QoS 1, not retained),
//! signed for that node with the hub's desired-state key
//! ([`protocols::SignedAck`]): an edge acts only on acks that verify with the
//! key it trusts and that name it. A draining hub does one last round
//! ([`publish_due`]) after the ack task ended, and the session waits until
//! the broker has taken them (see [`crate::session::Drain`]).
//!
//! # Invariants
//! - An ack is built only from [`crate::sink::Sink::flush_and_collect_acks`],
//!   that is after the flush that made every sample up to `up_to_seq` durable,
//!   so an acked sample survives a hub crash.
//! - While serving, at most one ack per stream per `ack_interval`; a drain
//!   adds one final round for everything committed since.

use std::sync::Arc;
use std::time::Duration;

use protocols::{Ack, SignedAck, TopicKind};
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, HubError};
use crate::metrics::Metrics;

/// One ack, ready to publish.
#[derive(Debug)]
struct AckMessage {
    topic: String,
    payload: Vec<u8>,
}

/// The ack task: every `every`, flushes the sink and publishes the acks due.
/// Ends when `stop` is cancelled (between rounds: a round in progress is
/// finished, so no ack the sink counted as sent is left unpublished).
pub(crate) async fn run(
    hub: Arc<Hub>,
    every: Duration,
    stop: CancellationToken,
) -> Result<(), HubError> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        publish_due(&hub).await?;
    }
}

/// One round: flushes the sink and publishes the acks due (a draining hub
/// calls it once more after the ack task ended). Returns how many.
pub(crate) async fn publish_due(hub: &Hub) -> Result<usize, HubError> {
    let acks = due(hub).await?;
    let n = acks.len();
    for ack in acks {
        hub.client
            .publish(ack.topic, QoS::AtLeastOnce, false, ack.payload)
            .await
            .map_err(|e| HubError::Mqtt(e.to_string()))?;
        Metrics::inc(&hub.metrics.acks_published);
    }
    Ok(n)
}

/// Flushes the sink and encodes the acks it reports due.
async fn due(hub: &Hub) -> Result<Vec<AckMessage>, HubError> {
    hub.sink
        .flush_and_collect_acks()
        .await?
        .into_iter()
        .map(|(node, stream, up_to)| -> Result<AckMessage, HubError> {
            let ack = Ack {
                stream,
                up_to_seq: up_to,
            };
            let payload = SignedAck::sign(&node, &ack, &hub.key)?.encode()?;
            Ok(AckMessage {
                topic: hub.topics.node(&node, TopicKind::Ack),
                payload,
            })
        })
        .collect()
}
