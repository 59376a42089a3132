//! Guarantee 6 (complete): every event appears exactly once, in per-stream order, in its
//! category stream and in the all stream, with many streams written concurrently.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::collections::HashSet;

use futures::StreamExt;
use photon_api::{
    Category, Error, ExpectedVersion, RecordedEvent, Selector, Start, SubscriptionMode, Timestamp,
    Uuid, Version,
};

use crate::support::{
    append_numbered, assert_per_stream_order, collect_cold, fresh_stream, number_of,
};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_category_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            category_complete_and_ordered,
            all_stream_complete,
        }
    };
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
