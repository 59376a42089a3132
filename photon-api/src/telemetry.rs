//! Tracing spans and metrics, in one place for every backend: the metric names (and what each
//! one means), the spans' names and fields, and what an operation's outcome is called.
//!
//! Backends call these helpers instead of the `tracing` and `metrics` macros, so the four of them
//! name and label everything the same way. What is cheap matters here: an append or a read is
//! one span and a handful of metric updates whatever its number of events, metrics are labelled
//! by backend (and outcome) only, never by stream (unbounded cardinality), and their keys are
//! built from static parts, so recording allocates nothing unless a recorder does. Without a
//! subscriber or recorder installed, every call is a check of a global and nothing more, with one
//! exception: [`Telemetry::read`] wraps every read's stream in a boxed counter (one allocation
//! per `read_stream` call, whatever is installed), because a read's `Unavailable` errors are
//! counted even when no span is wanted and the `metrics` facade cannot say whether a recorder
//! is installed (a thread-local one may be, on whichever thread polls the read).
//!
//! Spans (their target is `photon`): `photon.append`, `photon.read` and a backend's own
//! `photon.catch_up` (Kafka reading a partition to its end; its `offsets` field counts the log
//! offsets it advanced, not events) at DEBUG, one per call on the hot path; `photon.subscribe`,
//! its child `photon.catch_up` (the replay up to `CaughtUp`, whose `events` are events), and
//! `photon.repair` at INFO. Nothing is traced per event above TRACE.
//!
//! This module records; it never decides anything about an operation, and never fails one.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, Stream};
use futures::StreamExt;
use metrics::{Key, Label, Level, Metadata, Unit};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::error::Error;
use crate::event::{EventData, RecordedEvent, Timestamp};
use crate::store::AppendResult;
use crate::stream_id::StreamId;
use crate::subscription::{
    Direction, ReadOptions, Selector, Start, SubscriptionBatch, SubscriptionItem, SubscriptionMode,
};

/// Counter: appends answered, labels `backend` and `outcome` (see [`outcome`]).
pub const APPENDS: &str = "photon_appends_total";
/// Counter: events stored by successful appends (a recognised re-send counts again), label
/// `backend`.
pub const APPENDED_EVENTS: &str = "photon_appended_events_total";
/// Counter: bytes of those events, as [`EventData::size`] counts them, label `backend`.
pub const APPENDED_BYTES: &str = "photon_appended_bytes_total";
/// Counter: appends refused for a concurrency conflict (`WrongExpectedVersion`: someone else
/// wrote first), label `backend`. Not `IdempotencyConflict`: an event id reused for another
/// batch is a caller's bug no retry fixes, so it is `invalid` and kept out of this count of
/// normal contention.
pub const CONFLICTS: &str = "photon_append_conflicts_total";
/// Counter: attempts a backend made again inside one operation (a lost race, a fenced commit, a
/// repair round), label `backend`. Retries by the caller are appends of their own.
pub const RETRIES: &str = "photon_retries_total";
/// Counter: `Unavailable` errors answered by any operation (append, read, subscription),
/// label `backend`.
pub const UNAVAILABLE: &str = "photon_unavailable_errors_total";
/// Histogram: seconds from an append's call to its answer, whatever the answer (for a
/// `cancelled` one, to when its caller dropped it), label `backend`.
pub const APPEND_SECONDS: &str = "photon_append_duration_seconds";
/// Histogram: how long ago a subscription's delivered event was recorded, in seconds, sampled
/// (the first event, every 256th, and every one that follows a wait for the store; of a batched
/// subscription, a batch's first event when the batch follows a wait or passes a multiple of
/// 256), label `backend`.
pub const SUBSCRIPTION_LAG_SECONDS: &str = "photon_subscription_lag_seconds";
/// Histogram: how far behind the head of the store's log a subscription's delivered events
/// are, in log positions (every category's events, not only the subscription's), label
/// `backend`. Recorded only by the memory backend, the one whose cursor knows its head for
/// free: once per fetch that delivered events (from where that fetch began), never for a fetch
/// that found nothing. The other backends record no sample of it.
pub const SUBSCRIPTION_LAG_EVENTS: &str = "photon_subscription_lag_events";
/// Gauge: seconds between when a view's last handled event was recorded and when the view
/// handled it; 0 when the view has just caught up; while a handler is at an event, how long ago
/// that event was recorded, refreshed on the runner's save interval, so a stuck handler shows.
/// Label `view` (views are few and named by the application). Recorded by newton's view runner.
///
/// Its limits: events the store holds but has not yet delivered to the view (a reader held
/// back, a slow subscription) are not seen, so the gauge keeps its last value meanwhile; and
/// after a view stops or fails the gauge keeps its last value too (a recorder keeps a series
/// once registered), so alert on the view's status as well.
pub const VIEW_LAG_SECONDS: &str = "newton_view_lag_seconds";
/// What an operation ended with, as the `outcome` span field and metric label say it: `ok`,
/// `conflict` (someone else wrote first: reload and decide again), `unavailable` (retry),
/// `invalid` (fix the input; an `IdempotencyConflict`, an event id reused for another batch, is
/// one), `denied` (the server refused the credentials, the certificate or the permission: an
/// operator alerts on it apart from outages, since no retry fixes it) or `error` (anything else). An append has one more, `cancelled`, which no `Result` maps
/// to: its caller dropped it before it answered (a timeout, a client gone), so whether it was
/// stored is unknown; these are the appends an operator most needs to see, so they are counted
/// and timed (up to the drop) like any other.
pub fn outcome<T>(result: &Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => OUTCOMES[0],
        Err(e) => error_outcome(e),
    }
}

