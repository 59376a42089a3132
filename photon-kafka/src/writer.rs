//! Appends: one transactional producer per partition, with a `transactional.id` every process
//! derives the same way, so at most one writer per partition is alive cluster-wide. Taking a
//! partition over (`init_transactions`) fences the previous writer: its open transaction is
//! aborted and its later sends and commits fail. The new writer then reads the partition to its
//! stable end before it checks an expected version, so the check sees every committed event.
//!
//! Appends to one partition from one process are committed in groups: whoever holds the
//! partition takes every queued append (one per stream, so each is decided against committed
//! state only) into one transaction. The events of each append become visible to read_committed
//! readers together, and a group costs one commit however many appends it carries.
//!
//! Every append has its own deadline, three request timeouts from the call: it is stored before
//! it or never. A transaction is committed only while every append in it is within its deadline
//! (the commit's wait is bounded by what is left), an append whose deadline passed while it
//! waited is answered `Unavailable` and never sent, and a caller that drops its future removes
//! its append from the queue unless the holder has already taken it (then it is sent now). The
//! queue of each partition is bounded; a full queue answers `Unavailable` at once.
//!
//! This module owns the append protocol and the producers; it reads partitions only through
//! reader.rs (the catch-up) and builds records only through codec.rs.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use photon_api::telemetry::Attempts;
use photon_api::validate::{classify_batch, validate_batch, BatchKind};
use photon_api::{AppendResult, Error, EventData, ExpectedVersion, StreamId, Timestamp, Version};
use rand::Rng;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::oneshot;

use crate::client::{blocking, PartitionState, Shared, BACKEND};
use crate::codec::{self, partition_for};
use crate::config::KafkaConfig;
use crate::error;
use crate::index::PartitionIndex;
use crate::position;
use crate::reader::{catch_up, stable_end};

/// A producer unused this long is closed at the next take-over: the producers kept follow the
/// partitions in use, not every partition ever appended to.
const PRODUCER_IDLE: Duration = Duration::from_secs(600);

/// Most appends one transaction carries.
const MAX_GROUP: usize = 256;

/// Most appends waiting for one partition; one more is answered `Unavailable` at once.
const MAX_QUEUED: usize = 1024;

/// Bytes of events waiting for one partition, in multiples of `max_append_size`; an append that
/// would pass it is answered `Unavailable` (an empty queue takes any one valid append).
const MAX_QUEUED_APPENDS_BYTES: usize = 2;

/// How long a record waits before it is queued again when librdkafka's send queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// The longest pause between two looks at whether a commit is readable yet, until the stable
/// end has not moved for [`VISIBLE_FAST_FOR`]: markers usually land within a few milliseconds of the
/// commit, and every millisecond a look comes late is added to the caller's answer (with 20 ms
/// from the start, one writer's median append took 4.0-4.4 ms; with 2 ms, 3.0-3.2 ms).
const VISIBLE_POLL_FAST: Duration = Duration::from_millis(2);

/// How long a stable end that does not move is looked at every [`VISIBLE_POLL_FAST`].
const VISIBLE_FAST_FOR: Duration = Duration::from_millis(50);

/// The longest pause between two looks once the stable end has not moved for
/// [`VISIBLE_FAST_FOR`] (another client's open transaction, a slow broker): one request per
/// partition every 20 ms at most.
const VISIBLE_POLL_MAX: Duration = Duration::from_millis(20);

/// How long before the end of its three request timeouts an append's work (checks, waits,
/// commit) stops, so that its own answer, not the caller's backstop, reaches the caller in time.
const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// Longest a partition's next transaction waits for the last one to be readable before it
/// begins: librdkafka's fixed pause before asking again for a partition the coordinator refused
/// because the last transaction was not complete, beyond which waiting gains nothing.
const SETTLE_WAIT_MAX: Duration = Duration::from_millis(20);

/// This process's producer for one partition while it holds the partition's writer role.
pub(crate) struct Writer {
    producer: Arc<FutureProducer>,
    /// The topic's partition count, checked when this producer took the partition over; every
    /// record says it (`photon.partitions`).
    partitions: i32,
    pub(crate) last_used: Instant,
    live: Arc<AtomicUsize>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        // Closing a producer joins its threads and may flush; an open transaction is aborted
        // first so readers of the partition are not held up until it times out.
        let producer = self.producer.clone();
        let close = move || {
            let _ = producer.abort_transaction(Duration::from_secs(2));
            drop(producer);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(close);
            }
            Err(_) => close(),
        }
    }
}

/// An append waiting for the partition's writer.
pub(crate) struct Queued {
    /// Its place in its partition's queue, so a caller that goes away can remove it.
    id: u64,
    stream: StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
    size: usize,
    /// Stored before this or never: three request timeouts from the call.
    deadline: Instant,
    /// Attempts made at this append's group so far, reported with the answer (the append span's
    /// `attempts`, and the retries counted).
    attempts: u32,
    /// When this call first began writing the batch (None until then): an attempt whose outcome
    /// was unknown may have landed, and a later attempt that finds the batch stored answers
    /// within the answer window of this, like the attempt that stored it.
    sent_at: Option<Instant>,
    reply: oneshot::Sender<(Result<AppendResult, Error>, u32)>,
}

impl Queued {
    /// Answers the caller (who may have gone away: then nobody hears it).
    fn answer(self, result: Result<AppendResult, Error>) {
        let _ = self.reply.send((result, self.attempts));
    }
}

/// Appends queued for one partition, taken by the partition's holder task, and the committed
/// ones waiting to be readable before their callers are answered.
#[derive(Default)]
pub(crate) struct Queue {
    pending: std::sync::Mutex<Pending>,
    readable: std::sync::Mutex<Readable>,
    /// Woken whenever the watcher answers committed appends (`Readable::waiting` shrinks).
    answered: tokio::sync::Notify,
}

/// Committed appends of one partition waiting until the partition's last stable offset passes
/// them; one watcher task asks for it for all of them.
#[derive(Default)]
struct Readable {
    /// The highest last stable offset seen: every record below it is readable.
    end: i64,
    /// When the last look at the stable end that answered was sent: records at or past `end`
    /// were not readable then.
    looked_at: Option<Instant>,
    waiting: Vec<Committed>,
    /// A watcher task is running; set and cleared only with this locked.
    watching: bool,
    /// When the last transaction's commit returned.
    committed_at: Option<Instant>,
}

