//! OPC UA client driver.
//!
//! One session per device. Each [`PointGroup`](protocols::PointGroup) gets
//! **one** subscription (publishing interval = group interval) holding all of
//! its points as monitored items (sampling interval = group interval), created
//! in chunks of [`OpcUaOptions::items_per_call`](super::OpcUaOptions). A point
//! with a `deadband` asks the server for an absolute `DataChangeFilter`; if
//! the server refuses the filter the item is created again without it. Items
//! the server refuses to monitor, and whole groups whose subscription cannot
//! be created (or every group, in [`OpcUaMode::Poll`]), are polled with `Read`
//! at the group interval instead.
//!
//! Reconnects: the client library's session loop retries forever with the
//! configured backoff bounds and, when the server lost the session, re-creates
//! the subscriptions and their monitored items (client handles are kept, so
//! notifications map to the same points). If the very first connection
//! (endpoint discovery) fails, this driver backs off with jitter and starts
//! over. On connection loss every point gets one `BAD_NOT_CONNECTED` sample.
//!
//! Timestamps: the source timestamp when the server sends one, else the server
//! timestamp, else the gateway clock.
//!
//! Security (L4): the device's `security` picks the endpoint (none, or
//! Basic256Sha256 sign / sign-and-encrypt, with the client key pair in
//! [`OpcUaOptions::pki_dir`](super::OpcUaOptions)); with `username` the
//! session is activated with a user name and the first line of
//! `password_file`, a plain name in the gateway's device-secrets directory
//! (refused, naming the field, if group or others can read or replace it).
//! Without `username` the session is anonymous. Where `none` or anonymous
//! sessions are allowed at all is the gateway's `[policy]
//! opcua_insecure_endpoints` (default loopback only).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use opcua::client::{
    ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore, Session,
    SessionPollResult,
};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    AttributeId, DataChangeFilter, DataChangeNotification, DataChangeTrigger, DataValue,
    DeadbandType, ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode,
    MonitoringParameters, NodeId, NotificationMessage, ReadValueId, StatusCode, TimestampsToReturn,
    UserTokenPolicy, Variant,
};
use protocols::device::OpcUaSecurity;
use protocols::limits;
use protocols::{Device, DeviceProtocol, PointAddress, Quality, Sample};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::health::{Health, counter};
use super::{DriverOptions, OpcUaMode};
use crate::clock::Clock;

/// Notification batches buffered between the client library's callback and
/// the driver task; beyond this, batches are dropped and counted.
const NOTIFICATION_BUFFER: usize = 1024;

/// Counter of notification batches dropped because the driver fell behind.
pub const DROPPED_BATCHES: &str = "notification_batches_dropped";
/// Counter of monitored items created without their requested deadband.
pub const DEADBAND_REFUSED: &str = "deadband_refused";
/// Counter of points polled because the server would not monitor them.
pub const POLLED_POINTS: &str = "polled_points";
/// Counter of subscriptions created (including re-creations by this driver).
pub const SUBSCRIPTIONS: &str = "subscriptions";
/// Counter of monitored items created.
pub const MONITORED_ITEMS: &str = "monitored_items";

/// Static description of one point.
#[derive(Debug, Clone)]
struct OpcPoint {
    index: u32,
    node: Option<NodeId>,
    scale: f64,
    offset: f64,
    deadband: Option<f64>,
    group: usize,
}

/// Mapping from client handle (position + 1) to point, shared with callbacks.
#[derive(Debug)]
struct PointTable {
    points: Vec<OpcPoint>,
}

impl PointTable {
    fn handle(pos: usize) -> u32 {
        u32::try_from(pos + 1).unwrap_or(u32::MAX)
    }

    fn by_handle(&self, handle: u32) -> Option<&OpcPoint> {
        let pos = usize::try_from(handle).ok()?.checked_sub(1)?;
        self.points.get(pos)
    }
}

/// Unix ms of an OPC UA `DateTime` (100 ns ticks since 1601).
fn unix_ms(dt: &opcua::types::DateTime) -> Option<u64> {
    const EPOCH_DIFF_TICKS: i64 = 116_444_736_000_000_000;
    let t = dt.ticks().checked_sub(EPOCH_DIFF_TICKS)?;
    u64::try_from(t / 10_000).ok().filter(|&ms| ms > 0)
}

