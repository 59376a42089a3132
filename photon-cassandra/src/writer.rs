//! The append protocol (README, "How an append works"): decide the version, write the pending
//! markers, the one conditional write of the commit, and answer; the category rows and the
//! markers' deletes follow in the background (`indexer`). Also the repair of an append whose
//! writer stopped between the commit and its category rows (which readers call too).
//!
//! This module owns every write to the keyspace except the schema's. It reads only what an
//! append must know (the stream's head and ids, by `reader`'s serial refresh).

use std::sync::Arc;
use std::time::{Duration, Instant};

use photon_api::telemetry::{record_outcome, Attempts};
use photon_api::validate::{classify_batch, validate_batch, BatchKind};
use photon_api::{AppendResult, Bytes, Error, EventData, ExpectedVersion, StreamId, Uuid, Version};
use scylla::value::CqlTimeuuid;
use tracing::Instrument;

use crate::client::{Shared, StreamMeta, ALL, BACKEND, TELEMETRY};
use crate::codec::{self, Commit, Position};
use crate::error;
use crate::indexer::Marker;

/// Attempts of one append before it gives up (each lost a race for the next version, or took
/// too long to write its markers).
const MAX_ATTEMPTS: usize = 100;

/// Attempts in a row whose markers took longer than half the settle delay to write before an
/// append gives up, if they also took at least `timeout_ms` together: the link to the cluster
/// is slower than `settle_ms` allows, and another attempt with a new time id would only be as
/// slow. (A short stall of a loaded node is waited out: attempts go on until it has lasted a
/// request timeout.)
const SLOW_MARKER_ATTEMPTS: u32 = 3;

/// Rounds of one repair before it gives up (each lost a race for the version's row).
const MAX_FENCE_ROUNDS: usize = 10;

/// Rounds of one repair that may end in `Unavailable` before the repair gives up with it. Every
/// reader of a category repairs the same stale marker, and their serial reads and conditional
/// writes contend in Paxos: on a busy cluster one of them times out although the next round,
/// which completes whatever was left in flight, would settle it. A timed-out round is a lost
/// race, not an outage; three in a row are reported.
const MAX_UNAVAILABLE_ROUNDS: usize = 3;

impl Shared {
    /// Appends `events` to `stream` if its version is `expected`, or recognises a re-send.
    /// `attempts` is set to the attempts made (each after the first lost a race).
    pub(crate) async fn append(
        self: &Arc<Self>,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        attempts: &Attempts,
    ) -> Result<AppendResult, Error> {
        let config = &self.config;
        validate_batch(
            stream,
            &events,
            config.max_event_size,
            Some(config.max_append_size),
        )?;
        let mut append = Append::start(self, stream, expected, &events).await?;
        for attempt in 1..=MAX_ATTEMPTS {
            attempts.set(attempt as u32);
            if let Some(result) = append.attempt().await? {
                return Ok(result);
            }
            if let Some(slow) = append.slow_markers.filter(|slow| {
                slow.attempts >= SLOW_MARKER_ATTEMPTS && slow.since.elapsed() >= config.timeout
            }) {
                return Err(error::markers_too_slow(
                    stream,
                    slow.attempts,
                    slow.last,
                    config.settle,
                ));
            }
        }
        Err(Error::Unavailable {
            backend: BACKEND,
            message: format!(
                "{stream}: {MAX_ATTEMPTS} attempts lost the race for the next version"
            ),
            source: None,
        })
    }

    /// Writes a committed append's category and all-stream rows and clears its pending markers
    /// (its time bucket was registered with the markers): the second write of an append, and
    /// the repair of one whose writer died before it. The rows carry the events, so they are
    /// written one by one (a batch of them would exceed `batch_size_fail_threshold`, 50 KiB by
    /// default); the markers go only once all are written, so any failure is repaired whole.
    pub(crate) async fn index_commit(&self, commit: &Commit, count: i32) -> Result<(), Error> {
        let (session, st) = self.ready().await?;
        let category = commit.stream.category_name();
        let tb = self.time_bucket_of(codec::time_micros(&commit.time_id));
        let t = CqlTimeuuid::from(commit.time_id);
        let stream = commit.stream.as_str();
        let first = commit.first as i64;
        let events: &[u8] = &commit.events;
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
        let context = || format!("indexing {stream}@{first}");
        for r in [a, b, c] {
            r.map_err(|e| error::request(context(), e))?;
        }
        // The clearing's own error, as typed: a timed-out delete is `Unavailable` (the repair
        // tries again), not a definite failure that would end a reader for good.
        self.clear_markers(category, commit.time_id).await
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
            .map_err(|e| {
                error::request(format!("clearing the pending markers of {category}"), e)
            })?;
        Ok(())
    }

