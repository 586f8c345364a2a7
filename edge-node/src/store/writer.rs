//! Appending samples to outbox streams: the one writer the pipeline (raw
//! stream) and the function host (function outputs) share.
//!
//! [`OutboxWriter::append`] appends one entry, counts the samples
//! (`samples_appended`, or `samples_append_failed` when the store fails) and
//! raises an `overflow-drop` event when the outbox's overflow policy dropped
//! older samples to make room. [`OutboxWriter::append_raw`] is the single
//! place that decides what happens to samples no function consumes: they go
//! to the raw stream, or are counted as `samples_unrouted` when there is none.

use std::sync::Arc;

use protocols::{Event, EventKind, Sample};
use tokio::sync::mpsc;

use super::{Store, StoreError};
use crate::clock::Clock;
use crate::metrics::Counters;

/// Appends samples to outbox streams. Cheap to clone; build it once.
#[derive(Clone)]
pub struct OutboxWriter {
    store: Store,
    clock: Clock,
    counters: Arc<Counters>,
    events: mpsc::UnboundedSender<Event>,
    node: String,
}

impl std::fmt::Debug for OutboxWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxWriter")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl OutboxWriter {
    /// A writer into `store` that counts into `counters` and raises overflow
    /// events for `node` on `events`.
    pub fn new(
        store: Store,
        clock: Clock,
        counters: Arc<Counters>,
        events: mpsc::UnboundedSender<Event>,
        node: String,
    ) -> Self {
        Self {
            store,
            clock,
            counters,
            events,
            node,
        }
    }

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

    /// Appends samples no function consumes to the raw stream, or counts
    /// them as unrouted when the desired state names none.
    pub fn append_raw(
        &self,
        raw_stream: Option<&str>,
        samples: &[Sample],
    ) -> Result<(), StoreError> {
        if samples.is_empty() {
            return Ok(());
        }
        if let Some(raw) = raw_stream {
            return self.append(raw, samples);
        }
        Counters::add(&self.counters.samples_unrouted, samples.len() as u64);
        Ok(())
    }
}
