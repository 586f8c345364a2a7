//! The node side of the sync protocol, without I/O.
//!
//! [`Session::handle`] takes what the MQTT link delivered (or what the agent
//! read from its store at start) and answers with [`Output`]s: what to
//! publish, what to persist, what to apply. It owns no socket, no store and
//! no clock; the caller passes the time. The agent's control task
//! (`agent::control`) is the I/O driver that executes the outputs (publishes,
//! sled writes, hand-off to functions and devices), in the way rumqttc's
//! `EventLoop` drives its `MqttState`. The simulator's hollow nodes drive the
//! same type with no store, so they measure the shipping protocol code.
//!
//! What the session does:
//! - on CONNACK it subscribes to its `desired` and `ack` topics, publishes
//!   `status` online (retained) and a reported state;
//! - a `desired` message is accepted in this order: decode → verify the
//!   signature (with the pinned key, or on first use with the signer's key)
//!   → the document names this node → not stale (an older revision is refused
//!   with an event; the applied revision again is a retained re-delivery and
//!   ignored) → pin the signer's key if none was trusted → persist → apply;
//! - an `ack` message becomes [`Output::Ack`] for the outbox of its stream,
//!   but only a [`SignedAck`] that verifies with the trusted hub key and names
//!   this node; anything else (unsigned, bad signature, another node's, no
//!   key trusted yet) is refused and counted by reason (`acks_refused_*`);
//! - a periodic tick re-publishes the reported state while connected, at the
//!   applied document's `report_interval_ms`;
//! - at start, [`Input::Restore`] re-applies the stored desired revision and
//!   turns an unclean stop into a loss window (see [`crate::store`]).
//!
//! Counting goes into the agent's [`Counters`] (`connects`, `disconnects`,
//! `desired_applied`, `desired_rejected`, `bad_messages`).
//!
//! # Invariants
//! - A key is pinned (trust on first use) only for a document whose
//!   signature verifies with it and that is accepted; a forged, foreign or
//!   stale document never pins a key.
//! - [`Output::PersistDesired`] always comes before the [`Output::Apply`] of
//!   the same document: the driver writes it to disk before acting on it, so
//!   a restart with no link re-applies the last accepted revision.
//! - The applied revision never goes down.
//! - `received_revision` in every report is the highest revision that
//!   verified and was persisted (from the stored document after a restart
//!   too); it never goes down and is never below the applied revision.
//! - Every refused document sets `rejected` (revision, reason, time) in the
//!   reports that follow, and a refusal of a delivered message is followed
//!   by a report at once.
//! - No [`Output::Ack`] without a verified, hub-signed ack for this node.

use std::sync::Arc;

use protocols::codec::encode_json;
use protocols::signing::{VerifyingKey, key_from_hex, key_to_hex};
use protocols::{
    AckError, DesiredState, Event, EventKind, LossWindow, NodeState, NodeStatus, Rejection,
    ReportedState, SignedAck, SignedDesired, TopicKind, Topics,
};

use crate::metrics::Counters;
use crate::store::LOSS_WINDOWS_KEPT;

#[cfg(test)]
mod tests;

/// Report interval before any desired state arrived.
pub const DEFAULT_REPORT_INTERVAL_MS: u64 = 5_000;

/// Most pipeline lag a loss window is widened by (see [`Restored`]).
pub const MAX_LOSS_LAG_MS: u64 = 60_000;

/// What the agent read from its store at start (a hollow node has none).
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// The hub key to trust (hex): configured, else the pinned one.
    pub hub_key: Option<String>,
    /// The current desired document on disk.
    pub current: Option<SignedDesired>,
    /// The desired document before it (kept for rollback).
    pub previous: Option<SignedDesired>,
    /// Whether the last stop was clean.
    pub clean_stop: bool,
    /// The time the last completed group commit covered.
    pub last_commit_ms: Option<u64>,
    /// How far behind the samples' own time the appends of that commit
    /// ran (pipeline lag: queues, a loaded CPU, device clocks), ms.
    pub last_commit_lag_ms: u64,
    /// The remembered loss windows, oldest first.
    pub loss_windows: Vec<LossWindow>,
}

