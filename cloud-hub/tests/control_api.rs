//! The control plane over the real REST API of a real hub: node labels and
//! deployments stored, each node's desired document rendered from them,
//! signed, published only when its content changes, refused whole on a
//! same-priority conflict, kept across a restart, and applied by a real
//! edge agent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::time::Duration;

use cloud_hub::auth::Role;
use cloud_hub::client::HubClient;
use cloud_hub::control::api::ChangeAnswer;
use edgefleet_testkit::{EdgeHarness, HubHarness, eventually};
use protocols::DesiredState;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

fn sha(c: char) -> String {
    c.to_string().repeat(64)
}

fn model(name: &str, digest: char) -> Value {
    json!({"name": name, "sha256": sha(digest), "size": 10})
}

fn deployment(priority: i32, site: Option<&str>, template: &Value) -> Value {
    let selector = site.map_or_else(|| json!({}), |s| json!({"match_labels": {"site": s}}));
    json!({"priority": priority, "selector": selector, "template": template})
}

fn labels(site: &str) -> Value {
    json!({"labels": {"site": site}})
}

async fn start(dir: &Path) -> HubHarness {
    start_with(dir, |_| {}).await
}

async fn start_with(dir: &Path, tweak: impl FnOnce(&mut cloud_hub::HubConfig)) -> HubHarness {
    let mut cfg = HubHarness::config(&dir.join("hub"));
    tweak(&mut cfg);
    tokio::time::timeout(DEADLINE, HubHarness::start(cfg))
        .await
        .unwrap()
        .unwrap()
}

/// The node's current desired document, its signature checked against the
/// hub key.
fn signed_desired(hub: &HubHarness, node: &str) -> DesiredState {
    let rec = hub.hub.registry.get(node).unwrap().unwrap();
    let doc = rec.desired.expect("a desired document");
    let d = doc.verify(&hub.hub.key.verifying_key()).unwrap();
    assert_eq!(d.revision, rec.desired_revision);
    d
}

fn revision(hub: &HubHarness, node: &str) -> u64 {
    hub.hub
        .registry
        .get(node)
        .unwrap()
        .map_or(0, |r| r.desired_revision)
}

fn outcome(a: &ChangeAnswer, node: &str) -> (u64, bool) {
    let n = a.nodes.iter().find(|n| n.node == node).unwrap();
    (n.revision, n.published)
}

