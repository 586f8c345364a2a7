//! The hub's MQTT client session: the connection options ([`client`]), the
//! event-loop task ([`run`]), the task that subscribes and republishes
//! desired state on every connect ([`resubscribe`]), readiness
//! ([`Readiness`], behind `GET /readyz`) and how a message reached the hub
//! ([`Delivery`]).
//!
//! The event loop is polled by [`run`], which never awaits the client: it
//! forwards telemetry and documents to [`crate::ingest`] over a bounded
//! channel and connection changes to [`resubscribe`], which does the
//! subscribing and publishing. When the hub drains, [`run`] stops forwarding
//! but keeps the connection while the last acks go out, and tells when the
//! broker has them (see [`Drain`]).
//!
//! # Invariants
//! - The hub subscribes only after a connect, so a `SubAck` means the
//!   subscriptions of the current connection are in place.
//! - [`Hub::mqtt_ready`] holds only between a connect's `SubAck` plus
//!   desired-state republish and the next connection error.
//! - Once intake has stopped, nothing more is forwarded to ingest: incoming
//!   messages are dropped (an edge resends whatever was not acked).
//! - The hub never unsubscribes, except from [`drain_marker`]: the client
//!   writes requests in the order they were made, so once that `Unsubscribe`
//!   is written, everything published before it is written too.
//! - [`Delivered::Confirmed`] means everything published before
//!   [`mark_drained`] was written and acknowledged by the broker (the marker
//!   written, nothing pending or inflight in the event loop).

use protocols::backoff::{Backoff, BackoffPolicy};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use protocols::{TopicKind, Topics};
use rumqttc::{
    AsyncClient, ConnectionError, Disconnect, Event as MqttEvent, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, Request, SubscribeFilter,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::hub::{Hub, HubError};

/// Reconnects: 100 ms doubling to 10 s, jittered, so hub replicas do not
/// reconnect in lockstep.
const RECONNECT: BackoffPolicy =
    BackoffPolicy::reconnect(Duration::from_millis(100), Duration::from_secs(10));
/// How long a draining hub waits for its last acks to be written and
/// acknowledged by the broker.
pub(crate) const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a draining hub waits to send its MQTT `Disconnect`.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the hub's session connects and how it authenticates: the embedded
/// broker's internal port with its per-process credentials, or an external
/// broker with what `[mqtt]` configures (TLS, client certificate,
/// username/password).
#[derive(Clone)]
pub struct BrokerLink {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Username and password.
    pub login: Option<(String, String)>,
    /// TLS (a client certificate inside when configured).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for BrokerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLink")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.login.as_ref().map(|l| &l.0))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The hub's MQTT client and the event loop [`run`] polls: a persistent
/// session (clean session off) under a fixed client id.
pub(crate) fn client(client_id: &str, broker: &BrokerLink) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    if let Some((user, password)) = &broker.login {
        opts.set_credentials(user.clone(), password.clone());
    }
    if let Some(tls) = &broker.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    opts.set_clean_session(false);
    opts.set_keep_alive(Duration::from_secs(15));
    opts.set_max_packet_size(
        protocols::limits::MAX_SYNC_PACKET_BYTES,
        protocols::limits::MAX_SYNC_PACKET_BYTES,
    );
    opts.set_inflight(500);
    AsyncClient::new(opts, 1024)
}

/// Whether the session is connected, subscribed, and has republished
/// desired state.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    /// Set on a `ConnAck`; cleared when the connection drops.
    connected: AtomicBool,
    /// Set when the broker acknowledged the hub's subscriptions; cleared
    /// when the connection drops.
    subscribed: AtomicBool,
    /// Set when desired state was republished after a connect; cleared when
    /// the connection drops.
    republished: AtomicBool,
}

impl Readiness {
    /// Both flags set (see [`Hub::mqtt_ready`]).
    pub(crate) fn ready(&self) -> bool {
        self.subscribed.load(Ordering::Acquire) && self.republished.load(Ordering::Acquire)
    }

    /// Whether the session has a connection now.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn lost(&self) {
        self.connected.store(false, Ordering::Release);
        self.subscribed.store(false, Ordering::Release);
        self.republished.store(false, Ordering::Release);
    }
}

/// What the event loop tells [`resubscribe`].
#[derive(Debug)]
pub(crate) enum Control {
    /// A connection was established (`ConnAck`).
    Connected,
}

/// How a message reached the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Forwarded as it was published (MQTT 3.1.1 §3.3.1.3: retain flag 0
    /// on a matching, established subscription; also messages queued for
    /// the hub's persistent session while it was away).
    Live,
    /// A stored retained message, replayed because the hub (re)subscribed.
    Retained,
}

