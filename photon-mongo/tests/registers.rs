//! Registers on a real server (`PHOTON_TEST_MONGO_URL`), beyond the shared conformance cases:
//! storage stays bounded however often a register is saved, the check after the insert
//! (`src/register.rs`, step 3) tells a stale insert (at a revision that was taken and deleted
//! again) from a save that others saved on top of, a refused insert is decided by who holds the
//! revision, and the answer does not wait for the cleanup. The races are made exact with
//! photon-faults' proxy: the one request of saver A that matters is held while saver B, on a
//! direct connection, saves.
//!
//! The cleanup runs after a save answered, so what is left stored is read with [`settled`].

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use photon_api::{Bytes, Error, Register, Uuid};
use photon_conformance::server_url;
use photon_faults::proxy::{FaultProxy, Hold};
use photon_mongo::MongoStore;

fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

fn fresh_prefix() -> String {
    format!("r{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A store on `url` with collections of its own (`prefix`).
async fn store(url: &str, prefix: &str) -> MongoStore {
    MongoStore::from_url(&with_options(url, &format!("photon_prefix={prefix}")))
        .await
        .unwrap()
}

/// The revisions stored for register `name`, read with nothing but the driver, ascending.
async fn stored_revisions(url: &str, prefix: &str, name: &str) -> Vec<i64> {
    let client = mongodb::Client::with_uri_str(url).await.unwrap();
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    let docs: Vec<Document> = db
        .collection::<Document>(&format!("{prefix}_registers"))
        .find(doc! { "name": name })
        .sort(doc! { "revision": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.iter()
        .map(|d| d.get_i64("revision").expect("an Int64 revision"))
        .collect()
}

/// The stored revisions once they are `wanted`; what they are after 10 s otherwise (the
/// cleanup runs after the save's answer, so a test waits for it rather than racing it).
async fn settled(url: &str, prefix: &str, name: &str, wanted: &[i64]) -> Vec<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stored = stored_revisions(url, prefix, name).await;
        if stored == wanted || tokio::time::Instant::now() > deadline {
            return stored;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The bytes of the check after the insert (`src/register.rs`, step 3): the only query whose
/// projection asks for `parent` (`"parent": Int32(1)`; an insert carries it as a UUID).
const CHECK: &[u8] = b"\x10parent\x00\x01\x00\x00\x00";

/// The bytes of a read of the latest revision: its projection `{_id: 1, revision: 1, save_id: 1}`
/// as the last elements of a document (the check after the insert also sorts by `revision: -1`,
/// and its projection goes on with `parent`; the holder read's has `_id: 0`).
const LATEST: &[u8] =
    b"\x10_id\x00\x01\x00\x00\x00\x10revision\x00\x01\x00\x00\x00\x10save_id\x00\x01\x00\x00\x00\x00";

/// The bytes of a `delete` command (the cleanup, the deletion of a stale insert, the check of
/// the `remove` permission).
const DELETE: &[u8] = b"\x02delete\x00";

#[tokio::test]
async fn storage_stays_bounded_however_often_a_register_is_saved() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = store(&url, &prefix).await;
    let name = "view/orders#0";
    let mut revision = None;
    let mut most = 0;
    for i in 0..200u64 {
        let value = Bytes::from(format!("checkpoint {i}"));
        revision = Some(
            store
                .save_register(name, revision, Uuid::new_v4(), value)
                .await
                .unwrap(),
        );
        if i % 20 == 19 {
            most = most.max(stored_revisions(&url, &prefix, name).await.len());
        }
    }
    assert_eq!(revision, Some(199));
    let left = settled(&url, &prefix, name, &[196, 197, 198, 199]).await;
    assert_eq!(
        left,
        [196, 197, 198, 199],
        "the latest four saves stay, nothing else"
    );
    // Four, and a fifth whose cleanup has not run yet.
    assert!(most <= 5, "up to {most} documents along the way");
    let loaded = store.load_register(name).await.unwrap().expect("saved");
    assert_eq!(
        (loaded.revision, loaded.value),
        (199, Bytes::from("checkpoint 199"))
    );
}

#[tokio::test]
async fn a_save_expecting_a_deleted_revision_is_refused_and_stores_nothing() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = store(&url, &prefix).await;
    let name = "lease";
    let mut revision = None;
    for _ in 0..=7 {
        revision = Some(
            store
                .save_register(name, revision, Uuid::new_v4(), Bytes::from("held"))
                .await
                .unwrap(),
        );
    }
    // Revision 2, which this save would claim, was deleted by the cleanup of revision 6.
    assert_eq!(
        settled(&url, &prefix, name, &[4, 5, 6, 7]).await,
        [4, 5, 6, 7]
    );
    let e = store
        .save_register(name, Some(1), Uuid::new_v4(), Bytes::from("stale"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::RevisionConflict {
                expected: Some(1),
                actual: Some(7),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        store.load_register(name).await.unwrap().map(|r| r.revision),
        Some(7)
    );
    assert_eq!(stored_revisions(&url, &prefix, name).await, [4, 5, 6, 7]);
}

/// The time the held saver may take: long enough to wait out its held request.
const HELD_TIMEOUT_MS: u64 = 20_000;

/// Saver A, whose requests go through a fresh fault proxy, and saver B on a direct connection,
/// both on collections of their own; with the proxy, the direct URL and the prefix.
async fn two_savers() -> Option<(FaultProxy, MongoStore, MongoStore, String, String)> {
    let url = server_url("mongo", "PHOTON_TEST_MONGO_URL")?;
    let rest = &url["mongodb://".len()..];
    let host = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let proxy = FaultProxy::start("127.0.0.1:0", host).await.unwrap();
    let prefix = fresh_prefix();
    let through = url.replacen(host, &proxy.local_addr().to_string(), 1);
    let a = MongoStore::from_url(&with_options(
        &through,
        &format!("photon_prefix={prefix}&photon_timeout_ms={HELD_TIMEOUT_MS}"),
    ))
    .await
    .unwrap();
    let b = store(&url, &prefix).await;
    Some((proxy, a, b, url, prefix))
}

/// Saves `count` revisions with `store` after `from` (None: from the start); the save ids.
async fn save_n(store: &MongoStore, name: &str, from: Option<u64>, count: u64) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut revision = from;
    for _ in 0..count {
        let id = Uuid::new_v4();
        revision = Some(
            store
                .save_register(name, revision, id, Bytes::from("b"))
                .await
                .unwrap(),
        );
        ids.push(id);
    }
    ids
}

/// A's save of `name` expecting `expected`, spawned (its requests can then be held in the proxy
/// while B saves).
fn spawn_save(
    a: &MongoStore,
    name: &'static str,
    expected: Option<u64>,
    id: Uuid,
    value: Bytes,
) -> tokio::task::JoinHandle<Result<u64, Error>> {
    let a = a.clone();
    tokio::spawn(async move { a.save_register(name, expected, id, value).await })
}

/// Waits until the request `hold` waits for (`what`) reached the proxy.
async fn reached(hold: &Hold, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), hold.matched())
        .await
        .unwrap_or_else(|_| panic!("{what} never reached the proxy"));
}

/// The answer of a spawned save, once released.
async fn answer_of(held: tokio::task::JoinHandle<Result<u64, Error>>) -> Result<u64, Error> {
    tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("A answers")
        .unwrap()
}

/// `answer` is the conflict of a save that expected `expected`, with the register at `actual`.
fn assert_conflict(answer: &Result<u64, Error>, expected: Option<u64>, actual: u64) {
    assert!(
        matches!(
            answer,
            Err(Error::RevisionConflict { expected: e, actual: Some(a), .. })
                if *e == expected && *a == actual
        ),
        "{answer:?}"
    );
}

/// A saves expecting revision 1 and its insert of revision 2 is held; meanwhile B saves 2 to 6,
/// whose cleanup deletes revision 2 again. A's insert then lands at the free revision 2, below
/// the register: the check after the insert finds revision 3, saved on top of B's 2, so A's
/// save is refused and its document deleted. Without that check A would answer Ok(2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_at_a_revision_deleted_meanwhile_is_refused_and_removed() {
    let Some((proxy, a, b, url, prefix)) = two_savers().await else {
        return;
    };
    let name = "view/stale";
    save_n(&b, name, None, 2).await;
    a.load_register(name).await.unwrap(); // A's index check, before anything is held.

    let mark = Uuid::new_v4().simple().to_string();
    let hold = proxy.hold_next(mark.as_bytes());
    let held = spawn_save(&a, name, Some(1), Uuid::new_v4(), Bytes::from(mark.clone()));
    reached(&hold, "A's insert").await;
    save_n(&b, name, Some(1), 5).await;
    assert_eq!(
        settled(&url, &prefix, name, &[3, 4, 5, 6]).await,
        [3, 4, 5, 6]
    );
    hold.release();

    let answer = answer_of(held).await;
    assert_conflict(&answer, Some(1), 6);
    let loaded = a.load_register(name).await.unwrap().expect("saved");
    assert_eq!((loaded.revision, loaded.value), (6, Bytes::from("b")));
    assert_eq!(
        settled(&url, &prefix, name, &[3, 4, 5, 6]).await,
        [3, 4, 5, 6]
    );
}

/// As above, but B saves up to 7, so the revision just above A's (3) is deleted too. A's own
/// document is still stored, which a save on top of A's would have had deleted with it: A's is
/// stale, refused and removed. Without that look at its own document A would answer
/// `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_further_below_the_register_is_refused_and_removed() {
    let Some((proxy, a, b, url, prefix)) = two_savers().await else {
        return;
    };
    let name = "view/far-below";
    save_n(&b, name, None, 2).await;
    a.load_register(name).await.unwrap();

    let mark = Uuid::new_v4().simple().to_string();
    let hold = proxy.hold_next(mark.as_bytes());
    let held = spawn_save(&a, name, Some(1), Uuid::new_v4(), Bytes::from(mark.clone()));
    reached(&hold, "A's insert").await;
    save_n(&b, name, Some(1), 6).await;
    assert_eq!(
        settled(&url, &prefix, name, &[4, 5, 6, 7]).await,
        [4, 5, 6, 7]
    );
    hold.release();

    let answer = answer_of(held).await;
    assert_conflict(&answer, Some(1), 7);
    assert_eq!(
        settled(&url, &prefix, name, &[4, 5, 6, 7]).await,
        [4, 5, 6, 7]
    );
}

