//! What the runner watches while a run goes on: the hub's view of every
//! node (`GET /v1/nodes`), RSS, drain state, and the progress line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fleet::NodeRt;
use super::{lock, now_ms};

/// Per-node state as the monitor last saw it at the hub.
#[derive(Debug, Clone, Default)]
pub(super) struct NodeSeen {
    pub(super) reported: Option<ReportedLite>,
    pub(super) stored: u64,
}

#[derive(Debug, Default)]
pub(super) struct Monitor {
    pub(super) nodes: HashMap<String, NodeSeen>,
    /// (node, revision) → when it was put.
    pub(super) pending: HashMap<(String, u64), Instant>,
    /// (node, revision) → wall ms when the hub first showed it applied.
    pub(super) applied_at_ms: HashMap<(String, u64), u64>,
    pub(super) convergence_ms: Vec<f64>,
    pub(super) hub_rss_max: u64,
    pub(super) edge_rss_max: u64,
    pub(super) polls_failed: u64,
}

#[derive(Deserialize)]
pub(super) struct NodeViewLite {
    pub(super) node: String,
    pub(super) reported: Option<ReportedLite>,
    pub(super) telemetry: TelemetryLite,
}

/// The part of a node's reported state the runner uses.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct ReportedLite {
    pub(super) applied_revision: u64,
    /// Windows in which the agent may have lost samples (after a crash).
    #[serde(default)]
    pub(super) loss_windows: Vec<protocols::LossWindow>,
    pub(super) backlog: protocols::Backlog,
    pub(super) at_ms: u64,
}

#[derive(Deserialize)]
pub(super) struct TelemetryLite {
    pub(super) samples: u64,
}

#[derive(Deserialize)]
pub(super) struct ArtifactInfoLite {
    pub(super) sha256: String,
    pub(super) size: u64,
}

#[derive(Deserialize)]
pub(super) struct SampleLite {
    pub(super) seq: u64,
    pub(super) point: u32,
    pub(super) ts_ms: u64,
    pub(super) value: f64,
    pub(super) quality: u8,
}

#[derive(Deserialize)]
pub(super) struct SamplePageLite {
    pub(super) samples: Vec<SampleLite>,
    pub(super) next_seq: Option<u64>,
}

/// RSS in bytes of a process from `/proc/{pid}/status` (`self` for this one).
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(super) async fn monitor_loop(
    hub_base: String,
    hub_pid: Arc<Mutex<Option<u32>>>,
    state: Arc<Mutex<Monitor>>,
    cancel: CancellationToken,
) {
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        if n.is_multiple_of(5) {
            let me = rss_bytes("self").unwrap_or(0);
            let pid = *lock(&hub_pid);
            let hub = pid.and_then(|p| rss_bytes(&p.to_string())).unwrap_or(0);
            let mut st = lock(&state);
            st.edge_rss_max = st.edge_rss_max.max(me);
            st.hub_rss_max = st.hub_rss_max.max(hub);
        }
        // The whole fleet once a second (reported states of big nodes are
        // large); nodes with a pending desired revision every 100 ms.
        let views: Vec<NodeViewLite> = if n.is_multiple_of(10) {
            let Some(v) = get_json(&http, format!("{hub_base}/v1/nodes")).await else {
                lock(&state).polls_failed += 1;
                continue;
            };
            v
        } else {
            let pending: std::collections::BTreeSet<String> = lock(&state)
                .pending
                .keys()
                .map(|(n, _)| n.clone())
                .collect();
            let mut v = Vec::new();
            for node in pending {
                if let Some(one) = get_json(&http, format!("{hub_base}/v1/nodes/{node}")).await {
                    v.push(one);
                }
            }
            v
        };
        let now = Instant::now();
        let mut st = lock(&state);
        for v in views {
            if let Some(rep) = &v.reported {
                let applied = rep.applied_revision;
                let done: Vec<(String, u64)> = st
                    .pending
                    .keys()
                    .filter(|(n, r)| *n == v.node && *r <= applied)
                    .cloned()
                    .collect();
                for k in done {
                    if let Some(t) = st.pending.remove(&k) {
                        st.applied_at_ms.insert(k.clone(), now_ms());
                        st.convergence_ms
                            .push(now.duration_since(t).as_secs_f64() * 1_000.0);
                    }
                }
            }
            let seen = st.nodes.entry(v.node).or_default();
            if v.reported.is_some() {
                seen.reported = v.reported;
            }
            seen.stored = seen.stored.max(v.telemetry.samples);
        }
    }
}

pub(super) async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: String,
) -> Option<T> {
    let r = http
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Whether every node reported, after `after_ms`, that everything stamped
/// before `before_ms` has been acked. With `before_ms = None`: that its
/// oldest unacked sample is younger than `fresh_ms` (caught up with live).
pub(super) fn drained(
    st: &Monitor,
    nodes: &[NodeRt],
    after_ms: u64,
    before_ms: Option<u64>,
    fresh_ms: u64,
) -> bool {
    nodes.iter().all(|n| {
        let Some(rep) = st
            .nodes
            .get(&n.layout.name)
            .and_then(|s| s.reported.as_ref())
        else {
            return false;
        };
        // Wall-clock instants in the node's time.
        let after_ms = after_ms.saturating_add_signed(n.clock_offset_ms);
        let before_ms = before_ms.map(|b| b.saturating_add_signed(n.clock_offset_ms));
        if rep.at_ms <= after_ms {
            return false;
        }
        let acked_before = if rep.backlog.samples == 0 {
            rep.at_ms
        } else {
            rep.at_ms.saturating_sub(rep.backlog.oldest_age_ms)
        };
        match before_ms {
            Some(b) => acked_before > b,
            None => rep.backlog.samples == 0 || rep.backlog.oldest_age_ms <= fresh_ms,
        }
    })
}

pub(super) struct Progress {
    pub(super) bar: ProgressBar,
    pub(super) show: bool,
    pub(super) next_line: u64,
}

impl Progress {
    pub(super) fn new(show: bool, len: u64) -> Self {
        let bar = if show {
            ProgressBar::new(len)
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}",
        ) {
            bar.set_style(style);
        }
        Self {
            bar,
            show,
            next_line: 0,
        }
    }

    /// A line above the bar; plain stderr when there is no terminal
    /// (indicatif draws nothing then) unless progress is off.
    pub(super) fn println(&self, msg: impl AsRef<str>) {
        if !self.show {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{}", msg.as_ref());
        } else {
            self.bar.println(msg.as_ref());
        }
    }

    /// Progress without a terminal: one line every 10 s of device time.
    pub(super) fn status(&mut self, secs: u64, msg: &str) {
        if self.show && self.bar.is_hidden() && secs >= self.next_line {
            eprintln!("[{secs:>5}s] {msg}");
            self.next_line = secs + 10;
        }
    }
}
