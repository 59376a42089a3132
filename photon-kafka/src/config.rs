//! The `kafka://` URL and every librdkafka setting derived from it. This module owns the client
//! settings photon-kafka relies on for its guarantees (acks, idempotence, isolation level) and
//! the settings of the topics it creates, so the URL cannot override them by accident and the
//! bench's raw baseline reads the same ones. It opens no connection (that is `client.rs`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use photon_api::url::{is_secret_option, StoreUrl};
use photon_api::validate::DEFAULT_MAX_EVENT_SIZE;
use photon_api::Error;
use rdkafka::ClientConfig;

/// The URL scheme of this backend.
pub const SCHEME: &str = "kafka";

/// Every URL scheme this backend answers; newton's `connect` dispatches on these.
pub const SCHEMES: &[&str] = &[SCHEME];

/// The broker port of a URL host written without one: Kafka's.
const DEFAULT_PORT: u16 = 9092;

/// Room for the key, the `photon.*` headers and the record framing above the event's own size.
const RECORD_OVERHEAD: usize = 64 * 1024;

/// The name of the registers topic after `<prefix>.`; its `-` keeps it out of every category.
const REGISTERS_TOPIC: &str = "photon-registers";

/// Partitions of the registers topic a store creates, by default: saves of registers of one
/// partition take turns across processes (one fence per partition), so more partitions let
/// more processes save different registers at once (see the README's "Registers").
const DEFAULT_REGISTER_PARTITIONS: i32 = 16;

/// `segment.ms` (and `max.compaction.lag.ms`) of the registers topic: how long a replaced
/// register value may stay before the cleaner may reclaim it (see `register_topic_settings`).
const REGISTER_SEGMENT_MS: u64 = 600_000;

/// Producers kept by default: six categories of six partitions (the issue that raised it) and
/// many more fit, while a process stays within a few thousand librdkafka threads.
const DEFAULT_MAX_PRODUCERS: usize = 256;

/// The most `max_producers` may ask for: each producer holds a thread per broker and a few of
/// its own, so more than this would exhaust a machine before it helped.
const MAX_PRODUCERS_BOUND: usize = 4096;

/// The options a `kafka://` URL may carry; `rdkafka.*` passes any other librdkafka setting.
const OPTIONS: &[&str] = &[
    "prefix",
    "partitions",
    "register_partitions",
    "replication_factor",
    "create",
    "timeout_ms",
    "max_event_size",
    "max_append_size",
    "allow_finite_retention",
    "max_producers",
    "warm_producers",
    "max_index_bytes",
    "answer_window_ms",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_ca_location",
    "ssl_certificate_location",
    "ssl_key_location",
    "ssl_key_password",
    "rdkafka.*",
];