const OUTCOMES: [&str; 7] = [
    "ok",
    "conflict",
    "unavailable",
    "invalid",
    "error",
    "cancelled",
    "denied",
];

/// [`OUTCOMES`]' index of `cancelled`, the outcome of an append dropped before its answer.
const CANCELLED: usize = 5;

fn error_outcome(e: &Error) -> &'static str {
    OUTCOMES[outcome_index(e)]
}

fn outcome_index(e: &Error) -> usize {
    match e {
        Error::WrongExpectedVersion { .. } | Error::RevisionConflict { .. } => 1,
        Error::Unavailable { .. } => 2,
        // A reused event id is the caller's bug, not contention: reloading does not fix it.
        Error::IdempotencyConflict { .. }
        | Error::InvalidInput { .. }
        | Error::EventTooLarge { .. }
        | Error::BatchTooLarge { .. }
        | Error::ForeignCheckpoint { .. }
        | Error::Encode { .. }
        | Error::Unsupported { .. }
        | Error::BackendNotCompiled { .. } => 3,
        Error::AccessDenied { .. } => 6,
        _ => 4,
    }
}

/// Says what each metric means and its unit to the installed recorder (a Prometheus exporter
/// prints them as `# HELP` lines). Optional: metrics are recorded without it.
pub fn describe() {
    let counters = [
        (APPENDS, Unit::Count, "Appends answered, by outcome."),
        (
            APPENDED_EVENTS,
            Unit::Count,
            "Events stored by successful appends.",
        ),
        (
            APPENDED_BYTES,
            Unit::Bytes,
            "Bytes of the events stored by successful appends.",
        ),
        (
            CONFLICTS,
            Unit::Count,
            "Appends refused for a concurrency conflict.",
        ),
        (
            RETRIES,
            Unit::Count,
            "Attempts a backend made again within one operation.",
        ),
        (
            UNAVAILABLE,
            Unit::Count,
            "Unavailable errors answered by any operation.",
        ),
    ];
    let histograms = [
        (
            APPEND_SECONDS,
            Unit::Seconds,
            "Time from an append's call to its answer.",
        ),
        (
            SUBSCRIPTION_LAG_SECONDS,
            Unit::Seconds,
            "Age of a subscription's delivered events (sampled).",
        ),
        (
            SUBSCRIPTION_LAG_EVENTS,
            Unit::Count,
            "Events stored after a subscription's delivered event (sampled).",
        ),
    ];
    let gauges = [(
        VIEW_LAG_SECONDS,
        Unit::Seconds,
        "Age of a view's last handled event when handled.",
    )];
    metrics::with_recorder(|r| {
        for (name, unit, help) in counters {
            r.describe_counter(name.into(), Some(unit), help.into());
        }
        for (name, unit, help) in histograms {
            r.describe_histogram(name.into(), Some(unit), help.into());
        }
        for (name, unit, help) in gauges {
            r.describe_gauge(name.into(), Some(unit), help.into());
        }
    });
}

const METADATA: Metadata<'static> = Metadata::new("photon", Level::INFO, Some(module_path!()));

