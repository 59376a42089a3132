//! Process managers: long-running business processes (a transfer, an order) that react to events
//! from categories and issue commands to repositories, and the runner that feeds them.
//!
//! This module owns the state of process instances, kept in the event store itself (one stream
//! per instance, `newton_process-<process>:<correlation id>`, whose last event is the whole
//! state), the position of each process in its categories (a [`CheckpointStore`] save, as views
//! keep theirs) and the deadlines still pending. It never writes an aggregate's stream except
//! through [`Repository::execute_once`], so every command it issues is idempotent.
//!
//! # Guarantees, and why they hold
//! - **A redelivered cause is skipped, a re-run step is not repeated.** The runner saves its
//!   position after handling, so a crash redelivers the events since the last save. Each
//!   instance records the ids of the events (and deadlines) it has handled in the same append as
//!   its new state, and skips them when they come again. A crash *inside* a handler, after some
//!   commands were stored but before the instance was saved, makes the handler run again from
//!   the state it last saved; its commands then carry the same ids ([`Steps::execute`] derives
//!   them from the causing event's id and the step's name), and the repository answers a
//!   command stored before with what it stored then instead of deciding again. This holds for
//!   the *same* cause handled again; the limits below are where it does not.
//! - **One instance at a time, in delivery order, within one runner.** One task handles every
//!   event and deadline of a process, one after another, so a handler never races another of
//!   the same runner for its instance. The order is each stream's (store guarantee 7); events of
//!   different streams or categories come in the order the subscriptions deliver them, which may
//!   differ between runs.
//! - **Deadlines survive restarts.** A deadline is saved with the instance's state; the runner
//!   keeps the pending ones with its checkpoint, and every instance changed after that save is
//!   revisited when its events are redelivered, so a restarted runner knows every deadline. A
//!   deadline fires at or after its time (never before), at least once; one replaced or cleared
//!   before it fired does not fire. A deadline a reaction sets is a new deadline even at the
//!   time of the one it replaces: set from [`ProcessManager::on_deadline`] at a time already
//!   past, it fires again at once.
//! - **A store outage delays a process, it does not stop it.** Retryable errors
//!   ([`Error::Unavailable`], and a step with an unknown outcome) are tried again without limit,
//!   from the state last saved, after [`ProcessOptions::retry_delay`] doubling up to
//!   [`MAX_RETRY_DELAY`]; the status says [`ProcessStatus::Retrying`] meanwhile. Any other
//!   error, or a panic in a handler, stops the process as [`ProcessStatus::Failed`].
//!
//! What a handler must do for this to hold: be deterministic for a given state, event and
//! command outcomes, give each command of one reaction its own step name, and keep its state
//! small (it is saved whole, as one event, after every event it handles).
//!
//! # Not covered
//! - **A command *refused* before a crash is decided again after it** (nothing of it was
//!   stored), on the aggregate's state then, and may now be accepted: see
//!   [`Repository::execute_once`]. A handler that refunds on a refused credit and then records
//!   the failure can move money twice: the credit refused (closed account), the refund stored,
//!   a crash before the instance's save, and the account opened before the restart: the credit
//!   is accepted the second time beside the refund. Likewise a step re-decided on another path
//!   (`complete` after a stored `fail`) can be refused by its aggregate, and the handler's error
//!   stops the process. A handler can guard against this itself (the bank example reads the
//!   transfer's recorded outcome before its legs and records a failure before refunding); the
//!   runner does not.
//! - **The order between a deadline and an event (or events of different categories) can flip
//!   across a restart.** A deadline that fired and ran its commands before a crash, with the
//!   instance not saved, may after the restart find the event that answers it replayed first
//!   (deadlines fire only after the replay): the deadline's effects stay and the other path runs
//!   too. So a deadline's effects are not "once" against the event it races.
//! - **Two runners of one process at once** (two nodes whose positions do not fence each other)
//!   skip a cause the other saved, and a step both run is stored once; but two runners handling
//!   *different* causes of one instance at one revision both run their commands before the
//!   loser's save fails (the loser then reloads and handles its cause again on the winner's
//!   state, which may take another path). Nothing stops both paths' effects. Run one runner per
//!   process; a shared checkpoint store stops the runner that saves its position second
//!   ([`ProcessError::Fenced`]), at that save, not before.
//! - **An instance remembers its last 1,024 handled causes.** A runner that replays an
//!   unfinished instance with more causes than that from the beginning (no position, or one
//!   older than them) handles the evicted ones again, as new causes.

