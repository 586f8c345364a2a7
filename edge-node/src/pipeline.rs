//! Routes samples from drivers to outbox streams, in batches.
//!
//! Samples arrive from every driver on one channel. Samples of points that a
//! device function takes as input go to the function host
//! ([`crate::functions`]), which appends what the functions emit; every
//! other sample goes to the raw stream (if configured). Per stream, raw
//! samples are buffered until `batch_max_samples` or `batch_max_age`, then
//! appended to the outbox as one entry. On shutdown every buffer is
//! appended, so a clean stop loses nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use protocols::{Event, EventKind, Sample};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::metrics::Counters;
use crate::store::{Store, StoreError};

/// Where samples go; replaced whenever a desired revision is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Stream for samples not consumed by a function (`None`: dropped, counted).
    pub raw_stream: Option<String>,
    /// Append when a stream buffer holds this many samples.
    pub batch_max_samples: usize,
    /// Append when the oldest buffered sample waited this long.
    pub batch_max_age: Duration,
    /// Points that are inputs of a desired function: their samples go to
    /// the function host, not the raw stream.
    pub function_inputs: Arc<BTreeSet<u32>>,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            raw_stream: None,
            batch_max_samples: 1_000,
            batch_max_age: Duration::from_secs(1),
            function_inputs: Arc::default(),
        }
    }
}

#[derive(Debug)]
struct Buffer {
    samples: Vec<Sample>,
    since_ms: u64,
}

/// The pipeline task.
pub struct Pipeline {
    /// Store to append to.
    pub store: Store,
    /// Injected time.
    pub clock: Clock,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Current routing.
    pub routing: watch::Receiver<Routing>,
    /// Events to publish (overflow drops).
    pub events: mpsc::UnboundedSender<Event>,
    /// Node name for events.
    pub node: String,
    /// Samples of function inputs go here (the function host).
    pub functions: mpsc::Sender<Vec<Sample>>,
}

