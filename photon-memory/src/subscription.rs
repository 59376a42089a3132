//! Subscriptions: a cursor on the log that replays in chunks, says `CaughtUp` once at the end of
//! the replay, then follows the head.
//!
//! The [`Stream`] is written by hand (not `unfold`) because it is the replay's hot path: an event
//! already fetched is returned without touching a future. [`open`] is the one place that checks
//! the request and resolves where the cursor starts.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream};
use photon_api::{
    open_batched_subscription, open_subscription, Checkpoint, Error, RecordedEvent, Selector,
    Start, SubscriptionBatch, SubscriptionItem, SubscriptionMode, SubscriptionRequest,
};
use tokio::sync::watch;

use crate::client::{Sealed, Shared, TELEMETRY};
use crate::reader::Place;
use crate::{codec, error};

/// A subscription, as [`photon_api::EventStore::subscribe`] describes, opened the way every
/// backend opens one.
pub(crate) fn subscribe(
    shared: &Arc<Shared>,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    open_subscription(
        &TELEMETRY,
        selector,
        start,
        mode,
        |checkpoint, _| codec::position(checkpoint).map(|p| (p, checkpoint.clone())),
        |request| {
            let cursor = open(shared, request)?;
            Ok(Subscription { cursor, wait: None })
        },
    )
}

/// A batched subscription, as [`photon_api::EventStore::subscribe_batches`] describes: the
/// same cursor, each fetched chunk's events built straight into the batch.
pub(crate) fn subscribe_batches(
    shared: &Arc<Shared>,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
    max_batch: usize,
) -> BoxStream<'static, Result<SubscriptionBatch, Error>> {
    open_batched_subscription(
        &TELEMETRY,
        selector,
        start,
        mode,
        max_batch,
        |checkpoint, _| codec::position(checkpoint).map(|p| (p, checkpoint.clone())),
        |request| {
            let cursor = open(shared, request)?;
            Ok(Batches {
                cursor,
                wait: None,
                max_batch,
            })
        },
    )
}

/// Resolves the start against the log as it is now, so `Start::Now` and the Cold end mean
/// "when `subscribe` was called", not "when first polled".
fn open(
    shared: &Arc<Shared>,
    request: SubscriptionRequest<(u64, Checkpoint)>,
) -> Result<Cursor, Error> {
    let head = shared.head.subscribe();
    let state = shared.read();
    let len = state.log.len();
    let next = match (&request.start, request.after) {
        (_, Some((p, checkpoint))) => {
            if p >= len {
                return Err(error::checkpoint_past_end(&checkpoint, p, len));
            }
            p + 1
        }
        (Start::Time(t), None) => state.position_at(*t),
        (Start::Now, None) => len,
        _ => 0,
    };
    drop(state);
    Ok(Cursor {
        shared: shared.clone(),
        selector: request.selector,
        mode: request.mode,
        place: Place::at(next),
        end: len,
        live: false,
        fetched: Fetched::default(),
        head,
    })
}

/// A subscription's state between polls.
struct Cursor {
    shared: Arc<Shared>,
    selector: Selector,
    mode: SubscriptionMode,
    /// The next log position to fetch.
    place: Place,
    /// The end (exclusive) of the current phase: the log length when the subscription was made
    /// while replaying, unbounded once live. Bounding the replay is what lets `CaughtUp` come
    /// even while writers keep appending faster than the consumer reads.
    end: u64,
    live: bool,
    fetched: Fetched,
    head: watch::Receiver<u64>,
}

/// Fetched events not yet delivered: positions in sealed segments, each made into an event as
/// the consumer reaches it (built straight into the poll's answer, not copied through a queue:
/// an event is 216 bytes, and every copy of it is a measurable share of a replay), or events
/// copied under the lock from the tail.
#[derive(Default)]
struct Fetched {
    /// Some only with `positions[taken..]` not empty (`State::fetch` hands out segments only
    /// with positions in them, and the last position's poll clears them).
    sealed: Option<Arc<Sealed>>,
    /// The positions in `sealed`; reused from fetch to fetch.
    positions: Vec<u64>,
    /// How many of `positions` were made into events.
    taken: usize,
    copied: VecDeque<RecordedEvent>,
}

impl Fetched {
    fn is_empty(&self) -> bool {
        self.sealed.is_none() && self.copied.is_empty()
    }

    fn clear(&mut self) {
        self.sealed = None;
        self.positions.clear();
        self.taken = 0;
    }
}

/// What a subscription does next when it has no fetched event left.
enum Step {
    /// Events were fetched: take them.
    Fetched,
    CaughtUp,
    /// Live and nothing new: wait for the head to move.
    Wait,
    End,
}

