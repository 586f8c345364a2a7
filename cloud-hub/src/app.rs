//! The hub process: [`App::start`] puts the hub together and spawns its
//! tasks, [`App::run`] serves until cancelled and then drains.
//!
//! Start here: [`App::start`] opens the stores ([`crate::hub::Stores`]),
//! starts the embedded broker when configured, creates the MQTT client
//! ([`crate::session::client`]), binds the REST API, and spawns every task
//! into one `JoinSet`. Each task is a named async fn returning `Result`:
//!
//! | task | fn | does |
//! | --- | --- | --- |
//! | session | [`crate::session::run`] | polls the MQTT event loop; forwards messages to ingest, connects to resubscribe |
//! | resubscribe | [`crate::session::resubscribe`] | on every connect: subscribe, republish desired state |
//! | ingest | [`crate::ingest::run`] | telemetry → sink; reported state and status → registry; events → event log |
//! | acks | [`crate::acks::run`] | every `ack_interval`: flush the sink, publish the acks due |
//! | rollouts | [`crate::control::rollouts::run`] | every `rollout_tick`: observe nodes, plan, deliver, persist ([`crate::control::rollouts`]) |
//! | http | [`crate::api::router`] | the REST API |
//!
//! The data path through the hub reads as file names: session → ingest →
//! sink → acks → session.
//!
//! # Shutdown (drain)
//! [`App::run`] waits for the cancellation token (or cancels it at the first
//! task failure), then, in this order:
//! 1. intake stops: the session forwards nothing more, and the REST API, the
//!    ack timer and resubscribe end;
//! 2. ingest applies the messages it was already handed, then ends;
//! 3. one last round of acks ([`crate::acks::publish_due`]): a sink flush,
//!    then an ack for everything it made durable; the session polls until
//!    the broker acknowledged them and every earlier publish (bounded by
//!    [`crate::session::DELIVERY_TIMEOUT`]; skipped when disconnected, as
//!    the edges resend what is not acked);
//! 4. the session disconnects and ends; the database is flushed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocols::Topics;
use rumqttc::EventLoop;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::BrokerError;
use crate::broker::gate::{Gate, GateSettings};
use crate::config::{EmbeddedBroker, HubConfig, MqttConfig};
use crate::hub::{Hub, HubError, Stores};
use crate::session::{self, BrokerLink, Delivered, Drain};
use crate::tls::{Peer, PlainListener, TlsListener};
use crate::{acks, ingest};

/// Bound of the ingest channel (session → ingest).
const INGEST_QUEUE: usize = 4096;
/// How long intake may take to stop (step 1 and 2 of the drain) before its
/// tasks are aborted.
const INTAKE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running hub.
#[derive(Debug)]
pub struct App {
    hub: Arc<Hub>,
    tasks: Tasks,
    drain: Option<oneshot::Sender<Drain>>,
    http_addr: SocketAddr,
    http_tls: bool,
    mqtt_addr: (String, u16),
    gate: Option<Gate>,
    cancel: CancellationToken,
}

