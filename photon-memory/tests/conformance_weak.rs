//! The shared conformance suite on a memory store that plays Kafka's partitioned order and
//! Cassandra's settle delay (`partitions`, `delivery_delay_ms`): every guarantee must still hold
//! in its weaker form, which the suite reads from `Capabilities::total_order`.
//!
//! The answer faults (`unavailable_after`, `unavailable_before`, `subscription_drop`) are left
//! out here by design: the suite's cases assert that an append or a subscription succeeds, and
//! those options make a share of them fail with `Unavailable` on purpose. `tests/faults.rs`
//! checks them instead.

use std::sync::Arc;

use photon_api::EventStore;
use photon_conformance::{conformance_suite, Harness};
use photon_memory::MemoryStore;

async fn harness() -> Option<Harness> {
    let store = MemoryStore::from_url(
        "memory://?max_event_size=65536&partitions=4&delivery_delay_ms=20&seed=11",
    )
    .expect("a valid URL");
    assert!(!store.capabilities().total_order);
    Some(Harness::new("memory", move || {
        let client: Arc<dyn EventStore> = Arc::new(store.clone());
        async move { client }
    }))
}

conformance_suite!(harness);
