//! The shared conformance suite against a real Cassandra or ScyllaDB (`PHOTON_TEST_CASSANDRA_URL`).

use std::sync::Arc;

use photon_api::EventStore;
use photon_cassandra::CassandraStore;
use photon_conformance::{conformance_suite, server_url, Harness};

async fn harness() -> Option<Harness> {
    let url = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL")?;
    // A short settle delay keeps the many Cold replays of the suite quick on one local node,
    // where clocks cannot disagree; a small bucket size makes streams span buckets.
    let url = format!(
        "{url}{}settle_ms=250&timeout_ms=2000&repair_after_ms=5000&bucket_size=16",
        if url.contains('?') { "&" } else { "?" }
    );
    let unreachable = "cassandra://127.0.0.1:1/photon_test?timeout_ms=1500";
    Some(
        Harness::new("cassandra", move || {
            let url = url.clone();
            async move {
                let store: Arc<dyn EventStore> =
                    Arc::new(CassandraStore::from_url(&url).await.expect("builds"));
                store
            }
        })
        .with_patience(std::time::Duration::from_secs(60))
        .with_unreachable(move || async move {
            let store: Arc<dyn EventStore> =
                Arc::new(CassandraStore::from_url(unreachable).await.expect("builds"));
            store
        }),
    )
}

conformance_suite!(harness);
