//! Views (projections) and the runner that feeds them.
//!
//! A view reads category streams from the store, never from an in-process callback, so a crash
//! between an append and a view update loses nothing: the view resumes from its saved checkpoint
//! and the store still has the event. The runner saves the checkpoint *after* handling, together
//! with the view's state, so a restart neither skips nor (for state kept by the runner) repeats.
//! An event the handler refuses stops the view, unless the view's [`FailurePolicy`] (module
//! `failure`) retries, skips or parks it; typed views (module `typed_view`) run here as `View`s.

// `ViewError` carries the store's error unboxed so callers can match on it; errors are the cold
// path, so their size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{select_all, StreamExt};
use photon_api::{
    BoxError, Category, Checkpoint, Error, EventData, EventStore, ExpectedVersion, RecordedEvent,
    Selector, Start, StreamId, SubscriptionBatch, SubscriptionMode, Timestamp, Uuid, Version,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify, RwLock};

use crate::checkpoint_store::{CheckpointStore, SavedView};
use crate::failure::{
    dead_letter_id, dead_letter_stream, DeadLetter, FailurePolicy, OnFailure,
    DEAD_LETTER_EVENT_TYPE,
};

/// A read model built from events of one or more categories.
///
/// `State` is owned by the runner, saved with the checkpoint (MessagePack) and readable through
/// the [`ViewHandle`]. A view that writes to its own database instead keeps `State = ()` and
/// makes `handle` idempotent (by event id or stream version), since delivery is at-least-once
/// for effects outside the runner.
#[async_trait]
pub trait View: Send + Sync + 'static {
    /// The state the view builds.
    type State: Default + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Unique name including its version, e.g. `balances-v2`: the key of its checkpoint, so two
    /// versions of one view run side by side with separate positions. Allowed characters are
    /// those of a stream id (letters, digits, `_ - . : @`).
    fn name(&self) -> &str;

    /// The categories it reads.
    fn categories(&self) -> Vec<Category>;

    /// What an event `handle` refuses does: retried with backoff, then the view stops, skips it
    /// or parks it in its dead-letter stream. Read once when the view starts. The default stops
    /// the view at the first refusal, so nothing is passed over without a decision.
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::default()
    }

    /// Applies one event to the state. The runner holds the state's write lock meanwhile, so
    /// readers wait, and `handle` must not read this view through its own handle.
    ///
    /// # Errors
    /// - Any error is a refusal, dealt with by [`Self::failure_policy`]. Under the default it
    ///   stops the view (status `Failed`) without saving past this event, so after a fix and a
    ///   restart it is handled again from the last save. The in-memory state may show part of
    ///   the failed event's effect until then, and keeps it (saved) when the event is skipped or
    ///   parked; make `handle` change the state only once it cannot fail any more (decode first,
    ///   then mutate). A retry calls `handle` again on that same state.
    /// - A [`photon_api::Error::Decode`], [`Error::UnknownSchemaVersion`] or [`Error::Upcast`]
    ///   returned as is (e.g. by `event.decode()?`) is a [`ViewError::Decode`]: not retried,
    ///   since the stored event never changes.
    async fn handle(&self, state: &mut Self::State, event: &RecordedEvent) -> Result<(), BoxError>;
}

/// Where a view is.
#[derive(Clone, Debug)]
pub enum ViewStatus {
    /// Loading its checkpoint.
    Starting,
    /// Replaying history (at start or during a rebuild).
    Replaying,
    /// Caught up with every category; handling live events.
    Live,
    /// Stopped by an error; restarting resumes from the last save.
    Failed(Arc<ViewError>),
    /// Stopped on request.
    Stopped,
}