#[derive(Default)]
struct Pending {
    appends: VecDeque<Queued>,
    /// Event bytes of `appends`.
    bytes: usize,
    next_id: u64,
    /// A holder task is running (or waiting for the partition) and takes every append queued
    /// before it sees the queue empty; set and cleared only with the queue locked.
    holder: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().expect("queue lock")
    }

    /// Before the partition's next transaction: waits until no committed append of this
    /// partition waits to be readable, so the last transaction's markers are written and its
    /// coordinator has (most likely) completed it, but not past [`SETTLE_WAIT_MAX`] after that
    /// transaction's commit returned, nor past half the time left to the first queued
    /// append's deadline. A transaction begun before the last one is complete has its
    /// partition refused (CONCURRENT_TRANSACTIONS), which librdkafka asks again for only after
    /// a fixed 20 ms; past that waiting gains nothing (another client's open transaction may
    /// hold the stable end back for long).
    async fn settled(&self) {
        let Some(committed_at) = self.readable.lock().expect("readable lock").committed_at else {
            return;
        };
        let now = Instant::now();
        let mut until = committed_at + SETTLE_WAIT_MAX;
        if let Some(first) = self.lock().appends.iter().map(|q| q.deadline).min() {
            until = until.min(now + first.saturating_duration_since(now) / 2);
        }
        let until = tokio::time::Instant::from_std(until);
        loop {
            let answered = self.answered.notified();
            tokio::pin!(answered);
            // Registered before the look, so an answer right after it still wakes us.
            answered.as_mut().enable();
            if self
                .readable
                .lock()
                .expect("readable lock")
                .waiting
                .is_empty()
            {
                return;
            }
            if tokio::time::timeout_at(until, answered).await.is_err() {
                return;
            }
        }
    }

    /// Removes the append `id` if no holder has taken it yet; whether it was still queued.
    fn remove(&self, id: u64) -> bool {
        let mut pending = self.lock();
        match pending.appends.iter().position(|q| q.id == id) {
            Some(i) => {
                let q = pending.appends.remove(i).expect("found");
                pending.bytes -= q.size;
                true
            }
            None => false,
        }
    }
}

/// Removes a caller's append from the queue when the caller goes away before its answer (a
/// dropped future): an append not yet taken is never sent.
struct Dequeue<'a> {
    queue: &'a Queue,
    id: u64,
    armed: bool,
}

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.queue.remove(self.id);
        }
    }
}

/// The transactional id of a partition's writer: the same in every process, which is what makes
/// a second writer fence the first.
fn transactional_id(topic: &str, p: i32) -> String {
    format!("photon.{topic}.{p}")
}

/// Appends `events` to `stream` if it is at `expected`: validated, queued for the stream's
/// partition, and committed by the partition's holder task, before the call's deadline or never.
/// `attempts` is set to the attempts the holder made at the append's group (0 when it was not
/// queued).
pub(crate) async fn append(
    shared: &Arc<Shared>,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
    attempts: &Attempts,
) -> Result<AppendResult, Error> {
    let config = &shared.config;
    // The caller hears back within three request timeouts of the call (`answer_by`); every step
    // that asks the brokers is bounded by `deadline`, a little earlier, so the answer says what
    // happened rather than only that the time was up.
    let answer_by = Instant::now() + config.timeout * 3;
    let deadline = answer_by - ANSWER_MARGIN.min(config.timeout / 10);
    let size = validate_batch(
        stream,
        &events,
        config.max_event_size,
        Some(config.max_append_size),
    )?;
    codec::check_headers(stream, &events)?;
    let topic = config.topic(stream.category_name());
    // The topic's checks ask the brokers (its first use, a count due for a look): within the
    // call's deadline too, so a stalled network answers in time. Nothing is queued yet.
    let n = tokio::time::timeout_at(
        tokio::time::Instant::from_std(deadline),
        shared.ensure_topic(&topic),
    )
    .await
    .map_err(|_| {
        error::unavailable(format!(
            "the append to {stream} could not check {topic} with the brokers before its deadline; nothing was stored, retry later"
        ))
    })??;
    let p = partition_for(stream, n);
    warm_up(shared, &topic, n, p);
    let (state, queue) = shared.partition_with_queue(&topic, p);
    let (reply, answer) = oneshot::channel();
    let max_bytes = config.max_append_size * MAX_QUEUED_APPENDS_BYTES;
    let (id, start_holder) = {
        let mut pending = queue.lock();
        let full = pending.appends.len() >= MAX_QUEUED
            || (!pending.appends.is_empty() && pending.bytes + size > max_bytes);
        if full {
            return Err(error::unavailable(format!(
                "the append to {stream} was not queued: {} appends ({} bytes) already wait for {topic}/{p}; nothing was stored, retry later",
                pending.appends.len(),
                pending.bytes
            )));
        }
        let id = pending.next_id;
        pending.next_id += 1;
        pending.bytes += size;
        pending.appends.push_back(Queued {
            id,
            stream: stream.clone(),
            expected,
            events,
            size,
            deadline,
            attempts: 0,
            sent_at: None,
            reply,
        });
        (id, !std::mem::replace(&mut pending.holder, true))
    };
    if start_holder {
        // The commit runs in a task of its own: a caller that goes away (a cancelled request)
        // cannot leave a transaction half done, and a caller whose append is committed returns
        // at once, however busy the partition stays.
        let (shared, topic, queue) = (shared.clone(), topic.clone(), queue.clone());
        tokio::spawn(hold_partition(shared, topic, p, state, queue));
    }
    let mut queued = Dequeue {
        queue: &queue,
        id,
        armed: true,
    };
    // The holder answers by the deadline: each of its steps is bounded by it. This bound is only
    // a backstop should the partition be held longer (by a reader catching up, say).
    let backstop = tokio::time::Instant::from_std(answer_by);
    let answered = tokio::time::timeout_at(backstop, answer).await;
    queued.armed = false;
    match answered {
        Ok(Ok((result, tried))) => {
            attempts.set(tried);
            result
        }
        Ok(Err(_)) => Err(error::unavailable(format!(
            "the append to {stream} was interrupted; its outcome is unknown, retry with the same ids"
        ))),
        Err(_) if queue.remove(id) => Err(error::unavailable(format!(
            "the append to {stream} waited {:?} for {topic}/{p} and was not sent; nothing was stored",
            config.timeout * 3
        ))),
        Err(_) => Err(error::unavailable(format!(
            "the append to {stream} got no answer from {topic}/{p} within {:?}; its outcome is unknown, retry with the same ids",
            config.timeout * 3
        ))),
    }
}

