//! A staged rollout over the hollow fleet, measured: after the rounds, the
//! run labels every node, applies a deployment at once (revision 1), then
//! rolls out revision 2 in the configured waves with a short bake and
//! follows the rollout through the hub's REST API.
//!
//! Per wave it reports the time from the wave's start to the start of the
//! next one (the gate passed), both as the hub stamped them
//! (`wave_started_ms`, `finished_ms`), and that minus the bake: what the hub
//! adds. It also reports the hub's CPU time over the rollout (from
//! `/proc/{pid}/stat`), its peak resident memory, and the longest rollout
//! tick the hub reported (`edgefleet_hub_rollout_tick_seconds`).

use std::time::Duration;

use protocols::control::{RolloutPhase, RolloutStatus};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use super::api::Api;
use super::{HollowError, HollowOptions, say};

/// Settings of the rollout phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutOptions {
    /// Cumulative wave sizes in percent, increasing, the last one 100.
    pub waves: Vec<u8>,
    /// Bake time of each node.
    #[serde(with = "humantime_serde")]
    pub bake: Duration,
    /// Most nodes in flight at once.
    pub max_concurrent: u32,
    /// How often the rollout is polled.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// Longest wait for the rollout to end.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RolloutOptions {
    fn default() -> Self {
        Self {
            waves: vec![1, 10, 50, 100],
            bake: Duration::from_secs(2),
            max_concurrent: 10_000,
            poll: Duration::from_millis(100),
            timeout: Duration::from_secs(600),
        }
    }
}

impl RolloutOptions {
    /// Checks ranges; errors name the option.
    pub fn validate(&self) -> Result<(), HollowError> {
        let bad = |m: String| Err(HollowError::Config(m));
        if self.waves.is_empty()
            || self.waves.windows(2).any(|w| w[0] >= w[1])
            || self.waves.last() != Some(&100)
            || self.waves[0] == 0
        {
            return bad(format!(
                "rollout_waves: {:?} must increase, from 1 or more, up to 100",
                self.waves
            ));
        }
        if self.bake > Duration::from_secs(3600) {
            return bad("rollout_bake: at most 1h in a benchmark".into());
        }
        if self.max_concurrent == 0 {
            return bad("rollout_max_concurrent: must be at least 1".into());
        }
        Ok(())
    }
}

/// One wave as measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WaveReport {
    /// Its index.
    pub wave: u32,
    /// Nodes in it.
    pub nodes: u32,
    /// Wave start → gate passed (the next wave's start, or the end).
    pub seconds: f64,
    /// `seconds` minus the bake: what delivery, apply and the hub added.
    pub overhead_seconds: f64,
}

/// The rollout phase of a hollow run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutReport {
    /// The options it ran with.
    pub options: RolloutOptions,
    /// Labelling every node and applying revision 1 everywhere.
    pub setup_seconds: f64,
    /// PUT of revision 2 → the rollout's end.
    pub total_seconds: f64,
    /// How it ended.
    pub phase: Option<RolloutPhase>,
    /// Per wave.
    pub waves: Vec<WaveReport>,
    /// Healthy nodes at the end.
    pub healthy: u32,
    /// Failed nodes at the end.
    pub failed: u32,
    /// Hub CPU time (user + system) over the rollout.
    pub hub_cpu_seconds: f64,
    /// Longest rollout tick the hub reported while it ran.
    pub max_tick_seconds: f64,
}

impl RolloutReport {
    /// Human-readable lines, appended to `s`.
    pub fn summary(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "rollout {:?}: {:.1} s total, {} healthy, {} failed; hub CPU {:.1} s, longest tick {:.1} ms",
            self.phase,
            self.total_seconds,
            self.healthy,
            self.failed,
            self.hub_cpu_seconds,
            self.max_tick_seconds * 1000.0
        );
        for w in &self.waves {
            let _ = writeln!(
                s,
                "  wave {} ({} nodes): {:.2} s to gate passed, {:.2} s beyond the bake",
                w.wave, w.nodes, w.seconds, w.overhead_seconds
            );
        }
    }
}

/// CPU time of `pid` (user + system), seconds.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces), 1-based 14, 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// Runs the rollout phase over `names`.
pub(super) async fn rollout(
    opts: &HollowOptions,
    ro: &RolloutOptions,
    api: &Api,
    names: &[String],
    hub_pid: Option<u32>,
) -> Result<RolloutReport, HollowError> {
    ro.validate()?;
    let t0 = Instant::now();
    let c = api.client();
    let err = |what: &str, e: cloud_hub::client::ClientError| HollowError::Api {
        what: what.into(),
        detail: e.to_string(),
    };
    say(opts, &format!("rollout: labelling {} nodes", names.len()));
    let labels = json!({"labels": {"fleet": "hollow"}});
    futures::future::try_join_all(
        names
            .chunks(names.len().div_ceil(opts.put_concurrency))
            .map(|chunk| {
                let labels = labels.clone();
                async move {
                    for n in chunk {
                        c.put_labels(n, &labels).await?;
                    }
                    Ok::<(), cloud_hub::client::ClientError>(())
                }
            }),
    )
    .await
    .map_err(|e| err("PUT /v1/nodes/{node}/labels", e))?;
    let deployment = |batch: u32, rollout: Option<serde_json::Value>| {
        let mut d = json!({
            "selector": {"match_labels": {"fleet": "hollow"}},
            "template": {"config": {
                "report_interval_ms": opts.report_interval.as_millis() as u64,
                "batch_max_samples": batch,
            }},
        });
        if let Some(r) = rollout {
            d["rollout"] = r;
        }
        d
    };
    say(opts, "rollout: revision 1 to every node at once");
    c.put_deployment("hollow-rollout", &deployment(100, None))
        .await
        .map_err(|e| err("PUT /v1/deployments/hollow-rollout", e))?;
    wait_applied(api, names, ro.timeout).await?;
    let setup_seconds = t0.elapsed().as_secs_f64();

    let spec = json!({
        "strategy": {"kind": "waves",
            "waves": ro.waves.iter().map(|p| json!({"percent": p})).collect::<Vec<_>>()},
        "max_concurrent": ro.max_concurrent,
        "health": {"bake_ms": ro.bake.as_millis() as u64},
    });
    let cpu0 = cpu_seconds(hub_pid);
    let t1 = Instant::now();
    let answer = c
        .put_deployment("hollow-rollout", &deployment(101, Some(spec)))
        .await
        .map_err(|e| err("PUT /v1/deployments/hollow-rollout (rollout)", e))?;
    let id = answer.rollout.ok_or_else(|| HollowError::Api {
        what: "PUT /v1/deployments/hollow-rollout".into(),
        detail: "the answer names no rollout".into(),
    })?;
    say(opts, &format!("rollout: {id} started"));
    let (status, waves, max_tick) = follow(opts, ro, api, &id).await?;
    Ok(RolloutReport {
        options: ro.clone(),
        setup_seconds,
        total_seconds: t1.elapsed().as_secs_f64(),
        phase: Some(status.phase),
        waves: wave_reports(&waves, &status, ro.bake),
        healthy: status.counts.healthy,
        failed: status.counts.failed,
        hub_cpu_seconds: cpu_seconds(hub_pid) - cpu0,
        max_tick_seconds: max_tick,
    })
}

