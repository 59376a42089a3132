//! Guarantee 7 (subscriptions): Cold ends at the head as of its start, Hot delivers only later
//! events, HotCold replays then goes live with no gap and no duplicate while writers run.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use photon_api::{
    Checkpoint, Error, EventStore, ExpectedVersion, RecordedEvent, Selector, Start, StreamId,
    SubscriptionBatch, SubscriptionItem, SubscriptionMode, Uuid, Version,
};

use crate::support::{
    append_numbered, assert_per_stream_order, assert_quiet, collect_cold, expect_caught_up,
    fresh_stream, next_event, next_within, number_of, numbers, read_all,
};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_subscribe_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            cold_ends_at_head,
            hot_sees_only_later_events,
            hot_cold_with_concurrent_writers,
            hot_cold_catches_up_under_load,
            stream_subscription_hot_cold,
            batches_deliver_what_subscribe_delivers,
            batches_hot_cold_switch_live,
        }
    };
}

/// Guarantee 7, Cold: ends at the head as of its start; events stored later are not included,
/// and no `CaughtUp` is sent.
pub async fn cold_ends_at_head(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "cold");
    append_numbered(&*store, &stream, ExpectedVersion::NoStream, 0, 5).await;
    let mut sub = store.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::Cold,
    );
    let first = next_event(&mut sub, h.patience, "first cold event").await;
    assert_eq!(number_of(&first), 0);
    append_numbered(&*h.client().await, &stream, ExpectedVersion::Any, 5, 5).await;
    let rest: Vec<RecordedEvent> = tokio::time::timeout(
        h.patience,
        sub.map(|i| match i.unwrap() {
            SubscriptionItem::Event(e) => e,
            SubscriptionItem::CaughtUp => panic!("Cold sent CaughtUp"),
        })
        .collect::<Vec<_>>(),
    )
    .await
    .expect("a Cold subscription must end");
    assert_eq!(numbers(&rest), vec![1, 2, 3, 4]);
    // An empty category replays as an empty, ending subscription.
    let empty = collect_cold(&*store, Selector::Category(h.category()), Start::Beginning)
        .await
        .unwrap();
    assert!(empty.is_empty());
}

/// Guarantee 7, Hot: `CaughtUp` once live, then only later events; a Hot start other than Now is
/// refused.
pub async fn hot_sees_only_later_events(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "hot");
    append_numbered(&*store, &stream, ExpectedVersion::NoStream, 0, 3).await;
    let mut sub = store.subscribe(
        Selector::Category(category.clone()),
        Start::Now,
        SubscriptionMode::Hot,
    );
    expect_caught_up(&mut sub, h.patience).await;
    append_numbered(
        &*h.client().await,
        &stream,
        ExpectedVersion::Exact(Version(2)),
        3,
        2,
    )
    .await;
    let a = next_event(&mut sub, h.patience, "live event 3").await;
    let b = next_event(&mut sub, h.patience, "live event 4").await;
    assert_eq!((number_of(&a), number_of(&b)), (3, 4));
    assert_eq!((a.version, b.version), (Version(3), Version(4)));
    assert_quiet(
        &mut sub,
        Duration::from_millis(300),
        "after the live events",
    )
    .await;

    let mut bad = store.subscribe(
        Selector::Category(category),
        Start::Beginning,
        SubscriptionMode::Hot,
    );
    match bad.next().await {
        Some(Err(Error::InvalidInput { what, .. })) => assert!(what.contains("Hot")),
        other => panic!("want InvalidInput for Hot from Beginning, got {other:?}"),
    }
}

