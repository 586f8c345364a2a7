//! Whole rollouts through the pure planner, against a simulated fleet.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod control_fleet;

use control_fleet::{Fleet, OLD_REVISION, name, spec};
use protocols::control::{
    Action, Command, FailureKind, NodeRolloutState as S, RolloutPhase as P, RolloutProgress,
    RolloutStatus, command,
};

const THREE_WAVES: &str = r#"{"deployment":"press-filter","revision":7,
    "strategy":{"kind":"waves","waves":[{"percent":10},{"percent":50},{"percent":100}]},
    "max_concurrent":5,"health":{"bake_ms":10000}}"#;

#[test]
fn a_good_version_succeeds_in_three_waves() {
    let mut f = Fleet::new(spec(THREE_WAVES), 30);
    f.run_until(&[P::Succeeded], 2_000);
    assert_eq!(f.waves(), [(0, 3), (1, 12), (2, 15)]);
    assert_eq!(f.in_state(S::Healthy), 30);
    let c = f.status.counts;
    assert_eq!(
        (c.targeted, c.delivered, c.applied, c.healthy, c.failed),
        (30, 30, 30, 30, 0)
    );
    assert!(
        f.max_in_flight <= 5 && f.max_in_flight > 0,
        "{}",
        f.max_in_flight
    );
    assert!(f.status.failures.is_empty());
    assert!(f.status.finished_ms.is_some());
    // The first wave is the first three nodes by name.
    for i in 0..3 {
        assert_eq!(f.node(&name(i)).wave, Some(0));
    }
}

#[test]
fn a_bad_version_fails_the_first_gate_and_rolls_back_every_reached_node() {
    let mut f = Fleet::new(spec(THREE_WAVES), 30);
    f.bad = (0..30).map(name).collect();
    f.run_until(&[P::RolledBack], 2_000);
    for _ in 0..5 {
        f.step();
    }
    assert_eq!(f.waves(), [(0, 3)], "no wave after the failed gate");
    let reached = f.delivered_to();
    assert_eq!(reached, (0..3).map(name).collect());
    let rollbacks: Vec<(String, u64)> = f
        .log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::RollBack { node, to_revision } => Some((node.clone(), *to_revision)),
            _ => None,
        })
        .collect();
    assert_eq!(
        rollbacks,
        (0..3).map(|i| (name(i), OLD_REVISION)).collect::<Vec<_>>()
    );
    assert_eq!(f.in_state(S::RolledBack), 3);
    let c = f.status.counts;
    assert_eq!(
        (c.failed, c.rolled_back, c.failed_by_kind.unhealthy),
        (3, 3, 3)
    );
    assert!(
        f.status
            .reason
            .as_deref()
            .unwrap()
            .contains("wave 0 failed its gate")
    );
    assert_eq!(f.status.failures.len(), 3);
    assert!(f.status.failures[0].reason.contains("restarted 3 times"));
}

#[test]
fn offline_nodes_are_skipped_not_failed_and_caught_up_when_back() {
    let mut f = Fleet::new(spec(THREE_WAVES), 30);
    let offline: Vec<String> = (0..30).filter(|i| i % 5 == 2).map(name).collect();
    assert_eq!(offline.len(), 6);
    for n in &offline {
        f.set_connected(n, false);
    }
    f.run_until(&[P::SucceededWithSkipped], 2_000);
    let c = f.status.counts;
    assert_eq!((c.healthy, c.skipped, c.failed), (24, 6, 0));
    assert_eq!(f.waves(), [(0, 3), (1, 12), (2, 15)]);
    for n in &offline {
        assert_eq!(f.node(n).state, S::Skipped, "{n}");
        f.set_connected(n, true);
    }
    f.run_until(&[P::Succeeded], 2_000);
    assert_eq!(f.in_state(S::Healthy), 30);
    assert_eq!(f.status.counts.failed, 0);
}

