//! The fault options of `memory://`: each plays the weaker guarantee it names, decided by the
//! seed alone, and none loses or doubles an event.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use photon_api::{
    Category, Checkpoint, Error, EventData, EventStore, ExpectedVersion, ReadOptions,
    RecordedEvent, Selector, Start, StreamId, SubscriptionItem, SubscriptionMode, Uuid, Version,
};
use photon_memory::{Faults, MemoryStore};

fn store(url: &str) -> MemoryStore {
    MemoryStore::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn event(n: usize) -> EventData {
    EventData::json("Counted", &serde_json::json!({ "n": n })).unwrap()
}

fn stream(i: usize) -> StreamId {
    StreamId::parse(format!("acct-{i}")).unwrap()
}

fn category() -> Selector {
    Selector::Category(Category::new("acct").unwrap())
}

/// Appends `n` single events round-robin over `streams` streams, retrying `Unavailable` with the
/// same ids; returns the event ids in the order their appends returned.
async fn fill(store: &MemoryStore, streams: usize, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        let e = event(i);
        ids.push(e.event_id);
        loop {
            match store
                .append(&stream(i % streams), ExpectedVersion::Any, vec![e.clone()])
                .await
            {
                Ok(_) => break,
                Err(Error::Unavailable { .. }) => continue,
                Err(e) => panic!("append {i}: {e}"),
            }
        }
    }
    ids
}

/// Every event of a Cold subscription, or the first error.
async fn cold(
    store: &MemoryStore,
    selector: Selector,
    start: Start,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut items = store.subscribe(selector, start, SubscriptionMode::Cold);
    let mut out = Vec::new();
    while let Some(item) = items.next().await {
        match item? {
            SubscriptionItem::Event(e) => out.push(e),
            SubscriptionItem::CaughtUp => panic!("Cold never says CaughtUp"),
        }
    }
    Ok(out)
}

/// Asserts each stream's events come in version order, from 0, without gaps.
fn assert_stream_order(events: &[RecordedEvent]) {
    let mut next: BTreeMap<&StreamId, u64> = BTreeMap::new();
    for e in events {
        let want = next.entry(&e.stream).or_default();
        assert_eq!(e.version, Version(*want), "{} out of order", e.stream);
        *want += 1;
    }
}

fn ids(events: &[RecordedEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

#[test]
fn bad_option_values_are_refused_naming_the_option() {
    for (url, needle) in [
        (
            "memory://?faults=chaos",
            "faults must be production or none",
        ),
        ("memory://?seed=-1", "seed must be a whole number"),
        ("memory://?seed=x", "seed must be a whole number"),
        (
            "memory://?partitions=0",
            "partitions must be a whole number from 1 to 1024",
        ),
        (
            "memory://?partitions=1025",
            "partitions must be a whole number from 1 to 1024",
        ),
        (
            "memory://?delivery_delay_ms=-5",
            "delivery_delay_ms must be a whole number",
        ),
        (
            "memory://?delivery_delay_ms=60001",
            "delivery_delay_ms must be a whole number",
        ),
        (
            "memory://?unavailable_after=1.5",
            "unavailable_after must be a number from 0 to 1",
        ),
        (
            "memory://?unavailable_after=NaN",
            "unavailable_after must be a number from 0 to 1",
        ),
        (
            "memory://?unavailable_before=-0.1",
            "unavailable_before must be a number from 0 to 1",
        ),
        (
            "memory://?subscription_drop=often",
            "subscription_drop must be a number from 0 to 1",
        ),
        ("memory://?seed=1&seed=2", "given twice"),
        ("memory://?partition=4", "unknown option \"partition\""),
    ] {
        let err = MemoryStore::from_url(url).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput { reason, .. } if reason.contains(needle)),
            "{url}: {err}"
        );
    }
}

#[test]
fn options_set_the_faults_and_the_capabilities() {
    assert_eq!(store("memory://").config().faults, None);
    assert!(store("memory://").capabilities().total_order);
    let production = store("memory://?faults=production&seed=7");
    assert_eq!(
        production.config().faults,
        Some(Faults {
            seed: 7,
            ..Faults::production()
        })
    );
    assert!(
        !production.capabilities().total_order,
        "partitioned as Kafka"
    );
    let explicit = store(
        "memory://?faults=production&partitions=2&delivery_delay_ms=5&unavailable_after=0.5\
         &unavailable_before=0&subscription_drop=0.25",
    );
    assert_eq!(
        explicit.config().faults,
        Some(Faults {
            seed: Faults::DEFAULT_SEED,
            partitions: Some(2),
            delivery_delay: Duration::from_millis(5),
            unavailable_after: 0.5,
            unavailable_before: 0.0,
            subscription_drop: 0.25,
        }),
        "explicit options override the preset"
    );
    let one = store("memory://?partitions=1");
    assert_eq!(one.config().faults, Some(Faults::none()));
    assert!(one.capabilities().total_order, "one partition is one order");
    let built = MemoryStore::builder().faults(Faults::production()).build();
    assert!(!built.capabilities().total_order);
}

