//! The connection and the state every clone of a store shares: the metadata and admin clients,
//! the partition counts of topics seen, each partition's version index and writer, the queues of
//! appends, and the pool of idle readers. Topics are looked up, checked (topic.rs decides) and
//! created here.
//!
//! This module owns those maps and their locks; it decides nothing about what an append or a
//! read means (writer.rs, reader.rs), and it never reaches up into the crate root.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use photon_api::{Error, Health};
use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigResource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaRespErr;

use crate::config::KafkaConfig;
use crate::error::{self, Fault, RefusalWatch};
use crate::index::{IndexBytes, PartitionIndex};
use crate::reader;
use crate::topic::{self, TopicRefused};
use crate::writer::{Queue, Writer};

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "kafka";

/// This backend's metric labels, `backend="kafka"`.
static LABELS: photon_api::telemetry::Labels = photon_api::telemetry::Labels::new(BACKEND);

/// This backend's spans and metrics.
pub(crate) static TELEMETRY: photon_api::telemetry::Telemetry =
    photon_api::telemetry::Telemetry::new(&LABELS);

/// Idle reader consumers kept for the next read; more are closed (each holds librdkafka threads).
pub(crate) const MAX_POOLED_READERS: usize = 8;

/// How long the drain of the metadata client's queue waits for a further event before it takes
/// the queue as read: a poll with no wait at all finds none.
const DRAIN_WAIT: Duration = Duration::from_millis(10);

/// Longest a drain of the metadata client's queue may take, so a failed call still answers
/// close to its timeout while librdkafka goes on queueing debug lines: a quarter of the
/// timeout, within these bounds. Reading what a call's timeout queued takes milliseconds
/// (librdkafka suppresses repeated errors); the rest is room for a loaded machine.
const DRAIN_BUDGET: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

/// How often topic creation looks for the new topic's partitions in the metadata.
pub(crate) const TOPIC_POLL: Duration = Duration::from_millis(50);

/// How long a topic's partition count is trusted on the append and read paths before it is asked
/// for again, so a store that takes nothing over still notices a changed count within this.
pub(crate) const RECHECK: Duration = Duration::from_secs(2);

/// At most one warning about `max_producers` per this long: a thrashing writer would otherwise
/// log one per append.
const PRODUCER_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The shortest time the metadata client must have reached no broker, without a request that
/// reached one, before it is replaced (with the admin client and the idle readers), and the
/// shortest time between two replacements: longer than librdkafka's longest pause between two
/// connection attempts (`reconnect.backoff.max.ms`, 10 s), so a client that would reconnect by
/// itself is left to do so. The bound is this or three request timeouts, the longer.
const REPLACE_AFTER_MIN: Duration = Duration::from_secs(10);

/// The shortest time between two replacements after a metadata answer that lists no broker.
const REPLACE_AGAIN_MIN: Duration = Duration::from_secs(1);

/// The client that asks for metadata, watermarks and offsets-for-times.
pub(crate) type MetaClient = BaseConsumer<RefusalWatch>;

/// Whether the metadata client reaches the brokers, and when it was last replaced.
#[derive(Debug)]
struct Reach {
    /// Since when every request of the current client failed without reaching a broker.
    failing_since: Option<Instant>,
    /// When the current client was made.
    made: Instant,
    /// When a client was last replaced.
    replaced: Option<Instant>,
}

/// What this store knows of a topic it checked.
struct KnownTopic {
    /// The partition count streams are placed with.
    partitions: i32,
    /// When the brokers last confirmed it.
    checked: Instant,
    /// Set once the count was seen changed: every later use is refused the same way (the
    /// count cannot go back, and a store must not work on with either count).
    changed: Option<TopicRefused>,
}

/// What one partition's writer and readers share within this store.
pub(crate) struct PartitionState {
    pub(crate) index: PartitionIndex,
    /// The transactional producer while this store is the partition's writer.
    pub(crate) producer: Option<Writer>,
    /// A producer initialised ahead of the first append (writer.rs `warm_up`): it fenced the
    /// partition's writer in other processes when it was made, but this store has not read
    /// the partition since, so it is not the writer yet; a take-over uses it instead of
    /// initialising one.
    pub(crate) warm: Option<Writer>,
    /// Stream reads under way in the partition (reader.rs `ReadPin`): while any is, the index
    /// bound does not drop the partition's state.
    pub(crate) reads: Arc<AtomicUsize>,
}

