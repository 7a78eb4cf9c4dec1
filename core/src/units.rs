//! Sizes in config files are written the way people say them ("8G",
//! "512M"), checked once when the config is read.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A number of bytes, written with an optional K/M/G/T unit (powers of
/// 1024). Keeps the text as written, so `inspect` and the inputs hash show
/// what the config says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ByteSize {
    text: String,
    bytes: u64,
}

impl ByteSize {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let trimmed = text.trim();
        let (digits, unit) = trimmed.split_at(
            trimmed
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(trimmed.len()),
        );
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("`{trimmed}` is not a size; write it like \"8G\" or \"512M\""))?;
        let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => 1 << 10,
            "M" | "MB" | "MIB" => 1 << 20,
            "G" | "GB" | "GIB" => 1 << 30,
            "T" | "TB" | "TIB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{trimmed}`; use K, M, G or T"
                ));
            }
        };
        let bytes = number
            .checked_mul(factor)
            .ok_or_else(|| format!("`{trimmed}` is too large"))?;
        Ok(ByteSize {
            text: text.to_owned(),
            bytes,
        })
    }
}

impl TryFrom<String> for ByteSize {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        ByteSize::parse(&text)
    }
}

impl From<ByteSize> for String {
    fn from(size: ByteSize) -> String {
        size.text
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("8G").unwrap().bytes(), 8 << 30);
        assert_eq!(ByteSize::parse("512M").unwrap().bytes(), 512 << 20);
        assert_eq!(ByteSize::parse("20480 MiB").unwrap().bytes(), 20480 << 20);
        assert_eq!(ByteSize::parse("1024").unwrap().bytes(), 1024);
        assert_eq!(
            ByteSize::parse("8X").unwrap_err(),
            "unknown size unit `X` in `8X`; use K, M, G or T"
        );
        assert_eq!(
            ByteSize::parse("big").unwrap_err(),
            "`big` is not a size; write it like \"8G\" or \"512M\""
        );
        assert_eq!(
            ByteSize::parse("99999999999T").unwrap_err(),
            "`99999999999T` is too large"
        );
    }

    #[test]
    fn serializes_as_written_and_rejects_when_deserialized() {
        let size: ByteSize = serde_json::from_value(serde_json::json!("20480M")).unwrap();
        assert_eq!(size.bytes(), 20480 << 20);
        assert_eq!(
            serde_json::to_value(&size).unwrap(),
            serde_json::json!("20480M")
        );
        assert_eq!(size.to_string(), "20480M");
        let err = serde_json::from_value::<ByteSize>(serde_json::json!("8X")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown size unit `X` in `8X`; use K, M, G or T"
        );
        assert!(serde_json::from_value::<ByteSize>(serde_json::json!(8)).is_err());
    }
}
