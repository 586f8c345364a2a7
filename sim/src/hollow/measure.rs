//! The measurement of a running fleet: wait for every node to connect and
//! show up online, then push the desired-state rounds and time them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use protocols::{DesiredState, NodeConfig, NodeState};
use tokio::time::Instant;

use super::api::Api;
use super::fleet::Fleet;
use super::proc::MemWatch;
use super::report::{HollowReport, Latency, RoundReport};
use super::{HollowError, HollowOptions, say};

pub(super) async fn measure(
    opts: &HollowOptions,
    api: &Arc<Api>,
    fleet: &Arc<Fleet>,
    names: &[String],
    index: &HashMap<&str, usize>,
    base_revision: u64,
    mem: &MemWatch,
) -> Result<HollowReport, HollowError> {
    let n = names.len();
    let t0 = fleet.t0;
    let deadline = t0 + opts.connect_timeout;
    // 1. Every node connected.
    wait_connected(opts, fleet, n, deadline).await?;
    let connect_seconds = t0.elapsed().as_secs_f64();
    say(
        opts,
        &format!("[{connect_seconds:>6.1}s] all {n} nodes connected"),
    );
    // 2. The hub sees every node online (and holding the base revision).
    wait_registry_online(opts, api, fleet, index, base_revision, deadline).await?;
    let registry_online_seconds = t0.elapsed().as_secs_f64();
    let online = mem.sample();
    let mib = |b: u64| b as f64 / 1_048_576.0;
    say(
        opts,
        &format!(
            "[{registry_online_seconds:>6.1}s] hub registry shows all {n} nodes online; hub RSS {:.0} MiB{}",
            mib(online.hub_rss),
            if mem.broker_pid.is_some() {
                format!(", broker RSS {:.0} MiB", mib(online.broker_rss))
            } else {
                String::new()
            }
        ),
    );

    let (rounds, all_node, all_reg) =
        rounds(opts, api, fleet, names, index, base_revision, mem).await?;
    let node = Latency::of(&all_node);
    let reg = Latency::of(&all_reg);
    let all_converged = rounds
        .iter()
        .all(|r| r.converged_nodes == n && r.converged_registry == n && r.registry_agrees == n);
    Ok(HollowReport {
        nodes: n,
        connected: fleet.connected_once.load(Ordering::Relaxed),
        connect_seconds,
        registry_online_seconds,
        rounds,
        desired_convergence_ms_p50: node.p50_ms,
        desired_convergence_ms_p99: node.p99_ms,
        desired_convergence_ms_max: node.max_ms,
        registry_convergence_ms_p50: reg.p50_ms,
        registry_convergence_ms_p99: reg.p99_ms,
        registry_convergence_ms_max: reg.max_ms,
        all_converged,
        hub_rss_bytes_connected: online.hub_rss,
        broker_rss_bytes_connected: online.broker_rss,
        ..HollowReport::default()
    })
}

