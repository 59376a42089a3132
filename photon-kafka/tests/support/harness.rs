//! The conformance harness of a Kafka store at a URL, for tests/conformance.rs (the open
//! listener) and tests/secured.rs (SASL_SSL). Included by path
//! (`#[path = "support/harness.rs"] mod harness;`).

use std::sync::Arc;

use photon_api::EventStore;
use photon_conformance::Harness;
use photon_kafka::KafkaStore;

/// Stores of `url` for the cases, and one of an unreachable broker for the cases that need it.
pub(crate) fn kafka_harness(url: String) -> Harness {
    let unreachable = "kafka://127.0.0.1:1?timeout_ms=1500";
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
    })
}