/// The first append of this store to `topic` initialises producers for its other partitions in
/// the background, all at once (up to `max_producers`), so an append to each later finds one
/// ready instead of paying `init_transactions` in its own time: a transaction per append costs
/// a few milliseconds, an `init_transactions` tens to hundreds. `first` is the partition of the
/// append that asked: its own take-over runs in its holder as usual.
///
/// Each `init_transactions` fences the partition's writer in other processes, as a take-over
/// would; such a process takes the partition back at its next append (fencing this warm
/// producer, whose first commit then fails and is retried after a take-over). The partition is
/// not read here: that stays with the take-over, after which this store decides appends.
fn warm_up(shared: &Arc<Shared>, topic: &str, n: i32, first: i32) {
    if !shared.config.warm_producers {
        return;
    }
    {
        let mut warmed = shared.warmed.lock().expect("warmed lock");
        if warmed.contains(topic) {
            return;
        }
        warmed.insert(topic.to_owned());
    }
    let room = shared
        .config
        .max_producers
        .saturating_sub(shared.live_writers.load(Ordering::Relaxed) + 1);
    for p in (0..n).filter(|&p| p != first).take(room) {
        let (shared, topic) = (shared.clone(), topic.to_owned());
        tokio::spawn(async move {
            let state = shared.partition(&topic, p);
            let mut state = state.lock().await;
            if state.producer.is_some() || state.warm.is_some() {
                return;
            }
            // A slot is reserved before the producer is made: warm-ups of several topics may
            // run at once, and a producer is counted alive only once initialised.
            let live = &shared.live_writers;
            if live.fetch_add(1, Ordering::Relaxed) >= shared.config.max_producers {
                live.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            let made = new_writer(&shared, &topic, p, Instant::now() + shared.config.timeout).await;
            live.fetch_sub(1, Ordering::Relaxed);
            match made {
                // Take-overs made producers meanwhile: this one is not kept past the limit.
                Ok(_) if live.load(Ordering::Relaxed) > shared.config.max_producers => {}
                Ok(w) => state.warm = Some(w),
                Err(e) => {
                    tracing::debug!(topic, p, error = %e, "photon-kafka: producer not warmed")
                }
            }
        });
    }
}

/// The holder of a partition: commits what is queued, group by group, until the queue is empty.
/// It takes the partition's lock for each group and lets it go between two (the lock is fair),
/// so readers waiting for it are not starved; nothing is left queued without a holder.
async fn hold_partition(
    shared: Arc<Shared>,
    topic: String,
    p: i32,
    state: crate::client::SharedPartition,
    queue: Arc<Queue>,
) {
    let mut holding = Holding {
        queue: &queue,
        done: false,
    };
    let watch = Watch {
        shared: shared.clone(),
        topic: topic.clone(),
        p,
        queue: queue.clone(),
    };
    loop {
        // Without the partition's lock, which readers may be waiting for.
        queue.settled().await;
        let mut guard = state.lock().await;
        let Some(group) = take_group(&queue, &topic, p, shared.config.max_append_size) else {
            holding.done = true;
            return;
        };
        // The next group is decided while the last one's callers wait for it to be readable
        // (`Watch`): it is decided against the index, which holds it.
        commit_group(&watch, &mut guard, group, None).await;
    }
}

/// Stored appends whose callers are answered Ok once their records are readable.
struct Committed {
    answers: Vec<(Queued, AppendResult)>,
    /// Their last offset.
    last: i64,
    /// Answered `Unavailable` when not seen readable by then: the request timeout after the
    /// commit, and never past the first deadline among them.
    until: Instant,
    /// The last moment the records were known not to be readable yet: when the commit was asked
    /// for, then when each look that found the stable end short of `last` was sent. For a batch
    /// found stored by a later attempt of the same call, when the call first began writing it.
    /// For a re-send of a batch an earlier call stored: None when it was already seen readable
    /// (that call answered by its own window, and the idempotent answer must stay possible
    /// however long ago that was), else the last look that found it short.
    ///
    /// A `Start::Now` subscription starts at the stable end it finds and says `CaughtUp` one
    /// answer window and a quarter later ([`KafkaConfig::answer_window`], [`photon_api::now_start_wait`]). An append whose records became
    /// readable before that start is answered Ok only within the window after they became
    /// readable, so before that `CaughtUp`: an append answered Ok after `CaughtUp` became
    /// readable after the start, and the subscriber gets it. Past the window the caller hears
    /// `Unavailable` (stored; a re-send is answered as a retry).
    unreadable_at: Option<Instant>,
    /// [`KafkaConfig::answer_window`].
    window: Duration,
}

impl Committed {
    /// The appends of a transaction whose commit was asked for at `committing`.
    fn new(
        answers: Vec<(Queued, AppendResult)>,
        last: i64,
        committing: Instant,
        config: &KafkaConfig,
    ) -> Self {
        let mut c = Self::retry(answers, last, config);
        c.unreadable_at = Some(committing);
        c
    }

    /// Retries of a batch stored earlier, maybe not readable yet.
    fn retry(answers: Vec<(Queued, AppendResult)>, last: i64, config: &KafkaConfig) -> Self {
        let unreadable_at = answers.iter().filter_map(|(q, _)| q.sent_at).min();
        let first_deadline = answers.iter().map(|(q, _)| q.deadline).min();
        let until =
            first_deadline.map_or(Instant::now(), |d| d.min(Instant::now() + config.timeout));
        Self {
            answers,
            last,
            until,
            unreadable_at,
            window: config.answer_window,
        }
    }

    /// Answers the callers now that the records are readable: Ok within the answer window,
    /// `Unavailable` past it.
    fn answer_readable(self, topic: &str, p: i32) {
        let late = self
            .unreadable_at
            .map(|at| at.elapsed())
            .filter(|waited| *waited > self.window);
        let Some(waited) = late else {
            for (q, r) in self.answers {
                q.answer(Ok(r));
            }
            return;
        };
        let why = error::unavailable(format!(
            "{topic}/{p}: committed, but seen readable {waited:?} after it was last known unreadable (the commit asked for, or a look at the stable end), past the answer window of {:?} (answer_window_ms): a subscription started from now meanwhile may not deliver it; it is stored, and a re-send with the same ids is answered as a retry",
            self.window
        ));
        tracing::warn!(topic, p, error = %why, "photon-kafka: committed, answered too late");
        answer_all(self.answers.into_iter().map(|(q, _)| q).collect(), why);
    }
}

/// A partition's writing context: where it is, and who answers its committed appends.
struct Watch {
    shared: Arc<Shared>,
    topic: String,
    p: i32,
    queue: Arc<Queue>,
}

impl Watch {
    /// Answers `c`'s callers Ok once the partition's last stable offset passes `c.last` (at once
    /// when it was seen past it already), so that whoever reads after an append returns sees it,
    /// in any process. A commit returns once the coordinator decided it; the markers that make
    /// its records readable reach the partition a moment later. One watcher task per partition
    /// asks for the stable end for every group waiting, so a stalled stable end costs one
    /// request at a time, however many groups wait.
    fn when_readable(&self, c: Committed) {
        let mut r = self.queue.readable.lock().expect("readable lock");
        r.committed_at = Some(Instant::now());
        if c.last < r.end {
            drop(r);
            c.answer_readable(&self.topic, self.p);
            return;
        }
        r.waiting.push(c);
        if !std::mem::replace(&mut r.watching, true) {
            let (shared, topic, queue) =
                (self.shared.clone(), self.topic.clone(), self.queue.clone());
            tokio::spawn(watch_readable(shared, topic, self.p, queue));
        }
    }

    /// None when offset `last` was seen readable; else when the last look at the stable end
    /// (which found it short) was sent, if any was.
    fn unreadable_since(&self, last: i64) -> Option<Option<Instant>> {
        let r = self.queue.readable.lock().expect("readable lock");
        (last >= r.end).then_some(r.looked_at)
    }
}

/// The watcher of a partition's committed appends: asks for the last stable offset (one request
/// at a time, 1 ms apart at first, up to [`VISIBLE_POLL_FAST`] and, once it has not moved for
/// [`VISIBLE_FAST_FOR`], up to [`VISIBLE_POLL_MAX`]) and
/// answers the appends it passed; an append not seen readable by its `until` is answered
/// `Unavailable` (committed, but whoever reads now might not see it yet; a re-send is answered
/// as a retry). Ends when nothing waits.
async fn watch_readable(shared: Arc<Shared>, topic: String, p: i32, queue: Arc<Queue>) {
    let mut pause = Duration::from_millis(1);
    // When the stable end last moved (or the watch began).
    let mut moved_at = Instant::now();
    loop {
        // Each look is bounded by the request timeout and by the first `until` waiting, so a
        // stalled broker does not keep an append past the time it is to be answered.
        let first_until = {
            let r = queue.readable.lock().expect("readable lock");
            r.waiting.iter().map(|c| c.until).min()
        };
        let bound = first_until.map_or(shared.config.timeout, |u| {
            shared
                .config
                .timeout
                .min(u.saturating_duration_since(Instant::now()))
        });
        let asking = Instant::now();
        let asked = tokio::time::timeout(bound, stable_end(&shared, &topic, p))
            .await
            .unwrap_or_else(|_| {
                Err(error::unavailable(format!(
                    "{topic}/{p}: no last stable offset within {bound:?}"
                )))
            });
        let now = Instant::now();
        let (ready, late, next) = {
            let mut r = queue.readable.lock().expect("readable lock");
            let before = r.end;
            if let Ok(end) = asked {
                r.end = r.end.max(end);
            }
            let end = r.end;
            let (ready, mut rest): (Vec<_>, Vec<_>) = std::mem::take(&mut r.waiting)
                .into_iter()
                .partition(|c| c.last < end);
            if asked.is_ok() {
                // Not readable when this look was sent, whoever stored them.
                r.looked_at = Some(asking);
                for c in rest.iter_mut() {
                    c.unreadable_at = c.unreadable_at.max(Some(asking));
                }
            }
            let (late, rest): (Vec<_>, Vec<_>) = rest.into_iter().partition(|c| c.until <= now);
            r.waiting = rest;
            if r.waiting.is_empty() {
                r.watching = false;
            }
            if end > before {
                pause = Duration::from_millis(1);
                moved_at = now;
            }
            (ready, late, r.waiting.iter().map(|c| c.until).min())
        };
        let shrank = !ready.is_empty() || !late.is_empty();
        for c in ready {
            c.answer_readable(&topic, p);
        }
        for c in late {
            let last = c.last;
            let why = match &asked {
                Ok(end) => error::unavailable(format!(
                    "{topic}/{p}: committed, but offset {last} was not readable in time (the last stable offset is {end})"
                )),
                Err(e) => Error::unavailable(
                    BACKEND,
                    format!("{topic}/{p}: committed, not yet seen readable"),
                    error::duplicate(e),
                ),
            };
            tracing::warn!(topic, p, error = %why, "photon-kafka: committed, not yet readable");
            answer_all(c.answers.into_iter().map(|(q, _)| q).collect(), why);
        }
        if shrank {
            queue.answered.notify_waiters();
        }
        let Some(next) = next else {
            return;
        };
        let at = (Instant::now() + pause).min(next);
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        let cap = if moved_at.elapsed() < VISIBLE_FAST_FOR {
            VISIBLE_POLL_FAST
        } else {
            VISIBLE_POLL_MAX
        };
        pause = (pause * 2).min(cap);
    }
}

/// Clears the holder mark should a holder end without seeing its queue empty (a panic, a runtime
/// shutting down), so the next append starts a new holder.
struct Holding<'a> {
    queue: &'a Queue,
    done: bool,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Ok(mut pending) = self.queue.pending.lock() {
                pending.holder = false;
            }
        }
    }
}