/// Waits until all `n` nodes saw a CONNACK, printing progress every second.
async fn wait_connected(
    opts: &HollowOptions,
    fleet: &Fleet,
    n: usize,
    deadline: Instant,
) -> Result<(), HollowError> {
    let t0 = fleet.t0;
    let mut last_print = Instant::now();
    loop {
        let c = fleet.connected_once.load(Ordering::Relaxed);
        if c == n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HollowError::Timeout(format!(
                "only {c} of {n} nodes connected within {:?} ({} connect errors)",
                opts.connect_timeout,
                fleet.connect_errors.load(Ordering::Relaxed)
            )));
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            say(
                opts,
                &format!(
                    "[{:>6.1}s] connected {c}/{n} (up {}, connect errors {})",
                    t0.elapsed().as_secs_f64(),
                    fleet.up.load(Ordering::Relaxed),
                    fleet.connect_errors.load(Ordering::Relaxed)
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the hub registry until it shows every node of `index` online and
/// reporting `base_revision` as applied.
async fn wait_registry_online(
    opts: &HollowOptions,
    api: &Api,
    fleet: &Fleet,
    index: &HashMap<&str, usize>,
    base_revision: u64,
    deadline: Instant,
) -> Result<(), HollowError> {
    let n = index.len();
    loop {
        let views = api.nodes().await?;
        let ready = views
            .iter()
            .filter(|v| index.contains_key(v.node.as_str()))
            .filter(|v| {
                v.status
                    .as_ref()
                    .is_some_and(|s| s.state == NodeState::Online)
            })
            .filter(|v| v.reported.as_ref().map_or(0, |r| r.applied_revision) == base_revision)
            .count();
        if ready == n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HollowError::Timeout(format!(
                "the hub registry showed only {ready} of {n} nodes online within {:?}",
                opts.connect_timeout
            )));
        }
        say(
            opts,
            &format!(
                "[{:>6.1}s] hub registry: {ready}/{n} online",
                fleet.t0.elapsed().as_secs_f64()
            ),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The rounds after `base_revision`, one after the other: their reports
/// and all node / registry samples (ms).
async fn rounds(
    opts: &HollowOptions,
    api: &Arc<Api>,
    fleet: &Arc<Fleet>,
    names: &[String],
    index: &HashMap<&str, usize>,
    base_revision: u64,
    mem: &MemWatch,
) -> Result<(Vec<RoundReport>, Vec<f64>, Vec<f64>), HollowError> {
    let n = names.len();
    let mut rounds = Vec::new();
    let (mut all_node, mut all_reg) = (Vec::new(), Vec::new());
    for r in 1..=u64::from(opts.rounds) {
        let revision = base_revision + r;
        let round = round(opts, api, fleet, names, index, revision).await?;
        let mut round = round;
        round.0.hub_rss_bytes = mem.sample().hub_rss;
        say(
            opts,
            &format!(
                "[{:>6.1}s] round rev {revision}: {}/{n} nodes, {}/{n} registry; node p50 {:.1} ms p99 {:.1} ms; registry p50 {:.1} ms p99 {:.1} ms",
                fleet.t0.elapsed().as_secs_f64(),
                round.0.converged_nodes,
                round.0.converged_registry,
                round.0.node.p50_ms,
                round.0.node.p99_ms,
                round.0.registry.p50_ms,
                round.0.registry.p99_ms
            ),
        );
        all_node.extend(round.1);
        all_reg.extend(round.2);
        rounds.push(round.0);
    }
    Ok((rounds, all_node, all_reg))
}

/// `sent_at` value of a node whose PUT has not been sent yet.
const UNSET: u64 = u64::MAX;

/// What one PUT task returns per node: the outcome and its latency (ms).
type PutResults = Vec<(Result<(), String>, f64)>;

/// One round: PUT `revision` for every node and wait for convergence.
/// Returns the round report and the raw node / registry samples (ms).
async fn round(
    opts: &HollowOptions,
    api: &Arc<Api>,
    fleet: &Arc<Fleet>,
    names: &[String],
    index: &HashMap<&str, usize>,
    revision: u64,
) -> Result<(RoundReport, Vec<f64>, Vec<f64>), HollowError> {
    let n = names.len();
    let t_start = fleet.now_us();
    let deadline = Instant::now() + opts.round_timeout;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(UNSET)).collect());
    let puts = spawn_puts(opts, api, fleet, names, revision, &sent_at);
    let seen = converge(opts, api, fleet, index, revision, &sent_at, deadline).await?;
    let put_results = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(30),
        puts,
    )
    .await
    .map_err(|_| HollowError::Timeout(format!("PUTs of revision {revision} did not finish")))?
    .map_err(|e| HollowError::Hub(format!("PUT task failed: {e}")))?;
    let mut put_ms = Vec::with_capacity(n);
    let mut put_errors = 0;
    let mut first_put_error = None;
    for (r, ms) in put_results {
        match r {
            Ok(()) => put_ms.push(ms),
            Err(e) => {
                put_errors += 1;
                first_put_error.get_or_insert(e);
            }
        }
    }
    let registry_agrees = registry_agrees(api, index, revision).await?;
    let node_samples: Vec<f64> = seen.node_ms.iter().flatten().copied().collect();
    let reg_samples: Vec<f64> = seen.reg_ms.iter().flatten().copied().collect();
    let report = RoundReport {
        revision,
        put: Latency::of(&put_ms),
        put_errors,
        first_put_error,
        node: Latency::of(&node_samples),
        registry: Latency::of(&reg_samples),
        registry_get: Latency::of(&seen.get_ms),
        converged_nodes: node_samples.len(),
        converged_registry: reg_samples.len(),
        registry_agrees,
        wall_ms: seen.last_reg_us.max(t_start).saturating_sub(t_start) as f64 / 1000.0,
        hub_rss_bytes: 0,
    };
    Ok((report, node_samples, reg_samples))
}

/// Spawns the PUTs of `revision` for every node, `put_concurrency` in
/// flight; each records its send time in `sent_at` before it is sent.
fn spawn_puts(
    opts: &HollowOptions,
    api: &Arc<Api>,
    fleet: &Arc<Fleet>,
    names: &[String],
    revision: u64,
    sent_at: &Arc<Vec<AtomicU64>>,
) -> tokio::task::JoinHandle<PutResults> {
    let (api, fleet, sent_at) = (api.clone(), fleet.clone(), sent_at.clone());
    let config = NodeConfig {
        report_interval_ms: opts.report_interval.as_millis() as u64,
        ..NodeConfig::default()
    };
    let docs: Vec<DesiredState> = names
        .iter()
        .map(|node| DesiredState {
            node: node.clone(),
            revision,
            functions: Vec::new(),
            devices: Vec::new(),
            models: Vec::new(),
            config: config.clone(),
        })
        .collect();
    let conc = opts.put_concurrency;
    tokio::spawn(async move {
        futures::stream::iter(docs.into_iter().enumerate())
            .map(|(i, d)| {
                let (api, fleet, sent_at) = (api.clone(), fleet.clone(), sent_at.clone());
                async move {
                    let t = fleet.now_us();
                    sent_at[i].store(t, Ordering::Release);
                    let r = api.put_desired(&d).await;
                    (r, (fleet.now_us() - t) as f64 / 1000.0)
                }
            })
            .buffer_unordered(conc)
            .collect::<Vec<_>>()
            .await
    })
}

/// What [`converge`] saw of one round.
struct Seen {
    /// Per node: PUT sent to the node holding the revision (ms).
    node_ms: Vec<Option<f64>>,
    /// Per node: PUT sent to the registry showing it applied (ms).
    reg_ms: Vec<Option<f64>>,
    /// Durations of the registry GETs (ms).
    get_ms: Vec<f64>,
    /// When the registry last showed a node converge (µs since `t0`; 0:
    /// none has yet).
    last_reg_us: u64,
}

/// Polls the nodes' slots and the hub registry every `registry_poll` until
/// every node converged on both, or `deadline`.
async fn converge(
    opts: &HollowOptions,
    api: &Api,
    fleet: &Fleet,
    index: &HashMap<&str, usize>,
    revision: u64,
    sent_at: &[AtomicU64],
    deadline: Instant,
) -> Result<Seen, HollowError> {
    let n = sent_at.len();
    let mut seen = Seen {
        node_ms: vec![None; n],
        reg_ms: vec![None; n],
        get_ms: Vec::new(),
        last_reg_us: 0,
    };
    let mut last_print = Instant::now();
    loop {
        for (i, slot) in fleet.slots.iter().enumerate() {
            if seen.node_ms[i].is_none() && slot.revision.load(Ordering::Acquire) >= revision {
                let at = slot.applied_at_us.load(Ordering::Relaxed);
                let sent = sent_at[i].load(Ordering::Acquire);
                if sent != UNSET {
                    seen.node_ms[i] = Some(at.saturating_sub(sent) as f64 / 1000.0);
                }
            }
        }
        let reg_done = seen.reg_ms.iter().filter(|x| x.is_some()).count();
        if reg_done < n {
            poll_registry(api, fleet, index, revision, sent_at, &mut seen).await?;
        }
        let node_done = seen.node_ms.iter().filter(|x| x.is_some()).count();
        let reg_done = seen.reg_ms.iter().filter(|x| x.is_some()).count();
        if (node_done == n && reg_done == n) || Instant::now() >= deadline {
            return Ok(seen);
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let sent = sent_at
                .iter()
                .filter(|t| t.load(Ordering::Relaxed) != UNSET)
                .count();
            say(
                opts,
                &format!(
                    "[{:>6.1}s] rev {revision}: PUT sent {sent}/{n}, nodes applied {node_done}/{n}, registry {reg_done}/{n}",
                    fleet.t0.elapsed().as_secs_f64()
                ),
            );
        }
        tokio::time::sleep(opts.registry_poll).await;
    }
}

/// One registry GET during a round: times it and records the nodes it
/// shows at `revision` for the first time.
async fn poll_registry(
    api: &Api,
    fleet: &Fleet,
    index: &HashMap<&str, usize>,
    revision: u64,
    sent_at: &[AtomicU64],
    seen: &mut Seen,
) -> Result<(), HollowError> {
    let asked = fleet.now_us();
    let views = api.nodes().await?;
    let now = fleet.now_us();
    seen.get_ms.push(now.saturating_sub(asked) as f64 / 1000.0);
    for v in views {
        let Some(&i) = index.get(v.node.as_str()) else {
            continue;
        };
        let applied = v.reported.as_ref().map_or(0, |r| r.applied_revision);
        let sent = sent_at[i].load(Ordering::Acquire);
        if seen.reg_ms[i].is_none() && applied >= revision && sent != UNSET {
            seen.reg_ms[i] = Some(now.saturating_sub(sent) as f64 / 1000.0);
            seen.last_reg_us = now;
        }
    }
    Ok(())
}

/// The final word of the registry: how many nodes it shows online with
/// `revision` both desired and applied.
async fn registry_agrees(
    api: &Api,
    index: &HashMap<&str, usize>,
    revision: u64,
) -> Result<usize, HollowError> {
    let views = api.nodes().await?;
    Ok(views
        .iter()
        .filter(|v| index.contains_key(v.node.as_str()))
        .filter(|v| {
            v.desired_revision == revision
                && v.reported.as_ref().map(|r| r.applied_revision) == Some(revision)
                && v.status.as_ref().map(|s| s.state) == Some(NodeState::Online)
        })
        .count())
}
