//! The agent: wires store, link, drivers, pipeline and uplink together as
//! named tasks around one shared [`AgentContext`].
//!
//! Start here: [`Agent::start`] opens the store, builds the context, lets the
//! sync session restore from disk first (a loss window after an unclean stop
//! is recorded before anything else starts; the last accepted desired
//! revision is re-applied, so a restart with no link keeps working), and
//! spawns every task into one
//! `JoinSet`; [`Agent::run`] waits for the first task to fail or for
//! cancellation, then drains.
//!
//! The tasks, in the order a sample meets them:
//! - drivers ([`devices`]: the device set the desired state asks for);
//! - the pipeline ([`crate::pipeline`]) and the function host
//!   ([`crate::functions`]), both appending through one
//!   [`OutboxWriter`](crate::store::OutboxWriter);
//! - the group committer ([`Store::run_committer`]);
//! - the uplink ([`crate::uplink`]) and the MQTT event loop ([`crate::link`]);
//! - the control task ([`control`]): the I/O driver of the sans-IO
//!   [`crate::session::Session`] (desired state in, acks, reported state out,
//!   with [`report`] adding backlog and device status);
//! - the artifact fetcher ([`crate::artifacts`]).
//!
//! On stop, [`shutdown`] runs the order as one function: stop devices →
//! drain pipeline and function host → final commit → stop uplink → close link.

mod control;
mod devices;
mod report;
mod shutdown;

use std::collections::BTreeMap;
use std::sync::Arc;

use protocols::{Sample, TopicKind, Topics};
use rumqttc::AsyncClient;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::artifacts::{ArtifactFetcher, DesiredPair, FetchError};
use crate::clock::Clock;
use crate::config::EdgeConfig;
pub use crate::context::AgentContext;
use crate::drivers;
use crate::functions::{FunctionError, FunctionHost, FunctionsView};
use crate::link::{self, Conn, LinkError, LinkReceiver};
use crate::metrics::Counters;
use crate::pipeline::{Pipeline, Routing};
use crate::session::{Input, Output, Session};
use crate::store::{Store, StoreError};
use crate::uplink;
use control::Control;
use devices::DeviceSet;
use shutdown::{Stage, Stages};

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The MQTT link could not be configured.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The artifact fetcher failed to start.
    #[error(transparent)]
    Artifacts(#[from] FetchError),
    /// The function host failed (outbox append or runtime task).
    #[error(transparent)]
    Functions(#[from] FunctionError),
    /// The identity files (`edge-node join`) could not be read.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// A task (or a blocking start-up step) panicked or was aborted.
    #[error("agent task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// `[policy]` does not parse (the config was not validated).
    #[error("{0}")]
    Policy(String),
    /// The data directory or one of its private subdirectories could not
    /// be created or restricted.
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
}

/// Optional extras of [`Agent::start_with`]; the default is what
/// [`Agent::start`] uses.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// How drivers reach devices whose host is registered here (instead of
    /// the network); see [`drivers::transport`].
    pub device_transports: drivers::transport::DeviceTransports,
}

/// Every task of the agent; each returns why it stopped.
type Tasks = JoinSet<Result<(), AgentError>>;

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    tasks: Tasks,
    cancel: CancellationToken,
    store: Store,
    functions: FunctionsView,
    fetcher: Arc<ArtifactFetcher>,
    counters: Arc<Counters>,
}

impl Agent {
    /// Opens the store, restores the last desired state and spawns all tasks.
    pub async fn start(
        cfg: EdgeConfig,
        clock: Clock,
        cancel: CancellationToken,
    ) -> Result<Self, AgentError> {
        Self::start_with(cfg, clock, cancel, AgentOptions::default()).await
    }

