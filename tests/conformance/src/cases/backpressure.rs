//! Guarantee 9 (bounded): a slow subscriber still gets everything in order, and a paused replay
//! does not stall other clients' appends.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::time::Duration;

use futures::StreamExt;
use photon_api::{ExpectedVersion, Selector, Start, SubscriptionMode};

use crate::support::{
    append_numbered, expect_caught_up, fresh_stream, next_event, number_of, numbered,
};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_backpressure_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            slow_subscriber_gets_everything,
            replay_does_not_stall_appends,
        }
    };
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
