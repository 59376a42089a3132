//! The settings of a Mongo store and how a `mongodb://` URL sets them.
//!
//! The URL is the driver's own connection string plus photon's options, all named `photon_*`:
//! ours are read and checked here and taken out, the rest is handed to the driver untouched
//! (it refuses options it does not know). Connecting with these settings is `client.rs`'s job.

use std::fmt;
use std::time::Duration;

use photon_api::url::StoreUrl;
use photon_api::validate::DEFAULT_MAX_EVENT_SIZE;
use photon_api::Error;

/// The URL scheme of this backend (`mongodb+srv://` works too).
pub const SCHEME: &str = "mongodb";

/// Every URL scheme this backend answers; newton's `connect` dispatches on these.
pub const SCHEMES: &[&str] = &["mongodb", "mongodb+srv"];

/// How errors name the URL.
const WHAT: &str = "MongoDB URL";

/// Our options in the query string; every other option is the driver's.
const OPTIONS: &[&str] = &[
    "photon_prefix",
    "photon_create",
    "photon_max_event_size",
    "photon_gap_timeout_ms",
    "photon_timeout_ms",
    "photon_max_poll_ms",
    "photon_append_races",
    "photon_answer_window_ms",
];

/// The database when the URL names none.
const DEFAULT_DATABASE: &str = "photon";

/// Settings of a [`crate::MongoStore`].
#[derive(Clone, PartialEq, Eq)]
pub struct MongoConfig {
    /// The URL as given (credentials included, hence the hand-written `Debug`).
    url: StoreUrl,
    /// The database; from the URL path, default `photon`.
    pub database: String,
    /// Prefix of the collections: `<prefix>_commits`, `<prefix>_registers`.
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
    /// How many races for its version on its stream (another writer appended to the same
    /// stream between this append's read and its insert) an append with `ExpectedVersion::Any`
    /// or a holding expectation loses before it gives up with `Unavailable`: a stream written
    /// by that many processes at once needs a different design, and the caller hears so instead
    /// of waiting forever. Races for the global position, lost to appends to other streams, do
    /// not count.
    pub append_races: u32,
    /// The longest an append's insert may take to answer Ok, and the wait of a `Start::Now`
    /// subscription before it says `CaughtUp` (`photon_answer_window_ms`, default 2 000). A
    /// subscription from now starts at the highest position it finds; an insert already stored
    /// there may not have answered its caller yet. Its writer answers Ok only within this window
    /// of sending it (later it says `Unavailable`: stored, and a re-send is answered as a
    /// retry), so every append answered Ok after that `CaughtUp` was stored after the start and
    /// is delivered. Every process on the same database must use the same value: a writer with
    /// a larger one (or an older version without it) can answer Ok after a `CaughtUp` that did
    /// not wait for it.
    pub answer_window: Duration,
}

impl fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConfig")
            // StoreUrl's Display hides the password and secret-looking options.
            .field("url", &format_args!("{}", self.url))
            .field("database", &self.database)
            .field("collection_prefix", &self.collection_prefix)
            .field("create", &self.create)
            .field("max_event_size", &self.max_event_size)
            .field("gap_timeout", &self.gap_timeout)
            .field("timeout", &self.timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("append_races", &self.append_races)
            .field("answer_window", &self.answer_window)
            .finish()
    }
}

impl MongoConfig {
    /// Parses `mongodb://[user:pass@]host[:port][,host...]/[database][?options]`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, a malformed host, an unknown `photon_`
    ///   option or a bad value; options the driver does not know are its to refuse, at connect.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let url = StoreUrl::parse(url, WHAT, SCHEMES)?;
        check_our_options(&url)?;
        let database = match url.path() {
            "" => DEFAULT_DATABASE.to_owned(),
            path => path.to_owned(),
        };
        Ok(Self {
            database,
            collection_prefix: url
                .parsed_option(
                    "photon_prefix",
                    "must be ASCII letters, digits and '_'",
                    |v| is_prefix(v).then(|| v.to_owned()),
                )?
                .unwrap_or_else(|| "photon".into()),
            create: url.bool_option("photon_create")?.unwrap_or(true),
            max_event_size: url
                .parsed_option(
                    "photon_max_event_size",
                    "must be a positive number of bytes",
                    |v| v.parse().ok().filter(|n| *n > 0),
                )?
                .unwrap_or(DEFAULT_MAX_EVENT_SIZE),
            gap_timeout: millis(&url, "photon_gap_timeout_ms")?.unwrap_or(Duration::from_secs(5)),
            timeout: millis(&url, "photon_timeout_ms")?.unwrap_or(Duration::from_secs(5)),
            max_poll_interval: millis(&url, "photon_max_poll_ms")?
                .unwrap_or(Duration::from_millis(250)),
            append_races: url
                .parsed_option(
                    "photon_append_races",
                    "must be a positive number of races",
                    |v| v.parse().ok().filter(|n| *n > 0),
                )?
                .unwrap_or(200),
            answer_window: url
                .millis_option("photon_answer_window_ms", 100..=600_000)?
                .unwrap_or(Duration::from_secs(2)),
            url,
        })
    }

    /// The connection string handed to the driver: the URL as written without our options.
    /// It holds the credentials: never show it.
    pub(crate) fn driver_url(&self) -> String {
        self.url.to_string_keeping(|key| !is_ours(key))
    }

    /// `text` with the URL's password and secret option values hidden (a driver's error may
    /// quote them).
    pub(crate) fn hide_secrets(&self, text: &str) -> String {
        self.url.hide_secrets(text)
    }

    /// An [`Error::InvalidInput`] naming this URL (without its password) and `reason`.
    pub(crate) fn invalid(&self, reason: impl Into<String>) -> Error {
        self.url.invalid(reason)
    }

    /// The name of the commits collection.
    pub(crate) fn commits(&self) -> String {
        format!("{}_commits", self.collection_prefix)
    }

    /// The name of the registers collection (see `register.rs`): apart from the commits, so
    /// no reader, subscription or listing of events ever meets a register.
    pub(crate) fn registers(&self) -> String {
        format!("{}_registers", self.collection_prefix)
    }
}