/// Quality for an OPC UA status code.
pub fn quality_of(status: StatusCode) -> Quality {
    if status.is_good() {
        Quality::GOOD
    } else if status.is_uncertain() {
        Quality::UNCERTAIN
    } else if status.sub_code() == StatusCode::BadTimeout.sub_code() {
        Quality::BAD_TIMEOUT
    } else if [
        StatusCode::BadNotConnected,
        StatusCode::BadCommunicationError,
        StatusCode::BadConnectionClosed,
        StatusCode::BadServerNotConnected,
        StatusCode::BadNoCommunication,
        StatusCode::BadWaitingForInitialData,
    ]
    .iter()
    .any(|c| c.sub_code() == status.sub_code())
    {
        Quality::BAD_NOT_CONNECTED
    } else {
        Quality::BAD
    }
}

/// Numeric value of a variant: numbers as they are, booleans as 0/1.
pub fn variant_f64(v: &Variant) -> Option<f64> {
    match v {
        Variant::Boolean(b) => Some(if *b { 1.0 } else { 0.0 }),
        other => other.as_f64(),
    }
}

/// Converts one data value of `p` into a sample.
fn sample_of(p: &OpcPoint, dv: &DataValue, now_ms: u64) -> Sample {
    let ts_ms = dv
        .source_timestamp
        .as_ref()
        .and_then(unix_ms)
        .or_else(|| dv.server_timestamp.as_ref().and_then(unix_ms))
        .unwrap_or(now_ms);
    let status = dv.status.unwrap_or(StatusCode::Good);
    let raw = dv.value.as_ref().and_then(variant_f64);
    let (value, quality) = match raw {
        Some(r) if status.is_bad() => (r.mul_add(p.scale, p.offset), quality_of(status)),
        Some(r) => {
            let v = r.mul_add(p.scale, p.offset);
            if v.is_finite() {
                (v, quality_of(status))
            } else {
                (0.0, Quality::BAD_OUT_OF_RANGE)
            }
        }
        None if status.is_bad() => (0.0, quality_of(status)),
        // A value of a non-numeric type.
        None => (0.0, Quality::BAD_MALFORMED),
    };
    Sample {
        point: p.index,
        ts_ms,
        value,
        quality,
    }
}

/// Receives notification messages on the client library's task and forwards
/// one batch of samples per message.
struct Forwarder {
    table: Arc<PointTable>,
    tx: mpsc::Sender<Vec<Sample>>,
    health: Health,
    clock: Clock,
}

