//! The keyspace's layout: its tables, every statement the store runs against them, prepared once
//! with the configured consistency, the creation (or, with `create=false`, the check) of the
//! tables (at connect, and of `registers` on its first use), and the layout settings every
//! client of a keyspace must share.
//!
//! The tables are public so that tools create and read exactly what the store does (an
//! operator creating the schema ahead of `create=false` clients, the benchmark's raw baseline);
//! the README's "Tables" section documents them: change both together. This module runs no
//! append or read itself (that is `writer`, `reader` and `subscription`).

use photon_api::Error;
use scylla::client::session::Session;
use scylla::errors::{DbError, PrepareError, RequestAttemptError};
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::unprepared::Statement;
use scylla::statement::{Consistency, SerialConsistency};

pub use crate::codec::{conditional_write_applied, max_time_id, min_time_id, time_id};
use crate::config::{CassandraConfig, Replication};
use crate::error;

/// One table of the store's keyspace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Table {
    /// The table's name.
    pub name: &'static str,
    /// Everything after `CREATE TABLE IF NOT EXISTS <keyspace>.<name>`.
    definition: &'static str,
}

impl Table {
    /// The statement creating this table in `keyspace`, as the store runs it (`IF NOT EXISTS`).
    pub fn create_cql(&self, keyspace: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.{} {}",
            self.name, self.definition
        )
    }
}

/// One row per append (a commit): the whole batch in one row of the stream's partition for that
/// range of versions (`bucket` = first version / `bucket_size`), written with `IF NOT EXISTS`.
/// A row with `count = 0` is a *void*: a repair's fence at the head of the stream, taken over by
/// the next append (`FILL_VOID`); readers skip it.
pub const COMMITS: Table = Table {
    name: "commits",
    definition: "(
            stream text, bucket bigint, version bigint,
            count int, time_id timeuuid, event_ids list<uuid>, events blob,
            PRIMARY KEY ((stream, bucket), version))",
};

/// Every commit again, by category (and `$all`) and time bucket, ordered by time id.
pub const CATEGORY_COMMITS: Table = Table {
    name: "category_commits",
    definition: "(
            category text, bucket bigint, time_id timeuuid,
            stream text, version bigint, count int, events blob,
            PRIMARY KEY ((category, bucket), time_id))",
};

/// The time buckets of each category that hold rows, so readers skip empty ones.
pub const CATEGORY_BUCKETS: Table = Table {
    name: "category_buckets",
    definition: "(
            category text, bucket bigint, PRIMARY KEY ((category), bucket))",
};

/// The streams of each category, for `list_streams`.
pub const STREAMS: Table = Table {
    name: "streams",
    definition: "(
            category text, stream text, PRIMARY KEY ((category), stream))",
};

/// The layout settings every client of the keyspace must share (`bucket_size`,
/// `time_bucket_s`).
pub const SETTINGS: Table = Table {
    name: "settings",
    definition: "(name text PRIMARY KEY, value bigint)",
};

/// Appends between their commit and their category rows (the pending markers).
pub const PENDING: Table = Table {
    name: "pending",
    definition: "(
            category text, bucket bigint, time_id timeuuid, stream text, version bigint,
            PRIMARY KEY ((category, bucket), time_id))
            WITH gc_grace_seconds = 3600",
};

/// Registers (`EventStore::save_register`): one row per register, overwritten in place by each
/// save (a conditional write on `revision`), so a register takes the same room after a million
/// saves as after one. Not an event: no category row, no stream listing. Not needed to connect:
/// created (or looked for, with `create=false`) on a client's first register call.
pub const REGISTERS: Table = Table {
    name: "registers",
    definition: "(name text PRIMARY KEY, revision bigint, save_id uuid, value blob)",
};

/// Every table of the keyspace, in creation order: what an operator creates ahead of
/// `create=false` clients. The last, `REGISTERS`, is not needed to connect (see
/// [`CONNECT_TABLES`]).
pub const TABLES: &[Table] = &[
    COMMITS,
    CATEGORY_COMMITS,
    CATEGORY_BUCKETS,
    STREAMS,
    SETTINGS,
    PENDING,
    REGISTERS,
];

