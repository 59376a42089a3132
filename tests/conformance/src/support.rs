//! Small tools the cases share: fresh names, numbered events, bounded waits.

use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use photon_api::{
    Category, Error, EventData, EventStore, RecordedEvent, Selector, Start, StreamId,
    SubscriptionItem, SubscriptionMode,
};
use serde::{Deserialize, Serialize};

/// A random category (`t` + 24 hex digits), so runs never collide.
pub fn fresh_category() -> Category {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Category::new(format!("t{}", &id[..24])).expect("valid category")
}

/// A stream `<category>-<id>`.
pub fn fresh_stream(category: &Category, id: impl AsRef<str>) -> StreamId {
    StreamId::new(category, id).expect("valid stream")
}

#[derive(Serialize, Deserialize)]
struct Numbered {
    n: u64,
}

/// An event whose JSON payload carries `n`, so a case can check exactly which event arrived.
pub fn numbered(n: u64) -> EventData {
    EventData::json("Numbered", &Numbered { n }).expect("encodes")
}

/// The `n` of an event made by [`numbered`].
pub fn number_of(e: &RecordedEvent) -> u64 {
    e.decode::<Numbered>().expect("a numbered event").n
}

/// A cold replay of `selector` from `start`, collected.
pub async fn collect_cold(
    store: &dyn EventStore,
    selector: Selector,
    start: Start,
) -> Result<Vec<RecordedEvent>, Error> {
    store
        .subscribe(selector, start, SubscriptionMode::Cold)
        .map_ok(|item| match item {
            SubscriptionItem::Event(e) => e,
            SubscriptionItem::CaughtUp => panic!("a Cold subscription sent CaughtUp"),
        })
        .try_collect()
        .await
}

/// The next item, or a panic naming `what` after `patience`.
pub(crate) async fn next_within<S>(
    sub: &mut S,
    patience: Duration,
    what: &str,
) -> Result<SubscriptionItem, Error>
where
    S: Stream<Item = Result<SubscriptionItem, Error>> + Unpin,
{
    match tokio::time::timeout(patience, sub.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("subscription ended while waiting for {what}"),
        Err(_) => panic!("no item within {patience:?} while waiting for {what}"),
    }
}

/// The next event (CaughtUp not allowed here).
pub(crate) async fn next_event<S>(sub: &mut S, patience: Duration, what: &str) -> RecordedEvent
where
    S: Stream<Item = Result<SubscriptionItem, Error>> + Unpin,
{
    match next_within(sub, patience, what).await {
        Ok(SubscriptionItem::Event(e)) => e,
        Ok(SubscriptionItem::CaughtUp) => panic!("unexpected CaughtUp while waiting for {what}"),
        Err(e) => panic!("error while waiting for {what}: {e}"),
    }
}

/// Asserts that the next item is `CaughtUp`.
pub(crate) async fn expect_caught_up<S>(sub: &mut S, patience: Duration)
where
    S: Stream<Item = Result<SubscriptionItem, Error>> + Unpin,
{
    match next_within(sub, patience, "CaughtUp").await {
        Ok(SubscriptionItem::CaughtUp) => {}
        other => panic!("expected CaughtUp, got {other:?}"),
    }
}

/// Asserts that nothing arrives for a short while.
pub(crate) async fn assert_quiet<S>(sub: &mut S, wait: Duration, what: &str)
where
    S: Stream<Item = Result<SubscriptionItem, Error>> + Unpin,
{
    if let Ok(item) = tokio::time::timeout(wait, sub.next()).await {
        panic!("expected nothing {what}, got {item:?}");
    }
}
