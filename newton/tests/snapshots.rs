//! Loading that does not grow with the stream: the repository's cache of recent aggregates and
//! snapshots kept in the event store. Every store here is a real one (photon-memory, or a server
//! named by `PHOTON_TEST_<KAFKA|CASSANDRA|MONGO>_URL`) behind a wrapper that counts the events
//! read, and fails snapshot reads or writes where a test asks it to.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use newton::store::{
    error_stream, AppendResult, Capabilities, EventData, EventStore, EventStoreExt,
    ExpectedVersion, Health, ReadOptions, Selector, Start, SubscriptionItem, SubscriptionMode,
};
use newton::{
    snapshot_stream, Aggregate, CacheOptions, Category, CommandContext, Error, ExecuteError,
    RecordedEvent, Repository, SnapshotPolicy, StreamId, Version, SNAPSHOT_CATEGORY,
    SNAPSHOT_EVENT_TYPE,
};
use photon_memory::MemoryStore;
use serde::{Deserialize, Serialize};
use support::{fresh_id, Tally, TallyCommand, TallyError, TallyEvent};

// ---- A real store that counts -------------------------------------------------------------

#[derive(Default, Debug)]
struct Counts {
    /// Events read from aggregate streams (not snapshot streams).
    events_read: AtomicU64,
    /// Events read from snapshot streams.
    snapshots_read: AtomicU64,
    /// Appends to snapshot streams tried.
    snapshot_writes: AtomicU64,
    fail_snapshot_writes: AtomicBool,
    /// Appends to snapshot streams never answer: a store that is slow or gone after the
    /// command's own append.
    hang_snapshot_writes: AtomicBool,
    /// Appends to aggregate streams take 50 ms: commands on one stream overlap.
    slow_appends: AtomicBool,
    fail_snapshot_reads: AtomicBool,
    /// Appended to its stream just before the next append to that stream: another writer
    /// getting in between a command's read and its append.
    interloper: Mutex<Option<(StreamId, EventData)>>,
}

impl Counts {
    fn events_read(&self) -> u64 {
        self.events_read.swap(0, Ordering::SeqCst)
    }
    fn snapshots_read(&self) -> u64 {
        self.snapshots_read.swap(0, Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Counting {
    inner: Arc<dyn EventStore>,
    counts: Arc<Counts>,
}

fn counting(inner: Arc<dyn EventStore>) -> (Arc<dyn EventStore>, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    (
        Arc::new(Counting {
            inner,
            counts: counts.clone(),
        }),
        counts,
    )
}

fn is_snapshot(stream: &StreamId) -> bool {
    stream.category_name() == SNAPSHOT_CATEGORY
}

#[async_trait]
impl EventStore for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        if is_snapshot(stream) {
            self.counts.snapshot_writes.fetch_add(1, Ordering::SeqCst);
            if self.counts.hang_snapshot_writes.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            if self.counts.fail_snapshot_writes.load(Ordering::SeqCst) {
                return Err(Error::Unavailable {
                    backend: "counting",
                    message: format!("{stream}: snapshot writes fail in this test"),
                    source: None,
                });
            }
        }
        if !is_snapshot(stream) && self.counts.slow_appends.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let interloper = {
            let mut slot = self.counts.interloper.lock().unwrap();
            match slot.take() {
                Some((s, e)) if &s == stream => Some(e),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some(e) = interloper {
            self.inner
                .append(stream, ExpectedVersion::Any, vec![e])
                .await?;
        }
        self.inner.append(stream, expected, events).await
    }
    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        let snapshot = is_snapshot(stream);
        if snapshot && self.counts.fail_snapshot_reads.load(Ordering::SeqCst) {
            return error_stream(Error::Unavailable {
                backend: "counting",
                message: format!("{stream}: snapshot reads fail in this test"),
                source: None,
            });
        }
        let counts = self.counts.clone();
        self.inner
            .read_stream(stream, options)
            .inspect(move |item| {
                if item.is_ok() {
                    let counter = if snapshot {
                        &counts.snapshots_read
                    } else {
                        &counts.events_read
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })
            .boxed()
    }
    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
        self.inner.subscribe(selector, start, mode)
    }
    async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
        self.inner.stream_version(stream).await
    }
    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        self.inner.list_categories().await
    }
    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        self.inner.list_streams(category)
    }
    async fn health(&self) -> Result<Health, Error> {
        self.inner.health().await
    }
    async fn load_register(&self, name: &str) -> Result<Option<newton::store::Register>, Error> {
        self.inner.load_register(name).await
    }
    async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: newton::store::Uuid,
        value: newton::store::Bytes,
    ) -> Result<u64, Error> {
        self.inner
            .save_register(name, expected, save_id, value)
            .await
    }
}

fn memory() -> Arc<dyn EventStore> {
    Arc::new(MemoryStore::new())
}

/// Adds 1, 2, ..., n to `id` through `repo`; the total is n(n+1)/2. Each command waits for the
/// snapshot it started (in a task of its own) to be written, so the next one finds it, as it
/// would a moment later in a service.
async fn add_up_to(repo: &Repository<Tally>, id: &str, n: u64) {
    for i in 1..=n {
        repo.execute(id, &TallyCommand::Add(i)).await.unwrap();
        repo.flush_snapshots().await;
    }
}

fn tally(n: u64) -> Tally {
    Tally {
        total: n * (n + 1) / 2,
        entries: n as u32,
    }
}