/// Why a view stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The view's `handle` refused an event.
    #[error("view {view}: handler failed on {stream}@{version}: {source}")]
    Handler {
        /// The view.
        view: String,
        /// The event's stream.
        stream: StreamId,
        /// The event's version.
        version: Version,
        /// The handler's error.
        #[source]
        source: BoxError,
    },
    /// A stored event does not read as the view's event type: undecodable bytes, an unknown
    /// (newer) schema version, or a failing upcaster. The error names the stream and version.
    #[error("view {view}: {source}")]
    Decode {
        /// The view.
        view: String,
        /// [`Error::Decode`], [`Error::UnknownSchemaVersion`] or [`Error::Upcast`].
        #[source]
        source: Error,
    },
    /// The policy said park, and the dead-letter record could not be stored: the view stops
    /// without saving past the event, so nothing is passed over unrecorded.
    #[error("view {view}: could not park {stream}@{version} in {dead_letters}: {source}")]
    Park {
        /// The view.
        view: String,
        /// The refused event's stream.
        stream: StreamId,
        /// The refused event's version.
        version: Version,
        /// The dead-letter stream.
        dead_letters: StreamId,
        /// The store's error.
        #[source]
        source: Error,
    },
    /// The event or checkpoint store failed.
    #[error("view {view}: {source}")]
    Store {
        /// The view.
        view: String,
        /// The store's error.
        #[source]
        source: Error,
    },
    /// Another runner of the same view saved since this one loaded: two processes run the view.
    /// This one stops so that only one writes the view's state.
    #[error("view {view}: another runner saved this view (expected revision {expected:?}, found {actual:?}); stopping this one")]
    Fenced {
        /// The view.
        view: String,
        /// The revision this runner last saw.
        expected: Option<u64>,
        /// The revision found.
        actual: Option<u64>,
    },
    /// The saved state does not decode as the view's `State` (its shape changed: give the new
    /// shape a new view name, or rebuild).
    #[error("view {view}: saved state does not decode: {reason}")]
    State {
        /// The view.
        view: String,
        /// What the decoder said.
        reason: String,
    },
    /// The view failed earlier.
    #[error("view {view} failed: {reason}")]
    Failed {
        /// The view.
        view: String,
        /// The failure.
        reason: String,
    },
    /// The view was stopped.
    #[error("view {view} is stopped")]
    Stopped {
        /// The view.
        view: String,
    },
}

/// Tuning of a [`ViewRunner`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunnerOptions {
    /// Save after this many handled events at the latest.
    pub save_every: usize,
    /// Save this long after the first unsaved event at the latest, when events trickle in. Also
    /// how often the view's lag is refreshed while a handler is at an event.
    pub save_interval: Duration,
    /// Wait before resubscribing after a retryable store error.
    pub retry_delay: Duration,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            save_every: 500,
            save_interval: Duration::from_millis(500),
            retry_delay: Duration::from_millis(500),
        }
    }
}

/// Starts views: each in its own task, fed HotCold from its categories, with its checkpoint kept
/// in a [`CheckpointStore`].
#[derive(Clone)]
pub struct ViewRunner {
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    options: RunnerOptions,
}

impl fmt::Debug for ViewRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewRunner")
            .field("store", &self.store.backend())
            .field("checkpoints", &self.checkpoints)
            .field("options", &self.options)
            .finish()
    }
}

enum Control {
    Rebuild(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
    Detach,
}

struct Shared<S> {
    state: RwLock<S>,
    handled: AtomicU64,
    /// Refused events passed over under [`OnFailure::Skip`].
    skipped: AtomicU64,
    /// Refused events sent to the dead-letter stream under [`OnFailure::Park`].
    parked: AtomicU64,
    /// The view's lag in microseconds, as [`ViewHandle::lag`] says it; written only under
    /// `lag`'s lock, read without it.
    lag_micros: AtomicU64,
    /// What the lag is measured from, shared by the task and its lag refresher.
    lag: Mutex<LagMeter>,
    /// Woken after every handled event, for [`ViewHandle::wait_until`].
    progress: Notify,
}

/// The view's lag gauge and the event in hand. One lock for both writers (the task handling
/// events and the refresher ticking beside it), so a refresh that read an event in hand cannot
/// land after the task has moved on and overwrite a newer value (or the 0 of a catch-up).
struct LagMeter {
    gauge: metrics::Gauge,
    /// When the event being handled was recorded (Unix microseconds), while one is.
    in_hand: Option<i64>,
}

impl<S> Shared<S> {
    fn meter(&self) -> std::sync::MutexGuard<'_, LagMeter> {
        // The lock guards no invariant a panic could break: a value is always whole.
        self.lag.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_lag(&self, meter: &LagMeter, micros: u64) {
        self.lag_micros.store(micros, Ordering::Relaxed);
        meter.gauge.set(micros as f64 / 1e6);
    }

