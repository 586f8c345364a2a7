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
//!
//! The cursor logic is [`Cursor`], a pure step ([`Cursor::round`]) over an
//! outbox view, tested on its own; [`run`] is the I/O loop that drives one
//! cursor per stream and publishes what a round chose (from its own task,
//! never the one polling the MQTT event loop).

use std::collections::HashMap;
use std::sync::Arc;

use protocols::TelemetryBatch;
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

/// Batches read per cursor and round.
const BATCHES_PER_ROUND: usize = 64;

/// Where the outbox of one stream is: what the cursor needs of
/// [`crate::store::OutboxStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Highest sequence number the hub acked.
    pub acked: u64,
    /// Highest sequence number a group commit made durable (publishable).
    pub durable: u64,
}

/// Durable entries after a sequence number: what the cursor reads
/// ([`Outbox::pending`] in the agent, a map in tests).
pub trait Pending {
    /// Up to `max` durable entries holding sequence numbers above `after`, in order.
    fn pending(&self, after: u64, max: usize) -> Result<Vec<TelemetryBatch>, StoreError>;
}

impl Pending for Outbox {
    fn pending(&self, after: u64, max: usize) -> Result<Vec<TelemetryBatch>, StoreError> {
        Outbox::pending(self, after, max)
    }
}

/// What one [`Cursor::round`] decided.
#[derive(Debug, Default)]
pub struct Round {
    /// Publish these, in order (live first, then the drain).
    pub batches: Vec<TelemetryBatch>,
    /// Whether the cursor rewound to the last ack because no ack came for
    /// `ack_timeout` (a resend, counted as `resends`).
    pub resend: bool,
}

