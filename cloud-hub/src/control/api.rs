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

use super::change::{self, Change, ChangeError, NodeOutcome};
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
}

/// The answer of a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeAnswer {
    /// Every node the change affected.
    pub nodes: Vec<NodeOutcome>,
}

/// `GET /v1/nodes/{node}/rendered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedView {
    /// Labels, annotations, paused.
    pub node: Node,
    /// What was last rendered (absent: never rendered).
    pub rendered: Option<RenderedRecord>,
}

fn change_error(hub: &Hub, e: &ChangeError) -> ApiError {
    let status = match e {
        ChangeError::Conflict { .. }
        | ChangeError::TooMany { .. }
        | ChangeError::TooManyNodes { .. } => StatusCode::CONFLICT,
        ChangeError::Render(_) => StatusCode::BAD_REQUEST,
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
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

fn invalid(hub: &Hub, e: &protocols::validate::ValidationErrors) -> ApiError {
    Metrics::inc(&hub.metrics.bad_documents);
    ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
}

async fn put_labels(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ChangeAnswer>, ApiError> {
    let n: Node = decode_named(&hub, "node", &node, &body)?;
    n.validate().map_err(|e| invalid(&hub, &e))?;
    let nodes = change::apply(&hub, Change::Node(n))
        .await
        .map_err(|e| change_error(&hub, &e))?;
    Ok(Json(ChangeAnswer { nodes }))
}

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

async fn list_deployments(State(hub): State<Arc<Hub>>) -> Result<Json<Vec<Deployment>>, ApiError> {
    let all = hub.control.deployments().map_err(ApiError::internal)?;
    Ok(Json(all.into_values().collect()))
}

async fn get_deployment(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    hub.control
        .deployment(&name)
        .map_err(ApiError::internal)?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("name: no deployment {name:?}"),
            )
        })
}

async fn put_deployment(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ChangeAnswer>, ApiError> {
    let d: Deployment = decode_named(&hub, "deployment", &name, &body)?;
    d.validate().map_err(|e| invalid(&hub, &e))?;
    let nodes = change::apply(&hub, Change::PutDeployment(d))
        .await
        .map_err(|e| change_error(&hub, &e))?;
    Ok(Json(ChangeAnswer { nodes }))
}

async fn delete_deployment(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> Result<Json<ChangeAnswer>, ApiError> {
    let nodes = change::apply(&hub, Change::DeleteDeployment(name))
        .await
        .map_err(|e| change_error(&hub, &e))?;
    Ok(Json(ChangeAnswer { nodes }))
}
