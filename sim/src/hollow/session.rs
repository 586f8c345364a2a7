//! The sync-protocol side of one hollow node, without I/O.
//!
//! [`Session::handle`] takes what the MQTT link delivered and answers with
//! what to send, the same way the real agent (`edge-node/src/agent.rs`) does:
//! on CONNACK it subscribes to its `desired` and `ack` topics, publishes
//! `status` online (retained) and a reported state; on a `desired` message it
//! verifies the hub's signature with the pinned key, validates the document,
//! refuses stale revisions and other nodes' documents with an event, and on
//! success publishes a `desired-applied` event and a reported state whose
//! `applied_revision` is the new revision. A periodic tick re-publishes the
//! reported state at the document's `report_interval_ms`.
//!
//! What a hollow node leaves out: devices, functions, artifacts and the sled
//! store (it keeps the applied revision in memory), so the hub and the broker
//! see real agents while the simulator pays only for the protocol.

use std::collections::BTreeMap;

use protocols::codec::encode_json;
use protocols::signing::VerifyingKey;
use protocols::{
    DesiredState, Event, EventKind, NodeState, NodeStatus, ReportedState, SignedDesired, TopicKind,
    Topics,
};

/// What the link delivered.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A CONNACK arrived.
    Connected,
    /// The connection dropped.
    Disconnected,
    /// A PUBLISH arrived.
    Message {
        /// Its topic.
        topic: &'a str,
        /// Its payload.
        payload: &'a [u8],
    },
    /// Time to re-publish the reported state.
    ReportTick,
}

/// What the session wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Subscribe to these topics at QoS 1.
    Subscribe(Vec<String>),
    /// Publish at QoS 1.
    Publish {
        /// Topic.
        topic: String,
        /// Retain flag.
        retain: bool,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A desired revision was received, verified, validated and applied.
    Applied {
        /// The revision.
        revision: u64,
    },
    /// A desired document was refused.
    Rejected {
        /// The revision it claimed, if readable.
        revision: Option<u64>,
        /// Why.
        reason: String,
    },
}

/// Counters a hollow node reports, named like the agent's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// CONNACKs received.
    pub connects: u64,
    /// Connections lost after a CONNACK.
    pub disconnects: u64,
    /// Desired revisions applied.
    pub desired_applied: u64,
    /// Desired documents refused.
    pub desired_rejected: u64,
    /// Messages on topics a node does not expect, or undecodable acks.
    pub bad_messages: u64,
}

/// One hollow node's protocol state.
#[derive(Debug, Clone)]
pub struct Session {
    node: String,
    topics: Topics,
    trusted: VerifyingKey,
    applied: Option<DesiredState>,
    up: bool,
    offline_since_ms: Option<u64>,
    counters: SessionCounters,
}

/// Report interval before any desired state arrived (the agent's default).
pub const DEFAULT_REPORT_INTERVAL_MS: u64 = 5_000;

impl Session {
    /// A node named `node` that trusts documents signed by `trusted`.
    pub fn new(
        node: impl Into<String>,
        topics: Topics,
        trusted: VerifyingKey,
        now_ms: u64,
    ) -> Self {
        Self {
            node: node.into(),
            topics,
            trusted,
            applied: None,
            up: false,
            offline_since_ms: Some(now_ms),
            counters: SessionCounters::default(),
        }
    }

    /// The node name (also the MQTT client id).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Revision applied (0: none).
    pub fn applied_revision(&self) -> u64 {
        self.applied.as_ref().map_or(0, |d| d.revision)
    }

    /// Interval of reported-state updates the applied document asks for.
    pub fn report_interval_ms(&self) -> u64 {
        self.applied
            .as_ref()
            .map_or(DEFAULT_REPORT_INTERVAL_MS, |d| d.config.report_interval_ms)
            .max(1)
    }

    /// Whether the link is up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Counters so far.
    pub fn counters(&self) -> SessionCounters {
        self.counters
    }

    /// The offline status the broker publishes for us if the link dies (LWT).
    pub fn last_will(&self, now_ms: u64) -> (String, Vec<u8>) {
        (
            self.topics.node(&self.node, TopicKind::Status),
            self.status(NodeState::Offline, now_ms),
        )
    }

    /// Feeds one input; returns what to send, in order.
    pub fn handle(&mut self, input: Input<'_>, now_ms: u64) -> Vec<Output> {
        match input {
            Input::Connected => {
                self.counters.connects += 1;
                self.up = true;
                let subs = [TopicKind::Desired, TopicKind::Ack]
                    .map(|k| self.topics.node(&self.node, k))
                    .to_vec();
                let status = self.publish(
                    TopicKind::Status,
                    true,
                    self.status(NodeState::Online, now_ms),
                );
                let report = self.report(now_ms);
                self.offline_since_ms = None;
                vec![Output::Subscribe(subs), status, report]
            }
            Input::Disconnected => {
                if self.up {
                    self.counters.disconnects += 1;
                    self.up = false;
                    self.offline_since_ms = Some(now_ms);
                }
                Vec::new()
            }
            Input::ReportTick if self.up => vec![self.report(now_ms)],
            Input::ReportTick => Vec::new(),
            Input::Message { topic, payload } => match self.topics.parse(topic) {
                Some((node, TopicKind::Desired)) if node == self.node => {
                    self.on_desired(payload, now_ms)
                }
                Some((node, TopicKind::Ack)) if node == self.node => {
                    // A hollow node sends no telemetry; an ack is legal but
                    // releases nothing.
                    Vec::new()
                }
                _ => {
                    self.counters.bad_messages += 1;
                    Vec::new()
                }
            },
        }
    }

