//! Subscriptions: commits read in global position order, never past a position that may still
//! be filled.
//!
//! A writer reserves a position (an atomic counter) and then inserts its commit, so positions
//! can become visible out of order, and a writer can die between the two steps. A reader never
//! delivers a commit while a lower position is missing: it waits, polling, for up to
//! `gap_timeout`; then it inserts a tombstone at that position. The unique index on `position`
//! makes the tombstone and a late commit exclusive: if the tombstone lands, the late writer's
//! insert fails and it retries at a new position, so no event is skipped or delivered twice.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use photon_api::validate::validate_subscription;
use photon_api::{
    error_stream, Error, RecordedEvent, Selector, Start, SubscriptionItem, SubscriptionMode,
};

use crate::document::{self, TOMBSTONE_STREAM};
use crate::{map_error, next_pause, MongoStore};

/// Commits fetched per query.
const PAGE: i64 = 64;

pub(crate) fn subscribe(
    store: MongoStore,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    if let Err(e) = validate_subscription(&start, mode) {
        return error_stream(e);
    }
    if let Start::After(c) = &start {
        if let Err(e) = document::parse_checkpoint(c) {
            return error_stream(e);
        }
    }
    let filter = match &selector {
        Selector::All => doc! { "stream": { "$ne": TOMBSTONE_STREAM } },
        Selector::Category(c) => doc! { "category": c.as_str() },
        Selector::Stream(s) => doc! { "stream": s.as_str() },
    };
    let reader = Reader {
        store,
        filter,
        start: Some(start),
        mode,
        after: 0,
        skip: None,
        checked: 0,
        end: u64::MAX,
        live: false,
        failed: false,
        buffer: VecDeque::new(),
        pause: Duration::ZERO,
        missing_since: HashMap::new(),
    };
    stream::unfold(reader, |mut reader| async move {
        let item = reader.next_item().await?;
        Some((item, reader))
    })
    .boxed()
}

struct Reader {
    store: MongoStore,
    filter: Document,
    start: Option<Start>,
    mode: SubscriptionMode,
    /// The position of the last commit fully handed to the buffer.
    after: u64,
    /// Resuming inside a commit: skip its events up to this index.
    skip: Option<(u64, u32)>,
    /// Every position up to here is filled (a commit or a tombstone).
    checked: u64,
    /// The last position of the replay (the head when the subscription started); unbounded live.
    end: u64,
    live: bool,
    failed: bool,
    buffer: VecDeque<RecordedEvent>,
    pause: Duration,
    /// When each missing position was first seen missing.
    missing_since: HashMap<u64, Instant>,
}

impl Reader {
    async fn resolve_start(&mut self, start: Start) -> Result<(), Error> {
        self.store.ready().await?;
        let head = self.store.head().await?;
        self.after = match start {
            Start::Beginning => 0,
            Start::Now => head,
            Start::Time(t) => {
                let mut filter = self.filter.clone();
                filter.insert("recorded_at", doc! { "$gte": t.unix_micros() });
                let first = self
                    .store
                    .commits()
                    .find_one(filter)
                    .sort(doc! { "position": 1 })
                    .projection(doc! { "position": 1, "version": 1, "count": 1 })
                    .await
                    .map_err(|e| map_error("finding the start time", e))?;
                match first.as_ref().map(document::head).transpose()? {
                    Some(h) => h.position - 1,
                    None => head,
                }
            }
            Start::After(c) => {
                let (position, index) = document::parse_checkpoint(&c)?;
                if position == 0 || position > head {
                    return Err(Error::InvalidInput {
                        what: format!("checkpoint {c}"),
                        reason: format!(
                            "position {position} is not in this store (last position {head})"
                        ),
                    });
                }
                self.skip = Some((position, index));
                position - 1
            }
        };
        self.checked = self.after;
        self.end = match self.mode {
            SubscriptionMode::Hot => {
                self.live = true;
                u64::MAX
            }
            _ => head,
        };
        Ok(())
    }

