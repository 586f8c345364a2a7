//! The report of a hollow run: latency distributions, one [`RoundReport`]
//! per desired-state round and the [`HollowReport`] of the whole run.

use serde::{Deserialize, Serialize};

use super::{BrokerKind, HollowOptions};

/// Latency distribution in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl Latency {
    /// Summarises `samples` (milliseconds).
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        Self {
            count: v.len(),
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            max_ms: v[v.len() - 1],
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

/// One desired-state change pushed to every node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// The revision pushed to every node.
    pub revision: u64,
    /// PUT sent → response received, for accepted PUTs.
    pub put: Latency,
    /// PUTs that failed or were refused.
    pub put_errors: usize,
    /// First PUT error, if any.
    pub first_put_error: Option<String>,
    /// PUT sent → node holds the verified revision.
    pub node: Latency,
    /// PUT sent → hub registry shows the revision applied (upper bound: time
    /// the poll that first showed it returned).
    pub registry: Latency,
    /// Duration of each `GET /v1/nodes` poll during the round (the hub reads
    /// and serializes every node's record; its cost grows with the fleet).
    pub registry_get: Latency,
    /// Nodes that applied the revision.
    pub converged_nodes: usize,
    /// Nodes whose registry record showed it applied.
    pub converged_registry: usize,
    /// Nodes whose final registry record agrees: desired revision and
    /// reported `applied_revision` both equal `revision`, status online.
    pub registry_agrees: usize,
    /// First PUT sent → last node seen converged in the registry (or timeout).
    pub wall_ms: f64,
    /// Hub resident memory when the round ended.
    pub hub_rss_bytes: u64,
}

/// What a hollow run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HollowReport {
    /// Hollow nodes started.
    pub nodes: usize,
    /// The staged rollout after the rounds, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::rollout::RolloutReport>,
    /// Nodes connected when the rounds started.
    pub connected: usize,
    /// Start → every node had its first CONNACK.
    pub connect_seconds: f64,
    /// Start → the hub registry showed every node online.
    pub registry_online_seconds: f64,
    /// Per round.
    pub rounds: Vec<RoundReport>,
    /// Node convergence over all rounds, p50 (ms).
    pub desired_convergence_ms_p50: f64,
    /// Node convergence over all rounds, p99 (ms).
    pub desired_convergence_ms_p99: f64,
    /// Node convergence over all rounds, max (ms).
    pub desired_convergence_ms_max: f64,
    /// Registry round trip over all rounds, p50 (ms).
    pub registry_convergence_ms_p50: f64,
    /// Registry round trip over all rounds, p99 (ms).
    pub registry_convergence_ms_p99: f64,
    /// Registry round trip over all rounds, max (ms).
    pub registry_convergence_ms_max: f64,
    /// Every node converged in every round, and the registry agrees.
    pub all_converged: bool,
    /// Hub resident memory before any node connected.
    pub hub_rss_bytes_idle: u64,
    /// Hub resident memory once every node was online.
    pub hub_rss_bytes_connected: u64,
    /// Hub peak resident memory (`VmHWM`, or the sampled maximum if larger).
    pub hub_rss_bytes_max: u64,
    /// Simulator peak resident memory.
    pub sim_rss_bytes_max: u64,
    /// Whether the hub ran in the simulator's process (its memory figures
    /// then include the hollow nodes).
    pub hub_in_process: bool,
    /// The broker the nodes and the hub met on.
    pub broker: BrokerKind,
    /// Its version, when known (`mosquitto version 2.0.11`).
    pub broker_version: Option<String>,
    /// External broker's resident memory before any node connected (0 when
    /// the broker is embedded in the hub or not measured).
    pub broker_rss_bytes_idle: u64,
    /// External broker's resident memory once every node was online.
    pub broker_rss_bytes_connected: u64,
    /// External broker's peak resident memory (`VmHWM`, or the sampled
    /// maximum if larger).
    pub broker_rss_bytes_max: u64,
    /// `/proc/loadavg` (1, 5, 15 min) when the run started.
    pub load_average_start: [f64; 3],
    /// `/proc/loadavg` when the run ended.
    pub load_average_end: [f64; 3],
    /// Highest 1-minute load average sampled during the run.
    pub load_average_1m_max: f64,
    /// Reconnects after a first CONNACK, all nodes.
    pub reconnects: u64,
    /// Connection attempts that failed, all nodes.
    pub connect_errors: u64,
    /// Desired documents nodes refused (should be 0).
    pub desired_rejected: u64,
    /// Publishes nodes could not queue (client queue full).
    pub publish_dropped: u64,
    /// Start → end.
    pub wall_seconds: f64,
    /// The options of the run.
    pub options: HollowOptions,
}

