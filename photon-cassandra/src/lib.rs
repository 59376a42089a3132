#![doc = include_str!("../README.md")]

mod codec;
mod config;
mod schema;
mod subscription;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, BoxStream};
use futures::StreamExt;
use photon_api::validate::{classify_batch, validate_batch, BatchKind, StoredId};
use photon_api::{
    error_stream, AppendResult, Bytes, Capabilities, Category, Direction, Error, EventData,
    EventStore, ExpectedVersion, Health, ReadOptions, RecordedEvent, Selector, Start, StreamId,
    SubscriptionItem, SubscriptionMode, Timestamp, Uuid, Version,
};
use scylla::client::session::Session;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::value::CqlTimeuuid;
use tokio::sync::OnceCell;

pub use config::{CassandraConfig, Replication};

use crate::codec::{Commit, Position};
use crate::schema::Statements;

/// The URL scheme of this backend (`scylla://` is accepted too).
pub const SCHEME: &str = "cassandra";

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "cassandra";

/// The category key under which the all stream is kept in the category tables.
pub(crate) const ALL: &str = "$all";

/// Commits fetched per page of a read: memory holds one page however long the stream.
pub(crate) const PAGE: i32 = 64;

/// The event store on Apache Cassandra or ScyllaDB (tested on Cassandra 5.0). Clones share one
/// session.
#[derive(Clone)]
pub struct CassandraStore {
    inner: Arc<Shared>,
}

impl fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CassandraStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// What this process knows of one stream: where its next commit goes, the time of its last
/// commit, and its event ids (for idempotent re-sends).
#[derive(Default, Clone)]
pub(crate) struct StreamMeta {
    pub(crate) next_first: u64,
    pub(crate) last_time: i64,
    ids: HashMap<Uuid, StoredId>,
    /// Time id of each commit, by first version.
    times: HashMap<u64, Uuid>,
}

/// Streams whose metadata is cached, at most; beyond it the cache is emptied (it is rebuilt
/// from the table on demand).
const META_CACHE_STREAMS: usize = 10_000;

pub(crate) struct Shared {
    pub(crate) config: CassandraConfig,
    ready: OnceCell<(Session, Statements)>,
    meta: Mutex<HashMap<String, StreamMeta>>,
    crash_after_commit: AtomicBool,
}

/// A driver error as ours: timeouts, unavailable replicas and lost connections are
/// `Unavailable` (retry with the same ids), the rest `Backend`.
pub(crate) fn map_error(context: &str, e: impl Into<ExecutionError>) -> Error {
    let e = e.into();
    let transient = match &e {
        ExecutionError::RequestTimeout(_)
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::EmptyPlan => true,
        ExecutionError::LastAttemptError(a) => match a {
            RequestAttemptError::BrokenConnectionError(_)
            | RequestAttemptError::UnableToAllocStreamId => true,
            RequestAttemptError::DbError(db, _) => matches!(
                db,
                DbError::Unavailable { .. }
                    | DbError::Overloaded
                    | DbError::IsBootstrapping
                    | DbError::ReadTimeout { .. }
                    | DbError::WriteTimeout { .. }
                    | DbError::ReadFailure { .. }
                    | DbError::WriteFailure { .. }
                    | DbError::RateLimitReached { .. }
            ),
            _ => false,
        },
        _ => false,
    };
    if transient {
        Error::Unavailable {
            backend: BACKEND,
            message: format!("{context}: {e}"),
            source: Some(Box::new(e)),
        }
    } else {
        Error::backend(BACKEND, format!("{context}: {e}"))
    }
}

pub(crate) fn rows_error(context: &str, e: impl fmt::Display) -> Error {
    Error::backend(BACKEND, format!("{context}: {e}"))
}

impl CassandraStore {
    /// Builds a store for a `cassandra://` URL (see [`CassandraConfig::from_url`]). Nothing is
    /// contacted yet: the first operation connects, creates the schema when allowed, and reports
    /// an unreachable cluster as `Unavailable`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a URL that is refused.
    pub async fn from_url(url: &str) -> Result<Self, Error> {
        Ok(Self::new(CassandraConfig::from_url(url)?))
    }

