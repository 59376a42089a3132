//! Typed views (decoded, upcast events in an envelope) and a view's failure policy (issue 17
//! part 5): retry with backoff, skip, park in a dead-letter stream once, or stop (the default).
//! The parking scenario also runs on every server configured (`PHOTON_TEST_<BACKEND>_URL`).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use newton::store::{
    EventData, EventStore, EventStoreExt, ExpectedVersion, Selector, Start, Timestamp,
};
use newton::upcast::{field_mut, rename_field, Upcasters};
use newton::{
    dead_letter_id, dead_letter_stream, dead_letters, Aggregate, AggregateView, BoxError, Category,
    CheckpointStore, DomainEvent, Envelope, Error, EventStoreCheckpointStore, FailurePolicy,
    InMemoryCheckpointStore, RecordedEvent, Repository, RunnerOptions, SavedView, StreamId, Uuid,
    View, ViewError, ViewRunner, ViewStatus,
};
use serde::{Deserialize, Serialize};
use support::fresh_id;

// ---- A meter whose event changed shape: v1 `{"Read": {"reading": n}}`, v2 `{"value": n}` ----

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum MeterEvent {
    Read { value: u64 },
}

impl DomainEvent for MeterEvent {
    fn event_type(&self) -> &'static str {
        "Read"
    }

    fn schema_version(&self) -> u32 {
        2
    }

    fn upcasters() -> Upcasters {
        Upcasters::new().step("Read", 1, |mut v| {
            rename_field(field_mut(&mut v, "Read")?, "reading", "value")?;
            Ok(v)
        })
    }
}

#[derive(Default, Clone)]
struct Meter;

impl Aggregate for Meter {
    const CATEGORY: &'static str = "meter";
    type Command = u64;
    type Event = MeterEvent;
    type Error = std::convert::Infallible;

    fn handle(&self, value: &u64) -> Result<Vec<MeterEvent>, Self::Error> {
        Ok(vec![MeterEvent::Read { value: *value }])
    }

    fn apply(&mut self, _: &MeterEvent) {}
}

/// What the typed view saw of one event, envelope included.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Seen {
    id: String,
    version: u64,
    event_id: Uuid,
    recorded_at: Timestamp,
    correlation_id: Option<Uuid>,
    value: u64,
}

#[derive(Default, Serialize, Deserialize, Debug, PartialEq)]
struct Readings {
    total: u64,
    seen: Vec<Seen>,
}

/// Sums the readings of meters whose id starts with `only` (the category is shared on a
/// server). Refuses 13 always, and 7 while `flaky` is above zero (counting it down).
struct ReadingsView {
    name: String,
    only: String,
    policy: FailurePolicy,
    flaky: Arc<AtomicU32>,
    calls_on_13: Arc<AtomicU32>,
}

impl ReadingsView {
    fn new(name: &str, only: &str, policy: FailurePolicy) -> Self {
        Self {
            name: name.into(),
            only: only.into(),
            policy,
            flaky: Arc::new(AtomicU32::new(0)),
            calls_on_13: Arc::new(AtomicU32::new(0)),
        }
    }
}

#[async_trait]
impl AggregateView for ReadingsView {
    type Aggregate = Meter;
    type State = Readings;

    fn name(&self) -> &str {
        &self.name
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }

    async fn handle(
        &self,
        state: &mut Readings,
        event: &Envelope<'_, MeterEvent>,
    ) -> Result<(), BoxError> {
        if !event.id().starts_with(&self.only) {
            return Ok(());
        }
        let MeterEvent::Read { value } = event.event;
        if value == 13 {
            self.calls_on_13.fetch_add(1, Ordering::SeqCst);
            return Err("unlucky number".into());
        }
        if value == 7
            && self
                .flaky
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err("the database is restarting".into());
        }
        state.total += value;
        state.seen.push(Seen {
            id: event.id().to_owned(),
            version: event.version().value(),
            event_id: event.event_id(),
            recorded_at: event.recorded_at(),
            correlation_id: event.metadata().correlation_id,
            value,
        });
        Ok(())
    }
}

