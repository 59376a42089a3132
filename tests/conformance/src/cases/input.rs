//! Guarantee 10 (safe on bad input): bad names, empty and oversize batches, repeated ids,
//! undecodable payloads, foreign checkpoints and an unreachable server each get a typed error,
//! and nothing already stored changes.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use photon_api::{
    Checkpoint, ContentType, Error, EventData, EventType, ExpectedVersion, Payload, Selector,
    Start, StreamId, SubscriptionMode, Uuid, Version,
};

use crate::support::{append_numbered, collect_cold, fresh_stream, numbered, numbers, read_all};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_input_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            foreign_checkpoint_rejected,
            bad_input_rejected_and_nothing_lost,
            undecodable_payload_is_typed_error,
            unreachable_server_is_unavailable,
        }
    };
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
