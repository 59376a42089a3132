//! The `cassandra://` URL and the settings it makes. Consistency defaults are the safe ones
//! (QUORUM for reads and writes, SERIAL for conditional writes); the URL may choose the LOCAL_
//! variants for multi-datacenter clusters.
//!
//! Parsing goes through `photon_api::url::StoreUrl`; this module owns only the options, their
//! defaults and rules (the README's URL table). Nothing here connects.

use std::fmt;
use std::time::Duration;

use photon_api::url::StoreUrl;
use photon_api::validate::DEFAULT_MAX_EVENT_SIZE;
use photon_api::Error;
use scylla::statement::{Consistency, SerialConsistency};

/// The URL scheme of this backend (`scylla://` is accepted too).
pub const SCHEME: &str = "cassandra";

/// Every URL scheme this backend answers; newton's `connect` dispatches on these.
pub const SCHEMES: &[&str] = &["cassandra", "scylla"];

/// The port of a contact point given without one.
const DEFAULT_PORT: u16 = 9042;

/// The keyspace of a URL without a path.
const DEFAULT_KEYSPACE: &str = "photon";

/// Every option the URL may carry (the README's table).
const OPTIONS: &[&str] = &[
    "replication",
    "create",
    "local_dc",
    "tls",
    "tls_ca",
    "consistency",
    "serial_consistency",
    "timeout_ms",
    "bucket_size",
    "time_bucket_s",
    "settle_ms",
    "answer_window_ms",
    "repair_after_ms",
    "max_event_size",
    "max_append_size",
    "page_bytes",
    "require_durable",
];

/// What the encoding of one event adds to its size (`EventData::size`: payload, type and
/// headers), at most: its id, field names, schema version, times, content type and the
/// optional ids, with room to spare.
const EVENT_OVERHEAD: usize = 512;

/// The largest `max_event_size`, `max_append_size` and `page_bytes` accepted.
const MAX_SIZE_OPTION: usize = 256 * 1024 * 1024;

/// How the keyspace is replicated when this store creates it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Replication {
    /// `SimpleStrategy` with this factor: one datacenter, development.
    Simple(u32),
    /// `NetworkTopologyStrategy` with a factor per datacenter: production.
    NetworkTopology(Vec<(String, u32)>),
}

impl Replication {
    /// The CQL map of `CREATE KEYSPACE ... WITH replication = `.
    pub(crate) fn cql(&self) -> String {
        match self {
            Replication::Simple(n) => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {n}}}")
            }
            Replication::NetworkTopology(dcs) => {
                let mut s = String::from("{'class': 'NetworkTopologyStrategy'");
                for (dc, n) in dcs {
                    s.push_str(&format!(", '{dc}': {n}"));
                }
                s.push('}');
                s
            }
        }
    }
}