// `ProcessError` carries the store's error unboxed so callers can match on it; errors are the
// cold path, so their size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{select_all, StreamExt};
use futures::FutureExt;
use futures::TryStreamExt;
use photon_api::{
    BoxError, Category, Checkpoint, Error, EventData, EventStore, ExpectedVersion, ReadOptions,
    RecordedEvent, Selector, Start, StreamId, SubscriptionItem, SubscriptionMode, Timestamp, Uuid,
    Version,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::aggregate::Aggregate;
use crate::checkpoint_store::{CheckpointStore, SavedView};
use crate::repository::{CommandContext, ExecuteError, Executed, Repository};
use crate::RESERVED_CATEGORY_PREFIX;

/// The category of the streams that keep process instances:
/// `newton_process-<process name>:<correlation id>`.
pub const PROCESS_CATEGORY: &str = "newton_process";

/// The event type of an instance's saved state.
const SAVED_TYPE: &str = "ProcessSaved";

/// Handled event ids an instance remembers. A redelivery after a crash only repeats the events
/// since the runner's last checkpoint save, at most [`ProcessOptions::save_every`] of all
/// instances together, so for that an instance needs to remember no more than that many; this
/// bound keeps a long-lived instance's saved state from growing without end. A runner that
/// replays from further back (no position) re-handles an unfinished instance's evicted causes.
const MAX_HANDLED: usize = 1024;

/// A process manager: reacts to events of one or more categories, per process instance (one
/// business conversation, keyed by a correlation id), with state of its own, by issuing commands
/// to repositories through [`Steps`].
///
/// The runner ([`ProcessRunner`]) keeps the state, the position and the deadlines; see the
/// module documentation for what it guarantees and what a handler must do for it.
#[async_trait]
pub trait ProcessManager: Send + Sync + 'static {
    /// The state of one instance, saved (MessagePack) after every event it handles.
    type State: Default + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Unique name including its version, e.g. `transfers-v1`: the key of its position and of
    /// its instances' streams. Allowed characters are those of a stream id (letters, digits,
    /// `_ - . : @`).
    fn name(&self) -> &str;

    /// The categories it reacts to.
    fn categories(&self) -> Vec<Category>;

    /// The instance an event belongs to, or None for an event of no instance (skipped). By
    /// default the event's correlation id, which [`Steps::execute`] stamps on every event its
    /// commands record, so a process can also react to the outcomes of its own commands.
    fn correlate(&self, event: &RecordedEvent) -> Option<Uuid> {
        event.metadata.correlation_id
    }

    /// Reacts to one event of the instance `steps.correlation_id()`.
    ///
    /// # Errors
    /// - An error after a command answered [`Error::Unavailable`] (an unknown outcome) or
    ///   [`ExecuteError::TooManyConflicts`] makes the runner handle the event again, from the
    ///   state saved before it, after [`ProcessOptions::retry_delay`] doubling up to
    ///   [`MAX_RETRY_DELAY`], for as long as it takes ([`ProcessStatus::Retrying`] meanwhile); the
    ///   steps stored the first time are not repeated. Any other error, or a panic, stops the
    ///   process ([`ProcessStatus::Failed`], with the panic's message) without saving the
    ///   instance; after a fix and a restart the event is handled again.
    async fn handle(
        &self,
        state: &mut Self::State,
        event: &RecordedEvent,
        steps: &mut Steps,
    ) -> Result<(), BoxError>;

    /// Reacts to the instance's deadline ([`Steps::set_deadline`]) having passed: the step it
    /// waited for did not answer in time. The deadline is cleared before this runs; set another
    /// to wait again. Does nothing by default.
    ///
    /// # Errors
    /// - As [`Self::handle`].
    async fn on_deadline(
        &self,
        state: &mut Self::State,
        steps: &mut Steps,
    ) -> Result<(), BoxError> {
        let _ = (state, steps);
        Ok(())
    }
}

/// What a handler may do for its instance: issue commands, set a deadline, finish it.
#[derive(Debug)]
pub struct Steps {
    process: Arc<str>,
    correlation_id: Uuid,
    cause_id: Uuid,
    deadline: Option<Timestamp>,
    /// The reaction set the deadline (not only kept the one it found): a new deadline, with a
    /// new number, even at the same time as before.
    deadline_set: bool,
    finished: bool,
    /// A command answered with an unknown outcome: a failing handler is retried, not stopped.
    unavailable: bool,
}

impl Steps {
    /// The instance: the correlation id its events share.
    pub fn correlation_id(&self) -> Uuid {
        self.correlation_id
    }

    /// The id of what this reaction is to: the event's id, or for a deadline an id derived from
    /// the instance and the deadline. The same on every redelivery.
    pub fn cause_id(&self) -> Uuid {
        self.cause_id
    }

    /// The id of the command this reaction issues as `step`: a UUID v5 of the process name and
    /// the step in the cause's id, so a redelivery issues the same command again.
    pub fn command_id(&self, step: &str) -> Uuid {
        Uuid::new_v5(
            &self.cause_id,
            format!("{}/{step}", self.process).as_bytes(),
        )
    }

    /// Executes `command` on instance `id` of `repository` as step `step` of this reaction,
    /// idempotently ([`Repository::execute_once`] with [`Self::command_id`]): if the step was
    /// stored before (the reaction runs again after a crash), nothing is stored and the answer
    /// is what it stored then. Its events carry the instance's correlation id, the cause as
    /// causation id, and the headers `newton-process` and `newton-step`.
    ///
    /// Give every command of one reaction its own step name: two commands under one name are one
    /// command to the store, and the second answers as the first.
    ///
    /// # Errors
    /// - As [`Repository::execute_once`]. After [`Error::Unavailable`] the step may have been
    ///   stored: return the error, and the runner handles the event again, which finds out.
    pub async fn execute<A: Aggregate>(
        &mut self,
        step: &str,
        repository: &Repository<A>,
        id: &str,
        command: &A::Command,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        let context = CommandContext {
            correlation_id: Some(self.correlation_id),
            causation_id: Some(self.cause_id),
            headers: vec![
                ("newton-process".into(), self.process.to_string()),
                ("newton-step".into(), step.to_owned()),
            ],
        };
        let outcome = repository
            .execute_once(id, command, self.command_id(step), &context)
            .await;
        // Worth handling the event again: the outcome is unknown (the step finds out), or other
        // writers kept winning (nothing was stored).
        match &outcome {
            Err(ExecuteError::Store(e)) => self.unavailable |= e.is_retryable(),
            Err(ExecuteError::TooManyConflicts { .. }) => self.unavailable = true,
            _ => {}
        }
        outcome
    }

