//! # edgefleet-testkit — the hub + node rig, written once
//!
//! Dev-only (tests, the simulator, examples): never a dependency of the
//! shipping binaries. What every suite needs to put a real hub and real agents
//! on loopback:
//!
//! - [`HubHarness`]: a real [`cloud_hub::App`] on `127.0.0.1` with free
//!   ports (embedded broker, REST API), a temp-dir style data directory, a
//!   typed [`HubClient`], and [`HubHarness::edge_config`] for agents that pin
//!   its key. [`HubHarness::start_on_thread`] runs it on its own real-time
//!   runtime, for tests whose own runtime runs on paused time.
//! - [`EdgeHarness`]: a real [`edge_node::Agent`] in this process.
//! - [`free_port`] and [`wait_until`]: a loopback port, and a bounded poll
//!   whose timeout says what it was waiting for ([`eventually`]: the same,
//!   failing the test on timeout); [`edge_config`] for an agent whose hub is
//!   not up yet.
//!
//! Everything here binds `127.0.0.1` only and every wait has a deadline, so a
//! suite built on it stops by itself.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cloud_hub::client::{ClientError, HubClient};
use cloud_hub::{App, Hub, HubConfig, HubError};
use edge_node::{Agent, AgentError, Clock, EdgeConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What starting a harness can fail with.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The hub did not start.
    #[error("starting the hub: {0}")]
    Hub(#[from] HubError),
    /// The agent's config does not validate.
    #[error("agent config: {0}")]
    EdgeConfig(#[from] protocols::ValidationErrors),
    /// The agent did not start.
    #[error("starting the agent: {0}")]
    Agent(#[from] AgentError),
    /// The hub's REST API did not answer.
    #[error("asking the hub: {0}")]
    Client(#[from] ClientError),
    /// The hub thread's runtime could not be built or the hub did not come up.
    #[error("hub thread: {0}")]
    Thread(String),
    /// A task of the harness failed to join.
    #[error("joining {what}: {source}")]
    Join {
        /// Which task.
        what: &'static str,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A bounded wait ran out.
    #[error(transparent)]
    Timeout(#[from] Timeout),
}

/// A port that is free on 127.0.0.1 right now (bound, read back, released).
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A [`wait_until`] that ran out of time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("timed out after {after:?} waiting for {what}")]
pub struct Timeout {
    /// What was being waited for.
    pub what: String,
    /// How long it waited.
    pub after: Duration,
}

/// Interval between two checks of [`wait_until`].
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `condition` every [`POLL`] until it yields `Some`, for at most
/// `deadline` (in tokio time, so a paused-time test advances through it).
/// The condition is always checked at least once.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut condition: F,
) -> Result<T, Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = condition().await {
            return Ok(v);
        }
        if start.elapsed() >= deadline {
            return Err(Timeout {
                what: what.to_owned(),
                after: deadline,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] for tests: the value, or a panic whose message says what
/// was waited for and how long.
#[expect(
    clippy::panic,
    reason = "a test helper: running out of time fails the test that waits"
)]
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match wait_until(what, deadline, condition).await {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// An agent config for `node` with data in `data_dir`, pointed at a broker
/// on 127.0.0.1:`mqtt_port` (which need not be up yet: offline tests start
/// the hub later) and pinning the hub key `hub_key` (hex).
pub fn edge_config(node: &str, data_dir: &Path, mqtt_port: u16, hub_key: &str) -> EdgeConfig {
    let mut cfg = EdgeConfig {
        node: node.to_owned(),
        data_dir: data_dir.to_path_buf(),
        ..EdgeConfig::default()
    };
    "127.0.0.1".clone_into(&mut cfg.mqtt.host);
    cfg.mqtt.port = mqtt_port;
    cfg.hub.public_key = Some(hub_key.to_owned());
    cfg
}

/// Gives node `node` (data in `edge_dir`) its identity from the CA of the
/// hub whose data directory is `hub_dir`, before that hub runs (the hub's
/// database is opened and closed again here; the CA and the hub key are
/// created if they do not exist yet). Returns the hub key (hex).
pub fn enrol_offline(hub_dir: &Path, node: &str, edge_dir: &Path) -> Result<String, HarnessError> {
    let fail = |e: &dyn std::fmt::Display| HarnessError::Thread(format!("enrolling {node}: {e}"));
    let key = cloud_hub::keys::load_or_create(hub_dir).map_err(|e| fail(&e))?;
    let hub_key = protocols::signing::key_to_hex(&key.verifying_key());
    let (keyed, ca_pem) = {
        let ca = cloud_hub::ca::Ca::open_offline(hub_dir).map_err(|e| fail(&e))?;
        let keyed = ca
            .issue_keyed(
                &cloud_hub::ca::Identity::node(node),
                Duration::from_secs(24 * 3600),
            )
            .map_err(|e| fail(&e))?;
        (keyed, ca.cert_pem().to_owned())
    };
    edge_node::identity::Identity {
        key_pem: keyed.key_pem,
        cert_pem: keyed.cert_pem,
        ca_pem,
        hub_public_key: hub_key.clone(),
    }
    .write(edge_dir)
    .map_err(|e| fail(&e))?;
    Ok(hub_key)
}

/// A node's MQTT TLS config (its certificate, trusting the hub CA) from a
/// hub reached only through its REST API: a join token from `admin`, then
/// the join with a CSR, as `edge-node join` does.
pub async fn join_mqtt_tls(
    admin: &HubClient,
    node: &str,
) -> Result<Arc<rustls::ClientConfig>, HarnessError> {
    let fail = |e: &dyn std::fmt::Display| HarnessError::Thread(format!("joining {node}: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| fail(&e))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| fail(&e))?;
    let token = admin.bootstrap(node).await?.token;
    let joined = admin.join(&token, &csr).await?;
    let cfg = cloud_hub::tls::mqtt_client_config(
        &joined.ca_pem,
        Some((&joined.cert_pem, &key.serialize_pem())),
    )
    .map_err(|(part, e)| fail(&format!("{part}: {e}")))?;
    Ok(Arc::new(cfg))
}

/// A real hub on loopback.
#[derive(Debug)]
pub struct HubHarness {
    /// Typed client of its REST API.
    pub client: HubClient,
    /// Its shared state (registry, sink, metrics).
    pub hub: Arc<Hub>,
    /// MQTT host and port of its broker.
    pub mqtt: (String, u16),
    /// Its public key (hex), which agents pin.
    pub public_key: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    cancel: CancellationToken,
    task: HubTask,
}

#[derive(Debug)]
enum HubTask {
    Task(JoinHandle<Result<(), HubError>>),
    Thread(std::thread::JoinHandle<Result<(), HubError>>),
}

impl HubHarness {
    /// The config the harness starts by default: data in `data_dir`, the
    /// REST API and the embedded broker on free loopback ports, acks every
    /// 50 ms (tests want them quick).
    pub fn config(data_dir: &Path) -> HubConfig {
        let mut cfg = HubConfig {
            data_dir: data_dir.to_path_buf(),
            http_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            ack_interval: Duration::from_millis(50),
            ..HubConfig::default()
        };
        if let Some(b) = cfg.embedded_broker.as_mut() {
            b.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        }
        cfg
    }

    /// Starts the hub on the current runtime.
    pub async fn start(cfg: HubConfig) -> Result<Self, HarnessError> {
        let cancel = CancellationToken::new();
        let data_dir = cfg.data_dir.clone();
        let app = App::start(cfg, cancel.clone()).await?;
        let (client, hub, mqtt) = (
            Self::client_of(&app, &data_dir)?,
            app.hub(),
            app.mqtt_addr(),
        );
        let task = HubTask::Task(tokio::spawn(app.run()));
        Self::finish(client, hub, mqtt, data_dir, cancel, task).await
    }

    /// Starts the hub on its own thread with its own real-time runtime, so
    /// the caller's runtime may run on paused time.
    pub async fn start_on_thread(cfg: HubConfig) -> Result<Self, HarnessError> {
        let cancel = CancellationToken::new();
        let data_dir = cfg.data_dir.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = cancel.clone();
        let dir = data_dir.clone();
        let thread = std::thread::spawn(move || -> Result<(), HubError> {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(HarnessError::Thread(e.to_string())));
                    return Ok(());
                }
            };
            rt.block_on(async move {
                let app = match App::start(cfg, token).await {
                    Ok(app) => app,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return Ok(());
                    }
                };
                let started = Self::client_of(&app, &dir).map(|c| (c, app.hub(), app.mqtt_addr()));
                let _ = tx.send(started);
                app.run().await
            })
        });
        let (client, hub, mqtt) = rx.await.map_err(|_| {
            HarnessError::Thread("the hub thread ended before the hub started".into())
        })??;
        Self::finish(client, hub, mqtt, data_dir, cancel, HubTask::Thread(thread)).await
    }

    /// The admin client of `app`: its first admin token and its CA, read
    /// from the data directory (as an operator on the hub's host would).
    fn client_of(app: &App, data_dir: &Path) -> Result<HubClient, HarnessError> {
        Ok(HubClient::local_admin(
            app.http_url(),
            data_dir,
            HubClient::DEFAULT_TIMEOUT,
        )?)
    }

    async fn finish(
        client: HubClient,
        hub: Arc<Hub>,
        mqtt: (String, u16),
        data_dir: PathBuf,
        cancel: CancellationToken,
        task: HubTask,
    ) -> Result<Self, HarnessError> {
        let public_key = client.hub_info().await?.public_key;
        Ok(Self {
            client,
            hub,
            mqtt,
            public_key,
            data_dir,
            cancel,
            task,
        })
    }

    /// The REST API's base URL.
    pub fn base(&self) -> &str {
        self.client.base()
    }

    /// An agent config for `node` with data in `data_dir`, pointed at this
    /// hub's broker and REST API and pinning its key. The node's identity
    /// (key, certificate from the hub CA, CA, hub key) is written to
    /// `{data_dir}/identity` as `edge-node join` would, so it can fetch
    /// artifacts over HTTPS; a failure to write it leaves the node without
    /// one (its artifact fetches then fail and say why).
    pub fn edge_config(&self, node: &str, data_dir: &Path) -> EdgeConfig {
        if let Err(e) = self.write_identity(node, data_dir) {
            tracing::warn!(node, error = %e, "testkit: node identity not written");
        }
        let mut cfg = edge_config(node, data_dir, self.mqtt.1, &self.public_key);
        cfg.mqtt.host.clone_from(&self.mqtt.0);
        self.base().clone_into(&mut cfg.hub.http_url);
        cfg
    }

    /// Issues `node` a certificate from the hub CA and writes the identity
    /// files an agent with data in `data_dir` reads.
    pub fn write_identity(&self, node: &str, data_dir: &Path) -> Result<(), HarnessError> {
        let keyed = self
            .hub
            .ca
            .issue_keyed(
                &cloud_hub::ca::Identity::node(node),
                Duration::from_secs(24 * 3600),
            )
            .map_err(|e| HarnessError::Thread(e.to_string()))?;
        edge_node::identity::Identity {
            key_pem: keyed.key_pem,
            cert_pem: keyed.cert_pem,
            ca_pem: self.hub.ca.cert_pem().to_owned(),
            hub_public_key: self.public_key.clone(),
        }
        .write(data_dir)
        .map_err(|e| HarnessError::Thread(e.to_string()))
    }

    /// A fresh key and certificate from the hub CA for `identity`, as a
    /// rustls client config for MQTT (trusting the hub CA).
    pub fn mqtt_tls(
        &self,
        identity: &cloud_hub::ca::Identity,
    ) -> Result<Arc<rustls::ClientConfig>, HarnessError> {
        let keyed = self
            .hub
            .ca
            .issue_keyed(identity, Duration::from_secs(24 * 3600))
            .map_err(|e| HarnessError::Thread(e.to_string()))?;
        let cfg = cloud_hub::tls::mqtt_client_config(
            self.hub.ca.cert_pem(),
            Some((&keyed.cert_pem, &keyed.key_pem)),
        )
        .map_err(|(part, e)| HarnessError::Thread(format!("{part}: {e}")))?;
        Ok(Arc::new(cfg))
    }

    /// MQTT options for a raw client of this hub's broker: client id
    /// `client_id`, over TLS with a fresh certificate for `identity` (the
    /// broker is the mTLS gate). Call with [`cloud_hub::ca::Identity::node`]
    /// of the same name for a node.
    pub fn mqtt_options(
        &self,
        client_id: &str,
        identity: &cloud_hub::ca::Identity,
    ) -> Result<rumqttc::MqttOptions, HarnessError> {
        let mut o = rumqttc::MqttOptions::new(client_id, self.mqtt.0.clone(), self.mqtt.1);
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(self.mqtt_tls(identity)?),
        ));
        Ok(o)
    }

    /// Writes `{dir}/ca.crt`, `{dir}/client.crt` and `{dir}/client.key`
    /// (a fresh certificate from the hub CA for `identity`) and returns them
    /// as a `[mqtt.tls]` config (for a second hub using this one's broker).
    pub fn write_mqtt_files(
        &self,
        identity: &cloud_hub::ca::Identity,
        dir: &Path,
    ) -> Result<cloud_hub::config::MqttTls, HarnessError> {
        let keyed = self
            .hub
            .ca
            .issue_keyed(identity, Duration::from_secs(24 * 3600))
            .map_err(|e| HarnessError::Thread(e.to_string()))?;
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&p, text))
                .map_err(|e| HarnessError::Thread(format!("{}: {e}", p.display())))?;
            Ok::<_, HarnessError>(p)
        };
        Ok(cloud_hub::config::MqttTls {
            ca_file: write("ca.crt", self.hub.ca.cert_pem())?,
            cert_file: Some(write("client.crt", &keyed.cert_pem)?),
            key_file: Some(write("client.key", &keyed.key_pem)?),
        })
    }

    /// Waits until the hub's MQTT session is subscribed (`/readyz`).
    pub async fn wait_ready(&self, deadline: Duration) -> Result<(), HarnessError> {
        wait_until("the hub to be ready", deadline, || async {
            self.client.ready().await.ok().filter(|r| *r).map(drop)
        })
        .await?;
        Ok(())
    }

    /// Stops the hub (cancel, then wait for it to drain and exit) and
    /// returns how its run ended.
    pub async fn stop(self) -> Result<(), HarnessError> {
        self.cancel.cancel();
        match self.task {
            HubTask::Task(t) => t.await.map_err(|source| HarnessError::Join {
                what: "the hub task",
                source,
            })??,
            HubTask::Thread(t) => tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(|source| HarnessError::Join {
                    what: "the hub thread",
                    source,
                })?
                .map_err(|_| HarnessError::Thread("the hub thread panicked".into()))??,
        }
        Ok(())
    }
}

