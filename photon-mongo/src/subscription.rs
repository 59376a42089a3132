//! Subscriptions: commits read in global position order, never past a position that may still
//! be filled.
//!
//! Writers claim a position with the insert of their commit, so a position should never stay
//! empty; but a reader behind the writer (a lagging node) may see a higher position before a
//! lower one. A reader never delivers a commit while a lower position is missing: it waits,
//! polling, for up to `gap_timeout`; then it inserts a tombstone at that position. The unique
//! index on `position` makes the tombstone and a late commit exclusive: if the tombstone lands,
//! the late writer's insert fails and it retries at a new position, so no event is skipped or
//! delivered twice. Opening (checking the start, decoding the checkpoint, ending after an
//! error) is `photon_api::open_subscription`'s; this module owns only the cursor.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, TryStreamExt};
use mongodb::bson::{doc, Document, RawDocumentBuf};
use photon_api::telemetry::record_outcome;
use photon_api::{
    cursor_stream, open_subscription, Checkpoint, Error, RecordedEvent, Selector, Start,
    SubscriptionCursor, SubscriptionItem, SubscriptionMode, SubscriptionRequest,
};
use tracing::Instrument;

use crate::client::{Shared, TELEMETRY};
use crate::codec::{self, TOMBSTONE_STREAM};
use crate::error;

/// Commits fetched per query, at most.
const PAGE: i64 = 64;

/// The most a page of commits holds, in encoded bytes: past it, no more commits are fetched
/// for that page. A commit may be up to 16 MiB, so 64 of them could otherwise hold a gigabyte
/// in one subscription's buffer. A page still takes at least one commit, and may go past the
/// bound by what the server's last reply carried: MongoDB caps one reply at 16 MiB, FerretDB
/// 1.24 does not, so replies are also bounded in commits (see `Reader::batch`).
const PAGE_BYTES: usize = 8 * 1024 * 1024;

/// The shortest pause between two polls with nothing new.
const MIN_PAUSE: Duration = Duration::from_millis(5);

/// The longest pause while waiting for a missing position (shorter than an idle poll's: a gap
/// is expected to fill soon).
const MAX_GAP_PAUSE: Duration = Duration::from_millis(50);

/// Opens a subscription to `selector`'s commits.
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
        |checkpoint, _| codec::parse_checkpoint(checkpoint),
        |request| Ok(cursor_stream(Reader::open(shared, request))),
    )
}

/// The next pause of a poll loop: double the current one, at least 5 ms, at most `max`; how
/// live subscriptions poll without spinning.
fn next_pause(current: Duration, max: Duration) -> Duration {
    (current * 2).clamp(MIN_PAUSE, max)
}

/// A subscription's cursor over the commits collection.
struct Reader {
    shared: Arc<Shared>,
    filter: Document,
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
    /// `CaughtUp` is to be said (a Hot subscription: before any event, unless `live_at` is
    /// still ahead).
    caught_up_due: bool,
    /// `Start::Now` in a live mode: `CaughtUp` not before this, a window and a quarter (`now_start_wait`) after the
    /// head was read. An insert stored at or below that head may not have answered its caller
    /// yet; its writer answers Ok only within the window of sending it, so before this.
    live_at: Option<Instant>,
    buffer: VecDeque<RecordedEvent>,
    pause: Duration,
    /// How many commits one reply of the server carries: 1 for the first page (nothing is known
    /// of the commits' size yet, and one commit may be 16 MiB), then `PAGE_BYTES` over the
    /// largest commit of the page before, from 1 to `PAGE`.
    batch: u32,
    /// When each missing position was first seen missing.
    missing_since: HashMap<u64, Instant>,
}

