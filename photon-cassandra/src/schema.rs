//! Connecting, the keyspace and tables (created on first use when allowed), and every statement
//! the store runs, prepared once with its consistency. The table layout is documented in the
//! README; change both together.

use std::time::Duration;

use photon_api::Error;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::query_result::QueryResult;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};

use crate::config::CassandraConfig;
use crate::{map_error, rows_error, BACKEND};

/// The tables, in creation order. `{ks}` is the keyspace.
const TABLES: &[(&str, &str)] = &[
    (
        "commits",
        "CREATE TABLE IF NOT EXISTS {ks}.commits (
            stream text, bucket bigint, version bigint,
            count int, time_id timeuuid, event_ids list<uuid>, events blob,
            PRIMARY KEY ((stream, bucket), version))",
    ),
    (
        "category_commits",
        "CREATE TABLE IF NOT EXISTS {ks}.category_commits (
            category text, bucket bigint, time_id timeuuid,
            stream text, version bigint, count int, events blob,
            PRIMARY KEY ((category, bucket), time_id))",
    ),
    (
        "category_buckets",
        "CREATE TABLE IF NOT EXISTS {ks}.category_buckets (
            category text, bucket bigint, PRIMARY KEY ((category), bucket))",
    ),
    (
        "streams",
        "CREATE TABLE IF NOT EXISTS {ks}.streams (
            category text, stream text, PRIMARY KEY ((category), stream))",
    ),
    (
        "settings",
        "CREATE TABLE IF NOT EXISTS {ks}.settings (name text PRIMARY KEY, value bigint)",
    ),
    (
        "pending",
        "CREATE TABLE IF NOT EXISTS {ks}.pending (
            category text, bucket bigint, time_id timeuuid, stream text, version bigint,
            PRIMARY KEY ((category, bucket), time_id))
            WITH gc_grace_seconds = 3600",
    ),
];

/// Every statement, prepared.
pub(crate) struct Statements {
    pub(crate) insert_commit: PreparedStatement,
    pub(crate) commit_ids_from: PreparedStatement,
    pub(crate) commit_ids_from_serial: PreparedStatement,
    pub(crate) commit_at_or_before: PreparedStatement,
    pub(crate) commit_at_serial: PreparedStatement,
    pub(crate) commits_from: PreparedStatement,
    pub(crate) commits_down_from: PreparedStatement,
    pub(crate) pending: Batch,
    pub(crate) clear_pending: Batch,
    pub(crate) insert_category: PreparedStatement,
    pub(crate) insert_stream: PreparedStatement,
    pub(crate) pending_in: PreparedStatement,
    pub(crate) category_page: PreparedStatement,
    pub(crate) category_page_incl: PreparedStatement,
    pub(crate) buckets_from: PreparedStatement,
    pub(crate) categories: PreparedStatement,
    pub(crate) streams: PreparedStatement,
}

/// Connects, creates the schema when allowed (or checks it), and prepares the statements.
pub(crate) async fn connect(config: &CassandraConfig) -> Result<(Session, Statements), Error> {
    // A first connection fetches the cluster's metadata, which a node that just started can be
    // slow to give: at least 5 s for it.
    let connect_bound = config.timeout.max(Duration::from_secs(5));
    let session = tokio::time::timeout(connect_bound, builder(config)?.build())
        .await
        .map_err(|_| Error::Unavailable {
            backend: BACKEND,
            message: format!(
                "no answer from {} within {:?}",
                config.contact_points.join(","),
                connect_bound
            ),
            source: None,
        })?
        .map_err(|e| Error::Unavailable {
            backend: BACKEND,
            message: format!("connecting to {}: {e}", config.contact_points.join(",")),
            source: Some(Box::new(e)),
        })?;
    let ks = &config.keyspace;
    if config.create {
        let ddl = format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
            config.replication.cql()
        );
        run(&session, &ddl).await?;
        for (_, table) in TABLES {
            run(&session, &table.replace("{ks}", ks)).await?;
        }
        session
            .await_schema_agreement()
            .await
            .map_err(|e| map_error("schema agreement", e))?;
    } else {
        check_schema(&session, ks).await?;
    }
    check_settings(&session, config).await?;
    let statements = prepare(&session, config).await?;
    Ok((session, statements))
}

