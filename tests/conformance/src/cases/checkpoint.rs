//! Guarantee 8 (resumable): resuming after any delivered event's checkpoint, or from a time,
//! delivers exactly what follows it.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use photon_api::{
    Checkpoint, Error, ExpectedVersion, RecordedEvent, Selector, Start, StreamId, SubscriptionMode,
    Timestamp, Uuid, Version,
};

use crate::support::{
    append_numbered, collect_cold, expect_caught_up, fresh_stream, next_event, number_of, numbers,
    read_all, versions,
};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_checkpoint_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            resume_from_every_checkpoint,
            subscribe_from_time,
        }
    };
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
