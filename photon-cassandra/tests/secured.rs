//! Against the secured Cassandra node of `scripts/servers` (issue 19): TLS required, password
//! authentication, GRANT-based authorization. Each way in that must be refused is refused with a
//! typed, final `AccessDenied` naming the check that failed (never `Unavailable`, which callers
//! retry), within a bound, and without the password in any error, `Debug` print or tracing line;
//! a role with SELECT only reads and subscribes but cannot append. The conformance suite over the
//! same node is `tests/secured_conformance.rs` (a binary of its own, so this one's tracing
//! capture does not hold the suite's lines).
//!
//! The node, its keyspaces and roles come from `scripts/servers env`: the writer has CREATE,
//! SELECT and MODIFY on `PHOTON_TEST_CASSANDRA_SECURE_KEYSPACE` only (the grants the README
//! documents), the reader SELECT there only, the outsider nothing.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use photon_api::{
    AccessKind, Bytes, Error, EventData, EventStore, EventStoreExt, ExpectedVersion, ReadOptions,
    Register, Selector, Start, StreamId, SubscriptionItem, SubscriptionMode, Uuid,
};
use photon_cassandra::CassandraStore;
use photon_conformance::{capture, server_url};

/// A refusal must come within this, connecting included.
const BOUND: Duration = Duration::from_secs(20);

/// The secured node and its test roles.
struct Node {
    addr: String,
    keyspace: String,
    other_keyspace: String,
    ca: String,
    untrusted_ca: String,
    writer: (String, String),
    reader: (String, String),
    outsider: (String, String),
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set although PHOTON_TEST_CASSANDRA_SECURE_ADDR is: eval \"$(scripts/servers env)\"")
    })
}

impl Node {
    fn from_env() -> Option<Self> {
        let addr = server_url("cassandra", "PHOTON_TEST_CASSANDRA_SECURE_ADDR")?;
        let role = |name: &str| {
            (
                var(&format!("PHOTON_TEST_CASSANDRA_SECURE_{name}")),
                var(&format!("PHOTON_TEST_CASSANDRA_SECURE_{name}_PASSWORD")),
            )
        };
        Some(Self {
            addr,
            keyspace: var("PHOTON_TEST_CASSANDRA_SECURE_KEYSPACE"),
            other_keyspace: var("PHOTON_TEST_CASSANDRA_SECURE_OTHER_KEYSPACE"),
            ca: var("PHOTON_TEST_TLS_CA"),
            untrusted_ca: var("PHOTON_TEST_TLS_UNTRUSTED_CA"),
            writer: role("WRITER"),
            reader: role("READER"),
            outsider: role("OUTSIDER"),
        })
    }

    /// `cassandra://user:password@addr/keyspace?tls_ca=ca&...`, with the layout settings every
    /// client of the keyspace shares (tests/secured_conformance.rs uses the same).
    fn url(&self, (user, password): (&str, &str), keyspace: &str, ca: &str) -> String {
        format!(
            "cassandra://{user}:{password}@{}/{keyspace}?tls=true&tls_ca={ca}&{}",
            self.addr,
            common::SUITE_OPTIONS
        )
    }

    async fn store(&self, role: &(String, String)) -> CassandraStore {
        let url = self.url((&role.0, &role.1), &self.keyspace, &self.ca);
        CassandraStore::from_url(&url).await.expect("builds")
    }
}

fn stream() -> StreamId {
    StreamId::parse(format!("secured-{}", Uuid::new_v4().simple())).unwrap()
}

fn event(n: u32) -> EventData {
    EventData::json("Noted", &serde_json::json!({ "n": n })).unwrap()
}

/// Appends one event to a fresh stream (what first connects a store), within [`BOUND`].
async fn append_fresh(store: &CassandraStore) -> Result<(), Error> {
    tokio::time::timeout(
        BOUND,
        store.append(&stream(), ExpectedVersion::Any, vec![event(1)]),
    )
    .await
    .expect("answers within the bound, without retrying")
    .map(|_| ())
}