    fn on_desired(&mut self, payload: &[u8], now_ms: u64) -> Vec<Output> {
        if payload.is_empty() {
            return Vec::new(); // a cleared retained message
        }
        let doc = match SignedDesired::decode(payload) {
            Ok(d) => d,
            Err(e) => return self.reject(None, e.to_string(), now_ms),
        };
        let desired = match doc.verify(&self.trusted) {
            Ok(d) => d,
            Err(e) => return self.reject(doc.claimed_revision(), e.to_string(), now_ms),
        };
        if desired.node != self.node {
            let reason = format!("document is for node {:?}", desired.node);
            return self.reject(Some(desired.revision), reason, now_ms);
        }
        let applied = self.applied_revision();
        if desired.revision == applied {
            return Vec::new(); // retained re-delivery
        }
        if desired.revision < applied {
            let reason = format!("stale revision {} (applied {applied})", desired.revision);
            return self.reject(Some(desired.revision), reason, now_ms);
        }
        let revision = desired.revision;
        self.applied = Some(desired);
        self.counters.desired_applied += 1;
        let event = self.event(
            EventKind::DesiredApplied { revision },
            format!("applied revision {revision}"),
            now_ms,
        );
        let report = self.report(now_ms);
        vec![Output::Applied { revision }, event, report]
    }

    fn reject(&mut self, revision: Option<u64>, reason: String, now_ms: u64) -> Vec<Output> {
        self.counters.desired_rejected += 1;
        let event = self.event(
            EventKind::DesiredRejected { revision },
            reason.clone(),
            now_ms,
        );
        vec![Output::Rejected { revision, reason }, event]
    }

    fn status(&self, state: NodeState, now_ms: u64) -> Vec<u8> {
        let s = NodeStatus {
            node: self.node.clone(),
            state,
            at_ms: now_ms,
        };
        encode_json("status", &s).unwrap_or_default()
    }

