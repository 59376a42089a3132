//! Subscriptions. One stream: its commits by version, polled when live. A category or the all
//! stream: the category table, one time bucket at a time in time-id order, never past the
//! *horizon*: now minus the settle delay, and before the time of any append still pending
//! (its marker is written before its commit). Pending markers older than `repair_after` belong
//! to writers that died between the commit and the category rows: the reader repairs them
//! (writes the rows from the commit) or drops them (the commit never happened), then goes on.
//!
//! `Start::Now` starts at the readers' horizon, not at the present: an append that picked its
//! time id a moment before and commits after `CaughtUp` is still ahead of the subscriber. What
//! was already stored and indexed between that start and the present is skipped by time id.
//!
//! This module reads the category tables and asks `writer` to settle old markers; it never
//! writes a row itself, and stream reads are `reader`'s.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::TryStreamExt;
use photon_api::{
    cursor_stream, open_subscription, Bytes, Error, ReadOptions, RecordedEvent, Selector, Start,
    StreamId, SubscriptionCursor, SubscriptionItem, SubscriptionMode, SubscriptionRequest, Uuid,
    Version,
};
use scylla::value::CqlTimeuuid;

use crate::client::{Shared, ALL, COMMITS_PER_PAGE, MAX_POLL, POLL, TELEMETRY};
use crate::codec::{self, Commit, Position};
use crate::error;
use crate::reader;

/// Time ids read per page when a `Start::Now` subscription opens (16 bytes each).
const TIMES_PER_PAGE: i32 = 1_000;

/// Events a stream subscription reads per step.
const STREAM_STEP: usize = 256;

/// A subscription, opened (and its checkpoint decoded) the way every backend does it.
pub(crate) fn subscribe(
    shared: Arc<Shared>,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    open_subscription(
        &TELEMETRY,
        selector,
        start,
        mode,
        |checkpoint, _| Position::from_checkpoint(checkpoint),
        |request| {
            check_start_time(&request)?;
            Ok(cursor_stream(Sub::open(shared, request)))
        },
    )
}

/// A category or the all stream is ordered by time UUIDs, which hold times from 1582-10-15 to
/// the year 5236 (before 1970 included): a `Start::Time` outside them has no place in that
/// order, and is refused before anything is read. A stream subscription compares times only,
/// so any time works there.
fn check_start_time(request: &SubscriptionRequest<Position>) -> Result<(), Error> {
    let (Start::Time(t), Selector::Category(_) | Selector::All) =
        (&request.start, &request.selector)
    else {
        return Ok(());
    };
    if codec::holds_time(t.unix_micros()) {
        return Ok(());
    }
    let selector = match &request.selector {
        Selector::Category(c) => format!("category {c}"),
        _ => "the all stream".to_owned(),
    };
    Err(Error::InvalidInput {
        what: format!("Start::Time({t}) of a subscription to {selector}"),
        reason: "photon-cassandra orders category and all streams by time UUIDs, which hold times from 1582-10-15 to 5236-03-31; start from a time in that range (Start::Beginning for everything)".into(),
    })
}

/// A subscription between its items.
struct Sub {
    shared: Arc<Shared>,
    mode: SubscriptionMode,
    state: State,
    buffer: VecDeque<RecordedEvent>,
    caught_up_sent: bool,
    /// `Start::Now` in a live mode: `CaughtUp` not before this, a window and a quarter (`now_start_wait`) after the
    /// start was resolved. An append the start passed over (stored and indexed, or committed
    /// below a stream's head) may not have answered its caller yet; its writer answers Ok only
    /// within the window of sending its commit, so before this.
    live_at: Option<Instant>,
    pause: Duration,
}

enum State {
    Stream(StreamState),
    Timeline(Timeline),
}

struct StreamState {
    stream: StreamId,
    next: u64,
    /// Replay end (exclusive) as of the first poll.
    end: u64,
    since: Option<i64>,
}