/// One backend's metric labels, a `static` that its [`Telemetry`] refers to (the keys it builds
/// at compile time borrow them).
#[derive(Debug)]
pub struct Labels {
    backend: &'static str,
    one: [Label; 1],
    by_outcome: [[Label; 2]; 7],
}

impl Labels {
    /// The labels of `backend` (its name, as [`crate::EventStore::backend`] says it).
    pub const fn new(backend: &'static str) -> Self {
        const fn pair(backend: &'static str, outcome: &'static str) -> [Label; 2] {
            [
                Label::from_static_parts("backend", backend),
                Label::from_static_parts("outcome", outcome),
            ]
        }
        Self {
            backend,
            one: [Label::from_static_parts("backend", backend)],
            by_outcome: [
                pair(backend, OUTCOMES[0]),
                pair(backend, OUTCOMES[1]),
                pair(backend, OUTCOMES[2]),
                pair(backend, OUTCOMES[3]),
                pair(backend, OUTCOMES[4]),
                pair(backend, OUTCOMES[5]),
                pair(backend, OUTCOMES[6]),
            ],
        }
    }
}

/// One backend's instruments: its name and its metric keys, built once, at compile time, as a
/// `static`, so recording neither allocates nor hashes a key.
///
/// ```
/// use photon_api::telemetry::{Labels, Telemetry};
/// static LABELS: Labels = Labels::new("memory");
/// static TELEMETRY: Telemetry = Telemetry::new(&LABELS);
/// assert_eq!(TELEMETRY.backend(), "memory");
/// ```
#[derive(Debug)]
pub struct Telemetry {
    backend: &'static str,
    appends: [Key; 7],
    appended_events: Key,
    appended_bytes: Key,
    conflicts: Key,
    retries: Key,
    unavailable: Key,
    append_seconds: Key,
    lag_seconds: Key,
    lag_events: Key,
}

impl Telemetry {
    /// The instruments labelled with `labels`.
    pub const fn new(labels: &'static Labels) -> Self {
        const fn key(name: &'static str, labels: &'static Labels) -> Key {
            Key::from_static_parts(name, &labels.one)
        }
        const fn appends(outcome: usize, labels: &'static Labels) -> Key {
            Key::from_static_parts(APPENDS, &labels.by_outcome[outcome])
        }
        Self {
            backend: labels.backend,
            appends: [
                appends(0, labels),
                appends(1, labels),
                appends(2, labels),
                appends(3, labels),
                appends(4, labels),
                appends(5, labels),
                appends(6, labels),
            ],
            appended_events: key(APPENDED_EVENTS, labels),
            appended_bytes: key(APPENDED_BYTES, labels),
            conflicts: key(CONFLICTS, labels),
            retries: key(RETRIES, labels),
            unavailable: key(UNAVAILABLE, labels),
            append_seconds: key(APPEND_SECONDS, labels),
            lag_seconds: key(SUBSCRIPTION_LAG_SECONDS, labels),
            lag_events: key(SUBSCRIPTION_LAG_EVENTS, labels),
        }
    }

