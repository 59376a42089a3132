//! The partitioned view runner: members share a view's partitions through leases kept in the
//! checkpoint store. A member killed without a word has its partitions taken over after the
//! lease; a stalled owner is fenced by the record's revision; a joining member gets its share; a
//! clean shutdown hands over at once; a changed partition count and bad input are typed errors.
//! Every scenario checks the saved partition states against a single-process rebuild, with each
//! event applied exactly once. On memory (runners in runtimes of their own, one shut down
//! abruptly), and with three child processes, one SIGKILLed, on every server configured.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use newton::store::{EventData, EventStore, ExpectedVersion};
use newton::{
    dead_letters, load_partitions, members_key, partition_of, BoxError, Category, CheckpointStore,
    Error, EventStoreCheckpointStore, FailurePolicy, InMemoryCheckpointStore, LoadedCheckpoint,
    MemberOverview, OnFailure, PartitionOptions, PartitionedStatus, PartitionedViewHandle,
    PartitionedViewRunner, RecordedEvent, SavedView, StreamId, Uuid, View, ViewError, ViewRunner,
    MAX_PARTITIONS, MIN_LEASE,
};
use support::fresh_id;
use tokio::sync::watch;

// ---- The view: the versions applied, per stream --------------------------------------------

/// Records, per stream, every version it was handed, in order. A duplicate or a gap in the
/// saved lists is an event applied twice or never.
struct Versions {
    name: String,
    category: Category,
}

type VersionsState = BTreeMap<String, Vec<u64>>;

#[async_trait]
impl View for Versions {
    type State = VersionsState;
    fn name(&self) -> &str {
        &self.name
    }
    fn categories(&self) -> Vec<Category> {
        vec![self.category.clone()]
    }
    async fn handle(
        &self,
        state: &mut VersionsState,
        event: &RecordedEvent,
    ) -> Result<(), BoxError> {
        state
            .entry(event.stream.to_string())
            .or_default()
            .push(event.version.value());
        Ok(())
    }
}

/// A fresh view over a fresh category, so runs never meet earlier runs' records or events.
struct Scenario {
    name: String,
    category: Category,
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    /// Events appended per stream so far.
    appended: BTreeMap<String, u64>,
    /// Events per append: more than one where appends are slow (a loaded server).
    batch: u64,
}

impl Scenario {
    fn new(store: Arc<dyn EventStore>) -> Self {
        let id = fresh_id();
        Self {
            name: format!("versions-{}", &id[..12]),
            category: Category::new(format!("pv_{}", &id[..12])).unwrap(),
            checkpoints: Arc::new(EventStoreCheckpointStore::new(store.clone())),
            store,
            appended: BTreeMap::new(),
            batch: 1,
        }
    }

    fn view(&self) -> Versions {
        Versions {
            name: self.name.clone(),
            category: self.category.clone(),
        }
    }

    fn runner(&self, options: PartitionOptions) -> PartitionedViewRunner {
        PartitionedViewRunner::new(self.store.clone(), self.checkpoints.clone(), options)
    }

    fn stream(&self, i: usize) -> StreamId {
        StreamId::new(&self.category, format!("s{i}")).unwrap()
    }

    /// Appends `per_stream` events to each stream of `streams`, `batch` per append, going
    /// round the streams so the category interleaves them; calls `halfway` after half.
    async fn append(
        &mut self,
        streams: std::ops::Range<usize>,
        per_stream: u64,
        mut halfway: impl FnMut(),
    ) {
        assert_eq!(per_stream % self.batch, 0, "whole batches");
        let total = streams.len() as u64 * per_stream / self.batch;
        let mut done = 0;
        for _ in 0..per_stream / self.batch {
            for i in streams.clone() {
                let stream = self.stream(i);
                let events = (0..self.batch)
                    .map(|_| EventData::json("Happened", &serde_json::json!({ "i": i })).unwrap())
                    .collect();
                self.store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .unwrap();
                *self.appended.entry(stream.to_string()).or_default() += self.batch;
                done += 1;
                if done == total / 2 {
                    halfway();
                }
            }
        }
    }

    /// The saved partitions, combined, after checking that each partition holds only streams
    /// that hash to it (so no stream is in two).
    async fn saved(&self) -> (VersionsState, Vec<Option<Uuid>>) {
        let partitions = load_partitions::<VersionsState>(self.checkpoints.as_ref(), &self.name)
            .await
            .unwrap();
        let mut combined = VersionsState::new();
        let mut owners = Vec::new();
        let count = partitions.len() as u32;
        for partition in partitions {
            owners.push(partition.owner);
            for (stream, versions) in partition.state {
                assert_eq!(
                    partition_of(&StreamId::parse(&stream).unwrap(), count),
                    partition.partition,
                    "{stream} saved in partition {}",
                    partition.partition
                );
                assert!(combined.insert(stream, versions).is_none());
            }
        }
        (combined, owners)
    }

    /// The owners and revisions of the partition records.
    async fn revisions(&self) -> (Vec<Option<Uuid>>, Vec<Option<u64>>) {
        load_partitions::<VersionsState>(self.checkpoints.as_ref(), &self.name)
            .await
            .unwrap()
            .into_iter()
            .map(|p| (p.owner, p.revision))
            .unzip()
    }

