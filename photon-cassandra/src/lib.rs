#![doc = include_str!("../README.md")]

// The rooms every backend crate has: settings, the connection and shared state, typed errors,
// the append protocol, reads, subscriptions and the stored form; plus `schema`, the keyspace's
// tables and statements (public, so tools create and read exactly what the store does), and
// `durability`, what the cluster's settings mean for an acknowledged append in a crash, and
// `register`, the registers (a value a save replaces, not an event), and `indexer`, an append's
// category rows written after its caller has its answer. This root only names the
// store and delegates to them.
mod client;
mod codec;
mod config;
mod durability;
mod error;
mod indexer;
mod reader;
mod register;
pub mod schema;
mod subscription;
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

pub use crate::client::{session_builder, BACKEND, COMMITS_PER_PAGE};
use crate::client::{Shared, TELEMETRY};
pub use crate::config::{CassandraConfig, Replication, SCHEME, SCHEMES};

/// The event store on Apache Cassandra (tested on Cassandra 5.0; ScyllaDB untested). Clones
/// share one session.
#[derive(Clone)]
pub struct CassandraStore {
    inner: Arc<Shared>,
}

impl fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CassandraStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl CassandraStore {
    /// Builds a store for a `cassandra://` URL (see [`CassandraConfig::from_url`]). Nothing is
    /// contacted yet: the first operation connects, creates the schema when allowed, and reports
    /// an unreachable cluster as `Unavailable`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a URL that is refused.
    pub async fn from_url(url: &str) -> Result<Self, Error> {
        Ok(Self::new(CassandraConfig::from_url(url)?))
    }

    /// A store with `config`.
    pub fn new(config: CassandraConfig) -> Self {
        Self {
            inner: Arc::new(Shared::new(config)),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &CassandraConfig {
        &self.inner.config
    }

    /// What this store's per-process cache of stream metadata (each stream's head, last time
    /// and latest event ids, for appends without a read) holds, in bytes, about: so its memory
    /// can be watched. It is bounded whatever the streams' lengths (see the README, "Limits").
    pub fn stream_cache_bytes(&self) -> usize {
        self.inner.stream_cache_bytes()
    }

    /// For tests of the clock-skew check: this store's clock reads `offset_ms` ahead of the
    /// machine's (behind it when negative), as a machine whose clock is off would. Every time
    /// the store reads (its appends' time ids, its readers' horizon) moves with it.
    pub fn set_clock_offset_ms(&self, offset_ms: i64) {
        self.inner.set_clock_offset_ms(offset_ms);
    }

    /// For tests of the repair path: while on, every append stops right after its commit row is
    /// written, before the category rows are, and reports an error, as if the process had died
    /// there. Readers then find the append's pending marker and repair it.
    pub fn set_crash_after_commit(&self, on: bool) {
        self.inner.set_crash_after_commit(on);
    }
}

#[async_trait]
impl EventStore for CassandraStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            all_stream: true,
            subscribe_from_time: true,
            // Category and all rows are ordered by time id, and readers never pass a time that
            // may still receive a commit (settle delay, pending markers).
            total_order: true,
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
        let append = self.inner.append(stream, expected, events, &attempts);
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
        self.inner.stream_version(stream).await
    }

    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        self.inner.list_categories().await
    }

    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        reader::list_streams(self.inner.clone(), category.clone())
    }

    async fn health(&self) -> Result<Health, Error> {
        self.inner.health().await
    }

    /// One serial (Paxos) read of the register's row: linearizable, so a save acknowledged to
    /// any client before the call is seen (README, "Registers").
    async fn load_register(&self, name: &str) -> Result<Option<Register>, Error> {
        self.inner.load_register(name).await
    }

    /// One conditional write of the register's row, overwritten in place: storage does not grow
    /// with saves, and a refusal carries what decides a re-send (README, "Registers").
    async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error> {
        self.inner
            .save_register(name, expected, save_id, value)
            .await
    }
}