impl Delivery {
    fn of(retain: bool) -> Self {
        if retain { Self::Retained } else { Self::Live }
    }
}

/// One incoming message, as the event loop hands it to ingest.
#[derive(Debug)]
pub(crate) struct Message {
    /// Topic it was published on.
    pub(crate) topic: String,
    /// Payload.
    pub(crate) payload: Bytes,
    /// Live or replayed.
    pub(crate) delivery: Delivery,
}

/// Sent to [`run`] by a draining hub once its last acks are published and
/// [`mark_drained`] was called: [`run`] then polls until all of it is
/// written and acknowledged, answers on `done`, disconnects and ends.
#[derive(Debug)]
pub(crate) struct Drain {
    /// Where the outcome goes.
    pub(crate) done: oneshot::Sender<Delivered>,
}

/// What became of a [`Drain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Written, and acknowledged by the broker.
    Confirmed,
    /// Not connected (or the connection dropped): not delivered.
    Offline,
    /// Not acknowledged within [`DELIVERY_TIMEOUT`].
    TimedOut,
}

/// The channels [`run`] talks on.
#[derive(Debug)]
pub(crate) struct Links {
    /// To ingest (closed when intake stops).
    pub(crate) forward: mpsc::Sender<Message>,
    /// To [`resubscribe`].
    pub(crate) control: mpsc::UnboundedSender<Control>,
    /// From the drain in [`crate::app::App::run`].
    pub(crate) drain: oneshot::Receiver<Drain>,
}

/// What one polled event asks of the loop.
enum Step {
    Nothing,
    Connected,
    Message(Message),
    /// The connection failed: wait this long before polling again.
    Backoff(Duration),
}

struct Session {
    hub: Arc<Hub>,
    eventloop: EventLoop,
    /// The [`drain_marker`] `Unsubscribe` was written.
    marker_written: bool,
    backoff: Backoff,
}

/// The filter whose `Unsubscribe` marks the end of a draining hub's
/// publishes (the hub never subscribes to it; brokers answer an
/// `Unsubscribe` of an unknown filter with an `UnsubAck` or not at all, and
/// change nothing).
pub(crate) fn drain_marker(topics: &Topics) -> String {
    format!("{}/hub/drain-marker", topics.root())
}

/// Queues the drain marker behind everything the hub has published.
pub(crate) async fn mark_drained(hub: &Hub) -> Result<(), HubError> {
    hub.client
        .unsubscribe(drain_marker(&hub.topics))
        .await
        .map_err(|e| HubError::Mqtt(e.to_string()))
}

/// The event-loop task. Until `intake` is cancelled it forwards every
/// incoming message to ingest; then it closes that channel, keeps the
/// connection until the [`Drain`] arrives, delivers it, disconnects and ends.
/// It ends at once if the drain is dropped instead.
pub(crate) async fn run(
    hub: Arc<Hub>,
    eventloop: EventLoop,
    links: Links,
    intake: CancellationToken,
) -> Result<(), HubError> {
    let Links {
        forward,
        control,
        mut drain,
    } = links;
    let mut s = Session {
        hub,
        eventloop,
        marker_written: false,
        backoff: Backoff::new(RECONNECT, rand::random()),
    };
    s.serve(&forward, &control, &intake).await;
    drop(forward); // ingest works off what it holds, then ends
    let Some(request) = s.wait_for_drain(&mut drain).await else {
        return Ok(());
    };
    let outcome = s.deliver().await;
    let _ = request.done.send(outcome);
    s.disconnect().await;
    Ok(())
}

impl Session {
    fn step(&mut self, polled: Result<MqttEvent, ConnectionError>) -> Step {
        match polled {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                self.backoff.reset();
                self.hub.readiness.connected.store(true, Ordering::Release);
                Step::Connected
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                // The hub subscribes only after a connect.
                self.hub.readiness.subscribed.store(true, Ordering::Release);
                Step::Nothing
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => Step::Message(Message {
                topic: p.topic,
                payload: p.payload,
                delivery: Delivery::of(p.retain),
            }),
            Ok(MqttEvent::Outgoing(Outgoing::Unsubscribe(_))) => {
                self.marker_written = true;
                Step::Nothing
            }
            Ok(_) => Step::Nothing,
            Err(e) => {
                self.hub.readiness.lost();
                warn!(error = %e, "hub MQTT connection error; retrying");
                Step::Backoff(self.backoff.next_delay())
            }
        }
    }

