//! Views whose work is shared by several processes: the partitioned view runner.
//!
//! A view's streams are split into a fixed number of partitions by a stable hash of the stream
//! name. Each partition is one record in a [`CheckpointStore`] holding its positions, its state
//! and its lease (owner and lease duration) together, so every save of the owner is fenced by the
//! record's revision: whoever takes a partition over makes the old owner's next save fail. A
//! members record, also in the checkpoint store, says who runs the view, so each member knows its
//! share and rebalances when one joins or leaves.
//!
//! This module owns the partition records, the members record and the tasks that run the
//! partitions one process holds. It uses the `CheckpointStore` trait only, never its
//! implementation, and leaves the single-process [`crate::ViewRunner`] as it is.

// `ViewError` carries the store's error unboxed so callers can match on it; errors are the cold
// path, so their size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{select_all, StreamExt};
use futures::FutureExt;
use photon_api::{
    BoxError, Category, Checkpoint, Error, EventData, EventStore, ExpectedVersion, RecordedEvent,
    Selector, Start, StreamId, SubscriptionItem, SubscriptionMode, Uuid,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch, Notify, RwLock};
use tokio::task::JoinSet;

use crate::checkpoint_store::{CheckpointStore, SavedView, CHECKPOINT_CATEGORY};
use crate::failure::{
    dead_letter_id, dead_letter_stream, DeadLetter, FailurePolicy, OnFailure,
    DEAD_LETTER_EVENT_TYPE,
};
use crate::view::{View, ViewError, ViewStatus};

/// The most partitions a view may have: each owned partition is one subscription per category
/// and one record renewed every lease / 4, so counts beyond this cost more than they spread.
pub const MAX_PARTITIONS: u32 = 1024;

/// The shortest lease a runner accepts: owners renew every quarter lease, and a quarter of
/// less than this is within one save's latency on most stores, so partitions would be lost to
/// takeovers while their owners live.
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// The partition of `stream` among `partitions`: FNV-1a (64 bit) of the stream's full name
/// (`category-id`), modulo `partitions`.
///
/// Written out here rather than taken from a hashing crate or `std`'s `DefaultHasher`, whose
/// output may change between releases and platforms: every process of every release must put a
/// stream in the same partition, or two partitions would handle its events.
///
/// # Panics
/// - When `partitions` is 0 (the runner refuses that count at start).
pub fn partition_of(stream: &StreamId, partitions: u32) -> u32 {
    assert!(partitions > 0, "a view has at least one partition");
    (fnv1a64(stream.as_str().as_bytes()) % u64::from(partitions)) as u32
}

/// FNV-1a, 64 bit: a fixed, published function (offset basis and prime from its specification).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The checkpoint-store key of partition `partition` of `view`: `<view>@partition-<k>`. Its
/// record holds the partition's positions, state and lease, so they are always saved together.
pub fn partition_key(view: &str, partition: u32) -> String {
    format!("{view}@partition-{partition}")
}

/// The checkpoint-store key of `view`'s members record, `<view>@members`: the partition count
/// and who runs the view, with each member's heartbeat.
pub fn members_key(view: &str) -> String {
    format!("{view}@members")
}

/// Tuning of a [`PartitionedViewRunner`]. The partition count is part of the view's identity:
/// every process of one view must use the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionOptions {
    /// How many partitions the view's streams are split into; fixed for the view's lifetime
    /// (recorded by its first runner, a runner with another count is refused).
    pub partitions: u32,
    /// How long a partition record (and a member's heartbeat) may stay unchanged before others
    /// take it over; at least [`MIN_LEASE`]. Owners renew every lease / 4. A crashed process's
    /// partitions move after about 2 to 2.5 leases: one for its heartbeat to go stale (others
    /// then count it gone and are assigned its partitions), one more for each partition record
    /// to stand unchanged by the taker's clock, plus up to a quarter lease until the next
    /// heartbeat. Shorter means faster takeover and more saves; it must stay well above the
    /// checkpoint store's save latency (a save slower than a quarter lease risks the lease).
    pub lease: Duration,
    /// Save a partition after this many handled events at the latest; at least 1.
    pub save_every: usize,
    /// Save a partition this long after its first unsaved event at the latest.
    pub save_interval: Duration,
    /// Wait before resubscribing after a retryable store error, and between save retries;
    /// positive.
    pub retry_delay: Duration,
}

impl PartitionOptions {
    /// `partitions` partitions, a lease of 10 s, and the single-process runner's save tuning.
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions,
            lease: Duration::from_secs(10),
            save_every: 500,
            save_interval: Duration::from_millis(500),
            retry_delay: Duration::from_millis(500),
        }
    }

    /// Replaces the lease duration.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Replaces the save interval (a short one makes a takeover redo fewer events).
    pub fn with_save_interval(mut self, save_interval: Duration) -> Self {
        self.save_interval = save_interval;
        self
    }

    /// How often an owner renews its partitions and a member beats: a quarter lease, inside
    /// the third the design asks for, leaving room for a slow save.
    fn renew_every(&self) -> Duration {
        self.lease / 4
    }
}

/// What a partition record holds besides the positions (MessagePack, in `SavedView::state`).
#[derive(Serialize, Deserialize)]
struct PartitionRecord {
    /// Who holds the lease; None when released.
    owner: Option<Uuid>,
    /// The lease the owner promised to renew within.
    lease_ms: u64,
    /// The view's partition count, for readers that meet this record alone.
    partitions: u32,
    /// The view's state for this partition (MessagePack of `View::State`).
    state: Bytes,
}

/// One member's entry in the members record.
#[derive(Serialize, Deserialize, Clone, Copy)]
struct MemberEntry {
    /// Raised at each heartbeat: others see it change while the member lives.
    beat: u64,
    /// The member's lease: how long others wait after its last beat.
    lease_ms: u64,
}

/// The members record.
#[derive(Serialize, Deserialize)]
struct MembersRecord {
    partitions: u32,
    members: BTreeMap<Uuid, MemberEntry>,
}

fn encode<T: Serialize>(view: &str, value: &T) -> Result<Bytes, ViewError> {
    rmp_serde::to_vec_named(value)
        .map(Bytes::from)
        .map_err(|e| ViewError::State {
            view: view.to_owned(),
            reason: format!("does not encode: {e}"),
        })
}