/// A category or the all stream, read in time-id order.
struct Timeline {
    key: String,
    /// Time bucket being read.
    bucket: i64,
    /// Commits after this time id are next (inclusive while `inclusive`).
    lower: Uuid,
    inclusive: bool,
    /// Events of the commit at `lower` up to this index were delivered already.
    skip_through: Option<(Uuid, u32)>,
    /// Everything with a time at or before this (µs) has been delivered.
    delivered_through: i64,
    /// History as of the first poll ends here (µs).
    end: i64,
    since: Option<i64>,
    /// `Start::Now`: the commits stored and indexed, with no append pending, when the
    /// subscription started, at times after its start: they are not the subscriber's. Each is
    /// removed when the reader meets it, so the set empties as the reader passes the present.
    stored: HashSet<Uuid>,
}

impl Sub {
    /// Finds where the subscription starts: the stream's head, or the first category bucket.
    async fn open(
        shared: Arc<Shared>,
        request: SubscriptionRequest<Position>,
    ) -> Result<Self, Error> {
        let since = match &request.start {
            Start::Time(t) => Some(t.unix_micros()),
            _ => None,
        };
        let state = match &request.selector {
            Selector::Stream(stream) => {
                State::Stream(open_stream(&shared, stream, &request, since).await?)
            }
            Selector::Category(c) => {
                State::Timeline(open_timeline(&shared, c.as_str(), &request, since).await?)
            }
            Selector::All => State::Timeline(open_timeline(&shared, ALL, &request, since).await?),
        };
        let from_now = request.start == Start::Now && request.mode != SubscriptionMode::Cold;
        let wait = photon_api::now_start_wait(shared.config.answer_window);
        let live_at = from_now.then(|| Instant::now() + wait);
        Ok(Sub {
            shared,
            mode: request.mode,
            state,
            buffer: VecDeque::new(),
            caught_up_sent: false,
            live_at,
            pause: POLL,
        })
    }

    /// Reads one step further: (progressed, history delivered).
    async fn step(&mut self) -> Result<(bool, bool), Error> {
        let shared = &self.shared;
        match &mut self.state {
            State::Stream(s) => stream_step(shared, s, self.mode, &mut self.buffer).await,
            State::Timeline(t) => timeline_step(shared, t, self.mode, &mut self.buffer).await,
        }
    }
}

impl SubscriptionCursor for Sub {
    async fn next_item(&mut self) -> Result<Option<SubscriptionItem>, Error> {
        loop {
            // Hot: caught up as soon as it is open (and its answer window passed), with nothing
            // replayed.
            if self.mode == SubscriptionMode::Hot && !self.caught_up_sent && self.live() {
                self.caught_up_sent = true;
                return Ok(Some(SubscriptionItem::CaughtUp));
            }
            if let Some(e) = self.buffer.pop_front() {
                return Ok(Some(SubscriptionItem::Event(e)));
            }
            let (progressed, history_done) = self.step().await?;
            if !self.buffer.is_empty() {
                self.pause = POLL;
                continue;
            }
            if history_done {
                match self.mode {
                    SubscriptionMode::Cold => return Ok(None),
                    _ if !self.caught_up_sent && self.live() => {
                        self.caught_up_sent = true;
                        return Ok(Some(SubscriptionItem::CaughtUp));
                    }
                    _ => {}
                }
            }
            if !progressed {
                let mut wait = self.pause;
                if let Some(at) = self.live_at.filter(|_| !self.caught_up_sent) {
                    wait = wait.min(at.saturating_duration_since(Instant::now()));
                }
                tokio::time::sleep(wait).await;
                self.pause = (self.pause * 2).min(MAX_POLL);
            }
        }
    }
}

impl Sub {
    /// Whether `CaughtUp` may be said: always, except within a `Start::Now` subscription's
    /// answer window.
    fn live(&self) -> bool {
        self.live_at.is_none_or(|at| Instant::now() >= at)
    }
}

async fn open_stream(
    shared: &Shared,
    stream: &StreamId,
    request: &SubscriptionRequest<Position>,
    since: Option<i64>,
) -> Result<StreamState, Error> {
    let head = shared.refresh(stream, false).await?.next_first;
    let next = match (&request.start, &request.after) {
        (_, Some(p)) => p.version.saturating_add(1),
        (Start::Now, _) => head,
        _ => 0,
    };
    Ok(StreamState {
        stream: stream.clone(),
        next,
        end: head,
        since,
    })
}