impl Cursor {
    /// Fetches the next chunk; returns the log length seen.
    fn fetch(&mut self) -> u64 {
        if self.live {
            // Mark the head seen before reading, so an append landing after the read wakes us.
            // (While replaying, the end is fixed and nothing waits on the head.)
            self.head.borrow_and_update();
        }
        let fetched = &mut self.fetched;
        fetched.clear();
        let from = self.place.next;
        let (len, sealed) = self.shared.read().fetch(
            &self.selector,
            &mut self.place,
            self.end,
            &mut fetched.positions,
            &mut fetched.copied,
        );
        fetched.sealed = sealed;
        if !fetched.is_empty() {
            // Once per chunk that delivers, not per event, nor per fetch that found nothing (a
            // replay of nothing, a wakeup by another category's append: sampling those would
            // report a lag no delivered event had). In log positions from where the chunk's
            // fetch began to the head, which count every category's events.
            TELEMETRY.subscription_lag_events(len.saturating_sub(from));
        }
        len
    }

    /// Fetches the next chunk, or says what comes instead: waits (on `wait`) only when live
    /// and idle. `Step::Wait` is never answered.
    fn advance(
        &mut self,
        wait: &mut Option<BoxFuture<'static, bool>>,
        cx: &mut Context<'_>,
    ) -> Poll<Step> {
        loop {
            if let Some(w) = wait {
                let alive = ready!(w.as_mut().poll(cx));
                *wait = None;
                if !alive {
                    return Poll::Ready(Step::End); // the store is gone: no more events can come
                }
            }
            match self.step() {
                Step::Wait => {
                    // A clone has seen what the cursor has seen, so it wakes on the next append.
                    let mut head = self.head.clone();
                    *wait = Some(Box::pin(async move { head.changed().await.is_ok() }));
                }
                step => return Poll::Ready(step),
            }
        }
    }

    /// Fetches the next chunk, or says what comes instead, without waiting.
    fn step(&mut self) -> Step {
        let len = self.fetch();
        if !self.fetched.is_empty() {
            return Step::Fetched;
        }
        // Nothing of ours below min(end, len): skip the cursor past it.
        self.place.next = self.place.next.max(self.end.min(len));
        if self.live {
            Step::Wait
        } else if self.mode == SubscriptionMode::Cold {
            Step::End
        } else {
            self.live = true;
            self.end = u64::MAX;
            Step::CaughtUp
        }
    }
}

/// A subscription: events straight from the cursor's buffer, a wait on the head only when live
/// and idle.
struct Subscription {
    cursor: Cursor,
    /// Resolves when the head moves (true) or the store is gone (false).
    wait: Option<BoxFuture<'static, bool>>,
}

impl Stream for Subscription {
    type Item = Result<SubscriptionItem, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // An event of a sealed chunk already fetched, the replay's common case, is built in
            // the answer itself: a local or an `Option` between would cost a copy of the event.
            let fetched = &mut this.cursor.fetched;
            if let Some(sealed) = &fetched.sealed {
                let position = fetched.positions[fetched.taken];
                fetched.taken += 1;
                if fetched.taken < fetched.positions.len() {
                    return Poll::Ready(Some(Ok(SubscriptionItem::Event(sealed.event(position)))));
                }
                // The chunk's last event. Let the segments go once it is built: a seal need
                // not copy their list while a reader holds it.
                let sealed = sealed.clone();
                fetched.clear();
                return Poll::Ready(Some(Ok(SubscriptionItem::Event(sealed.event(position)))));
            }
            if let Some(e) = fetched.copied.pop_front() {
                return Poll::Ready(Some(Ok(SubscriptionItem::Event(e))));
            }
            match ready!(this.cursor.advance(&mut this.wait, cx)) {
                Step::Fetched | Step::Wait => {}
                Step::CaughtUp => return Poll::Ready(Some(Ok(SubscriptionItem::CaughtUp))),
                Step::End => return Poll::Ready(None),
            }
        }
    }
}

/// A batched subscription: each batch built from the cursor's fetched chunk (up to
/// `max_batch` of it), a wait on the head only when live and idle.
struct Batches {
    cursor: Cursor,
    wait: Option<BoxFuture<'static, bool>>,
    max_batch: usize,
}

impl Stream for Batches {
    type Item = Result<SubscriptionBatch, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let fetched = &mut this.cursor.fetched;
            if let Some(sealed) = &fetched.sealed {
                let positions = &fetched.positions[fetched.taken..];
                let positions = &positions[..positions.len().min(this.max_batch)];
                let mut events = Vec::with_capacity(positions.len());
                events.extend(positions.iter().map(|&p| sealed.event(p)));
                fetched.taken += positions.len();
                if fetched.taken == fetched.positions.len() {
                    fetched.clear();
                }
                return Poll::Ready(Some(Ok(SubscriptionBatch::Events(events))));
            }
            if !fetched.copied.is_empty() {
                let n = fetched.copied.len().min(this.max_batch);
                let events = fetched.copied.drain(..n).collect();
                return Poll::Ready(Some(Ok(SubscriptionBatch::Events(events))));
            }
            match ready!(this.cursor.advance(&mut this.wait, cx)) {
                Step::Fetched | Step::Wait => {}
                Step::CaughtUp => return Poll::Ready(Some(Ok(SubscriptionBatch::CaughtUp))),
                Step::End => return Poll::Ready(None),
            }
        }
    }
}