#[test]
fn wait_policy_holds_the_wave_up_to_its_bound_then_skips() {
    let mut f = Fleet::new(
        spec(
            r#"{"deployment":"d","revision":7,"strategy":{"kind":"waves","waves":[{"count":2}]},
        "health":{"bake_ms":1000},"offline":{"policy":"wait","max_ms":60000}}"#,
        ),
        4,
    );
    f.set_connected(&name(0), false);
    f.set_connected(&name(1), false);
    for _ in 0..20 {
        f.step();
    }
    assert_eq!(f.status.current_wave, Some(0), "the wave waits");
    assert_eq!(f.status.counts.offline, 2);
    f.set_connected(&name(0), true);
    f.run_until(&[P::SucceededWithSkipped], 500);
    assert_eq!(f.node(&name(0)).state, S::Healthy);
    assert_eq!(f.node(&name(1)).state, S::Skipped);
    assert_eq!(f.status.counts.failed, 0);
    let skipped_at = f
        .log
        .iter()
        .find_map(|(t, a)| {
            matches!(a, Action::MarkSkipped { node, .. } if *node == name(1)).then_some(*t)
        })
        .unwrap();
    assert!(
        skipped_at > 60_000,
        "skipped only after max_ms: {skipped_at}"
    );
}

#[test]
fn fail_policy_counts_offline_nodes_as_failed() {
    let mut f = Fleet::new(
        spec(
            r#"{"deployment":"d","revision":7,"strategy":{"kind":"waves","waves":[{"count":4}]},
        "health":{"bake_ms":1000,"max_failed_percent":30},"offline":{"policy":"fail"},"on_abort":"halt"}"#,
        ),
        4,
    );
    f.set_connected(&name(3), false);
    f.run_until(&[P::Succeeded, P::SucceededWithSkipped], 500);
    assert_eq!(f.status.phase, P::Succeeded, "1 of 4 failed is within 30 %");
    assert_eq!(f.status.counts.failed_by_kind.offline, 1);
    assert_eq!(f.node(&name(3)).failure, Some(FailureKind::Offline));
}

#[test]
fn the_apply_timeout_starts_at_the_acknowledgement() {
    let mut f = Fleet::new(
        spec(
            r#"{"deployment":"d","revision":7,"strategy":{"kind":"waves","waves":[{"count":1}]},
        "node_timeout_ms":5000,"ack_timeout_ms":60000,"health":{"bake_ms":1000},"on_abort":"halt",
        "abort":[]}"#,
        ),
        1,
    );
    let n = name(0);
    // The node is connected but answers nothing for 30 s: not late yet,
    // because it has not acknowledged.
    f.views.get_mut(&n).unwrap().connected = true;
    let mut tries = 0;
    while f.delivered_to().is_empty() {
        f.step();
        tries += 1;
        assert!(tries < 10);
    }
    // Drop the simulated answers: the node stays silent.
    let silent = f.node(&n).clone();
    assert_eq!(silent.state, S::Delivering);
    let mut g = Fleet::new(f.spec.clone(), 1);
    g.status = f.status.clone();
    g.progress = f.progress.clone();
    g.now = f.now;
    for _ in 0..30 {
        g.now += 1_000;
        let actions =
            protocols::control::tick(&g.spec, &mut g.status, &mut g.progress, &g.views, g.now);
        assert!(
            actions
                .iter()
                .all(|a| !matches!(a, Action::MarkFailed { .. })),
            "{actions:?}"
        );
    }
    let acked_at = g.now;
    protocols::control::observe(
        &g.spec,
        &mut g.status,
        &mut g.progress,
        &protocols::control::Observation::Acked { node: n.clone() },
        acked_at,
    );
    let mut failed_at = None;
    for _ in 0..10 {
        g.now += 1_000;
        let actions =
            protocols::control::tick(&g.spec, &mut g.status, &mut g.progress, &g.views, g.now);
        if actions.iter().any(|a| {
            matches!(
                a,
                Action::MarkFailed {
                    kind: FailureKind::ApplyTimeout,
                    ..
                }
            )
        }) {
            failed_at = Some(g.now);
            break;
        }
    }
    assert_eq!(
        failed_at,
        Some(acked_at + 6_000),
        "first tick more than 5 s after the ack"
    );
}

