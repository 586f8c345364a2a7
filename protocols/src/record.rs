//! The stored record of one run of samples: what the edge's outbox
//! (`edge-node/src/store/outbox.rs`) and the hub's sink
//! (`cloud-hub/src/sink.rs`) keep as one sled value, written once here.
//!
//! Layout: a [`HEADER_BYTES`]-byte header, then the run as a telemetry batch
//! in the compact binary encoding ([`crate::codec::encode_batch`]):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | number of samples, u32 big-endian |
//! | 4..12 | smallest timestamp (ms), u64 big-endian |
//! | 12..20 | largest timestamp (ms), u64 big-endian |
//! | 20.. | the encoded batch (stream, first seq, samples) |
//!
//! The header lets a store count samples and prune by age without decoding
//! the body. The key (which carries the first sequence number) is each
//! store's own business.

use crate::codec::{CodecError, decode_batch, encode_batch};
use crate::{Sample, TelemetryBatch};

/// Size of the header in front of every record.
pub const HEADER_BYTES: usize = 20;

/// What the header of a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunHeader {
    /// Samples in the run.
    pub samples: u64,
    /// Smallest timestamp, ms since epoch (0 for an empty run).
    pub min_ts_ms: u64,
    /// Largest timestamp, ms since epoch (0 for an empty run).
    pub max_ts_ms: u64,
}

/// The record of `samples` of `stream`, the first numbered `first_seq`.
pub fn encode(stream: &str, first_seq: u64, samples: &[Sample]) -> Vec<u8> {
    let body = encode_batch(&TelemetryBatch {
        stream: stream.to_owned(),
        first_seq,
        floor_seq: first_seq,
        samples: samples.to_vec(),
    });
    let min_ts = samples.iter().map(|s| s.ts_ms).min().unwrap_or(0);
    let max_ts = samples.iter().map(|s| s.ts_ms).max().unwrap_or(0);
    let n = u32::try_from(samples.len()).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(HEADER_BYTES + body.len());
    v.extend_from_slice(&n.to_be_bytes());
    v.extend_from_slice(&min_ts.to_be_bytes());
    v.extend_from_slice(&max_ts.to_be_bytes());
    v.extend_from_slice(&body);
    v
}

/// The header of a record; `None` if it is shorter than a header.
pub fn header(record: &[u8]) -> Option<RunHeader> {
    let n = u32::from_be_bytes(record.get(0..4)?.try_into().ok()?);
    let min_ts_ms = u64::from_be_bytes(record.get(4..12)?.try_into().ok()?);
    let max_ts_ms = u64::from_be_bytes(record.get(12..20)?.try_into().ok()?);
    Some(RunHeader {
        samples: u64::from(n),
        min_ts_ms,
        max_ts_ms,
    })
}

/// The run of a record (an error names what is wrong with its body; a
/// record shorter than its header has an empty body, which is an error).
pub fn decode(record: &[u8]) -> Result<TelemetryBatch, CodecError> {
    decode_batch(record.get(HEADER_BYTES..).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Quality;

    fn sample(ts_ms: u64, value: f64) -> Sample {
        Sample {
            point: 3,
            ts_ms,
            value,
            quality: Quality::GOOD,
        }
    }

    #[test]
    fn a_record_round_trips_and_its_header_matches_the_run() {
        let samples = [sample(1_500, 1.0), sample(1_000, 2.5), sample(2_000, -3.0)];
        let r = encode("raw", 41, &samples);
        assert_eq!(
            header(&r),
            Some(RunHeader {
                samples: 3,
                min_ts_ms: 1_000,
                max_ts_ms: 2_000
            })
        );
        let b = decode(&r).unwrap();
        assert_eq!(
            (b.stream.as_str(), b.first_seq, b.floor_seq),
            ("raw", 41, 41)
        );
        assert_eq!(b.samples, samples);
    }

    #[test]
    fn the_header_layout_is_fixed() {
        let r = encode("s", 1, &[sample(7, 0.0)]);
        assert_eq!(
            &r[..HEADER_BYTES],
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn short_and_garbled_records_are_errors_not_panics() {
        assert_eq!(header(&[0; 19]), None);
        assert!(decode(&[0; 19]).is_err());
        let mut r = encode("s", 1, &[sample(7, 0.0)]);
        r.truncate(HEADER_BYTES + 3);
        assert!(decode(&r).is_err());
    }
}