    /// The instance's deadline, if one is set.
    pub fn deadline(&self) -> Option<Timestamp> {
        self.deadline
    }

    /// Sets the instance's deadline `after` from now, replacing any: if the instance is not
    /// finished by then, [`ProcessManager::on_deadline`] runs. Saved with the state, so it fires
    /// after a restart too.
    pub fn set_deadline(&mut self, after: Duration) {
        let micros = Timestamp::now()
            .unix_micros()
            .saturating_add(i64::try_from(after.as_micros()).unwrap_or(i64::MAX));
        self.deadline = Timestamp::from_unix_micros(micros);
        self.deadline_set = true;
    }

    /// Sets the instance's deadline at `at`, replacing any.
    pub fn set_deadline_at(&mut self, at: Timestamp) {
        self.deadline = Some(at);
        self.deadline_set = true;
    }

    /// Clears the instance's deadline: the step it waited for answered.
    pub fn clear_deadline(&mut self) {
        self.deadline = None;
        self.deadline_set = false;
    }

    /// Ends the instance: its deadline is cleared and later events of it are skipped.
    pub fn finish(&mut self) {
        self.finished = true;
        self.deadline = None;
        self.deadline_set = false;
    }

    /// Whether [`Self::finish`] was called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

/// A process instance as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance<S> {
    /// Its state.
    pub state: S,
    /// Whether it finished ([`Steps::finish`]).
    pub finished: bool,
    /// Its pending deadline.
    pub deadline: Option<Timestamp>,
    /// The version of its stream's last event: how many times it was saved, minus one.
    pub revision: Version,
}

/// An instance's saved record: the last event of its stream.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    /// The state, MessagePack.
    state: Bytes,
    /// Causes handled, oldest first, at most [`MAX_HANDLED`].
    handled: VecDeque<Uuid>,
    deadline: Option<Deadline>,
    /// Deadlines set so far: names each one, so one replaced is told apart from its successor.
    deadlines_set: u64,
    finished: bool,
}

/// A pending deadline: when, and which one of the instance's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Deadline {
    /// Unix microseconds.
    at: i64,
    /// Its number among the instance's deadlines.
    seq: u64,
}

/// The runner's own state, saved with its position: the deadlines pending, per instance.
#[derive(Default, Serialize, Deserialize)]
struct Pending {
    deadlines: BTreeMap<Uuid, Deadline>,
}

/// Where a process is.
#[derive(Clone, Debug)]
pub enum ProcessStatus {
    /// Loading its position.
    Starting,
    /// Handling the events stored before it started (or since its last save).
    Replaying,
    /// Caught up with every category; handling live events and deadlines.
    Live,
    /// The store (or the checkpoint store) is unavailable: the runner retries what it was doing,
    /// from the state last saved, with a backoff capped at [`MAX_RETRY_DELAY`], for as long as it
    /// takes, and then goes back to [`Self::Replaying`] or [`Self::Live`]. Holds the last error.
    Retrying(Arc<ProcessError>),
    /// Stopped by an error; restarting resumes from the last save.
    Failed(Arc<ProcessError>),
    /// Stopped on request, or because every handle was dropped.
    Stopped,
}

/// Why a process stopped or could not start, or an instance could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The handler failed on an event (`version` is its version in `stream`) or on a deadline
    /// (`stream` is the instance's, `version` its last save).
    #[error("process {process}: handler failed on {stream}@{version}: {source}")]
    Handler {
        /// The process.
        process: String,
        /// The event's stream, or the instance's for a deadline.
        stream: StreamId,
        /// The event's version, or the instance's last save for a deadline.
        version: Version,
        /// The handler's error.
        #[source]
        source: BoxError,
    },
    /// The event store or checkpoint store failed, or the process's name or categories are not
    /// usable ([`Error::InvalidInput`]).
    #[error("process {process}: {source}")]
    Store {
        /// The process.
        process: String,
        /// The store's error.
        #[source]
        source: Error,
    },
    /// Another runner of the same process saved its position since this one loaded it: two
    /// processes run it. This one stops.
    #[error("process {process}: another runner saved this process (expected revision {expected:?}, found {actual:?}); stopping this one")]
    Fenced {
        /// The process.
        process: String,
        /// The revision this runner last saw.
        expected: Option<u64>,
        /// The revision found.
        actual: Option<u64>,
    },
    /// A saved instance or position does not decode (the state's shape changed: give the new
    /// shape a new process name).
    #[error("process {process}: saved state of {stream} does not decode: {reason}")]
    State {
        /// The process.
        process: String,
        /// The stream it was read from.
        stream: StreamId,
        /// What the decoder said.
        reason: String,
    },
    /// The process failed earlier.
    #[error("process {process} failed: {reason}")]
    Failed {
        /// The process.
        process: String,
        /// The failure.
        reason: String,
    },
    /// The process was stopped.
    #[error("process {process} is stopped")]
    Stopped {
        /// The process.
        process: String,
    },
}

