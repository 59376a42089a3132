//! Reads and subscriptions over a log of several storage segments (65,536 events each): the
//! shared conformance suite stores far fewer events, so it never crosses a segment's end, where
//! readers switch between copying out of sealed segments and out of the open tail.

use futures::{Stream, StreamExt};
use photon_api::{
    Checkpoint, ContentType, EventData, EventStore, EventType, ExpectedVersion, Payload,
    ReadOptions, RecordedEvent, Selector, Start, StreamId, SubscriptionBatch, SubscriptionItem,
    SubscriptionMode, Version,
};
use photon_memory::MemoryStore;

/// What was appended, in log order: each event's stream, version and checkpoint.
#[derive(Default)]
struct Written {
    events: Vec<(StreamId, u64, Checkpoint)>,
}

/// Event `n` of the log carries `n` as its payload; every 1,000th one also carries a header.
fn event(n: usize) -> EventData {
    let mut e = EventData::new(
        EventType::new("Numbered").unwrap(),
        Payload::raw(ContentType::Json, n.to_string()),
    );
    if n.is_multiple_of(1_000) {
        e.metadata.headers.insert("n", n.to_string());
    }
    e
}

fn number(e: &RecordedEvent) -> usize {
    std::str::from_utf8(&e.payload.bytes)
        .unwrap()
        .parse()
        .unwrap()
}

/// Appends until the log holds `until` events, in batches of 300 over 10 `a` streams and 3 `b`
/// streams.
async fn append_until(store: &MemoryStore, written: &mut Written, until: usize) {
    while written.events.len() < until {
        let n = written.events.len();
        let batch = 300.min(until - n);
        let b = n / 300 % 4 == 3;
        let stream = match b {
            true => StreamId::parse(format!("b-{}", n / 1_200 % 3)).unwrap(),
            false => StreamId::parse(format!("a-{}", n / 300 % 10)).unwrap(),
        };
        let events = (n..n + batch).map(event).collect();
        let result = store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
        for (i, checkpoint) in result.checkpoints.into_iter().enumerate() {
            let version = result.first_version.value() + i as u64;
            written.events.push((stream.clone(), version, checkpoint));
        }
    }
}

/// Checks that `got` are exactly the written events `want` (by log index), in order.
fn check(got: &[RecordedEvent], want: impl IntoIterator<Item = usize>, written: &Written) {
    let want: Vec<usize> = want.into_iter().collect();
    assert_eq!(got.len(), want.len());
    for (e, n) in got.iter().zip(want) {
        let (stream, version, checkpoint) = &written.events[n];
        assert_eq!(number(e), n);
        assert_eq!((&e.stream, e.version.value()), (stream, *version));
        assert_eq!(&e.checkpoint, checkpoint);
        assert_eq!(
            e.metadata.headers.len(),
            usize::from(n.is_multiple_of(1_000)),
            "event {n}"
        );
    }
}

fn of(written: &Written, category: &str) -> Vec<usize> {
    let prefix = format!("{category}-");
    (0..written.events.len())
        .filter(|n| written.events[*n].0.as_str().starts_with(&prefix))
        .collect()
}

async fn events<S>(items: S) -> Vec<RecordedEvent>
where
    S: Stream<Item = Result<SubscriptionItem, photon_api::Error>>,
{
    items
        .filter_map(|i| async move { i.unwrap().into_event() })
        .collect()
        .await
}

async fn cold(store: &MemoryStore, selector: Selector, start: Start) -> Vec<RecordedEvent> {
    events(store.subscribe(selector, start, SubscriptionMode::Cold)).await
}

/// The next batch's events, checking its size: never empty, never over `max_batch`.
fn batch_events(batch: SubscriptionBatch, max_batch: usize) -> Vec<RecordedEvent> {
    match batch {
        SubscriptionBatch::Events(events) => {
            assert!((1..=max_batch).contains(&events.len()), "{}", events.len());
            events
        }
        SubscriptionBatch::CaughtUp => panic!("CaughtUp where events were due"),
    }
}

/// A Cold batched replay's events, in batches of up to `max_batch`.
async fn cold_batches(
    store: &MemoryStore,
    selector: Selector,
    start: Start,
    max_batch: usize,
) -> Vec<RecordedEvent> {
    let batches = store.subscribe_batches(selector, start, SubscriptionMode::Cold, max_batch);
    let batches: Vec<_> = batches.map(Result::unwrap).collect().await;
    batches
        .into_iter()
        .flat_map(|b| batch_events(b, max_batch))
        .collect()
}

async fn read(store: &MemoryStore, stream: &str, options: ReadOptions) -> Vec<RecordedEvent> {
    let stream = StreamId::parse(stream).unwrap();
    let read = store.read_stream(&stream, options);
    read.map(Result::unwrap).collect().await
}