fn no_cache() -> CacheOptions {
    CacheOptions::disabled()
}

// ---- Snapshots ----------------------------------------------------------------------------

/// Snapshots every 10 events; 25 events stored leave snapshots at versions 9 and 19, and a cold
/// load reads the one at 19 and the 5 events after it.
async fn load_reads_the_latest_snapshot_and_the_tail(store: Arc<dyn EventStore>) {
    let (store, counts) = counting(store);
    let writer = Repository::<Tally>::new(store.clone())
        .with_cache(no_cache())
        .with_snapshots(SnapshotPolicy::EveryEvents(10));
    let id = fresh_id();
    add_up_to(&writer, &id, 25).await;
    assert_eq!(counts.snapshot_writes.load(Ordering::SeqCst), 2);
    let stream = writer.stream_of(&id).unwrap();
    let snapshots = store
        .read_to_vec(&snapshot_stream(&stream), ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(snapshots[1].event_type.as_str(), SNAPSHOT_EVENT_TYPE);
    assert_eq!(snapshots[1].schema_version, Tally::SNAPSHOT_VERSION);

    // A new repository (an empty cache), as a new process would have.
    let reader =
        Repository::<Tally>::new(store.clone()).with_snapshots(SnapshotPolicy::EveryEvents(10));
    counts.events_read();
    counts.snapshots_read();
    let loaded = reader.load(&id).await.unwrap();
    assert_eq!(loaded.state, tally(25));
    assert_eq!(loaded.version, Some(Version(24)));
    assert_eq!(counts.snapshots_read(), 1, "the latest snapshot only");
    assert_eq!(
        counts.events_read(),
        6,
        "version 19 (checked against the snapshot) and 20 to 24 only"
    );

    // The aggregate stream holds the events only; snapshots are in a category of their own.
    assert_eq!(
        store
            .read_to_vec(&stream, ReadOptions::forwards())
            .await
            .unwrap()
            .len(),
        25
    );
    assert_eq!(snapshot_stream(&stream).category_name(), SNAPSHOT_CATEGORY);
}

#[tokio::test]
async fn memory_load_reads_the_latest_snapshot_and_the_tail() {
    load_reads_the_latest_snapshot_and_the_tail(memory()).await;
}

#[tokio::test]
async fn views_of_the_category_never_see_snapshots() {
    let store = memory();
    let repo =
        Repository::<Tally>::new(store.clone()).with_snapshots(SnapshotPolicy::EveryEvents(2));
    let id = fresh_id();
    add_up_to(&repo, &id, 7).await;
    let category = store
        .replay_to_vec(
            Selector::Category(Category::new(Tally::CATEGORY).unwrap()),
            Start::Beginning,
        )
        .await
        .unwrap();
    assert_eq!(category.len(), 7);
    assert!(category.iter().all(|e| e.event_type.as_str() == "Added"));
    let snapshots = store
        .replay_to_vec(
            Selector::Category(Category::new(SNAPSHOT_CATEGORY).unwrap()),
            Start::Beginning,
        )
        .await
        .unwrap();
    assert_eq!(snapshots.len(), 3, "at versions 1, 3 and 5");
}

/// Tally with another state shape version: reads the same events, must not use v1 snapshots.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TallyV2(Tally);

impl Aggregate for TallyV2 {
    const CATEGORY: &'static str = Tally::CATEGORY;
    const SNAPSHOT_VERSION: u32 = 2;
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = TallyError;
    fn handle(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, TallyError> {
        self.0.handle(command)
    }
    fn apply(&mut self, event: &TallyEvent) {
        self.0.apply(event);
        // A changed meaning with the same shape: a v1 snapshot would decode, and be wrong.
        self.0.entries += 1;
    }
}

#[tokio::test]
async fn a_snapshot_of_another_state_version_is_replayed_over() {
    let (store, counts) = counting(memory());
    let v1 = Repository::<Tally>::new(store.clone()).with_snapshots(SnapshotPolicy::EveryEvents(5));
    let id = fresh_id();
    add_up_to(&v1, &id, 12).await;
    counts.events_read();

    let v2 =
        Repository::<TallyV2>::new(store.clone()).with_snapshots(SnapshotPolicy::EveryEvents(5));
    let loaded = v2.load(&id).await.unwrap();
    assert_eq!(loaded.state.0.total, tally(12).total);
    assert_eq!(
        loaded.state.0.entries, 24,
        "every event applied by v2's apply"
    );
    assert_eq!(
        counts.events_read(),
        12,
        "the whole stream: the v1 snapshot is not used"
    );

    // v2's next command takes a v2 snapshot (13 events since none of its own), which a new v2
    // repository then loads from.
    v2.execute(&id, &TallyCommand::Add(13)).await.unwrap();
    v2.flush_snapshots().await;
    let again =
        Repository::<TallyV2>::new(store.clone()).with_snapshots(SnapshotPolicy::EveryEvents(5));
    counts.events_read();
    let loaded = again.load(&id).await.unwrap();
    assert_eq!(loaded.state.0.entries, 26);
    assert_eq!(
        counts.events_read(),
        1,
        "the v2 snapshot is at the head: only its own version is read, to check it"
    );
}

#[tokio::test]
async fn unusable_snapshots_are_ignored_not_errors() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Tally>::new(store.clone())
        .with_cache(no_cache())
        .with_snapshots(SnapshotPolicy::EveryEvents(1_000));
    let id = fresh_id();
    add_up_to(&repo, &id, 4).await;
    let stream = repo.stream_of(&id).unwrap();
    let other = repo.stream_of(&fresh_id()).unwrap();

    #[derive(Serialize)]
    struct Body<'a> {
        stream: &'a str,
        version: u64,
        state: Tally,
    }
    let garbage = [
        // Not MessagePack of a snapshot at all.
        EventData::json(SNAPSHOT_EVENT_TYPE, &serde_json::json!({"nonsense": true})).unwrap(),
        // A snapshot, but of another stream (as a hashed name shared by two streams would be).
        EventData::msgpack(
            SNAPSHOT_EVENT_TYPE,
            &Body {
                stream: other.as_str(),
                version: 3,
                state: tally(100),
            },
        )
        .unwrap(),
        // Another event type in the snapshot stream.
        EventData::msgpack(
            "SomethingElse",
            &Body {
                stream: stream.as_str(),
                version: 3,
                state: tally(100),
            },
        )
        .unwrap(),
    ];
    for bad in garbage {
        store
            .append(&snapshot_stream(&stream), ExpectedVersion::Any, vec![bad])
            .await
            .unwrap();
        counts.events_read();
        let loaded = repo.load(&id).await.unwrap();
        assert_eq!(loaded.state, tally(4));
        assert_eq!(counts.events_read(), 4, "replayed from the start");
        let done = repo.execute(&id, &TallyCommand::Touch).await.unwrap();
        assert_eq!(done.state, tally(4));
    }
}