/// The next group: queued appends in arrival order, one per stream (a second append to the same
/// stream must be decided against the first one's committed result, so it waits for the next
/// group), within the byte and count limits. Appends whose deadline passed while queued are
/// answered `Unavailable` (never sent, so not stored). None when nothing is queued: the caller
/// stops holding, and the next append starts a new holder.
fn take_group(queue: &Queue, topic: &str, p: i32, max_bytes: usize) -> Option<Vec<Queued>> {
    let mut pending = queue.lock();
    let now = Instant::now();
    let mut group = Vec::new();
    let mut streams = HashSet::new();
    let mut bytes = 0;
    let mut waiting = VecDeque::new();
    while let Some(q) = pending.appends.pop_front() {
        if q.deadline <= now {
            pending.bytes -= q.size;
            let e = error::unavailable(format!(
                "the append to {} waited for {topic}/{p} past its deadline and was not sent; nothing was stored",
                q.stream
            ));
            q.answer(Err(e));
            continue;
        }
        let fits = group.is_empty() || (bytes + q.size <= max_bytes && group.len() < MAX_GROUP);
        if fits && !streams.contains(q.stream.as_str()) {
            streams.insert(q.stream.as_str().to_owned());
            bytes += q.size;
            group.push(q);
        } else {
            waiting.push_back(q);
        }
    }
    pending.appends = waiting;
    pending.bytes -= bytes;
    if group.is_empty() {
        pending.holder = false;
        return None;
    }
    Some(group)
}

