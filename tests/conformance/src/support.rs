//! Small tools the cases share: fresh names, numbered events, reads, appends that retry, bounded
//! waits. A tool used by one case file only stays in that file; nothing here asserts a guarantee
//! on its own.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use photon_api::{
    AppendResult, Category, Error, EventData, EventStore, EventStoreExt, ExpectedVersion,
    ReadOptions, RecordedEvent, Selector, Start, StreamId, SubscriptionItem, SubscriptionMode,
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

/// The versions of `events`, in order.
pub(crate) fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version.0).collect()
}

/// The numbers of events made by [`numbered`], in order.
pub(crate) fn numbers(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(number_of).collect()
}

/// The whole of `stream`, read forwards.
pub(crate) async fn read_all(store: &dyn EventStore, stream: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_to_vec(stream, ReadOptions::forwards())
        .await
        .expect("read")
}

/// Appends `count` numbered events (numbers `first..first+count`) in one batch.
pub(crate) async fn append_numbered(
    store: &dyn EventStore,
    stream: &StreamId,
    expected: ExpectedVersion,
    first: u64,
    count: u64,
) -> AppendResult {
    append_until_definite(
        store,
        stream,
        expected,
        (first..first + count).map(numbered).collect(),
    )
    .await
    .unwrap_or_else(|e| panic!("append to {stream}: {e}"))
}

/// Appends, re-sending the same batch (same ids) after a retryable error, as a careful client
/// does: a timeout says nothing about whether the batch landed, and idempotency makes the resend
/// safe. Real servers time out now and then under the concurrency cases' load.
pub(crate) async fn append_until_definite(
    store: &dyn EventStore,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
) -> Result<AppendResult, Error> {
    let mut attempt = 1;
    loop {
        match store.append(stream, expected, events.clone()).await {
            Err(e) if e.is_retryable() && attempt < 5 => {
                println!("retrying append to {stream} after: {e}");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Checks per-stream order: within each stream, versions come 0, 1, 2, ... with no gap or repeat.
pub(crate) fn assert_per_stream_order(events: &[RecordedEvent]) -> BTreeMap<StreamId, u64> {
    let mut next: BTreeMap<StreamId, u64> = BTreeMap::new();
    for e in events {
        let want = next.entry(e.stream.clone()).or_insert(0);
        assert_eq!(
            e.version.0, *want,
            "stream {} delivered version {} where {} was due",
            e.stream, e.version, want
        );
        *want += 1;
    }
    next
}