#[tokio::test]
async fn a_failed_snapshot_read_falls_back_to_the_events() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Tally>::new(store.clone())
        .with_cache(no_cache())
        .with_snapshots(SnapshotPolicy::EveryEvents(3));
    let id = fresh_id();
    add_up_to(&repo, &id, 7).await;
    counts.fail_snapshot_reads.store(true, Ordering::SeqCst);
    counts.events_read();
    let loaded = repo.load(&id).await.unwrap();
    assert_eq!(loaded.state, tally(7));
    assert_eq!(counts.events_read(), 7);
    repo.execute(&id, &TallyCommand::Add(8)).await.unwrap();
    assert_eq!(repo.load(&id).await.unwrap().state, tally(8));
}

#[tokio::test]
async fn a_failed_snapshot_write_never_fails_the_command() {
    let (store, counts) = counting(memory());
    counts.fail_snapshot_writes.store(true, Ordering::SeqCst);
    let repo =
        Repository::<Tally>::new(store.clone()).with_snapshots(SnapshotPolicy::EveryEvents(5));
    let id = fresh_id();
    for i in 1..=12 {
        let done = repo.execute(&id, &TallyCommand::Add(i)).await.unwrap();
        assert_eq!(done.state, tally(i));
    }
    repo.flush_snapshots().await;
    // Tried at versions 4 and 9: after a failure, again after as many events again.
    assert_eq!(counts.snapshot_writes.load(Ordering::SeqCst), 2);
    let stream = repo.stream_of(&id).unwrap();
    assert_eq!(
        store
            .stream_version(&snapshot_stream(&stream))
            .await
            .unwrap(),
        None
    );
    // The cache kept the stored state all along.
    assert_eq!(repo.load(&id).await.unwrap().state, tally(12));
}

/// A state that serde refuses to encode: snapshots fail before reaching the store.
#[derive(Default, Debug, Clone, Deserialize)]
struct Unencodable(Tally);

impl Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this state refuses to encode"))
    }
}

impl Aggregate for Unencodable {
    const CATEGORY: &'static str = Tally::CATEGORY;
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = TallyError;
    fn handle(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, TallyError> {
        self.0.handle(command)
    }
    fn apply(&mut self, event: &TallyEvent) {
        self.0.apply(event)
    }
}

#[tokio::test]
async fn a_snapshot_that_does_not_encode_never_fails_the_command() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Unencodable>::new(store).with_snapshots(SnapshotPolicy::EveryEvents(1));
    let id = fresh_id();
    for i in 1..=3 {
        assert_eq!(
            repo.execute(&id, &TallyCommand::Add(i))
                .await
                .unwrap()
                .state
                .0,
            tally(i)
        );
    }
    assert_eq!(counts.snapshot_writes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_too_large_snapshot_never_fails_the_command() {
    // A state whose snapshot passes the store's event size limit.
    #[derive(Default, Debug, Clone, Serialize, Deserialize)]
    struct Big(Vec<u64>);
    impl Aggregate for Big {
        const CATEGORY: &'static str = "big";
        type Command = u64;
        type Event = TallyEvent;
        type Error = TallyError;
        fn handle(&self, n: &u64) -> Result<Vec<TallyEvent>, TallyError> {
            Ok(vec![TallyEvent::Added { amount: *n }])
        }
        fn apply(&mut self, TallyEvent::Added { amount }: &TallyEvent) {
            self.0
                .extend(std::iter::repeat_n(u64::MAX, *amount as usize));
        }
    }
    let inner = newton::connect("memory://?max_event_size=2048")
        .await
        .unwrap();
    let (store, counts) = counting(inner);
    let repo = Repository::<Big>::new(store).with_snapshots(SnapshotPolicy::EveryEvents(1));
    let done = repo.execute("a", &1_000).await.unwrap();
    assert_eq!(done.state.0.len(), 1_000);
    repo.flush_snapshots().await;
    assert_eq!(counts.snapshot_writes.load(Ordering::SeqCst), 1);
    assert_eq!(repo.load("a").await.unwrap().state.0.len(), 1_000);
}

#[tokio::test]
async fn long_stream_names_get_a_hashed_snapshot_stream_that_works() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Tally>::new(store.clone())
        .with_cache(no_cache())
        .with_snapshots(SnapshotPolicy::EveryEvents(4));
    let id = format!(
        "{}{}",
        fresh_id(),
        "x".repeat(newton::store::MAX_ID_LEN - 32)
    );
    add_up_to(&repo, &id, 6).await;
    let stream = repo.stream_of(&id).unwrap();
    assert!(snapshot_stream(&stream).id().contains("-@"));
    counts.events_read();
    assert_eq!(repo.load(&id).await.unwrap().state, tally(6));
    assert_eq!(
        counts.events_read(),
        3,
        "the snapshot's version 3 (checked) and what is after it"
    );
}

#[tokio::test]
async fn a_custom_policy_decides_when() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Tally>::new(store)
        .with_snapshots(SnapshotPolicy::When(|due| due.version.value() == 4));
    add_up_to(&repo, &fresh_id(), 8).await;
    assert_eq!(counts.snapshot_writes.load(Ordering::SeqCst), 1);
}