/// Why one attempt did not finish.
enum Attempt {
    /// Another process took the partition over (or the outcome is unknown): take it back, read
    /// what changed, decide again.
    Again(Error),
    /// Final for every append still undecided, and the producer's state is unknown.
    Stop(Error),
    /// The broker refused a record (too large, not permitted): retrying the group cannot help,
    /// but its other appends may be fine alone.
    Refused(Error),
}

/// Decides and commits a group, answering each append once its outcome is final. Each append
/// keeps its own deadline: one that passes between attempts is answered `Unavailable` (with the
/// last failure as its source) and is not sent again. `last_failure` is an earlier attempt's
/// failure whose outcome is unknown, when the group is split after it. Appends committed are
/// answered once readable (`Watch::when_readable`).
async fn commit_group(
    watch: &Watch,
    state: &mut PartitionState,
    mut group: Vec<Queued>,
    mut last_failure: Option<Error>,
) {
    let (topic, p) = (watch.topic.as_str(), watch.p);
    let mut attempt = 0u32;
    loop {
        let now = Instant::now();
        let (late, live): (Vec<Queued>, Vec<Queued>) =
            group.into_iter().partition(|q| q.deadline <= now);
        group = live;
        answer_late(late, topic, p, last_failure.as_ref());
        // Contention between processes ends when one of them commits; each append gives up
        // at its own deadline, so a caller always hears back.
        let Some(cutoff) = group.iter().map(|q| q.deadline).min() else {
            return;
        };
        attempt += 1;
        for q in &mut group {
            q.attempts += 1;
        }
        match try_group(watch, state, &mut group, cutoff).await {
            Ok(()) => return,
            Err(Attempt::Stop(e)) => {
                state.producer = None;
                return answer_all(group, final_answer(e, last_failure.as_ref()));
            }
            Err(Attempt::Refused(e)) => {
                state.producer = None;
                if group.len() == 1 {
                    return answer_all(group, final_answer(e, last_failure.as_ref()));
                }
                // One append the broker refuses must not fail the others: each alone.
                for q in group {
                    let earlier = last_failure.as_ref().map(error::duplicate);
                    Box::pin(commit_group(watch, state, vec![q], earlier)).await;
                }
                return;
            }
            Err(Attempt::Again(why)) => {
                state.producer = None;
                tracing::debug!(topic, p, attempt, error = %why, "photon-kafka: group retried");
                // Exponential backoff with jitter, so racing processes stop fencing each other;
                // never past the first deadline, which is answered next round.
                let cap = 10u64 << attempt.min(7);
                let pause = rand::rng().random_range(cap / 2..=cap);
                let until = (Instant::now() + Duration::from_millis(pause)).min(cutoff);
                tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                last_failure = Some(why);
            }
        }
    }
}

/// Answers the appends whose deadline passed while their group was retried: `Unavailable`
/// whatever the last failure was (a fenced commit is not a definite refusal; an earlier attempt
/// may have landed), with that failure as the source.
fn answer_late(late: Vec<Queued>, topic: &str, p: i32, why: Option<&Error>) {
    for q in late {
        let message = format!(
            "the append to {} did not commit on {topic}/{p} before its deadline; its outcome is unknown, retry with the same ids",
            q.stream
        );
        let e = match why {
            Some(why) => Error::unavailable(BACKEND, message, error::duplicate(why)),
            None => error::unavailable(message),
        };
        q.answer(Err(e));
    }
}

/// The answer to appends an attempt ended with `e` for good. After an earlier attempt whose
/// outcome is unknown (`earlier`: a commit timed out, say) a definite error would be wrong: that
/// attempt may have committed. The answer is then `Unavailable`, with `e` as its source.
fn final_answer(e: Error, earlier: Option<&Error>) -> Error {
    match earlier {
        Some(earlier) if !e.is_retryable() => Error::unavailable(
            BACKEND,
            format!(
                "an earlier attempt's outcome is unknown ({earlier}), and the next one failed; retry with the same ids"
            ),
            e,
        ),
        _ => e,
    }
}

/// Answers every append of `group` with `e` (the same failure for each; it says what failed).
fn answer_all(group: Vec<Queued>, e: Error) {
    let last = group.len().saturating_sub(1);
    let mut e = Some(e);
    for (i, q) in group.into_iter().enumerate() {
        let answer = if i == last {
            e.take().expect("answered once")
        } else {
            error::duplicate(e.as_ref().expect("kept for the last"))
        };
        q.answer(Err(answer));
    }
}