/// The tables a client needs to connect (every table but `REGISTERS`), created at connect with
/// `create=true` and checked with `create=false`. `REGISTERS` is created (or looked for) on the
/// first `load_register` / `save_register` of a client instead, so that a keyspace made before
/// registers keeps serving its clients, readers and `create=false` ones included, until
/// something uses a register.
pub const CONNECT_TABLES: &[Table] = TABLES.split_at(TABLES.len() - 1).0;

/// The statement creating `keyspace` with `replication`, as the store runs it
/// (`IF NOT EXISTS`).
pub fn create_keyspace_cql(keyspace: &str, replication: &Replication) -> String {
    format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {}",
        replication.cql()
    )
}

/// The text of one statement the store runs, with `{ks}` where the keyspace goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Cql(&'static str);

impl Cql {
    /// The statement against `keyspace`.
    pub fn in_keyspace(self, keyspace: &str) -> String {
        self.0.replace("{ks}", keyspace)
    }
}

/// An append's commit row, conditional. Values: stream, bucket, first version, count, time id,
/// event ids, events.
pub const INSERT_COMMIT: Cql = Cql("INSERT INTO {ks}.commits (stream, bucket, version, count, time_id, event_ids, events) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS");

/// An append's commit row written over a *void* (the fence a repair leaves at a version whose
/// append it found absent), or a void renewed for another pending append: applies only while
/// the row is still the void of that time id, so a write prepared before the fence never lands.
/// Values: count, time id, event ids, events, stream, bucket, first version, the void's time id.
pub const FILL_VOID: Cql = Cql("UPDATE {ks}.commits SET count = ?, time_id = ?, event_ids = ?, events = ? WHERE stream = ? AND bucket = ? AND version = ? IF count = 0 AND time_id = ?");

/// A register's first save, conditional on the register not existing. Values: name, revision
/// (0), save id, value. Refused, it answers the whole row (what a re-send is told apart by).
pub const SAVE_FIRST_REGISTER: Cql = Cql(
    "INSERT INTO {ks}.registers (name, revision, save_id, value) VALUES (?, ?, ?, ?) IF NOT EXISTS",
);

/// A register's later save, conditional on the revision it replaces. Values: new revision, save
/// id, value, name, expected revision. The condition on `save_id` always holds (a save id is
/// never nil): it is there because a refused conditional write answers the columns of its
/// conditions, and the save id is what tells a re-send of the latest save from a rival's, so the
/// refusal is decided without a second round trip.
pub const SAVE_NEXT_REGISTER: Cql = Cql("UPDATE {ks}.registers SET revision = ?, save_id = ?, value = ? WHERE name = ? IF revision = ? AND save_id != 00000000-0000-0000-0000-000000000000");

/// A register's latest save, read with the serial consistency (see `register`). Values: name.
pub const LOAD_REGISTER: Cql =
    Cql("SELECT revision, save_id, value FROM {ks}.registers WHERE name = ?");

/// An append's row in one category (or `$all`). Values: category, time bucket, time id, stream,
/// first version, count, events.
pub const INSERT_CATEGORY_COMMIT: Cql = Cql("INSERT INTO {ks}.category_commits (category, bucket, time_id, stream, version, count, events) VALUES (?, ?, ?, ?, ?, ?, ?)");

/// One page of a stream partition's commits from a version up: a stream read. Values: stream,
/// bucket, version, limit.
pub const COMMITS_FROM: Cql = Cql("SELECT version, count, time_id, events FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version >= ? LIMIT ?");

/// One page of a category partition's commits after a time id, up to another: a category
/// replay. Values: category, time bucket, lower time id (exclusive), upper time id, limit.
pub const CATEGORY_PAGE: Cql = Cql("SELECT time_id, stream, version, count, events FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id > ? AND time_id <= ? LIMIT ?");

const CATEGORY_PAGE_INCL: Cql = Cql("SELECT time_id, stream, version, count, events FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id >= ? AND time_id <= ? LIMIT ?");
const COMMITS_DOWN_FROM: Cql = Cql("SELECT version, count, time_id, events FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version <= ? ORDER BY version DESC LIMIT ?");
/// The event counts of the next commits of a page (no events), so the page fetches only what
/// fits in `page_bytes`.
const COMMIT_COUNTS_FROM: Cql =
    Cql("SELECT count FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version >= ? LIMIT ?");
