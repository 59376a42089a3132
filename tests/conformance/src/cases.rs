//! One case per guarantee of the contract (design.md numbers them 1 to 10), each asserting the
//! exact events, versions and error variants the guarantee promises.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use photon_api::{
    Category, Checkpoint, ContentType, Error, EventData, EventStore, EventStoreExt, EventType,
    ExpectedVersion, Payload, ReadOptions, RecordedEvent, Selector, Start, StreamId,
    SubscriptionItem, SubscriptionMode, Timestamp, Uuid, Version,
};

use crate::support::{
    assert_quiet, collect_cold, expect_caught_up, fresh_stream, next_event, next_within, number_of,
    numbered,
};
use crate::Harness;

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version.0).collect()
}

fn numbers(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(number_of).collect()
}

async fn read_all(store: &dyn EventStore, stream: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_to_vec(stream, ReadOptions::forwards())
        .await
        .expect("read")
}

/// Appends `count` numbered events (numbers `first..first+count`) in one batch.
async fn append_numbered(
    store: &dyn EventStore,
    stream: &StreamId,
    expected: ExpectedVersion,
    first: u64,
    count: u64,
) -> photon_api::AppendResult {
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
async fn append_until_definite(
    store: &dyn EventStore,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
) -> Result<photon_api::AppendResult, Error> {
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
fn assert_per_stream_order(events: &[RecordedEvent]) -> BTreeMap<StreamId, u64> {
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

/// Guarantees 1 and 5: every field written reads back unchanged, versions count from 0, and the
/// append's checkpoints are the ones reads carry.
pub async fn append_read_round_trip(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "round-trip");
    let occurred = Timestamp::from_unix_micros(1_700_000_000_123_456).unwrap();
    let cause = Uuid::new_v4();
    let correlation = Uuid::new_v4();
    let written = vec![
        EventData::msgpack("Opened", &serde_json::json!({"owner": "ada", "limit": 10}))
            .unwrap()
            .with_schema_version(3)
            .with_occurred_at(occurred)
            .with_causation_id(cause)
            .with_correlation_id(correlation)
            .with_header("tenant", "t-1")
            .with_header("ünïcode", "välue ✓"),
        EventData::json("Renamed", &serde_json::json!({"name": "Ada L."})).unwrap(),
        EventData::new(
            EventType::new("Blob").unwrap(),
            Payload::raw(
                ContentType::from_mime("application/octet-stream"),
                vec![0u8, 255, 1, 0],
            ),
        ),
        EventData::new(
            EventType::new("Empty").unwrap(),
            Payload::raw(ContentType::Json, Vec::<u8>::new()),
        ),
    ];
    let before = Timestamp::now();
    let result = store
        .append(&stream, ExpectedVersion::NoStream, written.clone())
        .await
        .expect("append");
    assert_eq!(result.first_version, Version(0));
    assert_eq!(result.last_version, Version(3));
    assert_eq!(result.checkpoints.len(), 4);

    let read = read_all(&*store, &stream).await;
    assert_eq!(read.len(), 4);
    for (i, (w, r)) in written.iter().zip(&read).enumerate() {
        assert_eq!(r.stream, stream);
        assert_eq!(r.version, Version(i as u64));
        assert_eq!(r.event_id, w.event_id);
        assert_eq!(r.event_type, w.event_type);
        assert_eq!(r.schema_version, w.schema_version);
        assert_eq!(r.occurred_at, w.occurred_at);
        assert_eq!(r.payload, w.payload, "payload of event {i}");
        assert_eq!(r.metadata, w.metadata, "metadata of event {i}");
        assert_eq!(r.checkpoint, result.checkpoints[i]);
        assert_eq!(r.checkpoint.backend(), h.backend());
        assert!(
            r.recorded_at.unix_micros() >= before.unix_micros() - 5_000_000,
            "recorded_at {} is long before the append at {}",
            r.recorded_at,
            before
        );
    }
    assert_eq!(read[0].occurred_at, occurred);
    assert_eq!(read[0].metadata.headers.get("ünïcode"), Some("välue ✓"));
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        Some(Version(3))
    );
    assert_eq!(
        read[0].decode::<serde_json::Value>().unwrap(),
        serde_json::json!({"owner": "ada", "limit": 10})
    );
}

/// Guarantee 3: each expectation against a new and an existing stream, with the exact error and
/// nothing stored on failure.
pub async fn expected_version_matrix(h: &Harness) {
    use ExpectedVersion::*;
    let store = h.client().await;
    let category = h.category();
    // (expectation, stream exists with last version 1?, should succeed)
    let cases = [
        (Any, false, true),
        (Any, true, true),
        (NoStream, false, true),
        (NoStream, true, false),
        (StreamExists, false, false),
        (StreamExists, true, true),
        (Exact(Version(0)), false, false),
        (Exact(Version(1)), true, true),
        (Exact(Version(0)), true, false),
        (Exact(Version(2)), true, false),
    ];
    for (i, (expected, exists, ok)) in cases.into_iter().enumerate() {
        let stream = fresh_stream(&category, format!("m{i}"));
        let actual = if exists {
            append_numbered(&*store, &stream, NoStream, 0, 2).await;
            Some(Version(1))
        } else {
            None
        };
        let outcome = store.append(&stream, expected, vec![numbered(9)]).await;
        let after = read_all(&*store, &stream).await;
        if ok {
            let r = outcome.unwrap_or_else(|e| panic!("{expected:?} on exists={exists}: {e}"));
            let want = actual.map_or(Version(0), Version::next);
            assert_eq!((r.first_version, r.last_version), (want, want));
            assert_eq!(numbers(&after).last(), Some(&9));
        } else {
            match outcome {
                Err(Error::WrongExpectedVersion {
                    stream: s,
                    expected: e,
                    actual: a,
                }) => {
                    assert_eq!((s, e, a), (stream.clone(), expected, actual));
                }
                other => panic!(
                    "{expected:?} on exists={exists}: want WrongExpectedVersion, got {other:?}"
                ),
            }
            assert_eq!(
                numbers(&after),
                if exists { vec![0, 1] } else { vec![] },
                "a refused append changed the stream"
            );
        }
    }
}

/// Guarantee 3 across clients: N separate clients race with the same expectation; exactly one
/// wins, the others get `WrongExpectedVersion` naming the winner's version.
pub async fn concurrent_appenders_exactly_one_wins(h: &Harness) {
    const N: usize = 8;
    let category = h.category();
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(h.client().await);
    }
    for (round, expected, actual_after) in [
        (0, ExpectedVersion::NoStream, Version(0)),
        (1, ExpectedVersion::Exact(Version(0)), Version(1)),
        (2, ExpectedVersion::Exact(Version(1)), Version(2)),
    ] {
        let stream = fresh_stream(&category, format!("contended{round}"));
        // Bring the stream to the round's starting point with one writer first.
        if round > 0 {
            let store = &clients[0];
            let seed: Vec<_> = (0..round).map(|n| numbered(1000 + n)).collect();
            store
                .append(&stream, ExpectedVersion::NoStream, seed)
                .await
                .unwrap();
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(N));
        let tasks: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (c, s, b) = (c.clone(), stream.clone(), barrier.clone());
                tokio::spawn(async move {
                    b.wait().await;
                    let batch = vec![numbered(i as u64)];
                    (i, append_until_definite(&*c, &s, expected, batch).await)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            match r {
                Ok(r) => {
                    assert_eq!(r.last_version, actual_after);
                    winners.push(i as u64);
                }
                Err(Error::WrongExpectedVersion {
                    stream: s,
                    expected: e,
                    actual,
                }) => {
                    assert_eq!(s, stream);
                    assert_eq!(e, expected);
                    assert_eq!(
                        actual,
                        Some(actual_after),
                        "loser {i} saw the wrong actual version"
                    );
                }
                Err(e) => panic!("client {i}: unexpected error {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let events = read_all(&*clients[N - 1], &stream).await;
        assert_eq!(versions(&events), (0..=actual_after.0).collect::<Vec<_>>());
        assert_eq!(number_of(events.last().unwrap()), winners[0]);
    }
}

/// Guarantee 4: re-sending a batch with the same ids stores nothing twice and reports the
/// original versions, from the same or another client, whatever the expectation; a batch that
/// only partly repeats stored ids is refused whole.
pub async fn idempotent_retry(h: &Harness) {
    let store = h.client().await;
    let other = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "retry");
    let batch = vec![numbered(1), numbered(2)];
    let first = store
        .append(&stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    append_numbered(&*store, &stream, ExpectedVersion::Exact(Version(1)), 3, 1).await;
    for (client, expected) in [
        (&store, ExpectedVersion::NoStream),
        (&other, ExpectedVersion::NoStream),
        (&other, ExpectedVersion::Any),
        (&store, ExpectedVersion::Exact(Version(7))),
    ] {
        let again = client
            .append(&stream, expected, batch.clone())
            .await
            .unwrap_or_else(|e| panic!("retry with {expected:?}: {e}"));
        assert_eq!(again.first_version, first.first_version);
        assert_eq!(again.last_version, first.last_version);
        assert_eq!(again.checkpoints, first.checkpoints);
    }
    // A single-event retry of the last batch.
    let last = read_all(&*store, &stream).await.pop().unwrap();
    let mut single = numbered(3);
    single.event_id = last.event_id;
    let r = other
        .append(&stream, ExpectedVersion::Any, vec![single])
        .await
        .unwrap();
    assert_eq!(r.last_version, Version(2));

    // Not exactly one earlier append: an old id with a new one, the old ids in another order,
    // a prefix of the first append, or a run spanning two appends.
    let mut spanning = numbered(3);
    spanning.event_id = last.event_id;
    for bad in [
        vec![batch[0].clone(), numbered(4)],
        vec![numbered(4), batch[1].clone()],
        vec![batch[1].clone(), batch[0].clone()],
        vec![batch[0].clone()],
        vec![batch[1].clone(), spanning],
    ] {
        match store.append(&stream, ExpectedVersion::Any, bad).await {
            Err(Error::IdempotencyConflict {
                stream: s,
                event_id,
                version,
            }) => {
                assert_eq!(s, stream);
                let at = batch.iter().position(|e| e.event_id == event_id).unwrap();
                assert_eq!(version, Version(at as u64));
            }
            other => panic!("want IdempotencyConflict, got {other:?}"),
        }
    }
    let events = read_all(&*other, &stream).await;
    assert_eq!(numbers(&events), vec![1, 2, 3]);
    let in_category = collect_cold(&*other, Selector::Category(category), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(numbers(&in_category), vec![1, 2, 3]);
}

/// Guarantee 4 under a race: several clients send the very same batch at once (a retry racing
/// the original); all succeed with the same versions and the batch is stored once.
pub async fn concurrent_identical_batches_store_once(h: &Harness) {
    const N: usize = 4;
    let category = h.category();
    let stream = fresh_stream(&category, "same-batch");
    let batch = vec![numbered(1), numbered(2), numbered(3)];
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for _ in 0..N {
        let (client, stream, batch, barrier) = (
            h.client().await,
            stream.clone(),
            batch.clone(),
            barrier.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            append_until_definite(&*client, &stream, ExpectedVersion::NoStream, batch).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap().expect("every copy of the batch succeeds");
        assert_eq!((r.first_version, r.last_version), (Version(0), Version(2)));
    }
    let events = read_all(&*h.client().await, &stream).await;
    assert_eq!(numbers(&events), vec![1, 2, 3]);
    let replay = collect_cold(
        &*h.client().await,
        Selector::Category(category),
        Start::Beginning,
    )
    .await
    .unwrap();
    assert_eq!(numbers(&replay), vec![1, 2, 3]);
}

/// Guarantee 2: readers and subscribers never see part of a batch. Writers append batches of 5
/// while another client takes repeated snapshots (stream reads and Cold category replays) in
/// which every stream must hold whole batches only; a live subscriber gets every batch too.
pub async fn atomic_batches_seen_whole(h: &Harness) {
    const STREAMS: u64 = 4;
    const BATCHES: u64 = 10;
    const SIZE: u64 = 5;
    let category = h.category();
    let reader = h.client().await;
    let mut sub = reader.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    expect_caught_up(&mut sub, h.patience).await;
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let reader = h.client().await;
        let (category, done) = (category.clone(), done.clone());
        tokio::spawn(async move {
            let mut snapshots = 0u32;
            while !done.load(Ordering::SeqCst) || snapshots < 2 {
                for s in 0..STREAMS {
                    let stream = fresh_stream(&category, format!("atomic{s}"));
                    let n = read_all(&*reader, &stream).await.len() as u64;
                    assert_eq!(
                        n % SIZE,
                        0,
                        "a read of {stream} saw {n} events: part of a batch"
                    );
                }
                let selector = Selector::Category(category.clone());
                let replay = collect_cold(&*reader, selector, Start::Beginning)
                    .await
                    .unwrap();
                let mut per_stream: BTreeMap<StreamId, u64> = BTreeMap::new();
                for e in &replay {
                    *per_stream.entry(e.stream.clone()).or_default() += 1;
                }
                for (stream, n) in per_stream {
                    assert_eq!(
                        n % SIZE,
                        0,
                        "a replay saw {n} events of {stream}: part of a batch"
                    );
                }
                snapshots += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            snapshots
        })
    };
    let mut writers = Vec::new();
    for s in 0..STREAMS {
        let store = h.client().await;
        let stream = fresh_stream(&category, format!("atomic{s}"));
        writers.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                let expected = if b == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(Version(b * SIZE - 1))
                };
                append_numbered(&*store, &stream, expected, b * SIZE, SIZE).await;
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut live = Vec::new();
    while (live.len() as u64) < STREAMS * BATCHES * SIZE {
        live.push(next_event(&mut sub, h.patience, "batch events").await);
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    assert!(poller.await.unwrap() >= 2);
    let next = assert_per_stream_order(&live);
    assert!(next.values().all(|n| *n == BATCHES * SIZE), "{next:?}");
    assert_quiet(&mut sub, Duration::from_millis(300), "after the last batch").await;
}

/// Guarantee 5: reads in both directions, from any version, with limits.
pub async fn read_backwards_and_from_version(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "reads");
    append_numbered(&*store, &stream, ExpectedVersion::NoStream, 0, 4).await;
    append_numbered(&*store, &stream, ExpectedVersion::Exact(Version(3)), 4, 6).await;
    let read = |o: ReadOptions| {
        let store = store.clone();
        let stream = stream.clone();
        async move { versions(&store.read_to_vec(&stream, o).await.unwrap()) }
    };
    let all: Vec<u64> = (0..10).collect();
    assert_eq!(read(ReadOptions::forwards()).await, all);
    assert_eq!(
        read(ReadOptions::backwards()).await,
        all.iter().rev().copied().collect::<Vec<_>>()
    );
    assert_eq!(
        read(ReadOptions::forwards().from_version(Version(3)).limit(4)).await,
        vec![3, 4, 5, 6]
    );
    assert_eq!(
        read(ReadOptions::backwards().from_version(Version(6)).limit(3)).await,
        vec![6, 5, 4]
    );
    assert_eq!(
        read(ReadOptions::backwards().from_version(Version(2))).await,
        vec![2, 1, 0]
    );
    assert_eq!(
        read(ReadOptions::backwards().from_version(Version(50)).limit(2)).await,
        vec![9, 8]
    );
    assert_eq!(
        read(ReadOptions::forwards().from_version(Version(9))).await,
        vec![9]
    );
    assert!(read(ReadOptions::forwards().from_version(Version(10)))
        .await
        .is_empty());
    assert!(read(ReadOptions::forwards().limit(0)).await.is_empty());
    for from in 0..10u64 {
        assert_eq!(
            read(ReadOptions::forwards().from_version(Version(from))).await,
            (from..10).collect::<Vec<_>>()
        );
    }
    let missing = fresh_stream(&category, "never-written");
    assert!(store
        .read_to_vec(&missing, ReadOptions::backwards())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.stream_version(&missing).await.unwrap(), None);
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        Some(Version(9))
    );
}

/// Guarantee 5 under concurrency: many clients appending with `Any` to one stream leave versions
/// contiguous from 0 with every event exactly once.
pub async fn versions_contiguous_under_concurrency(h: &Harness) {
    const CLIENTS: u64 = 4;
    const EACH: u64 = 10;
    let category = h.category();
    let stream = fresh_stream(&category, "shared");
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let store = h.client().await;
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                append_numbered(&*store, &stream, ExpectedVersion::Any, c * 100 + i, 1).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let events = read_all(&*h.client().await, &stream).await;
    assert_eq!(versions(&events), (0..CLIENTS * EACH).collect::<Vec<_>>());
    let mut got = numbers(&events);
    got.sort_unstable();
    let mut want: Vec<u64> = (0..CLIENTS)
        .flat_map(|c| (0..EACH).map(move |i| c * 100 + i))
        .collect();
    want.sort_unstable();
    assert_eq!(got, want);
    // Each client's own events keep its order.
    for c in 0..CLIENTS {
        let mine: Vec<u64> = numbers(&events)
            .into_iter()
            .filter(|n| n / 100 == c)
            .collect();
        assert_eq!(mine, (0..EACH).map(|i| c * 100 + i).collect::<Vec<_>>());
    }
}

/// Guarantee 1 as far as a client can see it: once `append` returned, a brand-new client reads
/// the events (nothing is held back in the writer's buffers).
pub async fn durable_for_new_clients(h: &Harness) {
    let category = h.category();
    let stream = fresh_stream(&category, "durable");
    let written = {
        let writer = h.client().await;
        let r = append_numbered(&*writer, &stream, ExpectedVersion::NoStream, 0, 3).await;
        drop(writer);
        r
    };
    let reader = h.client().await;
    let events = read_all(&*reader, &stream).await;
    assert_eq!(numbers(&events), vec![0, 1, 2]);
    assert_eq!(
        events
            .iter()
            .map(|e| e.checkpoint.clone())
            .collect::<Vec<_>>(),
        written.checkpoints
    );
    let replay = collect_cold(&*reader, Selector::Category(category), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(numbers(&replay), vec![0, 1, 2]);
}

async fn write_many_streams(h: &Harness, category: &Category, streams: u64, per: u64) {
    let mut tasks = Vec::new();
    for s in 0..streams {
        let store = h.client().await;
        let stream = fresh_stream(category, format!("s{s:03}"));
        tasks.push(tokio::spawn(async move {
            let mut v = 0;
            let mut batch = 1 + s % 3;
            while v < per {
                let n = batch.min(per - v);
                let expected = if v == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(Version(v - 1))
                };
                append_numbered(&*store, &stream, expected, s * 1000 + v, n).await;
                v += n;
                batch = batch % 3 + 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn assert_complete(events: &[RecordedEvent], streams: u64, per: u64) {
    let next = assert_per_stream_order(events);
    assert_eq!(
        next.len() as u64,
        streams,
        "streams seen: {:?}",
        next.keys()
    );
    assert!(
        next.values().all(|v| *v == per),
        "per-stream counts {next:?}"
    );
    let ids: HashSet<Uuid> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), events.len(), "an event was delivered twice");
    for e in events {
        let s: u64 = e.stream.id()[1..].parse().unwrap();
        assert_eq!(
            number_of(e),
            s * 1000 + e.version.0,
            "{}@{}",
            e.stream,
            e.version
        );
    }
}

/// Guarantee 6: every event appears exactly once in its category stream, in per-stream order,
/// with many streams written concurrently; other categories stay out.
pub async fn category_complete_and_ordered(h: &Harness) {
    const STREAMS: u64 = 20;
    const PER: u64 = 10;
    let category = h.category();
    let neighbour = h.category();
    write_many_streams(h, &category, STREAMS, PER).await;
    let store = h.client().await;
    append_numbered(
        &*store,
        &fresh_stream(&neighbour, "x"),
        ExpectedVersion::Any,
        0,
        3,
    )
    .await;
    let events = collect_cold(
        &*store,
        Selector::Category(category.clone()),
        Start::Beginning,
    )
    .await
    .unwrap();
    assert_eq!(events.len() as u64, STREAMS * PER);
    assert!(events
        .iter()
        .all(|e| e.stream.category_name() == category.as_str()));
    assert_complete(&events, STREAMS, PER);
}

/// Guarantee 6 for the all stream: every event of ours appears exactly once, in per-stream order.
pub async fn all_stream_complete(h: &Harness) {
    let store = h.client().await;
    if !store.capabilities().all_stream {
        let mut sub = store.subscribe(Selector::All, Start::Beginning, SubscriptionMode::Cold);
        assert!(matches!(
            sub.next().await,
            Some(Err(Error::Unsupported { .. }))
        ));
        println!("{}: no all stream (declared in Capabilities)", h.backend());
        return;
    }
    // A persistent server's all stream holds every earlier run: start shortly before this case
    // where the backend can, so the case does not grow with the server's age.
    let start = if store.capabilities().subscribe_from_time {
        let minute_ago = Timestamp::now().unix_micros() - 60_000_000;
        Start::Time(Timestamp::from_unix_micros(minute_ago).unwrap())
    } else {
        Start::Beginning
    };
    let (a, b) = (h.category(), h.category());
    write_many_streams(h, &a, 3, 4).await;
    write_many_streams(h, &b, 2, 5).await;
    let all = collect_cold(&*store, Selector::All, start).await.unwrap();
    let ours_a: Vec<_> = all
        .iter()
        .filter(|e| e.stream.category_name() == a.as_str())
        .cloned()
        .collect();
    let ours_b: Vec<_> = all
        .iter()
        .filter(|e| e.stream.category_name() == b.as_str())
        .cloned()
        .collect();
    assert_complete(&ours_a, 3, 4);
    assert_complete(&ours_b, 2, 5);
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

/// Guarantee 8: resuming after any delivered event's checkpoint delivers exactly what follows it,
/// for category, stream and all subscriptions.
pub async fn resume_from_every_checkpoint(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    for s in 0..5 {
        let stream = fresh_stream(&category, format!("r{s}"));
        for b in 0..3u64 {
            let expected = if b == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(Version(b * 2 - 1))
            };
            append_numbered(&*store, &stream, expected, s * 100 + b * 2, 2).await;
        }
    }
    let selector = Selector::Category(category.clone());
    let run = collect_cold(&*store, selector.clone(), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(run.len(), 30);
    let other_client = h.client().await;
    for (i, e) in run.iter().enumerate() {
        // The checkpoint survives its text form, as a consumer would store it.
        let stored: Checkpoint = e.checkpoint.to_string().parse().unwrap();
        let resumed = collect_cold(&*other_client, selector.clone(), Start::After(stored))
            .await
            .unwrap();
        let want: Vec<Uuid> = run[i + 1..].iter().map(|e| e.event_id).collect();
        let got: Vec<Uuid> = resumed.iter().map(|e| e.event_id).collect();
        if store.capabilities().total_order {
            assert_eq!(got, want, "resume after event {i}");
        } else {
            // Only per-stream order is promised: the same events, each stream in order.
            let per_stream = |events: &[RecordedEvent]| {
                let mut m: BTreeMap<StreamId, Vec<u64>> = BTreeMap::new();
                for e in events {
                    m.entry(e.stream.clone()).or_default().push(e.version.0);
                }
                m
            };
            assert_eq!(
                per_stream(&resumed),
                per_stream(&run[i + 1..]),
                "resume after event {i}"
            );
        }
    }
    // HotCold resumed from the last checkpoint goes straight to CaughtUp, then live.
    let last = run.last().unwrap().checkpoint.clone();
    let mut sub = store.subscribe(selector, Start::After(last), SubscriptionMode::HotCold);
    expect_caught_up(&mut sub, h.patience).await;
    let stream = fresh_stream(&category, "r0");
    append_numbered(&*store, &stream, ExpectedVersion::Exact(Version(5)), 6, 1).await;
    let live = next_event(&mut sub, h.patience, "live").await;
    assert_eq!(number_of(&live), 6);
    append_numbered(&*store, &stream, ExpectedVersion::Exact(Version(6)), 7, 2).await;
    // A checkpoint delivered live resumes like a replayed one.
    let after_live = collect_cold(
        &*other_client,
        Selector::Category(category.clone()),
        Start::After(live.checkpoint.clone()),
    )
    .await
    .unwrap();
    assert_eq!(numbers(&after_live), vec![7, 8]);

    // Stream subscriptions resume the same way.
    let events = read_all(&*store, &stream).await;
    for (i, e) in events.iter().enumerate() {
        let resumed = collect_cold(
            &*store,
            Selector::Stream(stream.clone()),
            Start::After(e.checkpoint.clone()),
        )
        .await
        .unwrap();
        assert_eq!(
            versions(&resumed),
            ((i as u64 + 1)..events.len() as u64).collect::<Vec<_>>()
        );
    }
}

/// Guarantee 8 by time: `Start::Time` delivers exactly the events recorded at or after it.
pub async fn subscribe_from_time(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "timed");
    if !store.capabilities().subscribe_from_time {
        let mut sub = store.subscribe(
            Selector::Category(category),
            Start::Time(Timestamp::now()),
            SubscriptionMode::Cold,
        );
        assert!(matches!(
            sub.next().await,
            Some(Err(Error::Unsupported { .. }))
        ));
        println!(
            "{}: no subscribe-from-time (declared in Capabilities)",
            h.backend()
        );
        return;
    }
    append_numbered(&*store, &stream, ExpectedVersion::NoStream, 0, 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    append_numbered(&*store, &stream, ExpectedVersion::Exact(Version(2)), 3, 2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    append_numbered(&*store, &stream, ExpectedVersion::Exact(Version(4)), 5, 1).await;
    let all = read_all(&*store, &stream).await;
    for pivot in [0usize, 3, 5] {
        let t = all[pivot].recorded_at;
        let got = collect_cold(
            &*store,
            Selector::Category(category.clone()),
            Start::Time(t),
        )
        .await
        .unwrap();
        let want: Vec<u64> = all
            .iter()
            .filter(|e| e.recorded_at >= t)
            .map(number_of)
            .collect();
        assert_eq!(numbers(&got), want, "from the time of event {pivot}");
        assert_eq!(numbers(&got).first(), Some(&(pivot as u64)));
    }
    let future =
        Timestamp::from_unix_micros(Timestamp::now().unix_micros() + 3_600_000_000).unwrap();
    assert!(
        collect_cold(&*store, Selector::Category(category), Start::Time(future))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Guarantee 10: a checkpoint of another backend, or a malformed one, is a typed error.
pub async fn foreign_checkpoint_rejected(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    append_numbered(
        &*store,
        &fresh_stream(&category, "c"),
        ExpectedVersion::Any,
        0,
        1,
    )
    .await;
    let foreign = Checkpoint::from_position("elsewhere", 0);
    for selector in [
        Selector::Category(category.clone()),
        Selector::Stream(fresh_stream(&category, "c")),
    ] {
        for mode in [SubscriptionMode::Cold, SubscriptionMode::HotCold] {
            let mut sub = store.subscribe(selector.clone(), Start::After(foreign.clone()), mode);
            match sub.next().await {
                Some(Err(Error::ForeignCheckpoint {
                    expected_backend,
                    checkpoint,
                })) => {
                    assert_eq!(expected_backend, h.backend());
                    assert_eq!(checkpoint, foreign.to_string());
                }
                other => panic!("want ForeignCheckpoint, got {other:?}"),
            }
        }
    }
    let garbage = Checkpoint::new(h.backend(), &[0xff]);
    let mut sub = store.subscribe(
        Selector::Category(category.clone()),
        Start::After(garbage),
        SubscriptionMode::Cold,
    );
    match sub.next().await {
        Some(Err(Error::InvalidInput { what, .. })) => assert!(what.contains("checkpoint")),
        other => panic!("want InvalidInput for a malformed checkpoint, got {other:?}"),
    }
    let still = collect_cold(&*store, Selector::Category(category), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(numbers(&still), vec![0]);
}

/// Guarantee 10: empty batches, oversize events, repeated and nil ids, and malformed names each
/// get their typed error; nothing already stored changes.
pub async fn bad_input_rejected_and_nothing_lost(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "guarded");
    append_numbered(&*store, &stream, ExpectedVersion::NoStream, 0, 2).await;
    let before = read_all(&*store, &stream).await;

    match store.append(&stream, ExpectedVersion::Any, vec![]).await {
        Err(Error::InvalidInput { what, reason }) => {
            assert!(what.contains(stream.as_str()), "{what}");
            assert!(reason.contains("empty"), "{reason}");
        }
        other => panic!("empty batch: {other:?}"),
    }
    let limit = store.capabilities().max_event_size;
    let big = EventData::new(
        EventType::new("Big").unwrap(),
        Payload::raw(ContentType::Json, vec![b'1'; limit]),
    );
    let big_id = big.event_id;
    match store
        .append(&stream, ExpectedVersion::Any, vec![numbered(7), big])
        .await
    {
        Err(Error::EventTooLarge {
            stream: s,
            event_id,
            index,
            size,
            limit: l,
        }) => {
            assert_eq!((s, event_id, index, l), (stream.clone(), big_id, 1, limit));
            assert_eq!(size, limit + 3);
        }
        other => panic!("oversize: {other:?}"),
    }
    let twice = numbered(8);
    match store
        .append(&stream, ExpectedVersion::Any, vec![twice.clone(), twice])
        .await
    {
        Err(Error::InvalidInput { reason, .. }) => assert!(reason.contains("twice"), "{reason}"),
        other => panic!("repeated id: {other:?}"),
    }
    match store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![numbered(9).with_id(Uuid::nil())],
        )
        .await
    {
        Err(Error::InvalidInput { reason, .. }) => assert!(reason.contains("nil"), "{reason}"),
        other => panic!("nil id: {other:?}"),
    }
    // An event exactly at the limit is accepted.
    let at_limit = EventData::new(
        EventType::new("Fit").unwrap(),
        Payload::raw(ContentType::Json, vec![b'1'; limit - 3]),
    );
    store
        .append(&stream, ExpectedVersion::Exact(Version(1)), vec![at_limit])
        .await
        .expect("an event of exactly max_event_size is accepted");

    // A batch over the backend's atomic-write limit, each event within the event limit.
    if let Some(batch_limit) = store.capabilities().max_append_size {
        let per = limit.min(batch_limit);
        let count = batch_limit / per + 1;
        let batch: Vec<EventData> = (0..count)
            .map(|_| {
                EventData::new(
                    EventType::new("Part").unwrap(),
                    Payload::raw(ContentType::Json, vec![b'1'; per - 4]),
                )
            })
            .collect();
        match store.append(&stream, ExpectedVersion::Any, batch).await {
            Err(Error::BatchTooLarge {
                stream: s,
                size,
                limit: l,
            }) => {
                assert_eq!((s, l), (stream.clone(), batch_limit));
                assert_eq!(size, count * per);
            }
            other => panic!("oversize batch: {other:?}"),
        }
    }
    for bad in [
        "",
        "nocategory",
        "-1",
        "cat-",
        "cat-has space",
        "ca t-1",
        "cat-ä",
    ] {
        assert!(
            matches!(StreamId::parse(bad), Err(Error::InvalidInput { .. })),
            "{bad:?} was accepted as a stream name"
        );
    }
    let after = read_all(&*store, &stream).await;
    assert_eq!(after.len(), 3);
    assert_eq!(&after[..2], &before[..]);
}

/// Guarantee 10: a payload that does not decode as the asked type is a typed error naming the
/// event, and the stored bytes stay readable.
pub async fn undecodable_payload_is_typed_error(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "garbled");
    let raw = vec![0xc1u8, 0x00, 0x01];
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![EventData::new(
                EventType::new("Numbered").unwrap(),
                Payload::raw(ContentType::MessagePack, raw.clone()),
            )],
        )
        .await
        .unwrap();
    let e = read_all(&*store, &stream).await.pop().unwrap();
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Numbered {
        n: u64,
    }
    match e.decode::<Numbered>() {
        Err(Error::Decode {
            stream: s,
            version,
            event_type,
            content_type,
            ..
        }) => {
            assert_eq!((s, version), (stream.clone(), Version(0)));
            assert_eq!(event_type, "Numbered");
            assert_eq!(content_type, "application/msgpack");
        }
        other => panic!("want Decode, got {other:?}"),
    }
    assert_eq!(&e.payload.bytes[..], &raw[..]);
}

/// Guarantee 9: a subscriber much slower than the writer still gets every event in order.
pub async fn slow_subscriber_gets_everything(h: &Harness) {
    const EVENTS: u64 = 300;
    let category = h.category();
    let stream = fresh_stream(&category, "firehose");
    let reader = h.client().await;
    let mut sub = reader.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    expect_caught_up(&mut sub, h.patience).await;
    let writer = h.client().await;
    let w = tokio::spawn(async move {
        for b in 0..EVENTS / 10 {
            append_numbered(&*writer, &stream, ExpectedVersion::Any, b * 10, 10).await;
        }
    });
    for n in 0..EVENTS {
        let e = next_event(&mut sub, h.patience, "slow consumption").await;
        assert_eq!(number_of(&e), n);
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    w.await.unwrap();
}

/// Guarantee 9: a paused replay does not stall appends from other clients.
pub async fn replay_does_not_stall_appends(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "long");
    for b in 0..10u64 {
        append_numbered(&*store, &stream, ExpectedVersion::Any, b * 100, 100).await;
    }
    let mut replay = store.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::Cold,
    );
    assert_eq!(
        number_of(&next_event(&mut replay, h.patience, "first").await),
        0
    );
    // The replay is paused mid-way; other clients must still write.
    let other = h.client().await;
    for i in 0..5u64 {
        tokio::time::timeout(
            h.patience,
            other.append(
                &fresh_stream(&category, "side"),
                ExpectedVersion::Any,
                vec![numbered(5000 + i)],
            ),
        )
        .await
        .expect("an append stalled behind a paused replay")
        .unwrap();
    }
    let mut rest = 0u64;
    while let Some(item) = replay.next().await {
        let e = item.unwrap().into_event().unwrap();
        assert_eq!(
            e.stream, stream,
            "a Cold replay delivered an event stored after its start"
        );
        rest += 1;
    }
    assert_eq!(rest, 999);
}

/// Guarantee 10: an unreachable server gives `Unavailable` within bounded time, not a hang.
pub async fn unreachable_server_is_unavailable(h: &Harness) {
    let Some(store) = h.unreachable_client().await else {
        println!(
            "{}: in-process backend, no server to be unreachable",
            h.backend()
        );
        return;
    };
    let started = Instant::now();
    let bound = Duration::from_secs(60);
    let health = tokio::time::timeout(bound, store.health())
        .await
        .expect("health() hung on an unreachable server");
    assert!(
        matches!(&health, Err(e @ Error::Unavailable { .. }) if e.is_retryable()),
        "health: {health:?}"
    );
    let stream = fresh_stream(&h.category(), "nowhere");
    let append = tokio::time::timeout(
        bound,
        store.append(&stream, ExpectedVersion::Any, vec![numbered(0)]),
    )
    .await
    .expect("append hung on an unreachable server");
    assert!(
        matches!(append, Err(Error::Unavailable { .. })),
        "append: {append:?}"
    );
    println!("unreachable detected in {:?}", started.elapsed());
}

/// Categories and streams are listed, sorted; health answers.
pub async fn listing_and_health(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let names = ["b", "a", "c-1", "a.b"];
    for n in names {
        append_numbered(
            &*store,
            &fresh_stream(&category, n),
            ExpectedVersion::Any,
            0,
            1,
        )
        .await;
    }
    let listed: Vec<String> = store
        .list_streams(&category)
        .map_ok(|s| s.id().to_owned())
        .try_collect()
        .await
        .unwrap();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(listed, want);
    let categories = store.list_categories().await.unwrap();
    assert!(categories.contains(&category));
    assert!(categories.windows(2).all(|w| w[0] < w[1]), "not sorted");
    assert!(store.list_streams(&h.category()).next().await.is_none());
    let health = store.health().await.unwrap();
    assert_eq!(health.backend, h.backend());
}
