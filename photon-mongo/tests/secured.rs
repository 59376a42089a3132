//! The store against servers that demand TLS, and credentials (issue 19, parts 1 and 2), both
//! started by `scripts/servers`:
//! - `PHOTON_TEST_MONGO_TLS_URL`: FerretDB's TLS listener (the test CA's certificate), no
//!   authentication. The conformance suite runs once over it.
//! - `PHOTON_TEST_MONGO_SECURE_URL`: a second FerretDB with TLS and SCRAM-SHA-256 (a user made at
//!   its first start). It checks passwords, but the driver cannot complete a SCRAM conversation
//!   with it (FerretDB 1.24 ignores `skipEmptyExchange` and answers the client's proof with
//!   `done: false`; the driver, which always asks to skip the empty exchange, gives up with
//!   "expected SCRAM authentication to have completed"), so it serves only the refusals.
//!
//! A server certificate the client does not trust (`PHOTON_TEST_TLS_UNTRUSTED_CA` as
//! `tlsCAFile`), a wrong password, an unknown user, and a connection without credentials (whose
//! commands FerretDB, as MongoDB, refuses with code 13 Unauthorized) each answer a typed,
//! non-retryable `AccessDenied` of the right kind within a bounded time, never `Unavailable`. No
//! error of those (Display, Debug, the whole `source()` chain) and no tracing line written
//! meanwhile holds the password.
//!
//! Not here, for want of a server that can: a read-only user whose append is refused (FerretDB
//! 1.24 has no roles), and reading back that a refused append stored nothing (the driver cannot
//! log in to the secured server; its refusals come at the first command, before any insert).

mod common;

use std::time::{Duration, Instant};

use photon_api::{AccessKind, Error, EventData, EventStore, ExpectedVersion, StreamId, Uuid};
use photon_conformance::{capture, conformance_suite, server_url, Harness};
use photon_mongo::MongoStore;

/// The secured server's URL, credentials and all; None skips (or fails, when required).
fn secure_url() -> Option<String> {
    server_url("mongo", "PHOTON_TEST_MONGO_SECURE_URL")
}

/// The TLS listener's URL (no credentials); None skips (or fails, when required).
fn tls_url() -> Option<String> {
    server_url("mongo", "PHOTON_TEST_MONGO_TLS_URL")
}

/// The password in `url` (`mongodb://user:password@...`).
fn password(url: &str) -> &str {
    let (userinfo, _) = userinfo(url);
    userinfo
        .and_then(|u| u.split_once(':'))
        .map(|(_, p)| p)
        .expect("PHOTON_TEST_MONGO_SECURE_URL has user:password@")
}

/// The `user:password` of `url`, if any, and the URL without it.
fn userinfo(url: &str) -> (Option<&str>, String) {
    let (scheme, rest) = url.split_once("://").expect("a scheme");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => (Some(&rest[..at]), format!("{scheme}://{}", &rest[at + 1..])),
        None => (None, url.to_owned()),
    }
}

/// `url` with `user:password@` (or none).
fn with_credentials(url: &str, credentials: Option<(&str, &str)>) -> String {
    let (_, bare) = userinfo(url);
    match credentials {
        None => bare,
        Some((user, password)) => bare.replacen("://", &format!("://{user}:{password}@"), 1),
    }
}

/// `url` with option `key` set to `value` (replaced if present, else added).
fn with_option(url: &str, key: &str, value: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut options: Vec<String> = query
        .split('&')
        .filter(|o| !o.is_empty() && o.split('=').next() != Some(key))
        .map(str::to_owned)
        .collect();
    options.push(format!("{key}={value}"));
    format!("{base}?{}", options.join("&"))
}

/// `url` without `key` and its value.
fn without_option(url: &str, key: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let options: Vec<&str> = query
        .split('&')
        .filter(|o| !o.is_empty() && o.split('=').next() != Some(key))
        .collect();
    format!("{base}?{}", options.join("&"))
}

/// A fresh collection prefix, so that cases and tests never share commits.
fn fresh_prefix() -> String {
    format!("s{}", &Uuid::new_v4().simple().to_string()[..12])
}

async fn harness() -> Option<Harness> {
    let url = tls_url()?;
    // The unreachable store keeps the TLS settings, on a port that refuses connections.
    let path = url["mongodb://".len()..].find('/').expect("a path") + "mongodb://".len();
    let unreachable = with_option(
        &format!("mongodb://127.0.0.1:1{}", &url[path..]),
        "photon_timeout_ms",
        "1500",
    );
    Some(common::harness(&url, &unreachable))
}

conformance_suite!(harness);

/// The longest a refused call may take: the store's `photon_timeout_ms` (set to 3 s below) and
/// some room. A refusal retried until a timeout would take longer, or be `Unavailable`.
const REFUSED_WITHIN: Duration = Duration::from_secs(8);

/// A store for `url` with collection prefix `prefix` and a 3 s bound on round trips.
async fn store(url: &str, prefix: &str) -> MongoStore {
    let url = with_option(
        &with_option(url, "photon_prefix", prefix),
        "photon_timeout_ms",
        "3000",
    );
    MongoStore::from_url(&url).await.expect("a valid URL")
}

fn fresh_stream() -> StreamId {
    StreamId::parse(format!("account-{}", Uuid::new_v4().simple())).unwrap()
}

/// One append to `stream`, timed.
async fn append(store: &MongoStore, stream: &StreamId) -> (Result<(), Error>, Duration) {
    let event = EventData::json("Opened", &serde_json::json!({ "n": 1 })).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        store.append(stream, ExpectedVersion::Any, vec![event]),
    )
    .await
    .expect("the append answers within 30 s")
    .map(|_| ());
    (result, started.elapsed())
}