// ---- The cache ----------------------------------------------------------------------------

/// With the cache, a command reads only the events after the cached version: none when this
/// repository wrote last.
async fn commands_read_only_the_tail(store: Arc<dyn EventStore>) {
    let (store, counts) = counting(store);
    let repo = Repository::<Tally>::new(store.clone());
    let id = fresh_id();
    add_up_to(&repo, &id, 20).await;
    assert_eq!(counts.events_read(), 0, "this repository wrote every event");
    assert_eq!(repo.cache_usage().entries, 1);
    assert_eq!(repo.load(&id).await.unwrap().state, tally(20));
    assert_eq!(counts.events_read(), 0);

    // Without a cache every command replays the stream.
    let uncached = Repository::<Tally>::new(store).with_cache(no_cache());
    uncached.execute(&id, &TallyCommand::Add(21)).await.unwrap();
    assert_eq!(counts.events_read(), 20);
    assert_eq!(uncached.cache_usage().entries, 0);
}

#[tokio::test]
async fn memory_commands_read_only_the_tail() {
    commands_read_only_the_tail(memory()).await;
}

/// Two repositories (two processes) on one stream: each one's cached state goes stale when the
/// other writes. The stale one reads what it missed; when the other writes between its read and
/// its append, the store refuses, it reads the one new event (not the whole stream) and decides
/// again. No update is lost.
async fn a_stale_cache_reads_what_it_missed(
    first: Arc<dyn EventStore>,
    second: Arc<dyn EventStore>,
) {
    let (first, counts) = counting(first);
    let a = Repository::<Tally>::new(first);
    let b = Repository::<Tally>::new(second);
    let id = fresh_id();
    add_up_to(&a, &id, 3).await; // 1 + 2 + 3, cached by a at version 2
    b.execute(&id, &TallyCommand::Add(4)).await.unwrap();
    b.execute(&id, &TallyCommand::Add(5)).await.unwrap();
    counts.events_read();

    let done = a.execute(&id, &TallyCommand::Add(6)).await.unwrap();
    assert_eq!(done.state, tally(6));
    assert_eq!(done.version, Some(Version(5)));
    assert_eq!(done.attempts, 1);
    assert_eq!(counts.events_read(), 2, "versions 3 and 4, which b wrote");

    // Another writer gets in between a's read and a's append.
    let stream = a.stream_of(&id).unwrap();
    let other =
        newton::encode(&TallyEvent::Added { amount: 7 }, &CommandContext::default()).unwrap();
    *counts.interloper.lock().unwrap() = Some((stream, other));
    let done = a.execute(&id, &TallyCommand::Add(8)).await.unwrap();
    assert_eq!(done.attempts, 2);
    assert_eq!(done.state, tally(8));
    assert_eq!(done.version, Some(Version(7)));
    assert_eq!(
        counts.events_read(),
        1,
        "only the interloper's event, read on the retry"
    );
    assert_eq!(b.load(&id).await.unwrap().state, tally(8));
}

#[tokio::test]
async fn memory_a_stale_cache_reads_what_it_missed() {
    let shared = MemoryStore::new();
    a_stale_cache_reads_what_it_missed(Arc::new(shared.clone()), Arc::new(shared)).await;
}

#[tokio::test]
async fn the_cache_is_bounded_in_entries() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Tally>::new(store).with_cache(CacheOptions {
        max_entries: 3,
        max_bytes: usize::MAX,
    });
    let ids: Vec<String> = (0..5).map(|_| fresh_id()).collect();
    for id in &ids {
        add_up_to(&repo, id, 2).await;
    }
    let usage = repo.cache_usage();
    assert_eq!((usage.entries, usage.evictions), (3, 2));
    counts.events_read();
    // The least recently used went first: the first stream is read again in full, the last not.
    repo.execute(&ids[4], &TallyCommand::Add(3)).await.unwrap();
    assert_eq!(counts.events_read(), 0);
    repo.execute(&ids[0], &TallyCommand::Add(3)).await.unwrap();
    assert_eq!(counts.events_read(), 2);
    assert_eq!(repo.cache_usage().entries, 3);
}