async fn open_timeline(
    shared: &Shared,
    key: &str,
    request: &SubscriptionRequest<Position>,
    since: Option<i64>,
) -> Result<Timeline, Error> {
    let now = shared.reader_now().await?;
    let mut end = now;
    let mut stored = HashSet::new();
    let (lower, inclusive, skip_through) = match (&request.start, &request.after) {
        (_, Some(p)) => (p.time_id, true, Some((p.time_id, p.index))),
        (Start::Time(t), _) => (codec::min_time_id(t.unix_micros()), true, None),
        (Start::Now, _) => {
            let (start, already) = now_start(shared, key, now).await?;
            // Nothing to replay: caught up once the answer window passed, live from the horizon on.
            (end, stored) = (start, already);
            (codec::max_time_id(start), false, None)
        }
        _ => (codec::min_time_id(0), false, None),
    };
    let at = codec::time_micros(&lower);
    // Start in the first registered bucket at or after the start time, and not after the
    // present: a writer whose clock runs ahead may have registered a future bucket, and a
    // reader that jumped there would never read the present one.
    let present = shared.time_bucket_of(now);
    let bucket = first_bucket(shared, key, shared.time_bucket_of(at), present)
        .await?
        .unwrap_or(present);
    Ok(Timeline {
        key: key.to_owned(),
        bucket,
        lower,
        inclusive,
        skip_through,
        delivered_through: at - 1,
        end,
        since,
        stored,
    })
}

/// Where a `Start::Now` subscription of `key` starts (µs), and the time ids after it that were
/// already stored. Readers pass only times that can no longer receive a commit, so the start is
/// their horizon: `settle` behind the present, and before the oldest pending append (one older
/// than `repair_after` is left to the repair, as readers do). Every commit after the start is
/// the subscriber's except those whose conditional write applied before now: they answered
/// before `CaughtUp` (an append answers Ok only within the answer window of sending it, and
/// `CaughtUp` comes a window and a quarter after opening) or `Unavailable`, so they are earlier
/// events (design.md, "Hot delivers only later events"). An append answers before its rows and
/// the clearing of its markers, so those are the rows read now and the pending appends whose
/// commit is found stored; a pending append whose commit is not (in flight) is delivered, and
/// so is one that ran entirely between the two reads.
async fn now_start(shared: &Shared, key: &str, now: i64) -> Result<(i64, HashSet<Uuid>), Error> {
    let config = &shared.config;
    let floor = now - config.repair_after.as_micros() as i64;
    let mut start = now - config.settle.as_micros() as i64;
    // A marker at or before the settle horizon was written before now (an append whose marker
    // takes longer than settle/2 takes a new time), so this read sees every one that matters.
    if let Some((oldest, _, _)) = markers_between(shared, key, floor, start).await?.first() {
        start = start.min(codec::time_micros(oldest) - 1);
    }
    let mut stored = stored_between(shared, key, start, now).await?;
    for (time_id, stream, version) in markers_between(shared, key, start, now).await? {
        if !stored.contains(&time_id) && shared.committed_at(time_id, &stream, version).await? {
            stored.insert(time_id);
        }
    }
    Ok((start, stored))
}

/// The registered time buckets of `key` holding times in `(from, to]` (µs), in order.
async fn buckets_between(
    shared: &Shared,
    key: &str,
    from: i64,
    to: i64,
) -> Result<Vec<i64>, Error> {
    let (mut next, last) = (shared.time_bucket_of(from), shared.time_bucket_of(to));
    let mut buckets = Vec::new();
    while let Some(b) = first_bucket(shared, key, next, last).await? {
        buckets.push(b);
        next = b + 1;
    }
    Ok(buckets)
}

/// The pending markers of `key` in `(from, to]` (µs), oldest first: time id, stream, version.
async fn markers_between(
    shared: &Shared,
    key: &str,
    from: i64,
    to: i64,
) -> Result<Vec<(Uuid, StreamId, u64)>, Error> {
    let mut markers = Vec::new();
    for b in buckets_between(shared, key, from, to).await? {
        let (after, through) = (codec::max_time_id(from), codec::max_time_id(to));
        markers.extend(pending_in(shared, key, b, after, through).await?);
    }
    markers.sort_by_key(|(t, _, _)| codec::time_micros(t));
    Ok(markers)
}