    /// The backend these instruments are for.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    fn counter(key: &Key, n: u64) {
        metrics::with_recorder(|r| r.register_counter(key, &METADATA)).increment(n);
    }

    fn histogram(key: &Key, value: f64) {
        metrics::with_recorder(|r| r.register_histogram(key, &METADATA)).record(value);
    }

    /// Counts `n` attempts made again inside one operation (see [`RETRIES`]).
    pub fn retried(&'static self, n: u64) {
        if n > 0 {
            Self::counter(&self.retries, n);
        }
    }

    /// Counts an error answered outside an append (a read, a subscription, a repair): only
    /// `Unavailable` is counted, as [`UNAVAILABLE`].
    pub fn failed(&'static self, error: &Error) {
        if matches!(error, Error::Unavailable { .. }) {
            Self::counter(&self.unavailable, 1);
        }
    }

    /// Starts timing and tracing an append of `events` to `stream`; call
    /// [`AppendProbe::finish`] with its answer, or hand the append to [`AppendProbe::run`]. Run
    /// the append inside [`AppendProbe::span`] (`Instrument::instrument`, or `enter` for a
    /// synchronous one), so what the backend logs carries the stream. A probe dropped without
    /// an answer (its append's future dropped by a timeout) records the outcome `cancelled`.
    pub fn append(&'static self, stream: &StreamId, events: &[EventData]) -> AppendProbe {
        let bytes: usize = events.iter().map(EventData::size).sum();
        let span = tracing::debug_span!(
            target: "photon",
            "photon.append",
            backend = self.backend,
            stream = stream.as_str(),
            events = events.len(),
            bytes,
            outcome = Empty,
            attempts = Empty,
        );
        AppendProbe {
            telemetry: self,
            span,
            started: Instant::now(),
            events: events.len() as u64,
            bytes: bytes as u64,
            finished: false,
        }
    }

    /// Traces a read of one stream: a `photon.read` span entered while the read is polled, with
    /// the events and bytes read and the outcome recorded when it ends (or is dropped). Boxes a
    /// wrapper around `events` on every call, even with nothing installed: its `Unavailable`
    /// errors are counted whether or not the span is enabled, and whether a recorder will see
    /// them (a thread-local one on the polling thread) is not known here.
    pub fn read(
        &'static self,
        stream: &StreamId,
        options: &ReadOptions,
        events: BoxStream<'static, Result<RecordedEvent, Error>>,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        let span = tracing::debug_span!(
            target: "photon",
            "photon.read",
            backend = self.backend,
            stream = stream.as_str(),
            backwards = options.direction == Direction::Backwards,
            from = options.from.map(|v| v.value()),
            limit = options.limit,
            events = Empty,
            bytes = Empty,
            outcome = Empty,
        );
        Traced {
            telemetry: self,
            inner: events,
            span,
            events: 0,
            bytes: 0,
            done: false,
        }
        .boxed()
    }

    /// A span for a backend's own catch-up (reading a log up to its end to rebuild what it
    /// knows): record `offsets` (how far the read advanced in the log, counting records that are
    /// not photon events, such as transaction markers and records gone to retention: it is the
    /// work done, not events found) and `outcome` on it with [`record_outcome`] when it ends.
    /// DEBUG: appends and reads may each need one.
    pub fn catch_up_span(&'static self, what: &dyn fmt::Display) -> Span {
        tracing::debug_span!(
            target: "photon",
            "photon.catch_up",
            backend = self.backend,
            selector = %what,
            offsets = Empty,
            outcome = Empty,
        )
    }

    /// A span for the repair of one append whose writer stopped half way (a marker settled, a
    /// position fenced): `at` is the version (of `stream`) or the position repaired. Record
    /// `outcome` and `attempts` on it with [`record_outcome`].
    pub fn repair_span(&'static self, stream: Option<&StreamId>, at: u64) -> Span {
        tracing::info_span!(
            target: "photon",
            "photon.repair",
            backend = self.backend,
            stream = stream.map(StreamId::as_str),
            at,
            outcome = Empty,
            attempts = Empty,
        )
    }

    /// The span of one subscription, its fields filled as it goes.
    fn subscribe_span(
        &'static self,
        selector: &Selector,
        start: &Start,
        mode: SubscriptionMode,
    ) -> Span {
        tracing::info_span!(
            target: "photon",
            "photon.subscribe",
            backend = self.backend,
            selector = %SelectorField(selector),
            start = start_name(start),
            mode = ?mode,
            events = Empty,
            bytes = Empty,
            outcome = Empty,
        )
    }

    /// Records how many log positions a subscription's delivered events are behind the head
    /// (see [`SUBSCRIPTION_LAG_EVENTS`]); a backend's cursor calls it where it knows its head,
    /// and only for a fetch that delivered something.
    pub fn subscription_lag_events(&'static self, behind: u64) {
        Self::histogram(&self.lag_events, behind as f64);
    }
}

/// The gauge of one view's lag ([`VIEW_LAG_SECONDS`]), labelled with the view's name. Built once
/// per subscription of the view (the label is the one allocation) and set per handled event and
/// while an event is in hand; a recorder installed later is seen from the view's next
/// (re)subscription.
pub fn view_lag_gauge(view: &str) -> metrics::Gauge {
    let key = Key::from_parts(VIEW_LAG_SECONDS, vec![Label::new("view", view.to_owned())]);
    metrics::with_recorder(|r| r.register_gauge(&key, &METADATA))
}

