//! Ed25519 signatures over desired-state documents.
//!
//! The hub signs the exact JSON bytes it publishes; the edge verifies those
//! bytes before parsing them, so there is no canonicalisation step to get wrong.
//! Keys travel as 64 lower-case hex characters.

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::codec::{self, CodecError};
use crate::desired::DesiredState;

/// A desired-state document with its signature, as published on `desired`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedDesired {
    /// The desired state, as JSON text. Signed byte for byte.
    pub payload: String,
    /// Hex public key of the signer.
    pub key: String,
    /// Base64 Ed25519 signature over `payload`.
    pub signature: String,
}

/// Why a signed document was refused.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The envelope or payload did not decode, or the payload is invalid.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A key is not 64 hex characters of a valid Ed25519 point.
    #[error("public key {0:?} is not 64 hex characters of an Ed25519 key")]
    BadKey(String),
    /// The signature is not base64 of 64 bytes.
    #[error("signature is not base64 of 64 bytes")]
    BadSignatureEncoding,
    /// The document was signed by a key this node does not trust.
    #[error("signed by untrusted key {got}, expected {expected}")]
    UntrustedKey {
        /// The key that signed it.
        got: String,
        /// The key this node trusts.
        expected: String,
    },
    /// The signature does not match the payload.
    #[error("signature does not verify")]
    Mismatch,
}

/// Hex encoding of a public key.
pub fn key_to_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

/// Parses a hex public key.
pub fn key_from_hex(s: &str) -> Result<VerifyingKey, SigningError> {
    let bytes: [u8; 32] = hex::decode(s.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| SigningError::BadKey(s.to_owned()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| SigningError::BadKey(s.to_owned()))
}

impl SignedDesired {
    /// Serializes and signs `desired`.
    pub fn sign(desired: &DesiredState, key: &SigningKey) -> Result<Self, CodecError> {
        let payload =
            String::from_utf8(codec::encode_json("desired state", desired)?).unwrap_or_default();
        let signature = key.sign(payload.as_bytes());
        Ok(Self {
            payload,
            key: key_to_hex(&key.verifying_key()),
            signature: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
        })
    }

    /// Decodes the envelope from MQTT payload bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        codec::decode_json("signed desired state", bytes)
    }

    /// Encodes the envelope as JSON bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_json("signed desired state", self)
    }

    /// The signer's public key.
    pub fn signer(&self) -> Result<VerifyingKey, SigningError> {
        key_from_hex(&self.key)
    }

    /// Verifies the signature with `trusted` and returns the validated document.
    pub fn verify(&self, trusted: &VerifyingKey) -> Result<DesiredState, SigningError> {
        let signer = self.signer()?;
        if signer != *trusted {
            return Err(SigningError::UntrustedKey {
                got: self.key.clone(),
                expected: key_to_hex(trusted),
            });
        }
        let raw: [u8; 64] = base64::engine::general_purpose::STANDARD
            .decode(self.signature.as_bytes())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(SigningError::BadSignatureEncoding)?;
        trusted
            .verify(self.payload.as_bytes(), &Signature::from_bytes(&raw))
            .map_err(|_| SigningError::Mismatch)?;
        Ok(codec::decode_desired(self.payload.as_bytes())?)
    }

    /// The revision the payload claims, without verifying anything (for events
    /// about refused documents).
    pub fn claimed_revision(&self) -> Option<u64> {
        #[derive(Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        struct Rev {
            revision: u64,
        }
        serde_json::from_str::<Rev>(&self.payload)
            .ok()
            .map(|r| r.revision)
    }
}