#[tokio::test]
async fn unavailable_before_stores_nothing() {
    let s = store("memory://?unavailable_before=1");
    for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream] {
        let err = s
            .append(&stream(1), expected, vec![event(0)])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable { message, .. } if message.contains("acct-1")
                && message.contains("not stored")),
            "{err}"
        );
    }
    assert_eq!(s.stream_version(&stream(1)).await.unwrap(), None);
    assert!(cold(&s, Selector::All, Start::Beginning)
        .await
        .unwrap()
        .is_empty());
    // Bad input is refused as such, not answered Unavailable.
    let err = s
        .append(&stream(1), ExpectedVersion::Any, vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");

    // A share: exactly the appends answered Ok are stored.
    let s = store("memory://?unavailable_before=0.4&seed=3");
    let (mut stored, mut refused) = (Vec::new(), 0);
    for i in 0..100 {
        let e = event(i);
        match s
            .append(&stream(2), ExpectedVersion::Any, vec![e.clone()])
            .await
        {
            Ok(_) => stored.push(e.event_id),
            Err(Error::Unavailable { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!((20..=60).contains(&refused), "{refused} of 100 refused");
    let read: Vec<RecordedEvent> = s
        .read_stream(&stream(2), ReadOptions::forwards())
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(ids(&read), stored);
}

#[tokio::test]
async fn unavailable_after_stores_and_a_resend_is_a_retry_with_the_original_versions() {
    let s = store("memory://?unavailable_after=0.5&seed=5");
    let mut answered_unavailable = 0;
    let mut batches = Vec::new();
    for i in 0..40 {
        let batch = vec![event(2 * i), event(2 * i + 1)];
        let expected = ExpectedVersion::from_current(s.stream_version(&stream(1)).await.unwrap());
        let mut outcome = s.append(&stream(1), expected, batch.clone()).await;
        if let Err(Error::Unavailable { message, .. }) = &outcome {
            answered_unavailable += 1;
            assert!(message.contains("stored as versions"), "{message}");
            // It landed: the stream already holds it.
            let version = s.stream_version(&stream(1)).await.unwrap().unwrap();
            assert_eq!(version, Version(2 * i as u64 + 1));
            // The same ids, the same (now stale) expected version: answered as a retry.
            while let Err(Error::Unavailable { .. }) = outcome {
                outcome = s.append(&stream(1), expected, batch.clone()).await;
            }
        }
        let result = outcome.unwrap();
        assert_eq!(result.first_version, Version(2 * i as u64));
        assert_eq!(result.last_version, Version(2 * i as u64 + 1));
        batches.extend(batch.iter().map(|e| e.event_id));
    }
    assert!(answered_unavailable >= 10, "{answered_unavailable}");
    let read: Vec<RecordedEvent> = s
        .read_stream(&stream(1), ReadOptions::forwards())
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(ids(&read), batches, "nothing lost or doubled");
    // A refused append is never answered Unavailable-after: it stored nothing.
    let s = store("memory://?unavailable_after=1");
    let err = s
        .append(
            &stream(1),
            ExpectedVersion::Exact(Version(3)),
            vec![event(0)],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongExpectedVersion { .. }), "{err}");
}

/// The outcome of each of `n` appends, as Ok/Unavailable.
async fn outcomes(url: &str, n: usize) -> Vec<bool> {
    let s = store(url);
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            s.append(&stream(i % 3), ExpectedVersion::Any, vec![event(i)])
                .await
                .is_ok(),
        );
    }
    out
}

/// The delivery order (by payload number) of a partitioned category subscription, and where it
/// dropped.
async fn delivery(url: &str) -> (Vec<String>, Option<usize>) {
    let s = store(url);
    fill(&s, 8, 64).await;
    let mut items = s.subscribe(category(), Start::Beginning, SubscriptionMode::Cold);
    let mut order = Vec::new();
    let mut dropped = None;
    while let Some(item) = items.next().await {
        match item {
            Ok(SubscriptionItem::Event(e)) => order.push(format!("{}/{}", e.stream, e.version)),
            Ok(SubscriptionItem::CaughtUp) => {}
            Err(_) => dropped = Some(order.len()),
        }
    }
    (order, dropped)
}

#[tokio::test]
async fn decisions_come_from_the_seed() {
    let a = "memory://?unavailable_after=0.3&unavailable_before=0.3&seed=42";
    assert_eq!(outcomes(a, 200).await, outcomes(a, 200).await);
    let b = "memory://?unavailable_after=0.3&unavailable_before=0.3&seed=43";
    assert_ne!(outcomes(a, 200).await, outcomes(b, 200).await);

    let a = "memory://?partitions=4&subscription_drop=0.02&seed=42";
    let first = delivery(a).await;
    assert_eq!(first, delivery(a).await, "same seed, same order and drop");
    let b = "memory://?partitions=4&subscription_drop=0.02&seed=44";
    assert_ne!(first, delivery(b).await);
}

#[tokio::test]
async fn partitions_reorder_across_streams_never_within_one() {
    let s = store("memory://?partitions=4&seed=1");
    let appended = fill(&s, 16, 200).await;
    for selector in [category(), Selector::All] {
        let got = cold(&s, selector.clone(), Start::Beginning).await.unwrap();
        assert_stream_order(&got);
        let got_ids = ids(&got);
        assert_ne!(got_ids, appended, "{selector:?}: not the append order");
        let mut sorted = got_ids.clone();
        sorted.sort();
        let mut want = appended.clone();
        want.sort();
        assert_eq!(sorted, want, "{selector:?}: each event exactly once");
        // Checkpoints are partition vectors, not the event's log position.
        assert!(got.iter().all(|e| e.checkpoint.token().len() == 1 + 4 * 8));
    }
    // Stream subscriptions and reads are untouched.
    let one = cold(&s, Selector::Stream(stream(3)), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(one.len(), 200 / 16 + 1);
    assert_stream_order(&one);
}

#[tokio::test]
async fn resuming_from_every_partitioned_checkpoint_gives_exactly_what_followed() {
    let s = store("memory://?partitions=3&seed=9");
    fill(&s, 10, 60).await;
    for selector in [category(), Selector::All] {
        let got = cold(&s, selector.clone(), Start::Beginning).await.unwrap();
        assert_eq!(got.len(), 60);
        for (i, e) in got.iter().enumerate() {
            let rest = cold(&s, selector.clone(), Start::After(e.checkpoint.clone()))
                .await
                .unwrap();
            let mut rest_ids = ids(&rest);
            rest_ids.sort();
            let mut want = ids(&got[i + 1..]);
            want.sort();
            assert_eq!(rest_ids, want, "{selector:?}: after delivered event {i}");
            // Per-stream order holds in the resumed part too.
            let mut next: BTreeMap<&StreamId, Version> = BTreeMap::new();
            for r in &rest {
                if let Some(v) = next.insert(&r.stream, r.version) {
                    assert!(r.version > v);
                }
            }
        }
    }
    // A plain position checkpoint (from an append) resumes after that position in every
    // partition.
    let appended = s
        .append(&stream(0), ExpectedVersion::Any, vec![event(60)])
        .await
        .unwrap();
    let after = cold(
        &s,
        category(),
        Start::After(appended.checkpoints[0].clone()),
    )
    .await
    .unwrap();
    assert!(after.is_empty());
}

#[tokio::test]
async fn foreign_partition_checkpoints_are_refused() {
    let four = store("memory://?partitions=4");
    fill(&four, 4, 8).await;
    let got = cold(&four, category(), Start::Beginning).await.unwrap();
    let vector = got[0].checkpoint.clone();
    let two = store("memory://?partitions=2");
    fill(&two, 4, 8).await;
    let err = cold(&two, category(), Start::After(vector.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { what, reason } if what.contains(&vector.to_string())
            && reason.contains("4 partitions, this store has 2")),
        "{err}"
    );
    // A store without partitions cannot read a vector.
    let plain = store("memory://");
    fill(&plain, 4, 8).await;
    let err = cold(&plain, category(), Start::After(vector.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    // A vector past this store's end was made by another store.
    let small = store("memory://?partitions=4");
    fill(&small, 1, 1).await;
    let last = got.last().unwrap().checkpoint.clone();
    let err = cold(&small, category(), Start::After(last))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { reason, .. } if reason.contains("past the end")),
        "{err}"
    );
    // A malformed token.
    let bad = Checkpoint::new("memory", b"xyz");
    let err = cold(&four, category(), Start::After(bad))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { reason, .. } if reason.contains("3 bytes")),
        "{err}"
    );
}

