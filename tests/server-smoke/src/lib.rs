//! Helpers of the server smoke tests: turning the `PHOTON_TEST_*_URL` values into what the client
//! crates expect. Gating on those variables is `photon_conformance::server_url`, shared with the
//! conformance suite.
//!
//! Start the servers with `scripts/servers up`, then `eval "$(scripts/servers env)"` and run
//! `cargo test -p server-smoke`. A test whose variable is unset is skipped, unless the backend is
//! named in `PHOTON_TEST_REQUIRE` (a comma-separated list such as `kafka,cassandra,mongo`).

/// Strips `scheme://` and anything from the first `/` on: `kafka://h:9092` gives `h:9092`,
/// `cassandra://h:9042/ks` gives `h:9042`.
pub fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

/// The Kafka bootstrap servers of a `kafka://host:port[,host:port]` URL.
pub fn kafka_bootstrap(url: &str) -> &str {
    host_port(url)
}

/// The Cassandra contact point (`host:port`) of a `cassandra://host:port/keyspace` URL.
pub fn cassandra_contact_point(url: &str) -> &str {
    host_port(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(kafka_bootstrap("kafka://127.0.0.1:9092"), "127.0.0.1:9092");
        assert_eq!(kafka_bootstrap("kafka://a:1,b:2/"), "a:1,b:2");
        assert_eq!(kafka_bootstrap("127.0.0.1:9092"), "127.0.0.1:9092");
        assert_eq!(
            cassandra_contact_point("cassandra://127.0.0.1:9042/photon_test"),
            "127.0.0.1:9042"
        );
        assert_eq!(cassandra_contact_point("cassandra://h:9042"), "h:9042");
    }
}
