//! Opening a subscription, the part every backend does the same way: check the start against the
//! mode, decode the checkpoint into the backend's own position, build the backend's cursor, and
//! hand out a stream that ends after its first error (a subscription that failed resumes from
//! the consumer's last checkpoint, never past a hole).
//!
//! What a cursor does between its items (polling a log, paging a table, waiting for a commit)
//! stays in the backend.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{self, BoxStream, FusedStream, Stream};
use futures::StreamExt;

use crate::checkpoint::Checkpoint;
use crate::error::Error;
use crate::store::error_stream;
use crate::subscription::{Selector, Start, SubscriptionBatch, SubscriptionItem, SubscriptionMode};
use crate::telemetry::{SubscriptionTelemetry, Telemetry};

/// How long a subscription from `Start::Now` waits before it says `CaughtUp`, for a backend
/// whose writers answer Ok only within `answer_window` of the moment their write could first
/// have become visible (a server that cannot tell a subscriber which stored writes have not
/// answered their callers yet). The window and a quarter more: the margin covers the time
/// between a writer's decision and its caller's return (a task switch, a channel) and clocks
/// that run at slightly different rates on the writer's and the subscriber's machines.
pub fn now_start_wait(answer_window: Duration) -> Duration {
    answer_window + answer_window / 4
}
use crate::validate::validate_subscription;

/// A subscription's arguments, checked, with the checkpoint decoded into the backend's position
/// type `P`.
#[derive(Clone, Debug)]
pub struct SubscriptionRequest<P> {
    /// What to deliver.
    pub selector: Selector,
    /// Where to start, as given (for `Start::After`, `after` holds the decoded position).
    pub start: Start,
    /// The position decoded from `Start::After`'s checkpoint.
    pub after: Option<P>,
    /// Cold, Hot or HotCold; already checked against `start`.
    pub mode: SubscriptionMode,
}

/// A backend's cursor over one subscription: yields the next item, `None` at the end (Cold), or
/// an error, after which it is not asked again.
pub trait SubscriptionCursor: Send + 'static {
    /// The next item; waits for it when live.
    fn next_item(
        &mut self,
    ) -> impl Future<Output = Result<Option<SubscriptionItem>, Error>> + Send + '_;
}

/// Opens a subscription the way every backend does.
///
/// `decode` turns `Start::After`'s checkpoint into the backend's position (refusing a foreign or
/// mismatched one); `open` builds the backend's item stream from the checked request. The
/// returned stream yields the first error of either, or of the items, and then ends.
///
/// The subscription is traced and measured here, for every backend alike, with `telemetry`'s
/// labels: a `photon.subscribe` span with a `photon.catch_up` child that ends at `CaughtUp`, the
/// events and bytes delivered, the outcome, and sampled lag (see [`crate::telemetry`]).
///
/// # Errors
/// - [`Error::InvalidInput`] as the first item for `Hot` with a start other than `Now`.
/// - Whatever `decode` or `open` return, as the first item.
pub fn open_subscription<P, S>(
    telemetry: &'static Telemetry,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
    decode: impl FnOnce(&Checkpoint, &Selector) -> Result<P, Error>,
    open: impl FnOnce(SubscriptionRequest<P>) -> Result<S, Error>,
) -> BoxStream<'static, Result<SubscriptionItem, Error>>
where
    S: Stream<Item = Result<SubscriptionItem, Error>> + Send + 'static,
{
    open_traced(telemetry, selector, start, mode, Ok(()), decode, open)
}

/// Opens a batched subscription ([`crate::EventStore::subscribe_batches`]) the way
/// [`open_subscription`] opens one, for a backend that builds its batches itself.
///
/// # Errors
/// - [`Error::InvalidInput`] as the first item for `max_batch` 0, or for `Hot` with a start
///   other than `Now`.
/// - Whatever `decode` or `open` return, as the first item.
pub fn open_batched_subscription<P, S>(
    telemetry: &'static Telemetry,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
    max_batch: usize,
    decode: impl FnOnce(&Checkpoint, &Selector) -> Result<P, Error>,
    open: impl FnOnce(SubscriptionRequest<P>) -> Result<S, Error>,
) -> BoxStream<'static, Result<SubscriptionBatch, Error>>
where
    S: Stream<Item = Result<SubscriptionBatch, Error>> + Send + 'static,
{
    let checked = crate::validate::validate_max_batch(max_batch);
    open_traced(telemetry, selector, start, mode, checked, decode, open)
}

