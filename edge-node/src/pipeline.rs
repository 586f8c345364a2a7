//! Routes samples from drivers to outbox streams, in batches.
//!
//! Samples arrive from every driver on one channel. Samples of points that a
//! device function takes as input go to the function host
//! ([`crate::functions`]), which appends what the functions emit; every
//! other sample goes to the raw stream (if configured) through the shared
//! [`OutboxWriter`]. Per stream, raw
//! samples are buffered until `batch_max_samples` or `batch_max_age`, then
//! appended to the outbox as one entry. On shutdown every buffer is
//! appended, so a clean stop loses nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use protocols::Sample;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::agent::AgentContext;
use crate::clock::Clock;
use crate::metrics::Counters;
use crate::store::{OutboxWriter, StoreError};

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

/// The pipeline task. Build it with [`Pipeline::new`].
pub struct Pipeline {
    clock: Clock,
    counters: Arc<Counters>,
    writer: OutboxWriter,
    routing: watch::Receiver<Routing>,
    functions: mpsc::Sender<Vec<Sample>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// A pipeline of the agent `ctx` that follows `routing` and hands
    /// function inputs to `functions`.
    pub fn new(
        ctx: &AgentContext,
        routing: watch::Receiver<Routing>,
        functions: mpsc::Sender<Vec<Sample>>,
    ) -> Self {
        Self {
            clock: ctx.clock,
            counters: ctx.counters.clone(),
            writer: ctx.writer(),
            routing,
            functions,
        }
    }

    /// Runs until `cancel`, then appends what is buffered.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Vec<Sample>>,
        cancel: CancellationToken,
    ) -> Result<(), StoreError> {
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
    ) -> Result<(), StoreError> {
        if samples.is_empty() {
            return Ok(());
        }
        let Some(stream) = &routing.raw_stream else {
            return self.writer.append_raw(None, &samples);
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

    fn flush(&self, buffers: &mut HashMap<String, Buffer>, stream: &str) -> Result<(), StoreError> {
        let Some(buf) = buffers.get_mut(stream) else {
            return Ok(());
        };
        if buf.samples.is_empty() {
            return Ok(());
        }
        let samples = std::mem::take(&mut buf.samples);
        self.writer.append(stream, &samples)
    }
}
