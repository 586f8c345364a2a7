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
    let mut last_print = Instant::now();
    loop {
        let c = fleet.connected_once.load(Ordering::Relaxed);
        if c == n {
            break;
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
    let connect_seconds = t0.elapsed().as_secs_f64();
    say(
        opts,
        &format!("[{connect_seconds:>6.1}s] all {n} nodes connected"),
    );
    // 2. The hub sees every node online (and holding the base revision).
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
            break;
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
                t0.elapsed().as_secs_f64()
            ),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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
                t0.elapsed().as_secs_f64(),
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
    let unset = u64::MAX;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(unset)).collect());
    let puts = {
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
    };
    let mut node_ms: Vec<Option<f64>> = vec![None; n];
    let mut reg_ms: Vec<Option<f64>> = vec![None; n];
    let mut last_reg_us = t_start;
    let mut get_ms = Vec::new();
    let mut last_print = Instant::now();
    loop {
        for (i, slot) in fleet.slots.iter().enumerate() {
            if node_ms[i].is_none() && slot.revision.load(Ordering::Acquire) >= revision {
                let at = slot.applied_at_us.load(Ordering::Relaxed);
                let sent = sent_at[i].load(Ordering::Acquire);
                if sent != unset {
                    node_ms[i] = Some(at.saturating_sub(sent) as f64 / 1000.0);
                }
            }
        }
        let reg_done = reg_ms.iter().filter(|x| x.is_some()).count();
        if reg_done < n {
            let asked = fleet.now_us();
            let views = api.nodes().await?;
            let now = fleet.now_us();
            get_ms.push(now.saturating_sub(asked) as f64 / 1000.0);
            for v in views {
                let Some(&i) = index.get(v.node.as_str()) else {
                    continue;
                };
                let applied = v.reported.as_ref().map_or(0, |r| r.applied_revision);
                let sent = sent_at[i].load(Ordering::Acquire);
                if reg_ms[i].is_none() && applied >= revision && sent != unset {
                    reg_ms[i] = Some(now.saturating_sub(sent) as f64 / 1000.0);
                    last_reg_us = now;
                }
            }
        }
        let node_done = node_ms.iter().filter(|x| x.is_some()).count();
        let reg_done = reg_ms.iter().filter(|x| x.is_some()).count();
        if (node_done == n && reg_done == n) || Instant::now() >= deadline {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let sent = sent_at
                .iter()
                .filter(|t| t.load(Ordering::Relaxed) != unset)
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
    // The final word of the registry.
    let views = api.nodes().await?;
    let registry_agrees = views
        .iter()
        .filter(|v| index.contains_key(v.node.as_str()))
        .filter(|v| {
            v.desired_revision == revision
                && v.reported.as_ref().map(|r| r.applied_revision) == Some(revision)
                && v.status.as_ref().map(|s| s.state) == Some(NodeState::Online)
        })
        .count();
    let node_samples: Vec<f64> = node_ms.iter().flatten().copied().collect();
    let reg_samples: Vec<f64> = reg_ms.iter().flatten().copied().collect();
    let report = RoundReport {
        revision,
        put: Latency::of(&put_ms),
        put_errors,
        first_put_error,
        node: Latency::of(&node_samples),
        registry: Latency::of(&reg_samples),
        registry_get: Latency::of(&get_ms),
        converged_nodes: node_samples.len(),
        converged_registry: reg_samples.len(),
        registry_agrees,
        wall_ms: last_reg_us.saturating_sub(t_start) as f64 / 1000.0,
        hub_rss_bytes: 0,
    };
    Ok((report, node_samples, reg_samples))
}
