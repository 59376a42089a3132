#![doc = include_str!("../README.md")]

// The rooms every backend crate has: settings, connection and shared state, typed errors, the
// append protocol, reads and listings, subscriptions and the record codec. Kafka adds two: the
// version index of a partition (Kafka cannot find a stream's records by itself) and the
// checkpoint layout (partition offsets), beside the codec; and registers (register.rs), kept in
// a compacted topic of their own. This root only names the store and delegates to them.
mod client;
mod codec;
mod config;
mod error;
mod index;
mod position;
mod reader;
mod register;
mod subscription;
mod topic;
mod writer;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use photon_api::telemetry::Attempts;
use photon_api::{
    AppendResult, Bytes, Capabilities, Category, Error, EventData, EventStore, ExpectedVersion,
    Health, ReadOptions, RecordedEvent, Register, Selector, Start, StreamId, SubscriptionItem,
    SubscriptionMode, Uuid, Version,
};

pub use crate::client::BACKEND;
use crate::client::{Shared, TELEMETRY};
pub use crate::codec::header;
pub use crate::config::{KafkaConfig, SCHEME, SCHEMES};
pub use crate::topic::TopicRefused;
pub use crate::writer::commit_delivered;

/// The partition of `stream` in a topic of `partitions` partitions (the README's partitioning
/// rule: Kafka's murmur2 of the key), for tools that read or route a stream's records themselves.
pub fn partition_for(stream: &StreamId, partitions: i32) -> i32 {
    codec::partition_for(stream, partitions)
}

/// How a store's writers are doing, for an operator's dashboard: a take-over costs an
/// `init_transactions` and a catch-up read, so a count that keeps rising under a steady load from
/// one process means producers are being closed and re-initialised (see `max_producers`) or
/// processes take partitions from each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterStats {
    /// Transactional producers alive in this store: one per partition it holds, those
    /// initialised ahead of a first append to their partition (`warm_producers`), and one per
    /// registers fence (partition and bucket of names) it holds; together within
    /// `max_producers`.
    pub producers: usize,
    /// Partitions taken over (a producer initialised, now or ahead of time, then the partition
    /// read to its stable end) since the store was built, registers partitions included.
    pub take_overs: u64,
    /// Partition states (version index and producer) dropped to keep the indexes within
    /// `max_index_bytes`; each is rebuilt by reading its partition when used again, so a count
    /// that keeps rising means the bound is below what this process works on.
    pub indexes_dropped: u64,
    /// What the version indexes hold now, bytes (the estimate `max_index_bytes` bounds): how
    /// much of the partitions this store works on it keeps in memory.
    pub index_bytes: usize,
}

/// The event store on Apache Kafka. Clones share clients, topic metadata and version indexes.
#[derive(Clone)]
pub struct KafkaStore {
    inner: Arc<Shared>,
    /// The registers topic's fences and what was read of it (register.rs).
    registers: Arc<register::Registers>,
}

impl fmt::Debug for KafkaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaStore")
            .field("config", &self.inner.config)
            .finish()
    }
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
        Ok(Self {
            inner: Arc::new(Shared::connect(config)?),
            registers: Arc::default(),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The latest save of register `name` (see [`EventStore::load_register`]), read from the
    /// registers topic (`<prefix>.photon-registers`, compacted) up to the stable end of the
    /// name's partition as of the call, so it sees every save acknowledged before, by any
    /// process. What a store read of a partition is kept (each register's revision, save id
    /// and offset, never its value), so a load reads only what was committed since, then the
    /// value from its record's offset; a partition is read in full (after compaction, about one
    /// record per register) when one of its registers is first used.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a name [`photon_api::validate_register`] refuses (nothing is
    ///   asked of the brokers).
    /// - [`Error::Unavailable`] when the brokers do not answer within three `timeout_ms`.
    /// - [`Error::Backend`] with a [`TopicRefused`] source for a registers topic that is not
    ///   compacted, has finite retention where it deletes, a changed partition count or records
    ///   too small for the largest value.
    /// - [`Error::Backend`] naming the partition and offset for a record in the name's
    ///   partition that is not a register save (a tombstone, a future format, another tool's),
    ///   and for a partition that ends below where this store had read it (the topic was
    ///   deleted and made again; the next call reads the new one).
    pub async fn load_register(&self, name: &str) -> Result<Option<Register>, Error> {
        self.registers.load(&self.inner, name).await
    }

    /// Saves `value` as register `name`'s next revision if it is at `expected` (see
    /// [`EventStore::save_register`]). Kafka has no compare-and-set: the save takes the fence
    /// of the name's partition of the registers topic and bucket of names (a transactional
    /// producer with the id `photon.<prefix>.photon-registers.<partition>.<bucket>`, whose
    /// `init_transactions` fences any other process's), reads the partition to its stable end,
    /// checks `expected` and commits the record in a transaction; it answers once the record is
    /// readable. While a store holds the fence its own saves of that bucket's names need no
    /// read first; a store that lost it learns so when its commit fails, and reads and decides
    /// again.
    ///
    /// # Errors
    /// - [`Error::RevisionConflict`] when `expected` does not hold (decided against every
    ///   committed save).
    /// - [`Error::InvalidInput`] for a name, value or save id
    ///   [`photon_api::validate_register`] refuses (nothing is sent).
    /// - [`Error::Unavailable`] when the outcome is unknown (the brokers did not answer, a
    ///   commit timed out, the save was committed but not readable in time): re-send with the
    ///   same `save_id`.
    /// - [`Error::Backend`] with a [`TopicRefused`] source as for [`KafkaStore::load_register`].
    pub async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error> {
        self.registers
            .save(&self.inner, name, expected, save_id, value)
            .await
    }

    /// Producers alive and take-overs so far (see [`WriterStats`]).
    pub fn writer_stats(&self) -> WriterStats {
        use std::sync::atomic::Ordering::Relaxed;
        WriterStats {
            producers: self.inner.live_writers.load(Relaxed),
            take_overs: self.inner.take_overs.load(Relaxed),
            indexes_dropped: self.inner.indexes_dropped.load(Relaxed),
            index_bytes: self.inner.index_bytes.get(),
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
        let (probe, attempts) = (TELEMETRY.append(stream, &events), Attempts::default());
        let append = writer::append(&self.inner, stream, expected, events, &attempts);
        probe.run(append, &attempts).await
    }

    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        TELEMETRY.read(
            stream,
            &options,
            reader::read_stream(self.inner.clone(), stream.clone(), options),
        )
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
        reader::list_categories(&self.inner).await
    }

    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        reader::list_streams(self.inner.clone(), category.clone())
    }

    async fn health(&self) -> Result<Health, Error> {
        self.inner.health().await
    }

    /// Forwards to [`KafkaStore::load_register`]: the compacted registers topic, read to the
    /// partition's stable end.
    async fn load_register(&self, name: &str) -> Result<Option<Register>, Error> {
        KafkaStore::load_register(self, name).await
    }

    /// Forwards to [`KafkaStore::save_register`]: fenced by the partition's transactional id,
    /// checked against every committed save, written in a transaction.
    async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error> {
        KafkaStore::save_register(self, name, expected, save_id, value).await
    }
}
