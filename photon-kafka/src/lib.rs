#![doc = include_str!("../README.md")]

mod config;
mod index;
mod position;
mod reader;
mod record;
mod subscription;
mod writer;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::{self, BoxStream};
use futures::StreamExt;
use photon_api::{
    error_stream, AppendResult, Capabilities, Category, Error, EventData, EventStore,
    ExpectedVersion, Health, ReadOptions, RecordedEvent, Selector, Start, StreamId,
    SubscriptionItem, SubscriptionMode, Version,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;

pub use config::KafkaConfig;

use crate::index::PartitionIndex;

/// The URL scheme of this backend.
pub const SCHEME: &str = "kafka";

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "kafka";

/// The event store on Apache Kafka. Clones share clients, topic metadata and version indexes.
#[derive(Clone)]
pub struct KafkaStore {
    inner: Arc<Shared>,
}

impl fmt::Debug for KafkaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// What one partition's writer and readers share within this store.
#[derive(Default)]
pub(crate) struct PartitionState {
    pub(crate) index: PartitionIndex,
    /// The transactional producer while this store is the partition's writer.
    pub(crate) producer: Option<writer::Writer>,
}

/// One partition's state, locked while an append or a catch-up runs.
pub(crate) type SharedPartition = Arc<tokio::sync::Mutex<PartitionState>>;

/// Everything behind a [`KafkaStore`].
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    /// Metadata, watermarks and offsets-for-times (read_committed: watermarks are stable offsets).
    pub(crate) meta: Arc<BaseConsumer>,
    admin: AdminClient<DefaultClientContext>,
    /// Partition counts of topics seen to exist.
    topics: Mutex<HashMap<String, i32>>,
    partitions: Mutex<HashMap<(String, i32), SharedPartition>>,
    /// Appends waiting for each partition's writer (see writer.rs).
    queues: Mutex<HashMap<(String, i32), Arc<writer::Queue>>>,
    /// Idle consumers for index catch-up and stream reads.
    pub(crate) readers: Mutex<Vec<rdkafka::consumer::StreamConsumer>>,
    /// Producers alive in this store (each holds librdkafka threads).
    pub(crate) live_writers: Arc<AtomicUsize>,
}

/// A librdkafka error as ours: timeouts and transport failures are `Unavailable` (retry with the
/// same ids), the rest `Backend`.
pub(crate) fn map_kafka(context: &str, e: KafkaError) -> Error {
    use RDKafkaErrorCode as C;
    let transient = matches!(
        e.rdkafka_error_code(),
        Some(
            C::OperationTimedOut
                | C::MessageTimedOut
                | C::RequestTimedOut
                | C::TimedOutQueue
                | C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::Resolve
                | C::NetworkException
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::ConcurrentTransactions
        )
    ) || matches!(&e, KafkaError::Transaction(t) if t.is_retriable());
    if transient {
        Error::Unavailable {
            backend: BACKEND,
            message: format!("{context}: {e}"),
            source: Some(Box::new(e)),
        }
    } else {
        Error::backend(BACKEND, format!("{context}: {e}"))
    }
}

pub(crate) fn unavailable(message: String) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message,
        source: None,
    }
}

/// Whether an error a consumer hands out belongs to no partition and passes by itself: librdkafka
/// forwards the client's connection trouble (and group errors: our readers carry a `group.id`
/// but never join) into the consumer queue. Reads bound their waits with timeouts anyway.
pub(crate) fn is_passing(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e,
        KafkaError::MessageConsumption(
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::Resolve
                | C::NetworkException
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::GroupAuthorizationFailed
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
        )
    )
}

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::backend(BACKEND, format!("blocking Kafka call failed: {e}")))
}

impl KafkaStore {
    /// Builds a store for a `kafka://` URL (see [`KafkaConfig::from_url`]). No request is made
    /// yet: an unreachable broker shows on the first operation, as `Unavailable`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a URL or a librdkafka setting that is refused.
    pub async fn from_url(url: &str) -> Result<Self, Error> {
        Self::connect(KafkaConfig::from_url(url)?)
    }

