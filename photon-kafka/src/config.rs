//! The `kafka://` URL and the librdkafka settings derived from it. This module owns every client
//! setting photon-kafka relies on for its guarantees (acks, idempotence, isolation level), so they
//! cannot be overridden by accident from the URL.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use photon_api::validate::DEFAULT_MAX_EVENT_SIZE;
use photon_api::Error;
use rdkafka::ClientConfig;

/// Settings of a [`crate::KafkaStore`].
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`, handed to librdkafka as `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Topics are `<prefix>.<category>`; `prefix` option, default `photon`.
    pub topic_prefix: String,
    /// Partitions of topics this store creates (`partitions`, default 6). A topic's partition
    /// count must never change afterwards: a stream's partition is its key's hash modulo it.
    pub partitions: i32,
    /// Replication factor of created topics (`replication_factor`, default -1: the broker's
    /// `default.replication.factor`).
    pub replication_factor: i32,
    /// Create missing topics on first append (`create`, default true); when false a missing topic
    /// is an error naming it.
    pub create_topics: bool,
    /// Bound on every request (`timeout_ms`, default 10 000): an unreachable broker gives
    /// `Unavailable` after about this long.
    pub timeout: Duration,
    /// Largest event accepted (`max_event_size`, default 1 MiB). Created topics get
    /// `max.message.bytes` this plus room for the key and headers.
    pub max_event_size: usize,
    /// Largest batch one append accepts (`max_append_size`, default 32 MiB): one transaction.
    pub max_append_size: usize,
    /// Further librdkafka settings: TLS and SASL from the URL (`security_protocol`,
    /// `sasl_mechanism`, `sasl_username`, `sasl_password`, `ssl_ca_location`,
    /// `ssl_certificate_location`, `ssl_key_location`, `ssl_key_password`, user:password in the
    /// URL), and any `rdkafka.<name>=<value>` option as given.
    pub client_settings: BTreeMap<String, String>,
}

/// The settings this crate's guarantees depend on; the URL may not override them.
const RESERVED: &[&str] = &[
    "bootstrap.servers",
    "acks",
    "enable.idempotence",
    "transactional.id",
    "isolation.level",
    "enable.auto.commit",
    "enable.partition.eof",
    "group.id",
];

/// Whether a librdkafka setting holds a secret, hidden from `Debug` and logs.
fn is_secret(key: &str) -> bool {
    ["password", "secret", "pem", "oauthbearer.config", "jaas"]
        .iter()
        .any(|s| key.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings: BTreeMap<&str, &str> = self
            .client_settings
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("create_topics", &self.create_topics)
            .field("timeout", &self.timeout)
            .field("max_event_size", &self.max_event_size)
            .field("max_append_size", &self.max_append_size)
            .field("client_settings", &settings)
            .finish()
    }
}

const OPTIONS: &str = "prefix, partitions, replication_factor, create, timeout_ms, max_event_size, max_append_size, security_protocol, sasl_mechanism, sasl_username, sasl_password, ssl_ca_location, ssl_certificate_location, ssl_key_location, ssl_key_password, rdkafka.<setting>";

/// Room for the key, the `photon.*` headers and the record framing above the event's own size.
pub(crate) const RECORD_OVERHEAD: usize = 64 * 1024;