    /// Waits until the saved partitions have every appended event and `owners_ok` holds for
    /// their owners, then checks each event was applied exactly once. Polls the store: the
    /// saves land at their own pace.
    async fn wait_saved(&self, within: Duration, owners_ok: impl Fn(&[Option<Uuid>]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let (combined, owners) = self.saved().await;
            let complete = self.appended.iter().all(|(stream, count)| {
                combined.get(stream).map_or(0, |v| v.len() as u64) >= *count
            });
            if complete && owners_ok(&owners) {
                self.assert_each_event_once(&combined);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "saved partitions incomplete after {within:?}: owners {owners:?}, {} of {} \
                 streams complete",
                self.appended
                    .iter()
                    .filter(|(s, c)| combined.get(*s).map_or(0, |v| v.len() as u64) >= **c)
                    .count(),
                self.appended.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn assert_each_event_once(&self, combined: &VersionsState) {
        let expected: VersionsState = self
            .appended
            .iter()
            .map(|(stream, count)| (stream.clone(), (0..*count).collect()))
            .collect();
        assert_eq!(
            combined, &expected,
            "each event applied once, in order, nothing else"
        );
    }

    /// What one single-process runner builds from scratch.
    async fn rebuild(&self) -> VersionsState {
        let handle = ViewRunner::new(self.store.clone(), Arc::new(InMemoryCheckpointStore::new()))
            .start(self.view())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), handle.wait_until_live())
            .await
            .expect("the rebuild catches up")
            .unwrap();
        let state = handle.read(|s| s.clone()).await;
        handle.stop().await.unwrap();
        state
    }

    /// The saved state equals a single-process rebuild.
    async fn assert_equals_rebuild(&self) {
        let (combined, _) = self.saved().await;
        assert_eq!(
            combined,
            self.rebuild().await,
            "saved partitions vs. a rebuild"
        );
    }
}

fn quick(partitions: u32, lease: Duration) -> PartitionOptions {
    PartitionOptions::new(partitions)
        .with_lease(lease)
        .with_save_interval(Duration::from_millis(100))
}

/// A runner in a runtime of its own, so a test can end it abruptly: shutting the runtime down
/// drops its tasks where they stand, with no release, no last save and no farewell, as a killed
/// process would.
struct Node {
    runtime: Option<tokio::runtime::Runtime>,
    handle: PartitionedViewHandle<Versions>,
}

impl Node {
    async fn start(runner: PartitionedViewRunner, view: Versions) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime
            .spawn(async move { runner.start(view).await })
            .await
            .unwrap()
            .unwrap();
        Self {
            runtime: Some(runtime),
            handle,
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Awaits a member's `wait_until` for at most 20 s.
async fn within(wait: impl std::future::Future<Output = Result<(), ViewError>>) {
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("reached within 20 s")
        .unwrap();
}

/// Waits until `condition` holds for the overviews of `handles` together.
async fn wait_all(
    handles: &[&PartitionedViewHandle<Versions>],
    within: Duration,
    condition: impl Fn(&[MemberOverview]) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let overviews: Vec<MemberOverview> = handles.iter().map(|h| h.overview()).collect();
        if condition(&overviews) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not reached within {within:?}: {overviews:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every partition held by exactly one of `overviews`, each holding `share` (any share when
/// None), all caught up.
fn split(overviews: &[MemberOverview], partitions: u32, share: Option<usize>) -> bool {
    let mut held = Vec::new();
    for o in overviews {
        if !o.all_live() || share.is_some_and(|s| o.partitions.len() != s) {
            return false;
        }
        held.extend(o.owned());
    }
    held.sort_unstable();
    held == (0..partitions).collect::<Vec<_>>()
}

// ---- On memory -----------------------------------------------------------------------------

/// Three members share six partitions, two each. One is ended abruptly (its runtime dropped:
/// no release, no last save) while events are being appended; the other two take its
/// partitions once they have seen its records unchanged for a lease, not before, and the saved
/// states hold each event once and equal a single-process rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_killed_member_s_partitions_are_taken_over_each_event_once() {
    let mut scenario = Scenario::new(support::store());
    let lease = Duration::from_millis(1000);
    let options = quick(6, lease);
    scenario.append(0..30, 3, || {}).await;
    let mut a = Node::start(scenario.runner(options), scenario.view()).await;
    let mut b = Node::start(scenario.runner(options), scenario.view()).await;
    let mut c = Node::start(scenario.runner(options), scenario.view()).await;
    wait_all(
        &[&a.handle, &b.handle, &c.handle],
        Duration::from_secs(20),
        |o| split(o, 6, Some(2)) && o.iter().all(|o| o.members == 3),
    )
    .await;
    let killed: Vec<u32> = c.handle.overview().owned();

    let (killed_tx, mut killed_rx) = watch::channel(false);
    let appending = {
        let mut scenario = Scenario {
            appended: BTreeMap::new(),
            checkpoints: scenario.checkpoints.clone(),
            store: scenario.store.clone(),
            name: scenario.name.clone(),
            category: scenario.category.clone(),
            batch: 1,
        };
        tokio::spawn(async move {
            scenario
                .append(15..45, 3, || {
                    let _ = killed_tx.send(true);
                })
                .await;
            scenario.appended
        })
    };
    killed_rx.wait_for(|k| *k).await.unwrap();
    c.kill();
    let killed_at = Instant::now();
    for (stream, count) in appending.await.unwrap() {
        *scenario.appended.entry(stream).or_default() += count;
    }
    wait_all(&[&a.handle, &b.handle], Duration::from_secs(20), |o| {
        split(o, 6, Some(3))
    })
    .await;
    let took = killed_at.elapsed();
    // C renewed at most a quarter lease before it died; nobody may take its partitions before
    // they have stood unchanged for a lease.
    assert!(
        took >= lease * 3 / 4,
        "C's partitions {killed:?} were taken {took:?} after it died, within its lease"
    );
    let (a_id, b_id) = (a.handle.member_id(), b.handle.member_id());
    scenario
        .wait_saved(Duration::from_secs(20), |owners| {
            owners.iter().all(|o| *o == Some(a_id) || *o == Some(b_id))
        })
        .await;
    scenario.assert_equals_rebuild().await;
    a.handle.shutdown().await.unwrap();
    b.handle.shutdown().await.unwrap();
    a.kill();
    b.kill();
}

/// A member joins a running one and gets half of eight partitions while events arrive; the
/// one that leaves cleanly hands its partitions over at once (well within a lease), and the
/// last one to leave releases them all. Each event is saved once throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_joining_member_gets_half_and_a_clean_shutdown_releases_at_once() {
    let mut scenario = Scenario::new(support::store());
    let lease = Duration::from_secs(4);
    let options = quick(8, lease);
    scenario.append(0..20, 2, || {}).await;
    let a = scenario
        .runner(options)
        .start(scenario.view())
        .await
        .unwrap();
    within(a.wait_until(|o| o.partitions.len() == 8 && o.all_live())).await;
    // Idle, it still renews every partition's lease, well within a lease.
    let (_, revisions) = scenario.revisions().await;
    let deadline = Instant::now() + lease / 2;
    loop {
        let (_, now) = scenario.revisions().await;
        if now.iter().zip(&revisions).all(|(n, r)| n > r) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "renewed within half a lease: {revisions:?} then {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = scenario
        .runner(options)
        .start(scenario.view())
        .await
        .unwrap();
    scenario.append(10..30, 2, || {}).await;
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 8, Some(4)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    scenario
        .wait_saved(Duration::from_secs(10), |owners| {
            owners.iter().all(|o| o.is_some())
        })
        .await;
    assert_eq!(
        (a.lost(), b.lost()),
        (0, 0),
        "a join hands partitions over by release, never by a takeover"
    );

    let leaving = b.overview().owned();
    let b_id = b.member_id();
    let started = Instant::now();
    b.shutdown().await.unwrap();
    assert!(matches!(b.status(), PartitionedStatus::Stopped));
    let (_, owners) = scenario.saved().await;
    for partition in &leaving {
        assert_ne!(
            owners[*partition as usize],
            Some(b_id),
            "partition {partition} still held after a clean shutdown"
        );
    }
    within(a.wait_until(|o| o.partitions.len() == 8 && o.all_live() && o.members == 1)).await;
    let took = started.elapsed();
    assert!(
        took < lease / 2,
        "a clean handover took {took:?}; an expiry would take a lease ({lease:?})"
    );
    scenario.append(0..30, 1, || {}).await;
    let a_id = a.member_id();
    scenario
        .wait_saved(Duration::from_secs(10), |owners| {
            owners.iter().all(|o| *o == Some(a_id))
        })
        .await;
    scenario.assert_equals_rebuild().await;

    a.shutdown().await.unwrap();
    let (_, owners) = scenario.saved().await;
    assert_eq!(owners, vec![None; 8], "the last member released everything");
    // The members record is empty, and a new member starts at once with every partition.
    let c = scenario
        .runner(options)
        .start(scenario.view())
        .await
        .unwrap();
    let started = Instant::now();
    within(c.wait_until(|o| o.partitions.len() == 8 && o.all_live() && o.members == 1)).await;
    assert!(started.elapsed() < lease / 2, "{:?}", started.elapsed());
    c.shutdown().await.unwrap();
    scenario.assert_equals_rebuild().await;
}

/// A checkpoint store that can hold every call of one member, as a long pause (a stop-the-world
/// stall, a network partition) would: the member still runs and handles events, but nothing it
/// saves or reads gets through until released.
#[derive(Debug)]
struct Stallable {
    inner: Arc<dyn CheckpointStore>,
    stalled: watch::Receiver<bool>,
}

impl Stallable {
    async fn pass(&self) {
        let mut stalled = self.stalled.clone();
        let _ = stalled.wait_for(|s| !*s).await;
    }
}

#[async_trait]
impl CheckpointStore for Stallable {
    async fn load(&self, view: &str) -> Result<Option<LoadedCheckpoint>, Error> {
        self.pass().await;
        self.inner.load(view).await
    }

    async fn save(
        &self,
        view: &str,
        saved: &SavedView,
        expected: Option<u64>,
        save_id: Uuid,
    ) -> Result<u64, Error> {
        self.pass().await;
        self.inner.save(view, saved, expected, save_id).await
    }
}

/// A member stalls (its checkpoint calls held) while holding partitions and handling events.
/// The other takes them over after the lease; when the stall ends, the stalled member's saves
/// are refused by the records' revisions, so it drops what it handled and never saved, and the
/// saved states still hold each event once. Then the two share the partitions again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_stalled_owner_is_fenced_once_its_partitions_are_taken_over() {
    let mut scenario = Scenario::new(support::store());
    let lease = Duration::from_millis(800);
    let options = quick(4, lease);
    scenario.append(0..12, 2, || {}).await;
    let (stall, stalled) = watch::channel(false);
    let a_checkpoints: Arc<dyn CheckpointStore> = Arc::new(Stallable {
        inner: scenario.checkpoints.clone(),
        stalled,
    });
    let a = PartitionedViewRunner::new(scenario.store.clone(), a_checkpoints, options)
        .start(scenario.view())
        .await
        .unwrap();
    let b = scenario
        .runner(options)
        .start(scenario.view())
        .await
        .unwrap();
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 4, Some(2)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    let a_partitions = a.overview().owned();

    stall.send_replace(true);
    let handled = a.handled();
    scenario.append(0..12, 2, || {}).await;
    // A handles the new events of its partitions in memory, but cannot save them.
    let streams_of_a = (0..12)
        .filter(|i| a_partitions.contains(&partition_of(&scenario.stream(*i), 4)))
        .count() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.handled() < handled + 2 * streams_of_a {
        assert!(Instant::now() < deadline, "A handles while stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B takes A's partitions once A's records and beat stood still for a lease.
    within(b.wait_until(|o| o.partitions.len() == 4 && o.all_live() && o.members == 1)).await;
    let b_id = b.member_id();
    scenario
        .wait_saved(Duration::from_secs(10), |owners| {
            owners.iter().all(|o| *o == Some(b_id))
        })
        .await;

    // The stall ends: A's pending saves meet revisions B wrote and are refused.
    stall.send_replace(false);
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 4, Some(2)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    assert!(matches!(a.status(), PartitionedStatus::Running));
    assert_eq!(
        (a.lost(), b.lost()),
        (a_partitions.len() as u64, 0),
        "A's saves after the stall were refused, for each partition it held"
    );
    scenario.append(0..12, 1, || {}).await;
    scenario
        .wait_saved(Duration::from_secs(10), |owners| {
            owners.iter().all(|o| o.is_some())
        })
        .await;
    scenario.assert_equals_rebuild().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Faults a member's checkpoint store can be given, one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Every call passes.
    None,
    /// Saves of the members record wait until the fault changes (a heartbeat held up while the
    /// partitions' saves pass).
    StallMembersSaves,
    /// Every call fails with `Unavailable` (a store outage).
    Down,
    /// Saves of partition records fail with `Unavailable`; the members record passes.
    PartitionSavesDown,
    /// Saves of the members record are refused as if another member saved first.
    MembersSavesConflict,
    /// Saves of partition records wait until the fault changes; the members record passes.
    StallPartitionSaves,
}

/// A checkpoint store with injected faults, switched by a watch channel; `conflicts` limits
/// how many members saves `MembersSavesConflict` refuses.
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn CheckpointStore>,
    fault: watch::Receiver<Fault>,
    conflicts: AtomicUsize,
}

impl Faulty {
    fn new(inner: Arc<dyn CheckpointStore>, fault: watch::Receiver<Fault>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fault,
            conflicts: AtomicUsize::new(usize::MAX),
        })
    }

    fn unavailable(key: &str) -> Error {
        Error::Unavailable {
            backend: "faulty",
            message: format!("injected outage at {key}"),
            source: None,
        }
    }
}

#[async_trait]
impl CheckpointStore for Faulty {
    async fn load(&self, view: &str) -> Result<Option<LoadedCheckpoint>, Error> {
        if *self.fault.borrow() == Fault::Down {
            return Err(Self::unavailable(view));
        }
        self.inner.load(view).await
    }

    async fn save(
        &self,
        view: &str,
        saved: &SavedView,
        expected: Option<u64>,
        save_id: Uuid,
    ) -> Result<u64, Error> {
        let members = view.ends_with("@members");
        let fault = *self.fault.borrow();
        match fault {
            Fault::Down => return Err(Self::unavailable(view)),
            Fault::PartitionSavesDown if !members => return Err(Self::unavailable(view)),
            Fault::StallMembersSaves if members => {
                let mut fault = self.fault.clone();
                let _ = fault.wait_for(|f| *f != Fault::StallMembersSaves).await;
            }
            Fault::StallPartitionSaves if !members => {
                let mut fault = self.fault.clone();
                let _ = fault.wait_for(|f| *f != Fault::StallPartitionSaves).await;
            }
            Fault::MembersSavesConflict if members => {
                let left = self.conflicts.load(Ordering::SeqCst);
                if left > 0 {
                    self.conflicts.store(left - 1, Ordering::SeqCst);
                    return Err(Error::WrongExpectedVersion {
                        stream: StreamId::parse("faulty-members").unwrap(),
                        expected: ExpectedVersion::Any,
                        actual: None,
                    });
                }
            }
            _ => {}
        }
        self.inner.save(view, saved, expected, save_id).await
    }
}

/// A member whose heartbeats lose every race (more than one heartbeat's tries) still returns
/// from `start` registered: a second member counts it. One that cannot register within two
/// leases gets a retryable `Unavailable` instead of a start that counts only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_start_returns_only_once_registered() {
    let scenario = Scenario::new(support::store());
    let options = quick(4, Duration::from_millis(400));
    let (_fault, faulted) = watch::channel(Fault::MembersSavesConflict);
    let faulty = Faulty::new(scenario.checkpoints.clone(), faulted);
    faulty.conflicts.store(8, Ordering::SeqCst);
    let a = PartitionedViewRunner::new(scenario.store.clone(), faulty.clone(), options)
        .start(scenario.view())
        .await
        .unwrap();
    assert_eq!(
        faulty.conflicts.load(Ordering::SeqCst),
        0,
        "every conflict met"
    );
    assert_eq!(a.overview().members, 1, "A counts itself once registered");
    let b = scenario
        .runner(options)
        .start(scenario.view())
        .await
        .unwrap();
    assert_eq!(b.overview().members, 2, "B counts A: A registered");
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 4, Some(2)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    assert_eq!((a.lost(), b.lost()), (0, 0));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();

    let (_fault, faulted) = watch::channel(Fault::MembersSavesConflict);
    let always = Faulty::new(scenario.checkpoints.clone(), faulted);
    let started = Instant::now();
    let refused = PartitionedViewRunner::new(scenario.store.clone(), always, options)
        .start(scenario.view())
        .await;
    match refused {
        Err(ViewError::Store { source, .. }) => {
            assert!(source.is_retryable(), "{source}");
            assert!(
                source.to_string().contains("could not register"),
                "{source}"
            );
        }
        other => panic!("expected a retryable Unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() >= options.lease * 2,
        "{:?}",
        started.elapsed()
    );
}

/// A member's heartbeats stall (its members-record saves held) while its partition saves pass:
/// the other member drops it from the members record and is assigned all partitions, yet does
/// not take the stalled member's, whose records keep changing; nothing is lost. Once the stall
/// ends the two share the partitions again, and each event is saved once. (This is what the
/// record lease adds to the members' heartbeats: without it the takeover would be at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_member_dropped_from_the_members_record_keeps_partitions_it_renews() {
    let mut scenario = Scenario::new(support::store());
    let lease = Duration::from_millis(800);
    let options = quick(4, lease);
    scenario.append(0..12, 2, || {}).await;
    let (fault, faulted) = watch::channel(Fault::None);
    let a = PartitionedViewRunner::new(
        scenario.store.clone(),
        Faulty::new(scenario.checkpoints.clone(), faulted),
        options,
    )
    .start(scenario.view())
    .await
    .unwrap();
    let b = scenario
        .runner(options)
        .start(scenario.view())
        .await
        .unwrap();
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 4, Some(2)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    let (a_partitions, b_partitions) = (a.overview().owned(), b.overview().owned());
    let (owners, _) = scenario.revisions().await;

    fault.send_replace(Fault::StallMembersSaves);
    scenario.append(0..12, 1, || {}).await;
    within(b.wait_until(|o| o.members == 1)).await;
    // B counts A gone and is assigned every partition; A's records keep changing, so for
    // three leases B takes none of them.
    let (_, revisions) = scenario.revisions().await;
    let watch_until = Instant::now() + lease * 3;
    while Instant::now() < watch_until {
        assert_eq!(
            b.overview().owned(),
            b_partitions,
            "B took a renewed partition"
        );
        assert_eq!(a.overview().owned(), a_partitions, "A lost a partition");
        assert_eq!((a.lost(), b.lost()), (0, 0));
        assert_eq!(scenario.revisions().await.0, owners, "owners changed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, now) = scenario.revisions().await;
    for partition in &a_partitions {
        let k = *partition as usize;
        assert!(now[k] > revisions[k], "A renewed partition {k} meanwhile");
    }

    fault.send_replace(Fault::None);
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 4, Some(2)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    assert_eq!((a.lost(), b.lost()), (0, 0), "no takeover at all");
    scenario.append(0..12, 1, || {}).await;
    scenario
        .wait_saved(Duration::from_secs(10), |owners| {
            owners.iter().all(|o| o.is_some())
        })
        .await;
    scenario.assert_equals_rebuild().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The checkpoint store is down for both members for over two leases (every call
/// `Unavailable`: heartbeats, takes and saves fail, retryably) while events arrive. When it
/// answers again neither member counts the other gone or takes its partitions: the time they
/// could not see each other does not count towards a lease. Each event is saved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_store_outage_longer_than_a_lease_moves_nothing() {
    let mut scenario = Scenario::new(support::store());
    let lease = Duration::from_millis(600);
    let options = quick(4, lease);
    scenario.append(0..12, 2, || {}).await;
    let (fault, faulted) = watch::channel(Fault::None);
    let runner = |faulted: watch::Receiver<Fault>| {
        PartitionedViewRunner::new(
            scenario.store.clone(),
            Faulty::new(scenario.checkpoints.clone(), faulted),
            options,
        )
    };
    let a = runner(faulted.clone())
        .start(scenario.view())
        .await
        .unwrap();
    let b = runner(faulted).start(scenario.view()).await.unwrap();
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 4, Some(2)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    let (a_partitions, b_partitions) = (a.overview().owned(), b.overview().owned());
    let (owners, _) = scenario.revisions().await;

    // Watches both members from the outage to well after it: each must keep counting two
    // members and hold no partition of the other's.
    let (done_tx, done_rx) = watch::channel(false);
    let watcher = {
        let (a, b) = (a.clone(), b.clone());
        let (a_partitions, b_partitions) = (a_partitions.clone(), b_partitions.clone());
        tokio::spawn(async move {
            while !*done_rx.borrow() {
                for (member, theirs) in [(&a, &b_partitions), (&b, &a_partitions)] {
                    let o = member.overview();
                    assert_eq!(o.members, 2, "a member was counted gone: {o:?}");
                    assert!(
                        o.owned().iter().all(|p| !theirs.contains(p)),
                        "a member took the other's partition: {o:?}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    fault.send_replace(Fault::Down);
    scenario.append(0..12, 1, || {}).await;
    // The outage: the scenario, not an assertion.
    tokio::time::sleep(lease * 5 / 2).await;
    fault.send_replace(Fault::None);
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 4, Some(2)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    // Two leases more of normal operation, watched.
    let a_id = a.member_id();
    let b_id = b.member_id();
    scenario
        .wait_saved(Duration::from_secs(10), |owners| {
            owners.iter().all(|o| *o == Some(a_id) || *o == Some(b_id))
        })
        .await;
    let calm = Instant::now() + lease * 2;
    while Instant::now() < calm {
        assert_eq!(scenario.revisions().await.0, owners, "owners changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done_tx.send_replace(true);
    watcher.await.unwrap();
    assert_eq!((a.lost(), b.lost()), (0, 0), "no takeover");
    assert_eq!(
        (a.overview().owned(), b.overview().owned()),
        (a_partitions, b_partitions)
    );
    scenario.assert_equals_rebuild().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Partition saves fail (`Unavailable`) past their retries: the member drops its partitions
/// (their unsaved work with them), keeps running, and takes them again from their records once
/// saves pass; nothing is taken over and each event is saved once. A shutdown whose release
/// saves fail returns the store's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_partitions_whose_saves_fail_are_dropped_then_taken_again() {
    let mut scenario = Scenario::new(support::store());
    let mut options = quick(4, Duration::from_millis(800));
    options.retry_delay = Duration::from_millis(20);
    scenario.append(0..12, 2, || {}).await;
    let (fault, faulted) = watch::channel(Fault::None);
    let a = PartitionedViewRunner::new(
        scenario.store.clone(),
        Faulty::new(scenario.checkpoints.clone(), faulted),
        options,
    )
    .start(scenario.view())
    .await
    .unwrap();
    within(a.wait_until(|o| o.partitions.len() == 4 && o.all_live())).await;
    fault.send_replace(Fault::PartitionSavesDown);
    scenario.append(0..12, 1, || {}).await;
    within(a.wait_until(|o| o.partitions.is_empty())).await;
    assert!(matches!(a.status(), PartitionedStatus::Running));
    fault.send_replace(Fault::None);
    within(a.wait_until(|o| o.partitions.len() == 4 && o.all_live())).await;
    let a_id = a.member_id();
    scenario
        .wait_saved(Duration::from_secs(10), |owners| {
            owners.iter().all(|o| *o == Some(a_id))
        })
        .await;
    assert_eq!(a.lost(), 0);
    scenario.assert_equals_rebuild().await;

    fault.send_replace(Fault::PartitionSavesDown);
    match a.shutdown().await {
        Err(ViewError::Store { source, .. }) => assert!(source.is_retryable(), "{source}"),
        other => panic!("expected the release's store error, got {other:?}"),
    }
    assert!(matches!(a.status(), PartitionedStatus::Stopped));
}

/// A member shutting down leaves the members record before it releases its partitions: while
/// its release saves are held, the other member already counts it gone (long before its beat
/// could go stale), and takes each partition once its release lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_shutdown_leaves_the_members_record_before_releasing() {
    let mut scenario = Scenario::new(support::store());
    let lease = Duration::from_secs(3);
    let options = quick(4, lease);
    scenario.append(0..12, 2, || {}).await;
    let (fault, faulted) = watch::channel(Fault::None);
    let a = PartitionedViewRunner::new(
        scenario.store.clone(),
        Faulty::new(scenario.checkpoints.clone(), faulted),
        options,
    )
    .start(scenario.view())
    .await
    .unwrap();
    let b = scenario
        .runner(options)
        .start(scenario.view())
        .await
        .unwrap();
    wait_all(&[&a, &b], Duration::from_secs(10), |o| {
        split(o, 4, Some(2)) && o.iter().all(|o| o.members == 2)
    })
    .await;
    fault.send_replace(Fault::StallPartitionSaves);
    let started = Instant::now();
    let shutdown = {
        let a = a.clone();
        tokio::spawn(async move { a.shutdown().await })
    };
    within(b.wait_until(|o| o.members == 1)).await;
    let counted_gone = started.elapsed();
    assert!(
        counted_gone < lease / 2,
        "B counted A gone after {counted_gone:?}: as late as a stale beat (lease {lease:?})"
    );
    assert!(!shutdown.is_finished(), "A's releases are held");
    assert_eq!(
        b.overview().partitions.len(),
        2,
        "A's partitions not yet released"
    );
    fault.send_replace(Fault::None);
    shutdown.await.unwrap().unwrap();
    within(b.wait_until(|o| o.partitions.len() == 4 && o.all_live())).await;
    assert_eq!((a.lost(), b.lost()), (0, 0));
    let b_id = b.member_id();
    scenario
        .wait_saved(Duration::from_secs(10), |owners| {
            owners.iter().all(|o| *o == Some(b_id))
        })
        .await;
    b.shutdown().await.unwrap();
}

/// `Versions` that refuses every event of one stream, under a given failure policy.
struct Refusing {
    versions: Versions,
    refused: String,
    policy: FailurePolicy,
}

#[async_trait]
impl View for Refusing {
    type State = VersionsState;
    fn name(&self) -> &str {
        self.versions.name()
    }
    fn categories(&self) -> Vec<Category> {
        self.versions.categories()
    }
    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }
    async fn handle(
        &self,
        state: &mut VersionsState,
        event: &RecordedEvent,
    ) -> Result<(), BoxError> {
        if event.stream.to_string() == self.refused {
            return Err(format!("refusing {}", event.stream).into());
        }
        self.versions.handle(state, event).await
    }
}

/// Under skip and park policies a refused event does not stop a member: both members keep
/// running, nothing is taken over, the saved states hold every other event once, and a parking
/// view has each refused event in its dead-letter stream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_skip_and_park_policies_keep_members_running() {
    for policy in [FailurePolicy::skip(), FailurePolicy::park()] {
        let mut scenario = Scenario::new(support::store());
        let options = quick(4, Duration::from_millis(800));
        let refused = scenario.stream(3).to_string();
        let (name, category) = (scenario.name.clone(), scenario.category.clone());
        let view = || Refusing {
            versions: Versions {
                name: name.clone(),
                category: category.clone(),
            },
            refused: refused.clone(),
            policy,
        };
        scenario.append(0..8, 2, || {}).await;
        let a = scenario.runner(options).start(view()).await.unwrap();
        let b = scenario.runner(options).start(view()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (oa, ob) = (a.overview(), b.overview());
            let mut held: Vec<u32> = oa.owned().into_iter().chain(ob.owned()).collect();
            held.sort_unstable();
            if held == [0, 1, 2, 3] && oa.all_live() && ob.all_live() && oa.members == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "{policy:?}: {oa:?} {ob:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        scenario.append(0..8, 1, || {}).await;
        let refused_count = scenario.appended.remove(&refused).unwrap();
        scenario
            .wait_saved(Duration::from_secs(10), |owners| {
                owners.iter().all(|o| o.is_some())
            })
            .await;
        assert!(matches!(a.status(), PartitionedStatus::Running));
        assert!(matches!(b.status(), PartitionedStatus::Running));
        assert_eq!((a.lost(), b.lost()), (0, 0));
        if policy.then == OnFailure::Park {
            let parked = dead_letters(scenario.store.as_ref(), &scenario.name)
                .await
                .unwrap();
            let versions: Vec<u64> = parked.iter().map(|d| d.version.value()).collect();
            assert_eq!(
                versions,
                (0..refused_count).collect::<Vec<_>>(),
                "{parked:?}"
            );
            assert!(parked.iter().all(|d| d.stream.to_string() == refused));
        }
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }
}

fn assert_invalid(result: Result<impl std::fmt::Debug, ViewError>, words: &[&str]) {
    match result {
        Err(ViewError::Store {
            source: Error::InvalidInput { what, reason },
            ..
        }) => {
            let text = format!("{what}: {reason}");
            for word in words {
                assert!(text.contains(word), "{text:?} names {word:?}");
            }
        }
        other => panic!("expected InvalidInput naming {words:?}, got {other:?}"),
    }
}

/// A member started with another partition count than the view's record is refused, naming the
/// view and both counts, also once every member has left (the count stays recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_changed_partition_count_is_refused() {
    let scenario = Scenario::new(support::store());
    let lease = Duration::from_secs(2);
    let a = scenario
        .runner(quick(4, lease))
        .start(scenario.view())
        .await
        .unwrap();
    let refused = scenario
        .runner(quick(6, lease))
        .start(scenario.view())
        .await;
    assert_invalid(refused, &[&scenario.name, "6 partitions", "says 4"]);
    a.shutdown().await.unwrap();
    let refused = scenario
        .runner(quick(5, lease))
        .start(scenario.view())
        .await;
    assert_invalid(refused, &[&scenario.name, "5 partitions", "says 4"]);
}

/// Bad options and views are refused before anything is written.
#[tokio::test]
async fn memory_bad_input_is_a_typed_error() {
    let scenario = Scenario::new(support::store());
    let lease = Duration::from_secs(1);
    let start = |options: PartitionOptions, view: Versions| {
        let runner = scenario.runner(options);
        async move { runner.start(view).await }
    };
    assert_invalid(
        start(quick(0, lease), scenario.view()).await,
        &[&scenario.name, "0 partitions"],
    );
    assert_invalid(
        start(quick(MAX_PARTITIONS + 1, lease), scenario.view()).await,
        &[&scenario.name, "1025 partitions"],
    );
    assert_invalid(
        start(quick(4, Duration::ZERO), scenario.view()).await,
        &[&scenario.name, "lease of 0ns"],
    );
    assert_invalid(
        start(
            quick(4, MIN_LEASE - Duration::from_millis(1)),
            scenario.view(),
        )
        .await,
        &[&scenario.name, "lease of 99ms", "the least is 100ms"],
    );
    let mut options = quick(4, lease);
    options.save_every = 0;
    assert_invalid(
        start(options, scenario.view()).await,
        &[&scenario.name, "save_every 0"],
    );
    let mut options = quick(4, lease);
    options.retry_delay = Duration::ZERO;
    assert_invalid(
        start(options, scenario.view()).await,
        &[&scenario.name, "retry_delay of 0"],
    );
    // `x@members` is view x's members record: a partitioned view's name has no '@'.
    assert_invalid(
        start(
            quick(4, lease),
            Versions {
                name: format!("{}@members", scenario.name),
                category: scenario.category.clone(),
            },
        )
        .await,
        &[&scenario.name, "contains '@'"],
    );
    assert_invalid(
        start(
            quick(4, lease),
            Versions {
                name: "has space".into(),
                category: scenario.category.clone(),
            },
        )
        .await,
        &["has space", "checkpoint key"],
    );
    assert!(scenario
        .checkpoints
        .load(&members_key(&scenario.name))
        .await
        .unwrap()
        .is_none());
}

// ---- Three processes on every server configured --------------------------------------------

/// Set for a child: `<url>|<view>|<category>|<partitions>|<lease ms>`.
const CHILD_VAR: &str = "NEWTON_TEST_PARTITIONED_CHILD";

/// The child's side: one member of the view, printing its id, until killed. Without the
/// variable this test does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_runs_a_partitioned_view_member() {
    let Ok(spec) = std::env::var(CHILD_VAR) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [url, name, category, partitions, lease_ms] = parts[..] else {
        panic!("{CHILD_VAR}={spec:?}")
    };
    let store = newton::connect(url).await.unwrap();
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let options = PartitionOptions::new(partitions.parse().unwrap())
        .with_lease(Duration::from_millis(lease_ms.parse().unwrap()))
        .with_save_interval(Duration::from_secs(1));
    let handle = PartitionedViewRunner::new(store, checkpoints, options)
        .start(Versions {
            name: name.into(),
            category: Category::new(category).unwrap(),
        })
        .await
        .unwrap();
    println!("MEMBER {}", handle.member_id());
    std::future::pending::<()>().await;
}

/// Child processes killed (SIGKILL) when the test ends, passed or not.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a member in a child process and returns it with its member id.
fn spawn_member(url: &str, scenario: &Scenario, partitions: u32, lease: Duration) -> (Child, Uuid) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_runs_a_partitioned_view_member",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_VAR,
            format!(
                "{url}|{}|{}|{partitions}|{}",
                scenario.name,
                scenario.category,
                lease.as_millis()
            ),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (id_tx, id_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Not necessarily at the start of a line: the harness may have written the
            // test's name before it.
            if let Some((_, id)) = line.split_once("MEMBER ") {
                let _ = id_tx.send(id.trim().parse::<Uuid>().unwrap());
            }
        }
    });
    match id_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(id) => (child, id),
        Err(e) => {
            let _ = child.kill();
            panic!("the child did not join: {e}")
        }
    }
}

/// Three members in three processes share six partitions; one is SIGKILLed while events are
/// appended; the other two take over its partitions after the lease; the saved states hold
/// each event once and equal a single-process rebuild.
async fn three_processes_one_killed(url: &str) {
    let t0 = Instant::now();
    let phase = |name: &str| println!("  {name} at {:?}", t0.elapsed());
    let partitions = 6;
    let lease = Duration::from_secs(3);
    let mut scenario = Scenario::new(newton::connect(url).await.unwrap());
    // Two events per append: an append to the test FerretDB takes 0.2 to 2 s on a loaded
    // machine, and the test is about the members, not the appends.
    scenario.batch = 2;
    scenario.append(0..16, 2, || {}).await;
    phase("appended");
    let mut children = Children(Vec::new());
    let mut members = Vec::new();
    for _ in 0..3 {
        let (child, id) = spawn_member(url, &scenario, partitions, lease);
        children.0.push(child);
        members.push(id);
    }
    phase("three members joined");
    let all: BTreeSet<Uuid> = members.iter().copied().collect();
    scenario
        .wait_saved(Duration::from_secs(60), |owners| {
            let mut per_member = BTreeMap::new();
            for owner in owners {
                match owner {
                    Some(o) if all.contains(o) => *per_member.entry(*o).or_insert(0) += 1,
                    _ => return false,
                }
            }
            per_member.len() == 3 && per_member.values().all(|n| *n == 2)
        })
        .await;
    phase("two partitions each, saved");

    let killed = AtomicUsize::new(0);
    scenario
        .append(8..24, 2, || {
            children.0[0].kill().unwrap(); // SIGKILL: no destructor, no release, no last save
            killed.store(1, Ordering::SeqCst);
        })
        .await;
    assert_eq!(killed.load(Ordering::SeqCst), 1);
    children.0[0].wait().unwrap();
    phase("one killed mid-run, all appended");
    let survivors = [members[1], members[2]];
    scenario
        .wait_saved(Duration::from_secs(60), |owners| {
            owners
                .iter()
                .all(|o| o.is_some_and(|o| survivors.contains(&o)))
        })
        .await;
    phase("taken over, each event saved once");
    scenario.assert_equals_rebuild().await;
    phase("equal to a rebuild");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_three_processes_one_killed() {
    for (backend, url) in support::servers() {
        let started = Instant::now();
        println!("{backend}:");
        three_processes_one_killed(&url).await;
        println!(
            "{backend}: three processes, one killed, {:?}",
            started.elapsed()
        );
    }
}
