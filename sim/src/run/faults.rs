//! The live phase and its fault plan: a scenario's faults as a [`timeline`]
//! of [`Action`]s, [`RunState::execute`] for one action, the outage and
//! drain accounting ([`Outages`]), and the loop that runs them while the
//! devices serve ([`RunState::live`]).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

use super::{Restart, RunState, SUBSCRIBE_GRACE, lock, now_ms};
use crate::proxy::LinkMode;
use crate::scenario::{Fault, PartitionClock, PartitionMode, Protocol, Scenario};
use crate::virtual_time::Outage;

/// One step of the fault timeline.
#[derive(Debug, Clone)]
pub(super) enum Action {
    Link {
        node: usize,
        mode: LinkMode,
        outage: bool,
    },
    HubDown,
    HubUp,
    AgentDown(usize),
    AgentUp(usize),
    Devices {
        node: usize,
        protocol: Protocol,
        server: Option<usize>,
        up: bool,
    },
    Redeploy {
        function: String,
        config: String,
    },
    /// Cut `node`'s link and let `duration` pass on its paused clock; the
    /// link heals when the virtual time has passed.
    VirtualOutage {
        node: usize,
        duration: Duration,
    },
}

/// The fault plan of `s` as actions in time order (a fault with a duration
/// is two actions: its start and its end).
pub(super) fn timeline(s: &Scenario) -> Vec<(Duration, Action)> {
    let mut t = Vec::new();
    for f in &s.faults {
        match f.clone() {
            Fault::Partition {
                at,
                duration,
                node,
                clock: PartitionClock::Virtual,
                ..
            } => t.push((at, Action::VirtualOutage { node, duration })),
            Fault::Partition {
                at,
                duration,
                node,
                mode,
                clock: PartitionClock::Real,
            } => {
                let mode = match mode {
                    PartitionMode::Cut => LinkMode::Cut,
                    PartitionMode::Blackhole => LinkMode::Blackhole,
                };
                let link = |mode| Action::Link {
                    node,
                    mode,
                    outage: true,
                };
                window(&mut t, at, duration, link(mode), link(LinkMode::Pass));
            }
            Fault::Latency {
                at,
                duration,
                node,
                delay,
            } => {
                let link = |mode| Action::Link {
                    node,
                    mode,
                    outage: false,
                };
                window(
                    &mut t,
                    at,
                    duration,
                    link(LinkMode::Delay(delay)),
                    link(LinkMode::Pass),
                );
            }
            Fault::BrokerRestart { at, down } => {
                window(&mut t, at, down, Action::HubDown, Action::HubUp);
            }
            Fault::KillNode { at, node, down } => {
                window(
                    &mut t,
                    at,
                    down,
                    Action::AgentDown(node),
                    Action::AgentUp(node),
                );
            }
            Fault::DevicesDown {
                at,
                duration,
                node,
                protocol,
                server,
            } => {
                let devices = |up| Action::Devices {
                    node,
                    protocol,
                    server,
                    up,
                };
                window(&mut t, at, duration, devices(false), devices(true));
            }
            Fault::Redeploy {
                at,
                function,
                config,
                ..
            } => t.push((at, Action::Redeploy { function, config })),
        }
    }
    t.sort_by_key(|(at, _)| *at);
    t
}

/// A fault that lasts `len`: `start` at `at`, `end` when it is over.
fn window(
    t: &mut Vec<(Duration, Action)>,
    at: Duration,
    len: Duration,
    start: Action,
    end: Action,
) {
    t.push((at, start));
    t.push((at + len, end));
}

/// Outages (link cuts, hub down, virtual-time partitions) and the drains
/// after them.
#[derive(Default)]
pub(super) struct Outages {
    /// Open outages by key (`link{node}`, `hub`) → since when.
    pub(super) since: HashMap<String, Instant>,
    /// Total outage time (virtual time for virtual-time partitions).
    pub(super) total: Duration,
    /// Ends of outages whose drain is not over yet: (instant, wall ms).
    pub(super) drain_watch: Vec<(Instant, u64)>,
    /// Longest drain after an outage, seconds.
    pub(super) drain_max: f64,
    pub(super) had_outage: bool,
    /// Virtual-time outages in progress.
    pub(super) running_virtual: Vec<(usize, Outage)>,
    /// Wall time finished virtual-time outages took.
    pub(super) virtual_wall: Duration,
}

