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

use crate::client::{Shared, ALL, BACKEND, COMMITS_PER_PAGE, MAX_POLL, POLL, TELEMETRY};
use crate::codec::{self, Commit, Position};
use crate::error;
use crate::reader;

/// Time ids read per page when a `Start::Now` subscription opens (16 bytes each).
const TIMES_PER_PAGE: i32 = 1_000;

/// Events a stream subscription reads per step.
const STREAM_STEP: usize = 256;

/// The shortest pause of an idle live reader between polls, whatever `settle_ms`.
const MIN_POLL: Duration = Duration::from_millis(20);

/// Added to a wake-up at the time a row becomes readable: timers and the clock reading are
/// millisecond-grained, and a reader that wakes a moment early polls once more for nothing.
const WAKE_MARGIN: Duration = Duration::from_millis(1);

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
            // Boxed: the opening future is large (9 KiB) and the stream moves its state, as
            // large as that, with every item; the cursor it opens is small (352 bytes).
            Ok(cursor_stream(Box::pin(Sub::open(shared, request))))
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
    /// The longest pause between polls: `MAX_POLL`, and at most half the settle delay, so an
    /// append is seen (and its wake-up planned) before it may be delivered.
    max_pause: Duration,
}

enum State {
    Stream(StreamState),
    /// Boxed: five times a stream's state, and a subscription holds one or the other.
    Timeline(Box<Timeline>),
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
    /// The rows counted ahead and cleared of pending appends, still to fetch.
    window: Option<Window>,
    /// When (µs, by `reader_now`) the reader may next move: the first row seen past the
    /// horizon becomes readable then (or, `Cold`, the end of its history). The reader sleeps
    /// until then rather than polling on.
    due: Option<i64>,
}

/// The next commits of a timeline, up to a page's reach (`COMMITS_PER_PAGE` rows), counted
/// after their pending appends were settled: every row in `(lower, upper]` is stored, so the
/// pages that fetch them (each within `page_bytes`) need no further reads of counts or markers.
struct Window {
    /// The event counts of the commits not fetched yet, in time order.
    counts: VecDeque<i32>,
    /// The window ends here (µs, inclusive).
    upper: i64,
    /// The horizon it was read under, and the end of its bucket (µs).
    horizon: i64,
    bucket_end: i64,
    /// It counted as many rows as a window holds: more may follow before `upper`.
    more: bool,
    /// The next page, fetched and decoded in a task of its own while the consumer drains the
    /// current one (at most one page ahead; dropped, it stops).
    next: Option<Prefetch>,
}

/// The next page of a window, fetched in a task of its own: aborted when the window is
/// dropped (the subscription went away), so it holds nothing longer than the reader.
struct Prefetch(Option<tokio::task::JoinHandle<Result<Page, Error>>>);

impl Prefetch {
    /// The page, or the fetch's error; a task that did not finish (its runtime shut down) is
    /// `Unavailable`, never a panic.
    async fn page(mut self) -> Result<Page, Error> {
        // Awaited in place: a caller that stops waiting drops `self`, which aborts the task.
        let task = self.0.as_mut().expect("a prefetch is awaited once");
        let finished = task.await;
        self.0 = None;
        match finished {
            Ok(page) => page,
            Err(e) => Err(Error::unavailable(
                BACKEND,
                "reading the next page of a category: the task fetching it did not finish",
                e,
            )),
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// A page of commits, fetched and decoded: each commit with its count and events.
type Page = Vec<(Commit, i32, Vec<RecordedEvent>)>;

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
            Selector::Category(c) => State::Timeline(Box::new(
                open_timeline(&shared, c.as_str(), &request, since).await?,
            )),
            Selector::All => State::Timeline(Box::new(
                open_timeline(&shared, ALL, &request, since).await?,
            )),
        };
        let from_now = request.start == Start::Now && request.mode != SubscriptionMode::Cold;
        let wait = photon_api::now_start_wait(shared.config.answer_window);
        let live_at = from_now.then(|| Instant::now() + wait);
        let max_pause = MAX_POLL.min(shared.config.settle / 2).max(MIN_POLL);
        Ok(Sub {
            shared,
            mode: request.mode,
            state,
            buffer: VecDeque::new(),
            caught_up_sent: false,
            live_at,
            pause: POLL.min(max_pause),
            max_pause,
        })
    }

