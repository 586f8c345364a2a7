//! What every task of one agent shares: [`AgentContext`].
//!
//! Built once by [`crate::Agent::start`] and cloned into the pipeline, the
//! function host, the control task and the device set, instead of each
//! carrying its own copies of the node name, clock, store, counters and
//! event sender.

use std::sync::Arc;

use protocols::{Event, TopicKind, Topics};
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::metrics::Counters;
use crate::store::{OutboxWriter, Store};

/// What every task of one agent shares. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentContext {
    /// The node name (events, reports, topics).
    pub node: String,
    /// Injected time.
    pub clock: Clock,
    /// The node's database.
    pub store: Store,
    /// The agent's counters.
    pub counters: Arc<Counters>,
    /// Events to publish (the control task publishes them).
    pub events: mpsc::UnboundedSender<Event>,
    /// The topic scheme.
    pub topics: Topics,
}

impl AgentContext {
    /// This node's topic of `kind`.
    pub fn topic(&self, kind: TopicKind) -> String {
        self.topics.node(&self.node, kind)
    }

    /// A writer into this node's outboxes.
    pub fn writer(&self) -> OutboxWriter {
        OutboxWriter::new(
            self.store.clone(),
            self.clock,
            self.counters.clone(),
            self.events.clone(),
            self.node.clone(),
        )
    }
}