impl App {
    /// Opens storage, starts the broker (if embedded), connects, serves HTTP.
    pub async fn start(mut cfg: HubConfig, cancel: CancellationToken) -> Result<Self, HubError> {
        let stores = Stores::open(&cfg).await?;
        let internal = match &cfg.embedded_broker {
            Some(b) => Some(crate::broker::start(b).await?),
            None => None,
        };
        let link = match &internal {
            Some(i) => BrokerLink {
                host: i.addr.ip().to_string(),
                port: i.addr.port(),
                login: Some((i.username.clone(), i.password.clone())),
                tls: None,
            },
            None => external_link(&cfg.mqtt)?,
        };
        let (client, eventloop) = session::client(&cfg.mqtt.client_id, &link);
        let hub = Arc::new(Hub::new(stores, Topics::new(&cfg.topic_root), client));
        // Every server certificate the hub issued itself, renewed in place.
        let mut server_certs = Vec::new();
        let gate = match (&mut cfg.embedded_broker, internal) {
            (Some(b), Some(internal)) => {
                Some(start_gate(b, &hub, internal, &cfg.mqtt.client_id, &mut server_certs).await?)
            }
            _ => None,
        };
        let mqtt_addr = match &gate {
            Some(g) => (g.local_addr().ip().to_string(), g.local_addr().port()),
            None => cfg.broker_address(),
        };
        let http_err = |source| HubError::Http {
            addr: cfg.http_listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(cfg.http_listen)
            .await
            .map_err(http_err)?;
        let http_addr = listener.local_addr().map_err(http_err)?;
        let tls = if cfg.http.tls {
            let slot = crate::tls::ServerCertSlot::new(&hub.ca, &cfg.http.subject_alt_names)?;
            server_certs.push(slot.clone());
            Some(crate::tls::server_config(&hub.ca, slot)?)
        } else {
            warn!(
                http = %http_addr,
                "http.tls = false: the REST API is plain HTTP (bearer tokens cross the network in the clear; nodes cannot use certificates)"
            );
            None
        };
        let http_tls = tls.is_some();
        let (mut tasks, drain) =
            spawn_tasks(&hub, &cfg, eventloop, (listener, http_addr, tls), &cancel);
        // A change stored just before a crash may not have been published.
        match crate::control::reconcile(&hub).await {
            Ok(nodes) => {
                let published = nodes.iter().filter(|n| n.published).count();
                info!(nodes = nodes.len(), published, "control plane reconciled");
            }
            Err(e) => warn!(error = %e, "control plane not reconciled; stored documents kept"),
        }
        if !server_certs.is_empty() {
            tasks.spawn(
                "server-certs",
                renew_server_certs(hub.clone(), server_certs, cancel.clone()),
            );
        }
        info!(http = %http_addr, tls = http_tls, mqtt = ?mqtt_addr, "cloud-hub running");
        Ok(Self {
            hub,
            tasks,
            drain: Some(drain),
            http_addr,
            http_tls,
            mqtt_addr,
            gate,
            cancel,
        })
    }

    /// The REST API's base URL (`https://…` unless `http.tls = false`).
    pub fn http_url(&self) -> String {
        let scheme = if self.http_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr)
    }

