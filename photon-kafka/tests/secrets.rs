//! Credentials never leak (issue 19, part 3): a password, a SASL secret or a key password given in
//! a `kafka://` URL is absent from the `Debug` and `Display` of the URL, the config, the store
//! and librdkafka's settings, from every error of a connection that fails (the whole `source()`
//! chain), and from every tracing event and every `log` record (where librdkafka's own lines go)
//! written meanwhile, at every level.
//!
//! The failures here are an unreachable port and, with `PHOTON_TEST_KAFKA_URL` set, SASL_SSL
//! against the plaintext broker (the TLS handshake fails); the refused logins, certificate and
//! permissions of a broker that demands SCRAM over TLS are in tests/secured.rs, with the same checks.

use std::time::Duration;

use photon_api::url::{redact, StoreUrl};
use photon_api::{Error, EventData, EventStore, ExpectedVersion, StreamId, Uuid};
use photon_conformance::server_url;
use photon_kafka::{KafkaConfig, KafkaStore, SCHEMES};

/// Distinct secrets for one test: a password, a SASL password, a key password, an OAuth secret.
struct Secrets {
    password: String,
    sasl: String,
    key: String,
    oauth: String,
}

impl Secrets {
    fn new() -> Self {
        let fresh = |what: &str| format!("s3cr3t-{what}-{}", Uuid::new_v4().simple());
        Self {
            password: fresh("pw"),
            sasl: fresh("sasl"),
            key: fresh("key"),
            oauth: fresh("oauth"),
        }
    }

    fn all(&self) -> [&str; 4] {
        [&self.password, &self.sasl, &self.key, &self.oauth]
    }