    /// Lists `stream` in `streams` (its category's listing), once a commit of it is stored.
    pub(crate) async fn list_stream(&self, stream: &StreamId) -> Result<(), Error> {
        let (session, st) = self.ready().await?;
        session
            .execute_unpaged(&st.insert_stream, (stream.category_name(), stream.as_str()))
            .await
            .map_err(|e| error::request(format!("listing {stream}"), e))?;
        self.remember_listed(stream.as_str());
        Ok(())
    }

    /// The row `statement` reads at `version` of `stream` (a plain read of the commit there).
    async fn row_at<R>(
        &self,
        statement: &scylla::statement::prepared::PreparedStatement,
        stream: &StreamId,
        version: u64,
    ) -> Result<Option<R>, Error>
    where
        R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let (session, _) = self.ready().await?;
        let context = || format!("reading the commit {stream}@{version}");
        let key = (stream.as_str(), self.bucket_of(version), version as i64);
        session
            .execute_unpaged(statement, key)
            .await
            .map_err(|e| error::request(context(), e))?
            .into_rows_result()
            .map_err(|e| error::driver(context(), e))?
            .maybe_first_row::<R>()
            .map_err(|e| error::driver(context(), e))
    }

    /// Whether the commit of the pending marker at `time_id` (for `version` of `stream`) is
    /// stored, by a plain read of its count and time id (no Paxos round, no events).
    pub(crate) async fn committed_at(
        &self,
        time_id: Uuid,
        stream: &StreamId,
        version: u64,
    ) -> Result<bool, Error> {
        let (_, st) = self.ready().await?;
        let row = self
            .row_at::<(i32, CqlTimeuuid)>(&st.commit_state_at, stream, version)
            .await?;
        Ok(row.is_some_and(|(count, t)| count > 0 && Uuid::from(t) == time_id))
    }

    /// Indexes the append of a pending marker if its commit is stored, by a plain read (no
    /// Paxos round): what a reader does with a marker that holds it back, older than its
    /// writer's own rows would be (`settle` and a request timeout), but not yet old enough to
    /// repair. Its writer answered its caller and writes the rows in the background,
    /// unless it stopped first (a process that exits right after its append), and then readers
    /// need not wait `repair_after` for them. Whether the marker is settled; a commit not found
    /// (still in flight, or never to come) is left to its writer or the repair, and so is any
    /// error (a reader without MODIFY cannot write the rows: it waits, as before).
    pub(crate) async fn index_if_committed(
        &self,
        time_id: Uuid,
        stream: &StreamId,
        version: u64,
    ) -> bool {
        let found = async {
            let (_, st) = self.ready().await?;
            let row = self
                .row_at::<(i32, CqlTimeuuid, Vec<u8>)>(&st.commit_at, stream, version)
                .await?;
            Ok::<_, Error>(row.filter(|(count, t, _)| *count > 0 && Uuid::from(*t) == time_id))
        };
        let indexed = match found.await {
            Ok(Some((count, _, events))) => {
                let commit = Commit {
                    stream: stream.clone(),
                    first: version,
                    time_id,
                    events: Bytes::from(events),
                };
                self.index_commit(&commit, count).await
            }
            Ok(None) => return false,
            Err(e) => Err(e),
        };
        match indexed {
            Ok(()) => {
                tracing::debug!(%stream, version, "photon-cassandra: a reader wrote the category rows of a committed append");
                true
            }
            Err(e) => {
                tracing::debug!(%stream, version, error = %e, "photon-cassandra: a reader could not index a committed append; waiting");
                false
            }
        }
    }

    /// Settles a pending marker by *fencing*, not by observing: with serial reads and
    /// conditional writes (which also complete a conditional write in flight), the commit at
    /// `version` is either there with this time id (its category rows are written, the marker
    /// cleared), or the version is taken by another commit, or it is made a *void* of this time
    /// id (a row with no events) before the marker goes. A void is a row, so the append's own
    /// `IF NOT EXISTS`, however late it reaches the server, can no longer apply, and a write over
    /// an earlier void is conditional on that void's time id, which this renews. So an append
    /// never lands at a time readers have passed: a re-send stores it afresh, at a new time.
    /// Readers call it for markers older than `repair_after`; an append calls it when its own
    /// outcome is unknown.
    pub(crate) async fn settle_marker(
        &self,
        time_id: Uuid,
        stream: &StreamId,
        version: u64,
    ) -> Result<(), Error> {
        let span = TELEMETRY.repair_span(Some(stream), version);
        let mut rounds = 0;
        let settled = self
            .settle_rounds(time_id, stream, version, &mut rounds)
            .instrument(span.clone())
            .await;
        record_outcome(&span, &settled, Some(rounds));
        TELEMETRY.retried(u64::from(rounds.saturating_sub(1)));
        settled
    }

    /// The rounds of [`settle_marker`](Self::settle_marker), counted in `rounds`.
    async fn settle_rounds(
        &self,
        time_id: Uuid,
        stream: &StreamId,
        version: u64,
        rounds: &mut u32,
    ) -> Result<(), Error> {
        // Each lost race means another writer or repairer changed the row in between; the
        // row only moves forward (absent, void, commit), so a few rounds settle it. Every step
        // is safe to repeat: the next round's serial read sees what a timed-out one left.
        let mut unavailable = 0;
        for _ in 0..MAX_FENCE_ROUNDS {
            *rounds += 1;
            match self.fence_round(time_id, stream, version).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e @ Error::Unavailable { .. }) => {
                    unavailable += 1;
                    if unavailable >= MAX_UNAVAILABLE_ROUNDS {
                        return Err(e);
                    }
                    tracing::debug!(%stream, version, error = %e, "photon-cassandra: a repair round was not answered; trying again");
                    // Room for the driver to reconnect, or for the contending round to finish.
                    tokio::time::sleep(Duration::from_millis(100 << unavailable)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable {
            backend: BACKEND,
            message: format!(
                "{stream}@{version}: {MAX_FENCE_ROUNDS} rounds of repair lost the race for the version"
            ),
            source: None,
        })
    }

    /// One round of [`settle_marker`](Self::settle_marker): whether it settled the marker, or
    /// lost a race for the row and must look again.
    async fn fence_round(
        &self,
        time_id: Uuid,
        stream: &StreamId,
        version: u64,
    ) -> Result<bool, Error> {
        let fenced = match self.stored_commit(stream, version).await? {
            Some((commit, count)) if count > 0 && commit.time_id == time_id => {
                tracing::info!(%stream, version, "photon-cassandra: writing the category rows of a committed append");
                self.index_commit(&commit, count).await?;
                return Ok(true);
            }
            // Another commit has the version, or this marker's void is there already.
            Some((commit, count)) if count > 0 || commit.time_id == time_id => true,
            Some((void, _)) => {
                self.void(stream, version, time_id, Some(void.time_id))
                    .await?
            }
            None => self.void(stream, version, time_id, None).await?,
        };
        if fenced {
            self.clear_markers(stream.category_name(), time_id).await?;
        }
        Ok(fenced)
    }

    /// Makes `version` of `stream` a void of `time_id`: a conditional insert where there is no
    /// row, or a conditional renewal of the void of time id `over`. Whether it applied.
    async fn void(
        &self,
        stream: &StreamId,
        version: u64,
        time_id: Uuid,
        over: Option<Uuid>,
    ) -> Result<bool, Error> {
        let (session, st) = self.ready().await?;
        let (s, bucket, v) = (stream.as_str(), self.bucket_of(version), version as i64);
        let (t, no_ids, no_events): (_, Vec<Uuid>, &[u8]) =
            (CqlTimeuuid::from(time_id), Vec::new(), &[]);
        let answer = match over {
            None => {
                let values = (s, bucket, v, 0_i32, t, &no_ids, no_events);
                session.execute_unpaged(&st.insert_commit, values).await
            }
            Some(old) => {
                let values = (
                    0_i32,
                    t,
                    &no_ids,
                    no_events,
                    s,
                    bucket,
                    v,
                    CqlTimeuuid::from(old),
                );
                session.execute_unpaged(&st.fill_void, values).await
            }
        }
        .map_err(|e| error::request(format!("fencing {stream}@{version}"), e))?;
        let applied = codec::conditional_write_applied(answer)?;
        if applied {
            tracing::info!(%stream, version, "photon-cassandra: fenced the version of an append found absent");
        }
        Ok(applied)
    }
}

