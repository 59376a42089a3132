//! Loading aggregates and executing commands against them with optimistic concurrency.
//!
//! The repository writes the aggregate stream only, once per command; the store maintains the
//! category stream that views read. The expected version is checked by the store at append time,
//! never only on the client. That check is also why the cache of recent states is safe: a cached
//! state is only ever one that was read from or stored in the store, a command reads the events
//! after its version before deciding, and a state gone stale in between (another process wrote)
//! loses at append and is brought forward from its version, not rebuilt. Loading without a cache
//! entry reads the latest snapshot (when snapshots are on) and the events after it.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use photon_api::{
    Category, Error, EventData, EventStore, EventType, ExpectedVersion, Payload, ReadOptions,
    RecordedEvent, StreamId, Uuid, Version,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::aggregate::{Aggregate, DomainEvent};
use crate::cache::{AggregateCache, CacheOptions, CacheUsage, Current};
use crate::snapshot::{self, snapshot_stream, Decoded, SnapshotDue, SnapshotPolicy};
use crate::upcast::Decoder;

/// How many times `execute` retries after a concurrent writer won (reload and decide again) or
/// the store was unavailable (re-send the same events), and how long it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included. At least 1.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub initial_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(2),
        }
    }
}

/// Correlation, causation and headers stamped on every event a command records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandContext {
    /// Shared by every event of one business conversation (a transfer touches two accounts).
    pub correlation_id: Option<Uuid>,
    /// The command or event that caused this command.
    pub causation_id: Option<Uuid>,
    /// Free headers, e.g. the user who asked.
    pub headers: Vec<(String, String)>,
}

/// An aggregate's state as of a version.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The state after every stored event.
    pub state: A,
    /// The last stored version; None when the aggregate has no events.
    pub version: Option<Version>,
}

/// What an executed command did.
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    /// The state after the new events.
    pub state: A,
    /// The events recorded (empty when the command changed nothing).
    pub events: Vec<A::Event>,
    /// The stream's version after the command.
    pub version: Option<Version>,
    /// How many attempts it took (more than 1 after conflicts).
    pub attempts: u32,
}

/// Why `execute` failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error + 'static> {
    /// The aggregate refused the command. Nothing was stored.
    #[error("command refused by {stream}: {source}")]
    Rejected {
        /// The aggregate's stream.
        stream: StreamId,
        /// The aggregate's reason.
        #[source]
        source: E,
    },
    /// Other writers kept winning; nothing of this command was stored.
    #[error("{stream}: gave up after {attempts} attempts lost to concurrent writers")]
    TooManyConflicts {
        /// The aggregate's stream.
        stream: StreamId,
        /// Attempts made.
        attempts: u32,
    },
    /// The store failed (unavailable, undecodable history, ...).
    #[error(transparent)]
    Store(#[from] Error),
}

/// Loads and changes aggregates of type `A` in one event store.
///
/// Clones share one cache of recent aggregates ([`CacheOptions`], on by default), so a command
/// reads only the events stored since the state it finds there. Snapshots are off until
/// [`Self::with_snapshots`], which needs a serializable state.
pub struct Repository<A> {
    store: Arc<dyn EventStore>,
    category: Category,
    retry: RetryPolicy,
    cache: Arc<AggregateCache<A>>,
    /// Snapshot appends started and not yet finished, shared by clones.
    snapshot_writes: Arc<tokio::sync::watch::Sender<usize>>,
    snapshots: Option<Snapshots<A>>,
    _aggregate: PhantomData<fn() -> A>,
}

/// How a repository takes and reads snapshots: the policy and the state's codec, captured where
/// `A: Serialize + DeserializeOwned` is known so the repository itself needs neither.
struct Snapshots<A> {
    policy: SnapshotPolicy,
    encode: fn(&StreamId, Version, Uuid, &A) -> Result<EventData, Error>,
    decode: DecodeSnapshot<A>,
}