    /// The view starts handling an event recorded at `recorded_at`.
    fn handling(&self, recorded_at: Timestamp) {
        self.meter().in_hand = Some(recorded_at.unix_micros());
    }

    /// The event in hand is handled: the lag is how long ago it was recorded.
    fn handled(&self, recorded_at: Timestamp) {
        let mut meter = self.meter();
        meter.in_hand = None;
        self.set_lag(&meter, age_micros(recorded_at.unix_micros()));
    }

    /// The view has caught up with every category: nothing in hand, no lag.
    fn caught_up(&self) {
        let mut meter = self.meter();
        meter.in_hand = None;
        self.set_lag(&meter, 0);
    }

    /// While an event is in hand (a slow or stuck handler), the lag is how long ago it was
    /// recorded, as of now, not of the last event handled.
    fn refresh_lag(&self) {
        let meter = self.meter();
        if let Some(recorded_at) = meter.in_hand {
            self.set_lag(&meter, age_micros(recorded_at));
        }
    }
}

/// Microseconds since `recorded_at` (Unix microseconds); 0 for a clock behind the store's.
fn age_micros(recorded_at: i64) -> u64 {
    (Timestamp::now().unix_micros() - recorded_at).max(0) as u64
}

/// Refreshes the view's lag every `every` while its task runs, so a handler that takes long, or
/// never returns, shows as a growing lag instead of the last healthy value. A task of its own:
/// the view's task is inside the handler meanwhile.
async fn refresh_lag<S: Send + Sync + 'static>(shared: Arc<Shared<S>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.refresh_lag();
    }
}

/// Ends the lag refresher with the subscription loop it watches.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running view: read its state, watch its status, rebuild or stop it. Clones share the view;
/// when the last one is dropped the view saves and stops, unless it was [detached](Self::detach).
#[must_use = "dropping every handle of a view stops it; keep one, or call detach()"]
pub struct ViewHandle<V: View> {
    name: Arc<str>,
    shared: Arc<Shared<V::State>>,
    control: mpsc::Sender<Control>,
    status: watch::Receiver<ViewStatus>,
}

impl<V: View> Clone for ViewHandle<V> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            shared: self.shared.clone(),
            control: self.control.clone(),
            status: self.status.clone(),
        }
    }
}

impl<V: View> fmt::Debug for ViewHandle<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ViewHandle")
            .field("name", &self.name)
            .field("status", &*self.status.borrow())
            .field("handled", &self.handled())
            .field("skipped", &self.skipped())
            .field("parked", &self.parked())
            .finish()
    }
}

impl ViewRunner {
    /// A runner reading `store` and keeping checkpoints in `checkpoints`.
    pub fn new(store: Arc<dyn EventStore>, checkpoints: Arc<dyn CheckpointStore>) -> Self {
        Self {
            store,
            checkpoints,
            options: RunnerOptions::default(),
        }
    }

