//! What the store answers when the network between it and the server misbehaves, against a real
//! server (`PHOTON_TEST_MONGO_URL`) through photon-faults' TCP proxy: a request held on its way
//! and a stalled connection. Every call answers `Unavailable` within the store's timeout, and
//! an append whose insert reaches the server after the call gave up is stored once or never.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Document};
use photon_api::{
    Category, Error, EventData, EventStore, EventStoreExt, ExpectedVersion, ReadOptions, Selector,
    Start, StreamId, SubscriptionMode, Version,
};
use photon_conformance::server_url;
use photon_faults::proxy::FaultProxy;
use photon_mongo::MongoStore;

#[path = "common/proxied.rs"]
mod proxied;
use proxied::proxied as common_proxied;

/// The store's timeout in these tests.
const TIMEOUT: Duration = Duration::from_millis(1000);

/// How late past the timeout an answer may come (scheduling, a loaded machine).
const SLACK: Duration = Duration::from_millis(1500);

/// A store behind a fresh fault proxy, on a fresh collection, with the timeouts above; the
/// proxy, the store, the direct URL (for the plain driver) and the prefix.
async fn proxied() -> Option<(FaultProxy, MongoStore, String, String)> {
    let url = server_url("mongo", "PHOTON_TEST_MONGO_URL")?;
    let ms = TIMEOUT.as_millis();
    let options =
        format!("photon_timeout_ms={ms}&serverSelectionTimeoutMS={ms}&connectTimeoutMS={ms}");
    let (proxy, store, prefix) = common_proxied(&url, "f", &options).await;
    Some((proxy, store, url, prefix))
}

fn event(mark: &str) -> EventData {
    EventData::json("Marked", &serde_json::json!({ "mark": mark })).unwrap()
}

/// The first item of a store's stream.
async fn next<T>(mut s: futures::stream::BoxStream<'static, Result<T, Error>>) -> Result<T, Error> {
    s.next().await.expect("an item")
}

/// Runs `call`, asserting that it answers `Unavailable` within the timeout (and the slack).
async fn answers_unavailable<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, Error>>,
) {
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 30 s (timeout {TIMEOUT:?})"));
    let took = started.elapsed();
    assert!(
        matches!(answer, Err(Error::Unavailable { .. })),
        "{what}: {answer:?}"
    );
    assert!(
        took <= TIMEOUT + SLACK,
        "{what}: answered after {took:?}, timeout {TIMEOUT:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_insert_answers_unavailable_in_time_and_lands_once_or_never() {
    let Some((proxy, store, url, prefix)) = proxied().await else {
        return;
    };
    let stream = StreamId::parse("late-1").unwrap();
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event("first")])
        .await
        .unwrap();

    // The insert of the next append is held in the proxy: the server never sees it in time.
    let mark = uuid::Uuid::new_v4().simple().to_string();
    let hold = proxy.hold_next(mark.as_bytes());
    let events = vec![event(&mark)];
    let held = {
        let (store, stream, events) = (store.clone(), stream.clone(), events.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = store
                .append(&stream, ExpectedVersion::Exact(Version(0)), events)
                .await;
            (answer, started.elapsed())
        })
    };
    tokio::time::timeout(Duration::from_secs(10), hold.matched())
        .await
        .expect("the insert reached the proxy");
    let (answer, took) = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("the held append answers (it waited for the server without a bound)")
        .unwrap();
    assert!(
        matches!(answer, Err(Error::Unavailable { .. })),
        "{answer:?}"
    );
    assert!(took <= TIMEOUT + SLACK, "answered after {took:?}");

    // The insert reaches the server after the call gave up.
    hold.release();
    tokio::time::sleep(TIMEOUT).await;

    // The re-send answers as a retry, or stores the batch: either way at version 1.
    let resent = store
        .append(&stream, ExpectedVersion::Exact(Version(0)), events.clone())
        .await
        .expect("the re-send");
    assert_eq!(resent.first_version, Version(1));

    // The marked commit is stored exactly once, and every reader sees its event once.
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    let commits: Vec<Document> = db
        .collection::<Document>(&format!("{prefix}_commits"))
        .find(doc! { "stream": "late-1" })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(commits.len(), 2, "{commits:?}");
    let in_stream: Vec<_> = store
        .read_stream(&stream, ReadOptions::default())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        in_stream.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![Version(0), Version(1)]
    );
    assert_eq!(in_stream[1].event_id, events[0].event_id);
    for selector in [
        Selector::Category(Category::new("late").unwrap()),
        Selector::All,
    ] {
        let seen = store
            .replay_to_vec(selector.clone(), Start::Beginning)
            .await
            .unwrap();
        let ids: Vec<_> = seen.iter().map(|e| e.event_id).collect();
        assert_eq!(
            ids,
            vec![in_stream[0].event_id, events[0].event_id],
            "{selector:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_network_stalls_every_call_answers_unavailable_in_time() {
    let Some((proxy, store, _, _)) = proxied().await else {
        return;
    };
    let stream = StreamId::parse("stall-1").unwrap();
    let category = Category::new("stall").unwrap();
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event("first")])
        .await
        .unwrap();

    proxy.stall();
    tokio::join!(
        answers_unavailable(
            "append",
            store.append(&stream, ExpectedVersion::Any, vec![event("stalled")])
        ),
        answers_unavailable("stream_version", store.stream_version(&stream)),
        answers_unavailable(
            "read_stream",
            next(store.read_stream(&stream, ReadOptions::default()))
        ),
        answers_unavailable("list_categories", store.list_categories()),
        answers_unavailable("list_streams", next(store.list_streams(&category))),
        answers_unavailable(
            "subscribe",
            next(store.subscribe(
                Selector::Category(category.clone()),
                Start::Beginning,
                SubscriptionMode::HotCold
            ))
        ),
        answers_unavailable("health", store.health()),
    );

    // Afterwards the same store works again.
    proxy.resume();
    let appended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match store
                .append(&stream, ExpectedVersion::Any, vec![event("after")])
                .await
            {
                Ok(r) => return r,
                Err(Error::Unavailable { .. }) => tokio::time::sleep(TIMEOUT).await,
                Err(e) => panic!("after the stall: {e}"),
            }
        }
    })
    .await
    .expect("the store works again after the stall");
    assert!(appended.first_version >= Version(1));
}
