//! The shared conformance suite against a real Cassandra or ScyllaDB (`PHOTON_TEST_CASSANDRA_URL`).

mod common;

use photon_conformance::{conformance_suite, server_url, Harness};

async fn harness() -> Option<Harness> {
    let url = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL")?;
    Some(common::suite_harness(common::with_options(
        &url,
        common::SUITE_OPTIONS,
    )))
}

conformance_suite!(harness);