    /// How long to pause after a step that found nothing to deliver: until the next row seen
    /// ahead becomes readable, and at most the poll pause (rows not seen yet, pending appends).
    async fn idle_wait(&self) -> Result<Duration, Error> {
        let mut wait = self.pause;
        if let State::Timeline(t) = &self.state {
            if let Some(due) = &t.due {
                let now = self.shared.reader_now().await?;
                if *due > now {
                    wait = wait.min(Duration::from_micros((*due - now) as u64) + WAKE_MARGIN);
                }
            }
        }
        if let Some(at) = self.live_at.filter(|_| !self.caught_up_sent) {
            wait = wait.min(at.saturating_duration_since(Instant::now()));
        }
        Ok(wait)
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
                self.pause = POLL.min(self.max_pause);
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
                tokio::time::sleep(self.idle_wait().await?).await;
                self.pause = (self.pause * 2).min(self.max_pause);
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
        window: None,
        due: None,
    })
}

/// Where a `Start::Now` subscription of `key` starts (µs), and the time ids after it that were
/// already stored. Readers pass only times that can no longer receive a commit, so the start is
/// their horizon: `settle` behind the present, and before the oldest pending append (one older
/// than `repair_after` is left to the repair, as readers do). Every commit after the start is
/// the subscriber's except those whose conditional write applied before the call: they
/// answered before `CaughtUp` (an append answers Ok only within the answer window of sending
/// it, and `CaughtUp` comes a window and a quarter after opening) or `Unavailable`, so they are
/// earlier events (design.md, "Hot delivers only later events"). An append answers before its
/// rows and the clearing of its markers, so those are the pending appends whose commit is found
/// stored and the rows read after them; a pending append whose commit is not stored yet is in
/// flight, and delivered.
async fn now_start(shared: &Shared, key: &str, now: i64) -> Result<(i64, HashSet<Uuid>), Error> {
    let config = &shared.config;
    let floor = now - config.repair_after.as_micros() as i64;
    let mut start = now - config.settle.as_micros() as i64;
    // A marker at or before the settle horizon was written before now (an append whose marker
    // takes longer than settle/2 takes a new time), so this read sees every one that matters.
    if let Some((oldest, _, _)) = markers_between(shared, key, floor, start).await?.first() {
        start = start.min(codec::time_micros(oldest) - 1);
    }
    // Through a settle delay past the present: a writer's clock may run ahead of this reader's
    // (by up to settle/4), so an append answered before the call may carry a later time id.
    // Only commits found stored are skipped, and those answered before `CaughtUp`.
    let through = now + config.settle.as_micros() as i64;
    // The markers first, then the rows: an append's rows are written before its markers are
    // deleted, so an append answered before the call is found by one of the two reads, its
    // marker with its commit stored or its row.
    let (mut answered, mut in_flight) = (HashSet::new(), HashSet::new());
    for (time_id, stream, version) in markers_between(shared, key, start, through).await? {
        if shared.committed_at(time_id, &stream, version).await? {
            answered.insert(time_id);
        } else {
            in_flight.insert(time_id);
        }
    }
    let mut stored = stored_between(shared, key, start, through).await?;
    // A row whose append was in flight at the first read (its marker there, no commit yet):
    // committed since the call, so the subscriber's.
    stored.retain(|t| !in_flight.contains(t));
    stored.extend(answered);
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
/// the pending appends before that, count the commits there, then fetch them a page at a time
/// (one page per step) up to the horizon, or move to the next bucket. Returns (progressed,
/// history delivered).
///
/// The markers are read only up to the page's reach (the `COMMITS_PER_PAGE`th row after the
/// reader's position), never to the end of the bucket: every append leaves its cleared
/// markers behind as tombstones, and a reader far back in a bucket that read the rest of it
/// on every step would scan them all again each time (quadratic, and refused by the server
/// past its `tombstone_failure_threshold`). Bounded, a step scans about a page of them.
///
/// Three reads (reach, markers, counts) open a window of up to `COMMITS_PER_PAGE` commits;
/// each page of it is then one fetch. Commits of many events, which `page_bytes` lets only a
/// few of into a page, no longer pay the three reads again for every page.
async fn timeline_step(
    shared: &Arc<Shared>,
    t: &mut Timeline,
    mode: SubscriptionMode,
    out: &mut VecDeque<RecordedEvent>,
) -> Result<(bool, bool), Error> {
    if let Some(window) = t.window.take() {
        return window_step(shared, t, window, out).await;
    }
    let now = shared.reader_now().await?;
    let settle = shared.config.settle.as_micros() as i64;
    let mut horizon = now - settle;
    if mode == SubscriptionMode::Cold {
        horizon = horizon.min(t.end);
    }
    let bucket_end = (t.bucket + 1) * shared.config.time_bucket_micros() - 1;
    let mut upper = horizon.min(bucket_end);
    if upper >= codec::time_micros(&t.lower) {
        // The markers first, then the rows: a marker cleared after this read belongs to an
        // append whose rows are written by then, so the counts below see them.
        let (reach, ahead) = page_reach(shared, t, upper, now.min(bucket_end)).await?;
        let cold_end = (mode == SubscriptionMode::Cold).then_some(t.end);
        t.due = [ahead, cold_end]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at + settle);
        horizon = horizon.min(pending_cut(shared, t, reach, now).await?);
        upper = horizon.min(reach);
    }
    if upper >= codec::time_micros(&t.lower) {
        let counts = category_counts(shared, t, upper).await?;
        let window = Window {
            more: counts.len() == COMMITS_PER_PAGE as usize,
            counts: counts.into(),
            upper,
            horizon,
            bucket_end,
            next: None,
        };
        return window_step(shared, t, window, out).await;
    }
    t.window_done(shared, upper, horizon, bucket_end, false)
        .await
}

