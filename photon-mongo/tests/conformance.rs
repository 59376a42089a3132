//! The shared conformance suite against a real MongoDB-wire server (`PHOTON_TEST_MONGO_URL`).

use std::sync::Arc;

use photon_api::EventStore;
use photon_conformance::{conformance_suite, server_url, Harness};
use photon_mongo::MongoStore;

async fn harness() -> Option<Harness> {
    let url = server_url("mongo", "PHOTON_TEST_MONGO_URL")?;
    // Each case gets collections of its own (a fresh prefix): FerretDB answers these
    // filters by scanning the collection, so one shared collection would make the suite slower
    // with every case. A short gap timeout keeps cases quick when a writer gives a position up.
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let url = format!(
        "{url}{}photon_gap_timeout_ms=2000&photon_prefix={prefix}",
        if url.contains('?') { "&" } else { "?" }
    );
    let unreachable =
        "mongodb://127.0.0.1:1/photon_test?directConnection=true&photon_timeout_ms=1500";
    Some(
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
        .with_patience(std::time::Duration::from_secs(60))
        .with_unreachable(move || async move {
            let store: Arc<dyn EventStore> =
                Arc::new(MongoStore::from_url(unreachable).await.expect("builds"));
            store
        }),
    )
}

conformance_suite!(harness);
