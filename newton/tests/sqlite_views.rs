//! SQLite views: a non-idempotent `UPDATE total = total + amount` read model is exactly-once
//! across crashes, resumes from the checkpoint in its own database, reads several categories,
//! and each SQLite error path is typed. On memory, and on every server whose
//! `PHOTON_TEST_<BACKEND>_URL` is set (newton built with its feature).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use newton::rusqlite::{Connection, Transaction};
use newton::store::{EventData, ExpectedVersion};
use newton::{
    BoxError, Category, Error, EventStore, FailurePolicy, RecordedEvent, RunnerOptions, SqliteView,
    SqliteViewError, SqliteViewRunner, StreamId, ViewError, ViewStatus,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Added {
    amount: i64,
}

/// What the handler does besides adding.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Panics at this event (1-based count of handler calls): the process "crashes".
    PanicAt(u64),
    /// Adds, then refuses the event with this amount (its change must be rolled back).
    RefuseAmount(i64),
    /// Releases newton's savepoint itself, so newton's own release fails.
    ReleaseSavepoint,
}

struct Totals {
    name: String,
    categories: Vec<Category>,
    fault: Fault,
    policy: FailurePolicy,
    calls: Arc<AtomicU64>,
    /// Sleep per event, so a test can crash the process mid-batch.
    pause: Duration,
    /// Extra SQL run by `migrate` (e.g. a trigger that breaks the checkpoint write).
    extra_migration: &'static str,
}

impl Totals {
    fn new(name: &str, categories: &[&Category]) -> Self {
        Self {
            name: name.to_owned(),
            categories: categories.iter().map(|c| (*c).clone()).collect(),
            fault: Fault::None,
            policy: FailurePolicy::stop(),
            calls: Arc::default(),
            pause: Duration::ZERO,
            extra_migration: "",
        }
    }
}

impl SqliteView for Totals {
    fn name(&self) -> &str {
        &self.name
    }

    fn categories(&self) -> Vec<Category> {
        self.categories.clone()
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }

