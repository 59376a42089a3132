//! What the test files that run the conformance suite share (`conformance.rs` over the plain
//! server, `secured.rs` over TLS): the harness for one server URL.

use std::sync::Arc;
use std::time::Duration;

use photon_api::EventStore;
use photon_conformance::Harness;
use photon_mongo::MongoStore;

/// The conformance harness for the server at `url`; `unreachable` is a URL nothing answers on.
///
/// Each case gets collections of its own (a fresh prefix): FerretDB answers these filters by
/// scanning the collection, so one shared collection would make the suite slower with every
/// case. A short gap timeout keeps cases quick when a writer gives a position up.
pub(crate) fn harness(url: &str, unreachable: &str) -> Harness {
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let url = format!(
        "{url}{}photon_gap_timeout_ms=2000&photon_prefix={prefix}",
        if url.contains('?') { "&" } else { "?" }
    );
    let unreachable = unreachable.to_owned();
    Harness::new("mongo", move || {
        let url = url.clone();
        async move {
            let store: Arc<dyn EventStore> =
                Arc::new(MongoStore::from_url(&url).await.expect("connects"));
            store
        }
    })
    // FerretDB serves a few cases at a time well.
    .with_max_parallel_cases(4)
    .with_patience(Duration::from_secs(60))
    .with_unreachable(move || {
        let unreachable = unreachable.clone();
        async move {
            let store: Arc<dyn EventStore> =
                Arc::new(MongoStore::from_url(&unreachable).await.expect("builds"));
            store
        }
    })
}
