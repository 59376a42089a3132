//! The view runner: replay then live, checkpoints saved after handling, restart, rebuild,
//! side-by-side versions, failures and fencing.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use newton::store::{EventStore, EventStoreExt, ExpectedVersion};
use newton::{
    BoxError, Category, CheckpointStore, Error, EventStoreCheckpointStore, InMemoryCheckpointStore,
    RecordedEvent, Repository, RunnerOptions, SavedView, Uuid, View, ViewError, ViewRunner,
    ViewStatus,
};
use photon_memory::MemoryStore;
use support::{fresh_id, Tally, TallyCommand};

/// Sums `Added` amounts per stream id over the categories it is given; counts every event.
struct Totals {
    name: String,
    categories: Vec<Category>,
    /// When set, fails on any event with amount 13.
    fail_on_13: Arc<AtomicBool>,
}

#[derive(Default, serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct TotalsState {
    per_stream: BTreeMap<String, u64>,
    events: u64,
}

#[async_trait]
impl View for Totals {
    type State = TotalsState;
    fn name(&self) -> &str {
        &self.name
    }
    fn categories(&self) -> Vec<Category> {
        self.categories.clone()
    }
    async fn handle(&self, state: &mut TotalsState, event: &RecordedEvent) -> Result<(), BoxError> {
        let support::TallyEvent::Added { amount } = event.decode()?;
        if amount == 13 && self.fail_on_13.load(Ordering::SeqCst) {
            return Err("unlucky number".into());
        }
        *state
            .per_stream
            .entry(event.stream.to_string())
            .or_default() += amount;
        state.events += 1;
        Ok(())
    }
}

fn totals(name: &str, categories: &[&str]) -> Totals {
    Totals {
        name: name.into(),
        categories: categories
            .iter()
            .map(|c| Category::new(c).unwrap())
            .collect(),
        fail_on_13: Arc::new(AtomicBool::new(false)),
    }
}

fn quick() -> RunnerOptions {
    RunnerOptions {
        save_every: 3,
        save_interval: Duration::from_millis(20),
        retry_delay: Duration::from_millis(10),
    }
}

async fn add(store: &Arc<dyn EventStore>, id: &str, n: u64) {
    Repository::<Tally>::new(store.clone())
        .execute(id, &TallyCommand::Add(n))
        .await
        .unwrap();
}

/// A second category with the same event shape, to show views reading several.
async fn add_other(store: &Arc<dyn EventStore>, id: &str, n: u64) {
    let stream = newton::StreamId::parse(format!("other-{id}")).unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![newton::encode(
                &support::TallyEvent::Added { amount: n },
                &Default::default(),
            )
            .unwrap()],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn replays_then_follows_live_events_of_several_categories() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let (a, b) = (fresh_id(), fresh_id());
    add(&store, &a, 1).await;
    add(&store, &a, 2).await;
    add_other(&store, &b, 10).await;
    let runner = ViewRunner::new(store.clone(), Arc::new(InMemoryCheckpointStore::new()))
        .with_options(quick());
    let view = runner
        .start(totals("totals-v1", &["tally", "other"]))
        .unwrap();
    view.wait_until_live().await.unwrap();
    assert!(matches!(view.status(), ViewStatus::Live));
    assert_eq!(view.read(|s| s.events).await, 3);
    add(&store, &a, 4).await;
    add_other(&store, &b, 20).await;
    let (ka, kb) = (format!("tally-{a}"), format!("other-{b}"));
    tokio::time::timeout(
        Duration::from_secs(10),
        view.wait_until(|s| {
            s.per_stream.get(&ka) == Some(&7) && s.per_stream.get(&kb) == Some(&30)
        }),
    )
    .await
    .expect("live events reach the view")
    .unwrap();
    assert_eq!(view.read(|s| s.events).await, 5);
}