impl Reader {
    /// Resolves the start against the store's head: the position to read after and, for a
    /// replay, where it ends.
    async fn open(
        shared: Arc<Shared>,
        request: SubscriptionRequest<(u64, u32)>,
    ) -> Result<Self, Error> {
        shared.ready().await?;
        let head = shared.head().await?;
        let filter = match &request.selector {
            Selector::All => doc! { "stream": { "$ne": TOMBSTONE_STREAM } },
            Selector::Category(c) => doc! { "category": c.as_str() },
            Selector::Stream(s) => doc! { "stream": s.as_str() },
        };
        let (after, skip) = match &request.start {
            Start::Beginning => (0, None),
            Start::Now => (head, None),
            Start::Time(t) => (first_after(&shared, &filter, *t, head).await?, None),
            Start::After(c) => {
                let (position, index) = request.after.expect("decoded by open_subscription");
                check_in_store(c, position, head)?;
                (position - 1, Some((position, index)))
            }
        };
        let hot = request.mode == SubscriptionMode::Hot;
        let from_now = request.start == Start::Now && request.mode != SubscriptionMode::Cold;
        let wait = photon_api::now_start_wait(shared.config.answer_window);
        let live_at = from_now.then(|| Instant::now() + wait);
        Ok(Self {
            shared,
            filter,
            mode: request.mode,
            after,
            skip,
            checked: after,
            end: if hot { u64::MAX } else { head },
            live: hot,
            caught_up_due: hot,
            live_at,
            buffer: VecDeque::new(),
            pause: Duration::ZERO,
            batch: 1,
            missing_since: HashMap::new(),
        })
    }

