//! `GET /openapi.json` of a real hub: an OpenAPI 3 document generated from
//! the code that lists exactly the routes the router serves, with their
//! path and query parameters, bodies, schemas (every `$ref` resolves), the
//! access each needs (from the policy the guard enforces) and the error body.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use cloud_hub::auth::{Need, required};
use cloud_hub::client::tls_config;
use cloud_hub::openapi::ROUTES;
use edgefleet_testkit::HubHarness;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);
const METHODS: [&str; 6] = ["get", "put", "post", "delete", "patch", "head"];

async fn start() -> (tempfile::TempDir, HubHarness) {
    let dir = tempfile::tempdir().unwrap();
    let hub = tokio::time::timeout(
        DEADLINE,
        HubHarness::start(HubHarness::config(&dir.path().join("hub"))),
    )
    .await
    .unwrap()
    .unwrap();
    (dir, hub)
}

/// An HTTP client trusting the hub CA, with no credential.
fn anonymous(hub: &HubHarness) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(hub.hub.ca.cert_pem(), None).unwrap())
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

/// Fetches the document without a credential.
async fn fetch(hub: &HubHarness) -> (String, Value) {
    let r = anonymous(hub)
        .get(format!("{}/openapi.json", hub.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.unwrap();
    let doc = serde_json::from_str(&text).unwrap();
    (text, doc)
}

/// Every (METHOD, path) operation of the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// `path` with each `{…}` segment filled with a plausible value.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| match s {
            "{sha256}" => "ab".repeat(32),
            "{command}" => "pause".to_owned(),
            s if s.starts_with('{') => "x1".to_owned(),
            s => s.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The schema a `$ref` names, or the schema itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let target = doc
                .pointer(r.strip_prefix('#').unwrap())
                .unwrap_or_else(|| panic!("$ref {r} does not resolve"));
            resolve(doc, target)
        }
        None => schema,
    }
}