const COMMIT_COUNTS_DOWN_FROM: Cql = Cql("SELECT count FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version <= ? ORDER BY version DESC LIMIT ?");
const CATEGORY_COUNTS: Cql = Cql("SELECT count FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id > ? AND time_id <= ? LIMIT ?");
const CATEGORY_COUNTS_INCL: Cql = Cql("SELECT count FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id >= ? AND time_id <= ? LIMIT ?");
const COMMIT_IDS_FROM: Cql = Cql("SELECT version, count, time_id, event_ids FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version >= ?");
const COMMIT_AT_OR_BEFORE: Cql = Cql("SELECT version, count FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version <= ? ORDER BY version DESC LIMIT 1");
/// Whether a commit is stored at a version, and with which time id (no events).
const COMMIT_STATE_AT: Cql =
    Cql("SELECT count, time_id FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version = ?");
const COMMIT_AT: Cql = Cql(
    "SELECT count, time_id, events FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version = ?",
);
const INSERT_PENDING: Cql = Cql("INSERT INTO {ks}.pending (category, bucket, time_id, stream, version) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?");
const DELETE_PENDING: Cql = Cql(
    "DELETE FROM {ks}.pending USING TIMESTAMP ? WHERE category = ? AND bucket = ? AND time_id = ?",
);
/// The time ids of a category's rows in a range (what a `Start::Now` subscription finds stored).
const CATEGORY_TIMES: Cql = Cql("SELECT time_id FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id > ? AND time_id <= ? LIMIT ?");
/// The pending markers of a category in a range of time ids. Bounded above, so that a reader
/// far behind scans only the cleared markers' tombstones of the range it is about to read, not
/// those of the rest of the bucket (see `subscription::timeline_step`).
const PENDING_BETWEEN: Cql = Cql("SELECT time_id, stream, version FROM {ks}.pending WHERE category = ? AND bucket = ? AND time_id > ? AND time_id <= ?");
const INSERT_BUCKET: Cql =
    Cql("INSERT INTO {ks}.category_buckets (category, bucket) VALUES (?, ?)");
const BUCKETS_FROM: Cql = Cql("SELECT bucket FROM {ks}.category_buckets WHERE category = ? AND bucket >= ? AND bucket <= ? LIMIT 1");
/// The categories with a stored commit: `streams` is written only once a commit is stored
/// (with its category rows), while `category_buckets` is registered before the conditional
/// write, which may then fail.
const CATEGORIES: Cql = Cql("SELECT DISTINCT category FROM {ks}.streams");
const INSERT_STREAM: Cql = Cql("INSERT INTO {ks}.streams (category, stream) VALUES (?, ?)");
const STREAMS_OF: Cql = Cql("SELECT stream FROM {ks}.streams WHERE category = ?");
const RECORD_SETTING: Cql =
    Cql("INSERT INTO {ks}.settings (name, value) VALUES (?, ?) IF NOT EXISTS");
const READ_SETTING: Cql = Cql("SELECT value FROM {ks}.settings WHERE name = ?");

/// Every statement the store runs, prepared.
pub(crate) struct Statements {
    pub(crate) insert_commit: PreparedStatement,
    pub(crate) fill_void: PreparedStatement,
    pub(crate) commit_ids_from: PreparedStatement,
    pub(crate) commit_ids_from_serial: PreparedStatement,
    pub(crate) commit_at_or_before: PreparedStatement,
    pub(crate) commit_at_serial: PreparedStatement,
    /// At the configured consistency: what a committed append left, without a Paxos round.
    pub(crate) commit_at: PreparedStatement,
    /// At the configured consistency: the count and time id at a version.
    pub(crate) commit_state_at: PreparedStatement,
    pub(crate) commits_from: PreparedStatement,
    pub(crate) commits_down_from: PreparedStatement,
    pub(crate) commit_counts_from: PreparedStatement,
    pub(crate) commit_counts_down_from: PreparedStatement,
    pub(crate) category_counts: PreparedStatement,
    pub(crate) category_counts_incl: PreparedStatement,
    /// A pending marker, for the batches that write a group of appends' markers.
    pub(crate) insert_pending: PreparedStatement,
    /// A time bucket's registration.
    pub(crate) insert_bucket: PreparedStatement,
    /// Both markers' deletes.
    pub(crate) clear_pending: Batch,
    /// One marker's delete, for the batches that clear a group of commits' markers.
    pub(crate) delete_pending: PreparedStatement,
    pub(crate) insert_category: PreparedStatement,
    pub(crate) insert_stream: PreparedStatement,
    pub(crate) pending_in: PreparedStatement,
    pub(crate) category_page: PreparedStatement,
    pub(crate) category_page_incl: PreparedStatement,
    pub(crate) category_times: PreparedStatement,
    pub(crate) buckets_from: PreparedStatement,
    pub(crate) categories: PreparedStatement,
    pub(crate) streams: PreparedStatement,
}

