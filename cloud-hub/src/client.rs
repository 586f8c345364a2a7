//! A typed client of the hub's REST API ([`crate::api`]).
//!
//! What the simulator, the tests and (later) `edgectl` use instead of
//! hand-written `reqwest` calls: one method per endpoint, the answers as the
//! [`protocols::api`] types, and errors that keep the hub's own message (which
//! names the offending field) next to the HTTP status.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cloud_hub::client::ClientError> {
//! let hub = cloud_hub::client::HubClient::new("http://127.0.0.1:8080")?;
//! for node in hub.nodes().await? {
//!     println!("{} at revision {}", node.node, node.desired_revision);
//! }
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use crate::control::api::{ChangeAnswer, RenderedView};
use protocols::api::{
    ArtifactInfo, AuditRecord, BootstrapIssued, DesiredAccepted, ErrorBody, HubInfo, JoinAnswer,
    JoinRequest, NodeView, RenewAnswer, RenewRequest, Role, SamplePage, SampleQuery, StoredSample,
    StreamStats, TokenIssued, TokenRequest, TokenView,
};
use protocols::{DesiredState, Event};
use serde::de::DeserializeOwned;

/// What a call to the hub can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not an `http://` or `https://` URL.
    #[error("hub url {0:?}: expected http://host:port")]
    BadUrl(String),
    /// The request did not get an answer (connect, timeout, broken body).
    #[error("{method} {path}: {source}")]
    Transport {
        /// HTTP method.
        method: &'static str,
        /// Path below the base URL.
        path: String,
        /// What reqwest reported.
        #[source]
        source: reqwest::Error,
    },
    /// The hub answered with an error status; `message` is its own text.
    #[error("{method} {path}: {status}: {message}")]
    Status {
        /// HTTP method.
        method: &'static str,
        /// Path below the base URL.
        path: String,
        /// The status code.
        status: u16,
        /// The hub's error text (names the offending field).
        message: String,
    },
    /// The token, CA or client certificate could not be read or used.
    #[error("hub credentials: {0}")]
    Credentials(String),
    /// The answer was not the JSON this client expects.
    #[error("{method} {path}: unexpected answer: {source}")]
    Decode {
        /// HTTP method.
        method: &'static str,
        /// Path below the base URL.
        path: String,
        /// Why it did not decode.
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status when the hub answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How a [`HubClient`] authenticates and whom it trusts.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bearer token (`<id>.<secret>`).
    pub token: Option<String>,
    /// The only CA trusted for `https://` (PEM); `None`: no TLS trust set up.
    pub ca_pem: Option<String>,
    /// Client certificate and key (PEM), e.g. a node's identity.
    pub identity: Option<(String, String)>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: None,
            ca_pem: None,
            identity: None,
            timeout: HubClient::DEFAULT_TIMEOUT,
        }
    }
}

/// A rustls client config trusting only `ca_pem`, presenting `identity`
/// (certificate PEM, key PEM) when given. What the hub's clients and the
/// edge's artifact fetcher use.
pub fn tls_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, ClientError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad =
        |what: &str, e: &dyn std::fmt::Display| ClientError::Credentials(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| bad("ca", &e))?)
            .map_err(|e| bad("ca", &e))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Credentials(
            "ca: no certificate in the PEM".into(),
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", &e))?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("certificate", &e))?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| bad("key", &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("certificate", &e))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A client of one hub. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct HubClient {
    base: String,
    http: reqwest::Client,
}

