//! # edge-node — the edgefleet agent for factory gateways
//!
//! Owns everything a gateway does: the sync session with the hub over MQTT
//! (the sans-IO protocol in [`session`], its I/O in [`link`] and
//! [`agent`]), all on-disk state in one sled database ([`store`]),
//! the device drivers ([`drivers`]), routing samples into durable per-stream
//! outboxes ([`pipeline`]) and pacing them upstream ([`uplink`]); WASM device
//! functions ([`functions`], on `device-runtime`) with their modules and
//! models downloaded from the hub ([`artifacts`]).
//!
//! Start at [`agent::Agent::start`]. Configuration is [`config::EdgeConfig`];
//! time is injected through [`clock::Clock`] so long outages run in virtual time.
//!
//! Data flow, as module names: drivers → [`pipeline`] → ([`functions`] →)
//! [`store::writer`] → [`store::commit`] (sled group commit) → [`uplink`]
//! (MQTT QoS 1) → hub → cumulative ack → [`session`] → [`store::outbox`]
//! deletes. Nothing is deleted before the hub's ack.

pub mod agent;
pub mod artifacts;
pub mod burst;
pub mod clock;
pub mod config;
pub mod context;
pub mod datadir;
pub mod drivers;
pub mod functions;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod renewal;
pub mod session;
pub mod store;
pub mod uplink;

pub use agent::{Agent, AgentError, AgentOptions};
pub use clock::Clock;
pub use config::EdgeConfig;