/// One append in progress: its batch, encoded once, and what it knows of the stream.
struct Append<'a> {
    shared: &'a Arc<Shared>,
    stream: &'a StreamId,
    expected: ExpectedVersion,
    events: &'a [EventData],
    ids: Vec<Uuid>,
    blob: Bytes,
    meta: StreamMeta,
    /// Whether `meta` was read (serially) during this append, so a conflict is real.
    fresh: bool,
    /// The time id of the stored append this batch re-sends, when it was found by reading the
    /// stream's older ids (not among the latest ones kept).
    retry_time: Option<Uuid>,
    /// When this call first sent a conditional write: a later attempt may find that write
    /// stored (a driver retry after an unknown outcome answers "not applied" for our own row),
    /// and answers within the window of this, like the attempt that stored it.
    committing: Option<Instant>,
    /// Attempts in a row whose markers were written too late (more than half the settle delay
    /// after their time); None once one was in time.
    slow_markers: Option<SlowMarkers>,
}

/// Markers written too late, attempt after attempt.
#[derive(Clone, Copy)]
struct SlowMarkers {
    attempts: u32,
    /// When the first of them was found late.
    since: Instant,
    /// How long the last one took.
    last: Duration,
}

/// Where a batch goes, once decided.
enum Decision {
    /// Write it at this first version.
    Write(u64),
    /// Nothing to write: the append is done (a re-send of a stored batch).
    Done(AppendResult),
    /// What was known of the stream was stale and is refreshed: decide again.
    Again,
}

