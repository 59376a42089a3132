//! The per-process stream cache against a real server (`PHOTON_TEST_CASSANDRA_URL`): what it
//! holds stays bounded however long a stream grows, and re-sends of batches older than what it
//! keeps are still recognised (guarantee 4), from the writer and from a fresh client, under
//! the expectation they were first sent with or any other that does not match the head (see the
//! README, "Limits": an old batch sent again under an expectation that matches the present head
//! is a new append).

use photon_api::{Category, Error, EventData, EventStore, ExpectedVersion, StreamId, Version};
use photon_cassandra::CassandraStore;
use photon_conformance::server_url;

mod common;
use common::{fresh, numbered, with_options};

const OPTIONS: &str = "settle_ms=200&timeout_ms=5000&repair_after_ms=15000&bucket_size=16";

/// Appends per stream, and events per append: a stream of 20 000 events.
const APPENDS: u64 = 100;
const BATCH: u64 = 200;

/// The most the cache may hold for the streams of this test, in bytes: a few of their latest
/// commits' ids, not 20 000 of them.
const CACHE_BOUND: usize = 16 * 1024;

#[tokio::test]
async fn the_stream_cache_stays_bounded_and_old_batches_are_still_recognised() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let store = CassandraStore::from_url(&url).await.unwrap();
    let category = Category::new(fresh("cache")).unwrap();
    let stream = StreamId::new(&category, "long").unwrap();
    let mut first_batch: Vec<EventData> = Vec::new();
    for a in 0..APPENDS {
        let batch: Vec<EventData> = (a * BATCH..(a + 1) * BATCH)
            .map(|n| numbered(n, "c"))
            .collect();
        let expected = match a {
            0 => ExpectedVersion::NoStream,
            _ => ExpectedVersion::Exact(Version(a * BATCH - 1)),
        };
        store
            .append(&stream, expected, batch.clone())
            .await
            .unwrap();
        if a == 0 {
            first_batch = batch;
        }
    }
    let held = store.stream_cache_bytes();
    assert!(
        held <= CACHE_BOUND,
        "the stream cache holds {held} bytes for one stream of {} events (bound {CACHE_BOUND})",
        APPENDS * BATCH
    );

    // The first batch, long out of the cache, re-sent: reported with its original versions and
    // checkpoints, stored once, whatever the expectation and whichever client.
    let head = Version(APPENDS * BATCH - 1);
    let fresh_client = CassandraStore::from_url(&url).await.unwrap();
    let mut answers = Vec::new();
    for (client, expected) in [
        (&store, ExpectedVersion::Any),
        (&store, ExpectedVersion::StreamExists),
        (&store, ExpectedVersion::NoStream),
        (&fresh_client, ExpectedVersion::Exact(Version(BATCH - 1))),
        (&fresh_client, ExpectedVersion::Any),
        (&fresh_client, ExpectedVersion::Exact(Version(7))),
    ] {
        let again = client
            .append(&stream, expected, first_batch.clone())
            .await
            .unwrap_or_else(|e| panic!("re-send with {expected:?}: {e}"));
        assert_eq!(
            (again.first_version, again.last_version),
            (Version(0), Version(BATCH - 1)),
            "re-send with {expected:?}"
        );
        answers.push(again.checkpoints);
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "every re-send reports the same checkpoints"
    );
    // An old id beside a new one is not a re-send: refused whole, naming the old id.
    let mixed = vec![first_batch[0].clone(), numbered(1_000_000, "c")];
    for client in [&store, &fresh_client] {
        match client
            .append(&stream, ExpectedVersion::Any, mixed.clone())
            .await
        {
            Err(Error::IdempotencyConflict {
                event_id, version, ..
            }) => assert_eq!((event_id, version), (first_batch[0].event_id, Version(0))),
            other => panic!("want IdempotencyConflict, got {other:?}"),
        }
    }
    assert_eq!(store.stream_version(&stream).await.unwrap(), Some(head));
    assert_eq!(
        fresh_client.stream_version(&stream).await.unwrap(),
        Some(head)
    );
    for client in [&store, &fresh_client] {
        let held = client.stream_cache_bytes();
        assert!(held <= CACHE_BOUND, "after the re-sends: {held} bytes");
    }
}
