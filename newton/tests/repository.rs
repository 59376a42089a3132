//! Repository behaviour: load by replay, execute with the store's version check, bounded retry.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use newton::store::{
    AppendResult, Capabilities, EventData, EventStore, EventStoreExt, ExpectedVersion, Health,
    ReadOptions, Selector, Start, SubscriptionItem, SubscriptionMode,
};
use newton::{
    Category, CommandContext, Error, ExecuteError, RecordedEvent, Repository, RetryPolicy,
    StreamId, Uuid, Version,
};
use photon_memory::MemoryStore;
use support::{fresh_id, store, Tally, TallyCommand, TallyError, TallyEvent};

#[tokio::test]
async fn execute_appends_once_and_load_replays() {
    let store = store();
    let repo = Repository::<Tally>::new(store.clone());
    let id = fresh_id();
    let first = repo.execute(&id, &TallyCommand::Add(2)).await.unwrap();
    assert_eq!(first.version, Some(Version(0)));
    assert_eq!(first.events, vec![TallyEvent::Added { amount: 2 }]);
    let second = repo.execute(&id, &TallyCommand::Add(5)).await.unwrap();
    assert_eq!((second.state.total, second.version), (7, Some(Version(1))));

    let loaded = repo.load(&id).await.unwrap();
    assert_eq!(
        loaded.state,
        Tally {
            total: 7,
            entries: 2
        }
    );
    assert_eq!(loaded.version, Some(Version(1)));

    // The aggregate stream is written once per event; the category stream comes from the store.
    let stream = repo.stream_of(&id).unwrap();
    let events = store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].event_type.as_str(), "Added");
    let category = store
        .replay_to_vec(
            Selector::Category(Category::new("tally").unwrap()),
            Start::Beginning,
        )
        .await
        .unwrap();
    assert_eq!(category.iter().filter(|e| e.stream == stream).count(), 2);
}

