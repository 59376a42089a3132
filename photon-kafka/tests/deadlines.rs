//! What callers that give up, slow consumers and outages get, against a real broker
//! (`PHOTON_TEST_KAFKA_URL`; the FAULTS listener variables of `scripts/servers env` for the tests
//! that stall the network): a slow consumer is never failed for being slow, a dropped append is
//! sent at once or never, each append has its own deadline from the call, and the queue of
//! appends waiting for a partition is bounded.
//!
//! Tests that put a fault proxy on the broker's advertised fault port hold [`PROXY_PORT`]: only
//! one proxy can listen there.

use std::time::{Duration, Instant};

use futures::StreamExt;
use photon_api::{
    Category, Error, EventData, EventStore, EventStoreExt, ExpectedVersion, ReadOptions, Selector,
    Start, StreamId, SubscriptionItem, SubscriptionMode, Uuid,
};
use photon_conformance::server_url;
use photon_faults::proxy::FaultProxy;
use photon_kafka::KafkaStore;

/// One proxy at a time on the advertised fault port.
static PROXY_PORT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The request timeout of these tests' stores: deadlines are three of these from the call.
const TIMEOUT_MS: u64 = 1000;
const TIMEOUT: Duration = Duration::from_millis(TIMEOUT_MS);

fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

fn fresh_prefix() -> String {
    format!("d{}", &Uuid::new_v4().simple().to_string()[..12])
}

fn event(n: u64) -> EventData {
    EventData::json("Numbered", &serde_json::json!({ "n": n })).unwrap()
}

/// A store with short timeouts on fresh topics, straight to the broker.
async fn store(url: &str, prefix: &str) -> KafkaStore {
    let url = with_options(
        url,
        &format!("prefix={prefix}&partitions=3&timeout_ms={TIMEOUT_MS}"),
    );
    KafkaStore::from_url(&url).await.unwrap()
}

/// The broker's fault listener and the advertised address a proxy must own, when set.
fn fault_listener() -> Option<(String, String)> {
    let listener = std::env::var("PHOTON_TEST_KAFKA_FAULTS_LISTENER").ok();
    let advertised = std::env::var("PHOTON_TEST_KAFKA_FAULTS_ADVERTISED").ok();
    match (listener, advertised) {
        (Some(l), Some(a)) => Some((l, a)),
        _ => {
            println!(
                "skipped: set PHOTON_TEST_KAFKA_FAULTS_LISTENER and PHOTON_TEST_KAFKA_FAULTS_ADVERTISED (scripts/servers env)"
            );
            None
        }
    }
}

async fn stored_ids(store: &KafkaStore, stream: &StreamId) -> Vec<Uuid> {
    store
        .read_to_vec(stream, ReadOptions::forwards())
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_id)
        .collect()
}

/// Issue 14 item 1: a Cold or HotCold consumer that takes longer than three timeouts over one
/// event still gets every event, without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_never_failed_for_being_slow() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = store(&url, &prefix).await;
    let stream = StreamId::parse("slow-1").unwrap();
    let mut ids = Vec::new();
    for n in 0..5 {
        let e = event(n);
        ids.push(e.event_id);
        store
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
    for mode in [SubscriptionMode::Cold, SubscriptionMode::HotCold] {
        let mut sub = store.subscribe(
            Selector::Category(Category::new("slow").unwrap()),
            Start::Beginning,
            mode,
        );
        let mut got = Vec::new();
        while got.len() < ids.len() {
            match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
                Ok(Some(Ok(SubscriptionItem::Event(e)))) => {
                    got.push(e.event_id);
                    if got.len() == 1 {
                        // The application's own time: longer than the replay's patience.
                        tokio::time::sleep(TIMEOUT * 3 + Duration::from_secs(1)).await;
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("{mode:?}: failed after {} events: {e}", got.len()),
                Ok(None) => break,
                Err(_) => panic!("{mode:?}: nothing for 30 s after {} events", got.len()),
            }
        }
        assert_eq!(got, ids, "{mode:?}");
    }
}

/// Issue 14 item 2: appends whose callers drop them after a few milliseconds are stored at once
/// or never: none lands later, behind a later append of the same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_append_is_stored_at_once_or_never() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = store(&url, &prefix).await;
    let stream = StreamId::parse("drop-1").unwrap();
    // Warm: the topic and the partition's producer exist, so the burst is only commits.
    store
        .append(&stream, ExpectedVersion::Any, vec![event(0)])
        .await
        .unwrap();
    // One stream: each append of the burst needs a transaction of its own, many more than one
    // holder's turn, and every caller gives up long before the last of them.
    let calls = (1..=24).map(|n| {
        let (store, stream) = (store.clone(), stream.clone());
        async move {
            let e = event(n);
            let id = e.event_id;
            let patience = Duration::from_millis(2 + n % 8);
            let answered = tokio::time::timeout(
                patience,
                store.append(&stream, ExpectedVersion::Any, vec![e]),
            )
            .await;
            (id, answered.is_ok())
        }
    });
    let results = futures::future::join_all(calls).await;
    let dropped: Vec<Uuid> = results
        .iter()
        .filter(|(_, answered)| !answered)
        .map(|(id, _)| *id)
        .collect();
    assert!(
        !dropped.is_empty(),
        "no caller gave up; the test proves nothing"
    );
    // Past every deadline.
    tokio::time::sleep(TIMEOUT * 4).await;
    let first = stored_ids(&store, &stream).await;
    // A later append of the same process, to the same stream: nothing dropped may ride along.
    let later = event(100);
    let later_id = later.event_id;
    store
        .append(&stream, ExpectedVersion::Any, vec![later])
        .await
        .unwrap();
    tokio::time::sleep(TIMEOUT).await;
    let second = stored_ids(&store, &stream).await;
    let late: Vec<&Uuid> = second
        .iter()
        .filter(|id| dropped.contains(id) && !first.contains(id))
        .collect();
    assert!(
        late.is_empty(),
        "{} of {} dropped appends were stored after their deadline, behind later appends",
        late.len(),
        dropped.len()
    );
    let mut expected = first.clone();
    expected.push(later_id);
    assert_eq!(second, expected);
}