fn quick() -> RunnerOptions {
    RunnerOptions {
        save_every: 1,
        save_interval: Duration::from_millis(20),
        retry_delay: Duration::from_millis(10),
    }
}

const WAIT: Duration = Duration::from_secs(60);

fn memory() -> Arc<dyn EventStore> {
    support::store()
}

fn meter(id: &str) -> StreamId {
    StreamId::new(&Category::new(Meter::CATEGORY).unwrap(), id).unwrap()
}

/// A fresh meter with `values` read through the repository; its id.
async fn meter_with(store: &Arc<dyn EventStore>, values: &[u64]) -> String {
    let id = fresh_id();
    for value in values {
        read(store, &id, *value).await;
    }
    id
}

/// `view` started with quick options on a runner of `store` keeping checkpoints in `checkpoints`.
fn start(
    store: &Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    view: ReadingsView,
) -> newton::ViewHandle<newton::TypedView<ReadingsView>> {
    ViewRunner::new(store.clone(), checkpoints)
        .with_options(quick())
        .start_typed(view)
        .unwrap()
}

async fn read(store: &Arc<dyn EventStore>, id: &str, value: u64) {
    Repository::<Meter>::new(store.clone())
        .execute(id, &value)
        .await
        .unwrap();
}

/// A reading as an older release stored it.
async fn read_v1(store: &Arc<dyn EventStore>, id: &str, value: u64, correlation_id: Uuid) {
    let v1 = EventData::msgpack("Read", &serde_json::json!({"Read": {"reading": value}}))
        .unwrap()
        .with_schema_version(1)
        .with_correlation_id(correlation_id);
    store
        .append(&meter(id), ExpectedVersion::Any, vec![v1])
        .await
        .unwrap();
}

/// A reading as a newer release would store it: a schema version this code does not know.
async fn read_v3(store: &Arc<dyn EventStore>, id: &str) {
    let v3 = EventData::msgpack(
        "Read",
        &serde_json::json!({"Read": {"value": 1, "unit": "kWh"}}),
    )
    .unwrap()
    .with_schema_version(3);
    store
        .append(&meter(id), ExpectedVersion::Any, vec![v3])
        .await
        .unwrap();
}

async fn live<V: View>(handle: &newton::ViewHandle<V>) {
    tokio::time::timeout(WAIT, handle.wait_until_live())
        .await
        .expect("the view catches up")
        .unwrap();
}

async fn failed<V: View>(handle: &newton::ViewHandle<V>) -> Arc<ViewError> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let ViewStatus::Failed(e) = handle.status() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the view fails")
}

/// The events of `stream`, as the view's category subscription delivered them (their
/// checkpoints are the subscription's, which the dead-letter record keeps).
async fn delivered(store: &Arc<dyn EventStore>, stream: &StreamId) -> Vec<RecordedEvent> {
    store
        .replay_to_vec(
            Selector::Category(Category::new(Meter::CATEGORY).unwrap()),
            Start::Beginning,
        )
        .await
        .unwrap()
        .into_iter()
        .filter(|e| &e.stream == stream)
        .collect()
}

// ---- Typed views --------------------------------------------------------------------------

