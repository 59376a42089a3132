//! Clock skew against a real server (`PHOTON_TEST_CASSANDRA_URL`): a writer compares its clock
//! with the server's and refuses to write while they differ by more than the tolerated bound
//! (`settle_ms / 4`), with an `InvalidInput` naming the skew. The writer's clock is moved with
//! `CassandraStore::set_clock_offset_ms`, as a machine whose clock is off would have it.

use std::time::Duration;

use futures::StreamExt;
use photon_api::{
    Category, Error, EventStore, EventStoreExt, ExpectedVersion, RecordedEvent, Selector, Start,
    StreamId, SubscriptionItem, SubscriptionMode,
};
use photon_cassandra::CassandraStore;
use photon_conformance::server_url;

mod common;
use common::{fresh, numbered, numbers, with_options, Sub};

/// The default settle delay (1 s), so the bound is 250 ms.
const OPTIONS: &str = "settle_ms=1000&timeout_ms=2000&repair_after_ms=5000&bucket_size=16";

/// Every event `sub` delivers within `wait`.
async fn events_within(sub: &mut Sub, wait: Duration) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => return out,
            Ok(Some(Ok(SubscriptionItem::Event(e)))) => out.push(e),
            Ok(Some(Ok(SubscriptionItem::CaughtUp))) => {}
            Ok(other) => panic!("want an event, got {other:?}"),
        }
    }
}

/// The refusal of a skewed writer: `InvalidInput` whose reason names the skew (`direction`,
/// in ms) and the bound.
fn assert_skew_refusal(result: Result<impl std::fmt::Debug, Error>, direction: &str) {
    match result {
        Err(Error::InvalidInput { what, reason }) => {
            println!("refused: invalid {what}: {reason}");
            assert!(what.contains("clock"), "{what}");
            assert!(reason.contains(direction), "{reason}");
            assert!(reason.contains("250 ms"), "names the bound: {reason}");
        }
        other => panic!("want InvalidInput naming the clock skew, got {other:?}"),
    }
}

/// A writer whose clock is 3 s behind gives its append a time id that live readers (3 s ahead
/// of it, past the 1 s settle delay) have passed: they would never deliver it. It is refused
/// instead, nothing is stored, and live readers see exactly what a replay sees.
#[tokio::test]
async fn a_writer_whose_clock_is_behind_is_refused_and_live_readers_miss_nothing() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let category = Category::new(fresh("skew")).unwrap();
    let reader = CassandraStore::from_url(&url).await.unwrap();
    let mut live = common::live(&reader, &category).await;

    // The live subscriber delivers event 0, so its position is event 0's time, less than 3 s
    // ago when the skewed writer appends.
    let good = CassandraStore::from_url(&url).await.unwrap();
    good.append(
        &StreamId::new(&category, "first").unwrap(),
        ExpectedVersion::NoStream,
        vec![numbered(0, "first")],
    )
    .await
    .unwrap();
    let first = events_within(&mut live, Duration::from_millis(2_500)).await;
    assert_eq!(numbers(&first), vec![0]);

    let skewed = CassandraStore::from_url(&url).await.unwrap();
    skewed.set_clock_offset_ms(-3_000);
    let behind = StreamId::new(&category, "behind").unwrap();
    let refused = skewed
        .append(
            &behind,
            ExpectedVersion::NoStream,
            vec![numbered(1, "behind")],
        )
        .await;
    good.append(
        &StreamId::new(&category, "good").unwrap(),
        ExpectedVersion::NoStream,
        vec![numbered(2, "good")],
    )
    .await
    .unwrap();

    let mut delivered = first;
    delivered.extend(events_within(&mut live, Duration::from_secs(6)).await);
    let replay = reader
        .replay_to_vec(Selector::Category(category.clone()), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(
        numbers(&delivered),
        numbers(&replay),
        "the live subscriber delivers what a replay holds (the skewed writer's append: {refused:?})"
    );
    assert_skew_refusal(refused, "behind");
    assert_eq!(numbers(&replay), vec![0, 2]);
    assert_eq!(reader.stream_version(&behind).await.unwrap(), None);
}

/// A writer whose clock runs 5 s ahead is refused too (its time ids would hold its stream's
/// later commits back from every reader), until its clock is set right: then it writes, with
/// no restart.
#[tokio::test]
async fn a_writer_whose_clock_runs_ahead_is_refused_until_it_is_set_right() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let category = Category::new(fresh("skew")).unwrap();
    let stream = StreamId::new(&category, "ahead").unwrap();
    let writer = CassandraStore::from_url(&url).await.unwrap();
    writer.set_clock_offset_ms(5_000);
    let refused = writer
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![numbered(1, "ahead")],
        )
        .await;
    assert_skew_refusal(refused, "ahead");
    assert_eq!(writer.stream_version(&stream).await.unwrap(), None);

    writer.set_clock_offset_ms(0);
    let stored = writer
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![numbered(1, "ahead")],
        )
        .await
        .expect("a writer whose clock is set right writes again");
    assert_eq!(stored.first_version.0, 0);
    let replay = writer
        .replay_to_vec(Selector::Category(category), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(numbers(&replay), vec![1]);
}

