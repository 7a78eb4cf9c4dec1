//! Checksums in config files, checked once when the config is read.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A SHA-256 digest written as `sha256:<hex>` (or bare hex). Keeps the text
/// as written for `inspect` and the inputs hash; [`Sha256Digest::hex`] is
/// the lowercase digest to compare with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Digest {
    text: String,
    hex: String,
}

impl Sha256Digest {
    pub fn parse(text: &str) -> Result<Sha256Digest, String> {
        let hex = text
            .strip_prefix("sha256:")
            .unwrap_or(text)
            .to_ascii_lowercase();
        if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Sha256Digest {
                text: text.to_owned(),
                hex,
            })
        } else {
            Err(format!(
                "`{text}` is not a SHA-256 checksum; write it as \"sha256:<64 hex digits>\""
            ))
        }
    }

    /// The 64 lowercase hex digits.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl TryFrom<String> for Sha256Digest {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Sha256Digest::parse(&text)
    }
}

impl From<Sha256Digest> for String {
    fn from(digest: Sha256Digest) -> String {
        digest.text
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_need_64_hex_digits() {
        let hex = "a".repeat(64);
        assert_eq!(
            Sha256Digest::parse(&format!("sha256:{hex}")).unwrap().hex(),
            hex
        );
        assert_eq!(Sha256Digest::parse(&hex.to_uppercase()).unwrap().hex(), hex);
        assert_eq!(
            Sha256Digest::parse("sha256:abc").unwrap_err(),
            "`sha256:abc` is not a SHA-256 checksum; write it as \"sha256:<64 hex digits>\""
        );
        assert!(Sha256Digest::parse(&format!("md5:{hex}")).is_err());
    }

    #[test]
    fn serializes_as_written_and_rejects_when_deserialized() {
        let text = format!("sha256:{}", "AB".repeat(32));
        let digest: Sha256Digest = serde_json::from_value(serde_json::json!(text)).unwrap();
        assert_eq!(digest.hex(), "ab".repeat(32));
        assert_eq!(
            serde_json::to_value(&digest).unwrap(),
            serde_json::json!(text)
        );
        assert_eq!(digest.to_string(), text);
        let err = serde_json::from_value::<Sha256Digest>(serde_json::json!("sha256:")).unwrap_err();
        assert!(
            err.to_string().contains("is not a SHA-256 checksum"),
            "{err}"
        );
    }
}