/// Becomes the partition's writer: a producer whose `init_transactions` fenced any other (a new
/// one, or one initialised ahead by `warm_up`: should another process have taken the partition
/// since, its first commit fails and the next attempt takes the partition over anew), then the
/// index read up to the stable end, which now includes everything committed. The
/// topic's partition count is asked for first: a count changed since this store placed the
/// stream refuses the topic before anyone is fenced.
async fn take_over(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    state: &mut PartitionState,
    cutoff: Instant,
) -> Result<(), Error> {
    // Asked within the group's first deadline, like every step of a take-over.
    let what = || format!("{topic}/{p}: confirming the partition count (nothing was sent)");
    let partitions = by(cutoff, what, shared.partition_count_now(topic)).await?;
    let mut writer = match state.warm.take() {
        Some(warm) => warm,
        None => {
            shared.evict_writers(shared.config.max_producers.saturating_sub(1), PRODUCER_IDLE);
            let made = new_writer(shared, topic, p, cutoff).await?;
            // Warm producers made while this one was initialised give way to it.
            shared.evict_writers(shared.config.max_producers, PRODUCER_IDLE);
            made
        }
    };
    shared.take_overs.fetch_add(1, Ordering::Relaxed);
    writer.partitions = partitions;
    writer.last_used = Instant::now();
    state.producer = Some(writer);
    let what = || format!("reading {topic}/{p} up to its stable end after taking it over");
    by(cutoff, what, catch_up(shared, topic, p, &mut state.index)).await?;
    Ok(())
}

/// A new transactional producer for `topic`/`p`, initialised before `cutoff`: its
/// `init_transactions` fences the partition's writer in every other process and settles that
/// writer's open transaction. Its partition count is set by the take-over that uses it.
async fn new_writer(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    cutoff: Instant,
) -> Result<Writer, Error> {
    let producer: FutureProducer = shared
        .config
        .transactional_producer_config(&transactional_id(topic, p))
        .create()
        .map_err(|e| error::from_kafka("creating a producer", e))?;
    let producer = Arc::new(producer);
    let timeout = shared.config.timeout.min(remaining(cutoff));
    let pr = producer.clone();
    let init = async move {
        blocking(move || pr.init_transactions(timeout))
            .await?
            .map_err(|e| error::from_kafka(format!("becoming the writer of {topic}/{p}"), e))
    };
    let what = || format!("becoming the writer of {topic}/{p}");
    if let Err(e) = by(cutoff, what, init).await {
        // Closing a producer joins its threads: off the async threads.
        tokio::task::spawn_blocking(move || drop(producer));
        return Err(e);
    }
    shared.live_writers.fetch_add(1, Ordering::Relaxed);
    Ok(Writer {
        producer,
        partitions: 0,
        last_used: Instant::now(),
        live: shared.live_writers.clone(),
    })
}

fn result_of(
    index: &PartitionIndex,
    stream: &StreamId,
    p: i32,
    first: Version,
    len: usize,
) -> AppendResult {
    let offsets = index.offsets(stream.as_str());
    let checkpoints = (first.0..first.0 + len as u64)
        .map(|v| position::partition_checkpoint(stream.category_name(), p, offsets[v as usize] + 1))
        .collect();
    AppendResult {
        first_version: first,
        last_version: Version(first.0 + len as u64 - 1),
        checkpoints,
    }
}

/// One attempt at a group. Appends decided (refused, or retries of stored batches) are removed
/// from `group` and answered as soon as that is final (a retry once its batch is readable); the
/// rest are written in one transaction and answered once it is readable. The writer role is
/// taken (fencing any other) only when something is left to write.
async fn try_group(
    watch: &Watch,
    state: &mut PartitionState,
    group: &mut Vec<Queued>,
    cutoff: Instant,
) -> Result<(), Attempt> {
    let (shared, topic, p) = (&watch.shared, watch.topic.as_str(), watch.p);
    settle_against_committed(watch, state, group, cutoff).await?;
    if group.is_empty() {
        return Ok(());
    }
    if state.producer.is_none() {
        // init_transactions already waits out other writers' transactions; a failure here is
        // an unreachable broker or a refused setting.
        take_over(shared, topic, p, state, cutoff)
            .await
            .map_err(Attempt::Stop)?;
        settle_decided(watch, state, group, true);
        if group.is_empty() {
            return Ok(());
        }
    }
    let writing = Instant::now();
    let writes: Vec<(Queued, Version)> = std::mem::take(group)
        .into_iter()
        .map(|mut q| {
            q.sent_at.get_or_insert(writing);
            let first = state
                .index
                .current(q.stream.as_str())
                .map_or(Version(0), Version::next);
            (q, first)
        })
        .collect();
    match write(shared, topic, p, state, &writes, cutoff).await {
        Ok((last, committing)) => {
            let answers = writes
                .into_iter()
                .map(|(q, first)| {
                    let r = result_of(&state.index, &q.stream, p, first, q.events.len());
                    (q, r)
                })
                .collect();
            watch.when_readable(Committed::new(answers, last, committing, &shared.config));
            Ok(())
        }
        Err(attempt) => {
            // Undecided: back into the group, decided again next attempt.
            group.extend(writes.into_iter().map(|(q, _)| q));
            Err(attempt)
        }
    }
}

/// Answers the appends of `group` the committed state decides. A refusal is final only against
/// an index read up to the partition's stable end, and that read needs no writer role: a
/// process that lost a race learns it without fencing the winner.
async fn settle_against_committed(
    watch: &Watch,
    state: &mut PartitionState,
    group: &mut Vec<Queued>,
    cutoff: Instant,
) -> Result<(), Attempt> {
    let (shared, topic, p) = (&watch.shared, watch.topic.as_str(), watch.p);
    // Without a producer the index may be behind: read up to the stable end first. With one it
    // is current unless another process took the partition over, which a refusal checks.
    // An index holding part of an append (a catch-up cut off) is behind too: nothing is
    // decided from it.
    let behind = state.producer.is_none() || state.index.mid_append();
    if behind {
        catch_up_or_stop(shared, topic, p, state, cutoff).await?;
    }
    if settle_decided(watch, state, group, behind) {
        catch_up_or_stop(shared, topic, p, state, cutoff).await?;
        settle_decided(watch, state, group, true);
    }
    Ok(())
}

/// Reads the partition up to its stable end, before `cutoff`. Records this writer did not write
/// mean another process holds the partition now: the producer is given up.
async fn catch_up_or_stop(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    state: &mut PartitionState,
    cutoff: Instant,
) -> Result<(), Attempt> {
    let what = || format!("reading {topic}/{p} up to its stable end");
    match by(cutoff, what, catch_up(shared, topic, p, &mut state.index)).await {
        Ok(true) => state.producer = None,
        Ok(false) => {}
        Err(e) => return Err(Attempt::Stop(e)),
    }
    Ok(())
}