    /// Replaces the tuning.
    pub fn with_options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// Starts `view` in a task: loads its saved state and checkpoint (or starts from the
    /// beginning), replays, then follows live events. Returns at once; use
    /// [`ViewHandle::wait_until_live`] to wait for the replay.
    ///
    /// # Errors
    /// - [`ViewError::Store`] with [`Error::InvalidInput`] when the view reads no category or its
    ///   name is not usable as a checkpoint key.
    pub fn start<V: View>(&self, view: V) -> Result<ViewHandle<V>, ViewError> {
        let name: Arc<str> = Arc::from(view.name());
        let invalid = |reason: &str| ViewError::Store {
            view: name.to_string(),
            source: Error::InvalidInput {
                what: format!("view {name:?}"),
                reason: reason.to_owned(),
            },
        };
        if view.categories().is_empty() {
            return Err(invalid("reads no category"));
        }
        let checkpoint_key = Category::new(crate::checkpoint_store::CHECKPOINT_CATEGORY)
            .and_then(|c| StreamId::new(&c, &*name));
        if let Err(Error::InvalidInput { reason, .. }) = checkpoint_key {
            return Err(invalid(&format!(
                "name is not a valid checkpoint key: {reason}"
            )));
        }
        let policy = view.failure_policy();
        // Checked now rather than at the first refusal, which may come after days of running.
        let dead_letters = match policy.then {
            OnFailure::Park => match dead_letter_stream(&name) {
                Ok(stream) => Some(stream),
                Err(e) => {
                    return Err(invalid(&format!(
                        "name is not usable as a dead-letter stream: {e}"
                    )))
                }
            },
            _ => None,
        };
        let shared = Arc::new(Shared {
            state: RwLock::new(V::State::default()),
            handled: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            lag_micros: AtomicU64::new(0),
            lag: Mutex::new(LagMeter {
                gauge: metrics::Gauge::noop(),
                in_hand: None,
            }),
            progress: Notify::new(),
        });
        let (control_tx, control_rx) = mpsc::channel(8);
        let (status_tx, status_rx) = watch::channel(ViewStatus::Starting);
        let task = Task {
            view,
            name: name.clone(),
            shared: shared.clone(),
            store: self.store.clone(),
            checkpoints: self.checkpoints.clone(),
            options: self.options,
            policy,
            dead_letters,
            status: status_tx,
            revision: None,
            positions: BTreeMap::new(),
            unsaved: 0,
            waiting_rebuilds: Vec::new(),
            detached: false,
        };
        tokio::spawn(task.run(control_rx));
        Ok(ViewHandle {
            name,
            shared,
            control: control_tx,
            status: status_rx,
        })
    }
}

impl<V: View> ViewHandle<V> {
    /// The view's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads the state; the runner waits while `f` runs, so keep it short.
    pub async fn read<R>(&self, f: impl FnOnce(&V::State) -> R) -> R {
        f(&*self.shared.state.read().await)
    }

    /// The current status.
    pub fn status(&self) -> ViewStatus {
        self.status.borrow().clone()
    }

    /// Events handled since the task started (rebuilds included); skipped and parked events
    /// are not among them.
    pub fn handled(&self) -> u64 {
        self.shared.handled.load(Ordering::Relaxed)
    }

    /// Refused events this view passed over since the task started ([`OnFailure::Skip`]); each
    /// is also logged as a warning. An event skipped again after a restart from an older
    /// checkpoint counts again.
    pub fn skipped(&self) -> u64 {
        self.shared.skipped.load(Ordering::Relaxed)
    }

    /// Refused events this view sent to its dead-letter stream since the task started
    /// ([`OnFailure::Park`]). An event parked again after a restart from an older checkpoint
    /// counts again, though the store keeps one record of it (its id is derived from the view's
    /// name and the event's id: [`crate::dead_letter_id`]).
    pub fn parked(&self) -> u64 {
        self.shared.parked.load(Ordering::Relaxed)
    }

    /// How far behind the head the view is in time: how long ago its last handled event was
    /// recorded, as of when the view handled it (zero when it has just caught up), or, while a
    /// handler is still at an event, how long ago that event was recorded, refreshed every
    /// [`RunnerOptions::save_interval`] so a stuck handler shows. Large while replaying, small
    /// when live; also exported as the `newton_view_lag_seconds` gauge.
    ///
    /// What it cannot see: events the store holds but has not delivered to the view (a reader
    /// held back, a slow subscription) leave it at its last value; and once the view stops or
    /// fails, the gauge keeps its last value (the `metrics` facade cannot remove a series), so
    /// alert on the view's status too.
    pub fn lag(&self) -> Duration {
        Duration::from_micros(self.shared.lag_micros.load(Ordering::Relaxed))
    }