    /// Where the first admin token is (`{data_dir}/admin.token`) and the CA
    /// certificate (PEM) clients of [`App::http_url`] pin.
    pub fn ca_pem(&self) -> String {
        self.hub.ca.cert_pem().to_owned()
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where nodes connect (host, port): the embedded broker's gate, or the
    /// external broker the hub uses.
    pub fn mqtt_addr(&self) -> (String, u16) {
        self.mqtt_addr.clone()
    }

    /// Whether this process runs the broker ([`crate::broker`]): it then dies
    /// with the process, so a binary that exits right after [`App::run`]
    /// cuts off whatever the broker has not forwarded yet.
    pub fn embedded_broker(&self) -> bool {
        self.gate.is_some()
    }

    /// Shared state (for tests and embedding).
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    /// Runs until cancelled or a task fails, then drains (see the module
    /// docs); returns the first task failure.
    pub async fn run(mut self) -> Result<(), HubError> {
        self.serve().await;
        self.cancel.cancel();
        self.stop_intake().await;
        self.deliver_last_acks().await;
        while self.tasks.join_next().await {}
        let _ = self.hub.db.flush_async().await;
        if let Some(gate) = self.gate.take() {
            // The broker may not have forwarded the last acks yet.
            tokio::time::sleep(EMBEDDED_BROKER_LINGER).await;
            gate.stop().await;
        }
        self.tasks.failure.map_or(Ok(()), Err)
    }

    /// Until the token is cancelled or a task fails.
    async fn serve(&mut self) {
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                more = self.tasks.join_next() => if !more || self.tasks.failure.is_some() {
                    return;
                },
            }
        }
    }

    /// Drain steps 1 and 2: waits for every task but the session to end.
    async fn stop_intake(&mut self) {
        let stopped = tokio::time::timeout(INTAKE_STOP_TIMEOUT, async {
            while self.tasks.intake_running() > 0 {
                self.tasks.join_next().await;
            }
        })
        .await;
        if stopped.is_err() {
            warn!(
                tasks = self.tasks.intake_running(),
                "intake did not stop in {INTAKE_STOP_TIMEOUT:?}; aborting it"
            );
            self.tasks.abort_intake();
            while self.tasks.intake_running() > 0 {
                self.tasks.join_next().await;
            }
        }
    }

    /// Drain step 3: the last acks, and the session's word that the broker
    /// has them.
    async fn deliver_last_acks(&mut self) {
        let Some(drain) = self.drain.take() else {
            return;
        };
        if !self.tasks.session_running() {
            return;
        }
        if !self.hub.readiness.connected() {
            warn!("MQTT not connected: no last acks (edges resend what was not acked)");
            return;
        }
        let published = tokio::time::timeout(session::DELIVERY_TIMEOUT, async {
            let n = acks::publish_due(&self.hub).await?;
            session::mark_drained(&self.hub).await?;
            Ok::<_, HubError>(n)
        })
        .await;
        let n = match published {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                warn!(error = %e, "last acks failed");
                self.tasks.failure.get_or_insert(e);
                return;
            }
            Err(_) => {
                warn!("last acks not queued in {:?}", session::DELIVERY_TIMEOUT);
                return;
            }
        };
        let (done, outcome) = oneshot::channel();
        if drain.send(Drain { done }).is_err() {
            return;
        }
        match outcome.await {
            Ok(Delivered::Confirmed) => info!(acks = n, "hub drained: last acks delivered"),
            Ok(other) => warn!(
                acks = n,
                outcome = ?other,
                "last acks not confirmed by the broker; edges resend what was not acked"
            ),
            Err(_) => warn!(acks = n, "session ended before the last acks"),
        }
    }
}

/// Starts the gate of the embedded broker on `b.listen` (port 0: a free
/// port, written back into `b`): mTLS with a server certificate from the
/// hub CA, or plain MQTT in lab mode (with a WARN).
async fn start_gate(
    b: &mut EmbeddedBroker,
    hub: &Arc<Hub>,
    internal: crate::broker::Internal,
    hub_client_id: &str,
    server_certs: &mut Vec<Arc<crate::tls::ServerCertSlot>>,
) -> Result<Gate, HubError> {
    let asked = b.listen;
    let bind = |source| BrokerError::Bind {
        addr: asked,
        source,
    };
    let listener = tokio::net::TcpListener::bind(b.listen)
        .await
        .map_err(bind)?;
    b.listen = listener.local_addr().map_err(bind)?;
    let tls = if b.tls {
        let tls_err = |e: crate::tls::TlsError| BrokerError::Tls(e.to_string());
        let slot =
            crate::tls::ServerCertSlot::new(&hub.ca, &b.subject_alt_names).map_err(tls_err)?;
        server_certs.push(slot.clone());
        Some(crate::tls::mqtt_server_config(&hub.ca, slot).map_err(tls_err)?)
    } else {
        warn!(
            mqtt = %b.listen,
            "embedded_broker.tls = false: plain MQTT, and a client's identity is its client id: anyone who can reach this port can impersonate any node"
        );
        None
    };
    let gate = Gate::spawn(
        listener,
        hub.clone(),
        GateSettings {
            tls,
            max_connections: b.max_connections,
            internal,
            reserved_client_id: hub_client_id.to_owned(),
        },
    )
    .map_err(bind)?;
    info!(listen = %b.listen, tls = b.tls, "embedded MQTT broker started behind the identity gate");
    Ok(gate)
}

