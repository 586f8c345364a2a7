//! REST routes of rollouts and deployment history (merged into the control
//! routes, so they share authentication, roles and the audit log: GETs need
//! a viewer token, the rest an operator).
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/v1/rollouts` | every rollout: id, deployment, revision, phase, counts |
//! | GET | `/v1/rollouts/{id}` | spec, status (bounded: counts and the first failures) and the changed functions |
//! | GET | `/v1/rollouts/{id}/nodes?state=&limit=` | per-node progress, filtered by state, at most `limit` (default 1000) |
//! | POST | `/v1/rollouts/{id}/pause`, `/resume`, `/cancel` | operator commands; cancel is always accepted |
//! | GET | `/v1/rollouts/{id}/watch` | server-sent events: the rollout now, then every change of its status until it ends |
//! | GET | `/v1/deployments/{name}/history` | every revision: when, by which rollout, its phase |
//! | POST | `/v1/deployments/{name}/undo` | a new revision with the content of an earlier one (`to_revision`, default the one before the latest), rolled out like the latest one was (or `rollout` given, or `"immediate": true`) |

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use protocols::control::{Command, NodeProgress, NodeRolloutState, RolloutPhase, RolloutSpec};
use serde::{Deserialize, Serialize};

use super::api::{ChangeAnswer, change_error, invalid, no_deployment};
use super::change::{self, Change};
use super::rollouts;
use super::store::{RevisionRecord, RolloutRecord};
use crate::api::ApiError;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Most per-node entries one `GET …/nodes` answers.
pub const MAX_NODES_PAGE: usize = 10_000;

/// The OpenAPI description of [`routes`].
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, one, nodes, watch, operator, history, undo))]
pub(crate) struct RolloutDoc;

/// The rollout routes.
pub fn routes() -> Router<Arc<Hub>> {
    Router::new()
        .route("/v1/rollouts", get(list))
        .route("/v1/rollouts/{id}", get(one))
        .route("/v1/rollouts/{id}/nodes", get(nodes))
        .route("/v1/rollouts/{id}/watch", get(watch))
        .route("/v1/rollouts/{id}/{command}", post(operator))
        .route("/v1/deployments/{name}/history", get(history))
        .route("/v1/deployments/{name}/undo", post(undo))
}

fn bad(hub: &Hub, msg: String) -> ApiError {
    Metrics::inc(&hub.metrics.bad_documents);
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

/// Decodes the `rollout` of a deployment put: a [`RolloutSpec`] whose
/// `deployment` and `revision` the hub fills in.
pub(crate) fn decode_spec(
    hub: &Hub,
    deployment: &str,
    mut v: serde_json::Value,
) -> Result<RolloutSpec, ApiError> {
    let Some(o) = v.as_object_mut() else {
        return Err(bad(hub, "rollout: must be a JSON object".into()));
    };
    for field in ["deployment", "revision"] {
        if o.contains_key(field) {
            return Err(bad(
                hub,
                format!("rollout.{field}: set by the hub, leave it out"),
            ));
        }
    }
    o.insert("deployment".into(), deployment.into());
    o.insert("revision".into(), 1.into());
    let spec: RolloutSpec =
        serde_json::from_value(v).map_err(|e| bad(hub, format!("rollout: {e}")))?;
    spec.validate().map_err(|e| invalid(hub, &e))?;
    Ok(spec)
}

/// One line of `GET /v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutSummary {
    /// `{deployment}-r{revision}`.
    pub id: String,
    /// The deployment.
    pub deployment: String,
    /// The revision it delivers.
    pub revision: u64,
    /// Where it stands.
    pub phase: RolloutPhase,
    /// Node counts.
    pub counts: protocols::control::RolloutCounts,
    /// When it was created, ms since epoch.
    pub created_ms: u64,
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("id: no rollout {id:?}"))
}

