//! The agent: wires store, link, drivers, pipeline and uplink together and
//! runs the control loop (desired state in, reported state out).
//!
//! Start here: [`Agent::start`] opens the store, re-applies the last accepted
//! desired revision from disk (so a restart with no link keeps working), and
//! spawns every task into one `JoinSet`; [`Agent::run`] waits for the first
//! task to fail or for cancellation, then drains.

use std::collections::BTreeMap;
use std::sync::Arc;

use protocols::codec::{decode_json, encode_json};
use protocols::signing::{VerifyingKey, key_from_hex, key_to_hex};
use protocols::{
    Ack, Backlog, DesiredState, Device, DeviceStatus, Event, EventKind, NodeState, NodeStatus,
    ReportedState, SignedDesired, TopicKind, Topics,
};
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
            trusted: None,
            applied: None,
            previous: None,
            desired: desired_tx,
            functions: functions.clone(),
            fetcher: fetcher.clone(),
            devices: BTreeMap::new(),
            offline_since_ms: Some(clock.now_ms()),
            loss_windows: Vec::new(),
            cfg,
            clock,
            store: store.clone(),
            topics,
            client,
            counters,
            conn: conn_tx,
            routing: routing_tx,
            samples: samples_tx,
            device_cancel: cancel.child_token(),
            transports: agent_options.device_transports,
        };
        control.restore()?;
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

struct Control {
    cfg: EdgeConfig,
    clock: Clock,
    store: Store,
    topics: Topics,
    client: AsyncClient,
    counters: Arc<Counters>,
    conn: watch::Sender<Conn>,
    routing: watch::Sender<Routing>,
    samples: mpsc::Sender<Vec<protocols::Sample>>,
    device_cancel: CancellationToken,
    transports: drivers::transport::DeviceTransports,
    trusted: Option<VerifyingKey>,
    applied: Option<DesiredState>,
    previous: Option<Arc<DesiredState>>,
    desired: watch::Sender<DesiredPair>,
    functions: FunctionsView,
    fetcher: Arc<ArtifactFetcher>,
    devices: BTreeMap<String, (Device, DeviceHandle)>,
    offline_since_ms: Option<u64>,
    loss_windows: Vec<protocols::LossWindow>,
}

