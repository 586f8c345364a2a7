//! The OpenAPI 3.1 document of the REST API, generated from the handlers'
//! `#[utoipa::path]` annotations and the wire types' `ToSchema` derives,
//! served (public) at `GET /openapi.json`.
//!
//! Each operation's security requirement and the role in its description
//! come from [`crate::auth::required`], the policy the guard enforces, so
//! the document cannot disagree with it.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi as _;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{OpenApi, PathItem};

use crate::auth::{Need, required};

/// Every `(method, route)` the hub's router serves, upper-case method and
/// axum route pattern. The tests check the router answers each and that
/// the document has exactly these operations.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/v1/hub"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/nodes/{node}"),
    ("PUT", "/v1/nodes/{node}/desired"),
    ("GET", "/v1/nodes/{node}/streams"),
    ("GET", "/v1/nodes/{node}/streams/{stream}/samples"),
    ("GET", "/v1/nodes/{node}/events"),
    ("POST", "/v1/nodes/{node}/bootstrap"),
    ("POST", "/v1/nodes/{node}/revoke"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{id}"),
    ("POST", "/v1/join"),
    ("POST", "/v1/renew"),
    ("GET", "/v1/audit"),
    ("DELETE", "/v1/artifacts/{sha256}"),
    ("POST", "/v1/artifacts/gc"),
    ("PUT", "/v1/artifacts"),
    ("GET", "/v1/artifacts/{sha256}"),
    ("PUT", "/v1/nodes/{node}/labels"),
    ("GET", "/v1/nodes/{node}/rendered"),
    ("GET", "/v1/deployments"),
    ("PUT", "/v1/deployments/{name}"),
    ("GET", "/v1/deployments/{name}"),
    ("DELETE", "/v1/deployments/{name}"),
    ("GET", "/v1/rollouts"),
    ("GET", "/v1/rollouts/{id}"),
    ("GET", "/v1/rollouts/{id}/nodes"),
    ("GET", "/v1/rollouts/{id}/watch"),
    ("POST", "/v1/rollouts/{id}/{command}"),
    ("GET", "/v1/deployments/{name}/history"),
    ("POST", "/v1/deployments/{name}/undo"),
];

/// The name of the bearer-token security scheme.
pub const BEARER: &str = "bearer";
/// The name of the node client-certificate security scheme.
pub const NODE_MTLS: &str = "node_mtls";

#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "this document", body = serde_json::Value))
)]
/// `GET /openapi.json`: the document, built once.
pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "edgefleet hub",
        description = "The hub's REST API. Errors are `ErrorBody` (`{\"error\": \"...\"}`) whose text names the offending field."
    ),
    paths(serve)
)]
struct HubDoc;

/// The document as JSON text (built on first use, then cached).
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| document().to_json().unwrap_or_default())
}

/// The document: every route, with its security from [`required`].
pub fn document() -> OpenApi {
    let mut doc = HubDoc::openapi();
    doc.merge(crate::api::ApiDoc::openapi());
    doc.merge(crate::control::api::ControlDoc::openapi());
    doc.merge(crate::control::rollout_api::RolloutDoc::openapi());
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    components.add_security_scheme(
        NODE_MTLS,
        SecurityScheme::MutualTls {
            description: Some("the node's client certificate (OU=node)".into()),
            extensions: None,
        },
    );
    for (path, item) in &mut doc.paths.paths {
        secure(path, item);
    }
    doc
}

/// Sets each operation of `item` its security and role note.
fn secure(path: &str, item: &mut PathItem) {
    let ops = [
        ("GET", &mut item.get),
        ("PUT", &mut item.put),
        ("POST", &mut item.post),
        ("DELETE", &mut item.delete),
        ("PATCH", &mut item.patch),
        ("HEAD", &mut item.head),
    ];
    for (method, op) in ops {
        let Some(op) = op.as_mut() else { continue };
        let (security, note) = match required(method, path) {
            Need::Public => (vec![SecurityRequirement::default()], "public".to_owned()),
            Need::Role(r) => (
                vec![SecurityRequirement::new(BEARER, Vec::<String>::new())],
                format!("needs a bearer token with the {r:?} role (or higher)").to_lowercase(),
            ),
            Need::Node => (
                vec![SecurityRequirement::new(NODE_MTLS, Vec::<String>::new())],
                "nodes only: the node's client certificate".to_owned(),
            ),
            Need::ArtifactRead => (
                vec![
                    SecurityRequirement::new(BEARER, Vec::<String>::new()),
                    SecurityRequirement::new(NODE_MTLS, Vec::<String>::new()),
                ],
                "a bearer token with the viewer role, or a node whose desired state references the artifact".to_owned(),
            ),
        };
        op.security = Some(security);
        let d = op.description.take().unwrap_or_default();
        op.description = Some(if d.is_empty() {
            format!("Access: {note}.")
        } else {
            format!("{d}\n\nAccess: {note}.")
        });
    }
}
