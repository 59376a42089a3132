//! Helpers the real-server test files of this crate share (each uses some of them).
#![allow(dead_code)]

use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use photon_api::{
    Category, Error, EventData, EventStore, RecordedEvent, Selector, Start, SubscriptionItem,
    SubscriptionMode, Uuid,
};
use photon_cassandra::{CassandraConfig, CassandraStore};
use photon_faults::proxy::FaultProxy;
use scylla::client::session::Session;

/// A subscription's items.
pub(crate) type Sub = BoxStream<'static, Result<SubscriptionItem, Error>>;

/// `url` with `options` appended to its query.
pub(crate) fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

/// A fresh name: `prefix` and 12 random hex digits.
pub(crate) fn fresh(prefix: &str) -> String {
    format!("{prefix}{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// An event numbered `n`, with `mark` in its payload (for the fault proxy to find).
pub(crate) fn numbered(n: u64, mark: &str) -> EventData {
    EventData::json("Numbered", &serde_json::json!({ "n": n, "mark": mark })).unwrap()
}

/// The number of an event made by `numbered` (or with an `n` field).
pub(crate) fn number(e: &RecordedEvent) -> u64 {
    e.decode::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

/// The numbers of `events` (see `number`).
pub(crate) fn numbers(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(number).collect()
}

/// The next event of `sub` (past any `CaughtUp`), or None when none comes within `wait`.
pub(crate) async fn next_event(sub: &mut Sub, wait: Duration) -> Option<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(SubscriptionItem::Event(e)))) => return Some(e),
            Ok(Some(Ok(SubscriptionItem::CaughtUp))) => continue,
            Ok(other) => panic!("want an event, got {other:?}"),
        }
    }
}

/// A live HotCold subscriber of `category`, an empty one, caught up.
pub(crate) async fn live(store: &CassandraStore, category: &Category) -> Sub {
    let mut sub = store.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
        Ok(Some(Ok(SubscriptionItem::CaughtUp))) => sub,
        other => panic!("want CaughtUp of an empty category, got {other:?}"),
    }
}

/// A plain driver session, connected as the store of `url` connects.
pub(crate) async fn session(url: &str) -> Session {
    let config = CassandraConfig::from_url(url).unwrap();
    photon_cassandra::session_builder(&config)
        .unwrap()
        .build()
        .await
        .unwrap()
}

/// A fault proxy in front of the first contact point of `url`, and `url` through it.
pub(crate) async fn proxied(url: &str) -> (FaultProxy, String) {
    let config = CassandraConfig::from_url(url).unwrap();
    let upstream = config.contact_points[0].clone();
    let proxy = FaultProxy::start("127.0.0.1:0", &upstream).await.unwrap();
    let proxied_url = url.replacen(&upstream, &proxy.local_addr().to_string(), 1);
    assert_ne!(proxied_url, url, "the URL goes through the proxy");
    (proxy, proxied_url)
}

/// The conformance suite's options: a short settle delay keeps the many Cold replays of the
/// suite quick on one local node, where clocks cannot disagree; a small bucket size makes
/// streams span buckets. tests/conformance.rs (open node) and tests/secured_conformance.rs (TLS
/// and credentials) both use them; tests/secured.rs shares the secured keyspace and so its
/// layout settings.
pub(crate) const SUITE_OPTIONS: &str =
    "settle_ms=250&timeout_ms=2000&repair_after_ms=5000&bucket_size=16";

/// The conformance harness over stores built from `url`, with an unreachable store beside it.
pub(crate) fn suite_harness(url: String) -> photon_conformance::Harness {
    use std::sync::Arc;
    let unreachable = "cassandra://127.0.0.1:1/photon_test?timeout_ms=1500";
    photon_conformance::Harness::new("cassandra", move || {
        let url = url.clone();
        async move {
            let store: Arc<dyn EventStore> =
                Arc::new(CassandraStore::from_url(&url).await.expect("builds"));
            store
        }
    })
    .with_patience(Duration::from_secs(60))
    .with_unreachable(move || async move {
        let store: Arc<dyn EventStore> =
            Arc::new(CassandraStore::from_url(unreachable).await.expect("builds"));
        store
    })
}