/// Guarantee 7, HotCold: with writers running before, during and after the switch, every event
/// arrives exactly once, per-stream order holds, and `CaughtUp` comes once.
pub async fn hot_cold_with_concurrent_writers(h: &Harness) {
    const WRITERS: u64 = 4;
    const EACH: u64 = 40;
    let category = h.category();
    // History before the subscription starts.
    let seed = h.client().await;
    for w in 0..WRITERS {
        let s = fresh_stream(&category, format!("w{w}"));
        append_numbered(&*seed, &s, ExpectedVersion::NoStream, w * 1000, 5).await;
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = h.client().await;
        let stream = fresh_stream(&category, format!("w{w}"));
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let n = 1 + i % 3;
                let first = w * 1000 + 5 + i * 3;
                append_numbered(&*store, &stream, ExpectedVersion::Any, first, n).await;
                if i % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let reader = h.client().await;
    let mut sub = reader.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    let total: u64 = WRITERS * (5 + (0..EACH).map(|i| 1 + i % 3).sum::<u64>());
    let mut events = Vec::new();
    let mut caught_up = 0;
    let deadline = Instant::now() + h.patience * 2;
    while (events.len() as u64) < total {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} events arrived",
            events.len()
        );
        match next_within(&mut sub, h.patience, "hot-cold events")
            .await
            .unwrap()
        {
            SubscriptionItem::Event(e) => events.push(e),
            SubscriptionItem::CaughtUp => {
                // The history stored before the subscription comes before CaughtUp.
                assert!(
                    events.len() as u64 >= WRITERS * 5,
                    "CaughtUp after only {} of the {} events stored before subscribing",
                    events.len(),
                    WRITERS * 5
                );
                caught_up += 1;
            }
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_quiet(&mut sub, Duration::from_millis(500), "after the last event").await;
    assert!(caught_up <= 1, "CaughtUp sent {caught_up} times");
    let ids: HashSet<Uuid> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len() as u64, total, "duplicates delivered");
    let next = assert_per_stream_order(&events);
    let stored: u64 = {
        let mut n = 0;
        for w in 0..WRITERS {
            n += read_all(&*reader, &fresh_stream(&category, format!("w{w}")))
                .await
                .len() as u64;
        }
        n
    };
    assert_eq!(stored, total);
    assert_eq!(next.values().sum::<u64>(), total);
    if caught_up == 0 {
        // The writers may still have been running when the last event arrived; CaughtUp must
        // then come now that they stopped.
        expect_caught_up(&mut sub, h.patience).await;
    }
}

