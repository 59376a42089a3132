//! The `EventStore` trait: the contract every backend keeps.
//!
//! Few required methods, all usable through `Arc<dyn EventStore>`; reads return boxed streams so
//! a trait object can hand them out. Convenience lives in [`EventStoreExt`].

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use bytes::Bytes;
use uuid::Uuid;

use crate::checkpoint::Checkpoint;
use crate::error::Error;
use crate::event::{EventData, RecordedEvent};
use crate::register::Register;
use crate::stream_id::{Category, StreamId};
use crate::subscription::{
    ReadOptions, Selector, Start, SubscriptionBatch, SubscriptionItem, SubscriptionMode,
};
use crate::version::{ExpectedVersion, Version};

/// What a backend can and cannot do; the conformance suite reads this to decide what to run, and
/// callers read it instead of discovering gaps at run time.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Capabilities {
    /// `Selector::All` works.
    pub all_stream: bool,
    /// `Start::Time` works.
    pub subscribe_from_time: bool,
    /// Category and all subscriptions deliver one total order that every subscriber sees the same
    /// (otherwise only per-stream order is promised, e.g. across Kafka partitions).
    pub total_order: bool,
    /// The largest event accepted, as [`EventData::size`] counts.
    pub max_event_size: usize,
    /// The largest batch one append stores atomically (sum of event sizes); None: no limit
    /// beyond memory.
    pub max_append_size: Option<usize>,
}

/// The outcome of a successful append.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AppendResult {
    /// Version of the batch's first event.
    pub first_version: Version,
    /// Version of the batch's last event: the stream's version after the append (for a retried
    /// batch, after the original append).
    pub last_version: Version,
    /// One checkpoint per event, in batch order.
    pub checkpoints: Vec<Checkpoint>,
}

impl AppendResult {
    /// The expected version to pass for the next append to this stream.
    pub fn next_expected(&self) -> ExpectedVersion {
        ExpectedVersion::Exact(self.last_version)
    }
}

/// A readiness report.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Health {
    /// Which backend answered.
    pub backend: &'static str,
    /// What was checked, e.g. the broker or cluster that answered.
    pub detail: String,
}

