//! Guarantee 4 (idempotent): re-sending a batch with the same event ids, later or racing the
//! original, stores nothing twice and reports the original versions.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::sync::Arc;

use photon_api::{
    AppendResult, Category, Error, EventData, EventStore, ExpectedVersion, Selector, Start,
    StreamId, Version,
};

use crate::support::{
    append_numbered, append_until_definite, collect_cold, fresh_stream, numbered, numbers, read_all,
};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_idempotency_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            idempotent_retry,
            retry_under_stream_exists_stores_nothing_twice,
            retry_under_a_holding_exact_stores_nothing_twice,
            partial_repeat_under_a_holding_expectation_is_refused,
            concurrent_identical_batches_store_once,
        }
    };
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

/// Re-sends `batch` to `stream` with `expected` from each of `clients` and asserts that each
/// answers exactly as `original` did: a retry reports the first send's versions and
/// checkpoints. `what` names the batch in a failure.
async fn assert_resend_is_retry(
    clients: [&Arc<dyn EventStore>; 2],
    stream: &StreamId,
    expected: ExpectedVersion,
    batch: &[EventData],
    original: &AppendResult,
    what: &str,
) {
    for client in clients {
        let again = client
            .append(stream, expected, batch.to_vec())
            .await
            .unwrap_or_else(|e| panic!("{what} re-sent with {expected:?}: {e}"));
        assert_eq!(
            (again.first_version, again.last_version, &again.checkpoints),
            (original.first_version, original.last_version, &original.checkpoints),
            "{what} re-sent with {expected:?}: a retry reports the original versions and checkpoints"
        );
    }
}

/// Asserts that `stream` holds exactly the numbered events `want`, in its own reads, its
/// version and its category's replay.
async fn assert_stored_once(h: &Harness, category: &Category, stream: &StreamId, want: &[u64]) {
    let reader = h.client().await;
    assert_eq!(numbers(&read_all(&*reader, stream).await), want);
    assert_eq!(
        reader.stream_version(stream).await.unwrap(),
        Some(Version(want.len() as u64 - 1))
    );
    let replay = collect_cold(
        &*reader,
        Selector::Category(category.clone()),
        Start::Beginning,
    )
    .await
    .unwrap();
    assert_eq!(numbers(&replay), want);
}

/// Guarantee 4 with an expectation that holds: a re-send of a stored batch under
/// `StreamExists` (which holds once the batch is stored) is a retry, answered with the original
/// versions, from the same or another client; nothing is stored again.
pub async fn retry_under_stream_exists_stores_nothing_twice(h: &Harness) {
    let store = h.client().await;
    let other = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "exists");
    let batch = vec![numbered(1), numbered(2)];
    let first = store
        .append(&stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let last = vec![numbered(3)];
    let second = store
        .append(&stream, ExpectedVersion::StreamExists, last.clone())
        .await
        .unwrap();
    assert_eq!(second.first_version, Version(2));
    let exists = ExpectedVersion::StreamExists;
    let clients = [&store, &other];
    assert_resend_is_retry(clients, &stream, exists, &batch, &first, "the first batch").await;
    assert_resend_is_retry(clients, &stream, exists, &last, &second, "the last batch").await;
    assert_stored_once(h, &category, &stream, &[1, 2, 3]).await;
}

/// Guarantee 4 with an exact expectation that holds now: a batch stored with `NoStream` at
/// version 0 and re-sent with `Exact(0)` (what a writer that reloaded the stream after a timeout
/// sends) is a retry, not a new append at version 1; the same for a later batch re-sent with the
/// stream's current version.
pub async fn retry_under_a_holding_exact_stores_nothing_twice(h: &Harness) {
    let store = h.client().await;
    let other = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "exact");
    let opening = vec![numbered(1)];
    let first = store
        .append(&stream, ExpectedVersion::NoStream, opening.clone())
        .await
        .unwrap();
    assert_eq!(first.first_version, Version(0));
    let clients = [&store, &other];
    let at = |v| ExpectedVersion::Exact(Version(v));
    assert_resend_is_retry(clients, &stream, at(0), &opening, &first, "[1]").await;
    let batch = vec![numbered(2), numbered(3)];
    let second = store
        .append(&stream, ExpectedVersion::Exact(Version(0)), batch.clone())
        .await
        .unwrap();
    assert_eq!(
        (second.first_version, second.last_version),
        (Version(1), Version(2))
    );
    assert_resend_is_retry(clients, &stream, at(2), &batch, &second, "[2, 3]").await;
    assert_stored_once(h, &category, &stream, &[1, 2, 3]).await;
}

/// Guarantee 4 with an expectation that holds: a batch mixing stored ids with new ones (or only
/// part of a stored append) is refused whole with `IdempotencyConflict` naming its first stored
/// id and where it is, and none of its new events is stored: each can be appended afterwards
/// as a new event.
pub async fn partial_repeat_under_a_holding_expectation_is_refused(h: &Harness) {
    let store = h.client().await;
    let other = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "partial");
    let batch = vec![numbered(1), numbered(2)];
    store
        .append(&stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let fresh = numbered(3);
    let holding = [
        ExpectedVersion::StreamExists,
        ExpectedVersion::Exact(Version(1)),
        ExpectedVersion::Any,
    ];
    for bad in [
        vec![batch[0].clone(), fresh.clone()],
        vec![fresh.clone(), batch[1].clone()],
        vec![batch[0].clone(), batch[1].clone(), fresh.clone()],
        vec![batch[1].clone()],
    ] {
        for (client, expected) in [
            (&store, holding[0]),
            (&other, holding[1]),
            (&store, holding[2]),
        ] {
            match client.append(&stream, expected, bad.clone()).await {
                Err(Error::IdempotencyConflict {
                    stream: s,
                    event_id,
                    version,
                }) => {
                    assert_eq!(s, stream);
                    let first_stored = bad.iter().find(|e| e.event_id != fresh.event_id).unwrap();
                    assert_eq!(
                        event_id, first_stored.event_id,
                        "names the batch's first stored id"
                    );
                    let at = batch.iter().position(|e| e.event_id == event_id).unwrap();
                    assert_eq!(version, Version(at as u64));
                }
                other => panic!(
                    "{} events with {expected:?}: want IdempotencyConflict, got {other:?}",
                    bad.len()
                ),
            }
        }
    }
    assert_stored_once(h, &category, &stream, &[1, 2]).await;
    // Nothing of the refused batches was stored: the new event is new, stored once at 2.
    let r = other
        .append(&stream, ExpectedVersion::Exact(Version(1)), vec![fresh])
        .await
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (Version(2), Version(2)));
    assert_stored_once(h, &category, &stream, &[1, 2, 3]).await;
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