/// Fetches the next page of `window` (as many of its commits as fit in `page_bytes`), or,
/// when it is fetched, moves on as the window ends: to a new window while more may follow,
/// else past its `upper`.
async fn window_step(
    shared: &Arc<Shared>,
    t: &mut Timeline,
    mut window: Window,
    out: &mut VecDeque<RecordedEvent>,
) -> Result<(bool, bool), Error> {
    let mut progressed = false;
    if !window.counts.is_empty() {
        let limit = shared
            .config
            .commits_in_a_page(window.counts.iter().copied());
        let page = match window.next.take() {
            Some(next) => next.page().await?,
            None => {
                let at = PageAt::of(t, window.upper, limit);
                fetch_page(shared.clone(), at).await?
            }
        };
        let fetched = page.len();
        progressed = fetched > 0;
        if fetched < limit as usize {
            // Fewer rows than counted (none is ever removed): count again from here.
            window.counts.clear();
            window.more = true;
        }
        window.counts.drain(..fetched.min(window.counts.len()));
        if let (false, Some((last, _, _))) = (window.counts.is_empty(), page.last()) {
            // The next page starts after this one's last commit.
            let limit = shared
                .config
                .commits_in_a_page(window.counts.iter().copied());
            let at = PageAt {
                key: t.key.clone(),
                bucket: t.bucket,
                lower: last.time_id,
                inclusive: false,
                upper: window.upper,
                limit,
            };
            window.next = Some(Prefetch(Some(tokio::spawn(fetch_page(shared.clone(), at)))));
        }
        t.deliver(page, out);
        if !window.counts.is_empty() {
            t.window = Some(window);
            return Ok((true, false));
        }
    }
    if window.more {
        return Ok((true, false));
    }
    let Window {
        upper,
        horizon,
        bucket_end,
        ..
    } = window;
    t.window_done(shared, upper, horizon, bucket_end, progressed)
        .await
}

