//! A simulated fleet around the pure planner: nodes answer deliveries
//! (acknowledge, then apply), health checks (bad nodes are unhealthy) and
//! rollbacks, one step of virtual time at a time.

#![allow(dead_code, reason = "each test file uses part of the harness")]

use std::collections::{BTreeMap, BTreeSet};

use protocols::control::{
    Action, HealthVerdict, NodeProgress, NodeRolloutState, NodeView, Observation, RolloutPhase,
    RolloutProgress, RolloutSpec, RolloutStatus, observe, tick,
};

/// Virtual time per step.
pub const STEP_MS: u64 = 1_000;

/// The revision every node was healthy on before the rollout.
pub const OLD_REVISION: u64 = 6;

#[derive(Debug)]
pub struct Fleet {
    pub spec: RolloutSpec,
    pub status: RolloutStatus,
    pub progress: RolloutProgress,
    pub views: BTreeMap<String, NodeView>,
    /// Nodes that fail their health gate.
    pub bad: BTreeSet<String>,
    /// Nodes that are online but never answer a delivery.
    pub silent: BTreeSet<String>,
    pub now: u64,
    /// Every action the planner emitted, with its time.
    pub log: Vec<(u64, Action)>,
    pub max_in_flight: u32,
    queue: Vec<(u64, Observation)>,
}

pub fn name(i: usize) -> String {
    format!("n{i:03}")
}

impl Fleet {
    pub fn new(spec: RolloutSpec, nodes: usize) -> Self {
        let names: Vec<String> = (0..nodes).map(name).collect();
        let (status, progress) =
            RolloutStatus::start(names.iter().map(|n| (n.clone(), Some(OLD_REVISION))), 0);
        let views = names
            .iter()
            .map(|n| {
                let v = NodeView {
                    name: n.clone(),
                    connected: true,
                    ..NodeView::default()
                };
                (n.clone(), v)
            })
            .collect();
        Self {
            spec,
            status,
            progress,
            views,
            bad: BTreeSet::new(),
            silent: BTreeSet::new(),
            now: 0,
            log: Vec::new(),
            max_in_flight: 0,
            queue: Vec::new(),
        }
    }

    pub fn set_connected(&mut self, node: &str, connected: bool) {
        self.views.get_mut(node).unwrap().connected = connected;
        let o = if connected {
            Observation::Online {
                node: node.to_owned(),
            }
        } else {
            // A node that goes away answers nothing it had queued.
            self.queue.retain(|(_, o)| !mentions(o, node));
            Observation::Offline {
                node: node.to_owned(),
            }
        };
        observe(
            &self.spec,
            &mut self.status,
            &mut self.progress,
            &o,
            self.now,
        );
    }

    pub fn step(&mut self) {
        self.now += STEP_MS;
        let due: Vec<Observation> = {
            let (due, later): (Vec<_>, Vec<_>) =
                self.queue.drain(..).partition(|(t, _)| *t <= self.now);
            self.queue = later;
            due.into_iter().map(|(_, o)| o).collect()
        };
        for o in &due {
            observe(
                &self.spec,
                &mut self.status,
                &mut self.progress,
                o,
                self.now,
            );
        }
        let actions = tick(
            &self.spec,
            &mut self.status,
            &mut self.progress,
            &self.views,
            self.now,
        );
        self.max_in_flight = self.max_in_flight.max(self.status.counts.in_flight);
        for a in actions {
            self.respond(&a);
            self.log.push((self.now, a));
        }
    }

    fn respond(&mut self, a: &Action) {
        let now = self.now;
        match a {
            Action::Deliver { node, .. }
                if self.views[node].connected && !self.silent.contains(node) =>
            {
                self.queue
                    .push((now + STEP_MS, Observation::Acked { node: node.clone() }));
                self.queue.push((
                    now + 2 * STEP_MS,
                    Observation::Applied { node: node.clone() },
                ));
            }
            Action::JudgeHealth { node } => {
                let verdict = if self.bad.contains(node) {
                    HealthVerdict::Unhealthy {
                        reason: "function \"f\" restarted 3 times during the bake".into(),
                    }
                } else {
                    HealthVerdict::Healthy
                };
                let o = Observation::Health {
                    node: node.clone(),
                    verdict,
                };
                observe(&self.spec, &mut self.status, &mut self.progress, &o, now);
            }
            Action::RollBack { node, .. } if self.views[node].connected => {
                self.queue.push((
                    now + STEP_MS,
                    Observation::RolledBack { node: node.clone() },
                ));
            }
            _ => {}
        }
    }

    /// Steps until the phase is one of `phases` (or `max` steps passed).
    pub fn run_until(&mut self, phases: &[RolloutPhase], max: usize) {
        for _ in 0..max {
            if phases.contains(&self.status.phase) && self.queue.is_empty() {
                return;
            }
            self.step();
        }
        panic!(
            "still {:?} after {max} steps: {:?}",
            self.status.phase, self.status.counts
        );
    }

    pub fn node(&self, n: &str) -> &NodeProgress {
        &self.progress[n]
    }

    pub fn in_state(&self, s: NodeRolloutState) -> usize {
        self.progress.values().filter(|p| p.state == s).count()
    }

    pub fn waves(&self) -> Vec<(u32, u32)> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::AdvanceWave { wave, size } => Some((*wave, *size)),
                _ => None,
            })
            .collect()
    }

    pub fn delivered_to(&self) -> BTreeSet<String> {
        self.log
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Deliver { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect()
    }
}

fn mentions(o: &Observation, node: &str) -> bool {
    match o {
        Observation::Acked { node: n }
        | Observation::Applied { node: n }
        | Observation::ApplyFailed { node: n, .. }
        | Observation::Health { node: n, .. }
        | Observation::Offline { node: n }
        | Observation::Online { node: n }
        | Observation::RolledBack { node: n } => n == node,
    }
}

pub fn spec(json: &str) -> RolloutSpec {
    let s: RolloutSpec = serde_json::from_str(json).unwrap();
    s.validate().unwrap();
    s
}