/// An event store: append with optimistic concurrency, read one stream, subscribe to streams,
/// categories or everything.
///
/// Implementations are cheap to share (`Arc<dyn EventStore>`) and safe to call concurrently.
#[async_trait]
pub trait EventStore: Send + Sync + fmt::Debug + 'static {
    /// The backend's name, also the tag of its checkpoints (`memory`, `kafka`, ...).
    fn backend(&self) -> &'static str;

    /// What this backend offers.
    fn capabilities(&self) -> Capabilities;

    /// Appends `events` to `stream` as one atomic batch.
    ///
    /// # Behavior
    /// - Returns only once the events are durable by the backend's strongest ordinary setting.
    /// - All events of the batch become visible together, to every read and subscription, or none.
    /// - `expected` is checked atomically with the write; versions continue contiguously.
    /// - A retry of a batch that already landed (exactly the ids of one earlier append to this
    ///   stream, in order) stores nothing and returns the original versions, whatever `expected`
    ///   says. Event ids are the idempotency key within one stream.
    /// - The store adds the events to their category stream (and the all stream) itself.
    ///
    /// # Errors
    /// - [`Error::WrongExpectedVersion`] with the actual version when `expected` does not hold.
    /// - [`Error::IdempotencyConflict`] when some ids are stored but the batch is not exactly one
    ///   earlier append (a prefix, a run spanning two appends, new ids mixed in).
    /// - [`Error::InvalidInput`] for an empty batch or ids that repeat or are nil.
    /// - [`Error::EventTooLarge`] for an event over `Capabilities::max_event_size`.
    /// - [`Error::BatchTooLarge`] for a batch over `Capabilities::max_append_size`.
    /// - [`Error::Unavailable`] when the backend does not answer in time (retry with the same ids).
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<crate::AppendResult, Error>;

    /// Reads one aggregate stream.
    ///
    /// # Behavior
    /// - Events come in version order (descending for `Backwards`), starting at `options.from`
    ///   inclusive, at most `options.limit` of them.
    /// - A stream that does not exist reads as empty.
    /// - The stream is lazy and pulls as it is polled: a long stream does not fill memory.
    ///
    /// # Errors
    /// - [`Error::Unavailable`] as an item when the backend fails mid-read.
    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>>;

    /// Subscribes to one stream, a category or everything.
    ///
    /// # Behavior
    /// - `Cold`: from `start` up to the head as of the call (remote backends: as of the first
    ///   poll), then the stream ends.
    /// - `HotCold` sends `CaughtUp` once it has delivered the history as of the call, even while
    ///   writers keep appending faster than the consumer reads.
    /// - `Hot`: `CaughtUp` once live, then only events stored after the start. Every append that
    ///   returns Ok after the consumer received `CaughtUp` is delivered, including appends in
    ///   flight when the subscription started; a backend that cannot tell which stored appends
    ///   have not answered yet bounds how late a writer may answer Ok and says `CaughtUp` only
    ///   after that bound ([`crate::now_start_wait`]), delivering what arrives meanwhile
    ///   before it.
    /// - `HotCold`: replay from `start`, `CaughtUp` once at the head, then live; no event missed
    ///   or repeated at the switch, even with writers running.
    /// - Per-stream order always holds; each event carries the checkpoint to resume the same
    ///   selector after it (checkpoints from `append` and `read_stream` resume that stream, and
    ///   any selector where `Capabilities::total_order` holds).
    /// - Pull-based: a slow consumer slows the subscription, memory does not grow with backlog.
    ///
    /// # Errors
    /// - [`Error::ForeignCheckpoint`] as the first item for another backend's checkpoint.
    /// - [`Error::InvalidInput`] as the first item for `Hot` with a start other than `Now`.
    /// - [`Error::Unsupported`] as the first item for a selector or start the backend lacks.
    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>>;

    /// Subscribes as [`EventStore::subscribe`] does, with the same guarantees and errors, and
    /// delivers the events in batches of up to `max_batch`: for replays and views that read
    /// many events, which then pay once per batch what `subscribe` pays per event.
    ///
    /// # Behavior
    /// - The events, `CaughtUp` and the first error come in the order `subscribe` gives them;
    ///   a batch is never empty and never spans `CaughtUp`.
    /// - A batch holds events that are ready without waiting, at most `max_batch` of them and
    ///   possibly fewer (photon-memory's hold at most one fetch of its log, 256 events): a live
    ///   subscription hands out each event as soon as `subscribe` would, not when a batch fills.
    /// - Events a batch delivered before an error were delivered; the error comes after them.
    ///
    /// Backends override it where they can build batches directly (photon-memory); the
    /// default gathers `subscribe`'s items.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] as the first item for `max_batch` 0.
    /// - As [`EventStore::subscribe`].
    fn subscribe_batches(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
        max_batch: usize,
    ) -> BoxStream<'static, Result<SubscriptionBatch, Error>> {
        crate::opener::batched(max_batch, || self.subscribe(selector, start, mode))
    }

    /// The version of the stream's last event; None when the stream does not exist.
    ///
    /// # Errors
    /// - [`Error::Unavailable`] when the backend does not answer.
    async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error>;

    /// Every category with at least one event, sorted by name.
    ///
    /// # Errors
    /// - [`Error::Unavailable`] when the backend does not answer.
    async fn list_categories(&self) -> Result<Vec<Category>, Error>;

    /// Every stream of `category` with at least one event, sorted by name, lazily.
    ///
    /// # Errors
    /// - [`Error::Unavailable`] as an item when the backend does not answer.
    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>>;

    /// Checks that the backend answers a real request.
    ///
    /// # Errors
    /// - [`Error::Unavailable`] naming the address and what failed.
    async fn health(&self) -> Result<Health, Error>;

    /// The latest save of register `name` (see [`crate::Register`]); None when never saved.
    ///
    /// # Behavior
    /// - Sees every save acknowledged before the call began, by any client: a register is read
    ///   where its saves are decided, never from a replica that may lag.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a name [`crate::validate_register`] refuses.
    /// - [`Error::Unavailable`] when the backend does not answer.
    async fn load_register(&self, name: &str) -> Result<Option<Register>, Error>;

    /// Replaces register `name`'s value with `value` if its revision is `expected` (None: never
    /// saved); returns the new revision (0 for the first save, one more for each after it).
    ///
    /// A view's checkpoint or a lease is saved this way rather than appended as an event, so it
    /// takes the same storage after a million saves as after one.
    ///
    /// # Behavior
    /// - Checked atomically with the write: of concurrent saves expecting one revision, exactly
    ///   one is stored.
    /// - Only the latest save is kept. A backend may hold a replaced value for a while before it
    ///   reclaims the space (Kafka's log compaction), but never returns it.
    /// - Durable as an append is before it returns.
    /// - A re-send of the latest save (the same `save_id` and `expected`) after an unknown outcome
    ///   stores nothing and returns that save's revision.
    /// - Registers are not events: no stream, category, subscription or listing shows them.
    ///
    /// # Errors
    /// - [`Error::RevisionConflict`] with the revision found when `expected` does not hold
    ///   (including a re-send of a save that another save has since replaced).
    /// - [`Error::InvalidInput`] for a name or value [`crate::validate_register`] refuses, or a
    ///   nil `save_id`; nothing is stored.
    /// - [`Error::Unavailable`] when the backend does not answer: the save may or may not be
    ///   stored; re-send it with the same `save_id`.
    async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error>;
}