fn builder(config: &CassandraConfig) -> Result<SessionBuilder, Error> {
    let mut b = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .connection_timeout(config.timeout)
        .schema_agreement_timeout(config.timeout.max(Duration::from_secs(10)))
        .metadata_request_serverside_timeout(config.timeout)
        .hostname_resolution_timeout(Some(config.timeout));
    if let Some((user, password)) = &config.credentials {
        b = b.user(user, password);
    }
    if let Some(dc) = &config.local_dc {
        b = b.prefer_datacenter(dc.clone());
    }
    if config.tls {
        use openssl::ssl::{SslContextBuilder, SslMethod, SslVerifyMode};
        let invalid = |e: openssl::error::ErrorStack| Error::InvalidInput {
            what: format!("TLS settings of {config:?}"),
            reason: e.to_string(),
        };
        let mut ctx = SslContextBuilder::new(SslMethod::tls()).map_err(invalid)?;
        if let Some(ca) = &config.tls_ca {
            ctx.set_ca_file(ca).map_err(invalid)?;
        } else {
            ctx.set_default_verify_paths().map_err(invalid)?;
        }
        ctx.set_verify(SslVerifyMode::PEER);
        b = b.tls_context(Some(ctx.build()));
    }
    Ok(b)
}

/// The layout settings every client of a keyspace must share: a stream's partition and a
/// category's time bucket are computed from them. The first client records its values; a client
/// configured differently is refused rather than writing where others do not look.
async fn check_settings(session: &Session, config: &CassandraConfig) -> Result<(), Error> {
    let ks = &config.keyspace;
    for (name, value) in [
        ("bucket_size", config.bucket_size as i64),
        ("time_bucket_s", config.time_bucket.as_secs() as i64),
    ] {
        if config.create {
            let mut insert = scylla::statement::unprepared::Statement::new(format!(
                "INSERT INTO {ks}.settings (name, value) VALUES (?, ?) IF NOT EXISTS"
            ));
            insert.set_serial_consistency(Some(config.serial_consistency));
            session
                .query_unpaged(insert, (name, value))
                .await
                .map_err(|e| map_error("recording the layout settings", e))?;
        }
        let mut select = scylla::statement::unprepared::Statement::new(format!(
            "SELECT value FROM {ks}.settings WHERE name = ?"
        ));
        select.set_consistency(match config.serial_consistency {
            SerialConsistency::Serial => Consistency::Serial,
            SerialConsistency::LocalSerial => Consistency::LocalSerial,
        });
        let stored = session
            .query_unpaged(select, (name,))
            .await
            .map_err(|e| map_error("reading the layout settings", e))?
            .into_rows_result()
            .map_err(|e| rows_error("reading the layout settings", e))?
            .maybe_first_row::<(i64,)>()
            .map_err(|e| rows_error("reading the layout settings", e))?;
        match stored {
            Some((v,)) if v == value => {}
            Some((v,)) => {
                return Err(Error::InvalidInput {
                    what: format!("{name}={value} for keyspace {ks}"),
                    reason: format!(
                        "the keyspace was created with {name}={v}; every client of a keyspace must use the same value (it decides where events are stored)"
                    ),
                })
            }
            None => {
                return Err(Error::backend(
                    BACKEND,
                    format!("keyspace {ks} has no {name} in its settings table and schema creation is off (create=false)"),
                ))
            }
        }
    }
    Ok(())
}

async fn run(session: &Session, cql: &str) -> Result<(), Error> {
    session
        .query_unpaged(cql, ())
        .await
        .map_err(|e| map_error(&format!("creating the schema ({})", first_line(cql)), e))?;
    Ok(())
}

fn first_line(cql: &str) -> &str {
    cql.lines().next().unwrap_or(cql)
}

/// With creation off, a missing keyspace or table is an error that names it.
async fn check_schema(session: &Session, ks: &str) -> Result<(), Error> {
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (ks,),
        )
        .await
        .map_err(|e| map_error("reading the schema", e))?
        .into_rows_result()
        .map_err(|e| rows_error("reading the schema", e))?;
    let present: Vec<String> = rows
        .rows::<(String,)>()
        .map_err(|e| rows_error("reading the schema", e))?
        .filter_map(Result::ok)
        .map(|(t,)| t)
        .collect();
    let missing: Vec<&str> = TABLES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !present.iter().any(|p| p == name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::backend(
        BACKEND,
        format!(
            "keyspace {ks} lacks table(s) {} and schema creation is off (create=false); create them as the README shows",
            missing.join(", ")
        ),
    ))
}

