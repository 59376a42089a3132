//! Playing a production store's weaker guarantees ([`Faults`]): appends answered `Unavailable`
//! before or after they are stored, category and all subscriptions ordered per partition only
//! and delivered after a settle delay, and subscriptions that drop now and then.
//!
//! This module only wraps the ordinary protocol (`writer`, `subscription`) and reads the log
//! through the same lock; it never changes what is stored, so every guarantee of the contract
//! still holds, only in its weaker, production form. Nothing here runs unless a fault option
//! was given: the crate root checks one `Option` per call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use photon_api::validate::validate_batch;
use photon_api::{
    open_subscription, AppendResult, Checkpoint, Error, EventData, ExpectedVersion, RecordedEvent,
    Selector, Start, StreamId, SubscriptionItem, SubscriptionMode, SubscriptionRequest, Timestamp,
};
use tokio::sync::watch;

use crate::client::{Shared, State, BACKEND, TELEMETRY};
use crate::config::Faults;
use crate::{codec, error, subscription, writer};

/// The first byte of a partitioned subscription's checkpoint token, before one big-endian `u64`
/// per partition; a plain position token is 8 bytes, so the two never mix up.
const VECTOR_TAG: u8 = b'p';

/// The most log positions one fetch scans per partition, bounding how long the read lock is
/// held.
const SCAN: usize = 4096;

/// The most events one partition delivers per turn; each turn takes 1 to this many, decided by
/// the subscription's generator, so partitions interleave unevenly as real consumers see them.
const TURN: u64 = 8;

/// The faults of one store and the generators that decide them.
pub(crate) struct FaultState {
    pub(crate) config: Faults,
    /// Decides each append, in call order.
    appends: Mutex<Rng>,
    /// Subscriptions opened so far: the n-th gets a generator of its own seeded from `n`, so
    /// its decisions do not depend on how other subscriptions interleave with it.
    opened: AtomicU64,
}

impl FaultState {
    pub(crate) fn new(config: Faults) -> Self {
        Self {
            appends: Mutex::new(Rng::new(config.seed, 0)),
            opened: AtomicU64::new(0),
            config,
        }
    }

    /// Whether category and all subscriptions need the weak cursor.
    fn weak_order(&self) -> bool {
        self.config.partitions.is_some() || !self.config.delivery_delay.is_zero()
    }

    fn partitions(&self) -> usize {
        self.config.partitions.map_or(1, |n| n as usize)
    }
}

/// A small, fixed pseudo-random generator (SplitMix64): its output for a seed never changes with
/// a dependency's version, which is what makes a seed replayable.
struct Rng(u64);

impl Rng {
    /// The generator of decision stream `stream` under `seed`.
    fn new(seed: u64, stream: u64) -> Self {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `share`; always draws, so every decision moves the sequence by one.
    fn chance(&mut self, share: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < share
    }

    /// A number from 1 to `n`.
    fn one_to(&mut self, n: u64) -> u64 {
        1 + self.next_u64() % n
    }
}

/// An append that may be answered `Unavailable` before or after it is stored.
pub(crate) fn append(
    shared: &Shared,
    faults: &FaultState,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
) -> Result<AppendResult, Error> {
    // A client checks its input before sending it: a bad batch is refused as such, never
    // answered `Unavailable`.
    validate_batch(stream, &events, shared.config.max_event_size, None)?;
    let (before, after) = {
        let mut rng = faults.appends.lock().unwrap_or_else(|e| e.into_inner());
        let c = &faults.config;
        (
            rng.chance(c.unavailable_before),
            rng.chance(c.unavailable_after),
        )
    };
    if before {
        return Err(unavailable(format!(
            "append to {stream} not stored: answered Unavailable before storing \
             (unavailable_before, seed {})",
            faults.config.seed
        )));
    }
    let result = writer::append(shared, stream, expected, events)?;
    if after {
        return Err(unavailable(format!(
            "append to {stream} stored as versions {}..={} but answered Unavailable \
             (unavailable_after, seed {}); re-send it with the same event ids",
            result.first_version, result.last_version, faults.config.seed
        )));
    }
    Ok(result)
}

fn unavailable(message: String) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message,
        source: None,
    }
}