    /// A store with `config`.
    pub fn new(config: CassandraConfig) -> Self {
        Self {
            inner: Arc::new(Shared {
                config,
                ready: OnceCell::new(),
                meta: Mutex::default(),
                crash_after_commit: AtomicBool::new(false),
            }),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &CassandraConfig {
        &self.inner.config
    }

    /// For tests of the repair path: while on, every append stops right after its commit row is
    /// written, before the category rows are, and reports an error, as if the process had died
    /// there. Readers then find the append's pending marker and repair it.
    pub fn set_crash_after_commit(&self, on: bool) {
        self.inner.crash_after_commit.store(on, Ordering::SeqCst);
    }
}

impl Shared {
    /// The session and prepared statements, connecting and creating the schema on first use.
    pub(crate) async fn ready(&self) -> Result<&(Session, Statements), Error> {
        self.ready
            .get_or_try_init(|| schema::connect(&self.config))
            .await
    }

    pub(crate) fn bucket_of(&self, version: u64) -> i64 {
        (version / self.config.bucket_size) as i64
    }

    pub(crate) fn time_bucket_of(&self, micros: i64) -> i64 {
        micros.div_euclid(self.config.time_bucket_micros())
    }

    /// Brings this process's knowledge of `stream` up to date by reading the commits after the
    /// ones it knows. `serial`: a linearizable read, which also settles a conditional write in
    /// flight (the append path needs it; plain reads do not).
    pub(crate) async fn refresh(
        &self,
        stream: &StreamId,
        serial: bool,
    ) -> Result<StreamMeta, Error> {
        let (session, st) = self.ready().await?;
        let mut meta = self
            .meta
            .lock()
            .expect("meta lock")
            .get(stream.as_str())
            .cloned()
            .unwrap_or_default();
        let query = if serial {
            &st.commit_ids_from_serial
        } else {
            &st.commit_ids_from
        };
        loop {
            let bucket = self.bucket_of(meta.next_first);
            let rows = session
                .execute_unpaged(query, (stream.as_str(), bucket, meta.next_first as i64))
                .await
                .map_err(|e| map_error(&format!("reading {stream}"), e))?
                .into_rows_result()
                .map_err(|e| rows_error("reading commits", e))?;
            let mut seen = 0;
            for row in rows
                .rows::<(i64, i32, CqlTimeuuid, Vec<Uuid>)>()
                .map_err(|e| rows_error("reading commits", e))?
            {
                let (first, count, time_id, ids) =
                    row.map_err(|e| rows_error("reading commits", e))?;
                let (first, time_id) = (first as u64, Uuid::from(time_id));
                for (i, id) in ids.iter().enumerate() {
                    meta.ids.insert(
                        *id,
                        StoredId {
                            version: Version(first + i as u64),
                            batch_first: Version(first),
                            batch_len: count as usize,
                        },
                    );
                }
                meta.times.insert(first, time_id);
                meta.next_first = first + count as u64;
                meta.last_time = meta.last_time.max(codec::time_micros(&time_id));
                seen += 1;
            }
            // The next commit, if any, is in the bucket of its first version.
            if seen == 0 || self.bucket_of(meta.next_first) == bucket {
                break;
            }
        }
        self.remember(stream, &meta);
        Ok(meta)
    }

    fn remember(&self, stream: &StreamId, meta: &StreamMeta) {
        let mut cache = self.meta.lock().expect("meta lock");
        if cache.len() >= META_CACHE_STREAMS && !cache.contains_key(stream.as_str()) {
            cache.clear();
        }
        let known = cache.entry(stream.as_str().to_owned()).or_default();
        if meta.next_first >= known.next_first {
            *known = meta.clone();
        }
    }

    /// Writes a committed append's category and all-stream rows and clears its pending markers
    /// (its time bucket was registered with the markers): the second write of an append, and
    /// the repair of one whose writer died before it. The rows carry the events, so they are
    /// written one by one (a batch of them would exceed `batch_size_fail_threshold`, 50 KiB by
    /// default); the markers go only once all are written, so any failure is repaired whole.
    pub(crate) async fn index_commit(&self, commit: &Commit, count: i32) -> Result<(), Error> {
        let (session, st) = self.ready().await?;
        let category = commit.stream.category_name();
        let micros = codec::time_micros(&commit.time_id);
        let tb = self.time_bucket_of(micros);
        let t = CqlTimeuuid::from(commit.time_id);
        let stream = commit.stream.as_str();
        let first = commit.first as i64;
        let events: &[u8] = &commit.events;
        let context = || format!("indexing {stream}@{first}");
        let (a, b, c) = tokio::join!(
            session.execute_unpaged(
                &st.insert_category,
                (category, tb, t, stream, first, count, events)
            ),
            session.execute_unpaged(
                &st.insert_category,
                (ALL, tb, t, stream, first, count, events)
            ),
            session.execute_unpaged(&st.insert_stream, (category, stream)),
        );
        for r in [a, b, c] {
            r.map_err(|e| map_error(&context(), e))?;
        }
        self.clear_markers(commit.stream.category_name(), commit.time_id)
            .await
            .map_err(|e| Error::backend(BACKEND, format!("{}: {e}", context())))
    }

    /// Deletes an append's pending markers. The delete carries the marker's own time plus one
    /// as its write timestamp, so it wins over the insert whatever the coordinators' clocks say.
    pub(crate) async fn clear_markers(&self, category: &str, time_id: Uuid) -> Result<(), Error> {
        let (session, st) = self.ready().await?;
        let micros = codec::time_micros(&time_id);
        let tb = self.time_bucket_of(micros);
        let t = CqlTimeuuid::from(time_id);
        session
            .batch(
                &st.clear_pending,
                ((micros + 1, category, tb, t), (micros + 1, ALL, tb, t)),
            )
            .await
            .map_err(|e| map_error("clearing pending markers", e))?;
        Ok(())
    }

    /// Settles a pending marker: with a serial read (which also completes a conditional write
    /// still in flight), the commit is either there with this time id (its category rows are
    /// written, the marker cleared) or not (the marker is dropped). Readers call it for markers
    /// older than `repair_after`; an append calls it when its own outcome is unknown.
    pub(crate) async fn settle_marker(
        &self,
        time_id: Uuid,
        stream: &StreamId,
        version: u64,
    ) -> Result<(), Error> {
        match self.stored_commit(stream, version).await? {
            Some((commit, count)) if commit.time_id == time_id => {
                tracing::info!(%stream, version, "photon-cassandra: writing the category rows of a committed append");
                self.index_commit(&commit, count).await
            }
            _ => self.clear_markers(stream.category_name(), time_id).await,
        }
    }

    /// The commit at `version` by a serial read.
    async fn stored_commit(
        &self,
        stream: &StreamId,
        version: u64,
    ) -> Result<Option<(Commit, i32)>, Error> {
        let (session, st) = self.ready().await?;
        let rows = session
            .execute_unpaged(
                &st.commit_at_serial,
                (stream.as_str(), self.bucket_of(version), version as i64),
            )
            .await
            .map_err(|e| map_error(&format!("reading {stream}@{version}"), e))?
            .into_rows_result()
            .map_err(|e| rows_error("reading a commit", e))?;
        Ok(rows
            .maybe_first_row::<(i32, CqlTimeuuid, Vec<u8>)>()
            .map_err(|e| rows_error("reading a commit", e))?
            .map(|(count, t, events)| {
                (
                    Commit {
                        stream: stream.clone(),
                        first: version,
                        time_id: t.into(),
                        events: Bytes::from(events),
                    },
                    count,
                )
            }))
    }

    async fn append(
        self: &Arc<Self>,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        validate_batch(
            stream,
            &events,
            self.config.max_event_size,
            Some(self.config.max_append_size),
        )?;
        let blob = Bytes::from(codec::encode_events(&events)?);
        let (session, st) = self.ready().await?;
        let category = stream.category_name();
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let mut fresh = false;
        let mut meta = match self.meta.lock().expect("meta lock").get(stream.as_str()) {
            Some(m) => m.clone(),
            None => StreamMeta::default(),
        };
        if meta.next_first == 0 {
            meta = self.refresh(stream, true).await?;
            fresh = true;
        }
        for _attempt in 0..100 {
            let kind = classify_batch(stream, &events, |id| meta.ids.get(id).copied());
            let kind = match kind {
                // A conflict against a stale view is checked against a fresh one first.
                Err(_) if !fresh => {
                    meta = self.refresh(stream, true).await?;
                    fresh = true;
                    continue;
                }
                other => other?,
            };
            if let BatchKind::Retry { first } = kind {
                // The earlier attempt may have stopped before its category rows: settle it now
                // (idempotent) rather than leave readers waiting for the repair delay.
                let (me, s) = (self.clone(), stream.clone());
                tokio::spawn(async move {
                    if let Ok(Some((commit, count))) = me.stored_commit(&s, first.0).await {
                        let _ = me.index_commit(&commit, count).await;
                    }
                });
                return Ok(self.result(&meta, first, events.len()));
            }
            let current = meta.next_first.checked_sub(1).map(Version);
            if !expected.matches(current) {
                if !fresh {
                    meta = self.refresh(stream, true).await?;
                    fresh = true;
                    continue;
                }
                return Err(Error::WrongExpectedVersion {
                    stream: stream.clone(),
                    expected,
                    actual: current,
                });
            }
            let first = meta.next_first;
            // A stream's time ids only grow, so its commits keep their order in the category,
            // whatever the writers' clocks say.
            let micros = Timestamp::now().unix_micros().max(meta.last_time + 1);
            let time_id = codec::time_id(micros);
            let tb = self.time_bucket_of(micros);
            let t = CqlTimeuuid::from(time_id);
            // The pending markers go first: readers of the category do not pass a pending
            // append's time until it is indexed, or repair it when its writer died.
            session
                .batch(
                    &st.pending,
                    (
                        (category, tb, t, stream.as_str(), first as i64, micros),
                        (ALL, tb, t, stream.as_str(), first as i64, micros),
                        (category, tb),
                        (ALL, tb),
                    ),
                )
                .await
                .map_err(|e| map_error(&format!("appending to {stream}"), e))?;
            // Readers pass a time once it is `settle` old. A marker that took that long to
            // write may have been missed: give this time id up and take a new one.
            if Timestamp::now().unix_micros() - micros > self.config.settle.as_micros() as i64 / 2 {
                let _ = self.clear_markers(category, time_id).await;
                continue;
            }
            let answer = session
                .execute_unpaged(
                    &st.insert_commit,
                    (
                        stream.as_str(),
                        self.bucket_of(first),
                        first as i64,
                        events.len() as i32,
                        t,
                        &ids,
                        &blob[..],
                    ),
                )
                .await;
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    // The outcome is unknown: a re-send with the same ids finds out which. Settle
                    // the marker now so readers need not wait for the repair delay.
                    let (me, s) = (self.clone(), stream.clone());
                    tokio::spawn(async move {
                        let _ = me.settle_marker(time_id, &s, first).await;
                    });
                    return Err(map_error(&format!("appending to {stream} at {first}"), e));
                }
            };
            if !schema::lwt_applied(answer)? {
                // Another commit took this version (maybe our own earlier attempt).
                let _ = self.clear_markers(category, time_id).await;
                meta = self.refresh(stream, true).await?;
                fresh = true;
                continue;
            }
            for (i, id) in ids.iter().enumerate() {
                meta.ids.insert(
                    *id,
                    StoredId {
                        version: Version(first + i as u64),
                        batch_first: Version(first),
                        batch_len: events.len(),
                    },
                );
            }
            meta.times.insert(first, time_id);
            meta.next_first = first + events.len() as u64;
            meta.last_time = micros;
            self.remember(stream, &meta);
            if self.crash_after_commit.load(Ordering::SeqCst) {
                return Err(Error::backend(
                    BACKEND,
                    format!("simulated crash after the commit of {stream}@{first}"),
                ));
            }
            let commit = Commit {
                stream: stream.clone(),
                first,
                time_id,
                events: blob.clone(),
            };
            // The append is committed. The category rows are written in a task of their own, so
            // a caller that goes away does not stop them; if they fail, the pending markers stay
            // and readers repair them. The caller's events are stored either way.
            let (me, count) = (self.clone(), events.len() as i32);
            let indexing = tokio::spawn(async move { me.index_commit(&commit, count).await });
            match indexing.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%stream, first, error = %e, "photon-cassandra: category rows left to repair")
                }
                Err(e) => {
                    tracing::warn!(%stream, first, error = %e, "photon-cassandra: indexing task failed")
                }
            }
            return Ok(self.result(&meta, Version(first), events.len()));
        }
        Err(Error::Unavailable {
            backend: BACKEND,
            message: format!("{stream}: 100 attempts lost the race for the next version"),
            source: None,
        })
    }

    fn result(&self, meta: &StreamMeta, first: Version, len: usize) -> AppendResult {
        let time_id = meta
            .times
            .get(&first.0)
            .copied()
            .unwrap_or_else(|| codec::time_id(0));
        AppendResult {
            first_version: first,
            last_version: Version(first.0 + len as u64 - 1),
            checkpoints: (0..len)
                .map(|i| {
                    Position {
                        time_id,
                        index: i as u32,
                        version: first.0 + i as u64,
                    }
                    .to_checkpoint()
                })
                .collect(),
        }
    }

    /// The commit holding `version`, found from the bucket of `version` back to earlier ones
    /// (a commit may run past the end of the bucket it starts in).
    async fn commit_holding(&self, stream: &StreamId, version: u64) -> Result<Option<u64>, Error> {
        let (session, st) = self.ready().await?;
        let mut bucket = self.bucket_of(version);
        while bucket >= 0 {
            let rows = session
                .execute_unpaged(
                    &st.commit_at_or_before,
                    (stream.as_str(), bucket, version as i64),
                )
                .await
                .map_err(|e| map_error(&format!("reading {stream}"), e))?
                .into_rows_result()
                .map_err(|e| rows_error("reading commits", e))?;
            if let Some((first, count)) = rows
                .maybe_first_row::<(i64, i32)>()
                .map_err(|e| rows_error("reading commits", e))?
            {
                let (first, count) = (first as u64, count as u64);
                return Ok((first + count > version).then_some(first));
            }
            bucket -= 1;
        }
        Ok(None)
    }

    /// One page of commits of `stream` in `bucket`, from `from` upwards (or downwards).
    pub(crate) async fn commits_page(
        &self,
        stream: &StreamId,
        bucket: i64,
        from: u64,
        forwards: bool,
    ) -> Result<Vec<(Commit, i32)>, Error> {
        let (session, st) = self.ready().await?;
        let q = if forwards {
            &st.commits_from
        } else {
            &st.commits_down_from
        };
        let rows = session
            .execute_unpaged(q, (stream.as_str(), bucket, from as i64, PAGE))
            .await
            .map_err(|e| map_error(&format!("reading {stream}"), e))?
            .into_rows_result()
            .map_err(|e| rows_error("reading commits", e))?;
        rows.rows::<(i64, i32, CqlTimeuuid, Vec<u8>)>()
            .map_err(|e| rows_error("reading commits", e))?
            .map(|r| {
                let (first, count, t, events) = r.map_err(|e| rows_error("reading commits", e))?;
                Ok((
                    Commit {
                        stream: stream.clone(),
                        first: first as u64,
                        time_id: t.into(),
                        events: Bytes::from(events),
                    },
                    count,
                ))
            })
            .collect()
    }
}

