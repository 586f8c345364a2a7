//! Hostile input on every document decoder: the golden documents mutated at
//! random (bytes flipped, cut, spliced; JSON leaves replaced with extreme
//! values of every type; nesting past any sane depth) never panic a
//! decoder, and what decodes also validates or is refused with a field
//! path. Signed envelopes never verify once their payload changed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::PathBuf;

use proptest::prelude::*;
use protocols::codec::{decode_desired, decode_json};
use protocols::signing::SigningKey;
use protocols::*;
use serde_json::Value;

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name),
    )
    .unwrap()
}

/// Runs every JSON decoder of the protocol on `bytes`; none may panic.
fn decode_all(bytes: &[u8]) {
    if let Ok(d) = decode_desired(bytes) {
        // What decodes is valid, and survives a round trip.
        let again = serde_json::to_vec(&d).unwrap();
        assert_eq!(decode_desired(&again).unwrap(), d);
    }
    let _ = decode_json::<ReportedState>("reported", bytes);
    let _ = decode_json::<Event>("event", bytes);
    let _ = decode_json::<NodeStatus>("status", bytes);
    let _ = decode_json::<Ack>("ack", bytes);
    let _ = SignedAck::open(
        bytes,
        &SigningKey::from_bytes(&[1; 32]).verifying_key(),
        "n",
    );
    if let Ok(env) = SignedDesired::decode(bytes) {
        let _ = env.signer();
        let _ = env.claimed_revision();
        let _ = env.verify(&SigningKey::from_bytes(&[1; 32]).verifying_key());
    }
}

/// Values an attacker would put in a leaf.
fn nasty() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        Just(Value::from(-1)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!(-0.0)),
        ".{0,40}".prop_map(Value::String),
        Just(Value::String("\u{0}\n\"}{]".into())),
        Just(Value::String("x".repeat(100_000))),
        Just(Value::String("../../../../etc/passwd".into())),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
        Just(serde_json::json!([[[[[[[[1]]]]]]]])),
    ]
}

/// Replaces the `pick`-th leaf (in document order) of `v` with `with`.
fn replace_leaf(v: &mut Value, pick: &mut usize, with: &Value) -> bool {
    match v {
        Value::Object(m) => m.values_mut().any(|c| replace_leaf(c, pick, with)),
        Value::Array(a) => a.iter_mut().any(|c| replace_leaf(c, pick, with)),
        leaf => {
            if *pick == 0 {
                *leaf = with.clone();
                true
            } else {
                *pick -= 1;
                false
            }
        }
    }
}

const DOCS: [&str; 6] = [
    "desired.json",
    "signed-desired.json",
    "reported.json",
    "event.json",
    "status.json",
    "ack.json",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn byte_mutations_never_panic_a_decoder(
        doc in 0..DOCS.len(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        splice in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut bytes = golden(DOCS[doc]);
        for (at, b) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *b;
        }
        let at = cut.index(bytes.len() + 1);
        bytes.splice(at..at, splice);
        decode_all(&bytes);
        decode_all(&bytes[..at]);
    }

    #[test]
    fn extreme_leaves_decode_or_are_refused_with_a_field(
        doc in 0..DOCS.len(),
        pick in 0usize..400,
        with in nasty(),
    ) {
        let mut v: Value = serde_json::from_slice(&golden(DOCS[doc])).unwrap();
        let mut p = pick;
        replace_leaf(&mut v, &mut p, &with);
        let bytes = serde_json::to_vec(&v).unwrap();
        decode_all(&bytes);
        if DOCS[doc] == "desired.json"
            && let Err(e) = decode_desired(&bytes)
        {
            // A refusal says where: a field path or the parser's position.
            let msg = e.to_string();
            prop_assert!(msg.contains(':'), "{msg}");
        }
    }

    #[test]
    fn a_changed_payload_never_verifies(pick in 0usize..200, with in nasty()) {
        let key = SigningKey::from_bytes(&[9; 32]);
        let d = decode_desired(&golden("desired.json")).unwrap();
        let signed = SignedDesired::sign(&d, &key).unwrap();
        let mut payload: Value = serde_json::from_str(&signed.payload).unwrap();
        let mut p = pick;
        let changed = replace_leaf(&mut payload, &mut p, &with);
        let forged = SignedDesired {
            payload: serde_json::to_string(&payload).unwrap(),
            ..signed.clone()
        };
        if changed && forged.payload != signed.payload {
            prop_assert!(forged.verify(&key.verifying_key()).is_err());
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [200, 10_000, 100_000] {
        let mut s = "[".repeat(depth);
        s.push_str(&"]".repeat(depth));
        decode_all(s.as_bytes());
        let obj = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        decode_all(obj.as_bytes());
        assert!(decode_desired(obj.as_bytes()).is_err());
    }
}
