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
//! | [`MAX_DESIRED_DEVICES`], [`MAX_DESIRED_POINTS`], [`MAX_DESIRED_FUNCTIONS`], [`MAX_DESIRED_MODELS`], [`MAX_FUNCTION_OUTPUTS`] | counts in one desired-state document |
//! | [`MAX_ARTIFACT_BYTES`] | a WASM module or model named by desired state |
//! | [`MAX_FUNCTION_MEMORY_BYTES`], [`MAX_FUEL_PER_CALL`] | what a function's `limits` may ask for |
//! | [`MAX_SEQ`] | the largest sequence number of any stream (decoder and hub sink refuse larger) |
//! | [`MAX_OPCUA_MESSAGE_BYTES`], [`MAX_OPCUA_CHUNKS`], [`MAX_OPCUA_ARRAY_LENGTH`] | what the edge's OPC UA client accepts from a server |

pub use crate::codec::MAX_BATCH_SAMPLES;

/// The largest sequence number a telemetry stream may use. No stream gets
/// near it (2^62 samples is 146,000 years at a million samples a second),
/// and keeping every sequence number this far below `u64::MAX` makes each
/// `seq + 1` at either end of the link safe: a batch that claims more is
/// refused by [`crate::codec::decode_batch`] and by the hub's sink.
pub const MAX_SEQ: u64 = 1 << 62;

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

/// Devices in one desired-state document.
pub const MAX_DESIRED_DEVICES: usize = 4_096;

/// Points over all devices of one desired-state document (a large gateway
/// has about 150,000).
pub const MAX_DESIRED_POINTS: usize = 1_000_000;

/// Functions in one desired-state document.
pub const MAX_DESIRED_FUNCTIONS: usize = 64;

/// Models in one desired-state document.
pub const MAX_DESIRED_MODELS: usize = 64;

/// Output streams of one function (each stream is an outbox on the edge).
pub const MAX_FUNCTION_OUTPUTS: usize = 16;

/// Largest artifact (WASM module or model) desired state may name.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// Largest linear memory a function may ask for: the edge's instance pool
/// gives each instance at most this much, so a larger request would pass
/// the hub and fail on the gateway.
pub const MAX_FUNCTION_MEMORY_BYTES: u64 = 64 << 20;

/// Most fuel (roughly wasm instructions) one call may be given: about ten
/// seconds of work, so one function cannot starve the others for minutes.
pub const MAX_FUEL_PER_CALL: u64 = 10_000_000_000;

/// Longest wall-clock deadline one call may be given, in milliseconds. The
/// edge calls every function in turn each 100 ms tick, so a call is at most
/// ten ticks: a function that uses its whole deadline delays the others by
/// at most a second before the edge's CPU budget (`[functions]
/// cpu_share_percent`) backs it off.
pub const MAX_FUNCTION_DEADLINE_MS: u64 = 1_000;
