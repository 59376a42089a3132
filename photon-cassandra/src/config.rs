//! The `cassandra://` URL. Consistency defaults are the safe ones (QUORUM for reads and writes,
//! SERIAL for conditional writes); the URL may choose the LOCAL_ variants for multi-datacenter
//! clusters.

use std::fmt;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use photon_api::validate::DEFAULT_MAX_EVENT_SIZE;
use photon_api::Error;
use scylla::statement::{Consistency, SerialConsistency};

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
    /// How far behind the present live category readers stay (`settle_ms`, default 1 000), so a
    /// commit written with a slightly earlier time id (another writer's clock, a slow request)
    /// is not passed over.
    pub settle: Duration,
    /// How long an append may stay unresolved before readers repair it (`repair_after_ms`,
    /// default 30 000): a commit whose category rows were never written (the writer died).
    pub repair_after: Duration,
    /// Largest event accepted (`max_event_size`, default 1 MiB).
    pub max_event_size: usize,
    /// Largest append (`max_append_size`, default 8 MiB): one row, under the server's
    /// `max_mutation_size` (half the commit log segment, 16 MiB by default).
    pub max_append_size: usize,
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
            .field("repair_after", &self.repair_after)
            .field("max_event_size", &self.max_event_size)
            .field("max_append_size", &self.max_append_size)
            .finish()
    }
}

const OPTIONS: &str = "replication, create, local_dc, tls, tls_ca, consistency, serial_consistency, timeout_ms, bucket_size, time_bucket_s, settle_ms, repair_after_ms, max_event_size, max_append_size";

impl CassandraConfig {
    /// Parses `cassandra://[user:password@]host[:port][,host[:port]...][/keyspace][?options]`
    /// (`scylla://` is accepted too; the port defaults to 9042).
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, no host, a bad keyspace name, an unknown
    ///   option or a bad value.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let shown = photon_api::url::redact(url);
        let invalid = |reason: String| Error::InvalidInput {
            what: format!("Cassandra URL {shown:?}"),
            reason,
        };
        let rest = url
            .strip_prefix("cassandra://")
            .or_else(|| url.strip_prefix("scylla://"))
            .ok_or_else(|| invalid("must start with cassandra:// or scylla://".into()))?;
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, keyspace) = before_query.split_once('/').unwrap_or((before_query, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let contact_points: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .map(|h| {
                if h.contains(':') {
                    h.to_owned()
                } else {
                    format!("{h}:9042")
                }
            })
            .collect();
        if hosts.is_empty() || contact_points.iter().any(|h| h.starts_with(':')) {
            return Err(invalid("names no contact point (host[:port][,...])".into()));
        }
        let keyspace = if keyspace.is_empty() {
            "photon".to_owned()
        } else {
            keyspace.to_owned()
        };
        let valid_name = keyspace.len() <= 48
            && keyspace
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
            && keyspace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(invalid(format!(
                "keyspace {keyspace:?} must be a letter then up to 47 of A-Z a-z 0-9 _"
            )));
        }
        let mut c = CassandraConfig {
            contact_points,
            keyspace: keyspace.to_ascii_lowercase(),
            replication: Replication::Simple(1),
            create: true,
            local_dc: None,
            credentials: userinfo.map(|u| {
                let (user, password) = u.split_once(':').unwrap_or((u, ""));
                (decode(user), decode(password))
            }),
            tls: false,
            tls_ca: None,
            consistency: Consistency::Quorum,
            serial_consistency: SerialConsistency::Serial,
            timeout: Duration::from_secs(10),
            bucket_size: 5_000,
            time_bucket: Duration::from_secs(3_600),
            settle: Duration::from_millis(1_000),
            repair_after: Duration::from_secs(30),
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            max_append_size: 8 * 1024 * 1024,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(raw);
            let number = |lo: u64, hi: u64| -> Result<u64, Error> {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (lo..=hi).contains(n))
                    .ok_or_else(|| invalid(format!("{key} must be {lo} to {hi}, got {value:?}")))
            };
            match key {
                "replication" => c.replication = parse_replication(&value).map_err(invalid)?,
                "create" | "tls" => {
                    let b = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(invalid(format!("{key} must be true or false"))),
                    };
                    if key == "create" {
                        c.create = b
                    } else {
                        c.tls = b
                    }
                }
                "local_dc" => c.local_dc = Some(value),
                "tls_ca" => {
                    c.tls_ca = Some(value);
                    c.tls = true;
                }
                "consistency" => {
                    c.consistency = match value.to_ascii_lowercase().as_str() {
                        "one" => Consistency::One,
                        "two" => Consistency::Two,
                        "three" => Consistency::Three,
                        "quorum" => Consistency::Quorum,
                        "all" => Consistency::All,
                        "local_quorum" => Consistency::LocalQuorum,
                        "each_quorum" => Consistency::EachQuorum,
                        "local_one" => Consistency::LocalOne,
                        _ => return Err(invalid(format!("unknown consistency {value:?}"))),
                    }
                }
                "serial_consistency" => {
                    c.serial_consistency = match value.to_ascii_lowercase().as_str() {
                        "serial" => SerialConsistency::Serial,
                        "local_serial" => SerialConsistency::LocalSerial,
                        _ => return Err(invalid(format!("unknown serial consistency {value:?}"))),
                    }
                }
                "timeout_ms" => c.timeout = Duration::from_millis(number(100, 600_000)?),
                "bucket_size" => c.bucket_size = number(10, 10_000_000)?,
                "time_bucket_s" => c.time_bucket = Duration::from_secs(number(1, 30 * 86_400)?),
                "settle_ms" => c.settle = Duration::from_millis(number(50, 600_000)?),
                "repair_after_ms" => c.repair_after = Duration::from_millis(number(10, 3_600_000)?),
                "max_event_size" => c.max_event_size = number(1, 256 * 1024 * 1024)? as usize,
                "max_append_size" => c.max_append_size = number(1, 256 * 1024 * 1024)? as usize,
                other => {
                    return Err(invalid(format!(
                        "unknown option {other:?}; known: {OPTIONS}"
                    )))
                }
            }
        }
        // A marker must be settled before readers may repair it: an append gives up on a time
        // id it could not commit within `repair_after - timeout` (see the README).
        if c.repair_after < c.settle + c.timeout * 2 {
            return Err(invalid(format!(
                "repair_after_ms ({}) must be at least settle_ms + 2 x timeout_ms ({})",
                c.repair_after.as_millis(),
                (c.settle + c.timeout * 2).as_millis()
            )));
        }
        Ok(c)
    }

    /// Micro-seconds in one category time bucket.
    pub(crate) fn time_bucket_micros(&self) -> i64 {
        self.time_bucket.as_micros() as i64
    }
}