    /// Builds a store with `config`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a librdkafka setting that librdkafka refuses.
    pub fn connect(config: KafkaConfig) -> Result<Self, Error> {
        let refused = |e: KafkaError| Error::InvalidInput {
            what: format!("Kafka settings {config:?}"),
            reason: e.to_string(),
        };
        let meta: BaseConsumer = config.consumer().create().map_err(refused)?;
        let admin: AdminClient<DefaultClientContext> = config.admin().create().map_err(refused)?;
        Ok(Self {
            inner: Arc::new(Shared {
                meta: Arc::new(meta),
                admin,
                topics: Mutex::default(),
                partitions: Mutex::default(),
                queues: Mutex::default(),
                readers: Mutex::default(),
                live_writers: Arc::new(AtomicUsize::new(0)),
                config,
            }),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }
}

impl Shared {
    /// The partition count of `topic`, None when it does not exist. Counts are cached: a topic's
    /// partition count must never change (streams are placed by hash modulo the count).
    pub(crate) async fn partition_count(&self, topic: &str) -> Result<Option<i32>, Error> {
        if let Some(n) = self.topics.lock().expect("topics lock").get(topic) {
            return Ok(Some(*n));
        }
        let meta = self.meta.clone();
        let (t, timeout) = (topic.to_owned(), self.config.timeout);
        let md = blocking(move || meta.fetch_metadata(Some(&t), timeout))
            .await?
            .map_err(|e| map_kafka(&format!("metadata of topic {topic}"), e))?;
        let Some(found) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match found.error() {
            None if !found.partitions().is_empty() => {
                let n = found.partitions().len() as i32;
                self.topics
                    .lock()
                    .expect("topics lock")
                    .insert(topic.to_owned(), n);
                Ok(Some(n))
            }
            // Just created (or being deleted): not usable yet, as if absent.
            Some(
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
                | RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            ) => Ok(None),
            None => Ok(None),
            Some(e) => Err(unavailable(format!(
                "metadata of topic {topic}: {}",
                RDKafkaErrorCode::from(e)
            ))),
        }
    }

    /// The partition count of `topic`, creating it first when missing and allowed.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<i32, Error> {
        if let Some(n) = self.partition_count(topic).await? {
            return Ok(n);
        }
        if !self.config.create_topics {
            return Err(Error::backend(
                BACKEND,
                format!(
                    "topic {topic} does not exist and topic creation is off (create=false): create it with a fixed partition count, retention.ms=-1 and max.message.bytes >= {}",
                    self.config.max_record_bytes()
                ),
            ));
        }
        let max_bytes = self.config.max_record_bytes().to_string();
        let new = NewTopic::new(
            topic,
            self.config.partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        )
        // Events are the record of what happened: never deleted by age or size.
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1")
        .set("cleanup.policy", "delete")
        .set("message.timestamp.type", "CreateTime")
        .set("max.message.bytes", &max_bytes)
        .set("unclean.leader.election.enable", "false");
        let options = AdminOptions::new()
            .operation_timeout(Some(self.config.timeout))
            .request_timeout(Some(self.config.timeout));
        let results = self
            .admin
            .create_topics([&new], &options)
            .await
            .map_err(|e| map_kafka(&format!("creating topic {topic}"), e))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic, "photon-kafka: created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(map_kafka(
                        &format!("creating topic {name}"),
                        KafkaError::AdminOp(code),
                    ))
                }
            }
        }
        // Creation is asynchronous on the brokers: wait until the metadata shows the partitions.
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            if let Some(n) = self.partition_count(topic).await? {
                return Ok(n);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(unavailable(format!(
                    "topic {topic} was created but its partitions did not appear within {:?}",
                    self.config.timeout
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Our topics' categories, sorted.
    pub(crate) async fn categories(&self) -> Result<Vec<(String, String)>, Error> {
        let meta = self.meta.clone();
        let timeout = self.config.timeout;
        let md = blocking(move || meta.fetch_metadata(None, timeout))
            .await?
            .map_err(|e| map_kafka("listing topics", e))?;
        let mut out: Vec<(String, String)> = md
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .filter_map(|t| {
                let c = self.config.category_of(t.name())?;
                self.topics
                    .lock()
                    .expect("topics lock")
                    .entry(t.name().to_owned())
                    .or_insert(t.partitions().len() as i32);
                Some((c.to_owned(), t.name().to_owned()))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The shared state of one partition.
    pub(crate) fn partition(&self, topic: &str, p: i32) -> SharedPartition {
        self.partitions
            .lock()
            .expect("partitions lock")
            .entry((topic.to_owned(), p))
            .or_default()
            .clone()
    }

    /// The shared state of one partition and its queue of appends.
    pub(crate) fn partition_with_queue(
        &self,
        topic: &str,
        p: i32,
    ) -> (SharedPartition, Arc<writer::Queue>) {
        let queue = self
            .queues
            .lock()
            .expect("queues lock")
            .entry((topic.to_owned(), p))
            .or_default()
            .clone();
        (self.partition(topic, p), queue)
    }

    /// Drops the producers of idle partitions, oldest use first, while more than `keep` live:
    /// each producer holds librdkafka threads and a connection.
    pub(crate) fn evict_writers(&self, keep: usize) {
        if self.live_writers.load(Ordering::Relaxed) <= keep {
            return;
        }
        let states: Vec<_> = self
            .partitions
            .lock()
            .expect("partitions lock")
            .values()
            .cloned()
            .collect();
        let mut idle: Vec<_> = states
            .iter()
            .filter_map(|s| {
                let guard = s.try_lock().ok()?;
                let used = guard.producer.as_ref()?.last_used;
                Some((used, s.clone()))
            })
            .collect();
        idle.sort_by_key(|(used, _)| *used);
        for (_, s) in idle {
            if self.live_writers.load(Ordering::Relaxed) <= keep {
                break;
            }
            if let Ok(mut guard) = s.try_lock() {
                guard.producer = None;
            }
        }
    }
}

#[async_trait]
impl EventStore for KafkaStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            all_stream: true,
            subscribe_from_time: true,
            // One order per partition; partitions and topics interleave as they are fetched.
            total_order: false,
            max_event_size: self.inner.config.max_event_size,
            max_append_size: Some(self.inner.config.max_append_size),
        }
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        writer::append(&self.inner, stream, expected, events).await
    }

    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        reader::read_stream(self.inner.clone(), stream.clone(), options)
    }

    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
        subscription::subscribe(self.inner.clone(), selector, start, mode)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
        reader::stream_version(&self.inner, stream).await
    }

    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        let mut out = Vec::new();
        for (c, topic) in self.inner.categories().await? {
            // A topic exists from the first append; list it once it holds an event.
            if reader::holds_events(&self.inner, &topic).await? {
                out.push(Category::new(c)?);
            }
        }
        Ok(out)
    }

    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        let inner = self.inner.clone();
        let category = category.clone();
        stream::once(async move { reader::stream_names(&inner, &category).await })
            .flat_map(|r| match r {
                Ok(names) => stream::iter(names.into_iter().map(Ok)).boxed(),
                Err(e) => error_stream(e),
            })
            .boxed()
    }

    async fn health(&self) -> Result<Health, Error> {
        let meta = self.inner.meta.clone();
        let timeout = self.inner.config.timeout;
        let md = blocking(move || meta.fetch_metadata(None, timeout))
            .await?
            .map_err(|e| {
                map_kafka(
                    &format!("brokers {}", self.inner.config.bootstrap_servers),
                    e,
                )
            })?;
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
}