/// Waits until every node reports applied its current desired revision.
async fn wait_applied(api: &Api, names: &[String], timeout: Duration) -> Result<(), HollowError> {
    let want: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let views = api.nodes().await?;
        let done = views
            .iter()
            .filter(|v| want.contains(v.node.as_str()))
            .filter(|v| {
                v.desired_revision != 0
                    && v.reported
                        .as_ref()
                        .is_some_and(|r| r.applied_revision >= v.desired_revision)
            })
            .count();
        if done == want.len() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HollowError::Timeout(format!(
                "rollout set-up: {done} of {} nodes applied revision 1 within {timeout:?}",
                want.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls the rollout until it ends: its last status, the (wave, size,
/// started_ms) of every wave seen, and the longest tick the hub reported.
async fn follow(
    opts: &HollowOptions,
    ro: &RolloutOptions,
    api: &Api,
    id: &str,
) -> Result<(RolloutStatus, Vec<(u32, u32, u64)>, f64), HollowError> {
    let c = api.client();
    let deadline = Instant::now() + ro.timeout;
    let mut waves: Vec<(u32, u32, u64)> = Vec::new();
    let mut max_tick = 0f64;
    loop {
        let r = c.rollout(id).await.map_err(|e| HollowError::Api {
            what: format!("GET /v1/rollouts/{id}"),
            detail: e.to_string(),
        })?;
        let s = r.status;
        if let Some(w) = s.current_wave
            && waves.last().is_none_or(|l| l.0 != w)
        {
            say(
                opts,
                &format!(
                    "rollout: wave {w} ({} nodes), {} healthy so far",
                    s.wave_size, s.counts.healthy
                ),
            );
            waves.push((w, s.wave_size, s.wave_started_ms));
        }
        if let Ok(m) = c.metrics().await {
            max_tick = max_tick.max(tick_seconds(&m));
        }
        let ended = matches!(
            s.phase,
            RolloutPhase::Succeeded | RolloutPhase::SucceededWithSkipped
        ) || s.phase.is_final();
        if ended {
            return Ok((s, waves, max_tick));
        }
        if Instant::now() >= deadline {
            return Err(HollowError::Timeout(format!(
                "rollout {id} still {:?} after {:?}: {:?}",
                s.phase, ro.timeout, s.counts
            )));
        }
        tokio::time::sleep(ro.poll).await;
    }
}

fn tick_seconds(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgefleet_hub_rollout_tick_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn wave_reports(waves: &[(u32, u32, u64)], end: &RolloutStatus, bake: Duration) -> Vec<WaveReport> {
    let finished = end.finished_ms.unwrap_or(0);
    waves
        .iter()
        .enumerate()
        .map(|(i, &(wave, nodes, started))| {
            let next = waves.get(i + 1).map_or(finished, |w| w.2);
            let seconds = next.saturating_sub(started) as f64 / 1000.0;
            WaveReport {
                wave,
                nodes,
                seconds,
                overhead_seconds: seconds - bake.as_secs_f64(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn options_are_checked_by_name_and_waves_are_timed_from_the_hub_stamps() {
        RolloutOptions::default().validate().unwrap();
        for waves in [vec![], vec![10, 5, 100], vec![10, 50], vec![0, 100]] {
            let o = RolloutOptions {
                waves,
                ..RolloutOptions::default()
            };
            assert!(
                o.validate()
                    .unwrap_err()
                    .to_string()
                    .starts_with("rollout_waves")
            );
        }
        let end = RolloutStatus {
            finished_ms: Some(10_500),
            ..RolloutStatus::start(Vec::new(), 0).0
        };
        let w = wave_reports(
            &[(0, 1, 1_000), (1, 9, 3_200)],
            &end,
            Duration::from_secs(2),
        );
        assert_eq!(w.len(), 2);
        assert!((w[0].seconds - 2.2).abs() < 1e-9 && (w[0].overhead_seconds - 0.2).abs() < 1e-9);
        assert!((w[1].seconds - 7.3).abs() < 1e-9);
        assert!(
            (tick_seconds("a 1\nedgefleet_hub_rollout_tick_seconds 0.25\n") - 0.25).abs() < 1e-12
        );
    }
}
