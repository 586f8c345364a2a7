//! The fault plan: a scenario's faults as a timeline of actions.

use std::time::Duration;

use crate::proxy::LinkMode;
use crate::scenario::{Fault, PartitionClock, PartitionMode, Protocol, Scenario};

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
                let m = match mode {
                    PartitionMode::Cut => LinkMode::Cut,
                    PartitionMode::Blackhole => LinkMode::Blackhole,
                };
                t.push((
                    at,
                    Action::Link {
                        node,
                        mode: m,
                        outage: true,
                    },
                ));
                t.push((
                    at + duration,
                    Action::Link {
                        node,
                        mode: LinkMode::Pass,
                        outage: true,
                    },
                ));
            }
            Fault::Latency {
                at,
                duration,
                node,
                delay,
            } => {
                t.push((
                    at,
                    Action::Link {
                        node,
                        mode: LinkMode::Delay(delay),
                        outage: false,
                    },
                ));
                t.push((
                    at + duration,
                    Action::Link {
                        node,
                        mode: LinkMode::Pass,
                        outage: false,
                    },
                ));
            }
            Fault::BrokerRestart { at, down } => {
                t.push((at, Action::HubDown));
                t.push((at + down, Action::HubUp));
            }
            Fault::KillNode { at, node, down } => {
                t.push((at, Action::AgentDown(node)));
                t.push((at + down, Action::AgentUp(node)));
            }
            Fault::DevicesDown {
                at,
                duration,
                node,
                protocol,
                server,
            } => {
                t.push((
                    at,
                    Action::Devices {
                        node,
                        protocol,
                        server,
                        up: false,
                    },
                ));
                t.push((
                    at + duration,
                    Action::Devices {
                        node,
                        protocol,
                        server,
                        up: true,
                    },
                ));
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
