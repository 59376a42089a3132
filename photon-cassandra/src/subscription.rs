//! Subscriptions. One stream: its commits by version, polled when live. A category or the all
//! stream: the category table, one time bucket at a time in time-id order, never past the
//! *horizon*: now minus the settle delay, and before the time of any append still pending
//! (its marker is written before its commit). Pending markers older than `repair_after` belong
//! to writers that died between the commit and the category rows: the reader repairs them
//! (writes the rows from the commit) or drops them (the commit never happened), then goes on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use photon_api::validate::validate_subscription;
use photon_api::{
    error_stream, Bytes, Error, EventStoreExt as _, ReadOptions, RecordedEvent, Selector, Start,
    StreamId, SubscriptionItem, SubscriptionMode, Timestamp, Uuid, Version,
};
use scylla::value::CqlTimeuuid;

use crate::codec::{self, Commit, Position};
use crate::{events_of, map_error, rows_error, Shared, ALL, PAGE, POLL};

pub(crate) fn subscribe(
    shared: Arc<Shared>,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    if let Err(e) = validate_subscription(&start, mode) {
        return error_stream(e);
    }
    let after = match &start {
        Start::After(cp) => match Position::from_checkpoint(cp) {
            Ok(p) => Some(p),
            Err(e) => return error_stream(e),
        },
        _ => None,
    };
    let sub = Sub {
        shared,
        selector,
        start,
        after,
        mode,
        state: None,
        buffer: VecDeque::new(),
        caught_up_sent: false,
        pause: POLL,
    };
    stream::unfold(Some(sub), |sub| async move {
        let mut sub = sub?;
        match sub.next().await {
            Ok(Some(item)) => Some((Ok(item), Some(sub))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

struct Sub {
    shared: Arc<Shared>,
    selector: Selector,
    start: Start,
    after: Option<Position>,
    mode: SubscriptionMode,
    state: Option<State>,
    buffer: VecDeque<RecordedEvent>,
    caught_up_sent: bool,
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
}

impl Sub {
    async fn open(&mut self) -> Result<State, Error> {
        let now = Timestamp::now().unix_micros();
        let since = match &self.start {
            Start::Time(t) => Some(t.unix_micros()),
            _ => None,
        };
        match &self.selector {
            Selector::Stream(stream) => {
                let head = self.shared.refresh(stream, false).await?.next_first;
                let next = match (&self.start, &self.after) {
                    (_, Some(p)) => p.version.saturating_add(1),
                    (Start::Now, _) => head,
                    _ => 0,
                };
                Ok(State::Stream(StreamState {
                    stream: stream.clone(),
                    next,
                    end: head,
                    since,
                }))
            }
            Selector::Category(_) | Selector::All => {
                let key = match &self.selector {
                    Selector::Category(c) => c.as_str().to_owned(),
                    _ => ALL.to_owned(),
                };
                let (lower, inclusive, skip_through) = match (&self.start, &self.after) {
                    (_, Some(p)) => (p.time_id, true, Some((p.time_id, p.index))),
                    (Start::Time(t), _) => (codec::min_time_id(t.unix_micros()), true, None),
                    (Start::Now, _) => (codec::max_time_id(now), false, None),
                    _ => (codec::min_time_id(0), false, None),
                };
                let at = codec::time_micros(&lower);
                // Start in the first registered bucket at or after the start time.
                let bucket =
                    first_bucket(&self.shared, &key, self.shared.time_bucket_of(at), i64::MAX)
                        .await?
                        .unwrap_or_else(|| self.shared.time_bucket_of(now));
                Ok(State::Timeline(Timeline {
                    key,
                    bucket,
                    lower,
                    inclusive,
                    skip_through,
                    delivered_through: at - 1,
                    end: now,
                    since,
                }))
            }
        }
    }

    async fn next(&mut self) -> Result<Option<SubscriptionItem>, Error> {
        if self.state.is_none() {
            self.state = Some(self.open().await?);
            if self.mode == SubscriptionMode::Hot {
                self.caught_up_sent = true;
                return Ok(Some(SubscriptionItem::CaughtUp));
            }
        }
        loop {
            if let Some(e) = self.buffer.pop_front() {
                return Ok(Some(SubscriptionItem::Event(e)));
            }
            let (progressed, history_done) = match self.state.as_mut().expect("opened") {
                State::Stream(s) => {
                    let shared = self.shared.clone();
                    stream_step(&shared, s, self.mode, &mut self.buffer).await?
                }
                State::Timeline(t) => {
                    let shared = self.shared.clone();
                    timeline_step(&shared, t, self.mode, &mut self.buffer).await?
                }
            };
            if !self.buffer.is_empty() {
                self.pause = POLL;
                continue;
            }
            if history_done {
                match self.mode {
                    SubscriptionMode::Cold => return Ok(None),
                    _ if !self.caught_up_sent => {
                        self.caught_up_sent = true;
                        return Ok(Some(SubscriptionItem::CaughtUp));
                    }
                    _ => {}
                }
            }
            if !progressed {
                tokio::time::sleep(self.pause).await;
                self.pause = (self.pause * 2).min(Duration::from_millis(500));
            }
        }
    }
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
    let store = crate::CassandraStore {
        inner: shared.clone(),
    };
    let events = store
        .read_to_vec(
            &s.stream,
            ReadOptions::forwards()
                .from_version(Version(s.next))
                .limit(256),
        )
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

/// One step of a category or all-stream subscription: resolve old pending appends in the
/// current bucket, then read a page up to the horizon, or move to the next bucket.
async fn timeline_step(
    shared: &Arc<Shared>,
    t: &mut Timeline,
    mode: SubscriptionMode,
    out: &mut VecDeque<RecordedEvent>,
) -> Result<(bool, bool), Error> {
    let config = &shared.config;
    let now = Timestamp::now().unix_micros();
    let mut horizon = now - config.settle.as_micros() as i64;
    // Only markers after our position matter (and reading from there skips the tombstones of
    // markers already cleared behind it).
    for (time_id, stream, version) in pending_in(shared, &t.key, t.bucket, t.lower).await? {
        let at = codec::time_micros(&time_id);
        if now - at > config.repair_after.as_micros() as i64 {
            shared.settle_marker(time_id, &stream, version).await?;
        } else {
            horizon = horizon.min(at - 1);
        }
    }
    if mode == SubscriptionMode::Cold {
        horizon = horizon.min(t.end);
    }
    let bucket_end = (t.bucket + 1) * config.time_bucket_micros() - 1;
    let upper = horizon.min(bucket_end);
    let mut progressed = false;
    if upper >= codec::time_micros(&t.lower) {
        let page = category_page(shared, t, upper).await?;
        let full = page.len() == PAGE as usize;
        for (commit, _count) in page {
            progressed = true;
            let mut events = events_of(&commit)?;
            if let Some((id, index)) = t.skip_through {
                if id == commit.time_id {
                    events.retain(|e| e.version.0 > commit.first + index as u64);
                }
            }
            t.lower = commit.time_id;
            t.inclusive = false;
            t.skip_through = None;
            for e in events {
                if t.since.is_some_and(|s| e.recorded_at.unix_micros() < s) {
                    continue;
                }
                out.push_back(e);
            }
        }
        if full {
            return Ok((true, false));
        }
    }
    // Everything up to `upper` in this bucket is delivered.
    if upper >= bucket_end {
        // The bucket is complete: move to the next one with rows (or pending appends).
        let last = shared.time_bucket_of(horizon);
        match first_bucket(shared, &t.key, t.bucket + 1, last).await? {
            Some(next) => {
                t.bucket = next;
                t.delivered_through = next * config.time_bucket_micros() - 1;
                progressed = true;
            }
            None => {
                t.delivered_through = horizon;
                if last > t.bucket {
                    t.bucket = last;
                    progressed = true;
                }
            }
        }
    } else {
        t.delivered_through = t.delivered_through.max(upper);
    }
    Ok((progressed, t.delivered_through >= t.end))
}

async fn first_bucket(
    shared: &Arc<Shared>,
    key: &str,
    from: i64,
    to: i64,
) -> Result<Option<i64>, Error> {
    if from > to {
        return Ok(None);
    }
    let (session, st) = shared.ready().await?;
    let rows = session
        .execute_unpaged(&st.buckets_from, (key, from, to))
        .await
        .map_err(|e| map_error("reading category buckets", e))?
        .into_rows_result()
        .map_err(|e| rows_error("reading category buckets", e))?;
    Ok(rows
        .maybe_first_row::<(i64,)>()
        .map_err(|e| rows_error("reading category buckets", e))?
        .map(|(b,)| b))
}

async fn pending_in(
    shared: &Arc<Shared>,
    key: &str,
    bucket: i64,
    after: Uuid,
) -> Result<Vec<(Uuid, StreamId, u64)>, Error> {
    let (session, st) = shared.ready().await?;
    let rows = session
        .execute_unpaged(&st.pending_in, (key, bucket, CqlTimeuuid::from(after)))
        .await
        .map_err(|e| map_error("reading pending appends", e))?
        .into_rows_result()
        .map_err(|e| rows_error("reading pending appends", e))?;
    rows.rows::<(CqlTimeuuid, String, i64)>()
        .map_err(|e| rows_error("reading pending appends", e))?
        .map(|r| {
            let (t, s, v) = r.map_err(|e| rows_error("reading pending appends", e))?;
            Ok((t.into(), StreamId::parse(s)?, v as u64))
        })
        .collect()
}

async fn category_page(
    shared: &Arc<Shared>,
    t: &Timeline,
    upper: i64,
) -> Result<Vec<(Commit, i32)>, Error> {
    let (session, st) = shared.ready().await?;
    let q = if t.inclusive {
        &st.category_page_incl
    } else {
        &st.category_page
    };
    let rows = session
        .execute_unpaged(
            q,
            (
                t.key.as_str(),
                t.bucket,
                CqlTimeuuid::from(t.lower),
                CqlTimeuuid::from(codec::max_time_id(upper)),
                PAGE,
            ),
        )
        .await
        .map_err(|e| map_error("reading a category", e))?
        .into_rows_result()
        .map_err(|e| rows_error("reading a category", e))?;
    rows.rows::<(CqlTimeuuid, String, i64, i32, Vec<u8>)>()
        .map_err(|e| rows_error("reading a category", e))?
        .map(|r| {
            let (time_id, stream, first, count, events) =
                r.map_err(|e| rows_error("reading a category", e))?;
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
        .collect()
}
