//! Guarantee 5 (ordered): versions contiguous from 0, also under concurrent appends, and stream
//! reads in both directions from any version; also listing streams and categories, and health.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use futures::{StreamExt, TryStreamExt};
use photon_api::{EventStoreExt, ExpectedVersion, ReadOptions, Version};

use crate::support::{append_numbered, fresh_stream, numbers, read_all, versions};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_read_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            read_backwards_and_from_version,
            versions_contiguous_under_concurrency,
            listing_and_health,
        }
    };
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