/// Answers the appends of `group` that the index decides (retries of stored batches, once the
/// batch is readable: it may be the last group's, committed and not readable yet; and refusals
/// when `refusals_final`); leaves the rest in `group`. Returns whether a refusal was held back
/// for a check against a current index.
fn settle_decided(
    watch: &Watch,
    state: &PartitionState,
    group: &mut Vec<Queued>,
    refusals_final: bool,
) -> bool {
    let p = watch.p;
    let mut left = Vec::with_capacity(group.len());
    let mut held = false;
    for q in std::mem::take(group) {
        match decide(&state.index, &q) {
            Err(refusal) if refusals_final => {
                q.answer(Err(refusal));
            }
            Err(_) => {
                held = true;
                left.push(q);
            }
            Ok(BatchKind::Retry { first }) => {
                let r = result_of(&state.index, &q.stream, p, first, q.events.len());
                let offsets = state.index.offsets(q.stream.as_str());
                let last = offsets[(first.0 as usize) + q.events.len() - 1];
                // Stored by this call's own earlier attempt (its outcome was unknown), or by
                // an earlier call this one re-sends (see `Committed::unreadable_at`).
                let mut c = Committed::retry(vec![(q, r)], last, &watch.shared.config);
                match watch.unreadable_since(last) {
                    None => c.answer_readable(&watch.topic, p),
                    Some(looked_at) => {
                        // Not seen readable yet: it may be by now, but not before the last
                        // look that found it short, so its Ok is bound from there.
                        c.unreadable_at = c.unreadable_at.max(looked_at);
                        watch.when_readable(c);
                    }
                }
            }
            Ok(BatchKind::New) => left.push(q),
        }
    }
    *group = left;
    held
}

/// The time left until `cutoff`, zero once it passed.
fn remaining(cutoff: Instant) -> Duration {
    cutoff.saturating_duration_since(Instant::now())
}

/// `step` (one that asks the brokers), given up at `cutoff`: then `Unavailable`, saying what
/// did not finish. A step given up leaves nothing half done that matters: reads only advance an
/// index record by record, and nothing sent is committed without a commit.
async fn by<T>(
    cutoff: Instant,
    what: impl FnOnce() -> String,
    step: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout_at(tokio::time::Instant::from_std(cutoff), step).await {
        Ok(r) => r,
        Err(_) => Err(error::unavailable(format!(
            "{} did not finish before the append's deadline",
            what()
        ))),
    }
}

/// Writes `writes` in one transaction and indexes them once it is committed; returns the last
/// offset written and when the commit was asked for. The commit is asked for only before `cutoff` (the first deadline of the
/// group) and waited for at most until then; past it the transaction is aborted instead.
async fn write(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    state: &mut PartitionState,
    writes: &[(Queued, Version)],
    cutoff: Instant,
) -> Result<(i64, Instant), Attempt> {
    let writer = state.producer.as_mut().expect("taken over above");
    writer.last_used = Instant::now();
    let (producer, partitions) = (writer.producer.clone(), writer.partitions);
    // Recorded time never goes backwards within a partition, whatever the writers' clocks say.
    let now = Timestamp::now()
        .unix_micros()
        .max(state.index.last_recorded);
    let recorded_at = Timestamp::from_unix_micros(now).expect("a current time");
    let (pr, timeout) = (producer.clone(), shared.config.timeout);
    blocking(move || pr.begin_transaction())
        .await
        .map_err(Attempt::Again)?
        .map_err(|e| failed(format!("beginning a transaction on {topic}/{p}"), e))?;
    let sent = tokio::time::timeout_at(
        tokio::time::Instant::from_std(cutoff),
        send_all(&producer, topic, p, partitions, writes, recorded_at),
    )
    .await;
    // On a failure nothing is committed, and nothing will be: the caller replaces the producer,
    // whose transaction is aborted as it closes (in the background, not within the deadline),
    // and the next writer's take-over aborts it anyway.
    let offsets = match sent {
        Ok(Ok(offsets)) => offsets,
        Ok(Err(e)) => return Err(failed(format!("appending to {topic}/{p}"), e)),
        Err(_) => {
            return Err(Attempt::Again(error::unavailable(format!(
                "{topic}/{p}: the records were not acknowledged before a deadline; not committed"
            ))))
        }
    };
    let left = remaining(cutoff);
    if left.is_zero() {
        // Too late to commit: the transaction is aborted, so the records never become readable.
        return Err(Attempt::Again(error::unavailable(format!(
            "{topic}/{p}: a deadline passed before the transaction could be committed; not committed"
        ))));
    }
    // The records cannot be readable before the commit is asked for: from here on, how long
    // the callers wait for their answer counts against the answer window.
    let committing = Instant::now();
    commit(&producer, timeout.min(left), topic, p).await?;
    index_written(&mut state.index, writes, &offsets, now);
    shared.bound_indexes();
    // A commit returns once the coordinator has decided it; the markers that make the records
    // readable reach the partition a moment later. The callers are answered once they did
    // (`Watch::when_readable`), so that whoever reads after an append returns sees it; the
    // partition is not held for that wait.
    Ok((
        offsets.iter().copied().max().unwrap_or_default(),
        committing,
    ))
}

/// Queues the records of `writes` strictly in order (a full queue is waited out on the record
/// that met it, never skipped ahead of, so each stream's versions get rising offsets) and waits
/// for every delivery: their offsets, or the first failure.
async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    p: i32,
    partitions: i32,
    writes: &[(Queued, Version)],
    recorded_at: Timestamp,
) -> Result<Vec<i64>, KafkaError> {
    let mut deliveries = Vec::new();
    let mut failure = None;
    'queueing: for (q, first) in writes {
        let key = q.stream.as_str();
        for (i, e) in q.events.iter().enumerate() {
            let version = Version(first.0 + i as u64);
            let headers =
                codec::headers_of(e, version, recorded_at, *first, q.events.len(), partitions);
            let record = FutureRecord::to(topic)
                .partition(p)
                .key(key)
                .payload(&e.payload.bytes[..])
                .timestamp(recorded_at.unix_millis())
                .headers(headers);
            match send_waiting(producer, record).await {
                Ok(delivery) => deliveries.push(delivery),
                Err(e) => {
                    failure = Some(e);
                    break 'queueing;
                }
            }
        }
    }
    // Every queued record is waited for, also after a failure: none is left in flight.
    let mut offsets = Vec::with_capacity(deliveries.len());
    for d in join_all(deliveries).await {
        match d {
            Ok(Ok(delivery)) => offsets.push(delivery.offset),
            Ok(Err((e, _))) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert(KafkaError::Canceled);
            }
        }
    }
    if failure.is_none() && offsets.windows(2).any(|w| w[0] >= w[1]) {
        failure = Some(KafkaError::MessageProduction(
            RDKafkaErrorCode::InvalidRecord,
        ));
    }
    failure.map_or(Ok(offsets), Err)
}

