//! The secured listener (issue 19): SASL_SSL with SCRAM-SHA-512 users and ACLs, started by
//! `scripts/servers` beside the open one (`PHOTON_TEST_KAFKA_SECURE_*`).
//!
//! The conformance suite runs over it with the writer's credentials; a wrong password, an
//! unknown user, an untrusted certificate and a missing permission each give a final
//! `AccessDenied` naming the check, within a bound, with no secret in any error, `Debug` print
//! or captured tracing and `log` line (librdkafka's); the reader may subscribe and read but not
//! append, and nothing of its refused append is stored.

use std::time::{Duration, Instant};

use futures::StreamExt;
use photon_api::{
    AccessKind, Error, EventData, EventStore, ExpectedVersion, ReadOptions, Selector, Start,
    StreamId, SubscriptionItem, SubscriptionMode, Uuid,
};
use photon_conformance::server_url;
use photon_kafka::KafkaStore;

/// How long a refused call may take: a refused login or handshake is answered when the call's
/// request timeout ends (`timeout_ms=3000` below; librdkafka itself keeps trying), a refused
/// permission at once; the rest is room for a loaded machine.
const REFUSAL_BOUND: Duration = Duration::from_secs(12);

/// The secured listener and its test users, as `scripts/servers env` exports them.
struct Secure {
    addr: String,
    prefix: String,
    ca: String,
    untrusted_ca: String,
    writer: (String, String),
    reader: (String, String),
}

impl Secure {
    /// None (the test is skipped) when the secured listener is not configured and not required.
    fn from_env() -> Option<Self> {
        let addr = server_url("kafka", "PHOTON_TEST_KAFKA_SECURE_ADDR")?;
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("PHOTON_TEST_KAFKA_SECURE_ADDR is set but {name} is not: eval \"$(scripts/servers env)\"")
            })
        };
        Some(Self {
            addr,
            prefix: var("PHOTON_TEST_KAFKA_SECURE_PREFIX"),
            ca: var("PHOTON_TEST_TLS_CA"),
            untrusted_ca: var("PHOTON_TEST_TLS_UNTRUSTED_CA"),
            writer: (
                var("PHOTON_TEST_KAFKA_SECURE_WRITER"),
                var("PHOTON_TEST_KAFKA_SECURE_WRITER_PASSWORD"),
            ),
            reader: (
                var("PHOTON_TEST_KAFKA_SECURE_READER"),
                var("PHOTON_TEST_KAFKA_SECURE_READER_PASSWORD"),
            ),
        })
    }

    /// A URL of the secured listener as `user` with `password`, trusting `ca`, on `prefix`.
    fn url(&self, (user, password): (&str, &str), ca: &str, prefix: &str, extra: &str) -> String {
        format!(
            "kafka://{user}:{password}@{}?security_protocol=sasl_ssl&sasl_mechanism=SCRAM-SHA-512&ssl_ca_location={ca}&prefix={prefix}&partitions=3{extra}",
            self.addr
        )
    }

    fn writer(&self) -> (&str, &str) {
        (&self.writer.0, &self.writer.1)
    }

    fn reader(&self) -> (&str, &str) {
        (&self.reader.0, &self.reader.1)
    }

    /// Every password a test of this file may hold.
    fn passwords(&self) -> [&str; 2] {
        [&self.writer.1, &self.reader.1]
    }
}

/// Short timeouts and librdkafka's security and broker debug lines, so the refusals are quick
/// and everything librdkafka says about the login reaches the leak check.
const FAILING: &str = "&timeout_ms=3000&rdkafka.debug=security,broker,protocol";

/// librdkafka's security and broker debug lines only, for [`every_call_refused`], which sets the
/// timeouts itself.
const DEBUG: &str = "&rdkafka.debug=security,broker,protocol";

/// A stream of a category of its own (a new topic), so earlier runs' events are not in it.
fn fresh_stream() -> StreamId {
    let id = Uuid::new_v4().simple().to_string();
    StreamId::parse(format!("sec{}-{}", &id[..12], &id[12..])).unwrap()
}

fn event() -> EventData {
    EventData::json("Opened", &serde_json::json!({ "n": 1 })).unwrap()
}

