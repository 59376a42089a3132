//! The workloads on a photon store, whichever backend its URL chose: what an application sees.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use newton::store::{
    EventData, EventStore, ExpectedVersion, Selector, Start, SubscriptionBatch, SubscriptionItem,
    SubscriptionMode,
};
use newton::{CacheOptions, Category, Repository, SnapshotPolicy, StreamId, Version};
use tokio::sync::Barrier;

use crate::domain::{self, Account, Balances, Deposit, Deposited};
use crate::measure::{Cap, Latencies, Measurement, Role};
use crate::{progress, system, BoxError, Sizes};

/// The store under test and how to reach it again (for a second client).
#[derive(Clone)]
pub struct Target {
    /// The backend's name.
    pub backend: String,
    /// The URL it was connected with.
    pub url: String,
    /// The client the workloads use.
    pub store: Arc<dyn EventStore>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("backend", &self.backend)
            .field("url", &newton::store::url::redact(&self.url))
            .finish()
    }
}

impl Target {
    /// Another client of the same data: a new connection, except for `memory://`, where every
    /// connection is a new, empty store, so the same store is shared.
    pub async fn second_client(&self) -> Result<Arc<dyn EventStore>, BoxError> {
        if self.backend == "memory" {
            Ok(self.store.clone())
        } else {
            Ok(newton::connect(&self.url).await?)
        }
    }
}

/// A category no earlier run used: every workload starts on fresh streams.
pub fn fresh_category(prefix: &str) -> Category {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Category::new(format!("{prefix}{}", &id[..12])).expect("letters and digits")
}

/// The expected version after `appended` events were written to a stream by its only writer.
fn expected(appended: u64) -> ExpectedVersion {
    match appended {
        0 => ExpectedVersion::NoStream,
        n => ExpectedVersion::Exact(Version(n - 1)),
    }
}

/// One writer's appends, built before the clock starts so only `append` is timed.
struct Batch {
    stream: StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
}

/// Streams each writer takes in turn: many aggregates, as in an application.
const STREAMS_PER_WRITER: u64 = 100;

fn plan(category: &Category, writer: u64, events: u64, batch: u64) -> Vec<Batch> {
    let payloads = domain::payloads(events as usize);
    let mut versions = vec![0u64; STREAMS_PER_WRITER as usize];
    let mut batches = Vec::new();
    let mut payloads = payloads.into_iter();
    let mut i = 0u64;
    loop {
        let events: Vec<EventData> = payloads
            .by_ref()
            .take(batch as usize)
            .map(domain::event)
            .collect();
        if events.is_empty() {
            return batches;
        }
        let s = (i % STREAMS_PER_WRITER) as usize;
        let stream = StreamId::new(category, format!("w{writer}-{s}")).expect("a valid id");
        batches.push(Batch {
            stream,
            expected: expected(versions[s]),
            events: events.clone(),
        });
        versions[s] += events.len() as u64;
        i += 1;
    }
}