/// A subscription under faults: the weak cursor for category and all selectors when order or
/// delivery is weakened, the ordinary one otherwise, either of them dropping now and then.
pub(crate) fn subscribe(
    shared: &Arc<Shared>,
    faults: &FaultState,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    let n = faults.opened.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng::new(faults.config.seed, n + 1);
    let drop_rng = Rng::new(rng.next_u64(), 0);
    let items = if faults.weak_order() && !matches!(selector, Selector::Stream(_)) {
        weak_subscribe(shared, faults, selector, start, mode, rng)
    } else {
        subscription::subscribe(shared, selector, start, mode)
    };
    if faults.config.subscription_drop > 0.0 {
        dropping(items, drop_rng, faults.config.subscription_drop, n)
    } else {
        items
    }
}

/// Ends `items` with an `Unavailable` item after a delivered event, with chance `share` per
/// event: always after the event, so every subscription makes progress.
fn dropping(
    items: BoxStream<'static, Result<SubscriptionItem, Error>>,
    rng: Rng,
    share: f64,
    number: u64,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    struct Dropping {
        items: BoxStream<'static, Result<SubscriptionItem, Error>>,
        rng: Rng,
        delivered: u64,
        drop_now: bool,
        done: bool,
    }
    let state = Dropping {
        items,
        rng,
        delivered: 0,
        drop_now: false,
        done: false,
    };
    stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        if s.drop_now {
            s.done = true;
            let message = format!(
                "subscription {number} dropped after {} events (subscription_drop); \
                 resume from the last checkpoint",
                s.delivered
            );
            return Some((Err(unavailable(message)), s));
        }
        let item = s.items.next().await?;
        match &item {
            Ok(SubscriptionItem::Event(_)) => {
                s.delivered += 1;
                s.drop_now = s.rng.chance(share);
            }
            Err(_) => s.done = true,
            Ok(_) => {}
        }
        Some((item, s))
    })
    .boxed()
}

/// Where a weak subscription resumes: after one log position (a plain checkpoint, as appends and
/// a store without partitions make), or after one position per partition.
enum Resume {
    Position(u64),
    Vector(Vec<u64>),
}

/// Decodes a checkpoint for a weak subscription of a store with `partitions` partitions.
fn resume(checkpoint: &Checkpoint, partitions: usize) -> Result<Resume, Error> {
    let token = checkpoint.token_for(BACKEND)?;
    if token.len() == 8 {
        return codec::position(checkpoint).map(Resume::Position);
    }
    let invalid = |reason: String| Error::InvalidInput {
        what: format!("checkpoint {checkpoint}"),
        reason,
    };
    match token.split_first() {
        Some((&VECTOR_TAG, rest)) if rest.len() % 8 == 0 => {
            let next: Vec<u64> = rest
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                .collect();
            if next.len() != partitions {
                return Err(invalid(format!(
                    "it holds positions of {} partitions, this store has {partitions}: \
                     it was made with another partitions= option",
                    next.len()
                )));
            }
            Ok(Resume::Vector(next))
        }
        _ => Err(invalid(format!(
            "a memory checkpoint holds 8 bytes or a partition vector, this one {} bytes",
            token.len()
        ))),
    }
}

/// The checkpoint of a partitioned subscription that resumes at `next` (per partition, the
/// smallest position not yet delivered).
fn vector_checkpoint(next: &[u64]) -> Checkpoint {
    let mut token = Vec::with_capacity(1 + 8 * next.len());
    token.push(VECTOR_TAG);
    for p in next {
        token.extend_from_slice(&p.to_be_bytes());
    }
    Checkpoint::new(BACKEND, &token)
}

/// The partition of a stream: a stable hash of its name (FNV-1a, never seeded), so a stream
/// keeps its partition across stores and runs, as a Kafka record key does.
fn partition_of(stream: &StreamId, partitions: usize) -> usize {
    let hash = stream
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    (hash % partitions as u64) as usize
}