#[utoipa::path(
    get,
    path = "/v1/rollouts",
    responses((status = 200, description = "every rollout", body = Vec<RolloutSummary>), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn list(State(hub): State<Arc<Hub>>) -> Result<Json<Vec<RolloutSummary>>, ApiError> {
    let all = hub.control.rollouts().map_err(ApiError::internal)?;
    Ok(Json(
        all.into_values()
            .map(|r| RolloutSummary {
                id: r.id,
                deployment: r.spec.deployment,
                revision: r.spec.revision,
                phase: r.status.phase,
                counts: r.status.counts,
                created_ms: r.status.created_ms,
            })
            .collect(),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/rollouts/{id}",
    params(("id" = String, Path, description = "the `id` path segment")),
    responses((status = 200, description = "one rollout", body = RolloutRecord), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn one(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> Result<Json<RolloutRecord>, ApiError> {
    hub.control
        .rollout(&id)
        .map_err(ApiError::internal)?
        .map(Json)
        .ok_or_else(|| not_found(&id))
}

/// Query of `GET /v1/rollouts/{id}/nodes`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NodesQuery {
    /// Only nodes in this state (`pending`, `delivering`, …, `failed`).
    pub state: Option<NodeRolloutState>,
    /// At most this many (default 1000, at most [`MAX_NODES_PAGE`]).
    pub limit: Option<usize>,
    /// Only nodes whose name sorts after this one (paging).
    pub after: Option<String>,
}

/// One node of `GET /v1/rollouts/{id}/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeEntry {
    /// The node.
    pub node: String,
    /// Its progress.
    #[serde(flatten)]
    pub progress: NodeProgress,
}

#[utoipa::path(
    get,
    path = "/v1/rollouts/{id}/nodes",
    params(("id" = String, Path, description = "the `id` path segment"), NodesQuery),
    responses((status = 200, description = "per-node progress", body = Vec<NodeEntry>), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn nodes(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Query(q): Query<NodesQuery>,
) -> Result<Json<Vec<NodeEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > MAX_NODES_PAGE {
        return Err(bad(
            &hub,
            format!("limit: {limit} is out of range 1..={MAX_NODES_PAGE}"),
        ));
    }
    if hub
        .control
        .rollout(&id)
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(not_found(&id));
    }
    let progress = hub.control.progress(&id).map_err(ApiError::internal)?;
    Ok(Json(
        progress
            .into_iter()
            .filter(|(n, _)| q.after.as_ref().is_none_or(|a| n > a))
            .filter(|(_, p)| q.state.is_none_or(|s| p.state == s))
            .take(limit)
            .map(|(node, progress)| NodeEntry { node, progress })
            .collect(),
    ))
}

#[utoipa::path(
    post,
    path = "/v1/rollouts/{id}/{command}",
    params(("id" = String, Path, description = "the `id` path segment"), ("command" = String, Path, description = "`pause`, `resume` or `cancel`")),
    responses((status = 200, description = "the rollout after the command", body = RolloutRecord), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn operator(
    State(hub): State<Arc<Hub>>,
    Path((id, command)): Path<(String, String)>,
) -> Result<Json<RolloutRecord>, ApiError> {
    let c = match command.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "cancel" => Command::Cancel,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("command: {other:?} is not one of pause, resume, cancel"),
            ));
        }
    };
    rollouts::operator_command(&hub, &id, c)
        .await
        .map(Json)
        .map_err(|e| change_error(&hub, &e))
}