/// Workload 1: `writers` concurrent writers append `sizes.append_events` events in batches of
/// `batch`, each writer to its own streams with exact expected versions (optimistic
/// concurrency, as a repository appends), after one unmeasured append to the category. Latency
/// is per `append` call.
pub async fn append(
    t: &Target,
    sizes: &Sizes,
    batch: u64,
    writers: u64,
) -> Result<Measurement, BoxError> {
    let category = fresh_category("append");
    // One unmeasured append makes the category (on Kafka: its topic, and producers for its
    // partitions, warmed in the background), as the raw baselines make their topics and
    // producers before their clocks start; the clock starts a second later.
    let warm = StreamId::new(&category, "warm-up").expect("a valid id");
    let event = domain::event(domain::payloads(1).remove(0));
    t.store
        .append(&warm, ExpectedVersion::NoStream, vec![event])
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_writer = (sizes.append_events / writers).max(1);
    let bar = progress::bar(per_writer * writers, &format!("append b{batch} {writers}w"));
    let barrier = Arc::new(Barrier::new(writers as usize + 1));
    let cap_hit = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, barrier, bar) = (t.store.clone(), barrier.clone(), bar.clone());
        let (plan, cap, cap_hit) = (
            plan(&category, w, per_writer, batch),
            sizes.cap,
            cap_hit.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let cap = Cap::new(cap);
            let mut latencies = Latencies::default();
            let mut written = 0u64;
            for b in plan {
                if cap.reached() {
                    cap_hit.store(true, Ordering::Relaxed);
                    break;
                }
                let n = b.events.len() as u64;
                let started = Instant::now();
                store.append(&b.stream, b.expected, b.events).await?;
                latencies.record(started.elapsed());
                written += n;
                bar.inc(n);
            }
            Ok::<_, newton::Error>((written, latencies))
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut latencies = Latencies::default();
    let mut total = 0;
    for task in tasks {
        let (written, l) = task.await??;
        total += written;
        latencies.merge(&l);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok(Measurement::throughput(
        &t.backend,
        "append",
        append_case(batch, writers),
        "photon",
        Role::Photon,
        total,
        elapsed,
    )
    .with_latency(&latencies)
    .capped(cap_hit.load(Ordering::Relaxed))
    .note("after one unmeasured append to the category"))
}

/// The case label of an append row, shared with the baselines so rows line up.
pub fn append_case(batch: u64, writers: u64) -> String {
    format!(
        "batch {batch}, {writers} writer{}",
        if writers == 1 { "" } else { "s" }
    )
}

/// The case label of an aggregate-load row.
pub fn load_case(length: u64) -> String {
    format!("stream of {length} events")
}

/// Workload 2: loading an aggregate (newton's repository: read the stream, decode and apply
/// every event) from streams of each length, each stream loaded once (no warm cache of that
/// stream).
pub async fn load(t: &Target, sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
    let mut rows = Vec::new();
    for &length in &sizes.load_lengths {
        let cap = Cap::new(sizes.cap);
        let run = uuid::Uuid::new_v4().simple().to_string();
        let category = Category::new(<Account as newton::Aggregate>::CATEGORY)?;
        // Fresh streams of the aggregate's own category, named by run.
        let streams =
            write_streams_named(&t.store, &category, &run[..8], sizes.loads, length, cap).await?;
        let repo: Repository<Account> = Repository::new(t.store.clone());
        let mut latencies = Latencies::default();
        let started = Instant::now();
        let cap = Cap::new(sizes.cap);
        let mut loaded = 0;
        for id in &streams {
            if cap.reached() {
                break;
            }
            let t0 = Instant::now();
            let account = repo.load(id).await?;
            latencies.record(t0.elapsed());
            if account.state.deposits() != length {
                return Err(format!(
                    "load of {id}: rebuilt {} deposits, wrote {length}",
                    account.state.deposits()
                )
                .into());
            }
            loaded += 1;
        }
        rows.push(
            Measurement::throughput(
                &t.backend,
                "load",
                load_case(length),
                "photon (newton repository)",
                Role::Photon,
                loaded,
                started.elapsed(),
            )
            .with_latency(&latencies)
            .latency_only()
            .capped(loaded < sizes.loads),
        );
    }
    Ok(rows)
}

/// The case label of a command row on streams of `length` events, shared with cqrs-es's rows.
pub fn commands_case(length: u64) -> String {
    format!("1 client, {length}-event streams")
}

/// The snapshot policy of the command rows on long streams: a snapshot every this many events,
/// so a load without a cache entry reads at most this many events after the snapshot.
pub const SNAPSHOT_EVERY: u64 = 100;

/// Writes `sizes.command_streams` accounts of `length` events (not timed), then has each
/// handle one deposit through a repository that takes snapshots, as the application that wrote
/// them would have left them: a snapshot at the head of every stream of at least
/// [`SNAPSHOT_EVERY`] events. Returns the account ids.
pub async fn write_command_streams(
    t: &Target,
    sizes: &Sizes,
    length: u64,
) -> Result<Vec<String>, BoxError> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let category = Category::new(<Account as newton::Aggregate>::CATEGORY)?;
    let cap = Cap::new(sizes.cap);
    let ids = write_streams_named(
        &t.store,
        &category,
        &format!("c{}", &run[..8]),
        sizes.command_streams,
        length,
        cap,
    )
    .await?;
    let writer = Repository::<Account>::new(t.store.clone())
        .with_cache(CacheOptions::disabled())
        .with_snapshots(SnapshotPolicy::EveryEvents(SNAPSHOT_EVERY));
    for (i, id) in ids.iter().enumerate() {
        writer.execute(id, &deposit(i as u64, 0)).await?;
    }
    Ok(ids)
}

