//! # cloud-hub — the edgefleet control plane
//!
//! Owns the fleet's desired state and what comes back from the edge: the node
//! registry ([`registry`]), signing ([`keys`]), the telemetry sink with dedup
//! and cumulative acks ([`sink`]), the REST API ([`api`]) and, in standalone
//! mode, an embedded MQTT broker ([`broker`]), and the content-addressed
//! artifact store for WASM modules and models ([`artifacts`]), and the
//! control plane: node labels, deployments and rendering ([`control`]).
//!
//! Start at [`app::App::start`]; configuration is [`config::HubConfig`]. The
//! shared state of a running hub is [`hub::Hub`]; its tasks are the MQTT
//! session ([`session`]), ingest ([`ingest`]) and the hub end of the ack loop
//! ([`acks`]), plus the REST API. [`client::HubClient`] is the typed client
//! of that API (what the simulator and the tests use).

pub mod acks;
pub mod api;
pub mod app;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod ca;
pub mod client;
pub mod commit;
pub mod config;
pub mod control;
pub mod hub;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod registry;
pub mod session;
pub mod sink;
pub mod tls;

pub use app::App;
pub use config::HubConfig;
pub use hub::{Hub, HubError, SetDesiredError};