/// Settings of a [`crate::CassandraStore`].
#[derive(Clone, PartialEq, Eq)]
pub struct CassandraConfig {
    /// `host:port` of each contact point.
    pub contact_points: Vec<String>,
    /// The keyspace (URL path; default `photon`).
    pub keyspace: String,
    /// Replication of a keyspace this store creates (`replication=simple:1` default, or
    /// `replication=dc1:3,dc2:3` for NetworkTopologyStrategy).
    pub replication: Replication,
    /// Create the keyspace and tables on first use (`create`, default true); when false, a
    /// missing one is an error naming it.
    pub create: bool,
    /// The datacenter to prefer (`local_dc`).
    pub local_dc: Option<String>,
    /// `user:password@` of the URL.
    pub(crate) credentials: Option<(String, String)>,
    /// TLS (`tls=true`), verifying the server against `tls_ca` (a PEM file) when given.
    pub tls: bool,
    /// CA certificate file for TLS.
    pub tls_ca: Option<String>,
    /// Reads and writes (`consistency`, default `quorum`; also `local_quorum`, `all`, ...).
    pub consistency: Consistency,
    /// Conditional writes (`serial_consistency`, default `serial`; or `local_serial`).
    pub serial_consistency: SerialConsistency,
    /// Bound on each request (`timeout_ms`, default 10 000), and on connecting (at least 5 s).
    pub timeout: Duration,
    /// Versions per stream partition (`bucket_size`, default 5 000): a stream's commits are
    /// spread over partitions `(stream, first version / bucket_size)`, so a long stream never
    /// makes one partition grow without bound.
    pub bucket_size: u64,
    /// Width of a category partition in time (`time_bucket_s`, default 3 600).
    pub time_bucket: Duration,
    /// How far behind the present live category readers stay (`settle_ms`, default 250), so a
    /// commit written with a slightly earlier time id (another writer's clock, a slow request)
    /// is not passed over. Since the repair fences, this delay only has to cover a marker's
    /// write (`settle / 2`) and the clocks (`settle / 4` each from the server's): 250 ms is
    /// what every suite runs with on a loaded two-core CI machine, and live delivery lags by
    /// about that much.
    pub settle: Duration,
    /// The longest an append may take from its conditional write to its Ok, and the wait of a
    /// `Start::Now` subscription before it says `CaughtUp` (`answer_window_ms`, default
    /// 2 000). A subscription from now passes over what is stored and indexed when it starts;
    /// an append in that state may not have answered its caller yet. Its writer answers Ok only
    /// within this window of sending the commit (later it says `Unavailable`: stored, and a
    /// re-send is answered as a retry), so every append answered Ok after that `CaughtUp` was
    /// still ahead of the subscriber. Every process on the same keyspace must use the same
    /// value.
    pub answer_window: Duration,
    /// How long an append may stay unresolved before readers repair it (`repair_after_ms`,
    /// default 30 000): a commit whose category rows were never written (the writer died).
    pub repair_after: Duration,
    /// Largest event accepted (`max_event_size`, default 1 MiB).
    pub max_event_size: usize,
    /// Largest append (`max_append_size`, default 8 MiB): one row, under the server's
    /// `max_mutation_size` (half the commit log segment, 16 MiB by default).
    pub max_append_size: usize,
    /// The most one page of a read or a subscription may hold (`page_bytes`, default 64 MiB),
    /// as bounded by each commit's event count and this client's `max_event_size` and
    /// `max_append_size`; a page holds at least one commit, whatever its size.
    pub page_bytes: usize,
    /// Refuse to work (`require_durable=true`; default false: a warning only) when the crash of
    /// one node can lose an acknowledged append, or when that cannot be established: a keyspace
    /// whose quorum is one replica on nodes with `commitlog_sync: periodic`.
    pub require_durable: bool,
}

impl fmt::Debug for CassandraConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CassandraConfig")
            .field("contact_points", &self.contact_points)
            .field("keyspace", &self.keyspace)
            .field("replication", &self.replication)
            .field("create", &self.create)
            .field("local_dc", &self.local_dc)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(u, _)| format!("{u}:***")),
            )
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("consistency", &self.consistency)
            .field("serial_consistency", &self.serial_consistency)
            .field("timeout", &self.timeout)
            .field("bucket_size", &self.bucket_size)
            .field("time_bucket", &self.time_bucket)
            .field("settle", &self.settle)
            .field("answer_window", &self.answer_window)
            .field("repair_after", &self.repair_after)
            .field("max_event_size", &self.max_event_size)
            .field("max_append_size", &self.max_append_size)
            .field("page_bytes", &self.page_bytes)
            .field("require_durable", &self.require_durable)
            .finish()
    }
}

