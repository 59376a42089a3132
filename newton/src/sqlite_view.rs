//! Views whose read model is a set of SQLite tables, exactly-once.
//!
//! A plain [`View`] that writes to its own database is at-least-once: the runner saves its
//! checkpoint elsewhere, so a crash between the write and the save repeats the write. Here the
//! checkpoint lives in the view's own database (table [`CHECKPOINT_TABLE`]) and is written in the
//! same transaction as the view's changes, so both land or neither does: a non-idempotent
//! `UPDATE total = total + amount` is applied exactly once per event.
//!
//! This module owns the connection (on a thread of its own, since `rusqlite` blocks) and the
//! transaction; it reuses [`ViewRunner`] for subscriptions, status, failure policy and lag by
//! plugging in as both the view ([`SqliteAdapter`]) and the runner's checkpoint store. The
//! runner's batches (`save_every`, `save_interval`) are the transactions, so a replay is one
//! fsync per batch, not per event.

// The runner's errors carry the store's error unboxed; errors are the cold path.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use photon_api::{
    BoxError, Category, Checkpoint, Error, EventStore, ExpectedVersion, RecordedEvent, StreamId,
    Uuid, Version,
};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint_store::{CheckpointStore, Loaded, SavedView};
use crate::failure::FailurePolicy;
use crate::view::{RunnerOptions, View, ViewError, ViewHandle, ViewRunner};

/// The table holding each SQLite view's checkpoint, in the view's own database: one row per view
/// name with its positions (MessagePack), revision and the id of the save that wrote it.
pub const CHECKPOINT_TABLE: &str = "newton_checkpoints";

/// The backend name in the [`Error::Backend`] that carries a [`SqliteViewError`] through the
/// runner.
pub const SQLITE_BACKEND: &str = "sqlite";

/// How long a statement waits for another connection's lock on the database file before failing
/// with `SQLITE_BUSY`: a reader in another process should delay the view, not stop it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A read model kept in SQLite tables, written exactly once per event.
///
/// The handler runs on the database's own thread (never on an async worker), inside the open
/// transaction of the current batch; each event runs in a savepoint, so an event the handler
/// refuses leaves no partial change, whether the policy retries, skips, parks or stops.
///
/// [`ViewHandle::rebuild`] does not clear the view's tables (newton does not know them), so it
/// would apply every event again: rebuild by a new view name, or by deleting the tables' rows
/// and the view's checkpoint row while it is stopped.
pub trait SqliteView: Send + Sync + 'static {
    /// Unique name including its version, e.g. `totals-v1`: the key of its checkpoint row.
    /// Allowed characters are those of a stream id (letters, digits, `_ - . : @`).
    fn name(&self) -> &str;

    /// The categories it reads.
    fn categories(&self) -> Vec<Category>;

    /// What an event `handle` refuses does (see [`View::failure_policy`]); the default stops.
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::default()
    }

    /// Creates the view's tables (`CREATE TABLE IF NOT EXISTS ...`), in the transaction that
    /// creates the checkpoint table, when the runner opens the database.
    ///
    /// # Errors
    /// - A SQLite error: the view does not start ([`SqliteViewError::Open`]).
    fn migrate(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let _ = tx;
        Ok(())
    }

    /// Applies one event to the tables through `tx`, the batch's open transaction. It commits
    /// with the view's checkpoint, so a non-idempotent change is applied exactly once.
    ///
    /// # Errors
    /// - Any error is a refusal, dealt with by [`Self::failure_policy`]; the event's changes are
    ///   rolled back to before it first. A panic is a refusal too (caught on the database thread).
    ///   A [`photon_api::Error::Decode`] (e.g. from
    ///   `event.decode()?`) is a [`ViewError::Decode`], not retried.
    fn handle(&self, tx: &Transaction<'_>, event: &RecordedEvent) -> Result<(), BoxError>;
}

