//! Telemetry batches: the data path from edge to hub.
//!
//! # Invariants
//! - Sequence numbers are per (node, stream), start at 1 and have no gaps: sample
//!   `i` of a batch has sequence number `first_seq + i`.
//! - A batch never spans streams.
//! - `floor_seq <= first_seq`; the floor never decreases for a stream.
//! - The hub acknowledges cumulatively ([`crate::Ack`]); the edge deletes a
//!   sample only once an ack covers its sequence number.

use serde::{Deserialize, Serialize};

/// Sample quality, OPC UA style, reduced to one byte.
///
/// `0` is good; `0x40..=0x7f` uncertain; `0x80..` bad. The low bits carry a
/// reason so drivers can say why a value is bad without strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Quality(pub u8);

impl Quality {
    /// A good value.
    pub const GOOD: Self = Self(0);
    /// Uncertain: e.g. a value held from the last good read.
    pub const UNCERTAIN: Self = Self(0x40);
    /// Bad, no specific reason.
    pub const BAD: Self = Self(0x80);
    /// Bad: the device did not answer in time.
    pub const BAD_TIMEOUT: Self = Self(0x81);
    /// Bad: the device answered with a protocol exception.
    pub const BAD_DEVICE_EXCEPTION: Self = Self(0x82);
    /// Bad: the reply could not be decoded.
    pub const BAD_MALFORMED: Self = Self(0x83);
    /// Bad: no connection to the device.
    pub const BAD_NOT_CONNECTED: Self = Self(0x84);
    /// Bad: the value is outside the configured engineering range or not finite.
    pub const BAD_OUT_OF_RANGE: Self = Self(0x85);

    /// Whether the value can be used as is.
    pub fn is_good(self) -> bool {
        self.0 < 0x40
    }

    /// Whether the value must not be used.
    pub fn is_bad(self) -> bool {
        self.0 >= 0x80
    }
}

/// One sample of one point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sample {
    /// Node-wide point index ([`crate::device::Point::index`]).
    pub point: u32,
    /// Device (or, lacking one, gateway) timestamp, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Engineering value.
    pub value: f64,
    /// Quality.
    pub quality: Quality,
}

/// Consecutive samples of one stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TelemetryBatch {
    /// Stream name (a topic-safe name, see [`crate::validate::check_name`]).
    pub stream: String,
    /// Sequence number of `samples[0]`.
    pub first_seq: u64,
    /// Every sequence number below `floor_seq` that the hub has not received
    /// was dropped by the edge's overflow policy and will never be sent; the
    /// hub counts those as known drops and moves its watermark past them.
    /// Always `<= first_seq`.
    pub floor_seq: u64,
    /// The samples, in sequence order.
    pub samples: Vec<Sample>,
}

impl TelemetryBatch {
    /// Sequence number of the last sample, or `None` for an empty batch.
    pub fn last_seq(&self) -> Option<u64> {
        let n = u64::try_from(self.samples.len()).ok()?;
        n.checked_sub(1).and_then(|k| self.first_seq.checked_add(k))
    }

    /// Samples with their sequence numbers.
    pub fn iter_seq(&self) -> impl Iterator<Item = (u64, &Sample)> {
        (self.first_seq..).zip(self.samples.iter())
    }
}