fn decode<T: DeserializeOwned>(view: &str, what: &str, bytes: &[u8]) -> Result<T, ViewError> {
    rmp_serde::from_slice(bytes).map_err(|e| ViewError::State {
        view: view.to_owned(),
        reason: format!("{what} does not decode: {e}"),
    })
}

fn store_error(view: &str, source: Error) -> ViewError {
    ViewError::Store {
        view: view.to_owned(),
        source,
    }
}

fn invalid(view: &str, what: String, reason: String) -> ViewError {
    store_error(view, Error::InvalidInput { what, reason })
}

/// One partition's saved record, as [`load_partitions`] reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedPartition<S> {
    /// The partition number, `0..partitions`.
    pub partition: u32,
    /// Who holds its lease now (a runner's [`PartitionedViewHandle::member_id`]); None when
    /// released or never taken.
    pub owner: Option<Uuid>,
    /// The record's revision; None when never saved.
    pub revision: Option<u64>,
    /// Where the partition is in each category.
    pub positions: BTreeMap<String, Checkpoint>,
    /// The partition's view state as of those positions (the default when never saved).
    pub state: S,
}

/// Loads every partition's saved record of `view`, for an application that combines the
/// partitions' states into one answer (each partition's state covers only its streams). What
/// was saved, not what runners hold in memory: each event counted once, as of each partition's
/// last save. Empty when the view never ran partitioned.
///
/// # Errors
/// - [`ViewError::Store`] when the checkpoint store fails.
/// - [`ViewError::State`] when a record does not decode, or a state not as `S`.
pub async fn load_partitions<S: DeserializeOwned + Default>(
    checkpoints: &dyn CheckpointStore,
    view: &str,
) -> Result<Vec<SavedPartition<S>>, ViewError> {
    let Some(members) = checkpoints
        .load(&members_key(view))
        .await
        .map_err(|e| store_error(view, e))?
    else {
        return Ok(Vec::new());
    };
    let members: MembersRecord = decode(view, "the members record", &members.saved.state)?;
    let mut partitions = Vec::with_capacity(members.partitions as usize);
    for partition in 0..members.partitions {
        let loaded = checkpoints
            .load(&partition_key(view, partition))
            .await
            .map_err(|e| store_error(view, e))?;
        partitions.push(match loaded {
            None => SavedPartition {
                partition,
                owner: None,
                revision: None,
                positions: BTreeMap::new(),
                state: S::default(),
            },
            Some(loaded) => {
                let record: PartitionRecord =
                    decode(view, "a partition record", &loaded.saved.state)?;
                SavedPartition {
                    partition,
                    owner: record.owner,
                    revision: Some(loaded.revision),
                    positions: loaded.saved.positions,
                    state: decode(view, "a partition's state", &record.state)?,
                }
            }
        });
    }
    Ok(partitions)
}

/// Runs a [`View`] as one member of a group of processes that share its partitions: each
/// process holds about `partitions / members` of them, takes over those of a process that
/// stopped renewing, and hands some over when another joins.
#[derive(Clone)]
pub struct PartitionedViewRunner {
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    options: PartitionOptions,
}

impl fmt::Debug for PartitionedViewRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionedViewRunner")
            .field("store", &self.store.backend())
            .field("checkpoints", &self.checkpoints)
            .field("options", &self.options)
            .finish()
    }
}

/// Where a member is.
#[derive(Clone, Debug)]
pub enum PartitionedStatus {
    /// Registered; holding, taking or handing over partitions.
    Running,
    /// Stopped by an error (a partition's handler refused an event under a stopping policy, a
    /// record that does not decode, a changed partition count); its other partitions were
    /// released.
    Failed(Arc<ViewError>),
    /// Shut down: its partitions released and it left the members record.
    Stopped,
}

/// A member as of now: for tests, health checks and waiting on a rebalance.
#[derive(Clone, Debug)]
pub struct MemberOverview {
    /// This member's id (random per runner, written as the owner of its partitions).
    pub member: Uuid,
    /// Its status.
    pub status: PartitionedStatus,
    /// The live members it counts, itself included (as of its last heartbeat).
    pub members: usize,
    /// The partitions it holds, with each one's status (`Live` once caught up).
    pub partitions: BTreeMap<u32, ViewStatus>,
}

impl MemberOverview {
    /// The partitions it holds.
    pub fn owned(&self) -> Vec<u32> {
        self.partitions.keys().copied().collect()
    }

    /// Whether every partition it holds has caught up with the store.
    pub fn all_live(&self) -> bool {
        self.partitions
            .values()
            .all(|s| matches!(s, ViewStatus::Live))
    }
}

struct Slot<S> {
    state: Arc<RwLock<S>>,
    status: watch::Receiver<ViewStatus>,
}

/// What the member's tasks share with its handles.
struct Shared<S> {
    name: Arc<str>,
    member: Uuid,
    slots: Mutex<BTreeMap<u32, Slot<S>>>,
    members: AtomicUsize,
    handled: AtomicU64,
    /// Partitions taken over by another member while this one held them.
    lost: AtomicU64,
    /// Woken on every change a handle may wait for (a partition's status, a heartbeat).
    changed: Notify,
}

impl<S> Shared<S> {
    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Slot<S>>> {
        // Each insert or remove is whole; a panic cannot leave half of one.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

enum Control {
    Shutdown(oneshot::Sender<Result<(), ViewError>>),
}

/// A running member: which partitions it holds, their states, and a clean shutdown. Clones
/// share the member; dropping the last one shuts it down cleanly, as [`Self::shutdown`] does.
#[must_use = "dropping every handle shuts the member down; keep one"]
pub struct PartitionedViewHandle<V: View> {
    shared: Arc<Shared<V::State>>,
    control: mpsc::Sender<Control>,
    status: watch::Receiver<PartitionedStatus>,
}

impl<V: View> Clone for PartitionedViewHandle<V> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            control: self.control.clone(),
            status: self.status.clone(),
        }
    }
}

