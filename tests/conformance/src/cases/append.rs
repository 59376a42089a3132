//! Guarantees 1 (durable) and 2 (atomic): what `append` stores reads back unchanged, for this
//! client and for a brand-new one, and no read or subscription ever sees part of a batch.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use photon_api::{
    ContentType, EventData, EventType, ExpectedVersion, Payload, Selector, Start, StreamId,
    SubscriptionMode, Timestamp, Uuid, Version,
};

use crate::support::{
    append_numbered, assert_per_stream_order, assert_quiet, collect_cold, expect_caught_up,
    fresh_stream, next_event, numbers, read_all,
};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_append_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            append_read_round_trip,
            durable_for_new_clients,
            atomic_batches_seen_whole,
        }
    };
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
