//! The shared conformance suite against a real MongoDB-wire server (`PHOTON_TEST_MONGO_URL`).

mod common;

use photon_conformance::{conformance_suite, server_url, Harness};

async fn harness() -> Option<Harness> {
    let url = server_url("mongo", "PHOTON_TEST_MONGO_URL")?;
    let unreachable =
        "mongodb://127.0.0.1:1/photon_test?directConnection=true&photon_timeout_ms=1500";
    Some(common::harness(&url, unreachable))
}

conformance_suite!(harness);