/// The hub's link to an external broker from `[mqtt]`: TLS files and the
/// password file are read here; errors name the field.
fn external_link(m: &MqttConfig) -> Result<BrokerLink, HubError> {
    let read = |field: &'static str, path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|e| HubError::MqttLink {
            field,
            path: path.display().to_string(),
            detail: e.to_string(),
        })
    };
    let login = match (&m.username, &m.password_file) {
        (Some(u), Some(p)) => {
            let text = read("mqtt.password_file", p)?;
            let password = text.lines().next().unwrap_or_default().to_owned();
            Some((u.clone(), password))
        }
        (Some(u), None) => Some((u.clone(), String::new())),
        _ => None,
    };
    let tls = match &m.tls {
        Some(t) => {
            let ca = read("mqtt.tls.ca_file", &t.ca_file)?;
            // A client pair is re-read when its files change (rotation
            // without a restart, at the next reconnect).
            let cfg = match (&t.cert_file, &t.key_file) {
                (Some(c), Some(k)) => crate::tls::FileClientCert::load(c, k)
                    .and_then(|files| crate::tls::mqtt_client_config_with_files(&ca, files)),
                _ => crate::tls::mqtt_client_config(&ca, None),
            }
            .map_err(|(part, detail)| {
                let (field, path) = match part {
                    "cert" => (
                        "mqtt.tls.cert_file",
                        t.cert_file.clone().unwrap_or_default(),
                    ),
                    "key" => ("mqtt.tls.key_file", t.key_file.clone().unwrap_or_default()),
                    _ => ("mqtt.tls.ca_file", t.ca_file.clone()),
                };
                HubError::MqttLink {
                    field,
                    path: path.display().to_string(),
                    detail,
                }
            })?;
            Some(Arc::new(cfg))
        }
        None => None,
    };
    Ok(BrokerLink {
        host: m.host.clone(),
        port: m.port,
        login,
        tls,
    })
}

/// Spawns the hub's tasks (see the module docs); returns them and the
/// sender of the session's [`Drain`].
fn spawn_tasks(
    hub: &Arc<Hub>,
    cfg: &HubConfig,
    eventloop: EventLoop,
    (listener, http_addr, tls): (
        tokio::net::TcpListener,
        SocketAddr,
        Option<Arc<rustls::ServerConfig>>,
    ),
    cancel: &CancellationToken,
) -> (Tasks, oneshot::Sender<Drain>) {
    let (forward, messages) = mpsc::channel(INGEST_QUEUE);
    let (control, connects) = mpsc::unbounded_channel();
    let (drain_tx, drain) = oneshot::channel();
    let links = session::Links {
        forward,
        control,
        drain,
    };
    let mut tasks = Tasks::default();
    let id = tasks.spawn(
        "session",
        session::run(hub.clone(), eventloop, links, cancel.clone()),
    );
    tasks.session = Some(id);
    tasks.spawn(
        "resubscribe",
        session::resubscribe(
            hub.clone(),
            connects,
            cfg.shared_group.clone(),
            cancel.clone(),
        ),
    );
    tasks.spawn("ingest", ingest::run(hub.clone(), messages));
    tasks.spawn(
        "acks",
        acks::run(hub.clone(), cfg.ack_interval, cancel.clone()),
    );
    tasks.spawn(
        "rollouts",
        crate::control::rollouts::run(hub.clone(), cfg.rollout_tick, cancel.clone()),
    );
    tasks.spawn(
        "http",
        serve_http(
            listener,
            http_addr,
            crate::api::router(hub.clone()),
            tls,
            cancel.clone(),
        ),
    );
    (tasks, drain_tx)
}

/// How often the `server-certs` task looks at the certificates' age.
const SERVER_CERT_CHECK: std::time::Duration = std::time::Duration::from_secs(3600);

/// Renews each of the hub's own server certificates once it is two thirds
/// through [`crate::ca::SERVER_CERT_VALIDITY`]; new connections get the new
/// one, connections already up keep theirs. A failed renewal is logged and
/// tried again at the next check (the current certificate stays valid for
/// another third of its life).
async fn renew_server_certs(
    hub: Arc<Hub>,
    slots: Vec<Arc<crate::tls::ServerCertSlot>>,
    stop: CancellationToken,
) -> Result<(), HubError> {
    let renew_after = crate::ca::SERVER_CERT_VALIDITY / 3 * 2;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(SERVER_CERT_CHECK) => {}
        }
        for slot in &slots {
            if slot.renewal_due(std::time::SystemTime::now(), renew_after) {
                match slot.renew(&hub.ca) {
                    Ok(()) => info!(names = ?slot.names(), "hub server certificate renewed"),
                    Err(e) => {
                        warn!(names = ?slot.names(), error = %e, "renewing the hub server certificate failed; trying again in an hour");
                    }
                }
            }
        }
    }
}