/// A SQLite failure, naming the view and what was being done; it reaches the caller as the
/// source of a [`ViewError`] (downcast it from [`ViewError::Handler`]'s source, or from the
/// [`Error::Backend`] of a [`ViewError::Store`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteViewError {
    /// The database could not be opened or its tables created.
    #[error("sqlite view {view}: opening {path}: {source}")]
    Open {
        /// The view.
        view: String,
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The transaction or savepoint around one event failed (not the handler itself).
    #[error("sqlite view {view}: {stream}@{version}: {what}: {source}")]
    Event {
        /// The view.
        view: String,
        /// The event's stream.
        stream: StreamId,
        /// The event's version.
        version: Version,
        /// What was being done, e.g. `beginning the batch's transaction`.
        what: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Reading the view's checkpoint row failed.
    #[error("sqlite view {view}: loading its checkpoint from {CHECKPOINT_TABLE}: {source}")]
    Load {
        /// The view.
        view: String,
        /// SQLite's (or the decoder's) error.
        #[source]
        source: BoxError,
    },
    /// Writing the checkpoint or committing the batch failed: the batch is rolled back, nothing
    /// is saved past its first event, and the view stops.
    #[error("sqlite view {view}: committing the batch ({events} events): {source}")]
    Commit {
        /// The view.
        view: String,
        /// Events in the rolled-back batch.
        events: u64,
        /// SQLite's (or the encoder's) error.
        #[source]
        source: BoxError,
    },
    /// The database thread ended (its view stopped, or its database could not be opened): any
    /// open batch was rolled back.
    #[error("sqlite view {view}: the database thread ended; any open batch was rolled back")]
    Closed {
        /// The view.
        view: String,
    },
}

impl SqliteViewError {
    fn into_store(self, context: &str) -> Error {
        Error::backend(SQLITE_BACKEND, context.to_owned(), self)
    }
}

/// Starts [`SqliteView`]s: the store's events go to the view's handler in batches, each batch one
/// SQLite transaction ending with the view's checkpoint; at start the view resumes from the
/// checkpoint in its database, not from a [`CheckpointStore`].
#[derive(Clone)]
pub struct SqliteViewRunner {
    store: Arc<dyn EventStore>,
    path: PathBuf,
    options: RunnerOptions,
}

impl fmt::Debug for SqliteViewRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteViewRunner")
            .field("store", &self.store.backend())
            .field("path", &self.path)
            .field("options", &self.options)
            .finish()
    }
}

impl SqliteViewRunner {
    /// A runner reading `store` and writing to the SQLite database file at `path` (created if
    /// missing).
    pub fn new(store: Arc<dyn EventStore>, path: impl AsRef<Path>) -> Self {
        Self {
            store,
            path: path.as_ref().to_owned(),
            options: RunnerOptions::default(),
        }
    }

    /// Replaces the tuning: `save_every` and `save_interval` bound a batch (one transaction).
    pub fn with_options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// Starts the view: its database thread opens the file and creates the checkpoint table and
    /// the view's tables, then the view resumes from its checkpoint row. Dropping every handle
    /// (or a stop) ends it; an uncommitted batch is rolled back.
    ///
    /// # Errors
    /// - The errors of [`ViewRunner::start`]; [`ViewError::Store`] when the thread cannot start.
    /// - A database that cannot be opened or migrated fails the view (status `Failed`) with a
    ///   [`ViewError::Store`] whose [`Error::Backend`] holds [`SqliteViewError::Open`]: opening
    ///   blocks, so it happens on the database thread, not in this call.
    pub fn start<V: SqliteView>(&self, view: V) -> Result<ViewHandle<SqliteAdapter<V>>, ViewError> {
        let view = Arc::new(view);
        let name = view.name().to_owned();
        let db = Database::open(view.clone(), &self.path).map_err(|source| ViewError::Store {
            view: name.clone(),
            source,
        })?;
        let checkpoints = Arc::new(SqliteCheckpoints { db: db.clone() });
        ViewRunner::new(self.store.clone(), checkpoints)
            .with_options(self.options)
            .start(SqliteAdapter { view, db })
    }
}

/// A [`SqliteView`] as the runner sees it: a [`View`] with no in-memory state, whose `handle`
/// runs the SQLite handler on the database thread.
pub struct SqliteAdapter<V> {
    view: Arc<V>,
    db: Database,
}

impl<V: SqliteView> fmt::Debug for SqliteAdapter<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteAdapter")
            .field("view", &self.view.name())
            .finish()
    }
}

