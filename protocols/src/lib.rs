//! # protocols — what edgefleet says on the wire
//!
//! This crate owns every type that crosses a process boundary in edgefleet, and
//! nothing that does I/O: no sockets, no runtime, no clocks. Hub, edge node and
//! simulator all speak through it.
//!
//! Where to start:
//! - [`topic`]: the MQTT topic scheme (`edgefleet/v1/nodes/{node}/…`). No other
//!   crate formats topic strings.
//! - [`desired`] and [`device`]: what the hub wants a node to run: functions,
//!   devices (Modbus, OPC UA, MQTT-native, synthetic) with their points,
//!   models, node config.
//! - [`reported`], [`status`], [`event`]: what a node says about itself.
//! - [`telemetry`] and [`ack`]: the data path and its cumulative acknowledgement
//!   (signed by the hub, bound to the node: [`ack::SignedAck`]).
//! - [`codec`]: JSON for control-plane documents (with errors that name the
//!   offending field), a compact columnar binary encoding for telemetry.
//! - [`signing`]: Ed25519 signatures over desired-state documents.
//! - [`record`]: the stored record of a run of samples (edge outbox and hub sink).
//! - [`api`]: the hub's REST API as data (what each endpoint takes and answers).
//! - [`control`]: the control plane as data: nodes, label selectors,
//!   deployments, rollouts, rendering and the pure rollout planner.
//! - [`validate`]: semantic checks whose errors name the field, e.g.
//!   `devices[3].points[7].address: 70000 is out of range 0..=65535`.
//!
//! Small pieces both apps share, pure like the rest:
//! - [`limits`]: the protocol size limits (MQTT packets, device messages,
//!   telemetry batches, OPC UA messages);
//! - [`backoff`]: the jittered exponential retry policy, seeded by the caller;
//! - [`config`]: the config loading skeleton (defaults < file < environment)
//!   and its [`ConfigError`](config::ConfigError).

pub mod ack;
pub mod api;
pub mod backoff;
pub mod codec;
pub mod config;
pub mod control;
pub mod desired;
pub mod device;
pub mod event;
pub mod limits;
pub mod record;
pub mod reported;
pub mod signing;
pub mod status;
pub mod telemetry;
pub mod topic;
pub mod validate;

pub use ack::{Ack, AckError, SignedAck};
pub use codec::CodecError;
pub use desired::{DesiredState, FunctionLimits, FunctionSpec, ModelRef, NodeConfig};
pub use device::{
    ByteOrder, DataType, Device, DeviceProtocol, EngineeringRange, ModbusTable, MqttDevicePayload,
    OpcUaSecurity, Point, PointAddress, PointGroup, Signal, WordOrder,
};
pub use event::{Event, EventKind};
pub use reported::{
    Backlog, DeviceStatus, FunctionRollback, FunctionState, FunctionStatus, LossWindow, Rejection,
    ReportedState,
};
pub use signing::{SignedDesired, SigningError};
pub use status::{NodeState, NodeStatus};
pub use telemetry::{Quality, Sample, TelemetryBatch};
pub use topic::{TopicKind, Topics};
pub use validate::{FieldError, ValidationErrors};
