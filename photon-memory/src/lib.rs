#![doc = include_str!("../README.md")]

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{ready, Context, Poll};

use async_trait::async_trait;
use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, Stream, StreamExt};
use photon_api::validate::{
    classify_batch, validate_batch, validate_subscription, BatchKind, StoredId,
};
use photon_api::{
    error_stream, AppendResult, Capabilities, Category, Checkpoint, Direction, Error, EventData,
    EventStore, EventType, ExpectedVersion, Health, Metadata, Payload, ReadOptions, RecordedEvent,
    Selector, Start, StreamId, SubscriptionItem, SubscriptionMode, Timestamp, Uuid, Version,
};
use tokio::sync::watch;

/// The URL scheme of this backend: `memory://`.
pub const SCHEME: &str = "memory";

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "memory";

/// How many events a read or subscription copies out per lock; bounds both lock hold time and
/// per-subscriber memory.
const CHUNK: usize = 256;

/// Log records per storage segment. The log grows by whole segments instead of reallocating (and
/// copying) one ever larger vector, so a big store never needs twice its size for a moment.
const SEGMENT_BITS: u32 = 16;
const SEGMENT: usize = 1 << SEGMENT_BITS;

/// Payloads up to this size are copied into the store's shared payload buffers (no allocation,
/// allocator overhead or reference-count block per event); larger ones are kept as given.
const SMALL_PAYLOAD: usize = 1024;
/// The size of one shared payload buffer.
const PAYLOAD_BUFFER: usize = 256 * 1024;

/// The hash maps of the store: a fast, randomly seeded hash (foldhash) instead of SipHash.
type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Settings of a [`MemoryStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// The largest event accepted ([`EventData::size`]); default 1 MiB like every backend.
    pub max_event_size: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_event_size: photon_api::validate::DEFAULT_MAX_EVENT_SIZE,
        }
    }
}

/// Builds a [`MemoryStore`] from code or from a `memory://` URL.
#[derive(Clone, Debug, Default)]
pub struct MemoryStoreBuilder {
    config: MemoryConfig,
}

impl MemoryStoreBuilder {
    /// Reads options from a URL: `memory://` or `memory://?max_event_size=<bytes>`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, a host or path, an unknown option, or a
    ///   value that is not a positive number.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidInput {
            what: format!("memory store URL {url:?}"),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.scheme() != SCHEME {
            return Err(invalid(format!("scheme must be {SCHEME}://")));
        }
        if parsed.host_str().is_some_and(|h| !h.is_empty())
            || !(parsed.path().is_empty() || parsed.path() == "/")
        {
            return Err(invalid(
                "takes no host or path: every memory:// store is a new, private one".into(),
            ));
        }
        let mut builder = Self::default();
        for (key, value) in parsed.query_pairs() {
            match &*key {
                "max_event_size" => {
                    let n: usize = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        invalid(format!(
                            "max_event_size={value:?} is not a positive number of bytes"
                        ))
                    })?;
                    builder = builder.max_event_size(n);
                }
                other => {
                    return Err(invalid(format!(
                        "unknown option {other:?}; known is max_event_size"
                    )))
                }
            }
        }
        Ok(builder)
    }

    /// Sets the largest event accepted.
    pub fn max_event_size(mut self, bytes: usize) -> Self {
        self.config.max_event_size = bytes;
        self
    }

    /// A new, empty store.
    pub fn build(self) -> MemoryStore {
        let (head, _) = watch::channel(0);
        MemoryStore {
            shared: Arc::new(Shared {
                state: RwLock::new(State::default()),
                head,
                config: self.config,
            }),
        }
    }
}

/// The in-process event store. Clones are separate clients of the same data.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    state: RwLock<State>,
    /// The log length after the last append; subscriptions wait on it.
    head: watch::Sender<u64>,
    config: MemoryConfig,
}