/// The statements of `registers`, prepared on a client's first use of a register (see
/// [`prepare_register_statements`]).
pub(crate) struct RegisterStatements {
    pub(crate) save_first: PreparedStatement,
    pub(crate) save_next: PreparedStatement,
    /// With the serial consistency: linearizable.
    pub(crate) load: PreparedStatement,
}

/// Prepares `cql` in the configured keyspace as the store prepares its statements: the
/// configured consistency and serial consistency, and `timeout_ms` as the request timeout.
///
/// # Errors
/// - [`Error::Unavailable`] when the cluster cannot be reached; [`Error::Backend`] (with the
///   driver's error as its source) when the server refuses the statement.
pub async fn prepare(
    session: &Session,
    config: &CassandraConfig,
    cql: Cql,
) -> Result<PreparedStatement, Error> {
    prepare_with(session, config, cql, config.consistency).await
}

async fn prepare_with(
    session: &Session,
    config: &CassandraConfig,
    cql: Cql,
    consistency: Consistency,
) -> Result<PreparedStatement, Error> {
    let text = cql.in_keyspace(&config.keyspace);
    let p = session
        .prepare(text.as_str())
        .await
        .map_err(|e| error::request(format!("preparing {text}"), e))?;
    Ok(configured(p, config, consistency))
}

fn configured(
    mut p: PreparedStatement,
    config: &CassandraConfig,
    consistency: Consistency,
) -> PreparedStatement {
    p.set_consistency(consistency);
    p.set_serial_consistency(Some(config.serial_consistency));
    p.set_request_timeout(Some(config.timeout));
    p
}

/// A preparation of statements on `tables`, which this client has just created or found listed
/// in `system_schema`. A table another client has just created can be listed a moment before
/// the node prepares statements on it (seen on Cassandra 5.0 with clients connecting at once to
/// a keyspace without `registers`, one creating it): the node refuses the prepare with "table
/// registers does not exist" (`Invalid`), or, while it still sets up the table's storage, "Unknown
/// CF <id>" (`ServerError`). Those refusals, and only those, are tried again every 50 ms until
/// one deadline (`timeout_ms` from the start of the whole preparation); a refusal still there
/// at the deadline is `Unavailable` (the table is not ready on the node yet; a later call tries
/// again). Any other refusal is answered at once.
struct Preparation<'a> {
    session: &'a Session,
    config: &'a CassandraConfig,
    tables: &'a [Table],
    deadline: tokio::time::Instant,
}

impl<'a> Preparation<'a> {
    fn new(session: &'a Session, config: &'a CassandraConfig, tables: &'a [Table]) -> Self {
        Self {
            session,
            config,
            tables,
            deadline: tokio::time::Instant::now() + config.timeout,
        }
    }

    async fn plain(&self, cql: Cql) -> Result<PreparedStatement, Error> {
        self.prepare(cql, self.config.consistency).await
    }

    async fn serial(&self, cql: Cql) -> Result<PreparedStatement, Error> {
        self.prepare(cql, serial_read(self.config)).await
    }

