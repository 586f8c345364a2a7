//! Encodings: JSON for control-plane documents, compact binary for telemetry.
//!
//! JSON decoding goes through `serde_path_to_error`, so a type error names the
//! field (`devices[0].groups[1].interval_ms: invalid type: string "fast",
//! expected u64`). [`decode_desired`] then runs semantic validation.
//!
//! # Telemetry wire format (version 1)
//! One version byte `0x01`, then a [postcard] encoding of a columnar batch:
//! stream, first sequence number, distance from the floor, sample count, point indexes and timestamps
//! as zig-zag varint deltas from the previous sample, qualities run-length
//! encoded, values as raw little-endian f64. Typical batches cost 10–12 bytes
//! per sample; see `BENCHMARKS.md`.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::desired::DesiredState;
use crate::telemetry::{Quality, Sample, TelemetryBatch};
use crate::validate::ValidationErrors;

/// Largest telemetry batch a decoder accepts, in samples.
pub const MAX_BATCH_SAMPLES: usize = 1_000_000;

/// Version byte of the telemetry encoding produced by [`encode_batch`].
pub const TELEMETRY_V1: u8 = 1;

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// JSON did not parse into the expected type; `path` names the field.
    #[error("{what}: {path}: {source}")]
    Json {
        /// What was being decoded (`desired state`, `ack`, …).
        what: &'static str,
        /// Field path where decoding failed (`.` for the root).
        path: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A document parsed but is semantically invalid.
    #[error("{what}: {source}")]
    Invalid {
        /// What was being decoded.
        what: &'static str,
        /// Every field error.
        #[source]
        source: ValidationErrors,
    },
    /// A value could not be serialized.
    #[error("encoding {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A telemetry payload is empty or carries an unknown version byte.
    #[error("telemetry batch: unsupported encoding version {0:?} (this build reads version 1)")]
    TelemetryVersion(Option<u8>),
    /// A telemetry payload did not decode.
    #[error("telemetry batch: {0}")]
    TelemetryBody(#[source] postcard::Error),
    /// A telemetry payload decoded but its columns are inconsistent.
    #[error("telemetry batch: {0}")]
    TelemetryShape(String),
}

/// Decodes a JSON document, naming the failing field on error.
pub fn decode_json<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        CodecError::Json {
            what,
            path,
            source: e.into_inner(),
        }
    })
}

/// Encodes a document as compact JSON.
pub fn encode_json<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|source| CodecError::Encode { what, source })
}

/// Decodes and validates a desired-state document.
pub fn decode_desired(bytes: &[u8]) -> Result<DesiredState, CodecError> {
    let d: DesiredState = decode_json("desired state", bytes)?;
    d.validate().map_err(|source| CodecError::Invalid {
        what: "desired state",
        source,
    })?;
    Ok(d)
}

#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct WireBatch<'a> {
    stream: &'a str,
    first_seq: u64,
    /// `first_seq - floor_seq` (never negative)
    floor_gap: u64,
    count: u32,
    /// zig-zag delta from the previous point index (first from 0)
    point_deltas: Vec<i64>,
    /// zig-zag delta from the previous timestamp (first from 0)
    ts_deltas: Vec<i64>,
    /// (quality, run length)
    quality_runs: Vec<(u8, u32)>,
    values: Vec<f64>,
}

