//! The `mongodb://` URL: the driver's own connection string plus our options, which are taken out
//! before the driver sees the string (it refuses options it does not know).

use std::fmt;
use std::time::Duration;

use photon_api::url::redact;
use photon_api::validate::DEFAULT_MAX_EVENT_SIZE;
use photon_api::Error;

/// Settings of a [`crate::MongoStore`].
#[derive(Clone, PartialEq, Eq)]
pub struct MongoConfig {
    /// The connection string handed to the driver (credentials included, hence the `Debug`).
    pub(crate) driver_url: String,
    /// The database; from the URL path, default `photon`.
    pub database: String,
    /// Prefix of the collection: `<prefix>_commits`.
    pub collection_prefix: String,
    /// Create collections and indexes on first use; when false, missing ones are an error.
    pub create: bool,
    /// Largest event accepted.
    pub max_event_size: usize,
    /// How long a reader waits for a missing lower position before it gives it up with a
    /// tombstone. Positions are claimed by insert, so none should stay missing; this bounds the
    /// wait if one does (e.g. a reader on a lagging node).
    pub gap_timeout: Duration,
    /// Bound on finding a server: an unreachable one gives `Unavailable` after this.
    pub timeout: Duration,
    /// Longest pause between two polls of a live subscription with nothing new.
    pub max_poll_interval: Duration,
}

impl fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConfig")
            .field("url", &redact(&self.driver_url))
            .field("database", &self.database)
            .field("collection_prefix", &self.collection_prefix)
            .field("create", &self.create)
            .field("max_event_size", &self.max_event_size)
            .field("gap_timeout", &self.gap_timeout)
            .field("timeout", &self.timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .finish()
    }
}

/// Our options in the query string; all start with `photon_`.
const OPTIONS: &str = "photon_prefix, photon_create, photon_max_event_size, photon_gap_timeout_ms, photon_timeout_ms, photon_max_poll_ms";

impl MongoConfig {
    /// Parses `mongodb://[user:pass@]host[:port][,host...]/[database][?options]`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, an unknown `photon_` option or a bad value.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let shown = redact(url);
        let invalid = |reason: String| Error::InvalidInput {
            what: format!("MongoDB URL {shown:?}"),
            reason,
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid(
                "must start with mongodb:// or mongodb+srv://".into(),
            ));
        };
        if scheme != "mongodb" && scheme != "mongodb+srv" {
            return Err(invalid(
                "must start with mongodb:// or mongodb+srv://".into(),
            ));
        }
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let database = before_query
            .split_once('/')
            .map(|(_, db)| db)
            .filter(|db| !db.is_empty())
            .unwrap_or("photon")
            .to_owned();
        let mut config = Self {
            driver_url: String::new(),
            database,
            collection_prefix: "photon".into(),
            create: true,
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            gap_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            max_poll_interval: Duration::from_millis(250),
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let millis = || {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        invalid(format!(
                            "{key}={value:?} is not a positive number of milliseconds"
                        ))
                    })
            };
            match key {
                "photon_prefix" => {
                    if value.is_empty()
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        return Err(invalid(format!(
                            "photon_prefix={value:?}: use ASCII letters, digits and '_'"
                        )));
                    }
                    config.collection_prefix = value.to_owned();
                }
                "photon_create" => {
                    config.create = match value {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(invalid(format!(
                                "photon_create={value:?}: use true or false"
                            )))
                        }
                    }
                }
                "photon_max_event_size" => {
                    config.max_event_size =
                        value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            invalid(format!(
                                "photon_max_event_size={value:?} is not a positive number of bytes"
                            ))
                        })?
                }
                "photon_gap_timeout_ms" => config.gap_timeout = millis()?,
                "photon_timeout_ms" => config.timeout = millis()?,
                "photon_max_poll_ms" => config.max_poll_interval = millis()?,
                k if k.starts_with("photon_") => {
                    return Err(invalid(format!("unknown option {k:?}; ours are {OPTIONS}")))
                }
                _ => kept.push(pair),
            }
        }
        config.driver_url = if kept.is_empty() {
            format!("{scheme}://{before_query}")
        } else {
            format!("{scheme}://{before_query}?{}", kept.join("&"))
        };
        Ok(config)
    }

    pub(crate) fn commits(&self) -> String {
        format!("{}_commits", self.collection_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_our_options_from_the_drivers() {
        let c = MongoConfig::from_url(
            "mongodb://u:secret@h1:27017,h2/events?directConnection=true&photon_prefix=app&photon_gap_timeout_ms=900&w=majority",
        )
        .unwrap();
        assert_eq!(c.database, "events");
        assert_eq!(c.collection_prefix, "app");
        assert_eq!(c.gap_timeout, Duration::from_millis(900));
        assert_eq!(
            c.driver_url,
            "mongodb://u:secret@h1:27017,h2/events?directConnection=true&w=majority"
        );
        assert_eq!(c.commits(), "app_commits");
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let d = MongoConfig::from_url("mongodb://h").unwrap();
        assert_eq!((d.database.as_str(), d.create), ("photon", true));
    }

    #[test]
    fn rejects_bad_options_naming_them() {
        for (url, needle) in [
            (
                "mongodb://h/?photon_nope=1",
                "unknown option \"photon_nope\"",
            ),
            ("mongodb://h/?photon_create=yes", "use true or false"),
            ("mongodb://h/?photon_prefix=a-b", "photon_prefix"),
            ("mongodb://h/?photon_timeout_ms=0", "positive number"),
            (
                "mongodb://h/?photon_max_event_size=x",
                "positive number of bytes",
            ),
            ("kafka://h", "must start with mongodb://"),
        ] {
            match MongoConfig::from_url(url) {
                Err(Error::InvalidInput { reason, .. }) => {
                    assert!(reason.contains(needle), "{url}: {reason}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