fn parse_replication(value: &str) -> Result<Replication, String> {
    let bad = || {
        format!(
            "replication {value:?} must be simple:<factor> or <datacenter>:<factor>[,<datacenter>:<factor>...]"
        )
    };
    let mut dcs = Vec::new();
    for part in value.split(',') {
        let (name, n) = part.split_once(':').ok_or_else(bad)?;
        let n: u32 = n
            .parse()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(bad)?;
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !name_ok {
            return Err(bad());
        }
        dcs.push((name.to_owned(), n));
    }
    match dcs.as_slice() {
        [(name, n)] if name == "simple" => Ok(Replication::Simple(*n)),
        _ if dcs.iter().any(|(n, _)| n == "simple") => Err(bad()),
        _ => Ok(Replication::NetworkTopology(dcs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option() {
        let c = CassandraConfig::from_url(
            "cassandra://ann:p%40ss@a,b:9043/Events?replication=dc1:3,dc2:2&create=false&local_dc=dc1&tls_ca=/ca.pem&consistency=local_quorum&serial_consistency=local_serial&timeout_ms=400&bucket_size=100&time_bucket_s=60&settle_ms=200&repair_after_ms=1000&max_event_size=10&max_append_size=20",
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
        let shown = format!("{c:?}");
        assert!(!shown.contains("p@ss") && shown.contains("ann"), "{shown}");
    }

    #[test]
    fn defaults_are_safe() {
        let c = CassandraConfig::from_url("cassandra://127.0.0.1").unwrap();
        assert_eq!(c.keyspace, "photon");
        assert_eq!(c.replication, Replication::Simple(1));
        assert_eq!(c.consistency, Consistency::Quorum);
        assert_eq!(c.serial_consistency, SerialConsistency::Serial);
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
            ("cassandra://h/ks?repair_after_ms=5000", "repair_after_ms"),
            ("cassandra://u:secret@h/ks?nope=1", "nope"),
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