#[tokio::test]
async fn the_cache_is_bounded_in_bytes() {
    let store = memory();
    let probe = Repository::<Tally>::new(store.clone());
    probe
        .execute(&fresh_id(), &TallyCommand::Add(1))
        .await
        .unwrap();
    let one = probe.cache_usage().bytes;
    assert!(one > std::mem::size_of::<Tally>(), "{one}");

    let repo = Repository::<Tally>::new(store.clone()).with_cache(CacheOptions {
        max_entries: 1_000,
        max_bytes: one * 2 + one / 2,
    });
    for _ in 0..4 {
        repo.execute(&fresh_id(), &TallyCommand::Add(1))
            .await
            .unwrap();
    }
    let usage = repo.cache_usage();
    assert_eq!(
        (usage.entries, usage.bytes, usage.evictions),
        (2, 2 * one, 2)
    );

    // A state larger than the whole bound is not kept at all.
    let tiny = Repository::<Tally>::new(store).with_cache(CacheOptions {
        max_entries: 1_000,
        max_bytes: one - 1,
    });
    tiny.execute(&fresh_id(), &TallyCommand::Add(1))
        .await
        .unwrap();
    assert_eq!(tiny.cache_usage().entries, 0);
}

#[tokio::test]
async fn cached_size_counts_what_the_state_holds() {
    #[derive(Default, Debug, Clone)]
    struct Names(Vec<String>);
    impl Aggregate for Names {
        const CATEGORY: &'static str = "names";
        type Command = u64;
        type Event = TallyEvent;
        type Error = TallyError;
        fn handle(&self, n: &u64) -> Result<Vec<TallyEvent>, TallyError> {
            Ok(vec![TallyEvent::Added { amount: *n }])
        }
        fn apply(&mut self, TallyEvent::Added { amount }: &TallyEvent) {
            self.0.push("n".repeat(*amount as usize));
        }
        fn cached_size(&self) -> usize {
            std::mem::size_of::<Self>() + self.0.iter().map(|s| 24 + s.capacity()).sum::<usize>()
        }
    }
    let repo = Repository::<Names>::new(memory()).with_cache(CacheOptions {
        max_entries: 1_000,
        max_bytes: 10_000,
    });
    repo.execute("small", &10).await.unwrap();
    assert_eq!(repo.cache_usage().entries, 1);
    repo.execute("large", &20_000).await.unwrap();
    assert_eq!(
        repo.cache_usage().entries,
        1,
        "the 20 kB state is over the bound"
    );
}