/// Queues `record`, waiting while librdkafka's send queue is full.
async fn send_waiting(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, str, [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// How long [`commit_delivered`] waits for delivered records to be released before it commits
/// anyway.
const RELEASE_WAIT_MAX: Duration = Duration::from_millis(100);

/// Commits `producer`'s open transaction, whose records have all been delivered (their
/// delivery futures resolved), blocking the calling thread.
///
/// rust-rdkafka's `commit_transaction` flushes first, and its flush, finding a record still
/// counted, polls the producer's event queue in steps of 100 ms, each step waiting its full
/// length whatever arrives. A delivered record is counted until its delivery event is freed,
/// a moment after its future resolved, so a commit right after the last delivery now and then
/// took 100 ms longer (1 commit in 50 to 100 measured here; librdkafka's debug log shows
/// `commit_transaction` called 100 ms after the delivery). So the commit first waits (up to
/// [`RELEASE_WAIT_MAX`], and a quarter of `timeout`) until no record is counted, asking librdkafka with flushes that do not
/// wait (they count only records, not log or statistics events queued for the application).
///
/// # Errors
/// - As `commit_transaction`: the outcome is unknown unless the error says otherwise.
pub fn commit_delivered(producer: &FutureProducer, timeout: Duration) -> KafkaResult<()> {
    let started = Instant::now();
    let until = started + RELEASE_WAIT_MAX.min(timeout / 4);
    while producer.flush(Duration::ZERO).is_err() && Instant::now() < until {
        std::thread::sleep(Duration::from_micros(50));
    }
    producer.commit_transaction(timeout.saturating_sub(started.elapsed()))
}

/// Commits the open transaction.
async fn commit(
    producer: &Arc<FutureProducer>,
    timeout: Duration,
    topic: &str,
    p: i32,
) -> Result<(), Attempt> {
    let pr = producer.clone();
    match blocking(move || commit_delivered(&pr, timeout)).await {
        Ok(Ok(())) => Ok(()),
        // The outcome is unknown (a commit can land and still report an error): the next
        // attempt takes the partition over, which settles the transaction, then reads it, so a
        // landed batch is recognised by its ids.
        Ok(Err(e)) => Err(failed(format!("committing to {topic}/{p}"), e)),
        Err(e) => Err(Attempt::Again(e)),
    }
}

/// Indexes the committed records of `writes` at `offsets` (one per event, in order).
fn index_written(
    index: &mut PartitionIndex,
    writes: &[(Queued, Version)],
    offsets: &[i64],
    recorded_at: i64,
) {
    let mut offset = offsets.iter();
    for (q, first) in writes {
        for (i, e) in q.events.iter().enumerate() {
            index.apply(
                *offset.next().expect("one offset per event"),
                codec::IndexEntry {
                    stream: q.stream.as_str().to_owned(),
                    event_id: e.event_id,
                    version: first.0 + i as u64,
                    batch_first: first.0,
                    batch_len: q.events.len() as u32,
                    recorded_at,
                },
            );
        }
    }
    // Our own records are indexed; the next catch-up starts after them. Offsets of transaction
    // markers are read past then.
    let last = offsets.iter().copied().max().unwrap_or_default();
    index.next_offset = index.next_offset.max(last + 1);
    index.used = Some(Instant::now());
}

/// A failed send, commit or begin: decided again after a take-over, unless retrying cannot help
/// (a record the broker refuses as too large, a missing permission: `Refused`). The transaction
/// did not commit, or its outcome is unknown; either way the producer is replaced.
fn failed(context: String, e: KafkaError) -> Attempt {
    let last = error::is_final_send(&e);
    let error = error::from_kafka(context, e);
    if last {
        Attempt::Refused(error)
    } else {
        Attempt::Again(error)
    }
}

/// Whether `q` is new (to be written), a retry of a stored batch, or refused, by the index.
fn decide(index: &PartitionIndex, q: &Queued) -> Result<BatchKind, Error> {
    let (stream, expected, events) = (&q.stream, q.expected, &q.events);
    let kind = classify_batch(stream, events, |id| index.stored(stream.as_str(), id))?;
    if kind == BatchKind::New {
        let current = index.current(stream.as_str());
        if !expected.matches(current) {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicRefused;

    fn refusal() -> Error {
        crate::topic::refused(TopicRefused::PartitionsChanged {
            topic: "p.t".into(),
            was: Some(3),
            now: 6,
            evidence: "the brokers now report 6".into(),
        })
    }

    #[test]
    fn a_definite_failure_after_an_unknown_outcome_is_unavailable_with_its_cause() {
        let earlier = error::unavailable("committing to p.t/0: timed out".to_owned());
        let answer = final_answer(refusal(), Some(&earlier));
        assert!(answer.is_retryable(), "{answer:?}");
        assert!(answer.to_string().contains("timed out"), "{answer}");
        let source = std::error::Error::source(&answer).expect("the refusal kept as source");
        assert!(source.to_string().contains("partition count"), "{source}");
    }

    #[test]
    fn a_failure_is_answered_as_is_without_an_earlier_unknown_outcome() {
        let answer = final_answer(refusal(), None);
        assert!(!answer.is_retryable(), "{answer:?}");
        assert_eq!(answer.to_string(), refusal().to_string());
        let earlier = error::unavailable("committing to p.t/0: timed out".to_owned());
        let later = error::unavailable("reading p.t/0: no answer".to_owned());
        let answer = final_answer(later, Some(&earlier));
        assert!(answer.is_retryable());
        assert!(answer.to_string().contains("no answer"), "{answer}");
    }
}
