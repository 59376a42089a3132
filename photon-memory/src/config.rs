//! The settings of a memory store and how a `memory://` URL sets them.
//!
//! Only parsing and defaults live here; building a store from them is the crate root's job.

use std::time::Duration;

use photon_api::url::StoreUrl;
use photon_api::Error;

/// The URL scheme of this backend: `memory://`.
pub const SCHEME: &str = "memory";

/// Every URL scheme this backend answers; newton's `connect` dispatches on these.
pub const SCHEMES: &[&str] = &[SCHEME];

/// Settings of a [`MemoryStore`](crate::MemoryStore).
// Not `Eq`: the fault shares are fractions.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryConfig {
    /// The largest event accepted ([`photon_api::EventData::size`]); default 1 MiB like every
    /// backend.
    pub max_event_size: usize,
    /// The production store's weaker guarantees to play, so that code which passes on
    /// `memory://` also copes with Kafka, Cassandra or MongoDB; None (the default) keeps the
    /// store's strong guarantees and adds no work to any call.
    pub faults: Option<Faults>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_event_size: photon_api::validate::DEFAULT_MAX_EVENT_SIZE,
            faults: None,
        }
    }
}

/// The weaker guarantees a memory store plays, each decided by a pseudo-random generator seeded
/// with [`Faults::seed`], so one seed gives the same decisions for the same sequence of calls and
/// a failure found with it can be replayed.
///
/// Every fault is one that a production backend shows without breaking the Photon contract, so
/// an application that copes with these copes with the contract; none loses or doubles an event.
#[derive(Clone, Debug, PartialEq)]
pub struct Faults {
    /// Seeds every decision; default [`Faults::DEFAULT_SEED`], fixed so that a test run is
    /// reproducible unless its author varies the seed on purpose.
    pub seed: u64,
    /// Order category and all subscriptions per partition only, as Kafka does: streams are
    /// hashed (stably, by name) to this many partitions, a subscription delivers the partitions
    /// in interleaved turns (so across streams the order differs from the append order, while
    /// each stream keeps its version order), checkpoints hold one position per partition and
    /// [`photon_api::Capabilities::total_order`] is false. None: one total order.
    pub partitions: Option<u32>,
    /// Category and all subscriptions deliver an event only once it is this old, as Cassandra's
    /// settle delay does; reads and stream subscriptions see it at once. Zero: no delay.
    pub delivery_delay: Duration,
    /// The share of appends (0 to 1) that store their events and then answer
    /// [`Error::Unavailable`], as a server does whose answer was lost: the caller must re-send
    /// with the same event ids, which is answered as a retry.
    pub unavailable_after: f64,
    /// The share of appends (0 to 1) answered [`Error::Unavailable`] without storing anything.
    pub unavailable_before: f64,
    /// The chance (0 to 1), after each delivered event, that a subscription then ends with an
    /// [`Error::Unavailable`] item, as a dropped connection does; the consumer resumes from its
    /// last checkpoint. A subscription always delivers at least one event before it drops.
    pub subscription_drop: f64,
}

impl Faults {
    /// The seed when the URL names none.
    pub const DEFAULT_SEED: u64 = 0;

    /// No fault: a base to set single faults on.
    pub fn none() -> Self {
        Self {
            seed: Self::DEFAULT_SEED,
            partitions: None,
            delivery_delay: Duration::ZERO,
            unavailable_after: 0.0,
            unavailable_before: 0.0,
            subscription_drop: 0.0,
        }
    }

    /// `faults=production`: every fault at once, at rates that show within a test of a few
    /// hundred calls: 4 partitions, a 20 ms delivery delay, 5% of appends answered
    /// `Unavailable` after storing and 5% before, and a 2% chance per delivered event that a
    /// subscription drops.
    pub fn production() -> Self {
        Self {
            seed: Self::DEFAULT_SEED,
            partitions: Some(4),
            delivery_delay: Duration::from_millis(20),
            unavailable_after: 0.05,
            unavailable_before: 0.05,
            subscription_drop: 0.02,
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
            faults: faults_from_url(&url)?,
        })
    }
}

/// The fault options of `url`: None when it names none, so the default store stays as fast as
/// ever; otherwise the preset (if any) with each option given replacing its value.
fn faults_from_url(url: &StoreUrl) -> Result<Option<Faults>, Error> {
    if !FAULT_OPTIONS.iter().any(|o| url.option(o).is_some()) {
        return Ok(None);
    }
    let mut faults = match url.option("faults") {
        None | Some("none") => Faults::none(),
        Some("production") => Faults::production(),
        Some(other) => {
            return Err(url.invalid(format!("faults must be production or none, got {other:?}")))
        }
    };
    if let Some(seed) = url.number_option("seed", 0..=u64::MAX)? {
        faults.seed = seed;
    }
    if let Some(n) = url.number_option("partitions", 1..=MAX_PARTITIONS)? {
        // One partition is one total order: the default behaviour.
        faults.partitions = (n > 1).then_some(n);
    }
    if let Some(delay) = url.millis_option("delivery_delay_ms", 0..=MAX_DELAY_MS)? {
        faults.delivery_delay = delay;
    }
    for (name, share) in [
        ("unavailable_after", &mut faults.unavailable_after),
        ("unavailable_before", &mut faults.unavailable_before),
        ("subscription_drop", &mut faults.subscription_drop),
    ] {
        if let Some(value) = url.parsed_option(name, "must be a number from 0 to 1", |v| {
            v.parse::<f64>().ok().filter(|x| (0.0..=1.0).contains(x))
        })? {
            *share = value;
        }
    }
    Ok(Some(faults))
}

/// The most partitions a memory store plays: more only costs scanning time.
const MAX_PARTITIONS: u32 = 1024;
/// The longest delivery delay, one minute: a longer one would only stall tests.
const MAX_DELAY_MS: u64 = 60_000;

/// The options that turn on fault playing ([`Faults`]).
const FAULT_OPTIONS: &[&str] = &[
    "faults",
    "seed",
    "partitions",
    "delivery_delay_ms",
    "unavailable_after",
    "unavailable_before",
    "subscription_drop",
];

/// The options a `memory://` URL takes.
const OPTIONS: &[&str] = &[
    "max_event_size",
    "faults",
    "seed",
    "partitions",
    "delivery_delay_ms",
    "unavailable_after",
    "unavailable_before",
    "subscription_drop",
];

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