/// Decodes a commit's events with their checkpoints.
pub(crate) fn events_of(commit: &Commit) -> Result<Vec<RecordedEvent>, Error> {
    codec::decode_events(commit, |i| {
        Position {
            time_id: commit.time_id,
            index: i as u32,
            version: commit.first + i as u64,
        }
        .to_checkpoint()
    })
}

/// Where a stream read stands between pages.
struct ReadCursor {
    shared: Arc<Shared>,
    stream: StreamId,
    /// Next commit's first version (forwards) or the highest version still wanted (backwards).
    at: u64,
    bucket: i64,
    /// Versions outside `[lo, hi]` are not delivered.
    lo: u64,
    hi: u64,
    left: usize,
    forwards: bool,
    done: bool,
}

impl ReadCursor {
    async fn page(&mut self) -> Result<Vec<RecordedEvent>, Error> {
        let mut out = Vec::new();
        while out.is_empty() && !self.done && self.left > 0 {
            let page = self
                .shared
                .commits_page(&self.stream, self.bucket, self.at, self.forwards)
                .await?;
            let full = page.len() == PAGE as usize;
            for (commit, count) in &page {
                let mut events = events_of(commit)?;
                events.retain(|e| (self.lo..=self.hi).contains(&e.version.0));
                if !self.forwards {
                    events.reverse();
                }
                for e in events {
                    if self.left == 0 {
                        break;
                    }
                    self.left -= 1;
                    out.push(e);
                }
                if self.forwards {
                    self.at = commit.first + *count as u64;
                } else if commit.first == 0 {
                    self.done = true;
                } else {
                    self.at = commit.first - 1;
                }
            }
            if self.forwards {
                if full {
                    continue;
                }
                // The next commit, if any, starts in the bucket of its first version.
                let next = self.shared.bucket_of(self.at);
                if next == self.bucket {
                    self.done = true;
                } else {
                    self.bucket = next;
                }
            } else if !full && !self.done {
                // Earlier commits are in this bucket's predecessors.
                match self.shared.commit_holding(&self.stream, self.at).await? {
                    Some(first) => self.bucket = self.shared.bucket_of(first),
                    None => self.done = true,
                }
            }
        }
        Ok(out)
    }
}