/// A's stale insert lands at 2 (B is at 7), and before A's check runs (held) B saves 8, whose
/// cleanup deletes A's document. Nothing left tells whether A's save was ever the latest: A
/// answers `Unavailable`, and its re-send the conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_whose_evidence_was_cleaned_up_answers_unavailable() {
    let Some((proxy, a, b, url, prefix)) = two_savers().await else {
        return;
    };
    let name = "view/overtaken";
    save_n(&b, name, None, 2).await;
    a.load_register(name).await.unwrap();

    let mark = Uuid::new_v4().simple().to_string();
    let insert = proxy.hold_next(mark.as_bytes());
    let check = proxy.hold_next(CHECK);
    let id = Uuid::new_v4();
    let held = spawn_save(&a, name, Some(1), id, Bytes::from(mark.clone()));
    reached(&insert, "A's insert").await;
    save_n(&b, name, Some(1), 6).await;
    assert_eq!(
        settled(&url, &prefix, name, &[4, 5, 6, 7]).await,
        [4, 5, 6, 7]
    );
    insert.release();
    tokio::time::timeout(Duration::from_secs(10), check.matched())
        .await
        .expect("A's check reached the proxy");
    assert_eq!(stored_revisions(&url, &prefix, name).await, [2, 4, 5, 6, 7]);
    save_n(&b, name, Some(7), 1).await;
    assert_eq!(
        settled(&url, &prefix, name, &[5, 6, 7, 8]).await,
        [5, 6, 7, 8]
    );
    check.release();

    let answer = answer_of(held).await;
    assert!(
        matches!(answer, Err(Error::Unavailable { .. })),
        "{answer:?}"
    );
    let resent = a
        .save_register(name, Some(1), id, Bytes::from(mark))
        .await
        .unwrap_err();
    assert!(
        matches!(
            resent,
            Error::RevisionConflict {
                actual: Some(8),
                ..
            }
        ),
        "{resent}"
    );
    assert_eq!(
        settled(&url, &prefix, name, &[5, 6, 7, 8]).await,
        [5, 6, 7, 8]
    );
}