#[utoipa::path(
    get,
    path = "/v1/rollouts/{id}/watch",
    params(("id" = String, Path, description = "the `id` path segment")),
    responses((status = 200, description = "server-sent events: the rollout status on every change, until it ends", body = String, content_type = "text/event-stream"), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn watch(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Subscribe first, then read: no change can fall between the two.
    let rx = hub.control.subscribe();
    let first = hub
        .control
        .rollout(&id)
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(&id))?;
    let done = first.status.phase.is_final();
    let state = (rx, id, Some(first), done);
    let stream = futures::stream::unfold(state, |(mut rx, id, first, done)| async move {
        if let Some(f) = first {
            return Some((Ok(event(&f)), (rx, id, None, done)));
        }
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(r) if r.id == id => {
                    let done = r.status.phase.is_final();
                    return Some((Ok(event(&r)), (rx, id, None, done)));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let e = Event::default().event("lagged").data(n.to_string());
                    return Some((Ok(e), (rx, id, None, false)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn event(r: &RolloutRecord) -> Event {
    Event::default()
        .event("status")
        .data(serde_json::to_string(&r.status).unwrap_or_default())
}

/// One revision in `GET /v1/deployments/{name}/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// The revision.
    pub revision: u64,
    /// When it was stored, ms since epoch.
    pub created_ms: u64,
    /// The rollout that delivered it (absent: applied at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// That rollout's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// Set when it re-issued an earlier revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_of: Option<u64>,
    /// Whether it is what nodes no rollout pins get.
    pub stable: bool,
}

#[utoipa::path(
    get,
    path = "/v1/deployments/{name}/history",
    params(("name" = String, Path, description = "the `name` path segment")),
    responses((status = 200, description = "every stored revision", body = Vec<HistoryEntry>), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn history(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<HistoryEntry>>, ApiError> {
    let meta = hub
        .control
        .meta(&name)
        .map_err(ApiError::internal)?
        .ok_or_else(|| no_deployment(&name))?;
    let revs = hub.control.revisions(&name).map_err(ApiError::internal)?;
    let mut out = Vec::with_capacity(revs.len());
    for r in revs {
        let phase = match &r.rollout {
            Some(id) => hub
                .control
                .rollout(id)
                .map_err(ApiError::internal)?
                .map(|x| x.status.phase),
            None => None,
        };
        out.push(HistoryEntry {
            revision: r.revision,
            created_ms: r.created_ms,
            rollout: r.rollout,
            phase,
            undo_of: r.undo_of,
            stable: r.revision == meta.stable,
        });
    }
    Ok(Json(out))
}

/// Body of `POST /v1/deployments/{name}/undo` (all optional).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UndoRequest {
    /// The revision whose content to re-issue (default: the one before the
    /// latest).
    #[serde(default)]
    pub to_revision: Option<u64>,
    /// How to roll it out (default: like the latest revision's rollout).
    #[serde(default)]
    pub rollout: Option<serde_json::Value>,
    /// Apply it to every node at once.
    #[serde(default)]
    pub immediate: bool,
}

#[utoipa::path(
    post,
    path = "/v1/deployments/{name}/undo",
    params(("name" = String, Path, description = "the `name` path segment")),
    request_body = UndoRequest,
    responses((status = 200, description = "the re-issued revision and its rollout", body = ChangeAnswer), (status = "default", description = "an error naming the field", body = protocols::api::ErrorBody))
)]
async fn undo(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ChangeAnswer>, ApiError> {
    let req: UndoRequest = if body.iter().all(u8::is_ascii_whitespace) {
        UndoRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(&hub, format!("undo: {e}")))?
    };
    let revs = hub.control.revisions(&name).map_err(ApiError::internal)?;
    let Some(latest) = revs.last().cloned() else {
        return Err(no_deployment(&name));
    };
    let to = req.to_revision.unwrap_or(latest.revision.saturating_sub(1));
    let Some(target) = revs.iter().find(|r| r.revision == to) else {
        return Err(bad(
            &hub,
            format!(
                "to_revision: deployment {name:?} has no revision {to} (it has {:?})",
                revs.iter().map(|r| r.revision).collect::<Vec<_>>()
            ),
        ));
    };
    let rollout = rollout_for_undo(&hub, &name, &req, &latest)?;
    let mut d = target.deployment.clone();
    // Only the content goes back; selector and priority stay the latest.
    d.selector = latest.deployment.selector.clone();
    d.priority = latest.deployment.priority;
    change::apply(
        &hub,
        Change::PutDeployment {
            deployment: d,
            rollout: rollout.map(Box::new),
            undo_of: Some(to),
        },
    )
    .await
    .map(Json)
    .map_err(|e| change_error(&hub, &e))
}

fn rollout_for_undo(
    hub: &Hub,
    name: &str,
    req: &UndoRequest,
    latest: &RevisionRecord,
) -> Result<Option<RolloutSpec>, ApiError> {
    if req.immediate {
        if req.rollout.is_some() {
            return Err(bad(
                hub,
                "immediate: cannot be combined with rollout".to_owned(),
            ));
        }
        return Ok(None);
    }
    if let Some(r) = &req.rollout {
        return decode_spec(hub, name, r.clone()).map(Some);
    }
    let Some(id) = &latest.rollout else {
        return Ok(None);
    };
    Ok(hub
        .control
        .rollout(id)
        .map_err(ApiError::internal)?
        .map(|r| r.spec))
}
