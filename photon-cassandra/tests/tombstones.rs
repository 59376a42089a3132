//! Cleared markers do not stop a lagging reader, against a real server
//! (`PHOTON_TEST_CASSANDRA_URL`). Every append writes a pending marker in its category's and
//! `$all`'s time bucket and deletes it once its rows are indexed, so each append leaves two
//! row tombstones in `pending`. A reader far back in a bucket reads the markers ahead of it on
//! every page step; read to the end of the bucket, that scan grows with every append in the
//! bucket (quadratic over a replay, and refused with `ReadFailure` once one read passes the
//! server's `tombstone_failure_threshold`, 100,000 by default).
//!
//! The test counts what the server itself counts: `system_views.tombstones_per_read`, the
//! tombstones each read of a table scanned, in a keyspace of its own so that no other test's
//! reads mix in.

use std::time::{Duration, Instant};

use futures::StreamExt;
use photon_api::{
    Category, EventStore, ExpectedVersion, RecordedEvent, Selector, Start, StreamId,
    SubscriptionItem, SubscriptionMode, Timestamp,
};
use photon_cassandra::schema::time_id;
use photon_cassandra::{CassandraStore, COMMITS_PER_PAGE};
use photon_conformance::server_url;
use scylla::client::session::Session;
use scylla::value::CqlTimeuuid;

mod common;
use common::{fresh, next_event, number, numbered, session, with_options};

const STREAMS: u64 = 20;
const PER_STREAM: u64 = 100;

/// `url` with its keyspace replaced by `keyspace`.
fn in_keyspace(url: &str, keyspace: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (host, _) = base.rsplit_once('/').expect("a keyspace in the URL");
    let joined = format!("{host}/{keyspace}");
    if query.is_empty() {
        joined
    } else {
        format!("{joined}?{query}")
    }
}

/// A store on a fresh keyspace of its own (its name, URL and store), so that the server's
/// per-table counts are this test's alone; None without a server.
async fn own_keyspace() -> Option<(String, String, CassandraStore)> {
    let url = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL")?;
    let keyspace = fresh("photon_tomb_");
    let url = with_options(
        &in_keyspace(&url, &keyspace),
        "settle_ms=200&timeout_ms=5000&repair_after_ms=15000",
    );
    let store = CassandraStore::from_url(&url).await.unwrap();
    Some((keyspace, url, store))
}