/// The time ids of the category rows of `key` in `(from, to]` (µs), a page at a time.
async fn stored_between(
    shared: &Shared,
    key: &str,
    from: i64,
    to: i64,
) -> Result<HashSet<Uuid>, Error> {
    let (session, st) = shared.ready().await?;
    let context = || format!("reading the category {key} at the present");
    let upper = CqlTimeuuid::from(codec::max_time_id(to));
    let mut stored = HashSet::new();
    for b in buckets_between(shared, key, from, to).await? {
        let mut lower = codec::max_time_id(from);
        loop {
            let values = (key, b, CqlTimeuuid::from(lower), upper, TIMES_PER_PAGE);
            let rows = session
                .execute_unpaged(&st.category_times, values)
                .await
                .map_err(|e| error::request(context(), e))?
                .into_rows_result()
                .map_err(|e| error::driver(context(), e))?;
            let before = stored.len();
            for row in rows
                .rows::<(CqlTimeuuid,)>()
                .map_err(|e| error::driver(context(), e))?
            {
                let (t,) = row.map_err(|e| error::driver(context(), e))?;
                lower = t.into();
                stored.insert(lower);
            }
            if stored.len() - before < TIMES_PER_PAGE as usize {
                break;
            }
        }
    }
    Ok(stored)
}

/// One page of a stream subscription. Returns (progressed, history delivered).
async fn stream_step(
    shared: &Arc<Shared>,
    s: &mut StreamState,
    mode: SubscriptionMode,
    out: &mut VecDeque<RecordedEvent>,
) -> Result<(bool, bool), Error> {
    if mode == SubscriptionMode::Cold && s.next >= s.end {
        return Ok((false, true));
    }
    let options = ReadOptions::forwards()
        .from_version(Version(s.next))
        .limit(STREAM_STEP);
    let events: Vec<RecordedEvent> = reader::read_stream(shared.clone(), s.stream.clone(), options)
        .try_collect()
        .await?;
    let progressed = !events.is_empty();
    for e in events {
        if mode == SubscriptionMode::Cold && e.version.0 >= s.end {
            break;
        }
        s.next = e.version.0 + 1;
        if s.since.is_some_and(|t| e.recorded_at.unix_micros() < t) {
            continue;
        }
        out.push_back(e);
    }
    Ok((progressed, s.next >= s.end))
}

/// One step of a category or all-stream subscription: find how far a page reaches, resolve
/// the pending appends before that, then read the page up to the horizon, or move to the next
/// bucket. Returns (progressed, history delivered).
///
/// The markers are read only up to the page's reach (the `COMMITS_PER_PAGE`th row after the
/// reader's position), never to the end of the bucket: every append leaves its cleared
/// markers behind as tombstones, and a reader far back in a bucket that read the rest of it
/// on every step would scan them all again each time (quadratic, and refused by the server
/// past its `tombstone_failure_threshold`). Bounded, a step scans about a page of them.
async fn timeline_step(
    shared: &Shared,
    t: &mut Timeline,
    mode: SubscriptionMode,
    out: &mut VecDeque<RecordedEvent>,
) -> Result<(bool, bool), Error> {
    let now = shared.reader_now().await?;
    let mut horizon = now - shared.config.settle.as_micros() as i64;
    if mode == SubscriptionMode::Cold {
        horizon = horizon.min(t.end);
    }
    let bucket_end = (t.bucket + 1) * shared.config.time_bucket_micros() - 1;
    let mut upper = horizon.min(bucket_end);
    let mut progressed = false;
    if upper >= codec::time_micros(&t.lower) {
        // The markers first, then the rows: a marker cleared after this read belongs to an
        // append whose rows are written by then, so the page below sees them.
        let reach = page_reach(shared, t, upper).await?;
        horizon = horizon.min(pending_cut(shared, t, reach, now).await?);
        upper = horizon.min(reach);
    }
    if upper >= codec::time_micros(&t.lower) {
        let (page, full) = category_page(shared, t, upper).await?;
        progressed = !page.is_empty();
        t.deliver(page, out)?;
        if full {
            return Ok((true, false));
        }
    }
    // Everything up to `upper` in this bucket is delivered.
    if upper >= bucket_end {
        progressed |= t.next_bucket(shared, horizon).await?;
    } else {
        t.delivered_through = t.delivered_through.max(upper);
    }
    Ok((progressed, t.delivered_through >= t.end))
}