impl HubClient {
    /// Per-request timeout unless [`HubClient::with_timeout`] says otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// A client of the hub at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: impl Into<String>) -> Result<Self, ClientError> {
        Self::with_timeout(base, Self::DEFAULT_TIMEOUT)
    }

    /// As [`HubClient::new`], with a per-request timeout.
    pub fn with_timeout(base: impl Into<String>, timeout: Duration) -> Result<Self, ClientError> {
        Self::with_options(
            base,
            &ClientOptions {
                timeout,
                ..ClientOptions::default()
            },
        )
    }

    /// A client sending `token` as its bearer credential and trusting only
    /// the CA `ca_pem` for `https://` (the hub's `{data_dir}/ca/ca.crt`).
    pub fn authenticated(
        base: impl Into<String>,
        token: &str,
        ca_pem: Option<&str>,
    ) -> Result<Self, ClientError> {
        Self::with_options(
            base,
            &ClientOptions {
                token: Some(token.to_owned()),
                ca_pem: ca_pem.map(str::to_owned),
                ..ClientOptions::default()
            },
        )
    }

    /// The admin client of a hub whose data directory is local: the first
    /// admin token (`{data_dir}/admin.token`) and the CA
    /// (`{data_dir}/ca/ca.crt`).
    pub fn local_admin(
        base: impl Into<String>,
        data_dir: &std::path::Path,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let read = |p: std::path::PathBuf| {
            std::fs::read_to_string(&p)
                .map_err(|e| ClientError::Credentials(format!("{}: {e}", p.display())))
        };
        Self::with_options(
            base,
            &ClientOptions {
                token: Some(read(data_dir.join("admin.token"))?.trim().to_owned()),
                ca_pem: Some(read(data_dir.join("ca").join("ca.crt"))?),
                timeout,
                ..ClientOptions::default()
            },
        )
    }

    /// A client with every option.
    pub fn with_options(
        base: impl Into<String>,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let base = base.into().trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(base));
        }
        let mut builder = reqwest::Client::builder().timeout(opts.timeout);
        if let Some(token) = &opts.token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| ClientError::Credentials("token: not a valid header value".into()))?;
            v.set_sensitive(true);
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::AUTHORIZATION, v);
            builder = builder.default_headers(headers);
        }
        if let Some(ca) = &opts.ca_pem {
            let identity = opts
                .identity
                .as_ref()
                .map(|(c, k)| (c.as_str(), k.as_str()));
            builder = builder.use_preconfigured_tls(tls_config(ca, identity)?);
        }
        let http = builder.build().map_err(|source| ClientError::Transport {
            method: "BUILD",
            path: String::new(),
            source,
        })?;
        Ok(Self { base, http })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /healthz`: the process is up.
    pub async fn healthy(&self) -> Result<(), ClientError> {
        self.send("GET", "/healthz", self.http.get(self.url("/healthz")))
            .await
            .map(drop)
    }

    /// `GET /readyz`: `true` once the hub's MQTT session is subscribed
    /// (a 503 is `false`, not an error).
    pub async fn ready(&self) -> Result<bool, ClientError> {
        match self
            .send("GET", "/readyz", self.http.get(self.url("/readyz")))
            .await
        {
            Ok(_) => Ok(true),
            Err(ClientError::Status { status: 503, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/hub`.
    pub async fn hub_info(&self) -> Result<HubInfo, ClientError> {
        self.get_json("/v1/hub").await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        self.get_json("/v1/nodes").await
    }

    /// `GET /v1/nodes/{node}`; `None` when the hub does not know the node.
    pub async fn node(&self, node: &str) -> Result<Option<NodeView>, ClientError> {
        match self.get_json(&format!("/v1/nodes/{node}")).await {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /v1/nodes/{node}/desired` for `desired.node`.
    pub async fn put_desired(
        &self,
        desired: &DesiredState,
    ) -> Result<DesiredAccepted, ClientError> {
        let path = format!("/v1/nodes/{}/desired", desired.node);
        let req = self.http.put(self.url(&path)).json(desired);
        self.json("PUT", &path, req).await
    }

    /// `PUT /v1/nodes/{node}/desired` with a raw JSON document (as an
    /// operator's file would be sent; the hub validates it).
    pub async fn put_desired_json(
        &self,
        node: &str,
        document: &serde_json::Value,
    ) -> Result<DesiredAccepted, ClientError> {
        let path = format!("/v1/nodes/{node}/desired");
        let req = self.http.put(self.url(&path)).json(document);
        self.json("PUT", &path, req).await
    }

    /// `GET /v1/nodes/{node}/streams`.
    pub async fn streams(&self, node: &str) -> Result<BTreeMap<String, StreamStats>, ClientError> {
        self.get_json(&format!("/v1/nodes/{node}/streams")).await
    }

    /// `GET /v1/nodes/{node}/streams/{stream}/samples`: one page.
    pub async fn samples(
        &self,
        node: &str,
        stream: &str,
        query: &SampleQuery,
    ) -> Result<SamplePage, ClientError> {
        let path = format!("/v1/nodes/{node}/streams/{stream}/samples");
        let req = self.http.get(self.url(&path)).query(query);
        self.json("GET", &path, req).await
    }

    /// Every stored sample of a stream from `from_seq` on, page by page.
    pub async fn all_samples(
        &self,
        node: &str,
        stream: &str,
        from_seq: u64,
    ) -> Result<Vec<StoredSample>, ClientError> {
        let mut out = Vec::new();
        let mut next = Some(from_seq);
        while let Some(from) = next {
            let page = self
                .samples(
                    node,
                    stream,
                    &SampleQuery {
                        from_seq: Some(from),
                        ..SampleQuery::default()
                    },
                )
                .await?;
            out.extend(page.samples);
            next = page.next_seq;
        }
        Ok(out)
    }

    /// `GET /v1/nodes/{node}/events`.
    pub async fn events(&self, node: &str) -> Result<Vec<Event>, ClientError> {
        self.get_json(&format!("/v1/nodes/{node}/events")).await
    }

    /// `PUT /v1/artifacts`.
    pub async fn put_artifact(&self, bytes: Vec<u8>) -> Result<ArtifactInfo, ClientError> {
        let req = self.http.put(self.url("/v1/artifacts")).body(bytes);
        self.json("PUT", "/v1/artifacts", req).await
    }

    /// `GET /v1/artifacts/{sha256}`: the whole blob.
    pub async fn artifact(&self, sha256: &str) -> Result<Vec<u8>, ClientError> {
        let path = format!("/v1/artifacts/{sha256}");
        let resp = self
            .send("GET", &path, self.http.get(self.url(&path)))
            .await?;
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|source| ClientError::Transport {
                method: "GET",
                path,
                source,
            })
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let resp = self
            .send("GET", "/metrics", self.http.get(self.url("/metrics")))
            .await?;
        resp.text().await.map_err(|source| ClientError::Transport {
            method: "GET",
            path: "/metrics".into(),
            source,
        })
    }

    /// `POST /v1/tokens` (admin): the new token and its secret.
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        ttl: Option<Duration>,
    ) -> Result<TokenIssued, ClientError> {
        let body = TokenRequest {
            name: name.to_owned(),
            role,
            ttl_secs: ttl.map(|t| t.as_secs()),
        };
        let req = self.http.post(self.url("/v1/tokens")).json(&body);
        self.json("POST", "/v1/tokens", req).await
    }

    /// `GET /v1/tokens` (admin).
    pub async fn tokens(&self) -> Result<Vec<TokenView>, ClientError> {
        self.get_json("/v1/tokens").await
    }

    /// `DELETE /v1/tokens/{id}` (admin).
    pub async fn delete_token(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/tokens/{id}");
        self.send("DELETE", &path, self.http.delete(self.url(&path)))
            .await
            .map(drop)
    }

    /// `DELETE /v1/artifacts/{sha256}` (admin): refused (409) while a node's
    /// desired state references it.
    pub async fn delete_artifact(&self, sha256: &str) -> Result<(), ClientError> {
        let path = format!("/v1/artifacts/{sha256}");
        self.send("DELETE", &path, self.http.delete(self.url(&path)))
            .await
            .map(drop)
    }

    /// `POST /v1/artifacts/gc` (admin): deletes unreferenced blobs older than
    /// the grace period; returns their digests.
    pub async fn gc_artifacts(&self) -> Result<Vec<String>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Deleted {
            deleted: Vec<String>,
        }
        let path = "/v1/artifacts/gc";
        let req = self.http.post(self.url(path));
        let d: Deleted = self.json("POST", path, req).await?;
        Ok(d.deleted)
    }

    /// `POST /v1/nodes/{node}/bootstrap` (admin): a one-time join token.
    pub async fn bootstrap(&self, node: &str) -> Result<BootstrapIssued, ClientError> {
        let path = format!("/v1/nodes/{node}/bootstrap");
        let req = self.http.post(self.url(&path));
        self.json("POST", &path, req).await
    }

    /// `POST /v1/nodes/{node}/revoke` (admin).
    pub async fn revoke(&self, node: &str) -> Result<(), ClientError> {
        let path = format!("/v1/nodes/{node}/revoke");
        self.send("POST", &path, self.http.post(self.url(&path)))
            .await
            .map(drop)
    }

    /// `POST /v1/join` (no credential: the token is the credential).
    pub async fn join(&self, token: &str, csr_pem: &str) -> Result<JoinAnswer, ClientError> {
        let body = JoinRequest {
            token: token.to_owned(),
            csr_pem: csr_pem.to_owned(),
        };
        let req = self.http.post(self.url("/v1/join")).json(&body);
        self.json("POST", "/v1/join", req).await
    }

    /// `POST /v1/renew` (node client certificate).
    pub async fn renew(&self, csr_pem: &str) -> Result<RenewAnswer, ClientError> {
        let body = RenewRequest {
            csr_pem: csr_pem.to_owned(),
        };
        let req = self.http.post(self.url("/v1/renew")).json(&body);
        self.json("POST", "/v1/renew", req).await
    }

    /// `GET /v1/audit?limit=` (admin): newest first.
    pub async fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, ClientError> {
        let req = self
            .http
            .get(self.url("/v1/audit"))
            .query(&[("limit", limit)]);
        self.json("GET", "/v1/audit", req).await
    }

    /// `PUT /v1/nodes/{node}/labels` (operator) with a JSON body of
    /// [`protocols::control::Node`] fields (`name` may be left out).
    pub async fn put_labels(
        &self,
        node: &str,
        body: &serde_json::Value,
    ) -> Result<ChangeAnswer, ClientError> {
        let path = format!("/v1/nodes/{node}/labels");
        let req = self.http.put(self.url(&path)).json(body);
        self.json("PUT", &path, req).await
    }

    /// `GET /v1/nodes/{node}/rendered`: labels, contributing deployments,
    /// last rendered digest and revision.
    pub async fn rendered(&self, node: &str) -> Result<RenderedView, ClientError> {
        self.get_json(&format!("/v1/nodes/{node}/rendered")).await
    }

    /// `PUT /v1/deployments/{name}` (operator) with a JSON body of
    /// [`protocols::control::Deployment`] fields (`name` may be left out).
    pub async fn put_deployment(
        &self,
        name: &str,
        body: &serde_json::Value,
    ) -> Result<ChangeAnswer, ClientError> {
        let path = format!("/v1/deployments/{name}");
        let req = self.http.put(self.url(&path)).json(body);
        self.json("PUT", &path, req).await
    }

    /// `GET /v1/deployments/{name}`; `None` when there is none.
    pub async fn deployment(
        &self,
        name: &str,
    ) -> Result<Option<protocols::control::Deployment>, ClientError> {
        match self.get_json(&format!("/v1/deployments/{name}")).await {
            Ok(d) => Ok(Some(d)),
            Err(ClientError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/deployments`.
    pub async fn deployments(&self) -> Result<Vec<protocols::control::Deployment>, ClientError> {
        self.get_json("/v1/deployments").await
    }

    /// `DELETE /v1/deployments/{name}` (operator).
    pub async fn delete_deployment(&self, name: &str) -> Result<ChangeAnswer, ClientError> {
        let path = format!("/v1/deployments/{name}");
        let req = self.http.delete(self.url(&path));
        self.json("DELETE", &path, req).await
    }

    /// `GET /v1/rollouts`.
    pub async fn rollouts(
        &self,
    ) -> Result<Vec<crate::control::rollout_api::RolloutSummary>, ClientError> {
        self.get_json("/v1/rollouts").await
    }

    /// `GET /v1/rollouts/{id}`: spec, bounded status, changed functions.
    pub async fn rollout(
        &self,
        id: &str,
    ) -> Result<crate::control::store::RolloutRecord, ClientError> {
        self.get_json(&format!("/v1/rollouts/{id}")).await
    }

    /// `GET /v1/rollouts/{id}/nodes[?state=…]`: per-node progress (first
    /// 1000).
    pub async fn rollout_nodes(
        &self,
        id: &str,
        state: Option<&str>,
    ) -> Result<Vec<crate::control::rollout_api::NodeEntry>, ClientError> {
        let q = state.map(|s| format!("?state={s}")).unwrap_or_default();
        self.get_json(&format!("/v1/rollouts/{id}/nodes{q}")).await
    }

    /// `POST /v1/rollouts/{id}/{pause|resume|cancel}` (operator).
    pub async fn rollout_command(
        &self,
        id: &str,
        command: &str,
    ) -> Result<crate::control::store::RolloutRecord, ClientError> {
        let path = format!("/v1/rollouts/{id}/{command}");
        let req = self.http.post(self.url(&path));
        self.json("POST", &path, req).await
    }

    /// `GET /v1/rollouts/{id}/watch`: calls `on_status` with the rollout's
    /// status now and at every change, until it reaches a final phase (the
    /// hub then ends the stream) or `on_status` returns `false`.
    pub async fn watch_rollout(
        &self,
        id: &str,
        mut on_status: impl FnMut(protocols::control::RolloutStatus) -> bool,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/rollouts/{id}/watch");
        let mut resp = self
            .send("GET", &path, self.http.get(self.url(&path)))
            .await?;
        let mut buf = String::new();
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|source| ClientError::Transport {
                    method: "GET",
                    path: path.clone(),
                    source,
                })?;
            let Some(chunk) = chunk else {
                return Ok(());
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            // Events end with a blank line; keep a partial one for later.
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let is_status = event.lines().any(|l| l == "event: status");
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                    .collect();
                if !is_status || data.is_empty() {
                    continue;
                }
                let status = serde_json::from_str(&data).map_err(|source| ClientError::Decode {
                    method: "GET",
                    path: path.clone(),
                    source,
                })?;
                if !on_status(status) {
                    return Ok(());
                }
            }
        }
    }

    /// `GET /v1/deployments/{name}/history`.
    pub async fn deployment_history(
        &self,
        name: &str,
    ) -> Result<Vec<crate::control::rollout_api::HistoryEntry>, ClientError> {
        self.get_json(&format!("/v1/deployments/{name}/history"))
            .await
    }

    /// `POST /v1/deployments/{name}/undo` (operator), body as documented
    /// in [`crate::control::rollout_api`].
    pub async fn undo_deployment(
        &self,
        name: &str,
        body: &serde_json::Value,
    ) -> Result<ChangeAnswer, ClientError> {
        let path = format!("/v1/deployments/{name}/undo");
        let req = self.http.post(self.url(&path)).json(body);
        self.json("POST", &path, req).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json("GET", path, self.http.get(self.url(path))).await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, req).await?;
        let body = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                method,
                path: path.to_owned(),
                source,
            })?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
            method,
            path: path.to_owned(),
            source,
        })
    }

    /// Sends, and turns an error status into [`ClientError::Status`] with the
    /// hub's message.
    async fn send(
        &self,
        method: &'static str,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Transport {
            method,
            path: path.to_owned(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text).map_or(text, |b| b.error);
        Err(ClientError::Status {
            method,
            path: path.to_owned(),
            status: status.as_u16(),
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_must_be_http() {
        let e = HubClient::new("127.0.0.1:8080").unwrap_err();
        assert!(e.to_string().contains("expected http://host:port"), "{e}");
        let c = HubClient::new("http://127.0.0.1:8080/").unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:8080");
    }
}