macro_rules! forward_event_store {
    ($ty:ty) => {
        #[async_trait]
        impl<T: EventStore + ?Sized> EventStore for $ty {
            fn backend(&self) -> &'static str {
                (**self).backend()
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            async fn append(
                &self,
                stream: &StreamId,
                expected: ExpectedVersion,
                events: Vec<EventData>,
            ) -> Result<AppendResult, Error> {
                (**self).append(stream, expected, events).await
            }
            fn read_stream(
                &self,
                stream: &StreamId,
                options: ReadOptions,
            ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
                (**self).read_stream(stream, options)
            }
            fn subscribe(
                &self,
                selector: Selector,
                start: Start,
                mode: SubscriptionMode,
            ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
                (**self).subscribe(selector, start, mode)
            }
            fn subscribe_batches(
                &self,
                selector: Selector,
                start: Start,
                mode: SubscriptionMode,
                max_batch: usize,
            ) -> BoxStream<'static, Result<SubscriptionBatch, Error>> {
                (**self).subscribe_batches(selector, start, mode, max_batch)
            }
            async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
                (**self).stream_version(stream).await
            }
            async fn list_categories(&self) -> Result<Vec<Category>, Error> {
                (**self).list_categories().await
            }
            fn list_streams(
                &self,
                category: &Category,
            ) -> BoxStream<'static, Result<StreamId, Error>> {
                (**self).list_streams(category)
            }
            async fn health(&self) -> Result<Health, Error> {
                (**self).health().await
            }
            async fn load_register(&self, name: &str) -> Result<Option<Register>, Error> {
                (**self).load_register(name).await
            }
            async fn save_register(
                &self,
                name: &str,
                expected: Option<u64>,
                save_id: Uuid,
                value: Bytes,
            ) -> Result<u64, Error> {
                (**self).save_register(name, expected, save_id, value).await
            }
        }
    };
}

forward_event_store!(Arc<T>);
forward_event_store!(Box<T>);

/// Conveniences on top of [`EventStore`], for every store including `dyn EventStore`.
#[async_trait]
pub trait EventStoreExt: EventStore {
    /// Reads a stream into a vector.
    ///
    /// # Errors
    /// - The first error the read yields.
    async fn read_to_vec(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.read_stream(stream, options).try_collect().await
    }

    /// Replays a selector from `start` to the current head (a `Cold` subscription) into a vector.
    ///
    /// # Errors
    /// - The first error the subscription yields.
    async fn replay_to_vec(
        &self,
        selector: Selector,
        start: Start,
    ) -> Result<Vec<RecordedEvent>, Error> {
        self.subscribe(selector, start, SubscriptionMode::Cold)
            .try_filter_map(|item| futures::future::ready(Ok(item.into_event())))
            .try_collect()
            .await
    }

    /// Appends a single event.
    ///
    /// # Errors
    /// - As [`EventStore::append`].
    async fn append_one(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        event: EventData,
    ) -> Result<AppendResult, Error> {
        self.append(stream, expected, vec![event]).await
    }

    /// Every stream of a category, collected.
    ///
    /// # Errors
    /// - The first error the listing yields.
    async fn streams_of(&self, category: &Category) -> Result<Vec<StreamId>, Error> {
        self.list_streams(category).try_collect().await
    }
}

impl<T: EventStore + ?Sized> EventStoreExt for T {}

/// A stream that yields one error and ends; how lazy reads report a bad argument.
pub fn error_stream<T: Send + 'static>(error: Error) -> BoxStream<'static, Result<T, Error>> {
    futures::stream::once(async move { Err(error) }).boxed()
}
