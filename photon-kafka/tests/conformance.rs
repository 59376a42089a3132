//! The shared conformance suite against a real Kafka broker (`PHOTON_TEST_KAFKA_URL`).

use std::sync::Arc;

use photon_api::EventStore;
use photon_conformance::{conformance_suite, server_url, Harness};
use photon_kafka::KafkaStore;

async fn harness() -> Option<Harness> {
    let url = server_url("kafka", "PHOTON_TEST_KAFKA_URL")?;
    // Every case writes fresh categories (new topics); 3 partitions keep topic creation quick
    // while still spreading a category over several partitions.
    let url = format!(
        "{url}{}partitions=3",
        if url.contains('?') { "&" } else { "?" }
    );
    let unreachable = "kafka://127.0.0.1:1?timeout_ms=1500";
    Some(
        Harness::new("kafka", move || {
            let url = url.clone();
            async move {
                let store: Arc<dyn EventStore> =
                    Arc::new(KafkaStore::from_url(&url).await.expect("connects"));
                store
            }
        })
        .with_patience(std::time::Duration::from_secs(60))
        .with_unreachable(move || async move {
            let store: Arc<dyn EventStore> =
                Arc::new(KafkaStore::from_url(unreachable).await.expect("builds"));
            store
        }),
    )
}

conformance_suite!(harness);