/// How far one page after the reader's position can reach, at most `upper` (µs): the time of
/// the `COMMITS_PER_PAGE`th category row after it, or `upper` when fewer rows are there. Rows
/// indexed after this read only make the page fuller, so a page read up to the reach is full
/// or ends there. The same read looks past `upper` up to `ahead` (the present): the time of
/// the first row there, if any, says when the reader may move again.
async fn page_reach(
    shared: &Shared,
    t: &Timeline,
    upper: i64,
    ahead: i64,
) -> Result<(i64, Option<i64>), Error> {
    let (session, st) = shared.ready().await?;
    let context = || format!("reading the category {} ahead of a page", t.key);
    let values = (
        t.key.as_str(),
        t.bucket,
        CqlTimeuuid::from(t.lower),
        CqlTimeuuid::from(codec::max_time_id(upper.max(ahead))),
        COMMITS_PER_PAGE,
    );
    let rows = session
        .execute_unpaged(&st.category_times, values)
        .await
        .map_err(|e| error::request(context(), e))?
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?;
    let mut within = 0;
    let mut reach = upper;
    let mut next = None;
    for row in rows
        .rows::<(CqlTimeuuid,)>()
        .map_err(|e| error::driver(context(), e))?
    {
        let (time_id,) = row.map_err(|e| error::driver(context(), e))?;
        let at = codec::time_micros(&Uuid::from(time_id));
        if at > upper {
            next = Some(at);
            break;
        }
        within += 1;
        if within == COMMITS_PER_PAGE {
            reach = at;
        }
    }
    Ok((reach, next))
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
        } else if now - at > abandoned && shared.index_if_committed(time_id, &stream, version).await
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
    fn deliver(&mut self, page: Page, out: &mut VecDeque<RecordedEvent>) {
        for (commit, _count, mut events) in page {
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
    }

    /// Everything up to `upper` (µs) in this bucket is delivered: moves past it, to the next
    /// bucket when that is the bucket's end.
    async fn window_done(
        &mut self,
        shared: &Shared,
        upper: i64,
        horizon: i64,
        bucket_end: i64,
        mut progressed: bool,
    ) -> Result<(bool, bool), Error> {
        if upper >= bucket_end {
            progressed |= self.next_bucket(shared, horizon).await?;
        } else {
            self.delivered_through = self.delivered_through.max(upper);
        }
        Ok((progressed, self.delivered_through >= self.end))
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

/// The event counts of the next commits of `t` up to `upper` (µs), at most
/// `COMMITS_PER_PAGE`: a window's, read after its pending appends were settled.
async fn category_counts(shared: &Shared, t: &Timeline, upper: i64) -> Result<Vec<i32>, Error> {
    let (session, st) = shared.ready().await?;
    let context = || format!("reading the category {}", t.key);
    let counts = if t.inclusive {
        &st.category_counts_incl
    } else {
        &st.category_counts
    };
    let values = (
        t.key.as_str(),
        t.bucket,
        CqlTimeuuid::from(t.lower),
        CqlTimeuuid::from(codec::max_time_id(upper)),
        COMMITS_PER_PAGE,
    );
    session
        .execute_unpaged(counts, values)
        .await
        .map_err(|e| error::request(context(), e))?
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?
        .rows::<(i32,)>()
        .map_err(|e| error::driver(context(), e))?
        .map(|r| r.map(|(count,)| count))
        .collect::<Result<Vec<i32>, _>>()
        .map_err(|e| error::driver(context(), e))
}

/// Where a page of a timeline is: after (or from, `inclusive`) `lower` in `bucket` of `key`,
/// up to `upper` (µs), `limit` commits.
struct PageAt {
    key: String,
    bucket: i64,
    lower: Uuid,
    inclusive: bool,
    upper: i64,
    limit: i32,
}

impl PageAt {
    /// The page of `t` from its position.
    fn of(t: &Timeline, upper: i64, limit: i32) -> Self {
        PageAt {
            key: t.key.clone(),
            bucket: t.bucket,
            lower: t.lower,
            inclusive: t.inclusive,
            upper,
            limit,
        }
    }
}

/// The commits of a page, fetched and decoded. Owns what it needs, so that it can run in a
/// task of its own ahead of the consumer.
async fn fetch_page(shared: Arc<Shared>, at: PageAt) -> Result<Page, Error> {
    let (session, st) = shared.ready().await?;
    let context = || format!("reading the category {}", at.key);
    let q = if at.inclusive {
        &st.category_page_incl
    } else {
        &st.category_page
    };
    let values = (
        at.key.as_str(),
        at.bucket,
        CqlTimeuuid::from(at.lower),
        CqlTimeuuid::from(codec::max_time_id(at.upper)),
        at.limit,
    );
    let rows = session
        .execute_unpaged(q, values)
        .await
        .map_err(|e| error::request(context(), e))?
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?;
    rows.rows::<(CqlTimeuuid, String, i64, i32, Vec<u8>)>()
        .map_err(|e| error::driver(context(), e))?
        .map(|r| {
            let (time_id, stream, first, count, events) =
                r.map_err(|e| error::driver(context(), e))?;
            let commit = Commit {
                stream: StreamId::parse(stream)?,
                first: first as u64,
                time_id: time_id.into(),
                events: Bytes::from(events),
            };
            let events = codec::events_of(&commit)?;
            Ok((commit, count, events))
        })
        .collect()
}