/// What a subscription stream hands out, single items or batches, as telemetry sees it.
trait Delivered: Sized + Send + 'static {
    fn observe(telemetry: &mut SubscriptionTelemetry, polled: &Poll<Option<Result<Self, Error>>>);
}

impl Delivered for SubscriptionItem {
    fn observe(telemetry: &mut SubscriptionTelemetry, polled: &Poll<Option<Result<Self, Error>>>) {
        telemetry.observe(polled);
    }
}

impl Delivered for SubscriptionBatch {
    fn observe(telemetry: &mut SubscriptionTelemetry, polled: &Poll<Option<Result<Self, Error>>>) {
        telemetry.observe_batch(polled);
    }
}

/// Both openers: checks, decodes, opens, and wraps the stream in [`EndAfterError`].
fn open_traced<P, S, T>(
    telemetry: &'static Telemetry,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
    checked: Result<(), Error>,
    decode: impl FnOnce(&Checkpoint, &Selector) -> Result<P, Error>,
    open: impl FnOnce(SubscriptionRequest<P>) -> Result<S, Error>,
) -> BoxStream<'static, Result<T, Error>>
where
    S: Stream<Item = Result<T, Error>> + Send + 'static,
    T: Delivered,
{
    let mut traced = SubscriptionTelemetry::new(telemetry, &selector, &start, mode);
    let request = checked
        .and_then(|()| validate_subscription(&start, mode))
        .and_then(|()| match &start {
            Start::After(cp) => decode(cp, &selector).map(Some),
            _ => Ok(None),
        })
        .map(|after| SubscriptionRequest {
            selector,
            start,
            after,
            mode,
        });
    match request.and_then(open) {
        Ok(items) => EndAfterError {
            inner: Box::pin(items),
            done: false,
            telemetry: traced,
        }
        .boxed(),
        Err(e) => {
            traced.end(Err(&e));
            error_stream(e)
        }
    }
}

/// A subscription's items in batches of up to `max_batch`: the events ready without waiting,
/// cut at `CaughtUp`, at an error (which comes next, alone) and at the end. What
/// [`crate::EventStore::subscribe_batches`] gives for a backend that builds no batches of its
/// own.
///
/// `subscribe` opens the subscription, once `max_batch` is checked.
///
/// # Errors
/// - [`Error::InvalidInput`] as the only item for `max_batch` 0 (no subscription is opened).
pub fn batched(
    max_batch: usize,
    subscribe: impl FnOnce() -> BoxStream<'static, Result<SubscriptionItem, Error>>,
) -> BoxStream<'static, Result<SubscriptionBatch, Error>> {
    if let Err(e) = crate::validate::validate_max_batch(max_batch) {
        return error_stream(e);
    }
    Batched {
        items: subscribe(),
        max_batch,
        held: None,
        ended: false,
    }
    .boxed()
}

/// [`batched`]'s stream.
struct Batched {
    items: BoxStream<'static, Result<SubscriptionItem, Error>>,
    max_batch: usize,
    /// What cut the last batch short, handed out next: `CaughtUp` or the error.
    held: Option<Result<SubscriptionBatch, Error>>,
    /// The items ended (after an error, or at a Cold subscription's end).
    ended: bool,
}

impl Stream for Batched {
    type Item = Result<SubscriptionBatch, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(held) = this.held.take() {
            return Poll::Ready(Some(held));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let mut events = Vec::new();
        while events.len() < this.max_batch {
            match this.items.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(SubscriptionItem::Event(e)))) => events.push(e),
                Poll::Ready(Some(Ok(SubscriptionItem::CaughtUp))) => {
                    this.held = Some(Ok(SubscriptionBatch::CaughtUp));
                    break;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.held = Some(Err(e));
                    this.ended = true;
                    break;
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    break;
                }
                // Woken when the next item is ready; the events so far go now.
                Poll::Pending if events.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if events.is_empty() {
            return Poll::Ready(this.held.take());
        }
        Poll::Ready(Some(Ok(SubscriptionBatch::Events(events))))
    }
}