#[tokio::test]
async fn refusal_and_no_op_store_nothing() {
    let store = store();
    let repo = Repository::<Tally>::new(store.clone());
    let id = fresh_id();
    match repo.execute(&id, &TallyCommand::Add(0)).await {
        Err(ExecuteError::Rejected { stream, source }) => {
            assert_eq!(stream.id(), id);
            assert_eq!(source, TallyError::Zero);
        }
        other => panic!("{other:?}"),
    }
    let touched = repo.execute(&id, &TallyCommand::Touch).await.unwrap();
    assert!(touched.events.is_empty());
    assert_eq!(touched.version, None);
    assert_eq!(
        store
            .stream_version(&repo.stream_of(&id).unwrap())
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn context_is_stamped_on_every_event() {
    let store = store();
    let repo = Repository::<Tally>::new(store.clone());
    let id = fresh_id();
    let context = CommandContext {
        correlation_id: Some(Uuid::new_v4()),
        causation_id: Some(Uuid::new_v4()),
        headers: vec![("user".into(), "ada".into())],
    };
    repo.execute_with(&id, &TallyCommand::Add(1), &context)
        .await
        .unwrap();
    let e = store
        .read_to_vec(&repo.stream_of(&id).unwrap(), ReadOptions::forwards())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(e.metadata.correlation_id, context.correlation_id);
    assert_eq!(e.metadata.causation_id, context.causation_id);
    assert_eq!(e.metadata.headers.get("user"), Some("ada"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_from_separate_clients_all_land() {
    let shared = MemoryStore::new();
    let id = fresh_id();
    let mut tasks = Vec::new();
    for n in 1..=16u64 {
        let client: Arc<dyn EventStore> = Arc::new(shared.clone());
        let repo = Repository::<Tally>::new(client).with_retry(RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_micros(100),
        });
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            repo.execute(&id, &TallyCommand::Add(n)).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let repo = Repository::<Tally>::new(Arc::new(shared));
    let loaded = repo.load(&id).await.unwrap();
    assert_eq!(loaded.state.total, (1..=16).sum::<u64>());
    assert_eq!(loaded.version, Some(Version(15)));
}

type AppendFuture = futures::future::BoxFuture<'static, Result<AppendResult, Error>>;

/// The in-memory store with its `append` replaced, to stage what a real server does at the worst
/// moment (another writer getting in first, an answer lost after the write landed).
struct StagedStore {
    inner: MemoryStore,
    append: Box<
        dyn Fn(MemoryStore, StreamId, ExpectedVersion, Vec<EventData>) -> AppendFuture
            + Send
            + Sync,
    >,
}

impl std::fmt::Debug for StagedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedStore")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl EventStore for StagedStore {
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
        (self.append)(self.inner.clone(), stream.clone(), expected, events).await
    }
    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        self.inner.read_stream(stream, options)
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

/// Another writer always gets in between a load and an append.
fn interloper(inner: MemoryStore) -> StagedStore {
    StagedStore {
        inner,
        append: Box::new(|inner, stream, expected, events| {
            Box::pin(async move {
                let other = newton::encode(
                    &TallyEvent::Added { amount: 1000 },
                    &CommandContext::default(),
                )?;
                inner
                    .append(&stream, ExpectedVersion::Any, vec![other])
                    .await?;
                inner.append(&stream, expected, events).await
            })
        }),
    }
}

#[tokio::test]
async fn retries_are_bounded_and_store_nothing_of_the_command() {
    let inner = MemoryStore::new();
    let repo =
        Repository::<Tally>::new(Arc::new(interloper(inner.clone()))).with_retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
        });
    let id = fresh_id();
    match repo.execute(&id, &TallyCommand::Add(1)).await {
        Err(ExecuteError::TooManyConflicts { stream, attempts }) => {
            assert_eq!(stream.id(), id);
            assert_eq!(attempts, 3);
        }
        other => panic!("{other:?}"),
    }
    // Only the interloper's three events landed, none of ours.
    let events = inner
        .read_to_vec(&repo.stream_of(&id).unwrap(), ReadOptions::forwards())
        .await
        .unwrap();
    let amounts: Vec<u64> = events
        .iter()
        .map(|e| match e.decode::<TallyEvent>().unwrap() {
            TallyEvent::Added { amount } => amount,
        })
        .collect();
    assert_eq!(amounts, vec![1000, 1000, 1000]);
}

#[tokio::test]
async fn undecodable_history_and_bad_ids_are_typed_errors() {
    let store = store();
    let repo = Repository::<Tally>::new(store.clone());
    let id = fresh_id();
    let stream = repo.stream_of(&id).unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![
                EventData::json("Added", &serde_json::json!({"Added": {"amount": "lots"}}))
                    .unwrap(),
            ],
        )
        .await
        .unwrap();
    match repo.load(&id).await {
        Err(Error::Decode {
            stream: s,
            version,
            event_type,
            ..
        }) => {
            assert_eq!(
                (s, version, event_type.as_str()),
                (stream.clone(), Version(0), "Added")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        repo.execute(&id, &TallyCommand::Add(1)).await,
        Err(ExecuteError::Store(Error::Decode { .. }))
    ));
    assert!(matches!(
        repo.load("has space").await,
        Err(Error::InvalidInput { .. })
    ));
    // The stored event is untouched.
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        Some(Version(0))
    );
}

/// The first append lands but answers `Unavailable`, like a timeout after the write.
fn lost_first_answer(inner: MemoryStore) -> StagedStore {
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    StagedStore {
        inner,
        append: Box::new(move |inner, stream, expected, events| {
            let failed_once = failed_once.clone();
            Box::pin(async move {
                let result = inner.append(&stream, expected, events).await?;
                if !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    return Err(Error::Unavailable {
                        backend: "memory",
                        message: "timed out waiting for the answer".into(),
                        source: None,
                    });
                }
                Ok(result)
            })
        }),
    }
}

#[tokio::test]
async fn a_lost_answer_is_resent_with_the_same_ids_and_stored_once() {
    let inner = MemoryStore::new();
    let repo = Repository::<Tally>::new(Arc::new(lost_first_answer(inner.clone())));
    let id = fresh_id();
    let done = repo.execute(&id, &TallyCommand::Add(4)).await.unwrap();
    assert_eq!(done.version, Some(Version(0)));
    assert_eq!(done.state.total, 4);
    let stored = inner
        .read_to_vec(&repo.stream_of(&id).unwrap(), ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "the re-sent events were stored twice");
}
