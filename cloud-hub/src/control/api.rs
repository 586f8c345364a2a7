//! REST routes of the control plane (merged into [`crate::api::router`],
//! so they share its authentication, roles and audit log).
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | PUT | `/v1/nodes/{node}/labels` | (operator) labels, annotations, paused ([`protocols::control::Node`]; `name` may be left out) |
//! | GET | `/v1/nodes/{node}/rendered` | the node's labels, the deployments that select it, the last rendered digest and revision, and which deployment gave each item |
//! | GET | `/v1/deployments` | every deployment |
//! | PUT | `/v1/deployments/{name}` | (operator) create or replace ([`protocols::control::Deployment`]; `name` may be left out) |
//! | GET | `/v1/deployments/{name}` | one deployment |
//! | DELETE | `/v1/deployments/{name}` | (operator) delete; nodes keep their last document |
//!
//! A PUT body may carry `"rollout": {…}` ([`protocols::control::RolloutSpec`]
//! without `deployment` and `revision`, which the hub fills in): the new
//! revision is then delivered by a staged rollout instead of to every node
//! at once. Rollout routes are in [`super::rollout_api`].
//!
//! PUTs and DELETE answer `{"nodes": [{node, revision, published}]}` for
//! every node the change affected. Refusals: 400 (bad body, naming the
//! field), 409 (same-priority conflict naming both deployments and the
//! item, or `limits.max_deployments` / `limits.max_nodes` reached), 404 (no such deployment).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use protocols::control::{Deployment, Node};
use serde::{Deserialize, Serialize};

use super::change::{self, Applied, Change, ChangeError};
use super::store::RenderedRecord;
use crate::api::ApiError;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The control-plane routes.
pub fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route("/v1/nodes/{node}/labels", put(put_labels))
        .route("/v1/nodes/{node}/rendered", get(get_rendered))
        .route("/v1/deployments", get(list_deployments))
        .route(
            "/v1/deployments/{name}",
            put(put_deployment)
                .get(get_deployment)
                .delete(delete_deployment),
        )
        .merge(super::rollout_api::routes())
}

/// The OpenAPI description of [`routes`] (but the rollout routes).
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    put_labels,
    get_rendered,
    list_deployments,
    get_deployment,
    put_deployment,
    delete_deployment
))]
pub(crate) struct ControlDoc;

/// The body of `PUT /v1/deployments/{name}` (documentation only: the
/// handler decodes the [`Deployment`] and the rollout itself). `name` may
/// be left out but, if present, must be the one in the path.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentPut {
    /// The deployment.
    #[serde(flatten)]
    pub deployment: Deployment,
    /// Roll the new revision out in waves (absent: apply to every node at
    /// once). `deployment` and `revision` are set by the hub: leave them out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<protocols::control::RolloutSpec>,
}

/// The answer of a change: every node it affected and, for a put, the
/// deployment's revision and the rollout it started.
pub type ChangeAnswer = Applied;

/// `GET /v1/nodes/{node}/rendered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RenderedView {
    /// Labels, annotations, paused.
    pub node: Node,
    /// What was last rendered (absent: never rendered).
    pub rendered: Option<RenderedRecord>,
}

pub(crate) fn change_error(hub: &Hub, e: &ChangeError) -> ApiError {
    let status = match e {
        ChangeError::Conflict { .. }
        | ChangeError::TooMany { .. }
        | ChangeError::TooManyNodes { .. }
        | ChangeError::Command(_) => StatusCode::CONFLICT,
        ChangeError::Render(_) | ChangeError::Invalid(_) => StatusCode::BAD_REQUEST,
        ChangeError::NotFound(_) | ChangeError::NoRollout(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status != StatusCode::INTERNAL_SERVER_ERROR {
        Metrics::inc(&hub.metrics.control_refused);
    }
    ApiError::new(status, e.to_string())
}

/// Decodes a body whose `name` may be left out but, if present, must be
/// the one in the path.
fn decode_named<T: serde::de::DeserializeOwned>(
    hub: &Hub,
    what: &str,
    name: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    let bad = |msg: String| {
        Metrics::inc(&hub.metrics.bad_documents);
        ApiError::new(StatusCode::BAD_REQUEST, msg)
    };
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("{what}: not JSON: {e}")))?;
    let Some(o) = v.as_object_mut() else {
        return Err(bad(format!("{what}: must be a JSON object")));
    };
    match o.get("name") {
        None => {
            o.insert("name".into(), name.into());
        }
        Some(n) if n == name => {}
        Some(n) => {
            return Err(bad(format!(
                "name: the body names {n} but the path names {name:?}"
            )));
        }
    }
    serde_json::from_value(v).map_err(|e| bad(format!("{what}: {e}")))
}