#[derive(Default)]
struct State {
    /// Every event, in commit order; an event's position is its index.
    log: Log,
    streams: Map<StreamId, StreamIndex>,
    /// Every stream's name, by the number its records carry.
    stream_names: Vec<StreamId>,
    categories: Map<Box<str>, CategoryIndex>,
    /// `recorded_at` never goes backwards along the log, so `Start::Time` is a binary search.
    last_recorded: Option<Timestamp>,
    /// The free tail of the current shared payload buffer.
    payloads: BytesMut,
    /// Handed out for every event stored without metadata, so those events keep none.
    no_metadata: Metadata,
    /// One shared copy of every event type name: stored events point at it instead of each
    /// keeping its own allocation, so a replay touches one hot reference count, not one cold
    /// one per event, and a stored event takes less memory.
    event_types: std::collections::HashSet<EventType, foldhash::fast::RandomState>,
}

/// The shared copy of `t`, kept in `types` from its first use on.
fn intern(
    types: &mut std::collections::HashSet<EventType, foldhash::fast::RandomState>,
    t: EventType,
) -> EventType {
    match types.get(&t) {
        Some(shared) => shared.clone(),
        None => {
            types.insert(t.clone());
            t
        }
    }
}

/// An event as stored: a [`RecordedEvent`] without what the log already knows (its checkpoint is
/// its position, its stream a number), so a stored event takes about half the memory.
struct Record {
    event_id: Uuid,
    version: u64,
    /// Index into [`State::stream_names`].
    stream: u32,
    schema_version: u32,
    event_type: EventType,
    occurred_at: Timestamp,
    recorded_at: Timestamp,
    payload: Payload,
    /// None for empty metadata, the common case.
    metadata: Option<Box<Metadata>>,
}

/// The log: segments of [`SEGMENT`] records, all full but the last.
#[derive(Default)]
struct Log {
    segments: Vec<Vec<Record>>,
    len: u64,
}

impl Log {
    fn len(&self) -> u64 {
        self.len
    }

    fn get(&self, position: u64) -> &Record {
        &self.segments[(position >> SEGMENT_BITS) as usize][position as usize & (SEGMENT - 1)]
    }

    fn push(&mut self, record: Record) {
        match self.segments.last_mut() {
            Some(last) if last.len() < SEGMENT => last.push(record),
            // The first segment grows as usual, so a small store stays small; later ones are
            // allocated whole once.
            _ => {
                let mut segment = if self.segments.is_empty() {
                    Vec::new()
                } else {
                    Vec::with_capacity(SEGMENT)
                };
                segment.push(record);
                self.segments.push(segment);
            }
        }
        self.len += 1;
    }

    /// The first position whose record does not satisfy `pred`, which must hold for a prefix of
    /// the log.
    fn partition_point(&self, pred: impl Fn(&Record) -> bool) -> u64 {
        let segment = self
            .segments
            .partition_point(|s| s.last().is_some_and(&pred));
        match self.segments.get(segment) {
            Some(s) => (segment * SEGMENT + s.partition_point(pred)) as u64,
            None => self.len,
        }
    }
}

#[derive(Default)]
struct StreamIndex {
    /// The stream's number in [`State::stream_names`].
    number: u32,
    /// Log position of each version.
    positions: Vec<u64>,
    /// The first version of each append, for idempotent retries.
    batches: Vec<u64>,
    /// The version of each event id, for idempotent retries.
    ids: Map<u128, u64>,
}

impl StreamIndex {
    /// Where an event id is stored and by which append.
    fn stored(&self, id: &Uuid) -> Option<StoredId> {
        let version = *self.ids.get(&id.as_u128())?;
        let batch = self.batches.partition_point(|first| *first <= version) - 1;
        let batch_first = self.batches[batch];
        let batch_end = self
            .batches
            .get(batch + 1)
            .copied()
            .unwrap_or(self.positions.len() as u64);
        Some(StoredId {
            version: Version(version),
            batch_first: Version(batch_first),
            batch_len: (batch_end - batch_first) as usize,
        })
    }
}