impl<'a> Append<'a> {
    /// Encodes the batch and loads what is known of the stream (serially, when nothing is).
    async fn start(
        shared: &'a Arc<Shared>,
        stream: &'a StreamId,
        expected: ExpectedVersion,
        events: &'a [EventData],
    ) -> Result<Self, Error> {
        let mut append = Append {
            shared,
            stream,
            expected,
            events,
            ids: events.iter().map(|e| e.event_id).collect(),
            blob: Bytes::from(codec::encode_events(events)?),
            meta: shared.cached_meta(stream),
            fresh: false,
            retry_time: None,
            committing: None,
            slow_markers: None,
        };
        if append.meta.next_first == 0 {
            append.refresh().await?;
        }
        Ok(append)
    }

    async fn refresh(&mut self) -> Result<(), Error> {
        self.meta = self.shared.refresh(self.stream, true).await?;
        self.fresh = true;
        Ok(())
    }

    /// One try at the next version: the result, or None to try again.
    async fn attempt(&mut self) -> Result<Option<AppendResult>, Error> {
        let first = match self.decide().await? {
            Decision::Write(first) => first,
            Decision::Done(result) => return Ok(Some(result)),
            Decision::Again => return Ok(None),
        };
        // Only a batch about to be written needs a clock within the bound. A re-send of a
        // stored batch (an earlier attempt that answered `Unavailable` but landed) is answered
        // as a retry whatever the clock says, so the stream is read again (serially) and its
        // ids looked up before refusing; the refusal is rare, the extra reads are only on it.
        if let Err(skewed) = self.shared.check_clock().await {
            self.refresh().await?;
            let found = self
                .shared
                .find_ids(self.stream, &self.ids, self.meta.next_first)
                .await?;
            if let Ok(BatchKind::Retry { first }) = classify_batch(self.stream, self.events, |id| {
                found.get(id).map(|(at, _)| *at)
            }) {
                self.retry_time = found.get(&self.ids[0]).map(|(_, time_id)| *time_id);
                return Ok(Some(self.retried_in_window(first)?));
            }
            return Err(skewed);
        }
        // Room in the queue of category rows first (back-pressure while the server is behind),
        // so the wait counts neither against the answer window nor behind a marker.
        self.shared.index_room().await;
        // A stream's time ids only grow, so its commits keep their order in the category,
        // whatever the writers' clocks say.
        let micros = self.shared.now_micros().max(self.meta.last_time + 1);
        let time_id = codec::time_id(micros);
        if !self.write_markers(first, time_id, micros).await? {
            return Ok(None);
        }
        // Nothing of the batch is readable before the commit is sent: from here on, how long
        // the answer takes counts against the answer window.
        let committing = Instant::now();
        self.committing.get_or_insert(committing);
        if !self.write_commit(first, time_id).await? {
            // Another commit took this version (maybe our own earlier attempt).
            let _ = self.clear_markers(time_id).await;
            self.refresh().await?;
            return Ok(None);
        }
        self.remember_commit(first, time_id);
        if self.shared.crash_after_commit() {
            return Err(error::corrupt(
                format!("appending to {}", self.stream),
                format!(
                    "simulated crash after the commit of {}@{first}",
                    self.stream
                ),
            ));
        }
        // Listed before the answer, so a caller that appended can list it; once per process.
        let listed = if self.shared.stream_listed(self.stream.as_str()) {
            Ok(())
        } else {
            self.shared.list_stream(self.stream).await
        };
        let commit = Commit {
            stream: self.stream.clone(),
            first,
            time_id,
            events: self.blob.clone(),
        };
        self.shared.index(commit, self.events.len() as i32);
        // Stored whatever the listing's outcome: a failure is `Unavailable` (the re-send is
        // answered as a retry), and the rows' background writes list the stream again.
        if let Err(e) = listed {
            return Err(error::stored_but_unanswered(self.stream, first, e));
        }
        let took = committing.elapsed();
        if took > self.shared.config.answer_window {
            // Stored, but a subscription from now may have started meanwhile, past it.
            return Err(error::answered_late(
                self.stream,
                took,
                self.shared.config.answer_window,
            ));
        }
        Ok(Some(self.result(Version(first), Some(time_id))))
    }

