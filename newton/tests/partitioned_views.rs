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
    load_partitions, members_key, partition_of, BoxError, Category, CheckpointStore, Error,
    EventStoreCheckpointStore, InMemoryCheckpointStore, LoadedCheckpoint, MemberOverview,
    PartitionOptions, PartitionedStatus, PartitionedViewHandle, PartitionedViewRunner,
    RecordedEvent, SavedView, StreamId, Uuid, View, ViewError, ViewRunner, MAX_PARTITIONS,
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
