//! The hub's counters, in one place, rendered as Prometheus text at `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// Telemetry counters of one node (in memory; stream watermarks are durable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeTelemetry {
    /// Batches received.
    pub batches: u64,
    /// New samples stored.
    pub samples: u64,
    /// Duplicate samples dropped.
    pub duplicates: u64,
    /// Payloads that did not decode.
    pub bad_payloads: u64,
    /// Batches the sink refused (past a bound).
    pub refused: u64,
}

/// Why the embedded broker's gate ([`crate::broker::gate`]) refused or
/// closed a client: the `reason` label of
/// `edgefleet_hub_broker_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BrokerRefusal {
    /// TLS, but no client certificate.
    NoCert,
    /// The client certificate did not verify (another CA, expired, …).
    BadCert,
    /// The TLS handshake failed for another reason (not TLS at all, …).
    Tls,
    /// The certificate names no node or hub (`OU`).
    Identity,
    /// The identity is revoked.
    Revoked,
    /// A node's client id is not its name (or is the hub session's, or in
    /// lab mode not a valid node name).
    ClientId,
    /// A publish outside the node's own telemetry/reported/status/events.
    PublishAcl,
    /// A subscription outside the node's own desired/ack.
    SubscribeAcl,
    /// A last will on another topic than the node's own status.
    WillAcl,
    /// Not MQTT 3.1.1, malformed, too large, a second CONNECT, or a packet
    /// only a broker sends.
    BadPacket,
    /// No CONNECT within the connect timeout.
    Timeout,
    /// The gate's connection cap was reached.
    Capacity,
    /// Not a disconnect: a retained publish the broker must not keep (not
    /// on `status`/`reported`, or over their size bound) passed on without
    /// its retain flag.
    Retain,
}