impl OnSubscriptionNotificationCore for Forwarder {
    fn on_subscription_notification(
        &mut self,
        notification: NotificationMessage,
        _items: MonitoredItemMap<'_>,
    ) {
        let Some(data) = notification.notification_data else {
            return;
        };
        let now = self.clock.now_ms();
        let mut batch = Vec::new();
        for obj in data {
            if let Some(dc) = obj.into_inner_as::<DataChangeNotification>() {
                for item in dc.monitored_items.into_iter().flatten() {
                    if let Some(p) = self.table.by_handle(item.client_handle) {
                        batch.push(sample_of(p, &item.value, now));
                    }
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        self.health.add(counter::NOTIFICATIONS, batch.len() as u64);
        if self.tx.try_send(batch).is_err() {
            self.health.add(DROPPED_BATCHES, 1);
        }
    }
}

/// Session events the driver cares about.
#[derive(Debug)]
enum SessionEvent {
    Connected,
    Lost(StatusCode),
    ReconnectFailed(StatusCode),
    /// The session loop ended (fatal error or closed).
    Ended(StatusCode),
}

/// The points of `device` with their parsed node ids (a point without a
/// usable one is reported bad).
fn point_table(device: &Device) -> PointTable {
    let mut points = Vec::new();
    let mut invalid = 0usize;
    for (gi, g) in device.groups.iter().enumerate() {
        for p in &g.points {
            let (node, deadband) = match &p.address {
                PointAddress::OpcUa { node_id, deadband } => {
                    (NodeId::from_str(node_id).ok(), *deadband)
                }
                _ => (None, None),
            };
            if node.is_none() {
                invalid += 1;
            }
            points.push(OpcPoint {
                index: p.index,
                node,
                scale: p.scale,
                offset: p.offset,
                deadband,
                group: gi,
            });
        }
    }
    if invalid > 0 {
        tracing::warn!(
            invalid,
            "points without a usable OPC UA node id are reported bad"
        );
    }
    PointTable { points }
}

/// The session identity of a device (see [`identity`]); warns when a
/// password would travel in clear text to a non-loopback server.
fn login(
    endpoint: &str,
    sec: OpcUaSecurity,
    username: Option<&str>,
    password_file: Option<&str>,
    o: &super::OpcUaOptions,
) -> Result<IdentityToken, String> {
    let identity = identity(username, password_file, o)?;
    if sec == OpcUaSecurity::None
        && password_file.is_some()
        && !opcua_endpoint_is_loopback(endpoint)
    {
        tracing::warn!(%endpoint, "sending an OPC UA password to a non-loopback server with security none: it travels in clear text");
    }
    Ok(identity)
}

/// The session identity: a user name with the password from the secrets
/// directory, or anonymous. `Err` names the field.
fn identity(
    username: Option<&str>,
    password_file: Option<&str>,
    o: &super::OpcUaOptions,
) -> Result<IdentityToken, String> {
    let Some(user) = username else {
        return Ok(IdentityToken::Anonymous);
    };
    let password = match password_file {
        Some(name) => {
            super::secrets::read_password(o.secrets_dir.as_deref(), "password_file", name)?
        }
        None => String::new(),
    };
    Ok(IdentityToken::new_user_name(user, password))
}

/// Whether the host of `opc.tcp://host[:port]/…` is loopback.
fn opcua_endpoint_is_loopback(endpoint: &str) -> bool {
    let authority = endpoint
        .strip_prefix("opc.tcp://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    super::secrets::is_loopback(host)
}

fn security(s: OpcUaSecurity) -> (SecurityPolicy, MessageSecurityMode) {
    match s {
        OpcUaSecurity::None => (SecurityPolicy::None, MessageSecurityMode::None),
        OpcUaSecurity::Sign => (SecurityPolicy::Basic256Sha256, MessageSecurityMode::Sign),
        OpcUaSecurity::SignAndEncrypt => (
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
        ),
    }
}

/// Polled points of one group.
#[derive(Debug)]
struct PollSet {
    interval: Duration,
    next: Instant,
    positions: Vec<usize>,
}

/// How one session ended.
enum Ended {
    Cancelled,
    Failed { error: String, was_connected: bool },
}

fn failed(error: String) -> Ended {
    Ended::Failed {
        error,
        was_connected: false,
    }
}

/// Runs the OPC UA driver until `cancel` fires or `out` closes.
pub(crate) async fn run(
    device: Device,
    options: DriverOptions,
    out: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    health: Health,
    cancel: CancellationToken,
) {
    let DeviceProtocol::OpcUa {
        endpoint,
        security: sec,
        username,
        password_file,
    } = &device.protocol
    else {
        health.disconnected("not an OPC UA device");
        cancel.cancelled().await;
        return;
    };
    let identity = match login(
        endpoint,
        *sec,
        username.as_deref(),
        password_file.as_deref(),
        &options.opcua,
    ) {
        Ok(identity) => identity,
        Err(e) => {
            // A missing or loose password file: say so and wait for a fix
            // (a new desired state or a restart restarts the driver).
            tracing::warn!(error = %e, "opc ua device cannot log in");
            health.connect_failed(e);
            cancel.cancelled().await;
            return;
        }
    };
    let table = Arc::new(point_table(&device));
    let intervals: Vec<Duration> = device
        .groups
        .iter()
        .map(|g| Duration::from_millis(g.interval_ms.max(1)))
        .collect();
    let seed = options.jitter_seed.unwrap_or_else(rand::random);
    let mut backoff = Backoff::new(options.backoff, seed);
    // Whether consumers already got a BAD_NOT_CONNECTED sample per point for
    // the current outage.
    let mut down_announced = false;
    loop {
        let ended = session(
            (endpoint, *sec, &identity),
            &options,
            &table,
            &intervals,
            &out,
            clock,
            &health,
            &cancel,
        )
        .await;
        let Ended::Failed {
            error,
            was_connected,
        } = ended
        else {
            break;
        };
        if was_connected {
            backoff.reset();
            down_announced = false;
        }
        let delay = backoff.next_delay();
        tracing::info!(%error, ?delay, "opc ua session failed");
        health.connect_failed(error);
        if !down_announced && !was_connected {
            down_announced = true;
            let batch = not_connected(&table, clock.now_ms());
            health.samples(batch.len(), batch.len());
            if !send(&out, batch, &cancel).await {
                break;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    health.disconnected("stopped");
}

#[allow(clippy::too_many_arguments, reason = "internal plumbing of one task")]
#[allow(
    clippy::too_many_lines,
    reason = "one session's life cycle, read top to bottom"
)]
async fn session(
    (endpoint, sec, identity): (&str, OpcUaSecurity, &IdentityToken),
    options: &DriverOptions,
    table: &Arc<PointTable>,
    intervals: &[Duration],
    out: &mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    health: &Health,
    cancel: &CancellationToken,
) -> Ended {
    let o = &options.opcua;
    let b = options.backoff.sanitized();
    let client = ClientBuilder::new()
        .application_name("edgefleet edge-node")
        .application_uri(o.application_uri.clone())
        .product_uri("urn:edgefleet")
        .pki_dir(o.pki_dir.clone())
        .create_sample_keypair(true)
        .trust_server_certs(o.trust_server_certs)
        .session_retry_limit(-1)
        .session_retry_initial(b.initial)
        .session_retry_max(b.max)
        .request_timeout(options.request_timeout)
        .keep_alive_interval(Duration::from_secs(5).min(b.max))
        .max_failed_keep_alive_count(2)
        .recreate_subscriptions(true)
        .max_message_size(limits::MAX_OPCUA_MESSAGE_BYTES)
        .max_chunk_count(limits::MAX_OPCUA_CHUNKS)
        .max_array_length(limits::MAX_OPCUA_ARRAY_LENGTH)
        .client();
    let mut client = match client {
        Ok(c) => c,
        Err(errs) => return failed(format!("client configuration: {}", errs.join("; "))),
    };
    let (policy, mode) = security(sec);
    let connect = client.connect_to_matching_endpoint(
        (
            endpoint,
            policy.to_str(),
            mode,
            UserTokenPolicy::anonymous(),
        ),
        identity.clone(),
    );
    let connected = tokio::select! {
        () = cancel.cancelled() => return Ended::Cancelled,
        r = tokio::time::timeout(options.connect_timeout, connect) => r,
    };
    let (session, event_loop) = match connected {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return failed(format!("connect {endpoint}: {e}")),
        Err(_) => return failed(format!("connect {endpoint}: timed out")),
    };

    // The library's session loop runs on its own task; we watch its events.
    let (ev_tx, mut ev_rx) = mpsc::channel::<SessionEvent>(64);
    let ev_task = tokio::spawn(async move {
        use futures::StreamExt as _;
        let stream = event_loop.enter();
        futures::pin_mut!(stream);
        let mut end = StatusCode::Good;
        while let Some(item) = stream.next().await {
            let ev = match item {
                Ok(SessionPollResult::Reconnected(_)) => SessionEvent::Connected,
                Ok(SessionPollResult::ConnectionLost(c)) => SessionEvent::Lost(c),
                Ok(SessionPollResult::ReconnectFailed(c)) => SessionEvent::ReconnectFailed(c),
                Ok(_) => continue,
                Err(c) => {
                    end = c;
                    break;
                }
            };
            if ev_tx.send(ev).await.is_err() {
                return;
            }
        }
        let _ = ev_tx.send(SessionEvent::Ended(end)).await;
    });

    let (n_tx, mut n_rx) = mpsc::channel::<Vec<Sample>>(NOTIFICATION_BUFFER);
    let mut subscribed = false;
    let mut polls: Vec<PollSet> = Vec::new();
    let mut was_connected = false;
    let result = loop {
        let next_poll = polls
            .iter()
            .filter(|p| !p.positions.is_empty())
            .map(|p| p.next)
            .min();
        tokio::select! {
            () = cancel.cancelled() => break Ended::Cancelled,
            ev = ev_rx.recv() => match ev {
                Some(SessionEvent::Connected) => {
                    health.connected();
                    was_connected = true;
                    // async-opcua 0.19 re-creates subscriptions while
                    // reconnecting but its new publish loop misses that
                    // trigger and never publishes: kick it.
                    session.trigger_publish_now();
                    if !subscribed {
                        subscribed = true;
                        polls = setup(&session, options, table, intervals, n_tx.clone(), health, clock).await;
                        let polled: usize = polls.iter().map(|p| p.positions.len()).sum();
                        health.add(POLLED_POINTS, polled as u64);
                    }
                }
                Some(SessionEvent::Lost(code)) => {
                    health.disconnected(format!("connection lost: {code}"));
                    let batch = not_connected(table, clock.now_ms());
                    health.samples(batch.len(), batch.len());
                    if !send(out, batch, cancel).await { break Ended::Cancelled; }
                }
                Some(SessionEvent::ReconnectFailed(code)) => {
                    health.connect_failed(format!("reconnect failed: {code}"));
                    if !was_connected && !subscribed {
                        // Never got a session: rebuild the client (new endpoint discovery).
                        break failed(format!("session not established: {code}"));
                    }
                }
                ended @ (Some(SessionEvent::Ended(_)) | None) => {
                    let code = match ended {
                        Some(SessionEvent::Ended(c)) => c,
                        _ => StatusCode::BadUnexpectedError,
                    };
                    break Ended::Failed { error: format!("session loop ended: {code}"), was_connected };
                }
            },
            batch = n_rx.recv() => if let Some(batch) = batch {
                let bad = batch.iter().filter(|s| s.quality.is_bad()).count();
                health.samples(batch.len(), bad);
                if !send(out, batch, cancel).await { break Ended::Cancelled; }
            },
            () = sleep_until_opt(next_poll) => {
                let now = Instant::now();
                for ps in polls.iter_mut().filter(|p| p.next <= now && !p.positions.is_empty()) {
                    ps.next += ps.interval;
                    if ps.next <= now { ps.next = now + ps.interval; }
                    let batch = poll(&session, options, table, &ps.positions, health, clock).await;
                    let bad = batch.iter().filter(|s| s.quality.is_bad()).count();
                    health.samples(batch.len(), bad);
                    if !send(out, batch, cancel).await { break; }
                }
                if cancel.is_cancelled() { break Ended::Cancelled; }
            }
        }
    };
    // Close the session politely (bounded), then stop the session loop.
    session.disable_reconnects();
    let _ = tokio::time::timeout(Duration::from_millis(500), session.disconnect()).await;
    ev_task.abort();
    let _ = ev_task.await;
    result
}

fn not_connected(table: &PointTable, now_ms: u64) -> Vec<Sample> {
    table
        .points
        .iter()
        .map(|p| Sample {
            point: p.index,
            ts_ms: now_ms,
            value: 0.0,
            quality: Quality::BAD_NOT_CONNECTED,
        })
        .collect()
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn send(
    out: &mpsc::Sender<Vec<Sample>>,
    batch: Vec<Sample>,
    cancel: &CancellationToken,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    tokio::select! {
        () = cancel.cancelled() => false,
        r = out.send(batch) => r.is_ok(),
    }
}

fn filter_for(deadband: Option<f64>) -> ExtensionObject {
    match deadband {
        Some(d) if d > 0.0 => ExtensionObject::from_message(DataChangeFilter {
            trigger: DataChangeTrigger::StatusValue,
            deadband_type: DeadbandType::Absolute as u32,
            deadband_value: d,
        }),
        _ => ExtensionObject::null(),
    }
}

fn is_filter_refusal(s: StatusCode) -> bool {
    [
        StatusCode::BadMonitoredItemFilterUnsupported,
        StatusCode::BadFilterNotAllowed,
        StatusCode::BadDeadbandFilterInvalid,
        StatusCode::BadMonitoredItemFilterInvalid,
    ]
    .iter()
    .any(|c| c.sub_code() == s.sub_code())
}

fn item_request(
    table: &PointTable,
    pos: usize,
    interval: Duration,
    queue_size: u32,
    with_filter: bool,
) -> Option<MonitoredItemCreateRequest> {
    let p = table.points.get(pos)?;
    let node_id = p.node.clone()?;
    Some(MonitoredItemCreateRequest {
        item_to_monitor: ReadValueId {
            node_id,
            attribute_id: AttributeId::Value as u32,
            ..Default::default()
        },
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: PointTable::handle(pos),
            sampling_interval: interval.as_secs_f64() * 1000.0,
            filter: if with_filter {
                filter_for(p.deadband)
            } else {
                ExtensionObject::null()
            },
            queue_size,
            discard_oldest: true,
        },
    })
}

/// Creates one subscription per group; returns what must be polled instead.
#[expect(
    clippy::too_many_lines,
    reason = "one pass over the groups building each subscription and its monitored items with their error paths; splitting would thread the session and the poll list through every piece"
)]
async fn setup(
    session: &Arc<Session>,
    options: &DriverOptions,
    table: &Arc<PointTable>,
    intervals: &[Duration],
    tx: mpsc::Sender<Vec<Sample>>,
    health: &Health,
    clock: Clock,
) -> Vec<PollSet> {
    let o = &options.opcua;
    let mut by_group: HashMap<usize, Vec<usize>> = HashMap::new();
    for (pos, p) in table.points.iter().enumerate() {
        by_group.entry(p.group).or_default().push(pos);
    }
    let now = Instant::now();
    let mut polls = Vec::new();
    for (gi, interval) in intervals.iter().enumerate() {
        let positions = by_group.remove(&gi).unwrap_or_default();
        let mut to_poll = Vec::new();
        if o.mode == OpcUaMode::Poll {
            polls.push(PollSet {
                interval: *interval,
                next: now,
                positions,
            });
            continue;
        }
        let keep_alive = o.keep_alive_count.max(1);
        let sub = session
            .create_subscription(
                *interval,
                keep_alive.saturating_mul(3),
                keep_alive,
                0,
                0,
                true,
                Forwarder {
                    table: table.clone(),
                    tx: tx.clone(),
                    health: health.clone(),
                    clock,
                },
            )
            .await;
        let sub_id = match sub {
            Ok(id) => {
                health.add(SUBSCRIPTIONS, 1);
                id
            }
            Err(e) => {
                tracing::warn!(group = gi, error = %e, "subscription refused; polling the group");
                polls.push(PollSet {
                    interval: *interval,
                    next: now,
                    positions,
                });
                continue;
            }
        };
        for chunk in positions.chunks(o.items_per_call.max(1)) {
            let reqs: Vec<(usize, MonitoredItemCreateRequest)> = chunk
                .iter()
                .filter_map(|&pos| {
                    item_request(table, pos, *interval, o.queue_size, true).map(|r| (pos, r))
                })
                .collect();
            // Points without a node id are polled (and reported bad).
            to_poll.extend(
                chunk
                    .iter()
                    .filter(|&&pos| table.points.get(pos).is_some_and(|p| p.node.is_none())),
            );
            let res = session
                .create_monitored_items(
                    sub_id,
                    TimestampsToReturn::Both,
                    reqs.iter().map(|(_, r)| r.clone()).collect(),
                )
                .await;
            let results = match res {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(group = gi, error = %e, "monitored items refused; polling them");
                    to_poll.extend(reqs.iter().map(|(pos, _)| *pos));
                    continue;
                }
            };
            let mut retry_plain = Vec::new();
            for ((pos, _), r) in reqs.iter().zip(results.iter()) {
                let s = r.result.status_code;
                if s.is_good() {
                    health.add(MONITORED_ITEMS, 1);
                    continue;
                }
                if is_filter_refusal(s) {
                    retry_plain.push(*pos);
                } else {
                    to_poll.push(*pos);
                }
            }
            // Anything the server did not answer for is polled.
            to_poll.extend(reqs.iter().skip(results.len()).map(|(pos, _)| *pos));
            if !retry_plain.is_empty() {
                health.add(DEADBAND_REFUSED, retry_plain.len() as u64);
                let plain: Vec<MonitoredItemCreateRequest> = retry_plain
                    .iter()
                    .filter_map(|&pos| item_request(table, pos, *interval, o.queue_size, false))
                    .collect();
                match session
                    .create_monitored_items(sub_id, TimestampsToReturn::Both, plain)
                    .await
                {
                    Ok(res) => {
                        for (pos, r) in retry_plain.iter().zip(res.iter()) {
                            if r.result.status_code.is_good() {
                                health.add(MONITORED_ITEMS, 1);
                            } else {
                                to_poll.push(*pos);
                            }
                        }
                    }
                    Err(_) => to_poll.extend(retry_plain),
                }
            }
        }
        polls.push(PollSet {
            interval: *interval,
            next: now,
            positions: to_poll,
        });
    }
    polls
}

/// One polling read of `positions`.
async fn poll(
    session: &Arc<Session>,
    options: &DriverOptions,
    table: &PointTable,
    positions: &[usize],
    health: &Health,
    clock: Clock,
) -> Vec<Sample> {
    let now = clock.now_ms();
    let mut out = Vec::with_capacity(positions.len());
    let mut ids = Vec::with_capacity(positions.len());
    let mut readable = Vec::with_capacity(positions.len());
    for &pos in positions {
        let Some(p) = table.points.get(pos) else {
            continue;
        };
        match &p.node {
            Some(n) => {
                ids.push(ReadValueId {
                    node_id: n.clone(),
                    attribute_id: AttributeId::Value as u32,
                    ..Default::default()
                });
                readable.push(p);
            }
            None => out.push(Sample {
                point: p.index,
                ts_ms: now,
                value: 0.0,
                quality: Quality::BAD,
            }),
        }
    }
    if ids.is_empty() {
        return out;
    }
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        options.request_timeout,
        session.read(&ids, TimestampsToReturn::Both, 0.0),
    )
    .await;
    let latency = t0.elapsed();
    let now = clock.now_ms();
    match r {
        Ok(Ok(values)) if values.len() == readable.len() => {
            health.request(true, latency, None);
            out.extend(
                readable
                    .iter()
                    .zip(values.iter())
                    .map(|(p, dv)| sample_of(p, dv, now)),
            );
        }
        Ok(Ok(values)) => {
            health.request(
                false,
                latency,
                Some((
                    counter::MALFORMED,
                    format!(
                        "read returned {} values for {} nodes",
                        values.len(),
                        readable.len()
                    ),
                )),
            );
            out.extend(readable.iter().map(|p| Sample {
                point: p.index,
                ts_ms: now,
                value: 0.0,
                quality: Quality::BAD_MALFORMED,
            }));
        }
        Ok(Err(e)) => {
            let q = quality_of(e.status());
            health.request(
                false,
                latency,
                Some((counter::ERRORS, format!("read: {e}"))),
            );
            out.extend(readable.iter().map(|p| Sample {
                point: p.index,
                ts_ms: now,
                value: 0.0,
                quality: q,
            }));
        }
        Err(_) => {
            health.request(
                false,
                latency,
                Some((counter::TIMEOUTS, "read timed out".to_owned())),
            );
            out.extend(readable.iter().map(|p| Sample {
                point: p.index,
                ts_ms: now,
                value: 0.0,
                quality: Quality::BAD_TIMEOUT,
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_identity_comes_from_the_secrets_dir_and_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ua.pw"), "s3cret\nignored\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let o = super::super::OpcUaOptions {
            secrets_dir: Some(dir.path().to_owned()),
            ..super::super::OpcUaOptions::default()
        };
        assert!(matches!(
            identity(None, None, &o).unwrap(),
            IdentityToken::Anonymous
        ));
        match identity(Some("edge"), Some("ua.pw"), &o).unwrap() {
            IdentityToken::UserName(user, password) => {
                assert_eq!((user.as_str(), password.0.as_str()), ("edge", "s3cret"));
            }
            other => panic!("{other:?}"),
        }
        for (file, want) in [
            ("missing.pw", "protocol.password_file"),
            (
                "../node.key",
                "protocol.password_file: \"../node.key\" is not a plain file name",
            ),
        ] {
            let e = identity(Some("edge"), Some(file), &o).unwrap_err();
            assert!(e.contains(want), "{want} not in {e}");
        }
        let none = super::super::OpcUaOptions::default();
        let e = identity(Some("edge"), Some("ua.pw"), &none).unwrap_err();
        assert!(e.contains("no device secrets directory"), "{e}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |m| std::fs::Permissions::from_mode(m);
            std::fs::set_permissions(dir.path(), mode(0o755)).unwrap();
            std::fs::set_permissions(dir.path().join("ua.pw"), mode(0o644)).unwrap();
            let e = identity(Some("edge"), Some("ua.pw"), &o).unwrap_err();
            assert!(e.contains("lets group or others read the password"), "{e}");
        }
    }

    #[test]
    fn loopback_endpoints() {
        assert!(opcua_endpoint_is_loopback("opc.tcp://127.0.0.1:4840/"));
        assert!(opcua_endpoint_is_loopback("opc.tcp://[::1]:4840/UA"));
        assert!(opcua_endpoint_is_loopback("opc.tcp://localhost/"));
        assert!(!opcua_endpoint_is_loopback("opc.tcp://10.0.0.6:4840/"));
        assert!(!opcua_endpoint_is_loopback("http://127.0.0.1/"));
    }

    #[test]
    fn unix_ms_of_datetime() {
        let dt = opcua::types::DateTime::from(0i64);
        assert_eq!(unix_ms(&dt), None);
        // 2021-01-01T00:00:00Z = 1_609_459_200_000 ms.
        let ticks = 116_444_736_000_000_000i64 + 1_609_459_200_000i64 * 10_000;
        assert_eq!(
            unix_ms(&opcua::types::DateTime::from(ticks)),
            Some(1_609_459_200_000)
        );
    }

    #[test]
    fn qualities() {
        assert_eq!(quality_of(StatusCode::Good), Quality::GOOD);
        assert_eq!(quality_of(StatusCode::BadTimeout), Quality::BAD_TIMEOUT);
        assert_eq!(
            quality_of(StatusCode::BadNotConnected),
            Quality::BAD_NOT_CONNECTED
        );
        assert_eq!(quality_of(StatusCode::BadNodeIdUnknown), Quality::BAD);
        assert!(quality_of(StatusCode::UncertainLastUsableValue).0 >= 0x40);
    }

    #[test]
    fn variants() {
        assert_eq!(variant_f64(&Variant::Boolean(true)), Some(1.0));
        assert_eq!(variant_f64(&Variant::Int16(-3)), Some(-3.0));
        assert_eq!(variant_f64(&Variant::Double(2.5)), Some(2.5));
        assert_eq!(variant_f64(&Variant::String("x".into())), None);
    }

    #[test]
    fn samples_from_values() {
        let p = OpcPoint {
            index: 7,
            node: None,
            scale: 2.0,
            offset: 1.0,
            deadband: None,
            group: 0,
        };
        let s = sample_of(&p, &DataValue::value_only(3.0f64), 42);
        assert_eq!(
            (s.point, s.ts_ms, s.value, s.quality),
            (7, 42, 7.0, Quality::GOOD)
        );
        let bad = DataValue {
            value: None,
            status: Some(StatusCode::BadNodeIdUnknown),
            ..Default::default()
        };
        assert_eq!(sample_of(&p, &bad, 1).quality, Quality::BAD);
        let s = sample_of(&p, &DataValue::value_only("text"), 1);
        assert_eq!(s.quality, Quality::BAD_MALFORMED);
    }
}
