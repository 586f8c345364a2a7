//! The agent: wires store, link, drivers, pipeline and uplink together and
//! runs the control loop (desired state in, reported state out).
//!
//! Start here: [`Agent::start`] opens the store, re-applies the last accepted
//! desired revision from disk (so a restart with no link keeps working), and
//! spawns every task into one `JoinSet`; [`Agent::run`] waits for the first
//! task to fail or for cancellation, then drains.

use std::collections::BTreeMap;
use std::sync::Arc;

use protocols::{Backlog, DesiredState, Device, Event, ReportedState, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::artifacts::{ArtifactFetcher, DesiredPair, FetchError};
use crate::clock::Clock;
use crate::config::EdgeConfig;
use crate::drivers::{self, DeviceHandle};
use crate::functions::{FunctionError, FunctionHost, FunctionsView};
use crate::link::{self, LinkError, LinkEvent};
use crate::metrics::Counters;
use crate::pipeline::{Appender, Pipeline, Routing};
use crate::session::{Input, Output, Restored, Session, encode_report};
use crate::store::{Store, StoreError};
use crate::uplink::{self, Conn};

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
    /// A task panicked or was aborted.
    #[error("agent task failed: {0}")]
    Task(String),
}

/// Optional extras of [`Agent::start_with`]; the default is what
/// [`Agent::start`] uses.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// How drivers reach devices whose host is registered here (instead of
    /// the network); see [`drivers::transport`].
    pub device_transports: drivers::transport::DeviceTransports,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    tasks: JoinSet<Result<(), AgentError>>,
    cancel: CancellationToken,
    store: Store,
    functions: FunctionsView,
    fetcher: Arc<ArtifactFetcher>,
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
    pub async fn start_with(
        cfg: EdgeConfig,
        clock: Clock,
        cancel: CancellationToken,
        agent_options: AgentOptions,
    ) -> Result<Self, AgentError> {
        let store_cfg = cfg.store_config();
        let store = {
            let c = store_cfg.clone();
            tokio::task::spawn_blocking(move || Store::open(&c))
                .await
                .map_err(|e| AgentError::Task(e.to_string()))??
        };
        let topics = Topics::new(&cfg.hub.topic_root);
        let counters = Arc::new(Counters::default());
        let options = link::options(&cfg, &topics, clock.now_ms())?;
        let (client, eventloop) = link::client(options);
        let (link_tx, link_rx) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = watch::channel(Conn::default());
        let (routing_tx, routing_rx) = watch::channel(Routing::default());
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (samples_tx, samples_rx) = mpsc::channel(1024);
        let (fn_tx, fn_rx) = mpsc::channel(256);
        let (desired_tx, desired_rx) = watch::channel(DesiredPair::default());
        let (ready_tx, ready_rx) = watch::channel(0u64);
        let functions = FunctionsView::default();
        let fetcher = {
            let (url, dir, store) = (
                cfg.hub.http_url.clone(),
                cfg.data_dir.join("artifacts"),
                store.clone(),
            );
            let f =
                tokio::task::spawn_blocking(move || ArtifactFetcher::new(&url, dir, store, clock))
                    .await
                    .map_err(|e| AgentError::Task(e.to_string()))??;
            Arc::new(f)
        };

        let mut tasks = JoinSet::new();
        {
            let cancel = cancel.clone();
            let (min, max) = (cfg.mqtt.reconnect_min, cfg.mqtt.reconnect_max);
            tasks.spawn(async move {
                link::run_event_loop(eventloop, link_tx, min, max, cancel).await;
                Ok(())
            });
        }
        // Pipeline and committer are stopped by their own tokens after the
        // drivers, so that buffered samples are appended and flushed on a clean stop.
        let pipeline_cancel = CancellationToken::new();
        let committer_cancel = CancellationToken::new();
        // Set when the pipeline and function host have appended everything
        // they held: only then is the committer's final commit a clean stop.
        let drained = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let p = Pipeline {
                store: store.clone(),
                clock,
                counters: counters.clone(),
                routing: routing_rx,
                events: events_tx.clone(),
                node: cfg.node.clone(),
                functions: fn_tx,
            };
            let pc = pipeline_cancel.clone();
            tasks.spawn(async move { Ok(p.run(samples_rx, pc).await?) });
        }
        // The function host stops when the pipeline has stopped (its input
        // closes) and has appended everything; `host_done` tells the
        // shutdown sequence when the last append happened.
        let host_done = CancellationToken::new();
        {
            let host = FunctionHost {
                store: store.clone(),
                clock,
                node: cfg.node.clone(),
                fetcher: fetcher.clone(),
                appender: Appender {
                    store: store.clone(),
                    clock,
                    counters: counters.clone(),
                    events: events_tx.clone(),
                    node: cfg.node.clone(),
                },
                counters: counters.clone(),
                events: events_tx.clone(),
                view: functions.clone(),
                cache_dir: cfg.data_dir.join("wasm-cache"),
            };
            let done = host_done.clone();
            tasks.spawn(async move {
                let r = host
                    .run(desired_rx, ready_rx, fn_rx, CancellationToken::new())
                    .await;
                done.cancel();
                Ok(r?)
            });
        }
        {
            let fetcher = fetcher.clone();
            let desired = desired_tx.subscribe();
            let events = events_tx.clone();
            let node = cfg.node.clone();
            let cancel = cancel.clone();
            tasks.spawn(
                async move { Ok(fetcher.run(desired, ready_tx, events, node, cancel).await?) },
            );
        }
        {
            let store = store.clone();
            let every = cfg.outbox.flush_interval;
            let cc = committer_cancel.clone();
            let clean = drained.clone();
            tasks.spawn(async move { Ok(committer(store, clock, every, cc, clean).await?) });
        }
        {
            let store = store.clone();
            let client = client.clone();
            let topic = uplink::topic(&topics, &cfg.node);
            let ucfg = cfg.uplink.clone();
            let counters = counters.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                Ok(uplink::run(store, client, topic, ucfg, counters, conn_rx, cancel).await?)
            });
        }

        let mut control = Control {
            session: Session::new(cfg.node.clone(), topics, counters.clone(), clock.now_ms()),
            desired: desired_tx,
            functions: functions.clone(),
            fetcher: fetcher.clone(),
            devices: BTreeMap::new(),
            clock,
            store: store.clone(),
            client,
            counters,
            conn: conn_tx,
            routing: routing_tx,
            samples: samples_tx,
            device_cancel: cancel.child_token(),
            transports: agent_options.device_transports,
        };
        control.restore(cfg.hub.public_key.clone()).await?;
        {
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let r = control.run(link_rx, events_rx, cancel).await;
                control.shutdown().await;
                pipeline_cancel.cancel();
                // Let the pipeline and the function host append what they
                // hold, then make it durable.
                let done = tokio::time::timeout(Duration::from_secs(10), host_done.cancelled())
                    .await
                    .is_ok();
                tokio::time::sleep(Duration::from_millis(50)).await;
                drained.store(done, std::sync::atomic::Ordering::Release);
                committer_cancel.cancel();
                r
            });
        }
        Ok(Self {
            tasks,
            cancel,
            store,
            functions,
            fetcher,
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

    /// Artifact fetcher counters by name.
    pub fn artifact_counters(&self) -> BTreeMap<String, u64> {
        self.fetcher.counters().snapshot()
    }

    /// Runs until cancelled or a task fails; then stops everything.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut first_err = None;
        while let Some(joined) = self.tasks.join_next().await {
            let r = joined
                .map_err(|e| AgentError::Task(e.to_string()))
                .and_then(|r| r);
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

async fn committer(
    store: Store,
    clock: Clock,
    every: Duration,
    cancel: CancellationToken,
    drained: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), StoreError> {
    loop {
        let stop = tokio::select! {
            () = cancel.cancelled() => true,
            () = tokio::time::sleep(every) => false,
        };
        let pending = store
            .outboxes()
            .iter()
            .any(|o| o.appended_seq() > o.durable_seq());
        if pending || stop {
            store.record_commit_time(clock.now_ms())?;
            store.commit().await?;
        }
        if stop {
            if drained.load(std::sync::atomic::Ordering::Acquire) {
                store.mark_clean_stop().await?;
            }
            return Ok(());
        }
    }
}

/// The I/O driver of the [`Session`]: feeds it link events, events of other
/// tasks and report ticks, and executes what it returns (publishes, store
/// writes, outbox acks, hand-off to functions, routing and devices).
struct Control {
    session: Session,
    clock: Clock,
    store: Store,
    client: AsyncClient,
    counters: Arc<Counters>,
    conn: watch::Sender<Conn>,
    routing: watch::Sender<Routing>,
    samples: mpsc::Sender<Vec<protocols::Sample>>,
    device_cancel: CancellationToken,
    transports: drivers::transport::DeviceTransports,
    desired: watch::Sender<DesiredPair>,
    functions: FunctionsView,
    fetcher: Arc<ArtifactFetcher>,
    devices: BTreeMap<String, (Device, DeviceHandle)>,
}

impl Control {
    /// Reads what the session needs from the store and lets it trust the
    /// key, re-apply the last accepted desired state and record a loss
    /// window after an unclean stop.
    async fn restore(&mut self, configured_key: Option<String>) -> Result<(), AgentError> {
        let hub_key = match configured_key {
            Some(k) => Some(k),
            None => self.store.hub_key()?,
        };
        let restored = Restored {
            hub_key,
            previous: self.store.desired_previous()?,
            current: self.store.desired_current()?,
            clean_stop: self.store.take_clean_stop()?,
            last_commit_ms: self.store.last_commit_time()?,
            loss_windows: self.store.loss_windows()?,
        };
        self.handle(Input::Restore(&restored)).await
    }

    async fn run(
        &mut self,
        mut link: mpsc::UnboundedReceiver<LinkEvent>,
        mut events: mpsc::UnboundedReceiver<Event>,
        cancel: CancellationToken,
    ) -> Result<(), AgentError> {
        let mut report = tokio::time::interval(self.report_interval());
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                ev = link.recv() => match ev {
                    None => return Ok(()),
                    Some(ev) => self.on_link(ev).await?,
                },
                Some(ev) = events.recv() => self.handle(Input::Event(&ev)).await?,
                _ = report.tick() => {
                    self.handle(Input::ReportTick).await?;
                    let want = self.report_interval();
                    if report.period() != want {
                        report = tokio::time::interval(want);
                    }
                }
            }
        }
    }

    fn report_interval(&self) -> Duration {
        Duration::from_millis(self.session.report_interval_ms())
    }

    async fn on_link(&mut self, ev: LinkEvent) -> Result<(), AgentError> {
        match ev {
            LinkEvent::Connected { session_present } => {
                info!(node = %self.session.node(), session_present, "connected to broker");
                self.handle(Input::Connected).await
            }
            LinkEvent::Disconnected { error } => {
                if self.session.is_up() {
                    warn!(node = %self.session.node(), %error, "broker link lost; buffering");
                }
                self.handle(Input::Disconnected).await
            }
            LinkEvent::Message { topic, payload } => {
                self.handle(Input::Message {
                    topic: &topic,
                    payload: &payload,
                })
                .await
            }
        }
    }

    /// Feeds `input` to the session and executes its outputs in order; a
    /// store error stops at the failing output (nothing after it is done).
    async fn handle(&mut self, input: Input<'_>) -> Result<(), AgentError> {
        for out in self.session.handle(input, self.clock.now_ms()) {
            self.execute(out).await?;
        }
        Ok(())
    }

    async fn execute(&mut self, out: Output) -> Result<(), AgentError> {
        match out {
            Output::Subscribe(topics) => {
                let subs = topics
                    .into_iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
                let _ = self.client.try_subscribe_many(subs);
            }
            Output::Publish {
                topic,
                retain,
                payload,
            } => self.try_publish(topic, retain, payload),
            Output::LinkUp => self.conn.send_modify(|c| {
                c.up = true;
                c.epoch += 1;
            }),
            Output::LinkDown => self.conn.send_modify(|c| c.up = false),
            Output::PinKey(hex) => {
                warn!(node = %self.session.node(), key = %hex, "no hub key configured: trusting the first signer and pinning it (set hub.public_key to avoid this)");
                self.store.pin_hub_key(&hex).await?;
            }
            Output::PersistDesired(doc) => self.store.put_desired(&doc).await?,
            Output::Apply { desired, previous } => self.apply(&desired, previous),
            Output::RecordLossWindow(w) => {
                self.store.record_loss_window(w)?;
                warn!(
                    from_ms = w.from_ms,
                    to_ms = w.to_ms,
                    "restarted after an unclean stop: samples in this window that no group commit covered may be missing"
                );
            }
            Output::Ack { stream, up_to } => {
                let released = self.store.outbox(&stream)?.ack(up_to)?;
                Counters::add(&self.counters.acks, 1);
                Counters::add(&self.counters.samples_acked, released);
            }
            Output::Applied { .. } => {}
            Output::Rejected { revision, reason } => {
                warn!(node = %self.session.node(), ?revision, %reason, "desired state refused");
            }
            Output::Report { topic, mut state } => {
                self.complete(&mut state);
                self.try_publish(topic, true, encode_report(&state));
            }
        }
        Ok(())
    }

    /// Reconciles functions, routing and drivers with `desired`.
    fn apply(&mut self, desired: &Arc<DesiredState>, previous: Option<Arc<DesiredState>>) {
        // The function host learns the new functions before the pipeline
        // routes their inputs to it, and both before new drivers produce.
        self.desired.send_replace(DesiredPair {
            current: Some(desired.clone()),
            previous,
        });
        self.routing.send_replace(Routing {
            raw_stream: desired.config.raw_stream.clone(),
            batch_max_samples: desired.config.batch_max_samples as usize,
            batch_max_age: Duration::from_millis(desired.config.batch_max_age_ms),
            function_inputs: Arc::new(
                desired
                    .functions
                    .iter()
                    .flat_map(|f| f.inputs.iter().copied())
                    .collect(),
            ),
        });
        let wanted: BTreeMap<&str, &Device> =
            desired.devices.iter().map(|d| (d.id.as_str(), d)).collect();
        let stale: Vec<String> = self
            .devices
            .iter()
            .filter(|(id, (spec, _))| wanted.get(id.as_str()) != Some(&spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some((_, handle)) = self.devices.remove(&id) {
                tokio::spawn(handle.stop());
            }
        }
        for d in &desired.devices {
            if !self.devices.contains_key(&d.id) {
                let h = drivers::spawn_routed(
                    d.clone(),
                    drivers::DriverOptions::default(),
                    &self.transports,
                    self.samples.clone(),
                    self.clock,
                    self.device_cancel.child_token(),
                );
                self.devices.insert(d.id.clone(), (d.clone(), h));
            }
        }
        info!(node = %self.session.node(), revision = desired.revision, devices = desired.devices.len(), functions = desired.functions.len(), "desired state applied");
    }

    async fn shutdown(&mut self) {
        for (_, (_, h)) in std::mem::take(&mut self.devices) {
            h.stop().await;
        }
        // Publishing only queues; no store write can fail here.
        let _ = self.handle(Input::Stopping).await;
    }

    /// Adds what only the agent knows to the session's report: backlog,
    /// device and function status, artifact counters.
    fn complete(&self, r: &mut ReportedState) {
        let now = r.at_ms;
        let mut backlog = Backlog::default();
        for o in self.store.outboxes() {
            let s = o.stats();
            backlog.samples += s.samples;
            backlog.bytes += s.bytes;
            backlog.dropped += s.dropped;
            if let Some(ts) = s.oldest_ts_ms {
                backlog.oldest_age_ms = backlog.oldest_age_ms.max(now.saturating_sub(ts));
            }
        }
        r.backlog = backlog;
        r.devices = self
            .devices
            .iter()
            .map(|(id, (_, h))| (id.clone(), h.status()))
            .collect();
        r.functions = self.functions.snapshot();
        r.counters.extend(self.fetcher.counters().snapshot());
    }

    /// Control traffic never waits behind telemetry: it is queued without
    /// blocking, and counted if the queue is full.
    fn try_publish(&self, topic: String, retain: bool, payload: Vec<u8>) {
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .is_err()
        {
            Counters::add(&self.counters.events_dropped, 1);
        }
    }
}