impl<V: View> fmt::Debug for PartitionedViewHandle<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionedViewHandle")
            .field("overview", &self.overview())
            .finish()
    }
}

impl<V: View> PartitionedViewHandle<V> {
    /// This member's id: the owner written into the partition records it holds.
    pub fn member_id(&self) -> Uuid {
        self.shared.member
    }

    /// The view's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The member's status.
    pub fn status(&self) -> PartitionedStatus {
        self.status.borrow().clone()
    }

    /// The partitions this member holds, with their status, and the members it counts.
    pub fn overview(&self) -> MemberOverview {
        let partitions = self
            .shared
            .slots()
            .iter()
            .map(|(k, slot)| (*k, slot.status.borrow().clone()))
            .collect();
        MemberOverview {
            member: self.shared.member,
            status: self.status(),
            members: self.shared.members.load(Ordering::Relaxed),
            partitions,
        }
    }

    /// Events of its partitions this member handled since it started (events handled again
    /// after a takeover count again; the saved states count each once).
    pub fn handled(&self) -> u64 {
        self.shared.handled.load(Ordering::Relaxed)
    }

    /// Partitions another member took over from this one since it started (this one's next
    /// save was refused, its unsaved work dropped and redone by the taker). A rebalance hands
    /// partitions over by release and counts nothing here; a count that keeps rising means the
    /// lease is too short for the store's save latency, or the process stalls for that long.
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// Reads the in-memory state of `partition` while this member holds it (None otherwise).
    /// It may be ahead of the saved record; [`load_partitions`] reads what was saved.
    pub async fn read<R>(&self, partition: u32, f: impl FnOnce(&V::State) -> R) -> Option<R> {
        let state = self.shared.slots().get(&partition)?.state.clone();
        let state = state.read().await;
        Some(f(&state))
    }

    /// Waits until `condition` holds for the member's overview, re-checked at every change of
    /// a partition's status and every heartbeat.
    ///
    /// # Errors
    /// - [`ViewError::Failed`] or [`ViewError::Stopped`] when the member ends first.
    pub async fn wait_until(
        &self,
        mut condition: impl FnMut(&MemberOverview) -> bool,
    ) -> Result<(), ViewError> {
        let mut status = self.status.clone();
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let overview = self.overview();
            if condition(&overview) {
                return Ok(());
            }
            match overview.status {
                PartitionedStatus::Running => {}
                PartitionedStatus::Failed(e) => {
                    return Err(ViewError::Failed {
                        view: self.shared.name.to_string(),
                        reason: e.to_string(),
                    })
                }
                PartitionedStatus::Stopped => return Err(self.stopped()),
            }
            tokio::select! {
                _ = changed => {}
                result = status.changed() => if result.is_err() { return Err(self.stopped()) },
            }
        }
    }

    /// Leaves the group cleanly: removes itself from the members record (so the others are
    /// assigned its partitions at once), then saves and releases every partition it holds
    /// (others take them at their next heartbeat, without waiting out a lease). Returns once
    /// that is done; the member is stopped either way.
    ///
    /// # Errors
    /// - [`ViewError::Stopped`] when it had already stopped.
    /// - [`ViewError::Failed`] naming the partition when one was taken over before its release
    ///   (its unsaved work dropped; the taker redoes it), or failed while releasing.
    /// - [`ViewError::Store`] when the checkpoint store did not answer a partition's last save
    ///   (retryable: the partition's record keeps this member as owner until its lease runs out,
    ///   and its unsaved work is redone by the next owner).
    pub async fn shutdown(&self) -> Result<(), ViewError> {
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::Shutdown(ack))
            .await
            .map_err(|_| self.stopped())?;
        done.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> ViewError {
        ViewError::Stopped {
            view: self.shared.name.to_string(),
        }
    }
}

impl PartitionedViewRunner {
    /// A runner reading `store` and keeping partition records and the members record in
    /// `checkpoints`, which every member of the view must share (e.g. an
    /// [`crate::EventStoreCheckpointStore`] over the same event store).
    pub fn new(
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        options: PartitionOptions,
    ) -> Self {
        Self {
            store,
            checkpoints,
            options,
        }
    }