/// The longest wait between two tries after a retryable store error
/// ([`ProcessOptions::retry_delay`] doubles up to this, or stays at `retry_delay` if that is longer).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The wait before try `attempt` (1-based) after a retryable error.
fn retry_backoff(options: &ProcessOptions, attempt: u32) -> Duration {
    let doubled = options
        .retry_delay
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    doubled.min(MAX_RETRY_DELAY.max(options.retry_delay))
}

/// What a panic carried, as text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with no message".to_owned()
    }
}

/// How often [`ProcessHandle::wait_until_finished`] reads the instance when nothing woke it.
pub const FINISHED_POLL: Duration = Duration::from_secs(1);

/// Tuning of a [`ProcessRunner`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessOptions {
    /// Save the position after this many handled events at the latest. A restart redelivers
    /// at most this many events, which the instances then skip.
    pub save_every: usize,
    /// Save the position this long after the first unsaved event at the latest.
    pub save_interval: Duration,
    /// The first wait before trying again after a retryable store error (a load, a save, a step
    /// with an unknown outcome, a subscription); it doubles on each try, up to
    /// [`MAX_RETRY_DELAY`]. Retryable errors are retried without limit.
    pub retry_delay: Duration,
    /// Times an instance is reloaded and its cause handled again after its save lost to another
    /// runner's save of the same instance, before the process stops as failed.
    pub max_retries: u32,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        Self {
            save_every: 100,
            save_interval: Duration::from_millis(500),
            retry_delay: Duration::from_millis(500),
            max_retries: 10,
        }
    }
}

/// Starts process managers: each in its own task, fed HotCold from its categories, with its
/// position (and its pending deadlines) kept in a [`CheckpointStore`] under the key
/// `process:<name>`, and its instances in the event store.
#[derive(Clone)]
pub struct ProcessRunner {
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    options: ProcessOptions,
}

impl fmt::Debug for ProcessRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessRunner")
            .field("store", &self.store.backend())
            .field("checkpoints", &self.checkpoints)
            .field("options", &self.options)
            .finish()
    }
}

enum Control {
    Stop(oneshot::Sender<()>),
}

struct Shared {
    handled: AtomicU64,
    /// Woken after every saved instance, for [`ProcessHandle::wait_until_finished`].
    progress: Notify,
}

/// A running process: watch its status, read its instances, stop it. Clones share the process;
/// when the last one is dropped the process saves its position and stops.
#[must_use = "dropping every handle of a process stops it"]
pub struct ProcessHandle<P: ProcessManager> {
    name: Arc<str>,
    store: Arc<dyn EventStore>,
    shared: Arc<Shared>,
    control: mpsc::Sender<Control>,
    status: watch::Receiver<ProcessStatus>,
    _process: std::marker::PhantomData<fn() -> P>,
}

impl<P: ProcessManager> Clone for ProcessHandle<P> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            store: self.store.clone(),
            shared: self.shared.clone(),
            control: self.control.clone(),
            status: self.status.clone(),
            _process: std::marker::PhantomData,
        }
    }
}

impl<P: ProcessManager> fmt::Debug for ProcessHandle<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessHandle")
            .field("name", &self.name)
            .field("status", &*self.status.borrow())
            .field("handled", &self.handled())
            .finish()
    }
}

/// The stream of instance `correlation_id` of process `process`.
///
/// # Errors
/// - [`Error::InvalidInput`] when `process` is not usable in a stream id.
pub fn process_stream(process: &str, correlation_id: Uuid) -> Result<StreamId, Error> {
    StreamId::new(
        &Category::new(PROCESS_CATEGORY).expect("valid category"),
        format!("{process}:{}", correlation_id.simple()),
    )
}

/// The key of a process's position in the checkpoint store, apart from views' names.
fn checkpoint_key(process: &str) -> String {
    format!("process:{process}")
}

impl ProcessRunner {
    /// A runner reading `store` and keeping positions in `checkpoints`.
    pub fn new(store: Arc<dyn EventStore>, checkpoints: Arc<dyn CheckpointStore>) -> Self {
        Self {
            store,
            checkpoints,
            options: ProcessOptions::default(),
        }
    }

    /// Replaces the tuning.
    pub fn with_options(mut self, options: ProcessOptions) -> Self {
        self.options = options;
        self
    }

    /// Starts `process` in a task: loads its position and pending deadlines (or starts from the
    /// beginning of its categories), handles what was stored since, then follows live events
    /// and fires deadlines. Returns at once.
    ///
    /// # Errors
    /// - [`ProcessError::Store`] with [`Error::InvalidInput`] when the process reacts to no
    ///   category, to one of newton's own ([`RESERVED_CATEGORY_PREFIX`]), or its name is not
    ///   usable in a stream id.
    pub fn start<P: ProcessManager>(&self, process: P) -> Result<ProcessHandle<P>, ProcessError> {
        let name: Arc<str> = Arc::from(process.name());
        let invalid = |reason: String| ProcessError::Store {
            process: name.to_string(),
            source: Error::InvalidInput {
                what: format!("process {name:?}"),
                reason,
            },
        };
        let categories = process.categories();
        if categories.is_empty() {
            return Err(invalid("reacts to no category".into()));
        }
        if let Some(reserved) = categories
            .iter()
            .find(|c| c.as_str().starts_with(RESERVED_CATEGORY_PREFIX))
        {
            return Err(invalid(format!(
                "reacts to category {:?}, one of newton's own ({RESERVED_CATEGORY_PREFIX:?})",
                reserved.as_str()
            )));
        }
        if name.is_empty() {
            return Err(invalid("name is empty".into()));
        }
        let usable = process_stream(&name, Uuid::nil()).and_then(|_| {
            let category = Category::new(crate::checkpoint_store::CHECKPOINT_CATEGORY)?;
            StreamId::new(&category, checkpoint_key(&name))
        });
        if let Err(Error::InvalidInput { reason, .. }) = usable {
            return Err(invalid(format!(
                "name is not usable in a stream id: {reason}"
            )));
        }
        let shared = Arc::new(Shared {
            handled: AtomicU64::new(0),
            progress: Notify::new(),
        });
        let (control_tx, control_rx) = mpsc::channel(8);
        let (status_tx, status_rx) = watch::channel(ProcessStatus::Starting);
        let task = Task {
            process,
            name: name.clone(),
            store: self.store.clone(),
            checkpoints: self.checkpoints.clone(),
            options: self.options,
            shared: shared.clone(),
            status: status_tx,
            revision: None,
            positions: BTreeMap::new(),
            pending: Pending::default(),
            unsaved: 0,
        };
        tokio::spawn(task.run(control_rx));
        Ok(ProcessHandle {
            name,
            store: self.store.clone(),
            shared,
            control: control_tx,
            status: status_rx,
            _process: std::marker::PhantomData,
        })
    }
}