#[tokio::test]
async fn a_typed_view_gets_an_upcast_v1_event_and_its_envelope() {
    let store = memory();
    let id = fresh_id();
    let correlation = Uuid::new_v4();
    read_v1(&store, &id, 5, correlation).await;
    read(&store, &id, 10).await;
    let stored = store
        .read_to_vec(&meter(&id), Default::default())
        .await
        .unwrap();

    let view = ViewRunner::new(store.clone(), Arc::new(InMemoryCheckpointStore::new()))
        .with_options(quick())
        .start_typed(ReadingsView::new(
            "readings-v1",
            "",
            FailurePolicy::default(),
        ))
        .unwrap();
    live(&view).await;
    let seen = view.read(|s| s.seen.clone()).await;
    let expected: Vec<Seen> = stored
        .iter()
        .zip([(Some(correlation), 5), (None, 10)])
        .map(|(e, (correlation_id, value))| Seen {
            id: id.clone(),
            version: e.version.value(),
            event_id: e.event_id,
            recorded_at: e.recorded_at,
            correlation_id,
            value,
        })
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(
        expected.iter().map(|s| s.version).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(view.read(|s| s.total).await, 15);
    assert_eq!((view.handled(), view.skipped(), view.parked()), (2, 0, 0));

    // Live events come through the same adapter.
    read(&store, &id, 20).await;
    tokio::time::timeout(WAIT, view.wait_until(|s| s.total == 35))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn an_unknown_schema_version_stops_a_typed_view_by_default_with_a_typed_error() {
    let store = memory();
    let id = fresh_id();
    read(&store, &id, 1).await;
    read_v3(&store, &id).await;
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let view = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(quick())
        .start_typed(ReadingsView::new(
            "readings-v1",
            "",
            FailurePolicy::default(),
        ))
        .unwrap();
    let error = failed(&view).await;
    match &*error {
        ViewError::Decode {
            view,
            source:
                Error::UnknownSchemaVersion {
                    stream,
                    version,
                    schema_version: 3,
                    known: 2,
                    ..
                },
        } => {
            assert_eq!(view, "readings-v1");
            assert_eq!((stream, version.value()), (&meter(&id), 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((view.handled(), view.skipped(), view.parked()), (1, 0, 0));
    // Saved up to the first event only: a release that knows v3 meets it again.
    let saved = checkpoints.load("readings-v1").await.unwrap().unwrap();
    let state: Readings = rmp_serde::from_slice(&saved.saved.state).unwrap();
    assert_eq!(state.total, 1);
    assert!(dead_letters(&*store, "readings-v1")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_broken_upcaster_chain_is_refused_when_a_typed_view_starts() {
    #[derive(Serialize, Deserialize)]
    struct Gappy;
    impl DomainEvent for Gappy {
        fn event_type(&self) -> &'static str {
            "Gappy"
        }
        fn upcasters() -> Upcasters {
            Upcasters::new().step("Gappy", 2, Ok)
        }
    }
    #[derive(Default, Clone)]
    struct Broken;
    impl Aggregate for Broken {
        const CATEGORY: &'static str = "broken";
        type Command = ();
        type Event = Gappy;
        type Error = std::convert::Infallible;
        fn handle(&self, _: &()) -> Result<Vec<Gappy>, Self::Error> {
            Ok(vec![])
        }
        fn apply(&mut self, _: &Gappy) {}
    }
    struct Nothing;
    #[async_trait]
    impl AggregateView for Nothing {
        type Aggregate = Broken;
        type State = ();
        fn name(&self) -> &str {
            "nothing-v1"
        }
        async fn handle(&self, _: &mut (), _: &Envelope<'_, Gappy>) -> Result<(), BoxError> {
            Ok(())
        }
    }
    let runner = ViewRunner::new(memory(), Arc::new(InMemoryCheckpointStore::new()));
    match runner.start_typed(Nothing) {
        Err(ViewError::Store {
            source: Error::InvalidInput { what, .. },
            ..
        }) => assert!(what.contains("Gappy"), "{what}"),
        other => panic!("{other:?}"),
    }
}

// ---- Failure policy -----------------------------------------------------------------------

#[tokio::test]
async fn a_refusal_is_retried_with_backoff_until_it_succeeds() {
    let store = memory();
    meter_with(&store, &[1, 7, 2]).await;
    let view = ReadingsView::new(
        "flaky-v1",
        "",
        FailurePolicy::stop().with_retries(3, Duration::from_millis(5)),
    );
    view.flaky.store(2, Ordering::SeqCst);
    let flaky = view.flaky.clone();
    let handle = start(&store, Arc::new(InMemoryCheckpointStore::new()), view);
    live(&handle).await;
    assert_eq!(
        flaky.load(Ordering::SeqCst),
        0,
        "both failures were used up"
    );
    assert_eq!(handle.read(|s| s.total).await, 10);
    assert_eq!(
        (handle.handled(), handle.skipped(), handle.parked()),
        (3, 0, 0)
    );
    assert!(matches!(handle.status(), ViewStatus::Live));
}

#[tokio::test]
async fn retries_used_up_then_stop() {
    let store = memory();
    meter_with(&store, &[1, 13, 2]).await;
    let view = ReadingsView::new(
        "stubborn-v1",
        "",
        FailurePolicy::stop().with_retries(2, Duration::from_millis(1)),
    );
    let calls = view.calls_on_13.clone();
    let handle = start(&store, Arc::new(InMemoryCheckpointStore::new()), view);
    let error = failed(&handle).await;
    assert!(
        matches!(&*error, ViewError::Handler { version, .. } if version.value() == 1),
        "{error}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3, "one call and two retries");
}

#[tokio::test]
async fn skip_counts_the_event_and_saves_past_it() {
    let store = memory();
    meter_with(&store, &[1, 13, 2]).await;
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let runner = ViewRunner::new(store.clone(), checkpoints.clone()).with_options(quick());
    let handle = runner
        .start_typed(ReadingsView::new("skipping-v1", "", FailurePolicy::skip()))
        .unwrap();
    live(&handle).await;
    assert_eq!(handle.read(|s| s.total).await, 3);
    assert_eq!(
        (handle.handled(), handle.skipped(), handle.parked()),
        (2, 1, 0)
    );
    assert!(dead_letters(&*store, "skipping-v1")
        .await
        .unwrap()
        .is_empty());
    handle.stop().await.unwrap();

    // The skip was saved past: a restart meets nothing again.
    let restarted = runner
        .start_typed(ReadingsView::new("skipping-v1", "", FailurePolicy::skip()))
        .unwrap();
    live(&restarted).await;
    assert_eq!(restarted.read(|s| s.total).await, 3);
    assert_eq!((restarted.handled(), restarted.skipped()), (0, 0));
}

#[tokio::test]
async fn the_default_still_stops_at_the_refused_event() {
    let store = memory();
    let id = meter_with(&store, &[1, 13, 2]).await;
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let view = ReadingsView::new("strict-v1", "", FailurePolicy::default());
    let calls = view.calls_on_13.clone();
    let handle = start(&store, checkpoints.clone(), view);
    match handle.wait_until_live().await {
        Err(ViewError::Failed { reason, .. }) => {
            assert!(reason.contains("unlucky number"), "{reason}");
            assert!(reason.contains(&format!("meter-{id}@1")), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&*failed(&handle).await, ViewError::Handler { .. }));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no retries by default");
    assert_eq!(
        (handle.handled(), handle.skipped(), handle.parked()),
        (1, 0, 0)
    );
    let saved = checkpoints.load("strict-v1").await.unwrap().unwrap();
    let state: Readings = rmp_serde::from_slice(&saved.saved.state).unwrap();
    assert_eq!(state.total, 1, "not saved past the refused event");
    assert!(dead_letters(&*store, "strict-v1").await.unwrap().is_empty());
}

/// A raw view (not typed) under the same policy: the policy belongs to `View`, and a decode
/// error it returns as is gets the typed `ViewError::Decode` and is not retried.
#[tokio::test]
async fn a_raw_view_skips_an_undecodable_event_without_retrying() {
    struct Raw(Arc<AtomicU32>);
    #[async_trait]
    impl View for Raw {
        type State = u64;
        fn name(&self) -> &str {
            "raw-v1"
        }
        fn categories(&self) -> Vec<Category> {
            vec![Category::new(Meter::CATEGORY).unwrap()]
        }
        fn failure_policy(&self) -> FailurePolicy {
            FailurePolicy::skip().with_retries(5, Duration::from_secs(5))
        }
        async fn handle(&self, state: &mut u64, event: &RecordedEvent) -> Result<(), BoxError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let _: BTreeMap<String, BTreeMap<String, u64>> = event.decode()?;
            *state += 1;
            Ok(())
        }
    }
    let store = memory();
    let id = fresh_id();
    read(&store, &id, 1).await;
    store
        .append(
            &meter(&id),
            ExpectedVersion::Any,
            vec![EventData::json("Read", &"not a map").unwrap()],
        )
        .await
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let handle = ViewRunner::new(store, Arc::new(InMemoryCheckpointStore::new()))
        .with_options(quick())
        .start(Raw(calls.clone()))
        .unwrap();
    // Five retries 5 s apart would outlast this timeout: a decode failure is not retried.
    tokio::time::timeout(Duration::from_secs(4), handle.wait_until_live())
        .await
        .expect("no retries of a decode failure")
        .unwrap();
    assert_eq!((handle.handled(), handle.skipped()), (1, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The parking scenario, on any store: 1, 13, 2 in one meter (and, where `unknown_version`,
/// a v3 event in another); 13 is tried three times then parked, the v3 event parked without
/// retries; the records are readable; a restart from an older checkpoint (before 13), and a
/// rebuild, park again without storing a second record.
async fn parked_once_even_after_a_restart_from_an_older_checkpoint(
    store: Arc<dyn EventStore>,
    unknown_version: bool,
) {
    let t0 = std::time::Instant::now();
    let phase = |name: &str| println!("  {name} at {:?}", t0.elapsed());
    let run = fresh_id();
    let (id, newer) = (format!("{run}a"), format!("{run}b"));
    let name = format!("parking-{run}");
    for value in [1, 13, 2] {
        read(&store, &id, value).await;
    }
    if unknown_version {
        read_v3(&store, &newer).await;
    }
    phase("set up");
    let parked_expected = if unknown_version { 2 } else { 1 };
    let policy = FailurePolicy::park().with_retries(2, Duration::from_millis(1));
    let view = ReadingsView::new(&name, &run, policy);
    let calls = view.calls_on_13.clone();
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    // Saves at catch-up and stop, not per event: on a server the view replays every earlier
    // run's readings too, and a save per event would make each run slower than the last.
    let options = RunnerOptions {
        save_every: 10_000,
        save_interval: Duration::from_secs(5),
        ..quick()
    };
    let runner = ViewRunner::new(store.clone(), checkpoints.clone()).with_options(options);
    let handle = runner.start_typed(view).unwrap();
    live(&handle).await;
    phase("started and live");
    // Only this run's readings count; on a server the category holds earlier runs' too, which
    // the view handles (and ignores), so `handled` is not asserted.
    let values = |s: &Readings| s.seen.iter().map(|s| s.value).collect::<Vec<_>>();
    assert_eq!(handle.read(values).await, [1, 2]);
    assert_eq!((handle.skipped(), handle.parked()), (0, parked_expected));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "one call and two retries");

    let events = delivered(&store, &meter(&id)).await;
    phase("replayed the category");
    let records = dead_letters(&*store, &name).await.unwrap();
    assert_eq!(records.len() as u64, parked_expected, "{records:?}");
    let record = &records[0];
    assert_eq!(record.view, name);
    assert_eq!((&record.stream, record.version.value()), (&meter(&id), 1));
    assert_eq!(record.event_id, events[1].event_id);
    assert_eq!(record.checkpoint, events[1].checkpoint);
    assert_eq!(
        (record.event_type.as_str(), record.schema_version),
        ("Read", 2)
    );
    assert!(record.error.contains("unlucky number"), "{}", record.error);
    assert_eq!(record.attempts, 3);
    let stored = store
        .read_to_vec(&dead_letter_stream(&name).unwrap(), Default::default())
        .await
        .unwrap();
    assert_eq!(
        stored[0].event_id,
        dead_letter_id(&name, events[1].event_id)
    );
    assert_eq!(stored[0].metadata.causation_id, Some(events[1].event_id));
    if unknown_version {
        let record = &records[1];
        assert_eq!((&record.stream, record.schema_version), (&meter(&newer), 3));
        assert_eq!(record.attempts, 1, "a decode failure is not retried");
        assert!(record.error.contains("schema version"), "{}", record.error);
    }
    handle.stop().await.unwrap();
    phase("stopped");

    // An older checkpoint: right after the first event, with the state as of then.
    let older = Arc::new(InMemoryCheckpointStore::new());
    let state = Readings {
        total: 1,
        seen: handle.read(|s| s.seen[..1].to_vec()).await,
    };
    older
        .save(
            &name,
            &SavedView {
                positions: [(Meter::CATEGORY.to_owned(), events[0].checkpoint.clone())].into(),
                state: rmp_serde::to_vec_named(&state).unwrap().into(),
            },
            None,
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    let again = ViewRunner::new(store.clone(), older)
        .with_options(options)
        .start_typed(ReadingsView::new(&name, &run, policy))
        .unwrap();
    live(&again).await;
    phase("restarted from the older checkpoint");
    assert_eq!(again.read(|s| s.total).await, 3);
    // Everything after the older checkpoint is refused again and parked again...
    assert_eq!(again.parked(), parked_expected);
    again.rebuild().await.unwrap();
    phase("rebuilt");
    assert_eq!(again.read(|s| s.total).await, 3);
    assert_eq!(again.parked(), 2 * parked_expected);
    again.stop().await.unwrap();
    // ... yet the store keeps one record of each.
    assert_eq!(
        dead_letters(&*store, &name).await.unwrap(),
        records,
        "each refused event is parked once"
    );

    // The saved checkpoint is past the parked events: a restart from it parks nothing.
    let resumed = runner
        .start_typed(ReadingsView::new(&name, &run, policy))
        .unwrap();
    live(&resumed).await;
    phase("resumed");
    assert_eq!((resumed.handled(), resumed.parked()), (0, 0));
    assert_eq!(resumed.read(|s| s.total).await, 3);
    resumed.stop().await.unwrap();
}

#[tokio::test]
async fn retries_used_up_then_parked_once_even_after_a_restart_from_an_older_checkpoint() {
    parked_once_even_after_a_restart_from_an_older_checkpoint(memory(), true).await;
}

#[tokio::test]
async fn a_view_that_parks_reads_its_dead_letters_from_its_own_stream() {
    // Two views park the same event: each in its own stream, with its own record id.
    let store = memory();
    let id = fresh_id();
    read(&store, &id, 13).await;
    let runner = ViewRunner::new(store.clone(), Arc::new(InMemoryCheckpointStore::new()))
        .with_options(quick());
    let a = runner
        .start_typed(ReadingsView::new("park-a-v1", "", FailurePolicy::park()))
        .unwrap();
    let b = runner
        .start_typed(ReadingsView::new("park-b-v1", "", FailurePolicy::park()))
        .unwrap();
    live(&a).await;
    live(&b).await;
    let (ra, rb) = (
        dead_letters(&*store, "park-a-v1").await.unwrap(),
        dead_letters(&*store, "park-b-v1").await.unwrap(),
    );
    assert_eq!((ra.len(), rb.len()), (1, 1));
    assert_eq!(ra[0].event_id, rb[0].event_id);
    assert_eq!(
        (ra[0].view.as_str(), rb[0].view.as_str()),
        ("park-a-v1", "park-b-v1")
    );
}

// ---- On every server configured -------------------------------------------------------------

/// The parking scenario on each server: the dead-letter append, its idempotent re-send and the
/// typed view's subscription are the backend's. Without the unknown-version event: the meter
/// category is shared by every run on a server, and a typed view decodes every event of it,
/// so a v3 event left by one run would be parked by every later run's view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_typed_view_parks_once() {
    for (backend, url) in support::servers() {
        let started = std::time::Instant::now();
        parked_once_even_after_a_restart_from_an_older_checkpoint(
            newton::connect(&url).await.unwrap(),
            false,
        )
        .await;
        println!("{backend}: typed view parks once, {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn a_record_the_store_refuses_stops_the_view_before_the_event() {
    // Room for a reading, not for a dead-letter record (a few hundred bytes of JSON).
    let store: Arc<dyn EventStore> = Arc::new(
        photon_memory::MemoryStore::builder()
            .max_event_size(128)
            .build(),
    );
    let id = meter_with(&store, &[1, 13, 2]).await;
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let handle = start(
        &store,
        checkpoints.clone(),
        ReadingsView::new("cramped-v1", "", FailurePolicy::park()),
    );
    match &*failed(&handle).await {
        ViewError::Park {
            view,
            stream,
            version,
            dead_letters,
            source: Error::EventTooLarge { .. },
        } => {
            assert_eq!(view, "cramped-v1");
            assert_eq!((stream, version.value()), (&meter(&id), 1));
            assert_eq!(dead_letters, &dead_letter_stream("cramped-v1").unwrap());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(handle.parked(), 0);
    let saved = checkpoints.load("cramped-v1").await.unwrap().unwrap();
    let state: Readings = rmp_serde::from_slice(&saved.saved.state).unwrap();
    assert_eq!(
        state.total, 1,
        "not saved past the event that was not parked"
    );
}

#[tokio::test]
async fn a_stop_does_not_wait_out_the_retries() {
    let store = memory();
    meter_with(&store, &[1, 13, 2]).await;
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    // Ten retries a minute apart: only a stop that interrupts them returns in time.
    let view = ReadingsView::new(
        "patient-v1",
        "",
        FailurePolicy::skip()
            .with_retries(10, Duration::from_secs(60))
            .with_max_delay(Duration::from_secs(60)),
    );
    let calls = view.calls_on_13.clone();
    let handle = start(&store, checkpoints.clone(), view);
    tokio::time::timeout(WAIT, async {
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the handler meets 13");
    tokio::time::timeout(Duration::from_secs(5), handle.stop())
        .await
        .expect("the stop interrupts the retry wait")
        .unwrap();
    assert!(matches!(handle.status(), ViewStatus::Stopped));
    assert_eq!((calls.load(Ordering::SeqCst), handle.skipped()), (1, 0));
    // Saved up to the event before: a restart meets 13 again.
    let saved = checkpoints.load("patient-v1").await.unwrap().unwrap();
    let state: Readings = rmp_serde::from_slice(&saved.saved.state).unwrap();
    assert_eq!(state.total, 1);
    let restarted = start(
        &store,
        checkpoints,
        ReadingsView::new("patient-v1", "", FailurePolicy::skip()),
    );
    live(&restarted).await;
    assert_eq!(
        (restarted.read(|s| s.total).await, restarted.skipped()),
        (3, 1)
    );
}

#[tokio::test]
async fn a_rebuild_does_not_wait_out_the_retries() {
    let store = memory();
    let id = meter_with(&store, &[1, 7, 2]).await;
    let view = ReadingsView::new(
        "rebuilt-v1",
        "",
        FailurePolicy::stop()
            .with_retries(1, Duration::from_secs(60))
            .with_max_delay(Duration::from_secs(60)),
    );
    // Refuses 7 once: the rebuild's replay handles it.
    view.flaky.store(1, Ordering::SeqCst);
    let flaky = view.flaky.clone();
    let handle = start(&store, Arc::new(InMemoryCheckpointStore::new()), view);
    tokio::time::timeout(WAIT, async {
        while flaky.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the handler refuses 7 once");
    tokio::time::timeout(Duration::from_secs(5), handle.rebuild())
        .await
        .expect("the rebuild interrupts the retry wait")
        .unwrap();
    let seen = handle
        .read(|s| s.seen.iter().map(|s| s.value).collect::<Vec<_>>())
        .await;
    assert_eq!(
        seen,
        [1, 7, 2],
        "each reading of {id} once, from the rebuild"
    );
}