#[test]
fn cancel_is_always_accepted_and_stops_deliveries() {
    let mut f = Fleet::new(spec(THREE_WAVES), 30);
    for _ in 0..30 {
        f.step();
    }
    assert!(command(&mut f.status, &Command::Cancel, f.now).unwrap());
    let before = f.log.len();
    for _ in 0..200 {
        f.step();
    }
    assert!(
        f.log[before..]
            .iter()
            .all(|(_, a)| !matches!(a, Action::Deliver { .. }))
    );
    assert_eq!(f.status.phase, P::Cancelled);
    assert!(
        !command(&mut f.status, &Command::Cancel, f.now).unwrap(),
        "cancel again: accepted, no change"
    );
    assert!(command(&mut f.status, &Command::Pause, f.now).is_err());
}

#[test]
fn pause_emits_nothing_and_resume_continues() {
    let mut f = Fleet::new(spec(THREE_WAVES), 30);
    for _ in 0..20 {
        f.step();
    }
    command(&mut f.status, &Command::Pause, f.now).unwrap();
    let before = f.log.len();
    for _ in 0..100 {
        f.step();
    }
    assert_eq!(f.log.len(), before, "{:?}", &f.log[before..]);
    command(&mut f.status, &Command::Resume, f.now).unwrap();
    f.run_until(&[P::Succeeded], 2_000);
}

#[test]
fn a_restarted_hub_resumes_from_its_persisted_state() {
    let mut f = Fleet::new(spec(THREE_WAVES), 30);
    for _ in 0..60 {
        f.step();
    }
    // Persist and reload, as the hub does after every apply/observe.
    let status: RolloutStatus =
        serde_json::from_str(&serde_json::to_string(&f.status).unwrap()).unwrap();
    let progress: RolloutProgress =
        serde_json::from_str(&serde_json::to_string(&f.progress).unwrap()).unwrap();
    assert_eq!((&status, &progress), (&f.status, &f.progress));
    f.status = status;
    f.progress = progress;
    f.run_until(&[P::Succeeded], 2_000);
    assert_eq!(f.waves(), [(0, 3), (1, 12), (2, 15)]);
    assert_eq!(f.in_state(S::Healthy), 30);
}

#[test]
fn exponential_waves_grow_after_enough_successes() {
    let mut f = Fleet::new(
        spec(
            r#"{"deployment":"d","revision":7,"max_concurrent":50,
        "strategy":{"kind":"exponential","base":1,"factor":2.0,"after_succeeded":2,"max":8},
        "health":{"bake_ms":1000}}"#,
        ),
        25,
    );
    f.run_until(&[P::Succeeded], 2_000);
    let sizes: Vec<u32> = f.waves().into_iter().map(|(_, s)| s).collect();
    assert_eq!(sizes, [1, 1, 2, 4, 8, 8, 1]);
    assert_eq!(sizes.iter().sum::<u32>(), 25);
}

#[test]
fn an_online_node_that_never_answers_cannot_hold_a_wave_forever() {
    let mut f = Fleet::new(
        spec(
            r#"{"deployment":"d","revision":7,"strategy":{"kind":"waves","waves":[{"count":2}]},
        "ack_timeout_ms":5000,"health":{"bake_ms":1000},"offline":{"policy":"wait","max_ms":30000}}"#,
        ),
        4,
    );
    f.silent.insert(name(1));
    f.run_until(&[P::SucceededWithSkipped], 500);
    // Done without it; it keeps being offered the revision (caught up).
    assert!(matches!(
        f.node(&name(1)).state,
        S::Skipped | S::Delivering | S::Offline
    ));
    assert_eq!(f.status.counts.failed, 0);
    assert_eq!(f.in_state(S::Healthy), 3);
    assert_eq!(f.waves(), [(0, 2), (1, 2)]);
    let skipped_at = f
        .log
        .iter()
        .find_map(|(t, a)| {
            matches!(a, Action::MarkSkipped { node, .. } if *node == name(1)).then_some(*t)
        })
        .unwrap();
    assert!(
        (30_000..45_000).contains(&skipped_at),
        "skipped after max_ms: {skipped_at}"
    );
    // Once it answers again it is caught up.
    f.silent.clear();
    f.run_until(&[P::Succeeded], 500);
}