/// The uplink state of one stream, without I/O: what to publish next, what
/// an ack releases, where a reconnect resumes.
///
/// # Invariants
/// - Nothing at or below the last ack is ever chosen again, and nothing
///   above `durable`.
/// - Within one connection epoch a sequence number is chosen once, unless
///   no ack progress for `ack_timeout` rewinds to the last ack; a new epoch
///   (reconnect) always rewinds to the last ack.
/// - The drain keeps at most `max_in_flight_samples` unacked samples out
///   (it may overshoot by the batch that crossed the limit) and, while a
///   live cursor runs, at most `drain_rate` samples/s.
#[derive(Debug)]
pub struct Cursor {
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
    /// A cursor at `acked` in connection `epoch`.
    pub fn new(acked: u64, epoch: u64, now: Instant) -> Self {
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

    /// Highest sequence number chosen so far (drain or live).
    pub fn sent(&self) -> u64 {
        self.sent.max(self.live_sent)
    }

    /// Whether a live cursor runs ahead of the drain.
    pub fn is_live(&self) -> bool {
        self.live_from.is_some()
    }

    /// One round: takes the ack progress and the connection epoch, then
    /// chooses what to publish from `src`.
    pub fn round(
        &mut self,
        src: &impl Pending,
        p: Progress,
        epoch: u64,
        now: Instant,
        cfg: &UplinkConfig,
    ) -> Result<Round, StoreError> {
        let resend = self.sync(p, epoch, now, cfg);
        let mut batches = Vec::new();
        if self.live_from.is_some() {
            for b in src.pending(self.live_sent, BATCHES_PER_ROUND)? {
                self.live_sent = b.last_seq().unwrap_or(b.first_seq);
                batches.push(b);
            }
        }
        self.drain(src, p.acked, now, cfg, &mut batches)?;
        if let Some(lf) = self.live_from
            && self.sent + 1 >= lf
        {
            self.sent = self.sent.max(self.live_sent);
            self.live_from = None;
        }
        Ok(Round { batches, resend })
    }

    /// Applies ack progress; rewinds to the last ack on a new epoch or a
    /// stalled ack (returns whether it was a stall); starts a live cursor
    /// when a backlog is found.
    fn sync(&mut self, p: Progress, epoch: u64, now: Instant, cfg: &UplinkConfig) -> bool {
        if p.acked > self.last_ack {
            self.last_ack = p.acked;
            self.last_progress = now;
        }
        let outstanding = self.sent() > p.acked;
        let stalled = outstanding && now.duration_since(self.last_progress) > cfg.ack_timeout;
        if self.epoch != epoch || stalled {
            *self = Self::new(p.acked, epoch, now);
        }
        self.sent = self.sent.max(p.acked);
        self.live_sent = self.live_sent.max(p.acked);
        if self.live_from.is_none() && p.durable > self.sent + LIVE_THRESHOLD_SAMPLES {
            self.live_from = Some(p.durable + 1);
            self.live_sent = p.durable;
        }
        stalled
    }

    /// Drain (or normal in-order sending when there is no backlog).
    fn drain(
        &mut self,
        src: &impl Pending,
        acked: u64,
        now: Instant,
        cfg: &UplinkConfig,
        out: &mut Vec<TelemetryBatch>,
    ) -> Result<(), StoreError> {
        let limit = self.live_from.map_or(u64::MAX, |lf| lf - 1);
        let pacing = self.live_from.is_some();
        if pacing {
            let rate = cfg.drain_rate as f64;
            self.tokens =
                (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate).min(rate);
            self.refilled = now;
        }
        let room = cfg
            .max_in_flight_samples
            .saturating_sub(self.sent.saturating_sub(acked));
        if room == 0 || self.sent >= limit {
            return Ok(());
        }
        for b in src.pending(self.sent, BATCHES_PER_ROUND)? {
            if b.first_seq > limit {
                break;
            }
            let n = b.samples.len() as f64;
            if pacing && self.tokens < n {
                break;
            }
            if pacing {
                self.tokens -= n;
            }
            self.sent = b.last_seq().unwrap_or(b.first_seq);
            out.push(b);
            if self.sent.saturating_sub(acked) >= cfg.max_in_flight_samples {
                break;
            }
        }
        Ok(())
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
                .or_insert_with(|| Cursor::new(outbox.stats().acked, c.epoch, Instant::now()));
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
    let p = Progress {
        acked: st.acked,
        durable: st.durable,
    };
    let round = cur.round(outbox, p, epoch, Instant::now(), cfg)?;
    if round.resend {
        Counters::add(&counters.resends, 1);
    }
    for b in &round.batches {
        // Before the hand-over: an ack for it may come back at once.
        outbox.mark_published(b.first_seq, b.last_seq().unwrap_or(b.first_seq))?;
        publish(client, topic, b, counters).await?;
    }
    Ok(!round.batches.is_empty())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;
    use protocols::{Quality, Sample};

    /// An outbox of `entries` batches of `size` samples (seq 1..), of which
    /// the first `durable` sequence numbers are durable.
    struct Fake {
        batches: Vec<TelemetryBatch>,
        durable: u64,
    }

    impl Fake {
        fn new(entries: u64, size: u64) -> Self {
            let batches = (0..entries)
                .map(|i| TelemetryBatch {
                    stream: "raw".into(),
                    first_seq: 1 + i * size,
                    floor_seq: 0,
                    samples: vec![
                        Sample {
                            point: 0,
                            ts_ms: 0,
                            value: 0.0,
                            quality: Quality::GOOD,
                        };
                        usize::try_from(size).unwrap()
                    ],
                })
                .collect();
            Self {
                batches,
                durable: entries * size,
            }
        }

        fn progress(&self, acked: u64) -> Progress {
            Progress {
                acked,
                durable: self.durable,
            }
        }
    }

    impl Pending for Fake {
        fn pending(&self, after: u64, max: usize) -> Result<Vec<TelemetryBatch>, StoreError> {
            Ok(self
                .batches
                .iter()
                .filter(|b| {
                    let last = b.last_seq().unwrap();
                    last > after && last <= self.durable
                })
                .take(max)
                .cloned()
                .collect())
        }
    }

    fn cfg(in_flight: u64) -> UplinkConfig {
        UplinkConfig {
            drain_rate: 1_000,
            max_in_flight_samples: in_flight,
            ack_timeout: Duration::from_secs(20),
        }
    }

    fn firsts(r: &Round) -> Vec<u64> {
        r.batches.iter().map(|b| b.first_seq).collect()
    }

    #[test]
    fn the_cursor_advances_and_sends_each_entry_once() {
        let mut src = Fake::new(3, 10);
        let t0 = Instant::now();
        let mut c = Cursor::new(0, 1, t0);
        let r = c.round(&src, src.progress(0), 1, t0, &cfg(1_000)).unwrap();
        assert_eq!(firsts(&r), vec![1, 11, 21]);
        assert!(!r.resend);
        assert_eq!(c.sent(), 30);
        // Nothing new: nothing sent again.
        let r = c.round(&src, src.progress(0), 1, t0, &cfg(1_000)).unwrap();
        assert!(r.batches.is_empty());
        // Entries become publishable only once durable.
        src = Fake {
            durable: 10,
            ..Fake::new(5, 10)
        };
        let mut c = Cursor::new(0, 1, t0);
        let r = c.round(&src, src.progress(0), 1, t0, &cfg(1_000)).unwrap();
        assert_eq!(firsts(&r), vec![1]);
        src.durable = 30;
        let r = c.round(&src, src.progress(0), 1, t0, &cfg(1_000)).unwrap();
        assert_eq!(firsts(&r), vec![11, 21]);
    }

    #[test]
    fn the_in_flight_limit_holds_and_acks_free_room() {
        let src = Fake::new(10, 10);
        let t0 = Instant::now();
        let mut c = Cursor::new(0, 1, t0);
        let r = c.round(&src, src.progress(0), 1, t0, &cfg(25)).unwrap();
        // The batch that reaches the limit is the last one.
        assert_eq!(firsts(&r), vec![1, 11, 21]);
        let r = c.round(&src, src.progress(0), 1, t0, &cfg(25)).unwrap();
        assert!(r.batches.is_empty(), "no room before an ack");
        // An ack of 20 frees room for two more entries.
        let r = c.round(&src, src.progress(20), 1, t0, &cfg(25)).unwrap();
        assert_eq!(firsts(&r), vec![31, 41]);
        assert_eq!(c.sent(), 50);
    }

    #[test]
    fn a_reconnect_resends_from_the_acked_point() {
        let src = Fake::new(4, 10);
        let t0 = Instant::now();
        let mut c = Cursor::new(0, 1, t0);
        c.round(&src, src.progress(0), 1, t0, &cfg(1_000)).unwrap();
        // Acked up to 20, then the link dropped: epoch 2 resends 21.. only.
        let r = c.round(&src, src.progress(20), 2, t0, &cfg(1_000)).unwrap();
        assert_eq!(firsts(&r), vec![21, 31]);
        assert!(!r.resend, "a reconnect is not an ack timeout");
        let r = c.round(&src, src.progress(20), 2, t0, &cfg(1_000)).unwrap();
        assert!(r.batches.is_empty(), "sent once per epoch");
    }

    #[test]
    fn no_ack_progress_for_the_timeout_rewinds_once() {
        let src = Fake::new(3, 10);
        let t0 = Instant::now();
        let mut c = Cursor::new(0, 1, t0);
        c.round(&src, src.progress(0), 1, t0, &cfg(1_000)).unwrap();
        let later = t0 + Duration::from_secs(10);
        let r = c
            .round(&src, src.progress(10), 1, later, &cfg(1_000))
            .unwrap();
        assert!(
            r.batches.is_empty() && !r.resend,
            "ack progress, not stalled"
        );
        let stalled = later + Duration::from_secs(21);
        let r = c
            .round(&src, src.progress(10), 1, stalled, &cfg(1_000))
            .unwrap();
        assert!(r.resend);
        assert_eq!(firsts(&r), vec![11, 21]);
        // The rewind restarts the timer: no second resend right away.
        let r = c
            .round(&src, src.progress(10), 1, stalled, &cfg(1_000))
            .unwrap();
        assert!(r.batches.is_empty() && !r.resend);
        // Everything acked: nothing outstanding, never stalled.
        let idle = stalled + Duration::from_secs(60);
        let r = c
            .round(&src, src.progress(30), 1, idle, &cfg(1_000))
            .unwrap();
        assert!(r.batches.is_empty() && !r.resend);
    }

    #[test]
    fn a_backlog_sends_live_data_first_and_drains_at_the_rate() {
        // 10,000 durable samples after the ack: more than the live threshold.
        let src = Fake::new(100, 100);
        // No acks in this test: an ack timeout longer than the test keeps
        // the stall rewind out of it.
        let cfg = UplinkConfig {
            ack_timeout: Duration::from_secs(3_600),
            ..cfg(100_000)
        };
        let t0 = Instant::now();
        let mut c = Cursor::new(0, 1, t0);
        let r = c.round(&src, src.progress(0), 1, t0, &cfg).unwrap();
        assert!(c.is_live());
        // Live starts after the newest durable entry: nothing yet; the drain
        // has no tokens at the first instant.
        assert!(r.batches.is_empty());
        // Half a second at 1,000 samples/s: five drain entries.
        let t1 = t0 + Duration::from_millis(500);
        let r = c.round(&src, src.progress(0), 1, t1, &cfg).unwrap();
        assert_eq!(firsts(&r), vec![1, 101, 201, 301, 401]);
        // New live data goes out at once, ahead of the drain.
        let mut src = Fake::new(102, 100);
        src.durable = 10_100;
        let r = c.round(&src, src.progress(0), 1, t1, &cfg).unwrap();
        assert_eq!(firsts(&r), vec![10_001]);
        // Every sequence number is chosen at most once in the epoch.
        let mut seen = std::collections::BTreeSet::new();
        let mut t = t1;
        for _ in 0..40 {
            t += Duration::from_secs(1);
            let r = c.round(&src, src.progress(0), 1, t, &cfg).unwrap();
            for b in &r.batches {
                assert!(seen.insert(b.first_seq), "{} sent twice", b.first_seq);
            }
        }
        assert!(!c.is_live(), "the drain caught up and merged");
        assert_eq!(c.sent(), 10_100);
        assert_eq!(seen.len(), 95, "the rest of the backlog, once each");
    }
}
