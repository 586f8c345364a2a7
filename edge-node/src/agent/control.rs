//! The control task: the I/O driver of the sans-IO sync [`Session`].
//!
//! It feeds the session link events, events raised by other tasks and
//! report ticks, and executes what the session returns: queue publishes
//! without blocking (never from the task that polls the MQTT event loop),
//! store writes (pinned key, desired document before it is applied, loss
//! windows), outbox acks, and the hand-off of an applied document to the
//! function host, the pipeline's routing and the [`DeviceSet`].

use std::sync::Arc;

use protocols::{DesiredState, Event};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{mpsc, watch};
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::devices::DeviceSet;
use super::{AgentContext, AgentError, report};
use crate::artifacts::{ArtifactFetcher, DesiredPair};
use crate::functions::FunctionsView;
use crate::link::{Conn, LinkEvent, LinkReceiver};
use crate::metrics::Counters;
use crate::pipeline::Routing;
use crate::session::{Input, Output, Restored, Session, encode_report};

/// The I/O driver of the [`Session`]: feeds it link events, events of other
/// tasks and report ticks, and executes what it returns (publishes, store
/// writes, outbox acks, hand-off to functions, routing and devices).
pub(super) struct Control {
    pub(super) session: Session,
    pub(super) ctx: AgentContext,
    pub(super) client: AsyncClient,
    pub(super) conn: watch::Sender<Conn>,
    pub(super) routing: watch::Sender<Routing>,
    pub(super) desired: watch::Sender<DesiredPair>,
    pub(super) devices: DeviceSet,
    pub(super) functions: FunctionsView,
    pub(super) fetcher: Arc<ArtifactFetcher>,
}

/// Reads what the session needs from the store at start: the key to trust
/// (`configured_key`, else the pinned one), the desired documents, whether
/// the last stop was clean (clearing the marker) and the last commit.
pub(super) fn read_restored(
    store: &crate::store::Store,
    configured_key: Option<String>,
) -> Result<Restored, AgentError> {
    let hub_key = match configured_key {
        Some(k) => Some(k),
        None => store.hub_key()?,
    };
    Ok(Restored {
        hub_key,
        previous: store.desired_previous()?,
        current: store.desired_current()?,
        clean_stop: store.take_clean_stop()?,
        last_commit_ms: store.last_commit_time()?,
        last_commit_lag_ms: store.last_commit_lag()?,
        loss_windows: store.loss_windows()?,
    })
}

/// Records a loss window durably and says so in the log.
pub(super) fn record_loss_window(
    store: &crate::store::Store,
    w: protocols::LossWindow,
) -> Result<(), AgentError> {
    store.record_loss_window(w)?;
    warn!(
        from_ms = w.from_ms,
        to_ms = w.to_ms,
        "restarted after an unclean stop: samples in this window that no group commit covered may be missing"
    );
    Ok(())
}

impl Control {
    /// Executes outputs the session returned before this driver existed
    /// (the restore at start, see `Agent::start_with`), in order.
    pub(super) async fn execute_all(&mut self, outputs: Vec<Output>) -> Result<(), AgentError> {
        for out in outputs {
            self.execute(out).await?;
        }
        Ok(())
    }

    pub(super) async fn run(
        &mut self,
        mut link: LinkReceiver,
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
        for out in self.session.handle(input, self.ctx.clock.now_ms()) {
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
                self.ctx.store.pin_hub_key(&hex).await?;
            }
            Output::PersistDesired(doc) => self.ctx.store.put_desired(&doc).await?,
            Output::Apply { desired, previous } => self.apply(&desired, previous),
            Output::RecordLossWindow(w) => record_loss_window(&self.ctx.store, w)?,
            Output::Ack { stream, up_to } => {
                let c = &self.ctx.counters;
                // Only streams that exist: an ack never creates an outbox (H6).
                let Some(outbox) = self.ctx.store.existing_outbox(&stream) else {
                    Counters::add(&c.acks_unknown_stream, 1);
                    debug!(%stream, "ack for a stream with no outbox ignored");
                    return Ok(());
                };
                let done = outbox.ack(up_to)?;
                if done.clamped {
                    Counters::add(&c.acks_beyond_published, 1);
                    debug!(%stream, up_to, published = outbox.published_seq(), "ack above what was published: clamped");
                }
                Counters::add(&c.acks, 1);
                Counters::add(&c.samples_acked, done.released);
            }
            Output::Applied { .. } => {}
            Output::Rejected { revision, reason } => {
                warn!(node = %self.session.node(), ?revision, %reason, "desired state refused");
            }
            Output::Report { topic, mut state } => {
                report::complete(&mut state, self);
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
        self.devices.reconcile(&desired.devices);
        info!(node = %self.session.node(), revision = desired.revision, devices = desired.devices.len(), functions = desired.functions.len(), "desired state applied");
    }

    /// Queues the offline status (the link stays up until the last stage
    /// of the shutdown, so it is sent).
    pub(super) async fn announce_offline(&mut self) {
        // `Stopping` only publishes: nothing in it can fail.
        if let Err(e) = self.handle(Input::Stopping).await {
            warn!(error = %e, "offline status not queued");
        }
    }

    /// Control traffic never waits behind telemetry: it is queued without
    /// blocking, and counted if the queue is full.
    fn try_publish(&self, topic: String, retain: bool, payload: Vec<u8>) {
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .is_err()
        {
            Counters::add(&self.ctx.counters.events_dropped, 1);
        }
    }
}