impl Control {
    /// Loads the trusted key and re-applies the last accepted desired state.
    fn restore(&mut self) -> Result<(), AgentError> {
        let pinned = match &self.cfg.hub.public_key {
            Some(k) => Some(k.clone()),
            None => self.store.hub_key()?,
        };
        self.trusted = pinned.as_deref().and_then(|k| key_from_hex(k).ok());
        if let (Some(doc), Some(key)) = (self.store.desired_previous()?, self.trusted) {
            // Kept for rollback: its artifacts are not garbage-collected.
            self.previous = doc.verify(&key).ok().map(Arc::new);
        }
        if let (Some(doc), Some(key)) = (self.store.desired_current()?, self.trusted) {
            match doc.verify(&key) {
                Ok(desired) => {
                    info!(node = %self.cfg.node, revision = desired.revision, "re-applying desired state from disk");
                    self.apply(desired);
                }
                Err(e) => {
                    warn!(error = %e, "stored desired state does not verify; waiting for the hub");
                }
            }
        }
        // Anything not covered by a completed group commit before an unclean
        // stop may be gone: report the window (durably, and in every report).
        let clean = self.store.take_clean_stop()?;
        if let (false, Some(last)) = (clean, self.store.last_commit_time()?) {
            let batch_age = self
                .applied
                .as_ref()
                .map_or(0, |d| d.config.batch_max_age_ms);
            let w = protocols::LossWindow {
                from_ms: last.saturating_sub(batch_age),
                to_ms: self.clock.now_ms(),
            };
            self.store.record_loss_window(w)?;
            warn!(
                from_ms = w.from_ms,
                to_ms = w.to_ms,
                "restarted after an unclean stop: samples in this window that no group commit covered may be missing"
            );
            self.event(
                EventKind::UncleanRestart {
                    from_ms: w.from_ms,
                    to_ms: w.to_ms,
                },
                format!(
                    "agent restarted after an unclean stop; samples taken in the {} ms before it restarted that no group commit covered may be missing",
                    w.to_ms - w.from_ms
                ),
            );
        }
        self.loss_windows = self.store.loss_windows()?;
        Ok(())
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
                Some(ev) = events.recv() => self.publish_event(&ev),
                _ = report.tick() => {
                    if self.conn.borrow().up {
                        self.report();
                    }
                    let want = self.report_interval();
                    if report.period() != want {
                        report = tokio::time::interval(want);
                    }
                }
            }
        }
    }

    fn report_interval(&self) -> Duration {
        Duration::from_millis(
            self.applied
                .as_ref()
                .map_or(5_000, |d| d.config.report_interval_ms),
        )
    }

    async fn on_link(&mut self, ev: LinkEvent) -> Result<(), AgentError> {
        match ev {
            LinkEvent::Connected { session_present } => {
                Counters::add(&self.counters.connects, 1);
                info!(node = %self.cfg.node, session_present, "connected to broker");
                let subs = [TopicKind::Desired, TopicKind::Ack].map(|k| {
                    rumqttc::SubscribeFilter::new(
                        self.topics.node(&self.cfg.node, k),
                        QoS::AtLeastOnce,
                    )
                });
                let _ = self.client.try_subscribe_many(subs);
                let status = NodeStatus {
                    node: self.cfg.node.clone(),
                    state: NodeState::Online,
                    at_ms: self.clock.now_ms(),
                };
                self.try_publish(
                    TopicKind::Status,
                    true,
                    encode_json("status", &status).unwrap_or_default(),
                );
                self.conn.send_modify(|c| {
                    c.up = true;
                    c.epoch += 1;
                });
                self.report();
                self.offline_since_ms = None;
            }
            LinkEvent::Disconnected { error } => {
                if self.conn.borrow().up {
                    Counters::add(&self.counters.disconnects, 1);
                    warn!(node = %self.cfg.node, %error, "broker link lost; buffering");
                    self.conn.send_modify(|c| c.up = false);
                    self.offline_since_ms = Some(self.clock.now_ms());
                }
            }
            LinkEvent::Message { topic, payload } => match self.topics.parse(&topic) {
                Some((node, TopicKind::Desired)) if node == self.cfg.node => {
                    self.on_desired(&payload).await?;
                }
                Some((node, TopicKind::Ack)) if node == self.cfg.node => self.on_ack(&payload)?,
                _ => {
                    Counters::add(&self.counters.bad_messages, 1);
                    warn!(%topic, "message on unexpected topic ignored");
                }
            },
        }
        Ok(())
    }

    fn on_ack(&mut self, payload: &[u8]) -> Result<(), AgentError> {
        let ack: Ack = match decode_json("ack", payload) {
            Ok(a) => a,
            Err(e) => {
                Counters::add(&self.counters.bad_messages, 1);
                let topic = self.topics.node(&self.cfg.node, TopicKind::Ack);
                self.event(EventKind::BadMessage { topic }, e.to_string());
                return Ok(());
            }
        };
        if !protocols::validate::is_valid_name(&ack.stream) {
            Counters::add(&self.counters.bad_messages, 1);
            return Ok(());
        }
        let released = self.store.outbox(&ack.stream)?.ack(ack.up_to_seq)?;
        Counters::add(&self.counters.acks, 1);
        Counters::add(&self.counters.samples_acked, released);
        Ok(())
    }

    async fn on_desired(&mut self, payload: &[u8]) -> Result<(), AgentError> {
        let reject = |this: &mut Self, revision: Option<u64>, msg: String| {
            Counters::add(&this.counters.desired_rejected, 1);
            warn!(node = %this.cfg.node, ?revision, reason = %msg, "desired state refused");
            this.event(EventKind::DesiredRejected { revision }, msg);
        };
        if payload.is_empty() {
            return Ok(()); // a cleared retained message
        }
        let doc = match SignedDesired::decode(payload) {
            Ok(d) => d,
            Err(e) => {
                reject(self, None, e.to_string());
                return Ok(());
            }
        };
        let key = match self.trusted {
            Some(k) => k,
            None => match doc.signer() {
                Ok(k) => {
                    warn!(node = %self.cfg.node, key = %key_to_hex(&k), "no hub key configured: trusting the first signer and pinning it (set hub.public_key to avoid this)");
                    self.store.pin_hub_key(&key_to_hex(&k)).await?;
                    self.trusted = Some(k);
                    k
                }
                Err(e) => {
                    reject(self, doc.claimed_revision(), e.to_string());
                    return Ok(());
                }
            },
        };
        let desired = match doc.verify(&key) {
            Ok(d) => d,
            Err(e) => {
                reject(self, doc.claimed_revision(), e.to_string());
                return Ok(());
            }
        };
        if desired.node != self.cfg.node {
            reject(
                self,
                Some(desired.revision),
                format!("document is for node {:?}", desired.node),
            );
            return Ok(());
        }
        let applied = self.applied.as_ref().map_or(0, |d| d.revision);
        if desired.revision == applied {
            return Ok(()); // retained re-delivery
        }
        if desired.revision < applied {
            reject(
                self,
                Some(desired.revision),
                format!("stale revision {} (applied {applied})", desired.revision),
            );
            return Ok(());
        }
        // Persist before acting: a restart re-applies this revision with no link.
        self.store.put_desired(&doc).await?;
        let revision = desired.revision;
        self.apply(desired);
        Counters::add(&self.counters.desired_applied, 1);
        self.event(
            EventKind::DesiredApplied { revision },
            format!("applied revision {revision}"),
        );
        self.report();
        Ok(())
    }

    /// Reconciles drivers and routing with `desired`.
    fn apply(&mut self, desired: DesiredState) {
        // The function host learns the new functions before the pipeline
        // routes their inputs to it, and both before new drivers produce.
        if let Some(old) = self.applied.take() {
            self.previous = Some(Arc::new(old));
        }
        self.desired.send_replace(DesiredPair {
            current: Some(Arc::new(desired.clone())),
            previous: self.previous.clone(),
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
        info!(node = %self.cfg.node, revision = desired.revision, devices = desired.devices.len(), functions = desired.functions.len(), "desired state applied");
        self.applied = Some(desired);
    }

    async fn shutdown(&mut self) {
        for (_, (_, h)) in std::mem::take(&mut self.devices) {
            h.stop().await;
        }
        let status = NodeStatus {
            node: self.cfg.node.clone(),
            state: NodeState::Offline,
            at_ms: self.clock.now_ms(),
        };
        self.try_publish(
            TopicKind::Status,
            true,
            encode_json("status", &status).unwrap_or_default(),
        );
    }

    fn reported(&self) -> ReportedState {
        let now = self.clock.now_ms();
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
        let devices: BTreeMap<String, DeviceStatus> = self
            .devices
            .iter()
            .map(|(id, (_, h))| (id.clone(), h.status()))
            .collect();
        let mut counters = self.counters.snapshot();
        counters.extend(self.fetcher.counters().snapshot());
        ReportedState {
            node: self.cfg.node.clone(),
            applied_revision: self.applied.as_ref().map_or(0, |d| d.revision),
            functions: self.functions.snapshot(),
            devices,
            backlog,
            offline_since_ms: self.offline_since_ms,
            counters,
            loss_windows: self.loss_windows.clone(),
            at_ms: now,
        }
    }

    fn report(&self) {
        let r = self.reported();
        self.try_publish(
            TopicKind::Reported,
            true,
            encode_json("reported", &r).unwrap_or_default(),
        );
    }

    fn event(&self, kind: EventKind, message: String) {
        let ev = Event {
            node: self.cfg.node.clone(),
            at_ms: self.clock.now_ms(),
            kind,
            message,
        };
        self.publish_event(&ev);
    }

    fn publish_event(&self, ev: &Event) {
        self.try_publish(
            TopicKind::Events,
            false,
            encode_json("event", ev).unwrap_or_default(),
        );
    }

    /// Control traffic never waits behind telemetry: it is queued without
    /// blocking, and counted if the queue is full.
    fn try_publish(&self, kind: TopicKind, retain: bool, payload: Vec<u8>) {
        let topic = self.topics.node(&self.cfg.node, kind);
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .is_err()
        {
            Counters::add(&self.counters.events_dropped, 1);
        }
    }
}
