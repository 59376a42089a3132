#![doc = include_str!("../README.md")]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use photon_api::validate::{
    classify_batch, validate_batch, validate_subscription, BatchKind, StoredId,
};
use photon_api::{
    error_stream, AppendResult, Capabilities, Category, Checkpoint, Direction, Error, EventData,
    EventStore, ExpectedVersion, Health, ReadOptions, RecordedEvent, Selector, Start, StreamId,
    SubscriptionItem, SubscriptionMode, Timestamp, Uuid, Version,
};
use tokio::sync::watch;

/// The URL scheme of this backend: `memory://`.
pub const SCHEME: &str = "memory";

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "memory";

/// How many events a read or subscription copies out per lock; bounds both lock hold time and
/// per-subscriber memory.
const CHUNK: usize = 256;

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
    log: Vec<RecordedEvent>,
    streams: HashMap<StreamId, StreamIndex>,
    categories: HashMap<Box<str>, CategoryIndex>,
    /// `recorded_at` never goes backwards along the log, so `Start::Time` is a binary search.
    last_recorded: Option<Timestamp>,
}

#[derive(Default)]
struct StreamIndex {
    /// Log position of each version.
    positions: Vec<u64>,
    /// Where each event id is stored and by which append, for idempotent retries.
    ids: HashMap<Uuid, StoredId>,
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
        let kind = classify_batch(stream, &events, |id| {
            existing.and_then(|s| s.ids.get(id).copied())
        })?;
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
        let index = self.streams.entry(stream.clone()).or_default();
        let category = match self.categories.get_mut(stream.category_name()) {
            Some(c) => c,
            None => self
                .categories
                .entry(stream.category_name().into())
                .or_default(),
        };
        if index.positions.is_empty() {
            category.streams.insert(stream.clone());
        }
        let batch_len = events.len();
        let mut checkpoints = Vec::with_capacity(batch_len);
        for (i, e) in events.into_iter().enumerate() {
            let position = self.log.len() as u64;
            let version = Version(first_version.0 + i as u64);
            index.positions.push(position);
            index.ids.insert(
                e.event_id,
                StoredId {
                    version,
                    batch_first: first_version,
                    batch_len,
                },
            );
            category.positions.push(position);
            checkpoints.push(checkpoint(position));
            self.log.push(RecordedEvent {
                stream: stream.clone(),
                version,
                event_id: e.event_id,
                event_type: e.event_type,
                schema_version: e.schema_version,
                occurred_at: e.occurred_at,
                recorded_at,
                payload: e.payload,
                metadata: e.metadata,
                checkpoint: checkpoints[i].clone(),
            });
        }
        Ok(AppendResult {
            first_version,
            last_version: Version(first_version.0 + checkpoints.len() as u64 - 1),
            checkpoints,
        })
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

    /// Copies up to [`CHUNK`] events of `selector` at positions >= `next` and < `end` into `out`;
    /// returns the log length it saw.
    fn fetch(
        &self,
        selector: &Selector,
        next: u64,
        end: u64,
        out: &mut VecDeque<(u64, RecordedEvent)>,
    ) -> u64 {
        let len = self.log.len() as u64;
        let end = end.min(len);
        match self.positions(selector) {
            Positions::All => {
                let to = end.min(next + CHUNK as u64);
                if next < to {
                    out.extend((next..to).map(|p| (p, self.log[p as usize].clone())));
                }
            }
            Positions::Some(positions) => {
                let from = positions.partition_point(|p| *p < next);
                out.extend(
                    positions[from..]
                        .iter()
                        .take(CHUNK)
                        .take_while(|p| **p < end)
                        .map(|p| (*p, self.log[*p as usize].clone())),
                );
            }
        }
        len
    }

    /// The first log position recorded at or after `t`.
    fn position_at(&self, t: Timestamp) -> u64 {
        self.log.partition_point(|e| e.recorded_at < t) as u64
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
    /// The smallest log position still to deliver.
    next: u64,
    /// The end (exclusive) of the current phase: the log length when the subscription was made
    /// while replaying, unbounded once live. Bounding the replay is what lets `CaughtUp` come
    /// even while writers keep appending faster than the consumer reads.
    end: u64,
    live: bool,
    /// Fetched events with their log positions, so the cursor advances without re-reading
    /// each event's checkpoint.
    buffer: VecDeque<(u64, RecordedEvent)>,
    head: watch::Receiver<u64>,
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
        let len = state.log.len() as u64;
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

    async fn next_item(&mut self) -> Option<Result<SubscriptionItem, Error>> {
        loop {
            if let Some((position, e)) = self.buffer.pop_front() {
                self.next = position + 1;
                return Some(Ok(SubscriptionItem::Event(e)));
            }
            // Mark the head seen before reading, so an append landing after the read wakes us.
            self.head.borrow_and_update();
            let len =
                self.store
                    .read()
                    .fetch(&self.selector, self.next, self.end, &mut self.buffer);
            if !self.buffer.is_empty() {
                continue;
            }
            // Nothing of ours below min(end, len): skip the cursor past it.
            self.next = self.next.max(self.end.min(len));
            if self.live {
                if self.head.changed().await.is_err() {
                    return None; // the store is gone: no more events can come
                }
            } else if self.mode == SubscriptionMode::Cold {
                return None;
            } else {
                self.live = true;
                self.end = u64::MAX;
                return Some(Ok(SubscriptionItem::CaughtUp));
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
            (result, state.log.len() as u64)
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
                    .map(|v| Ok(state.log[positions[*v as usize] as usize].clone()))
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
        stream::unfold(cursor, |mut cursor| async move {
            let item = cursor.next_item().await?;
            Some((item, cursor))
        })
        .boxed()
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
