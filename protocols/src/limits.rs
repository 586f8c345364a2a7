//! Size limits of the protocols edgefleet speaks, in one place.
//!
//! Both ends of a link must agree on these, so they live here rather than
//! beside one end's client or server. Constants only: each crate passes them
//! to its own client, broker or decoder.
//!
//! | limit | applies to |
//! | --- | --- |
//! | [`MAX_SYNC_PACKET_BYTES`] | every MQTT packet between hub and edge, both directions (desired state of large nodes, big telemetry batches) |
//! | [`MAX_DEVICE_MESSAGE_BYTES`] | one message from an MQTT-native device's broker |
//! | [`MAX_BATCH_SAMPLES`] | samples in one decoded telemetry batch |
//! | [`MAX_OPCUA_MESSAGE_BYTES`], [`MAX_OPCUA_CHUNKS`], [`MAX_OPCUA_ARRAY_LENGTH`] | what the edge's OPC UA client accepts from a server |

pub use crate::codec::MAX_BATCH_SAMPLES;

/// Largest MQTT packet on the hub ⇄ edge sync link, sent or accepted, by the
/// edge's client, the hub's client and the hub's embedded broker.
pub const MAX_SYNC_PACKET_BYTES: usize = 16 * 1024 * 1024;

/// Largest message accepted from a device broker (MQTT-native devices).
pub const MAX_DEVICE_MESSAGE_BYTES: usize = 1024 * 1024;

/// Largest OPC UA message the edge's client accepts.
pub const MAX_OPCUA_MESSAGE_BYTES: usize = 64 << 20;

/// Most chunks of one OPC UA message the edge's client accepts.
pub const MAX_OPCUA_CHUNKS: usize = 1024;

/// Longest array in an OPC UA message the edge's client accepts.
pub const MAX_OPCUA_ARRAY_LENGTH: usize = 1 << 20;