#[tokio::test]
async fn a_refusal_keeps_the_cached_state_and_an_undecodable_tail_drops_it() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Tally>::new(store.clone());
    let id = fresh_id();
    add_up_to(&repo, &id, 3).await;
    assert!(matches!(
        repo.execute(&id, &TallyCommand::Add(0)).await,
        Err(ExecuteError::Rejected { .. })
    ));
    assert_eq!(repo.cache_usage().entries, 1);
    assert_eq!(counts.events_read(), 0);

    // Another writer stores an event that does not decode: the error is the store's, and the
    // half-brought-forward state is not kept.
    let stream = repo.stream_of(&id).unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![EventData::json("Added", &serde_json::json!({"Added": {"amount": "x"}})).unwrap()],
        )
        .await
        .unwrap();
    assert!(matches!(
        repo.execute(&id, &TallyCommand::Add(1)).await,
        Err(ExecuteError::Store(Error::Decode { .. }))
    ));
    assert_eq!(repo.cache_usage().entries, 0);
    assert!(matches!(repo.load(&id).await, Err(Error::Decode { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clones_share_the_cache_and_concurrent_commands_all_land() {
    let store = memory();
    let repo = Repository::<Tally>::new(store.clone()).with_retry(newton::RetryPolicy {
        max_attempts: 100,
        initial_backoff: std::time::Duration::from_micros(100),
    });
    let id = fresh_id();
    let tasks: Vec<_> = (1..=32u64)
        .map(|n| {
            let (repo, id) = (repo.clone(), id.clone());
            tokio::spawn(async move { repo.execute(&id, &TallyCommand::Add(n)).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(repo.cache_usage().entries, 1);
    assert_eq!(repo.load(&id).await.unwrap().state, tally(32));
    let fresh = Repository::<Tally>::new(store);
    assert_eq!(fresh.load(&id).await.unwrap().state, tally(32));
}

// ---- The same on the server backends ------------------------------------------------------

/// Stores of the servers named by `PHOTON_TEST_<BACKEND>_URL` and compiled in; an unset variable
/// skips that backend with a line saying which to set, unless `PHOTON_TEST_REQUIRE` names it.
#[allow(unused_mut, clippy::vec_init_then_push)]
async fn servers() -> Vec<(&'static str, String)> {
    let mut compiled: Vec<(&'static str, &'static str)> = Vec::new();
    #[cfg(feature = "kafka")]
    compiled.push(("kafka", "PHOTON_TEST_KAFKA_URL"));
    #[cfg(feature = "cassandra")]
    compiled.push(("cassandra", "PHOTON_TEST_CASSANDRA_URL"));
    #[cfg(feature = "mongo")]
    compiled.push(("mongo", "PHOTON_TEST_MONGO_URL"));
    let required = std::env::var("PHOTON_TEST_REQUIRE").unwrap_or_default();
    let mut urls = Vec::new();
    for (backend, var) in compiled {
        match std::env::var(var) {
            Ok(url) if !url.trim().is_empty() => {
                let mut url = url.trim().to_owned();
                if backend == "cassandra" {
                    // The bucket size is the keyspace's, and the conformance suite made the test
                    // keyspace with 16 (which also makes these streams span buckets).
                    url.push(if url.contains('?') { '&' } else { '?' });
                    url.push_str("bucket_size=16&settle_ms=250");
                }
                urls.push((backend, url))
            }
            _ if required.split(',').any(|r| r.trim() == backend) => {
                panic!("PHOTON_TEST_REQUIRE names {backend}, but {var} is not set")
            }
            _ => println!("skipping {backend}: set {var} to run against a real server"),
        }
    }
    urls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_snapshots_and_cache() {
    for (backend, url) in servers().await {
        println!("{backend}: snapshot + tail");
        load_reads_the_latest_snapshot_and_the_tail(newton::connect(&url).await.unwrap()).await;
        println!("{backend}: commands read the tail only");
        commands_read_only_the_tail(newton::connect(&url).await.unwrap()).await;
        println!("{backend}: snapshots checked against their stream");
        a_snapshot_ahead_of_its_stream_is_dropped(newton::connect(&url).await.unwrap()).await;
        a_snapshot_at_the_last_version_there_is_is_dropped(newton::connect(&url).await.unwrap())
            .await;
        a_snapshot_after_another_event_is_dropped(newton::connect(&url).await.unwrap()).await;
        a_snapshot_that_matches_its_stream_is_used(newton::connect(&url).await.unwrap()).await;
        println!("{backend}: two commands at once share the cache entry");
        concurrent_commands_on_one_stream_both_use_the_cache(newton::connect(&url).await.unwrap())
            .await;
        println!("{backend}: a stale cache, two clients");
        a_stale_cache_reads_what_it_missed(
            newton::connect(&url).await.unwrap(),
            newton::connect(&url).await.unwrap(),
        )
        .await;
    }
}

/// An event serde refuses to encode: the command fails with the store's `Encode` error, and the
/// cached state (still the stored one) stays for the next command.
#[derive(Debug, Clone, Deserialize)]
enum Refusing {
    Fine,
    Broken,
}

impl Serialize for Refusing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Refusing::Fine => s.serialize_unit_variant("Refusing", 0, "Fine"),
            Refusing::Broken => Err(serde::ser::Error::custom("this event refuses to encode")),
        }
    }
}

impl newton::DomainEvent for Refusing {
    fn event_type(&self) -> &'static str {
        "Refusing"
    }
}

#[derive(Default, Debug, Clone)]
struct Picky(u32);

impl Aggregate for Picky {
    const CATEGORY: &'static str = "picky";
    type Command = bool;
    type Event = Refusing;
    type Error = TallyError;
    fn handle(&self, broken: &bool) -> Result<Vec<Refusing>, TallyError> {
        Ok(vec![if *broken {
            Refusing::Broken
        } else {
            Refusing::Fine
        }])
    }
    fn apply(&mut self, _: &Refusing) {
        self.0 += 1;
    }
}

#[tokio::test]
async fn an_event_that_does_not_encode_fails_the_command_and_keeps_the_cache() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Picky>::new(store);
    let id = fresh_id();
    repo.execute(&id, &false).await.unwrap();
    assert!(matches!(
        repo.execute(&id, &true).await,
        Err(ExecuteError::Store(Error::Encode { .. }))
    ));
    assert_eq!(repo.cache_usage().entries, 1);
    counts.events_read();
    let done = repo.execute(&id, &false).await.unwrap();
    assert_eq!((done.state.0, done.version), (2, Some(Version(1))));
    assert_eq!(counts.events_read(), 0, "served from the cache");
}

#[tokio::test]
async fn after_too_many_conflicts_the_cache_holds_a_stored_state() {
    let (store, counts) = counting(memory());
    let repo = Repository::<Tally>::new(store).with_retry(newton::RetryPolicy {
        max_attempts: 1,
        initial_backoff: std::time::Duration::from_millis(1),
    });
    let id = fresh_id();
    add_up_to(&repo, &id, 2).await;
    let stream = repo.stream_of(&id).unwrap();
    let other =
        newton::encode(&TallyEvent::Added { amount: 3 }, &CommandContext::default()).unwrap();
    *counts.interloper.lock().unwrap() = Some((stream, other));
    assert!(matches!(
        repo.execute(&id, &TallyCommand::Add(100)).await,
        Err(ExecuteError::TooManyConflicts { attempts: 1, .. })
    ));
    assert_eq!(repo.cache_usage().entries, 1);
    counts.events_read();
    let done = repo.execute(&id, &TallyCommand::Add(4)).await.unwrap();
    assert_eq!(
        done.state,
        tally(4),
        "the interloper's 3 read, the refused 100 not applied"
    );
    assert_eq!(counts.events_read(), 1);
}

// ---- A snapshot is checked against the stream it claims ------------------------------------

/// A snapshot event as newton writes one, claiming `state` at `version` of `stream`, after the
/// event `event_id`: what a `photon copy` of the snapshot category before the aggregate's, a
/// restore, or any other writer may leave behind.
fn forged_snapshot(
    stream: &StreamId,
    version: u64,
    event_id: newton::Uuid,
    state: Tally,
) -> EventData {
    #[derive(Serialize)]
    struct Body<'a> {
        stream: &'a str,
        version: u64,
        event_id: newton::Uuid,
        aggregate: &'a str,
        state: Tally,
    }
    EventData::msgpack(
        SNAPSHOT_EVENT_TYPE,
        &Body {
            stream: stream.as_str(),
            version,
            event_id,
            aggregate: Tally::snapshot_name(),
            state,
        },
    )
    .unwrap()
    .with_schema_version(Tally::SNAPSHOT_VERSION)
}

/// Four events (versions 0 to 3) and then `snapshot` in the snapshot stream; a repository with
/// snapshots on and no cache, so every load starts from the snapshot.
async fn four_events_and(
    store: Arc<dyn EventStore>,
    snapshot: impl FnOnce(&StreamId, &[RecordedEvent]) -> EventData,
) -> (Repository<Tally>, Arc<Counts>, String) {
    let (store, counts) = counting(store);
    let plain = Repository::<Tally>::new(store.clone());
    let id = fresh_id();
    add_up_to(&plain, &id, 4).await;
    let stream = plain.stream_of(&id).unwrap();
    let events = store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();
    store
        .append(
            &snapshot_stream(&stream),
            ExpectedVersion::Any,
            vec![snapshot(&stream, &events)],
        )
        .await
        .unwrap();
    let repo = Repository::<Tally>::new(store)
        .with_cache(no_cache())
        .with_snapshots(SnapshotPolicy::EveryEvents(1_000));
    counts.events_read();
    (repo, counts, id)
}

/// The stream has versions 0 to 3; the snapshot says 10. Trusted, the state would be at a version
/// the stream does not have, and every command would lose its append until TooManyConflicts.
async fn a_snapshot_ahead_of_its_stream_is_dropped(store: Arc<dyn EventStore>) {
    let (repo, _counts, id) = four_events_and(store, |s, _| {
        forged_snapshot(s, 10, newton::Uuid::new_v4(), tally(10))
    })
    .await;
    let loaded = repo.load(&id).await.unwrap();
    assert_eq!((loaded.state, loaded.version), (tally(4), Some(Version(3))));
    let done = repo.execute(&id, &TallyCommand::Add(5)).await.unwrap();
    assert_eq!((done.state, done.version), (tally(5), Some(Version(4))));
}

#[tokio::test]
async fn memory_a_snapshot_ahead_of_its_stream_is_dropped() {
    a_snapshot_ahead_of_its_stream_is_dropped(memory()).await;
}

/// A version of u64::MAX: no overflow (a panic in debug, a wrap to version 0 in release that
/// would apply the whole stream on top of the snapshot).
async fn a_snapshot_at_the_last_version_there_is_is_dropped(store: Arc<dyn EventStore>) {
    let (repo, _counts, id) = four_events_and(store, |s, _| {
        forged_snapshot(s, u64::MAX, newton::Uuid::new_v4(), tally(1))
    })
    .await;
    let loaded = repo.load(&id).await.unwrap();
    assert_eq!((loaded.state, loaded.version), (tally(4), Some(Version(3))));
    let done = repo.execute(&id, &TallyCommand::Add(5)).await.unwrap();
    assert_eq!(done.state, tally(5));
}

#[tokio::test]
async fn memory_a_snapshot_at_the_last_version_there_is_is_dropped() {
    a_snapshot_at_the_last_version_there_is_is_dropped(memory()).await;
}

/// A snapshot at a version the stream has, but after another event than the one there (the
/// stream was deleted and written again, or the snapshot was copied from another store).
async fn a_snapshot_after_another_event_is_dropped(store: Arc<dyn EventStore>) {
    let (repo, counts, id) = four_events_and(store, |s, _| {
        forged_snapshot(s, 2, newton::Uuid::new_v4(), tally(100))
    })
    .await;
    let loaded = repo.load(&id).await.unwrap();
    assert_eq!(loaded.state, tally(4));
    assert_eq!(
        counts.events_read(),
        1 + 4,
        "the check of version 2, then the replay"
    );
}

#[tokio::test]
async fn memory_a_snapshot_after_another_event_is_dropped() {
    a_snapshot_after_another_event_is_dropped(memory()).await;
}

/// The same snapshot with the right event id is used: the event at its version and the tail are
/// read, nothing before.
async fn a_snapshot_that_matches_its_stream_is_used(store: Arc<dyn EventStore>) {
    let (repo, counts, id) = four_events_and(store, |s, events| {
        forged_snapshot(s, 2, events[2].event_id, tally(3))
    })
    .await;
    let loaded = repo.load(&id).await.unwrap();
    assert_eq!((loaded.state, loaded.version), (tally(4), Some(Version(3))));
    assert_eq!(counts.events_read(), 2, "versions 2 (the check) and 3");
}

#[tokio::test]
async fn memory_a_snapshot_that_matches_its_stream_is_used() {
    a_snapshot_that_matches_its_stream_is_used(memory()).await;
}

// ---- A snapshot is written off the command's path ------------------------------------------

/// The store takes the command's events and then never answers the snapshot append: execute
/// returns as soon as the events are stored, not after the snapshot write's deadline (a caller
/// with a timeout would drop the future and never learn its command was stored).
#[tokio::test]
async fn a_hanging_snapshot_write_never_holds_the_command() {
    let (store, counts) = counting(memory());
    counts.hang_snapshot_writes.store(true, Ordering::SeqCst);
    let repo =
        Repository::<Tally>::new(store.clone()).with_snapshots(SnapshotPolicy::EveryEvents(1));
    let id = fresh_id();
    for i in 1..=3 {
        let done = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            repo.execute(&id, &TallyCommand::Add(i)),
        )
        .await
        .expect("execute returns while the snapshot write hangs")
        .unwrap();
        assert_eq!(done.state, tally(i));
    }
    let stream = repo.stream_of(&id).unwrap();
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        Some(Version(2))
    );
    assert_eq!(
        Repository::<Tally>::new(store)
            .load(&id)
            .await
            .unwrap()
            .state,
        tally(3)
    );
}

// ---- Concurrent commands share the cache entry ---------------------------------------------

/// Two commands at once on one stream of 50 events in one process: both start from the cached
/// state and read only what is new (the loser of the append the one event of the winner),
/// instead of the second missing the cache while the first holds the entry and replaying the
/// whole stream.
async fn concurrent_commands_on_one_stream_both_use_the_cache(store: Arc<dyn EventStore>) {
    let (store, counts) = counting(store);
    let repo = Repository::<Tally>::new(store).with_retry(newton::RetryPolicy {
        max_attempts: 5,
        initial_backoff: std::time::Duration::from_millis(1),
    });
    let id = fresh_id();
    add_up_to(&repo, &id, 50).await;
    counts.events_read();
    counts.slow_appends.store(true, Ordering::SeqCst);
    let (a, b) = tokio::join!(
        repo.execute(&id, &TallyCommand::Add(51)),
        repo.execute(&id, &TallyCommand::Add(52))
    );
    let attempts = a.unwrap().attempts + b.unwrap().attempts;
    assert_eq!(attempts, 3, "one of the two lost its first append");
    let read = counts.events_read();
    assert_eq!(
        read, 1,
        "the winner's event, read by the loser; not the stream"
    );
    assert_eq!(repo.load(&id).await.unwrap().state, tally(52));
    assert_eq!(repo.cache_usage().entries, 1);
}

#[tokio::test]
async fn memory_concurrent_commands_on_one_stream_both_use_the_cache() {
    concurrent_commands_on_one_stream_both_use_the_cache(memory()).await;
}

// ---- newton's own categories are not an aggregate's ----------------------------------------

/// An aggregate in a category newton keeps its own streams in (`newton_snapshot`, `newton_view`,
/// anything `newton_`) would mix its events with newton's: refused, with an error naming it.
#[tokio::test]
async fn an_aggregate_in_a_reserved_category_is_refused() {
    #[derive(Default, Debug, Clone, Serialize, Deserialize)]
    struct Intruder(Tally);
    impl Aggregate for Intruder {
        const CATEGORY: &'static str = SNAPSHOT_CATEGORY;
        type Command = TallyCommand;
        type Event = TallyEvent;
        type Error = TallyError;
        fn handle(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, TallyError> {
            self.0.handle(command)
        }
        fn apply(&mut self, event: &TallyEvent) {
            self.0.apply(event);
        }
    }
    let store = memory();
    let repo = Repository::<Intruder>::new(store.clone());
    let refused = |e: &Error| matches!(e, Error::InvalidInput { what, .. } if what.contains(SNAPSHOT_CATEGORY));
    match repo.execute("tally-1", &TallyCommand::Add(1)).await {
        Err(ExecuteError::Store(e)) if refused(&e) => {}
        other => panic!("expected the category refused, got {other:?}"),
    }
    assert!(matches!(repo.load("tally-1").await, Err(e) if refused(&e)));
    assert!(
        store.list_categories().await.unwrap().is_empty(),
        "nothing written"
    );
    assert!(matches!(Repository::<Intruder>::try_new(store.clone()), Err(e) if refused(&e)));
    assert!(Repository::<Tally>::try_new(store).is_ok());
    for own in [SNAPSHOT_CATEGORY, newton::CHECKPOINT_CATEGORY] {
        assert!(own.starts_with(newton::RESERVED_CATEGORY_PREFIX), "{own}");
    }
}

// ---- A snapshot names the aggregate type that wrote it -------------------------------------

/// Another aggregate type on Tally's category, with the same SNAPSHOT_VERSION and a state that
/// decodes from Tally's snapshots, but another meaning: every amount counts twice.
#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DoubleTally(Tally);

impl Aggregate for DoubleTally {
    const CATEGORY: &'static str = Tally::CATEGORY;
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = TallyError;
    fn handle(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, TallyError> {
        self.0.handle(command)
    }
    fn apply(&mut self, TallyEvent::Added { amount }: &TallyEvent) {
        self.0.apply(&TallyEvent::Added { amount: 2 * amount });
    }
}

#[tokio::test]
async fn a_snapshot_of_another_aggregate_type_on_the_category_is_replayed_over() {
    let (store, counts) = counting(memory());
    let tallies = Repository::<Tally>::new(store.clone())
        .with_cache(no_cache())
        .with_snapshots(SnapshotPolicy::EveryEvents(5));
    let id = fresh_id();
    add_up_to(&tallies, &id, 10).await;
    counts.events_read();
    let doubles = Repository::<DoubleTally>::new(store.clone())
        .with_cache(no_cache())
        .with_snapshots(SnapshotPolicy::EveryEvents(5));
    let loaded = doubles.load(&id).await.unwrap();
    assert_eq!(loaded.state.0.total, 2 * tally(10).total);
    assert_eq!(counts.events_read(), 10, "Tally's snapshot is not used");
    // And each type still uses its own.
    assert_eq!(tallies.load(&id).await.unwrap().state, tally(10));
    assert_eq!(
        counts.events_read(),
        1,
        "the event at Tally's snapshot, checked"
    );
}