/// `e` is `AccessDenied` of `kind`, not retryable, answered within [`REFUSED_WITHIN`], and neither
/// it (Display, Debug, every source) nor any tracing line captured so far shows a secret.
#[track_caller]
fn assert_denied(what: &str, e: &Error, took: Duration, kind: AccessKind, secrets: &[&str]) {
    // As a caller sees it (the README quotes these).
    println!("{what}, after {took:?}: {e}");
    match e {
        Error::AccessDenied {
            backend, kind: k, ..
        } => {
            assert_eq!(*backend, "mongo", "{what}: {e}");
            assert_eq!(*k, kind, "{what}: {e}");
        }
        other => panic!("{what}: expected AccessDenied ({kind}), got {other:?}"),
    }
    assert!(!e.is_retryable(), "{what}: {e}");
    assert!(
        took < REFUSED_WITHIN,
        "{what}: answered after {took:?}: {e}"
    );
    assert_no_secret(what, e, secrets);
}

#[track_caller]
fn assert_no_secret(what: &str, e: &Error, secrets: &[&str]) {
    let mut shown = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = next {
        shown.push(e.to_string());
        shown.push(format!("{e:?}"));
        shown.push(format!("{e:#?}"));
        next = e.source();
    }
    shown.extend(capture::lines());
    for secret in secrets {
        for text in &shown {
            assert!(!text.contains(secret), "{what}: {secret:?} shown in {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_certificate_is_access_denied_tls() {
    let (Some(tls), Some(secure)) = (tls_url(), secure_url()) else {
        return;
    };
    let Some(untrusted) = server_url("mongo", "PHOTON_TEST_TLS_UNTRUSTED_CA") else {
        return;
    };
    capture::install();
    let secret = password(&secure).to_owned();
    for (what, url) in [("TLS listener", tls), ("secured server", secure)] {
        let store = store(&with_option(&url, "tlsCAFile", &untrusted), &fresh_prefix()).await;
        let (result, took) = append(&store, &fresh_stream()).await;
        let e = result.expect_err("the server's certificate is not signed by the untrusted CA");
        assert_denied(
            &format!("append, {what}, untrusted CA"),
            &e,
            took,
            AccessKind::Tls,
            &[&secret],
        );
        let started = Instant::now();
        let e = store.health().await.expect_err("health over the same TLS");
        assert_denied(
            &format!("health, {what}, untrusted CA"),
            &e,
            started.elapsed(),
            AccessKind::Tls,
            &[&secret],
        );
    }
}

/// The server's own code in `e`'s source chain, if a command error of the driver is there.
fn server_code(e: &Error) -> Option<i32> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = next {
        // The driver's error keeps its own cause boxed: `source()` gives the `Box`.
        let driver = e.downcast_ref::<mongodb::error::Error>().or_else(|| {
            e.downcast_ref::<Box<mongodb::error::Error>>()
                .map(|b| b.as_ref())
        });
        if let Some(driver) = driver {
            if let mongodb::error::ErrorKind::Command(c) = &*driver.kind {
                return Some(c.code);
            }
        }
        next = e.source();
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_an_unknown_user_is_access_denied_authentication() {
    let Some(url) = secure_url() else { return };
    capture::install();
    let secret = password(&url).to_owned();
    let wrong = format!("wrong-{}", Uuid::new_v4().simple());
    let (user, _) = userinfo(&url);
    let user = user
        .and_then(|u| u.split_once(':'))
        .map(|(u, _)| u)
        .unwrap();
    for (what, credentials) in [
        ("wrong password", (user, wrong.as_str())),
        ("unknown user", ("nobody-here", secret.as_str())),
    ] {
        let refused = store(&with_credentials(&url, Some(credentials)), &fresh_prefix()).await;
        let (result, took) = append(&refused, &fresh_stream()).await;
        let e = result.expect_err(what);
        assert_denied(
            what,
            &e,
            took,
            AccessKind::Authentication,
            &[&secret, &wrong],
        );
        // The server itself refused (AuthenticationFailed), not the driver.
        assert_eq!(server_code(&e), Some(18), "{what}: {e:?}");
    }
    // The server checks the password: the right one passes the proof. On FerretDB 1.24 only
    // the driver's complaint about the missing `done` (see the module's comment) remains; a
    // server that completes the conversation (MongoDB) simply takes the append.
    let right = store(&url, &fresh_prefix()).await;
    if let (Err(e), _) = append(&right, &fresh_stream()).await {
        assert_eq!(
            server_code(&e),
            None,
            "the server refused the right password: {e:?}"
        );
        assert!(
            e.to_string()
                .contains("expected SCRAM authentication to have completed"),
            "{e}"
        );
        assert_no_secret("the right password", &e, &[&secret, &wrong]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_permission_is_access_denied_authorization() {
    let Some(url) = secure_url() else { return };
    capture::install();
    let secret = password(&url).to_owned();
    // No credentials: FerretDB (as MongoDB) refuses every command but the handshake ones with
    // code 13 Unauthorized, the code a user without the needed role gets on MongoDB.
    let anonymous = without_option(
        &without_option(&with_credentials(&url, None), "authSource"),
        "authMechanism",
    );
    let refused = store(&anonymous, &fresh_prefix()).await;
    let (result, took) = append(&refused, &fresh_stream()).await;
    let e = result.expect_err("no credentials, no permission");
    assert_denied(
        "append without credentials",
        &e,
        took,
        AccessKind::Authorization,
        &[&secret],
    );
    assert_eq!(server_code(&e), Some(13), "{e:?}");
}
