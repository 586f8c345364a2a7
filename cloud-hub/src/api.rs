//! The REST API (axum).
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/healthz` | liveness |
//! | GET | `/openapi.json` | the OpenAPI 3.1 document of this API, generated from the code ([`crate::openapi`]); public |
//! | GET | `/readyz` | 200 once the MQTT session is subscribed and desired state republished, else 503 |
//! | GET | `/metrics` | Prometheus text |
//! | GET | `/v1/hub` | hub public key and topic root |
//! | GET | `/v1/nodes` | every node: desired revision, reported state, status, telemetry |
//! | GET | `/v1/nodes/{node}` | one node |
//! | PUT | `/v1/nodes/{node}/desired` | set desired state (JSON [`protocols::DesiredState`]) |
//! | GET | `/v1/nodes/{node}/streams` | per-stream watermark, duplicates, drops |
//! | GET | `/v1/nodes/{node}/streams/{stream}/samples` | stored samples; `from_seq`, `from_ms`, `to_ms`, `limit` |
//! | GET | `/v1/nodes/{node}/events` | the node's most recent events (in memory, bounded) |
//! | PUT | `/v1/artifacts` | store a blob (body = bytes); answers `{sha256, size}`; idempotent |
//! | DELETE | `/v1/artifacts/{sha256}` | (admin) delete a blob no node's current or previous desired state references (409 if one does) |
//! | POST | `/v1/artifacts/gc` | (admin) delete every unreferenced blob older than `limits.artifact_gc_grace`; answers `{deleted: [...]}` |
//! | GET | `/v1/artifacts/{sha256}` | a blob; `Range: bytes=N-` (or `N-M`) answers 206 with `Content-Range` |
//! | POST | `/v1/tokens` | issue an operator token (admin) |
//! | GET | `/v1/tokens` | list tokens (admin) |
//! | DELETE | `/v1/tokens/{id}` | delete a token (admin) |
//! | POST | `/v1/nodes/{node}/bootstrap` | a one-time join token (admin) |
//! | POST | `/v1/nodes/{node}/revoke` | revoke a node's certificates (admin) |
//! | POST | `/v1/join` | join token + CSR → node certificate, CA, hub key (public) |
//! | POST | `/v1/renew` | CSR → new certificate (node client certificate) |
//! | GET | `/v1/audit?limit=` | newest audit records (admin) |
//! | PUT/GET | `/v1/nodes/{node}/labels`, `/v1/nodes/{node}/rendered`, `/v1/deployments[/{name}]` | the control plane ([`crate::control::api`]) |
//!
//! `PUT /v1/nodes/{node}/desired` to a node that a deployment selects is
//! refused 409 naming the deployments: deployments own the nodes they
//! select ([`crate::control`]).
//!
//! Every route but `/healthz`, `/readyz`, `/openapi.json` and `/v1/join` needs a credential
//! ([`crate::auth`]): none, unknown, expired or revoked → 401; a credential
//! without the role → 403. Every PUT/POST/DELETE that reaches a route is
//! audited ([`crate::audit`]), refused ones included.
//!
//! Errors are JSON `{"error": "..."}` whose text names the offending field.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use protocols::Event;
use protocols::api::{
    AuditRecord, BootstrapIssued, JoinAnswer, JoinRequest, RenewAnswer, RenewRequest, TokenIssued,
    TokenRequest, TokenView,
};

use crate::auth::{AuthError, Need, Principal};
use crate::ca::Identity;
use crate::metrics::Metrics;
use crate::tls::Peer;

use crate::artifacts::{ArtifactError, ArtifactInfo, ArtifactStore, RangeRequest, parse_range};
use crate::hub::{Hub, SetDesiredError};
use crate::metrics::NodeTelemetry;
use crate::sink::StreamStats;

/// Builds the router.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(crate::openapi::serve))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/hub", get(hub_info))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", get(get_node))
        .route("/v1/nodes/{node}/desired", put(put_desired))
        .route("/v1/nodes/{node}/streams", get(streams))
        .route("/v1/nodes/{node}/streams/{stream}/samples", get(samples))
        .route("/v1/nodes/{node}/events", get(events))
        .route("/v1/nodes/{node}/bootstrap", post(bootstrap))
        .route("/v1/nodes/{node}/revoke", post(revoke))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(delete_token))
        .route("/v1/join", post(join))
        .route("/v1/renew", post(renew))
        .route("/v1/audit", get(audit))
        .route(
            "/v1/artifacts/{sha256}",
            axum::routing::delete(delete_artifact),
        )
        .route("/v1/artifacts/gc", post(gc_artifacts))
        .merge(crate::control::api::routes())
        .merge(artifact_router(hub.artifacts.clone()))
        .route_layer(axum::middleware::from_fn_with_state(hub.clone(), guard))
        .with_state(hub)
}

/// The OpenAPI description of the routes of [`router`] defined here.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    healthz,
    readyz,
    metrics,
    hub_info,
    list_nodes,
    get_node,
    put_desired,
    streams,
    samples,
    events,
    bootstrap,
    revoke,
    create_token,
    list_tokens,
    delete_token,
    join,
    renew,
    audit,
    delete_artifact,
    gc_artifacts,
    put_artifact,
    get_artifact
))]
pub(crate) struct ApiDoc;

/// Authenticates and authorizes every routed request, and audits changes.
async fn guard(State(hub): State<Arc<Hub>>, mut req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let target = req.uri().path().to_owned();
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.clone());
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let need = crate::auth::required(&method, &route);
    let (who, resp) = match authorize(&hub, need, bearer.as_deref(), peer.as_ref(), &target) {
        Ok(p) => {
            let who = p.to_string();
            req.extensions_mut().insert(p);
            (who, next.run(req).await)
        }
        Err((who, e)) => (who, e.into_response()),
    };
    if matches!(method.as_str(), "PUT" | "POST" | "DELETE" | "PATCH") {
        let recorded = hub
            .audit
            .record(who, &method, &route, &target, resp.status().as_u16());
        if let Err(e) = recorded {
            Metrics::inc(&hub.metrics.audit_failures);
            tracing::warn!(error = %e, "audit record not written");
        }
    }
    resp
}

/// The principal of a request, or who it claimed to be and the refusal.
fn authorize(
    hub: &Hub,
    need: Need,
    bearer: Option<&str>,
    peer: Option<&Peer>,
    target: &str,
) -> Result<Principal, (String, ApiError)> {
    if need == Need::Public {
        return Ok(Principal::Anonymous);
    }
    let unauthenticated = |who: String, e: &dyn std::fmt::Display| {
        Metrics::inc(&hub.metrics.auth_unauthenticated);
        (who, ApiError(StatusCode::UNAUTHORIZED, e.to_string()))
    };
    let principal = match (bearer, peer.and_then(|p| p.identity.as_ref())) {
        (Some(b), _) => hub
            .auth
            .verify(b)
            .map_err(|e| unauthenticated("anonymous".into(), &e))?,
        (None, Some(id)) if id.kind == crate::ca::IdentityKind::Node => {
            if hub.ca.is_revoked(id) {
                return Err(unauthenticated(
                    format!("node:{}", id.name),
                    &format!("authorization: the certificate of {id} is revoked"),
                ));
            }
            Principal::Node(id.name.clone())
        }
        (None, Some(id)) => {
            return Err(unauthenticated(
                id.to_string(),
                &format!(
                    "authorization: {id} certificates are not accepted on the API; use a bearer token"
                ),
            ));
        }
        (None, None) => return Err(unauthenticated("anonymous".into(), &AuthError::Missing)),
    };
    let allowed = match (&principal, need) {
        (Principal::Token { role, .. }, Need::Role(r)) => *role >= r,
        (Principal::Token { .. }, Need::ArtifactRead) | (Principal::Node(_), Need::Node) => true,
        (Principal::Node(node), Need::ArtifactRead) => {
            let sha = target.rsplit('/').next().unwrap_or_default();
            let ok = node_may_fetch(hub, node, sha);
            if !ok {
                Metrics::inc(&hub.metrics.artifact_denied);
            }
            ok
        }
        _ => false,
    };
    if allowed {
        return Ok(principal);
    }
    Metrics::inc(&hub.metrics.auth_forbidden);
    let what = match need {
        Need::Role(r) => format!("needs the {r:?} role").to_lowercase(),
        Need::Node => "is for nodes (client certificate) only".into(),
        Need::ArtifactRead => "sha256: not an artifact of this node's desired state".into(),
        Need::Public => String::new(),
    };
    let who = principal.to_string();
    Err((
        who.clone(),
        ApiError(
            StatusCode::FORBIDDEN,
            format!("authorization: {who}: this route {what}"),
        ),
    ))
}

/// The artifact digests a desired document references.
fn digests(doc: Option<&protocols::SignedDesired>) -> std::collections::BTreeSet<String> {
    doc.and_then(|d| serde_json::from_str::<protocols::DesiredState>(&d.payload).ok())
        .map(|d| {
            d.functions
                .into_iter()
                .map(|f| f.module_sha256)
                .chain(d.models.into_iter().map(|m| m.sha256))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `node`'s current (or previous) desired state references `sha`.
fn node_may_fetch(hub: &Hub, node: &str, sha: &str) -> bool {
    let current = hub.registry.get(node).ok().flatten();
    digests(current.as_ref().and_then(|r| r.desired.as_ref())).contains(sha)
        || hub.auth.granted(node, sha)
}

fn auth_error(hub: &Hub, e: AuthError) -> ApiError {
    match e {
        AuthError::Store(_) | AuthError::Io { .. } => ApiError::internal(e),
        _ => {
            Metrics::inc(&hub.metrics.join_refused);
            tracing::info!(error = %e, "join refused");
            ApiError(StatusCode::UNAUTHORIZED, e.to_string())
        }
    }
}

fn checked_name(what: &str, name: &str) -> Result<(), ApiError> {
    let mut c = protocols::validate::Collector::new();
    protocols::validate::check_name(&mut c, &protocols::validate::Path::Root.field(what), name);
    c.finish().map_err(|e| ApiError::bad(e.to_string()))
}

#[utoipa::path(
    post,
    path = "/v1/tokens",
    request_body = TokenRequest,
    responses((status = 200, description = "the token; its secret is shown only here", body = TokenIssued), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn create_token(
    State(hub): State<Arc<Hub>>,
    body: Result<Json<TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<TokenIssued>, ApiError> {
    let Json(req) = body.map_err(|e| ApiError::bad(e.body_text()))?;
    checked_name("name", &req.name)?;
    let t = hub
        .auth
        .issue(
            &req.name,
            req.role,
            req.ttl_secs.map(std::time::Duration::from_secs),
        )
        .map_err(ApiError::internal)?;
    Ok(Json(TokenIssued {
        token: t.view,
        secret: t.secret,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/tokens",
    responses((status = 200, description = "every token, without secrets", body = Vec<TokenView>), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn list_tokens(State(hub): State<Arc<Hub>>) -> Json<Vec<TokenView>> {
    Json(hub.auth.list())
}

#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    params(("id" = String, Path, description = "the `id` path segment")),
    responses((status = 204, description = "deleted"), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn delete_token(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if hub.auth.delete(&id).map_err(ApiError::internal)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("id: no token {id:?}"),
        ))
    }
}

#[utoipa::path(
    post,
    path = "/v1/nodes/{node}/bootstrap",
    params(("node" = String, Path, description = "the `node` path segment")),
    responses((status = 200, description = "a one-time join token", body = BootstrapIssued), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn bootstrap(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
) -> Result<Json<BootstrapIssued>, ApiError> {
    checked_name("node", &node)?;
    let (token, expires_ms) = hub
        .auth
        .bootstrap(&node, hub.security.join_token_ttl, &hub.ca.fingerprint())
        .map_err(ApiError::internal)?;
    Ok(Json(BootstrapIssued {
        node,
        token,
        expires_ms,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/nodes/{node}/revoke",
    params(("node" = String, Path, description = "the `node` path segment")),
    responses((status = 200, description = "`{node, revoked: true}`", body = serde_json::Value), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn revoke(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    checked_name("node", &node)?;
    hub.ca
        .revoke(&Identity::node(&node))
        .map_err(ApiError::internal)?;
    tracing::info!(%node, "node revoked");
    Ok(Json(serde_json::json!({"node": node, "revoked": true})))
}

#[utoipa::path(
    post,
    path = "/v1/join",
    request_body = JoinRequest,
    responses((status = 200, description = "node certificate, CA, hub key", body = JoinAnswer), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn join(
    State(hub): State<Arc<Hub>>,
    body: Result<Json<JoinRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<JoinAnswer>, ApiError> {
    let refused = |e: String| {
        Metrics::inc(&hub.metrics.join_refused);
        ApiError::bad(e)
    };
    let Json(req) = body.map_err(|e| refused(e.body_text()))?;
    // The CSR is checked before the token is spent.
    let csr = crate::ca::parse_csr(&req.csr_pem).map_err(|e| refused(e.to_string()))?;
    let node = hub
        .auth
        .consume_join(&req.token, &hub.ca.fingerprint())
        .map_err(|e| auth_error(&hub, e))?;
    let identity = Identity::node(&node);
    if hub.ca.is_revoked(&identity) {
        Metrics::inc(&hub.metrics.join_refused);
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            format!("token: node {node:?} is revoked"),
        ));
    }
    let cert_pem = hub
        .ca
        .sign_request(&identity, &csr, hub.security.node_cert_validity)
        .map_err(ApiError::internal)?;
    // What the node must never go below: a wiped node that joins again
    // refuses a replay of an older signed document (L7).
    let min_revision = hub
        .registry
        .get(&node)
        .map_err(ApiError::internal)?
        .map_or(0, |r| r.desired_revision);
    Metrics::inc(&hub.metrics.joined);
    tracing::info!(%node, min_revision, "node joined");
    Ok(Json(JoinAnswer {
        node,
        cert_pem,
        ca_pem: hub.ca.cert_pem().to_owned(),
        hub_public_key: protocols::signing::key_to_hex(&hub.key.verifying_key()),
        mqtt_url: hub.security.advertised_mqtt_url.clone(),
        min_revision,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/renew",
    request_body = RenewRequest,
    responses((status = 200, description = "a new certificate", body = RenewAnswer), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn renew(
    State(hub): State<Arc<Hub>>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<RenewRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<RenewAnswer>, ApiError> {
    let refused = |status, e: String| {
        Metrics::inc(&hub.metrics.renew_refused);
        ApiError(status, e)
    };
    let Principal::Node(node) = principal else {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "authorization: renew is for nodes only".into(),
        ));
    };
    let Json(req) = body.map_err(|e| refused(StatusCode::BAD_REQUEST, e.body_text()))?;
    let cert_pem = hub
        .ca
        .sign_csr(
            &Identity::node(&node),
            &req.csr_pem,
            hub.security.node_cert_validity,
        )
        .map_err(|e| refused(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Json(RenewAnswer { cert_pem }))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// At most this many records (default 100, 1..=10000).
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    params(AuditQuery),
    responses((status = 200, description = "newest audit records", body = Vec<AuditRecord>), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn audit(
    State(hub): State<Arc<Hub>>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditRecord>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad(format!(
            "limit: {limit} is out of range 1..=10000"
        )));
    }
    Ok(Json(hub.audit.recent(limit)))
}

/// An API error: status plus message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl ApiError {
    /// An error with `status` and a message naming the field.
    pub(crate) fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self(status, msg.into())
    }
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

pub use protocols::api::{
    DesiredAccepted, ErrorBody, HubInfo, NodeTelemetryView, NodeView, SamplePage, SampleQuery,
};

impl From<NodeTelemetry> for NodeTelemetryView {
    fn from(t: NodeTelemetry) -> Self {
        Self {
            batches: t.batches,
            samples: t.samples,
            duplicates: t.duplicates,
            bad_payloads: t.bad_payloads,
        }
    }
}

#[utoipa::path(
    get,
    path = "/healthz",
    responses((status = 200, description = "alive", body = String, content_type = "text/plain"), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get,
    path = "/readyz",
    responses((status = 200, description = "ready", body = String, content_type = "text/plain"), (status = 503, description = "not ready", body = String, content_type = "text/plain"), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn readyz(State(hub): State<Arc<Hub>>) -> (StatusCode, &'static str) {
    if hub.mqtt_ready() {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "mqtt session not subscribed yet",
        )
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Prometheus text", body = String, content_type = "text/plain"), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn metrics(State(hub): State<Arc<Hub>>) -> String {
    hub.metrics.render()
}

#[utoipa::path(
    get,
    path = "/v1/hub",
    responses((status = 200, description = "hub public key and topic root", body = HubInfo), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn hub_info(State(hub): State<Arc<Hub>>) -> Json<HubInfo> {
    Json(HubInfo {
        public_key: protocols::signing::key_to_hex(&hub.key.verifying_key()),
        topic_root: hub.topics.root().to_owned(),
    })
}

fn view(hub: &Hub, node: String, rec: crate::registry::NodeRecord) -> NodeView {
    NodeView {
        telemetry: hub.metrics.node_telemetry(&node).into(),
        node,
        desired_revision: rec.desired_revision,
        reported: rec.reported,
        status: rec.status,
    }
}

#[utoipa::path(
    get,
    path = "/v1/nodes",
    responses((status = 200, description = "every node", body = Vec<NodeView>), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn list_nodes(State(hub): State<Arc<Hub>>) -> Result<Json<Vec<NodeView>>, ApiError> {
    let all = hub.registry.all().map_err(ApiError::internal)?;
    Ok(Json(
        all.into_iter().map(|(n, r)| view(&hub, n, r)).collect(),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/nodes/{node}",
    params(("node" = String, Path, description = "the `node` path segment")),
    responses((status = 200, description = "one node", body = NodeView), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn get_node(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    match hub.registry.get(&node).map_err(ApiError::internal)? {
        Some(r) => Ok(Json(view(&hub, node, r))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("node {node:?} is not known"),
        )),
    }
}

/// Decodes a `PUT …/desired` body whose `revision` may be 0 or missing (the
/// hub assigns it); everything else is validated as desired state.
fn decode_put_desired(body: &[u8]) -> Result<protocols::DesiredState, String> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("desired state: not JSON: {e}"))?;
    let requested = match v.get("revision") {
        None | Some(serde_json::Value::Null) => 0,
        Some(r) => r
            .as_u64()
            .ok_or_else(|| format!("revision: {r} is not a revision number"))?,
    };
    if let Some(o) = v.as_object_mut() {
        // Validated as the document the hub will sign (revision >= 1).
        o.insert("revision".into(), requested.max(1).into());
    }
    let bytes = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
    let mut d = protocols::codec::decode_desired(&bytes).map_err(|e| e.to_string())?;
    d.revision = requested;
    Ok(d)
}

#[utoipa::path(
    put,
    path = "/v1/nodes/{node}/desired",
    params(("node" = String, Path, description = "the `node` path segment")),
    request_body = protocols::DesiredState,
    responses((status = 200, description = "accepted: the signed revision", body = serde_json::Value), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn put_desired(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The hub assigns revisions: 0 (or the field left out) means "the next
    // one"; any other value must be exactly the next one, so a client that
    // read revision N and sends N+1 learns (409) that someone else changed
    // the node meanwhile, and no client can jump a node to 2^64-1.
    let desired = decode_put_desired(&body).map_err(|e| {
        crate::metrics::Metrics::inc(&hub.metrics.bad_documents);
        ApiError::bad(e)
    })?;
    if desired.node != node {
        return Err(ApiError::bad(format!(
            "node: document is for {:?} but was sent to /v1/nodes/{node}/desired",
            desired.node
        )));
    }
    // Deployments own the nodes they select; the lock keeps a concurrent
    // label or deployment change from slipping in between.
    let _control = hub.control.lock.lock().await;
    let owners = crate::control::change::owners(&hub, &node).map_err(ApiError::internal)?;
    if !owners.is_empty() {
        Metrics::inc(&hub.metrics.control_refused);
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "node: {node:?} is selected by deployments {owners:?}, which own its desired state; change its labels or the deployments"
            ),
        ));
    }
    let previous = hub
        .registry
        .get(&node)
        .map_err(ApiError::internal)?
        .and_then(|r| r.desired);
    match hub.set_desired(&desired).await {
        Ok(revision) => {
            grant_after_publish(&hub, &node, previous.as_ref()).map_err(ApiError::internal)?;
            Ok(Json(
                serde_json::json!({"node": node, "revision": revision}),
            ))
        }
        Err(e @ SetDesiredError::Stale { .. }) => {
            Err(ApiError(StatusCode::CONFLICT, format!("revision: {e}")))
        }
        Err(SetDesiredError::Hub(e)) => Err(ApiError::internal(e)),
    }
}

/// After a new desired document of `node` was stored: lets the node fetch
/// the blobs of it and of `previous` (the edge may keep fetching the
/// previous document's blobs while it swaps).
pub(crate) fn grant_after_publish(
    hub: &Hub,
    node: &str,
    previous: Option<&protocols::SignedDesired>,
) -> Result<(), AuthError> {
    let mut grant = digests(previous);
    grant.extend(digests(
        hub.registry
            .get(node)
            .ok()
            .flatten()
            .and_then(|r| r.desired)
            .as_ref(),
    ));
    hub.auth.grant_artifacts(node, &grant)
}

#[utoipa::path(
    get,
    path = "/v1/nodes/{node}/streams",
    params(("node" = String, Path, description = "the `node` path segment")),
    responses((status = 200, description = "per-stream watermark, duplicates, drops", body = BTreeMap<String, StreamStats>), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn streams(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
) -> Json<BTreeMap<String, StreamStats>> {
    Json(hub.sink.streams(&node))
}

#[utoipa::path(
    get,
    path = "/v1/nodes/{node}/streams/{stream}/samples",
    params(("node" = String, Path, description = "the `node` path segment"), ("stream" = String, Path, description = "the `stream` path segment"), SampleQuery),
    responses((status = 200, description = "stored samples", body = SamplePage), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn samples(
    State(hub): State<Arc<Hub>>,
    Path((node, stream)): Path<(String, String)>,
    q: Result<Query<SampleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SamplePage>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = q.limit.unwrap_or(SampleQuery::DEFAULT_LIMIT);
    if !(1..=SampleQuery::MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad(format!(
            "limit: {limit} is out of range 1..={}",
            SampleQuery::MAX_LIMIT
        )));
    }
    let samples = hub
        .sink
        .query(
            &node,
            &stream,
            q.from_seq.unwrap_or(1),
            q.from_ms,
            q.to_ms,
            limit,
        )
        .map_err(ApiError::internal)?;
    let next_seq = (samples.len() == limit).then(|| samples.last().map_or(1, |s| s.seq + 1));
    Ok(Json(SamplePage { samples, next_seq }))
}

#[utoipa::path(
    get,
    path = "/v1/nodes/{node}/events",
    params(("node" = String, Path, description = "the `node` path segment")),
    responses((status = 200, description = "the most recent events", body = Vec<Event>), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn events(State(hub): State<Arc<Hub>>, Path(node): Path<String>) -> Json<Vec<Event>> {
    Json(hub.events.recent(&node))
}

fn artifact_error(e: ArtifactError) -> ApiError {
    match e {
        ArtifactError::BadDigest(_) => ApiError::bad(format!("sha256: {e}")),
        ArtifactError::NotFound(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
        ArtifactError::Refused(_) | ArtifactError::Body(_) => ApiError::bad(e.to_string()),
        ArtifactError::Busy(_) => ApiError(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
        ArtifactError::Io { .. } | ArtifactError::Task(_) => ApiError::internal(e),
    }
}

/// The artifact routes alone (`PUT /v1/artifacts`, `GET /v1/artifacts/{sha256}`).
pub fn artifact_router<S>(store: Arc<ArtifactStore>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route(
            "/v1/artifacts",
            // Streamed to disk; the store enforces limits.max_artifact_bytes.
            put(put_artifact).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/artifacts/{sha256}", get(get_artifact))
        .with_state(store)
}

#[utoipa::path(
    put,
    path = "/v1/artifacts",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "stored (idempotent)", body = ArtifactInfo), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn put_artifact(
    State(store): State<Arc<ArtifactStore>>,
    principal: Option<Extension<Principal>>,
    body: axum::body::Body,
) -> Response {
    let owner = principal.map_or_else(|| "local".to_owned(), |Extension(p)| p.to_string());
    match store.put_stream(&owner, body.into_data_stream()).await {
        Ok(info) => Json::<ArtifactInfo>(info).into_response(),
        Err(e) => {
            // A refused upload leaves the rest of its body unread, so the
            // connection cannot carry another request: say so, and a client
            // does not reuse it for its next one.
            let mut r = artifact_error(e).into_response();
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

#[utoipa::path(
    delete,
    path = "/v1/artifacts/{sha256}",
    params(("sha256" = String, Path, description = "the `sha256` path segment")),
    responses((status = 204, description = "deleted"), (status = 409, description = "a desired state references it", body = ErrorBody), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn delete_artifact(
    State(hub): State<Arc<Hub>>,
    Path(sha256): Path<String>,
) -> Result<StatusCode, ApiError> {
    if referenced_artifacts(&hub)?.contains(&sha256) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("sha256: {sha256} is referenced by a node's current or previous desired state"),
        ));
    }
    hub.artifacts.delete(&sha256).map_err(artifact_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/artifacts/gc",
    responses((status = 200, description = "`{deleted: [...]}`", body = serde_json::Value), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn gc_artifacts(State(hub): State<Arc<Hub>>) -> Result<Json<serde_json::Value>, ApiError> {
    let referenced = referenced_artifacts(&hub)?;
    let store = hub.artifacts.clone();
    let grace = hub.limits.artifact_gc_grace;
    let deleted = tokio::task::spawn_blocking(move || store.gc(&referenced, grace))
        .await
        .map_err(ApiError::internal)?
        .map_err(artifact_error)?;
    Ok(Json(serde_json::json!({ "deleted": deleted })))
}

/// Every digest a node's current or previous desired state names.
fn referenced_artifacts(hub: &Hub) -> Result<std::collections::BTreeSet<String>, ApiError> {
    let mut out = hub.auth.all_granted();
    for rec in hub.registry.all().map_err(ApiError::internal)?.values() {
        out.extend(digests(rec.desired.as_ref()));
    }
    Ok(out)
}

#[utoipa::path(
    get,
    path = "/v1/artifacts/{sha256}",
    params(("sha256" = String, Path, description = "the `sha256` path segment"), ("Range" = Option<String>, Header, description = "`bytes=N-` or `bytes=N-M`")),
    responses((status = 200, description = "the blob", body = Vec<u8>, content_type = "application/octet-stream"), (status = 206, description = "the requested range, with `Content-Range`", body = Vec<u8>, content_type = "application/octet-stream"), (status = "default", description = "an error naming the field", body = ErrorBody))
)]
async fn get_artifact(
    State(store): State<Arc<ArtifactStore>>,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let size = store.size(&sha256).await.map_err(artifact_error)?;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, start, end) = match parse_range(range.as_deref(), size) {
        RangeRequest::Full => (StatusCode::OK, 0, size.saturating_sub(1)),
        RangeRequest::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
        RangeRequest::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response());
        }
    };
    let len = if size == 0 { 0 } else { end - start + 1 };
    let (file, _) = store
        .open_at(&sha256, start)
        .await
        .map_err(artifact_error)?;
    let reader = tokio::io::AsyncReadExt::take(file, len);
    let stream = futures::stream::unfold(reader, |mut r| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match tokio::io::AsyncReadExt::read(&mut r, &mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    });
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{sha256}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    async fn serve() -> (String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ArtifactStore::open(dir.path()).unwrap());
        let app: Router = artifact_router(store);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        (format!("http://{addr}"), dir)
    }

    #[tokio::test]
    async fn upload_download_and_ranges() {
        let (base, _dir) = tokio::time::timeout(std::time::Duration::from_secs(5), serve())
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let info: ArtifactInfo = http
            .put(format!("{base}/v1/artifacts"))
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(info.size, 200_000);
        assert_eq!(info.sha256, crate::artifacts::sha256_hex(&body));
        // Idempotent.
        let again: ArtifactInfo = http
            .put(format!("{base}/v1/artifacts"))
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(again, info);

        let url = format!("{base}/v1/artifacts/{}", info.sha256);
        let full = http.get(&url).send().await.unwrap();
        assert_eq!(full.status(), 200);
        assert_eq!(full.headers()[header::ACCEPT_RANGES], "bytes");
        assert_eq!(full.bytes().await.unwrap().as_ref(), body.as_slice());

        let part = http
            .get(&url)
            .header(header::RANGE, "bytes=150000-")
            .send()
            .await
            .unwrap();
        assert_eq!(part.status(), 206);
        assert_eq!(
            part.headers()[header::CONTENT_RANGE],
            "bytes 150000-199999/200000"
        );
        assert_eq!(part.bytes().await.unwrap().as_ref(), &body[150_000..]);

        let mid = http
            .get(&url)
            .header(header::RANGE, "bytes=10-19")
            .send()
            .await
            .unwrap();
        assert_eq!(mid.status(), 206);
        assert_eq!(mid.bytes().await.unwrap().as_ref(), &body[10..20]);

        let past = http
            .get(&url)
            .header(header::RANGE, "bytes=200000-")
            .send()
            .await
            .unwrap();
        assert_eq!(past.status(), 416);
        assert_eq!(past.headers()[header::CONTENT_RANGE], "bytes */200000");

        let missing = http
            .get(format!("{base}/v1/artifacts/{}", "ab".repeat(32)))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        let bad = http
            .get(format!("{base}/v1/artifacts/not-a-digest"))
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
        assert!(bad.text().await.unwrap().contains("sha256"));
        let empty = http
            .put(format!("{base}/v1/artifacts"))
            .send()
            .await
            .unwrap();
        assert_eq!(empty.status(), 400);
    }
}