/// `base` (priority 0, every node) and `lyon` (priority 5, site=lyon).
async fn two_deployments(c: &HubClient) {
    c.put_deployment(
        "base",
        &deployment(
            0,
            None,
            &json!({"models": [model("m1", 'a'), model("m2", 'a')],
                    "config": {"batch_max_samples": 10}}),
        ),
    )
    .await
    .unwrap();
    c.put_deployment(
        "lyon",
        &deployment(5, Some("lyon"), &json!({"models": [model("m1", 'b')]})),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_merge_by_priority_sign_once_and_a_reput_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    let c = &hub.client;
    two_deployments(c).await;
    let a = c.put_labels("n1", &labels("lyon")).await.unwrap();
    assert_eq!(outcome(&a, "n1"), (1, true));
    let d = signed_desired(&hub, "n1");
    assert_eq!(d.revision, 1);
    let models: Vec<(&str, &str)> = d
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.sha256.as_str()))
        .collect();
    assert_eq!(
        models,
        [("m1", sha('b').as_str()), ("m2", sha('a').as_str())]
    );
    assert_eq!(d.config.batch_max_samples, 10);
    let view = c.rendered("n1").await.unwrap();
    let r = view.rendered.unwrap();
    assert_eq!(r.deployments, ["base", "lyon"]);
    assert_eq!(r.revision, 1);
    assert_eq!(r.sources["models/m1"], "lyon");
    assert_eq!(r.sources["models/m2"], "base");
    // The same deployment again: same digest, no new revision.
    let again = c
        .put_deployment(
            "lyon",
            &deployment(5, Some("lyon"), &json!({"models": [model("m1", 'b')]})),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&again, "n1"), (1, false));
    assert_eq!(revision(&hub, "n1"), 1);
    // The same labels again: nothing either.
    let same = c.put_labels("n1", &labels("lyon")).await.unwrap();
    assert_eq!(outcome(&same, "n1"), (1, false));
    assert_eq!(
        hub.hub
            .metrics
            .control_renders
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Every change is audited with who made it.
    let audit = c.audit(20).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|r| r.route == "/v1/deployments/{name}" && r.target == "/v1/deployments/lyon"),
        "{audit:?}"
    );
    assert!(audit.iter().any(|r| r.route == "/v1/nodes/{node}/labels"));
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_nodes_labels_re_renders_only_that_node() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    let c = &hub.client;
    two_deployments(c).await;
    for n in ["n1", "n2"] {
        c.put_labels(n, &labels("lyon")).await.unwrap();
    }
    let a = c.put_labels("n2", &labels("turin")).await.unwrap();
    assert_eq!(a.nodes.len(), 1, "{a:?}");
    assert_eq!(outcome(&a, "n2"), (2, true));
    assert_eq!(revision(&hub, "n1"), 1);
    let d = signed_desired(&hub, "n2");
    assert_eq!(d.models[0].sha256, sha('a'), "lyon no longer applies");
    assert_eq!(
        c.rendered("n2")
            .await
            .unwrap()
            .rendered
            .unwrap()
            .deployments,
        ["base"]
    );
    // A deployment change re-renders the nodes it selects, and only them.
    let b = c
        .put_deployment(
            "lyon",
            &deployment(5, Some("lyon"), &json!({"models": [model("m1", 'c')]})),
        )
        .await
        .unwrap();
    assert_eq!(b.nodes.len(), 1, "{b:?}");
    assert_eq!(outcome(&b, "n1"), (2, true));
    assert_eq!(revision(&hub, "n2"), 2);
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_priority_conflict_is_409_naming_both_and_the_item_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    let c = &hub.client;
    c.put_labels("n1", &labels("lyon")).await.unwrap();
    c.put_deployment(
        "alpha",
        &deployment(1, None, &json!({"models": [model("m", 'a')]})),
    )
    .await
    .unwrap();
    assert_eq!(revision(&hub, "n1"), 1);
    let e = c
        .put_deployment(
            "beta",
            &deployment(1, Some("lyon"), &json!({"models": [model("m", 'b')]})),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let msg = e.to_string();
    for part in ["\"alpha\"", "\"beta\"", "model \"m\"", "node \"n1\""] {
        assert!(msg.contains(part), "{part} in {msg}");
    }
    assert!(c.deployment("beta").await.unwrap().is_none());
    assert_eq!(revision(&hub, "n1"), 1);
    assert_eq!(signed_desired(&hub, "n1").models[0].sha256, sha('a'));
    // A node whose new labels would create the conflict is refused too.
    c.put_deployment(
        "beta",
        &deployment(1, Some("turin"), &json!({"models": [model("m", 'b')]})),
    )
    .await
    .unwrap();
    let e = c.put_labels("n1", &labels("turin")).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(
        c.rendered("n1").await.unwrap().node.labels["site"],
        "lyon",
        "the refused labels were not stored"
    );
    // A new node whose labels would create the conflict is refused and not
    // stored.
    let e = c.put_labels("n2", &labels("turin")).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(c.rendered("n2").await.unwrap_err().status(), Some(404));
    assert!(
        hub.hub
            .metrics
            .control_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_400_naming_the_field_and_a_viewer_cannot_change_anything() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    let c = &hub.client;
    let e = c
        .put_deployment(
            "d",
            &json!({"selector": {"match_labels": {"site": "not valid!"}}}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("selector.match_labels.site"), "{e}");
    let e = c
        .put_deployment(
            "d",
            &json!({"selector": {"match_expressions": [{"key": "site", "operator": "in"}]}}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(
        e.to_string().contains("selector.match_expressions[0]"),
        "{e}"
    );
    let e = c
        .put_deployment("d", &json!({"priority": 1}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("selector"), "{e}");
    let e = c
        .put_deployment("d", &json!({"name": "other", "selector": {}}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("name:"), "{e}");
    // A merged document that does not validate names the field and the
    // deployment it came from, and is not stored.
    c.put_labels("n1", &labels("lyon")).await.unwrap();
    let f = json!({"name": "f", "module_sha256": sha('a'), "module_size": 10,
                   "inputs": [7], "outputs": ["f-out"]});
    let e = c
        .put_deployment("fns", &deployment(0, None, &json!({"functions": [f]})))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        e.to_string()
            .contains("functions[0].inputs[0] (from deployment \"fns\")"),
        "{e}"
    );
    assert_eq!(revision(&hub, "n1"), 0);
    let e = c
        .put_labels("n1", &json!({"labels": {"x": "bad value"}}))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("labels.x"), "{e}");
    assert!(c.deployments().await.unwrap().is_empty());

    let viewer = c
        .create_token("v", Role::Viewer, None)
        .await
        .unwrap()
        .secret;
    let v = HubClient::authenticated(hub.base(), &viewer, Some(hub.hub.ca.cert_pem())).unwrap();
    let e = v
        .put_deployment("d", &deployment(0, None, &json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = v.put_labels("n1", &labels("lyon")).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(
        v.deployments().await.unwrap().is_empty(),
        "a viewer may read"
    );
    assert!(c.deployments().await.unwrap().is_empty());
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_own_their_nodes_and_an_unselected_node_keeps_its_document() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    let c = &hub.client;
    c.put_labels("n1", &labels("lyon")).await.unwrap();
    c.put_deployment(
        "lyon",
        &deployment(0, Some("lyon"), &json!({"models": [model("m", 'a')]})),
    )
    .await
    .unwrap();
    let hand = json!({"node": "n1", "models": [model("m", 'f')]});
    let e = c.put_desired_json("n1", &hand).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("\"lyon\""), "{e}");
    assert_eq!(revision(&hub, "n1"), 1);
    // Nothing selects the node any more: it keeps its last document.
    let a = c.delete_deployment("lyon").await.unwrap();
    assert_eq!(outcome(&a, "n1"), (1, false));
    assert_eq!(signed_desired(&hub, "n1").models[0].sha256, sha('a'));
    let view = c.rendered("n1").await.unwrap().rendered.unwrap();
    assert!(view.deployments.is_empty(), "{view:?}");
    // Then a hand PUT is accepted again.
    assert_eq!(c.put_desired_json("n1", &hand).await.unwrap().revision, 2);
    // Selected again with the same content as the last render: the hand
    // document is replaced (the digest matches, but the revision moved).
    let a = c
        .put_deployment(
            "lyon",
            &deployment(0, Some("lyon"), &json!({"models": [model("m", 'a')]})),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&a, "n1"), (3, true));
    assert_eq!(signed_desired(&hub, "n1").models[0].sha256, sha('a'));
    c.delete_deployment("lyon").await.unwrap();
    let e = c.delete_deployment("lyon").await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_count_is_bounded_and_the_refusal_counted() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_with(dir.path(), |cfg| cfg.limits.max_deployments = 1).await;
    let c = &hub.client;
    c.put_deployment("a", &deployment(0, None, &json!({})))
        .await
        .unwrap();
    let e = c
        .put_deployment("b", &deployment(0, None, &json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.to_string().contains("limits.max_deployments"), "{e}");
    assert_eq!(hub.hub.metrics.refused("max_deployments"), 1);
    c.put_deployment("a", &deployment(2, None, &json!({})))
        .await
        .unwrap();
    assert_eq!(c.deployments().await.unwrap().len(), 1);
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_deployments_labels_and_digests_and_bumps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    two_deployments(&hub.client).await;
    hub.client.put_labels("n1", &labels("lyon")).await.unwrap();
    hub.client.put_labels("n2", &labels("turin")).await.unwrap();
    let before = hub.client.rendered("n1").await.unwrap();
    hub.stop().await.unwrap();

    let hub = start(dir.path()).await;
    let c = &hub.client;
    assert_eq!(c.deployments().await.unwrap().len(), 2);
    assert_eq!(c.rendered("n1").await.unwrap(), before);
    assert_eq!((revision(&hub, "n1"), revision(&hub, "n2")), (1, 1));
    let again = c
        .put_deployment(
            "lyon",
            &deployment(5, Some("lyon"), &json!({"models": [model("m1", 'b')]})),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&again, "n1"), (1, false));
    assert_eq!(
        hub.hub
            .metrics
            .control_renders
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_applies_a_deployment_rendered_document() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    let c = &hub.client;
    c.put_deployment(
        "cfg",
        &deployment(
            0,
            Some("lyon"),
            &json!({"config": {"report_interval_ms": 200, "batch_max_age_ms": 200}}),
        ),
    )
    .await
    .unwrap();
    c.put_labels("n1", &labels("lyon")).await.unwrap();
    let edge_dir = dir.path().join("edge");
    let edge = EdgeHarness::start(hub.edge_config("n1", &edge_dir), edge_node::Clock::system())
        .await
        .unwrap();
    let applied = |rev: u64| async move {
        let n = c.node("n1").await.ok().flatten()?;
        n.reported
            .filter(|r| r.applied_revision == rev)
            .map(|r| r.applied_revision)
    };
    eventually("the agent applies revision 1", DEADLINE, || applied(1)).await;
    c.put_deployment(
        "cfg",
        &deployment(
            0,
            Some("lyon"),
            &json!({"config": {"report_interval_ms": 150, "batch_max_age_ms": 200}}),
        ),
    )
    .await
    .unwrap();
    eventually("the agent applies revision 2", DEADLINE, || applied(2)).await;
    edge.stop().await.unwrap();
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_stored_but_not_published_before_a_crash_is_published_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    hub.client.put_labels("n1", &labels("lyon")).await.unwrap();
    assert_eq!(revision(&hub, "n1"), 0, "nothing selects it yet");
    // As if the hub died between storing the deployment and publishing.
    let d: protocols::control::Deployment = serde_json::from_value(json!({
        "name": "late", "selector": {}, "template": {"models": [model("m", 'c')]}}))
    .unwrap();
    hub.hub.control.put_deployment(&d).unwrap();
    hub.stop().await.unwrap();

    let hub = start(dir.path()).await;
    assert_eq!(revision(&hub, "n1"), 1);
    assert_eq!(signed_desired(&hub, "n1").models[0].sha256, sha('c'));
    let r = hub.client.rendered("n1").await.unwrap().rendered.unwrap();
    assert_eq!((r.revision, r.deployments), (1, vec!["late".to_owned()]));
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_owner_that_hides_a_tie_is_refused_and_a_paused_node_waits() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path()).await;
    let c = &hub.client;
    c.put_labels("n1", &labels("lyon")).await.unwrap();
    for (name, p, digest) in [("top", 2, 'c'), ("a", 1, 'a'), ("b", 1, 'b')] {
        c.put_deployment(
            name,
            &deployment(p, None, &json!({"models": [model("m", digest)]})),
        )
        .await
        .unwrap();
    }
    assert_eq!(signed_desired(&hub, "n1").models[0].sha256, sha('c'));
    let e = c.delete_deployment("top").await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("\"a\" and \"b\""), "{e}");
    assert!(c.deployment("top").await.unwrap().is_some());
    c.delete_deployment("b").await.unwrap();
    assert_eq!(revision(&hub, "n1"), 1, "top still wins");

    // Cordoned: checked, stored, not published until resumed.
    c.put_labels("n1", &json!({"labels": {"site": "lyon"}, "paused": true}))
        .await
        .unwrap();
    c.put_deployment(
        "top",
        &deployment(2, None, &json!({"models": [model("m", 'd')]})),
    )
    .await
    .unwrap();
    assert_eq!(revision(&hub, "n1"), 1);
    let a = c.put_labels("n1", &labels("lyon")).await.unwrap();
    assert_eq!(outcome(&a, "n1"), (2, true));
    assert_eq!(signed_desired(&hub, "n1").models[0].sha256, sha('d'));
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_nodes_are_bounded_by_max_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_with(dir.path(), |cfg| cfg.limits.max_nodes = 1).await;
    let c = &hub.client;
    c.put_labels("n1", &labels("lyon")).await.unwrap();
    let e = c.put_labels("n2", &labels("lyon")).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("limits.max_nodes"), "{e}");
    assert_eq!(hub.hub.metrics.refused("max_nodes"), 1);
    c.put_labels("n1", &labels("turin")).await.unwrap();
    hub.stop().await.unwrap();
}