    async fn prepare(
        &self,
        cql: Cql,
        consistency: Consistency,
    ) -> Result<PreparedStatement, Error> {
        let text = cql.in_keyspace(&self.config.keyspace);
        loop {
            let e = match self.session.prepare(text.as_str()).await {
                Ok(p) => return Ok(configured(p, self.config, consistency)),
                Err(e) => e,
            };
            let context = format!("preparing {text}");
            let Some(table) = table_not_yet_ready(&e, &self.config.keyspace, self.tables) else {
                return Err(error::request(context, e));
            };
            let retry_at = tokio::time::Instant::now() + RETRY_PREPARE;
            if retry_at > self.deadline {
                return Err(not_ready_in_time(context, table, self.config.timeout, e));
            }
            tracing::debug!(table, error = %e, "photon-cassandra: a table just created or listed is not ready on the node yet; preparing again");
            tokio::time::sleep_until(retry_at).await;
        }
    }
}

/// How soon a refused prepare of a table not yet ready is tried again.
const RETRY_PREPARE: std::time::Duration = std::time::Duration::from_millis(50);

/// Which refusal of a prepare says that a table of `tables` (in keyspace `ks`) is not ready on
/// the node yet: `Invalid` "unconfigured table <t>" or "table <t> does not exist" naming one
/// of them (the name of the table found, "a table" for "Unknown CF <id>", which names its id
/// only). A missing keyspace or any other table is not one of these.
fn table_not_yet_ready(e: &PrepareError, ks: &str, tables: &[Table]) -> Option<&'static str> {
    let PrepareError::AllAttemptsFailed {
        first_attempt: RequestAttemptError::DbError(db, message),
    } = e
    else {
        return None;
    };
    match db {
        DbError::Invalid => tables
            .iter()
            .map(|t| t.name)
            .find(|name| names_missing_table(message, ks, name)),
        DbError::ServerError if message.contains("Unknown CF ") && !tables.is_empty() => {
            Some(match tables {
                [only] => only.name,
                _ => "a table",
            })
        }
        _ => None,
    }
}

/// Whether `message` is Cassandra's refusal of a statement on table `name` (or `ks.name`) as
/// missing, the name matched whole (`registers` is not `registers_old`).
fn names_missing_table(message: &str, ks: &str, name: &str) -> bool {
    let qualified = format!("{ks}.{name}");
    [name, qualified.as_str()].iter().any(|t| {
        message.contains(&format!("table {t} does not exist"))
            || message
                .split_once(&format!("unconfigured table {t}"))
                .is_some_and(|(_, rest)| {
                    !rest.starts_with(|c: char| c.is_alphanumeric() || c == '_')
                })
    })
}

/// A table still not ready on the node at the preparation's deadline: `Unavailable`, as a
/// later call may find it ready.
fn not_ready_in_time(
    context: String,
    table: &str,
    timeout: std::time::Duration,
    e: PrepareError,
) -> Error {
    Error::unavailable(
        crate::client::BACKEND,
        format!(
            "{context}: {table} (just created or listed in system_schema) was still not ready on the node after {timeout:?} (timeout_ms): {e}"
        ),
        e,
    )
}

/// The consistency of a linearizable read, which also settles a conditional write in flight.
fn serial_read(config: &CassandraConfig) -> Consistency {
    match config.serial_consistency {
        SerialConsistency::Serial => Consistency::Serial,
        SerialConsistency::LocalSerial => Consistency::LocalSerial,
    }
}