#[derive(Default)]
struct CategoryIndex {
    positions: Vec<u64>,
    streams: BTreeSet<StreamId>,
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

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written (appends mutate
        // only after every check), so a poisoned lock is still consistent.
        self.shared.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(|e| e.into_inner())
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
            .field("events", &self.read().log.len())
            .field("config", &self.shared.config)
            .finish()
    }
}

fn checkpoint(position: u64) -> Checkpoint {
    Checkpoint::from_position(BACKEND, position)
}

impl State {
    fn append(
        &mut self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        let existing = self.streams.get(stream);
        let kind = classify_batch(stream, &events, |id| existing.and_then(|s| s.stored(id)))?;
        if let BatchKind::Retry { first } = kind {
            let positions = &existing.expect("a retry has a stream").positions;
            let range = first.0 as usize..first.0 as usize + events.len();
            return Ok(AppendResult {
                first_version: first,
                last_version: Version(range.end as u64 - 1),
                checkpoints: positions[range].iter().map(|p| checkpoint(*p)).collect(),
            });
        }
        let current = existing
            .and_then(|s| s.positions.len().checked_sub(1))
            .map(|v| Version(v as u64));
        if !expected.matches(current) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }

        // Every check passed: from here on nothing fails, so the batch lands whole.
        let now = Timestamp::now();
        let recorded_at = match self.last_recorded {
            Some(last) if last > now => last,
            _ => now,
        };
        self.last_recorded = Some(recorded_at);
        let first_version = current.map_or(Version(0), Version::next);
        let index = match self.streams.get_mut(stream) {
            Some(index) => index,
            None => {
                let number = u32::try_from(self.stream_names.len())
                    .expect("fewer than 2^32 streams fit in memory");
                self.stream_names.push(stream.clone());
                let category = match self.categories.get_mut(stream.category_name()) {
                    Some(c) => c,
                    None => self
                        .categories
                        .entry(stream.category_name().into())
                        .or_default(),
                };
                category.streams.insert(stream.clone());
                self.streams.entry(stream.clone()).or_insert(StreamIndex {
                    number,
                    ..StreamIndex::default()
                })
            }
        };
        let category = self
            .categories
            .get_mut(stream.category_name())
            .expect("a stream's category is indexed with the stream");
        let batch_len = events.len();
        index.batches.push(first_version.0);
        index.positions.reserve(batch_len);
        index.ids.reserve(batch_len);
        category.positions.reserve(batch_len);
        let mut checkpoints = Vec::with_capacity(batch_len);
        for (i, e) in events.into_iter().enumerate() {
            let position = self.log.len();
            let version = first_version.0 + i as u64;
            index.positions.push(position);
            index.ids.insert(e.event_id.as_u128(), version);
            category.positions.push(position);
            checkpoints.push(checkpoint(position));
            let metadata = e.metadata;
            let metadata = (metadata.causation_id.is_some()
                || metadata.correlation_id.is_some()
                || !metadata.headers.is_empty())
            .then(|| Box::new(metadata));
            let mut payload = e.payload;
            if (1..=SMALL_PAYLOAD).contains(&payload.bytes.len()) {
                if self.payloads.capacity() - self.payloads.len() < payload.bytes.len() {
                    self.payloads = BytesMut::with_capacity(PAYLOAD_BUFFER);
                }
                self.payloads.extend_from_slice(&payload.bytes);
                payload.bytes = self.payloads.split().freeze();
            }
            self.log.push(Record {
                event_id: e.event_id,
                version,
                stream: index.number,
                schema_version: e.schema_version,
                event_type: intern(&mut self.event_types, e.event_type),
                occurred_at: e.occurred_at,
                recorded_at,
                payload,
                metadata,
            });
        }
        Ok(AppendResult {
            first_version,
            last_version: Version(first_version.0 + checkpoints.len() as u64 - 1),
            checkpoints,
        })
    }

    /// The event at `position`, as readers get it.
    fn event(&self, position: u64) -> RecordedEvent {
        let r = self.log.get(position);
        RecordedEvent {
            stream: self.stream_names[r.stream as usize].clone(),
            version: Version(r.version),
            event_id: r.event_id,
            event_type: r.event_type.clone(),
            schema_version: r.schema_version,
            occurred_at: r.occurred_at,
            recorded_at: r.recorded_at,
            payload: r.payload.clone(),
            metadata: match &r.metadata {
                Some(m) => Metadata::clone(m),
                None => self.no_metadata.clone(),
            },
            checkpoint: checkpoint(position),
        }
    }

    /// The log positions a selector covers, in order; None for a stream or category with no
    /// events yet (it may get some later).
    fn positions(&self, selector: &Selector) -> Positions<'_> {
        match selector {
            Selector::All => Positions::All,
            Selector::Category(c) => Positions::Some(
                self.categories
                    .get(c.as_str())
                    .map_or(&[][..], |c| &c.positions),
            ),
            Selector::Stream(s) => {
                Positions::Some(self.streams.get(s).map_or(&[][..], |s| &s.positions))
            }
        }
    }

    /// Copies up to [`CHUNK`] events of `selector` at positions >= `*next` and < `end` into
    /// `out`, moving `*next` past the last one copied; returns the log length it saw.
    fn fetch(
        &self,
        selector: &Selector,
        next: &mut u64,
        end: u64,
        out: &mut VecDeque<RecordedEvent>,
    ) -> u64 {
        let len = self.log.len();
        let end = end.min(len);
        match self.positions(selector) {
            Positions::All => {
                let to = end.min(*next + CHUNK as u64);
                if *next < to {
                    out.extend((*next..to).map(|p| self.event(p)));
                    *next = to;
                }
            }
            Positions::Some(positions) => {
                let from = positions.partition_point(|p| *p < *next);
                let upto = from + positions[from..].partition_point(|p| *p < end).min(CHUNK);
                if let Some(last) = positions[from..upto].last() {
                    out.extend(positions[from..upto].iter().map(|p| self.event(*p)));
                    *next = last + 1;
                }
            }
        }
        len
    }

    /// The first log position recorded at or after `t`.
    fn position_at(&self, t: Timestamp) -> u64 {
        self.log.partition_point(|e| e.recorded_at < t)
    }
}

