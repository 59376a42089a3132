//! What the memory store records of its subscriptions' lag in events
//! (`photon_subscription_lag_events`): one sample per fetch that delivered events, none for a
//! fetch that found nothing (a replay of nothing, a wakeup by another category's append).

use futures::{FutureExt, StreamExt};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use photon_api::telemetry::SUBSCRIPTION_LAG_EVENTS;
use photon_api::{
    Category, ContentType, EventData, EventStore, EventType, ExpectedVersion, Payload, Selector,
    Start, StreamId, SubscriptionItem, SubscriptionMode,
};
use photon_memory::MemoryStore;

fn samples(snapshotter: &Snapshotter) -> usize {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(key, _, _, value)| match value {
            DebugValue::Histogram(values) if key.key().name() == SUBSCRIPTION_LAG_EVENTS => {
                Some(values.len())
            }
            _ => None,
        })
        .unwrap_or(0)
}

async fn append_one(store: &MemoryStore, category: &Category, id: &str) {
    let stream = StreamId::new(category, id).unwrap();
    let event = EventData::new(
        EventType::new("Happened").unwrap(),
        Payload::raw(ContentType::Json, "{}"),
    );
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event])
        .await
        .unwrap();
}

#[tokio::test]
async fn lag_in_events_is_sampled_only_by_fetches_that_deliver() {
    let store = MemoryStore::new();
    let quiet = Category::new("quiet").unwrap();
    let other = Category::new("other").unwrap();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The test's thread polls the store (memory answers synchronously), so a local recorder sees
    // everything it records.
    let _local = metrics::set_default_local_recorder(&recorder);

    let replayed: Vec<_> = store
        .subscribe(
            Selector::Category(quiet.clone()),
            Start::Beginning,
            SubscriptionMode::Cold,
        )
        .collect()
        .await;
    assert!(replayed.iter().all(Result::is_ok), "{replayed:?}");
    assert_eq!(
        samples(&snapshotter),
        0,
        "a replay of nothing delivered nothing"
    );

    let mut live = store.subscribe(
        Selector::Category(quiet.clone()),
        Start::Now,
        SubscriptionMode::Hot,
    );
    assert!(matches!(
        live.next().await,
        Some(Ok(SubscriptionItem::CaughtUp))
    ));
    append_one(&store, &other, "1").await;
    assert!(
        live.next().now_or_never().is_none(),
        "another category's event wakes the subscription but is not delivered"
    );
    assert_eq!(samples(&snapshotter), 0, "the wakeup delivered nothing");

    append_one(&store, &quiet, "1").await;
    assert!(matches!(
        live.next().await,
        Some(Ok(SubscriptionItem::Event(_)))
    ));
    assert_eq!(samples(&snapshotter), 1, "one fetch delivered");
}
