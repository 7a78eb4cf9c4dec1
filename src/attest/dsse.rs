//! DSSE (Dead Simple Signing Envelope, v1): the envelope an in-toto
//! statement travels in, and the pre-authentication encoding (PAE) its
//! ed25519 signatures cover.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// The payload type of an in-toto statement in JSON.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// The statement's bytes, base64 (standard alphabet, padded).
    pub payload: String,
    /// Empty for an unsigned attestation.
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The signing key's minisign key id, 16 upper-case hex digits, as
    /// `minisign` prints it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub keyid: String,
    /// The ed25519 signature over [`pae`], base64.
    pub sig: String,
}

/// `DSSEv1 SP LEN(type) SP type SP LEN(body) SP body`, lengths as ASCII
/// decimals: what is signed, so that neither the type nor the body can be
/// swapped or re-encoded without breaking the signature.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut encoded = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    encoded.extend_from_slice(payload);
    encoded
}

impl Envelope {
    /// An envelope of `payload` with no signature yet.
    pub fn unsigned(payload: &[u8]) -> Envelope {
        Envelope {
            payload_type: IN_TOTO_PAYLOAD_TYPE.to_owned(),
            payload: STANDARD.encode(payload),
            signatures: Vec::new(),
        }
    }

    pub fn payload_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        STANDARD.decode(&self.payload)
    }

    /// Adds a signature of `key` over the envelope's PAE.
    pub fn sign(&mut self, key: &ed25519_dalek::SigningKey, keyid: &str) {
        use ed25519_dalek::Signer as _;
        let payload = self
            .payload_bytes()
            .expect("an envelope made here holds valid base64");
        let signature = key.sign(&pae(&self.payload_type, &payload));
        self.signatures.push(Signature {
            keyid: keyid.to_owned(),
            sig: STANDARD.encode(signature.to_bytes()),
        });
    }

    /// Whether `signature` is `key`'s over this envelope's PAE (strict
    /// ed25519 verification: no malleable encodings).
    pub fn verifies(&self, signature: &Signature, key: &ed25519_dalek::VerifyingKey) -> bool {
        let Ok(payload) = self.payload_bytes() else {
            return false;
        };
        let Ok(raw) = STANDARD.decode(&signature.sig) else {
            return false;
        };
        let Ok(raw) = <[u8; 64]>::try_from(raw.as_slice()) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(&raw);
        key.verify_strict(&pae(&self.payload_type, &payload), &signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_follows_the_dsse_v1_encoding() {
        // The example of the DSSE protocol description.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        // Lengths are byte counts, and an empty body still has its length
        // and separator.
        assert_eq!(pae("t", b""), b"DSSEv1 1 t 0 ".to_vec());
        assert_eq!(pae("é", b"\xff"), b"DSSEv1 2 \xc3\xa9 1 \xff".to_vec());
    }

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let mut envelope = Envelope::unsigned(br#"{"a":1}"#);
        envelope.sign(&key, "0011223344556677");
        let signature = envelope.signatures[0].clone();
        assert!(envelope.verifies(&signature, &key.verifying_key()));
        assert!(!envelope.verifies(&signature, &other.verifying_key()));

        let mut edited = envelope.clone();
        edited.payload = STANDARD.encode(br#"{"a":2}"#);
        assert!(!edited.verifies(&signature, &key.verifying_key()));

        // The type is signed too: the same body under another type fails.
        let mut retyped = envelope.clone();
        retyped.payload_type = "application/json".into();
        assert!(!retyped.verifies(&signature, &key.verifying_key()));

        let round: Envelope =
            serde_json::from_str(&serde_json::to_string(&envelope).unwrap()).unwrap();
        assert_eq!(round, envelope);
        let json = serde_json::to_value(&envelope).unwrap();
        assert_eq!(json["payloadType"], IN_TOTO_PAYLOAD_TYPE);
        assert_eq!(json["signatures"][0]["keyid"], "0011223344556677");
    }
}