    fn migrate(&self, tx: &Transaction<'_>) -> newton::rusqlite::Result<()> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS totals (
                category TEXT PRIMARY KEY NOT NULL,
                total INTEGER NOT NULL,
                events INTEGER NOT NULL
            )",
        )?;
        tx.execute_batch(self.extra_migration)
    }

    fn handle(&self, tx: &Transaction<'_>, event: &RecordedEvent) -> Result<(), BoxError> {
        let Added { amount } = event.decode()?;
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Fault::PanicAt(at) = self.fault {
            assert!(call != at, "crash at event {call}");
        }
        std::thread::sleep(self.pause);
        let category = event.stream.category_name();
        tx.execute(
            "INSERT INTO totals (category, total, events) VALUES (?1, 0, 0)
             ON CONFLICT (category) DO NOTHING",
            [category],
        )?;
        // Not idempotent on purpose: a repeated event would count twice.
        tx.execute(
            "UPDATE totals SET total = total + ?1, events = events + 1 WHERE category = ?2",
            newton::rusqlite::params![amount, category],
        )?;
        match self.fault {
            Fault::RefuseAmount(refused) if refused == amount => {
                Err(format!("refusing amount {amount}").into())
            }
            Fault::ReleaseSavepoint => {
                tx.execute_batch("RELEASE newton_event")?;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A fresh database path in the system's temp dir.
fn database() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("newton-sqlite-{}", support::fresh_id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("read-model.db")
}

/// `(total, events)` of `category` as committed.
fn committed(path: &Path, category: &Category) -> (i64, i64) {
    let conn = Connection::open(path).unwrap();
    conn.query_row(
        "SELECT total, events FROM totals WHERE category = ?1",
        [category.as_str()],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .unwrap_or((0, 0))
}

fn category() -> Category {
    Category::new(format!("sq{}", support::fresh_id())).unwrap()
}

/// Appends `amounts` to one stream of `category`, one append each.
async fn append(store: &dyn EventStore, category: &Category, stream: &str, amounts: &[i64]) {
    let stream = StreamId::parse(format!("{category}-{stream}")).unwrap();
    for amount in amounts {
        let data = EventData::msgpack("Added", &Added { amount: *amount }).unwrap();
        store
            .append(&stream, ExpectedVersion::Any, vec![data])
            .await
            .unwrap();
    }
}

fn options(save_every: usize) -> RunnerOptions {
    RunnerOptions {
        save_every,
        // Long, so batches end by count or catch-up only, as each test decides.
        save_interval: Duration::from_secs(3600),
        retry_delay: Duration::from_millis(50),
    }
}

/// Waits until the view's status is `Failed`, and returns its error.
async fn failure<V: newton::View>(handle: &newton::ViewHandle<V>) -> Arc<ViewError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let ViewStatus::Failed(e) = handle.status() {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "the view did not fail: {:?}",
            handle.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `SqliteViewError` inside a view's error, wherever the runner put it.
fn sqlite_error(error: &ViewError) -> &SqliteViewError {
    let source: &(dyn std::error::Error + 'static) = match error {
        ViewError::Handler { source, .. } => source.as_ref(),
        ViewError::Store {
            source: Error::Backend { source, .. },
            ..
        } => source.as_ref(),
        other => panic!("not a SQLite error: {other:?}"),
    };
    source
        .downcast_ref::<SqliteViewError>()
        .unwrap_or_else(|| panic!("not a SqliteViewError: {error}"))
}

/// Each backend under test, as a way to connect a store (a new client per "process").
fn backends() -> Vec<(&'static str, Option<String>)> {
    let mut backends = vec![("memory", None)];
    backends.extend(support::servers().into_iter().map(|(b, u)| (b, Some(u))));
    backends
}

async fn connect(memory: &Arc<dyn EventStore>, url: &Option<String>) -> Arc<dyn EventStore> {
    match url {
        None => memory.clone(),
        Some(url) => newton::connect(url).await.unwrap(),
    }
}

/// A handler that panics at the 30th event, with batches of 20 (the first may be cut short by
/// the runner's first save tick): the committed batches' effects match their checkpoint, and the
/// events after it, applied in the open transaction, are rolled back when the view stops. After a
/// restart, the table holds exactly the sum of the events, and the restarted view handled only
/// the 30 events after its checkpoint.
async fn crash_in_handler_then_restart(store: Arc<dyn EventStore>) {
    let category = category();
    let amounts: Vec<i64> = (1..=50).collect();
    append(&*store, &category, "1", &amounts).await;
    let path = database();
    let runner = SqliteViewRunner::new(store.clone(), &path).with_options(options(20));

    let mut crashing = Totals::new("totals-v1", &[&category]);
    crashing.fault = Fault::PanicAt(30);
    let handle = runner.start(crashing).unwrap();
    let error = failure(&handle).await;
    match &*error {
        ViewError::Handler {
            view,
            stream,
            version,
            source,
        } => {
            assert_eq!(view, "totals-v1");
            assert_eq!(stream.category_name(), category.as_str());
            assert_eq!(version.value(), 29, "the 30th event");
            assert_eq!(
                source.to_string(),
                "the handler panicked: crash at event 30"
            );
        }
        other => panic!("{other:?}"),
    }
    drop(handle);
    // Whole batches only: the runner's first save tick may end the first batch early, so the
    // committed prefix is checked for consistency with itself rather than for its length.
    let (total, events) = committed(&path, &category);
    assert!(
        events < 30,
        "the crashed batch was rolled back: {events} committed"
    );
    assert_eq!(
        total,
        (1..=events).sum::<i64>(),
        "effects match the checkpoint"
    );
    let handle = runner
        .start(Totals::new("totals-v1", &[&category]))
        .unwrap();
    handle.wait_until_live().await.unwrap();
    assert_eq!(
        handle.handled(),
        50 - events as u64,
        "resumed after the committed checkpoint"
    );
    assert_eq!(committed(&path, &category), (amounts.iter().sum(), 50));
    handle.stop().await.unwrap();
}

/// The process dies mid-batch (its runtime is shut down while the handler is at an event): the
/// open batch is rolled back, nothing committed; a new process applies every event once.
fn crash_of_the_process_mid_batch(url: Option<String>) {
    let memory: Arc<dyn EventStore> = support::store();
    let category = category();
    let amounts: Vec<i64> = (1..=60).collect();
    let path = database();
    let calls = Arc::new(AtomicU64::new(0));

    let first = tokio::runtime::Runtime::new().unwrap();
    let handle = first.block_on(async {
        let store = connect(&memory, &url).await;
        append(&*store, &category, "a", &amounts).await;
        let mut view = Totals::new("totals-v1", &[&category]);
        view.pause = Duration::from_millis(5);
        view.calls = calls.clone();
        let runner = SqliteViewRunner::new(store, &path).with_options(options(1000));
        let handle = runner.start(view).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while calls.load(Ordering::SeqCst) < 25 {
            assert!(Instant::now() < deadline, "the view did not start handling");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        handle
    });
    // The crash: every task of the process ends where it is, with no stop and no save.
    first.shutdown_background();
    std::mem::forget(handle);
    // The database thread sees its channel close and rolls back; wait for its lock to go.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let conn = Connection::open(&path).unwrap();
        if conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK").is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the crashed batch still holds the database"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // At most the batch the runner's first save tick closed; never the one in hand.
    let (total, events) = committed(&path, &category);
    assert!(
        events < 25,
        "the open batch was rolled back: {events} committed"
    );
    assert_eq!(
        total,
        (1..=events).sum::<i64>(),
        "effects match the checkpoint"
    );

    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let store = connect(&memory, &url).await;
        let runner = SqliteViewRunner::new(store, &path).with_options(options(1000));
        let handle = runner
            .start(Totals::new("totals-v1", &[&category]))
            .unwrap();
        handle.wait_until_live().await.unwrap();
        assert_eq!(
            handle.handled(),
            60 - events as u64,
            "only what was not committed"
        );
        assert_eq!(committed(&path, &category), (amounts.iter().sum(), 60));
        handle.stop().await.unwrap();
    });
}

/// A view over two categories keeps one row per category and one checkpoint row holding both
/// positions; after a restart it reads only the events appended since, in either category.
async fn two_categories(store: Arc<dyn EventStore>) {
    let (deposits, fees) = (category(), category());
    append(&*store, &deposits, "1", &[10, 20]).await;
    append(&*store, &deposits, "2", &[30]).await;
    append(&*store, &fees, "1", &[1, 2, 3, 4]).await;
    let path = database();
    let runner = SqliteViewRunner::new(store.clone(), &path).with_options(options(3));
    let handle = runner
        .start(Totals::new("both-v1", &[&deposits, &fees]))
        .unwrap();
    handle.wait_until_live().await.unwrap();
    handle.stop().await.unwrap();
    assert_eq!(committed(&path, &deposits), (60, 3));
    assert_eq!(committed(&path, &fees), (10, 4));

    append(&*store, &deposits, "3", &[100]).await;
    append(&*store, &fees, "2", &[5]).await;
    let handle = runner
        .start(Totals::new("both-v1", &[&deposits, &fees]))
        .unwrap();
    handle.wait_until_live().await.unwrap();
    assert_eq!(handle.handled(), 2, "only the events after the checkpoint");
    handle.stop().await.unwrap();
    assert_eq!(committed(&path, &deposits), (160, 4));
    assert_eq!(committed(&path, &fees), (15, 5));
    let conn = Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row(
            "SELECT count(*) FROM newton_checkpoints WHERE view = 'both-v1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_after_a_handler_crash() {
    for (backend, url) in backends() {
        println!("backend {backend}");
        crash_in_handler_then_restart(connect(&support::store(), &url).await).await;
    }
}

#[test]
fn exactly_once_after_the_process_dies_mid_batch() {
    for (backend, url) in backends() {
        println!("backend {backend}");
        crash_of_the_process_mid_batch(url);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_over_two_categories_resumes_each() {
    for (backend, url) in backends() {
        println!("backend {backend}");
        two_categories(connect(&support::store(), &url).await).await;
    }
}

#[tokio::test]
async fn a_refused_event_is_rolled_back_before_the_policy_skips_it() {
    let store = support::store();
    let category = category();
    append(&*store, &category, "1", &[1, 13, 100]).await;
    let path = database();
    let mut view = Totals::new("skip-v1", &[&category]);
    view.fault = Fault::RefuseAmount(13);
    view.policy = FailurePolicy::skip();
    let handle = SqliteViewRunner::new(store, &path)
        .with_options(options(10))
        .start(view)
        .unwrap();
    handle.wait_until_live().await.unwrap();
    assert_eq!(handle.skipped(), 1);
    handle.stop().await.unwrap();
    assert_eq!(
        committed(&path, &category),
        (101, 2),
        "13's update rolled back"
    );
}

#[tokio::test]
async fn a_refused_event_under_stop_commits_nothing_of_its_batch() {
    let store = support::store();
    let category = category();
    append(&*store, &category, "1", &[1, 2, 13, 100]).await;
    let path = database();
    let mut view = Totals::new("stop-v1", &[&category]);
    view.fault = Fault::RefuseAmount(13);
    let runner = SqliteViewRunner::new(store, &path).with_options(options(2));
    let handle = runner.start(view).unwrap();
    let error = failure(&handle).await;
    match &*error {
        ViewError::Handler {
            view,
            stream,
            version,
            source,
        } => {
            assert_eq!(view, "stop-v1");
            assert_eq!(stream.as_str(), format!("{category}-1"));
            assert_eq!(version.value(), 2);
            assert_eq!(source.to_string(), "refusing amount 13");
        }
        other => panic!("{other:?}"),
    }
    // The batches before it only (the runner's first save tick may split them).
    let committed = committed(&path, &category);
    assert!(matches!(committed, (1, 1) | (3, 2)), "{committed:?}");
}

#[tokio::test]
async fn a_database_that_cannot_open_is_a_typed_error() {
    let store = support::store();
    // A directory is not a database file.
    let dir = database().parent().unwrap().to_owned();
    // Opening blocks, so it happens on the database thread: the view starts, then fails.
    let handle = SqliteViewRunner::new(store, &dir)
        .start(Totals::new("open-v1", &[&category()]))
        .unwrap();
    let error = failure(&handle).await;
    match sqlite_error(&error) {
        SqliteViewError::Open { view, path, .. } => {
            assert_eq!(view, "open-v1");
            assert_eq!(path, &dir);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_failed_commit_rolls_back_the_batch_and_stops() {
    let store = support::store();
    let category = category();
    append(&*store, &category, "1", &[1, 2, 3]).await;
    let path = database();
    let mut view = Totals::new("commit-v1", &[&category]);
    view.extra_migration = "CREATE TRIGGER IF NOT EXISTS no_checkpoints
        BEFORE INSERT ON newton_checkpoints BEGIN SELECT RAISE(ABORT, 'checkpoints refused'); END";
    let handle = SqliteViewRunner::new(store, &path)
        .with_options(options(10))
        .start(view)
        .unwrap();
    let error = failure(&handle).await;
    match sqlite_error(&error) {
        SqliteViewError::Commit {
            view,
            events,
            source,
        } => {
            assert_eq!(view, "commit-v1");
            assert!((1..=3).contains(events), "{events}");
            assert!(
                source.to_string().contains("checkpoints refused"),
                "{source}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(committed(&path, &category), (0, 0), "rolled back");
    assert!(matches!(&*error, ViewError::Store { view, .. } if view == "commit-v1"));
}

#[tokio::test]
async fn a_savepoint_failure_names_the_event() {
    let store = support::store();
    let category = category();
    append(&*store, &category, "1", &[5]).await;
    let path = database();
    let mut view = Totals::new("savepoint-v1", &[&category]);
    view.fault = Fault::ReleaseSavepoint;
    let handle = SqliteViewRunner::new(store, &path).start(view).unwrap();
    let error = failure(&handle).await;
    match sqlite_error(&error) {
        SqliteViewError::Event {
            view,
            stream,
            version,
            what,
            ..
        } => {
            assert_eq!(view, "savepoint-v1");
            assert_eq!(stream.as_str(), format!("{category}-1"));
            assert_eq!(version.value(), 0);
            assert_eq!(*what, "releasing the event's savepoint");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unreadable_checkpoint_is_a_typed_error() {
    let store = support::store();
    let category = category();
    let path = database();
    let handle = SqliteViewRunner::new(store.clone(), &path)
        .start(Totals::new("load-v1", &[&category]))
        .unwrap();
    handle.stop().await.unwrap();
    let conn = Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO newton_checkpoints VALUES ('load-v1', x'c1', 0, 'not a uuid')",
        [],
    )
    .unwrap();
    let handle = SqliteViewRunner::new(store, &path)
        .start(Totals::new("load-v1", &[&category]))
        .unwrap();
    let error = failure(&handle).await;
    assert!(
        matches!(sqlite_error(&error), SqliteViewError::Load { view, .. } if view == "load-v1"),
        "{error}"
    );
}

#[tokio::test]
async fn a_second_runner_of_the_same_view_is_fenced() {
    let store = support::store();
    let category = category();
    append(&*store, &category, "1", &[1, 2, 3]).await;
    let path = database();
    let runner = SqliteViewRunner::new(store.clone(), &path).with_options(options(1));
    let first = runner.start(Totals::new("fence-v1", &[&category])).unwrap();
    let second = runner.start(Totals::new("fence-v1", &[&category])).unwrap();
    // Both have the same revision once live (the later one loaded the earlier one's last
    // commit); both handle the next event: one commits first, the other finds a revision it
    // did not load and stops.
    // (If both loaded before either committed, one is fenced already: waiting ends there.)
    let _ = first.wait_until_live().await;
    let _ = second.wait_until_live().await;
    append(&*store, &category, "1", &[4]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let fenced = loop {
        match (first.status(), second.status()) {
            (ViewStatus::Failed(e), _) | (_, ViewStatus::Failed(e)) => break e,
            _ => {}
        }
        assert!(Instant::now() < deadline, "neither runner was fenced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        matches!(&*fenced, ViewError::Fenced { view, .. } if view == "fence-v1"),
        "{fenced}"
    );
}