fn read_stream(
    shared: Arc<Shared>,
    stream: StreamId,
    options: ReadOptions,
) -> BoxStream<'static, Result<RecordedEvent, Error>> {
    let start = async move {
        let forwards = options.direction == Direction::Forwards;
        let left = options.limit.unwrap_or(usize::MAX);
        let (at, lo, hi, bucket) = if forwards {
            let from = options.from.map_or(0, |v| v.0);
            // Past the head there is nothing to find (and no partition to look in).
            if from >= shared.refresh(&stream, false).await?.next_first {
                return Ok(None);
            }
            match shared.commit_holding(&stream, from).await? {
                Some(first) => (first, from, u64::MAX, shared.bucket_of(first)),
                None => return Ok(None),
            }
        } else {
            let head = shared.refresh(&stream, false).await?.next_first;
            let Some(top) = head.checked_sub(1) else {
                return Ok(None);
            };
            let hi = options.from.map_or(top, |v| v.0.min(top));
            match shared.commit_holding(&stream, hi).await? {
                Some(first) => (hi, 0, hi, shared.bucket_of(first)),
                None => return Ok(None),
            }
        };
        Ok::<_, Error>(Some(ReadCursor {
            shared,
            stream,
            at,
            bucket,
            lo,
            hi,
            left,
            forwards,
            done: left == 0,
        }))
    };
    stream::once(start)
        .flat_map(|r| match r {
            Err(e) => error_stream(e),
            Ok(None) => stream::empty().boxed(),
            Ok(Some(cursor)) => stream::unfold(Some(cursor), |cursor| async move {
                let mut cursor = cursor?;
                match cursor.page().await {
                    Ok(events) if events.is_empty() => None,
                    Ok(events) => Some((
                        stream::iter(events.into_iter().map(Ok)).boxed(),
                        Some(cursor),
                    )),
                    Err(e) => Some((error_stream(e), None)),
                }
            })
            .flatten()
            .boxed(),
        })
        .boxed()
}

