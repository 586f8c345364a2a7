//! Rollouts end to end: a real hub (embedded broker, REST) and real edge
//! agents. A good revision goes out in waves and an offline node catches up
//! when it comes back; a bad one fails its first wave and only the nodes it
//! reached are rolled back; a hub restart mid-rollout resumes it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::time::Duration;

use cloud_hub::client::HubClient;
use edgefleet_testkit::{EdgeHarness, HubHarness, eventually};
use protocols::control::{NodeRolloutState, RolloutPhase};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

async fn start_hub(dir: &Path, tweak: impl FnOnce(&mut cloud_hub::HubConfig)) -> HubHarness {
    let mut cfg = HubHarness::config(&dir.join("hub"));
    cfg.rollout_tick = Duration::from_millis(100);
    tweak(&mut cfg);
    tokio::time::timeout(DEADLINE, HubHarness::start(cfg))
        .await
        .unwrap()
        .unwrap()
}

async fn agent(hub: &HubHarness, dir: &Path, node: &str) -> EdgeHarness {
    let cfg = hub.edge_config(node, &dir.join(node));
    EdgeHarness::start(cfg, edge_node::Clock::system())
        .await
        .unwrap()
}

fn cfg_deployment(report_ms: u64, rollout: Option<Value>) -> Value {
    let mut d = json!({
        "selector": {"match_labels": {"line": "a"}},
        "template": {"config": {"report_interval_ms": report_ms}},
    });
    if let Some(r) = rollout {
        d["rollout"] = r;
    }
    d
}

fn waves(waves: &Value, bake_ms: u64) -> Value {
    json!({
        "strategy": {"kind": "waves", "waves": waves},
        "max_concurrent": 10,
        "node_timeout_ms": 5_000,
        "ack_timeout_ms": 3_000,
        "health": {"bake_ms": bake_ms},
    })
}

async fn label(c: &HubClient, nodes: &[String]) {
    for n in nodes {
        c.put_labels(n, &json!({"labels": {"line": "a"}}))
            .await
            .unwrap();
    }
}

/// The revision the node reports applied.
async fn applied(c: &HubClient, node: &str) -> u64 {
    c.node(node)
        .await
        .ok()
        .flatten()
        .and_then(|n| n.reported)
        .map_or(0, |r| r.applied_revision)
}

async fn all_applied(c: &HubClient, nodes: &[String], rev: u64) -> Option<()> {
    for n in nodes {
        if applied(c, n).await != rev {
            return None;
        }
    }
    Some(())
}

