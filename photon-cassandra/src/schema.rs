//! The keyspace's layout: its tables, every statement the store runs against them, prepared once
//! with the configured consistency, the creation (or, with `create=false`, the check) of the
//! tables, and the layout settings every client of a keyspace must share.
//!
//! The tables are public so that tools create and read exactly what the store does (an
//! operator creating the schema ahead of `create=false` clients, the benchmark's raw baseline);
//! the README's "Tables" section documents them: change both together. This module runs no
//! append or read itself (that is `writer`, `reader` and `subscription`).

use photon_api::Error;
use scylla::client::session::Session;
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

/// Every table, in creation order.
pub const TABLES: &[Table] = &[
    COMMITS,
    CATEGORY_COMMITS,
    CATEGORY_BUCKETS,
    STREAMS,
    SETTINGS,
    PENDING,
];

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
    pub(crate) commits_from: PreparedStatement,
    pub(crate) commits_down_from: PreparedStatement,
    pub(crate) commit_counts_from: PreparedStatement,
    pub(crate) commit_counts_down_from: PreparedStatement,
    pub(crate) category_counts: PreparedStatement,
    pub(crate) category_counts_incl: PreparedStatement,
    /// Both pending markers (category, `$all`) and both bucket registrations, logged.
    pub(crate) pending: Batch,
    /// Both markers' deletes.
    pub(crate) clear_pending: Batch,
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
    let mut p = session
        .prepare(text.as_str())
        .await
        .map_err(|e| error::request(format!("preparing {text}"), e))?;
    p.set_consistency(consistency);
    p.set_serial_consistency(Some(config.serial_consistency));
    p.set_request_timeout(Some(config.timeout));
    Ok(p)
}

/// The consistency of a linearizable read, which also settles a conditional write in flight.
fn serial_read(config: &CassandraConfig) -> Consistency {
    match config.serial_consistency {
        SerialConsistency::Serial => Consistency::Serial,
        SerialConsistency::LocalSerial => Consistency::LocalSerial,
    }
}

/// Prepares every statement of [`Statements`].
pub(crate) async fn prepare_statements(
    session: &Session,
    config: &CassandraConfig,
) -> Result<Statements, Error> {
    let plain = |cql| prepare(session, config, cql);
    let serial = |cql| prepare_with(session, config, cql, serial_read(config));
    let insert_pending = plain(INSERT_PENDING).await?;
    let insert_bucket = plain(INSERT_BUCKET).await?;
    let delete_pending = plain(DELETE_PENDING).await?;
    Ok(Statements {
        insert_commit: plain(INSERT_COMMIT).await?,
        fill_void: plain(FILL_VOID).await?,
        commit_ids_from: plain(COMMIT_IDS_FROM).await?,
        commit_ids_from_serial: serial(COMMIT_IDS_FROM).await?,
        commit_at_or_before: plain(COMMIT_AT_OR_BEFORE).await?,
        commit_at_serial: serial(COMMIT_AT).await?,
        commits_from: plain(COMMITS_FROM).await?,
        commits_down_from: plain(COMMITS_DOWN_FROM).await?,
        commit_counts_from: plain(COMMIT_COUNTS_FROM).await?,
        commit_counts_down_from: plain(COMMIT_COUNTS_DOWN_FROM).await?,
        category_counts: plain(CATEGORY_COUNTS).await?,
        category_counts_incl: plain(CATEGORY_COUNTS_INCL).await?,
        pending: batch(
            config,
            BatchType::Logged,
            &[
                &insert_pending,
                &insert_pending,
                &insert_bucket,
                &insert_bucket,
            ],
        ),
        clear_pending: batch(config, BatchType::Unlogged, &[&delete_pending; 2]),
        insert_category: plain(INSERT_CATEGORY_COMMIT).await?,
        insert_stream: plain(INSERT_STREAM).await?,
        pending_in: plain(PENDING_BETWEEN).await?,
        category_page: plain(CATEGORY_PAGE).await?,
        category_page_incl: plain(CATEGORY_PAGE_INCL).await?,
        category_times: plain(CATEGORY_TIMES).await?,
        buckets_from: plain(BUCKETS_FROM).await?,
        categories: plain(CATEGORIES).await?,
        streams: plain(STREAMS_OF).await?,
    })
}

fn batch(config: &CassandraConfig, kind: BatchType, statements: &[&PreparedStatement]) -> Batch {
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
    for table in TABLES {
        if !present.iter().any(|p| p == table.name) {
            run(session, table.create_cql(ks)).await?;
        }
    }
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
    let missing: Vec<&str> = TABLES
        .iter()
        .map(|t| t.name)
        .filter(|name| !present.iter().any(|p| p == name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(error::corrupt(
        "checking the schema",
        format!(
            "keyspace {ks} lacks table(s) {} and schema creation is off (create=false); create them as the README shows",
            missing.join(", ")
        ),
    ))
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
                "pending"
            ]
        );
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
}