impl<P: ProcessManager> ProcessHandle<P> {
    /// The process's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current status.
    pub fn status(&self) -> ProcessStatus {
        self.status.borrow().clone()
    }

    /// Events and deadlines handled since the task started (skipped redeliveries included).
    pub fn handled(&self) -> u64 {
        self.shared.handled.load(Ordering::Relaxed)
    }

    /// Instance `correlation_id` as stored now, or None when it has handled nothing yet.
    ///
    /// # Errors
    /// - [`ProcessError::Store`] when the store fails; [`ProcessError::State`] when the saved
    ///   state does not decode as `P::State`.
    pub async fn instance(
        &self,
        correlation_id: Uuid,
    ) -> Result<Option<Instance<P::State>>, ProcessError> {
        let stream = process_stream(&self.name, correlation_id).map_err(|e| self.store_error(e))?;
        let Some((record, revision)) = load_record(&*self.store, &stream)
            .await
            .map_err(|e| self.decode_error(&stream, e))?
        else {
            return Ok(None);
        };
        let state = rmp_serde::from_slice(&record.state).map_err(|e| ProcessError::State {
            process: self.name.to_string(),
            stream: stream.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(Instance {
            state,
            finished: record.finished,
            deadline: record
                .deadline
                .and_then(|d| Timestamp::from_unix_micros(d.at)),
            revision,
        }))
    }

    /// Waits until instance `correlation_id` has finished, and returns its final state.
    ///
    /// Reads the instance from the store after every instance this runner saves, and at least
    /// every [`FINISHED_POLL`] besides, so an instance finished by another runner of the process
    /// (another node) is seen too.
    ///
    /// # Errors
    /// - [`ProcessError::Failed`] or [`ProcessError::Stopped`] when the process ends first; as
    ///   [`Self::instance`].
    pub async fn wait_until_finished(
        &self,
        correlation_id: Uuid,
    ) -> Result<P::State, ProcessError> {
        let mut status = self.status.clone();
        loop {
            // Registered before the read, so an instance saved in between still wakes us.
            let progress = self.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if let Some(instance) = self.instance(correlation_id).await? {
                if instance.finished {
                    return Ok(instance.state);
                }
            }
            match &*status.borrow_and_update() {
                ProcessStatus::Failed(e) => {
                    return Err(ProcessError::Failed {
                        process: self.name.to_string(),
                        reason: e.to_string(),
                    })
                }
                ProcessStatus::Stopped => return Err(self.stopped()),
                _ => {}
            }
            tokio::select! {
                _ = progress => {}
                _ = tokio::time::sleep(FINISHED_POLL) => {}
                changed = status.changed() => if changed.is_err() { return Err(self.stopped()) },
            }
        }
    }

    /// Waits until the process has caught up with every category.
    ///
    /// # Errors
    /// - [`ProcessError::Failed`] or [`ProcessError::Stopped`] when the process ends first.
    pub async fn wait_until_live(&self) -> Result<(), ProcessError> {
        let mut status = self.status.clone();
        loop {
            match &*status.borrow_and_update() {
                ProcessStatus::Live => return Ok(()),
                ProcessStatus::Failed(e) => {
                    return Err(ProcessError::Failed {
                        process: self.name.to_string(),
                        reason: e.to_string(),
                    })
                }
                ProcessStatus::Stopped => return Err(self.stopped()),
                ProcessStatus::Starting | ProcessStatus::Replaying | ProcessStatus::Retrying(_) => {
                }
            }
            if status.changed().await.is_err() {
                return Err(self.stopped());
            }
        }
    }

    /// Saves the position and stops the process.
    ///
    /// # Errors
    /// - [`ProcessError::Stopped`] when it had already stopped.
    pub async fn stop(&self) -> Result<(), ProcessError> {
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::Stop(ack))
            .await
            .map_err(|_| self.stopped())?;
        done.await.map_err(|_| self.stopped())
    }

    fn stopped(&self) -> ProcessError {
        ProcessError::Stopped {
            process: self.name.to_string(),
        }
    }

    fn store_error(&self, source: Error) -> ProcessError {
        ProcessError::Store {
            process: self.name.to_string(),
            source,
        }
    }