/// What happened.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// The agent started with this state on disk.
    Restore(&'a Restored),
    /// A CONNACK arrived.
    Connected,
    /// The connection dropped (or a connect failed).
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
    /// Another task raised an event to publish.
    Event(&'a Event),
    /// The agent is stopping: announce the node offline.
    Stopping,
}

/// What the session wants done, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Subscribe to these topics at QoS 1.
    Subscribe(Vec<String>),
    /// Publish at QoS 1 without waiting (control traffic never queues
    /// behind telemetry).
    Publish {
        /// Topic.
        topic: String,
        /// Retain flag.
        retain: bool,
        /// Payload.
        payload: Vec<u8>,
    },
    /// The link is up: telemetry may flow (a new connection epoch).
    LinkUp,
    /// The link went down: buffer.
    LinkDown,
    /// Trust this hub key (hex) from now on; persist it before what follows.
    PinKey(String),
    /// Write this document as the current desired state, durably, before
    /// the [`Output::Apply`] that follows.
    PersistDesired(SignedDesired),
    /// Reconcile functions, routing and devices with `desired`.
    Apply {
        /// The document to run.
        desired: Arc<DesiredState>,
        /// The one before it (its artifacts are kept for rollback).
        previous: Option<Arc<DesiredState>>,
    },
    /// Remember this loss window durably (an unclean stop was detected).
    RecordLossWindow(LossWindow),
    /// The hub made `stream` durable up to `up_to` (cumulative).
    Ack {
        /// Outbox stream.
        stream: String,
        /// Highest acked sequence number.
        up_to: u64,
    },
    /// A desired revision was accepted (persisted and applied by the
    /// outputs before this one).
    Applied {
        /// The revision.
        revision: u64,
    },
    /// A desired document was refused (an event says so too).
    Rejected {
        /// The revision it claimed, if readable.
        revision: Option<u64>,
        /// Why.
        reason: String,
    },
    /// Publish this reported state (retained) on `topic`; the driver may
    /// first fill in what only it knows (backlog, devices, functions).
    Report {
        /// The node's `reported` topic.
        topic: String,
        /// The protocol part of the report.
        state: Box<ReportedState>,
    },
}

/// One node's protocol state.
#[derive(Debug)]
pub struct Session {
    node: String,
    topics: Topics,
    counters: Arc<Counters>,
    trusted: Option<VerifyingKey>,
    applied: Option<Arc<DesiredState>>,
    previous: Option<Arc<DesiredState>>,
    received: u64,
    rejected: Option<Rejection>,
    up: bool,
    offline_since_ms: Option<u64>,
    loss_windows: Vec<LossWindow>,
    policy: Arc<crate::policy::Policy>,
    revision_floor: u64,
}

impl Session {
    /// A node named `node`, offline since `now_ms`, trusting no key yet
    /// (see [`Session::trusting`] and [`Input::Restore`]).
    pub fn new(
        node: impl Into<String>,
        topics: Topics,
        counters: Arc<Counters>,
        now_ms: u64,
    ) -> Self {
        Self {
            node: node.into(),
            topics,
            counters,
            trusted: None,
            applied: None,
            previous: None,
            received: 0,
            rejected: None,
            up: false,
            offline_since_ms: Some(now_ms),
            loss_windows: Vec::new(),
            policy: Arc::default(),
            revision_floor: 0,
        }
    }

    /// Trusts documents signed by `key` (no trust on first use).
    #[must_use]
    pub fn trusting(mut self, key: VerifyingKey) -> Self {
        self.trusted = Some(key);
        self
    }

    /// Refuses documents older than `floor` even with nothing applied
    /// (the revision the hub had when this node joined, see
    /// [`crate::identity::revision_floor`]).
    #[must_use]
    pub fn with_revision_floor(mut self, floor: u64) -> Self {
        self.revision_floor = floor;
        self
    }