/// Guarantee 7: a HotCold subscriber reaches `CaughtUp` in bounded time even while a writer
/// never stops appending, and nothing is missed or repeated around it.
pub async fn hot_cold_catches_up_under_load(h: &Harness) {
    let category = h.category();
    let stream = fresh_stream(&category, "busy");
    let writer = h.client().await;
    append_numbered(&*writer, &stream, ExpectedVersion::NoStream, 0, 50).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (stream, stop) = (stream.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 50;
            while !stop.load(Ordering::SeqCst) {
                append_numbered(&*writer, &stream, ExpectedVersion::Any, n, 5).await;
                n += 5;
                tokio::task::yield_now().await;
            }
            n
        })
    };
    let reader = h.client().await;
    let mut sub = reader.subscribe(
        Selector::Category(category),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    let mut got = Vec::new();
    let deadline = Instant::now() + h.patience;
    loop {
        assert!(
            Instant::now() < deadline,
            "no CaughtUp within {:?} under load",
            h.patience
        );
        match next_within(&mut sub, h.patience, "CaughtUp under load")
            .await
            .unwrap()
        {
            SubscriptionItem::Event(e) => {
                got.push(number_of(&e));
                // A slow consumer: the writer outpaces it.
                if got.len() % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            SubscriptionItem::CaughtUp => break,
        }
    }
    assert!(got.len() >= 50, "CaughtUp before the history was replayed");
    stop.store(true, Ordering::SeqCst);
    let written = w.await.unwrap();
    while (got.len() as u64) < written {
        got.push(number_of(
            &next_event(&mut sub, h.patience, "events after CaughtUp").await,
        ));
    }
    assert_eq!(got, (0..written).collect::<Vec<_>>());
    assert_quiet(
        &mut sub,
        Duration::from_millis(300),
        "after the writer stopped",
    )
    .await;
}

/// Guarantee 7 for one aggregate stream: HotCold delivers that stream only, replay then live.
pub async fn stream_subscription_hot_cold(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let mine = fresh_stream(&category, "mine");
    let other = fresh_stream(&category, "other");
    append_numbered(&*store, &mine, ExpectedVersion::NoStream, 0, 2).await;
    append_numbered(&*store, &other, ExpectedVersion::NoStream, 100, 2).await;
    let mut sub = store.subscribe(
        Selector::Stream(mine.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    let a = next_event(&mut sub, h.patience, "replayed 0").await;
    let b = next_event(&mut sub, h.patience, "replayed 1").await;
    assert_eq!(numbers(&[a, b]), vec![0, 1]);
    expect_caught_up(&mut sub, h.patience).await;
    append_numbered(&*store, &other, ExpectedVersion::Any, 102, 1).await;
    append_numbered(&*store, &mine, ExpectedVersion::Exact(Version(1)), 2, 1).await;
    let c = next_event(&mut sub, h.patience, "live 2").await;
    assert_eq!(
        (c.stream.clone(), c.version, number_of(&c)),
        (mine, Version(2), 2)
    );
    assert_quiet(&mut sub, Duration::from_millis(300), "from other streams").await;
}

/// A batched subscription's items one by one, as `subscribe` gives them, checking each batch on
/// the way: never empty, never over `max_batch`.
fn flattened(
    batches: BoxStream<'static, Result<SubscriptionBatch, Error>>,
    max_batch: usize,
) -> impl Stream<Item = Result<SubscriptionItem, Error>> + Unpin {
    batches.flat_map(move |batch| {
        let items: Vec<Result<SubscriptionItem, Error>> = match batch {
            Ok(SubscriptionBatch::Events(events)) => {
                assert!(
                    (1..=max_batch).contains(&events.len()),
                    "a batch of {} events, asked for at most {max_batch}",
                    events.len()
                );
                events
                    .into_iter()
                    .map(|e| Ok(SubscriptionItem::Event(e)))
                    .collect()
            }
            Ok(SubscriptionBatch::CaughtUp) => vec![Ok(SubscriptionItem::CaughtUp)],
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(items)
    })
}

/// A Cold batched replay of `selector` from `start`, its events collected.
async fn collect_cold_batches(
    store: &dyn EventStore,
    selector: Selector,
    start: Start,
    max_batch: usize,
) -> Result<Vec<RecordedEvent>, Error> {
    let batches = store.subscribe_batches(selector, start, SubscriptionMode::Cold, max_batch);
    let mut items = flattened(batches, max_batch);
    let mut events = Vec::new();
    while let Some(item) = items.next().await {
        match item? {
            SubscriptionItem::Event(e) => events.push(e),
            SubscriptionItem::CaughtUp => panic!("a Cold batched subscription sent CaughtUp"),
        }
    }
    Ok(events)
}

/// Each stream's event ids, in the order delivered.
fn per_stream(events: &[RecordedEvent]) -> BTreeMap<StreamId, Vec<Uuid>> {
    let mut m: BTreeMap<StreamId, Vec<Uuid>> = BTreeMap::new();
    for e in events {
        m.entry(e.stream.clone()).or_default().push(e.event_id);
    }
    m
}

/// Guarantee 7 in batches: `subscribe_batches` delivers what `subscribe` delivers (the same
/// order where the backend has a total order, per-stream order always), in batches of at most
/// the size asked for; resumes after a batch's checkpoint like `subscribe`; refuses a largest
/// batch of 0 and a Hot start other than Now as its first item.
pub async fn batches_deliver_what_subscribe_delivers(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    // 300 events, more than one of photon-memory's fetch chunks (256).
    for s in 0..3u64 {
        let stream = fresh_stream(&category, format!("b{s}"));
        for b in 0..4u64 {
            append_numbered(
                &*store,
                &stream,
                ExpectedVersion::Any,
                s * 1000 + b * 25,
                25,
            )
            .await;
        }
    }
    let selector = Selector::Category(category.clone());
    let single = collect_cold(&*store, selector.clone(), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(single.len(), 300);
    let ids = |events: &[RecordedEvent]| events.iter().map(|e| e.event_id).collect::<Vec<_>>();
    for max_batch in [1, 7, 1000] {
        let batched = collect_cold_batches(&*store, selector.clone(), Start::Beginning, max_batch)
            .await
            .unwrap();
        if store.capabilities().total_order {
            assert_eq!(ids(&batched), ids(&single), "batches of up to {max_batch}");
        }
        assert_eq!(
            per_stream(&batched),
            per_stream(&single),
            "batches of up to {max_batch}"
        );
        assert_per_stream_order(&batched);
    }

    // Resuming after an event a batch delivered, through the checkpoint's text form.
    let batched = collect_cold_batches(&*store, selector.clone(), Start::Beginning, 64)
        .await
        .unwrap();
    let other_client = h.client().await;
    for i in [0, 63, 64, 200, 299] {
        let stored: Checkpoint = batched[i].checkpoint.to_string().parse().unwrap();
        let resumed =
            collect_cold_batches(&*other_client, selector.clone(), Start::After(stored), 50)
                .await
                .unwrap();
        if store.capabilities().total_order {
            assert_eq!(
                ids(&resumed),
                ids(&batched[i + 1..]),
                "resume after event {i}"
            );
        }
        assert_eq!(
            per_stream(&resumed),
            per_stream(&batched[i + 1..]),
            "resume after event {i}"
        );
    }

    let mut zero = store.subscribe_batches(
        selector.clone(),
        Start::Beginning,
        SubscriptionMode::Cold,
        0,
    );
    match zero.next().await {
        Some(Err(Error::InvalidInput { what, .. })) => {
            assert!(what.contains("max_batch"), "{what}")
        }
        other => panic!("want InvalidInput for a largest batch of 0, got {other:?}"),
    }
    assert!(zero.next().await.is_none(), "the error is the only item");
    let mut hot = store.subscribe_batches(selector, Start::Beginning, SubscriptionMode::Hot, 10);
    match hot.next().await {
        Some(Err(Error::InvalidInput { what, .. })) => assert!(what.contains("Hot"), "{what}"),
        other => panic!("want InvalidInput for Hot from Beginning, got {other:?}"),
    }
}

/// Guarantee 7 in batches, HotCold: the history, `CaughtUp` once (in no batch), then each live
/// append as soon as it is stored, not when a batch fills.
pub async fn batches_hot_cold_switch_live(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "batched");
    append_numbered(&*store, &stream, ExpectedVersion::NoStream, 0, 30).await;
    let mut batches = store.subscribe_batches(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
        1000,
    );
    let mut next = async || match tokio::time::timeout(h.patience, batches.next()).await {
        Ok(Some(Ok(batch))) => batch,
        other => panic!("want a batch within {:?}, got {other:?}", h.patience),
    };
    let mut history = Vec::new();
    while history.len() < 30 {
        match next().await {
            SubscriptionBatch::Events(events) => history.extend(events),
            SubscriptionBatch::CaughtUp => panic!("CaughtUp after {} of 30 events", history.len()),
        }
    }
    assert_eq!(numbers(&history), (0..30).collect::<Vec<_>>());
    assert_eq!(next().await, SubscriptionBatch::CaughtUp);
    let writer = h.client().await;
    for n in 30..33 {
        append_numbered(
            &*writer,
            &stream,
            ExpectedVersion::Exact(Version(n - 1)),
            n,
            1,
        )
        .await;
        // Delivered alone, though the batch could hold 1,000.
        let SubscriptionBatch::Events(live) = next().await else {
            panic!("a second CaughtUp");
        };
        assert_eq!(numbers(&live), [n], "a live batch");
        assert_eq!(live[0].version, Version(n));
    }
    if let Ok(more) = tokio::time::timeout(Duration::from_millis(300), batches.next()).await {
        panic!("expected nothing after the live events, got {more:?}");
    }
}