#[async_trait]
impl EventStore for CassandraStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            all_stream: true,
            subscribe_from_time: true,
            // Category and all rows are ordered by time id, and readers never pass a time that
            // may still receive a commit (settle delay, pending markers).
            total_order: true,
            max_event_size: self.inner.config.max_event_size,
            max_append_size: Some(self.inner.config.max_append_size),
        }
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        self.inner.append(stream, expected, events).await
    }

    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        read_stream(self.inner.clone(), stream.clone(), options)
    }

    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
        subscription::subscribe(self.inner.clone(), selector, start, mode)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
        let meta = self.inner.refresh(stream, false).await?;
        Ok(meta.next_first.checked_sub(1).map(Version))
    }

    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        let (session, st) = self.inner.ready().await?;
        let rows = session
            .execute_unpaged(&st.categories, ())
            .await
            .map_err(|e| map_error("listing categories", e))?
            .into_rows_result()
            .map_err(|e| rows_error("listing categories", e))?;
        let mut out = Vec::new();
        for r in rows
            .rows::<(String,)>()
            .map_err(|e| rows_error("listing categories", e))?
        {
            let (c,) = r.map_err(|e| rows_error("listing categories", e))?;
            if c != ALL {
                out.push(Category::new(c)?);
            }
        }
        out.sort();
        Ok(out)
    }

    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        let inner = self.inner.clone();
        let category = category.clone();
        // Paged by the driver as the caller pulls: a category may hold millions of streams.
        stream::once(async move {
            let (session, st) = inner.ready().await?;
            session
                .execute_iter(st.streams.clone(), (category.as_str().to_owned(),))
                .await
                .map_err(|e| rows_error("listing streams", e))?
                .rows_stream::<(String,)>()
                .map_err(|e| rows_error("listing streams", e))
        })
        .flat_map(|r| match r {
            Ok(rows) => rows
                .map(|row| {
                    let (s,) = row.map_err(|e| rows_error("listing streams", e))?;
                    StreamId::parse(s)
                })
                .boxed(),
            Err(e) => error_stream(e),
        })
        .boxed()
    }

    async fn health(&self) -> Result<Health, Error> {
        let (session, _) = self.inner.ready().await?;
        let rows = session
            .query_unpaged("SELECT release_version FROM system.local", ())
            .await
            .map_err(|e| map_error("health", e))?
            .into_rows_result()
            .map_err(|e| rows_error("health", e))?;
        let (version,) = rows
            .single_row::<(String,)>()
            .map_err(|e| rows_error("health", e))?;
        Ok(Health {
            backend: BACKEND,
            detail: format!(
                "{} (release {version}), keyspace {}",
                self.inner.config.contact_points.join(","),
                self.inner.config.keyspace
            ),
        })
    }
}

/// How long live readers pause between polls when nothing is new.
pub(crate) const POLL: Duration = Duration::from_millis(100);