/// URL options passed to librdkafka under their librdkafka names.
const SECURITY_OPTIONS: &[(&str, &str)] = &[
    ("security_protocol", "security.protocol"),
    ("sasl_mechanism", "sasl.mechanisms"),
    ("sasl_username", "sasl.username"),
    ("sasl_password", "sasl.password"),
    ("ssl_ca_location", "ssl.ca.location"),
    ("ssl_certificate_location", "ssl.certificate.location"),
    ("ssl_key_location", "ssl.key.location"),
    ("ssl_key_password", "ssl.key.password"),
];

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
    /// Partitions of the registers topic (`<prefix>.photon-registers`) this store creates
    /// (`register_partitions`, default 16). Processes saving registers of one partition take
    /// turns at its fence, each take-over aborting the other's open save, which then retries:
    /// more partitions, fewer such meetings. Never changed afterwards, as for event topics.
    pub register_partitions: i32,
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
    /// Accept existing topics whose `retention.ms` or `retention.bytes` is finite
    /// (`allow_finite_retention`, default false): their old events are deleted by the broker, so
    /// a store refuses them unless told that losing old events is intended.
    pub allow_finite_retention: bool,
    /// Most transactional producers kept alive (`max_producers`, default 256): one per partition
    /// this store appends to, each with librdkafka threads and connections. A writer cycling
    /// over more partitions than this pays an `init_transactions` and a catch-up per hand-back,
    /// and a warning says so.
    pub max_producers: usize,
    /// Initialise a producer for every partition of a topic when this store first appends to
    /// it (`warm_producers`, default true), in the background, so the first append to each
    /// partition does not pay `init_transactions` (tens to hundreds of milliseconds) in its own
    /// time. Each initialisation fences the partition's writer in other processes, which take
    /// the partition back at their next append: where several processes append to the same
    /// topics, each keeping to its own partitions, turn it off.
    pub warm_producers: bool,
    /// Bytes the version indexes of this store may hold (`max_index_bytes`, default 1 GiB, about
    /// 25 million events): past it the indexes (and producers) of the partitions used least
    /// recently are dropped and rebuilt by reading the partition again when next used.
    pub max_index_bytes: usize,
    /// The longest between the last moment an append's records were known unreadable (the
    /// commit asked for, or a look that found the stable end short of them) and its Ok, and,
    /// with a quarter more, the wait of a `Start::Now` subscription before it says `CaughtUp`
    /// (`answer_window_ms`, default 2 000). Kafka cannot tell a subscriber which committed
    /// appends have not answered their callers yet; this bound can: an append not answered
    /// within it hears `Unavailable` instead (it is stored; a re-send is answered as a retry),
    /// so every append answered Ok after a `CaughtUp` from now became readable after the
    /// subscription's start and is delivered. Every process on the same topics must use the
    /// same value: a writer with a larger one (or an older version without it) can answer Ok
    /// after a `CaughtUp` that did not wait for it.
    pub answer_window: Duration,
    /// Further librdkafka settings: TLS and SASL from the URL (`security_protocol`,
    /// `sasl_mechanism`, `sasl_username`, `sasl_password`, `ssl_ca_location`,
    /// `ssl_certificate_location`, `ssl_key_location`, `ssl_key_password`, user:password in the
    /// URL), and any `rdkafka.<name>=<value>` option as given.
    pub client_settings: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    /// Hides passwords and keys: a config ends up in logs and error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings: BTreeMap<&str, &str> = self
            .client_settings
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_option(k) { "***" } else { v };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("register_partitions", &self.register_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("create_topics", &self.create_topics)
            .field("timeout", &self.timeout)
            .field("max_event_size", &self.max_event_size)
            .field("max_append_size", &self.max_append_size)
            .field("allow_finite_retention", &self.allow_finite_retention)
            .field("max_producers", &self.max_producers)
            .field("warm_producers", &self.warm_producers)
            .field("max_index_bytes", &self.max_index_bytes)
            .field("answer_window", &self.answer_window)
            .field("client_settings", &settings)
            .finish()
    }
}

