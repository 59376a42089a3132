//! The shared conformance suite against a real Kafka broker (`PHOTON_TEST_KAFKA_URL`).

use photon_conformance::{conformance_suite, server_url, Harness};

#[path = "support/harness.rs"]
mod harness;

async fn harness() -> Option<Harness> {
    let url = server_url("kafka", "PHOTON_TEST_KAFKA_URL")?;
    // Every case writes fresh categories (new topics); 3 partitions keep topic creation quick
    // while still spreading a category over several partitions.
    let url = format!(
        "{url}{}partitions=3",
        if url.contains('?') { "&" } else { "?" }
    );
    Some(harness::kafka_harness(url))
}

conformance_suite!(harness);