impl PartitionState {
    /// Nothing indexed yet, counted in the store's `total`.
    fn new(total: &IndexBytes) -> Self {
        Self {
            index: PartitionIndex::counted(total.clone()),
            producer: None,
            warm: None,
            reads: Arc::default(),
        }
    }
}

/// One partition's state, locked while an append or a catch-up runs.
pub(crate) type SharedPartition = Arc<tokio::sync::Mutex<PartitionState>>;

/// Everything behind a store and its clones.
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    /// Metadata, watermarks and offsets-for-times (read_committed: watermarks are stable offsets).
    /// Its context keeps a refused login or TLS handshake, which metadata calls answer with.
    /// Replaced (with `admin`) when it stays without a broker ([`Shared::reached`]).
    meta: std::sync::RwLock<Arc<MetaClient>>,
    admin: std::sync::RwLock<Arc<AdminClient<DefaultClientContext>>>,
    /// Whether `meta` reaches the brokers.
    reach: Mutex<Reach>,
    /// Topics checked (count, configuration, layout) and the count streams are placed with.
    topics: Mutex<HashMap<String, KnownTopic>>,
    /// Topics seen to hold at least one photon event (a topic never loses that).
    with_events: Mutex<HashSet<String>>,
    /// When the last `max_producers` warning was logged.
    producer_warning: Mutex<Option<Instant>>,
    partitions: Mutex<HashMap<(String, i32), SharedPartition>>,
    /// Appends waiting for each partition's writer (see writer.rs).
    queues: Mutex<HashMap<(String, i32), Arc<Queue>>>,
    /// Idle consumers for index catch-up and stream reads.
    pub(crate) readers: Mutex<Vec<StreamConsumer>>,
    /// Producers alive in this store (each holds librdkafka threads).
    pub(crate) live_writers: Arc<AtomicUsize>,
    /// Partitions taken over since the store was built (`KafkaStore::writer_stats`).
    pub(crate) take_overs: AtomicU64,
    /// Topics whose producers were warmed (writer.rs `warm_up`), once per topic.
    pub(crate) warmed: Mutex<std::collections::HashSet<String>>,
    /// Partition indexes dropped to stay within `max_index_bytes` (`KafkaStore::writer_stats`).
    pub(crate) indexes_dropped: AtomicU64,
    /// What every partition index holds together, kept as they grow, so the bound is checked
    /// in O(1) after each commit and catch-up.
    pub(crate) index_bytes: IndexBytes,
}

impl Shared {
    /// Builds the metadata and admin clients. No request is made yet.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a librdkafka setting that librdkafka refuses.
    pub(crate) fn connect(config: KafkaConfig) -> Result<Self, Error> {
        let refused = |e| error::refused_settings(&config, e);
        let meta: BaseConsumer<RefusalWatch> = config
            .consumer_config()
            .create_with_context(RefusalWatch::default())
            .map_err(refused)?;
        let admin = config.client_config().create().map_err(refused)?;
        Ok(Self {
            meta: std::sync::RwLock::new(Arc::new(meta)),
            admin: std::sync::RwLock::new(Arc::new(admin)),
            reach: Mutex::new(Reach {
                failing_since: None,
                made: Instant::now(),
                replaced: None,
            }),
            topics: Mutex::default(),
            with_events: Mutex::default(),
            producer_warning: Mutex::default(),
            partitions: Mutex::default(),
            queues: Mutex::default(),
            readers: Mutex::default(),
            live_writers: Arc::new(AtomicUsize::new(0)),
            take_overs: AtomicU64::new(0),
            warmed: Mutex::default(),
            indexes_dropped: AtomicU64::new(0),
            index_bytes: IndexBytes::default(),
            config,
        })
    }