/// Records `outcome` (and `attempts`, when given) on `span`: how a backend closes a catch-up or
/// repair span. Counts nothing: an error that matters reaches a caller through an operation,
/// which counts it.
pub fn record_outcome<T>(span: &Span, result: &Result<T, Error>, attempts: Option<u32>) {
    span.record("outcome", outcome(result));
    if let Some(attempts) = attempts {
        span.record("attempts", attempts);
    }
}

/// The attempts a backend makes at one operation, counted by the backend as it goes and read by
/// the operation's [`AppendProbe`] when it ends.
#[derive(Debug, Default)]
pub struct Attempts(AtomicU32);

impl Attempts {
    /// Records that the operation is at its `n`th attempt.
    pub fn set(&self, n: u32) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// The attempts made so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One append being timed and traced; see [`Telemetry::append`]. Dropped before
/// [`finish`](Self::finish), it records the append as `cancelled`: a caller that gives up on an
/// append (a timeout drops its future) must still show in the counts and the latency.
#[derive(Debug)]
#[must_use = "finish() records the append's outcome; dropped, it is counted as cancelled"]
pub struct AppendProbe {
    telemetry: &'static Telemetry,
    span: Span,
    started: Instant,
    events: u64,
    bytes: u64,
    /// The answer is recorded: the drop records nothing more.
    finished: bool,
}

impl AppendProbe {
    /// The append's span, to run the append in.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Runs `append` inside the span and records its answer, with the attempts the backend
    /// counted in `attempts`. If the returned future is dropped first, the append is recorded
    /// as `cancelled` with the attempts counted so far.
    pub async fn run(
        self,
        append: impl Future<Output = Result<AppendResult, Error>>,
        attempts: &Attempts,
    ) -> Result<AppendResult, Error> {
        /// Records a cancelled append with its attempts, which the bare probe cannot see.
        struct Running<'a> {
            probe: AppendProbe,
            attempts: &'a Attempts,
        }
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                if !self.probe.finished {
                    self.probe.record(CANCELLED, self.attempts.get());
                }
            }
        }
        let span = self.span.clone();
        let mut running = Running {
            probe: self,
            attempts,
        };
        let result = append.instrument(span).await;
        let index = result.as_ref().map_or_else(outcome_index, |_| 0);
        running.probe.record(index, attempts.get());
        result
    }

    /// Records the append's answer: the span's `outcome` and `attempts`, the counters and the
    /// latency histogram. `attempts` counts the backend's own tries (1 when it did not try again).
    pub fn finish(mut self, result: &Result<AppendResult, Error>, attempts: u32) {
        let index = result.as_ref().map_or_else(outcome_index, |_| 0);
        self.record(index, attempts);
    }

    /// Records the outcome at `index` of [`OUTCOMES`], once. Static keys only: no allocation,
    /// so it is as cheap in a drop as in an answer.
    fn record(&mut self, index: usize, attempts: u32) {
        self.finished = true;
        let t = self.telemetry;
        self.span.record("outcome", OUTCOMES[index]);
        self.span.record("attempts", attempts);
        Telemetry::counter(&t.appends[index], 1);
        match index {
            0 => {
                Telemetry::counter(&t.appended_events, self.events);
                Telemetry::counter(&t.appended_bytes, self.bytes);
            }
            1 => Telemetry::counter(&t.conflicts, 1),
            2 => Telemetry::counter(&t.unavailable, 1),
            _ => {}
        }
        t.retried(u64::from(attempts.saturating_sub(1)));
        Telemetry::histogram(&t.append_seconds, self.started.elapsed().as_secs_f64());
    }
}

impl Drop for AppendProbe {
    fn drop(&mut self) {
        if !self.finished {
            // Its append was dropped (or panicked) before answering; the attempts are unknown
            // here (`run` records them itself).
            self.record(CANCELLED, 0);
        }
    }
}

/// A read's events, counted as they pass, with its span entered while polled.
struct Traced {
    telemetry: &'static Telemetry,
    inner: BoxStream<'static, Result<RecordedEvent, Error>>,
    span: Span,
    events: u64,
    bytes: u64,
    done: bool,
}

impl Traced {
    fn end(&mut self, result: Result<(), &Error>) {
        self.done = true;
        self.span.record("events", self.events);
        self.span.record("bytes", self.bytes);
        let outcome = match result {
            Ok(()) => OUTCOMES[0],
            Err(e) => {
                self.telemetry.failed(e);
                error_outcome(e)
            }
        };
        self.span.record("outcome", outcome);
    }
}