/// A real agent in this process.
#[derive(Debug)]
pub struct EdgeHarness {
    /// Its store (outbox, desired state), shared with the running agent.
    pub store: edge_node::store::Store,
    /// Live status of its device functions.
    pub functions: edge_node::functions::FunctionsView,
    /// Its counters (as its reported state carries them).
    pub counters: Arc<edge_node::metrics::Counters>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

impl EdgeHarness {
    /// Validates `cfg` and starts the agent on the current runtime.
    pub async fn start(cfg: EdgeConfig, clock: Clock) -> Result<Self, HarnessError> {
        Self::start_with(cfg, clock, edge_node::AgentOptions::default()).await
    }

    /// [`EdgeHarness::start`] with agent options (device transports).
    pub async fn start_with(
        cfg: EdgeConfig,
        clock: Clock,
        options: edge_node::AgentOptions,
    ) -> Result<Self, HarnessError> {
        cfg.validate()?;
        let cancel = CancellationToken::new();
        let agent = Agent::start_with(cfg, clock, cancel.clone(), options).await?;
        let (store, functions) = (agent.store().clone(), agent.functions());
        let counters = agent.counters();
        let task = tokio::spawn(agent.run());
        Ok(Self {
            store,
            functions,
            counters,
            cancel,
            task,
        })
    }

    /// Whether the agent has stopped (a task failed, or it was stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the agent in its shutdown order and returns how its run ended.
    pub async fn stop(self) -> Result<(), HarnessError> {
        self.cancel.cancel();
        self.task.await.map_err(|source| HarnessError::Join {
            what: "the agent task",
            source,
        })??;
        Ok(())
    }

    /// Stops the agent without its ordered shutdown: the run is aborted,
    /// which drops (and so aborts) every agent task where it stands.
    pub fn kill(self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_until_names_what_it_waited_for() {
        let e = wait_until("the moon", Duration::from_secs(2), || async { None::<()> })
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "timed out after 2s waiting for the moon");
        let mut n = 0;
        let v = wait_until("three checks", Duration::from_secs(2), || {
            n += 1;
            let done = n == 3;
            async move { done.then_some(n) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn free_port_is_bindable() {
        let p = free_port().unwrap();
        std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    }
}