    /// The cluster's metadata, of one topic or of all; `context` says why it is asked for.
    ///
    /// Every call of a store begins here, so this is where a refused login or TLS handshake
    /// becomes `AccessDenied`: librdkafka reports it only to the client's error callback (its
    /// events wait in the client's queue) and keeps trying, so the call waits out its timeout;
    /// then the queue is read, and a refusal reported since the last success answers the call
    /// instead of `Unavailable`. The call is not cut short on a refusal while it runs: in a
    /// cluster another broker may yet answer, and a login cut by a restart is reported the same
    /// way. After successes the queue is read and forgotten in the background (at most once per
    /// second), so a refusal from a time calls succeeded never answers a later outage.
    async fn metadata(&self, topic: Option<&str>, context: String) -> Result<Metadata, Error> {
        let (topic, timeout) = (topic.map(str::to_owned), self.config.timeout);
        let (meta, answer) = self
            .ask_meta(move |client| {
                let answer = client.fetch_metadata(topic.as_deref(), timeout);
                if answer.is_err() {
                    read_errors(client, timeout);
                }
                answer
            })
            .await?;
        match answer {
            Ok(md) if md.brokers().is_empty() => {
                // librdkafka takes such an answer (a broker that is starting and not yet
                // unfenced gives it) as the whole cluster: it forgets every broker it knew,
                // the bootstrap ones too, and never connects again (librdkafka issue 5301).
                self.replace_clients(&meta, "the brokers answered metadata listing no broker");
                Err(error::unavailable(format!(
                    "{context}: the brokers listed no broker (starting up?)"
                )))
            }
            Ok(md) => {
                let watch = meta.context();
                watch.clear();
                if watch.drain_due() {
                    tokio::task::spawn_blocking(move || {
                        read_errors(&meta, timeout);
                        meta.context().clear();
                    });
                }
                Ok(md)
            }
            Err(e) => Err(error::refused_or(context, e, meta.context().last())),
        }
    }