/// A category or all subscription ordered per partition and/or delivered after a delay.
fn weak_subscribe(
    shared: &Arc<Shared>,
    faults: &FaultState,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
    rng: Rng,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    let partitions = faults.partitions();
    let delay = faults.config.delivery_delay;
    let partitioned = faults.config.partitions.is_some();
    open_subscription(
        &TELEMETRY,
        selector,
        start,
        mode,
        |checkpoint, _| resume(checkpoint, partitions).map(|r| (r, checkpoint.clone())),
        |request| {
            let cursor = WeakCursor::open(shared, request, partitions, partitioned, delay, rng)?;
            Ok(stream::unfold(cursor, |mut cursor| async move {
                let item = cursor.next_item().await?;
                Some((item, cursor))
            }))
        },
    )
}

/// A weak subscription's state: one cursor per partition on the log.
struct WeakCursor {
    shared: Arc<Shared>,
    selector: Selector,
    mode: SubscriptionMode,
    partitions: usize,
    /// Whether checkpoints are partition vectors (else plain positions).
    partitioned: bool,
    delay: Duration,
    /// Per partition, the smallest log position neither delivered nor passed over.
    next: Vec<u64>,
    /// The end (exclusive) of the replay: the log length at the call; `u64::MAX` once live.
    end: u64,
    live: bool,
    /// The partition whose turn is next.
    turn: usize,
    /// Events of one partition's turn not yet delivered, with their positions.
    fetched: VecDeque<(u64, RecordedEvent)>,
    /// The partition of `fetched` and where its scan stopped, applied once they are delivered.
    scanned: Option<(usize, u64)>,
    rng: Rng,
    head: watch::Receiver<u64>,
}

/// What a fetch found.
enum Found {
    /// Events of one partition are in `fetched`.
    Events,
    /// A scan stopped at its limit: look again.
    More,
    /// Nothing deliverable now; `visible` is the log length old enough to deliver, `len` the
    /// log length.
    Nothing { visible: u64, len: u64 },
}

impl WeakCursor {
    fn open(
        shared: &Arc<Shared>,
        request: SubscriptionRequest<(Resume, Checkpoint)>,
        partitions: usize,
        partitioned: bool,
        delay: Duration,
        rng: Rng,
    ) -> Result<Self, Error> {
        let head = shared.head.subscribe();
        let state = shared.read();
        let len = state.log.len();
        let next = match (&request.start, request.after) {
            (_, Some((Resume::Position(p), checkpoint))) => {
                if p >= len {
                    return Err(error::checkpoint_past_end(&checkpoint, p, len));
                }
                vec![p + 1; partitions]
            }
            (_, Some((Resume::Vector(next), checkpoint))) => {
                if let Some(p) = next.iter().find(|p| **p > len) {
                    return Err(error::checkpoint_past_end(&checkpoint, *p, len));
                }
                next
            }
            (Start::Time(t), None) => vec![state.position_at(*t); partitions],
            (Start::Now, None) => vec![len; partitions],
            _ => vec![0; partitions],
        };
        drop(state);
        Ok(Self {
            shared: shared.clone(),
            selector: request.selector,
            mode: request.mode,
            partitions,
            partitioned,
            delay,
            next,
            end: len,
            live: false,
            turn: 0,
            fetched: VecDeque::new(),
            scanned: None,
            rng,
            head,
        })
    }

    /// The next item; None when a Cold subscription is done or the store is gone.
    async fn next_item(&mut self) -> Option<Result<SubscriptionItem, Error>> {
        loop {
            if let Some(item) = self.deliver() {
                return Some(Ok(item));
            }
            if self.live {
                // Mark the head seen before reading, so an append landing after the read wakes
                // us.
                self.head.borrow_and_update();
            }
            let found = {
                let shared = self.shared.clone();
                let state = shared.read();
                self.fetch(&state)
            };
            match found {
                Found::Events | Found::More => continue,
                Found::Nothing { visible, len } => {
                    let bound = self.end.min(len);
                    if visible < bound {
                        // Events are stored but not old enough yet: wait until the first is.
                        let wait = self.until_visible(visible);
                        tokio::time::sleep(wait).await;
                    } else if !self.live {
                        if self.mode == SubscriptionMode::Cold {
                            return None;
                        }
                        self.live = true;
                        self.end = u64::MAX;
                        return Some(Ok(SubscriptionItem::CaughtUp));
                    } else if self.head.changed().await.is_err() {
                        return None; // the store is gone: no more events can come
                    }
                }
            }
        }
    }

