//! CIDR blocks in config files, checked once when the config is read.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;

/// `10.0.0.0/8` or `2001:db8::/32`. Host bits may be set (`203.0.113.7/32`
/// is the usual way to name one machine). Keeps the text as written, which
/// is also what is sent to the cloud API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    text: String,
    address: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let invalid = || format!("`{text}` is not a CIDR block; write it like \"203.0.113.7/32\"");
        let (address, prefix) = text.split_once('/').ok_or_else(invalid)?;
        let address: IpAddr = address.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Cidr {
            text: text.to_owned(),
            address,
            prefix,
        })
    }

    pub fn address(&self) -> IpAddr {
        self.address
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq<&str> for Cidr {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Cidr::parse(&text)
    }
}

impl From<Cidr> for String {
    fn from(cidr: Cidr) -> String {
        cidr.text
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse() {
        let v4 = Cidr::parse("203.0.113.7/32").unwrap();
        assert!(v4.address().is_ipv4());
        assert_eq!(v4.prefix(), 32);
        assert!(Cidr::parse("2001:db8::/32").unwrap().address().is_ipv6());
        assert!(Cidr::parse("2001:db8::/128").is_ok());
        assert_eq!(
            Cidr::parse("203.0.113.7").unwrap_err(),
            "`203.0.113.7` is not a CIDR block; write it like \"203.0.113.7/32\""
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("2001:db8::/129").is_err());
        assert!(Cidr::parse("example.com/8").is_err());
    }

    #[test]
    fn serializes_as_written_and_rejects_when_deserialized() {
        let cidr: Cidr = serde_json::from_value(serde_json::json!("10.0.0.0/8")).unwrap();
        assert_eq!(
            serde_json::to_value(&cidr).unwrap(),
            serde_json::json!("10.0.0.0/8")
        );
        assert_eq!(cidr.to_string(), "10.0.0.0/8");
        let err = serde_json::from_value::<Cidr>(serde_json::json!("10.0.0.0/33")).unwrap_err();
        assert!(err.to_string().contains("is not a CIDR block"), "{err}");
    }
}
