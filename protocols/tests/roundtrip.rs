//! Property tests: every encoding round-trips, and no input panics a decoder.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use proptest::prelude::*;
use protocols::codec::{decode_batch, decode_json, encode_batch, encode_json};
use protocols::signing::SigningKey;
use protocols::*;

fn arb_sample() -> impl Strategy<Value = Sample> {
    (any::<u32>(), 0..=i64::MAX as u64, any::<f64>(), any::<u8>()).prop_map(
        |(point, ts_ms, value, q)| Sample {
            point,
            ts_ms,
            value,
            quality: Quality(q),
        },
    )
}

fn arb_batch() -> impl Strategy<Value = TelemetryBatch> {
    (
        "[a-z0-9._-]{1,64}",
        0..protocols::limits::MAX_SEQ - 300,
        any::<u64>(),
        prop::collection::vec(arb_sample(), 0..300),
    )
        .prop_map(|(stream, first_seq, floor, samples)| TelemetryBatch {
            stream,
            first_seq,
            floor_seq: floor % (first_seq + 1),
            samples,
        })
}

fn same_bits(a: &TelemetryBatch, b: &TelemetryBatch) -> bool {
    a.stream == b.stream
        && a.first_seq == b.first_seq
        && a.floor_seq == b.floor_seq
        && a.samples.len() == b.samples.len()
        && a.samples.iter().zip(&b.samples).all(|(x, y)| {
            x.point == y.point
                && x.ts_ms == y.ts_ms
                && x.quality == y.quality
                && x.value.to_bits() == y.value.to_bits()
        })
}

proptest! {
    #[test]
    fn telemetry_round_trips(b in arb_batch()) {
        let bytes = encode_batch(&b);
        let back = decode_batch(&bytes).unwrap();
        prop_assert!(same_bits(&b, &back));
    }

    #[test]
    fn sequence_numbers_past_max_seq_never_decode(b in arb_batch(), over in 1u64..u64::MAX / 4) {
        let mut b = b;
        b.first_seq = (protocols::limits::MAX_SEQ + 1).saturating_add(over).min(u64::MAX - b.samples.len() as u64);
        b.floor_seq = b.first_seq;
        let e = decode_batch(&encode_batch(&b)).unwrap_err();
        prop_assert!(e.to_string().contains("MAX_SEQ"), "{}", e);
    }

    #[test]
    fn telemetry_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&bytes);
    }

    #[test]
    fn truncated_telemetry_is_an_error(b in arb_batch(), cut in 1usize..64) {
        let bytes = encode_batch(&b);
        let cut = cut.min(bytes.len());
        prop_assert!(decode_batch(&bytes[..bytes.len() - cut]).is_err());
    }

    #[test]
    fn ack_and_status_round_trip(stream in "[a-z]{1,20}", seq in any::<u64>(), node in "[a-z0-9-]{1,20}", at in any::<u64>(), online in any::<bool>()) {
        let a = Ack { stream, up_to_seq: seq };
        prop_assert_eq!(decode_json::<Ack>("ack", &encode_json("ack", &a).unwrap()).unwrap(), a);
        let s = NodeStatus { node, state: if online { NodeState::Online } else { NodeState::Offline }, at_ms: at };
        prop_assert_eq!(decode_json::<NodeStatus>("status", &encode_json("status", &s).unwrap()).unwrap(), s);
    }

    #[test]
    fn ack_open_never_panics_and_refuses_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let key = SigningKey::from_bytes(&[5; 32]);
        prop_assert!(protocols::SignedAck::open(&bytes, &key.verifying_key(), "n").is_err());
    }

    #[test]
    fn signed_acks_open_only_for_their_node_and_key(stream in "[a-z]{1,20}", seq in any::<u64>(), node in "[a-z0-9-]{1,20}", flip in 0usize..512) {
        let key = SigningKey::from_bytes(&[5; 32]);
        let a = Ack { stream, up_to_seq: seq };
        let env = protocols::SignedAck::sign(&node, &a, &key).unwrap();
        let bytes = env.encode().unwrap();
        prop_assert_eq!(protocols::SignedAck::open(&bytes, &key.verifying_key(), &node).unwrap(), a);
        let other_node = format!("{node}x");
        prop_assert!(protocols::SignedAck::open(&bytes, &key.verifying_key(), &other_node).is_err());
        let other = SigningKey::from_bytes(&[6; 32]);
        prop_assert!(protocols::SignedAck::open(&bytes, &other.verifying_key(), &node).is_err());
        // Any flipped bit of the claim breaks it.
        let mut tampered = env.clone();
        let mut p = tampered.payload.into_bytes();
        let i = flip % p.len();
        p[i] ^= 0x01;
        tampered.payload = String::from_utf8_lossy(&p).into_owned();
        prop_assert!(protocols::SignedAck::open(&tampered.encode().unwrap(), &key.verifying_key(), &node).is_err());
    }

    #[test]
    fn tampered_signatures_are_refused(rev in 1u64..1_000_000, flip in 0usize..64) {
        let key = SigningKey::from_bytes(&[3; 32]);
        let d = DesiredState { node: "n".into(), revision: rev, functions: vec![], devices: vec![], models: vec![], config: NodeConfig::default() };
        let mut signed = SignedDesired::sign(&d, &key).unwrap();
        prop_assert_eq!(signed.verify(&key.verifying_key()).unwrap(), d);
        let mut payload = signed.payload.into_bytes();
        let i = flip % payload.len();
        payload[i] ^= 0x01;
        signed.payload = String::from_utf8_lossy(&payload).into_owned();
        prop_assert!(signed.verify(&key.verifying_key()).is_err());
        let other = SigningKey::from_bytes(&[4; 32]);
        prop_assert!(signed.verify(&other.verifying_key()).is_err());
    }
}