impl BrokerRefusal {
    /// Every reason, in label order.
    pub const ALL: [Self; 13] = [
        Self::NoCert,
        Self::BadCert,
        Self::Tls,
        Self::Identity,
        Self::Revoked,
        Self::ClientId,
        Self::PublishAcl,
        Self::SubscribeAcl,
        Self::WillAcl,
        Self::BadPacket,
        Self::Timeout,
        Self::Capacity,
        Self::Retain,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCert => "no_cert",
            Self::BadCert => "bad_cert",
            Self::Tls => "tls",
            Self::Identity => "identity",
            Self::Revoked => "revoked",
            Self::ClientId => "client_id",
            Self::PublishAcl => "publish_acl",
            Self::SubscribeAcl => "subscribe_acl",
            Self::WillAcl => "will_acl",
            Self::BadPacket => "bad_packet",
            Self::Timeout => "timeout",
            Self::Capacity => "capacity",
            Self::Retain => "retain",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Hub-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages on topics the hub does not handle.
    pub unexpected_messages: AtomicU64,
    /// Reported/status/event documents that did not decode.
    pub bad_documents: AtomicU64,
    /// Acks published.
    pub acks_published: AtomicU64,
    /// Desired documents published.
    pub desired_published: AtomicU64,
    /// Events received.
    pub events: AtomicU64,
    /// Nodes marked online because a live reported state arrived while the
    /// registry had them offline or unknown (a missed `status`).
    pub status_inferred_online: AtomicU64,
    /// API calls refused 401 (no, unknown, expired or revoked credential).
    pub auth_unauthenticated: AtomicU64,
    /// API calls refused 403 (credential without the needed role).
    pub auth_forbidden: AtomicU64,
    /// Joins refused (unknown, reused, expired or wrong-CA token; bad CSR).
    pub join_refused: AtomicU64,
    /// Nodes joined.
    pub joined: AtomicU64,
    /// Renewals refused (revoked node, bad CSR).
    pub renew_refused: AtomicU64,
    /// Node artifact downloads refused (not in the node's desired state).
    pub artifact_denied: AtomicU64,
    /// Audit records that could not be written.
    pub audit_failures: AtomicU64,
    /// Messages the hub could not apply because its storage failed (the
    /// message is not acked, so the edge keeps it; the hub keeps running).
    pub storage_errors: AtomicU64,
    /// Documents rendered from deployments and published (a new revision).
    pub control_renders: AtomicU64,
    /// Control-plane changes refused (conflict, invalid merge, limit, unknown).
    pub control_refused: AtomicU64,
    /// Rollouts started.
    pub rollouts_started: AtomicU64,
    /// Rollouts aborted by their criteria or a failed wave gate.
    pub rollouts_aborted: AtomicU64,
    /// Revisions delivered to nodes by rollouts.
    pub rollout_deliveries: AtomicU64,
    /// Nodes sent back to their last healthy revision.
    pub rollout_rollbacks: AtomicU64,
    /// Nodes that failed their part of a rollout.
    pub rollout_node_failures: AtomicU64,
    /// Rollout ticks or deliveries that failed (retried next tick).
    pub rollout_errors: AtomicU64,
    /// How long the last rollout tick took, µs (a gauge).
    pub rollout_tick_us: AtomicU64,
    /// Telemetry batches whose declared floor waits for the node to
    /// confirm it in its reported state.
    pub floor_held: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Clients connected through the broker gate now (a gauge).
    pub broker_connections: AtomicU64,
    broker_refused: [AtomicU64; BrokerRefusal::ALL.len()],
    nodes: Mutex<BTreeMap<String, NodeTelemetry>>,
}

/// A Prometheus label value with `\`, `"` and newlines escaped (node names
/// are checked at the door; this keeps the exposition well-formed even so).
pub fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Metrics {
    /// Increments a hub-wide counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused message by reason (`edgefleet_hub_refused_total{reason}`).
    pub fn refuse(&self, reason: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    /// How many messages were refused for `reason`.
    pub fn refused(&self, reason: &str) -> u64 {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// Counts one broker gate refusal.
    pub fn broker_refused(&self, why: BrokerRefusal) {
        Self::inc(&self.broker_refused[why.index()]);
    }

    /// Broker gate refusals so far for `why`.
    pub fn broker_refusals(&self, why: BrokerRefusal) -> u64 {
        self.broker_refused[why.index()].load(Ordering::Relaxed)
    }

    /// Updates one node's telemetry counters.
    pub fn node(&self, node: &str, f: impl FnOnce(&mut NodeTelemetry)) {
        let mut m = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        f(m.entry(node.to_owned()).or_default());
    }

    /// One node's telemetry counters.
    pub fn node_telemetry(&self, node: &str) -> NodeTelemetry {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .cloned()
            .unwrap_or_default()
    }

    /// The gauges of the exposition.
    fn render_gauges(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "# TYPE edgefleet_hub_broker_connections gauge\nedgefleet_hub_broker_connections {}",
            self.broker_connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# TYPE edgefleet_hub_rollout_tick_seconds gauge\nedgefleet_hub_rollout_tick_seconds {}",
            self.rollout_tick_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for (name, c) in [
            (
                "edgefleet_hub_unexpected_messages_total",
                &self.unexpected_messages,
            ),
            ("edgefleet_hub_bad_documents_total", &self.bad_documents),
            ("edgefleet_hub_acks_published_total", &self.acks_published),
            (
                "edgefleet_hub_desired_published_total",
                &self.desired_published,
            ),
            ("edgefleet_hub_events_total", &self.events),
            (
                "edgefleet_hub_status_inferred_online_total",
                &self.status_inferred_online,
            ),
            (
                "edgefleet_hub_auth_unauthenticated_total",
                &self.auth_unauthenticated,
            ),
            ("edgefleet_hub_auth_forbidden_total", &self.auth_forbidden),
            ("edgefleet_hub_join_refused_total", &self.join_refused),
            ("edgefleet_hub_joined_total", &self.joined),
            ("edgefleet_hub_renew_refused_total", &self.renew_refused),
            ("edgefleet_hub_artifact_denied_total", &self.artifact_denied),
            ("edgefleet_hub_audit_failures_total", &self.audit_failures),
            ("edgefleet_hub_storage_errors_total", &self.storage_errors),
            ("edgefleet_hub_control_renders_total", &self.control_renders),
            ("edgefleet_hub_control_refused_total", &self.control_refused),
            (
                "edgefleet_hub_rollouts_started_total",
                &self.rollouts_started,
            ),
            (
                "edgefleet_hub_rollouts_aborted_total",
                &self.rollouts_aborted,
            ),
            (
                "edgefleet_hub_rollout_deliveries_total",
                &self.rollout_deliveries,
            ),
            (
                "edgefleet_hub_rollout_rollbacks_total",
                &self.rollout_rollbacks,
            ),
            (
                "edgefleet_hub_rollout_node_failures_total",
                &self.rollout_node_failures,
            ),
            ("edgefleet_hub_rollout_errors_total", &self.rollout_errors),
            ("edgefleet_hub_floor_held_total", &self.floor_held),
        ] {
            let _ = writeln!(
                s,
                "# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(s, "# TYPE edgefleet_hub_refused_total counter");
        for (reason, n) in self
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(s, "edgefleet_hub_refused_total{{reason=\"{reason}\"}} {n}");
        }
        self.render_gauges(&mut s);
        let _ = writeln!(s, "# TYPE edgefleet_hub_broker_refused_total counter");
        for why in BrokerRefusal::ALL {
            let _ = writeln!(
                s,
                "edgefleet_hub_broker_refused_total{{reason=\"{}\"}} {}",
                why.as_str(),
                self.broker_refusals(why)
            );
        }
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        for (metric, get) in [
            (
                "edgefleet_hub_telemetry_batches_total",
                (|t: &NodeTelemetry| t.batches) as fn(&NodeTelemetry) -> u64,
            ),
            ("edgefleet_hub_telemetry_samples_total", |t| t.samples),
            ("edgefleet_hub_telemetry_duplicates_total", |t| t.duplicates),
            ("edgefleet_hub_telemetry_bad_payloads_total", |t| {
                t.bad_payloads
            }),
            ("edgefleet_hub_telemetry_refused_total", |t| t.refused),
        ] {
            let _ = writeln!(s, "# TYPE {metric} counter");
            for (node, t) in nodes.iter() {
                let _ = writeln!(s, "{metric}{{node=\"{}\"}} {}", label_value(node), get(t));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_cannot_break_out_of_their_quotes() {
        assert_eq!(label_value(r#"a"}\x"#), r#"a\"}\\x"#);
        assert_eq!(label_value("a\nfake_total 1"), "a\\nfake_total 1");
        let m = Metrics::default();
        m.node("x\"} 9\nevil", |t| t.batches = 1);
        m.refuse("node_name");
        let text = m.render();
        assert!(!text.lines().any(|l| l.starts_with("evil")), "{text}");
        assert!(text.contains("edgefleet_hub_refused_total{reason=\"node_name\"} 1"));
    }
}