    /// Checks the batch against what is known of the stream: a re-send, a conflict, or the
    /// version to write at. A refusal against a stale view is checked against a fresh one first.
    async fn decide(&mut self) -> Result<Decision, Error> {
        let current = self.meta.next_first.checked_sub(1).map(Version);
        let head_matches = self.expected.matches(current);
        let kind = match self.classify(head_matches).await {
            Err(_) if !self.fresh => {
                self.refresh().await?;
                return Ok(Decision::Again);
            }
            other => other?,
        };
        if let BatchKind::Retry { first } = kind {
            return Ok(Decision::Done(self.retried_in_window(first)?));
        }
        if head_matches {
            return Ok(Decision::Write(self.meta.next_first));
        }
        if !self.fresh {
            self.refresh().await?;
            return Ok(Decision::Again);
        }
        Err(Error::WrongExpectedVersion {
            stream: self.stream.clone(),
            expected: self.expected,
            actual: current,
        })
    }

    /// The answer to a re-send of the batch stored at `first`: the original versions and time
    /// (its category rows written again in the background, in case its writer died before them).
    /// [`Self::retried`], unless this call's own earlier conditional write may be what stored
    /// the batch and the answer window since it passed (then `Unavailable`, as for an append
    /// answered late).
    fn retried_in_window(&self, first: Version) -> Result<AppendResult, Error> {
        let window = self.shared.config.answer_window;
        match self.committing.map(|at| at.elapsed()) {
            Some(took) if took > window => Err(error::answered_late(self.stream, took, window)),
            _ => Ok(self.retried(first)),
        }
    }

    fn retried(&self, first: Version) -> AppendResult {
        self.reindex_in_background(first.0);
        let time_id = self.meta.time_of(first.0).or(self.retry_time);
        self.result(first, time_id)
    }

    /// Whether the batch is new, a re-send of one stored append, or a conflict. This process
    /// keeps only a stream's latest ids; the older ones are read (16 bytes per event) only when
    /// they could change the answer: not for a re-send found among the latest, not when they
    /// are the whole stream, and not for a new batch whose expectation pins the head and
    /// matches it (a re-send of an append that landed cannot match: that append moved the head
    /// past it). So appends to a long stream with `Exact`/`NoStream` read nothing, and a failed
    /// conditional write, a refusal, or an `Any`/`StreamExists` batch not among the latest ids
    /// reads them.
    async fn classify(&mut self, head_matches: bool) -> Result<BatchKind, Error> {
        let meta = &self.meta;
        let recent = classify_batch(self.stream, self.events, |id| meta.stored(id));
        let pins_head = matches!(
            self.expected,
            ExpectedVersion::Exact(_) | ExpectedVersion::NoStream
        );
        match recent {
            Ok(kind @ BatchKind::Retry { .. }) => return Ok(kind),
            other if meta.knows_every_id() => return other,
            Ok(BatchKind::New) if head_matches && pins_head => return Ok(BatchKind::New),
            _ => {}
        }
        let found = self
            .shared
            .find_ids(self.stream, &self.ids, self.meta.next_first)
            .await?;
        self.retry_time = found.get(&self.ids[0]).map(|(_, time_id)| *time_id);
        classify_batch(self.stream, self.events, |id| {
            found.get(id).map(|(at, _)| *at)
        })
    }