async fn phase_is(c: &HubClient, id: &str, phase: RolloutPhase) -> Option<()> {
    (c.rollout(id).await.ok()?.status.phase == phase).then_some(())
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_revision_goes_out_in_waves_and_an_offline_node_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), |_| {}).await;
    let c = &hub.client;
    let online = names("good", 6);
    let mut all = online.clone();
    all.push("late".into());
    label(c, &all).await;
    c.put_deployment("cfg", &cfg_deployment(300, None))
        .await
        .unwrap();
    let mut agents = Vec::new();
    for n in &online {
        agents.push(agent(&hub, dir.path(), n).await);
    }
    eventually("revision 1 everywhere", DEADLINE, || {
        all_applied(c, &online, 1)
    })
    .await;

    let spec = waves(&json!([{"count": 1}, {"percent": 50}]), 300);
    let a = c
        .put_deployment("cfg", &cfg_deployment(250, Some(spec)))
        .await
        .unwrap();
    let id = a.rollout.clone().expect("a rollout started");
    assert_eq!((a.revision, id.as_str()), (Some(2), "cfg-r2"));
    // Nothing changed on any node yet: the rollout pins them.
    assert!(a.nodes.iter().all(|n| !n.published), "{a:?}");

    // Follow it live until it is done with the offline node skipped.
    let mut seen = Vec::new();
    tokio::time::timeout(
        DEADLINE,
        c.watch_rollout(&id, |s| {
            seen.push((s.phase, s.current_wave, s.counts.healthy));
            s.phase != RolloutPhase::SucceededWithSkipped
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let last = *seen.last().unwrap();
    assert_eq!(last.0, RolloutPhase::SucceededWithSkipped, "{seen:?}");
    assert_eq!(last.2, 6, "{seen:?}");
    // Waves in order, the healthy count never going down.
    assert!(
        seen.windows(2)
            .all(|w| w[0].2 <= w[1].2 && w[0].1 <= w[1].1),
        "{seen:?}"
    );
    assert!(seen.iter().any(|s| s.1 == Some(0)), "{seen:?}");
    eventually("revision 2 everywhere online", DEADLINE, || {
        all_applied(c, &online, 2)
    })
    .await;
    let r = c.rollout(&id).await.unwrap();
    assert_eq!(r.status.counts.skipped, 1, "{:?}", r.status);
    assert_eq!(r.status.counts.failed, 0, "{:?}", r.status);
    let skipped = c.rollout_nodes(&id, Some("skipped")).await.unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].node, "late");

    // The offline node comes back and is caught up; then the rollout is done.
    agents.push(agent(&hub, dir.path(), "late").await);
    eventually("the late node catches up", DEADLINE, || {
        phase_is(c, &id, RolloutPhase::Succeeded)
    })
    .await;
    let late = hub.hub.registry.get("late").unwrap().unwrap();
    let doc = late
        .desired
        .unwrap()
        .verify(&hub.hub.key.verifying_key())
        .unwrap();
    assert_eq!(doc.config.report_interval_ms, 250);

    let h = c.deployment_history("cfg").await.unwrap();
    let revs: Vec<(u64, bool, Option<RolloutPhase>)> =
        h.iter().map(|e| (e.revision, e.stable, e.phase)).collect();
    assert_eq!(
        revs,
        [(1, false, None), (2, true, Some(RolloutPhase::Succeeded))]
    );
    for a in agents {
        a.stop().await.unwrap();
    }
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_revision_fails_its_first_wave_and_only_reached_nodes_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), |_| {}).await;
    let c = &hub.client;
    let nodes = names("bad", 4);
    label(c, &nodes).await;
    c.put_deployment("cfg", &cfg_deployment(300, None))
        .await
        .unwrap();
    let mut agents = Vec::new();
    for n in &nodes {
        agents.push(agent(&hub, dir.path(), n).await);
    }
    eventually("revision 1 everywhere", DEADLINE, || {
        all_applied(c, &nodes, 1)
    })
    .await;
    // A function whose module the hub does not have: it never runs.
    let mut bad = cfg_deployment(
        300,
        Some(waves(&json!([{"count": 1}, {"percent": 100}]), 1_000)),
    );
    bad["template"]["functions"] = json!([{
        "name": "f", "module_sha256": "e".repeat(64), "module_size": 100,
        "inputs": [], "outputs": ["f.out"]
    }]);
    let a = c.put_deployment("cfg", &bad).await.unwrap();
    let id = a.rollout.unwrap();
    eventually("the rollout is rolled back", DEADLINE, || {
        phase_is(c, &id, RolloutPhase::RolledBack)
    })
    .await;
    let r = c.rollout(&id).await.unwrap();
    assert_eq!(r.status.counts.failed, 1, "{:?}", r.status);
    let failure = &r.status.failures[0];
    assert_eq!(failure.node, "bad0", "{:?}", r.status);
    assert!(
        r.status.reason.as_deref().unwrap().contains("wave 0"),
        "{:?}",
        r.status
    );
    eventually(
        "bad0 is back on a document without the function",
        DEADLINE,
        || async {
            let rec = hub.hub.registry.get("bad0").ok()??;
            let doc = rec.desired?.verify(&hub.hub.key.verifying_key()).ok()?;
            (doc.functions.is_empty() && applied(c, "bad0").await == rec.desired_revision)
                .then_some(())
        },
    )
    .await;
    eventually("bad0 counts as rolled back", DEADLINE, || async {
        let r = c.rollout(&id).await.ok()?;
        (r.status.counts.rolled_back == 1).then_some(())
    })
    .await;
    // The other nodes never got revision 2.
    for n in &nodes[1..] {
        assert_eq!(applied(c, n).await, 1, "{n}");
        let p = c.rollout_nodes(&id, None).await.unwrap();
        let e = p.iter().find(|e| &e.node == n).unwrap();
        assert_eq!(e.progress.state, NodeRolloutState::Pending);
    }
    // Undo: revision 3 re-issues revision 1's content at once.
    let u = c
        .undo_deployment("cfg", &json!({"to_revision": 1, "immediate": true}))
        .await
        .unwrap();
    assert_eq!((u.revision, u.rollout), (Some(3), None));
    let h = c.deployment_history("cfg").await.unwrap();
    assert_eq!(h.last().unwrap().undo_of, Some(1));
    assert!(h.last().unwrap().stable);
    // Commands: a finished rollout cannot be paused; cancel is accepted.
    let e = c.rollout_command(&id, "pause").await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    c.rollout_command(&id, "cancel").await.unwrap();
    let e = c.rollout_command(&id, "explode").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    // A bad rollout spec is refused naming the field, and stores nothing.
    let e = c
        .put_deployment(
            "cfg",
            &cfg_deployment(
                200,
                Some(json!({"strategy": {"kind": "waves", "waves": []}})),
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("rollout.strategy.waves"), "{e}");
    assert_eq!(c.deployment_history("cfg").await.unwrap().len(), 3);
    for a in agents {
        a.stop().await.unwrap();
    }
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_restart_mid_rollout_resumes_it_and_publishes_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), |_| {}).await;
    let c = hub.client.clone();
    let nodes = names("rs", 3);
    label(&c, &nodes).await;
    c.put_deployment("cfg", &cfg_deployment(300, None))
        .await
        .unwrap();
    let mut agents = Vec::new();
    for n in &nodes {
        agents.push(agent(&hub, dir.path(), n).await);
    }
    eventually("revision 1 everywhere", DEADLINE, || {
        all_applied(&c, &nodes, 1)
    })
    .await;
    let a = c
        .put_deployment(
            "cfg",
            &cfg_deployment(
                250,
                Some(waves(&json!([{"count": 1}, {"percent": 100}]), 2_000)),
            ),
        )
        .await
        .unwrap();
    let id = a.rollout.unwrap();
    eventually("the first node bakes", DEADLINE, || async {
        let p = c.rollout_nodes(&id, Some("baking")).await.ok()?;
        (p.len() == 1).then_some(())
    })
    .await;
    let base = hub.base().to_owned();
    let mqtt_port = hub.mqtt.1;
    hub.stop().await.unwrap();

    let addr: std::net::SocketAddr = base
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let hub = start_hub(dir.path(), |cfg| {
        cfg.http_listen = addr;
        if let Some(b) = cfg.embedded_broker.as_mut() {
            b.listen = std::net::SocketAddr::from(([127, 0, 0, 1], mqtt_port));
        }
    })
    .await;
    let c = &hub.client;
    eventually("the rollout resumes and succeeds", DEADLINE, || {
        phase_is(c, &id, RolloutPhase::Succeeded)
    })
    .await;
    eventually("revision 2 everywhere", DEADLINE, || {
        all_applied(c, &nodes, 2)
    })
    .await;
    for n in &nodes {
        // Revision 1, then exactly one more: nothing was published twice.
        let rec = hub.hub.registry.get(n).unwrap().unwrap();
        assert_eq!(rec.desired_revision, 2, "{n}");
    }
    for a in agents {
        a.stop().await.unwrap();
    }
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_deliveries_and_a_new_put_supersedes_the_running_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), |_| {}).await;
    let c = &hub.client;
    let nodes = names("px", 4);
    label(c, &nodes).await;
    let mut agents = Vec::new();
    for n in &nodes {
        agents.push(agent(&hub, dir.path(), n).await);
    }
    // A brand-new deployment, rolled out: nodes not reached get nothing.
    let spec = waves(&json!([{"count": 1}, {"percent": 100}]), 1_500);
    let a = c
        .put_deployment("cfg", &cfg_deployment(300, Some(spec.clone())))
        .await
        .unwrap();
    let id = a.rollout.unwrap();
    eventually("the first node bakes", DEADLINE, || async {
        let p = c.rollout_nodes(&id, Some("baking")).await.ok()?;
        (p.len() == 1).then_some(())
    })
    .await;
    let paused = c.rollout_command(&id, "pause").await.unwrap();
    assert_eq!(paused.status.phase, RolloutPhase::Paused);
    // While paused nothing moves: the others still have no document.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let r = c.rollout(&id).await.unwrap();
    assert_eq!(r.status.phase, RolloutPhase::Paused);
    for n in &nodes[1..] {
        assert_eq!(
            hub.hub
                .registry
                .get(n)
                .unwrap()
                .map_or(0, |r| r.desired_revision),
            0,
            "{n}"
        );
    }
    c.rollout_command(&id, "resume").await.unwrap();
    eventually("the second wave starts", DEADLINE, || async {
        let r = c.rollout(&id).await.ok()?;
        (r.status.current_wave == Some(1)).then_some(())
    })
    .await;
    // A new revision while it runs supersedes it; the new rollout finishes.
    let b = c
        .put_deployment("cfg", &cfg_deployment(250, Some(spec)))
        .await
        .unwrap();
    let id2 = b.rollout.unwrap();
    assert_eq!(id2, "cfg-r2");
    let old = c.rollout(&id).await.unwrap();
    assert_eq!(
        old.status.phase,
        RolloutPhase::Superseded,
        "{:?}",
        old.status
    );
    assert!(old.status.reason.unwrap().contains("cfg-r2"));
    eventually("the new rollout succeeds", DEADLINE, || {
        phase_is(c, &id2, RolloutPhase::Succeeded)
    })
    .await;
    for n in &nodes {
        let rec = hub.hub.registry.get(n).unwrap().unwrap();
        let doc = rec
            .desired
            .unwrap()
            .verify(&hub.hub.key.verifying_key())
            .unwrap();
        assert_eq!(doc.config.report_interval_ms, 250, "{n}");
    }
    let list = c.rollouts().await.unwrap();
    let phases: Vec<(String, RolloutPhase)> = list.into_iter().map(|r| (r.id, r.phase)).collect();
    assert_eq!(
        phases,
        [
            ("cfg-r1".to_owned(), RolloutPhase::Superseded),
            ("cfg-r2".to_owned(), RolloutPhase::Succeeded)
        ]
    );
    for a in agents {
        a.stop().await.unwrap();
    }
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_and_keeps_what_nodes_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), |_| {}).await;
    let c = &hub.client;
    // Selects no node: every rollout of it finishes at once.
    let put = |i: u64, rollout: Option<Value>| {
        let mut d = cfg_deployment(200 + i, rollout);
        d["selector"] = json!({"match_labels": {"line": "nowhere"}});
        d
    };
    for i in 0..60 {
        c.put_deployment("cfg", &put(i, None)).await.unwrap();
    }
    let h = c.deployment_history("cfg").await.unwrap();
    assert_eq!(h.len(), cloud_hub::control::rollouts::REVISIONS_KEPT);
    assert_eq!(h.last().unwrap().revision, 60);
    assert!(h.last().unwrap().stable);
    for i in 60..73 {
        let a = c
            .put_deployment("cfg", &put(i, Some(waves(&json!([{"percent": 100}]), 0))))
            .await
            .unwrap();
        let id = a.rollout.unwrap();
        eventually("an empty rollout succeeds", DEADLINE, || {
            phase_is(c, &id, RolloutPhase::Succeeded)
        })
        .await;
    }
    let rollouts = c.rollouts().await.unwrap();
    assert_eq!(
        rollouts.len(),
        cloud_hub::control::rollouts::ROLLOUTS_KEPT + 1
    );
    assert_eq!(rollouts.iter().map(|r| r.revision).min(), Some(63));
    let h = c.deployment_history("cfg").await.unwrap();
    assert_eq!(h.len(), cloud_hub::control::rollouts::REVISIONS_KEPT);
    hub.stop().await.unwrap();
}