impl Stream for Traced {
    type Item = Result<RecordedEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let polled = {
            let _entered = this.span.enter();
            this.inner.poll_next_unpin(cx)
        };
        match &polled {
            Poll::Ready(Some(Ok(e))) => {
                this.events += 1;
                this.bytes += e.payload.bytes.len() as u64;
            }
            Poll::Ready(Some(Err(e))) => this.end(Err(e)),
            Poll::Ready(None) if !this.done => this.end(Ok(())),
            _ => {}
        }
        polled
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if !self.done {
            // Dropped by its reader before the end: what was read is still worth saying.
            self.end(Ok(()));
        }
    }
}

/// Shows a selector as a span field: `stream:account-1`, `category:account` or `all`.
struct SelectorField<'a>(&'a Selector);

impl fmt::Display for SelectorField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Selector::Stream(s) => write!(f, "stream:{s}"),
            Selector::Category(c) => write!(f, "category:{c}"),
            Selector::All => f.write_str("all"),
        }
    }
}

fn start_name(start: &Start) -> &'static str {
    match start {
        Start::Beginning => "beginning",
        Start::After(_) => "checkpoint",
        Start::Time(_) => "time",
        Start::Now => "now",
    }
}

/// Every 256th event of a subscription is sampled for lag (and the first, and every event after a
/// wait).
const LAG_SAMPLE_EVERY: u64 = 256;

/// What the shared opener keeps of one subscription's telemetry: its span, the catch-up span
/// until `CaughtUp`, and counts for the span and the lag samples.
pub(crate) struct SubscriptionTelemetry {
    telemetry: &'static Telemetry,
    span: Span,
    catch_up: Option<Span>,
    events: u64,
    bytes: u64,
    /// The last poll found nothing ready: the next event is the first after a wait, so it is
    /// near the head and worth a lag sample.
    waited: bool,
}

impl SubscriptionTelemetry {
    pub(crate) fn new(
        telemetry: &'static Telemetry,
        selector: &Selector,
        start: &Start,
        mode: SubscriptionMode,
    ) -> Self {
        let span = telemetry.subscribe_span(selector, start, mode);
        let catch_up = tracing::info_span!(
            target: "photon",
            parent: &span,
            "photon.catch_up",
            backend = telemetry.backend,
            events = Empty,
            outcome = Empty,
        );
        Self {
            telemetry,
            span,
            catch_up: Some(catch_up),
            events: 0,
            bytes: 0,
            waited: true,
        }
    }

    /// The span to enter while the subscription is polled: the catch-up until `CaughtUp`,
    /// then the subscription's own.
    pub(crate) fn span(&self) -> &Span {
        self.catch_up.as_ref().unwrap_or(&self.span)
    }

    /// Counts what a poll of the subscription gave.
    pub(crate) fn observe(&mut self, polled: &Poll<Option<Result<SubscriptionItem, Error>>>) {
        match polled {
            Poll::Pending => self.waited = true,
            Poll::Ready(Some(Ok(SubscriptionItem::Event(e)))) => {
                self.events += 1;
                self.bytes += e.payload.bytes.len() as u64;
                if self.waited || self.events.is_multiple_of(LAG_SAMPLE_EVERY) {
                    self.sample_lag(e.recorded_at);
                }
                self.waited = false;
                tracing::trace!(stream = %e.stream, version = e.version.value(), "photon: delivered");
            }
            Poll::Ready(Some(Ok(SubscriptionItem::CaughtUp))) => {
                if let Some(span) = self.catch_up.take() {
                    span.record("events", self.events);
                    span.record("outcome", OUTCOMES[0]);
                }
                tracing::info!(target: "photon", events = self.events, "photon: caught up");
            }
            Poll::Ready(Some(Err(e))) => self.end(Err(e)),
            Poll::Ready(None) => self.end(Ok(())),
        }
    }

