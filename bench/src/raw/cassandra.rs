//! The plain `scylla` driver doing photon-cassandra's I/O shape with its consistency (QUORUM
//! reads and writes, SERIAL for conditional writes) and request timeout.
//!
//! photon-cassandra stores each append as one row of `commits((stream, bucket), version)`
//! (count, time id, event ids, and the append's events MessagePack-encoded in one blob),
//! written with `INSERT ... IF NOT EXISTS` (a Paxos round). Around it, per append, it writes
//! pending markers before, then the category copies and a `streams` row, and deletes the
//! markers. The raw baseline does only the conditional commit row, with a blob of the
//! append's payloads (a MessagePack array of byte strings) and its event ids; a reference row
//! does a plain insert of the category row instead. Loads read one stream partition in pages
//! of 64 rows; the replay reads one category partition in pages of 64 rows by time id, as
//! photon does, decoding every payload into the same view.
//!
//! Every run works in a fresh keyspace (`bench_raw_<id>`, SimpleStrategy with one replica)
//! with photon's two tables, created before the clock starts and dropped at the end.
//! (Credentials and TLS options of the URL are not carried over.)

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::query_result::QueryResult;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlTimeuuid, CqlValue, Row as CqlRow};
use uuid::Uuid;

use super::Raw;
use crate::domain::{self, Balances};
use crate::measure::{run_writers, Cap, Latencies, Measurement, Role};
use crate::photon::{append_case, load_case};
use crate::{progress, BoxError, Sizes};

/// Bound on every request, photon-cassandra's default `timeout_ms`.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Rows fetched per page of a read: photon-cassandra's `PAGE`.
const PAGE: i32 = 64;

/// Width of a category partition in time: photon-cassandra's default `time_bucket_s`.
const TIME_BUCKET_MICROS: i64 = 3_600 * 1_000_000;

/// 100-nanosecond intervals between the UUID epoch (1582-10-15) and the Unix epoch.
const UUID_EPOCH_OFFSET: u64 = 0x01B2_1DD2_1381_4000;

/// photon-cassandra's two tables that carry an append's events, as it creates them.
const TABLES: &[&str] = &[
    "CREATE TABLE {ks}.commits (
        stream text, bucket bigint, version bigint,
        count int, time_id timeuuid, event_ids list<uuid>, events blob,
        PRIMARY KEY ((stream, bucket), version))",
    "CREATE TABLE {ks}.category_commits (
        category text, bucket bigint, time_id timeuuid,
        stream text, version bigint, count int, events blob,
        PRIMARY KEY ((category, bucket), time_id))",
];

/// The `host:port` contact points of a `cassandra://` URL (port 9042 when none is given):
/// no credentials, keyspace or options.
fn contact_points(url: &str) -> Vec<String> {
    let rest = url.strip_prefix("cassandra://").unwrap_or(url);
    let rest = rest.split_once('?').map_or(rest, |(a, _)| a);
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.contains(':') {
                h.to_owned()
            } else {
                format!("{h}:9042")
            }
        })
        .collect()
}

/// Microseconds since the Unix epoch.
fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A version-1 (time) UUID for `micros` with the given clock sequence and node bytes, laid
/// out as photon-cassandra's time ids are.
fn time_uuid(micros: i64, tail: [u8; 8]) -> Uuid {
    let ticks = micros as u64 * 10 + UUID_EPOCH_OFFSET;
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&((ticks & 0xffff_ffff) as u32).to_be_bytes());
    b[4..6].copy_from_slice(&(((ticks >> 32) & 0xffff) as u16).to_be_bytes());
    b[6..8].copy_from_slice(&((((ticks >> 48) & 0x0fff) as u16) | 0x1000).to_be_bytes());
    b[8..16].copy_from_slice(&tail);
    b[8] = (b[8] & 0x3f) | 0x80;
    Uuid::from_bytes(b)
}