async fn prepare(session: &Session, config: &CassandraConfig) -> Result<Statements, Error> {
    let ks = &config.keyspace;
    let prep = |cql: String, consistency: Consistency| async move {
        let mut p = session
            .prepare(cql.clone())
            .await
            .map_err(|e| map_error(&format!("preparing {cql}"), e))?;
        p.set_consistency(consistency);
        p.set_serial_consistency(Some(config.serial_consistency));
        p.set_request_timeout(Some(config.timeout));
        Ok::<_, Error>(p)
    };
    let c = config.consistency;
    let serial = match config.serial_consistency {
        SerialConsistency::Serial => Consistency::Serial,
        SerialConsistency::LocalSerial => Consistency::LocalSerial,
    };
    let batch = |kind: BatchType, statements: Vec<PreparedStatement>| {
        let mut b = Batch::new(kind);
        for s in statements {
            b.append_statement(s);
        }
        b.set_consistency(c);
        b.set_request_timeout(Some(config.timeout));
        b
    };
    let insert_pending = prep(
        format!("INSERT INTO {ks}.pending (category, bucket, time_id, stream, version) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"),
        c,
    )
    .await?;
    let delete_pending = prep(
        format!("DELETE FROM {ks}.pending USING TIMESTAMP ? WHERE category = ? AND bucket = ? AND time_id = ?"),
        c,
    )
    .await?;
    let insert_category = prep(
        format!("INSERT INTO {ks}.category_commits (category, bucket, time_id, stream, version, count, events) VALUES (?, ?, ?, ?, ?, ?, ?)"),
        c,
    )
    .await?;
    let insert_bucket = prep(
        format!("INSERT INTO {ks}.category_buckets (category, bucket) VALUES (?, ?)"),
        c,
    )
    .await?;
    let insert_stream = prep(
        format!("INSERT INTO {ks}.streams (category, stream) VALUES (?, ?)"),
        c,
    )
    .await?;
    let ids_from =
        format!("SELECT version, count, time_id, event_ids FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version >= ?");
    Ok(Statements {
        insert_commit: prep(
            format!("INSERT INTO {ks}.commits (stream, bucket, version, count, time_id, event_ids, events) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"),
            c,
        )
        .await?,
        commit_ids_from: prep(ids_from.clone(), c).await?,
        commit_ids_from_serial: prep(ids_from, serial).await?,
        commit_at_or_before: prep(
            format!("SELECT version, count FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version <= ? ORDER BY version DESC LIMIT 1"),
            c,
        )
        .await?,
        commit_at_serial: prep(
            format!("SELECT count, time_id, events FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version = ?"),
            serial,
        )
        .await?,
        commits_from: prep(
            format!("SELECT version, count, time_id, events FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version >= ? LIMIT ?"),
            c,
        )
        .await?,
        commits_down_from: prep(
            format!("SELECT version, count, time_id, events FROM {ks}.commits WHERE stream = ? AND bucket = ? AND version <= ? ORDER BY version DESC LIMIT ?"),
            c,
        )
        .await?,
        pending: batch(
            BatchType::Logged,
            vec![
                insert_pending.clone(),
                insert_pending,
                insert_bucket.clone(),
                insert_bucket,
            ],
        ),
        clear_pending: batch(
            BatchType::Unlogged,
            vec![delete_pending.clone(), delete_pending],
        ),
        insert_category,
        insert_stream,
        pending_in: prep(
            format!("SELECT time_id, stream, version FROM {ks}.pending WHERE category = ? AND bucket = ? AND time_id > ?"),
            c,
        )
        .await?,
        category_page: prep(
            format!("SELECT time_id, stream, version, count, events FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id > ? AND time_id <= ? LIMIT ?"),
            c,
        )
        .await?,
        category_page_incl: prep(
            format!("SELECT time_id, stream, version, count, events FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id >= ? AND time_id <= ? LIMIT ?"),
            c,
        )
        .await?,
        buckets_from: prep(
            format!("SELECT bucket FROM {ks}.category_buckets WHERE category = ? AND bucket >= ? AND bucket <= ? LIMIT 1"),
            c,
        )
        .await?,
        categories: prep(format!("SELECT DISTINCT category FROM {ks}.category_buckets"), c).await?,
        streams: prep(
            format!("SELECT stream FROM {ks}.streams WHERE category = ?"),
            c,
        )
        .await?,
    })
}

/// Whether a conditional write applied (see [`crate::codec::applied`]).
pub(crate) fn lwt_applied(result: QueryResult) -> Result<bool, Error> {
    let rows = result
        .into_rows_result()
        .map_err(|e| rows_error("reading a conditional write's answer", e))?;
    let names: Vec<String> = rows
        .column_specs()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let values: Vec<Vec<Option<bool>>> = rows
        .rows::<Row>()
        .map_err(|e| rows_error("reading a conditional write's answer", e))?
        .map(|r| {
            r.map(|row| {
                row.columns
                    .into_iter()
                    .map(|v| match v {
                        Some(CqlValue::Boolean(b)) => Some(b),
                        _ => None,
                    })
                    .collect()
            })
            .map_err(|e| rows_error("reading a conditional write's answer", e))
        })
        .collect::<Result<_, _>>()?;
    crate::codec::applied(&names, &values)
}