/// The REST API until `stop` is cancelled (requests in flight complete):
/// over TLS when `tls` is set, each request carrying its [`Peer`].
async fn serve_http(
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) -> Result<(), HubError> {
    let make = router.into_make_service_with_connect_info::<Peer>();
    let http_err = |source| HubError::Http { addr, source };
    match tls {
        Some(cfg) => {
            let l = TlsListener::spawn(listener, cfg, stop.clone()).map_err(http_err)?;
            axum::serve(l, make)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .map_err(http_err)
        }
        None => axum::serve(PlainListener(listener), make)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .map_err(http_err),
    }
}

/// The hub's tasks by name, with the first failure among them.
#[derive(Debug, Default)]
struct Tasks {
    set: JoinSet<Result<(), HubError>>,
    running: HashMap<Id, (&'static str, AbortHandle)>,
    session: Option<Id>,
    failure: Option<HubError>,
}

impl Tasks {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), HubError>> + Send + 'static,
    ) -> Id {
        let handle = self.set.spawn(task);
        let id = handle.id();
        self.running.insert(id, (name, handle));
        id
    }

    fn session_running(&self) -> bool {
        self.session
            .is_some_and(|id| self.running.contains_key(&id))
    }

    /// Tasks still running besides the session.
    fn intake_running(&self) -> usize {
        self.running.len() - usize::from(self.session_running())
    }

    fn abort_intake(&self) {
        for (id, (_, handle)) in &self.running {
            if Some(*id) != self.session {
                handle.abort();
            }
        }
    }

    /// Waits for the next task to end and records how; `false` when none is left.
    async fn join_next(&mut self) -> bool {
        let Some(joined) = self.set.join_next_with_id().await else {
            return false;
        };
        let (id, ended) = match joined {
            Ok((id, Ok(()))) => (id, Ended::Done),
            Ok((id, Err(e))) => (id, Ended::Failed(e)),
            Err(e) if e.is_cancelled() => (e.id(), Ended::Aborted),
            Err(e) => (e.id(), Ended::Failed(HubError::Task(e.to_string()))),
        };
        let name = self.running.remove(&id).map_or("?", |(n, _)| n);
        match ended {
            Ended::Done => debug!(task = name, "hub task ended"),
            Ended::Aborted => warn!(task = name, "hub task aborted"),
            Ended::Failed(e) => {
                warn!(task = name, error = %e, "hub task failed; stopping");
                self.failure.get_or_insert(e);
            }
        }
        true
    }
}

/// How a task ended.
enum Ended {
    Done,
    Aborted,
    Failed(HubError),
}

/// How long [`App::run`] keeps the embedded broker's gate open after the
/// drain: the gate stops (and rumqttd dies with the process), and the broker
/// may not have forwarded the last acks the hub published (and the broker
/// acknowledged) to the nodes yet.
pub const EMBEDDED_BROKER_LINGER: Duration = Duration::from_millis(300);

/// Runs a hub from `cfg` until `stop` resolves, then drains it: what the
/// `cloud-hub` binary and `fleet-sim hub` run. `started` sees the running
/// app once (to print its addresses). Call the signal handler that makes
/// `stop` *before* this, so a signal during startup stops the hub cleanly.
pub async fn serve(
    cfg: HubConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    started: impl FnOnce(&App),
) -> Result<(), HubError> {
    let cancel = CancellationToken::new();
    let app = App::start(cfg, cancel.clone()).await?;
    started(&app);
    tokio::spawn(async move {
        stop.await;
        info!("stopping: draining the hub");
        cancel.cancel();
    });
    app.run().await
}
