//! The shared conformance suite on the in-memory backend.

use std::sync::Arc;

use photon_api::EventStore;
use photon_conformance::{conformance_suite, Harness};
use photon_memory::MemoryStore;

async fn harness() -> Option<Harness> {
    // One store; each client is a clone, i.e. a separate handle on the same data.
    let store = MemoryStore::builder().max_event_size(64 * 1024).build();
    Some(Harness::new("memory", move || {
        let client: Arc<dyn EventStore> = Arc::new(store.clone());
        async move { client }
    }))
}

conformance_suite!(harness);
