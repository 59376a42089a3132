#![doc = include_str!("../README.md")]

// The rooms every backend crate has: settings, shared state, typed errors, the append
// protocol, reads, subscriptions and the record codec. This root only names the store and
// delegates to them.
mod client;
mod codec;
mod config;
mod error;
mod faults;
mod reader;
mod register;
mod subscription;
mod writer;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use photon_api::{
    AppendResult, Bytes, Capabilities, Category, Error, EventData, EventStore, ExpectedVersion,
    Health, ReadOptions, RecordedEvent, Register, Selector, Start, StreamId, SubscriptionBatch,
    SubscriptionItem, SubscriptionMode, Uuid, Version,
};

pub use crate::client::BACKEND;
use crate::client::{Shared, TELEMETRY};
pub use crate::config::{Faults, MemoryConfig, SCHEME, SCHEMES};

/// Builds a [`MemoryStore`] from code or from a `memory://` URL.
#[derive(Clone, Debug, Default)]
pub struct MemoryStoreBuilder {
    config: MemoryConfig,
}

impl MemoryStoreBuilder {
    /// Reads options from a URL: `memory://`, `memory://?max_event_size=<bytes>`, and the fault
    /// options that play a production store's weaker guarantees (`faults=production`, `seed`,
    /// `partitions`, `delivery_delay_ms`, `unavailable_after`, `unavailable_before`,
    /// `subscription_drop`; see [`Faults`] and the crate docs).
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, a host or path, an unknown or repeated
    ///   option, or a value out of its option's range, naming the option.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        Ok(Self {
            config: MemoryConfig::from_url(url)?,
        })
    }

    /// Sets the largest event accepted.
    pub fn max_event_size(mut self, bytes: usize) -> Self {
        self.config.max_event_size = bytes;
        self
    }

    /// Plays a production store's weaker guarantees ([`Faults`]) instead of the strong default
    /// ones, so an application's tests meet them before production does.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.config.faults = Some(faults);
        self
    }

    /// A new, empty store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            shared: Arc::new(Shared::new(self.config)),
        }
    }
}

/// The in-process event store. Clones are separate clients of the same data.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl MemoryStore {
    /// A new, empty store with default settings.
    pub fn new() -> Self {
        MemoryStoreBuilder::default().build()
    }

    /// A builder, for settings.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// A new store configured by a `memory://` URL.
    ///
    /// # Errors
    /// - As [`MemoryStoreBuilder::from_url`].
    pub fn from_url(url: &str) -> Result<Self, Error> {
        Ok(MemoryStoreBuilder::from_url(url)?.build())
    }

    /// The settings in force.
    pub fn config(&self) -> &MemoryConfig {
        &self.shared.config
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("events", &reader::len(&self.shared))
            .field("config", &self.shared.config)
            .finish()
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            all_stream: true,
            subscribe_from_time: true,
            // Partitions order category and all subscriptions per partition only, as Kafka.
            total_order: self
                .shared
                .config
                .faults
                .as_ref()
                .is_none_or(|f| f.partitions.is_none()),
            max_event_size: self.shared.config.max_event_size,
            max_append_size: None,
        }
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        let probe = TELEMETRY.append(stream, &events);
        let result = {
            // Synchronous: the span is entered for the call, no future to instrument.
            let _entered = probe.span().enter();
            match &self.shared.faults {
                None => writer::append(&self.shared, stream, expected, events),
                Some(faults) => faults::append(&self.shared, faults, stream, expected, events),
            }
        };
        probe.finish(&result, 1);
        result
    }

    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        TELEMETRY.read(
            stream,
            &options,
            reader::read_stream(&self.shared, stream, options),
        )
    }

    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
        match &self.shared.faults {
            None => subscription::subscribe(&self.shared, selector, start, mode),
            Some(faults) => faults::subscribe(&self.shared, faults, selector, start, mode),
        }
    }

    fn subscribe_batches(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
        max_batch: usize,
    ) -> BoxStream<'static, Result<SubscriptionBatch, Error>> {
        match &self.shared.faults {
            None => subscription::subscribe_batches(&self.shared, selector, start, mode, max_batch),
            // Faults act on single items (a dropped subscription after an event, a weak
            // order): batches are gathered from those.
            Some(_) => photon_api::batched(max_batch, || self.subscribe(selector, start, mode)),
        }
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
        Ok(reader::stream_version(&self.shared, stream))
    }

    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        reader::list_categories(&self.shared)
    }

    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        reader::list_streams(&self.shared, category)
    }

    async fn health(&self) -> Result<Health, Error> {
        Ok(Health {
            backend: BACKEND,
            detail: format!(
                "in-process store holding {} events",
                reader::len(&self.shared)
            ),
        })
    }

    async fn load_register(&self, name: &str) -> Result<Option<Register>, Error> {
        register::load(&self.shared, name)
    }

    async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error> {
        register::save(&self.shared, name, expected, save_id, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::SMALL_PAYLOAD;
    use futures::StreamExt;
    use photon_api::{ContentType, EventType, Payload};

    #[tokio::test]
    async fn retries_and_payloads_survive_compact_storage() {
        let store = MemoryStore::new();
        let stream = StreamId::parse("acc-1").unwrap();
        let event = |len: usize| {
            EventData::new(
                EventType::new("T").unwrap(),
                Payload::raw(ContentType::Json, vec![b'7'; len]),
            )
        };
        // Payloads around the copy threshold and beyond one shared buffer, in batches of
        // several sizes.
        let sizes = [
            0,
            1,
            SMALL_PAYLOAD - 1,
            SMALL_PAYLOAD,
            SMALL_PAYLOAD + 1,
            100_000,
        ];
        let mut batches = Vec::new();
        for (i, len) in sizes.iter().cycle().take(40).enumerate() {
            let batch: Vec<EventData> = (0..=i % 4).map(|_| event(*len)).collect();
            let r = store
                .append(&stream, ExpectedVersion::Any, batch.clone())
                .await
                .unwrap();
            batches.push((batch, r));
        }
        for (batch, first) in &batches {
            let again = store
                .append(&stream, ExpectedVersion::NoStream, batch.clone())
                .await
                .unwrap();
            assert_eq!(&again, first);
        }
        let read: Vec<RecordedEvent> = store
            .read_stream(&stream, ReadOptions::forwards())
            .map(Result::unwrap)
            .collect()
            .await;
        let written: Vec<&EventData> = batches.iter().flat_map(|(b, _)| b).collect();
        assert_eq!(read.len(), written.len());
        for (r, w) in read.iter().zip(&written) {
            assert_eq!(r.event_id, w.event_id);
            assert_eq!(r.payload, w.payload);
            assert_eq!(r.metadata, w.metadata);
        }
    }

    #[test]
    fn store_from_url() {
        let store = MemoryStore::from_url("memory://?max_event_size=10").unwrap();
        assert_eq!(store.config().max_event_size, 10);
        assert!(MemoryStore::from_url("memory://?max_event_size=0").is_err());
    }
}