/// A's save lands and is the latest; before A's check after the insert runs (held), B loads it
/// and saves two revisions on top. A's save was stored (B saw it as the latest), so A answers
/// its revision, not a conflict: the revision just above names A's save as its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_another_was_saved_on_top_of_answers_its_revision() {
    let Some((proxy, a, b, url, prefix)) = two_savers().await else {
        return;
    };
    let name = "view/on-top";
    save_n(&b, name, None, 2).await;
    a.load_register(name).await.unwrap();

    let hold = proxy.hold_next(CHECK);
    let id = Uuid::new_v4();
    let held = spawn_save(&a, name, Some(1), id, Bytes::from("a"));
    reached(&hold, "A's check").await;
    assert_eq!(
        b.load_register(name).await.unwrap(),
        Some(Register {
            revision: 2,
            save_id: id,
            value: Bytes::from("a"),
        })
    );
    save_n(&b, name, Some(2), 2).await;
    hold.release();

    let answer = answer_of(held).await;
    assert_eq!(answer.unwrap(), 2);
    assert_eq!(
        settled(&url, &prefix, name, &[1, 2, 3, 4]).await,
        [1, 2, 3, 4]
    );
    assert_eq!(
        a.load_register(name).await.unwrap().map(|r| r.revision),
        Some(4)
    );
}