    /// Reads the next commits of the selector into the buffer, as far as no lower position is
    /// missing. Ok(true) when events were added or a wait is due and it should look again at
    /// once; Ok(false) when there is nothing (more) up to `end`.
    async fn fill(&mut self) -> Result<bool, Error> {
        let commits = self.next_page().await?;
        let Some(last) = commits.last() else {
            return Ok(false);
        };
        let deliverable_below = self.first_missing(codec::position(last)?).await?;
        let mut added = false;
        for commit in &commits {
            let position = codec::position(commit)?;
            if deliverable_below.is_some_and(|missing| position > missing) {
                break;
            }
            self.take_events(commit, position)?;
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

    /// The selector's next commits after `after`, up to `end`, in position order.
    async fn next_page(&mut self) -> Result<Vec<Document>, Error> {
        let mut filter = self.filter.clone();
        let mut range = doc! { "$gt": self.after as i64 };
        if self.end != u64::MAX {
            range.insert("$lte", self.end as i64);
        }
        filter.insert("position", range);
        // Raw documents, so that each one's size is known without encoding it again.
        let page = async {
            let mut cursor = self
                .shared
                .commits
                .clone_with_type::<RawDocumentBuf>()
                .find(filter)
                .sort(doc! { "position": 1 })
                // With a batch of 1 (the first page, or commits of 8 MiB and more) a page is
                // the one commit of the first reply.
                .limit(if self.batch == 1 { 1 } else { PAGE })
                .batch_size(self.batch)
                .max_time(self.shared.config.timeout)
                .await?;
            let mut page = Vec::new();
            let mut bytes = 0;
            while bytes < PAGE_BYTES {
                let Some(commit) = cursor.try_next().await? else {
                    break;
                };
                bytes += commit.as_bytes().len();
                page.push(commit);
            }
            Ok(page)
        };
        let page: Vec<RawDocumentBuf> = self
            .shared
            .bounded(|| "reading commits".into(), page)
            .await?;
        if let Some(largest) = page.iter().map(|c| c.as_bytes().len()).max() {
            self.batch = (PAGE_BYTES / largest).clamp(1, PAGE as usize) as u32;
        }
        page.iter()
            .map(|raw| {
                raw.to_document()
                    .map_err(|e| error::corrupt(None, format!("not a document: {e}")))
            })
            .collect()
    }

    /// Buffers the events of the commit at `position`, less those a resumed checkpoint skips.
    fn take_events(&mut self, commit: &Document, position: u64) -> Result<(), Error> {
        let mut events = codec::events(commit)?;
        if let Some((p, index)) = self.skip.take() {
            if p == position {
                events.drain(..(index as usize + 1).min(events.len()));
            }
        }
        self.buffer.extend(events);
        self.after = position;
        Ok(())
    }

    /// The lowest missing position in (checked, up_to], or None; advances `checked`.
    async fn first_missing(&mut self, up_to: u64) -> Result<Option<u64>, Error> {
        if up_to <= self.checked {
            return Ok(None);
        }
        let context = || "checking for positions in flight".to_owned();
        let range = doc! { "$gt": self.checked as i64, "$lte": up_to as i64 };
        let timeout = self.shared.config.timeout;
        let present = self
            .shared
            .bounded(
                context,
                self.shared
                    .commits
                    .count_documents(doc! { "position": range.clone() })
                    .max_time(timeout),
            )
            .await?;
        if present == up_to - self.checked {
            self.checked = up_to;
            self.missing_since.clear();
            return Ok(None);
        }
        let positions = async {
            self.shared
                .commits
                .find(doc! { "position": range })
                .projection(doc! { "position": 1 })
                .sort(doc! { "position": 1 })
                .max_time(timeout)
                .await?
                .try_collect::<Vec<Document>>()
                .await
        };
        let positions = self.shared.bounded(context, positions).await?;
        let mut expected = self.checked + 1;
        for d in &positions {
            if codec::position(d)? != expected {
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
        if first_seen.elapsed() >= self.shared.config.gap_timeout {
            tracing::warn!(
                position = missing,
                "position still empty after the gap timeout; writing a tombstone"
            );
            // The repair of an append that never landed: its position is fenced for good.
            let span = TELEMETRY.repair_span(None, missing);
            let fenced = tombstone(&self.shared, missing)
                .instrument(span.clone())
                .await;
            record_outcome(&span, &fenced, Some(1));
            fenced?;
            self.missing_since.remove(&missing);
            return Ok(());
        }
        self.pause = next_pause(self.pause, MAX_GAP_PAUSE);
        tokio::time::sleep(self.pause).await;
        Ok(())
    }
}

impl SubscriptionCursor for Reader {
    async fn next_item(&mut self) -> Result<Option<SubscriptionItem>, Error> {
        loop {
            if self.caught_up_due && self.live_at.is_none_or(|at| Instant::now() >= at) {
                self.caught_up_due = false;
                return Ok(Some(SubscriptionItem::CaughtUp));
            }
            if let Some(e) = self.buffer.pop_front() {
                return Ok(Some(SubscriptionItem::Event(e)));
            }
            if self.fill().await? {
                continue;
            }
            if !self.live {
                if self.mode == SubscriptionMode::Cold {
                    return Ok(None);
                }
                self.live = true;
                self.end = u64::MAX;
                self.pause = Duration::ZERO;
                self.caught_up_due = true;
                continue;
            }
            self.pause = next_pause(self.pause, self.shared.config.max_poll_interval);
            let mut wait = self.pause;
            if let Some(at) = self.live_at.filter(|_| self.caught_up_due) {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// The position just before the selector's first commit recorded at or after `t` (`head` when
/// there is none yet).
async fn first_after(
    shared: &Shared,
    filter: &Document,
    t: photon_api::Timestamp,
    head: u64,
) -> Result<u64, Error> {
    let mut filter = filter.clone();
    filter.insert("recorded_at", doc! { "$gte": t.unix_micros() });
    let first = shared
        .bounded(
            || "finding the start time".into(),
            shared
                .commits
                .find_one(filter)
                .sort(doc! { "position": 1 })
                .projection(codec::head_fields())
                .max_time(shared.config.timeout),
        )
        .await?;
    Ok(match first.as_ref().map(codec::head).transpose()? {
        Some(h) => h.position - 1,
        None => head,
    })
}

/// Refuses a checkpoint past this store's head: another store made it.
fn check_in_store(checkpoint: &Checkpoint, position: u64, head: u64) -> Result<(), Error> {
    if position == 0 || position > head {
        return Err(error::checkpoint_not_here(checkpoint, position, head));
    }
    Ok(())
}

/// Gives up a missing position for good, so readers do not wait for it. A duplicate means the
/// position is taken already (by its commit or an earlier tombstone): nothing to do.
pub(crate) async fn tombstone(shared: &Shared, position: u64) -> Result<(), Error> {
    let insert = async {
        match shared.commits.insert_one(codec::tombstone(position)).await {
            Err(e) if error::is_duplicate_key(&e) => Ok(()),
            other => other.map(drop),
        }
    };
    shared
        .bounded(
            || format!("writing a tombstone at position {position}"),
            insert,
        )
        .await
}