    /// As [`SubscriptionTelemetry::observe`], for a batched subscription: the batch's events
    /// are counted together, and lag is sampled from its first event (the one the single-item
    /// path samples after a wait) when the batch follows a wait or the count passes a multiple
    /// of the sampling period.
    pub(crate) fn observe_batch(
        &mut self,
        polled: &Poll<Option<Result<SubscriptionBatch, Error>>>,
    ) {
        match polled {
            Poll::Pending => self.waited = true,
            Poll::Ready(Some(Ok(SubscriptionBatch::Events(events)))) => {
                let (Some(first), Some(last)) = (events.first(), events.last()) else {
                    return;
                };
                let before = self.events;
                self.events += events.len() as u64;
                self.bytes += events
                    .iter()
                    .map(|e| e.payload.bytes.len() as u64)
                    .sum::<u64>();
                if self.waited || before / LAG_SAMPLE_EVERY != self.events / LAG_SAMPLE_EVERY {
                    self.sample_lag(first.recorded_at);
                }
                self.waited = false;
                tracing::trace!(
                    events = events.len(),
                    stream = %last.stream,
                    version = last.version.value(),
                    "photon: delivered a batch"
                );
            }
            Poll::Ready(Some(Ok(SubscriptionBatch::CaughtUp))) => {
                self.observe(&Poll::Ready(Some(Ok(SubscriptionItem::CaughtUp))));
            }
            Poll::Ready(Some(Err(e))) => self.end(Err(e)),
            Poll::Ready(None) => self.end(Ok(())),
        }
    }

    fn sample_lag(&self, recorded_at: Timestamp) {
        let micros = Timestamp::now().unix_micros() - recorded_at.unix_micros();
        let lag = Duration::from_micros(micros.max(0) as u64);
        Telemetry::histogram(&self.telemetry.lag_seconds, lag.as_secs_f64());
    }