/// As above, but B saves four revisions on top of A's before A's check runs, and the cleanup
/// of the fourth deletes A's document: the revision just above, kept, still names A's save as
/// its parent, so A answers its revision. With two revisions kept (and the check spread over
/// several reads), A answered `Unavailable` here: the contention test's unknown outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_four_others_were_saved_on_top_of_answers_its_revision() {
    let Some((proxy, a, b, url, prefix)) = two_savers().await else {
        return;
    };
    let name = "view/four-on-top";
    save_n(&b, name, None, 2).await;
    a.load_register(name).await.unwrap();

    let hold = proxy.hold_next(CHECK);
    let id = Uuid::new_v4();
    let held = spawn_save(&a, name, Some(1), id, Bytes::from("a"));
    reached(&hold, "A's check").await;
    save_n(&b, name, Some(2), 4).await;
    assert_eq!(
        settled(&url, &prefix, name, &[3, 4, 5, 6]).await,
        [3, 4, 5, 6]
    );
    hold.release();

    let answer = answer_of(held).await;
    assert_eq!(answer.unwrap(), 2);
    assert_eq!(
        settled(&url, &prefix, name, &[3, 4, 5, 6]).await,
        [3, 4, 5, 6]
    );
}

/// A stale save (as in the first held test) whose next read of the latest revision would be
/// held until its time runs out: the conflict is certain once the check has shown the insert
/// stale, and the highest revision of that same check is the answer. Reading the latest again
/// after the check turned it into `Unavailable` after the whole timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_shown_stale_answers_the_conflict_without_reading_again() {
    let Some((proxy, a, b, url, prefix)) = two_savers().await else {
        return;
    };
    let name = "view/stale-no-reread";
    save_n(&b, name, None, 2).await;
    a.load_register(name).await.unwrap();

    let mark = Uuid::new_v4().simple().to_string();
    let insert = proxy.hold_next(mark.as_bytes());
    let held = spawn_save(&a, name, Some(1), Uuid::new_v4(), Bytes::from(mark.clone()));
    reached(&insert, "A's insert").await;
    // Every later read of A's of the latest revision is held (A's step 1 is done).
    let reread = proxy.hold_next(LATEST);
    save_n(&b, name, Some(1), 5).await;
    assert_eq!(
        settled(&url, &prefix, name, &[3, 4, 5, 6]).await,
        [3, 4, 5, 6]
    );
    insert.release();

    let answer = tokio::time::timeout(Duration::from_secs(8), held)
        .await
        .expect("A answers before its timeout, without reading the latest again")
        .unwrap();
    reread.release();
    assert_conflict(&answer, Some(1), 6);
    assert_eq!(
        settled(&url, &prefix, name, &[3, 4, 5, 6]).await,
        [3, 4, 5, 6]
    );
}

