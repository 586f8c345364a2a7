//! Property tests of the control plane: the planner's rules under any
//! sequence of events, wave partitions, the merge and the selector.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use protocols::control::{
    AbortCriterion, Action, Command, Deployment, FailureKind, HealthGate, HealthVerdict,
    LabelSelector, NodeRolloutState as S, NodeView, Observation, OfflinePolicy, OnAbort,
    RolloutPhase as P, RolloutProgress, RolloutSpec, RolloutStatus, SelectorOperator,
    SelectorRequirement, Strategy as RolloutStrategy, WaveSize, command, observe, plan, render,
    tick, wave_sizes,
};

fn arb_waves() -> impl Strategy<Value = Vec<WaveSize>> {
    prop_oneof![
        prop::collection::btree_set(1u8..=100, 1..5)
            .prop_map(|s| s.into_iter().map(WaveSize::Percent).collect()),
        prop::collection::btree_set(1u32..30, 1..5)
            .prop_map(|s| s.into_iter().map(WaveSize::Count).collect()),
    ]
}

fn arb_strategy() -> impl Strategy<Value = RolloutStrategy> {
    prop_oneof![
        arb_waves().prop_map(|waves| RolloutStrategy::Waves { waves }),
        (1u32..4, 11u32..40, 0u32..5, 0u32..8).prop_map(|(base, f, after, extra)| {
            RolloutStrategy::Exponential {
                base,
                factor: f64::from(f) / 10.0,
                after_succeeded: after,
                max: base + extra,
            }
        }),
    ]
}

fn arb_spec() -> impl Strategy<Value = RolloutSpec> {
    (
        arb_strategy(),
        1u32..6,
        (1_000u64..8_000, 1_000u64..8_000, 0u64..4_000, 0u8..60),
        prop::collection::vec((prop::option::of(0usize..4), 1u8..=100, 1u32..6), 0..3),
        any::<bool>(),
        prop_oneof![
            Just(OfflinePolicy::Skip),
            Just(OfflinePolicy::Fail),
            (1_000u64..20_000).prop_map(|max_ms| OfflinePolicy::Wait { max_ms }),
        ],
    )
        .prop_map(
            |(
                strategy,
                max_concurrent,
                (node_timeout_ms, ack_timeout_ms, bake_ms, tol),
                abort,
                halt,
                offline,
            )| {
                let kinds = [
                    FailureKind::ApplyFailed,
                    FailureKind::ApplyTimeout,
                    FailureKind::Unhealthy,
                    FailureKind::Offline,
                ];
                RolloutSpec {
                    deployment: "d".into(),
                    revision: 9,
                    strategy,
                    max_concurrent,
                    node_timeout_ms,
                    ack_timeout_ms,
                    health: HealthGate {
                        bake_ms,
                        max_failed_percent: tol,
                        ..HealthGate::default()
                    },
                    abort: abort
                        .into_iter()
                        .map(|(k, threshold_percent, min_executed)| AbortCriterion {
                            kind: k.map(|i| kinds[i]),
                            threshold_percent,
                            min_executed,
                        })
                        .collect(),
                    on_abort: if halt {
                        OnAbort::Halt
                    } else {
                        OnAbort::Rollback
                    },
                    offline,
                }
            },
        )
}

#[derive(Debug, Clone)]
enum Event {
    Tick(u64),
    /// The node answers what it is waiting for (good or bad health).
    Respond(usize, bool),
    Raw(usize, u8),
    Connect(usize, bool),
    Pause(usize, bool),
    Cmd(u8),
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0u64..3_000).prop_map(Event::Tick),
        8 => (0usize..32, prop::bool::weighted(0.8)).prop_map(|(n, g)| Event::Respond(n, g)),
        2 => (0usize..32, 0u8..7).prop_map(|(n, k)| Event::Raw(n, k)),
        2 => (0usize..32, any::<bool>()).prop_map(|(n, c)| Event::Connect(n, c)),
        1 => (0usize..32, any::<bool>()).prop_map(|(n, p)| Event::Pause(n, p)),
        1 => (0u8..8).prop_map(Event::Cmd),
    ]
}

