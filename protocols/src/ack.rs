//! Cumulative acknowledgement of telemetry, and its signed envelope.
//!
//! An ack makes an edge delete outbox entries, so the edge acts only on a
//! [`SignedAck`]: the hub signs the exact JSON bytes of an [`AckClaim`] (node,
//! stream, highest seq) with its desired-state signing key (Ed25519, as in
//! [`crate::signing`]), and the edge verifies those bytes with the key it
//! already trusts for desired state *before* parsing them. The claim names
//! the node, so an ack for node A replayed on node B's topic is refused.
//! About 200 bytes on the wire and one signature check per stream per ack
//! interval (acks are coalesced by the hub).

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::signing::{SigningKey, VerifyingKey};

/// The hub has made every sample of `stream` up to and including `up_to_seq`
/// durable. Acks are cumulative and idempotent: an older ack arriving late
/// changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// Stream name.
    pub stream: String,
    /// Highest sequence number made durable.
    pub up_to_seq: u64,
}

/// What the hub signs: an [`Ack`] bound to the node it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AckClaim {
    /// The node whose outbox the ack is for.
    pub node: String,
    /// Stream name.
    pub stream: String,
    /// Highest sequence number made durable.
    pub up_to_seq: u64,
}

/// An ack as published on a node's `ack` topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedAck {
    /// The [`AckClaim`] as JSON text. Signed byte for byte.
    pub payload: String,
    /// Base64 Ed25519 signature over `payload`.
    pub signature: String,
}

/// Why an ack was refused. Each variant is one counted reason on the edge.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    /// The message is not a signed ack envelope (for example a bare,
    /// unsigned [`Ack`]).
    #[error("not a signed ack: {0}")]
    Unsigned(#[source] CodecError),
    /// The signature is not base64 of 64 bytes, or does not verify with the
    /// trusted key.
    #[error("ack signature does not verify with the trusted hub key")]
    BadSignature,
    /// Signed, but the claim does not decode.
    #[error("signed ack payload: {0}")]
    Payload(#[source] CodecError),
    /// Signed for another node (replayed from its topic).
    #[error("ack is for node {got:?}, this is node {expected:?}")]
    WrongNode {
        /// The node the claim names.
        got: String,
        /// This node.
        expected: String,
    },
}

impl SignedAck {
    /// Signs `ack` for `node`.
    pub fn sign(node: &str, ack: &Ack, key: &SigningKey) -> Result<Self, CodecError> {
        let claim = AckClaim {
            node: node.to_owned(),
            stream: ack.stream.clone(),
            up_to_seq: ack.up_to_seq,
        };
        let payload =
            String::from_utf8(codec::encode_json("ack claim", &claim)?).unwrap_or_default();
        let signature = key.sign(payload.as_bytes());
        Ok(Self {
            payload,
            signature: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
        })
    }

    /// Encodes the envelope as JSON bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_json("signed ack", self)
    }

    /// Decodes the envelope from `bytes`, verifies the signature with
    /// `trusted`, then parses the claim and checks that it names `node`.
    pub fn open(bytes: &[u8], trusted: &VerifyingKey, node: &str) -> Result<Ack, AckError> {
        let env: Self = codec::decode_json("signed ack", bytes).map_err(AckError::Unsigned)?;
        let raw: [u8; 64] = base64::engine::general_purpose::STANDARD
            .decode(env.signature.as_bytes())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(AckError::BadSignature)?;
        trusted
            .verify(env.payload.as_bytes(), &Signature::from_bytes(&raw))
            .map_err(|_| AckError::BadSignature)?;
        let claim: AckClaim =
            codec::decode_json("ack claim", env.payload.as_bytes()).map_err(AckError::Payload)?;
        if claim.node != node {
            return Err(AckError::WrongNode {
                got: claim.node,
                expected: node.to_owned(),
            });
        }
        Ok(Ack {
            stream: claim.stream,
            up_to_seq: claim.up_to_seq,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn ack() -> Ack {
        Ack {
            stream: "raw".into(),
            up_to_seq: 42,
        }
    }

    #[test]
    fn a_signed_ack_opens_only_with_the_key_and_for_the_node() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let bytes = SignedAck::sign("n-1", &ack(), &key)
            .unwrap()
            .encode()
            .unwrap();
        assert_eq!(
            SignedAck::open(&bytes, &key.verifying_key(), "n-1").unwrap(),
            ack()
        );
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert!(matches!(
            SignedAck::open(&bytes, &other, "n-1"),
            Err(AckError::BadSignature)
        ));
        assert!(matches!(
            SignedAck::open(&bytes, &key.verifying_key(), "n-2"),
            Err(AckError::WrongNode { got, .. }) if got == "n-1"
        ));
        let bare = codec::encode_json("ack", &ack()).unwrap();
        assert!(matches!(
            SignedAck::open(&bare, &key.verifying_key(), "n-1"),
            Err(AckError::Unsigned(_))
        ));
    }

    #[test]
    fn a_rewritten_claim_breaks_the_signature() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut env = SignedAck::sign("n-1", &ack(), &key).unwrap();
        env.payload = env.payload.replace("42", "18446744073709551615");
        let bytes = env.encode().unwrap();
        assert!(matches!(
            SignedAck::open(&bytes, &key.verifying_key(), "n-1"),
            Err(AckError::BadSignature)
        ));
    }
}