/// A's insert is refused by the unique index: held while B saves the same revision, A hears
/// `RevisionConflict` with B's revision at once (the holder is another save). An earlier send
/// of A's own save holding the revision (a re-send, on another client, lands first) answers
/// the revision: the re-send of the latest save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_insert_is_decided_by_who_holds_the_revision() {
    let Some((proxy, a, b, _url, _prefix)) = two_savers().await else {
        return;
    };
    let name = "view/refused";
    save_n(&b, name, None, 2).await;
    a.load_register(name).await.unwrap();

    // Another's save holds revision 2.
    let mark = Uuid::new_v4().simple().to_string();
    let insert = proxy.hold_next(mark.as_bytes());
    let held = spawn_save(&a, name, Some(1), Uuid::new_v4(), Bytes::from(mark.clone()));
    reached(&insert, "A's insert").await;
    save_n(&b, name, Some(1), 1).await;
    insert.release();
    let answer = tokio::time::timeout(Duration::from_secs(8), held)
        .await
        .expect("A answers")
        .unwrap();
    assert_conflict(&answer, Some(1), 2);

    // A's own earlier send holds revision 3: B re-sends A's save (same id and value) while A's
    // first send is held; both answer 3.
    let mark = Uuid::new_v4().simple().to_string();
    let id = Uuid::new_v4();
    let insert = proxy.hold_next(mark.as_bytes());
    let held = spawn_save(&a, name, Some(2), id, Bytes::from(mark.clone()));
    reached(&insert, "A's insert").await;
    assert_eq!(
        b.save_register(name, Some(2), id, Bytes::from(mark.clone()))
            .await
            .unwrap(),
        3
    );
    insert.release();
    let answer = tokio::time::timeout(Duration::from_secs(8), held)
        .await
        .expect("A answers")
        .unwrap();
    assert_eq!(answer.unwrap(), 3);
    assert_eq!(
        a.load_register(name).await.unwrap(),
        Some(Register {
            revision: 3,
            save_id: id,
            value: Bytes::from(mark),
        })
    );
}

/// A re-send whose own insert lands only after its save was stored by another send and replaced:
/// A re-sends save X and reads revision 1 as the latest, and its insert of 2 is held; meanwhile
/// X is stored at 2 by another send (B's), B saves 3 to 6 on top of it and the cleanup of 6
/// deletes 2. A's insert then lands at 2, under revision 3 whose saver read X as the latest,
/// but X's *other* document: A's call stored nothing, and a re-send of a save another has
/// replaced is `RevisionConflict` (the contract), as on every other path. With `parent` a save
/// id, A answered Ok(2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_whose_insert_lands_after_its_save_was_replaced_is_a_conflict() {
    let Some((proxy, a, b, url, prefix)) = two_savers().await else {
        return;
    };
    let name = "view/resend-late";
    save_n(&b, name, None, 2).await;
    a.load_register(name).await.unwrap();

    let mark = Uuid::new_v4().simple().to_string();
    let id = Uuid::new_v4();
    let insert = proxy.hold_next(mark.as_bytes());
    let held = spawn_save(&a, name, Some(1), id, Bytes::from(mark.clone()));
    reached(&insert, "A's insert").await;
    assert_eq!(
        b.save_register(name, Some(1), id, Bytes::from(mark.clone()))
            .await
            .unwrap(),
        2
    );
    save_n(&b, name, Some(2), 4).await;
    assert_eq!(
        settled(&url, &prefix, name, &[3, 4, 5, 6]).await,
        [3, 4, 5, 6]
    );
    insert.release();

    let answer = answer_of(held).await;
    assert_conflict(&answer, Some(1), 6);
    // The same answer as a re-send now, which step 1 decides.
    let again = a
        .save_register(name, Some(1), id, Bytes::from(mark))
        .await
        .unwrap_err();
    assert!(
        matches!(
            again,
            Error::RevisionConflict {
                actual: Some(6),
                ..
            }
        ),
        "{again}"
    );
    assert_eq!(
        settled(&url, &prefix, name, &[3, 4, 5, 6]).await,
        [3, 4, 5, 6]
    );
}

/// The answer does not wait for the cleanup: with A's deletes held, its save that deletes old
/// revisions answers at once, and the cleanup completes once released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_answers_before_its_cleanup() {
    let Some((proxy, a, _b, url, prefix)) = two_savers().await else {
        return;
    };
    let name = "view/answer-first";
    // Revisions 0 to 3: nothing to delete yet.
    save_n(&a, name, None, 4).await;
    let cleanup = proxy.hold_next(DELETE);
    let started = std::time::Instant::now();
    let revision = tokio::time::timeout(
        Duration::from_secs(5),
        a.save_register(name, Some(3), Uuid::new_v4(), Bytes::from("4")),
    )
    .await
    .expect("the save answers while its cleanup is held")
    .unwrap();
    assert_eq!(revision, 4);
    eprintln!("answered in {:?} with the cleanup held", started.elapsed());
    tokio::time::timeout(Duration::from_secs(10), cleanup.matched())
        .await
        .expect("the cleanup was sent");
    assert_eq!(stored_revisions(&url, &prefix, name).await, [0, 1, 2, 3, 4]);
    cleanup.release();
    assert_eq!(
        settled(&url, &prefix, name, &[1, 2, 3, 4]).await,
        [1, 2, 3, 4]
    );
}

