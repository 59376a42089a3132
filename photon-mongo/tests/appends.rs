//! What an append sends, against a real server (`PHOTON_TEST_MONGO_URL`), counted and held in
//! photon-faults' TCP proxy (README, "How the guarantees hold"): one insert per append, and no
//! read, where the store knows the stream (MongoDB; FerretDB adds the id lookup its unique
//! index needs); the appends of one store that wait meanwhile share one insert; a caller that
//! gives up before its commit's turn sends nothing; and stores writing one database at once
//! leave no global position empty.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use photon_api::{Error, EventData, EventStore, ExpectedVersion, StreamId, Version};
use photon_conformance::server_url;
use photon_faults::proxy::FaultProxy;
use photon_mongo::MongoStore;

#[path = "common/proxied.rs"]
mod proxied;
use proxied::proxied;

/// The start of an `insert` command's body on the wire (a string element named `insert`).
const INSERT: &[u8] = b"\x02insert\x00";

/// The start of a `find` command's body on the wire.
const FIND: &[u8] = b"\x02find\x00";

fn event(n: u64) -> EventData {
    EventData::json("Counted", &n).unwrap()
}

/// Finds each append makes on this server besides its insert: the id lookup where the unique
/// index does not refuse a shared id (FerretDB), none where it does (MongoDB).
async fn lookups(store: &MongoStore) -> usize {
    let health = store.health().await.unwrap();
    usize::from(!health.detail.contains(photon_mongo::IDS_BY_INDEX))
}