enum Positions<'a> {
    All,
    Some(&'a [u64]),
}

/// A subscription's state between polls.
struct Cursor {
    store: MemoryStore,
    selector: Selector,
    mode: SubscriptionMode,
    /// The smallest log position not yet fetched.
    next: u64,
    /// The end (exclusive) of the current phase: the log length when the subscription was made
    /// while replaying, unbounded once live. Bounding the replay is what lets `CaughtUp` come
    /// even while writers keep appending faster than the consumer reads.
    end: u64,
    live: bool,
    /// Fetched events not yet delivered.
    buffer: VecDeque<RecordedEvent>,
    head: watch::Receiver<u64>,
}

/// What a subscription does next.
// Boxing the item would cost an allocation per event; the other variants are rare.
#[allow(clippy::large_enum_variant)]
enum Step {
    Item(SubscriptionItem),
    /// Live and nothing new: wait for the head to move.
    Wait,
    End,
}

impl Cursor {
    /// Resolves `start` against the log as it is now, so `Start::Now` and the Cold end mean "when
    /// `subscribe` was called", not "when first polled".
    fn new(
        store: &MemoryStore,
        selector: Selector,
        start: &Start,
        mode: SubscriptionMode,
    ) -> Result<Self, Error> {
        let head = store.shared.head.subscribe();
        let state = store.read();
        let len = state.log.len();
        let next = match start {
            Start::Beginning => 0,
            Start::Now => len,
            Start::Time(t) => state.position_at(*t),
            Start::After(c) => {
                let p = c.position_for(BACKEND)?;
                if p >= len {
                    return Err(Error::InvalidInput {
                        what: format!("checkpoint {c}"),
                        reason: format!(
                            "position {p} is past the end of this store ({len} events): it was made by another memory store"
                        ),
                    });
                }
                p + 1
            }
        };
        drop(state);
        Ok(Self {
            store: store.clone(),
            selector,
            mode,
            next,
            end: len,
            live: false,
            buffer: VecDeque::with_capacity(CHUNK),
            head,
        })
    }