/// `e` is a final `AccessDenied` of `kind` whose message says `cause`, and neither it, its
/// sources' Display and Debug, nor any tracing line captured so far holds `password`.
fn assert_denied(what: &str, e: &Error, kind: AccessKind, cause: &str, password: &str) {
    // What a caller sees, in the test's output (the README quotes these).
    println!("{what}: {e}");
    match e {
        Error::AccessDenied { kind: k, .. } if *k == kind => {}
        other => panic!("{what}: want AccessDenied({kind:?}), got {other:?}"),
    }
    assert!(!e.is_retryable(), "{what}: {e:?}");
    let shown = e.to_string();
    assert!(shown.contains(&kind.to_string()), "{what}: {shown}");
    assert!(
        shown.to_lowercase().contains(&cause.to_lowercase()),
        "{what}: the message does not say '{cause}': {shown}"
    );
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = next {
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(
                !text.contains(password),
                "{what} shows the password: {text}"
            );
        }
        next = e.source();
    }
    for line in capture::lines() {
        assert!(
            !line.contains(password),
            "a tracing line shows the password: {line}"
        );
    }
}

/// The README's grants include SELECT on system_views.settings: without it the node's commit log
/// settings are unreadable, health says "commitlog_sync unknown" and require_durable refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_grants_let_writer_and_reader_read_the_commit_log_settings() {
    let Some(node) = Node::from_env() else { return };
    for role in [&node.writer, &node.reader] {
        let health = node.store(role).await.health().await.expect("healthy");
        assert!(
            health.detail.contains("commitlog_sync batch"),
            "{}: {}",
            role.0,
            health.detail
        );
    }
    let url = format!(
        "{}&require_durable=true",
        node.url((&node.writer.0, &node.writer.1), &node.keyspace, &node.ca)
    );
    let store = CassandraStore::from_url(&url).await.expect("builds");
    assert!(store.config().require_durable);
    append_fresh(&store)
        .await
        .expect("the writer connects with require_durable=true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_authentication_refusal() {
    let Some(node) = Node::from_env() else { return };
    capture::install();
    let wrong = format!("wrong-{}", Uuid::new_v4().simple());
    let url = node.url((&node.writer.0, &wrong), &node.keyspace, &node.ca);
    let store = CassandraStore::from_url(&url).await.expect("builds");
    let started = Instant::now();
    let e = append_fresh(&store).await.expect_err("a wrong password");
    assert_denied(
        "a wrong password",
        &e,
        AccessKind::Authentication,
        "password are incorrect",
        &wrong,
    );
    // Final: the store does not keep trying in the background, and a second call answers the
    // same way rather than hanging or turning into Unavailable.
    let again = append_fresh(&store).await.expect_err("still wrong");
    assert_denied(
        "a wrong password, again",
        &again,
        AccessKind::Authentication,
        "password are incorrect",
        &wrong,
    );
    assert!(started.elapsed() < BOUND, "{:?}", started.elapsed());
    assert_denied(
        "health with a wrong password",
        &store.health().await.expect_err("a wrong password"),
        AccessKind::Authentication,
        "password are incorrect",
        &wrong,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_is_an_authentication_refusal() {
    let Some(node) = Node::from_env() else { return };
    capture::install();
    let user = format!("nobody_{}", Uuid::new_v4().simple());
    let password = format!("pw-{}", Uuid::new_v4().simple());
    let url = node.url((&user, &password), &node.keyspace, &node.ca);
    let store = CassandraStore::from_url(&url).await.expect("builds");
    let e = append_fresh(&store).await.expect_err("an unknown user");
    assert_denied(
        "an unknown user",
        &e,
        AccessKind::Authentication,
        "password are incorrect",
        &password,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_a_tls_refusal() {
    let Some(node) = Node::from_env() else { return };
    capture::install();
    let (user, password) = &node.writer;
    // Trust only a CA that signed nothing the node uses.
    let url = node.url((user, password), &node.keyspace, &node.untrusted_ca);
    let store = CassandraStore::from_url(&url).await.expect("builds");
    let e = append_fresh(&store)
        .await
        .expect_err("an untrusted certificate");
    assert_denied(
        "an untrusted certificate",
        &e,
        AccessKind::Tls,
        "certificate verify failed",
        password,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_permissions_is_an_authorization_refusal() {
    let Some(node) = Node::from_env() else { return };
    capture::install();
    // The keyspace exists (the writer below makes sure of its tables), the outsider may not
    // touch it.
    append_fresh(&node.store(&node.writer).await)
        .await
        .expect("the writer appends");
    let store = node.store(&node.outsider).await;
    let e = append_fresh(&store)
        .await
        .expect_err("the outsider has no rights");
    assert_denied(
        "a role with no permission",
        &e,
        AccessKind::Authorization,
        "permission",
        &node.outsider.1,
    );
    // The writer's rights stop at its keyspace: another one, which exists, is refused.
    let (user, password) = &node.writer;
    let url = node.url((user, password), &node.other_keyspace, &node.ca);
    let store = CassandraStore::from_url(&url).await.expect("builds");
    let e = append_fresh(&store)
        .await
        .expect_err("the writer has no rights on the other keyspace");
    assert_denied(
        "the writer on another keyspace",
        &e,
        AccessKind::Authorization,
        "permission",
        password,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_reads_and_subscribes_but_cannot_append() {
    let Some(node) = Node::from_env() else { return };
    capture::install();
    let writer = node.store(&node.writer).await;
    let reader = node.store(&node.reader).await;
    let s = stream();
    writer
        .append(&s, ExpectedVersion::NoStream, vec![event(1), event(2)])
        .await
        .expect("the writer appends");

    let read = reader
        .read_to_vec(&s, ReadOptions::default())
        .await
        .expect("the reader reads");
    assert_eq!(read.len(), 2, "{read:?}");
    let mut sub = reader.subscribe(
        Selector::Stream(s.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let item = tokio::time::timeout(BOUND, sub.next())
            .await
            .expect("the subscription answers")
            .expect("the subscription goes on")
            .expect("the reader subscribes");
        seen.push(item);
    }
    assert!(
        matches!(
            seen.as_slice(),
            [
                SubscriptionItem::Event(a),
                SubscriptionItem::Event(b),
                SubscriptionItem::CaughtUp
            ] if a.version.0 == 0 && b.version.0 == 1
        ),
        "{seen:?}"
    );

    // The reader's appends, to the existing stream and to a new one, are refused; nothing is
    // stored, as the writer sees.
    let started = Instant::now();
    let e = tokio::time::timeout(
        BOUND,
        reader.append(&s, ExpectedVersion::Any, vec![event(3)]),
    )
    .await
    .expect("answers within the bound")
    .expect_err("the reader may not append");
    assert_denied(
        "the reader's append",
        &e,
        AccessKind::Authorization,
        "permission",
        &node.reader.1,
    );
    let fresh = stream();
    let e = tokio::time::timeout(
        BOUND,
        reader.append(&fresh, ExpectedVersion::NoStream, vec![event(1)]),
    )
    .await
    .expect("answers within the bound")
    .expect_err("the reader may not append");
    assert_denied(
        "the reader's append to a new stream",
        &e,
        AccessKind::Authorization,
        "permission",
        &node.reader.1,
    );
    assert!(started.elapsed() < BOUND, "{:?}", started.elapsed());
    let after = writer
        .read_to_vec(&s, ReadOptions::default())
        .await
        .unwrap();
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(writer.stream_version(&fresh).await.unwrap(), None);
    assert!(writer
        .read_to_vec(&fresh, ReadOptions::default())
        .await
        .unwrap()
        .is_empty());
    // Nothing the reader refused reached the live subscription either.
    let late = tokio::time::timeout(Duration::from_secs(2), sub.next()).await;
    assert!(late.is_err(), "{late:?}");
}

/// A reader loads registers (a serial read needs SELECT only) but cannot save one: its
/// conditional write is refused with `AccessDenied(Authorization)` naming the missing MODIFY,
/// within the bound, and the register keeps the writer's save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_loads_registers_but_cannot_save_them() {
    let Some(node) = Node::from_env() else { return };
    capture::install();
    let writer = node.store(&node.writer).await;
    let reader = node.store(&node.reader).await;
    let name = format!("secured-view-{}", Uuid::new_v4().simple());
    let id = Uuid::new_v4();
    writer
        .save_register(&name, None, id, Bytes::from("the writer's"))
        .await
        .expect("the writer saves");
    let saved = Register {
        revision: 0,
        save_id: id,
        value: Bytes::from("the writer's"),
    };
    assert_eq!(
        reader.load_register(&name).await.expect("the reader loads"),
        Some(saved.clone())
    );
    let never = format!("{name}-never");
    assert_eq!(reader.load_register(&never).await.unwrap(), None);

    let started = Instant::now();
    for (target, expected) in [(&name, Some(0)), (&never, None)] {
        let e = tokio::time::timeout(
            BOUND,
            reader.save_register(
                target,
                expected,
                Uuid::new_v4(),
                Bytes::from("the reader's"),
            ),
        )
        .await
        .expect("answers within the bound")
        .expect_err("the reader may not save");
        assert_denied(
            "the reader's save",
            &e,
            AccessKind::Authorization,
            "no MODIFY permission",
            &node.reader.1,
        );
    }
    assert!(started.elapsed() < BOUND, "{:?}", started.elapsed());
    assert_eq!(writer.load_register(&name).await.unwrap(), Some(saved));
    assert_eq!(writer.load_register(&never).await.unwrap(), None);
}

/// A subscriber of a category repairs the pending markers of writers that died between their
/// commit and their category rows (README, "Repair"): that writes, so a SELECT-only role cannot.
/// Its subscription then ends with `AccessDenied(Authorization)` naming the missing MODIFY
/// (rather than waiting forever, unseen, for someone else to repair); once a subscriber with the
/// writer's rights has repaired, the reader reads the category whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_cannot_repair_a_crashed_writer_and_says_so() {
    let Some(node) = Node::from_env() else { return };
    capture::install();
    let writer = node.store(&node.writer).await;
    let reader = node.store(&node.reader).await;
    let category = format!("crashed{}", Uuid::new_v4().simple());
    let s = StreamId::parse(format!("{category}-1")).unwrap();
    writer
        .append(&s, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .expect("the writer appends");
    writer.set_crash_after_commit(true);
    writer
        .append(
            &s,
            ExpectedVersion::Exact(photon_api::Version(0)),
            vec![event(1)],
        )
        .await
        .expect_err("the simulated crash");
    writer.set_crash_after_commit(false);
    // Past repair_after_ms (5 s): readers now repair the marker rather than wait for it.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let category = photon_api::Category::new(&category).unwrap();
    let selector = Selector::Category(category);
    let e = tokio::time::timeout(
        BOUND,
        reader.replay_to_vec(selector.clone(), Start::Beginning),
    )
    .await
    .expect("answers within the bound")
    .expect_err("the reader may not repair");
    assert_denied(
        "the reader's repair",
        &e,
        AccessKind::Authorization,
        "MODIFY permission",
        &node.reader.1,
    );
    let repaired = writer
        .replay_to_vec(selector.clone(), Start::Beginning)
        .await
        .expect("the writer repairs");
    assert_eq!(repaired.len(), 2, "{repaired:?}");
    let read = reader
        .replay_to_vec(selector, Start::Beginning)
        .await
        .expect("repaired, the reader reads");
    assert_eq!(
        read.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        repaired.iter().map(|e| e.event_id).collect::<Vec<_>>()
    );
}

/// A client without credentials is refused at login; a plaintext client has its connection
/// reset by the TLS-only node, which the driver cannot tell from a node going away: that stays
/// `Unavailable`, but its message says to check the TLS settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_and_no_tls_say_what_is_missing() {
    let Some(node) = Node::from_env() else { return };
    capture::install();
    let url = format!(
        "cassandra://{}/{}?tls_ca={}&timeout_ms=2000",
        node.addr, node.keyspace, node.ca
    );
    let store = CassandraStore::from_url(&url).await.expect("builds");
    let e = append_fresh(&store).await.expect_err("no credentials");
    assert_denied(
        "no credentials",
        &e,
        AccessKind::Authentication,
        "Authentication is required",
        &node.writer.1,
    );
    let (user, password) = &node.writer;
    let url = format!(
        "cassandra://{user}:{password}@{}/{}?timeout_ms=2000",
        node.addr, node.keyspace
    );
    let store = CassandraStore::from_url(&url).await.expect("builds");
    let e = append_fresh(&store)
        .await
        .expect_err("plaintext to a TLS-only node");
    println!("plaintext: {e}");
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("set tls_ca or tls=true"), "{e}");
    assert!(!e.to_string().contains(password.as_str()), "{e}");
    assert!(!format!("{e:?}").contains(password.as_str()), "{e:?}");
}