struct World {
    spec: RolloutSpec,
    status: RolloutStatus,
    progress: RolloutProgress,
    views: BTreeMap<String, NodeView>,
    rollback_to: BTreeMap<String, Option<u64>>,
    names: Vec<String>,
    now: u64,
}

impl World {
    fn new(spec: RolloutSpec, n: usize, connected: &[bool]) -> Self {
        let names: Vec<String> = (0..n).map(|i| format!("n{i:02}")).collect();
        let rollback_to: BTreeMap<String, Option<u64>> = names
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), (i % 7 != 3).then_some(i as u64 % 5 + 1)))
            .collect();
        let (status, progress) = RolloutStatus::start(rollback_to.clone(), 0);
        let views = names
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = NodeView {
                    name: s.clone(),
                    connected: connected.get(i).copied().unwrap_or(true),
                    ..NodeView::default()
                };
                (s.clone(), v)
            })
            .collect();
        Self {
            spec,
            status,
            progress,
            views,
            rollback_to,
            names,
            now: 0,
        }
    }

    fn name(&self, i: usize) -> Option<String> {
        (!self.names.is_empty()).then(|| self.names[i % self.names.len()].clone())
    }

    fn observe(&mut self, o: &Observation) {
        observe(
            &self.spec,
            &mut self.status,
            &mut self.progress,
            o,
            self.now,
        );
    }

    fn respond(&mut self, node: String, good: bool) {
        let o = match self.progress[&node].state {
            S::Delivering => Observation::Acked { node },
            S::Applying => Observation::Applied { node },
            S::Baking => Observation::Health {
                node,
                verdict: if good {
                    HealthVerdict::Healthy
                } else {
                    HealthVerdict::Unhealthy {
                        reason: "trap".into(),
                    }
                },
            },
            S::RollingBack => Observation::RolledBack { node },
            _ => return,
        };
        self.observe(&o);
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::Tick(dt) => {
                self.now += dt;
                self.checked_tick();
            }
            Event::Respond(i, g) => {
                if let Some(n) = self.name(*i) {
                    self.respond(n, *g);
                }
            }
            Event::Raw(i, k) => {
                if let Some(node) = self.name(*i) {
                    let o = match k {
                        0 => Observation::Acked { node },
                        1 => Observation::Applied { node },
                        2 => Observation::ApplyFailed {
                            node,
                            reason: "refused".into(),
                        },
                        3 => Observation::Health {
                            node,
                            verdict: HealthVerdict::Healthy,
                        },
                        4 => Observation::Offline { node },
                        5 => Observation::Online { node },
                        _ => Observation::RolledBack { node },
                    };
                    self.observe(&o);
                }
            }
            Event::Connect(i, c) => {
                if let Some(node) = self.name(*i) {
                    self.views.get_mut(&node).unwrap().connected = *c;
                    let o = if *c {
                        Observation::Online { node }
                    } else {
                        Observation::Offline { node }
                    };
                    self.observe(&o);
                }
            }
            Event::Pause(i, p) => {
                if let Some(node) = self.name(*i) {
                    self.views.get_mut(&node).unwrap().paused = *p;
                }
            }
            Event::Cmd(c) => {
                let cmd = match c {
                    0 | 1 => Command::Pause,
                    2..=4 => Command::Resume,
                    5 => Command::Supersede { by: "r2".into() },
                    _ => Command::Cancel,
                };
                let _ = command(&mut self.status, &cmd, self.now);
            }
        }
        self.check_state();
        self.check_reload();
    }

    fn check_state(&self) {
        let c = self.status.counts;
        assert_eq!(c, RolloutStatus::recount(&self.progress), "counts drifted");
        assert!(
            c.in_flight <= self.spec.max_concurrent,
            "{} in flight",
            c.in_flight
        );
        if self.spec.offline != OfflinePolicy::Fail {
            assert_eq!(c.failed_by_kind.offline, 0, "offline counted as failed");
        }
        assert_eq!(self.status.failures.len(), (c.failed as usize).min(20));
    }

    /// What the hub persists reloads to the same state (restart-safe).
    fn check_reload(&self) {
        let status: RolloutStatus =
            serde_json::from_str(&serde_json::to_string(&self.status).unwrap()).unwrap();
        let progress: RolloutProgress =
            serde_json::from_str(&serde_json::to_string(&self.progress).unwrap()).unwrap();
        assert_eq!((&status, &progress), (&self.status, &self.progress));
    }

    fn checked_tick(&mut self) {
        let before = (self.status.clone(), self.progress.clone());
        let actions = plan(
            &self.spec,
            &self.status,
            &self.progress,
            &self.views,
            self.now,
        );
        check_actions(
            &self.spec,
            &before.0,
            &before.1,
            &self.views,
            &self.rollback_to,
            &actions,
            self.now,
        );
        let again = tick(
            &self.spec,
            &mut self.status,
            &mut self.progress,
            &self.views,
            self.now,
        );
        assert_eq!(actions, again, "plan is a pure function");
        self.check_state();
    }
}

