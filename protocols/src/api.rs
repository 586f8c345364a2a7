//! The hub's REST API as data: what each endpoint answers and takes.
//!
//! The hub (`cloud_hub::api`) serves these types, `cloud_hub::client::HubClient`
//! and the simulator read them. No I/O here: the paths are documented on the
//! hub's router, the types are the contract.
//!
//! | method | path | body / answer |
//! | --- | --- | --- |
//! | GET | `/openapi.json` | the OpenAPI 3.1 document of every route here, generated from the code (public; `cloud_hub::openapi`; these types derive its schemas with the `openapi` feature) |
//! | GET | `/v1/hub` | [`HubInfo`] |
//! | GET | `/v1/nodes` | `Vec<`[`NodeView`]`>` |
//! | GET | `/v1/nodes/{node}` | [`NodeView`] |
//! | PUT | `/v1/nodes/{node}/desired` | [`crate::DesiredState`] → [`DesiredAccepted`] |
//! | GET | `/v1/nodes/{node}/streams` | `BTreeMap<String, `[`StreamStats`]`>` |
//! | GET | `/v1/nodes/{node}/streams/{stream}/samples` | [`SampleQuery`] → [`SamplePage`] |
//! | GET | `/v1/nodes/{node}/events` | `Vec<`[`crate::Event`]`>` |
//! | PUT | `/v1/artifacts` | bytes → [`ArtifactInfo`] |
//! | POST | `/v1/tokens` | [`TokenRequest`] → [`TokenIssued`] |
//! | GET | `/v1/tokens` | `Vec<`[`TokenView`]`>` |
//! | POST | `/v1/nodes/{node}/bootstrap` | [`BootstrapIssued`] |
//! | POST | `/v1/join` | [`JoinRequest`] → [`JoinAnswer`] |
//! | POST | `/v1/renew` | [`RenewRequest`] → [`RenewAnswer`] |
//! | GET | `/v1/audit` | `Vec<`[`AuditRecord`]`>` |
//! | POST | `/v1/nodes/{node}/revoke` | → `{node, revoked}` |
//! | DELETE | `/v1/tokens/{id}` | — |
//! | GET / DELETE | `/v1/artifacts/{sha256}` | bytes (`Range` honoured) / — (409 while a desired state names it) |
//! | POST | `/v1/artifacts/gc` | deletes unreferenced blobs older than the grace |
//! | PUT | `/v1/nodes/{node}/labels` | [`crate::control::Node`] → `cloud_hub::control::api::ChangeAnswer` |
//! | GET | `/v1/nodes/{node}/rendered` | `cloud_hub::control::api::RenderedView` |
//! | GET | `/v1/deployments` | `Vec<`[`crate::control::Deployment`]`>` |
//! | GET / PUT / DELETE | `/v1/deployments/{name}` | [`crate::control::Deployment`], PUT optionally with `rollout` ([`crate::control::RolloutSpec`] without `deployment`/`revision`) (PUT, DELETE → `ChangeAnswer`: nodes, revision, rollout id) |
//! | GET | `/v1/deployments/{name}/history` | every revision: when, rollout, phase, stable |
//! | POST | `/v1/deployments/{name}/undo` | `{to_revision?, rollout?, immediate?}` → `ChangeAnswer` |
//! | GET | `/v1/rollouts` | id, deployment, revision, phase, counts of each rollout |
//! | GET | `/v1/rollouts/{id}` | spec, bounded [`crate::control::RolloutStatus`], changed functions |
//! | GET | `/v1/rollouts/{id}/nodes?state=&limit=&after=` | per-node [`crate::control::NodeProgress`] |
//! | POST | `/v1/rollouts/{id}/pause` · `resume` · `cancel` | the rollout after the command |
//! | GET | `/v1/rollouts/{id}/watch` | server-sent `status` events until a final phase |
//!
//! Every error answer is an [`ErrorBody`] whose text names the offending field.

use serde::{Deserialize, Serialize};

use crate::{NodeStatus, Quality, ReportedState, Sample};

/// What `GET /v1/hub` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HubInfo {
    /// The hub's Ed25519 public key (hex), which nodes pin.
    pub public_key: String,
    /// MQTT topic root shared with the nodes.
    pub topic_root: String,
}

/// One node as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// A node's telemetry counters since the hub started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// What `PUT /v1/nodes/{node}/desired` answers when the document was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredAccepted {
    /// The node it is for.
    pub node: String,
    /// The revision now desired.
    pub revision: u64,
}

/// Counters and watermark of one (node, stream).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StreamStats {
    /// Every sequence number up to here is stored or declared dropped.
    pub contiguous: u64,
    /// Highest sequence number acked to the edge.
    pub acked: u64,
    /// Highest sequence number seen.
    pub max_seen: u64,
    /// Distinct samples stored.
    pub stored: u64,
    /// Samples received again and dropped.
    pub duplicates: u64,
    /// Samples the edge declared dropped by its overflow policy.
    pub dropped_by_edge: u64,
    /// Times a batch arrived ahead of what was stored, opening a gap (the
    /// edge resends; a gap normally closes within an ack timeout).
    #[serde(default)]
    pub gaps_seen: u64,
    /// Sequence numbers between `contiguous` and `max_seen` not stored yet.
    #[serde(default)]
    pub missing_now: u64,
}

