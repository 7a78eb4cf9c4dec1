//! `SOURCE_DATE_EPOCH` (reproducible-builds.org): the time a reproducible
//! build stamps on what it makes instead of the clock's.

use time::OffsetDateTime;

pub const SOURCE_DATE_EPOCH: &str = "SOURCE_DATE_EPOCH";

/// The variable's time; `Ok(None)` when it is unset or empty. A value that
/// is not a whole number of seconds is an error, as the specification asks:
/// ignoring it would silently stamp the clock's time.
pub fn source_date_epoch() -> Result<Option<OffsetDateTime>, String> {
    match std::env::var(SOURCE_DATE_EPOCH) {
        Ok(text) if !text.is_empty() => parse(&text).map(Some),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("{SOURCE_DATE_EPOCH} is not valid text"))
        }
    }
}

/// Reads a `SOURCE_DATE_EPOCH` value: decimal seconds since 1970-01-01 UTC.
pub fn parse(text: &str) -> Result<OffsetDateTime, String> {
    text.parse::<i64>()
        .ok()
        .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|seconds| OffsetDateTime::from_unix_timestamp(seconds).ok())
        .ok_or_else(|| {
            format!(
                "{SOURCE_DATE_EPOCH}=`{text}` is not a whole number of seconds since 1970-01-01 UTC; set it to e.g. `$(git log -1 --format=%ct)`, or unset it"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_are_read_and_anything_else_refused() {
        assert_eq!(parse("1700000000").unwrap().unix_timestamp(), 1_700_000_000);
        assert_eq!(parse("0").unwrap(), OffsetDateTime::UNIX_EPOCH);
        for bad in [
            "",
            "-5",
            "+5",
            "1.5",
            " 12",
            "12 ",
            "tomorrow",
            "99999999999999999999",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