fn is_ours(key: &str) -> bool {
    key.starts_with("photon_")
}

/// Refuses a `photon_*` option we do not know, listing ours. The rest are the driver's: it
/// checks them itself, and a list of its options here would only drift from it.
fn check_our_options(url: &StoreUrl) -> Result<(), Error> {
    url.check_options_matching(is_ours, OPTIONS)
}

/// A collection prefix: ASCII letters, digits and `_`, so it is a valid collection name on
/// MongoDB and FerretDB alike.
fn is_prefix(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn millis(url: &StoreUrl, name: &str) -> Result<Option<Duration>, Error> {
    url.parsed_option(name, "must be a positive number of milliseconds", |v| {
        v.parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(Duration::from_millis)
    })
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
            c.driver_url(),
            "mongodb://u:secret@h1:27017,h2/events?directConnection=true&w=majority"
        );
        assert_eq!(c.commits(), "app_commits");
        assert_eq!(c.registers(), "app_registers");
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let d = MongoConfig::from_url("mongodb://h").unwrap();
        assert_eq!((d.database.as_str(), d.create), ("photon", true));
        assert_eq!(d.append_races, 200);
        assert_eq!(d.answer_window, Duration::from_secs(2));
        let races =
            MongoConfig::from_url("mongodb://h/?photon_append_races=3&photon_answer_window_ms=700")
                .unwrap();
        assert_eq!(
            (
                races.append_races,
                races.answer_window,
                races.driver_url().as_str()
            ),
            (3, Duration::from_millis(700), "mongodb://h/")
        );
        assert_eq!(d.driver_url(), "mongodb://h");
        let srv = MongoConfig::from_url("mongodb+srv://cluster.example.com/?photon_create=false");
        assert_eq!(
            srv.unwrap().driver_url(),
            "mongodb+srv://cluster.example.com/"
        );
    }

    /// Review of issue 19 part 3: the driver splits a connection string at its first '?', so a
    /// password holding one was read as a host and quoted in the driver's error.
    #[test]
    fn the_driver_gets_a_password_with_a_question_mark_encoded() {
        let c = MongoConfig::from_url("mongodb://ann:hunter?2@db1:27017/app").unwrap();
        assert_eq!(c.driver_url(), "mongodb://ann:hunter%3F2@db1:27017/app");
    }

    #[test]
    fn rejects_bad_options_naming_them() {
        for (url, needle) in [
            (
                "mongodb://h/?photon_nope=1&w=majority",
                "unknown option \"photon_nope\"; known options are photon_prefix,",
            ),
            ("mongodb://h/?photon_create=yes", "must be true or false"),
            ("mongodb://h/?photon_prefix=a-b", "photon_prefix must be"),
            ("mongodb://h/?photon_prefix=", "photon_prefix must be"),
            (
                "mongodb://h/?photon_timeout_ms=0",
                "photon_timeout_ms must be a positive number",
            ),
            (
                "mongodb://h/?photon_max_event_size=x",
                "positive number of bytes",
            ),
            (
                "mongodb://h/?photon_append_races=0",
                "photon_append_races must be a positive number of races",
            ),
            (
                "mongodb://h/?photon_answer_window_ms=0",
                "photon_answer_window_ms",
            ),
            (
                "mongodb://h/?photon_append_races=many",
                "photon_append_races must be a positive number of races",
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
