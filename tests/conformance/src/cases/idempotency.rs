//! Guarantee 4 (idempotent): re-sending a batch with the same event ids, later or racing the
//! original, stores nothing twice and reports the original versions.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::sync::Arc;

use photon_api::{Error, ExpectedVersion, Selector, Start, Version};

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