impl CassandraConfig {
    /// Parses `cassandra://[user:password@]host[:port][,host[:port]...][/keyspace][?options]`
    /// (`scylla://` is accepted too; the port defaults to 9042).
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, no host, a bad keyspace name, an unknown
    ///   option or a bad value.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let url = StoreUrl::parse(url, "Cassandra URL", SCHEMES)?;
        url.check_options(OPTIONS)?;
        if url.hosts().is_empty() {
            return Err(url.invalid("names no contact point (host[:port][,...])"));
        }
        let tls_ca = url.option("tls_ca").map(str::to_owned);
        let config = CassandraConfig {
            contact_points: url.host_ports(DEFAULT_PORT),
            keyspace: keyspace(&url)?,
            replication: url
                .parsed_option("replication", REPLICATION_RULE, parse_replication)?
                .unwrap_or(Replication::Simple(1)),
            create: url.bool_option("create")?.unwrap_or(true),
            local_dc: url.option("local_dc").map(str::to_owned),
            credentials: url
                .username()
                .map(|user| (user.to_owned(), url.password().unwrap_or("").to_owned())),
            // A CA to verify the servers against means TLS.
            tls: match (url.bool_option("tls")?, &tls_ca) {
                (Some(false), Some(_)) => {
                    return Err(url.invalid("tls=false contradicts tls_ca (a CA is for TLS)"))
                }
                (tls, ca) => tls.unwrap_or(false) || ca.is_some(),
            },
            tls_ca,
            consistency: url
                .parsed_option("consistency", CONSISTENCY_RULE, parse_consistency)?
                .unwrap_or(Consistency::Quorum),
            serial_consistency: url
                .parsed_option(
                    "serial_consistency",
                    "must be serial or local_serial",
                    parse_serial_consistency,
                )?
                .unwrap_or(SerialConsistency::Serial),
            timeout: url
                .millis_option("timeout_ms", 100..=600_000)?
                .unwrap_or(Duration::from_secs(10)),
            bucket_size: url
                .number_option("bucket_size", 10..=10_000_000)?
                .unwrap_or(5_000),
            time_bucket: url
                .number_option("time_bucket_s", 1..=30 * 86_400)?
                .map_or(Duration::from_secs(3_600), Duration::from_secs),
            settle: url
                .millis_option("settle_ms", 50..=600_000)?
                .unwrap_or(Duration::from_millis(250)),
            answer_window: url
                .millis_option("answer_window_ms", 100..=600_000)?
                .unwrap_or(Duration::from_secs(2)),
            repair_after: url
                .millis_option("repair_after_ms", 10..=3_600_000)?
                .unwrap_or(Duration::from_secs(30)),
            max_event_size: url
                .number_option("max_event_size", 1..=MAX_SIZE_OPTION)?
                .unwrap_or(DEFAULT_MAX_EVENT_SIZE),
            max_append_size: url
                .number_option("max_append_size", 1..=MAX_SIZE_OPTION)?
                .unwrap_or(8 * 1024 * 1024),
            page_bytes: url
                .number_option("page_bytes", 1..=MAX_SIZE_OPTION)?
                .unwrap_or(64 * 1024 * 1024),
            require_durable: url.bool_option("require_durable")?.unwrap_or(false),
        };
        config.check_repair_after(&url)?;
        Ok(config)
    }

    /// A marker must be settled before readers may repair it: an append gives up on a time id
    /// it could not commit within `repair_after - timeout` (see the README).
    fn check_repair_after(&self, url: &StoreUrl) -> Result<(), Error> {
        let least = self.settle + self.timeout * 2;
        if self.repair_after < least {
            return Err(url.invalid(format!(
                "repair_after_ms ({}) must be at least settle_ms + 2 x timeout_ms ({})",
                self.repair_after.as_millis(),
                least.as_millis()
            )));
        }
        Ok(())
    }

    /// The most a writer's clock may differ from the server's before its appends are refused:
    /// `settle / 4`. A marker is written within `settle / 2` of its time id (by the writer's
    /// clock; it tries again with a new one otherwise) and a reader passes a time `settle`
    /// after it (by the reader's clock), so a reader sees every marker while its clock runs
    /// less than `settle / 2` ahead of the writer's: two clocks each within `settle / 4` of
    /// the server's are.
    pub fn max_clock_skew(&self) -> Duration {
        self.settle / 4
    }

    /// The most a stored commit of `count` events can take, in bytes, for this client: each
    /// event at most `max_event_size`, all at most `max_append_size`, and the encoding's
    /// per-event fields (`EVENT_OVERHEAD`).
    pub(crate) fn commit_bound(&self, count: i32) -> usize {
        let count = count.max(0) as usize;
        count
            .saturating_mul(self.max_event_size)
            .min(self.max_append_size)
            .saturating_add(count.saturating_mul(EVENT_OVERHEAD))
    }

    /// How many of the next commits, of these event counts, one page may fetch: as many as
    /// fit in `page_bytes` by [`commit_bound`](Self::commit_bound), and at least one.
    pub(crate) fn commits_in_a_page(&self, counts: impl IntoIterator<Item = i32>) -> i32 {
        let mut bytes = 0usize;
        let mut n = 0;
        for count in counts {
            bytes = bytes.saturating_add(self.commit_bound(count));
            if n > 0 && bytes > self.page_bytes {
                break;
            }
            n += 1;
        }
        n.max(1)
    }

    /// Micro-seconds in one category time bucket.
    pub(crate) fn time_bucket_micros(&self) -> i64 {
        self.time_bucket.as_micros() as i64
    }
}