impl KafkaConfig {
    /// A configuration for `bootstrap_servers` with every default.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            topic_prefix: "photon".into(),
            partitions: 6,
            register_partitions: DEFAULT_REGISTER_PARTITIONS,
            replication_factor: -1,
            create_topics: true,
            timeout: Duration::from_secs(10),
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            max_append_size: 32 * 1024 * 1024,
            allow_finite_retention: false,
            max_producers: DEFAULT_MAX_PRODUCERS,
            warm_producers: true,
            max_index_bytes: 1 << 30,
            answer_window: Duration::from_secs(2),
            client_settings: BTreeMap::new(),
        }
    }

    /// Parses `kafka://[user:password@]host:port[,host:port...][?option=value&...]`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, no host, a path, an unknown option, a bad
    ///   value, or an `rdkafka.` option that would override a setting the guarantees rely on.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let url = StoreUrl::parse(url, "Kafka URL", SCHEMES)?;
        url.check_options(OPTIONS)?;
        if url.hosts().is_empty() {
            return Err(url.invalid("names no broker (host:port[,host:port...])"));
        }
        if !url.path().is_empty() {
            return Err(url.invalid("takes no path: topics are named by the prefix option"));
        }
        let mut config = Self::new(url.host_ports(DEFAULT_PORT).join(","));
        config.read_options(&url)?;
        config.read_client_settings(&url)?;
        Ok(config)
    }

    /// The store's own options, each checked against its rule.
    fn read_options(&mut self, url: &StoreUrl) -> Result<(), Error> {
        let prefix_rule = "must be 1 to 180 of A-Z a-z 0-9 . _ - (it starts topic names)";
        if let Some(prefix) = url.parsed_option("prefix", prefix_rule, valid_prefix)? {
            self.topic_prefix = prefix;
        }
        if let Some(n) = url.number_option("partitions", 1..=10_000)? {
            self.partitions = n;
        }
        if let Some(n) = url.number_option("register_partitions", 1..=10_000)? {
            self.register_partitions = n;
        }
        let replication_rule = "must be -1 (broker default) or 1 to 100";
        let replication = |v: &str| {
            v.parse::<i32>()
                .ok()
                .filter(|n| *n == -1 || (1..=100).contains(n))
        };
        if let Some(n) = url.parsed_option("replication_factor", replication_rule, replication)? {
            self.replication_factor = n;
        }
        if let Some(create) = url.bool_option("create")? {
            self.create_topics = create;
        }
        if let Some(timeout) = url.millis_option("timeout_ms", 100..=600_000)? {
            self.timeout = timeout;
        }
        if let Some(n) = url.number_option("max_event_size", 1..=256 * 1024 * 1024)? {
            self.max_event_size = n;
        }
        if let Some(n) = url.number_option("max_append_size", 1..=1024 * 1024 * 1024)? {
            self.max_append_size = n;
        }
        if let Some(allow) = url.bool_option("allow_finite_retention")? {
            self.allow_finite_retention = allow;
        }
        if let Some(n) = url.number_option("max_producers", 1..=MAX_PRODUCERS_BOUND)? {
            self.max_producers = n;
        }
        if let Some(warm) = url.bool_option("warm_producers")? {
            self.warm_producers = warm;
        }
        if let Some(n) = url.number_option("max_index_bytes", 1..=1usize << 40)? {
            self.max_index_bytes = n;
        }
        if let Some(window) = url.millis_option("answer_window_ms", 100..=600_000)? {
            self.answer_window = window;
        }
        Ok(())
    }

    /// Credentials, TLS and `rdkafka.*` settings, in URL order (a later one wins).
    fn read_client_settings(&mut self, url: &StoreUrl) -> Result<(), Error> {
        if let Some(user) = url.username() {
            let password = url.password().unwrap_or_default();
            self.client_settings
                .insert("sasl.username".into(), user.to_owned());
            self.client_settings
                .insert("sasl.password".into(), password.to_owned());
        }
        for (key, value) in url.options() {
            let Some(setting) = librdkafka_name(key) else {
                continue;
            };
            if RESERVED.contains(&setting) {
                return Err(url.invalid(format!(
                    "{setting} is set by photon-kafka for its guarantees and cannot be overridden"
                )));
            }
            self.client_settings
                .insert(setting.to_owned(), value.to_owned());
        }
        if url.username().is_some() {
            // Credentials in the URL mean SASL; over TLS unless the URL says otherwise.
            self.client_settings
                .entry("security.protocol".into())
                .or_insert_with(|| "sasl_ssl".into());
            self.client_settings
                .entry("sasl.mechanisms".into())
                .or_insert_with(|| "PLAIN".into());
        }
        Ok(())
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

    /// The topic of this store's registers (register.rs): `<prefix>.photon-registers`. A `-`
    /// can never be in a category (ASCII letters, digits and `_`), so this is never a category's
    /// topic, [`KafkaConfig::category_of`] answers None for it, and every listing and the all
    /// stream (which go by categories) pass it by.
    pub fn registers_topic(&self) -> String {
        format!("{}.{REGISTERS_TOPIC}", self.topic_prefix)
    }

    /// The largest register record: the largest value the contract allows, its name and
    /// photon's framing, with the same room as events have. Register producers and the
    /// registers topic take the larger of this and [`KafkaConfig::max_record_bytes`]. Readers
    /// keep `fetch.message.max.bytes` at `max_record_bytes` (which may be less): brokers still
    /// hand a reader a first record larger than that, so a register's record is read whole,
    /// one fetch at a time.
    pub fn register_record_bytes(&self) -> usize {
        photon_api::MAX_REGISTER_VALUE + RECORD_OVERHEAD
    }

    /// The settings of the registers topic this store creates: compacted, so only each
    /// register's latest save stays; `segment.ms` of 10 minutes because the cleaner never
    /// touches the active segment (with Kafka's default of 7 days a replaced value would stay
    /// a week), `max.compaction.lag.ms` of 10 minutes so a replaced value is cleaned within
    /// that even when the log's dirty share is small, and `min.cleanable.dirty.ratio` 0.1
    /// because a clean registers log is tiny (one record per register), so rewriting it often
    /// costs little and keeps it within about 10% of its live size. Never deleted by age or
    /// size (should `delete` ever be added to the policy), and never lost to an unclean leader
    /// election.
    pub(crate) fn register_topic_settings(&self) -> [(&'static str, String); 9] {
        [
            ("cleanup.policy", "compact".into()),
            ("segment.ms", REGISTER_SEGMENT_MS.to_string()),
            ("max.compaction.lag.ms", REGISTER_SEGMENT_MS.to_string()),
            ("min.cleanable.dirty.ratio", "0.1".into()),
            ("retention.ms", "-1".into()),
            ("retention.bytes", "-1".into()),
            ("message.timestamp.type", "CreateTime".into()),
            (
                "max.message.bytes",
                self.register_record_bytes()
                    .max(self.max_record_bytes())
                    .to_string(),
            ),
            ("unclean.leader.election.enable", "false".into()),
        ]
    }

    /// The largest record photon-kafka writes or reads: the largest event plus room for its key
    /// and headers. Created topics get it as `max.message.bytes`, producers as
    /// `message.max.bytes`, consumers as `fetch.message.max.bytes`.
    pub fn max_record_bytes(&self) -> usize {
        self.max_event_size + RECORD_OVERHEAD
    }

    /// The settings of topics this store creates: events are the record of what happened, so
    /// never deleted by age or size, stamped with the writer's time (offsets-for-times relies on
    /// it), and never lost to an unclean leader election.
    pub(crate) fn topic_settings(&self) -> [(&'static str, String); 6] {
        [
            ("retention.ms", "-1".into()),
            ("retention.bytes", "-1".into()),
            ("cleanup.policy", "delete".into()),
            ("message.timestamp.type", "CreateTime".into()),
            ("max.message.bytes", self.max_record_bytes().to_string()),
            ("unclean.leader.election.enable", "false".into()),
        ]
    }

    /// The settings every client shares (brokers, security, timeouts); what admin and metadata
    /// clients are built with.
    pub fn client_config(&self) -> ClientConfig {
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

    /// The settings of photon-kafka's producers without the transaction: acks=all and
    /// idempotence set explicitly so no setting can weaken them, no lingering, records up to
    /// [`KafkaConfig::max_record_bytes`], and no topic created by a send.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .set("allow.auto.create.topics", "false")
            .set("message.max.bytes", self.max_record_bytes().to_string())
            .set(
                "batch.size",
                self.max_record_bytes().min(1_000_000).to_string(),
            )
            // librdkafka wants message.timeout.ms within the transaction timeout.
            .set(
                "message.timeout.ms",
                (self.timeout.as_millis() as u64 * 2)
                    .min(self.transaction_timeout_ms())
                    .to_string(),
            );
        c
    }

    /// The settings of the writer of one partition: [`KafkaConfig::producer_config`] with
    /// `transactional_id` and the transaction timeout.
    pub fn transactional_producer_config(&self, transactional_id: &str) -> ClientConfig {
        let mut c = self.producer_config();
        // Brokers refuse transaction timeouts over transaction.max.timeout.ms (15 minutes by
        // default).
        c.set("transactional.id", transactional_id).set(
            "transaction.timeout.ms",
            self.transaction_timeout_ms().to_string(),
        );
        c
    }

    /// How long an open transaction may live: long enough for an append, short enough that a
    /// writer that died mid-append holds readers of its partition up only briefly.
    pub(crate) fn transaction_timeout_ms(&self) -> u64 {
        (self.timeout.as_millis() as u64 * 3).clamp(5_000, 900_000)
    }

    /// The settings of photon-kafka's readers: read_committed, so aborted and open transactions
    /// are never seen; no group membership and no commits, since positions live in checkpoints;
    /// end-of-partition notices; a bounded prefetch.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
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
}

/// The librdkafka setting a URL option sets, when it is one: `rdkafka.<setting>` or one of
/// [`SECURITY_OPTIONS`].
fn librdkafka_name(option: &str) -> Option<&str> {
    option.strip_prefix("rdkafka.").or_else(|| {
        SECURITY_OPTIONS
            .iter()
            .find(|(name, _)| *name == option)
            .map(|(_, setting)| *setting)
    })
}

/// A topic prefix: 1 to 180 of `A-Z a-z 0-9 . _ -`, which leaves room for the category in
/// Kafka's 249-character topic names.
fn valid_prefix(value: &str) -> Option<String> {
    let ok = !value.is_empty()
        && value.len() <= 180
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    ok.then(|| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option() {
        let c = KafkaConfig::from_url(
            "kafka://a:9092,b:9093/?prefix=app.v1&partitions=12&register_partitions=4&replication_factor=3&create=false&timeout_ms=1500&max_event_size=2048&max_append_size=4096&security_protocol=ssl&ssl_ca_location=/ca.pem&rdkafka.client.id=me&allow_finite_retention=true&max_producers=40&max_index_bytes=5000&warm_producers=false&answer_window_ms=750",
        )
        .unwrap();
        assert_eq!(c.bootstrap_servers, "a:9092,b:9093");
        assert_eq!(c.topic_prefix, "app.v1");
        assert_eq!((c.partitions, c.replication_factor), (12, 3));
        assert_eq!(c.register_partitions, 4);
        assert_eq!(KafkaConfig::new("a:1").register_partitions, 16);
        assert!(!c.create_topics);
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!((c.max_event_size, c.max_append_size), (2048, 4096));
        assert!(c.allow_finite_retention);
        assert_eq!(c.max_producers, 40);
        assert_eq!(c.max_index_bytes, 5000);
        assert_eq!(c.answer_window, Duration::from_millis(750));
        assert!(!c.warm_producers);
        assert!(KafkaConfig::from_url("kafka://a:1").unwrap().warm_producers);
        assert_eq!(c.client_settings["security.protocol"], "ssl");
        assert_eq!(c.client_settings["ssl.ca.location"], "/ca.pem");
        assert_eq!(c.client_settings["client.id"], "me");
        assert_eq!(c.topic("account"), "app.v1.account");
        assert_eq!(c.category_of("app.v1.account"), Some("account"));
        assert_eq!(c.category_of("app.v1.bad name"), None);
        assert_eq!(c.category_of("other.account"), None);
        // The registers topic is never a category's, whatever the prefix.
        assert_eq!(c.registers_topic(), "app.v1.photon-registers");
        assert_eq!(c.category_of(&c.registers_topic()), None);
        let plain = KafkaConfig::new("a:1");
        assert_eq!(plain.category_of(&plain.registers_topic()), None);
        let defaults = KafkaConfig::from_url("kafka://broker,[::1]").unwrap();
        assert_eq!(defaults.bootstrap_servers, "broker:9092,[::1]:9092");
        assert_eq!(defaults, KafkaConfig::new("broker:9092,[::1]:9092"));
    }

    #[test]
    fn transaction_timeouts_stay_within_broker_limits() {
        for (ms, txn) in [(100, 5_000), (10_000, 30_000), (600_000, 900_000)] {
            let c = KafkaConfig::from_url(&format!("kafka://a:1?timeout_ms={ms}")).unwrap();
            assert_eq!(c.transaction_timeout_ms(), txn);
            let p = c.transactional_producer_config("t");
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
                assert!(
                    reason.contains("prefix, partitions"),
                    "lists the known: {reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_urls() {
        for (url, needle) in [
            ("mongodb://x", "kafka://"),
            ("kafka://", "no broker"),
            ("kafka://a:1,", "empty host"),
            ("kafka://a:1/topics", "no path"),
            ("kafka://a:1?colour=blue", "unknown option \"colour\""),
            ("kafka://a:1?sasl_password=x&sasl_password=y", "given twice"),
            ("kafka://a:1?partitions=0", "partitions"),
            ("kafka://a:1?partitions=x", "whole number"),
            ("kafka://a:1?partitions=10001", "from 1 to 10000"),
            ("kafka://a:1?max_event_size=0", "max_event_size"),
            ("kafka://a:1?max_append_size=1073741825", "max_append_size"),
            ("kafka://a:1?replication_factor=0", "replication_factor"),
            ("kafka://a:1?prefix=bad/name", "prefix"),
            ("kafka://a:1?create=yes", "create"),
            (
                "kafka://a:1?allow_finite_retention=1",
                "allow_finite_retention",
            ),
            ("kafka://a:1?max_producers=0", "max_producers"),
            ("kafka://a:1?warm_producers=sometimes", "warm_producers"),
            ("kafka://a:1?max_index_bytes=0", "max_index_bytes"),
            ("kafka://a:1?answer_window_ms=5", "answer_window_ms"),
            ("kafka://a:1?max_producers=4097", "from 1 to 4096"),
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
