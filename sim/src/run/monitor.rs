//! What the runner watches while a run goes on: the hub's view of every
//! node ([`monitor_loop`]: `GET /v1/nodes` through the hub's typed
//! [`HubClient`], as [`NodeView`]s), RSS, whether the fleet has drained
//! ([`drained`]), and the progress line ([`Progress`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud_hub::client::HubClient;
use indicatif::{ProgressBar, ProgressStyle};
use protocols::ReportedState;
use protocols::api::NodeView;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fleet::SimNode;
use super::{RunState, lock, now_ms};

/// Per-node state as the monitor last saw it at the hub.
#[derive(Debug, Clone, Default)]
pub(super) struct NodeSeen {
    pub(super) reported: Option<ReportedState>,
    pub(super) stored: u64,
}

/// What the monitor has seen so far.
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

impl Monitor {
    /// Files one poll's views (seen at `now`).
    fn record(&mut self, views: Vec<NodeView>, now: Instant) {
        for v in views {
            if let Some(rep) = &v.reported {
                let applied = rep.applied_revision;
                let done: Vec<(String, u64)> = self
                    .pending
                    .keys()
                    .filter(|(n, r)| *n == v.node && *r <= applied)
                    .cloned()
                    .collect();
                for k in done {
                    if let Some(t) = self.pending.remove(&k) {
                        self.applied_at_ms.insert(k.clone(), now_ms());
                        self.convergence_ms
                            .push(now.duration_since(t).as_secs_f64() * 1_000.0);
                    }
                }
            }
            let seen = self.nodes.entry(v.node).or_default();
            if v.reported.is_some() {
                seen.reported = v.reported;
            }
            seen.stored = seen.stored.max(v.telemetry.samples);
        }
    }
}

/// RSS in bytes of a process from `/proc/{pid}/status` (`self` for this one).
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Polls the hub every 100 ms until `cancel`: the whole fleet once a second,
/// nodes with a pending desired revision on every tick; RSS every 0.5 s.
/// `hub` should have a short per-request timeout: a failed poll is counted
/// and the next tick tries again.
pub(super) async fn monitor_loop(
    hub: HubClient,
    hub_pid: Arc<Mutex<Option<u32>>>,
    state: Arc<Mutex<Monitor>>,
    cancel: CancellationToken,
) {
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
        let views: Vec<NodeView> = if n.is_multiple_of(10) {
            let Ok(v) = hub.nodes().await else {
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
                if let Ok(Some(one)) = hub.node(&node).await {
                    v.push(one);
                }
            }
            v
        };
        lock(&state).record(views, Instant::now());
    }
}

/// Whether every node reported, after `after_ms`, that everything stamped
/// before `before_ms` has been acked. With `before_ms = None`: that its
/// oldest unacked sample is younger than `fresh_ms` (caught up with live).
pub(super) fn drained(
    st: &Monitor,
    nodes: &[SimNode],
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

/// The progress bar on stderr (a line every 10 s without a terminal).
pub(super) struct Progress {
    pub(super) bar: ProgressBar,
    show: bool,
    next_line: u64,
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

impl RunState {
    /// The live phase's progress line, and the drain watches: an outage's
    /// drain ends when, with no outage open, every node is fresh again.
    pub(super) fn show_progress(&mut self, live: Instant, live_for: Duration, fresh_ms: u64) {
        let st = lock(&self.monitor);
        let stored: u64 = st.nodes.values().map(|n| n.stored).sum();
        let backlog: u64 = st
            .nodes
            .values()
            .filter_map(|n| n.reported.as_ref())
            .map(|r| r.backlog.samples)
            .sum();
        self.progress
            .bar
            .set_position(live.elapsed().as_secs().min(live_for.as_secs()));
        let mut msg = format!(
            "hub stored {stored}  edge backlog {backlog}  rss {} MiB",
            rss_bytes("self").unwrap_or(0) >> 20
        );
        for (node, o) in &self.outages.running_virtual {
            use std::fmt::Write as _;
            let _ = write!(
                msg,
                "  node {node} virtual outage {:.1}/{:.1} h",
                o.progress().as_secs_f64() / 3600.0,
                o.duration().as_secs_f64() / 3600.0
            );
        }
        self.progress.status(live.elapsed().as_secs(), &msg);
        self.progress.bar.set_message(msg);
        let open_outages =
            !self.outages.since.is_empty() || !self.outages.running_virtual.is_empty();
        let nodes = &self.nodes;
        let drain_max = &mut self.outages.drain_max;
        self.outages.drain_watch.retain(|(end, end_ms)| {
            if !open_outages && drained(&st, nodes, *end_ms, None, fresh_ms) {
                *drain_max = drain_max.max(end.elapsed().as_secs_f64());
                false
            } else {
                true
            }
        });
    }
}
