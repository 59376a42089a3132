//! The settings of a memory store and how a `memory://` URL sets them.
//!
//! Only parsing and defaults live here; building a store from them is the crate root's job.

use photon_api::url::StoreUrl;
use photon_api::Error;

/// The URL scheme of this backend: `memory://`.
pub const SCHEME: &str = "memory";

/// Every URL scheme this backend answers; newton's `connect` dispatches on these.
pub const SCHEMES: &[&str] = &[SCHEME];

/// Settings of a [`MemoryStore`](crate::MemoryStore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// The largest event accepted ([`photon_api::EventData::size`]); default 1 MiB like every
    /// backend.
    pub max_event_size: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_event_size: photon_api::validate::DEFAULT_MAX_EVENT_SIZE,
        }
    }
}

impl MemoryConfig {
    /// Reads settings from `memory://` or `memory://?max_event_size=<bytes>`, starting from the
    /// defaults.
    pub(crate) fn from_url(url: &str) -> Result<Self, Error> {
        let url = StoreUrl::parse(url, "memory store URL", SCHEMES)?;
        if !url.hosts().is_empty() || !url.path().is_empty() {
            return Err(
                url.invalid("takes no host or path: every memory:// store is a new, private one")
            );
        }
        url.check_options(OPTIONS)?;
        let defaults = Self::default();
        Ok(Self {
            max_event_size: url
                .number_option("max_event_size", 1..=usize::MAX)?
                .unwrap_or(defaults.max_event_size),
        })
    }
}

/// The options a `memory://` URL takes.
const OPTIONS: &[&str] = &["max_event_size"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_and_errors() {
        let size = |url| MemoryConfig::from_url(url).unwrap().max_event_size;
        assert_eq!(size("memory://?max_event_size=10"), 10);
        assert_eq!(size("memory://"), 1024 * 1024);
        for (url, needle) in [
            (
                "memory://?max_event_size=0",
                "max_event_size must be a whole number from 1",
            ),
            (
                "memory://?max_event_size=x",
                "max_event_size must be a whole number from 1",
            ),
            ("memory://?colour=blue", "unknown option \"colour\""),
            ("memory://?max_event_size=1&max_event_size=2", "given twice"),
            ("kafka://h:1", "must start with memory://"),
            ("memory://somehost", "no host or path"),
            ("memory:///path", "no host or path"),
            ("not a url", "must start with memory://"),
        ] {
            let err = MemoryConfig::from_url(url).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidInput { reason, .. } if reason.contains(needle)),
                "{url}: {err}"
            );
        }
    }
}