/// What a snapshot event claims, or why it cannot be used for the stream.
type DecodeSnapshot<A> = fn(&RecordedEvent, &StreamId) -> Result<Decoded<A>, String>;

impl<A> Clone for Snapshots<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Snapshots<A> {}

impl<A> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            category: self.category.clone(),
            retry: self.retry,
            cache: self.cache.clone(),
            snapshot_writes: self.snapshot_writes.clone(),
            snapshots: self.snapshots,
            _aggregate: PhantomData,
        }
    }
}

impl<A> fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("category", &self.category)
            .field("retry", &self.retry)
            .field("cache", &self.cache)
            .field("snapshots", &self.snapshots.map(|s| s.policy))
            .field("store", &self.store.backend())
            .finish()
    }
}

/// The prefix of the categories newton keeps its own streams in ([`crate::SNAPSHOT_CATEGORY`],
/// [`crate::CHECKPOINT_CATEGORY`], and any it adds later). An aggregate's category must not start
/// with it: its events would share streams and subscriptions with newton's, and a snapshot or a
/// view checkpoint would be read as one of its events (or the other way round).
pub const RESERVED_CATEGORY_PREFIX: &str = "newton_";

/// Refuses a category newton keeps its own streams in.
fn check_not_reserved(category: &Category) -> Result<(), Error> {
    if category.as_str().starts_with(RESERVED_CATEGORY_PREFIX) {
        return Err(Error::InvalidInput {
            what: format!("aggregate category {:?}", category.as_str()),
            reason: format!(
                "categories starting with {RESERVED_CATEGORY_PREFIX:?} hold newton's own streams \
                 (snapshots, view checkpoints)"
            ),
        });
    }
    Ok(())
}