    /// The next fetched event, with the checkpoint that resumes right after it.
    fn deliver(&mut self) -> Option<SubscriptionItem> {
        let (position, mut event) = self.fetched.pop_front()?;
        let (partition, scanned_to) = self.scanned.expect("fetched events have a partition");
        self.next[partition] = position + 1;
        if self.partitioned {
            event.checkpoint = vector_checkpoint(&self.next);
        }
        if self.fetched.is_empty() {
            // Everything of this partition below the scan's end is delivered.
            self.next[partition] = scanned_to;
            self.scanned = None;
        }
        Some(SubscriptionItem::Event(event))
    }

    /// How long until the event at `position` is old enough to deliver.
    fn until_visible(&self, position: u64) -> Duration {
        let recorded = self.shared.read().log.get(position).recorded_at;
        let due = recorded.unix_micros() + self.delay.as_micros() as i64;
        let now = Timestamp::now().unix_micros();
        Duration::from_micros(due.saturating_sub(now).max(1) as u64)
    }

    /// Takes the next turn: up to a few events of the first partition, from `turn` on, that has
    /// deliverable ones.
    fn fetch(&mut self, state: &State) -> Found {
        let len = state.log.len();
        let visible = if self.delay.is_zero() {
            len
        } else {
            let cutoff = Timestamp::now().unix_micros() - self.delay.as_micros() as i64;
            state
                .log
                .partition_point(|r| r.recorded_at.unix_micros() <= cutoff)
        };
        let bound = self.end.min(visible);
        let mut more = false;
        for i in 0..self.partitions {
            let partition = (self.turn + i) % self.partitions;
            let take = self.rng.one_to(TURN) as usize;
            let (scanned_to, full) = self.scan(state, partition, bound, take);
            if !self.fetched.is_empty() {
                self.scanned = Some((partition, scanned_to));
                self.turn = partition + 1;
                return Found::Events;
            }
            self.next[partition] = scanned_to;
            more |= full;
        }
        if more {
            Found::More
        } else {
            Found::Nothing { visible, len }
        }
    }

    /// Copies up to `take` events of `partition` from its next position up to `bound` into
    /// `fetched`; returns where the scan stopped and whether it stopped at the [`SCAN`] limit.
    fn scan(&mut self, state: &State, partition: usize, bound: u64, take: usize) -> (u64, bool) {
        let from = self.next[partition];
        if from >= bound {
            return (from.max(bound), false);
        }
        let mut matches = |p: u64| {
            let record = state.log.get(p);
            let name = state.log.name(record.stream);
            if self.partitions == 1 || partition_of(name, self.partitions) == partition {
                self.fetched.push_back((p, state.log.event(p)));
            }
            self.fetched.len() == take
        };
        match &self.selector {
            Selector::Category(c) => {
                let all = state
                    .categories
                    .get(c.as_str())
                    .map_or(&[][..], |c| &c.positions);
                let start = all.partition_point(|p| *p < from);
                for (i, p) in all[start..].iter().take_while(|p| **p < bound).enumerate() {
                    if i == SCAN {
                        return (*p, true);
                    }
                    if matches(*p) {
                        return (p + 1, false);
                    }
                }
                (bound, false)
            }
            _ => {
                for p in from..bound {
                    if p - from == SCAN as u64 {
                        return (p, true);
                    }
                    if matches(p) {
                        return (p + 1, false);
                    }
                }
                (bound, false)
            }
        }
    }
}