/// How far one page after the reader's position can reach, at most `upper` (µs): the time of
/// the `COMMITS_PER_PAGE`th category row after it, or `upper` when fewer rows are there. Rows
/// indexed after this read only make the page fuller, so a page read up to the reach is full
/// or ends there.
async fn page_reach(shared: &Shared, t: &Timeline, upper: i64) -> Result<i64, Error> {
    let (session, st) = shared.ready().await?;
    let context = || format!("reading the category {} ahead of a page", t.key);
    let values = (
        t.key.as_str(),
        t.bucket,
        CqlTimeuuid::from(t.lower),
        CqlTimeuuid::from(codec::max_time_id(upper)),
        COMMITS_PER_PAGE,
    );
    let rows = session
        .execute_unpaged(&st.category_times, values)
        .await
        .map_err(|e| error::request(context(), e))?
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?;
    let times = rows
        .rows::<(CqlTimeuuid,)>()
        .map_err(|e| error::driver(context(), e))?
        .map(|r| r.map(|(t,)| Uuid::from(t)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error::driver(context(), e))?;
    Ok(match times.last() {
        Some(last) if times.len() == COMMITS_PER_PAGE as usize => codec::time_micros(last),
        _ => upper,
    })
}

/// How far a reader may read, given the pending appends after its position up to `through`
/// (µs): just before the oldest one still pending (`i64::MAX` when none is); markers older
/// than `repair_after` are settled instead, and those older than `settle` and a request
/// timeout whose commit is stored are indexed (their writer answered, then stopped before the
/// rows).
async fn pending_cut(shared: &Shared, t: &Timeline, through: i64, now: i64) -> Result<i64, Error> {
    let repair_after = shared.config.repair_after.as_micros() as i64;
    // A marker older than this is not its writer's any more: the writer's own rows would have
    // been written within a request timeout of its horizon (waiting that long keeps readers
    // from adding their writes to a server that is merely slow).
    let abandoned = (shared.config.settle + shared.config.timeout).as_micros() as i64;
    let mut cut = i64::MAX;
    // From what is delivered, not only from the last row: a reader at the head of a category
    // whose appends keep failing (markers cleared with no row, up to one per attempt) would
    // otherwise scan their tombstones again on every poll. Nothing can be pending at or before
    // `delivered_through`: markers are written within settle/2 of their time, and everything
    // up to it was read with its markers settled.
    let after = if t.delivered_through >= codec::time_micros(&t.lower) {
        codec::max_time_id(t.delivered_through)
    } else {
        t.lower
    };
    let markers = pending_in(shared, &t.key, t.bucket, after, codec::max_time_id(through)).await?;
    for (time_id, stream, version) in markers {
        let at = codec::time_micros(&time_id);
        if now - at > repair_after {
            shared.settle_marker(time_id, &stream, version).await?;
        } else if now - at > abandoned
            && shared.index_if_committed(time_id, &stream, version).await
        {
            // Committed, its writer gone before its rows: now indexed (see the writer).
        } else {
            cut = cut.min(at - 1);
        }
    }
    Ok(cut)
}

impl Timeline {
    /// Delivers a page of commits into `out`, skipping what a resumed checkpoint already had.
    fn deliver(
        &mut self,
        page: Vec<(Commit, i32)>,
        out: &mut VecDeque<RecordedEvent>,
    ) -> Result<(), Error> {
        for (commit, _count) in page {
            let mut events = codec::events_of(&commit)?;
            if let Some((id, index)) = self.skip_through {
                if id == commit.time_id {
                    events.retain(|e| e.version.0 > commit.first + index as u64);
                }
            }
            self.lower = commit.time_id;
            self.inclusive = false;
            self.skip_through = None;
            if !self.stored.is_empty() && self.stored.remove(&commit.time_id) {
                continue;
            }
            let since = self.since;
            out.extend(
                events
                    .into_iter()
                    .filter(|e| since.is_none_or(|s| e.recorded_at.unix_micros() >= s)),
            );
        }
        Ok(())
    }

    /// The current bucket is complete up to its end: moves to the next one with rows (or
    /// pending appends), or to the horizon's. Returns whether it moved.
    async fn next_bucket(&mut self, shared: &Shared, horizon: i64) -> Result<bool, Error> {
        let last = shared.time_bucket_of(horizon);
        match first_bucket(shared, &self.key, self.bucket + 1, last).await? {
            Some(next) => {
                self.bucket = next;
                self.delivered_through = next * shared.config.time_bucket_micros() - 1;
                Ok(true)
            }
            None => {
                self.delivered_through = horizon;
                let moved = last > self.bucket;
                if moved {
                    self.bucket = last;
                }
                Ok(moved)
            }
        }
    }
}

async fn first_bucket(
    shared: &Shared,
    key: &str,
    from: i64,
    to: i64,
) -> Result<Option<i64>, Error> {
    if from > to {
        return Ok(None);
    }
    let (session, st) = shared.ready().await?;
    let context = || format!("reading the time buckets of {key}");
    let rows = session
        .execute_unpaged(&st.buckets_from, (key, from, to))
        .await
        .map_err(|e| error::request(context(), e))?
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?;
    Ok(rows
        .maybe_first_row::<(i64,)>()
        .map_err(|e| error::driver(context(), e))?
        .map(|(b,)| b))
}

/// The pending markers of `key` in `bucket` with time ids in `(after, through]`, oldest first.
async fn pending_in(
    shared: &Shared,
    key: &str,
    bucket: i64,
    after: Uuid,
    through: Uuid,
) -> Result<Vec<(Uuid, StreamId, u64)>, Error> {
    let (session, st) = shared.ready().await?;
    let context = || format!("reading the pending appends of {key}");
    let range = (CqlTimeuuid::from(after), CqlTimeuuid::from(through));
    let rows = session
        .execute_unpaged(&st.pending_in, (key, bucket, range.0, range.1))
        .await
        .map_err(|e| error::request(context(), e))?
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?;
    rows.rows::<(CqlTimeuuid, String, i64)>()
        .map_err(|e| error::driver(context(), e))?
        .map(|r| {
            let (t, s, v) = r.map_err(|e| error::driver(context(), e))?;
            Ok((t.into(), StreamId::parse(s)?, v as u64))
        })
        .collect()
}

async fn category_page(
    shared: &Shared,
    t: &Timeline,
    upper: i64,
) -> Result<(Vec<(Commit, i32)>, bool), Error> {
    let (session, st) = shared.ready().await?;
    let context = || format!("reading the category {}", t.key);
    let (q, counts) = if t.inclusive {
        (&st.category_page_incl, &st.category_counts_incl)
    } else {
        (&st.category_page, &st.category_counts)
    };
    let (key, lower, upper) = (
        t.key.as_str(),
        CqlTimeuuid::from(t.lower),
        CqlTimeuuid::from(codec::max_time_id(upper)),
    );
    // The counts first, so the page fetches only what fits in `page_bytes`.
    let values = (key, t.bucket, lower, upper, COMMITS_PER_PAGE);
    let (limit, more) = shared.page_limit(counts, values, &context()).await?;
    let rows = session
        .execute_unpaged(q, (key, t.bucket, lower, upper, limit))
        .await
        .map_err(|e| error::request(context(), e))?
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?;
    let page = rows
        .rows::<(CqlTimeuuid, String, i64, i32, Vec<u8>)>()
        .map_err(|e| error::driver(context(), e))?
        .map(|r| {
            let (time_id, stream, first, count, events) =
                r.map_err(|e| error::driver(context(), e))?;
            Ok((
                Commit {
                    stream: StreamId::parse(stream)?,
                    first: first as u64,
                    time_id: time_id.into(),
                    events: Bytes::from(events),
                },
                count,
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok((page, more))
}