impl<A: Aggregate> Repository<A> {
    /// A repository for `A` on `store`.
    ///
    /// An `A::CATEGORY` newton reserves (see [`RESERVED_CATEGORY_PREFIX`]) is refused by every
    /// load and command, with [`Error::InvalidInput`] naming it, rather than here: this
    /// constructor returns `Self` and callers rely on that. [`Self::try_new`] refuses it up
    /// front.
    ///
    /// # Panics
    /// - When `A::CATEGORY` is not a valid category name: that is a bug in the aggregate's code,
    ///   found the first time it runs.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        let category = Category::new(A::CATEGORY).unwrap_or_else(|e| {
            panic!("Aggregate::CATEGORY of {}: {e}", std::any::type_name::<A>())
        });
        Self {
            store,
            category,
            retry: RetryPolicy::default(),
            cache: Arc::new(AggregateCache::new(CacheOptions::default())),
            snapshot_writes: Arc::new(tokio::sync::watch::Sender::new(0)),
            snapshots: None,
            _aggregate: PhantomData,
        }
    }

    /// As [`Self::new`], but a category that is not valid or that newton reserves is an error
    /// here, at start-up, instead of a panic or an error at the first command.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] when `A::CATEGORY` is not a valid category name, or starts with
    ///   [`RESERVED_CATEGORY_PREFIX`].
    pub fn try_new(store: Arc<dyn EventStore>) -> Result<Self, Error> {
        let category = Category::new(A::CATEGORY)?;
        check_not_reserved(&category)?;
        Ok(Self::new(store))
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Replaces the cache with an empty one of these bounds ([`CacheOptions::disabled`] for
    /// none). Clones made before keep the old cache, so set it up before cloning.
    pub fn with_cache(mut self, options: CacheOptions) -> Self {
        self.cache = Arc::new(AggregateCache::new(options));
        self
    }

    /// What the cache holds now.
    pub fn cache_usage(&self) -> CacheUsage {
        self.cache.usage()
    }

    /// The stream of instance `id`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] when `id` is not a valid stream id, or when `A::CATEGORY` is one
    ///   newton reserves (see [`RESERVED_CATEGORY_PREFIX`]).
    pub fn stream_of(&self, id: &str) -> Result<StreamId, Error> {
        check_not_reserved(&self.category)?;
        StreamId::new(&self.category, id)
    }

    /// The current state of instance `id`: the cached state, or else the latest usable snapshot,
    /// brought up to date with the events stored after it (the whole stream when there is
    /// neither).
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a bad id, or when `A::Event`'s upcaster chain is broken.
    /// - [`Error::Decode`] for an event that does not decode as `A::Event` (after upcasting);
    ///   [`Error::UnknownSchemaVersion`] for one written by a newer release; [`Error::Upcast`]
    ///   when an upcaster fails (see [`crate::upcast::Decoder::decode_each`]).
    /// - [`Error::Unavailable`] when the store fails. A snapshot that cannot be read or used is
    ///   never an error: the events are read instead.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, Error> {
        let stream = self.stream_of(id)?;
        let current = self.current(&stream).await?;
        let loaded = Loaded {
            state: current.state.clone(),
            version: current.version,
        };
        self.cache.put(&stream, current);
        Ok(loaded)
    }

    /// The state of `stream` as of its last stored event: a copy of the cached state when the
    /// cache holds the stream (the entry stays, for other commands on it meanwhile), else from
    /// the snapshot and the store.
    async fn current(&self, stream: &StreamId) -> Result<Current<A>, Error> {
        let mut current = match self.cache.get(stream) {
            Some(cached) => cached,
            None => return self.load_from_snapshot(stream).await,
        };
        if let Err(e) = self.catch_up(stream, &mut current).await {
            if !e.is_retryable() {
                // The events after it do not read as the aggregate's, and will not for the next
                // command either: the entry would only hold memory.
                self.cache.remove(stream);
            }
            return Err(e);
        }
        Ok(current)
    }

    /// The state of `stream` from its latest usable snapshot and the events after it, else from
    /// all its events.
    ///
    /// A snapshot's version is only a claim (see [`Decoded`]): the events are read from that
    /// version itself, and the snapshot is used only when the first one is there and is the event
    /// the snapshot was taken after. Else it is dropped and the stream replayed, so a snapshot
    /// ahead of its stream (imported before it, restored, or written by someone else) never
    /// yields a state at a version the stream does not have.
    async fn load_from_snapshot(&self, stream: &StreamId) -> Result<Current<A>, Error> {
        let mut current = Current {
            state: A::default(),
            version: None,
            last_event_id: None,
            snapshot_base: None,
        };
        if let Some(snapshot) = self.latest_snapshot(stream).await {
            let mut events = self.store.read_stream(
                stream,
                ReadOptions::forwards().from_version(snapshot.version),
            );
            match events.try_next().await? {
                Some(first)
                    if first.version == snapshot.version && first.event_id == snapshot.event_id =>
                {
                    current.state = snapshot.state;
                    current.version = Some(snapshot.version);
                    current.last_event_id = Some(first.event_id);
                    current.snapshot_base = Some(snapshot.version);
                    self.apply_all(events, &mut current).await?;
                    return Ok(current);
                }
                found => {
                    let found = found.map(|e| (e.version, e.event_id));
                    tracing::warn!(%stream, version = %snapshot.version, event_id = %snapshot.event_id, ?found, "the snapshot does not match its stream's event at its version; replaying the stream instead");
                }
            }
        }
        self.catch_up(stream, &mut current).await?;
        Ok(current)
    }

    /// Applies the events stored after `current`'s version. On an error `current` is left partly
    /// brought forward, and every caller drops it rather than use or cache it.
    async fn catch_up(&self, stream: &StreamId, current: &mut Current<A>) -> Result<(), Error> {
        let options = match current.version {
            // No version follows the last one there is, so nothing can be stored after it.
            Some(v) => match v.value().checked_add(1) {
                Some(next) => ReadOptions::forwards().from_version(Version(next)),
                None => return Ok(()),
            },
            None => ReadOptions::forwards(),
        };
        let events = self.store.read_stream(stream, options);
        self.apply_all(events, current).await
    }

    /// Applies every event of `events`, which follow `current` in its stream.
    async fn apply_all(
        &self,
        mut events: futures::stream::BoxStream<'static, Result<RecordedEvent, Error>>,
        current: &mut Current<A>,
    ) -> Result<(), Error> {
        let decoder = Decoder::<A::Event>::new()?;
        while let Some(recorded) = events.try_next().await? {
            decode_event(&decoder, &recorded, &mut current.state)?;
            current.version = Some(recorded.version);
            current.last_event_id = Some(recorded.event_id);
        }
        Ok(())
    }

    /// The latest snapshot of `stream` when snapshots are on and it decodes for this stream;
    /// None otherwise, so the caller replays: a snapshot is an optimisation, never a reason to
    /// fail.
    async fn latest_snapshot(&self, stream: &StreamId) -> Option<Decoded<A>> {
        let snapshots = self.snapshots?;
        let from = snapshot_stream(stream);
        let last = match self
            .store
            .read_stream(&from, ReadOptions::backwards().limit(1))
            .try_next()
            .await
        {
            Ok(Some(last)) => last,
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(%stream, %error, "reading the latest snapshot failed; replaying the stream instead");
                return None;
            }
        };
        match (snapshots.decode)(&last, stream) {
            Ok(found) => Some(found),
            Err(reason) => {
                tracing::warn!(%stream, snapshot = %last.stream, version = %last.version, %reason, "snapshot not used; replaying the stream instead");
                None
            }
        }
    }

    /// The snapshot of `current` when the policy says one is due, encoded; the caller writes it
    /// with [`Self::write_snapshot`] once the command's outcome is settled. Never fails: the
    /// command that got here has been stored, and a missing snapshot only makes later cold loads
    /// longer.
    fn snapshot_if_due(&self, stream: &StreamId, current: &mut Current<A>) -> Option<EventData> {
        let (Some(snapshots), Some(version), Some(event_id)) =
            (self.snapshots, current.version, current.last_event_id)
        else {
            return None;
        };
        let events_since = match current.snapshot_base {
            Some(base) => version.value().saturating_sub(base.value()),
            None => version.value().saturating_add(1),
        };
        if !snapshots.policy.due(&SnapshotDue {
            version,
            events_since,
        }) {
            return None;
        }
        // Counted as taken even when it fails, so a store that refuses snapshots (too large for
        // its event limit, say) is asked again only after as many events again.
        current.snapshot_base = Some(version);
        match (snapshots.encode)(stream, version, event_id, &current.state) {
            Ok(event) => Some(event),
            Err(error) => {
                tracing::warn!(%stream, %version, %error, "encoding a snapshot failed; the command stands, the next snapshot is due after as many events again");
                None
            }
        }
    }

    /// Appends `snapshot` to the snapshot stream of `stream` in a task of its own, so that the
    /// command it follows returns as soon as its own events are stored: a slow or unavailable
    /// store would otherwise hold the command for the snapshot append's whole deadline, and a
    /// caller with a timeout would give up on a command that was stored.
    ///
    /// At most [`MAX_SNAPSHOT_WRITES`] are in flight per repository (clones included); past
    /// that a snapshot is skipped (and due again after as many events again), so a store that
    /// stopped answering does not pile up tasks and states. Outside a Tokio runtime the append
    /// is awaited here instead.
    async fn write_snapshot(&self, stream: &StreamId, snapshot: EventData) {
        let mut admitted = false;
        self.snapshot_writes.send_modify(|n| {
            if *n < MAX_SNAPSHOT_WRITES {
                *n += 1;
                admitted = true;
            }
        });
        if !admitted {
            tracing::warn!(%stream, "{MAX_SNAPSHOT_WRITES} snapshot writes still in flight; skipping this one, the next is due after as many events again");
            return;
        }
        let in_flight = InFlight(self.snapshot_writes.clone());
        let store = self.store.clone();
        let stream = stream.clone();
        let write = async move {
            let _in_flight = in_flight;
            let to = snapshot_stream(&stream);
            if let Err(error) = store
                .append(&to, ExpectedVersion::Any, vec![snapshot])
                .await
            {
                tracing::warn!(%stream, %error, "taking a snapshot failed; the command stands, the next snapshot is due after as many events again");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(write)),
            Err(_) => write.await,
        }
    }

    /// Waits until every snapshot write this repository and its clones started has finished
    /// (stored or failed), e.g. before a process exits, so that the next one starts from the
    /// latest snapshot; commands never wait for them.
    pub async fn flush_snapshots(&self) {
        let mut idle = self.snapshot_writes.subscribe();
        // The sender lives as long as `self`, so the wait ends only when the count is 0.
        let _ = idle.wait_for(|n| *n == 0).await;
    }

    /// Loads instance `id` (from the cache, else the latest snapshot, bringing either up to date
    /// with the events after it), lets it handle `command`, and appends the resulting events
    /// with the loaded version as expectation; on a conflict, reads the events stored since
    /// that version and decides again, as the policy allows.
    ///
    /// # Errors
    /// - [`ExecuteError::Rejected`] when the aggregate refuses.
    /// - [`ExecuteError::TooManyConflicts`] when concurrent writers won every attempt.
    /// - [`ExecuteError::Store`] for store failures, including [`Error::Unavailable`] once the
    ///   re-sends are used up (the events may then have landed; re-sending the same command
    ///   decides again on the state it finds).
    pub async fn execute(
        &self,
        id: &str,
        command: &A::Command,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        self.execute_with(id, command, &CommandContext::default())
            .await
    }

    /// As [`Self::execute`], stamping `context` on every recorded event.
    ///
    /// # Errors
    /// - As [`Self::execute`].
    pub async fn execute_with(
        &self,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        self.run(id, command, context, None).await
    }

    /// As [`Self::execute_with`], but the command is idempotent: `command_id` names it, the ids
    /// of the events it records are derived from it ([`command_event_id`]), and executing it
    /// again, after it was stored, stores nothing and answers with what it stored the first time.
    /// For commands issued by a reaction to an event (a process manager, see
    /// [`crate::ProcessRunner`]): derive `command_id` from the causing event's id, and a
    /// redelivery of that event after a crash does not store the command twice (what a process
    /// manager still does not cover is in the `process` module's docs and the README).
    ///
    /// Why it holds: the aggregate decides again on its current state, which already includes
    /// the first execution's events, so it may now decide differently (a withdrawal of the whole
    /// balance is refused the second time). The decision is therefore never trusted alone:
    /// - when it records events, they carry the derived ids, and the store answers a batch whose
    ///   ids it holds as a retry (success with the original versions) or as an
    ///   [`Error::IdempotencyConflict`] naming one of them, whatever the expected version says;
    ///   both mean "stored before". So does a success at any first version other than the one
    ///   right after the state it decided on: a copy stored by another node, maybe after this
    ///   load. The answer (and the state cached) is then read from the store, never this
    ///   decision applied to the state it was made on.
    /// - when it is a refusal or records nothing, the store is asked whether the first derived id
    ///   is in the stream, by an append of one marker event with that id and an expectation no
    ///   stream can meet, which the store answers from the ids before the expectation and so
    ///   never stores (design.md: idempotent appends; every backend checks ids first). Only then
    ///   is the refusal (or the empty outcome) returned. That costs one round trip, and on
    ///   Cassandra a read of the stream's event ids, on refusals only; the marker's append is
    ///   counted in `photon_append_conflicts_total` like a lost race.
    ///
    /// When it was stored before, [`Executed::events`] are the events it stored then (read back,
    /// upcast), and `state` and `version` are the aggregate's as of now.
    ///
    /// What it does not cover: a command refused the first time is decided again, on the state
    /// found now, and may succeed if that state changed meanwhile (nothing was stored the first
    /// time, so this command is not doubled; but a caller that acted on the first refusal, as a
    /// process manager's compensation does, can now see both its action and the command take
    /// effect: record the refusal before acting on it). And the same `command_id` with another command is the same command
    /// to this method: ids are the only key.
    ///
    /// # Errors
    /// - As [`Self::execute`]; [`ExecuteError::Rejected`] only when the command was not stored
    ///   before.
    /// - [`ExecuteError::Store`] with [`Error::InvalidInput`] for a nil `command_id`.
    pub async fn execute_once(
        &self,
        id: &str,
        command: &A::Command,
        command_id: Uuid,
        context: &CommandContext,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        if command_id.is_nil() {
            return Err(ExecuteError::Store(Error::InvalidInput {
                what: format!("command id for {}", self.category),
                reason: "is nil; derive it from the causing event's id".into(),
            }));
        }
        self.run(id, command, context, Some(command_id)).await
    }

    /// The command loop of [`Self::execute_with`] and, with a `command_id`, [`Self::execute_once`].
    async fn run(
        &self,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
        command_id: Option<Uuid>,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        let stream = self.stream_of(id)?;
        let max_attempts = self.retry.max_attempts.max(1);
        let mut backoff = self.retry.initial_backoff;
        let mut current = self.current(&stream).await?;
        for attempt in 1..=max_attempts {
            if attempt > 1 {
                // Lost to another writer: the state is still a stored one, so only the events
                // stored since it are read, not the whole stream.
                self.catch_up(&stream, &mut current).await?;
            }
            let decided = current.state.handle(command);
            if matches!(&decided, Ok(events) if events.is_empty()) || decided.is_err() {
                if let Some(command_id) = command_id {
                    // Refused or nothing to do now, maybe because it was stored before.
                    let found = self.stored_at(&stream, command_id).await;
                    if let Some(first) = found? {
                        self.cache.put(&stream, current);
                        return self
                            .stored_before(&stream, command_id, first, attempt)
                            .await;
                    }
                }
            }
            let events = match decided {
                Ok(events) => events,
                Err(source) => {
                    self.cache.put(&stream, current);
                    return Err(ExecuteError::Rejected {
                        stream: stream.clone(),
                        source,
                    });
                }
            };
            if events.is_empty() {
                let state = current.state.clone();
                let version = current.version;
                self.cache.put(&stream, current);
                return Ok(Executed {
                    state,
                    events,
                    version,
                    attempts: attempt,
                });
            }
            let data = match events
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let data = encode(e, context)?;
                    Ok(match command_id {
                        Some(command_id) => data.with_id(command_event_id(command_id, i)),
                        None => data,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()
            {
                Ok(data) => data,
                Err(e) => {
                    self.cache.put(&stream, current);
                    return Err(e.into());
                }
            };
            let expected = ExpectedVersion::from_current(current.version);
            let mut outcome = self.store.append(&stream, expected, data.clone()).await;
            // A timeout says nothing about whether the batch landed: re-send the very same
            // events (same ids), which the store's idempotency turns into a no-op if it did.
            let mut resends = 1;
            while matches!(&outcome, Err(e) if e.is_retryable()) && resends < max_attempts {
                tracing::debug!(%stream, resends, "store unavailable; re-sending the same events");
                tokio::time::sleep(self.retry.initial_backoff * resends).await;
                resends += 1;
                outcome = self.store.append(&stream, expected, data.clone()).await;
            }
            if let Some(command_id) = command_id {
                // Where our batch lands if it is new: right after the state we decided on.
                let ours = current.version.map_or(Version(0), Version::next);
                let before = match &outcome {
                    // A re-sent batch is answered with its original versions whatever the
                    // expectation, so any other first version is a copy stored before: by us
                    // earlier, or by another node, maybe after our load (on a state we never
                    // saw). Its answer and the state to cache come from the store, never from
                    // our decision applied to the state we loaded.
                    Ok(result) if result.first_version != ours => Some(result.first_version),
                    Err(Error::IdempotencyConflict {
                        event_id, version, ..
                    }) if *event_id == command_event_id(command_id, 0) => Some(*version),
                    _ => None,
                };
                if let Some(first) = before {
                    self.cache.put(&stream, current);
                    return self
                        .stored_before(&stream, command_id, first, attempt)
                        .await;
                }
            }
            match outcome {
                Ok(result) => {
                    for e in &events {
                        current.state.apply(e);
                    }
                    current.version = Some(result.last_version);
                    current.last_event_id = data.last().map(|e| e.event_id);
                    let snapshot = self.snapshot_if_due(&stream, &mut current);
                    let state = current.state.clone();
                    self.cache.put(&stream, current);
                    if let Some(snapshot) = snapshot {
                        self.write_snapshot(&stream, snapshot).await;
                    }
                    return Ok(Executed {
                        state,
                        events,
                        version: Some(result.last_version),
                        attempts: attempt,
                    });
                }
                Err(Error::WrongExpectedVersion { .. }) if attempt < max_attempts => {
                    tracing::debug!(%stream, attempt, "concurrent write; reading the events since the loaded version");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(Error::WrongExpectedVersion { .. }) => break,
                Err(e) => {
                    // The state is still the stored one; whether our events landed or not, the
                    // next command reads what is after it.
                    self.cache.put(&stream, current);
                    return Err(e.into());
                }
            }
        }
        self.cache.put(&stream, current);
        Err(ExecuteError::TooManyConflicts {
            stream,
            attempts: max_attempts,
        })
    }
}

impl<A: Aggregate> Repository<A> {
    /// Where the command `command_id` stored its first event in `stream`, if it did: asked of
    /// the store by an append of a marker with that event's id and an expectation no stream can
    /// meet ([`IMPOSSIBLE`]). Every backend looks the ids up before the expectation, so the
    /// answer is a retry (stored as a one-event batch), an [`Error::IdempotencyConflict`]
    /// (stored as the first of a longer one) or [`Error::WrongExpectedVersion`] (not stored),
    /// and the marker itself is never stored.
    async fn stored_at(
        &self,
        stream: &StreamId,
        command_id: Uuid,
    ) -> Result<Option<Version>, Error> {
        let first = command_event_id(command_id, 0);
        let marker = EventData::new(EventType::new(PROBE_EVENT_TYPE)?, Payload::msgpack(&())?)
            .with_id(first);
        let mut resends = 1;
        loop {
            match self
                .store
                .append(stream, IMPOSSIBLE, vec![marker.clone()])
                .await
            {
                Ok(result) => return Ok(Some(result.first_version)),
                Err(Error::IdempotencyConflict {
                    event_id, version, ..
                }) if event_id == first => return Ok(Some(version)),
                Err(Error::WrongExpectedVersion { .. }) => return Ok(None),
                Err(e) if e.is_retryable() && resends < self.retry.max_attempts.max(1) => {
                    tokio::time::sleep(self.retry.initial_backoff * resends).await;
                    resends += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The answer to a command `command_id` that was stored before, from version `first` on:
    /// the events it stored then, and the aggregate as of now.
    async fn stored_before(
        &self,
        stream: &StreamId,
        command_id: Uuid,
        first: Version,
        attempts: u32,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        tracing::debug!(%stream, %command_id, %first, "command stored before; answering with what it stored");
        let decoder = Decoder::<A::Event>::new()?;
        let mut stored = self
            .store
            .read_stream(stream, ReadOptions::forwards().from_version(first));
        let mut events = Vec::new();
        let mut i = 0;
        while let Some(recorded) = stored.try_next().await? {
            if recorded.event_id != command_event_id(command_id, i) {
                break;
            }
            decoder.decode_each(&recorded, |event| events.push(event))?;
            i += 1;
        }
        let current = self.current(stream).await?;
        let (state, version) = (current.state.clone(), current.version);
        self.cache.put(stream, current);
        Ok(Executed {
            state,
            events,
            version,
            attempts,
        })
    }
}

/// The id of event `index` (0-based) of the batch that command `command_id` records, as
/// [`Repository::execute_once`] assigns it: a UUID v5 in the command's id as namespace, so the
/// same command always records the same ids, on every run and every release.
pub fn command_event_id(command_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(&command_id, &(index as u64).to_be_bytes())
}

/// The type of the marker event [`Repository::execute_once`] offers the store to learn whether
/// a command was stored; never stored itself.
const PROBE_EVENT_TYPE: &str = "newton.StoredProbe";

/// An expectation no stream meets: it would need 2^64 events.
const IMPOSSIBLE: ExpectedVersion = ExpectedVersion::Exact(Version(u64::MAX));

impl<A: Aggregate + Serialize + DeserializeOwned> Repository<A> {
    /// Takes snapshots of the state as `policy` says, in the event store itself (see
    /// [`crate::snapshot_stream`] for where), and starts every load without a cache entry from
    /// the latest one.
    ///
    /// A snapshot is tagged with [`Aggregate::SNAPSHOT_VERSION`] and [`Aggregate::snapshot_name`];
    /// one of another version or aggregate type, one that does not decode, one for another stream,
    /// or one whose stream does not have the event it was taken after, is skipped and the events
    /// replayed instead. A
    /// snapshot that cannot be written (the store's event size limit, an unavailable server) is
    /// logged and never fails the command that triggered it. It is written in a task of its own
    /// after the command's events are stored, so the command never waits for it;
    /// [`Self::flush_snapshots`] waits for those in flight.
    pub fn with_snapshots(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshots = Some(Snapshots {
            policy,
            encode: |stream, version, event_id, state: &A| {
                let tag = (A::snapshot_name(), A::SNAPSHOT_VERSION);
                snapshot::encode(stream, version, event_id, tag, state)
            },
            decode: |event, stream| {
                snapshot::decode(event, stream, (A::snapshot_name(), A::SNAPSHOT_VERSION))
            },
        });
        self
    }
}

/// Snapshot appends a repository (with its clones) has in flight at most; see
/// [`Repository::write_snapshot`].
const MAX_SNAPSHOT_WRITES: usize = 16;

/// One snapshot append in flight: counted out when the task ends, however it ends (a runtime
/// shutting down drops it), so [`Repository::flush_snapshots`] never waits for a lost task.
struct InFlight(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The one place the repository decodes its aggregate's events: through the event type's
/// upcasters, applying each domain event a stored one reads as (an upcaster may split one).
#[inline]
fn decode_event<A: Aggregate>(
    decoder: &Decoder<A::Event>,
    recorded: &RecordedEvent,
    state: &mut A,
) -> Result<(), Error> {
    decoder.decode_each(recorded, |event| state.apply(&event))
}

/// Encodes a domain event as the store's [`EventData`].
///
/// # Errors
/// - [`Error::Encode`] when serde refuses the event; [`Error::InvalidInput`] for a bad type name.
/// - [`Error::InvalidInput`] when the event's [`DomainEvent::schema_version`] is not the end of
///   its type's upcaster chain: stored, it would be upcast again on every read (a shape
///   mis-read for good), so it is refused before it reaches the store. Also for a broken chain.
pub fn encode<E: DomainEvent>(event: &E, context: &CommandContext) -> Result<EventData, Error> {
    let current = Decoder::<E>::new()?.current_version(event.event_type());
    if event.schema_version() != current {
        return Err(Error::InvalidInput {
            what: format!("event of type {:?}", event.event_type()),
            reason: format!(
                "schema_version() is {}, but the type's upcasters read it at {current}",
                event.schema_version()
            ),
        });
    }
    let mut data = EventData::new(
        EventType::new(event.event_type())?,
        Payload::msgpack(event)?,
    )
    .with_schema_version(event.schema_version());
    data.metadata.correlation_id = context.correlation_id;
    data.metadata.causation_id = context.causation_id;
    for (k, v) in &context.headers {
        data.metadata.headers.insert(k.clone(), v.clone());
    }
    Ok(data)
}