    /// [`start`](Self::start) with [`AgentOptions`].
    #[expect(
        clippy::too_many_lines,
        reason = "the wiring of every task, in start order, reads best in one place"
    )]
    pub async fn start_with(
        cfg: EdgeConfig,
        clock: Clock,
        cancel: CancellationToken,
        agent_options: AgentOptions,
    ) -> Result<Self, AgentError> {
        let store = open_store(&cfg).await?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let ctx = AgentContext {
            node: cfg.node.clone(),
            clock,
            store: store.clone(),
            counters: Arc::new(Counters::default()),
            events: events_tx,
            topics: Topics::new(&cfg.hub.topic_root),
        };
        let identity = crate::identity::Identity::load(&cfg.data_dir)?;
        let policy =
            Arc::new(crate::policy::Policy::from_config(&cfg.policy).map_err(AgentError::Policy)?);
        // The session restores first, and a loss window after an unclean
        // stop is on disk before any other part starts: a kill during the
        // rest of the start-up then finds it recorded and adds its own,
        // instead of one window silently covering two kills. What else the
        // restore asks for (re-apply, events) waits for the control task.
        let mut session = Session::new(
            ctx.node.clone(),
            ctx.topics.clone(),
            ctx.counters.clone(),
            clock.now_ms(),
        )
        .with_policy(policy)
        .with_revision_floor(crate::identity::revision_floor(&cfg.data_dir)?);
        // The configured key, else the one `edge-node join` wrote.
        let hub_key = cfg
            .hub
            .public_key
            .clone()
            .or_else(|| identity.as_ref().map(|i| i.hub_public_key.clone()));
        let restored = control::read_restored(&store, hub_key)?;
        let mut restore_outputs = Vec::new();
        for out in session.handle(Input::Restore(&restored), clock.now_ms()) {
            match out {
                Output::RecordLossWindow(w) => control::record_loss_window(&store, w)?,
                out => restore_outputs.push(out),
            }
        }
        // One slot of the node's key and certificate for every TLS config
        // of the agent, so a renewal swaps them everywhere at once.
        let slot = identity
            .as_ref()
            .map(crate::identity::ClientCertSlot::new)
            .transpose()?;
        let fetcher = {
            let (url, dir, store) = (
                cfg.hub.http_url.clone(),
                cfg.data_dir.join("artifacts"),
                store.clone(),
            );
            let tls = match (&identity, &slot) {
                (Some(id), Some(slot)) => Some(id.tls_config_with(slot.clone())?),
                _ => None,
            };
            let f = tokio::task::spawn_blocking(move || {
                ArtifactFetcher::with_tls(&url, dir, store, clock, tls)
            })
            .await??;
            Arc::new(f)
        };
        let functions = FunctionsView::default();
        let mut tasks = JoinSet::new();
        let (desired_tx, _) = watch::channel(DesiredPair::default());
        let (samples_tx, data) =
            spawn_data_path(&mut tasks, &ctx, &cfg, &fetcher, &functions, &desired_tx);
        {
            let (fetcher, desired) = (fetcher.clone(), desired_tx.subscribe());
            let (events, node, cancel) = (ctx.events.clone(), ctx.node.clone(), cancel.clone());
            let ready = data.ready;
            tasks
                .spawn(async move { Ok(fetcher.run(desired, ready, events, node, cancel).await?) });
        }
        let (rotated, _) = watch::channel(0u64);
        let (client, link_rx, uplink, link) = spawn_link(
            &mut tasks,
            &ctx,
            &cfg,
            identity.as_ref().zip(slot.clone()),
            &rotated,
        )?;
        if let (Some(identity), Some(slot)) = (identity.clone(), slot) {
            spawn_renewal(
                &mut tasks,
                &ctx,
                &cfg,
                (identity, slot),
                rotated,
                &fetcher,
                &cancel,
            );
        }
        let devices = DeviceSet::new(
            agent_options.device_transports,
            cfg.driver_options(),
            samples_tx,
            clock,
            cancel.child_token(),
        );
        let counters = ctx.counters.clone();
        let mut control = Control {
            session,
            ctx,
            client,
            conn: uplink.conn,
            routing: data.routing,
            desired: desired_tx,
            devices,
            functions: functions.clone(),
            fetcher: fetcher.clone(),
        };
        control.execute_all(restore_outputs).await?;
        let stages = Stages {
            pipeline: data.pipeline,
            host: data.host,
            committer: data.committer,
            uplink: uplink.stage,
            link,
        };
        let cancel_control = cancel.clone();
        tasks.spawn(async move {
            let r = control.run(link_rx, events_rx, cancel_control).await;
            shutdown::run(&mut control, stages).await;
            r
        });
        Ok(Self {
            tasks,
            cancel,
            store,
            functions,
            fetcher,
            counters,
        })
    }

    /// The agent's store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Live status of the device functions (as reported state shows it).
    pub fn functions(&self) -> FunctionsView {
        self.functions.clone()
    }

    /// The agent's counters (as reported state carries them).
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Artifact fetcher counters by name.
    pub fn artifact_counters(&self) -> BTreeMap<String, u64> {
        self.fetcher.counters().snapshot()
    }

    /// Runs until cancelled or a task fails; then stops everything.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut first_err = None;
        while let Some(joined) = self.tasks.join_next().await {
            let r = joined.map_err(AgentError::from).and_then(|r| r);
            if let Err(e) = r {
                warn!(error = %e, "agent task failed; stopping");
                if first_err.is_none() {
                    first_err = Some(e);
                }
                self.cancel.cancel();
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Makes the data directory safe to use ([`crate::datadir::prepare`],
/// logging what was not) and opens the store in it.
async fn open_store(cfg: &EdgeConfig) -> Result<Store, AgentError> {
    let data_dir = cfg.data_dir.clone();
    for w in tokio::task::spawn_blocking(move || crate::datadir::prepare(&data_dir)).await?? {
        warn!(node = %cfg.node, "{w}");
    }
    let store_cfg = cfg.store_config();
    Ok(tokio::task::spawn_blocking(move || Store::open(&store_cfg)).await??)
}

/// The local half of the data path, as started by [`spawn_data_path`].
struct DataPath {
    routing: watch::Sender<Routing>,
    ready: watch::Sender<u64>,
    pipeline: Stage,
    host: Stage,
    committer: (oneshot::Sender<bool>, Stage),
}

/// Spawns pipeline → function host → group committer; returns where
/// drivers send their samples.
fn spawn_data_path(
    tasks: &mut Tasks,
    ctx: &AgentContext,
    cfg: &EdgeConfig,
    fetcher: &Arc<ArtifactFetcher>,
    functions: &FunctionsView,
    desired: &watch::Sender<DesiredPair>,
) -> (mpsc::Sender<Vec<Sample>>, DataPath) {
    let (samples_tx, samples_rx) = mpsc::channel(1024);
    let (fn_tx, fn_rx) = mpsc::channel(256);
    let (routing_tx, routing_rx) = watch::channel(Routing::default());
    let (ready_tx, ready_rx) = watch::channel(0u64);
    let pipeline = Pipeline::new(ctx, routing_rx, fn_tx);
    let pipeline = Stage::spawn(tasks, |stop| async move {
        Ok(pipeline.run(samples_rx, stop).await?)
    });
    let host = FunctionHost {
        ctx: ctx.clone(),
        fetcher: fetcher.clone(),
        writer: ctx.writer(),
        view: functions.clone(),
        cache_dir: cfg.data_dir.join(crate::datadir::WASM_CACHE),
        limits: cfg.functions.clone(),
    };
    let desired_rx = desired.subscribe();
    // The host stops by itself when the pipeline has stopped (its input
    // closes) and it has appended everything.
    let host = Stage::spawn(tasks, |_| async move {
        Ok(host
            .run(desired_rx, ready_rx, fn_rx, CancellationToken::new())
            .await?)
    });
    let (commit_tx, commit_rx) = oneshot::channel();
    let (store, clock, every) = (ctx.store.clone(), ctx.clock, cfg.outbox.flush_interval);
    let committer = Stage::spawn(tasks, move |_| async move {
        Ok(store.run_committer(clock, every, commit_rx).await?)
    });
    let path = DataPath {
        routing: routing_tx,
        ready: ready_tx,
        pipeline,
        host,
        committer: (commit_tx, committer),
    };
    (samples_tx, path)
}

/// The uplink as started by [`spawn_link`], with the link state it follows.
struct Uplink {
    conn: watch::Sender<Conn>,
    stage: Stage,
}

/// Spawns the MQTT event loop and the uplink.
fn spawn_link(
    tasks: &mut Tasks,
    ctx: &AgentContext,
    cfg: &EdgeConfig,
    identity: Option<(
        &crate::identity::Identity,
        Arc<crate::identity::ClientCertSlot>,
    )>,
    rotated: &watch::Sender<u64>,
) -> Result<(AsyncClient, LinkReceiver, Uplink, Stage), AgentError> {
    let (id, slot) = identity.map_or((None, None), |(i, s)| (Some(i), Some(s)));
    let (options, security) = link::options(cfg, &ctx.topics, ctx.clock.now_ms(), id, slot)?;
    tracing::info!(node = %cfg.node, broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port), ?security, "MQTT link");
    let (client, eventloop) = link::client(options);
    let (link_tx, link_rx) = link::link_channel(link::LINK_CHANNEL_CAPACITY, ctx.counters.clone());
    let (min, max) = (cfg.mqtt.reconnect_min, cfg.mqtt.reconnect_max);
    // Only a link presenting the identity reconnects after a renewal.
    let rotated = (security == link::LinkSecurity::Identity).then(|| rotated.subscribe());
    let link = Stage::spawn(tasks, |stop| async move {
        link::run_event_loop(eventloop, link_tx, min, max, rotated, stop).await;
        Ok(())
    });
    let (conn_tx, conn_rx) = watch::channel(Conn::default());
    let (store, up) = (ctx.store.clone(), client.clone());
    let (topic, ucfg) = (ctx.topic(TopicKind::Telemetry), cfg.uplink.clone());
    let counters = ctx.counters.clone();
    let stage = Stage::spawn(tasks, move |stop| async move {
        Ok(uplink::run(store, up, topic, ucfg, counters, conn_rx, stop).await?)
    });
    let uplink = Uplink {
        conn: conn_tx,
        stage,
    };
    Ok((client, link_rx, uplink, link))
}

/// Spawns the certificate renewal ([`crate::renewal`]) of a joined node.
fn spawn_renewal(
    tasks: &mut Tasks,
    ctx: &AgentContext,
    cfg: &EdgeConfig,
    (identity, slot): (
        crate::identity::Identity,
        Arc<crate::identity::ClientCertSlot>,
    ),
    rotated: watch::Sender<u64>,
    fetcher: &Arc<ArtifactFetcher>,
    cancel: &CancellationToken,
) {
    let renewal = crate::renewal::Renewal {
        node: cfg.node.clone(),
        data_dir: cfg.data_dir.clone(),
        hub_url: cfg.hub.http_url.clone(),
        identity,
        slot,
        config: cfg.identity.clone(),
        rotated,
        fetcher: Some(fetcher.clone()),
        counters: ctx.counters.clone(),
        clock: ctx.clock,
    };
    let cancel = cancel.clone();
    tasks.spawn(async move {
        renewal.run(cancel).await;
        Ok(())
    });
}

/// Runs an agent from `cfg` until `stop` resolves, then stops it in its
/// shutdown order: what the `edge-node` binary and `fleet-sim agent` run.
/// Call the signal handler that makes `stop` *before* this, so a signal
/// during startup stops the agent cleanly.
pub async fn serve(
    cfg: EdgeConfig,
    clock: Clock,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let cancel = CancellationToken::new();
    let agent = Agent::start(cfg, clock, cancel.clone()).await?;
    tokio::spawn(async move {
        stop.await;
        cancel.cancel();
    });
    agent.run().await
}
