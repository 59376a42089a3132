//! Newton on a memory store that plays production's weaker guarantees
//! (`memory://?faults=production&seed=…`): appends answered `Unavailable` before or after they
//! landed, category subscriptions ordered per partition only, delivered after a settle delay and
//! dropped now and then. Commands must still be recorded once each, and views must end with the
//! same state as on the strong store.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use newton::store::{
    AppendResult, Capabilities, EventData, EventStore, ExpectedVersion, Health, ReadOptions,
    Selector, Start, SubscriptionItem, SubscriptionMode,
};
use newton::{
    BoxError, Category, Error, EventStoreCheckpointStore, RecordedEvent, Repository, RunnerOptions,
    StreamId, Version, View, ViewRunner,
};
use support::{fresh_id, Tally, TallyCommand, TallyEvent};

/// The seeds every test runs with: each plays a different sequence of faults.
const SEEDS: [u64; 3] = [1, 7, 2024];

/// The weak store, counting the faults newton met, so a test shows they really happened.
async fn weak_store(seed: u64) -> (Arc<dyn EventStore>, Arc<Met>) {
    let inner = newton::connect(&format!("memory://?faults=production&seed={seed}"))
        .await
        .unwrap();
    assert!(!inner.capabilities().total_order, "partitioned, as Kafka");
    let met = Arc::new(Met::default());
    let store = Arc::new(Counting {
        inner,
        met: met.clone(),
    });
    (store, met)
}

/// Faults met through [`Counting`].
#[derive(Default, Debug)]
struct Met {
    unavailable_appends: AtomicU64,
    dropped_subscriptions: AtomicU64,
}