    fn decode_error(&self, stream: &StreamId, e: Error) -> ProcessError {
        match e {
            Error::Decode { .. } => ProcessError::State {
                process: self.name.to_string(),
                stream: stream.clone(),
                reason: e.to_string(),
            },
            e => self.store_error(e),
        }
    }
}

/// The last saved record of an instance and its version, None for an instance never saved.
async fn load_record(
    store: &dyn EventStore,
    stream: &StreamId,
) -> Result<Option<(Record, Version)>, Error> {
    let last = store
        .read_stream(stream, ReadOptions::backwards().limit(1))
        .try_next()
        .await?;
    match last {
        None => Ok(None),
        Some(e) => Ok(Some((e.decode()?, e.version))),
    }
}

struct Task<P: ProcessManager> {
    process: P,
    name: Arc<str>,
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    options: ProcessOptions,
    shared: Arc<Shared>,
    status: watch::Sender<ProcessStatus>,
    revision: Option<u64>,
    positions: BTreeMap<String, Checkpoint>,
    pending: Pending,
    unsaved: usize,
}

/// Why the subscription loop returned.
enum Next {
    Resubscribe,
    Stop,
}

/// What an instance reacts to.
enum Cause<'a> {
    Event(&'a RecordedEvent),
    Deadline(Deadline),
}

