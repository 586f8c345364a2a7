//! The shared state of a running hub: [`Hub`] (signing key, topics, registry,
//! sink, metrics, artifacts, events, the MQTT client), [`EventLog`], and the
//! errors of the hub ([`HubError`]) and of [`Hub::set_desired`]
//! ([`SetDesiredError`]).
//!
//! Every task of [`crate::app::App`] holds an `Arc<Hub>`; the REST API
//! ([`crate::api`]) reads and writes through it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use protocols::signing::SigningKey;
use protocols::{DesiredState, Event, SignedDesired, TopicKind, Topics};
use rumqttc::{AsyncClient, QoS};

use crate::commit::GroupCommit;
use crate::config::HubConfig;
use crate::keys::{self, KeyError};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryError};
use crate::session::Readiness;
use crate::sink::{Sink, SinkError};

/// Why the hub failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The database could not be opened.
    #[error("cannot open hub database at {path}: {source}")]
    Open {
        /// Path.
        path: String,
        /// sled error.
        #[source]
        source: sled::Error,
    },
    /// Registry failure.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Sink failure.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// Signing key failure.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Embedded broker failure.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// The artifact store could not be opened.
    #[error(transparent)]
    Artifacts(#[from] crate::artifacts::ArtifactError),
    /// The HTTP listener could not bind.
    #[error("http_listen {addr}: {source}")]
    Http {
        /// Address.
        addr: SocketAddr,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A document could not be encoded or signed.
    #[error(transparent)]
    Codec(#[from] protocols::CodecError),
    /// The MQTT client is gone (shutting down).
    #[error("mqtt client closed: {0}")]
    Mqtt(String),
    /// Desired state could not be made durable.
    #[error(transparent)]
    Commit(#[from] crate::commit::CommitError),
    /// A task panicked.
    #[error("hub task failed: {0}")]
    Task(String),
    /// The CA could not be opened or created.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// The token store failed.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The audit log could not be opened.
    #[error("audit log: {0}")]
    Audit(sled::Error),
    /// The control-plane store could not be opened.
    #[error(transparent)]
    Control(#[from] crate::control::StoreError),
    /// HTTPS could not be set up.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A file of the external broker link (`[mqtt]`) could not be read or
    /// used.
    #[error("{field} {path}: {detail}")]
    MqttLink {
        /// The config field (`mqtt.tls.ca_file`, `mqtt.password_file`, …).
        field: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
}

/// Why [`Hub::set_desired`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SetDesiredError {
    /// The revision is not the next one (revisions are assigned by the hub).
    #[error(
        "revision {got} is not the next revision of node {node} (current {current}); send revision 0 to let the hub assign it"
    )]
    Stale {
        /// The node.
        node: String,
        /// Revision offered.
        got: u64,
        /// Revision stored.
        current: u64,
    },
    /// Signing, storing, committing or publishing failed.
    #[error(transparent)]
    Hub(#[from] HubError),
}

impl From<RegistryError> for SetDesiredError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::StaleRevision { node, got, current } => {
                Self::Stale { node, got, current }
            }
            e => Self::Hub(HubError::Registry(e)),
        }
    }
}

/// Shared state of a running hub.
#[derive(Debug)]
pub struct Hub {
    /// Signs desired state.
    pub key: SigningKey,
    /// Topic scheme.
    pub topics: Topics,
    /// Node registry.
    pub registry: Registry,
    /// Telemetry sink.
    pub sink: Sink,
    /// Counters.
    pub metrics: Metrics,
    /// Content-addressed blobs (WASM modules, models).
    pub artifacts: Arc<crate::artifacts::ArtifactStore>,
    /// Most recent events per node.
    pub events: EventLog,
    /// The certificate authority (`{data_dir}/ca`).
    pub ca: crate::ca::Ca,
    /// Operator and join tokens.
    pub auth: crate::auth::Auth,
    /// Who changed what.
    pub audit: crate::audit::AuditLog,
    /// Certificate validity, join-token ttl.
    pub security: crate::config::SecurityConfig,
    /// Bounds on what nodes can make the hub hold.
    pub limits: crate::config::LimitsConfig,
    /// Node labels, deployments and what was rendered ([`crate::control`]).
    pub control: crate::control::Control,
    /// Whether the MQTT session is subscribed and desired state republished
    /// (owned by [`crate::session`]).
    pub(crate) readiness: Readiness,
    pub(crate) client: AsyncClient,
    commit: GroupCommit,
    pub(crate) db: sled::Db,
}