#[tokio::test]
async fn delivery_delay_holds_category_events_back_but_not_stream_reads() {
    let s = store("memory://?delivery_delay_ms=1000");
    let mut live = s.subscribe(category(), Start::Beginning, SubscriptionMode::HotCold);
    assert!(matches!(
        live.next().await,
        Some(Ok(SubscriptionItem::CaughtUp))
    ));
    let mut by_stream = s.subscribe(
        Selector::Stream(stream(1)),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    assert!(matches!(
        by_stream.next().await,
        Some(Ok(SubscriptionItem::CaughtUp))
    ));
    let e = event(0);
    s.append(&stream(1), ExpectedVersion::NoStream, vec![e.clone()])
        .await
        .unwrap();
    // Reads and stream subscriptions see it at once.
    let read: Vec<RecordedEvent> = s
        .read_stream(&stream(1), ReadOptions::forwards())
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(ids(&read), vec![e.event_id]);
    match by_stream.next().await {
        Some(Ok(SubscriptionItem::Event(got))) => assert_eq!(got.event_id, e.event_id),
        other => panic!("{other:?}"),
    }
    // The category subscription does not, yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), live.next())
            .await
            .is_err(),
        "delivered before it was 1 s old"
    );
    // A HotCold subscription made now says CaughtUp only after delivering it, and a Cold one
    // ends only after it: both wait for the delay rather than skip the event.
    let mut later = s.subscribe(category(), Start::Beginning, SubscriptionMode::HotCold);
    match later.next().await {
        Some(Ok(SubscriptionItem::Event(got))) => assert_eq!(got.event_id, e.event_id),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        later.next().await,
        Some(Ok(SubscriptionItem::CaughtUp))
    ));
    let all = cold(&s, Selector::All, Start::Beginning).await.unwrap();
    assert_eq!(ids(&all), vec![e.event_id]);
    // And the live one gets it once it is old enough.
    match live.next().await {
        Some(Ok(SubscriptionItem::Event(got))) => assert_eq!(got.event_id, e.event_id),
        other => panic!("{other:?}"),
    }
}