/// A batch that is stored (its first attempt answered `Unavailable` but landed) and re-sent
/// with its original expectation by a writer whose clock has since gone off is answered as the
/// retry it is: the clock matters only to a batch about to be written. The re-sending store is
/// a fresh one, so only the stream itself can tell it the batch is there.
#[tokio::test]
async fn a_stored_batch_re_sent_with_a_skewed_clock_is_answered_as_a_retry() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let category = Category::new(fresh("skew")).unwrap();
    let stream = StreamId::new(&category, "resent").unwrap();
    let writer = CassandraStore::from_url(&url).await.unwrap();
    let first = vec![numbered(0, "first")];
    writer
        .append(&stream, ExpectedVersion::NoStream, first.clone())
        .await
        .unwrap();
    let batch = vec![numbered(1, "resent"), numbered(2, "resent")];
    let stored = writer
        .append(
            &stream,
            ExpectedVersion::Exact(photon_api::Version(0)),
            batch.clone(),
        )
        .await
        .unwrap();

    let resender = CassandraStore::from_url(&url).await.unwrap();
    resender.set_clock_offset_ms(-3_000);
    let again = resender
        .append(
            &stream,
            ExpectedVersion::Exact(photon_api::Version(0)),
            batch.clone(),
        )
        .await
        .expect("a re-send of a stored batch is a retry whatever the clock says");
    assert_eq!(again, stored);
    // A new batch from that writer is still refused while its clock is off.
    let refused = resender
        .append(
            &stream,
            ExpectedVersion::Exact(photon_api::Version(2)),
            vec![numbered(3, "new")],
        )
        .await;
    assert_skew_refusal(refused, "behind");
    assert_eq!(
        writer.stream_version(&stream).await.unwrap(),
        Some(photon_api::Version(2))
    );
}

/// A reader whose clock runs 10 s ahead would read 6 s past the present (settle 4 s): it
/// delivers a later append while an earlier one is still writing its marker (here held in the
/// fault proxy for about a second, well within the writer's `settle_ms / 2`), and never
/// delivers the earlier one. Readers take the server's clock when theirs runs ahead of it, so
/// they wait for the marker and deliver both, in time order.
#[tokio::test]
async fn a_reader_whose_clock_runs_ahead_reads_by_the_servers_clock() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(
        &url,
        // A 5 s timeout: the held markers (about 1.2 s and another append) stay well within it
        // on a busy machine, where 2 s was sometimes passed.
        "settle_ms=4000&timeout_ms=5000&repair_after_ms=14000&bucket_size=16",
    );
    let (proxy, proxied_url) = common::proxied(&url).await;
    let category = Category::new(fresh("skew")).unwrap();
    let slow = StreamId::new(&category, "slow").unwrap();
    let writer = CassandraStore::from_url(&proxied_url).await.unwrap();
    writer
        .append(&slow, ExpectedVersion::NoStream, vec![numbered(0, "slow")])
        .await
        .unwrap();
    let other = CassandraStore::from_url(&url).await.unwrap();

    let reader = CassandraStore::from_url(&url).await.unwrap();
    reader.set_clock_offset_ms(10_000);
    let mut live = reader.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    let mut delivered = events_within(&mut live, Duration::from_secs(8)).await;
    assert_eq!(numbers(&delivered), vec![0]);

    // The slow append's markers (the first request naming its stream, its head being known)
    // are held; another append is stored meanwhile.
    let hold = proxy.hold_next(slow.as_str().as_bytes());
    let held = {
        let (writer, slow) = (writer.clone(), slow.clone());
        tokio::spawn(async move {
            writer
                .append(
                    &slow,
                    ExpectedVersion::Exact(photon_api::Version(0)),
                    vec![numbered(1, "slow")],
                )
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), hold.matched())
        .await
        .expect("the markers reached the proxy");
    other
        .append(
            &StreamId::new(&category, "quick").unwrap(),
            ExpectedVersion::NoStream,
            vec![numbered(2, "quick")],
        )
        .await
        .unwrap();
    delivered.extend(events_within(&mut live, Duration::from_millis(1_200)).await);
    hold.release();
    held.await.unwrap().expect("the slow append is stored");

    delivered.extend(events_within(&mut live, Duration::from_secs(8)).await);
    let replay = other
        .replay_to_vec(Selector::Category(category), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(numbers(&replay), vec![0, 1, 2]);
    assert_eq!(
        numbers(&delivered),
        numbers(&replay),
        "the live reader delivers what a replay holds"
    );
}