impl KafkaConfig {
    /// A configuration for `bootstrap_servers` with every default.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            topic_prefix: "photon".into(),
            partitions: 6,
            replication_factor: -1,
            create_topics: true,
            timeout: Duration::from_secs(10),
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            max_append_size: 32 * 1024 * 1024,
            client_settings: BTreeMap::new(),
        }
    }

    /// Parses `kafka://[user:password@]host:port[,host:port...][?option=value&...]`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, no host, an unknown option, a bad value, or
    ///   an `rdkafka.` option that would override a setting the guarantees rely on.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let shown = photon_api::url::redact(url);
        let invalid = |reason: String| Error::InvalidInput {
            what: format!("Kafka URL {shown:?}"),
            reason,
        };
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| invalid("must start with kafka://".into()))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if hosts.is_empty() || hosts.split(',').any(|h| h.trim().is_empty()) {
            return Err(invalid("names no broker (host:port[,host:port...])".into()));
        }
        let mut config = Self::new(hosts);
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        if let Some(userinfo) = userinfo {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            config
                .client_settings
                .insert("sasl.username".into(), decode(user));
            config
                .client_settings
                .insert("sasl.password".into(), decode(password));
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(raw);
            let number = |what: &str| -> Result<i64, Error> {
                value
                    .parse::<i64>()
                    .map_err(|_| invalid(format!("{what} must be a whole number, got {value:?}")))
            };
            match key {
                "prefix" => {
                    let ok = !value.is_empty()
                        && value.len() <= 180
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
                    if !ok {
                        return Err(invalid(format!(
                            "prefix {value:?} must be 1 to 180 of A-Z a-z 0-9 . _ - (it starts topic names)"
                        )));
                    }
                    config.topic_prefix = value;
                }
                "partitions" => {
                    let n = number("partitions")?;
                    if !(1..=10_000).contains(&n) {
                        return Err(invalid(format!("partitions must be 1 to 10000, got {n}")));
                    }
                    config.partitions = n as i32;
                }
                "replication_factor" => {
                    let n = number("replication_factor")?;
                    if n == 0 || !(-1..=100).contains(&n) {
                        return Err(invalid(format!(
                            "replication_factor must be -1 (broker default) or 1 to 100, got {n}"
                        )));
                    }
                    config.replication_factor = n as i32;
                }
                "create" => {
                    config.create_topics = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(invalid(format!(
                                "create must be true or false, got {value:?}"
                            )))
                        }
                    }
                }
                "timeout_ms" => {
                    let n = number("timeout_ms")?;
                    if !(100..=600_000).contains(&n) {
                        return Err(invalid(format!("timeout_ms must be 100 to 600000, got {n}")));
                    }
                    config.timeout = Duration::from_millis(n as u64);
                }
                "max_event_size" => {
                    let n = number("max_event_size")?;
                    if !(1..=256 * 1024 * 1024).contains(&n) {
                        return Err(invalid(format!(
                            "max_event_size must be 1 to 268435456, got {n}"
                        )));
                    }
                    config.max_event_size = n as usize;
                }
                "max_append_size" => {
                    let n = number("max_append_size")?;
                    if !(1..=1024 * 1024 * 1024).contains(&n) {
                        return Err(invalid(format!(
                            "max_append_size must be 1 to 1073741824, got {n}"
                        )));
                    }
                    config.max_append_size = n as usize;
                }
                "security_protocol" | "sasl_mechanism" | "sasl_username" | "sasl_password"
                | "ssl_ca_location" | "ssl_certificate_location" | "ssl_key_location"
                | "ssl_key_password" => {
                    let name = match key {
                        "sasl_mechanism" => "sasl.mechanisms".to_owned(),
                        k => k.replace('_', "."),
                    };
                    config.client_settings.insert(name, value);
                }
                other => match other.strip_prefix("rdkafka.") {
                    Some(setting) if RESERVED.contains(&setting) => {
                        return Err(invalid(format!(
                            "{setting} is set by photon-kafka for its guarantees and cannot be overridden"
                        )))
                    }
                    Some(setting) if !setting.is_empty() => {
                        config.client_settings.insert(setting.to_owned(), value);
                    }
                    _ => {
                        return Err(invalid(format!(
                            "unknown option {other:?}; known: {OPTIONS}"
                        )))
                    }
                },
            }
        }
        if userinfo.is_some() {
            // Credentials in the URL mean SASL; over TLS unless the URL says otherwise.
            config
                .client_settings
                .entry("security.protocol".into())
                .or_insert_with(|| "sasl_ssl".into());
            config
                .client_settings
                .entry("sasl.mechanisms".into())
                .or_insert_with(|| "PLAIN".into());
        }
        Ok(config)
    }

    /// The topic of `category`.
    pub fn topic(&self, category: &str) -> String {
        format!("{}.{category}", self.topic_prefix)
    }

    /// The category of `topic` when it is one of ours.
    pub(crate) fn category_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let category = topic
            .strip_prefix(self.topic_prefix.as_str())?
            .strip_prefix('.')?;
        photon_api::Category::new(category).ok().map(|_| category)
    }

    /// The `max.message.bytes` of created topics and the producer's `message.max.bytes`.
    pub(crate) fn max_record_bytes(&self) -> usize {
        self.max_event_size + RECORD_OVERHEAD
    }

    /// Settings every client shares: brokers, security, timeouts.
    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        let ms = self.timeout.as_millis();
        c.set("socket.timeout.ms", ms.to_string());
        // librdkafka's floor for this one is a second.
        c.set(
            "socket.connection.setup.timeout.ms",
            ms.max(1000).to_string(),
        );
        // librdkafka's own log lines go through the `log` facade; errors reach us as results.
        c.set("log_level", "3");
        for (k, v) in &self.client_settings {
            c.set(k, v);
        }
        c
    }

    /// A transactional producer config for `transactional_id`: acks=all and idempotence come with
    /// transactions, and are set explicitly so no setting can weaken them.
    pub(crate) fn producer(&self, transactional_id: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("transactional.id", transactional_id)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .set("message.max.bytes", self.max_record_bytes().to_string())
            .set(
                "batch.size",
                self.max_record_bytes().min(1_000_000).to_string(),
            )
            // Brokers refuse transaction timeouts over transaction.max.timeout.ms (15 minutes by
            // default); librdkafka wants message.timeout.ms within the transaction timeout.
            .set(
                "transaction.timeout.ms",
                self.transaction_timeout_ms().to_string(),
            )
            .set(
                "message.timeout.ms",
                (self.timeout.as_millis() as u64 * 2)
                    .min(self.transaction_timeout_ms())
                    .to_string(),
            );
        c
    }

    /// How long an open transaction may live: long enough for an append, short enough that a
    /// writer that died mid-append holds readers of its partition up only briefly.
    pub(crate) fn transaction_timeout_ms(&self) -> u64 {
        (self.timeout.as_millis() as u64 * 3).clamp(5_000, 900_000)
    }

    /// A reader config: read_committed, so aborted and open transactions are never seen; no
    /// group and no commits, since positions live in checkpoints.
    pub(crate) fn consumer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", "photon-reader")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "error")
            .set("fetch.wait.max.ms", "50")
            .set(
                "fetch.message.max.bytes",
                self.max_record_bytes().to_string(),
            )
            // Bounded prefetch: a slow subscriber holds at most this much, however long the backlog.
            .set("queued.max.messages.kbytes", "8192")
            .set("queued.min.messages", "1000")
            // librdkafka pauses fetching for a second whenever its queue is full; a reader that
            // drains the queue quickly should not wait that long for more.
            .set("fetch.queue.backoff.ms", "10");
        c
    }

    /// An admin or metadata client config.
    pub(crate) fn admin(&self) -> ClientConfig {
        self.base()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option() {
        let c = KafkaConfig::from_url(
            "kafka://a:9092,b:9093/?prefix=app.v1&partitions=12&replication_factor=3&create=false&timeout_ms=1500&max_event_size=2048&max_append_size=4096&security_protocol=ssl&ssl_ca_location=/ca.pem&rdkafka.client.id=me",
        )
        .unwrap();
        assert_eq!(c.bootstrap_servers, "a:9092,b:9093");
        assert_eq!(c.topic_prefix, "app.v1");
        assert_eq!((c.partitions, c.replication_factor), (12, 3));
        assert!(!c.create_topics);
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!((c.max_event_size, c.max_append_size), (2048, 4096));
        assert_eq!(c.client_settings["security.protocol"], "ssl");
        assert_eq!(c.client_settings["ssl.ca.location"], "/ca.pem");
        assert_eq!(c.client_settings["client.id"], "me");
        assert_eq!(c.topic("account"), "app.v1.account");
        assert_eq!(c.category_of("app.v1.account"), Some("account"));
        assert_eq!(c.category_of("app.v1.bad name"), None);
        assert_eq!(c.category_of("other.account"), None);
    }

    #[test]
    fn transaction_timeouts_stay_within_broker_limits() {
        for (ms, txn) in [(100, 5_000), (10_000, 30_000), (600_000, 900_000)] {
            let c = KafkaConfig::from_url(&format!("kafka://a:1?timeout_ms={ms}")).unwrap();
            assert_eq!(c.transaction_timeout_ms(), txn);
            let p = c.producer("t");
            let message: u64 = p.get("message.timeout.ms").unwrap().parse().unwrap();
            assert!(message <= txn, "{ms}: {message} > {txn}");
        }
    }

    #[test]
    fn credentials_are_hidden() {
        let c = KafkaConfig::from_url(
            "kafka://alice:s%40cret@broker:9093?sasl_mechanism=SCRAM-SHA-512&ssl_key_password=keypw",
        )
        .unwrap();
        assert_eq!(c.client_settings["sasl.username"], "alice");
        assert_eq!(c.client_settings["sasl.password"], "s@cret");
        assert_eq!(c.client_settings["sasl.mechanisms"], "SCRAM-SHA-512");
        assert_eq!(c.client_settings["security.protocol"], "sasl_ssl");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s@cret") && !shown.contains("keypw"),
            "{shown}"
        );
        assert!(shown.contains("alice"));
        match KafkaConfig::from_url("kafka://alice:topsecret@broker:9093?nope=1") {
            Err(Error::InvalidInput { what, reason }) => {
                assert!(!what.contains("topsecret"), "{what}");
                assert!(reason.contains("nope"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_urls() {
        for (url, needle) in [
            ("mongodb://x", "kafka://"),
            ("kafka://", "no broker"),
            ("kafka://a:1,", "no broker"),
            ("kafka://a:1?partitions=0", "partitions"),
            ("kafka://a:1?partitions=x", "whole number"),
            ("kafka://a:1?replication_factor=0", "replication_factor"),
            ("kafka://a:1?prefix=bad/name", "prefix"),
            ("kafka://a:1?create=yes", "create"),
            ("kafka://a:1?timeout_ms=5", "timeout_ms"),
            ("kafka://a:1?rdkafka.acks=1", "acks"),
            (
                "kafka://a:1?rdkafka.isolation.level=read_uncommitted",
                "isolation.level",
            ),
        ] {
            match KafkaConfig::from_url(url) {
                Err(Error::InvalidInput { reason, .. }) => {
                    assert!(reason.contains(needle), "{url}: {reason}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