/// Prepares every statement of [`Statements`] (on [`CONNECT_TABLES`], just created or checked).
pub(crate) async fn prepare_statements(
    session: &Session,
    config: &CassandraConfig,
) -> Result<Statements, Error> {
    let p = Preparation::new(session, config, CONNECT_TABLES);
    let insert_pending = p.plain(INSERT_PENDING).await?;
    let insert_bucket = p.plain(INSERT_BUCKET).await?;
    let delete_pending = p.plain(DELETE_PENDING).await?;
    Ok(Statements {
        insert_commit: p.plain(INSERT_COMMIT).await?,
        fill_void: p.plain(FILL_VOID).await?,
        commit_ids_from: p.plain(COMMIT_IDS_FROM).await?,
        commit_ids_from_serial: p.serial(COMMIT_IDS_FROM).await?,
        commit_at_or_before: p.plain(COMMIT_AT_OR_BEFORE).await?,
        commit_at_serial: p.serial(COMMIT_AT).await?,
        commit_at: p.plain(COMMIT_AT).await?,
        commit_state_at: p.plain(COMMIT_STATE_AT).await?,
        commits_from: p.plain(COMMITS_FROM).await?,
        commits_down_from: p.plain(COMMITS_DOWN_FROM).await?,
        commit_counts_from: p.plain(COMMIT_COUNTS_FROM).await?,
        commit_counts_down_from: p.plain(COMMIT_COUNTS_DOWN_FROM).await?,
        category_counts: p.plain(CATEGORY_COUNTS).await?,
        category_counts_incl: p.plain(CATEGORY_COUNTS_INCL).await?,
        clear_pending: batch(config, BatchType::Unlogged, &[&delete_pending; 2]),
        delete_pending,
        insert_pending,
        insert_bucket,
        insert_category: p.plain(INSERT_CATEGORY_COMMIT).await?,
        insert_stream: p.plain(INSERT_STREAM).await?,
        pending_in: p.plain(PENDING_BETWEEN).await?,
        category_page: p.plain(CATEGORY_PAGE).await?,
        category_page_incl: p.plain(CATEGORY_PAGE_INCL).await?,
        category_times: p.plain(CATEGORY_TIMES).await?,
        buckets_from: p.plain(BUCKETS_FROM).await?,
        categories: p.plain(CATEGORIES).await?,
        streams: p.plain(STREAMS_OF).await?,
    })
}

/// Makes `registers` ready for a client's first use of a register: creates the table if it is
/// missing and creation is on (`create=true`; a role without CREATE is refused here, on the
/// register call, not at connect), and prepares its statements. With `create=false` a missing
/// table is an error naming it. A failure is not kept: the caller's next call tries again.
pub(crate) async fn prepare_register_statements(
    session: &Session,
    config: &CassandraConfig,
) -> Result<RegisterStatements, Error> {
    let ks = &config.keyspace;
    let present = present_tables(session, ks).await?;
    if !present.iter().any(|t| t == REGISTERS.name) {
        if !config.create {
            return Err(missing_tables(
                "preparing the registers",
                ks,
                &[REGISTERS.name],
            ));
        }
        run(session, REGISTERS.create_cql(ks)).await?;
        agree(session, ks).await?;
    }
    let p = Preparation::new(session, config, &[REGISTERS]);
    Ok(RegisterStatements {
        save_first: p.plain(SAVE_FIRST_REGISTER).await?,
        save_next: p.plain(SAVE_NEXT_REGISTER).await?,
        load: p.serial(LOAD_REGISTER).await?,
    })
}

pub(crate) fn batch(
    config: &CassandraConfig,
    kind: BatchType,
    statements: &[&PreparedStatement],
) -> Batch {
    let mut b = Batch::new(kind);
    for s in statements {
        b.append_statement((*s).clone());
    }
    b.set_consistency(config.consistency);
    b.set_request_timeout(Some(config.timeout));
    b
}

/// Creates the keyspace and tables (`create=true`) or checks that they exist, then checks the
/// layout settings against the keyspace's.
pub(crate) async fn create_or_check(
    session: &Session,
    config: &CassandraConfig,
) -> Result<(), Error> {
    if config.create {
        create(session, config).await?;
    } else {
        check_tables(session, &config.keyspace).await?;
    }
    check_settings(session, config).await
}

/// Creates what is missing of the keyspace and its tables, and leaves what exists alone without
/// asking for it: Cassandra checks the CREATE permission of a `CREATE ... IF NOT EXISTS` before
/// it looks whether the object exists, so a role with rights on its own keyspace only (in a
/// keyspace an operator created, as in production) could not connect if the store sent them
/// all. Two clients creating at once are harmless: each statement is `IF NOT EXISTS`.
async fn create(session: &Session, config: &CassandraConfig) -> Result<(), Error> {
    let ks = &config.keyspace;
    if !keyspace_exists(session, ks).await? {
        run(session, create_keyspace_cql(ks, &config.replication)).await?;
    }
    let present = present_tables(session, ks).await?;
    for table in CONNECT_TABLES {
        if !present.iter().any(|p| p == table.name) {
            run(session, table.create_cql(ks)).await?;
        }
    }
    agree(session, ks).await
}