    /// Runs `ask` with the metadata client, off the async threads, and notes whether it reached
    /// a broker ([`Shared::reached`]): every request of that client goes through here, so none
    /// escapes the count that replaces a client left without brokers. Answers the client asked.
    pub(crate) async fn ask_meta<T: Send + 'static>(
        &self,
        ask: impl FnOnce(&MetaClient) -> rdkafka::error::KafkaResult<T> + Send + 'static,
    ) -> Result<(Arc<MetaClient>, rdkafka::error::KafkaResult<T>), Error> {
        let meta = self.meta();
        let client = meta.clone();
        let answer = blocking(move || ask(&client)).await?;
        self.reached(&meta, &answer);
        Ok((meta, answer))
    }

    /// The client for metadata, watermarks and offsets-for-times, as it is now.
    pub(crate) fn meta(&self) -> Arc<MetaClient> {
        self.meta.read().expect("meta lock").clone()
    }

    fn admin(&self) -> Arc<AdminClient<DefaultClientContext>> {
        self.admin.read().expect("admin lock").clone()
    }

    /// Notes how a request of `client` (the metadata client when it was asked) went. A client
    /// whose requests have reached no broker for [`REPLACE_AFTER_MIN`] (or three request
    /// timeouts, the longer) is replaced by a new one, at most once per that long: librdkafka
    /// can leave a client without any broker for good after an outage (a broker starting up
    /// answers metadata listing no broker: the client forgets every broker it knew and never
    /// connects again, librdkafka issue 5301), while a new client bootstraps from the URL's
    /// brokers. During a real outage this makes a new client every so often, which costs
    /// little.
    pub(crate) fn reached<T>(&self, client: &Arc<MetaClient>, answer: &Result<T, KafkaError>) {
        let no_broker = match answer {
            Ok(_) => false,
            Err(e) if reached_no_broker(e) => true,
            // Answered by a broker, or locally from the client's cache (a client without brokers
            // answers a partition with no known leader at once): says nothing either way, so
            // it neither starts nor resets the count (review: resetting it kept a stuck client
            // under load from ever being replaced).
            Err(_) => return,
        };
        let replace_after = REPLACE_AFTER_MIN.max(self.config.timeout * 3);
        {
            let mut reach = self.reach.lock().expect("reach lock");
            if !Arc::ptr_eq(client, &self.meta()) {
                // Asked of a client replaced since: says nothing of the current one.
                return;
            }
            if !no_broker {
                reach.failing_since = None;
                return;
            }
            let since = *reach.failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() < replace_after || reach.made.elapsed() < replace_after {
                return;
            }
        }
        self.replace_clients(
            client,
            &format!("its requests reached no broker for {replace_after:?}"),
        );
    }

    /// Replaces `failed` (if it is still the metadata client) and the admin client with new
    /// ones, and closes the idle readers (made before, they may be as stuck); at most once per
    /// [`REPLACE_AGAIN_MIN`] (a new client is not stuck by an answer that lists no broker: it
    /// forgets brokers only once it learned some). The old clients are closed off the async
    /// threads.
    fn replace_clients(&self, failed: &Arc<MetaClient>, why: &str) {
        let due = |reach: &Reach, meta: &Arc<MetaClient>| {
            Arc::ptr_eq(failed, meta)
                && reach
                    .replaced
                    .is_none_or(|at| at.elapsed() >= REPLACE_AGAIN_MIN)
        };
        if !due(&self.reach.lock().expect("reach lock"), &self.meta()) {
            return;
        }
        // Made with no lock held: librdkafka starts its threads (and loads TLS files) here.
        let made = self
            .config
            .consumer_config()
            .create_with_context(RefusalWatch::default())
            .and_then(|m| Ok((m, self.config.client_config().create()?)));
        let (new_meta, new_admin) = match made {
            Ok(made) => made,
            Err(e) => {
                tracing::warn!(error = %e, "photon-kafka: the metadata client could not be replaced");
                return;
            }
        };
        let mut reach = self.reach.lock().expect("reach lock");
        let mut meta = self.meta.write().expect("meta lock");
        if !due(&reach, &meta) {
            // Another call replaced it meanwhile.
            drop((meta, reach));
            close_off_async(
                Arc::new(new_meta),
                Arc::new(new_admin),
                Vec::new(),
                Duration::ZERO,
            );
            return;
        }
        let old_meta = std::mem::replace(&mut *meta, Arc::new(new_meta));
        drop(meta);
        let old_admin = std::mem::replace(
            &mut *self.admin.write().expect("admin lock"),
            Arc::new(new_admin),
        );
        reach.failing_since = None;
        reach.made = Instant::now();
        reach.replaced = Some(reach.made);
        drop(reach);
        let idle = std::mem::take(&mut *self.readers.lock().expect("readers lock"));
        tracing::warn!(
            brokers = %self.config.bootstrap_servers,
            "photon-kafka: replaced the metadata client, the admin client and {} idle readers: {why}",
            idle.len()
        );
        // Requests in flight still hold the old clients: wait for them (each ends within three
        // timeouts) so the last drop is not theirs, on an async thread.
        close_off_async(
            old_meta,
            old_admin,
            idle,
            self.config.timeout * 3 + Duration::from_secs(1),
        );
    }

    /// The partition count of `topic` (None when it does not exist), checked: at this store's
    /// first use of the topic its configuration and the count its records were written with;
    /// afterwards the count again whenever it was last confirmed [`RECHECK`] ago.
    ///
    /// # Errors
    /// - `Backend` with a [`TopicRefused`] source for a topic that would lose events or whose
    ///   partition count changed (sticky: every later call is refused the same way).
    pub(crate) async fn partition_count(
        self: &Arc<Self>,
        topic: &str,
    ) -> Result<Option<i32>, Error> {
        match self.known(topic)? {
            Some((n, checked)) if checked.elapsed() < RECHECK => Ok(Some(n)),
            Some((n, _)) => {
                // One caller asks; the others meanwhile go on with the count just confirmed
                // (a change is refused for good once seen).
                self.remember(topic, n);
                self.partition_count_now(topic).await.map(Some)
            }
            None => self.first_look(topic).await,
        }
    }

    /// The partition count of a topic this store uses, asked of the brokers now (at every
    /// take-over of a partition): refused when it is not the count streams were placed with.
    pub(crate) async fn partition_count_now(self: &Arc<Self>, topic: &str) -> Result<i32, Error> {
        let Some((known, _)) = self.known(topic)? else {
            return self.first_look(topic).await?.ok_or_else(|| gone(topic));
        };
        let (n, _) = self
            .fetch_partition_count(topic)
            .await?
            .ok_or_else(|| gone(topic))?;
        if n != known {
            let evidence = format!(
                "this store placed streams with {known} partitions, the brokers now report {n}"
            );
            return Err(self.partitions_changed(topic, Some(known), n, evidence));
        }
        self.remember(topic, n);
        Ok(n)
    }

    /// The count streams are placed with in `topic`, when this store checked it.
    pub(crate) fn known_partitions(&self, topic: &str) -> Option<i32> {
        let topics = self.topics.lock().expect("topics lock");
        topics.get(topic).map(|k| k.partitions)
    }

    /// What this store knows of `topic`: its count and when it was confirmed; the refusal once
    /// the count was seen changed.
    pub(crate) fn known(&self, topic: &str) -> Result<Option<(i32, Instant)>, Error> {
        let topics = self.topics.lock().expect("topics lock");
        match topics.get(topic) {
            Some(KnownTopic {
                changed: Some(why), ..
            }) => Err(topic::refused(why.clone())),
            Some(k) => Ok(Some((k.partitions, k.checked))),
            None => Ok(None),
        }
    }

    /// The first use of `topic` by this store: its count, configuration and layout checked.
    async fn first_look(self: &Arc<Self>, topic: &str) -> Result<Option<i32>, Error> {
        let Some((n, replicas)) = self.fetch_partition_count(topic).await? else {
            return Ok(None);
        };
        self.check_config(topic, replicas).await?;
        if let Some((was, evidence)) = reader::probe_layout(self, topic, n).await? {
            return Err(self.partitions_changed(topic, was, n, evidence));
        }
        self.remember(topic, n);
        Ok(Some(n))
    }

    /// Records that `topic`'s count is not the one its streams were placed with, and the
    /// refusal every later use gets.
    pub(crate) fn partitions_changed(
        &self,
        topic: &str,
        was: Option<i32>,
        now: i32,
        evidence: String,
    ) -> Error {
        let why = TopicRefused::PartitionsChanged {
            topic: topic.to_owned(),
            was,
            now,
            evidence,
        };
        tracing::error!(topic, error = %why, "photon-kafka: topic refused");
        let mut topics = self.topics.lock().expect("topics lock");
        let known = topics.entry(topic.to_owned()).or_insert(KnownTopic {
            partitions: was.unwrap_or(now),
            checked: Instant::now(),
            changed: None,
        });
        known.changed.get_or_insert(why.clone());
        topic::refused(known.changed.clone().expect("set above"))
    }

    /// The partition count and replication factor of `topic` as the brokers report them now;
    /// None when it does not exist.
    pub(crate) async fn fetch_partition_count(
        &self,
        topic: &str,
    ) -> Result<Option<(i32, i32)>, Error> {
        let context = format!("fetching the metadata of topic {topic}");
        let md = self.metadata(Some(topic), context).await?;
        let Some(found) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match found.error() {
            None if !found.partitions().is_empty() => {
                let n = found.partitions().len() as i32;
                let replicas = found.partitions()[0].replicas().len() as i32;
                Ok(Some((n, replicas)))
            }
            // Just created (or being deleted): not usable yet, as if absent.
            Some(
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
                | RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            ) => Ok(None),
            None => Ok(None),
            // A topic the user may not describe is reported here, not as a failed call.
            Some(e) => {
                let code = RDKafkaErrorCode::from(e);
                let context = format!("the metadata of topic {topic} reports an error");
                let e = KafkaError::MetadataFetch(code);
                Err(match error::access_kind(code) {
                    Some(kind) => Error::access_denied(BACKEND, kind, context, e),
                    None => Error::unavailable(BACKEND, context, e),
                })
            }
        }
    }

    /// Refuses a topic whose configuration loses events (topic.rs decides what does).
    async fn check_config(&self, topic: &str, replicas: i32) -> Result<(), Error> {
        let context = format!("checking the configuration of topic {topic}");
        let config = self
            .describe(ResourceSpecifier::Topic(topic), context)
            .await?;
        topic::check_config(
            topic,
            |name| config.get(name).and_then(|e| e.value.as_deref()),
            replicas,
            self.config.allow_finite_retention,
        )
        .map_err(topic::refused)
    }

    /// The configuration of `resource`. A topic created a moment ago may not be known to the
    /// broker that answers yet; that answer is asked again within the request timeout.
    pub(crate) async fn describe(
        &self,
        resource: ResourceSpecifier<'_>,
        context: String,
    ) -> Result<ConfigResource, Error> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            let answers = self
                .admin()
                .describe_configs([&resource], &self.admin_options())
                .await
                .map_err(|e| error::from_kafka(&context, e))?;
            match answers.into_iter().next() {
                Some(Ok(config)) => return Ok(config),
                Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(TOPIC_POLL).await;
                }
                Some(Err(code)) => {
                    return Err(error::from_kafka(context, KafkaError::AdminOp(code)))
                }
                None => {
                    return Err(error::unavailable(format!("{context}: no answer")));
                }
            }
        }
    }

    fn admin_options(&self) -> AdminOptions {
        AdminOptions::new()
            .operation_timeout(Some(self.config.timeout))
            .request_timeout(Some(self.config.timeout))
    }

    /// Notes that the brokers just confirmed `topic` with `partitions` (the first count noted
    /// stays: it is the one streams are placed with).
    pub(crate) fn remember(&self, topic: &str, partitions: i32) {
        self.topics
            .lock()
            .expect("topics lock")
            .entry(topic.to_owned())
            .and_modify(|k| k.checked = Instant::now())
            .or_insert(KnownTopic {
                partitions,
                checked: Instant::now(),
                changed: None,
            });
    }

    /// Whether `topic` was seen holding a photon event.
    pub(crate) fn seen_with_events(&self, topic: &str) -> bool {
        self.with_events
            .lock()
            .expect("events lock")
            .contains(topic)
    }

    /// Notes that `topic` holds a photon event.
    pub(crate) fn saw_events(&self, topic: &str) {
        self.with_events
            .lock()
            .expect("events lock")
            .insert(topic.to_owned());
    }

    /// The partition count of `topic`, creating it first when missing and allowed.
    pub(crate) async fn ensure_topic(self: &Arc<Self>, topic: &str) -> Result<i32, Error> {
        if let Some(n) = self.partition_count(topic).await? {
            return Ok(n);
        }
        if !self.config.create_topics {
            let missing = Fault::MissingTopic {
                topic: topic.to_owned(),
                max_record_bytes: self.config.max_record_bytes(),
            };
            return Err(error::fault(format!("looking up topic {topic}"), missing));
        }
        self.create_topic(topic).await?;
        self.wait_for_partitions(topic).await
    }

    /// Asks the brokers for `topic` with the configured partitions and settings; one that
    /// already exists (created by another process meanwhile) is fine.
    async fn create_topic(&self, topic: &str) -> Result<(), Error> {
        self.create_topic_with(topic, self.config.partitions, &self.config.topic_settings())
            .await
    }

    /// Asks the brokers for `topic` with `partitions` and the configured replication, the
    /// `min.insync.replicas` that goes with it, and `settings`; one that already exists
    /// (created by another process meanwhile) is fine.
    pub(crate) async fn create_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        settings: &[(&'static str, String)],
    ) -> Result<(), Error> {
        let replication = TopicReplication::Fixed(self.config.replication_factor);
        let copies = match self.config.replication_factor {
            n if n > 0 => n,
            _ => self.default_replication_factor(topic).await?,
        };
        let min_insync = topic::created_min_insync(copies).to_string();
        let new = settings.iter().fold(
            NewTopic::new(topic, partitions, replication).set("min.insync.replicas", &min_insync),
            |new, (key, value)| new.set(key, value),
        );
        let options = self.admin_options();
        let context = format!("creating topic {topic}");
        let results = self
            .admin()
            .create_topics([&new], &options)
            .await
            .map_err(|e| error::from_kafka(&context, e))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic, "photon-kafka: created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(error::from_kafka(context, KafkaError::AdminOp(code)))
                }
            }
        }
        Ok(())
    }

    /// The replication factor a topic created without one gets: the broker's
    /// `default.replication.factor`, so `min.insync.replicas` can be set to match it.
    async fn default_replication_factor(&self, topic: &str) -> Result<i32, Error> {
        let context =
            format!("reading the brokers' default.replication.factor to create topic {topic}");
        let md = self.metadata(Some(topic), context.clone()).await?;
        let Some(broker) = md.brokers().first().map(|b| b.id()) else {
            return Err(error::unavailable(format!(
                "{context}: no broker in the metadata"
            )));
        };
        let config = self
            .describe(ResourceSpecifier::Broker(broker), context.clone())
            .await?;
        if config.entries.is_empty() {
            // rdkafka drops the per-resource error of DescribeConfigs; a broker that answers
            // with none of its settings withheld them (Kafka does for a user without
            // DescribeConfigs on the cluster).
            return Err(Error::access_denied(
                BACKEND,
                photon_api::AccessKind::Authorization,
                context,
                format!("broker {broker} showed none of its settings: no authorization to DescribeConfigs on the cluster (needed to create topics with replication_factor=-1; or set replication_factor)"),
            ));
        }
        let value = config
            .get("default.replication.factor")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<i32>().ok());
        value.ok_or_else(|| error::unavailable(format!("{context}: broker {broker} did not say")))
    }

    /// Creation is asynchronous on the brokers: waits until the metadata shows the partitions.
    async fn wait_for_partitions(self: &Arc<Self>, topic: &str) -> Result<i32, Error> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            if let Some(n) = self.partition_count(topic).await? {
                return Ok(n);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(error::unavailable(format!(
                    "topic {topic} was created but its partitions did not appear within {:?}",
                    self.config.timeout
                )));
            }
            tokio::time::sleep(TOPIC_POLL).await;
        }
    }

    /// Our topics' categories with their topics and partition counts (as listed, not checked:
    /// a topic is checked when it is used), sorted.
    pub(crate) async fn categories(&self) -> Result<Vec<(String, String, i32)>, Error> {
        let md = self.metadata(None, "listing topics".into()).await?;
        let mut out: Vec<(String, String, i32)> = md
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .filter_map(|t| {
                let c = self.config.category_of(t.name())?;
                let n = t.partitions().len() as i32;
                Some((c.to_owned(), t.name().to_owned(), n))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The brokers that answer, for a readiness check.
    pub(crate) async fn health(&self) -> Result<Health, Error> {
        let context = format!(
            "asking brokers {} for metadata",
            self.config.bootstrap_servers
        );
        let md = self.metadata(None, context).await?;
        let brokers: Vec<String> = md
            .brokers()
            .iter()
            .map(|b| format!("{}:{}", b.host(), b.port()))
            .collect();
        Ok(Health {
            backend: BACKEND,
            detail: format!("brokers {}", brokers.join(",")),
        })
    }

    /// Every partition's shared state, taken out of the map so that its lock is not held while
    /// each state is looked at (eviction and the index bound `try_lock` them one by one).
    fn partition_states(&self) -> Vec<SharedPartition> {
        self.partitions
            .lock()
            .expect("partitions lock")
            .values()
            .cloned()
            .collect()
    }

    /// The shared state of one partition.
    pub(crate) fn partition(&self, topic: &str, p: i32) -> SharedPartition {
        self.partitions
            .lock()
            .expect("partitions lock")
            .entry((topic.to_owned(), p))
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(PartitionState::new(
                    &self.index_bytes,
                )))
            })
            .clone()
    }

    /// The shared state of one partition and its queue of appends.
    pub(crate) fn partition_with_queue(
        &self,
        topic: &str,
        p: i32,
    ) -> (SharedPartition, Arc<Queue>) {
        let queue = self
            .queues
            .lock()
            .expect("queues lock")
            .entry((topic.to_owned(), p))
            .or_default()
            .clone();
        (self.partition(topic, p), queue)
    }

    /// Drops the producers of partitions not appended to for `idle` (the producers kept follow
    /// the partitions in use), then more, while more than `keep` live (warm producers not used
    /// yet first, then the least recently used): each producer holds librdkafka threads and a
    /// connection. Closing one that is still in use
    /// (its partition will be appended to again and taken over again) is warned about.
    pub(crate) fn evict_writers(&self, keep: usize, idle: Duration) {
        let states = self.partition_states();
        // Warm producers (made ahead of a first append, writer.rs `warm_up`) go first: stale
        // ones, then, while over the limit, any, oldest first; they are counted alive too.
        let mut warm: Vec<_> = states
            .iter()
            .filter_map(|s| {
                let guard = s.try_lock().ok()?;
                Some((guard.warm.as_ref()?.last_used, s.clone()))
            })
            .collect();
        warm.sort_by_key(|(made, _)| *made);
        for (made, s) in warm {
            let over = self.live_writers.load(Ordering::Relaxed) > keep;
            if made.elapsed() < idle && !over {
                continue;
            }
            if let Ok(mut guard) = s.try_lock() {
                guard.warm = None;
            }
        }
        let mut held: Vec<_> = states
            .iter()
            .filter_map(|s| {
                let guard = s.try_lock().ok()?;
                let used = guard.producer.as_ref()?.last_used;
                Some((used, s.clone()))
            })
            .collect();
        held.sort_by_key(|(used, _)| *used);
        for (used, s) in held {
            let stale = used.elapsed() >= idle;
            let over = self.live_writers.load(Ordering::Relaxed) > keep;
            if !stale && !over {
                // Sorted oldest first: the rest are in use and within the limit.
                break;
            }
            if let Ok(mut guard) = s.try_lock() {
                if !stale {
                    self.warn_producer_limit(used.elapsed());
                }
                guard.producer = None;
            }
        }
    }

    /// Says, at most once a [`PRODUCER_WARNING_EVERY`], that producers in use are being closed.
    fn warn_producer_limit(&self, idle_for: Duration) {
        let mut last = self.producer_warning.lock().expect("warning lock");
        if last.is_some_and(|at| at.elapsed() < PRODUCER_WARNING_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!(
            max_producers = self.config.max_producers,
            idle_ms = idle_for.as_millis() as u64,
            "photon-kafka: this store appends to more partitions than max_producers; the producer used least recently is closed, and appending to its partition again costs an init_transactions and a catch-up read (raise max_producers, up to 4096, or route fewer partitions to this process)"
        );
    }
}

