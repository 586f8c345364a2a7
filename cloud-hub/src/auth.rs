//! Who may call the REST API: operator bearer tokens with roles, one-time
//! node join tokens, and the route policy ([`required`]).
//!
//! - **Operator tokens** (`Authorization: Bearer <id>.<secret>`) carry a
//!   [`Role`]: viewer (GET), operator (+ desired state, artifact upload),
//!   admin (+ tokens, bootstrap, revoke, audit). The hub stores only the
//!   sha256 of the secret and compares in constant time. At first start it
//!   creates an admin token and writes it to `{data_dir}/admin.token`
//!   (0600); the log names the file, never the secret.
//! - **Join tokens** (`<secret>.<sha256 of the CA certificate DER, hex>`)
//!   admit one node once: stored as the hash of the secret with node and
//!   expiry, consumed by a sled compare-and-swap so two concurrent joins
//!   cannot both succeed. The second half pins the hub CA for the joining
//!   edge (like kubeadm's discovery hash).
//! - **Nodes** authenticate with their client certificate (`OU=node`), and
//!   may only fetch artifacts of their own desired state and renew.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

pub use protocols::api::{Role, TokenView};

use crate::ca::{unix_ms, write_atomic};

/// Why a credential was refused or the store failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential where one is required.
    #[error("authorization: a bearer token or a client certificate is required")]
    Missing,
    /// The bearer token is not one the hub issued (or was deleted).
    #[error("authorization: unknown or malformed bearer token")]
    UnknownToken,
    /// The bearer token's ttl has passed.
    #[error("authorization: token {0:?} expired")]
    Expired(String),
    /// The join token is not one the hub issued.
    #[error("token: unknown join token")]
    UnknownJoin,
    /// The join token was already used.
    #[error("token: join token already used")]
    JoinReused,
    /// The join token's ttl has passed.
    #[error("token: join token expired")]
    JoinExpired,
    /// The join token pins another CA than this hub's.
    #[error("token: join token pins CA {0}, not this hub's")]
    JoinWrongCa(String),
    /// Store failure.
    #[error("auth store: {0}")]
    Store(#[from] sled::Error),
    /// Writing the admin token file failed.
    #[error("admin token {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An operator bearer token.
    Token {
        /// Token id.
        id: String,
        /// Token name.
        name: String,
        /// Its role.
        role: Role,
    },
    /// A node, by its client certificate.
    Node(String),
    /// No credential (public routes only).
    Anonymous,
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { id, name, .. } => write!(f, "token:{name}({id})"),
            Self::Node(n) => write!(f, "node:{n}"),
            Self::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone (health, readiness, join, the OpenAPI document).
    Public,
    /// An operator token with at least this role.
    Role(Role),
    /// A node certificate (renew).
    Node,
    /// A token with the viewer role, or a node whose desired state
    /// references the artifact (checked by the caller).
    ArtifactRead,
}

/// What `method` on the route pattern `route` needs.
pub fn required(method: &str, route: &str) -> Need {
    match (method, route) {
        ("GET", "/healthz" | "/readyz" | "/openapi.json") | ("POST", "/v1/join") => Need::Public,
        ("POST", "/v1/renew") => Need::Node,
        ("GET", "/v1/artifacts/{sha256}") => Need::ArtifactRead,
        ("GET", "/v1/tokens" | "/v1/audit")
        | (
            "POST",
            "/v1/tokens"
            | "/v1/nodes/{node}/bootstrap"
            | "/v1/nodes/{node}/revoke"
            | "/v1/artifacts/gc",
        )
        | ("DELETE", "/v1/tokens/{id}" | "/v1/artifacts/{sha256}") => Need::Role(Role::Admin),
        ("GET" | "HEAD", _) => Need::Role(Role::Viewer),
        _ => Need::Role(Role::Operator),
    }
}

/// A stored operator token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    view: TokenView,
    /// sha256 of the secret, hex.
    hash: String,
}

/// A stored join token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct JoinRecord {
    node: String,
    expires_ms: u64,
    used: bool,
}

/// The token stores.
#[derive(Debug)]
pub struct Auth {
    tokens: sled::Tree,
    joins: sled::Tree,
    grants: sled::Tree,
}

/// A freshly issued operator token: the secret is only here.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// What is stored.
    pub view: TokenView,
    /// `<id>.<secret>`, shown once.
    pub secret: String,
}

fn sha_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

impl Auth {
    /// The `tokens` and `join_tokens` trees of `db`.
    pub fn open(db: &sled::Db) -> Result<Self, AuthError> {
        Ok(Self {
            tokens: db.open_tree("tokens")?,
            joins: db.open_tree("join_tokens")?,
            grants: db.open_tree("artifact_grants")?,
        })
    }

