//! `edge-node join` against a real hub over HTTPS on 127.0.0.1: the key is
//! made on the gateway (0600), the hub CA is checked against the token's
//! pin, and the agent then runs on those anchors alone (no `public_key`, no
//! trust on first use): it applies a signed desired state whose model it
//! downloads over HTTPS with its client certificate.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use edge_node::Clock;
use edgefleet_testkit::{EdgeHarness, HubHarness, eventually};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

async fn join_cli(base: &str, token: &str, dir: &std::path::Path) -> std::process::Output {
    tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_edge-node"))
            .args(["join", "--hub", base, "--token", token, "--data-dir"])
            .arg(dir)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_runs_on_its_identity_and_applies_signed_desired_state() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubHarness::start(HubHarness::config(&dir.path().join("hub")))
        .await
        .unwrap();
    let edge_dir = dir.path().join("edge");

    // A token pinning another CA is refused before anything is sent.
    let t = hub.client.bootstrap("j1").await.unwrap();
    let (secret, _) = t.token.split_once('.').unwrap();
    let wrong = join_cli(
        hub.base(),
        &format!("{secret}.{}", "00".repeat(32)),
        &edge_dir,
    )
    .await;
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("pin"), "{err}");
    assert!(!edge_node::identity::dir(&edge_dir).exists());

    let out = join_cli(hub.base(), &t.token, &edge_dir).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = edge_node::identity::dir(&edge_dir);
    for f in ["node.key", "node.crt", "ca.crt", "hub.pub"] {
        assert!(id.join(f).exists(), "{f}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let m = std::fs::metadata(id.join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600);
        // The data and identity directories are owner-only (L6).
        for d in [&edge_dir, &id] {
            let m = std::fs::metadata(d).unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o700, "{}", d.display());
        }
    }
    assert_eq!(
        std::fs::read_to_string(id.join("hub.pub")).unwrap(),
        hub.public_key
    );
    // Once only.
    let again = join_cli(hub.base(), &t.token, &dir.path().join("other")).await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already used"));

    // The agent: no public_key, no TOFU: the identity is its anchor.
    let mut cfg = edgefleet_testkit::edge_config("j1", &edge_dir, hub.mqtt.1, &hub.public_key);
    cfg.hub.public_key = None;
    cfg.mqtt.host.clone_from(&hub.mqtt.0);
    hub.base().clone_into(&mut cfg.hub.http_url);
    let edge = EdgeHarness::start(cfg, Clock::system()).await.unwrap();
    // The agent made its compiled-code cache and OPC UA PKI owner-only
    // (L6, L4: no more shared /tmp PKI).
    #[cfg(unix)]
    for d in ["wasm-cache", "opcua-pki"] {
        use std::os::unix::fs::PermissionsExt as _;
        let m = std::fs::metadata(edge_dir.join(d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o700, "{d}");
    }
    let model = b"a model only j1 may fetch".to_vec();
    let art = hub.client.put_artifact(model.clone()).await.unwrap();
    hub.client
        .put_desired_json(
            "j1",
            &json!({
                "node": "j1",
                "revision": 1,
                "models": [{"name": "m", "sha256": art.sha256, "size": art.size}],
                "config": {"batch_max_samples": 50, "batch_max_age_ms": 200, "report_interval_ms": 200, "raw_stream": "raw"}
            }),
        )
        .await
        .unwrap();
    eventually(
        "revision 1 applied by the joined node",
        DEADLINE,
        || async {
            hub.client
                .node("j1")
                .await
                .ok()
                .flatten()
                .filter(|n| n.reported.as_ref().is_some_and(|r| r.applied_revision == 1))
        },
    )
    .await;
    let blob = edge_dir.join("artifacts").join(&art.sha256);
    assert_eq!(std::fs::read(&blob).unwrap(), model, "{}", blob.display());
    edge.stop().await.unwrap();
    assert_eq!(edge_node::identity::revision_floor(&edge_dir).unwrap(), 0);

    rejoin_after_a_wipe_learns_the_hub_revision_as_floor(&hub, &edge_dir).await;
    hub.stop().await.unwrap();
}

/// L7: a node whose disk was wiped joins again and learns the hub's
/// current revision as its floor (an older signed document replayed to it
/// is then refused by the session; `session::tests` shows the refusal).
async fn rejoin_after_a_wipe_learns_the_hub_revision_as_floor(
    hub: &HubHarness,
    edge_dir: &std::path::Path,
) {
    hub.client
        .put_desired_json(
            "j1",
            &json!({
                "node": "j1",
                "config": {"batch_max_samples": 50, "batch_max_age_ms": 200, "report_interval_ms": 200, "raw_stream": "raw"}
            }),
        )
        .await
        .unwrap();
    std::fs::remove_dir_all(edge_dir).unwrap();
    let t = hub.client.bootstrap("j1").await.unwrap();
    let out = join_cli(hub.base(), &t.token, edge_dir).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(edge_node::identity::revision_floor(edge_dir).unwrap(), 2);
}
