//! Credentials never leak (issue 19, part 3): the password of a `cassandra://` URL is absent
//! from the `Debug` and `Display` of the URL, the config and the store, from every error of a
//! connection that fails (the whole `source()` chain), and from every tracing event and span
//! (ours and the driver's) written meanwhile, at every level.
//!
//! Here the failures are an unreachable port, a CA file that does not load and, with
//! `PHOTON_TEST_CASSANDRA_URL` set, TLS against the plaintext node (the handshake fails); and a
//! connection with credentials the open node ignores. The refusals of a node that demands
//! credentials and TLS (wrong password, unknown user, untrusted certificate, missing
//! permission) are checked for the same leaks in `tests/secured.rs`.

use std::time::Duration;

use photon_api::url::{redact, StoreUrl};
use photon_api::{Error, EventData, EventStore, ExpectedVersion, StreamId, Uuid};
use photon_cassandra::{CassandraConfig, CassandraStore, SCHEMES};
use photon_conformance::{capture, server_url};

/// A distinctive password, and `cassandra://` URLs carrying it.
struct Secret(String);

impl Secret {
    fn new() -> Self {
        Self(format!("s3cr3t-{}", Uuid::new_v4().simple()))
    }

    /// `cassandra://ann:<secret>@<hosts>/<path>?timeout_ms=1000<options>`.
    fn url(&self, hosts: &str, path: &str, options: &str) -> String {
        format!(
            "cassandra://ann:{}@{hosts}/{path}?timeout_ms=1000{options}",
            self.0
        )
    }

    fn assert_absent(&self, what: &str, shown: &str) {
        assert!(
            !shown.contains(&self.0),
            "{what} shows the password: {shown}"
        );
    }

    /// An error's Display and Debug and those of every error in its `source()` chain.
    fn assert_absent_from_error(&self, what: &str, e: &(dyn std::error::Error + 'static)) {
        let mut next = Some(e);
        let mut depth = 0;
        while let Some(e) = next {
            self.assert_absent(&format!("{what} (source {depth}, Display)"), &e.to_string());
            self.assert_absent(
                &format!("{what} (source {depth}, Debug)"),
                &format!("{e:?}"),
            );
            next = e.source();
            depth += 1;
        }
    }

    /// Nothing captured so far (by any test of this binary) holds the password.
    fn assert_absent_from_logs(&self) {
        for line in capture::lines() {
            self.assert_absent("a captured tracing line", &line);
        }
    }
}

/// One append to a fresh stream: what first connects a store.
async fn append(store: &CassandraStore) -> Result<(), Error> {
    let stream = StreamId::parse(format!("account-{}", Uuid::new_v4().simple())).unwrap();
    let event = EventData::json("Opened", &serde_json::json!({ "n": 1 })).unwrap();
    tokio::time::timeout(
        Duration::from_secs(15),
        store.append(&stream, ExpectedVersion::Any, vec![event]),
    )
    .await
    .expect("the append answers within its deadline")
    .map(|_| ())
}

#[test]
fn debug_and_display_of_urls_and_configs_hide_the_password() {
    let s = Secret::new();
    let raw = s.url("127.0.0.1:1,[::1]:2", "ks", "&tls=true&local_dc=dc1");
    let url = StoreUrl::parse(&raw, "Cassandra URL", SCHEMES).unwrap();
    s.assert_absent("StoreUrl Display", &url.to_string());
    s.assert_absent("StoreUrl Debug", &format!("{url:?}"));
    s.assert_absent("redact", &redact(&raw));
    let config = CassandraConfig::from_url(&raw).unwrap();
    s.assert_absent("CassandraConfig Debug", &format!("{config:?}"));
    s.assert_absent("CassandraConfig Debug, pretty", &format!("{config:#?}"));
    assert!(format!("{config:?}").contains("ann:***"), "{config:?}");
    let store = CassandraStore::new(config);
    s.assert_absent("CassandraStore Debug", &format!("{store:?}"));
    for bad in [
        format!("cassandra://ann:{}@127.0.0.1:bad/ks", s.0),
        s.url("127.0.0.1:1", "ks", "&colour=blue"),
        s.url("127.0.0.1:1", "ks", "&timeout_ms=2"),
        s.url("127.0.0.1:1", "ks", "&tls=false&tls_ca=/ca.pem"),
    ] {
        let e = CassandraConfig::from_url(&bad).unwrap_err();
        s.assert_absent_from_error(&format!("from_url({})", redact(&bad)), &e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connections_hide_the_password() {
    capture::install();
    let s = Secret::new();
    // Nothing listens on port 1.
    let store = CassandraStore::from_url(&s.url("127.0.0.1:1", "ks", ""))
        .await
        .unwrap();
    let e = append(&store).await.expect_err("nothing listens on port 1");
    s.assert_absent_from_error("append to an unreachable node", &e);
    // A CA file that does not load: refused before any connection, naming the settings.
    let missing_ca = format!("&tls_ca=/nonexistent/{}.pem", Uuid::new_v4());
    let store = CassandraStore::from_url(&s.url("127.0.0.1:1", "ks", &missing_ca))
        .await
        .unwrap();
    let e = append(&store)
        .await
        .expect_err("the CA file does not exist");
    assert!(matches!(e, Error::InvalidInput { .. }), "{e:?}");
    s.assert_absent_from_error("append with a CA file that does not load", &e);
    s.assert_absent_from_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_the_node_hide_the_password() {
    let Some(node) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    capture::install();
    let s = Secret::new();
    let node = CassandraConfig::from_url(&node).unwrap();
    let hosts = node.contact_points.join(",");
    // TLS against the plaintext node: the handshake fails.
    let store = CassandraStore::from_url(&s.url(&hosts, &node.keyspace, "&tls=true"))
        .await
        .unwrap();
    let e = append(&store)
        .await
        .expect_err("a plaintext node cannot complete a TLS handshake");
    s.assert_absent_from_error("append over TLS to a plaintext node", &e);
    // The open node ignores the credentials: the driver meets them only when a node asks for
    // authentication, so this shows what it logs around a working connection.
    // The bucket size of the test keyspace, which the other tests created.
    let store = CassandraStore::from_url(&s.url(&hosts, &node.keyspace, "&bucket_size=16"))
        .await
        .unwrap();
    append(&store)
        .await
        .expect("the open node ignores credentials");
    s.assert_absent_from_logs();
    let lines = capture::lines();
    assert!(
        lines.iter().any(|l| l.contains("scylla")),
        "the driver's tracing was captured (the check above saw it): {lines:?}"
    );
}
