//! Reads are bounded in bytes, against a real server (`PHOTON_TEST_CASSANDRA_URL`): a page of
//! a stream read or of a category replay fetches only the commits that fit in `page_bytes`
//! (by their event counts and the client's size limits), not 64 commits of up to 8 MiB. The
//! reader goes through the fault proxy, which counts the bytes it forwards.

use futures::StreamExt;
use photon_api::{
    Category, EventData, EventStore, ExpectedVersion, ReadOptions, Selector, Start, StreamId,
    SubscriptionItem, SubscriptionMode, Version,
};
use photon_cassandra::CassandraStore;
use photon_conformance::server_url;

mod common;
use common::{fresh, number, proxied, with_options};

const OPTIONS: &str = "settle_ms=200&timeout_ms=5000&repair_after_ms=15000&bucket_size=16";

/// Ten commits of three events of 500 kB: 15 MB in all.
const COMMITS: u64 = 10;
const PER_COMMIT: u64 = 3;
const PAYLOAD: usize = 500_000;

/// The reader's page bound, 4 MiB, and what a first page may cost beyond it (the requests,
/// the counts, the rows' framing).
const PAGE_BYTES: u64 = 4 * 1024 * 1024;
const SLACK: u64 = 1024 * 1024;

fn big(n: u64) -> EventData {
    EventData::json(
        "Big",
        &serde_json::json!({ "n": n, "fill": "x".repeat(PAYLOAD) }),
    )
    .unwrap()
}

#[tokio::test]
async fn a_page_of_a_read_or_a_replay_holds_at_most_page_bytes() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let writer = CassandraStore::from_url(&url).await.unwrap();
    let category = Category::new(fresh("bound")).unwrap();
    let stream = StreamId::new(&category, "big").unwrap();
    for c in 0..COMMITS {
        let batch = (c * PER_COMMIT..(c + 1) * PER_COMMIT).map(big).collect();
        let expected = match c {
            0 => ExpectedVersion::NoStream,
            _ => ExpectedVersion::Exact(Version(c * PER_COMMIT - 1)),
        };
        writer.append(&stream, expected, batch).await.unwrap();
    }

    let reader_url = with_options(&url, &format!("page_bytes={PAGE_BYTES}"));
    let (proxy, proxied_url) = proxied(&reader_url).await;
    let reader = CassandraStore::from_url(&proxied_url).await.unwrap();
    reader.health().await.unwrap();

    // A stream read: its first event costs one page, not the whole stream.
    let before = proxy.bytes_forwarded();
    let mut read = reader.read_stream(&stream, ReadOptions::forwards());
    let first = read.next().await.unwrap().unwrap();
    let cost = proxy.bytes_forwarded() - before;
    println!("stream read: {cost} bytes through the proxy before its first event");
    assert_eq!(number(&first), 0);
    assert!(
        cost <= PAGE_BYTES + SLACK,
        "the first page of a stream read cost {cost} bytes (page_bytes {PAGE_BYTES})"
    );
    let mut numbers = vec![number(&first)];
    while let Some(e) = read.next().await {
        numbers.push(number(&e.unwrap()));
    }
    assert_eq!(numbers, (0..COMMITS * PER_COMMIT).collect::<Vec<_>>());

    // A category replay: the same.
    let before = proxy.bytes_forwarded();
    let mut replay = reader.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::Cold,
    );
    let first = match replay.next().await {
        Some(Ok(SubscriptionItem::Event(e))) => e,
        other => panic!("want the first event, got {other:?}"),
    };
    let cost = proxy.bytes_forwarded() - before;
    println!("category replay: {cost} bytes through the proxy before its first event");
    assert_eq!(number(&first), 0);
    assert!(
        cost <= PAGE_BYTES + SLACK,
        "the first page of a category replay cost {cost} bytes (page_bytes {PAGE_BYTES})"
    );
    let mut numbers = vec![number(&first)];
    while let Some(item) = replay.next().await {
        if let SubscriptionItem::Event(e) = item.unwrap() {
            numbers.push(number(&e));
        }
    }
    assert_eq!(numbers, (0..COMMITS * PER_COMMIT).collect::<Vec<_>>());
}