fn deposit(account: u64, i: u64) -> Deposit {
    Deposit {
        account,
        amount: 1 + (i % 1_000) as i64,
        reference: format!("deposit {i} to account {account}"),
    }
}

/// The commands of the rows on long streams: deposit `i` goes to account `i % accounts`, so
/// newton and cqrs-es handle the very same commands. Pairs of (account index, command).
pub fn stream_commands(sizes: &Sizes, accounts: u64) -> Vec<(u64, Deposit)> {
    (0..sizes.stream_commands)
        .map(|i| (i % accounts, deposit(i % accounts, i)))
        .collect()
}

/// Runs `commands` one at a time through `execute`, until all are done or the cap is reached:
/// the commands done, their latencies and the wall time (commands are built before the clock
/// starts).
pub async fn one_client<C, F, Fut>(
    commands: Vec<C>,
    sizes: &Sizes,
    what: &str,
    mut execute: F,
) -> Result<(u64, Latencies, Duration), BoxError>
where
    F: FnMut(C) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>>,
{
    let bar = progress::bar(commands.len() as u64, what);
    let cap = Cap::new(sizes.cap);
    let mut latencies = Latencies::default();
    let mut done = 0;
    let started = Instant::now();
    for command in commands {
        if cap.reached() {
            break;
        }
        let t0 = Instant::now();
        execute(command).await?;
        latencies.record(t0.elapsed());
        done += 1;
        bar.inc(1);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok((done, latencies, elapsed))
}

/// `sizes.stream_commands` deposits to the accounts of `ids` in turn, one client, through one
/// repository made for this run: with its cache (on by default) and snapshots, or with
/// snapshots only (`cached == false`: every command loads the latest snapshot and the events
/// after it). The repository is new, so each account's first command finds no cache entry, as
/// after a restart.
pub async fn commands_on_streams(
    t: &Target,
    sizes: &Sizes,
    length: u64,
    ids: &[String],
    cached: bool,
) -> Result<Measurement, BoxError> {
    if ids.is_empty() {
        return Err(format!("no {length}-event streams were written before the cap").into());
    }
    let mut repo = Repository::<Account>::new(t.store.clone())
        .with_snapshots(SnapshotPolicy::EveryEvents(SNAPSHOT_EVERY));
    if !cached {
        repo = repo.with_cache(CacheOptions::disabled());
    }
    let subject = if cached {
        format!("newton (cache, snapshots every {SNAPSHOT_EVERY} events)")
    } else {
        format!("newton without cache (snapshots every {SNAPSHOT_EVERY} events)")
    };
    let repo = &repo;
    let commands = stream_commands(sizes, ids.len() as u64);
    let (done, latencies, elapsed) =
        one_client(commands, sizes, &subject, |(account, command)| async move {
            repo.execute(&ids[account as usize], &command).await?;
            Ok(())
        })
        .await?;
    Ok(Measurement::throughput(
        &t.backend,
        "commands",
        commands_case(length),
        subject,
        if cached {
            Role::Photon
        } else {
            Role::Reference
        },
        done,
        elapsed,
    )
    .with_latency(&latencies)
    .capped(done < sizes.stream_commands))
}

/// Writes `streams` streams of `length` events each into the aggregate's `category`, ids
/// `<run>-<length>-<i>` (not timed); returns the ids written before the cap.
async fn write_streams_named(
    store: &Arc<dyn EventStore>,
    category: &Category,
    run: &str,
    streams: u64,
    length: u64,
    cap: Cap,
) -> Result<Vec<String>, BoxError> {
    let bar = progress::bar(streams * length, &format!("writing streams of {length}"));
    let mut pending = futures::stream::iter(0..streams)
        .map(|i| {
            let (store, category, bar) = (store.clone(), category.clone(), bar.clone());
            let id = format!("{run}-{length}-{i}");
            async move {
                let stream = StreamId::new(&category, &id)?;
                let mut done = 0;
                while done < length {
                    let n = (length - done).min(1_000);
                    let mut rng = rand::rng();
                    let events = (0..n)
                        .map(|_| {
                            let mut d = Deposited::random(&mut rng);
                            d.account = i;
                            domain::event(d.encode())
                        })
                        .collect();
                    store.append(&stream, expected(done), events).await?;
                    done += n;
                    bar.inc(n);
                }
                Ok::<_, BoxError>(id)
            }
        })
        .buffer_unordered(4);
    let mut written = Vec::new();
    while let Some(id) = pending.next().await {
        written.push(id?);
        if cap.reached() {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(written)
}

/// A category holding the replay workload's events.
#[derive(Debug)]
pub struct ReplaySet {
    /// Where they are.
    pub category: Category,
    /// How many were written before the cap.
    pub events: u64,
    /// Resident memory the writing added (what the memory backend holds for them).
    pub stored_rss: Option<u64>,
}

/// Writes `sizes.replay_events` events in batches of 1,000 over 1,000 streams of a fresh
/// category (not timed).
pub async fn write_replay_set(t: &Target, sizes: &Sizes) -> Result<ReplaySet, BoxError> {
    let category = fresh_category("replay");
    let before = system::rss();
    let cap = Cap::new(sizes.cap);
    let total = sizes.replay_events;
    let bar = progress::bar(total, "writing the replay set");
    let next = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let loaders = if t.backend == "memory" { 1 } else { 4 };
    let mut tasks = Vec::new();
    for _ in 0..loaders {
        let (store, category, bar) = (t.store.clone(), category.clone(), bar.clone());
        let (next, written) = (next.clone(), written.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(1_000, Ordering::Relaxed);
                if first >= total || cap.reached() {
                    return Ok::<_, BoxError>(());
                }
                let n = (total - first).min(1_000);
                // Batch k goes to stream k mod 1000. Loaders may write one stream at once, so
                // this untimed loading appends without an expected version.
                let stream = StreamId::new(&category, format!("s{}", (first / 1_000) % 1_000))?;
                let events = domain::payloads(n as usize)
                    .into_iter()
                    .map(domain::event)
                    .collect();
                store.append(&stream, ExpectedVersion::Any, events).await?;
                written.fetch_add(n, Ordering::Relaxed);
                bar.inc(n);
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    bar.finish_and_clear();
    let after = system::rss();
    Ok(ReplaySet {
        category,
        events: written.load(Ordering::Relaxed),
        stored_rss: before.zip(after).map(|(b, a)| a.saturating_sub(b)),
    })
}

/// The largest batch a replay asks for: photon-memory's fetch chunk.
const REPLAY_BATCH: usize = 256;

/// Replays `category` Cold from the beginning into a [`Balances`] view, decoding every
/// payload; returns the view and the time taken.
async fn replay_into_view(
    store: &Arc<dyn EventStore>,
    category: &Category,
    expected_events: u64,
) -> Result<(Balances, Duration), BoxError> {
    let bar = progress::bar(expected_events, "replaying into a view");
    let started = Instant::now();
    let mut view = Balances::default();
    // In batches, as a view that replays reads: each event is read in place.
    let mut batches = store.subscribe_batches(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::Cold,
        REPLAY_BATCH,
    );
    while let Some(batch) = batches.next().await {
        if let SubscriptionBatch::Events(events) = batch? {
            let before = view.events();
            for e in &events {
                view.apply(&e.decode::<Deposited>()?);
            }
            if before / 65_536 != view.events() / 65_536 {
                bar.set_position(view.events());
            }
        }
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok((view, elapsed))
}

/// Workload 3: a new view replays the whole category (Cold) decoding every payload; events/s
/// and the process's peak resident memory during the replay.
pub async fn replay(t: &Target, set: &ReplaySet) -> Result<Measurement, BoxError> {
    system::reset_peak();
    let before = system::rss();
    let (view, elapsed) = replay_into_view(&t.store, &set.category, set.events).await?;
    let peak = system::peak_rss();
    if view.events() != set.events {
        return Err(format!(
            "replay of {}: {} events, {} written",
            set.category,
            view.events(),
            set.events
        )
        .into());
    }
    let mut m = Measurement::throughput(
        &t.backend,
        "replay",
        format!("{} events", set.events),
        "photon",
        Role::Photon,
        view.events(),
        elapsed,
    );
    m.peak_rss_mib = peak.map(system::mib);
    m.stored_rss_mib = set.stored_rss.map(system::mib);
    if let (Some(b), Some(p)) = (before, peak) {
        m = m.note(format!(
            "resident memory grew {:.0} MiB during the replay",
            system::mib(p.saturating_sub(b))
        ));
    }
    Ok(m)
}

/// Appends single events with one writer to `stream` (which holds `first` events) until
/// `stop` says so or `cap` is reached; returns the events appended and the time taken.
async fn append_until(
    store: &Arc<dyn EventStore>,
    stream: &StreamId,
    first: u64,
    stop: impl Fn() -> bool,
    cap: Cap,
) -> Result<(u64, Duration), BoxError> {
    let payloads = domain::payloads(4_096);
    let started = Instant::now();
    let mut n = 0u64;
    while !stop() && !cap.reached() {
        let event = domain::event(payloads[n as usize % payloads.len()].clone());
        store
            .append(stream, expected(first + n), vec![event])
            .await?;
        n += 1;
    }
    Ok((n, started.elapsed()))
}

/// Appends during a replay shorter than this are too few to say anything.
const MIN_DURING: u64 = 20;

/// Workload 5: a second client appends single events, first alone for as long as the replay
/// took, then while a new view replays the whole replay set; the figure is the ratio.
pub async fn isolation(
    t: &Target,
    set: &ReplaySet,
    replay_took: Duration,
    sizes: &Sizes,
) -> Result<Measurement, BoxError> {
    let second = t.second_client().await?;
    let stream = StreamId::new(&fresh_category("second"), "writer")?;
    // Warm up: the first appends of a new client connect, and on Kafka take the partition's
    // writer role; that is not what is measured.
    let mut first = 0;
    for payload in domain::payloads(5) {
        second
            .append(&stream, expected(first), vec![domain::event(payload)])
            .await?;
        first += 1;
    }
    // At least 2 s, at most the cap (which may be shorter).
    let alone_for = replay_took.max(Duration::from_secs(2)).min(sizes.cap);
    let started = Instant::now();
    let (alone, alone_took) = append_until(
        &second,
        &stream,
        first,
        || started.elapsed() >= alone_for,
        Cap::new(sizes.cap),
    )
    .await?;
    first += alone;
    let alone_rate = alone as f64 / alone_took.as_secs_f64();

    let done = Arc::new(AtomicBool::new(false));
    let replay = {
        let (store, category, events, done) = (
            t.store.clone(),
            set.category.clone(),
            set.events,
            done.clone(),
        );
        tokio::spawn(async move {
            let result = replay_into_view(&store, &category, events).await;
            done.store(true, Ordering::Relaxed);
            result
        })
    };
    let (during, during_took) = append_until(
        &second,
        &stream,
        first,
        || done.load(Ordering::Relaxed),
        Cap::new(sizes.cap * 4),
    )
    .await?;
    // The cap stopped the appends before the replay ended: the rate is not "during" it all.
    let cut_short = !done.load(Ordering::Relaxed);
    let (_, replay_elapsed) = replay.await??;
    let during_rate = during as f64 / during_took.as_secs_f64();
    let mut m = Measurement::throughput(
        &t.backend,
        "isolation",
        format!("appends during a replay of {} events", set.events),
        "photon (second client, batch 1)",
        Role::Photon,
        during,
        during_took,
    )
    .capped(cut_short);
    let note = format!(
        "alone: {alone_rate:.0} events/s; the replay took {:.2} s beside it ({:.2} s alone)",
        replay_elapsed.as_secs_f64(),
        replay_took.as_secs_f64()
    );
    if during < MIN_DURING {
        return Ok(m.note(format!(
            "{note}; only {during} appends during the replay: too short to give a ratio"
        )));
    }
    m.ratio = Some(during_rate / alone_rate);
    Ok(m.note(note))
}

/// Workload 4: the time from `append` to delivery by a HotCold subscriber that is live, one
/// event at a time.
pub async fn live(t: &Target, sizes: &Sizes) -> Result<Measurement, BoxError> {
    let category = fresh_category("live");
    let stream = StreamId::new(&category, "writer")?;
    let mut sub = t.store.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    match sub.next().await {
        Some(Ok(SubscriptionItem::CaughtUp)) => {}
        other => return Err(format!("expected CaughtUp first, got {other:?}").into()),
    }
    // Warm up: the first append to a new category creates its topic or table rows and takes
    // the writer role on Kafka; that is not live latency.
    let warm = domain::event(domain::payloads(1).remove(0));
    let warm_id = warm.event_id;
    t.store.append(&stream, expected(0), vec![warm]).await?;
    match sub.next().await {
        Some(Ok(SubscriptionItem::Event(e))) if e.event_id == warm_id => {}
        other => return Err(format!("live: expected the warm-up event, got {other:?}").into()),
    }
    let payloads = domain::payloads(sizes.live_events as usize);
    let bar = progress::bar(sizes.live_events, "live append -> delivery");
    let cap = Cap::new(sizes.cap);
    let mut latencies = Latencies::default();
    let started = Instant::now();
    let mut n = 0u64;
    for payload in payloads {
        if cap.reached() {
            break;
        }
        let event = domain::event(payload);
        let id = event.event_id;
        let t0 = Instant::now();
        t.store
            .append(&stream, expected(n + 1), vec![event])
            .await?;
        loop {
            match sub.next().await {
                Some(Ok(SubscriptionItem::Event(e))) if e.event_id == id => break,
                Some(Ok(SubscriptionItem::Event(e))) => {
                    return Err(format!("live: unexpected event {}", e.event_id).into())
                }
                Some(Ok(SubscriptionItem::CaughtUp)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err("live subscription ended".into()),
            }
        }
        latencies.record(t0.elapsed());
        n += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Measurement::throughput(
        &t.backend,
        "live",
        "append -> HotCold delivery, one event at a time",
        "photon",
        Role::Photon,
        n,
        started.elapsed(),
    )
    .with_latency(&latencies)
    .latency_only()
    .capped(n < sizes.live_events))
}

/// One writer appending one event at a time to `streams` in turn, each with its exact expected
/// version, after one unmeasured append to each (the first append to a Kafka partition takes
/// it over: `init_transactions` and a catch-up read, which this row does not measure). The
/// 40-partition row (issue 14 item 5): a writer whose streams span more partitions than a
/// fixed cache of producers would keep.
pub async fn append_cycling(
    t: &Target,
    streams: &[StreamId],
    sizes: &Sizes,
    case: &str,
) -> Result<Measurement, BoxError> {
    let mut versions = vec![0u64; streams.len()];
    for (s, v) in streams.iter().zip(&mut versions) {
        let event = domain::event(domain::payloads(1).remove(0));
        t.store
            .append(s, ExpectedVersion::NoStream, vec![event])
            .await?;
        *v = 1;
    }
    let events: Vec<EventData> = domain::payloads(sizes.append_events as usize)
        .into_iter()
        .map(domain::event)
        .collect();
    let bar = progress::bar(sizes.append_events, &format!("append {case}"));
    let cap = Cap::new(sizes.cap);
    let mut latencies = Latencies::default();
    let mut written = 0u64;
    let started = Instant::now();
    for (i, event) in events.into_iter().enumerate() {
        if cap.reached() {
            break;
        }
        let k = i % streams.len();
        let t0 = Instant::now();
        t.store
            .append(&streams[k], expected(versions[k]), vec![event])
            .await?;
        latencies.record(t0.elapsed());
        versions[k] += 1;
        written += 1;
        bar.inc(1);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok(Measurement::throughput(
        &t.backend,
        "append",
        case,
        "photon",
        Role::Photon,
        written,
        elapsed,
    )
    .with_latency(&latencies)
    .capped(written < sizes.append_events)
    .note(format!(
        "{} streams, one per partition, in turn; after one unmeasured append to each (the take-overs)",
        streams.len()
    )))
}
