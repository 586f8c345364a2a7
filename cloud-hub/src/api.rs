//! The REST API (axum).
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/healthz` | liveness |
//! | GET | `/metrics` | Prometheus text |
//! | GET | `/v1/hub` | hub public key and topic root |
//! | GET | `/v1/nodes` | every node: desired revision, reported state, status, telemetry |
//! | GET | `/v1/nodes/{node}` | one node |
//! | PUT | `/v1/nodes/{node}/desired` | set desired state (JSON [`protocols::DesiredState`]) |
//! | GET | `/v1/nodes/{node}/streams` | per-stream watermark, duplicates, drops |
//! | GET | `/v1/nodes/{node}/streams/{stream}/samples` | stored samples; `from_seq`, `from_ms`, `to_ms`, `limit` |
//!
//! Errors are JSON `{"error": "..."}` whose text names the offending field.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use protocols::{NodeStatus, ReportedState};
use serde::{Deserialize, Serialize};

use crate::app::Hub;
use crate::metrics::NodeTelemetry;
use crate::sink::{StoredSample, StreamStats};

/// Builds the router.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/hub", get(hub_info))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", get(get_node))
        .route("/v1/nodes/{node}/desired", put(put_desired))
        .route("/v1/nodes/{node}/streams", get(streams))
        .route("/v1/nodes/{node}/streams/{stream}/samples", get(samples))
        .with_state(hub)
}

/// An API error: status plus message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        (self.0, Json(Body { error: self.1 })).into_response()
    }
}

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// One node as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name.
    pub node: String,
    /// Current desired revision (0: none).
    pub desired_revision: u64,
    /// Last reported state.
    pub reported: Option<ReportedState>,
    /// Last status.
    pub status: Option<NodeStatus>,
    /// Telemetry counters since the hub started.
    pub telemetry: NodeTelemetryView,
}

/// Telemetry counters (mirror of [`NodeTelemetry`] for clients).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct NodeTelemetryView {
    /// Batches received.
    pub batches: u64,
    /// New samples stored.
    pub samples: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Payloads that did not decode.
    pub bad_payloads: u64,
}

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

async fn metrics(State(hub): State<Arc<Hub>>) -> String {
    hub.metrics.render()
}

async fn hub_info(State(hub): State<Arc<Hub>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "public_key": protocols::signing::key_to_hex(&hub.key.verifying_key()),
        "topic_root": hub.topics.root(),
    }))
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

async fn list_nodes(State(hub): State<Arc<Hub>>) -> Result<Json<Vec<NodeView>>, ApiError> {
    let all = hub.registry.all().map_err(ApiError::internal)?;
    Ok(Json(
        all.into_iter().map(|(n, r)| view(&hub, n, r)).collect(),
    ))
}

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

async fn put_desired(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let desired = protocols::codec::decode_desired(&body).map_err(|e| {
        crate::metrics::Metrics::inc(&hub.metrics.bad_documents);
        ApiError::bad(e.to_string())
    })?;
    if desired.node != node {
        return Err(ApiError::bad(format!(
            "node: document is for {:?} but was sent to /v1/nodes/{node}/desired",
            desired.node
        )));
    }
    match hub.set_desired(&desired).await {
        Ok(()) => Ok(Json(
            serde_json::json!({"node": node, "revision": desired.revision}),
        )),
        Err(crate::app::HubError::Registry(
            e @ crate::registry::RegistryError::StaleRevision { .. },
        )) => Err(ApiError(StatusCode::CONFLICT, format!("revision: {e}"))),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn streams(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
) -> Json<BTreeMap<String, StreamStats>> {
    Json(hub.sink.streams(&node))
}

/// Query of `/samples`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleQuery {
    /// First sequence number (default 1).
    pub from_seq: Option<u64>,
    /// Earliest timestamp (inclusive).
    pub from_ms: Option<u64>,
    /// Latest timestamp (exclusive).
    pub to_ms: Option<u64>,
    /// Most samples returned (default 10 000, at most 1 000 000).
    pub limit: Option<usize>,
}

/// Response of `/samples`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SamplePage {
    /// The samples, in sequence order.
    pub samples: Vec<StoredSample>,
    /// Where to continue (`from_seq`), if the page was full.
    pub next_seq: Option<u64>,
}

async fn samples(
    State(hub): State<Arc<Hub>>,
    Path((node, stream)): Path<(String, String)>,
    q: Result<Query<SampleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SamplePage>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=1_000_000).contains(&limit) {
        return Err(ApiError::bad(format!(
            "limit: {limit} is out of range 1..=1000000"
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
