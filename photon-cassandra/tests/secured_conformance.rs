//! The shared conformance suite over TLS with credentials, against the secured Cassandra node
//! of `scripts/servers` (issue 19): the writer role, with CREATE, SELECT and MODIFY on its
//! keyspace and nothing elsewhere (the grants the README documents), on a connection that
//! verifies the node's certificate. The refusals are
//! `tests/secured.rs`.

use std::sync::Arc;

use photon_api::EventStore;
use photon_cassandra::CassandraStore;
use photon_conformance::{conformance_suite, server_url, Harness};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set although PHOTON_TEST_CASSANDRA_SECURE_ADDR is: eval \"$(scripts/servers env)\"")
    })
}

async fn harness() -> Option<Harness> {
    let addr = server_url("cassandra", "PHOTON_TEST_CASSANDRA_SECURE_ADDR")?;
    // The options of tests/conformance.rs (a short settle delay for the many Cold replays of
    // one local node, streams spanning buckets); tests/secured.rs shares the keyspace and so
    // its layout settings.
    let url = format!(
        "cassandra://{}:{}@{addr}/{}?tls=true&tls_ca={}&timeout_ms=2000&settle_ms=250&repair_after_ms=5000&bucket_size=16",
        var("PHOTON_TEST_CASSANDRA_SECURE_WRITER"),
        var("PHOTON_TEST_CASSANDRA_SECURE_WRITER_PASSWORD"),
        var("PHOTON_TEST_CASSANDRA_SECURE_KEYSPACE"),
        var("PHOTON_TEST_TLS_CA"),
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