    /// Records the artifacts `node` may fetch besides those of its current
    /// desired state: those of the one before (the edge keeps the previous
    /// desired state's blobs to roll back to, and may still be fetching them).
    pub fn grant_artifacts(
        &self,
        node: &str,
        digests: &std::collections::BTreeSet<String>,
    ) -> Result<(), AuthError> {
        self.grants.insert(
            node.as_bytes(),
            serde_json::to_vec(digests).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// Every digest granted to any node.
    pub fn all_granted(&self) -> std::collections::BTreeSet<String> {
        self.grants
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, v)| {
                serde_json::from_slice::<std::collections::BTreeSet<String>>(&v).ok()
            })
            .flatten()
            .collect()
    }

    /// Whether [`Auth::grant_artifacts`] granted `sha256` to `node`.
    pub fn granted(&self, node: &str, sha256: &str) -> bool {
        self.grants
            .get(node.as_bytes())
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice::<Vec<String>>(&v).ok())
            .is_some_and(|d| d.iter().any(|x| x == sha256))
    }

    /// At first start (no token stored and no `admin.token` file): creates
    /// an admin token and writes it to `{data_dir}/admin.token` (0600).
    pub fn ensure_admin(&self, data_dir: &Path) -> Result<(), AuthError> {
        let path = data_dir.join("admin.token");
        if path.exists() || !self.tokens.is_empty() {
            return Ok(());
        }
        let t = self.issue("admin", Role::Admin, None)?;
        write_atomic(&path, &format!("{}\n", t.secret), true).map_err(|source| AuthError::Io {
            path: path.display().to_string(),
            source,
        })?;
        tracing::info!(path = %path.display(), "created the first admin token (file mode 0600)");
        Ok(())
    }

    /// Issues an operator token (`ttl` `None`: no expiry).
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        ttl: Option<Duration>,
    ) -> Result<NewToken, AuthError> {
        let id = random_hex(8);
        let secret = random_hex(32);
        let created_ms = now_ms();
        let view = TokenView {
            id: id.clone(),
            name: name.to_owned(),
            role,
            created_ms,
            expires_ms: ttl.map(|t| {
                created_ms.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
            }),
        };
        let rec = TokenRecord {
            view: view.clone(),
            hash: sha_hex(&secret),
        };
        self.tokens
            .insert(id.as_bytes(), serde_json::to_vec(&rec).unwrap_or_default())?;
        self.tokens.flush()?;
        Ok(NewToken {
            view,
            secret: format!("{id}.{secret}"),
        })
    }

    /// Every token (without secrets).
    pub fn list(&self) -> Vec<TokenView> {
        self.tokens
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, v)| serde_json::from_slice::<TokenRecord>(&v).ok())
            .map(|r| r.view)
            .collect()
    }

    /// Deletes a token; `false` when there was none.
    pub fn delete(&self, id: &str) -> Result<bool, AuthError> {
        let gone = self.tokens.remove(id.as_bytes())?.is_some();
        self.tokens.flush()?;
        Ok(gone)
    }

    /// The principal of a bearer token.
    pub fn verify(&self, bearer: &str) -> Result<Principal, AuthError> {
        let (id, secret) = bearer
            .trim()
            .split_once('.')
            .ok_or(AuthError::UnknownToken)?;
        let rec: TokenRecord = self
            .tokens
            .get(id.as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .ok_or(AuthError::UnknownToken)?;
        let given = sha_hex(secret);
        if !bool::from(given.as_bytes().ct_eq(rec.hash.as_bytes())) {
            return Err(AuthError::UnknownToken);
        }
        if rec.view.expires_ms.is_some_and(|e| now_ms() >= e) {
            return Err(AuthError::Expired(rec.view.name));
        }
        Ok(Principal::Token {
            id: rec.view.id,
            name: rec.view.name,
            role: rec.view.role,
        })
    }

    /// A one-time join token for `node`, pinning the CA `ca_fingerprint`.
    pub fn bootstrap(
        &self,
        node: &str,
        ttl: Duration,
        ca_fingerprint: &str,
    ) -> Result<(String, u64), AuthError> {
        self.purge_expired_joins()?;
        let secret = random_hex(32);
        let expires_ms =
            now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let rec = JoinRecord {
            node: node.to_owned(),
            expires_ms,
            used: false,
        };
        self.joins.insert(
            sha_hex(&secret),
            serde_json::to_vec(&rec).unwrap_or_default(),
        )?;
        self.joins.flush()?;
        Ok((format!("{secret}.{ca_fingerprint}"), expires_ms))
    }

    /// Consumes a join token: the node it admits, exactly once.
    pub fn consume_join(&self, token: &str, ca_fingerprint: &str) -> Result<String, AuthError> {
        let (secret, pin) = token.trim().split_once('.').ok_or(AuthError::UnknownJoin)?;
        if !bool::from(pin.as_bytes().ct_eq(ca_fingerprint.as_bytes())) {
            return Err(AuthError::JoinWrongCa(pin.chars().take(16).collect()));
        }
        let key = sha_hex(secret);
        let old = self.joins.get(&key)?.ok_or(AuthError::UnknownJoin)?;
        let rec: JoinRecord = serde_json::from_slice(&old).map_err(|_| AuthError::UnknownJoin)?;
        if rec.used {
            return Err(AuthError::JoinReused);
        }
        if now_ms() >= rec.expires_ms {
            return Err(AuthError::JoinExpired);
        }
        let used = JoinRecord {
            used: true,
            ..rec.clone()
        };
        let new = serde_json::to_vec(&used).unwrap_or_default();
        match self.joins.compare_and_swap(&key, Some(old), Some(new))? {
            Ok(()) => {
                self.joins.flush()?;
                Ok(rec.node)
            }
            Err(_) => Err(AuthError::JoinReused),
        }
    }

    fn purge_expired_joins(&self) -> Result<(), AuthError> {
        let now = now_ms();
        for (k, v) in self.joins.iter().filter_map(Result::ok) {
            let expired =
                serde_json::from_slice::<JoinRecord>(&v).map_or(true, |r| now >= r.expires_ms);
            if expired {
                self.joins.remove(k)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn auth() -> Auth {
        Auth::open(&sled::Config::new().temporary(true).open().unwrap()).unwrap()
    }

    #[test]
    fn tokens_verify_by_secret_and_expire() {
        let a = auth();
        let t = a.issue("ci", Role::Operator, None).unwrap();
        assert!(matches!(
            a.verify(&t.secret).unwrap(),
            Principal::Token {
                role: Role::Operator,
                ..
            }
        ));
        let (id, _) = t.secret.split_once('.').unwrap();
        assert!(matches!(
            a.verify(&format!("{id}.{}", "0".repeat(64))),
            Err(AuthError::UnknownToken)
        ));
        assert!(matches!(a.verify("nodot"), Err(AuthError::UnknownToken)));
        let short = a
            .issue("short", Role::Viewer, Some(Duration::ZERO))
            .unwrap();
        assert!(matches!(a.verify(&short.secret), Err(AuthError::Expired(n)) if n == "short"));
        assert!(a.delete(id).unwrap());
        assert!(matches!(a.verify(&t.secret), Err(AuthError::UnknownToken)));
    }

    #[test]
    fn a_join_token_works_once_and_not_after_its_ttl() {
        let a = auth();
        let (t, _) = a.bootstrap("n1", Duration::from_secs(60), "ca1").unwrap();
        assert!(matches!(
            a.consume_join(&t, "ca2"),
            Err(AuthError::JoinWrongCa(_))
        ));
        assert_eq!(a.consume_join(&t, "ca1").unwrap(), "n1");
        assert!(matches!(
            a.consume_join(&t, "ca1"),
            Err(AuthError::JoinReused)
        ));
        let (old, _) = a.bootstrap("n2", Duration::ZERO, "ca1").unwrap();
        assert!(matches!(
            a.consume_join(&old, "ca1"),
            Err(AuthError::JoinExpired)
        ));
        assert!(matches!(
            a.consume_join("x.ca1", "ca1"),
            Err(AuthError::UnknownJoin)
        ));
    }

    #[test]
    fn the_route_policy() {
        assert_eq!(required("GET", "/healthz"), Need::Public);
        assert_eq!(required("POST", "/v1/join"), Need::Public);
        assert_eq!(required("GET", "/openapi.json"), Need::Public);
        assert_eq!(required("GET", "/v1/nodes"), Need::Role(Role::Viewer));
        assert_eq!(
            required("PUT", "/v1/nodes/{node}/desired"),
            Need::Role(Role::Operator)
        );
        assert_eq!(
            required("DELETE", "/v1/tokens/{id}"),
            Need::Role(Role::Admin)
        );
        assert_eq!(required("GET", "/v1/audit"), Need::Role(Role::Admin));
        assert_eq!(required("POST", "/v1/renew"), Need::Node);
    }
}