/// Appends samples to an outbox stream, counting them and raising an event
/// when the overflow policy drops some. Shared by the pipeline (raw stream)
/// and the function host (function outputs).
#[derive(Clone)]
pub struct Appender {
    /// Store to append to.
    pub store: Store,
    /// Injected time.
    pub clock: Clock,
    /// Counters (`samples_appended`, `samples_append_failed`).
    pub counters: Arc<Counters>,
    /// Events to publish (overflow drops).
    pub events: mpsc::UnboundedSender<Event>,
    /// Node name for events.
    pub node: String,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Appender {
    /// Appends `samples` to `stream` as one outbox entry.
    pub fn append(&self, stream: &str, samples: &[Sample]) -> Result<(), StoreError> {
        if samples.is_empty() {
            return Ok(());
        }
        let n = samples.len() as u64;
        let outbox = self.store.outbox(stream)?;
        match outbox.append(samples, self.clock.now_ms()) {
            Ok(a) => {
                if a.first_seq.is_some() {
                    Counters::add(&self.counters.samples_appended, n);
                }
                if a.dropped > 0 {
                    let _ = self.events.send(Event {
                        node: self.node.clone(),
                        at_ms: self.clock.now_ms(),
                        kind: EventKind::OverflowDrop {
                            stream: stream.to_owned(),
                            dropped: a.dropped,
                        },
                        message: format!(
                            "outbox {stream} full: {} samples dropped by the overflow policy",
                            a.dropped
                        ),
                    });
                }
                Ok(())
            }
            Err(e) => {
                // Keep the samples counted; a store error is fatal for the agent.
                Counters::add(&self.counters.samples_append_failed, n);
                Err(e)
            }
        }
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Runs until `cancel`, then appends what is buffered.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Vec<Sample>>,
        cancel: CancellationToken,
    ) -> Result<(), crate::store::StoreError> {
        let mut buffers: HashMap<String, Buffer> = HashMap::new();
        let mut routing = self.routing.borrow_and_update().clone();
        let mut tick =
            tokio::time::interval(routing.batch_max_age.max(Duration::from_millis(10)) / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Routing changes are seen before the samples that follow them.
                biased;
                () = cancel.cancelled() => break,
                r = self.routing.changed() => {
                    if r.is_err() { break; }
                    routing = self.routing.borrow_and_update().clone();
                    tick = tokio::time::interval(routing.batch_max_age.max(Duration::from_millis(10)) / 2);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                msg = input.recv() => {
                    let Some(samples) = msg else { break };
                    Counters::add(&self.counters.samples_in, samples.len() as u64);
                    let samples = self.divert(&routing, samples).await;
                    self.route(&routing, &mut buffers, samples)?;
                }
                _ = tick.tick() => {
                    let now = self.clock.now_ms();
                    let max_age = u64::try_from(routing.batch_max_age.as_millis()).unwrap_or(u64::MAX);
                    let due: Vec<String> = buffers
                        .iter()
                        .filter(|(_, b)| !b.samples.is_empty() && now.saturating_sub(b.since_ms) >= max_age)
                        .map(|(s, _)| s.clone())
                        .collect();
                    for stream in due {
                        self.flush(&mut buffers, &stream)?;
                    }
                }
            }
        }
        // Drain whatever drivers already produced, then append every buffer.
        while let Ok(samples) = input.try_recv() {
            Counters::add(&self.counters.samples_in, samples.len() as u64);
            let samples = self.divert(&routing, samples).await;
            self.route(&routing, &mut buffers, samples)?;
        }
        let streams: Vec<String> = buffers.keys().cloned().collect();
        for s in streams {
            self.flush(&mut buffers, &s)?;
        }
        Ok(())
    }

    /// Sends the samples of function inputs to the function host; returns
    /// the rest. If the host is gone, everything stays here (raw).
    async fn divert(&self, routing: &Routing, samples: Vec<Sample>) -> Vec<Sample> {
        let consumed = &routing.function_inputs;
        if consumed.is_empty() {
            return samples;
        }
        let (to_fn, rest): (Vec<Sample>, Vec<Sample>) = samples
            .into_iter()
            .partition(|s| consumed.contains(&s.point));
        if to_fn.is_empty() {
            return rest;
        }
        match self.functions.send(to_fn).await {
            Ok(()) => rest,
            Err(mpsc::error::SendError(mut back)) => {
                back.extend(rest);
                back
            }
        }
    }

    fn route(
        &self,
        routing: &Routing,
        buffers: &mut HashMap<String, Buffer>,
        samples: Vec<Sample>,
    ) -> Result<(), crate::store::StoreError> {
        if samples.is_empty() {
            return Ok(());
        }
        let Some(stream) = &routing.raw_stream else {
            Counters::add(&self.counters.samples_unrouted, samples.len() as u64);
            return Ok(());
        };
        let now = self.clock.now_ms();
        let buf = buffers.entry(stream.clone()).or_insert_with(|| Buffer {
            samples: Vec::new(),
            since_ms: now,
        });
        if buf.samples.is_empty() {
            buf.since_ms = now;
        }
        buf.samples.extend(samples);
        if buf.samples.len() >= routing.batch_max_samples {
            let stream = stream.clone();
            self.flush(buffers, &stream)?;
        }
        Ok(())
    }

    fn flush(
        &self,
        buffers: &mut HashMap<String, Buffer>,
        stream: &str,
    ) -> Result<(), crate::store::StoreError> {
        let Some(buf) = buffers.get_mut(stream) else {
            return Ok(());
        };
        if buf.samples.is_empty() {
            return Ok(());
        }
        let samples = std::mem::take(&mut buf.samples);
        Appender {
            store: self.store.clone(),
            clock: self.clock,
            counters: self.counters.clone(),
            events: self.events.clone(),
            node: self.node.clone(),
        }
        .append(stream, &samples)
    }
}