    /// Refuses desired state outside this gateway's own `policy` (default:
    /// [`crate::policy::Policy::default`], loopback devices only).
    #[must_use]
    pub fn with_policy(mut self, policy: Arc<crate::policy::Policy>) -> Self {
        self.policy = policy;
        self
    }

    /// The node name (also the MQTT client id).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The topic of `kind` for this node.
    pub fn topic(&self, kind: TopicKind) -> String {
        self.topics.node(&self.node, kind)
    }

    /// Revision applied (0: none).
    pub fn applied_revision(&self) -> u64 {
        self.applied.as_ref().map_or(0, |d| d.revision)
    }

    /// The applied document, if any.
    pub fn applied(&self) -> Option<&Arc<DesiredState>> {
        self.applied.as_ref()
    }

    /// The key documents must be signed with, once known.
    pub fn trusted_key(&self) -> Option<VerifyingKey> {
        self.trusted
    }

    /// Interval of reported-state updates the applied document asks for
    /// (at least 1 ms).
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

    /// The offline status the broker publishes for us if the link dies (LWT).
    pub fn last_will(&self, now_ms: u64) -> (String, Vec<u8>) {
        (
            self.topic(TopicKind::Status),
            self.status(NodeState::Offline, now_ms),
        )
    }

    /// Feeds one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input<'_>, now_ms: u64) -> Vec<Output> {
        match input {
            Input::Restore(r) => self.restore(r, now_ms),
            Input::Connected => self.connected(now_ms),
            Input::Disconnected => {
                if !self.up {
                    return Vec::new();
                }
                Counters::add(&self.counters.disconnects, 1);
                self.up = false;
                self.offline_since_ms = Some(now_ms);
                vec![Output::LinkDown]
            }
            Input::ReportTick if self.up => vec![self.report(now_ms)],
            Input::ReportTick => Vec::new(),
            Input::Event(ev) => vec![self.publish_event(ev)],
            Input::Stopping => vec![self.publish(
                TopicKind::Status,
                true,
                self.status(NodeState::Offline, now_ms),
            )],
            Input::Message { topic, payload } => match self.topics.parse(topic) {
                Some((node, TopicKind::Desired)) if node == self.node => {
                    self.on_desired(payload, now_ms)
                }
                Some((node, TopicKind::Ack)) if node == self.node => self.on_ack(payload, now_ms),
                _ => {
                    Counters::add(&self.counters.bad_messages, 1);
                    tracing::warn!(%topic, "message on unexpected topic ignored");
                    Vec::new()
                }
            },
        }
    }

    fn connected(&mut self, now_ms: u64) -> Vec<Output> {
        Counters::add(&self.counters.connects, 1);
        self.up = true;
        let subs = [TopicKind::Desired, TopicKind::Ack]
            .map(|k| self.topic(k))
            .to_vec();
        let status = self.publish(
            TopicKind::Status,
            true,
            self.status(NodeState::Online, now_ms),
        );
        // This report still says since when the node was offline.
        let report = self.report(now_ms);
        self.offline_since_ms = None;
        vec![Output::Subscribe(subs), status, Output::LinkUp, report]
    }

    /// Trusts the configured or pinned key, re-applies the stored document
    /// and reports an unclean stop as a loss window.
    fn restore(&mut self, r: &Restored, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(key) = r.hub_key.as_deref().and_then(|k| key_from_hex(k).ok()) {
            self.trusted = Some(key);
        }
        if let (Some(doc), Some(key)) = (&r.previous, self.trusted) {
            self.previous = doc.verify(&key).ok().map(Arc::new);
        }
        if let (Some(doc), Some(key)) = (&r.current, self.trusted) {
            match doc.verify(&key) {
                Ok(desired) => {
                    // Verified and on disk: delivered, whatever happens next.
                    self.received = self.received.max(desired.revision);
                    if let Err(reason) = self.policy.check(&desired) {
                        // The gateway's policy was tightened since: the
                        // stored document stays unapplied until the hub
                        // sends one inside it.
                        tracing::warn!(node = %self.node, %reason, "stored desired state is outside the policy; waiting for the hub");
                        out.extend(self.reject(Some(desired.revision), reason, now_ms));
                    } else {
                        tracing::info!(node = %self.node, revision = desired.revision, "re-applying desired state from disk");
                        out.push(self.apply(desired));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stored desired state does not verify; waiting for the hub");
                }
            }
        }
        self.loss_windows.clone_from(&r.loss_windows);
        // Anything not covered by a completed group commit before an unclean
        // stop may be gone: report the window (durably, and in every report).
        if let (false, Some(last)) = (r.clean_stop, r.last_commit_ms) {
            let batch_age = self
                .applied
                .as_ref()
                .map_or(0, |d| d.config.batch_max_age_ms);
            // Samples not yet committed were at most `batch_age` old when
            // the pipeline is on time; behind a loaded CPU they can be older.
            // The lag the last commit saw, doubled (the appends after it
            // may have fallen further behind) and capped at
            // MAX_LOSS_LAG_MS (a device with a wrong clock must not widen
            // every window to hours), widens the window: it may over-report,
            // it must not miss.
            let lag = r.last_commit_lag_ms.saturating_mul(2).min(MAX_LOSS_LAG_MS);
            let w = LossWindow {
                from_ms: last.saturating_sub(batch_age.max(lag)),
                to_ms: now_ms,
            };
            self.loss_windows.push(w);
            let excess = self.loss_windows.len().saturating_sub(LOSS_WINDOWS_KEPT);
            self.loss_windows.drain(..excess);
            out.push(Output::RecordLossWindow(w));
            out.push(self.event(
                EventKind::UncleanRestart {
                    from_ms: w.from_ms,
                    to_ms: w.to_ms,
                },
                format!(
                    "agent restarted after an unclean stop; samples taken in the {} ms before it restarted that no group commit covered may be missing",
                    w.to_ms.saturating_sub(w.from_ms)
                ),
                now_ms,
            ));
        }
        out
    }

    /// An ack is acted on only if it is a [`SignedAck`] that verifies with
    /// the trusted hub key and names this node; with no trusted key yet,
    /// every ack is refused. Each refusal is counted by reason and logged at
    /// debug level (a flood of forged acks must not flood the log).
    fn on_ack(&mut self, payload: &[u8], now_ms: u64) -> Vec<Output> {
        let Some(key) = self.trusted else {
            Counters::add(&self.counters.acks_refused_no_key, 1);
            tracing::debug!(node = %self.node, "ack refused: no hub key trusted yet");
            return Vec::new();
        };
        let ack = match SignedAck::open(payload, &key, &self.node) {
            Ok(a) => a,
            Err(e) => {
                let c = &self.counters;
                Counters::add(
                    match e {
                        AckError::Unsigned(_) => &c.acks_refused_unsigned,
                        AckError::BadSignature => &c.acks_refused_bad_signature,
                        AckError::WrongNode { .. } => &c.acks_refused_wrong_node,
                        AckError::Payload(_) => &c.acks_refused_invalid,
                    },
                    1,
                );
                tracing::debug!(node = %self.node, error = %e, "ack refused");
                return Vec::new();
            }
        };
        if !protocols::validate::is_valid_name(&ack.stream) {
            Counters::add(&self.counters.acks_refused_invalid, 1);
            let topic = self.topic(TopicKind::Ack);
            let msg = format!("signed ack names an invalid stream {:?}", ack.stream);
            return vec![self.event(EventKind::BadMessage { topic }, msg, now_ms)];
        }
        vec![Output::Ack {
            stream: ack.stream,
            up_to: ack.up_to_seq,
        }]
    }

    /// A desired document from the hub; a refusal is reported at once (with
    /// [`ReportedState::rejected`]) so the hub learns fast.
    fn on_desired(&mut self, payload: &[u8], now_ms: u64) -> Vec<Output> {
        let mut out = self.receive_desired(payload, now_ms);
        if out.iter().any(|o| matches!(o, Output::Rejected { .. })) {
            out.push(self.report(now_ms));
        }
        out
    }

    fn receive_desired(&mut self, payload: &[u8], now_ms: u64) -> Vec<Output> {
        if payload.is_empty() {
            return Vec::new(); // a cleared retained message
        }
        let doc = match SignedDesired::decode(payload) {
            Ok(d) => d,
            Err(e) => return self.reject(None, e.to_string(), now_ms),
        };
        // Trust on first use: with no key yet, the signer's key is tried,
        // and pinned only if the document is accepted.
        let (key, first_use) = match self.trusted {
            Some(k) => (k, false),
            None => match doc.signer() {
                Ok(k) => (k, true),
                Err(e) => return self.reject(doc.claimed_revision(), e.to_string(), now_ms),
            },
        };
        let desired = match doc.verify(&key) {
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
        if desired.revision < self.revision_floor {
            let reason = format!(
                "stale revision {} (the hub was at {} when this node joined)",
                desired.revision, self.revision_floor
            );
            return self.reject(Some(desired.revision), reason, now_ms);
        }
        // The site's own limits: checked before anything is pinned,
        // persisted or applied.
        if let Err(reason) = self.policy.check(&desired) {
            Counters::add(&self.counters.desired_refused_policy, 1);
            return self.reject(Some(desired.revision), reason, now_ms);
        }
        let mut out = Vec::new();
        if first_use {
            self.trusted = Some(key);
            out.push(Output::PinKey(key_to_hex(&key)));
        }
        let revision = desired.revision;
        // Persist before acting: a restart re-applies this revision with no link.
        out.push(Output::PersistDesired(doc));
        self.received = self.received.max(revision);
        out.push(self.apply(desired));
        Counters::add(&self.counters.desired_applied, 1);
        out.push(Output::Applied { revision });
        out.push(self.event(
            EventKind::DesiredApplied { revision },
            format!("applied revision {revision}"),
            now_ms,
        ));
        out.push(self.report(now_ms));
        out
    }

    /// Makes `desired` the applied document; the one it replaces becomes
    /// the previous one.
    fn apply(&mut self, desired: DesiredState) -> Output {
        if let Some(old) = self.applied.take() {
            self.previous = Some(old);
        }
        let desired = Arc::new(desired);
        self.applied = Some(desired.clone());
        Output::Apply {
            desired,
            previous: self.previous.clone(),
        }
    }

    fn reject(&mut self, revision: Option<u64>, reason: String, now_ms: u64) -> Vec<Output> {
        Counters::add(&self.counters.desired_rejected, 1);
        self.rejected = Some(Rejection {
            revision,
            reason: reason.clone(),
            at_ms: now_ms,
        });
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

    /// The protocol part of the reported state now: node, applied revision,
    /// offline time, counters and loss windows (backlog, devices and
    /// functions are the driver's to fill in).
    pub fn reported(&self, now_ms: u64) -> ReportedState {
        ReportedState {
            node: self.node.clone(),
            applied_revision: self.applied_revision(),
            received_revision: self.received.max(self.applied_revision()),
            rejected: self.rejected.clone(),
            offline_since_ms: self.offline_since_ms,
            counters: self.counters.snapshot(),
            loss_windows: self.loss_windows.clone(),
            at_ms: now_ms,
            ..ReportedState::default()
        }
    }

    fn report(&self, now_ms: u64) -> Output {
        Output::Report {
            topic: self.topic(TopicKind::Reported),
            state: Box::new(self.reported(now_ms)),
        }
    }

    fn event(&self, kind: EventKind, message: String, now_ms: u64) -> Output {
        self.publish_event(&Event {
            node: self.node.clone(),
            at_ms: now_ms,
            kind,
            message,
        })
    }

    fn publish_event(&self, ev: &Event) -> Output {
        self.publish(
            TopicKind::Events,
            false,
            encode_json("event", ev).unwrap_or_default(),
        )
    }

    fn publish(&self, kind: TopicKind, retain: bool, payload: Vec<u8>) -> Output {
        Output::Publish {
            topic: self.topic(kind),
            retain,
            payload,
        }
    }
}

/// The payload of a reported state, as published on `reported`.
pub fn encode_report(state: &ReportedState) -> Vec<u8> {
    encode_json("reported", state).unwrap_or_default()
}