/// Whether `schema` (through refs, allOf/oneOf/anyOf) has property `name`.
fn has_property(doc: &Value, schema: &Value, name: &str) -> bool {
    let s = resolve(doc, schema);
    if s.pointer(&format!("/properties/{name}")).is_some() {
        return true;
    }
    ["allOf", "oneOf", "anyOf"].iter().any(|k| {
        s.get(*k)
            .and_then(Value::as_array)
            .is_some_and(|v| v.iter().any(|x| has_property(doc, x, name)))
    })
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("$ref") {
                out.push(r.clone());
            }
            o.values().for_each(|x| collect_refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// Every (METHOD, path) the router's source registers: each `.route("…",
/// …)` call of the three route files and the methods chained in it.
fn registered() -> BTreeSet<(String, String)> {
    let sources = [
        include_str!("../src/api.rs"),
        include_str!("../src/control/api.rs"),
        include_str!("../src/control/rollout_api.rs"),
    ];
    let mut out = BTreeSet::new();
    for src in sources {
        for (at, _) in src.match_indices(".route(") {
            let rest = &src[at + ".route(".len()..];
            let rest = rest.trim_start().strip_prefix('"').unwrap();
            let (path, rest) = rest.split_once('"').unwrap();
            // The call's arguments: up to the parenthesis closing `.route(`.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .unwrap()
                .0;
            let args = &rest[..end];
            for m in ["get", "put", "post", "delete", "patch"] {
                let called = args.match_indices(&format!("{m}(")).any(|(i, _)| {
                    i == 0 || !args[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if called {
                    out.insert((m.to_uppercase(), path.to_owned()));
                }
            }
        }
    }
    out
}

/// One operation: its path parameters are exactly its `{…}` segments, it
/// answers the error body, and its access is what the guard enforces.
fn check_operation(doc: &Value, method: &str, path: &str) {
    let op = &doc["paths"][path][method.to_lowercase()];
    // Path parameters are exactly the {…} segments.
    let segments: BTreeSet<&str> = path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect();
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    let in_path: BTreeSet<&str> = params
        .iter()
        .filter(|p| p["in"] == "path")
        .map(|p| {
            assert_eq!(p["required"], true, "{method} {path}: {p}");
            p["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(in_path, segments, "{method} {path}");
    // The error body (the document itself cannot fail), and the access
    // the guard enforces.
    if path != "/openapi.json" {
        assert_eq!(
            op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "{method} {path}"
        );
    }
    let access = op["description"].as_str().unwrap_or_default();
    let security = op["security"].as_array().unwrap();
    match required(method, path) {
        Need::Public => {
            assert!(access.contains("public"), "{method} {path}: {access}");
            assert_eq!(security, &vec![serde_json::json!({})], "{method} {path}");
        }
        Need::Role(r) => {
            let role = format!("{r:?}").to_lowercase();
            assert!(access.contains(&role), "{method} {path}: {access}");
            assert!(security[0].get("bearer").is_some(), "{method} {path}");
        }
        Need::Node => assert!(security[0].get("node_mtls").is_some(), "{method} {path}"),
        Need::ArtifactRead => assert_eq!(security.len(), 2, "{method} {path}"),
    }
}

#[test]
fn routes_is_what_the_router_source_registers() {
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let found = registered();
    assert!(found.len() > 30, "{found:?}");
    assert_eq!(found, listed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_exactly_the_routes_the_router_serves() {
    let (_dir, hub) = start().await;
    let (text, doc) = fetch(&hub).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    // Built once: the same bytes every time, and what the code builds.
    assert_eq!(fetch(&hub).await.0, text);
    assert_eq!(text, cloud_hub::openapi::json());

    let documented = operations(&doc);
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(listed.len(), ROUTES.len(), "ROUTES has a duplicate");
    assert_eq!(documented, listed);

    // Each listed route is routed: the guard (which runs only on matched
    // routes) refuses an anonymous request 401; public ones answer. An
    // unrouted path is 404, so the probe can tell.
    let http = anonymous(&hub);
    for (method, path) in ROUTES {
        let url = format!("{}{}", hub.base(), concrete(path));
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let status = http.request(m, &url).send().await.unwrap().status();
        if required(method, path) == Need::Public {
            assert!(
                status != 404 && status != 405 && status != 401,
                "{method} {path}: {status}"
            );
        } else {
            assert_eq!(status, 401, "{method} {path} is not routed");
        }
    }
    let nowhere = http
        .get(format!("{}/v1/nowhere", hub.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_schemas_access_and_errors_are_documented() {
    let (_dir, hub) = start().await;
    let (_, doc) = fetch(&hub).await;

    // Every $ref in the document resolves.
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 30, "{} refs", refs.len());
    for r in &refs {
        assert!(
            doc.pointer(r.strip_prefix('#').unwrap()).is_some(),
            "{r} does not resolve"
        );
    }

    // Operation ids are unique (OpenAPI requires it).
    let ids: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| METHODS.iter().filter_map(|m| item.get(*m)))
        .map(|op| op["operationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), ROUTES.len());
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "{ids:?}"
    );

    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert!(error["properties"]["error"].is_object(), "{error}");
    for (method, path) in operations(&doc) {
        check_operation(&doc, &method, &path);
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["node_mtls"]["type"],
        "mutualTLS"
    );

    // Query parameters.
    let query = |path: &str| -> BTreeSet<String> {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let samples = query("/v1/nodes/{node}/streams/{stream}/samples");
    for q in ["from_seq", "from_ms", "to_ms", "limit"] {
        assert!(samples.contains(q), "samples: {samples:?}");
    }
    assert_eq!(query("/v1/audit"), BTreeSet::from(["limit".to_owned()]));
    assert_eq!(
        query("/v1/rollouts/{id}/nodes"),
        ["after", "limit", "state"].map(str::to_owned).into()
    );

    // Request bodies, the deployment put's rollout in particular.
    let body = |method: &str, path: &str| -> Value {
        doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"].clone()
    };
    let put = body("put", "/v1/deployments/{name}");
    assert!(has_property(&doc, &put, "rollout"), "{put}");
    assert!(has_property(&doc, &put, "selector"), "{put}");
    assert!(has_property(
        &doc,
        &body("put", "/v1/nodes/{node}/desired"),
        "functions"
    ));
    assert!(has_property(&doc, &body("post", "/v1/tokens"), "role"));
    assert!(
        doc["paths"]["/v1/artifacts"]["put"]["requestBody"]["content"]
            .get("application/octet-stream")
            .is_some()
    );
    // A response schema.
    let node = &doc["paths"]["/v1/nodes/{node}"]["get"]["responses"]["200"]["content"]["application/json"]
        ["schema"];
    assert!(has_property(&doc, node, "reported"), "{node}");
    hub.stop().await.unwrap();
}