async fn agree(session: &Session, ks: &str) -> Result<(), Error> {
    session
        .await_schema_agreement()
        .await
        .map_err(|e| error::request(format!("awaiting schema agreement on keyspace {ks}"), e))?;
    Ok(())
}

async fn run(session: &Session, cql: String) -> Result<(), Error> {
    let context = || format!("creating the schema ({})", first_line(&cql));
    session
        .query_unpaged(cql.as_str(), ())
        .await
        .map_err(|e| error::request(context(), e))?;
    Ok(())
}

fn first_line(cql: &str) -> &str {
    cql.lines().next().unwrap_or(cql)
}

/// Whether keyspace `ks` exists (`system_schema`, which every role may read).
async fn keyspace_exists(session: &Session, ks: &str) -> Result<bool, Error> {
    let context = format!("looking for keyspace {ks}");
    Ok(session
        .query_unpaged(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (ks,),
        )
        .await
        .map_err(|e| error::request(&context, e))?
        .into_rows_result()
        .map_err(|e| error::driver(&context, e))?
        .rows_num()
        > 0)
}

/// The tables of keyspace `ks` (`system_schema`).
async fn present_tables(session: &Session, ks: &str) -> Result<Vec<String>, Error> {
    let context = format!("reading the tables of keyspace {ks}");
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (ks,),
        )
        .await
        .map_err(|e| error::request(&context, e))?
        .into_rows_result()
        .map_err(|e| error::driver(&context, e))?;
    Ok(rows
        .rows::<(String,)>()
        .map_err(|e| error::driver(&context, e))?
        .filter_map(Result::ok)
        .map(|(t,)| t)
        .collect())
}