/// What [`Hub::new`] puts together: the stores opened from the data directory.
#[derive(Debug)]
pub(crate) struct Stores {
    pub(crate) db: sled::Db,
    pub(crate) key: SigningKey,
    pub(crate) artifacts: crate::artifacts::ArtifactStore,
    pub(crate) registry: Registry,
    pub(crate) sink: Sink,
    pub(crate) ca: crate::ca::Ca,
    pub(crate) auth: crate::auth::Auth,
    pub(crate) audit: crate::audit::AuditLog,
    pub(crate) security: crate::config::SecurityConfig,
    pub(crate) limits: crate::config::LimitsConfig,
    pub(crate) control: crate::control::Control,
}

impl Stores {
    /// Opens the database (`{data_dir}/db`), the signing key, the artifact
    /// store, the registry and the sink; blocking work runs off the runtime.
    pub(crate) async fn open(cfg: &HubConfig) -> Result<Self, HubError> {
        let data_dir = cfg.data_dir.clone();
        let cache = cfg.cache_capacity_bytes;
        let db = tokio::task::spawn_blocking(move || {
            sled::Config::new()
                .path(data_dir.join("db"))
                .cache_capacity(cache)
                .flush_every_ms(Some(1_000))
                .open()
                .map_err(|source| HubError::Open {
                    path: data_dir.join("db").display().to_string(),
                    source,
                })
        })
        .await
        .map_err(|e| HubError::Task(e.to_string()))??;
        let key = keys::load_or_create(&cfg.data_dir)?;
        let artifacts = {
            let dir = cfg.data_dir.join("artifacts");
            let limits = cfg.limits.artifacts();
            tokio::task::spawn_blocking(move || {
                crate::artifacts::ArtifactStore::open_with(&dir, limits)
            })
            .await
            .map_err(|e| HubError::Task(e.to_string()))??
        };
        let registry = Registry::open_with(&db, cfg.limits.max_nodes)?;
        let sink = Sink::open_with(&db, cfg.limits.sink())?;
        // Floors the nodes confirmed before the restart (the sink keeps them
        // in memory only).
        for (node, rec) in registry.all()? {
            for (stream, floor) in rec.reported.map(|r| r.backlog.floors).unwrap_or_default() {
                if let Err(e) = sink.confirm_floor(&node, &stream, floor) {
                    tracing::warn!(node = %node, stream = %stream, error = %e, "confirmed floor not restored");
                }
            }
        }
        let ca = crate::ca::Ca::open(&cfg.data_dir.join("ca"), &db)?;
        let auth = crate::auth::Auth::open(&db)?;
        auth.ensure_admin(&cfg.data_dir)?;
        let audit = crate::audit::AuditLog::open(&db, cfg.security.audit_capacity)
            .map_err(HubError::Audit)?;
        let control = crate::control::Control::open(&db, cfg.limits.max_deployments)?;
        Ok(Self {
            control,
            db,
            key,
            artifacts,
            registry,
            sink,
            ca,
            auth,
            audit,
            security: cfg.security.clone(),
            limits: cfg.limits,
        })
    }
}

impl Hub {
    /// The shared state over opened `stores`, publishing through `client`.
    pub(crate) fn new(stores: Stores, topics: Topics, client: AsyncClient) -> Self {
        let Stores {
            db,
            key,
            artifacts,
            registry,
            sink,
            ca,
            auth,
            audit,
            security,
            limits,
            control,
        } = stores;
        Self {
            key,
            topics,
            registry,
            sink,
            metrics: Metrics::default(),
            artifacts: Arc::new(artifacts),
            events: EventLog::new(limits.max_nodes),
            ca,
            auth,
            audit,
            security,
            limits,
            control,
            readiness: Readiness::default(),
            client,
            commit: GroupCommit::new(db.clone()),
            db,
        }
    }

    /// Whether the hub's MQTT session is up, subscribed, and has republished
    /// desired state. Clients that connect nodes should wait for this
    /// (`GET /readyz`): a broker may hand a later wildcard subscription only
    /// part of the retained messages (rumqttd forwards at most one inflight
    /// window, 100, of them), so node status published before the hub
    /// subscribed can be missed.
    pub fn mqtt_ready(&self) -> bool {
        self.readiness.ready()
    }