    /// Waits until the view has caught up with every category.
    ///
    /// # Errors
    /// - [`ViewError::Failed`] or [`ViewError::Stopped`] when the view ends first.
    pub async fn wait_until_live(&self) -> Result<(), ViewError> {
        let mut status = self.status.clone();
        loop {
            let current = status.borrow_and_update().clone();
            if let ViewStatus::Live = current {
                return Ok(());
            }
            self.ended(&current)?;
            if status.changed().await.is_err() {
                return Err(self.stopped());
            }
        }
    }

    /// Waits until `condition` holds for the state, re-checking after every handled event; for
    /// "read your own writes" after a command, e.g. until an account shows a deposit.
    ///
    /// # Errors
    /// - [`ViewError::Failed`] or [`ViewError::Stopped`] when the view ends first.
    pub async fn wait_until(
        &self,
        mut condition: impl FnMut(&V::State) -> bool,
    ) -> Result<(), ViewError> {
        let mut status = self.status.clone();
        loop {
            // Registered before the check, so an event handled in between still wakes us.
            let progress = self.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if condition(&*self.shared.state.read().await) {
                return Ok(());
            }
            let current = status.borrow_and_update().clone();
            self.ended(&current)?;
            tokio::select! {
                _ = progress => {}
                changed = status.changed() => if changed.is_err() { return Err(self.stopped()) },
            }
        }
    }

    /// Throws the state away and replays every category from the beginning; returns once the
    /// view is live again. Readers see the state being rebuilt meanwhile; to keep serving the old
    /// state, start the new version under a new name beside the old one instead.
    ///
    /// # Errors
    /// - [`ViewError::Failed`] or [`ViewError::Stopped`] when the view ends first.
    pub async fn rebuild(&self) -> Result<(), ViewError> {
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::Rebuild(ack))
            .await
            .map_err(|_| self.stopped())?;
        match done.await {
            Ok(()) => Ok(()),
            Err(_) => self.wait_until_live().await,
        }
    }

    /// Lets the view run on when every handle is dropped (by default that stops it), e.g. for a
    /// view whose state lives in its own database and is never read through a handle. It then
    /// runs until the process ends or it fails.
    pub async fn detach(self) {
        let _ = self.control.send(Control::Detach).await;
    }

    /// Saves the checkpoint and stops the view.
    ///
    /// # Errors
    /// - [`ViewError::Stopped`] when it had already stopped.
    pub async fn stop(&self) -> Result<(), ViewError> {
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::Stop(ack))
            .await
            .map_err(|_| self.stopped())?;
        done.await.map_err(|_| self.stopped())
    }

    /// The error for a status in which the view no longer runs.
    fn ended(&self, status: &ViewStatus) -> Result<(), ViewError> {
        match status {
            ViewStatus::Failed(e) => Err(ViewError::Failed {
                view: self.name.to_string(),
                reason: e.to_string(),
            }),
            ViewStatus::Stopped => Err(self.stopped()),
            ViewStatus::Starting | ViewStatus::Replaying | ViewStatus::Live => Ok(()),
        }
    }

    fn stopped(&self) -> ViewError {
        ViewError::Stopped {
            view: self.name.to_string(),
        }
    }
}

struct Task<V: View> {
    view: V,
    name: Arc<str>,
    shared: Arc<Shared<V::State>>,
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    options: RunnerOptions,
    policy: FailurePolicy,
    /// The dead-letter stream, when the policy parks.
    dead_letters: Option<StreamId>,
    status: watch::Sender<ViewStatus>,
    revision: Option<u64>,
    positions: BTreeMap<String, Checkpoint>,
    unsaved: usize,
    waiting_rebuilds: Vec<oneshot::Sender<()>>,
    /// Keeps running when every handle is dropped.
    detached: bool,
}

