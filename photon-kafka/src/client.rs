//! The connection and the state every clone of a store shares: the metadata and admin clients,
//! the partition counts of topics seen, each partition's version index and writer, the queues of
//! appends, and the pool of idle readers. Topics are looked up and created here.
//!
//! This module owns those maps and their locks; it decides nothing about what an append or a
//! read means (writer.rs, reader.rs), and it never reaches up into the crate root.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use photon_api::{Error, Health};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaRespErr;

use crate::config::KafkaConfig;
use crate::error::{self, Fault};
use crate::index::PartitionIndex;
use crate::writer::{Queue, Writer};

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "kafka";

/// Idle reader consumers kept for the next read; more are closed (each holds librdkafka threads).
pub(crate) const MAX_POOLED_READERS: usize = 8;

/// How often topic creation looks for the new topic's partitions in the metadata.
const TOPIC_POLL: Duration = Duration::from_millis(50);

/// What one partition's writer and readers share within this store.
#[derive(Default)]
pub(crate) struct PartitionState {
    pub(crate) index: PartitionIndex,
    /// The transactional producer while this store is the partition's writer.
    pub(crate) producer: Option<Writer>,
}

/// One partition's state, locked while an append or a catch-up runs.
pub(crate) type SharedPartition = Arc<tokio::sync::Mutex<PartitionState>>;

/// Everything behind a store and its clones.
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    /// Metadata, watermarks and offsets-for-times (read_committed: watermarks are stable offsets).
    pub(crate) meta: Arc<BaseConsumer>,
    admin: AdminClient<DefaultClientContext>,
    /// Partition counts of topics seen to exist.
    topics: Mutex<HashMap<String, i32>>,
    partitions: Mutex<HashMap<(String, i32), SharedPartition>>,
    /// Appends waiting for each partition's writer (see writer.rs).
    queues: Mutex<HashMap<(String, i32), Arc<Queue>>>,
    /// Idle consumers for index catch-up and stream reads.
    pub(crate) readers: Mutex<Vec<StreamConsumer>>,
    /// Producers alive in this store (each holds librdkafka threads).
    pub(crate) live_writers: Arc<AtomicUsize>,
}

impl Shared {
    /// Builds the metadata and admin clients. No request is made yet.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a librdkafka setting that librdkafka refuses.
    pub(crate) fn connect(config: KafkaConfig) -> Result<Self, Error> {
        let refused = |e| error::refused_settings(&config, e);
        let meta: BaseConsumer = config.consumer_config().create().map_err(refused)?;
        let admin = config.client_config().create().map_err(refused)?;
        Ok(Self {
            meta: Arc::new(meta),
            admin,
            topics: Mutex::default(),
            partitions: Mutex::default(),
            queues: Mutex::default(),
            readers: Mutex::default(),
            live_writers: Arc::new(AtomicUsize::new(0)),
            config,
        })
    }

    /// The cluster's metadata, of one topic or of all; `context` says why it is asked for.
    async fn metadata(&self, topic: Option<&str>, context: String) -> Result<Metadata, Error> {
        let meta = self.meta.clone();
        let (topic, timeout) = (topic.map(str::to_owned), self.config.timeout);
        blocking(move || meta.fetch_metadata(topic.as_deref(), timeout))
            .await?
            .map_err(|e| error::from_kafka(context, e))
    }

    /// The partition count of `topic`, None when it does not exist. Counts are cached: a topic's
    /// partition count must never change (streams are placed by hash modulo the count).
    pub(crate) async fn partition_count(&self, topic: &str) -> Result<Option<i32>, Error> {
        if let Some(n) = self.topics.lock().expect("topics lock").get(topic) {
            return Ok(Some(*n));
        }
        let context = format!("fetching the metadata of topic {topic}");
        let md = self.metadata(Some(topic), context).await?;
        let Some(found) = md.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match found.error() {
            None if !found.partitions().is_empty() => {
                let n = found.partitions().len() as i32;
                self.remember(topic, n);
                Ok(Some(n))
            }
            // Just created (or being deleted): not usable yet, as if absent.
            Some(
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART
                | RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            ) => Ok(None),
            None => Ok(None),
            Some(e) => Err(Error::unavailable(
                BACKEND,
                format!("the metadata of topic {topic} reports an error"),
                KafkaError::MetadataFetch(RDKafkaErrorCode::from(e)),
            )),
        }
    }

    fn remember(&self, topic: &str, partitions: i32) {
        self.topics
            .lock()
            .expect("topics lock")
            .entry(topic.to_owned())
            .or_insert(partitions);
    }

    /// The partition count of `topic`, creating it first when missing and allowed.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<i32, Error> {
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
        let replication = TopicReplication::Fixed(self.config.replication_factor);
        let settings = self.config.topic_settings();
        let new = settings.iter().fold(
            NewTopic::new(topic, self.config.partitions, replication),
            |new, (key, value)| new.set(key, value),
        );
        let options = AdminOptions::new()
            .operation_timeout(Some(self.config.timeout))
            .request_timeout(Some(self.config.timeout));
        let context = format!("creating topic {topic}");
        let results = self
            .admin
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

    /// Creation is asynchronous on the brokers: waits until the metadata shows the partitions.
    async fn wait_for_partitions(&self, topic: &str) -> Result<i32, Error> {
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

    /// Our topics' categories with their topics, sorted.
    pub(crate) async fn categories(&self) -> Result<Vec<(String, String)>, Error> {
        let md = self.metadata(None, "listing topics".into()).await?;
        let mut out: Vec<(String, String)> = md
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .filter_map(|t| {
                let c = self.config.category_of(t.name())?;
                self.remember(t.name(), t.partitions().len() as i32);
                Some((c.to_owned(), t.name().to_owned()))
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

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(error::blocking_failed)
}