impl Outages {
    fn begin(&mut self, key: String) {
        self.since.entry(key).or_insert_with(Instant::now);
    }

    /// Ends the outage `key` if one is open: its time counts, its drain
    /// begins.
    fn end(&mut self, key: &str) {
        if let Some(since) = self.since.remove(key) {
            self.total += since.elapsed();
            self.ended();
        }
    }

    fn ended(&mut self) {
        self.had_outage = true;
        self.drain_watch.push((Instant::now(), now_ms()));
    }

    /// The report's `drain_seconds`: the longest drain after an outage
    /// (drains still open count up to now), else the final drain.
    pub(super) fn drain_seconds(&mut self, final_drain: f64) -> f64 {
        for (end, _) in &self.drain_watch {
            self.drain_max = self.drain_max.max(end.elapsed().as_secs_f64());
        }
        if self.had_outage {
            self.drain_max
        } else {
            final_drain
        }
    }
}

/// What the live phase measured.
pub(super) struct Live {
    /// Wall ms by which every OPC UA and MQTT subscription had to be active.
    pub(super) subscribed_by_ms: u64,
    /// Device time of the run, seconds.
    pub(super) device_seconds: f64,
}

impl RunState {
    /// Phase 4: lets the devices run for the scenario's `duration` (plus the
    /// wall time virtual outages took) while the fault plan executes; the
    /// remaining healing steps run at the end.
    pub(super) async fn live(&mut self) -> anyhow::Result<Live> {
        let live = Instant::now();
        // By then every subscription (OPC UA, MQTT) must be active: values
        // served later count against the agent even if it stored none at all.
        let subscribed_by_ms = now_ms() + SUBSCRIBE_GRACE.as_millis() as u64;
        let steps = timeline(&self.s);
        let mut next = 0usize;
        let fresh_ms =
            (self.s.edge.batch_max_age + self.s.hub.ack_interval + self.s.edge.report_interval)
                .as_millis() as u64
                + 2_000;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // `duration` counts wall time outside virtual outages.
        let mut live_for = self.s.duration;
        loop {
            let elapsed = live.elapsed();
            let done = next >= steps.len();
            if elapsed >= live_for && done && self.outages.running_virtual.is_empty() {
                break;
            }
            if elapsed >= live_for {
                // Run the remaining (healing) steps now; wait for virtual outages.
                if done {
                    tick.tick().await;
                }
            } else if !done && steps[next].0 > elapsed {
                let wait = steps[next]
                    .0
                    .saturating_sub(elapsed)
                    .min(Duration::from_millis(500));
                tokio::select! {
                    _ = tick.tick() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            } else if done {
                tick.tick().await;
            }
            self.show_progress(live, live_for, fresh_ms);
            live_for += self.heal_virtual_outages(live).await?;
            while next < steps.len()
                && (steps[next].0 <= live.elapsed() || live.elapsed() >= live_for)
            {
                let (at, action) = steps[next].clone();
                next += 1;
                let t = live.elapsed().as_secs_f64();
                self.fault_log.push(format!(
                    "{t:>7.1}s (planned {:.1}s) {action:?}",
                    at.as_secs_f64()
                ));
                self.progress.println(format!("[{t:>6.1}s] {action:?}"));
                self.execute(action).await?;
            }
        }
        Ok(Live {
            subscribed_by_ms,
            device_seconds: live.elapsed().as_secs_f64(),
        })
    }

    /// Heals the links of virtual-time outages that ended; returns the wall
    /// time they took (the live phase is extended by it).
    async fn heal_virtual_outages(&mut self, live: Instant) -> anyhow::Result<Duration> {
        let mut took_total = Duration::ZERO;
        let mut k = 0;
        while k < self.outages.running_virtual.len() {
            if !self.outages.running_virtual[k].1.is_finished() {
                k += 1;
                continue;
            }
            let (node, o) = self.outages.running_virtual.remove(k);
            let virtual_for = o.duration();
            let took = o.finish().await?;
            let n = &mut self.nodes[node];
            if let Some(vn) = &n.vnode {
                n.clock_offset_ms = vn.clock_offset_ms().await?;
            }
            n.proxy.set_mode(LinkMode::Pass);
            self.outages.total += virtual_for;
            self.outages.virtual_wall += took;
            took_total += took;
            self.outages.ended();
            let t = live.elapsed().as_secs_f64();
            let line = format!(
                "{t:>7.1}s virtual outage of node {node} ended: {:.1} h virtual in {:.1} s wall; node clock now {:+.1} s from wall clock; link healed",
                virtual_for.as_secs_f64() / 3600.0,
                took.as_secs_f64(),
                n.clock_offset_ms as f64 / 1000.0
            );
            self.progress.println(&line);
            self.fault_log.push(line);
        }
        Ok(took_total)
    }

    /// Executes one step of the fault plan.
    pub(super) async fn execute(&mut self, action: Action) -> anyhow::Result<()> {
        match action {
            Action::Link { node, mode, outage } => {
                self.nodes[node].proxy.set_mode(mode);
                let key = format!("link{node}");
                if outage && mode != LinkMode::Pass {
                    self.outages.begin(key);
                } else {
                    self.outages.end(&key);
                }
            }
            Action::HubDown => {
                self.hub.kill().await?;
                *lock(&self.hub_pid) = None;
                self.outages.begin("hub".into());
            }
            Action::HubUp => {
                self.hub.restart().await?;
                *lock(&self.hub_pid) = self.hub.pid();
                self.outages.end("hub");
            }
            Action::AgentDown(node) => self.nodes[node].kill_agent().await?,
            Action::AgentUp(node) => {
                let lo_ms = now_ms();
                self.nodes[node].start_agent(&self.cancel).await?;
                self.restarts.push(Restart {
                    node,
                    lo_ms,
                    revision: None,
                });
            }
            Action::Devices {
                node,
                protocol,
                server,
                up,
            } => self.nodes[node].set_devices(protocol, server, up).await?,
            Action::VirtualOutage { node, duration } => {
                let n = &self.nodes[node];
                let vn = n
                    .vnode
                    .as_ref()
                    .with_context(|| format!("node {node} has no virtual-time runtime"))?;
                n.proxy.set_mode(LinkMode::Cut);
                self.outages
                    .running_virtual
                    .push((node, vn.begin_outage(duration)));
            }
            Action::Redeploy { function, config } => self.redeploy(function, config).await?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// chaos.toml has one fault of every real-time kind: each with a
    /// duration becomes a start and an end step, a re-deploy one step, all
    /// in time order.
    #[test]
    fn timeline_pairs_each_fault_with_its_end_in_time_order() {
        let s = Scenario::from_toml(include_str!("../../scenarios/chaos.toml"), "chaos.toml")
            .expect("chaos.toml parses");
        let t = timeline(&s);
        assert!(t.windows(2).all(|w| w[0].0 <= w[1].0), "{t:?}");
        let redeploys = s
            .faults
            .iter()
            .filter(|f| matches!(f, Fault::Redeploy { .. }))
            .count();
        assert!(redeploys > 0);
        assert_eq!(t.len(), 2 * s.faults.len() - redeploys, "{t:?}");
        let count = |p: fn(&Action) -> bool| t.iter().filter(|(_, a)| p(a)).count();
        assert_eq!(
            count(|a| matches!(a, Action::HubDown)),
            count(|a| matches!(a, Action::HubUp))
        );
        assert_eq!(
            count(|a| matches!(a, Action::AgentDown(_))),
            count(|a| matches!(a, Action::AgentUp(_)))
        );
        assert_eq!(
            count(|a| matches!(a, Action::Devices { up: false, .. })),
            count(|a| matches!(a, Action::Devices { up: true, .. }))
        );
        // A link fault ends by passing traffic again.
        let passes = count(|a| {
            matches!(
                a,
                Action::Link {
                    mode: LinkMode::Pass,
                    ..
                }
            )
        });
        let links = count(|a| matches!(a, Action::Link { .. }));
        assert!(links > 0 && 2 * passes == links, "{t:?}");
        // Every end comes after its start.
        for (i, (at, a)) in t.iter().enumerate() {
            if let Action::HubUp = a {
                assert!(
                    t[..i]
                        .iter()
                        .any(|(b, x)| matches!(x, Action::HubDown) && b <= at)
                );
            }
        }
    }
}