/// Passes every call to the weak store, counting `Unavailable` answers.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn EventStore>,
    met: Arc<Met>,
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
        let result = self.inner.append(stream, expected, events).await;
        if matches!(result, Err(Error::Unavailable { .. })) {
            self.met.unavailable_appends.fetch_add(1, Ordering::Relaxed);
        }
        result
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
        let met = self.met.clone();
        self.inner
            .subscribe(selector, start, mode)
            .inspect(move |item| {
                if matches!(item, Err(Error::Unavailable { .. })) {
                    met.dropped_subscriptions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .boxed()
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

/// Sums `Added` amounts per stream and counts events: a double or a loss shows in both.
struct Totals;

#[derive(Default, serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
struct TotalsState {
    per_stream: BTreeMap<String, u64>,
    events: u64,
}

#[async_trait]
impl View for Totals {
    type State = TotalsState;
    fn name(&self) -> &str {
        "totals"
    }
    fn categories(&self) -> Vec<Category> {
        vec![Category::new("tally").unwrap()]
    }
    async fn handle(&self, state: &mut TotalsState, event: &RecordedEvent) -> Result<(), BoxError> {
        let TallyEvent::Added { amount } = event.decode()?;
        *state
            .per_stream
            .entry(event.stream.to_string())
            .or_default() += amount;
        state.events += 1;
        Ok(())
    }
}

fn quick() -> RunnerOptions {
    RunnerOptions {
        save_every: 3,
        save_interval: Duration::from_millis(20),
        retry_delay: Duration::from_millis(5),
    }
}

/// Runs `commands` Add commands over `ids` from 4 concurrent tasks; returns what each stream
/// must sum to and hold.
async fn execute_all(
    store: &Arc<dyn EventStore>,
    ids: &[String],
    commands: u64,
) -> BTreeMap<String, (u64, u64)> {
    let mut tasks = Vec::new();
    for task in 0..4u64 {
        let store = store.clone();
        let ids = ids.to_vec();
        tasks.push(tokio::spawn(async move {
            let repo = Repository::<Tally>::new(store);
            let mut done = Vec::new();
            for n in (task..commands).step_by(4) {
                let id = &ids[n as usize % ids.len()];
                let executed = repo
                    .execute(id, &TallyCommand::Add(n + 1))
                    .await
                    .unwrap_or_else(|e| panic!("command {n} on {id}: {e}"));
                assert_eq!(executed.events.len(), 1);
                done.push((id.clone(), n + 1));
            }
            done
        }));
    }
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for task in tasks {
        for (id, amount) in task.await.unwrap() {
            let entry = want.entry(format!("tally-{id}")).or_default();
            entry.0 += amount;
            entry.1 += 1;
        }
    }
    want
}

#[tokio::test]
async fn execute_records_each_command_once_through_unavailable_answers() {
    for seed in SEEDS {
        let (store, met) = weak_store(seed).await;
        let ids: Vec<String> = (0..5).map(|_| fresh_id()).collect();
        let want = execute_all(&store, &ids, 120).await;
        assert!(
            met.unavailable_appends.load(Ordering::Relaxed) > 0,
            "seed {seed}: the store answered Unavailable"
        );
        for (stream, (total, count)) in &want {
            let events: Vec<RecordedEvent> = store
                .read_stream(&StreamId::parse(stream).unwrap(), ReadOptions::forwards())
                .map(Result::unwrap)
                .collect()
                .await;
            assert_eq!(
                events.len() as u64,
                *count,
                "seed {seed}: {stream} once each"
            );
            let sum: u64 = events
                .iter()
                .map(|e| {
                    let TallyEvent::Added { amount } = e.decode().unwrap();
                    amount
                })
                .sum();
            assert_eq!(sum, *total, "seed {seed}: {stream}");
            let id = stream.strip_prefix("tally-").unwrap();
            let loaded = Repository::<Tally>::new(store.clone())
                .load(id)
                .await
                .unwrap();
            assert_eq!(loaded.state.total, *total);
        }
    }
}

#[tokio::test]
async fn views_catch_up_follow_live_and_restart_through_drops() {
    for seed in SEEDS {
        let (store, met) = weak_store(seed).await;
        let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
        let ids: Vec<String> = (0..4).map(|_| fresh_id()).collect();
        let mut want = execute_all(&store, &ids, 60).await;

        // Catch up on the history, then follow what is written while live.
        let runner = ViewRunner::new(store.clone(), checkpoints.clone()).with_options(quick());
        let view = runner.start(Totals).unwrap();
        tokio::time::timeout(Duration::from_secs(30), view.wait_until_live())
            .await
            .expect("catches up")
            .unwrap();
        let live = execute_all(&store, &ids, 60).await;
        for (stream, (total, count)) in live {
            let entry = want.entry(stream).or_default();
            entry.0 += total;
            entry.1 += count;
        }
        let expected = TotalsState {
            per_stream: want.iter().map(|(s, (t, _))| (s.clone(), *t)).collect(),
            events: want.values().map(|(_, c)| c).sum(),
        };
        let target = expected.clone();
        tokio::time::timeout(
            Duration::from_secs(30),
            view.wait_until(move |s| s.events >= target.events),
        )
        .await
        .expect("live events reach the view")
        .unwrap();
        assert_eq!(view.read(Clone::clone).await, expected, "seed {seed}: live");
        view.stop().await.unwrap();

        // Written while the view is down; a restart resumes from its saved checkpoint.
        let down = execute_all(&store, &ids, 20).await;
        let mut expected = expected;
        for (stream, (total, count)) in down {
            *expected.per_stream.entry(stream).or_default() += total;
            expected.events += count;
        }
        let restarted = ViewRunner::new(store.clone(), checkpoints.clone())
            .with_options(quick())
            .start(Totals)
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), restarted.wait_until_live())
            .await
            .expect("restarts")
            .unwrap();
        let target = expected.events;
        tokio::time::timeout(
            Duration::from_secs(30),
            restarted.wait_until(move |s| s.events >= target),
        )
        .await
        .expect("restart catches up")
        .unwrap();
        assert_eq!(
            restarted.read(Clone::clone).await,
            expected,
            "seed {seed}: restarted"
        );
        assert_eq!(restarted.handled(), 20, "seed {seed}: only the new events");
        restarted.stop().await.unwrap();
        assert!(
            met.dropped_subscriptions.load(Ordering::Relaxed) > 0,
            "seed {seed}: a subscription dropped"
        );
    }
}