/// Attempts of one checkpoint save when the checkpoint store is unavailable.
const SAVE_ATTEMPTS: u32 = 10;

/// The largest batch a view asks its subscriptions for: enough that a replay pays the
/// subscription's per-poll cost rarely, few enough that a command (stop, rebuild) or a save
/// tick, read between batches, waits for at most that many events to be handled.
const VIEW_BATCH: usize = 64;

/// Why the inner loop of a task returned.
enum Next {
    Resubscribe,
    Stop,
}

impl<V: View> Task<V> {
    async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        let outcome = self.run_inner(&mut control).await;
        let status = match outcome {
            Ok(()) => ViewStatus::Stopped,
            Err(e) => {
                tracing::error!(view = %self.name, error = %e, "view failed");
                ViewStatus::Failed(Arc::new(e))
            }
        };
        self.status.send_replace(status);
    }

    fn store_error(&self, source: Error) -> ViewError {
        ViewError::Store {
            view: self.name.to_string(),
            source,
        }
    }

    async fn run_inner(&mut self, control: &mut mpsc::Receiver<Control>) -> Result<(), ViewError> {
        if let Some(loaded) = self
            .checkpoints
            .load(&self.name)
            .await
            .map_err(|e| self.store_error(e))?
        {
            let state: V::State =
                rmp_serde::from_slice(&loaded.saved.state).map_err(|e| ViewError::State {
                    view: self.name.to_string(),
                    reason: e.to_string(),
                })?;
            *self.shared.state.write().await = state;
            self.positions = loaded.saved.positions;
            self.revision = Some(loaded.revision);
        }
        loop {
            match self.follow(control).await? {
                Next::Resubscribe => continue,
                Next::Stop => {
                    self.save().await?;
                    return Ok(());
                }
            }
        }
    }

    /// Subscribes to every category from the saved positions and handles events until a rebuild,
    /// a retryable error (both resubscribe) or a stop.
    async fn follow(&mut self, control: &mut mpsc::Receiver<Control>) -> Result<Next, ViewError> {
        self.status.send_replace(ViewStatus::Replaying);
        let categories = self.view.categories();
        let subscriptions = categories.iter().map(|category| {
            let start = match self.positions.get(category.as_str()) {
                Some(c) => Start::After(c.clone()),
                None => Start::Beginning,
            };
            // A live subscription never ends; if one does (a backend dropped it), say so as a
            // retryable error, so the view resubscribes instead of silently losing a category.
            let ended = Error::Unavailable {
                backend: self.store.backend(),
                message: format!("the subscription to category {category} ended"),
                source: None,
            };
            // In batches: a replay then pays per batch, not per event, for the subscription's
            // layers; commands are read between batches.
            self.store
                .subscribe_batches(
                    Selector::Category(category.clone()),
                    start,
                    SubscriptionMode::HotCold,
                    VIEW_BATCH,
                )
                .chain(futures::stream::iter([Err(ended)]))
        });
        let mut merged = select_all(subscriptions);
        let mut caught_up = 0;
        self.shared.meter().gauge = photon_api::telemetry::view_lag_gauge(&self.name);
        let _refresher = AbortOnDrop(tokio::spawn(refresh_lag(
            self.shared.clone(),
            self.options.save_interval,
        )));
        let mut tick = tokio::time::interval(self.options.save_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = control.recv(), if !self.detached => {
                    if let Some(next) = self.command(command).await? {
                        return Ok(next);
                    }
                }
                item = merged.next() => match item {
                    Some(Ok(SubscriptionBatch::Events(events))) => {
                        for event in &events {
                            self.shared.handling(event.recorded_at);
                            if let Some(next) = self.handle(event, control).await? {
                                return Ok(next);
                            }
                            self.shared.handled(event.recorded_at);
                            if self.unsaved >= self.options.save_every {
                                self.save().await?;
                            }
                        }
                    }
                    Some(Ok(SubscriptionBatch::CaughtUp)) => {
                        caught_up += 1;
                        if caught_up == categories.len() {
                            self.save().await?;
                            self.status.send_replace(ViewStatus::Live);
                            self.shared.caught_up();
                            for ack in self.waiting_rebuilds.drain(..) {
                                let _ = ack.send(());
                            }
                        }
                    }
                    Some(Err(e)) if e.is_retryable() => {
                        tracing::warn!(view = %self.name, error = %e, "store unavailable; resubscribing");
                        tokio::time::sleep(self.options.retry_delay).await;
                        return Ok(Next::Resubscribe);
                    }
                    Some(Err(e)) => return Err(self.store_error(e)),
                    None => unreachable!("each subscription ends with an error item first"),
                },
                _ = tick.tick(), if self.unsaved > 0 => self.save().await?,
            }
        }
    }

    /// Carries out a command from a handle; `Some` when the subscription loop must end.
    async fn command(&mut self, command: Option<Control>) -> Result<Option<Next>, ViewError> {
        match command {
            Some(Control::Rebuild(ack)) => {
                tracing::info!(view = %self.name, "rebuilding from the beginning");
                *self.shared.state.write().await = V::State::default();
                self.positions.clear();
                // Saved at the first save point, so a crash mid-rebuild resumes the old
                // state consistently with its old checkpoint.
                self.unsaved = 1;
                self.waiting_rebuilds.push(ack);
                Ok(Some(Next::Resubscribe))
            }
            Some(Control::Stop(ack)) => {
                self.save().await?;
                let _ = ack.send(());
                Ok(Some(Next::Stop))
            }
            Some(Control::Detach) => {
                self.detached = true;
                Ok(None)
            }
            None => Ok(Some(Next::Stop)),
        }
    }

    /// Hands `event` to the view under its failure policy. `Some` when a command from a handle
    /// (stop, rebuild, every handle dropped) came while a refusal waited for its retry: the event
    /// is then left as if never delivered (not saved past), and the loop ends as the command
    /// says, without waiting out the retries.
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        control: &mut mpsc::Receiver<Control>,
    ) -> Result<Option<Next>, ViewError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let refused = {
                // Taken per attempt, so readers get in between retries.
                let mut state = self.shared.state.write().await;
                self.view.handle(&mut state, event).await
            };
            let Err(source) = refused else {
                self.shared.handled.fetch_add(1, Ordering::Relaxed);
                break;
            };
            let error = self.refusal(event, source);
            let retry = self
                .policy
                .retry
                .filter(|r| attempts <= r.retries && !matches!(error, ViewError::Decode { .. }));
            if let Some(retry) = retry {
                let delay = retry.delay(attempts);
                tracing::warn!(
                    view = %self.name, error = %error, attempt = attempts, ?delay,
                    "view refused an event; retrying"
                );
                let wait = tokio::time::sleep(delay);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        () = &mut wait => break,
                        command = control.recv(), if !self.detached => {
                            if let Some(next) = self.command(command).await? {
                                return Ok(Some(next));
                            }
                        }
                    }
                }
                continue;
            }
            match self.policy.then {
                OnFailure::Skip => {
                    tracing::warn!(
                        view = %self.name, error = %error, attempts, event_id = %event.event_id,
                        "view refused an event; skipped"
                    );
                    self.shared.skipped.fetch_add(1, Ordering::Relaxed);
                }
                OnFailure::Park => {
                    self.park(event, &error, attempts).await?;
                    tracing::warn!(
                        view = %self.name, error = %error, attempts, event_id = %event.event_id,
                        "view refused an event; parked in its dead-letter stream"
                    );
                    self.shared.parked.fetch_add(1, Ordering::Relaxed);
                }
                OnFailure::Stop => return Err(error),
            }
            break;
        }
        // Overwrite in place: no allocation per event once a category has a position.
        match self.positions.get_mut(event.stream.category_name()) {
            Some(position) => position.clone_from(&event.checkpoint),
            None => {
                self.positions.insert(
                    event.stream.category_name().to_owned(),
                    event.checkpoint.clone(),
                );
            }
        }
        self.unsaved += 1;
        self.shared.progress.notify_waiters();
        Ok(None)
    }

    /// The typed error of a refusal: a decode or upcast failure returned as the store's error is
    /// [`ViewError::Decode`], anything else [`ViewError::Handler`].
    fn refusal(&self, event: &RecordedEvent, source: BoxError) -> ViewError {
        match source.downcast::<Error>() {
            Ok(e)
                if matches!(
                    *e,
                    Error::Decode { .. }
                        | Error::UnknownSchemaVersion { .. }
                        | Error::Upcast { .. }
                ) =>
            {
                ViewError::Decode {
                    view: self.name.to_string(),
                    source: *e,
                }
            }
            Ok(e) => self.handler_error(event, e),
            Err(source) => self.handler_error(event, source),
        }
    }

    fn handler_error(&self, event: &RecordedEvent, source: BoxError) -> ViewError {
        ViewError::Handler {
            view: self.name.to_string(),
            stream: event.stream.clone(),
            version: event.version,
            source,
        }
    }

    /// Appends the dead-letter record of `event`, with an id derived from the view's name and
    /// the event's id, so a redelivered event is stored once (the store answers the re-send as a
    /// retry). A retryable store error is retried as a checkpoint save is.
    async fn park(
        &self,
        event: &RecordedEvent,
        error: &ViewError,
        attempts: u32,
    ) -> Result<(), ViewError> {
        let stream = self
            .dead_letters
            .clone()
            .expect("a view that parks has its dead-letter stream from start");
        let failed = |source: Error| ViewError::Park {
            view: self.name.to_string(),
            stream: event.stream.clone(),
            version: event.version,
            dead_letters: stream.clone(),
            source,
        };
        let record = DeadLetter::new(&self.name, event, &error.to_string(), attempts);
        let mut data = EventData::json(DEAD_LETTER_EVENT_TYPE, &record)
            .map_err(failed)?
            .with_id(dead_letter_id(&self.name, event.event_id))
            .with_causation_id(event.event_id);
        if let Some(correlation_id) = event.metadata.correlation_id {
            data = data.with_correlation_id(correlation_id);
        }
        let mut attempt = 1;
        loop {
            match self
                .store
                .append(&stream, ExpectedVersion::Any, vec![data.clone()])
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < SAVE_ATTEMPTS => {
                    tracing::warn!(view = %self.name, error = %e, attempt, "dead-letter append failed; retrying");
                    tokio::time::sleep(self.options.retry_delay * attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(failed(e)),
            }
        }
    }

    async fn save(&mut self) -> Result<(), ViewError> {
        if self.unsaved == 0 {
            return Ok(());
        }
        let state = {
            let state = self.shared.state.read().await;
            rmp_serde::to_vec_named(&*state).map_err(|e| ViewError::State {
                view: self.name.to_string(),
                reason: format!("state does not encode: {e}"),
            })?
        };
        let saved = SavedView {
            positions: self.positions.clone(),
            state: Bytes::from(state),
        };
        // One id for this save across its retries: a re-sent save that had landed is a no-op.
        let save_id = Uuid::now_v7();
        let mut attempt = 1;
        let revision = loop {
            match self
                .checkpoints
                .save(&self.name, &saved, self.revision, save_id)
                .await
            {
                Ok(revision) => break revision,
                Err(e) if e.is_retryable() && attempt < SAVE_ATTEMPTS => {
                    tracing::warn!(view = %self.name, error = %e, attempt, "checkpoint save failed; retrying");
                    tokio::time::sleep(self.options.retry_delay * attempt).await;
                    attempt += 1;
                }
                Err(Error::WrongExpectedVersion { actual, .. }) => {
                    return Err(ViewError::Fenced {
                        view: self.name.to_string(),
                        expected: self.revision,
                        actual: actual.map(Version::value),
                    })
                }
                Err(e) => return Err(self.store_error(e)),
            }
        };
        self.revision = Some(revision);
        self.unsaved = 0;
        Ok(())
    }
}
