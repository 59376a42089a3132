//! The shared conformance suite over TLS with credentials, against the secured Cassandra node
//! of `scripts/servers` (issue 19): the writer role, with CREATE, SELECT and MODIFY on its
//! keyspace and nothing elsewhere (the grants the README documents), on a connection that
//! verifies the node's certificate. The refusals are
//! `tests/secured.rs`.

mod common;

use photon_conformance::{conformance_suite, server_url, Harness};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set although PHOTON_TEST_CASSANDRA_SECURE_ADDR is: eval \"$(scripts/servers env)\"")
    })
}

async fn harness() -> Option<Harness> {
    let addr = server_url("cassandra", "PHOTON_TEST_CASSANDRA_SECURE_ADDR")?;
    let url = format!(
        "cassandra://{}:{}@{addr}/{}?tls=true&tls_ca={}&{}",
        var("PHOTON_TEST_CASSANDRA_SECURE_WRITER"),
        var("PHOTON_TEST_CASSANDRA_SECURE_WRITER_PASSWORD"),
        var("PHOTON_TEST_CASSANDRA_SECURE_KEYSPACE"),
        var("PHOTON_TEST_TLS_CA"),
        common::SUITE_OPTIONS,
    );
    Some(common::suite_harness(url))
}

conformance_suite!(harness);