    /// Panics when `shown` (named `what`) holds any of the secrets.
    fn assert_absent(&self, what: &str, shown: &str) {
        for secret in self.all() {
            assert!(!shown.contains(secret), "{what} shows {secret}: {shown}");
        }
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

    /// Nothing captured so far (by any test of this binary) holds a secret.
    fn assert_absent_from_logs(&self) {
        let lines = capture::lines();
        for line in &lines {
            self.assert_absent("a captured log line", line);
        }
    }
}

/// A URL naming `hosts` with a secret of each kind this backend passes on: the password of
/// `user:password@` (which becomes `sasl.password`), `ssl_key_password`, and two `rdkafka.`
/// settings (a keystore password and the OAuth bearer config). The `sasl_password` option is
/// checked on its own, since the URL's password already sets `sasl.password`.
fn url_with_secrets(s: &Secrets, hosts: &str, options: &str) -> String {
    format!(
        "kafka://alice:{}@{hosts}?ssl_key_password={}&rdkafka.ssl.keystore.password={}&rdkafka.sasl.oauthbearer.config=secret%3D{}&timeout_ms=1000{options}",
        s.password, s.key, s.sasl, s.oauth
    )
}

fn fresh_stream() -> StreamId {
    StreamId::parse(format!("account-{}", Uuid::new_v4().simple())).unwrap()
}

/// One append to `stream`: what first reaches the brokers.
async fn append(store: &KafkaStore, stream: &StreamId) -> Result<(), Error> {
    let event = EventData::json("Opened", &serde_json::json!({ "n": 1 })).unwrap();
    tokio::time::timeout(
        Duration::from_secs(15),
        store.append(stream, ExpectedVersion::Any, vec![event]),
    )
    .await
    .expect("the append answers within its deadline")
    .map(|_| ())
}

#[test]
fn debug_and_display_of_urls_configs_and_settings_hide_secrets() {
    let s = Secrets::new();
    let raw = url_with_secrets(&s, "127.0.0.1:1", "");
    let url = StoreUrl::parse(&raw, "Kafka URL", SCHEMES).unwrap();
    s.assert_absent("StoreUrl Display", &url.to_string());
    s.assert_absent("StoreUrl Debug", &format!("{url:?}"));
    s.assert_absent("redact", &redact(&raw));
    let config = KafkaConfig::from_url(&raw).unwrap();
    assert_eq!(config.client_settings["sasl.password"], s.password);
    assert_eq!(config.client_settings["ssl.key.password"], s.key);
    s.assert_absent("KafkaConfig Debug", &format!("{config:?}"));
    s.assert_absent("KafkaConfig Debug, pretty", &format!("{config:#?}"));
    // photon-kafka never formats these, but a caller may. rdkafka's `Debug` leaves out its
    // list of sensitive settings only: `sasl.oauthbearer.config` (and `ssl.key.pem`) show.
    for (what, settings) in [
        ("client_config", config.client_config()),
        ("producer_config", config.producer_config()),
        ("consumer_config", config.consumer_config()),
    ] {
        let shown = format!("{settings:?}");
        for secret in [&s.password, &s.key, &s.sasl] {
            assert!(!shown.contains(secret.as_str()), "{what} shows {secret}");
        }
    }
    // The `sasl_password` option (instead of user:password@) and a malformed URL.
    let with_option = format!(
        "kafka://127.0.0.1:1?sasl_username=alice&sasl_password={}",
        s.sasl
    );
    let c = KafkaConfig::from_url(&with_option).unwrap();
    s.assert_absent("KafkaConfig Debug (sasl_password)", &format!("{c:?}"));
    for bad in [
        format!("kafka://alice:{}@127.0.0.1:bad", s.password),
        format!("kafka://alice:{}@127.0.0.1:1?colour=blue", s.password),
        format!("kafka://127.0.0.1:1?sasl_password={}&partitions=0", s.sasl),
        format!(
            "kafka://127.0.0.1:1?ssl_key_password={}&ssl_key_password=x",
            s.key
        ),
    ] {
        let e = KafkaConfig::from_url(&bad).unwrap_err();
        s.assert_absent_from_error(&format!("from_url({})", redact(&bad)), &e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_failed_appends_to_an_unreachable_broker_hide_secrets() {
    capture::install();
    let s = Secrets::new();
    // debug=all: librdkafka's own debug lines at every context, its configuration dump included.
    let raw = url_with_secrets(
        &s,
        "127.0.0.1:1",
        "&security_protocol=sasl_plaintext&rdkafka.debug=all",
    );
    let store = KafkaStore::from_url(&raw).await.unwrap();
    s.assert_absent("KafkaStore Debug", &format!("{store:?}"));
    let stream = fresh_stream();
    let e = append(&store, &stream)
        .await
        .expect_err("no broker listens on port 1");
    s.assert_absent_from_error("append error", &e);
    let version = tokio::time::timeout(Duration::from_secs(10), store.stream_version(&stream))
        .await
        .expect("a read from an unreachable broker answers within its deadline");
    s.assert_absent_from_error("stream_version error", &version.unwrap_err());
    let health = tokio::time::timeout(Duration::from_secs(10), store.health()).await;
    if let Ok(Err(e)) = health {
        s.assert_absent_from_error("health error", &e);
    }
    drop(store);
    s.assert_absent_from_logs();
    assert!(
        capture::lines().iter().any(|l| l.contains("librdkafka")),
        "librdkafka's log lines were captured (the check above saw them)"
    );
}

#[tokio::test]
async fn settings_librdkafka_refuses_are_not_echoed() {
    capture::install();
    let s = Secrets::new();
    // librdkafka refuses each: a property this build lacks (OIDC needs libcurl), and a misspelt
    // name; its refusal carries the value, which must not reach the error.
    for option in [
        format!("rdkafka.sasl.oauthbearer.client.secret={}", s.oauth),
        format!("rdkafka.sasl.pasword={}", s.sasl),
    ] {
        let raw = format!("kafka://127.0.0.1:1?{option}");
        match KafkaStore::from_url(&raw).await {
            Ok(_) => println!("librdkafka accepted {}", redact(&raw)),
            Err(e) => s.assert_absent_from_error(&format!("refused {}", redact(&raw)), &e),
        }
    }
    s.assert_absent_from_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sasl_ssl_handshake_with_the_broker_hides_secrets() {
    let Some(broker) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    capture::install();
    let s = Secrets::new();
    let hosts = KafkaConfig::from_url(&broker).unwrap().bootstrap_servers;
    let prefix = format!("sec{}", &Uuid::new_v4().simple().to_string()[..12]);
    // The broker speaks plaintext: TLS fails at the handshake, before SASL would.
    let raw = url_with_secrets(
        &s,
        &hosts,
        &format!("&security_protocol=sasl_ssl&sasl_mechanism=SCRAM-SHA-512&prefix={prefix}&rdkafka.debug=security,broker,protocol"),
    );
    let store = KafkaStore::from_url(&raw).await.unwrap();
    let e = append(&store, &fresh_stream())
        .await
        .expect_err("a plaintext broker cannot complete a TLS handshake");
    s.assert_absent_from_error("append error", &e);
    drop(store);
    s.assert_absent_from_logs();
}

#[path = "support/capture.rs"]
mod capture;