/// With creation off, a missing keyspace or table is an error that names it.
async fn check_tables(session: &Session, ks: &str) -> Result<(), Error> {
    let present = present_tables(session, ks).await?;
    let missing: Vec<&str> = CONNECT_TABLES
        .iter()
        .map(|t| t.name)
        .filter(|name| !present.iter().any(|p| p == name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(missing_tables("checking the schema", ks, &missing))
}

fn missing_tables(context: &str, ks: &str, missing: &[&str]) -> Error {
    error::corrupt(
        context,
        format!(
            "keyspace {ks} lacks table(s) {} and schema creation is off (create=false); create them as the README shows",
            missing.join(", ")
        ),
    )
}

/// The layout settings every client of a keyspace must share: a stream's partition and a
/// category's time bucket are computed from them. The first client records its values; a client
/// configured differently is refused rather than writing where others do not look. A value
/// already recorded is only read, so a role that may only SELECT (a reader) connects too.
async fn check_settings(session: &Session, config: &CassandraConfig) -> Result<(), Error> {
    for (name, value) in [
        ("bucket_size", config.bucket_size as i64),
        ("time_bucket_s", config.time_bucket.as_secs() as i64),
    ] {
        let mut stored = read_setting(session, config, name).await?;
        if stored.is_none() && config.create {
            record_setting(session, config, name, value).await?;
            stored = read_setting(session, config, name).await?;
        }
        check_setting(config, name, value, stored)?;
    }
    Ok(())
}

async fn record_setting(
    session: &Session,
    config: &CassandraConfig,
    name: &str,
    value: i64,
) -> Result<(), Error> {
    let mut insert = Statement::new(RECORD_SETTING.in_keyspace(&config.keyspace));
    insert.set_serial_consistency(Some(config.serial_consistency));
    session
        .query_unpaged(insert, (name, value))
        .await
        .map_err(|e| error::request("recording the layout settings", e))?;
    Ok(())
}

/// The value recorded for `name`, by a serial read (so a client never misses the first
/// client's conditional insert).
async fn read_setting(
    session: &Session,
    config: &CassandraConfig,
    name: &str,
) -> Result<Option<i64>, Error> {
    let context = "reading the layout settings";
    let mut select = Statement::new(READ_SETTING.in_keyspace(&config.keyspace));
    select.set_consistency(serial_read(config));
    Ok(session
        .query_unpaged(select, (name,))
        .await
        .map_err(|e| error::request(context, e))?
        .into_rows_result()
        .map_err(|e| error::driver(context, e))?
        .maybe_first_row::<(i64,)>()
        .map_err(|e| error::driver(context, e))?
        .map(|(v,)| v))
}

fn check_setting(
    config: &CassandraConfig,
    name: &str,
    value: i64,
    stored: Option<i64>,
) -> Result<(), Error> {
    let ks = &config.keyspace;
    match stored {
        Some(v) if v == value => Ok(()),
        Some(v) => Err(Error::InvalidInput {
            what: format!("{name}={value} for keyspace {ks}"),
            reason: format!(
                "the keyspace was created with {name}={v}; every client of a keyspace must use the same value (it decides where events are stored)"
            ),
        }),
        None => Err(error::corrupt(
            "checking the layout settings",
            format!("keyspace {ks} has no {name} in its settings table and schema creation is off (create=false)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_statements_name_the_keyspace() {
        assert_eq!(
            TABLES.iter().map(|t| t.name).collect::<Vec<_>>(),
            [
                "commits",
                "category_commits",
                "category_buckets",
                "streams",
                "settings",
                "pending",
                "registers"
            ]
        );
        // What a client needs to connect: every table but `registers` (created on first use).
        assert_eq!(CONNECT_TABLES, &TABLES[..TABLES.len() - 1]);
        assert!(!CONNECT_TABLES.contains(&REGISTERS));
        assert!(COMMITS
            .create_cql("ks")
            .starts_with("CREATE TABLE IF NOT EXISTS ks.commits ("));
        assert!(INSERT_COMMIT
            .in_keyspace("ks")
            .starts_with("INSERT INTO ks.commits "));
        assert_eq!(
            create_keyspace_cql("ks", &Replication::Simple(1)),
            "CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
    }

    fn refused(db: DbError, message: &str) -> PrepareError {
        PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(db, message.into()),
        }
    }

    #[test]
    fn only_refusals_of_the_tables_being_prepared_are_tried_again() {
        let registers = &[REGISTERS][..];
        let not_ready = |db, message| table_not_yet_ready(&refused(db, message), "ks", registers);
        // Cassandra 5.0's two refusals of a table just created or listed.
        assert_eq!(
            not_ready(DbError::Invalid, "table registers does not exist"),
            Some("registers")
        );
        assert_eq!(
            not_ready(DbError::Invalid, "table ks.registers does not exist"),
            Some("registers")
        );
        assert_eq!(
            not_ready(DbError::Invalid, "unconfigured table registers"),
            Some("registers")
        );
        assert_eq!(
            not_ready(
                DbError::ServerError,
                "java.lang.IllegalArgumentException: Unknown CF 5a1b9c30-0f9e-11f0-8a42-7d3c2e1f0a11"
            ),
            Some("registers")
        );
        // Not these: a missing keyspace, another table, a longer name, other refusals.
        assert_eq!(
            not_ready(DbError::Invalid, "Keyspace ks does not exist"),
            None
        );
        assert_eq!(
            not_ready(DbError::Invalid, "table commits does not exist"),
            None
        );
        assert_eq!(
            not_ready(DbError::Invalid, "unconfigured table registers_old"),
            None
        );
        assert_eq!(
            not_ready(DbError::Invalid, "Undefined column name nme"),
            None
        );
        assert_eq!(
            not_ready(DbError::ServerError, "java.lang.NullPointerException"),
            None
        );
        assert_eq!(
            table_not_yet_ready(
                &refused(DbError::ServerError, "Unknown CF 5a1b9c30"),
                "ks",
                &[]
            ),
            None
        );
        assert_eq!(
            table_not_yet_ready(
                &refused(DbError::Invalid, "table pending does not exist"),
                "ks",
                CONNECT_TABLES
            ),
            Some("pending")
        );
    }

    #[test]
    fn a_table_still_not_ready_at_the_deadline_is_unavailable() {
        let e = not_ready_in_time(
            "preparing SELECT ... FROM ks.registers".into(),
            "registers",
            std::time::Duration::from_secs(2),
            refused(DbError::ServerError, "Unknown CF 5a1b9c30"),
        );
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(e.is_retryable());
        let message = e.to_string();
        assert!(
            message.contains("registers") && message.contains("Unknown CF"),
            "{message}"
        );
    }
}