/// A store behind the proxy with `options`, which has made its first append (to `warm`), so its
/// indexes are made and it knows the highest position: what follows on the wire is the test's.
async fn warm_store(url: &str, options: &str, warm: &str) -> (FaultProxy, MongoStore, String) {
    let (proxy, store, prefix) = proxied(url, "a", options).await;
    let warm = StreamId::parse(warm).unwrap();
    store
        .append(&warm, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .unwrap();
    (proxy, store, prefix)
}

/// The commits collection of `prefix`, for the plain driver.
async fn commits(url: &str, prefix: &str) -> mongodb::Collection<Document> {
    let client = mongodb::Client::with_uri_str(url).await.unwrap();
    client
        .default_database()
        .unwrap_or_else(|| client.database("photon"))
        .collection(&format!("{prefix}_commits"))
}

/// Every global position of the collection, in order, with the stream that holds it.
async fn positions(url: &str, prefix: &str) -> Vec<(i64, String)> {
    let found: Vec<Document> = commits(url, prefix)
        .await
        .find(doc! {})
        .sort(doc! { "position": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    found
        .iter()
        .map(|c| {
            let stream = c.get_str("stream").unwrap().to_owned();
            (c.get_i64("position").unwrap(), stream)
        })
        .collect()
}

/// Positions 1..=n, each held by a commit, none by a tombstone.
fn assert_dense(positions: &[(i64, String)], n: usize) {
    let numbers: Vec<i64> = positions.iter().map(|(p, _)| *p).collect();
    assert_eq!(numbers, (1..=n as i64).collect::<Vec<_>>(), "{positions:?}");
    assert!(
        positions.iter().all(|(_, stream)| stream != "~gap"),
        "a position was given up: {positions:?}"
    );
}

/// Before, every append read the stream's head and the highest global position before its
/// insert (three finds and an insert on FerretDB): now the stream is not read while the store
/// knows it (its own last append), nor for a new stream's first commit, and the global position
/// comes from the store's own count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_to_a_stream_the_store_knows_is_one_insert() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let (proxy, store, prefix) = proxied(&url, "a", "").await;
    let lookups = lookups(&store).await;
    let stream = StreamId::parse("counted-1").unwrap();
    // The first append of a store learns the highest position (one find more).
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .unwrap();

    let (inserts, finds) = (proxy.count(INSERT), proxy.count(FIND));
    for n in 1..=10 {
        let expected = ExpectedVersion::Exact(Version(n - 1));
        let stored = store.append(&stream, expected, vec![event(n)]).await;
        assert_eq!(stored.unwrap().first_version, Version(n));
    }
    for n in 11..=15 {
        let stored = store.append(&stream, ExpectedVersion::Any, vec![event(n)]);
        assert_eq!(stored.await.unwrap().first_version, Version(n));
    }
    // A new stream's first commit needs no read either.
    for n in 0..5 {
        let other = StreamId::parse(format!("counted-new{n}")).unwrap();
        let stored = store.append(&other, ExpectedVersion::NoStream, vec![event(n)]);
        assert_eq!(stored.await.unwrap().first_version, Version(0));
    }
    assert_eq!(inserts.get(), 20, "inserts");
    assert_eq!(
        finds.get(),
        20 * lookups,
        "finds (lookups per append {lookups})"
    );
    assert_dense(&positions(&url, &prefix).await, 21);
}

/// Appends that arrive while the store's insert is in flight wait and then go together, in one
/// insert at consecutive positions (before, each sent its own insert and raced the others for
/// the highest position + 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_waiting_for_an_insert_in_flight_share_the_next_one() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    // Bounds well above the hold below, so the held insert answers Ok.
    let options = "photon_timeout_ms=10000&photon_answer_window_ms=10000";
    let (proxy, store, prefix) = warm_store(&url, options, "group-warm").await;
    let lookups = lookups(&store).await;

    let inserts = proxy.count(INSERT);
    let hold = proxy.hold_next(INSERT);
    let append = |n: u64| {
        let store = store.clone();
        tokio::spawn(async move {
            let stream = StreamId::parse(format!("group-{n}")).unwrap();
            store
                .append(&stream, ExpectedVersion::NoStream, vec![event(n)])
                .await
        })
    };
    let first = append(0);
    tokio::time::timeout(Duration::from_secs(10), hold.matched())
        .await
        .expect("the first insert reached the proxy");
    let finds = proxy.count(FIND);
    let waiting: Vec<_> = (1..16).map(append).collect();
    // Each of them has done its lookup (if any) and queued its commit (a second is ample on a
    // loaded machine; a longer hold only costs time).
    let queued = async {
        while finds.get() < 15 * lookups {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("the appends looked their ids up");
    hold.release();
    first.await.unwrap().expect("the held append");
    for append in waiting {
        append.await.unwrap().expect("a waiting append");
    }
    assert_eq!(inserts.get(), 2, "inserts");
    assert_dense(&positions(&url, &prefix).await, 17);
}

/// An append whose caller gives up while its commit waits for its turn is taken out of the
/// queue: nothing is sent for it, and no position is left empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_append_whose_caller_gave_up_is_never_sent() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let options = "photon_timeout_ms=10000&photon_answer_window_ms=10000";
    let (proxy, store, prefix) = warm_store(&url, options, "gaveup-warm").await;

    let hold = proxy.hold_next(INSERT);
    let held = {
        let store = store.clone();
        tokio::spawn(async move {
            let stream = StreamId::parse("gaveup-held").unwrap();
            store
                .append(&stream, ExpectedVersion::NoStream, vec![event(1)])
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), hold.matched())
        .await
        .expect("the insert reached the proxy");
    let abandoned = StreamId::parse("gaveup-dropped").unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(1500),
        store.append(&abandoned, ExpectedVersion::NoStream, vec![event(2)]),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "answered while the insert was held: {gave_up:?}"
    );
    hold.release();
    held.await.unwrap().expect("the held append");
    let after = StreamId::parse("gaveup-after").unwrap();
    store
        .append(&after, ExpectedVersion::NoStream, vec![event(3)])
        .await
        .unwrap();

    assert_eq!(store.stream_version(&abandoned).await.unwrap(), None);
    let stored = positions(&url, &prefix).await;
    assert_dense(&stored, 3);
    let streams: Vec<&str> = stored.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(streams, ["gaveup-warm", "gaveup-held", "gaveup-after"]);
}

/// Two stores (two processes) writing one database: each counts positions on its own, so each
/// loses positions to the other; a lost position is claimed again after reading the head, and
/// every append is stored once, at positions with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_writing_one_database_at_once_leave_no_position_empty() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = format!("a{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let with_prefix = format!(
        "{url}{}photon_prefix={prefix}",
        if url.contains('?') { "&" } else { "?" }
    );
    let stores = [
        MongoStore::from_url(&with_prefix).await.unwrap(),
        MongoStore::from_url(&with_prefix).await.unwrap(),
    ];
    const WRITERS: u64 = 4;
    const APPENDS: u64 = 10;
    let writers = (0..WRITERS).map(|w| {
        let store = stores[(w % 2) as usize].clone();
        async move {
            let stream = StreamId::parse(format!("two-w{w}")).unwrap();
            for n in 0..APPENDS {
                let expected = match n {
                    0 => ExpectedVersion::NoStream,
                    n => ExpectedVersion::Exact(Version(n - 1)),
                };
                store.append(&stream, expected, vec![event(n)]).await?;
            }
            Ok::<_, Error>(())
        }
    });
    for result in futures::future::join_all(writers).await {
        result.expect("every append is stored");
    }
    let stored = positions(&url, &prefix).await;
    assert_dense(&stored, (WRITERS * APPENDS) as usize);
}