    /// Joins `view`'s group as a new member (a fresh random id): registers in the members
    /// record (creating it, with the partition count, for the first member), then runs in tasks
    /// of its own, taking its share of partitions. Returns once registered: a heartbeat that
    /// loses every race for the members record to other members' saves is tried again after a
    /// random wait, for up to two leases.
    ///
    /// # Errors
    /// - [`ViewError::Store`] with [`Error::InvalidInput`] for a partition count of 0 or above
    ///   [`MAX_PARTITIONS`], a lease under [`MIN_LEASE`], a `save_every` of 0, a zero
    ///   `retry_delay`, a view that reads no category, whose name contains `@` (reserved for
    ///   the record keys) or does not make valid checkpoint keys, or a partition count other
    ///   than the one the view's members record holds (naming the view and both counts).
    /// - [`ViewError::Store`] with [`Error::Unavailable`] when other members' saves won the
    ///   members record for two leases (retryable: try again).
    /// - [`ViewError::Store`] when the checkpoint store fails at registration (retryable ones
    ///   included: try again).
    /// - [`ViewError::State`] when the members record does not decode.
    pub async fn start<V: View>(&self, view: V) -> Result<PartitionedViewHandle<V>, ViewError> {
        let name: Arc<str> = Arc::from(view.name());
        let options = self.options;
        let what = || format!("partitioned view {name:?}");
        if options.partitions == 0 || options.partitions > MAX_PARTITIONS {
            return Err(invalid(
                &name,
                what(),
                format!(
                    "has {} partitions; allowed are 1 to {MAX_PARTITIONS}",
                    options.partitions
                ),
            ));
        }
        if options.lease < MIN_LEASE {
            return Err(invalid(
                &name,
                what(),
                format!(
                    "has a lease of {:?}; the least is {MIN_LEASE:?} (its owner renews every \
                     quarter, which must stay above a save's latency)",
                    options.lease
                ),
            ));
        }
        if options.save_every == 0 {
            return Err(invalid(
                &name,
                what(),
                "has save_every 0; it must be at least 1 event".into(),
            ));
        }
        if options.retry_delay.is_zero() {
            return Err(invalid(
                &name,
                what(),
                "has a retry_delay of 0; it must be positive (a store outage would be retried \
                 in a busy loop)"
                    .into(),
            ));
        }
        // `<view>@members` and `<view>@partition-<k>` are this runner's keys: a view named with
        // '@' could collide with another view's records (a view `x@members` is view x's
        // members record), so the partitioned runner's view names have none.
        if name.contains('@') {
            return Err(invalid(
                &name,
                what(),
                "name contains '@', which partitioned views reserve for their record keys \
                 (`<view>@members`, `<view>@partition-<k>`)"
                    .into(),
            ));
        }
        if view.categories().is_empty() {
            return Err(invalid(&name, what(), "reads no category".into()));
        }
        let checkpoint_category = Category::new(CHECKPOINT_CATEGORY).expect("a valid category");
        for key in [
            members_key(&name),
            partition_key(&name, options.partitions - 1),
        ] {
            if let Err(e) = StreamId::new(&checkpoint_category, &key) {
                return Err(invalid(
                    &name,
                    what(),
                    format!("name does not make a valid checkpoint key: {e}"),
                ));
            }
        }
        let policy = view.failure_policy();
        let dead_letters = match policy.then {
            OnFailure::Park => Some(dead_letter_stream(&name).map_err(|e| {
                invalid(
                    &name,
                    what(),
                    format!("name is not usable as a dead-letter stream: {e}"),
                )
            })?),
            _ => None,
        };
        let member = Uuid::new_v4();
        let shared = Arc::new(Shared {
            name: name.clone(),
            member,
            slots: Mutex::new(BTreeMap::new()),
            members: AtomicUsize::new(0),
            handled: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            changed: Notify::new(),
        });
        let common = Arc::new(Common {
            view,
            name,
            member,
            options,
            store: self.store.clone(),
            checkpoints: self.checkpoints.clone(),
            policy,
            dead_letters,
            shared: shared.clone(),
        });
        let (status_tx, status_rx) = watch::channel(PartitionedStatus::Running);
        let mut coordinator = Coordinator {
            common,
            beat: 0,
            live: vec![member],
            seen: HashMap::new(),
            watched: HashMap::new(),
            observed_at: None,
            blind: false,
            running: BTreeMap::new(),
            tasks: JoinSet::new(),
            status: status_tx,
        };
        // Registered means in the members record: a member that counted only itself would
        // take every free partition and hand most back at its next heartbeat. Losing every
        // race of a heartbeat is tried again after a jittered wait, within a bound.
        let deadline = Instant::now() + options.lease * 2;
        let mut rounds = 1;
        while !coordinator.heartbeat().await? {
            if Instant::now() >= deadline {
                return Err(store_error(
                    &shared.name,
                    Error::Unavailable {
                        backend: self.store.backend(),
                        message: format!(
                            "partitioned view {:?}: could not register in its members record \
                             {:?} within {:?} ({rounds} heartbeats of {HEARTBEAT_ATTEMPTS} tries \
                             each lost to other members' saves); try again",
                            &*shared.name,
                            members_key(&shared.name),
                            options.lease * 2
                        ),
                        source: None,
                    },
                ));
            }
            rounds += 1;
            tokio::time::sleep(jitter(options.renew_every() / 2)).await;
        }
        tracing::info!(
            view = %shared.name, %member, partitions = options.partitions,
            members = coordinator.live.len(), "joined a partitioned view"
        );
        let (control_tx, control_rx) = mpsc::channel(4);
        tokio::spawn(coordinator.run(control_rx));
        Ok(PartitionedViewHandle {
            shared,
            control: control_tx,
            status: status_rx,
        })
    }
}

/// What the coordinator and the partition tasks of one member share.
struct Common<V: View> {
    view: V,
    name: Arc<str>,
    member: Uuid,
    options: PartitionOptions,
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    policy: FailurePolicy,
    dead_letters: Option<StreamId>,
    shared: Arc<Shared<V::State>>,
}

impl<V: View> Common<V> {
    fn lease_ms(&self) -> u64 {
        u64::try_from(self.options.lease.as_millis()).unwrap_or(u64::MAX)
    }

    fn partition_count_error(&self, recorded: u32) -> ViewError {
        invalid(
            &self.name,
            format!("partitioned view {:?}", &*self.name),
            format!(
                "this runner has {} partitions, the view's members record says {recorded}; a \
                 view's partition count is fixed: run another count under a new view name",
                self.options.partitions
            ),
        )
    }
}

/// A value seen at some time by this process's clock: a member's beat or a record's revision.
/// Expiry compares these over time on one clock, never clocks of two processes.
#[derive(Clone, Copy)]
struct Observed {
    value: u64,
    since: Instant,
}

/// Notes `value` for `key`; returns how long it has been unchanged.
fn observe<K: std::hash::Hash + Eq>(
    seen: &mut HashMap<K, Observed>,
    key: K,
    value: u64,
) -> Duration {
    let now = Instant::now();
    let entry = seen.entry(key).or_insert(Observed { value, since: now });
    if entry.value != value {
        *entry = Observed { value, since: now };
    }
    now - entry.since
}

/// How a partition task ended.
enum PartitionEnd {
    /// Saved and released, on request.
    Released,
    /// Another member took it over: this one's save was refused. Its unsaved state is dropped.
    Lost { expected: u64 },
    /// The checkpoint store did not answer a save within its retries: the partition is dropped
    /// here (unsaved state with it) and taken again from its record once the store answers.
    Dropped(Error),
    /// A handler refusal under a stopping policy, a store error that is not retryable, a state
    /// that does not encode, a panic: the member fails.
    Failed(ViewError),
}

/// The member's own task: heartbeats, works out its share, takes and releases partitions.
struct Coordinator<V: View> {
    common: Arc<Common<V>>,
    beat: u64,
    /// Live members as of the last heartbeat, sorted, this one included.
    live: Vec<Uuid>,
    /// Other members' beats as this process saw them.
    seen: HashMap<Uuid, Observed>,
    /// Revisions of partition records held by others, as this process saw them.
    watched: HashMap<u32, Observed>,
    /// When a load of the checkpoint store last succeeded: time since then is time this
    /// member could not watch others renew, which must not count towards their expiry.
    observed_at: Option<Instant>,
    /// A heartbeat or a take failed since the last successful load.
    blind: bool,
    /// Partitions whose task runs and has not been asked to release: dropping the sender asks.
    running: BTreeMap<u32, mpsc::Sender<()>>,
    tasks: JoinSet<(u32, PartitionEnd)>,
    status: watch::Sender<PartitionedStatus>,
}