/// The items of a cursor that `open` builds asynchronously (connecting a consumer, reading a
/// head): the error of `open` is the first item, then each of the cursor's items in turn.
pub fn cursor_stream<C, F>(open: F) -> impl Stream<Item = Result<SubscriptionItem, Error>> + Send
where
    C: SubscriptionCursor,
    F: Future<Output = Result<C, Error>> + Send + 'static,
{
    enum State<C, F> {
        Opening(F),
        Open(C),
    }
    stream::unfold(Some(State::Opening(open)), |state| async move {
        let mut cursor = match state? {
            State::Open(cursor) => cursor,
            State::Opening(open) => match open.await {
                Ok(cursor) => cursor,
                Err(e) => return Some((Err(e), None)),
            },
        };
        match cursor.next_item().await {
            Ok(Some(item)) => Some((Ok(item), Some(State::Open(cursor)))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Ends a stream after its first error, without allocating per item, and traces and measures
/// what passes.
///
/// Generic over the cursor's stream rather than holding it boxed: one dynamic call per item
/// (the caller's) instead of two, and the cursor's poll can be inlined here, which saves a copy
/// of every event on a replay's hot path.
struct EndAfterError<S> {
    inner: Pin<Box<S>>,
    done: bool,
    telemetry: SubscriptionTelemetry,
}

impl<S, T> Stream for EndAfterError<S>
where
    S: Stream<Item = Result<T, Error>>,
    T: Delivered,
{
    type Item = Result<T, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let polled = {
            let _entered = this.telemetry.span().enter();
            this.inner.as_mut().poll_next(cx)
        };
        T::observe(&mut this.telemetry, &polled);
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = &polled {
            this.done = true;
        }
        polled
    }
}

impl<S, T> FusedStream for EndAfterError<S>
where
    S: Stream<Item = Result<T, Error>>,
    T: Delivered,
{
    fn is_terminated(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    static LABELS: crate::telemetry::Labels = crate::telemetry::Labels::new("test");
    static TEST: Telemetry = Telemetry::new(&LABELS);

    struct Counter {
        left: u32,
        fail_at_end: bool,
    }

    impl SubscriptionCursor for Counter {
        async fn next_item(&mut self) -> Result<Option<SubscriptionItem>, Error> {
            if self.left == 0 {
                return if self.fail_at_end {
                    Err(Error::Unavailable {
                        backend: "test",
                        message: "gone".into(),
                        source: None,
                    })
                } else {
                    Ok(None)
                };
            }
            self.left -= 1;
            Ok(Some(SubscriptionItem::CaughtUp))
        }
    }

    fn open(
        start: Start,
        mode: SubscriptionMode,
        fail_at_end: bool,
    ) -> Vec<Result<SubscriptionItem, Error>> {
        let s = open_subscription(
            &TEST,
            Selector::All,
            start,
            mode,
            |cp, _| {
                if cp.backend() == "test" {
                    Ok(7u64)
                } else {
                    Err(Error::ForeignCheckpoint {
                        expected_backend: "test".into(),
                        checkpoint: cp.to_string(),
                    })
                }
            },
            move |request| {
                let left = request.after.map_or(2, |p| p as u32 - 5);
                Ok(cursor_stream(
                    async move { Ok(Counter { left, fail_at_end }) },
                ))
            },
        );
        block_on(s.collect())
    }

    #[test]
    fn a_hot_subscription_must_start_now() {
        let items = open(Start::Beginning, SubscriptionMode::Hot, false);
        assert!(matches!(&items[..], [Err(Error::InvalidInput { .. })]));
    }

    #[test]
    fn a_foreign_checkpoint_is_the_only_item() {
        let cp = Checkpoint::from_position("other", 1);
        let items = open(Start::After(cp), SubscriptionMode::Cold, false);
        assert!(matches!(&items[..], [Err(Error::ForeignCheckpoint { .. })]));
    }

    #[test]
    fn the_checkpoint_reaches_the_cursor_and_the_stream_ends_after_an_error() {
        let cp = Checkpoint::from_position("test", 1);
        let items = open(Start::After(cp), SubscriptionMode::Cold, true);
        assert_eq!(items.len(), 3, "two items, then the error, then nothing");
        assert!(items[..2].iter().all(|i| i.is_ok()));
        assert!(matches!(items[2], Err(Error::Unavailable { .. })));
        let items = open(Start::Beginning, SubscriptionMode::Cold, false);
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn an_open_that_fails_is_the_only_item() {
        let s = open_subscription(
            &TEST,
            Selector::All,
            Start::Now,
            SubscriptionMode::Hot,
            |_, _| Ok(()),
            |_| {
                Ok(cursor_stream(async {
                    Err::<Counter, _>(Error::Unsupported {
                        backend: "test",
                        operation: "all".into(),
                    })
                }))
            },
        );
        let items: Vec<_> = block_on(s.collect());
        assert!(matches!(&items[..], [Err(Error::Unsupported { .. })]));
    }

    fn event(n: u64) -> SubscriptionItem {
        SubscriptionItem::Event(crate::RecordedEvent {
            stream: crate::StreamId::parse("t-1").unwrap(),
            version: crate::Version(n),
            event_id: crate::Uuid::now_v7(),
            event_type: crate::EventType::new("Numbered").unwrap(),
            schema_version: 1,
            occurred_at: crate::Timestamp::now(),
            recorded_at: crate::Timestamp::now(),
            payload: crate::Payload::json(&n).unwrap(),
            metadata: crate::Metadata::default(),
            checkpoint: Checkpoint::from_position("test", n),
        })
    }

    /// What `batched` makes of `items`, one poll per batch, `Pending` shown as `None`.
    fn batches_of(
        items: Vec<Poll<Option<Result<SubscriptionItem, Error>>>>,
        max_batch: usize,
    ) -> Vec<Option<Result<Vec<u64>, String>>> {
        let mut items = items.into_iter();
        let source = stream::poll_fn(move |_| items.next().unwrap_or(Poll::Ready(None))).boxed();
        let mut batches = batched(max_batch, || source);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut seen = Vec::new();
        loop {
            match batches.poll_next_unpin(&mut cx) {
                Poll::Pending => seen.push(None),
                Poll::Ready(None) => return seen,
                Poll::Ready(Some(b)) => seen.push(Some(match b {
                    Ok(SubscriptionBatch::Events(events)) => {
                        Ok(events.iter().map(|e| e.version.value()).collect())
                    }
                    Ok(SubscriptionBatch::CaughtUp) => Err("CaughtUp".into()),
                    Err(e) => Err(e.to_string()),
                })),
            }
        }
    }

    #[test]
    fn batches_are_cut_at_their_size_at_caught_up_at_a_wait_and_before_an_error() {
        let ready = |n| Poll::Ready(Some(Ok(event(n))));
        let items = vec![
            ready(0),
            ready(1),
            ready(2),
            Poll::Ready(Some(Ok(SubscriptionItem::CaughtUp))),
            ready(3),
            Poll::Pending,
            Poll::Pending,
            ready(4),
            Poll::Ready(Some(Err(Error::Unavailable {
                backend: "test",
                message: "gone".into(),
                source: None,
            }))),
            ready(5),
        ];
        let seen = batches_of(items, 2);
        assert_eq!(
            seen[..6],
            [
                Some(Ok(vec![0, 1])),
                Some(Ok(vec![2])),
                Some(Err("CaughtUp".into())),
                // Ready events go at once when the next item must be waited for.
                Some(Ok(vec![3])),
                None,
                Some(Ok(vec![4])),
            ]
        );
        // The error alone, after the events before it, and nothing after it.
        assert!(
            matches!(&seen[6..], [Some(Err(e))] if e.contains("gone")),
            "{seen:?}"
        );
        // A Cold end after events: the events, then the end.
        assert_eq!(
            batches_of(vec![ready(0), Poll::Ready(None)], 10),
            vec![Some(Ok(vec![0]))]
        );
    }

    #[test]
    fn a_largest_batch_of_zero_is_refused() {
        let seen = batches_of(vec![Poll::Ready(Some(Ok(event(0))))], 0);
        assert!(
            matches!(&seen[..], [Some(Err(e))] if e.contains("max_batch")),
            "{seen:?}"
        );
    }
}