/// The URL path, or `photon`: a valid CQL name, lower-cased as Cassandra folds unquoted names.
fn keyspace(url: &StoreUrl) -> Result<String, Error> {
    let keyspace = match url.path() {
        "" => DEFAULT_KEYSPACE,
        path => path,
    };
    let valid = keyspace.len() <= 48
        && keyspace
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
        && keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(url.invalid(format!(
            "keyspace {keyspace:?} must be a letter then up to 47 of A-Z a-z 0-9 _"
        )));
    }
    Ok(keyspace.to_ascii_lowercase())
}

const REPLICATION_RULE: &str =
    "must be simple:<factor> or <datacenter>:<factor>[,<datacenter>:<factor>...] (factor 1 to 100)";

fn parse_replication(value: &str) -> Option<Replication> {
    let mut dcs = Vec::new();
    for part in value.split(',') {
        let (name, n) = part.split_once(':')?;
        let n: u32 = n.parse().ok().filter(|n| (1..=100).contains(n))?;
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !name_ok {
            return None;
        }
        dcs.push((name.to_owned(), n));
    }
    match dcs.as_slice() {
        [(name, n)] if name == "simple" => Some(Replication::Simple(*n)),
        _ if dcs.iter().any(|(n, _)| n == "simple") => None,
        _ => Some(Replication::NetworkTopology(dcs)),
    }
}

const CONSISTENCY_RULE: &str =
    "must be one of one, two, three, quorum, all, local_quorum, each_quorum, local_one";

fn parse_consistency(value: &str) -> Option<Consistency> {
    Some(match value.to_ascii_lowercase().as_str() {
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        _ => return None,
    })
}