#[tokio::test]
async fn reads_and_subscriptions_cross_segment_ends() {
    let store = MemoryStore::new();
    let mut written = Written::default();
    let category = |c: &str| Selector::Category(c.parse().unwrap());
    append_until(&store, &mut written, 60_000).await;
    // Live subscriptions opened before the first segment is full, read while later ones fill.
    let mut live_b = store.subscribe(category("b"), Start::Beginning, SubscriptionMode::HotCold);
    let mut live_all = store.subscribe(Selector::All, Start::Beginning, SubscriptionMode::HotCold);
    // And in batches, of a size that does not divide the fetch chunks (256).
    let mut live_batches = store.subscribe_batches(
        Selector::All,
        Start::Beginning,
        SubscriptionMode::HotCold,
        100,
    );
    let mut got_b = Vec::new();
    for _ in 0..10 {
        got_b.push(live_b.next().await.unwrap().unwrap());
    }
    // `live_all` reads between appends, so it holds sealed segments while later ones are sealed.
    let mut got_all = Vec::new();
    let (mut got_batches, mut batches_caught_up) = (Vec::new(), false);
    while written.events.len() < 140_000 {
        let until = written.events.len() + 10_000;
        append_until(&store, &mut written, until).await;
        for _ in 0..5_000 {
            if let SubscriptionItem::Event(e) = live_all.next().await.unwrap().unwrap() {
                got_all.push(e);
            }
        }
        while got_batches.len() < got_all.len() {
            live_batch(&mut live_batches, &mut got_batches, &mut batches_caught_up).await;
        }
    }
    let n = written.events.len();

    check(
        &cold(&store, Selector::All, Start::Beginning).await,
        0..n,
        &written,
    );
    let a = of(&written, "a");
    let b = of(&written, "b");
    check(
        &cold(&store, category("a"), Start::Beginning).await,
        a.clone(),
        &written,
    );
    // In batches: across the segment ends, and of sizes that do and do not divide a chunk.
    for max_batch in [1, 7, 256, 1_000] {
        check(
            &cold_batches(&store, Selector::All, Start::Beginning, max_batch).await,
            0..n,
            &written,
        );
    }
    check(
        &cold_batches(&store, category("a"), Start::Beginning, 100).await,
        a.clone(),
        &written,
    );
    // Resuming right before, at and after the first segment's end.
    for k in [65_534, 65_535, 65_536, 65_537, 131_071] {
        let after = Start::After(written.events[k].2.clone());
        check(
            &cold(&store, Selector::All, after.clone()).await,
            k + 1..n,
            &written,
        );
        check(
            &cold_batches(&store, Selector::All, after, 3).await,
            k + 1..n,
            &written,
        );
    }
    let k = a.iter().position(|n| *n >= 65_536).unwrap() - 1;
    let after = Start::After(written.events[a[k]].2.clone());
    check(
        &cold(&store, category("a"), after).await,
        a[k + 1..].to_vec(),
        &written,
    );

    // One stream forwards and backwards, whole and in pieces that cross the segment ends.
    let a0: Vec<usize> = a
        .iter()
        .copied()
        .filter(|n| written.events[*n].0.as_str() == "a-0")
        .collect();
    check(
        &read(&store, "a-0", ReadOptions::forwards()).await,
        a0.clone(),
        &written,
    );
    let backwards = a0.iter().rev().copied();
    check(
        &read(&store, "a-0", ReadOptions::backwards()).await,
        backwards,
        &written,
    );
    let edge = a0.iter().position(|n| *n >= 65_536).unwrap();
    let from = Version((edge - 150) as u64);
    let options = ReadOptions::forwards().from_version(from).limit(400);
    check(
        &read(&store, "a-0", options).await,
        a0[edge - 150..edge + 250].to_vec(),
        &written,
    );
    let options = ReadOptions::backwards()
        .from_version(Version(edge as u64 + 100))
        .limit(300);
    let want = a0[edge - 199..=edge + 100].iter().rev().copied();
    check(&read(&store, "a-0", options).await, want, &written);

    // The live subscriptions: the whole history, once each, then CaughtUp.
    let mut caught_up = false;
    while got_b.len() < b.len() + 1 {
        let item = live_b.next().await.unwrap().unwrap();
        caught_up |= item == SubscriptionItem::CaughtUp;
        got_b.push(item);
    }
    assert!(caught_up);
    let got_b: Vec<RecordedEvent> = got_b.into_iter().filter_map(|i| i.into_event()).collect();
    check(&got_b, b, &written);
    while got_all.len() < n {
        if let SubscriptionItem::Event(e) = live_all.next().await.unwrap().unwrap() {
            got_all.push(e);
        }
    }
    check(&got_all, 0..n, &written);
    while got_batches.len() < n {
        live_batch(&mut live_batches, &mut got_batches, &mut batches_caught_up).await;
    }
    check(&got_batches, 0..n, &written);
    assert!(batches_caught_up);
}

/// Takes the next batch of a HotCold batched subscription of everything opened when the log
/// held 60,000 events: its events, or `CaughtUp`, once, right after those 60,000.
async fn live_batch<S>(batches: &mut S, got: &mut Vec<RecordedEvent>, caught_up: &mut bool)
where
    S: Stream<Item = Result<SubscriptionBatch, photon_api::Error>> + Unpin,
{
    match batches.next().await.unwrap().unwrap() {
        SubscriptionBatch::CaughtUp => {
            assert_eq!((got.len(), *caught_up), (60_000, false));
            *caught_up = true;
        }
        batch => got.extend(batch_events(batch, 100)),
    }
}