    async fn next_item(&mut self) -> Option<Result<SubscriptionItem, Error>> {
        if self.failed {
            return None;
        }
        if let Some(start) = self.start.take() {
            if let Err(e) = self.resolve_start(start).await {
                self.failed = true;
                return Some(Err(e));
            }
            if self.mode == SubscriptionMode::Hot {
                return Some(Ok(SubscriptionItem::CaughtUp));
            }
        }
        loop {
            if let Some(e) = self.buffer.pop_front() {
                return Some(Ok(SubscriptionItem::Event(e)));
            }
            match self.fill().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // A retryable error ends nothing: the consumer may poll again and the
                    // reader resumes from where it was.
                    if !e.is_retryable() {
                        self.failed = true;
                    }
                    return Some(Err(e));
                }
            }
            if !self.live {
                if self.mode == SubscriptionMode::Cold {
                    return None;
                }
                self.live = true;
                self.end = u64::MAX;
                self.pause = Duration::ZERO;
                return Some(Ok(SubscriptionItem::CaughtUp));
            }
            self.pause = next_pause(self.pause, self.store.config().max_poll_interval);
            tokio::time::sleep(self.pause).await;
        }
    }

    /// Reads the next commits of the selector into the buffer, as far as no lower position is
    /// missing. Ok(true) when events were added or a wait is due and it should look again at
    /// once; Ok(false) when there is nothing (more) up to `end`.
    async fn fill(&mut self) -> Result<bool, Error> {
        let context = "reading commits";
        let mut filter = self.filter.clone();
        let mut range = doc! { "$gt": self.after as i64 };
        if self.end != u64::MAX {
            range.insert("$lte", self.end as i64);
        }
        filter.insert("position", range);
        let commits: Vec<Document> = self
            .store
            .commits()
            .find(filter)
            .sort(doc! { "position": 1 })
            .limit(PAGE)
            .await
            .map_err(|e| map_error(context, e))?
            .try_collect()
            .await
            .map_err(|e| map_error(context, e))?;
        let Some(last) = commits.last() else {
            return Ok(false);
        };
        let highest = document::head(last)?.position;
        let deliverable_below = self.first_missing(highest).await?;
        let mut added = false;
        for commit in &commits {
            let position = document::head(commit)?.position;
            if let Some(missing) = deliverable_below {
                if position > missing {
                    break;
                }
            }
            let mut events = document::events(commit)?;
            if let Some((p, index)) = self.skip {
                if p == position {
                    events.drain(..(index as usize + 1).min(events.len()));
                }
                self.skip = None;
            }
            self.buffer.extend(events);
            self.after = position;
            added = true;
        }
        if added {
            self.pause = Duration::ZERO;
            return Ok(true);
        }
        // The lowest candidate waits behind a missing position.
        let missing = deliverable_below.expect("nothing added means a missing position");
        self.wait_or_give_up(missing).await?;
        Ok(true)
    }

    /// The lowest missing position in (checked, up_to], or None; advances `checked`.
    async fn first_missing(&mut self, up_to: u64) -> Result<Option<u64>, Error> {
        if up_to <= self.checked {
            return Ok(None);
        }
        let context = "checking for positions in flight";
        let range = doc! { "$gt": self.checked as i64, "$lte": up_to as i64 };
        let present = self
            .store
            .commits()
            .count_documents(doc! { "position": range.clone() })
            .await
            .map_err(|e| map_error(context, e))?;
        if present == up_to - self.checked {
            self.checked = up_to;
            self.missing_since.clear();
            return Ok(None);
        }
        let positions: Vec<Document> = self
            .store
            .commits()
            .find(doc! { "position": range })
            .projection(doc! { "position": 1 })
            .sort(doc! { "position": 1 })
            .await
            .map_err(|e| map_error(context, e))?
            .try_collect()
            .await
            .map_err(|e| map_error(context, e))?;
        let mut expected = self.checked + 1;
        for d in &positions {
            let p = match d.get("position") {
                Some(Bson::Int64(p)) => *p as u64,
                Some(Bson::Int32(p)) => *p as u64,
                _ => return Err(Error::backend(crate::BACKEND, "a commit has no position")),
            };
            if p != expected {
                break;
            }
            expected += 1;
        }
        self.checked = expected - 1;
        Ok(Some(expected))
    }

    /// Waits a little for a missing position; past `gap_timeout`, gives it up with a tombstone.
    async fn wait_or_give_up(&mut self, missing: u64) -> Result<(), Error> {
        let first_seen = *self
            .missing_since
            .entry(missing)
            .or_insert_with(Instant::now);
        if first_seen.elapsed() >= self.store.config().gap_timeout {
            tracing::warn!(
                position = missing,
                "position still empty after the gap timeout; writing a tombstone"
            );
            self.store.tombstone(missing).await?;
            self.missing_since.remove(&missing);
            return Ok(());
        }
        self.pause = next_pause(self.pause, Duration::from_millis(50));
        tokio::time::sleep(self.pause).await;
        Ok(())
    }
}
