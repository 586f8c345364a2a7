//! The REST API's credentials over real HTTPS on 127.0.0.1: 401 without a
//! credential, roles (viewer / operator / admin, 403), token expiry and
//! deletion, node certificates limited to their own artifacts, renewal and
//! revocation, and the audit log.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use cloud_hub::auth::Role;
use cloud_hub::ca::{Identity, identity_of, pem_der};
use cloud_hub::client::{ClientOptions, HubClient, tls_config};
use edgefleet_testkit::HubHarness;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn raw(ca: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(ca, None).unwrap())
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

fn with_token(hub: &HubHarness, token: &str) -> HubClient {
    HubClient::authenticated(hub.base(), token, Some(hub.hub.ca.cert_pem())).unwrap()
}

fn desired(revision: u64, model_sha: &str, size: u64) -> serde_json::Value {
    json!({
        "node": "n1",
        "revision": revision,
        "models": [{"name": "m", "sha256": model_sha, "size": size}],
        "config": {"batch_max_samples": 50, "batch_max_age_ms": 200, "report_interval_ms": 200, "raw_stream": "raw"}
    })
}

async fn start() -> (tempfile::TempDir, HubHarness) {
    let dir = tempfile::tempdir().unwrap();
    let hub = tokio::time::timeout(
        DEADLINE,
        HubHarness::start(HubHarness::config(&dir.path().join("hub"))),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(hub.base().starts_with("https://"), "{}", hub.base());
    (dir, hub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_credential_every_protected_route_is_401() {
    let (_dir, hub) = start().await;
    let ca = hub.hub.ca.cert_pem().to_owned();
    let http = raw(&ca);
    let sha = "ab".repeat(32);
    // Public.
    for path in ["/healthz", "/readyz"] {
        let r = http
            .get(format!("{}{path}", hub.base()))
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 401, "{path}");
    }
    // Everything else: 401 with a JSON error.
    for (method, path) in [
        ("GET", "/metrics".to_owned()),
        ("GET", "/v1/hub".into()),
        ("GET", "/v1/nodes".into()),
        ("GET", "/v1/nodes/n1".into()),
        ("PUT", "/v1/nodes/n1/desired".into()),
        ("GET", "/v1/nodes/n1/streams".into()),
        ("GET", "/v1/nodes/n1/streams/raw/samples".into()),
        ("GET", "/v1/nodes/n1/events".into()),
        ("PUT", "/v1/artifacts".into()),
        ("GET", format!("/v1/artifacts/{sha}")),
        ("POST", "/v1/tokens".into()),
        ("GET", "/v1/tokens".into()),
        ("DELETE", "/v1/tokens/x".into()),
        ("POST", "/v1/nodes/n1/bootstrap".into()),
        ("POST", "/v1/nodes/n1/revoke".into()),
        ("POST", "/v1/renew".into()),
        ("GET", "/v1/audit".into()),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = http
            .request(m, format!("{}{path}", hub.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("authorization:"),
            "{method} {path}: {body}"
        );
        let bad = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", hub.base()),
            )
            .bearer_auth("nope.nope")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 401, "{method} {path} with a bad token");
    }
    // Plain HTTP to the HTTPS port does not get an answer.
    let plain = reqwest::Client::new()
        .get(hub.base().replace("https://", "http://") + "/v1/nodes")
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);

    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_operator_and_admin_roles_and_the_token_lifecycle() {
    let (_dir, hub) = start().await;
    let admin = &hub.client;
    let viewer = with_token(
        &hub,
        &admin
            .create_token("v", Role::Viewer, None)
            .await
            .unwrap()
            .secret,
    );
    let operator = admin
        .create_token("op", Role::Operator, None)
        .await
        .unwrap();
    let op = with_token(&hub, &operator.secret);

    // Viewer reads, cannot write.
    viewer.nodes().await.unwrap();
    let art = op.put_artifact(b"model bytes".to_vec()).await.unwrap();
    let e = viewer
        .put_desired_json("n1", &desired(1, &art.sha256, art.size))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("needs the operator role"), "{e}");
    assert_eq!(
        viewer
            .put_artifact(b"x".to_vec())
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    // Operator writes, is not admin.
    op.put_desired_json("n1", &desired(1, &art.sha256, art.size))
        .await
        .unwrap();
    for e in [
        op.tokens().await.unwrap_err(),
        op.create_token("x", Role::Admin, None).await.unwrap_err(),
        op.bootstrap("n1").await.map(drop).unwrap_err(),
        op.revoke("n1").await.unwrap_err(),
        op.audit(10).await.map(drop).unwrap_err(),
    ] {
        assert_eq!(e.status(), Some(403), "{e}");
    }
    // Tokens: listed without secrets, deleted ones and expired ones refused.
    let list = admin.tokens().await.unwrap();
    assert!(
        list.iter()
            .any(|t| t.name == "op" && t.role == Role::Operator)
    );
    admin.delete_token(&operator.token.id).await.unwrap();
    assert_eq!(op.nodes().await.unwrap_err().status(), Some(401));
    let short = admin
        .create_token("short", Role::Viewer, Some(Duration::ZERO))
        .await
        .unwrap();
    let e = with_token(&hub, &short.secret).nodes().await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(e.to_string().contains("expired"), "{e}");

    let audit = admin.audit(1000).await.unwrap();
    let has = |who: &str, method: &str, route: &str, status: u16| {
        audit.iter().any(|r| {
            r.who.starts_with(who) && r.method == method && r.route == route && r.status == status
        })
    };
    assert!(
        has("token:op(", "PUT", "/v1/nodes/{node}/desired", 200),
        "{audit:#?}"
    );
    assert!(
        has("token:v(", "PUT", "/v1/nodes/{node}/desired", 403),
        "{audit:#?}"
    );
    assert!(
        has("token:admin(", "DELETE", "/v1/tokens/{id}", 204),
        "{audit:#?}"
    );
    assert!(audit.iter().all(|r| r.method != "GET"));
    assert!(audit.windows(2).all(|w| w[0].seq > w[1].seq));
    let metrics = admin.metrics().await.unwrap();
    assert!(
        !metrics.contains("edgefleet_hub_auth_unauthenticated_total 0\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("edgefleet_hub_auth_forbidden_total 0\n"),
        "{metrics}"
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_fetches_only_its_artifacts_and_renews_until_revoked() {
    let (_dir, hub) = start().await;
    let ca = hub.hub.ca.cert_pem().to_owned();
    let admin = &hub.client;
    let art = admin.put_artifact(b"model bytes".to_vec()).await.unwrap();
    admin
        .put_desired_json("n1", &desired(1, &art.sha256, art.size))
        .await
        .unwrap();
    // A node certificate: its own artifacts only, renew, then revoked.
    let node_cert = hub
        .hub
        .ca
        .issue_keyed(&Identity::node("n1"), Duration::from_secs(600))
        .unwrap();
    let node = HubClient::with_options(
        hub.base(),
        &ClientOptions {
            ca_pem: Some(ca.clone()),
            identity: Some((node_cert.cert_pem.clone(), node_cert.key_pem.clone())),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    assert_eq!(node.artifact(&art.sha256).await.unwrap(), b"model bytes");
    let other = admin.put_artifact(b"not for n1".to_vec()).await.unwrap();
    let e = node.artifact(&other.sha256).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert_eq!(node.nodes().await.unwrap_err().status(), Some(403));
    // The previous desired state's artifacts stay fetchable.
    let newer = admin.put_artifact(b"model v2".to_vec()).await.unwrap();
    admin
        .put_desired_json("n1", &desired(2, &newer.sha256, newer.size))
        .await
        .unwrap();
    node.artifact(&art.sha256).await.unwrap();
    node.artifact(&newer.sha256).await.unwrap();

    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let renewed = node.renew(&csr).await.unwrap();
    assert_eq!(
        identity_of(&pem_der(&renewed.cert_pem).unwrap()),
        Some(Identity::node("n1"))
    );
    assert_eq!(admin.renew(&csr).await.unwrap_err().status(), Some(403));
    admin.revoke("n1").await.unwrap();
    assert!(hub.hub.ca.is_revoked(&Identity::node("n1")));
    assert_eq!(node.renew(&csr).await.unwrap_err().status(), Some(401));
    assert_eq!(
        node.artifact(&art.sha256).await.unwrap_err().status(),
        Some(401)
    );

    // The audit log has the changes, refused ones too, newest first.
    let audit = admin.audit(1000).await.unwrap();
    let has = |who: &str, method: &str, route: &str, status: u16| {
        audit.iter().any(|r| {
            r.who.starts_with(who) && r.method == method && r.route == route && r.status == status
        })
    };
    assert!(has("node:n1", "POST", "/v1/renew", 401), "{audit:#?}");
    assert!(
        has("token:admin(", "POST", "/v1/nodes/{node}/revoke", 200),
        "{audit:#?}"
    );
    assert!(has("node:n1", "POST", "/v1/renew", 200), "{audit:#?}");
    let metrics = admin.metrics().await.unwrap();
    assert!(
        !metrics.contains("edgefleet_hub_artifact_denied_total 0\n"),
        "{metrics}"
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_once_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubHarness::config(&dir.path().join("hub"));
    cfg.security.join_token_ttl = Duration::from_secs(1);
    let hub = tokio::time::timeout(DEADLINE, HubHarness::start(cfg))
        .await
        .unwrap()
        .unwrap();
    // The admin token file is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let m = std::fs::metadata(dir.path().join("hub/admin.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600);
    }
    let anonymous = HubClient::with_options(
        hub.base(),
        &ClientOptions {
            ca_pem: Some(hub.hub.ca.cert_pem().to_owned()),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let csr = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "admin");
        p.serialize_request(&key).unwrap().pem().unwrap()
    };
    let t = hub.client.bootstrap("n7").await.unwrap();
    assert!(t.token.ends_with(&hub.hub.ca.fingerprint()), "{}", t.token);
    let joined = anonymous.join(&t.token, &csr()).await.unwrap();
    assert_eq!(joined.node, "n7");
    assert_eq!(joined.hub_public_key, hub.public_key);
    // The hub set the name, not the CSR.
    assert_eq!(
        identity_of(&pem_der(&joined.cert_pem).unwrap()),
        Some(Identity::node("n7"))
    );
    let e = anonymous.join(&t.token, &csr()).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("already used"), "{e}");
    let e = anonymous.join("deadbeef.cafe", &csr()).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let late = hub.client.bootstrap("n8").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = anonymous.join(&late.token, &csr()).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
    // A bad CSR does not spend the token.
    let good = hub.client.bootstrap("n9").await.unwrap();
    assert_eq!(
        anonymous
            .join(&good.token, "junk")
            .await
            .unwrap_err()
            .status(),
        Some(400)
    );
    anonymous.join(&good.token, &csr()).await.unwrap();
    let m = hub.client.metrics().await.unwrap();
    assert!(m.contains("edgefleet_hub_join_refused_total 4\n"), "{m}");
    assert!(m.contains("edgefleet_hub_joined_total 2\n"), "{m}");
    hub.stop().await.unwrap();
}
