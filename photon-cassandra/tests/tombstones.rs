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

use futures::StreamExt;
use photon_api::{
    Category, EventStore, ExpectedVersion, Selector, Start, StreamId, SubscriptionItem,
    SubscriptionMode,
};
use photon_cassandra::{CassandraStore, COMMITS_PER_PAGE};
use photon_conformance::server_url;

mod common;
use common::{fresh, number, numbered, session, with_options};

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

#[tokio::test]
async fn a_replay_scans_about_a_page_of_cleared_markers_per_read() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let keyspace = fresh("photon_tomb_");
    let url = with_options(
        &in_keyspace(&url, &keyspace),
        "settle_ms=200&timeout_ms=5000&repair_after_ms=15000",
    );
    let store = CassandraStore::from_url(&url).await.unwrap();
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