/// Issue 14 items 2 and 6: while the broker does not answer, every append answers `Unavailable`
/// within its own deadline (three timeouts from the call, plus one for the backstop), not the
/// k-th queued after k deadlines; a full queue answers at once; nothing of them is stored later;
/// and the same store works again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_each_append_keeps_its_own_deadline_and_the_queue_is_bounded() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let Some((listener, advertised)) = fault_listener() else {
        return;
    };
    let _port = PROXY_PORT.lock().await;
    let proxy = FaultProxy::start(&advertised, &listener).await.unwrap();
    let prefix = fresh_prefix();
    let direct = store(&url, &prefix).await;
    let proxied_url = format!("kafka://{advertised}");
    let store = store(&proxied_url, &prefix).await;
    let stream = StreamId::parse("outage-1").unwrap();
    store
        .append(&stream, ExpectedVersion::Any, vec![event(0)])
        .await
        .unwrap();

    proxy.stall();
    // One stream, so each append is a group of its own, one after the other; many more than
    // the queue holds.
    let started = Instant::now();
    let calls = (1..=1100).map(|n| {
        let (store, stream) = (store.clone(), stream.clone());
        async move {
            let e = event(n);
            let id = e.event_id;
            let result = store.append(&stream, ExpectedVersion::Any, vec![e]).await;
            (id, result, started.elapsed())
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(calls))
        .await
        .expect("every append answered within 30 s");
    proxy.resume();

    let bound = TIMEOUT * 4 + Duration::from_millis(500);
    let mut refused_at_once = 0;
    for (n, (_, result, took)) in results.iter().enumerate() {
        match result {
            Err(e @ Error::Unavailable { .. }) => {
                if e.to_string().contains("was not queued") {
                    refused_at_once += 1;
                    assert!(
                        *took < TIMEOUT,
                        "append {n}: a full queue answered after {took:?}"
                    );
                }
            }
            other => panic!("append {n} during the stall: {other:?}"),
        }
        assert!(
            *took <= bound,
            "append {n} answered after {took:?} (bound {bound:?})"
        );
    }
    // 1024 queued, and one taken out of the queue by the partition's holder.
    assert!(
        refused_at_once >= 1100 - 1025,
        "only {refused_at_once} appends were refused by a full queue"
    );

    // After the stall: the same store works again, and nothing of the stalled appends was
    // stored (none committed before its deadline, so none may land later).
    let after = event(2000);
    let after_id = after.event_id;
    let mut stored_after = None;
    let retry_until = Instant::now() + Duration::from_secs(30);
    while stored_after.is_none() && Instant::now() < retry_until {
        match store
            .append(&stream, ExpectedVersion::Any, vec![after.clone()])
            .await
        {
            Ok(r) => stored_after = Some(r),
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("after the stall: {e}"),
        }
    }
    stored_after.expect("the store works again after the stall");
    tokio::time::sleep(TIMEOUT * 6).await;
    let stored = stored_ids(&direct, &stream).await;
    let stalled: Vec<Uuid> = results.iter().map(|(id, _, _)| *id).collect();
    let landed = stored.iter().filter(|id| stalled.contains(id)).count();
    assert_eq!(
        landed, 0,
        "appends answered during the stall were stored later"
    );
    assert_eq!(stored.last(), Some(&after_id));
}