#[async_trait]
impl<V: SqliteView> View for SqliteAdapter<V> {
    type State = ();

    fn name(&self) -> &str {
        self.view.name()
    }

    fn categories(&self) -> Vec<Category> {
        self.view.categories()
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.view.failure_policy()
    }

    async fn handle(&self, _state: &mut (), event: &RecordedEvent) -> Result<(), BoxError> {
        let (reply, answer) = oneshot::channel();
        self.db.request(Request::Handle {
            event: event.clone(),
            reply,
        })?;
        answer.await.map_err(|_| self.db.closed())?
    }
}

/// The runner's checkpoint store for one SQLite view: reads and commits through the database
/// thread, so a save is the commit of the batch's transaction.
#[derive(Debug)]
struct SqliteCheckpoints {
    db: Database,
}

#[async_trait]
impl CheckpointStore for SqliteCheckpoints {
    async fn load(&self, _view: &str) -> Result<Option<Loaded>, Error> {
        let (reply, answer) = oneshot::channel();
        self.db
            .request(Request::Load { reply })
            .map_err(|e| e.into_store("loading the checkpoint"))?;
        answer
            .await
            .map_err(|_| self.db.closed().into_store("loading the checkpoint"))?
    }

    async fn save(
        &self,
        _view: &str,
        saved: &SavedView,
        expected: Option<u64>,
        save_id: Uuid,
    ) -> Result<u64, Error> {
        let (reply, answer) = oneshot::channel();
        self.db
            .request(Request::Commit {
                positions: saved.positions.clone(),
                expected,
                save_id,
                reply,
            })
            .map_err(|e| e.into_store("committing the batch"))?;
        answer
            .await
            .map_err(|_| self.db.closed().into_store("committing the batch"))?
    }
}

// Most requests are `Handle`s, so boxing the event would add an allocation per event to spare
// the rare loads and commits a few bytes.
#[allow(clippy::large_enum_variant)]
enum Request {
    Load {
        reply: oneshot::Sender<Result<Option<Loaded>, Error>>,
    },
    Handle {
        event: RecordedEvent,
        reply: oneshot::Sender<Result<(), BoxError>>,
    },
    Commit {
        positions: BTreeMap<String, Checkpoint>,
        expected: Option<u64>,
        save_id: Uuid,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
}

/// The sending side of the database thread; the thread ends (rolling back an open batch) when
/// the last clone is dropped.
#[derive(Clone)]
struct Database {
    view: Arc<str>,
    requests: mpsc::UnboundedSender<Request>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("view", &self.view)
            .finish()
    }
}

impl Database {
    /// Starts the database thread, which opens and migrates the file off the async workers (a
    /// rival's lock can hold it for [`BUSY_TIMEOUT`]); an open failure answers the runner's
    /// first request, its checkpoint load.
    fn open<V: SqliteView>(view: Arc<V>, path: &Path) -> Result<Self, Error> {
        let name: Arc<str> = Arc::from(view.name());
        let (requests, receiver) = mpsc::unbounded_channel();
        let thread = Thread {
            view,
            name: name.clone(),
        };
        let path = path.to_owned();
        std::thread::Builder::new()
            .name(format!("sqlite-view-{name}"))
            .spawn(move || thread.start(&path, receiver))
            .map_err(|e| {
                Error::backend(
                    SQLITE_BACKEND,
                    format!("starting the database thread of view {name}"),
                    e,
                )
            })?;
        Ok(Self {
            view: name,
            requests,
        })
    }

    fn request(&self, request: Request) -> Result<(), SqliteViewError> {
        self.requests.send(request).map_err(|_| self.closed())
    }

    fn closed(&self) -> SqliteViewError {
        SqliteViewError::Closed {
            view: self.view.to_string(),
        }
    }
}

/// The database thread: owns the connection and the open batch's transaction.
struct Thread<V> {
    view: Arc<V>,
    name: Arc<str>,
}