/// A stored sample with its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoredSample {
    /// Sequence number.
    pub seq: u64,
    /// Point index.
    pub point: u32,
    /// Timestamp, ms since epoch.
    pub ts_ms: u64,
    /// Value.
    pub value: f64,
    /// Quality byte.
    pub quality: u8,
}

impl StoredSample {
    /// The sample without its sequence number.
    pub fn sample(&self) -> Sample {
        Sample {
            point: self.point,
            ts_ms: self.ts_ms,
            value: self.value,
            quality: Quality(self.quality),
        }
    }
}

/// Query of `/samples`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema, utoipa::IntoParams), into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct SampleQuery {
    /// First sequence number (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
    /// Earliest timestamp (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<u64>,
    /// Latest timestamp (exclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<u64>,
    /// Most samples returned (default [`SampleQuery::DEFAULT_LIMIT`], at most
    /// [`SampleQuery::MAX_LIMIT`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl SampleQuery {
    /// Page size when `limit` is left out.
    pub const DEFAULT_LIMIT: usize = 10_000;
    /// Largest page a client may ask for.
    pub const MAX_LIMIT: usize = 1_000_000;
}

/// Response of `/samples`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SamplePage {
    /// The samples, in sequence order.
    pub samples: Vec<StoredSample>,
    /// Where to continue (`from_seq`), if the page was full.
    pub next_seq: Option<u64>,
}

/// What `PUT /v1/artifacts` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactInfo {
    /// sha256 of the bytes, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Every error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What was wrong; names the offending field where there is one.
    pub error: String,
}

/// What an operator token may do (each role includes the ones before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read (GET) every operator route.
    Viewer,
    /// Also set desired state and upload artifacts.
    Operator,
    /// Also manage tokens, bootstrap and revoke nodes, read the audit log.
    Admin,
}

/// An operator token as the hub lists it (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenView {
    /// Id (the part before the `.` of the bearer string).
    pub id: String,
    /// Name given at creation (shown in the audit log).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Unix ms of creation.
    pub created_ms: u64,
    /// Unix ms of expiry; `None`: never.
    pub expires_ms: Option<u64>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Name (1..=64 characters of `[A-Za-z0-9_.-]`).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Lifetime in seconds; `None`: never expires.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// What `POST /v1/tokens` answers: the secret, this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenIssued {
    /// The stored token.
    pub token: TokenView,
    /// The bearer string `<id>.<secret>`.
    pub secret: String,
}

/// What `POST /v1/nodes/{node}/bootstrap` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootstrapIssued {
    /// The node it admits.
    pub node: String,
    /// One-time join token `<secret>.<sha256 of the hub CA DER, hex>`.
    pub token: String,
    /// Unix ms after which it is refused.
    pub expires_ms: u64,
}

/// `POST /v1/join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The join token.
    pub token: String,
    /// PKCS#10 CSR (PEM) of the key the node made; only its key is used.
    pub csr_pem: String,
}

/// What `POST /v1/join` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinAnswer {
    /// The node's name (the certificate's CN).
    pub node: String,
    /// The node's client certificate (PEM).
    pub cert_pem: String,
    /// The hub CA certificate (PEM).
    pub ca_pem: String,
    /// The hub's desired-state signing key (hex Ed25519).
    pub hub_public_key: String,
    /// The broker to connect to, when the hub advertises one.
    pub mqtt_url: Option<String>,
    /// The node's current desired revision at the hub when it joined (0:
    /// none). The node refuses any document older than this, so an old
    /// signed document replayed to a wiped, re-joined node is not applied.
    #[serde(default)]
    pub min_revision: u64,
}

/// `POST /v1/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// CSR (PEM) of the node's (new or current) key.
    pub csr_pem: String,
}

/// What `POST /v1/renew` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewAnswer {
    /// The new client certificate (PEM).
    pub cert_pem: String,
}

/// One entry of the audit log (`GET /v1/audit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditRecord {
    /// Sequence number (increasing).
    pub seq: u64,
    /// Unix ms.
    pub at_ms: u64,
    /// Who: `token:NAME(ID)`, `node:NAME` or `anonymous`.
    pub who: String,
    /// HTTP method.
    pub method: String,
    /// Route pattern (`/v1/nodes/{node}/desired`).
    pub route: String,
    /// The concrete path (names the target).
    pub target: String,
    /// HTTP status of the answer (401/403 for refused calls).
    pub status: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_query_leaves_out_unset_fields_and_refuses_unknown_ones() {
        let q = SampleQuery {
            from_seq: Some(5),
            limit: Some(10),
            ..SampleQuery::default()
        };
        let text = serde_json::to_string(&q).unwrap();
        assert_eq!(text, r#"{"from_seq":5,"limit":10}"#);
        let err = serde_json::from_str::<SampleQuery>(r#"{"from":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `from`"), "{err}");
    }

    #[test]
    fn stream_stats_of_an_older_hub_still_decode() {
        let s: StreamStats = serde_json::from_str(
            r#"{"contiguous":3,"acked":3,"max_seen":4,"stored":4,"duplicates":0,"dropped_by_edge":0}"#,
        )
        .unwrap();
        assert_eq!((s.contiguous, s.gaps_seen, s.missing_now), (3, 0, 0));
    }
}
