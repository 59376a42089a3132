//! A view's lag on its handle (issue 17 part 5, issue 18): how long ago its last handled event
//! was recorded, when the view handled it; zero once it has just caught up.

use std::sync::Arc;
use std::time::Duration;

use newton::store::{EventData, EventStore, ExpectedVersion, StreamId, Timestamp};
use newton::{
    BoxError, Category, EventStoreCheckpointStore, RecordedEvent, RunnerOptions, View, ViewRunner,
};

/// Counts events.
struct Counter(Category);

#[async_trait::async_trait]
impl View for Counter {
    type State = u64;

    fn name(&self) -> &str {
        "lag-counter-v1"
    }

    fn categories(&self) -> Vec<Category> {
        vec![self.0.clone()]
    }

    async fn handle(&self, state: &mut u64, _: &RecordedEvent) -> Result<(), BoxError> {
        *state += 1;
        Ok(())
    }
}

#[tokio::test]
async fn the_handle_says_how_far_behind_the_view_is() {
    let store: Arc<dyn EventStore> = Arc::new(photon_memory::MemoryStore::new());
    let category = Category::new("lagged").unwrap();
    let stream = StreamId::new(&category, "1").unwrap();
    let event = |at: Timestamp| EventData::json("Ticked", &1).unwrap().with_occurred_at(at);
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![event(Timestamp::now())],
        )
        .await
        .unwrap();
    // Recorded a while before the view starts: the replay handles it late.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let view = ViewRunner::new(store.clone(), checkpoints)
        .start(Counter(category))
        .unwrap();
    view.wait_until_live().await.unwrap();
    assert_eq!(view.lag(), Duration::ZERO, "just caught up");

    store
        .append(&stream, ExpectedVersion::Any, vec![event(Timestamp::now())])
        .await
        .unwrap();
    view.wait_until(|n| *n == 2).await.unwrap();
    assert!(
        view.lag() < Duration::from_secs(30),
        "a live event is handled soon after it is recorded: {:?}",
        view.lag()
    );
    view.stop().await.unwrap();
}

/// Counts events, each only once `release` lets it: a handler stuck on something slow.
struct Stuck {
    category: Category,
    release: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl View for Stuck {
    type State = u64;

    fn name(&self) -> &str {
        "lag-stuck-v1"
    }

    fn categories(&self) -> Vec<Category> {
        vec![self.category.clone()]
    }

    async fn handle(&self, state: &mut u64, _: &RecordedEvent) -> Result<(), BoxError> {
        self.release.acquire().await?.forget();
        *state += 1;
        Ok(())
    }
}

#[tokio::test]
async fn the_lag_grows_while_a_handler_is_stuck() {
    let store: Arc<dyn EventStore> = Arc::new(photon_memory::MemoryStore::new());
    let category = Category::new("stuck").unwrap();
    let stream = StreamId::new(&category, "1").unwrap();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let view = ViewRunner::new(store.clone(), checkpoints)
        .with_options(RunnerOptions {
            save_interval: Duration::from_millis(20),
            ..RunnerOptions::default()
        })
        .start(Stuck {
            category,
            release: release.clone(),
        })
        .unwrap();
    view.wait_until_live().await.unwrap();

    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![EventData::json("Ticked", &1).unwrap()],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        view.lag() >= Duration::from_millis(300),
        "the event in hand has waited 400 ms, and the lag says so: {:?}",
        view.lag()
    );

    release.add_permits(1);
    view.wait_until(|n| *n == 1).await.unwrap();
    let handled = view.lag();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        view.lag(),
        handled,
        "idle and live: nothing more to measure"
    );
    view.stop().await.unwrap();
}