    /// Takes the next item without waiting.
    fn step(&mut self) -> Step {
        loop {
            if let Some(e) = self.buffer.pop_front() {
                return Step::Item(SubscriptionItem::Event(e));
            }
            // Mark the head seen before reading, so an append landing after the read wakes us.
            self.head.borrow_and_update();
            let len =
                self.store
                    .read()
                    .fetch(&self.selector, &mut self.next, self.end, &mut self.buffer);
            if !self.buffer.is_empty() {
                continue;
            }
            // Nothing of ours below min(end, len): skip the cursor past it.
            self.next = self.next.max(self.end.min(len));
            if self.live {
                return Step::Wait;
            } else if self.mode == SubscriptionMode::Cold {
                return Step::End;
            } else {
                self.live = true;
                self.end = u64::MAX;
                return Step::Item(SubscriptionItem::CaughtUp);
            }
        }
    }
}

/// A subscription: events straight from the cursor's buffer, a wait on the head only when live
/// and idle.
struct Subscription {
    cursor: Cursor,
    /// Resolves when the head moves (true) or the store is gone (false).
    wait: Option<BoxFuture<'static, bool>>,
}

impl Stream for Subscription {
    type Item = Result<SubscriptionItem, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // The common case first: an event already fetched.
        if let Some(e) = this.cursor.buffer.pop_front() {
            return Poll::Ready(Some(Ok(SubscriptionItem::Event(e))));
        }
        loop {
            if let Some(wait) = &mut this.wait {
                let alive = ready!(wait.as_mut().poll(cx));
                this.wait = None;
                if !alive {
                    return Poll::Ready(None); // the store is gone: no more events can come
                }
            }
            match this.cursor.step() {
                Step::Item(item) => return Poll::Ready(Some(Ok(item))),
                Step::End => return Poll::Ready(None),
                Step::Wait => {
                    // A clone has seen what the cursor has seen, so it wakes on the next append.
                    let mut head = this.cursor.head.clone();
                    this.wait = Some(Box::pin(async move { head.changed().await.is_ok() }));
                }
            }
        }
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
            total_order: true,
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
        validate_batch(stream, &events, self.shared.config.max_event_size, None)?;
        let (result, len) = {
            let mut state = self.write();
            let result = state.append(stream, expected, events)?;
            (result, state.log.len())
        };
        self.shared.head.send_if_modified(|head| {
            let grew = len > *head;
            *head = (*head).max(len);
            grew
        });
        Ok(result)
    }

    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        let store = self.clone();
        let stream_id = stream.clone();
        // The next version to return; None once exhausted. Backwards reads clamp it to the last
        // version, so "from the end" is simply "from the largest version".
        let next = Some(options.from.map_or(
            match options.direction {
                Direction::Forwards => 0,
                Direction::Backwards => u64::MAX,
            },
            Version::value,
        ));
        let remaining = options.limit.unwrap_or(usize::MAX);
        stream::unfold((next, remaining), move |(next, remaining)| {
            let store = store.clone();
            let stream_id = stream_id.clone();
            async move {
                let v = next?;
                if remaining == 0 {
                    return None;
                }
                let take = remaining.min(CHUNK) as u64;
                let state = store.read();
                let positions = state
                    .streams
                    .get(&stream_id)
                    .map_or(&[][..], |s| &s.positions);
                let len = positions.len() as u64;
                let (versions, next): (Vec<u64>, Option<u64>) = match options.direction {
                    Direction::Forwards => {
                        let to = len.min(v.saturating_add(take));
                        ((v..to).collect(), (to < len).then_some(to))
                    }
                    Direction::Backwards => {
                        let top = len.checked_sub(1).map(|last| v.min(last))?;
                        let bottom = (top + 1).saturating_sub(take);
                        ((bottom..=top).rev().collect(), bottom.checked_sub(1))
                    }
                };
                let chunk: Vec<_> = versions
                    .iter()
                    .map(|v| Ok(state.event(positions[*v as usize])))
                    .collect();
                drop(state);
                if chunk.is_empty() {
                    return None;
                }
                let remaining = remaining - chunk.len();
                Some((stream::iter(chunk), (next, remaining)))
            }
        })
        .flatten()
        .boxed()
    }

    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
        if let Err(e) = validate_subscription(&start, mode) {
            return error_stream(e);
        }
        let cursor = match Cursor::new(self, selector, &start, mode) {
            Ok(c) => c,
            Err(e) => return error_stream(e),
        };
        Subscription { cursor, wait: None }.boxed()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
        Ok(self
            .read()
            .streams
            .get(stream)
            .and_then(|s| s.positions.len().checked_sub(1))
            .map(|v| Version(v as u64)))
    }

    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        let mut names: Vec<Category> = self
            .read()
            .categories
            .keys()
            .map(|k| Category::new(&**k))
            .collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    }

    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        let streams: Vec<StreamId> = self
            .read()
            .categories
            .get(category.as_str())
            .map(|c| c.streams.iter().cloned().collect())
            .unwrap_or_default();
        stream::iter(streams.into_iter().map(Ok)).boxed()
    }

    async fn health(&self) -> Result<Health, Error> {
        Ok(Health {
            backend: BACKEND,
            detail: format!("in-process store holding {} events", self.read().log.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use photon_api::{Bytes, ContentType};

    fn record(version: u64, recorded_at: Timestamp) -> Record {
        Record {
            event_id: Uuid::now_v7(),
            version,
            stream: 0,
            schema_version: 1,
            event_type: EventType::new("T").unwrap(),
            occurred_at: recorded_at,
            recorded_at,
            payload: Payload::raw(ContentType::Json, Bytes::new()),
            metadata: None,
        }
    }

    #[test]
    fn log_segments_index_and_search() {
        let at = |i: u64| Timestamp::from_unix_micros(1_000 + (i / 3) as i64).unwrap();
        let mut log = Log::default();
        assert_eq!(log.partition_point(|_| true), 0);
        let n = 2 * SEGMENT as u64 + 5;
        for i in 0..n {
            log.push(record(i, at(i)));
        }
        assert_eq!(log.len(), n);
        assert_eq!(log.segments.len(), 3);
        for p in [
            0,
            1,
            SEGMENT as u64 - 1,
            SEGMENT as u64,
            2 * SEGMENT as u64,
            n - 1,
        ] {
            assert_eq!(log.get(p).version, p);
        }
        // The first position recorded at or after t, across segment edges, as a linear scan.
        for p in [
            0,
            1,
            2,
            3,
            SEGMENT as u64 - 1,
            SEGMENT as u64,
            SEGMENT as u64 + 1,
            n - 1,
        ] {
            let t = at(p);
            let want = (0..n).find(|i| at(*i) >= t).unwrap();
            assert_eq!(log.partition_point(|r| r.recorded_at < t), want, "t of {p}");
        }
        assert_eq!(log.partition_point(|_| true), n);
        assert_eq!(log.partition_point(|_| false), 0);
    }

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
    fn url_options_and_errors() {
        assert_eq!(
            MemoryStore::from_url("memory://?max_event_size=10")
                .unwrap()
                .config()
                .max_event_size,
            10
        );
        assert_eq!(
            MemoryStore::from_url("memory://")
                .unwrap()
                .config()
                .max_event_size,
            1024 * 1024
        );
        for (url, needle) in [
            ("memory://?max_event_size=0", "positive"),
            ("memory://?max_event_size=x", "positive"),
            ("memory://?colour=blue", "unknown option \"colour\""),
            ("kafka://h:1", "scheme must be memory://"),
            ("memory://somehost", "no host or path"),
            ("not a url", "relative URL"),
        ] {
            let err = MemoryStore::from_url(url).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidInput { reason, .. } if reason.contains(needle)),
                "{url}: {err}"
            );
        }
    }
}