    /// Polls and forwards until `intake` is cancelled (or ingest is gone).
    async fn serve(
        &mut self,
        forward: &mpsc::Sender<Message>,
        control: &mpsc::UnboundedSender<Control>,
        intake: &CancellationToken,
    ) {
        loop {
            let polled = tokio::select! {
                () = intake.cancelled() => return,
                p = self.eventloop.poll() => p,
            };
            match self.step(polled) {
                Step::Nothing => {}
                Step::Connected => {
                    let _ = control.send(Control::Connected);
                }
                Step::Message(m) => tokio::select! {
                    () = intake.cancelled() => return,
                    r = forward.send(m) => if r.is_err() { return },
                },
                Step::Backoff(d) => tokio::select! {
                    () = intake.cancelled() => return,
                    () = tokio::time::sleep(d) => {}
                },
            }
        }
    }

    /// Keeps the connection (dropping what comes in) until the drain arrives.
    async fn wait_for_drain(&mut self, drain: &mut oneshot::Receiver<Drain>) -> Option<Drain> {
        loop {
            let polled = tokio::select! {
                r = &mut *drain => return r.ok(),
                p = self.eventloop.poll() => p,
            };
            match self.step(polled) {
                Step::Nothing | Step::Connected => {}
                Step::Message(m) => debug!(topic = %m.topic, "draining: message dropped"),
                Step::Backoff(d) => tokio::select! {
                    r = &mut *drain => return r.ok(),
                    () = tokio::time::sleep(d) => {}
                },
            }
        }
    }

    /// Polls until the drain marker is written and nothing is pending or
    /// inflight: the broker has acknowledged every publish made before it.
    async fn deliver(&mut self) -> Delivered {
        let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
        loop {
            if !self.hub.readiness.connected() {
                return Delivered::Offline;
            }
            if self.marker_written
                && self.eventloop.pending.is_empty()
                && self.eventloop.state.inflight() == 0
            {
                return Delivered::Confirmed;
            }
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Err(_) => return Delivered::TimedOut,
                Ok(polled) => {
                    if let Step::Message(m) = self.step(polled) {
                        debug!(topic = %m.topic, "draining: message dropped");
                    }
                }
            }
        }
    }

    /// Sends an MQTT `Disconnect`, so the broker keeps the session without
    /// waiting for the keep-alive to expire.
    async fn disconnect(&mut self) {
        if !self.hub.readiness.connected() {
            return;
        }
        self.eventloop
            .pending
            .push_back(Request::Disconnect(Disconnect));
        let sent = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if sent.is_err() {
            debug!("hub MQTT disconnect not sent in time");
        }
    }
}

/// On every connect: subscribes to what the hub consumes and republishes
/// every node's desired state. Ends when `stop` is cancelled or the event
/// loop is gone.
pub(crate) async fn resubscribe(
    hub: Arc<Hub>,
    mut control: mpsc::UnboundedReceiver<Control>,
    shared_group: Option<String>,
    stop: CancellationToken,
) -> Result<(), HubError> {
    loop {
        let ev = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            ev = control.recv() => ev,
        };
        let Some(Control::Connected) = ev else {
            return Ok(());
        };
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            r = on_connect(&hub, shared_group.as_deref()) => r?,
        }
    }
}

async fn on_connect(hub: &Hub, shared_group: Option<&str>) -> Result<(), HubError> {
    let telemetry = match shared_group {
        Some(g) => hub.topics.shared_all_nodes(g, TopicKind::Telemetry),
        None => hub.topics.all_nodes(TopicKind::Telemetry),
    };
    let filters = vec![
        SubscribeFilter::new(telemetry, QoS::AtLeastOnce),
        SubscribeFilter::new(hub.topics.all_nodes(TopicKind::Reported), QoS::AtLeastOnce),
        SubscribeFilter::new(hub.topics.all_nodes(TopicKind::Status), QoS::AtLeastOnce),
        SubscribeFilter::new(hub.topics.all_nodes(TopicKind::Events), QoS::AtLeastOnce),
    ];
    hub.client
        .subscribe_many(filters)
        .await
        .map_err(|e| HubError::Mqtt(e.to_string()))?;
    // The broker may have lost retained messages (rumqttd keeps
    // them in memory): publish every node's desired state again.
    for (node, rec) in hub.registry.all()? {
        if let Some(doc) = rec.desired {
            hub.publish_desired(&node, &doc).await?;
        }
    }
    hub.readiness.republished.store(true, Ordering::Release);
    info!("hub subscribed and desired state republished");
    Ok(())
}
