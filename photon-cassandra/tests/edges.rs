//! Edges of the category streams against a real server (`PHOTON_TEST_CASSANDRA_URL`): a
//! future time bucket registered by a writer whose clock ran ahead, a category whose only
//! append failed, and `Start::Time` far from the present (before 1970, before the time UUIDs'
//! 1582 epoch, after their year 5236).

use std::time::Duration;

use futures::StreamExt;
use photon_api::{
    Category, Error, EventStore, EventStoreExt, ExpectedVersion, ReadOptions, Selector, Start,
    StreamId, Timestamp, Uuid,
};
use photon_cassandra::CassandraStore;
use photon_conformance::server_url;

mod common;
use common::{fresh, next_event, number, numbered, numbers, proxied, session, with_options};

/// The layout of the keyspace the other tests share (`bucket_size=16`), a short settle delay.
const OPTIONS: &str = "settle_ms=200&timeout_ms=2000&repair_after_ms=4500&bucket_size=16";

/// A writer whose clock ran two buckets ahead registered a future time bucket of the category;
/// a subscriber that opens before anything else is stored must still read the present bucket,
/// not jump to the future one and wait there.
#[tokio::test]
async fn a_reader_does_not_jump_to_a_future_time_bucket() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let store = CassandraStore::from_url(&url).await.unwrap();
    store.health().await.unwrap();
    let category = Category::new(fresh("future")).unwrap();
    let stream = StreamId::new(&category, "a").unwrap();

    let config = store.config();
    let width = config.time_bucket.as_micros() as i64;
    let future = Timestamp::now().unix_micros().div_euclid(width) + 2;
    session(&url)
        .await
        .query_unpaged(
            format!(
                "INSERT INTO {}.category_buckets (category, bucket) VALUES (?, ?)",
                config.keyspace
            ),
            (category.as_str(), future),
        )
        .await
        .unwrap();

    let mut live = common::live(&store, &category).await;
    store
        .append(&stream, ExpectedVersion::NoStream, vec![numbered(0, "now")])
        .await
        .unwrap();
    let got = next_event(&mut live, Duration::from_secs(15)).await;
    assert_eq!(
        got.as_ref().map(number),
        Some(0),
        "the live subscriber reads the present bucket, not the future one"
    );
    let replay = store
        .replay_to_vec(Selector::Category(category.clone()), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(numbers(&replay), vec![0]);
}

/// An append whose conditional write never reached the server (its connection was cut; the
/// append answered `Unavailable` and its version was fenced) is the only one of its category:
/// the category has no events, so it is not listed, and neither is its stream.
#[tokio::test]
async fn a_category_whose_only_append_failed_is_not_listed() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let (proxy, proxied_url) = proxied(&url).await;
    let store = CassandraStore::from_url(&url).await.unwrap();
    let writer = CassandraStore::from_url(&proxied_url).await.unwrap();
    writer.health().await.unwrap();

    let failed = Category::new(fresh("failed")).unwrap();
    let stream = StreamId::new(&failed, "a").unwrap();
    let mark = Uuid::new_v4().simple().to_string();
    let hold = proxy.hold_next(mark.as_bytes());
    let append = {
        let (writer, stream, mark) = (writer.clone(), stream.clone(), mark.clone());
        tokio::spawn(async move {
            writer
                .append(&stream, ExpectedVersion::NoStream, vec![numbered(0, &mark)])
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(30), hold.matched())
        .await
        .expect("the conditional write reached the proxy");
    hold.drop_connection();
    match tokio::time::timeout(Duration::from_secs(30), append)
        .await
        .expect("the append answered")
        .unwrap()
    {
        Err(Error::Unavailable { .. }) => {}
        other => panic!("want Unavailable for a write whose connection was cut, got {other:?}"),
    }

    // A category with a stored append, for contrast.
    let stored = Category::new(fresh("stored")).unwrap();
    store
        .append(
            &StreamId::new(&stored, "a").unwrap(),
            ExpectedVersion::NoStream,
            vec![numbered(1, "stored")],
        )
        .await
        .unwrap();

    let listed = store.list_categories().await.unwrap();
    assert!(listed.contains(&stored), "a category with events is listed");
    assert!(
        !listed.contains(&failed),
        "category {failed} has no events (its only append failed) but is listed"
    );
    let streams: Vec<_> = store.list_streams(&failed).collect().await;
    assert!(streams.is_empty(), "{streams:?}");
    assert_eq!(store.stream_version(&stream).await.unwrap(), None);
    let read = store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();
    assert!(read.is_empty());

    // The failed append settles its own markers in the background (it fences its version):
    // wait for it, so no marker of this test holds back the all stream's readers in the next.
    let config = store.config();
    let bucket = Timestamp::now()
        .unix_micros()
        .div_euclid(config.time_bucket.as_micros() as i64);
    let s = session(&url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = s
            .query_unpaged(
                format!(
                    "SELECT time_id FROM {}.pending WHERE category = ? AND bucket = ?",
                    config.keyspace
                ),
                (failed.as_str(), bucket),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .rows_num();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed append's markers were never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.stream_version(&stream).await.unwrap(), None);
}

/// `Start::Time` before 1970 is a time like any other (time UUIDs hold times back to 1582):
/// a replay from 1960 has every event. Before 1582 or after the year 5236 there is no time UUID
/// to start at: `InvalidInput` naming the time and the category (or the all stream), and
/// nothing stored changes.
#[tokio::test]
async fn start_time_before_1970_replays_and_one_no_time_uuid_holds_is_refused() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let store = CassandraStore::from_url(&url).await.unwrap();
    let category = Category::new(fresh("epoch")).unwrap();
    let stream = StreamId::new(&category, "a").unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![numbered(0, "epoch")],
        )
        .await
        .unwrap();

    let at = |micros: i64| Start::Time(Timestamp::from_unix_micros(micros).unwrap());
    // 1960-06-30.
    let replay = store
        .replay_to_vec(
            Selector::Category(category.clone()),
            at(-300_000_000_000_000),
        )
        .await
        .unwrap();
    assert_eq!(numbers(&replay), vec![0]);

    // About 1494, and about 6089.
    for micros in [-15_000_000_000_000_000, 130_000_000_000_000_000] {
        for (selector, named) in [
            (Selector::Category(category.clone()), category.to_string()),
            (Selector::All, "the all stream".to_owned()),
        ] {
            match store.replay_to_vec(selector, at(micros)).await {
                Err(Error::InvalidInput { what, reason }) => {
                    assert!(what.contains("Start::Time"), "{what}");
                    assert!(what.contains(&named), "{what}");
                    assert!(reason.contains("1582-10-15"), "{reason}");
                }
                other => panic!("want InvalidInput for a start at {micros} µs, got {other:?}"),
            }
        }
    }
    let read = store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(numbers(&read), vec![0], "nothing stored changed");
}