impl<V: SqliteView> Thread<V> {
    fn start(self, path: &Path, mut requests: mpsc::UnboundedReceiver<Request>) {
        // Switching a new file to WAL takes a lock SQLite does not wait for (no busy handler),
        // so two runners opening one new file at once retry here, within the busy timeout.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        let opened = loop {
            match self.open(path) {
                Err(SqliteViewError::Open { source, .. })
                    if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                opened => break opened,
            }
        };
        match opened {
            Ok(conn) => self.run(conn, requests),
            Err(e) => {
                if let Some(request) = requests.blocking_recv() {
                    let e = e.into_store("opening the view's database");
                    match request {
                        Request::Load { reply } => drop(reply.send(Err(e))),
                        Request::Commit { reply, .. } => drop(reply.send(Err(e))),
                        Request::Handle { reply, .. } => drop(reply.send(Err(Box::new(e)))),
                    }
                }
                // Later requests find the thread gone.
            }
        }
    }

    /// Opens the file and creates the checkpoint table and the view's tables.
    fn open(&self, path: &Path) -> Result<Connection, SqliteViewError> {
        let open = |source| SqliteViewError::Open {
            view: self.name.to_string(),
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open)?;
        // WAL: readers of the read model do not block the view's commits, nor it them.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(open)?;
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (
                view TEXT PRIMARY KEY NOT NULL,
                positions BLOB NOT NULL,
                revision INTEGER NOT NULL,
                save_id TEXT NOT NULL
            )"
        ))
        .map_err(open)?;
        self.view.migrate(&tx).map_err(open)?;
        tx.commit().map_err(open)?;
        Ok(conn)
    }

    fn run(self, mut conn: Connection, mut requests: mpsc::UnboundedReceiver<Request>) {
        // Outside a batch: wait for its first event (or a load, or an empty commit).
        while let Some(request) = requests.blocking_recv() {
            let first = match request {
                Request::Load { reply } => {
                    let _ = reply.send(self.load(&conn));
                    continue;
                }
                Request::Commit { .. } | Request::Handle { .. } => request,
            };
            let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
                Ok(tx) => tx,
                Err(source) => {
                    self.refuse(first, "beginning the batch's transaction", source);
                    continue;
                }
            };
            // Inside a batch: events until the runner saves, which commits. A closed channel
            // (the view stopped or failed without saving) drops `tx`, which rolls back.
            let mut events = 0;
            let mut next = Some(first);
            loop {
                let request = match next.take() {
                    Some(request) => request,
                    None => match requests.blocking_recv() {
                        Some(request) => request,
                        None => return,
                    },
                };
                match request {
                    Request::Load { reply } => {
                        let _ = reply.send(self.load(&tx));
                    }
                    Request::Handle { event, reply } => {
                        events += 1;
                        let _ = reply.send(self.handle(&tx, &event));
                    }
                    Request::Commit {
                        positions,
                        expected,
                        save_id,
                        reply,
                    } => {
                        let _ = reply.send(self.commit(tx, &positions, expected, save_id, events));
                        break;
                    }
                }
            }
        }
    }

    /// Answers a request that could not start a batch.
    fn refuse(&self, request: Request, what: &'static str, source: rusqlite::Error) {
        match request {
            Request::Handle { event, reply } => {
                let _ = reply.send(Err(Box::new(SqliteViewError::Event {
                    view: self.name.to_string(),
                    stream: event.stream.clone(),
                    version: event.version,
                    what,
                    source,
                })));
            }
            Request::Commit { reply, .. } => {
                let _ = reply.send(Err(SqliteViewError::Commit {
                    view: self.name.to_string(),
                    events: 0,
                    source: Box::new(source),
                }
                .into_store("committing the batch")));
            }
            Request::Load { .. } => unreachable!("a load needs no batch"),
        }
    }

    fn load(&self, conn: &Connection) -> Result<Option<Loaded>, Error> {
        let failed = |source: BoxError| {
            SqliteViewError::Load {
                view: self.name.to_string(),
                source,
            }
            .into_store("loading the checkpoint")
        };
        let row = conn
            .query_row(
                &format!(
                    "SELECT positions, revision, save_id FROM {CHECKPOINT_TABLE} WHERE view = ?1"
                ),
                [&*self.name],
                |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| failed(Box::new(e)))?;
        let Some((positions, revision, save_id)) = row else {
            return Ok(None);
        };
        let positions = rmp_serde::from_slice(&positions).map_err(|e| failed(Box::new(e)))?;
        let save_id = Uuid::parse_str(&save_id).map_err(|e| failed(Box::new(e)))?;
        Ok(Some(Loaded {
            saved: SavedView {
                positions,
                // `()`, as the runner encodes it, so its state decodes.
                state: Bytes::from(rmp_serde::to_vec_named(&()).expect("() encodes")),
            },
            revision: revision as u64,
            save_id,
        }))
    }

    /// Runs the handler on one event inside a savepoint, so a refusal undoes only this event.
    fn handle(&self, tx: &Transaction<'_>, event: &RecordedEvent) -> Result<(), BoxError> {
        let failed = |what, source| -> BoxError {
            Box::new(SqliteViewError::Event {
                view: self.name.to_string(),
                stream: event.stream.clone(),
                version: event.version,
                what,
                source,
            })
        };
        tx.execute_batch("SAVEPOINT newton_event")
            .map_err(|e| failed("opening the event's savepoint", e))?;
        // A panicking handler refuses the event (rolled back like any refusal) rather than
        // ending the thread: a dead thread would fail every later event, and a skip or park
        // policy would then pass over events that were never refused.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.view.handle(tx, event)))
                .unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic");
                    Err(format!("the handler panicked: {message}").into())
                });
        match outcome {
            Ok(()) => tx
                .execute_batch("RELEASE newton_event")
                .map_err(|e| failed("releasing the event's savepoint", e)),
            Err(refused) => {
                tx.execute_batch("ROLLBACK TO newton_event; RELEASE newton_event")
                    .map_err(|e| failed("rolling back the refused event", e))?;
                Err(refused)
            }
        }
    }

    /// Writes the checkpoint row (fenced by revision) and commits the batch with it.
    fn commit(
        &self,
        tx: Transaction<'_>,
        positions: &BTreeMap<String, Checkpoint>,
        expected: Option<u64>,
        save_id: Uuid,
        events: u64,
    ) -> Result<u64, Error> {
        let failed = |source: BoxError| {
            SqliteViewError::Commit {
                view: self.name.to_string(),
                events,
                source,
            }
            .into_store("committing the batch")
        };
        let current = tx
            .query_row(
                &format!("SELECT revision, save_id FROM {CHECKPOINT_TABLE} WHERE view = ?1"),
                [&*self.name],
                |row| Ok((row.get::<_, i64>(0)? as u64, row.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(|e| failed(Box::new(e)))?;
        let save_id = save_id.to_string();
        match (&current, expected) {
            // A re-sent save that landed (cannot happen within one transaction, kept for the
            // contract).
            (Some((revision, id)), _) if *id == save_id => return Ok(*revision),
            (Some((revision, _)), Some(expected)) if *revision == expected => {}
            (None, None) => {}
            (actual, _) => {
                // Another runner committed since this one loaded: roll back, stop this one.
                return Err(Error::WrongExpectedVersion {
                    stream: StreamId::parse(format!("{CHECKPOINT_TABLE}-{}", self.name))
                        .map_err(|e| failed(Box::new(e)))?,
                    expected: match expected {
                        Some(v) => ExpectedVersion::Exact(Version::from(v)),
                        None => ExpectedVersion::NoStream,
                    },
                    actual: actual.as_ref().map(|(r, _)| Version::from(*r)),
                });
            }
        }
        let revision = expected.map_or(0, |r| r + 1);
        let positions = rmp_serde::to_vec_named(positions).map_err(|e| failed(Box::new(e)))?;
        tx.execute(
            &format!(
                "INSERT INTO {CHECKPOINT_TABLE} (view, positions, revision, save_id)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (view) DO UPDATE SET positions = excluded.positions,
                   revision = excluded.revision, save_id = excluded.save_id"
            ),
            rusqlite::params![&*self.name, positions, revision as i64, save_id],
        )
        .map_err(|e| failed(Box::new(e)))?;
        tx.commit().map_err(|e| failed(Box::new(e)))?;
        Ok(revision)
    }
}
