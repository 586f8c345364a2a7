//! Sends durable outbox entries upstream and paces the backlog.
//!
//! Per stream there are two cursors:
//! - the *drain* cursor walks from the last ack upward, in order, at most
//!   `drain_rate` samples/s and `max_in_flight_samples` ahead of the ack;
//! - when a backlog is found at (re)connect, a *live* cursor starts at the
//!   newest durable entry and sends new data as soon as it is durable, so live
//!   data is never held behind hours of backlog. When the drain catches up
//!   with where live sending began, the two merge.
//!
//! The hub stores by sequence number and acks the contiguous prefix, so this
//! ordering is safe. After a reconnect, or with no ack progress for
//! `ack_timeout`, both cursors rewind to the last ack and everything past it
//! is sent again (the hub drops the duplicates).

use std::collections::HashMap;
use std::sync::Arc;

use protocols::codec::encode_batch;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::UplinkConfig;
use crate::link::Conn;
use crate::metrics::Counters;
use crate::store::{Outbox, Store, StoreError};

/// Entries of at most this age (by newest sample) count as live.
const LIVE_THRESHOLD_SAMPLES: u64 = 5_000;

#[derive(Debug)]
struct Cursor {
    epoch: u64,
    sent: u64,
    live_from: Option<u64>,
    live_sent: u64,
    last_ack: u64,
    last_progress: Instant,
    tokens: f64,
    refilled: Instant,
}

impl Cursor {
    fn new(acked: u64, epoch: u64) -> Self {
        let now = Instant::now();
        Self {
            epoch,
            sent: acked,
            live_from: None,
            live_sent: acked,
            last_ack: acked,
            last_progress: now,
            tokens: 0.0,
            refilled: now,
        }
    }
}

/// The uplink task: runs until cancelled.
pub async fn run(
    store: Store,
    client: AsyncClient,
    topic: String,
    cfg: UplinkConfig,
    counters: Arc<Counters>,
    mut conn: watch::Receiver<Conn>,
    cancel: CancellationToken,
) -> Result<(), StoreError> {
    let mut cursors: HashMap<String, Cursor> = HashMap::new();
    let tick = Duration::from_millis(20);
    loop {
        let c = *conn.borrow_and_update();
        if !c.up {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                r = conn.changed() => if r.is_err() { return Ok(()) },
            }
            continue;
        }
        let mut busy = false;
        for outbox in store.outboxes() {
            let cur = cursors
                .entry(outbox.stream().to_owned())
                .or_insert_with(|| Cursor::new(outbox.stats().acked, c.epoch));
            // Stopping mid-step loses nothing: whatever was not acked is
            // sent again after the next start.
            let stepped = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                r = step(&outbox, cur, c.epoch, &cfg, &client, &topic, &counters) => r,
            };
            match stepped {
                Ok(sent) => busy |= sent,
                Err(StepError::Store(e)) => return Err(e),
                // The client's request channel is closed: we are shutting down.
                Err(StepError::Closed) => return Ok(()),
            }
        }
        if !busy {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(tick) => {}
                _ = conn.changed() => {}
            }
        } else if cancel.is_cancelled() {
            return Ok(());
        }
    }
}

enum StepError {
    Store(StoreError),
    Closed,
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// One round for one stream; returns whether anything was sent.
async fn step(
    outbox: &Outbox,
    cur: &mut Cursor,
    epoch: u64,
    cfg: &UplinkConfig,
    client: &AsyncClient,
    topic: &str,
    counters: &Counters,
) -> Result<bool, StepError> {
    let st = outbox.stats();
    let now = Instant::now();
    if st.acked > cur.last_ack {
        cur.last_ack = st.acked;
        cur.last_progress = now;
    }
    let outstanding = cur.sent.max(cur.live_sent) > st.acked;
    let stalled = outstanding && now.duration_since(cur.last_progress) > cfg.ack_timeout;
    if cur.epoch != epoch || stalled {
        if stalled {
            Counters::add(&counters.resends, 1);
        }
        *cur = Cursor::new(st.acked, epoch);
    }
    cur.sent = cur.sent.max(st.acked);
    cur.live_sent = cur.live_sent.max(st.acked);

    if cur.live_from.is_none() && st.durable > cur.sent + LIVE_THRESHOLD_SAMPLES {
        cur.live_from = Some(st.durable + 1);
        cur.live_sent = st.durable;
    }

    let mut sent_any = false;
    if cur.live_from.is_some() {
        for b in outbox.pending(cur.live_sent, 64)? {
            let last = b.last_seq().unwrap_or(b.first_seq);
            publish(client, topic, &b, counters).await?;
            cur.live_sent = last;
            sent_any = true;
        }
    }

    // Drain (or normal in-order sending when there is no backlog).
    let limit = cur.live_from.map_or(u64::MAX, |lf| lf - 1);
    let pacing = cur.live_from.is_some();
    if pacing {
        let rate = cfg.drain_rate as f64;
        cur.tokens = (cur.tokens + now.duration_since(cur.refilled).as_secs_f64() * rate).min(rate);
        cur.refilled = now;
    }
    let room = cfg
        .max_in_flight_samples
        .saturating_sub(cur.sent.saturating_sub(st.acked));
    if room > 0 && cur.sent < limit {
        for b in outbox.pending(cur.sent, 64)? {
            if b.first_seq > limit {
                break;
            }
            let n = b.samples.len() as f64;
            if pacing && cur.tokens < n {
                break;
            }
            let last = b.last_seq().unwrap_or(b.first_seq);
            publish(client, topic, &b, counters).await?;
            if pacing {
                cur.tokens -= n;
            }
            cur.sent = last;
            sent_any = true;
            if cur.sent.saturating_sub(st.acked) >= cfg.max_in_flight_samples {
                break;
            }
        }
    }
    if let Some(lf) = cur.live_from
        && cur.sent + 1 >= lf
    {
        cur.sent = cur.sent.max(cur.live_sent);
        cur.live_from = None;
    }
    Ok(sent_any)
}

async fn publish(
    client: &AsyncClient,
    topic: &str,
    batch: &protocols::TelemetryBatch,
    counters: &Counters,
) -> Result<(), StepError> {
    let bytes = encode_batch(batch);
    client
        .publish(topic, QoS::AtLeastOnce, false, bytes)
        .await
        .map_err(|_| StepError::Closed)?;
    Counters::add(&counters.batches_published, 1);
    Counters::add(&counters.samples_published, batch.samples.len() as u64);
    Ok(())
}