/// A time id of `micros` with random clock sequence and node, as photon-cassandra's.
fn time_id(micros: i64) -> Uuid {
    let random = Uuid::new_v4();
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&random.as_bytes()[8..16]);
    time_uuid(micros, tail)
}

/// The statements of the raw rows, prepared with photon-cassandra's settings.
struct Statements {
    /// The commit row, conditional (`IF NOT EXISTS`).
    insert_commit: PreparedStatement,
    /// The category row, plain.
    insert_category: PreparedStatement,
    /// One page of a category partition after a time id (photon's `category_page`).
    category_page: PreparedStatement,
    /// One page of a stream partition after a version (photon's stream read).
    stream_page: PreparedStatement,
}

async fn prepare(session: &Session, ks: &str) -> Result<Statements, BoxError> {
    let prep = |cql: String| async move {
        let mut p = session.prepare(cql).await?;
        p.set_consistency(Consistency::Quorum);
        p.set_serial_consistency(Some(SerialConsistency::Serial));
        p.set_request_timeout(Some(TIMEOUT));
        Ok::<_, BoxError>(p)
    };
    Ok(Statements {
        insert_commit: prep(format!(
            "INSERT INTO {ks}.commits (stream, bucket, version, count, time_id, event_ids, events) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        ))
        .await?,
        insert_category: prep(format!(
            "INSERT INTO {ks}.category_commits (category, bucket, time_id, stream, version, count, events) VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .await?,
        category_page: prep(format!(
            "SELECT time_id, stream, version, count, events FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id > ? AND time_id <= ? LIMIT ?"
        ))
        .await?,
        stream_page: prep(format!(
            "SELECT version, count, events FROM {ks}.commits WHERE stream = ? AND bucket = 0 AND version >= ? LIMIT ?"
        ))
        .await?,
    })
}

/// Whether a conditional write applied: the `[applied]` column of its answer.
fn applied(answer: QueryResult) -> Result<bool, BoxError> {
    let rows = answer.into_rows_result()?;
    let first = rows.rows::<CqlRow>()?.next().transpose()?;
    Ok(matches!(
        first.and_then(|r| r.columns.into_iter().next()),
        Some(Some(CqlValue::Boolean(true)))
    ))
}

/// The blob of one append: its payloads as a MessagePack array of byte strings.
fn blob(payloads: &[Bytes]) -> Vec<u8> {
    rmp_serde::to_vec(payloads).expect("byte strings encode")
}

/// Decodes a blob's payloads into the view.
fn apply(view: &mut Balances, blob: &[u8]) -> Result<(), BoxError> {
    let payloads: Vec<&[u8]> = rmp_serde::from_slice(blob)?;
    for p in payloads {
        view.apply_bytes(p)?;
    }
    Ok(())
}

/// Which write an append row makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    /// The commit row, `IF NOT EXISTS`, in the writer's stream partition.
    Lwt,
    /// The category row, plain, in the row's one category partition.
    Plain,
}

/// The raw client: a session on a keyspace of its own.
pub struct RawCassandra {
    session: Arc<Session>,
    st: Arc<Statements>,
    ks: String,
}

impl std::fmt::Debug for RawCassandra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCassandra")
            .field("keyspace", &self.ks)
            .finish()
    }
}

impl RawCassandra {
    /// Connects and creates the keyspace and tables.
    ///
    /// # Errors
    /// - The driver's error.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let session = Arc::new(
            SessionBuilder::new()
                .known_nodes(contact_points(url))
                .connection_timeout(TIMEOUT)
                .build()
                .await?,
        );
        let ks = format!(
            "bench_raw_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        session
            .query_unpaged(
                format!(
                    "CREATE KEYSPACE {ks} WITH replication = \
                     {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
                ),
                (),
            )
            .await?;
        for table in TABLES {
            session
                .query_unpaged(table.replace("{ks}", &ks), ())
                .await?;
        }
        session.await_schema_agreement().await?;
        let st = Arc::new(prepare(&session, &ks).await?);
        Ok(Self { session, st, ks })
    }

    /// Writes one append's row; `version` is the stream version of its first event.
    #[allow(clippy::too_many_arguments)]
    async fn write_one(
        session: &Session,
        st: &Statements,
        write: Write,
        category: &str,
        bucket: i64,
        stream: &str,
        version: u64,
        payloads: &[Bytes],
        micros: i64,
    ) -> Result<(), BoxError> {
        let t = CqlTimeuuid::from(time_id(micros));
        let n = payloads.len() as i32;
        let blob = blob(payloads);
        match write {
            Write::Lwt => {
                let ids: Vec<Uuid> = payloads.iter().map(|_| Uuid::new_v4()).collect();
                let answer = session
                    .execute_unpaged(
                        &st.insert_commit,
                        (stream, 0_i64, version as i64, n, t, &ids, &blob),
                    )
                    .await?;
                if !applied(answer)? {
                    return Err(format!("{stream}@{version}: IF NOT EXISTS did not apply").into());
                }
            }
            Write::Plain => {
                session
                    .execute_unpaged(
                        &st.insert_category,
                        (category, bucket, t, stream, version as i64, n, &blob),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Appends of `batch` from `writers` writers, each on 100 streams of its own in turn.
    async fn append_rows(
        &self,
        sizes: &Sizes,
        write: Write,
        batch: u64,
        writers: u64,
    ) -> Result<Measurement, BoxError> {
        let key = format!(
            "{}{batch}x{writers}",
            if write == Write::Lwt { "lwt" } else { "plain" }
        );
        let per_writer = (sizes.append_events / writers).max(1);
        let bucket = now_micros().div_euclid(TIME_BUCKET_MICROS);
        let cap = Cap::new(sizes.cap);
        let tasks = (0..writers)
            .map(|w| {
                let (session, st, key) = (self.session.clone(), self.st.clone(), key.clone());
                let plan: Vec<Vec<Bytes>> = (0..per_writer.div_ceil(batch))
                    .map(|i| domain::payloads(batch.min(per_writer - i * batch) as usize))
                    .collect();
                async move {
                    let mut latencies = Latencies::default();
                    let (mut written, mut last) = (0u64, 0i64);
                    for (i, payloads) in plan.iter().enumerate() {
                        if cap.reached() {
                            break;
                        }
                        let stream = format!("{key}-w{w}-{}", i % 100);
                        // A stream's time ids only grow, as photon's do.
                        let micros = now_micros().max(last + 1);
                        last = micros;
                        let t0 = Instant::now();
                        let version = (i / 100) as u64 * batch;
                        Self::write_one(
                            &session, &st, write, &key, bucket, &stream, version, payloads, micros,
                        )
                        .await?;
                        latencies.record(t0.elapsed());
                        written += payloads.len() as u64;
                    }
                    Ok::<_, BoxError>((written, latencies))
                }
            })
            .collect::<Vec<_>>();
        // Every writer's appends are built above, before the clock starts, as photon's are.
        let (total, latencies, elapsed) = run_writers(tasks).await?;
        let (subject, role) = match write {
            Write::Lwt => (
                "raw scylla (INSERT IF NOT EXISTS per append)",
                Role::Baseline,
            ),
            Write::Plain => ("raw scylla (plain INSERT per append)", Role::Reference),
        };
        Ok(Measurement::throughput(
            "cassandra",
            "append",
            append_case(batch, writers),
            subject,
            role,
            total,
            elapsed,
        )
        .with_latency(&latencies)
        .capped(total < per_writer * writers))
    }

    /// Writes `streams` streams of `length` events in rows of up to 1,000 (not timed), with
    /// `write`; returns the category partition's bucket.
    async fn write_set(
        &self,
        write: Write,
        key: &str,
        streams: u64,
        length: u64,
    ) -> Result<i64, BoxError> {
        let bucket = now_micros().div_euclid(TIME_BUCKET_MICROS);
        let bar = progress::bar(streams * length, "raw scylla: writing");
        let mut last = 0;
        for s in 0..streams {
            let stream = format!("{key}-{s}");
            let mut done = 0;
            while done < length {
                let n = (length - done).min(1_000);
                let micros = now_micros().max(last + 1);
                last = micros;
                let payloads = domain::payloads(n as usize);
                Self::write_one(
                    &self.session,
                    &self.st,
                    write,
                    key,
                    bucket,
                    &stream,
                    done,
                    &payloads,
                    micros,
                )
                .await?;
                done += n;
                bar.inc(n);
            }
        }
        bar.finish_and_clear();
        Ok(bucket)
    }
}

#[async_trait]
impl Raw for RawCassandra {
    async fn append(
        &self,
        sizes: &Sizes,
        batch: u64,
        writers: u64,
    ) -> Result<Vec<Measurement>, BoxError> {
        Ok(vec![
            self.append_rows(sizes, Write::Lwt, batch, writers).await?,
            self.append_rows(sizes, Write::Plain, batch, writers)
                .await?,
        ])
    }

    async fn load(&self, sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        let mut rows = Vec::new();
        for &length in &sizes.load_lengths {
            let key = format!("load{length}");
            self.write_set(Write::Lwt, &key, sizes.loads, length)
                .await?;
            let mut latencies = Latencies::default();
            let started = Instant::now();
            for s in 0..sizes.loads {
                let stream = format!("{key}-{s}");
                let t0 = Instant::now();
                let mut view = Balances::default();
                let mut from = 0i64;
                loop {
                    let page = self
                        .session
                        .execute_unpaged(&self.st.stream_page, (stream.as_str(), from, PAGE))
                        .await?
                        .into_rows_result()?;
                    let mut seen = 0;
                    for row in page.rows::<(i64, i32, Vec<u8>)>()? {
                        let (version, count, events) = row?;
                        apply(&mut view, &events)?;
                        from = version + i64::from(count);
                        seen += 1;
                    }
                    if seen < PAGE {
                        break;
                    }
                }
                latencies.record(t0.elapsed());
                if view.events() != length {
                    return Err(format!("raw scylla load: {} of {length}", view.events()).into());
                }
            }
            rows.push(
                Measurement::throughput(
                    "cassandra",
                    "load",
                    load_case(length),
                    "raw scylla (paged SELECT of the stream partition)",
                    Role::Baseline,
                    sizes.loads,
                    started.elapsed(),
                )
                .with_latency(&latencies)
                .latency_only(),
            );
        }
        Ok(rows)
    }

    async fn replay(&self, events: u64, _sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        let key = "replay";
        let bucket = self.write_set(Write::Plain, key, 1, events).await?;
        let started = Instant::now();
        let mut lower = CqlTimeuuid::from(time_uuid(bucket * TIME_BUCKET_MICROS, [0x80; 8]));
        let upper = CqlTimeuuid::from(time_uuid(now_micros(), [0x7f; 8]));
        let mut view = Balances::default();
        loop {
            let rows = self
                .session
                .execute_unpaged(&self.st.category_page, (key, bucket, lower, upper, PAGE))
                .await?
                .into_rows_result()?;
            let mut seen = 0;
            for row in rows.rows::<(CqlTimeuuid, String, i64, i32, Vec<u8>)>()? {
                let (t, _stream, _version, _count, blob) = row?;
                apply(&mut view, &blob)?;
                lower = t;
                seen += 1;
            }
            if seen < PAGE {
                break;
            }
        }
        Ok(vec![Measurement::throughput(
            "cassandra",
            "replay",
            format!("{events} events"),
            "raw scylla (paged SELECT of the category partition)",
            Role::Baseline,
            view.events(),
            started.elapsed(),
        )])
    }

    async fn live(&self, _sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        // Cassandra has no push: a raw client polls, which is what photon does. No raw row.
        Ok(vec![])
    }

    async fn clean_up(&self) -> Result<(), BoxError> {
        self.session
            .query_unpaged(format!("DROP KEYSPACE {}", self.ks), ())
            .await?;
        Ok(())
    }
}