/// Encodes a telemetry batch in the compact binary format.
pub fn encode_batch(batch: &TelemetryBatch) -> Vec<u8> {
    let n = batch.samples.len();
    let mut point_deltas = Vec::with_capacity(n);
    let mut ts_deltas = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(n);
    let mut quality_runs: Vec<(u8, u32)> = Vec::new();
    let (mut prev_p, mut prev_t) = (0_i64, 0_i64);
    for s in &batch.samples {
        let p = i64::from(s.point);
        point_deltas.push(p - prev_p);
        prev_p = p;
        // ms timestamps fit i64 until the year 292 million.
        let t = i64::try_from(s.ts_ms).unwrap_or(i64::MAX);
        ts_deltas.push(t.wrapping_sub(prev_t));
        prev_t = t;
        values.push(s.value);
        match quality_runs.last_mut() {
            Some((q, run)) if *q == s.quality.0 && *run < u32::MAX => *run += 1,
            _ => quality_runs.push((s.quality.0, 1)),
        }
    }
    let wire = WireBatch {
        stream: &batch.stream,
        first_seq: batch.first_seq,
        floor_gap: batch.first_seq.saturating_sub(batch.floor_seq),
        count: u32::try_from(n).unwrap_or(u32::MAX),
        point_deltas,
        ts_deltas,
        quality_runs,
        values,
    };
    let out = vec![TELEMETRY_V1];
    // Serializing plain integers, floats and a str into a Vec cannot fail.
    match postcard::to_extend(&wire, out) {
        Ok(v) => v,
        Err(_) => vec![TELEMETRY_V1],
    }
}

/// Decodes a telemetry batch, checking that its columns agree.
pub fn decode_batch(bytes: &[u8]) -> Result<TelemetryBatch, CodecError> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(CodecError::TelemetryVersion(None));
    };
    if version != TELEMETRY_V1 {
        return Err(CodecError::TelemetryVersion(Some(version)));
    }
    let wire: WireBatch<'_> = postcard::from_bytes(body).map_err(CodecError::TelemetryBody)?;
    let n = wire.count as usize;
    if n > MAX_BATCH_SAMPLES {
        return Err(CodecError::TelemetryShape(format!(
            "count {n} exceeds the limit of {MAX_BATCH_SAMPLES}"
        )));
    }
    let runs: u64 = wire.quality_runs.iter().map(|&(_, r)| u64::from(r)).sum();
    if wire.point_deltas.len() != n
        || wire.ts_deltas.len() != n
        || wire.values.len() != n
        || runs != n as u64
    {
        return Err(CodecError::TelemetryShape(format!(
            "columns disagree: count {n}, points {}, timestamps {}, values {}, qualities {runs}",
            wire.point_deltas.len(),
            wire.ts_deltas.len(),
            wire.values.len()
        )));
    }
    // Sequence numbers stay at or below MAX_SEQ, so every `+ 1` on them, at
    // either end, is safe.
    let last_seq = wire.first_seq.checked_add((n as u64).saturating_sub(1));
    if last_seq.is_none_or(|last| last > crate::limits::MAX_SEQ) {
        return Err(CodecError::TelemetryShape(format!(
            "first_seq {} + {n} samples passes the largest sequence number {} (limits::MAX_SEQ)",
            wire.first_seq,
            crate::limits::MAX_SEQ
        )));
    }
    if !crate::validate::is_valid_name(wire.stream) {
        return Err(CodecError::TelemetryShape(format!(
            "stream {:?} is not a valid name",
            wire.stream
        )));
    }
    let mut samples = Vec::with_capacity(n);
    let mut qualities = wire
        .quality_runs
        .iter()
        .flat_map(|&(q, r)| std::iter::repeat_n(Quality(q), r as usize));
    let (mut p, mut t) = (0_i64, 0_i64);
    for i in 0..n {
        p = p.wrapping_add(wire.point_deltas[i]);
        t = t.wrapping_add(wire.ts_deltas[i]);
        let point = u32::try_from(p).map_err(|_| {
            CodecError::TelemetryShape(format!("sample {i}: point index {p} is out of range"))
        })?;
        let ts_ms = u64::try_from(t).map_err(|_| {
            CodecError::TelemetryShape(format!("sample {i}: timestamp {t} is negative"))
        })?;
        let quality = qualities.next().unwrap_or(Quality::BAD);
        samples.push(Sample {
            point,
            ts_ms,
            value: wire.values[i],
            quality,
        });
    }
    Ok(TelemetryBatch {
        stream: wire.stream.to_owned(),
        first_seq: wire.first_seq,
        floor_seq: wire.first_seq.checked_sub(wire.floor_gap).ok_or_else(|| {
            CodecError::TelemetryShape(format!(
                "floor gap {} is larger than first_seq {}",
                wire.floor_gap, wire.first_seq
            ))
        })?,
        samples,
    })
}