/// A store checks once, at its first save, that it may delete from the registers collection
/// (a `delete` matching nothing, before the first insert), so a role without `remove` is told at
/// once (`AccessDenied`) instead of storage growing; a store that only loads never deletes.
/// FerretDB 1.24 has no roles, so the refusal itself is not shown here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_save_checks_that_old_revisions_may_be_deleted() {
    let Some((proxy, a, _b, _url, _prefix)) = two_savers().await else {
        return;
    };
    let name = "view/probe";
    let probe = proxy.hold_next(DELETE);
    assert_eq!(a.load_register(name).await.unwrap(), None);
    assert!(!probe.is_matched(), "a load deleted");
    let saved = {
        let a = a.clone();
        tokio::spawn(async move {
            a.save_register(name, None, Uuid::new_v4(), Bytes::new())
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), probe.matched())
        .await
        .expect("the first save checks the remove permission");
    probe.release();
    assert_eq!(saved.await.unwrap().unwrap(), 0);
}

#[tokio::test]
async fn without_creation_a_missing_index_is_named() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = MongoStore::from_url(&with_options(
        &url,
        &format!("photon_prefix={prefix}&photon_create=false"),
    ))
    .await
    .unwrap();
    let e = store.load_register("r").await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput { what, reason }
            if what.contains(&format!("{prefix}_registers")) && reason.contains("name_revision")),
        "{e}"
    );
}

/// Savers in separate clients, each loading and saving as fast as it can: no two saves are told
/// the same revision, every revision up to the last was answered to exactly one saver (or, after
/// an unknown outcome, to none), and the last one's value is its saver's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_savers_in_separate_clients_never_share_a_revision() {
    const SAVERS: usize = 5;
    const TRIES: usize = 40;
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let name = "lease/contended";
    let mut tasks = Vec::new();
    for saver in 0..SAVERS {
        let store = store(&url, &prefix).await;
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let (mut conflicts, mut unknown) = (0, 0);
            for _ in 0..TRIES {
                let current = store.load_register(name).await.unwrap().map(|r| r.revision);
                let value = Bytes::from(format!("{saver}"));
                match store
                    .save_register(name, current, Uuid::new_v4(), value)
                    .await
                {
                    Ok(revision) => won.push(revision),
                    Err(Error::RevisionConflict { .. }) => conflicts += 1,
                    Err(e @ Error::Unavailable { .. }) => {
                        eprintln!("saver {saver}: {e}");
                        unknown += 1
                    }
                    Err(e) => panic!("saver {saver}: {e}"),
                }
            }
            (saver, won, conflicts, unknown)
        }));
    }
    let mut answered = std::collections::BTreeMap::new();
    let (mut conflicts, mut unknown) = (0, 0);
    for task in tasks {
        let (saver, won, c, u) = task.await.unwrap();
        conflicts += c;
        unknown += u;
        for revision in won {
            assert!(
                answered.insert(revision, saver).is_none(),
                "revision {revision} answered to two saves"
            );
        }
    }
    let store = store(&url, &prefix).await;
    let last = store.load_register(name).await.unwrap().expect("saved");
    let (told, saves) = (answered.len() as u64, last.revision + 1);
    assert!(
        told <= saves && saves <= told + unknown,
        "{told} saves answered Ok and {unknown} Unavailable, the register is at {}",
        last.revision
    );
    if let Some(saver) = answered.get(&last.revision) {
        assert_eq!(last.value, Bytes::from(format!("{saver}")));
    }
    assert!(
        conflicts > 0,
        "the savers never collided; the test proves nothing"
    );
    // The latest four, once the cleanups (after the answers) have run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut left = stored_revisions(&url, &prefix, name).await;
    while left.len() > 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = stored_revisions(&url, &prefix, name).await;
    }
    assert!(left.len() <= 5, "{left:?} stored");
    eprintln!("{told} saves stored, {conflicts} conflicts, {unknown} unknown outcomes");
}