    /// Signs, stores (durably) and publishes a node's new desired state at
    /// the revision the hub assigns (the next one; `desired.revision` is 0
    /// or must name exactly that one). Returns the revision.
    pub async fn set_desired(&self, desired: &DesiredState) -> Result<u64, SetDesiredError> {
        let (revision, doc) = self.store_desired(desired)?;
        self.commit.commit().await.map_err(HubError::from)?;
        self.publish_desired(&desired.node, &doc).await?;
        Ok(revision)
    }

    /// The first half of [`Hub::set_desired`]: assigns the revision, signs
    /// and stores the document, but neither commits nor publishes. Callers
    /// storing many documents commit once, then publish each
    /// ([`Hub::publish_desired`]): nothing is published before it is
    /// durable.
    pub(crate) fn store_desired(
        &self,
        desired: &DesiredState,
    ) -> Result<(u64, SignedDesired), SetDesiredError> {
        Ok(self
            .registry
            .set_desired(&desired.node, desired.revision, |revision| {
                let d = DesiredState {
                    revision,
                    ..desired.clone()
                };
                SignedDesired::sign(&d, &self.key).map_err(|e| e.to_string())
            })?)
    }

    /// Makes every write so far durable (group commit with concurrent
    /// callers).
    pub async fn commit(&self) -> Result<(), crate::commit::CommitError> {
        self.commit.commit().await
    }

    /// Publishes `doc` as the retained desired state of `node`.
    pub(crate) async fn publish_desired(
        &self,
        node: &str,
        doc: &SignedDesired,
    ) -> Result<(), HubError> {
        let payload = doc.encode()?;
        self.client
            .publish(
                self.topics.node(node, TopicKind::Desired),
                QoS::AtLeastOnce,
                true,
                payload,
            )
            .await
            .map_err(|e| HubError::Mqtt(e.to_string()))?;
        Metrics::inc(&self.metrics.desired_published);
        Ok(())
    }
}

/// The most recent events of each node, in memory (an operator's view, not
/// an audit log: the hub keeps [`EventLog::PER_NODE`] per node and forgets
/// them on restart). Bounded: [`EventLog::PER_NODE`] events per node, each
/// at most `limits.max_event_bytes` (checked at ingest), for at most
/// `max_nodes` nodes.
#[derive(Debug)]
pub struct EventLog {
    nodes: Mutex<HashMap<String, VecDeque<Event>>>,
    max_nodes: usize,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new(crate::config::LimitsConfig::default().max_nodes)
    }
}

impl EventLog {
    /// Events kept per node.
    pub const PER_NODE: usize = 256;

    /// An empty log for at most `max_nodes` nodes.
    pub fn new(max_nodes: usize) -> Self {
        Self {
            nodes: Mutex::default(),
            max_nodes,
        }
    }

    /// Records an event of `node`, forgetting the oldest beyond the bound;
    /// returns false (and keeps nothing) for a new node past `max_nodes`.
    pub fn push(&self, node: &str, ev: Event) -> bool {
        let mut m = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if !m.contains_key(node) && m.len() >= self.max_nodes {
            return false;
        }
        let q = m.entry(node.to_owned()).or_default();
        if q.len() >= Self::PER_NODE {
            q.pop_front();
        }
        q.push_back(ev);
        true
    }

    /// Recent events of `node`, oldest first.
    pub fn recent(&self, node: &str) -> Vec<Event> {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_revision_is_its_own_error_and_other_registry_errors_are_hub_errors() {
        let stale = SetDesiredError::from(RegistryError::StaleRevision {
            node: "n".into(),
            got: 3,
            current: 5,
        });
        assert!(
            matches!(&stale, SetDesiredError::Stale { node, got: 3, current: 5 } if node == "n"),
            "{stale:?}"
        );
        assert_eq!(
            stale.to_string(),
            "revision 3 is not the next revision of node n (current 5); send revision 0 to let the hub assign it"
        );
        let corrupt = SetDesiredError::from(RegistryError::Corrupt {
            node: "n".into(),
            detail: "bad".into(),
        });
        assert!(
            matches!(
                corrupt,
                SetDesiredError::Hub(HubError::Registry(RegistryError::Corrupt { .. }))
            ),
            "{corrupt:?}"
        );
    }
}