fn parse_serial_consistency(value: &str) -> Option<SerialConsistency> {
    match value.to_ascii_lowercase().as_str() {
        "serial" => Some(SerialConsistency::Serial),
        "local_serial" => Some(SerialConsistency::LocalSerial),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option() {
        let c = CassandraConfig::from_url(
            "cassandra://ann:p%40ss@a,b:9043/Events?replication=dc1:3,dc2:2&create=false&local_dc=dc1&tls_ca=/ca.pem&consistency=local_quorum&serial_consistency=local_serial&timeout_ms=400&bucket_size=100&time_bucket_s=60&settle_ms=200&answer_window_ms=900&repair_after_ms=1000&max_event_size=10&max_append_size=20&require_durable=true",
        )
        .unwrap();
        assert_eq!(c.contact_points, vec!["a:9042", "b:9043"]);
        assert_eq!(c.keyspace, "events");
        assert_eq!(
            c.replication,
            Replication::NetworkTopology(vec![("dc1".into(), 3), ("dc2".into(), 2)])
        );
        assert_eq!(
            c.replication.cql(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
        );
        assert!(!c.create && c.tls);
        assert_eq!(c.local_dc.as_deref(), Some("dc1"));
        assert_eq!(c.consistency, Consistency::LocalQuorum);
        assert_eq!(c.serial_consistency, SerialConsistency::LocalSerial);
        assert_eq!(c.credentials, Some(("ann".into(), "p@ss".into())));
        assert_eq!((c.bucket_size, c.time_bucket.as_secs()), (100, 60));
        assert_eq!(c.settle, Duration::from_millis(200));
        assert_eq!(c.answer_window, Duration::from_millis(900));
        assert!(c.require_durable);
        let shown = format!("{c:?}");
        assert!(!shown.contains("p@ss") && shown.contains("ann"), "{shown}");
    }

    #[test]
    fn unknown_options_are_refused_with_the_known_ones() {
        match CassandraConfig::from_url("cassandra://h/ks?settle=5") {
            Err(Error::InvalidInput { reason, .. }) => {
                assert!(reason.contains("\"settle\""), "{reason}");
                assert!(reason.contains(&OPTIONS.join(", ")), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hosts_take_the_default_port_and_tls_ca_means_tls() {
        let c = CassandraConfig::from_url("scylla://[::1],h:9000/ks?tls_ca=/ca.pem").unwrap();
        assert_eq!(c.contact_points, vec!["[::1]:9042", "h:9000"]);
        assert!(c.tls);
        assert_eq!(c.tls_ca.as_deref(), Some("/ca.pem"));
        let e = CassandraConfig::from_url("cassandra://h?tls_ca=/ca.pem&tls=false").unwrap_err();
        assert!(
            e.to_string().contains("tls=false contradicts tls_ca"),
            "{e}"
        );
        let c = CassandraConfig::from_url("cassandra://h?tls=true").unwrap();
        assert!(c.tls && c.tls_ca.is_none() && c.credentials.is_none());
    }

    #[test]
    fn a_page_holds_what_fits_in_page_bytes_and_at_least_one_commit() {
        let c = CassandraConfig::from_url(
            "cassandra://h?max_event_size=1000&max_append_size=3000&page_bytes=5000",
        )
        .unwrap();
        assert_eq!(c.commit_bound(1), 1_512);
        assert_eq!(
            c.commit_bound(10),
            3_000 + 5_120,
            "max_append_size caps the events"
        );
        assert_eq!(c.commits_in_a_page([1, 1, 1, 1, 1]), 3);
        assert_eq!(c.commits_in_a_page([10, 1]), 1, "one commit even when over");
        assert_eq!(c.commits_in_a_page([]), 1);
        assert_eq!(
            CassandraConfig::from_url("cassandra://h")
                .unwrap()
                .page_bytes,
            64 * 1024 * 1024
        );
    }

    #[test]
    fn defaults_are_safe() {
        let c = CassandraConfig::from_url("cassandra://127.0.0.1").unwrap();
        assert_eq!(c.keyspace, "photon");
        assert_eq!(c.replication, Replication::Simple(1));
        assert_eq!(c.consistency, Consistency::Quorum);
        assert_eq!(c.serial_consistency, SerialConsistency::Serial);
        assert!(!c.require_durable, "a warning, not a refusal, by default");
        assert_eq!(c.settle, Duration::from_millis(250));
        assert_eq!(c.max_clock_skew(), Duration::from_micros(62_500));
        assert!(c.repair_after >= c.settle + c.timeout * 2);
        assert_eq!(
            c.replication.cql(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
    }

    #[test]
    fn refuses_bad_urls() {
        for (url, needle) in [
            ("kafka://x", "cassandra://"),
            ("cassandra:///ks", "contact point"),
            ("cassandra://h/1ks", "keyspace"),
            ("cassandra://h/ks?replication=simple", "replication"),
            ("cassandra://h/ks?replication=simple:1,dc:2", "replication"),
            ("cassandra://h/ks?consistency=most", "consistency"),
            ("cassandra://h/ks?bucket_size=1", "bucket_size"),
            ("cassandra://h/ks?settle_ms=0", "settle_ms"),
            ("cassandra://h/ks?answer_window_ms=10", "answer_window_ms"),
            ("cassandra://h/ks?repair_after_ms=5000", "repair_after_ms"),
            ("cassandra://u:secret@h/ks?nope=1", "nope"),
            ("cassandra://h1,,h2/ks", "empty host"),
            (
                "cassandra://h/ks?create=yes",
                "create must be true or false",
            ),
            (
                "cassandra://h/ks?require_durable=1",
                "require_durable must be true or false",
            ),
            ("cassandra://h/ks?page_bytes=0", "page_bytes"),
        ] {
            match CassandraConfig::from_url(url) {
                Err(Error::InvalidInput { what, reason }) => {
                    assert!(reason.contains(needle), "{url}: {reason}");
                    assert!(!what.contains("secret"), "{what}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