impl<P: ProcessManager> Task<P> {
    async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        // A panic (in a handler, or a process's `categories`/`correlate`) ends the task: say so
        // in the status instead of leaving the last one standing.
        let outcome = AssertUnwindSafe(self.run_inner(&mut control))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(ProcessError::Failed {
                    process: self.name.to_string(),
                    reason: format!("panicked: {}", panic_message(&*panic)),
                })
            });
        let status = match outcome {
            Ok(()) => ProcessStatus::Stopped,
            Err(e) => {
                tracing::error!(process = %self.name, error = %e, "process failed");
                ProcessStatus::Failed(Arc::new(e))
            }
        };
        self.status.send_replace(status);
    }

    fn store_error(&self, source: Error) -> ProcessError {
        ProcessError::Store {
            process: self.name.to_string(),
            source,
        }
    }

    /// Says in the status that the store is unavailable and waits before try `attempt` + 1;
    /// returns the status to go back to once it answers (the one before the first try).
    async fn retry_later(
        &self,
        attempt: u32,
        error: ProcessError,
        resume: &mut Option<ProcessStatus>,
    ) {
        tracing::warn!(process = %self.name, error = %error, attempt, "store unavailable; trying again");
        let before = self
            .status
            .send_replace(ProcessStatus::Retrying(Arc::new(error)));
        if resume.is_none() {
            *resume = Some(before);
        }
        tokio::time::sleep(retry_backoff(&self.options, attempt)).await;
    }

    /// Puts back the status [`Self::retry_later`] replaced, if it did.
    fn resume(&self, resume: Option<ProcessStatus>) {
        if let Some(status) = resume {
            self.status.send_replace(status);
        }
    }

    async fn run_inner(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
    ) -> Result<(), ProcessError> {
        let key = checkpoint_key(&self.name);
        let mut resume = None;
        let mut attempt = 0;
        let loaded = loop {
            match self.checkpoints.load(&key).await {
                Ok(loaded) => break loaded,
                Err(e) if e.is_retryable() => {
                    attempt += 1;
                    self.retry_later(attempt, self.store_error(e), &mut resume)
                        .await;
                }
                Err(e) => return Err(self.store_error(e)),
            }
        };
        self.resume(resume);
        if let Some(loaded) = loaded {
            self.pending =
                rmp_serde::from_slice(&loaded.saved.state).map_err(|e| ProcessError::State {
                    process: self.name.to_string(),
                    stream: process_stream(&self.name, Uuid::nil()).expect("checked at start"),
                    reason: format!("the saved position: {e}"),
                })?;
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

    /// Subscribes to every category from the saved positions, handles events and deadlines
    /// until a retryable store error (resubscribe) or a stop.
    async fn follow(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
    ) -> Result<Next, ProcessError> {
        self.status.send_replace(ProcessStatus::Replaying);
        let categories = self.process.categories();
        let subscriptions = categories.iter().map(|category| {
            let start = match self.positions.get(category.as_str()) {
                Some(c) => Start::After(c.clone()),
                None => Start::Beginning,
            };
            let ended = Error::Unavailable {
                backend: self.store.backend(),
                message: format!("the subscription to category {category} ended"),
                source: None,
            };
            self.store
                .subscribe(
                    Selector::Category(category.clone()),
                    start,
                    SubscriptionMode::HotCold,
                )
                .chain(futures::stream::iter([Err(ended)]))
        });
        let mut merged = select_all(subscriptions);
        let mut caught_up = 0;
        let mut tick = tokio::time::interval(self.options.save_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_deadline = self.pending.deadlines.iter().min_by_key(|(_, d)| **d);
            let due = next_deadline.map(|(id, d)| (*id, *d));
            let wait = due.map_or(Duration::from_secs(3600), |(_, d)| {
                let micros = d.at.saturating_sub(Timestamp::now().unix_micros()).max(0);
                Duration::from_micros(micros as u64)
            });
            tokio::select! {
                command = control.recv() => match command {
                    Some(Control::Stop(ack)) => {
                        self.save().await?;
                        let _ = ack.send(());
                        return Ok(Next::Stop);
                    }
                    None => return Ok(Next::Stop),
                },
                item = merged.next() => match item {
                    Some(Ok(SubscriptionItem::Event(event))) => {
                        if let Some(correlation_id) = self.process.correlate(&event) {
                            self.react(correlation_id, Cause::Event(&event)).await?;
                        }
                        self.advance(&event);
                        if self.unsaved >= self.options.save_every {
                            self.save().await?;
                        }
                    }
                    Some(Ok(SubscriptionItem::CaughtUp)) => {
                        caught_up += 1;
                        if caught_up == categories.len() {
                            self.save().await?;
                            self.status.send_replace(ProcessStatus::Live);
                        }
                    }
                    Some(Err(e)) if e.is_retryable() => {
                        tracing::warn!(process = %self.name, error = %e, "store unavailable; resubscribing");
                        self.status.send_replace(ProcessStatus::Retrying(Arc::new(self.store_error(e))));
                        tokio::time::sleep(self.options.retry_delay).await;
                        return Ok(Next::Resubscribe);
                    }
                    Some(Err(e)) => return Err(self.store_error(e)),
                    None => unreachable!("each subscription ends with an error item first"),
                },
                // Deadlines fire once the replay is over too, not before: an event still to be
                // replayed may be the answer that clears one.
                _ = tokio::time::sleep(wait), if due.is_some() && caught_up == categories.len() => {
                    let (correlation_id, deadline) = due.expect("guarded");
                    self.pending.deadlines.remove(&correlation_id);
                    self.unsaved += 1;
                    self.react(correlation_id, Cause::Deadline(deadline)).await?;
                    self.shared.handled.fetch_add(1, Ordering::Relaxed);
                }
                _ = tick.tick(), if self.unsaved > 0 => self.save().await?,
            }
        }
    }

    /// Records `event` as handled in the runner's position.
    fn advance(&mut self, event: &RecordedEvent) {
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
        self.shared.handled.fetch_add(1, Ordering::Relaxed);
    }

    /// Lets instance `correlation_id` react to `cause` once: loads it, skips a cause it has
    /// handled (or a deadline it no longer has), runs the handler, and saves the new record with
    /// the expected version. Handled again after an unknown outcome or a lost save.
    async fn react(&mut self, correlation_id: Uuid, cause: Cause<'_>) -> Result<(), ProcessError> {
        let stream = process_stream(&self.name, correlation_id).map_err(|e| self.store_error(e))?;
        let cause_id = match &cause {
            Cause::Event(event) => event.event_id,
            Cause::Deadline(d) => self.deadline_cause_id(correlation_id, d),
        };
        // Lost saves (another runner), bounded by `max_retries`; tries after a retryable error,
        // not bounded: a store outage delays the process, it does not stop it.
        let mut retries = 0;
        let mut attempt = 0;
        let mut resume = None;
        loop {
            let (record, revision) = match load_record(&*self.store, &stream).await {
                Ok(found) => found.map_or((Record::default(), None), |(r, v)| (r, Some(v))),
                Err(e) if e.is_retryable() => {
                    attempt += 1;
                    self.retry_later(attempt, self.store_error(e), &mut resume)
                        .await;
                    continue;
                }
                Err(Error::Decode { .. }) | Err(Error::UnknownSchemaVersion { .. }) => {
                    return Err(ProcessError::State {
                        process: self.name.to_string(),
                        stream,
                        reason: "the instance's saved record does not decode".into(),
                    })
                }
                Err(e) => return Err(self.store_error(e)),
            };
            let stale = match &cause {
                Cause::Event(_) => false,
                Cause::Deadline(d) => record.deadline != Some(*d),
            };
            if record.finished || stale || record.handled.contains(&cause_id) {
                // Handled before (a redelivery) or moot; its deadline, if any, is still due.
                self.track_deadline(correlation_id, &record);
                self.resume(resume);
                return Ok(());
            }
            let mut state: P::State = match revision {
                None => P::State::default(),
                Some(_) => {
                    rmp_serde::from_slice(&record.state).map_err(|e| ProcessError::State {
                        process: self.name.to_string(),
                        stream: stream.clone(),
                        reason: e.to_string(),
                    })?
                }
            };
            let mut steps = Steps {
                process: self.name.clone(),
                correlation_id,
                cause_id,
                deadline: match &cause {
                    Cause::Event(_) => record
                        .deadline
                        .and_then(|d| Timestamp::from_unix_micros(d.at)),
                    Cause::Deadline(_) => None,
                },
                deadline_set: false,
                finished: false,
                unavailable: false,
            };
            let handled = match &cause {
                Cause::Event(event) => {
                    AssertUnwindSafe(self.process.handle(&mut state, event, &mut steps))
                        .catch_unwind()
                        .await
                }
                Cause::Deadline(_) => {
                    AssertUnwindSafe(self.process.on_deadline(&mut state, &mut steps))
                        .catch_unwind()
                        .await
                }
            }
            .unwrap_or_else(|panic| {
                Err(format!("the handler panicked: {}", panic_message(&*panic)).into())
            });
            if let Err(source) = handled {
                // The outcome of a step is unknown (or other writers kept winning): handle the
                // cause again from the state saved before it; its steps find out.
                let (stream, version) = match &cause {
                    Cause::Event(event) => (event.stream.clone(), event.version),
                    Cause::Deadline(_) => (stream.clone(), revision.unwrap_or(Version::FIRST)),
                };
                let error = ProcessError::Handler {
                    process: self.name.to_string(),
                    stream,
                    version,
                    source,
                };
                if steps.unavailable {
                    attempt += 1;
                    self.retry_later(attempt, error, &mut resume).await;
                    continue;
                }
                return Err(error);
            }
            let record = self.next_record(record, &state, &steps, cause_id, &stream)?;
            let saved = EventData::msgpack(SAVED_TYPE, &record)
                .map_err(|e| self.store_error(e))?
                .with_id(Uuid::new_v5(
                    &cause_id,
                    format!("{}/saved", self.name).as_bytes(),
                ))
                .with_correlation_id(correlation_id)
                .with_causation_id(cause_id);
            let expected = revision.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            match self.store.append(&stream, expected, vec![saved]).await {
                Ok(_) => {
                    self.track_deadline(correlation_id, &record);
                    self.shared.progress.notify_waiters();
                    self.resume(resume);
                    return Ok(());
                }
                // Another runner saved the instance meanwhile (or our save landed and answered
                // late): reload, and the cause is found handled or handled again, idempotently.
                Err(e @ Error::WrongExpectedVersion { .. })
                    if retries < self.options.max_retries =>
                {
                    tracing::debug!(process = %self.name, %stream, error = %e, "instance saved by someone else; reloading");
                    retries += 1;
                }
                Err(e) if e.is_retryable() => {
                    attempt += 1;
                    self.retry_later(attempt, self.store_error(e), &mut resume)
                        .await;
                }
                Err(e) => return Err(self.store_error(e)),
            }
        }
    }

    /// The record to save after a reaction to `cause_id` left `state` and `steps`.
    fn next_record(
        &self,
        mut record: Record,
        state: &P::State,
        steps: &Steps,
        cause_id: Uuid,
        stream: &StreamId,
    ) -> Result<Record, ProcessError> {
        record.state =
            Bytes::from(
                rmp_serde::to_vec_named(state).map_err(|e| ProcessError::State {
                    process: self.name.to_string(),
                    stream: stream.clone(),
                    reason: format!("the state does not encode: {e}"),
                })?,
            );
        record.handled.push_back(cause_id);
        while record.handled.len() > MAX_HANDLED {
            record.handled.pop_front();
        }
        let at = steps.deadline.map(Timestamp::unix_micros);
        record.deadline = match (at, record.deadline) {
            (None, _) => None,
            // Kept as found (an event's reaction that did not touch it). A deadline the reaction
            // set is a new one even at the same time: the fired deadline's number is handled, and
            // a deadline kept under it would never fire (nor, before, stop firing).
            (Some(at), Some(d)) if d.at == at && !steps.deadline_set => Some(d),
            (Some(at), _) => {
                record.deadlines_set += 1;
                Some(Deadline {
                    at,
                    seq: record.deadlines_set,
                })
            }
        };
        record.finished = steps.finished;
        Ok(record)
    }

    /// The cause id of deadline `d` of instance `correlation_id`.
    fn deadline_cause_id(&self, correlation_id: Uuid, d: &Deadline) -> Uuid {
        Uuid::new_v5(
            &correlation_id,
            format!("{}/deadline/{}", self.name, d.seq).as_bytes(),
        )
    }

    /// Keeps the runner's pending deadlines in step with an instance's record. A deadline whose
    /// firing is among the handled causes is not pending: tracking it again would fire it, skip
    /// it as handled, and track it again, without end.
    fn track_deadline(&mut self, correlation_id: Uuid, record: &Record) {
        let now = match (record.finished, record.deadline) {
            (false, Some(d))
                if !record
                    .handled
                    .contains(&self.deadline_cause_id(correlation_id, &d)) =>
            {
                Some(d)
            }
            _ => None,
        };
        let before = match now {
            Some(d) => self.pending.deadlines.insert(correlation_id, d),
            None => self.pending.deadlines.remove(&correlation_id),
        };
        if before != now {
            self.unsaved += 1;
        }
    }

    async fn save(&mut self) -> Result<(), ProcessError> {
        if self.unsaved == 0 {
            return Ok(());
        }
        let pending = rmp_serde::to_vec_named(&self.pending).map_err(|e| ProcessError::State {
            process: self.name.to_string(),
            stream: process_stream(&self.name, Uuid::nil()).expect("checked at start"),
            reason: format!("the pending deadlines do not encode: {e}"),
        })?;
        let saved = SavedView {
            positions: self.positions.clone(),
            state: Bytes::from(pending),
        };
        let key = checkpoint_key(&self.name);
        let save_id = Uuid::now_v7();
        // The same save id on every try: a save that landed but answered late is taken as ours.
        let mut attempt = 0;
        let mut resume = None;
        let revision = loop {
            match self
                .checkpoints
                .save(&key, &saved, self.revision, save_id)
                .await
            {
                Ok(revision) => break revision,
                Err(e) if e.is_retryable() => {
                    attempt += 1;
                    self.retry_later(attempt, self.store_error(e), &mut resume)
                        .await;
                }
                Err(Error::WrongExpectedVersion { actual, .. }) => {
                    return Err(ProcessError::Fenced {
                        process: self.name.to_string(),
                        expected: self.revision,
                        actual: actual.map(Version::value),
                    })
                }
                Err(e) => return Err(self.store_error(e)),
            }
        };
        self.resume(resume);
        self.revision = Some(revision);
        self.unsaved = 0;
        Ok(())
    }
}