    /// A re-send of a stored batch: the earlier attempt may have stopped before its category
    /// rows, so settle it now (idempotent) rather than leave readers waiting for the repair
    /// delay.
    fn reindex_in_background(&self, first: u64) {
        let (shared, stream) = (self.shared.clone(), self.stream.clone());
        tokio::spawn(async move {
            if let Ok(Some((commit, count))) = shared.stored_commit(&stream, first).await {
                let _ = shared.index_commit(&commit, count).await;
            }
        });
    }

    /// The pending markers go first: readers of the category do not pass a pending append's
    /// time until it is indexed, or repair it when its writer died. False when writing them
    /// took so long that a reader may have passed their time: they are cleared, and the append
    /// must take a new time id.
    async fn write_markers(
        &mut self,
        first: u64,
        time_id: Uuid,
        micros: i64,
    ) -> Result<bool, Error> {
        let marker = Marker {
            stream: self.stream.clone(),
            first,
            time_id,
            micros,
            bucket: self.shared.time_bucket_of(micros),
        };
        if let Err(e) = self.shared.write_marker(marker).await {
            // Its markers may be written all the same (a timeout, or one partition's batch of
            // a group): cleared in the background, best effort, so that readers need not wait
            // for the repair. No conditional write follows them.
            let (shared, category) = (self.shared.clone(), self.stream.category_name().to_owned());
            tokio::spawn(async move { shared.clear_markers(&category, time_id).await });
            return Err(e);
        }
        // Readers pass a time once it is `settle` old.
        let settle_micros = self.shared.config.settle.as_micros() as i64;
        let took = self.shared.now_micros() - micros;
        if took > settle_micros / 2 {
            let _ = self.clear_markers(time_id).await;
            let last = Duration::from_micros(took as u64);
            self.slow_markers = Some(match self.slow_markers {
                Some(slow) => SlowMarkers {
                    attempts: slow.attempts + 1,
                    last,
                    ..slow
                },
                None => SlowMarkers {
                    attempts: 1,
                    since: Instant::now(),
                    last,
                },
            });
            return Ok(false);
        }
        self.slow_markers = None;
        Ok(true)
    }

    /// The one conditional write: whether it applied. When its outcome is unknown the error is
    /// `Unavailable` (a re-send with the same ids finds out which), and the markers are settled
    /// in the background so readers need not wait for the repair delay.
    async fn write_commit(&self, first: u64, time_id: Uuid) -> Result<bool, Error> {
        let (session, st) = self.shared.ready().await?;
        let (stream, bucket, version) = (
            self.stream.as_str(),
            self.shared.bucket_of(first),
            first as i64,
        );
        let (count, t) = (self.events.len() as i32, CqlTimeuuid::from(time_id));
        // Where a repair left a void, the commit takes it over only while it is that void.
        let answer = match self.meta.void {
            None => {
                let values = (stream, bucket, version, count, t, &self.ids, &self.blob[..]);
                session.execute_unpaged(&st.insert_commit, values).await
            }
            Some(void) => {
                let void = CqlTimeuuid::from(void);
                let values = (
                    count,
                    t,
                    &self.ids,
                    &self.blob[..],
                    stream,
                    bucket,
                    version,
                    void,
                );
                session.execute_unpaged(&st.fill_void, values).await
            }
        };
        match answer {
            Ok(answer) => codec::conditional_write_applied(answer),
            Err(e) => {
                let (shared, stream) = (self.shared.clone(), self.stream.clone());
                tokio::spawn(async move {
                    let _ = shared.settle_marker(time_id, &stream, first).await;
                });
                let context = format!("appending to {} at {first}", self.stream);
                Err(error::request(context, e))
            }
        }
    }

    async fn clear_markers(&self, time_id: Uuid) -> Result<(), Error> {
        self.shared
            .clear_markers(self.stream.category_name(), time_id)
            .await
    }

    /// Records the commit in what this process knows of the stream.
    fn remember_commit(&mut self, first: u64, time_id: Uuid) {
        self.meta.push(first, time_id, self.ids.as_slice().into());
        self.shared.remember(self.stream, &self.meta);
    }

    /// The versions and checkpoints of the batch stored from `first` with `time_id`.
    fn result(&self, first: Version, time_id: Option<Uuid>) -> AppendResult {
        let len = self.events.len();
        let time_id = time_id.unwrap_or_else(|| codec::time_id(0));
        let checkpoint = |i: usize| {
            Position {
                time_id,
                index: i as u32,
                version: first.0 + i as u64,
            }
            .to_checkpoint()
        };
        AppendResult {
            first_version: first,
            last_version: Version(first.0 + len as u64 - 1),
            checkpoints: (0..len).map(checkpoint).collect(),
        }
    }
}
