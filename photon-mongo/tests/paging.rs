//! Pages of reads against a real server (`PHOTON_TEST_MONGO_URL`), through photon-faults' TCP
//! proxy, which counts the bytes on the wire: a listing fetches a page of names at a time as
//! its consumer reaches it, so no reply grows with the number of streams (MongoDB caps one
//! reply, such as a `distinct`, at 16 MiB), and a replay's page of commits is bounded in bytes,
//! not only in commits, so large commits do not pile up in a subscription's buffer.

use futures::{StreamExt, TryStreamExt};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Document};
use photon_api::{
    ContentType, EventData, EventStore, EventType, ExpectedVersion, Payload, Selector, Start,
    StreamId, SubscriptionItem, SubscriptionMode,
};
use photon_conformance::{fresh_category, server_url};

#[path = "common/proxied.rs"]
mod proxied;
use proxied::proxied;

/// Streams written for the listing: far more than one page.
const STREAMS: usize = 2000;

/// The commit documents of `STREAMS` streams of `category` in the README's layout (the listing
/// reads only `stream`, `category` and `version`), one at version 0 for each stream and a
/// second at version 1 for every tenth, so a stream with several commits is still listed once.
fn commits(category: &str) -> Vec<Document> {
    let commit = |i: usize, version: i64, position: usize| {
        doc! {
            "stream": format!("{category}-{i:05}"),
            "category": category,
            "version": version,
            "count": 1_i64,
            "position": position as i64,
            "recorded_at": 0_i64,
            "event_ids": [Binary {
                subtype: BinarySubtype::Uuid,
                bytes: uuid::Uuid::new_v4().as_bytes().to_vec(),
            }],
            "events": [],
        }
    };
    let firsts = (0..STREAMS).map(|i| commit(i, 0, i + 1));
    let seconds = (0..STREAMS)
        .step_by(10)
        .map(|i| commit(i, 1, STREAMS + 1 + i / 10));
    firsts.chain(seconds).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_listed_a_page_at_a_time() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let (proxy, store, prefix) = proxied(&url, "l", "").await;
    // Connected, indexes made: what follows on the wire is the listing's.
    store.health().await.unwrap();

    let category = fresh_category();
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    db.collection::<Document>(&format!("{prefix}_commits"))
        .insert_many(commits(category.as_str()))
        .await
        .unwrap();

    let before = proxy.bytes_forwarded();
    let mut listing = store.list_streams(&category);
    let first = listing.next().await.expect("a stream").unwrap();
    let first_fetch = proxy.bytes_forwarded() - before;
    println!("the first stream of {STREAMS} came after {first_fetch} bytes on the wire");
    assert_eq!(first.as_str(), format!("{category}-00000"));
    // The 2,000 names take about 80 KB in one reply; a page of them well under 30 KB.
    assert!(
        first_fetch < 30_000,
        "the first stream of the listing took {first_fetch} bytes on the wire"
    );

    let rest: Vec<StreamId> = listing.try_collect().await.unwrap();
    let listed: Vec<String> = std::iter::once(first)
        .chain(rest)
        .map(|s| s.as_str().to_owned())
        .collect();
    let want: Vec<String> = (0..STREAMS).map(|i| format!("{category}-{i:05}")).collect();
    assert_eq!(listed, want, "every stream once, sorted");
}

/// Commits written for the replay, each of `EVENTS_PER_COMMIT` events of `PAYLOAD` bytes: about
/// 4 MB a commit, 32 MB in all, so that a page of 64 commits would take them all.
const LARGE_COMMITS: usize = 8;
const EVENTS_PER_COMMIT: usize = 4;
const PAYLOAD: usize = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_fetches_a_page_of_large_commits_bounded_in_bytes() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let (proxy, store, _) = proxied(&url, "l", "").await;
    let category = fresh_category();
    let stream = StreamId::new(&category, "large").unwrap();
    let big = || {
        EventData::new(
            EventType::new("Large").unwrap(),
            Payload::raw(ContentType::Json, vec![b'1'; PAYLOAD]),
        )
    };
    for _ in 0..LARGE_COMMITS {
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                (0..EVENTS_PER_COMMIT).map(|_| big()).collect(),
            )
            .await
            .unwrap();
    }

    let before = proxy.bytes_forwarded();
    let mut replay = store.subscribe(
        Selector::Category(category),
        Start::Beginning,
        SubscriptionMode::Cold,
    );
    let Some(Ok(SubscriptionItem::Event(first))) = replay.next().await else {
        panic!("the replay's first event")
    };
    let first_fetch = proxy.bytes_forwarded() - before;
    println!(
        "the first event of {} MB came after {first_fetch} bytes on the wire",
        LARGE_COMMITS * EVENTS_PER_COMMIT * PAYLOAD / 1_000_000
    );
    assert_eq!(first.version.0, 0);
    // 8 MiB a page, plus what the server's last reply carried past it; not all 32 MB.
    assert!(
        first_fetch < 20_000_000,
        "the replay's first event took {first_fetch} bytes on the wire"
    );

    let mut versions = vec![first.version.0];
    while let Some(item) = replay.next().await {
        match item.unwrap() {
            SubscriptionItem::Event(e) => {
                assert_eq!(e.payload.bytes.len(), PAYLOAD);
                versions.push(e.version.0);
            }
            SubscriptionItem::CaughtUp => panic!("a Cold replay sent CaughtUp"),
        }
    }
    let all = (LARGE_COMMITS * EVENTS_PER_COMMIT) as u64;
    assert_eq!(
        versions,
        (0..all).collect::<Vec<_>>(),
        "every event once, in order"
    );
}
