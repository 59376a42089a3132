//! Credentials never leak (issue 19, part 3): the password of a `mongodb://` URL and its
//! secret options (`tlsCertificateKeyFilePassword`, `authMechanismProperties`) are absent from
//! the `Debug` and `Display` of the URL, the config and the store, from every error of a
//! connection that fails or a connection string the driver refuses (the whole `source()`
//! chain), and from every tracing event and span (ours and the driver's) written meanwhile, at
//! every level.
//!
//! The failures here are an unreachable port, connection strings the driver refuses and, with
//! `PHOTON_TEST_MONGO_URL` set, TLS against the plaintext server (the handshake fails) and
//! credentials it does not ask for. `tests/secured.rs` does the same check on the refusals of
//! servers that demand TLS and credentials.

use std::time::Duration;

use photon_api::url::{redact, StoreUrl};
use photon_api::{Error, EventData, EventStore, ExpectedVersion, StreamId, Uuid};
use photon_conformance::{capture, server_url};
use photon_mongo::{client_options, MongoConfig, MongoStore, SCHEMES};

/// Distinct secrets for one test: a password, a key file's password, an AWS session token.
struct Secrets {
    password: String,
    key: String,
    token: String,
}

impl Secrets {
    fn new() -> Self {
        let fresh = |what: &str| format!("s3cr3t-{what}-{}", Uuid::new_v4().simple());
        Self {
            password: fresh("pw"),
            key: fresh("key"),
            token: fresh("token"),
        }
    }

    fn assert_absent(&self, what: &str, shown: &str) {
        for secret in [&self.password, &self.key, &self.token] {
            assert!(
                !shown.contains(secret.as_str()),
                "{what} shows {secret}: {shown}"
            );
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
        for line in capture::lines() {
            self.assert_absent("a captured tracing line", &line);
        }
    }
}

/// `mongodb://ann:<password>@<hosts>/<database>?photon_timeout_ms=1000<options>`.
fn url(s: &Secrets, hosts: &str, options: &str) -> String {
    format!(
        "mongodb://ann:{}@{hosts}/photon_secrets?photon_timeout_ms=1000{options}",
        s.password
    )
}

/// One append to a fresh stream: what first reaches the server.
async fn append(store: &MongoStore) -> Result<(), Error> {
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

#[tokio::test]
async fn debug_and_display_of_urls_configs_and_options_hide_secrets() {
    let s = Secrets::new();
    let raw = url(
        &s,
        "127.0.0.1:1,[::1]:2",
        &format!(
            "&authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:{}&tls=true&tlsCertificateKeyFile=/k.pem&tlsCertificateKeyFilePassword={}",
            s.token, s.key
        ),
    );
    let parsed = StoreUrl::parse(&raw, "MongoDB URL", SCHEMES).unwrap();
    s.assert_absent("StoreUrl Display", &parsed.to_string());
    s.assert_absent("StoreUrl Debug", &format!("{parsed:?}"));
    s.assert_absent("redact", &redact(&raw));
    let config = MongoConfig::from_url(&raw).unwrap();
    s.assert_absent("MongoConfig Debug", &format!("{config:?}"));
    s.assert_absent("MongoConfig Debug, pretty", &format!("{config:#?}"));
    // The driver's options as the store sets them (public for tools), without the key password
    // (this build of the driver refuses it, see below).
    let plain = url(&s, "127.0.0.1:1", "");
    let options = client_options(&MongoConfig::from_url(&plain).unwrap())
        .await
        .unwrap();
    s.assert_absent("ClientOptions Debug", &format!("{options:?}"));
    let store = MongoStore::from_url(&plain).await.unwrap();
    s.assert_absent("MongoStore Debug", &format!("{store:?}"));
    for bad in [
        format!("mongodb://ann:{}@127.0.0.1:bad/db", s.password),
        url(&s, "127.0.0.1:1", "&photon_colour=blue"),
        url(&s, "127.0.0.1:1", "&photon_timeout_ms=0"),
    ] {
        let e = MongoConfig::from_url(&bad).unwrap_err();
        s.assert_absent_from_error(&format!("from_url({})", redact(&bad)), &e);
    }
}

#[tokio::test]
async fn connection_strings_the_driver_refuses_are_not_echoed() {
    capture::install();
    let s = Secrets::new();
    for options in [
        // The driver is built without its cert-key-password feature.
        format!(
            "&tls=true&tlsCertificateKeyFile=/k.pem&tlsCertificateKeyFilePassword={}",
            s.key
        ),
        // '=' for ':' in the properties, and an option that is not key=value.
        format!(
            "&authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN={}",
            s.token
        ),
        format!("&authMechanismProperties=SERVICE_NAME:x,{}", s.token),
        "&authMechanism=NOPE".to_owned(),
        "&tls=false&tlsCAFile=/ca.pem".to_owned(),
    ] {
        let raw = url(&s, "127.0.0.1:1", &options);
        match MongoStore::from_url(&raw).await {
            Ok(store) => {
                let e = append(&store).await.expect_err("nothing listens on port 1");
                s.assert_absent_from_error(&format!("append via {}", redact(&raw)), &e);
            }
            Err(e) => s.assert_absent_from_error(&format!("refused {}", redact(&raw)), &e),
        }
    }
    s.assert_absent_from_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connections_hide_secrets() {
    capture::install();
    let s = Secrets::new();
    let store = MongoStore::from_url(&url(&s, "127.0.0.1:1", ""))
        .await
        .unwrap();
    let e = append(&store).await.expect_err("nothing listens on port 1");
    s.assert_absent_from_error("append to an unreachable server", &e);
    s.assert_absent_from_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_the_server_hide_secrets() {
    let Some(server) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    capture::install();
    let s = Secrets::new();
    let server = StoreUrl::parse(&server, "MongoDB URL", SCHEMES).unwrap();
    let hosts = server.host_ports(27017).join(",");
    // TLS against the plaintext server: the handshake fails.
    let tls = MongoStore::from_url(&url(&s, &hosts, "&directConnection=true&tls=true"))
        .await
        .unwrap();
    let e = append(&tls)
        .await
        .expect_err("a plaintext server cannot complete a TLS handshake");
    s.assert_absent_from_error("append over TLS to a plaintext server", &e);
    // Credentials the server does not know (or does not ask for).
    let store = MongoStore::from_url(&url(&s, &hosts, "&directConnection=true"))
        .await
        .unwrap();
    if let Err(e) = append(&store).await {
        s.assert_absent_from_error("append with unknown credentials", &e);
    }
    // The driver writes no tracing without its tracing-unstable feature; ours is captured.
    s.assert_absent_from_logs();
    let lines = capture::lines();
    assert!(
        lines.iter().any(|l| l.contains("photon.append")),
        "photon's tracing was captured (the check above saw it): {lines:?}"
    );
}