fn check_actions(
    spec: &RolloutSpec,
    status: &RolloutStatus,
    progress: &RolloutProgress,
    views: &BTreeMap<String, NodeView>,
    rollback_to: &BTreeMap<String, Option<u64>>,
    actions: &[Action],
    now: u64,
) {
    match status.phase {
        P::Paused | P::Cancelled | P::Superseded | P::Failed | P::Succeeded => {
            assert!(actions.is_empty(), "{:?} emitted {actions:?}", status.phase);
        }
        P::RolledBack => assert!(actions.iter().all(|a| matches!(a, Action::RollBack { .. }))),
        P::Progressing | P::SucceededWithSkipped => {}
    }
    let delivers = actions
        .iter()
        .filter(|a| matches!(a, Action::Deliver { .. }))
        .count() as u32;
    assert!(status.counts.in_flight + delivers <= spec.max_concurrent);
    for a in actions {
        match a {
            Action::Deliver { node, revision } => {
                assert_eq!(*revision, spec.revision);
                assert!(
                    views[node].connected && !views[node].paused,
                    "deliver to unreachable {node}"
                );
            }
            Action::RollBack { node, to_revision } => {
                assert_eq!(
                    Some(*to_revision),
                    rollback_to[node],
                    "rollback target of {node}"
                );
                assert!(
                    progress[node].delivered_ms.is_some(),
                    "rollback of a node never reached"
                );
            }
            Action::MarkFailed { node, kind, .. } => match kind {
                FailureKind::ApplyTimeout => {
                    let acked = progress[node].acked_ms.expect("timeout without an ack");
                    assert!(now - acked > spec.node_timeout_ms);
                }
                FailureKind::Offline => assert_eq!(spec.offline, OfflinePolicy::Fail),
                other => panic!("the planner never decides {other:?}"),
            },
            Action::AdvanceWave { wave, size } => {
                assert!(*size >= 1);
                assert!(actions.iter().all(|b| !matches!(b, Action::Abort { .. })));
                if let Some(k) = status.current_wave {
                    assert!(*wave > k);
                    let in_wave: Vec<_> = progress.values().filter(|p| p.wave == Some(k)).collect();
                    assert!(
                        in_wave.iter().all(|p| p.state.settled()),
                        "advanced past an unsettled wave"
                    );
                    let failed = in_wave.iter().filter(|p| p.failure.is_some()).count() as u64;
                    let ran =
                        failed + in_wave.iter().filter(|p| p.state == S::Healthy).count() as u64;
                    assert!(
                        failed * 100 <= u64::from(spec.health.max_failed_percent) * ran,
                        "advanced past a failed gate"
                    );
                }
            }
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn planner_rules_hold_under_any_events(
        spec in arb_spec(),
        n in 0usize..25,
        connected in prop::collection::vec(prop::bool::weighted(0.8), 25),
        events in prop::collection::vec(arb_event(), 0..250),
    ) {
        let mut w = World::new(spec, n, &connected);
        let mut stopped = false;
        for e in &events {
            let was = w.status.phase;
            w.event(e);
            if matches!(was, P::Cancelled | P::Superseded) {
                stopped = true;
            }
            if stopped {
                prop_assert!(matches!(w.status.phase, P::Cancelled | P::Superseded));
            }
        }
        // Every node that got a wave got exactly one, and waves fill in order.
        let mut waves: Vec<u32> = w.progress.values().filter_map(|p| p.wave).collect();
        waves.sort_unstable();
        if let RolloutStrategy::Waves { waves: ws } = &w.spec.strategy {
            let plan = wave_sizes(ws, n as u32);
            let mut expected = Vec::new();
            for (i, s) in plan.iter().take_while(|(i, _)| w.status.current_wave.is_some_and(|k| *i <= k)) {
                expected.extend(std::iter::repeat_n(*i, *s as usize));
            }
            prop_assert_eq!(waves, expected);
        }
    }

    #[test]
    fn a_healthy_connected_fleet_always_succeeds(spec in arb_spec(), n in 0usize..30) {
        let mut w = World::new(spec, n, &[]);
        for step in 0..5_000 {
            if w.status.phase == P::Succeeded {
                break;
            }
            prop_assert!(step < 4_999, "stuck {:?} {:?}", w.status.phase, w.status.counts);
            w.now += 500;
            w.checked_tick();
            for i in 0..n {
                let node = w.names[i].clone();
                w.respond(node, true);
            }
        }
        prop_assert_eq!(w.status.counts.healthy, n as u32);
        prop_assert!(w.progress.values().all(|p| p.wave.is_some()));
    }

    #[test]
    fn no_rollout_gets_stuck_on_offline_silent_or_bad_nodes(
        spec in arb_spec(),
        n in 1usize..25,
        kinds in prop::collection::vec(0u8..6, 25),
    ) {
        // 0: offline, 1: online but silent, 2: unhealthy, else good.
        let connected: Vec<bool> = kinds.iter().map(|k| *k != 0).collect();
        let mut w = World::new(spec, n, &connected);
        let settled = [P::Succeeded, P::SucceededWithSkipped, P::Failed, P::RolledBack];
        let mut steps = 0;
        while !settled.contains(&w.status.phase) {
            prop_assert!(steps < 10_000, "stuck {:?} {:?}", w.status.phase, w.status.counts);
            steps += 1;
            w.now += 500;
            w.checked_tick();
            for (i, kind) in kinds.iter().enumerate().take(n) {
                if *kind != 1 {
                    let node = w.names[i].clone();
                    w.respond(node, *kind != 2);
                }
            }
        }
    }

    #[test]
    fn waves_partition_every_node_and_the_last_is_100_percent(waves in arb_waves(), n in 0u32..500) {
        let plan = wave_sizes(&waves, n);
        prop_assert_eq!(plan.iter().map(|(_, s)| *s).sum::<u32>(), n);
        prop_assert!(plan.iter().all(|(_, s)| *s >= 1));
        prop_assert!(plan.windows(2).all(|w| w[0].0 < w[1].0));
        prop_assert!(plan.last().is_none_or(|(i, _)| *i as usize <= waves.len()));
        let mut reached = 0;
        for (i, s) in &plan {
            reached += s;
            if (*i as usize) < waves.len() {
                let want = waves[..=*i as usize].iter().map(|w| w.resolve(n)).max().unwrap();
                prop_assert_eq!(reached, want, "wave {} is its cumulative target", i);
            }
        }
    }
}

fn arb_deployments() -> impl Strategy<Value = Vec<Deployment>> {
    let item = (0usize..4, 0u8..3);
    prop::collection::vec(
        (
            0i32..3,
            prop::option::of(0usize..2),
            prop::collection::vec(item, 0..4),
        ),
        0..5,
    )
    .prop_map(|ds| {
        ds.into_iter()
            .enumerate()
            .map(|(i, (priority, site, items))| {
                let mut seen = std::collections::BTreeSet::new();
                let functions: Vec<serde_json::Value> = items
                    .into_iter()
                    .filter(|(f, _)| seen.insert(*f))
                    .map(|(f, v)| {
                        serde_json::json!({"name": format!("f{f}"),
                            "module_sha256": char::from(b'a' + v).to_string().repeat(64),
                            "module_size": 1, "inputs": [], "outputs": ["out"]})
                    })
                    .collect();
                let selector = match site {
                    Some(s) => {
                        let site = ["a", "b"][s];
                        serde_json::json!({"match_labels": {"site": site}})
                    }
                    None => serde_json::json!({}),
                };
                serde_json::from_value(
                    serde_json::json!({"name": format!("d{i}"), "priority": priority,
                        "selector": selector, "template": {"functions": functions}}),
                )
                .unwrap()
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn merge_is_order_independent_and_the_highest_priority_wins(
        ds in arb_deployments(),
        site in 0usize..2,
        rotate in 0usize..5,
    ) {
        let node = protocols::control::Node {
            name: "n".into(),
            labels: BTreeMap::from([("site".to_owned(), ["a", "b"][site].to_owned())]),
            ..Default::default()
        };
        let mut other = ds.clone();
        other.reverse();
        if !other.is_empty() {
            let k = rotate % other.len();
            other.rotate_left(k);
        }
        let a = render(&node, &ds);
        let b = render(&node, &other);
        match (&a, &b) {
            (Ok(x), Ok(y)) => prop_assert_eq!(x.digest(), y.digest()),
            (Err(x), Err(y)) => prop_assert_eq!(x, y),
            _ => prop_assert!(false, "{:?} vs {:?}", a, b),
        }
        let selecting: Vec<&Deployment> = ds.iter().filter(|d| d.selector.matches(&node.labels).unwrap()).collect();
        for f in 0..4 {
            let name = format!("f{f}");
            let givers: Vec<&&Deployment> = selecting.iter().filter(|d| d.template.functions.iter().any(|x| x.name == name)).collect();
            let top = givers.iter().map(|d| d.priority).max();
            let at_top = givers.iter().filter(|d| Some(d.priority) == top).count();
            match &a {
                Ok(r) => {
                    prop_assert!(at_top <= 1, "{} at the top twice but rendered", name);
                    let src = r.sources.get(&format!("functions/{name}"));
                    prop_assert_eq!(src.is_some(), at_top == 1);
                    if let Some(src) = src {
                        let d = ds.iter().find(|d| &d.name == src).unwrap();
                        prop_assert_eq!(Some(d.priority), top);
                    }
                }
                Err(protocols::control::RenderError::Conflict(c)) => {
                    if c.item == name {
                        prop_assert!(at_top >= 2);
                        prop_assert_eq!(Some(c.priority), top);
                    }
                }
                Err(e) => prop_assert!(false, "unexpected {}", e),
            }
        }
    }

    #[test]
    fn selector_operators_are_consistent(
        key in "[a-c]",
        values in prop::collection::vec("[x-z]", 1..3),
        labels in prop::collection::btree_map("[a-c]", "[x-z]", 0..3),
    ) {
        let sel = |operator: SelectorOperator, values: &[String]| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![SelectorRequirement { key: key.clone(), operator, values: values.to_vec() }],
        };
        let m = |s: LabelSelector| s.compile().unwrap().matches(&labels);
        let present = labels.contains_key(&key);
        prop_assert_eq!(m(sel(SelectorOperator::In, &values)), present && !m(sel(SelectorOperator::NotIn, &values)));
        prop_assert_eq!(m(sel(SelectorOperator::Exists, &[])), !m(sel(SelectorOperator::DoesNotExist, &[])));
        prop_assert_eq!(m(sel(SelectorOperator::Exists, &[])), present);
        let one = LabelSelector::match_labels([(key.clone(), values[0].clone())]);
        prop_assert_eq!(m(one), m(sel(SelectorOperator::In, &values[..1])));
    }
}