#[tokio::test]
async fn a_replay_scans_about_a_page_of_cleared_markers_per_read() {
    let Some((keyspace, url, store)) = own_keyspace().await else {
        return;
    };
    let category = Category::new("tomb").unwrap();

    // 2,000 appends, 20 writers at once: 4,000 cleared markers in `pending`.
    let writers = (0..STREAMS).map(|s| {
        let (store, category) = (store.clone(), category.clone());
        async move {
            let stream = StreamId::new(&category, format!("s{s}")).unwrap();
            for n in 0..PER_STREAM {
                let expected = match n {
                    0 => ExpectedVersion::NoStream,
                    _ => ExpectedVersion::Exact(photon_api::Version(n - 1)),
                };
                store
                    .append(&stream, expected, vec![numbered(n, "tomb")])
                    .await
                    .unwrap();
            }
        }
    });
    futures::future::join_all(writers).await;

    // A fresh reader replays the category and the all stream from the beginning.
    let reader = CassandraStore::from_url(&url).await.unwrap();
    for selector in [Selector::Category(category.clone()), Selector::All] {
        let mut sub = reader.subscribe(selector.clone(), Start::Beginning, SubscriptionMode::Cold);
        let mut next = vec![0u64; STREAMS as usize];
        let mut seen = 0;
        while let Some(item) = sub.next().await {
            match item.unwrap() {
                SubscriptionItem::Event(e) => {
                    let s: usize = e.stream.id().trim_start_matches('s').parse().unwrap();
                    assert_eq!(number(&e), next[s], "{selector:?}: stream s{s} in order");
                    next[s] += 1;
                    seen += 1;
                }
                SubscriptionItem::CaughtUp => {}
            }
        }
        assert_eq!(seen, STREAMS * PER_STREAM, "{selector:?}: every event once");
    }

    // What the server counted: each read of `pending` scanned about a page's markers (a page
    // of commits, each with its cleared marker), not every marker left in the bucket.
    let session = session(&url).await;
    let rows = session
        .query_unpaged(
            "SELECT count, max FROM system_views.tombstones_per_read \
             WHERE keyspace_name = ? AND table_name = 'pending'",
            (keyspace.as_str(),),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let (reads, max) = rows.first_row::<(i64, f64)>().unwrap();
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .unwrap();
    println!("`pending`: {reads} reads, the most tombstones one scanned: {max}");
    assert!(reads > 0, "the replays read `pending` ({reads} reads)");
    let bound = 4.0 * COMMITS_PER_PAGE as f64;
    assert!(
        max <= bound,
        "one read of `pending` scanned {max} tombstones; a page holds {COMMITS_PER_PAGE} commits"
    );
}

/// The tombstones-per-read histogram of `pending` in `keyspace`: (reads, median, max).
async fn pending_reads(session: &Session, keyspace: &str) -> (i64, f64, f64) {
    session
        .query_unpaged(
            "SELECT count, p50th, max FROM system_views.tombstones_per_read \
             WHERE keyspace_name = ? AND table_name = 'pending'",
            (keyspace,),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .first_row::<(i64, f64, f64)>()
        .unwrap()
}

/// Appends that fail leave cleared markers with no category row (one per attempt). A reader at
/// the head reads the markers from what it has delivered, so it scans those tombstones once,
/// not again on every poll while no new row moves its position.
#[tokio::test]
async fn a_live_reader_does_not_rescan_the_markers_of_failed_appends() {
    let Some((keyspace, url, store)) = own_keyspace().await else {
        return;
    };
    let category = Category::new("tomb").unwrap();
    let stream = StreamId::new(&category, "a").unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![numbered(0, "tomb")],
        )
        .await
        .unwrap();
    let mut live = store.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    let first = next_event(&mut live, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(number(&first), 0);

    // 2,000 failed attempts: each marker written and deleted, with no commit.
    let session = session(&url).await;
    let now = Timestamp::now().unix_micros();
    let bucket = now.div_euclid(store.config().time_bucket.as_micros() as i64);
    let insert = session
        .prepare(format!("INSERT INTO {keyspace}.pending (category, bucket, time_id, stream, version) VALUES (?, ?, ?, ?, 1)"))
        .await
        .unwrap();
    let delete = session
        .prepare(format!(
            "DELETE FROM {keyspace}.pending WHERE category = ? AND bucket = ? AND time_id = ?"
        ))
        .await
        .unwrap();
    for i in 0..2_000 {
        let t = CqlTimeuuid::from(time_id(now + i));
        let key = category.as_str();
        session
            .execute_unpaged(&insert, (key, bucket, t, stream.as_str()))
            .await
            .unwrap();
        session
            .execute_unpaged(&delete, (key, bucket, t))
            .await
            .unwrap();
    }
    // The reader polls over them for a while, with nothing to deliver; then one more event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    store
        .append(
            &stream,
            ExpectedVersion::Exact(photon_api::Version(0)),
            vec![numbered(1, "tomb")],
        )
        .await
        .unwrap();
    let second = next_event(&mut live, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(number(&second), 1);

    let (reads, median, max) = pending_reads(&session, &keyspace).await;
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .unwrap();
    println!("`pending`: {reads} reads, median {median} tombstones, most {max}");
    assert!(
        reads >= 4,
        "the live reader polled `pending` ({reads} reads)"
    );
    assert!(
        median < 100.0,
        "half the polls scanned {median} tombstones or more: the failed appends' markers again"
    );
}

/// A marker past the first page's reach still holds the reader (the next step reads the
/// markers up to its own reach), until the repair drops it; and a reader resumed at a page
/// boundary delivers the rest once.
#[tokio::test]
async fn a_pending_append_beyond_the_first_page_holds_the_reader_until_repaired() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(
        &url,
        "settle_ms=200&timeout_ms=2000&repair_after_ms=4500&bucket_size=16",
    );
    let store = CassandraStore::from_url(&url).await.unwrap();
    let category = Category::new(fresh("reach")).unwrap();
    let stream = StreamId::new(&category, "a").unwrap();
    let mut written: Vec<RecordedEvent> = Vec::new();
    for n in 0..100u64 {
        let expected = match n {
            0 => ExpectedVersion::NoStream,
            _ => ExpectedVersion::Exact(photon_api::Version(n - 1)),
        };
        store
            .append(&stream, expected, vec![numbered(n, "reach")])
            .await
            .unwrap();
    }
    let all: Vec<RecordedEvent> = store
        .read_stream(&stream, photon_api::ReadOptions::forwards())
        .map(|e| e.unwrap())
        .collect()
        .await;
    written.extend(all);

    // An append of another stream in flight, its time id just after the 70th commit's.
    let session = session(&url).await;
    let ks = &store.config().keyspace;
    let at = written[69].recorded_at.unix_micros() + 1;
    let bucket = at.div_euclid(store.config().time_bucket.as_micros() as i64);
    let marker_made = Instant::now();
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.pending (category, bucket, time_id, stream, version) VALUES (?, ?, ?, ?, 0)"),
            (category.as_str(), bucket, CqlTimeuuid::from(time_id(at)), format!("{category}-b")),
        )
        .await
        .unwrap();
    let marker_age = Timestamp::now().unix_micros() - at;

    let reader = CassandraStore::from_url(&url).await.unwrap();
    let mut sub = reader.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    let mut seen = Vec::new();
    while seen.len() < 100 {
        let e = next_event(&mut sub, Duration::from_secs(30))
            .await
            .expect("every event");
        if seen.len() == 70 {
            // The 71st comes only once the marker is older than repair_after.
            let age = marker_age + marker_made.elapsed().as_micros() as i64;
            assert!(age >= 4_500_000, "passed a pending append {age} µs old");
        }
        seen.push(number(&e));
    }
    assert_eq!(seen, (0..100).collect::<Vec<_>>());

    // Resumed after the 64th event (a page's worth): the other 36, once.
    let mut cold = reader.subscribe(
        Selector::Category(category.clone()),
        Start::After(written[63].checkpoint.clone()),
        SubscriptionMode::Cold,
    );
    let mut rest = Vec::new();
    while let Some(item) = cold.next().await {
        if let SubscriptionItem::Event(e) = item.unwrap() {
            rest.push(number(&e));
        }
    }
    assert_eq!(rest, (64..100).collect::<Vec<_>>());
}
