//! The text forms of selectors, expected versions and subscription starts on the command line.
//!
//! Kept apart from clap so the same forms are used (and tested) by the library functions and the
//! binary; URLs are not parsed here (that is `photon_api::url`, through `newton::connect`).

use std::str::FromStr;

use photon_api::{
    Category, Checkpoint, ExpectedVersion, Selector, Start, StreamId, Timestamp, Version,
};

use crate::error::CliError;

/// Parses `stream:<stream name>`, `category:<name>` or `all`.
///
/// # Errors
/// - [`CliError::Usage`] for another form; [`CliError::Store`] for a malformed name.
pub fn parse_selector(text: &str) -> Result<Selector, CliError> {
    if text == "all" {
        return Ok(Selector::All);
    }
    if let Some(stream) = text.strip_prefix("stream:") {
        return Ok(Selector::Stream(StreamId::parse(stream)?));
    }
    if let Some(category) = text.strip_prefix("category:") {
        return Ok(Selector::Category(Category::new(category)?));
    }
    Err(CliError::Usage(format!(
        "selector {text:?} is not one of stream:<stream>, category:<name>, all"
    )))
}

/// The text form of a selector, the inverse of [`parse_selector`] (written into dump headers).
pub fn selector_text(selector: &Selector) -> String {
    match selector {
        Selector::Stream(s) => format!("stream:{s}"),
        Selector::Category(c) => format!("category:{c}"),
        Selector::All => "all".to_owned(),
    }
}

/// Parses `any`, `none`, `exists` or a version number.
///
/// # Errors
/// - [`CliError::Usage`] for anything else.
pub fn parse_expected(text: &str) -> Result<ExpectedVersion, CliError> {
    match text {
        "any" => Ok(ExpectedVersion::Any),
        "none" => Ok(ExpectedVersion::NoStream),
        "exists" => Ok(ExpectedVersion::StreamExists),
        n => n
            .parse::<u64>()
            .map(|v| ExpectedVersion::Exact(Version(v)))
            .map_err(|_| {
                CliError::Usage(format!(
                    "expected version {text:?} is not one of any, none, exists or a version number"
                ))
            }),
    }
}

/// Parses `beginning`, `now`, an RFC 3339 time (`2026-11-30T12:00:00Z`) or a checkpoint
/// (`<backend>:<hex>`, as `tail` and `append` print them).
///
/// # Errors
/// - [`CliError::Usage`] when it is none of these.
pub fn parse_start(text: &str) -> Result<Start, CliError> {
    match text {
        "beginning" => return Ok(Start::Beginning),
        "now" => return Ok(Start::Now),
        _ => {}
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(Start::Time(Timestamp::from(t.with_timezone(&chrono::Utc))));
    }
    Checkpoint::from_str(text).map(Start::After).map_err(|e| {
        CliError::Usage(format!(
            "start {text:?} is not beginning, now, an RFC 3339 time or a checkpoint ({e})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_round_trip() {
        for text in ["all", "category:account", "stream:account-42"] {
            assert_eq!(selector_text(&parse_selector(text).unwrap()), text);
        }
        assert!(matches!(parse_selector("account"), Err(CliError::Usage(_))));
        assert!(matches!(
            parse_selector("stream:no_dash"),
            Err(CliError::Store(_))
        ));
    }

    #[test]
    fn expected_versions() {
        assert_eq!(parse_expected("any").unwrap(), ExpectedVersion::Any);
        assert_eq!(parse_expected("none").unwrap(), ExpectedVersion::NoStream);
        assert_eq!(
            parse_expected("exists").unwrap(),
            ExpectedVersion::StreamExists
        );
        assert_eq!(
            parse_expected("7").unwrap(),
            ExpectedVersion::Exact(Version(7))
        );
        assert!(parse_expected("-1").is_err());
    }

    #[test]
    fn starts() {
        assert_eq!(parse_start("beginning").unwrap(), Start::Beginning);
        assert_eq!(parse_start("now").unwrap(), Start::Now);
        assert!(matches!(
            parse_start("2026-11-30T12:00:00Z").unwrap(),
            Start::Time(_)
        ));
        assert_eq!(
            parse_start("memory:0000000000000007").unwrap(),
            Start::After(Checkpoint::from_position("memory", 7))
        );
        assert!(matches!(parse_start("yesterday"), Err(CliError::Usage(_))));
    }
}