pub(crate) fn invalid(hub: &Hub, e: &protocols::validate::ValidationErrors) -> ApiError {
    Metrics::inc(&hub.metrics.bad_documents);
    ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
}

#[utoipa::path(
    put,
    path = "/v1/nodes/{node}/labels",
    params(("node" = String, Path, description = "the `node` path segment")),
    request_body = Node,
    responses((status = 200, description = "every node the change affected", body = ChangeAnswer), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn put_labels(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ChangeAnswer>, ApiError> {
    let n: Node = decode_named(&hub, "node", &node, &body)?;
    n.validate().map_err(|e| invalid(&hub, &e))?;
    let answer = change::apply(&hub, Change::Node(n))
        .await
        .map_err(|e| change_error(&hub, &e))?;
    Ok(Json(answer))
}

#[utoipa::path(
    get,
    path = "/v1/nodes/{node}/rendered",
    params(("node" = String, Path, description = "the `node` path segment")),
    responses((status = 200, description = "labels and what was last rendered", body = RenderedView), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn get_rendered(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
) -> Result<Json<RenderedView>, ApiError> {
    let n = hub
        .control
        .node(&node)
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("node: {node:?} has no labels (PUT /v1/nodes/{node}/labels)"),
            )
        })?;
    let rendered = hub.control.rendered(&node).map_err(ApiError::internal)?;
    Ok(Json(RenderedView { node: n, rendered }))
}

#[utoipa::path(
    get,
    path = "/v1/deployments",
    responses((status = 200, description = "every deployment", body = Vec<Deployment>), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn list_deployments(State(hub): State<Arc<Hub>>) -> Result<Json<Vec<Deployment>>, ApiError> {
    let all = hub.control.deployments().map_err(ApiError::internal)?;
    Ok(Json(all.into_values().collect()))
}

#[utoipa::path(
    get,
    path = "/v1/deployments/{name}",
    params(("name" = String, Path, description = "the `name` path segment")),
    responses((status = 200, description = "one deployment", body = Deployment), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn get_deployment(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    hub.control
        .deployment(&name)
        .map_err(ApiError::internal)?
        .map(Json)
        .ok_or_else(|| no_deployment(&name))
}

/// 404 naming the deployment that does not exist.
pub(crate) fn no_deployment(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("name: no deployment {name:?}"),
    )
}

#[utoipa::path(
    put,
    path = "/v1/deployments/{name}",
    params(("name" = String, Path, description = "the `name` path segment")),
    request_body = DeploymentPut,
    responses((status = 200, description = "the affected nodes, the new revision and the rollout it started", body = ChangeAnswer), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn put_deployment(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ChangeAnswer>, ApiError> {
    let mut v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        Metrics::inc(&hub.metrics.bad_documents);
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("deployment: not JSON: {e}"),
        )
    })?;
    let rollout = v
        .as_object_mut()
        .and_then(|o| o.remove("rollout"))
        .filter(|r| !r.is_null())
        .map(|r| super::rollout_api::decode_spec(&hub, &name, r))
        .transpose()?;
    let d: Deployment = decode_named(&hub, "deployment", &name, v.to_string().as_bytes())?;
    d.validate().map_err(|e| invalid(&hub, &e))?;
    let answer = change::apply(
        &hub,
        Change::PutDeployment {
            deployment: d,
            rollout: rollout.map(Box::new),
            undo_of: None,
        },
    )
    .await
    .map_err(|e| change_error(&hub, &e))?;
    Ok(Json(answer))
}

#[utoipa::path(
    delete,
    path = "/v1/deployments/{name}",
    params(("name" = String, Path, description = "the `name` path segment")),
    responses((status = 200, description = "every node the change affected", body = ChangeAnswer), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn delete_deployment(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> Result<Json<ChangeAnswer>, ApiError> {
    let answer = change::apply(&hub, Change::DeleteDeployment(name))
        .await
        .map_err(|e| change_error(&hub, &e))?;
    Ok(Json(answer))
}