/// A store whose memory of a stream is stale (another store appended to it) while other
/// commits keep taking positions: its insert is refused for the stream's version, at a position
/// that is still free, and it must tell that from a lost position. It answers
/// `WrongExpectedVersion` with the actual version (found by review: telling them apart by the
/// highest position took every refusal for a lost position while others wrote, and retried the
/// same version until `Unavailable`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_store_hears_wrong_expected_version_while_others_write() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = format!("a{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let with_prefix = format!(
        "{url}{}photon_prefix={prefix}",
        if url.contains('?') { "&" } else { "?" }
    );
    let stale = MongoStore::from_url(&with_prefix).await.unwrap();
    let other = MongoStore::from_url(&with_prefix).await.unwrap();
    let stream = StreamId::parse("stale-1").unwrap();
    stale
        .append(&stream, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .unwrap();
    other
        .append(&stream, ExpectedVersion::Exact(Version(0)), vec![event(1)])
        .await
        .unwrap();
    // Eight writers of the other store, so its inserts follow each other back to back.
    let busy: Vec<_> = (0..8)
        .map(|w| {
            let other = other.clone();
            tokio::spawn(async move {
                let elsewhere = StreamId::parse(format!("stale-busy{w}")).unwrap();
                for n in 0u64.. {
                    let _ = other
                        .append(&elsewhere, ExpectedVersion::Any, vec![event(n)])
                        .await;
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let answer = stale
            .append(&stream, ExpectedVersion::Exact(Version(0)), vec![event(2)])
            .await;
        answers.push((answer, started.elapsed()));
    }
    busy.iter().for_each(tokio::task::JoinHandle::abort);
    for (answer, took) in &answers {
        match answer {
            Err(Error::WrongExpectedVersion { actual, .. }) => {
                assert_eq!(*actual, Some(Version(1)));
            }
            other => panic!("after {took:?}: {other:?}"),
        }
    }
}

/// While every insert is held on its way (the server sees none), every append answers within a
/// bound, however many wait behind the held inserts: a commit still queued after
/// `photon_timeout_ms` is taken out and never sent (found by review: a queued commit had no
/// deadline of its own, so each group ahead of it added an insert's timeout and its fence's).
/// The id lookups (FerretDB) pass, so the commits do queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_insert_held_every_queued_append_answers_in_time() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let timeout = Duration::from_millis(1000);
    let options = format!(
        "photon_timeout_ms={ms}&serverSelectionTimeoutMS={ms}&connectTimeoutMS={ms}",
        ms = timeout.as_millis()
    );
    let (proxy, store, prefix) = warm_store(&url, &options, "held-warm").await;
    // Each hold takes one insert (or tombstone) and whatever follows on its connection.
    let holds: Vec<_> = (0..40).map(|_| proxy.hold_next(INSERT)).collect();
    let started = std::time::Instant::now();
    let appends = (0..200u64).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            let stream = StreamId::parse(format!("held-{n}")).unwrap();
            let answer = store
                .append(&stream, ExpectedVersion::NoStream, vec![event(n)])
                .await;
            (answer, started.elapsed())
        })
    });
    let answers = futures::future::join_all(appends).await;
    for hold in holds {
        hold.drop_connection();
    }
    // The first group: its insert's timeout, then its fence's (one timeout in all); a queued
    // commit: its timeout in the queue. The slack is for a loaded machine.
    let bound = timeout * 2 + Duration::from_millis(1500);
    let mut refused = 0;
    for joined in answers {
        let (answer, took) = joined.unwrap();
        assert!(
            took <= bound,
            "answered after {took:?}, bound {bound:?}: {answer:?}"
        );
        match answer {
            Err(Error::Unavailable { .. }) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(refused, 200);
    // Nothing of them is stored (the held inserts never reached the server).
    let stored = positions(&url, &prefix).await;
    assert!(
        stored.iter().all(|(_, s)| s == "held-warm" || s == "~gap"),
        "{stored:?}"
    );
}