impl Shared {
    /// Keeps what the version indexes hold within `max_index_bytes`: while they hold more, the
    /// state of the partition used least recently (its index and producer) is dropped, to be
    /// rebuilt by reading the partition when it is used again. Partitions locked right now (in
    /// use, among them the caller's: it is called after an index grew, with its lock held) and
    /// partitions a stream read is under way in (pinned by it from its first step to its end,
    /// though it releases the lock between steps) are neither counted nor dropped, so a
    /// partition larger than the bound stays while it is used.
    ///
    /// Below the bound (the common case) this is one load of the running total: it runs after
    /// every commit and catch-up, and looking at every partition there made each append cost
    /// O(partitions).
    pub(crate) fn bound_indexes(&self) {
        if self.index_bytes.get() <= self.config.max_index_bytes {
            return;
        }
        let states = self.partition_states();
        let mut idle: Vec<_> = states
            .iter()
            .filter_map(|s| {
                let guard = s.try_lock().ok()?;
                if guard.reads.load(Ordering::Relaxed) > 0 {
                    return None;
                }
                Some((guard.index.used, guard.index.bytes(), s.clone()))
            })
            .collect();
        let mut total: usize = idle.iter().map(|(_, bytes, _)| bytes).sum();
        if total <= self.config.max_index_bytes {
            return;
        }
        idle.sort_by_key(|(used, _, _)| *used);
        let mut dropped = 0;
        for (_, bytes, s) in idle {
            if total <= self.config.max_index_bytes {
                break;
            }
            if let Ok(mut guard) = s.try_lock() {
                if guard.reads.load(Ordering::Relaxed) > 0 {
                    // A read began in it since it was looked at.
                    continue;
                }
                guard.index = PartitionIndex::counted(self.index_bytes.clone());
                guard.producer = None;
                total -= bytes;
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.indexes_dropped.fetch_add(dropped, Ordering::Relaxed);
            tracing::debug!(
                dropped,
                max_index_bytes = self.config.max_index_bytes,
                "photon-kafka: version indexes dropped to stay within max_index_bytes"
            );
        }
    }
}

/// Hands the metadata client's queued events (log lines and errors) to its context
/// ([`RefusalWatch`]) until the queue is empty, within [`DRAIN_BUDGET`] for a client whose
/// requests time out after `timeout`. The client is assigned no partition, so nothing else is
/// in its queue.
fn read_errors(meta: &MetaClient, timeout: Duration) {
    let budget = (timeout / 4).clamp(DRAIN_BUDGET.0, DRAIN_BUDGET.1);
    error::drain(
        || meta.poll(DRAIN_WAIT).is_some(),
        || meta.context().events(),
        DRAIN_WAIT,
        budget,
    );
}

/// Closes replaced clients on a blocking thread (closing one joins librdkafka's threads), after
/// the other holders of `meta` and `admin` let go of them, for at most `wait`.
fn close_off_async(
    meta: Arc<MetaClient>,
    admin: Arc<AdminClient<DefaultClientContext>>,
    idle: Vec<StreamConsumer>,
    wait: Duration,
) {
    let close = move || {
        let until = Instant::now() + wait;
        while (Arc::strong_count(&meta) > 1 || Arc::strong_count(&admin) > 1)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop((meta, admin, idle));
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(close)),
        Err(_) => close(),
    }
}

/// Whether a request failed without reaching any broker: the client had none it could use, or
/// none answered in time (an error a broker answered with says the client works).
fn reached_no_broker(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::OperationTimedOut
                | C::DestroyBroker
                | C::Resolve
        )
    )
}

/// A topic in use that the metadata no longer shows.
fn gone(topic: &str) -> Error {
    error::unavailable(format!(
        "topic {topic} is not in the brokers' metadata (deleted, or the metadata is behind)"
    ))
}

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(error::blocking_failed)
}