    /// Records the subscription's end: its last item, or the error it ended with.
    pub(crate) fn end(&mut self, result: Result<(), &Error>) {
        let outcome = match result {
            Ok(()) => OUTCOMES[0],
            Err(e) => {
                self.telemetry.failed(e);
                error_outcome(e)
            }
        };
        if let Some(span) = self.catch_up.take() {
            // A Cold subscription's whole life is its catch-up.
            span.record("events", self.events);
            span.record("outcome", outcome);
        }
        self.span.record("events", self.events);
        self.span.record("bytes", self.bytes);
        self.span.record("outcome", outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use uuid::Uuid;

    use crate::version::Version;

    static LABELS: Labels = Labels::new("test");
    static TEST: Telemetry = Telemetry::new(&LABELS);

    /// What the recorder holds, as `(name, outcome label, value)`.
    fn recorded(snapshotter: &Snapshotter) -> Vec<(String, Option<String>, DebugValue)> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let outcome = key
                    .key()
                    .labels()
                    .find(|l| l.key() == "outcome")
                    .map(|l| l.value().to_owned());
                (key.key().name().to_owned(), outcome, value)
            })
            .collect()
    }

    fn counter(
        all: &[(String, Option<String>, DebugValue)],
        name: &str,
        outcome: Option<&str>,
    ) -> u64 {
        all.iter()
            .find_map(|(n, o, v)| match v {
                DebugValue::Counter(c) if n == name && o.as_deref() == outcome => Some(*c),
                _ => None,
            })
            .unwrap_or(0)
    }

    fn samples(all: &[(String, Option<String>, DebugValue)], name: &str) -> usize {
        all.iter()
            .find_map(|(n, _, v)| match v {
                DebugValue::Histogram(values) if n == name => Some(values.len()),
                _ => None,
            })
            .unwrap_or(0)
    }

    fn stream() -> StreamId {
        StreamId::parse("account-1").unwrap()
    }

    fn ok() -> Result<AppendResult, Error> {
        Ok(AppendResult {
            first_version: Version::FIRST,
            last_version: Version::FIRST,
            checkpoints: Vec::new(),
        })
    }

    #[tokio::test]
    async fn an_append_dropped_before_its_answer_is_counted_as_cancelled() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);
        let attempts = Attempts::default();
        let never = async {
            attempts.set(2);
            std::future::pending::<Result<AppendResult, Error>>().await
        };
        let probe = TEST.append(&stream(), &[]);
        let answer =
            tokio::time::timeout(Duration::from_millis(20), probe.run(never, &attempts)).await;
        assert!(answer.is_err(), "the append never answers");

        let all = recorded(&snapshotter);
        assert_eq!(counter(&all, APPENDS, Some("cancelled")), 1, "{all:?}");
        assert_eq!(samples(&all, APPEND_SECONDS), 1, "{all:?}");
        assert_eq!(
            counter(&all, RETRIES, None),
            1,
            "its second attempt: {all:?}"
        );
        assert_eq!(counter(&all, APPENDED_EVENTS, None), 0, "{all:?}");
    }

    #[test]
    fn a_probe_dropped_unfinished_is_counted_as_cancelled_once() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);
        drop(TEST.append(&stream(), &[]));
        let finished = TEST.append(&stream(), &[]);
        finished.finish(&ok(), 1);

        let all = recorded(&snapshotter);
        assert_eq!(counter(&all, APPENDS, Some("cancelled")), 1, "{all:?}");
        assert_eq!(counter(&all, APPENDS, Some("ok")), 1, "{all:?}");
        assert_eq!(samples(&all, APPEND_SECONDS), 2, "{all:?}");
    }

    #[test]
    fn a_reused_event_id_is_invalid_not_a_conflict() {
        let reused = Err::<AppendResult, _>(Error::IdempotencyConflict {
            stream: stream(),
            event_id: Uuid::nil(),
            version: Version::FIRST,
        });
        assert_eq!(outcome(&reused), "invalid");

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);
        TEST.append(&stream(), &[]).finish(&reused, 1);
        let all = recorded(&snapshotter);
        assert_eq!(counter(&all, APPENDS, Some("invalid")), 1, "{all:?}");
        assert_eq!(counter(&all, CONFLICTS, None), 0, "{all:?}");
    }

    #[test]
    fn a_refused_credential_is_denied_not_an_error() {
        let refused = Err::<AppendResult, _>(Error::access_denied(
            "kafka",
            crate::AccessKind::Authorization,
            "appending to account-7",
            "TOPIC_AUTHORIZATION_FAILED",
        ));
        assert_eq!(outcome(&refused), "denied");

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);
        TEST.append(&stream(), &[]).finish(&refused, 1);
        let all = recorded(&snapshotter);
        assert_eq!(counter(&all, APPENDS, Some("denied")), 1, "{all:?}");
        assert_eq!(counter(&all, APPENDS, Some("error")), 0, "{all:?}");
    }

    /// An event recorded `ago` before now.
    fn recorded_ago(ago: Duration) -> RecordedEvent {
        let now = Timestamp::now().unix_micros();
        let at = Timestamp::from_unix_micros(now - ago.as_micros() as i64).unwrap();
        RecordedEvent {
            stream: stream(),
            version: Version::FIRST,
            event_id: Uuid::now_v7(),
            event_type: crate::EventType::new("Deposited").unwrap(),
            schema_version: 1,
            occurred_at: at,
            recorded_at: at,
            payload: crate::Payload::json(&1).unwrap(),
            metadata: crate::Metadata::default(),
            checkpoint: crate::Checkpoint::from_position("test", 0),
        }
    }

    #[test]
    fn a_batched_subscription_samples_lag_from_a_batch_s_first_event() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);
        let mut traced = SubscriptionTelemetry::new(
            &TEST,
            &Selector::All,
            &Start::Beginning,
            SubscriptionMode::HotCold,
        );
        let batch = |n: usize| {
            // The first event is old, the rest new: which one was sampled shows in the value.
            let mut events = vec![recorded_ago(Duration::from_secs(100))];
            events.extend((1..n).map(|_| recorded_ago(Duration::ZERO)));
            Poll::Ready(Some(Ok(SubscriptionBatch::Events(events))))
        };
        traced.observe_batch(&batch(300)); // the first batch: sampled
        traced.observe_batch(&batch(100)); // 300 to 400, no multiple of 256 passed: not
        traced.observe_batch(&Poll::Pending);
        traced.observe_batch(&batch(1)); // after a wait: sampled
        traced.observe_batch(&batch(200)); // 401 to 601 passes 512: sampled
        traced.observe_batch(&Poll::Ready(None));

        let all = recorded(&snapshotter);
        let lags: Vec<f64> = all
            .iter()
            .find_map(|(n, _, v)| match v {
                DebugValue::Histogram(values) if n == SUBSCRIPTION_LAG_SECONDS => {
                    Some(values.iter().map(|v| v.into_inner()).collect())
                }
                _ => None,
            })
            .unwrap_or_default();
        assert_eq!(lags.len(), 3, "{lags:?}");
        assert!(
            lags.iter().all(|lag| *lag >= 99.0),
            "each sample is a first event's: {lags:?}"
        );
        assert_eq!((traced.events, traced.bytes), (601, 601));
    }
}
