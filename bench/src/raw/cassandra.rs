//! The plain `scylla` driver doing photon-cassandra's I/O shape with its client settings: the
//! session is built by `photon_cassandra::session_builder` from the URL's `CassandraConfig`
//! (contact points, timeouts, credentials, TLS), and every statement is photon-cassandra's own
//! (`photon_cassandra::schema`), prepared with its consistency (QUORUM reads and writes, SERIAL
//! for conditional writes by default) and request timeout.
//!
//! photon-cassandra stores each append as one row of `commits((stream, bucket), version)`
//! (count, time id, event ids, and the append's events MessagePack-encoded in one blob),
//! written with `INSERT ... IF NOT EXISTS` (a Paxos round). Around it, per append, it writes
//! pending markers before, then the category copies and a `streams` row, and deletes the
//! markers. The raw baseline does only the conditional commit row, with a blob of the
//! append's payloads (a MessagePack array of byte strings) and its event ids; a reference row
//! does a plain insert of the category row instead. Loads read one stream partition in pages
//! of `COMMITS_PER_PAGE` rows; the replay reads one category partition in pages of
//! `COMMITS_PER_PAGE` rows by time id, as photon does, decoding every payload into the same
//! view.
//!
//! Every run works in a fresh keyspace (`bench_raw_<id>`, with the URL's replication, by
//! default SimpleStrategy with one replica) with photon's two tables that carry events, created
//! with photon's own definitions before the clock starts and dropped at the end.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use photon_cassandra::schema::{self, Cql};
use photon_cassandra::{CassandraConfig, COMMITS_PER_PAGE};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimeuuid;
use uuid::Uuid;

use super::Raw;
use crate::domain::{self, Balances};
use crate::measure::{run_writers, Cap, Latencies, Measurement, Role};
use crate::photon::{append_case, load_case};
use crate::{progress, BoxError, Sizes};

/// The one stream partition the raw rows use (photon spreads a long stream over partitions of
/// `bucket_size` versions; the raw baseline keeps each stream in its first).
const STREAM_BUCKET: i64 = 0;

/// Microseconds since the Unix epoch.
fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The statements of the raw rows: photon-cassandra's, prepared with its settings.
struct Statements {
    /// The commit row, conditional (`IF NOT EXISTS`).
    insert_commit: PreparedStatement,
    /// The category row, plain.
    insert_category: PreparedStatement,
    /// One page of a category partition after a time id (photon's category read).
    category_page: PreparedStatement,
    /// One page of a stream partition from a version (photon's stream read).
    stream_page: PreparedStatement,
}

async fn prepare(session: &Session, config: &CassandraConfig) -> Result<Statements, BoxError> {
    let prep = |cql: Cql| schema::prepare(session, config, cql);
    Ok(Statements {
        insert_commit: prep(schema::INSERT_COMMIT).await?,
        insert_category: prep(schema::INSERT_CATEGORY_COMMIT).await?,
        category_page: prep(schema::CATEGORY_PAGE).await?,
        stream_page: prep(schema::COMMITS_FROM).await?,
    })
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
    /// Width of a category partition in time, µs: the URL's `time_bucket_s`.
    time_bucket_micros: i64,
}

impl std::fmt::Debug for RawCassandra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCassandra")
            .field("keyspace", &self.ks)
            .finish()
    }
}

impl RawCassandra {
    /// Connects as photon-cassandra does for `url` and creates a fresh keyspace with photon's
    /// tables that carry events.
    ///
    /// # Errors
    /// - The URL's refusal, or the driver's error.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let mut config = CassandraConfig::from_url(url)?;
        let session = Arc::new(photon_cassandra::session_builder(&config)?.build().await?);
        let ks = format!(
            "bench_raw_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        session
            .query_unpaged(schema::create_keyspace_cql(&ks, &config.replication), ())
            .await?;
        for table in [schema::COMMITS, schema::CATEGORY_COMMITS] {
            session.query_unpaged(table.create_cql(&ks), ()).await?;
        }
        session.await_schema_agreement().await?;
        config.keyspace = ks.clone();
        let st = Arc::new(prepare(&session, &config).await?);
        Ok(Self {
            session,
            st,
            ks,
            time_bucket_micros: config.time_bucket.as_micros() as i64,
        })
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
        let t = CqlTimeuuid::from(schema::time_id(micros));
        let n = payloads.len() as i32;
        let blob = blob(payloads);
        match write {
            Write::Lwt => {
                let ids: Vec<Uuid> = payloads.iter().map(|_| Uuid::new_v4()).collect();
                let answer = session
                    .execute_unpaged(
                        &st.insert_commit,
                        (stream, STREAM_BUCKET, version as i64, n, t, &ids, &blob),
                    )
                    .await?;
                if !schema::conditional_write_applied(answer)? {
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
        let bucket = now_micros().div_euclid(self.time_bucket_micros);
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
        let bucket = now_micros().div_euclid(self.time_bucket_micros);
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
                        .execute_unpaged(
                            &self.st.stream_page,
                            (stream.as_str(), STREAM_BUCKET, from, COMMITS_PER_PAGE),
                        )
                        .await?
                        .into_rows_result()?;
                    let mut seen = 0;
                    for row in page.rows::<(i64, i32, CqlTimeuuid, Vec<u8>)>()? {
                        let (version, count, _time_id, events) = row?;
                        apply(&mut view, &events)?;
                        from = version + i64::from(count);
                        seen += 1;
                    }
                    if seen < COMMITS_PER_PAGE {
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
        let from = bucket * self.time_bucket_micros;
        let mut lower = CqlTimeuuid::from(schema::min_time_id(from));
        let upper = CqlTimeuuid::from(schema::max_time_id(now_micros()));
        let mut view = Balances::default();
        loop {
            let rows = self
                .session
                .execute_unpaged(
                    &self.st.category_page,
                    (key, bucket, lower, upper, COMMITS_PER_PAGE),
                )
                .await?
                .into_rows_result()?;
            let mut seen = 0;
            for row in rows.rows::<(CqlTimeuuid, String, i64, i32, Vec<u8>)>()? {
                let (t, _stream, _version, _count, blob) = row?;
                apply(&mut view, &blob)?;
                lower = t;
                seen += 1;
            }
            if seen < COMMITS_PER_PAGE {
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