/// Tries of one heartbeat when other members' heartbeats win the record first.
const HEARTBEAT_ATTEMPTS: u32 = 5;

/// A random wait up to `max`, so members that collided do not collide again in step.
fn jitter(max: Duration) -> Duration {
    // A v4 UUID's low 32 bits are random; no random-number crate for one draw.
    let draw = Uuid::new_v4().as_u128() as u32;
    max.mul_f64(f64::from(draw) / f64::from(u32::MAX))
}

/// Tries of one partition save when the checkpoint store is unavailable.
const SAVE_ATTEMPTS: u32 = 5;

impl<V: View> Coordinator<V> {
    async fn run(mut self, mut control: mpsc::Receiver<Control>) {
        let mut tick = tokio::time::interval(self.common.options.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                // None: every handle dropped, which shuts down as cleanly.
                command = control.recv() => break Ok(command.map(|Control::Shutdown(ack)| ack)),
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(e) = self.ended(joined, false) {
                        break Err(e);
                    }
                }
                _ = tick.tick() => if let Err(e) = self.round().await {
                    break Err(e);
                },
            }
        };
        let left = self.leave().await;
        let name = self.common.name.clone();
        match outcome {
            Ok(ack) => {
                match &left {
                    Ok(()) => {
                        tracing::info!(view = %name, member = %self.common.member, "left a partitioned view")
                    }
                    Err(e) => {
                        tracing::warn!(view = %name, member = %self.common.member, error = %e, "left a partitioned view; a partition was not released")
                    }
                }
                self.status.send_replace(PartitionedStatus::Stopped);
                if let Some(ack) = ack {
                    let _ = ack.send(left);
                }
            }
            Err(e) => {
                tracing::error!(view = %name, member = %self.common.member, error = %e, "partitioned view member failed");
                self.status
                    .send_replace(PartitionedStatus::Failed(Arc::new(e)));
            }
        }
        self.common.shared.changed.notify_waiters();
    }

    /// A partition task ended: forget it, and fail the member if it failed. While `leaving`,
    /// a partition lost or dropped is an error too: it was not released.
    fn ended(
        &mut self,
        joined: Result<(u32, PartitionEnd), tokio::task::JoinError>,
        leaving: bool,
    ) -> Result<(), ViewError> {
        let name = &self.common.name;
        let (partition, end) = joined.map_err(|e| ViewError::Failed {
            view: name.to_string(),
            reason: format!("a partition task ended abnormally: {e}"),
        })?;
        self.running.remove(&partition);
        self.common.shared.slots().remove(&partition);
        self.common.shared.changed.notify_waiters();
        match end {
            PartitionEnd::Released => {
                tracing::info!(view = %name, partition, "released a partition");
                Ok(())
            }
            PartitionEnd::Lost { expected } => {
                self.common.shared.lost.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    view = %name, partition, expected,
                    "another member took the partition over; dropped its unsaved state"
                );
                if leaving {
                    return Err(ViewError::Failed {
                        view: name.to_string(),
                        reason: format!(
                            "partition {partition} was taken over by another member before its \
                             release (its record was past revision {expected}); its unsaved \
                             work was dropped"
                        ),
                    });
                }
                Ok(())
            }
            PartitionEnd::Dropped(e) => {
                tracing::warn!(
                    view = %name, partition, error = %e,
                    "could not save the partition; dropped it until the store answers"
                );
                if leaving {
                    return Err(store_error(name, e));
                }
                Ok(())
            }
            PartitionEnd::Failed(e) => Err(e),
        }
    }

    /// One heartbeat and the moves it calls for.
    async fn round(&mut self) -> Result<(), ViewError> {
        match self.heartbeat().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    view = %self.common.name, attempts = HEARTBEAT_ATTEMPTS,
                    "heartbeat lost every race for the members record; the members seen last \
                     stand until the next"
                );
            }
            Err(ViewError::Store { source, .. }) if source.is_retryable() => {
                self.blind = true;
                tracing::warn!(view = %self.common.name, error = %source, "heartbeat failed; trying again at the next");
            }
            Err(e) => return Err(e),
        }
        let me = self.common.member;
        let count = self.live.len();
        for partition in 0..self.common.options.partitions {
            let assigned = self.live[partition as usize % count] == me;
            let held = self.common.shared.slots().contains_key(&partition);
            if held && !assigned {
                if self.running.remove(&partition).is_some() {
                    tracing::info!(view = %self.common.name, partition, members = count, "handing a partition over");
                }
            } else if assigned && !held {
                match self.take(partition).await {
                    Ok(()) => {}
                    Err(ViewError::Store { source, .. }) if source.is_retryable() => {
                        self.blind = true;
                        tracing::warn!(view = %self.common.name, partition, error = %source, "could not take a partition; trying again at the next heartbeat");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.common.shared.changed.notify_waiters();
        Ok(())
    }

    /// Notes a successful load of the checkpoint store. After a failed call, or a gap of more
    /// than two renewals since the last successful load (a stalled process, a store call held
    /// up), this member could not have seen others renew meanwhile: every beat and revision it
    /// watches starts its clock again now, so an outage of its own never expires a live peer.
    fn observed(&mut self) {
        let now = Instant::now();
        let gap = self
            .observed_at
            .map_or(Duration::MAX, |at| now.saturating_duration_since(at));
        if self.blind || gap > self.common.options.renew_every() * 2 {
            if !self.seen.is_empty() || !self.watched.is_empty() {
                tracing::info!(
                    view = %self.common.name, ?gap, blind = self.blind,
                    "the checkpoint store was out of sight; expiry clocks start again"
                );
            }
            for observed in self.seen.values_mut().chain(self.watched.values_mut()) {
                observed.since = now;
            }
        }
        self.blind = false;
        self.observed_at = Some(now);
    }

    /// Raises this member's beat in the members record (creating it for the first member),
    /// after dropping members whose beat this process has seen unchanged for their lease.
    /// Sets `live` and returns true once saved; false when other members' saves won every
    /// try (`live` then stays as it was).
    async fn heartbeat(&mut self) -> Result<bool, ViewError> {
        let common = self.common.clone();
        let name = &*common.name;
        let key = members_key(name);
        for _ in 0..HEARTBEAT_ATTEMPTS {
            let loaded = common
                .checkpoints
                .load(&key)
                .await
                .map_err(|e| store_error(name, e))?;
            self.observed();
            let (mut record, revision) = match loaded {
                None => (
                    MembersRecord {
                        partitions: common.options.partitions,
                        members: BTreeMap::new(),
                    },
                    None,
                ),
                Some(loaded) => (
                    decode::<MembersRecord>(name, "the members record", &loaded.saved.state)?,
                    Some(loaded.revision),
                ),
            };
            if record.partitions != common.options.partitions {
                return Err(common.partition_count_error(record.partitions));
            }
            self.seen.retain(|id, _| record.members.contains_key(id));
            let mut expired = Vec::new();
            for (id, entry) in &record.members {
                if *id == common.member {
                    continue;
                }
                let unchanged = observe(&mut self.seen, *id, entry.beat);
                let lease = common
                    .options
                    .lease
                    .max(Duration::from_millis(entry.lease_ms));
                if unchanged >= lease {
                    expired.push(*id);
                }
            }
            for id in &expired {
                tracing::info!(view = %name, member = %id, "a member stopped beating; removing it");
                record.members.remove(id);
            }
            self.beat += 1;
            record.members.insert(
                common.member,
                MemberEntry {
                    beat: self.beat,
                    lease_ms: common.lease_ms(),
                },
            );
            let saved = SavedView {
                positions: BTreeMap::new(),
                state: encode(name, &record)?,
            };
            match common
                .checkpoints
                .save(&key, &saved, revision, Uuid::now_v7())
                .await
            {
                Ok(_) => {
                    self.live = record.members.keys().copied().collect();
                    common
                        .shared
                        .members
                        .store(self.live.len(), Ordering::Relaxed);
                    return Ok(true);
                }
                // Another member beat first: read its beat and try again, after a short
                // random wait so the members that collided spread out.
                Err(Error::WrongExpectedVersion { .. }) => {
                    tokio::time::sleep(jitter(common.options.renew_every() / 10)).await;
                    continue;
                }
                Err(e) => return Err(store_error(name, e)),
            }
        }
        // Lost every race this round; the members seen last time stand until the next.
        Ok(false)
    }

    /// Takes `partition` if its record is free, this member's own (a task that ended), or
    /// unchanged for a whole lease by this process's clock; then runs it.
    async fn take(&mut self, partition: u32) -> Result<(), ViewError> {
        let common = self.common.clone();
        let name = &*common.name;
        let key = partition_key(name, partition);
        let loaded = common
            .checkpoints
            .load(&key)
            .await
            .map_err(|e| store_error(name, e))?;
        self.observed();
        let (positions, record, revision) = match loaded {
            None => (BTreeMap::new(), None, None),
            Some(loaded) => {
                let record: PartitionRecord =
                    decode(name, "a partition record", &loaded.saved.state)?;
                (loaded.saved.positions, Some(record), Some(loaded.revision))
            }
        };
        if let (Some(record), Some(revision)) = (&record, revision) {
            if record.partitions != common.options.partitions {
                return Err(common.partition_count_error(record.partitions));
            }
            match record.owner {
                None => {}
                Some(owner) if owner == common.member => {}
                Some(owner) => {
                    let lease = common
                        .options
                        .lease
                        .max(Duration::from_millis(record.lease_ms));
                    let unchanged = observe(&mut self.watched, partition, revision);
                    if unchanged < lease {
                        return Ok(());
                    }
                    tracing::info!(
                        view = %name, partition, %owner, ?unchanged,
                        "taking over a partition whose lease expired"
                    );
                }
            }
        }
        let state: V::State = match &record {
            Some(record) => decode(name, "a partition's state", &record.state)?,
            None => V::State::default(),
        };
        let state_bytes = match record {
            Some(record) => record.state,
            None => encode(name, &state)?,
        };
        let taken = PartitionRecord {
            owner: Some(common.member),
            lease_ms: common.lease_ms(),
            partitions: common.options.partitions,
            state: state_bytes,
        };
        let saved = SavedView {
            positions: positions.clone(),
            state: encode(name, &taken)?,
        };
        let revision = match common
            .checkpoints
            .save(&key, &saved, revision, Uuid::now_v7())
            .await
        {
            Ok(revision) => revision,
            // Another member took it (or its owner renewed) first.
            Err(Error::WrongExpectedVersion { .. }) => {
                self.watched.remove(&partition);
                return Ok(());
            }
            Err(e) => return Err(store_error(name, e)),
        };
        self.watched.remove(&partition);
        tracing::info!(view = %name, partition, revision, "took a partition");
        let state = Arc::new(RwLock::new(state));
        let (status_tx, status_rx) = watch::channel(ViewStatus::Starting);
        common.shared.slots().insert(
            partition,
            Slot {
                state: state.clone(),
                status: status_rx,
            },
        );
        let (release_tx, release_rx) = mpsc::channel(1);
        self.running.insert(partition, release_tx);
        let task = PartitionTask {
            common: common.clone(),
            partition,
            key,
            state,
            status: status_tx,
            positions,
            revision,
            unsaved: 0,
            first_unsaved: None,
            last_saved: Instant::now(),
        };
        self.tasks.spawn(async move {
            let end = match AssertUnwindSafe(task.run(release_rx)).catch_unwind().await {
                Ok(end) => end,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    PartitionEnd::Failed(ViewError::Failed {
                        view: common.name.to_string(),
                        reason: format!("partition {partition} panicked: {message}"),
                    })
                }
            };
            (partition, end)
        });
        self.common.shared.changed.notify_waiters();
        Ok(())
    }

    /// Leaves the members record, then releases every partition (each saves first). Leaving
    /// first lets the others count this member gone while it saves: they are assigned its
    /// partitions and take each as soon as its release lands, instead of a heartbeat later.
    /// Returns the first partition that was not released.
    async fn leave(&mut self) -> Result<(), ViewError> {
        self.leave_members().await;
        self.running.clear();
        let mut first = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = self.ended(joined, true) {
                tracing::error!(view = %self.common.name, error = %e, "a partition was not released while leaving");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Removes this member from the members record (others drop it after its lease when that
    /// fails).
    async fn leave_members(&mut self) {
        let common = self.common.clone();
        let key = members_key(&common.name);
        for _ in 0..HEARTBEAT_ATTEMPTS {
            let Ok(Some(loaded)) = common.checkpoints.load(&key).await else {
                break;
            };
            let Ok(mut record) =
                decode::<MembersRecord>(&common.name, "the members record", &loaded.saved.state)
            else {
                break;
            };
            if record.members.remove(&common.member).is_none() {
                break;
            }
            let Ok(state) = encode(&common.name, &record) else {
                break;
            };
            let saved = SavedView {
                positions: BTreeMap::new(),
                state,
            };
            match common
                .checkpoints
                .save(&key, &saved, Some(loaded.revision), Uuid::now_v7())
                .await
            {
                Ok(_) => break,
                Err(Error::WrongExpectedVersion { .. }) => continue,
                Err(e) => {
                    // Others drop this member after its lease instead.
                    tracing::warn!(view = %common.name, error = %e, "could not leave the members record");
                    break;
                }
            }
        }
    }
}

/// Why a partition's subscription loop returned.
enum Next {
    Resubscribe,
    Release,
}

/// One partition this member holds: follows the view's categories from the partition's
/// positions, hands it the events of its streams, saves with the lease, renews while idle.
struct PartitionTask<V: View> {
    common: Arc<Common<V>>,
    partition: u32,
    key: String,
    state: Arc<RwLock<V::State>>,
    status: watch::Sender<ViewStatus>,
    positions: BTreeMap<String, Checkpoint>,
    revision: u64,
    /// Events of this partition handled since the last save.
    unsaved: usize,
    first_unsaved: Option<Instant>,
    last_saved: Instant,
}

impl<V: View> PartitionTask<V> {
    async fn run(mut self, mut release: mpsc::Receiver<()>) -> PartitionEnd {
        let end = loop {
            match self.follow(&mut release).await {
                Ok(Next::Resubscribe) => continue,
                Ok(Next::Release) => {
                    break match self.save(None).await {
                        Ok(()) => PartitionEnd::Released,
                        Err(end) => end,
                    }
                }
                Err(end) => break end,
            }
        };
        let status = match &end {
            PartitionEnd::Failed(e) => ViewStatus::Failed(Arc::new(ViewError::Failed {
                view: self.common.name.to_string(),
                reason: e.to_string(),
            })),
            _ => ViewStatus::Stopped,
        };
        self.status.send_replace(status);
        self.common.shared.changed.notify_waiters();
        end
    }

    fn set_status(&self, status: ViewStatus) {
        self.status.send_replace(status);
        self.common.shared.changed.notify_waiters();
    }

    /// When the next save is due: a renewal every quarter lease, sooner for unsaved events.
    fn save_due(&self) -> Instant {
        let renew = self.last_saved + self.common.options.renew_every();
        match self.first_unsaved {
            Some(first) => renew.min(first + self.common.options.save_interval),
            None => renew,
        }
    }

    async fn follow(&mut self, release: &mut mpsc::Receiver<()>) -> Result<Next, PartitionEnd> {
        self.set_status(ViewStatus::Replaying);
        let common = self.common.clone();
        let categories = common.view.categories();
        let subscriptions = categories.iter().map(|category| {
            let start = match self.positions.get(category.as_str()) {
                Some(c) => Start::After(c.clone()),
                None => Start::Beginning,
            };
            // A live subscription never ends; one that does is resubscribed, not lost.
            let ended = Error::Unavailable {
                backend: common.store.backend(),
                message: format!("the subscription to category {category} ended"),
                source: None,
            };
            common
                .store
                .subscribe(
                    Selector::Category(category.clone()),
                    start,
                    SubscriptionMode::HotCold,
                )
                .chain(futures::stream::iter([Err(ended)]))
        });
        let mut merged = select_all(subscriptions);
        let mut caught_up = 0;
        let partitions = common.options.partitions;
        let me = Some(common.member);
        loop {
            let due = tokio::time::Instant::from_std(self.save_due());
            tokio::select! {
                _ = release.recv() => return Ok(Next::Release),
                item = merged.next() => match item {
                    Some(Ok(SubscriptionItem::Event(event))) => {
                        if partition_of(&event.stream, partitions) == self.partition {
                            self.handle(&event).await?;
                            self.unsaved += 1;
                            self.first_unsaved.get_or_insert_with(Instant::now);
                        }
                        // Every event moves the position, so a restart does not read the
                        // other partitions' events again; saved at the next save.
                        match self.positions.get_mut(event.stream.category_name()) {
                            Some(position) => position.clone_from(&event.checkpoint),
                            None => {
                                self.positions.insert(
                                    event.stream.category_name().to_owned(),
                                    event.checkpoint.clone(),
                                );
                            }
                        }
                        if self.unsaved >= common.options.save_every {
                            self.save(me).await?;
                        }
                    }
                    Some(Ok(SubscriptionItem::CaughtUp)) => {
                        caught_up += 1;
                        if caught_up == categories.len() {
                            self.save(me).await?;
                            self.set_status(ViewStatus::Live);
                        }
                    }
                    Some(Err(e)) if e.is_retryable() => {
                        tracing::warn!(view = %common.name, partition = self.partition, error = %e, "store unavailable; resubscribing");
                        tokio::time::sleep(common.options.retry_delay).await;
                        return Ok(Next::Resubscribe);
                    }
                    Some(Err(e)) => return Err(PartitionEnd::Failed(store_error(&common.name, e))),
                    None => unreachable!("each subscription ends with an error item first"),
                },
                _ = tokio::time::sleep_until(due) => self.save(me).await?,
            }
        }
    }

    /// Hands `event` to the view under its failure policy, as the single-process runner does.
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), PartitionEnd> {
        let common = self.common.clone();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let refused = {
                let mut state = self.state.write().await;
                common.view.handle(&mut state, event).await
            };
            let Err(source) = refused else {
                common.shared.handled.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            };
            let error = refusal(&common.name, event, source);
            let retry = common
                .policy
                .retry
                .filter(|r| attempts <= r.retries && !matches!(error, ViewError::Decode { .. }));
            if let Some(retry) = retry {
                let delay = retry.delay(attempts);
                tracing::warn!(
                    view = %common.name, partition = self.partition, error = %error,
                    attempt = attempts, ?delay, "view refused an event; retrying"
                );
                // The lease is renewed by saves, and none happens during this wait: a wait
                // past the lease lets another member take the partition if one is assigned it
                // meanwhile (a rebalance, or this member dropped from the members record), and
                // then the next save is refused and the new owner meets the event again.
                // Under steady membership nobody else is assigned it, so it stays here.
                tokio::time::sleep(delay).await;
                continue;
            }
            match common.policy.then {
                OnFailure::Skip => {
                    tracing::warn!(
                        view = %common.name, error = %error, attempts, event_id = %event.event_id,
                        "view refused an event; skipped"
                    );
                }
                OnFailure::Park => {
                    self.park(event, &error, attempts).await?;
                    tracing::warn!(
                        view = %common.name, error = %error, attempts, event_id = %event.event_id,
                        "view refused an event; parked in its dead-letter stream"
                    );
                }
                _ => return Err(PartitionEnd::Failed(error)),
            }
            return Ok(());
        }
    }

    /// Appends `event`'s dead-letter record, with the id the single-process runner uses, so a
    /// redelivered event (after a takeover) is stored once.
    async fn park(
        &self,
        event: &RecordedEvent,
        error: &ViewError,
        attempts: u32,
    ) -> Result<(), PartitionEnd> {
        let common = &self.common;
        let stream = common
            .dead_letters
            .clone()
            .expect("a view that parks has its dead-letter stream from start");
        let failed = |source: Error| {
            PartitionEnd::Failed(ViewError::Park {
                view: common.name.to_string(),
                stream: event.stream.clone(),
                version: event.version,
                dead_letters: stream.clone(),
                source,
            })
        };
        let record = DeadLetter::new(&common.name, event, &error.to_string(), attempts);
        let mut data = EventData::json(DEAD_LETTER_EVENT_TYPE, &record)
            .map_err(failed)?
            .with_id(dead_letter_id(&common.name, event.event_id))
            .with_causation_id(event.event_id);
        if let Some(correlation_id) = event.metadata.correlation_id {
            data = data.with_correlation_id(correlation_id);
        }
        let mut attempt = 1;
        loop {
            match common
                .store
                .append(&stream, ExpectedVersion::Any, vec![data.clone()])
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < SAVE_ATTEMPTS => {
                    tokio::time::sleep(common.options.retry_delay * attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(failed(e)),
            }
        }
    }

    /// Saves positions, state and lease as one record, expecting the revision this task last
    /// wrote: a takeover in between refuses it ([`PartitionEnd::Lost`]). `owner` None releases.
    async fn save(&mut self, owner: Option<Uuid>) -> Result<(), PartitionEnd> {
        let common = self.common.clone();
        let name = &*common.name;
        let state = {
            let state = self.state.read().await;
            encode(name, &*state).map_err(PartitionEnd::Failed)?
        };
        let record = PartitionRecord {
            owner,
            lease_ms: common.lease_ms(),
            partitions: common.options.partitions,
            state,
        };
        let saved = SavedView {
            positions: self.positions.clone(),
            state: encode(name, &record).map_err(PartitionEnd::Failed)?,
        };
        // One id across retries: a re-sent save that had landed answers with its revision.
        let save_id = Uuid::now_v7();
        let mut attempt = 1;
        loop {
            match common
                .checkpoints
                .save(&self.key, &saved, Some(self.revision), save_id)
                .await
            {
                Ok(revision) => {
                    self.revision = revision;
                    self.unsaved = 0;
                    self.first_unsaved = None;
                    self.last_saved = Instant::now();
                    return Ok(());
                }
                Err(Error::WrongExpectedVersion { .. }) => {
                    return Err(PartitionEnd::Lost {
                        expected: self.revision,
                    })
                }
                Err(e) if e.is_retryable() && attempt < SAVE_ATTEMPTS => {
                    tracing::warn!(view = %name, partition = self.partition, error = %e, attempt, "partition save failed; retrying");
                    tokio::time::sleep(common.options.retry_delay * attempt).await;
                    attempt += 1;
                }
                Err(e) if e.is_retryable() => return Err(PartitionEnd::Dropped(e)),
                Err(e) => return Err(PartitionEnd::Failed(store_error(name, e))),
            }
        }
    }
}

/// The typed error of a refusal, as the single-process runner classifies it: a decode or upcast
/// failure is [`ViewError::Decode`] (never retried), anything else [`ViewError::Handler`].
fn refusal(view: &str, event: &RecordedEvent, source: BoxError) -> ViewError {
    let handler = |source: BoxError| ViewError::Handler {
        view: view.to_owned(),
        stream: event.stream.clone(),
        version: event.version,
        source,
    };
    match source.downcast::<Error>() {
        Ok(e)
            if matches!(
                *e,
                Error::Decode { .. } | Error::UnknownSchemaVersion { .. } | Error::Upcast { .. }
            ) =>
        {
            ViewError::Decode {
                view: view.to_owned(),
                source: *e,
            }
        }
        Ok(e) => handler(e),
        Err(source) => handler(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash is FNV-1a's published one: these values must never change, or a new release
    /// would move streams between partitions under running views.
    #[test]
    fn the_partition_hash_is_fnv1a_and_never_changes() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let category = Category::new("account").unwrap();
        let stream = StreamId::new(&category, "42").unwrap();
        assert_eq!(
            partition_of(&stream, 7),
            (fnv1a64(b"account-42") % 7) as u32
        );
        assert_eq!(partition_of(&stream, 1), 0);
    }
}
