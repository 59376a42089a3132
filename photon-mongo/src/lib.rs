#![doc = include_str!("../README.md")]

// The rooms every backend crate has: settings, the connection and shared state, typed errors,
// the append protocol, reads, subscriptions, registers and the document codec. This root only
// names the store and delegates to them.
mod client;
mod codec;
mod config;
mod error;
mod reader;
mod register;
mod sequencer;
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

pub use crate::client::{
    client_options, commit_indexes, idempotency_index, register_indexes, BACKEND, IDS_BY_INDEX,
    IDS_LOOKED_UP, MAX_APPEND_SIZE,
};
use crate::client::{Shared, TELEMETRY};
pub use crate::config::{MongoConfig, SCHEME, SCHEMES};

/// The event store on MongoDB. Clones share one connection pool.
#[derive(Clone)]
pub struct MongoStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoStore")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl MongoStore {
    /// Connects lazily to the server of a `mongodb://` URL (see [`MongoConfig::from_url`]); the
    /// first operation creates the collections and indexes when allowed.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a URL the driver or we refuse.
    pub async fn from_url(url: &str) -> Result<Self, Error> {
        Self::connect(MongoConfig::from_url(url)?).await
    }

    /// Connects with `config`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a connection string the driver refuses.
    pub async fn connect(config: MongoConfig) -> Result<Self, Error> {
        Ok(Self {
            shared: Arc::new(Shared::connect(config).await?),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &MongoConfig {
        &self.shared.config
    }

    /// The latest save of register `name` (see [`EventStore::load_register`]), read from the
    /// primary with read concern `linearizable` (bounded by `maxTimeMS`) in
    /// `<prefix>_registers`, apart from the commits.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a name `photon_api::validate_register` refuses, or a
    ///   missing `name_revision` index with `photon_create=false`.
    /// - [`Error::Unavailable`] when the server does not answer within `photon_timeout_ms`.
    pub async fn load_register(&self, name: &str) -> Result<Option<Register>, Error> {
        register::load(&self.shared, name).await
    }

    /// Saves register `name` if it is at `expected` (see [`EventStore::save_register`]): an
    /// insert at the next revision that the unique index `name_revision` decides, because a
    /// conditional update is not atomic on every server this store runs on (FerretDB); the
    /// README's "Registers" says why it is correct.
    ///
    /// # Errors
    /// - [`Error::RevisionConflict`] with the latest revision when `expected` does not hold.
    /// - [`Error::InvalidInput`] for a name or value `photon_api::validate_register` refuses.
    /// - [`Error::AccessDenied`] at the first save of a store whose user may not delete from
    ///   `<prefix>_registers` (old revisions could never be deleted; see the README).
    /// - [`Error::Unavailable`] when the outcome is unknown (no answer in time, a lost
    ///   connection, a write-concern error, a step-down); re-send with the same `save_id`.
    pub async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error> {
        register::save(&self.shared, name, expected, save_id, value).await
    }
}

#[async_trait]
impl EventStore for MongoStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            all_stream: true,
            subscribe_from_time: true,
            total_order: true,
            max_event_size: self.shared.config.max_event_size,
            max_append_size: Some(MAX_APPEND_SIZE),
        }
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        let (probe, attempts) = (TELEMETRY.append(stream, &events), Attempts::default());
        let append = writer::append(&self.shared, stream, expected, events, &attempts);
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
            reader::read_stream(self.shared.clone(), stream.clone(), options),
        )
    }

    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
        subscription::subscribe(self.shared.clone(), selector, start, mode)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
        reader::stream_version(&self.shared, stream).await
    }

    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        reader::list_categories(&self.shared).await
    }

    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        reader::list_streams(self.shared.clone(), category.clone())
    }

    async fn health(&self) -> Result<Health, Error> {
        self.shared.health().await
    }

    async fn load_register(&self, name: &str) -> Result<Option<Register>, Error> {
        MongoStore::load_register(self, name).await
    }

    async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error> {
        MongoStore::save_register(self, name, expected, save_id, value).await
    }
}
