//! The REST API (axum).
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/healthz` | liveness |
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
//! | GET | `/v1/artifacts/{sha256}` | a blob; `Range: bytes=N-` (or `N-M`) answers 206 with `Content-Range` |
//!
//! Errors are JSON `{"error": "..."}` whose text names the offending field.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use protocols::Event;

use crate::artifacts::{ArtifactError, ArtifactInfo, ArtifactStore, RangeRequest, parse_range};
use crate::hub::{Hub, SetDesiredError};
use crate::metrics::NodeTelemetry;
use crate::sink::StreamStats;

/// Builds the router.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/hub", get(hub_info))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", get(get_node))
        .route("/v1/nodes/{node}/desired", put(put_desired))
        .route("/v1/nodes/{node}/streams", get(streams))
        .route("/v1/nodes/{node}/streams/{stream}/samples", get(samples))
        .route("/v1/nodes/{node}/events", get(events))
        .merge(artifact_router(hub.artifacts.clone()))
        .with_state(hub)
}

/// Largest artifact `PUT /v1/artifacts` accepts (the body is held in memory).
pub const MAX_ARTIFACT_BYTES: usize = 256 * 1024 * 1024;

/// An API error: status plus message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
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

async fn metrics(State(hub): State<Arc<Hub>>) -> String {
    hub.metrics.render()
}

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
        Err(e @ SetDesiredError::Stale { .. }) => {
            Err(ApiError(StatusCode::CONFLICT, format!("revision: {e}")))
        }
        Err(SetDesiredError::Hub(e)) => Err(ApiError::internal(e)),
    }
}

async fn streams(
    State(hub): State<Arc<Hub>>,
    Path(node): Path<String>,
) -> Json<BTreeMap<String, StreamStats>> {
    Json(hub.sink.streams(&node))
}

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

async fn events(State(hub): State<Arc<Hub>>, Path(node): Path<String>) -> Json<Vec<Event>> {
    Json(hub.events.recent(&node))
}

fn artifact_error(e: ArtifactError) -> ApiError {
    match e {
        ArtifactError::BadDigest(_) => ApiError::bad(format!("sha256: {e}")),
        ArtifactError::NotFound(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
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
            put(put_artifact).layer(axum::extract::DefaultBodyLimit::max(MAX_ARTIFACT_BYTES)),
        )
        .route("/v1/artifacts/{sha256}", get(get_artifact))
        .with_state(store)
}

async fn put_artifact(
    State(store): State<Arc<ArtifactStore>>,
    body: axum::body::Bytes,
) -> Result<Json<ArtifactInfo>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad("body: an artifact must not be empty"));
    }
    let info = store.put(body).await.map_err(artifact_error)?;
    Ok(Json(info))
}

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