impl HollowReport {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "hollow fleet: {} nodes, {} connected in {:.1} s, all online in the hub registry after {:.1} s",
            self.nodes, self.connected, self.connect_seconds, self.registry_online_seconds
        );
        for r in &self.rounds {
            let _ = writeln!(
                s,
                "round rev {}: {}/{} nodes applied, {}/{} in registry ({} agree), {:.1} s wall; PUT p50 {:.1} ms p99 {:.1} ms ({} errors)",
                r.revision,
                r.converged_nodes,
                self.nodes,
                r.converged_registry,
                self.nodes,
                r.registry_agrees,
                r.wall_ms / 1000.0,
                r.put.p50_ms,
                r.put.p99_ms,
                r.put_errors
            );
            let _ = writeln!(
                s,
                "  PUT → node verified:    p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
                r.node.p50_ms, r.node.p99_ms, r.node.max_ms
            );
            let _ = writeln!(
                s,
                "  PUT → hub registry:     p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms  (poll every {} ms; GET /v1/nodes p50 {:.0} ms, max {:.0} ms)",
                r.registry.p50_ms,
                r.registry.p99_ms,
                r.registry.max_ms,
                self.options.registry_poll.as_millis(),
                r.registry_get.p50_ms,
                r.registry_get.max_ms
            );
        }
        let _ = writeln!(
            s,
            "hub RSS: idle {:.0} MiB, {} nodes online {:.0} MiB, peak {:.0} MiB{}; fleet-sim peak {:.0} MiB",
            mb(self.hub_rss_bytes_idle),
            self.nodes,
            mb(self.hub_rss_bytes_connected),
            mb(self.hub_rss_bytes_max),
            if self.hub_in_process {
                " (hub in this process: includes the hollow nodes)"
            } else {
                ""
            },
            mb(self.sim_rss_bytes_max)
        );
        if self.broker == BrokerKind::Mosquitto {
            let _ = writeln!(
                s,
                "broker ({}) RSS: idle {:.0} MiB, {} nodes online {:.0} MiB, peak {:.0} MiB",
                self.broker_version.as_deref().unwrap_or("mosquitto"),
                mb(self.broker_rss_bytes_idle),
                self.nodes,
                mb(self.broker_rss_bytes_connected),
                mb(self.broker_rss_bytes_max),
            );
        }
        let l = |a: [f64; 3]| format!("{:.2} {:.2} {:.2}", a[0], a[1], a[2]);
        let _ = writeln!(
            s,
            "load average: start {}, end {}, highest 1-min {:.2}",
            l(self.load_average_start),
            l(self.load_average_end),
            self.load_average_1m_max
        );
        let _ = write!(
            s,
            "wall {:.1} s; reconnects {}, connect errors {}, rejected {}, dropped publishes {}; {}",
            self.wall_seconds,
            self.reconnects,
            self.connect_errors,
            self.desired_rejected,
            self.publish_dropped,
            if self.all_converged {
                "every node converged"
            } else {
                "NOT every node converged"
            }
        );
        if let Some(r) = &self.rollout {
            r.summary(&mut s);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = Latency::of(&v);
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert!((l.mean_ms - 50.5).abs() < 1e-9);
        let one = Latency::of(&[7.0]);
        assert_eq!((one.p50_ms, one.p99_ms, one.count), (7.0, 7.0, 1));
        assert_eq!(Latency::of(&[]), Latency::default());
    }
}