#[tokio::test]
async fn restart_resumes_after_the_saved_checkpoint_on_the_event_store() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let id = fresh_id();
    for n in 1..=5 {
        add(&store, &id, n).await;
    }
    let runner = ViewRunner::new(store.clone(), checkpoints.clone()).with_options(quick());
    let view = runner.start(totals("resume-v1", &["tally"])).unwrap();
    view.wait_until_live().await.unwrap();
    view.stop().await.unwrap();
    assert!(matches!(view.status(), ViewStatus::Stopped));
    assert!(matches!(
        view.wait_until_live().await,
        Err(ViewError::Stopped { .. })
    ));

    // Written while the view is down.
    add(&store, &id, 100).await;

    let saved = checkpoints.load("resume-v1").await.unwrap().expect("saved");
    assert_eq!(saved.saved.positions.len(), 1);
    let restarted = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(quick())
        .start(totals("resume-v1", &["tally"]))
        .unwrap();
    restarted.wait_until_live().await.unwrap();
    // Only the one new event was handled; the state came back from the save.
    assert_eq!(restarted.handled(), 1);
    assert_eq!(
        restarted
            .read(|s| (s.events, s.per_stream[&format!("tally-{id}")]))
            .await,
        (6, 115)
    );
}

#[tokio::test]
async fn a_failing_handler_stops_the_view_without_saving_past_the_event() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let id = fresh_id();
    add(&store, &id, 1).await;
    add(&store, &id, 13).await;
    add(&store, &id, 2).await;
    let view = totals("fragile-v1", &["tally"]);
    view.fail_on_13.store(true, Ordering::SeqCst);
    let handle = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(quick())
        .start(view)
        .unwrap();
    match handle.wait_until_live().await {
        Err(ViewError::Failed { view, reason }) => {
            assert_eq!(view, "fragile-v1");
            assert!(reason.contains("unlucky number"), "{reason}");
            assert!(reason.contains(&format!("tally-{id}@1")), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    match handle.status() {
        ViewStatus::Failed(e) => assert!(matches!(*e, ViewError::Handler { .. })),
        other => panic!("{other:?}"),
    }
    assert!(handle.rebuild().await.is_err());
    // After the fix the event is handled again: nothing was skipped.
    let fixed = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(quick())
        .start(totals("fragile-v1", &["tally"]))
        .unwrap();
    fixed.wait_until_live().await.unwrap();
    assert_eq!(
        fixed.read(|s| s.per_stream[&format!("tally-{id}")]).await,
        16
    );
}

#[tokio::test]
async fn two_versions_side_by_side_and_rebuild() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let id = fresh_id();
    for n in 1..=4 {
        add(&store, &id, n).await;
    }
    let runner = ViewRunner::new(store.clone(), checkpoints.clone()).with_options(quick());
    let v1 = runner.start(totals("sums-v1", &["tally"])).unwrap();
    v1.wait_until_live().await.unwrap();
    add(&store, &id, 10).await;
    let v2 = runner.start(totals("sums-v2", &["tally"])).unwrap();
    v2.wait_until_live().await.unwrap();
    let key = format!("tally-{id}");
    v1.wait_until(|s| s.events == 5).await.unwrap();
    assert_eq!(v2.read(|s| s.per_stream[&key]).await, 20);
    assert_eq!(v1.read(|s| s.per_stream[&key]).await, 20);
    // Each version keeps its own checkpoint, a register and not an event stream.
    for view in ["sums-v1", "sums-v2"] {
        let name = format!("{}-{view}", newton::CHECKPOINT_CATEGORY);
        assert!(
            store.load_register(&name).await.unwrap().is_some(),
            "{name}"
        );
    }
    assert!(store
        .streams_of(&Category::new(newton::CHECKPOINT_CATEGORY).unwrap())
        .await
        .unwrap()
        .is_empty());

    let before = v1.handled();
    v1.rebuild().await.unwrap();
    assert_eq!(v1.handled() - before, 5);
    assert_eq!(v1.read(|s| (s.events, s.per_stream[&key])).await, (5, 20));
}

#[tokio::test]
async fn a_second_runner_of_the_same_view_is_fenced_off() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let id = fresh_id();
    add(&store, &id, 1).await;
    let first = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(quick())
        .start(totals("single-v1", &["tally"]))
        .unwrap();
    first.wait_until_live().await.unwrap();
    let second = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(quick())
        .start(totals("single-v1", &["tally"]))
        .unwrap();
    second.wait_until_live().await.unwrap();
    // Both loaded revision 0; whichever saves second loses.
    add(&store, &id, 2).await;
    let failed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            for h in [&first, &second] {
                if let ViewStatus::Failed(e) = h.status() {
                    return e;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("one runner is fenced off");
    assert!(
        matches!(
            &*failed,
            ViewError::Fenced {
                expected: Some(0),
                actual: Some(1),
                ..
            }
        ),
        "{failed}"
    );
}

#[tokio::test]
async fn bad_views_and_bad_saved_state_are_typed_errors() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let runner = ViewRunner::new(store.clone(), checkpoints.clone());
    assert!(matches!(
        runner.start(totals("nothing-v1", &[])),
        Err(ViewError::Store {
            source: Error::InvalidInput { .. },
            ..
        })
    ));
    assert!(matches!(
        runner.start(totals("bad name", &["tally"])),
        Err(ViewError::Store {
            source: Error::InvalidInput { .. },
            ..
        })
    ));
    checkpoints
        .save(
            "garbled-v1",
            &SavedView {
                positions: Default::default(),
                state: newton::store::Bytes::from_static(b"\xc1"),
            },
            None,
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    let h = runner.start(totals("garbled-v1", &["tally"])).unwrap();
    match h.wait_until_live().await {
        Err(ViewError::Failed { reason, .. }) => {
            assert!(reason.contains("saved state"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The in-memory checkpoint store fences like the event-store one.
    assert!(matches!(
        checkpoints
            .save("garbled-v1", &SavedView::default(), None, Uuid::new_v4())
            .await,
        Err(Error::WrongExpectedVersion { .. })
    ));
    // A checkpoint save that is too large for a register is refused, not truncated.
    let on_store = EventStoreCheckpointStore::new(store.clone());
    let big = SavedView {
        positions: Default::default(),
        state: vec![0u8; newton::store::MAX_REGISTER_VALUE].into(),
    };
    match on_store.save("big-v1", &big, None, Uuid::new_v4()).await {
        Err(Error::InvalidInput { what, reason }) => {
            assert!(what.contains("newton_view-big-v1"), "{what}");
            assert!(reason.contains("limit"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(on_store.load("big-v1").await.unwrap().is_none());
}

/// Issue 17 part 6: a view saving a thousand times leaves one register and no event at all, so
/// neither the store nor a subscriber of the all stream pays for its saves.
#[tokio::test]
async fn checkpoint_saves_do_not_grow_the_store() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let id = fresh_id();
    let every_event = RunnerOptions {
        save_every: 1,
        ..quick()
    };
    let view = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(every_event)
        .start(totals("frequent-v1", &["tally"]))
        .unwrap();
    view.wait_until_live().await.unwrap();
    for n in 1..=300 {
        add(&store, &id, n).await;
    }
    view.wait_until(|s| s.events == 300).await.unwrap();
    let saved = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let loaded = checkpoints.load("frequent-v1").await.unwrap().unwrap();
            let state: TotalsState = rmp_serde::from_slice(&loaded.saved.state).unwrap();
            if state.events == 300 {
                return loaded;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the last event's save");
    assert!(saved.revision >= 30, "saved {} times", saved.revision + 1);
    // Only the 300 appended events are in the store: no save became an event.
    let everything = store
        .subscribe(
            newton::store::Selector::All,
            newton::store::Start::Beginning,
            newton::store::SubscriptionMode::Cold,
        )
        .count()
        .await;
    assert_eq!(everything, 300);
    assert!(!store
        .list_categories()
        .await
        .unwrap()
        .contains(&Category::new(newton::CHECKPOINT_CATEGORY).unwrap()));
}

/// A view saved by an earlier release as events in `newton_view-<view>` resumes from the last
/// of them (nothing handled twice), and its later saves go to the register.
#[tokio::test]
async fn a_checkpoint_saved_as_events_is_carried_over() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let id = fresh_id();
    for n in 1..=3 {
        add(&store, &id, n).await;
    }
    // What the earlier release left: a view that handled the three events, saved twice.
    let legacy_stream = newton::StreamId::new(
        &Category::new(newton::CHECKPOINT_CATEGORY).unwrap(),
        "old-v1",
    )
    .unwrap();
    let in_memory = Arc::new(InMemoryCheckpointStore::new());
    let h = ViewRunner::new(store.clone(), in_memory.clone())
        .with_options(quick())
        .start(totals("old-v1", &["tally"]))
        .unwrap();
    h.wait_until(|s| s.events == 3).await.unwrap();
    h.stop().await.unwrap();
    let last = in_memory.load("old-v1").await.unwrap().unwrap();
    let legacy_id = Uuid::new_v4();
    for (i, expected) in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(newton::Version(0)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut saved = last.saved.clone();
        if i == 0 {
            saved.state = rmp_serde::to_vec_named(&TotalsState::default())
                .unwrap()
                .into();
            saved.positions.clear();
        }
        let event = newton::store::EventData::msgpack("ViewSaved", &saved).unwrap();
        let event = if i == 1 {
            event.with_id(legacy_id)
        } else {
            event
        };
        store
            .append(&legacy_stream, expected, vec![event])
            .await
            .unwrap();
    }

    add(&store, &id, 10).await;
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let loaded = checkpoints.load("old-v1").await.unwrap().unwrap();
    assert_eq!((loaded.revision, loaded.save_id), (0, legacy_id));
    assert_eq!(loaded.saved, last.saved);
    let h = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(quick())
        .start(totals("old-v1", &["tally"]))
        .unwrap();
    h.wait_until(|s| s.events == 4).await.unwrap();
    // Resumed after the third event: only the new one was handled.
    assert_eq!(h.handled(), 1);
    assert_eq!(h.read(|s| s.per_stream[&format!("tally-{id}")]).await, 16);
    h.stop().await.unwrap();
    let register = format!("{}-old-v1", newton::CHECKPOINT_CATEGORY);
    assert!(
        store
            .load_register(&register)
            .await
            .unwrap()
            .unwrap()
            .revision
            >= 1
    );
    // The old stream is no longer written.
    assert_eq!(
        store.stream_version(&legacy_stream).await.unwrap(),
        Some(newton::Version(1))
    );
}

#[tokio::test]
async fn a_resent_save_is_idempotent_and_a_stale_one_is_fenced() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let stores: [Arc<dyn CheckpointStore>; 2] = [
        Arc::new(InMemoryCheckpointStore::new()),
        Arc::new(EventStoreCheckpointStore::new(store)),
    ];
    for checkpoints in stores {
        let saved = SavedView::default();
        let first = Uuid::new_v4();
        assert_eq!(
            checkpoints
                .save("idem-v1", &saved, None, first)
                .await
                .unwrap(),
            0
        );
        // The same save re-sent after a timeout: same revision, nothing new stored.
        assert_eq!(
            checkpoints
                .save("idem-v1", &saved, None, first)
                .await
                .unwrap(),
            0
        );
        let second = Uuid::new_v4();
        assert_eq!(
            checkpoints
                .save("idem-v1", &saved, Some(0), second)
                .await
                .unwrap(),
            1
        );
        // Another runner still at revision 0 is refused.
        match checkpoints
            .save("idem-v1", &saved, Some(0), Uuid::new_v4())
            .await
        {
            Err(Error::WrongExpectedVersion { actual, .. }) => {
                assert_eq!(actual.map(|v| v.value()), Some(1))
            }
            other => panic!("{other:?}"),
        }
        let loaded = checkpoints.load("idem-v1").await.unwrap().unwrap();
        assert_eq!((loaded.revision, loaded.save_id), (1, second));
    }
}

#[tokio::test]
async fn a_detached_view_keeps_running_without_handles() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let id = fresh_id();
    let handle = ViewRunner::new(store.clone(), checkpoints.clone())
        .with_options(quick())
        .start(totals("detached-v1", &["tally"]))
        .unwrap();
    handle.wait_until_live().await.unwrap();
    handle.detach().await;
    add(&store, &id, 9).await;
    let saved = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(l) = checkpoints.load("detached-v1").await.unwrap() {
                let state: TotalsState = rmp_serde::from_slice(&l.saved.state).unwrap();
                if state.events == 1 {
                    return state;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the detached view handled and saved the new event");
    assert_eq!(saved.per_stream[&format!("tally-{id}")], 9);
}