    /// The reported state now.
    pub fn reported(&self, now_ms: u64) -> ReportedState {
        let c = self.counters;
        let counters: BTreeMap<String, u64> = [
            ("connects", c.connects),
            ("disconnects", c.disconnects),
            ("desired_applied", c.desired_applied),
            ("desired_rejected", c.desired_rejected),
            ("bad_messages", c.bad_messages),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        ReportedState {
            node: self.node.clone(),
            applied_revision: self.applied_revision(),
            offline_since_ms: self.offline_since_ms,
            counters,
            at_ms: now_ms,
            ..ReportedState::default()
        }
    }

    fn report(&self, now_ms: u64) -> Output {
        let payload = encode_json("reported", &self.reported(now_ms)).unwrap_or_default();
        self.publish(TopicKind::Reported, true, payload)
    }

    fn event(&self, kind: EventKind, message: String, now_ms: u64) -> Output {
        let ev = Event {
            node: self.node.clone(),
            at_ms: now_ms,
            kind,
            message,
        };
        self.publish(
            TopicKind::Events,
            false,
            encode_json("event", &ev).unwrap_or_default(),
        )
    }

    fn publish(&self, kind: TopicKind, retain: bool, payload: Vec<u8>) -> Output {
        Output::Publish {
            topic: self.topics.node(&self.node, kind),
            retain,
            payload,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]
    use super::*;
    use protocols::signing::SigningKey;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn doc(node: &str, revision: u64, key: &SigningKey) -> Vec<u8> {
        let d = DesiredState {
            node: node.into(),
            revision,
            functions: Vec::new(),
            devices: Vec::new(),
            models: Vec::new(),
            config: protocols::NodeConfig {
                report_interval_ms: 1_234,
                ..protocols::NodeConfig::default()
            },
        };
        SignedDesired::sign(&d, key).unwrap().encode().unwrap()
    }

    fn published(out: &[Output], kind: TopicKind) -> Vec<Vec<u8>> {
        let t = Topics::default();
        out.iter()
            .filter_map(|o| match o {
                Output::Publish { topic, payload, .. }
                    if t.parse(topic).map(|(_, k)| k) == Some(kind) =>
                {
                    Some(payload.clone())
                }
                _ => None,
            })
            .collect()
    }

    fn session(hub: &SigningKey) -> Session {
        Session::new("n-1", Topics::default(), hub.verifying_key(), 10)
    }

    #[test]
    fn connect_subscribes_and_announces_like_the_agent() {
        let hub = key(1);
        let mut s = session(&hub);
        let out = s.handle(Input::Connected, 20);
        assert_eq!(
            out[0],
            Output::Subscribe(vec![
                "edgefleet/v1/nodes/n-1/desired".into(),
                "edgefleet/v1/nodes/n-1/ack".into()
            ])
        );
        let status: NodeStatus =
            serde_json::from_slice(&published(&out, TopicKind::Status)[0]).unwrap();
        assert_eq!(status.state, NodeState::Online);
        let rep: ReportedState =
            serde_json::from_slice(&published(&out, TopicKind::Reported)[0]).unwrap();
        assert_eq!((rep.applied_revision, rep.offline_since_ms), (0, Some(10)));
        let (topic, will) = s.last_will(30);
        assert_eq!(topic, "edgefleet/v1/nodes/n-1/status");
        let will: NodeStatus = serde_json::from_slice(&will).unwrap();
        assert_eq!(will.state, NodeState::Offline);
    }

    #[test]
    fn a_signed_newer_revision_is_applied_and_reported() {
        let hub = key(1);
        let mut s = session(&hub);
        s.handle(Input::Connected, 20);
        let topic = "edgefleet/v1/nodes/n-1/desired";
        let payload = doc("n-1", 3, &hub);
        let out = s.handle(
            Input::Message {
                topic,
                payload: &payload,
            },
            30,
        );
        assert_eq!(out[0], Output::Applied { revision: 3 });
        let rep: ReportedState =
            serde_json::from_slice(&published(&out, TopicKind::Reported)[0]).unwrap();
        assert_eq!(rep.applied_revision, 3);
        assert_eq!(rep.offline_since_ms, None);
        assert_eq!(rep.counters["desired_applied"], 1);
        let ev: Event = serde_json::from_slice(&published(&out, TopicKind::Events)[0]).unwrap();
        assert_eq!(ev.kind, EventKind::DesiredApplied { revision: 3 });
        assert_eq!(s.report_interval_ms(), 1_234);
        // Retained re-delivery of the same revision: nothing happens.
        assert!(
            s.handle(
                Input::Message {
                    topic,
                    payload: &payload
                },
                40
            )
            .is_empty()
        );
    }

    #[test]
    fn forged_foreign_stale_and_garbage_documents_are_refused() {
        let hub = key(1);
        let mut s = session(&hub);
        s.handle(Input::Connected, 20);
        let topic = "edgefleet/v1/nodes/n-1/desired";
        let cases = [
            (doc("n-1", 5, &key(2)), Some(5), "untrusted key"),
            (doc("n-2", 5, &hub), Some(5), "for node"),
            (b"{not json".to_vec(), None, "signed desired state"),
        ];
        for (payload, rev, why) in cases {
            let out = s.handle(
                Input::Message {
                    topic,
                    payload: &payload,
                },
                30,
            );
            match &out[0] {
                Output::Rejected { revision, reason } => {
                    assert_eq!(*revision, rev);
                    assert!(reason.contains(why), "{reason} should say {why}");
                }
                other => panic!("expected a rejection, got {other:?}"),
            }
            let ev: Event = serde_json::from_slice(&published(&out, TopicKind::Events)[0]).unwrap();
            assert_eq!(ev.kind, EventKind::DesiredRejected { revision: rev });
        }
        let newer = doc("n-1", 7, &hub);
        assert_eq!(
            s.handle(
                Input::Message {
                    topic,
                    payload: &newer
                },
                40
            )[0],
            Output::Applied { revision: 7 }
        );
        let older = doc("n-1", 6, &hub);
        assert!(matches!(
            &s.handle(Input::Message { topic, payload: &older }, 50)[0],
            Output::Rejected { reason, .. } if reason.contains("stale")
        ));
        assert_eq!(s.applied_revision(), 7);
        assert_eq!(s.counters().desired_rejected, 4);
    }

    #[test]
    fn reports_only_while_connected_and_foreign_topics_are_counted() {
        let hub = key(1);
        let mut s = session(&hub);
        assert!(s.handle(Input::ReportTick, 11).is_empty());
        s.handle(Input::Connected, 12);
        assert_eq!(
            published(&s.handle(Input::ReportTick, 13), TopicKind::Reported).len(),
            1
        );
        s.handle(Input::Disconnected, 14);
        assert!(s.handle(Input::ReportTick, 15).is_empty());
        let out = s.handle(
            Input::Message {
                topic: "edgefleet/v1/nodes/n-2/desired",
                payload: b"x",
            },
            16,
        );
        assert!(out.is_empty());
        assert_eq!(s.counters().bad_messages, 1);
        assert_eq!(s.counters().disconnects, 1);
        s.handle(Input::Connected, 17);
        assert_eq!(s.reported(18).offline_since_ms, None);
    }
}