/// Panics unless `e` is `AccessDenied` of `kind`, final, naming `cause` in its Display.
fn assert_denied(e: &Error, kind: AccessKind, cause: &str) {
    match e {
        Error::AccessDenied { kind: got, .. } => {
            assert_eq!(*got, kind, "{e}");
        }
        other => panic!("expected AccessDenied ({kind:?}), got {other:?}"),
    }
    assert!(!e.is_retryable(), "{e}");
    let shown = e.to_string();
    assert!(shown.contains(cause), "{shown} does not name {cause:?}");
}

/// Panics when `shown` holds any of `secrets`.
fn assert_no_secret(secrets: &[&str], what: &str, shown: &str) {
    for secret in secrets {
        assert!(!shown.contains(secret), "{what} shows a password: {shown}");
    }
}

/// An error's Display and Debug and those of every error in its `source()` chain.
fn assert_no_secret_in_error(secrets: &[&str], what: &str, e: &(dyn std::error::Error + 'static)) {
    let mut next = Some(e);
    let mut depth = 0;
    while let Some(e) = next {
        assert_no_secret(secrets, &format!("{what} (source {depth})"), &e.to_string());
        assert_no_secret(
            secrets,
            &format!("{what} (source {depth}, Debug)"),
            &format!("{e:?}"),
        );
        next = e.source();
        depth += 1;
    }
}

/// Nothing captured so far (by any test of this binary) holds a secret.
fn assert_no_secret_in_logs(secrets: &[&str]) {
    let lines = capture::lines();
    assert!(
        lines.iter().any(|l| l.contains("librdkafka")),
        "librdkafka's log lines were captured (the check below sees them)"
    );
    for line in &lines {
        assert_no_secret(secrets, "a captured log line", line);
    }
}

/// `f` answers within [`REFUSAL_BOUND`] with an error.
async fn refused<T: std::fmt::Debug>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Error {
    let started = Instant::now();
    let answer = tokio::time::timeout(REFUSAL_BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {REFUSAL_BOUND:?}"));
    let e = answer.expect_err(what);
    println!("{what}: {e} (after {:?})", started.elapsed());
    e
}

/// A store built from `url` refuses an append, a version look-up, a health check and a
/// subscription (its first item) with `AccessDenied` of `kind` naming `cause`, each within the
/// bound, and no error, `Debug` print or captured line shows `secrets`.
///
/// A refusal answers a call when its request timeout ends (librdkafka keeps trying meanwhile;
/// the store does not cut a call short, since another broker may yet answer), so every call is
/// answered within the bound, not retried forever.
async fn every_call_refused(url: &str, kind: AccessKind, cause: &str, secrets: &[&str]) {
    capture::install();
    let store = KafkaStore::from_url(&format!("{url}&timeout_ms=3000"))
        .await
        .expect("builds");
    assert_no_secret(secrets, "KafkaStore Debug", &format!("{store:?}"));
    let stream = fresh_stream();
    let e = refused(
        "append",
        store.append(&stream, ExpectedVersion::Any, vec![event()]),
    )
    .await;
    assert_denied(&e, kind, cause);
    assert_no_secret_in_error(secrets, "append error", &e);
    let e = refused("stream_version", store.stream_version(&stream)).await;
    assert_denied(&e, kind, cause);
    assert_no_secret_in_error(secrets, "stream_version error", &e);
    let e = refused("health", store.health()).await;
    assert_denied(&e, kind, cause);
    assert_no_secret_in_error(secrets, "health error", &e);
    let mut sub = store.subscribe(
        Selector::Stream(stream),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    let e = refused("subscribe", async {
        match sub.next().await {
            Some(Ok(item)) => Ok(item),
            Some(Err(e)) => Err(e),
            None => panic!("the subscription ended without an error"),
        }
    })
    .await;
    assert_denied(&e, kind, cause);
    assert_no_secret_in_error(secrets, "subscription error", &e);
    drop(sub);
    drop(store);
    assert_no_secret_in_logs(secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_as_authentication() {
    let Some(s) = Secure::from_env() else { return };
    let wrong = format!("wrong-{}", Uuid::new_v4().simple());
    let url = s.url((&s.writer.0, &wrong), &s.ca, &s.prefix, DEBUG);
    let mut secrets = s.passwords().to_vec();
    secrets.push(&wrong);
    every_call_refused(&url, AccessKind::Authentication, "SASL", &secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_is_refused_as_authentication() {
    let Some(s) = Secure::from_env() else { return };
    let user = format!("nobody-{}", Uuid::new_v4().simple());
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let url = s.url((&user, &password), &s.ca, &s.prefix, DEBUG);
    let mut secrets = s.passwords().to_vec();
    secrets.push(&password);
    every_call_refused(&url, AccessKind::Authentication, "SASL", &secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_as_tls() {
    let Some(s) = Secure::from_env() else { return };
    // The writer's right password, but trusting a CA that did not sign the broker's certificate:
    // the handshake fails before the password is sent.
    let url = s.url(s.writer(), &s.untrusted_ca, &s.prefix, DEBUG);
    every_call_refused(&url, AccessKind::Tls, "certificate", &s.passwords()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_is_refused_as_authorization() {
    let Some(s) = Secure::from_env() else { return };
    capture::install();
    // The writer logs in, but its ACLs cover topics under its own prefix only.
    let other = format!("{}_other", s.prefix);
    let url = s.url(s.writer(), &s.ca, &other, FAILING);
    let store = KafkaStore::from_url(&url).await.expect("builds");
    let e = refused(
        "append outside the ACLs",
        store.append(&fresh_stream(), ExpectedVersion::Any, vec![event()]),
    )
    .await;
    assert_denied(&e, AccessKind::Authorization, "authorization");
    assert_no_secret_in_error(&s.passwords(), "append error", &e);
    // The login itself was fine: the same store answers what needs no topic rights.
    store
        .health()
        .await
        .expect("the writer may ask for metadata");
    drop(store);
    assert_no_secret_in_logs(&s.passwords());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_reads_and_subscribes_but_its_append_is_refused() {
    let Some(s) = Secure::from_env() else { return };
    capture::install();
    let writer = KafkaStore::from_url(&s.url(s.writer(), &s.ca, &s.prefix, ""))
        .await
        .expect("writer connects");
    let reader = KafkaStore::from_url(&s.url(s.reader(), &s.ca, &s.prefix, FAILING))
        .await
        .expect("reader connects");
    let stream = fresh_stream();
    let first = event();
    let first_id = first.event_id;
    writer
        .append(&stream, ExpectedVersion::NoStream, vec![first])
        .await
        .expect("the writer appends");

    // The reader reads the stream and a subscription to its category delivers the event.
    let read: Vec<_> = reader
        .read_stream(&stream, ReadOptions::default())
        .collect()
        .await;
    let read: Vec<_> = read.into_iter().collect::<Result<_, _>>().expect("reads");
    assert_eq!(
        read.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        [first_id]
    );
    let mut sub = reader.subscribe(
        Selector::Category(stream.category()),
        Start::Beginning,
        SubscriptionMode::Cold,
    );
    let mut delivered = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("the subscription answers")
    {
        match item.expect("the reader may subscribe") {
            SubscriptionItem::Event(e) => delivered.push(e.event_id),
            SubscriptionItem::CaughtUp => {}
        }
    }
    assert_eq!(delivered, [first_id]);

    // Its appends are refused: to the existing stream (its topic exists) and to a new category
    // (its topic would have to be created).
    let refused_event = event();
    let refused_id = refused_event.event_id;
    let e = refused(
        "the reader's append",
        reader.append(&stream, ExpectedVersion::Any, vec![refused_event]),
    )
    .await;
    assert_denied(&e, AccessKind::Authorization, "authorization");
    assert_no_secret_in_error(&s.passwords(), "the reader's append", &e);
    let elsewhere = fresh_stream();
    let e = refused(
        "the reader's append to a new category",
        reader.append(&elsewhere, ExpectedVersion::Any, vec![event()]),
    )
    .await;
    assert_denied(&e, AccessKind::Authorization, "authorization");

    // Nothing of it was stored: the writer, asked afterwards, still sees only its own event.
    let after: Vec<_> = writer
        .read_stream(&stream, ReadOptions::default())
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("the writer reads");
    assert_eq!(
        after.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        [first_id]
    );
    assert!(!after.iter().any(|e| e.event_id == refused_id));
    assert_eq!(writer.stream_version(&elsewhere).await.unwrap(), None);
    drop((reader, writer));
    assert_no_secret_in_logs(&s.passwords());
}

/// The shared conformance suite over SASL_SSL with the writer's credentials.
mod conformance {
    use photon_conformance::{conformance_suite, Harness};

    async fn harness() -> Option<Harness> {
        let s = super::Secure::from_env()?;
        let url = s.url(s.writer(), &s.ca, &s.prefix, "");
        Some(super::harness::kafka_harness(url))
    }

    conformance_suite!(harness);
}

#[path = "support/capture.rs"]
mod capture;
#[path = "support/harness.rs"]
mod harness;