/// Follows `selector` with HotCold from the beginning until it has `n` events, resuming from the
/// last checkpoint whenever the subscription drops; returns the events and the drops.
async fn follow_through_drops(
    s: &MemoryStore,
    selector: Selector,
    n: usize,
) -> (Vec<RecordedEvent>, usize) {
    let mut got: Vec<RecordedEvent> = Vec::new();
    let mut drops = 0;
    while got.len() < n {
        let start = got
            .last()
            .map_or(Start::Beginning, |e| Start::After(e.checkpoint.clone()));
        let mut items = s.subscribe(selector.clone(), start, SubscriptionMode::HotCold);
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(10), items.next())
                .await
                .expect("no stall")
            {
                Some(Ok(SubscriptionItem::Event(e))) => got.push(e),
                Some(Ok(SubscriptionItem::CaughtUp)) => {}
                Some(Err(Error::Unavailable { message, .. })) => {
                    assert!(message.contains("subscription_drop"), "{message}");
                    assert!(items.next().await.is_none(), "ends after the drop");
                    drops += 1;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    (got, drops)
}

#[tokio::test]
async fn dropped_subscriptions_resume_without_loss_or_double() {
    for url in [
        "memory://?subscription_drop=0.1&seed=2",
        "memory://?subscription_drop=0.1&partitions=4&delivery_delay_ms=5&seed=2",
    ] {
        let s = store(url);
        let appended = fill(&s, 6, 150).await;
        for selector in [category(), Selector::All, Selector::Stream(stream(2))] {
            let want: HashSet<Uuid> = match &selector {
                Selector::Stream(_) => appended.iter().skip(2).step_by(6).copied().collect(),
                _ => appended.iter().copied().collect(),
            };
            let (got, drops) = follow_through_drops(&s, selector.clone(), want.len()).await;
            assert!(drops > 0, "{url} {selector:?}: dropped at least once");
            assert_stream_order(&got);
            let got_ids = ids(&got);
            assert_eq!(got_ids.iter().copied().collect::<HashSet<_>>(), want);
            assert_eq!(got_ids.len(), want.len(), "{url} {selector:?}: no doubles");
        }
        // Live: events appended while following arrive too, across drops.
        let s = store(url);
        let writer = {
            let s = s.clone();
            tokio::spawn(async move { fill(&s, 5, 80).await })
        };
        let (got, _) = follow_through_drops(&s, category(), 80).await;
        let appended = writer.await.unwrap();
        assert_stream_order(&got);
        let mut got_ids = ids(&got);
        got_ids.sort();
        let mut want = appended;
        want.sort();
        assert_eq!(got_ids, want);
    }
}

#[tokio::test]
async fn the_default_store_plays_no_fault() {
    let s = store("memory://");
    let appended = fill(&s, 16, 100).await;
    let got = cold(&s, category(), Start::Beginning).await.unwrap();
    assert_eq!(ids(&got), appended, "one total order, the append order");
    assert!(got.iter().all(|e| e.checkpoint.token().len() == 8));
}
