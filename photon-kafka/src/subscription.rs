//! Subscriptions: one read_committed consumer with a manual assignment per subscription, pulled
//! by the caller (librdkafka's prefetch queue is bounded). The subscription tracks the next
//! offset of every partition it reads; that vector is each event's checkpoint.
//!
//! Replay ends ("history as of the call") are the partitions' stable end offsets taken on the
//! first poll. A partition's replay is done once an event at or past its end arrives, or once
//! the consumer's position (which counts transaction markers) reaches it. Because the consumer
//! is the same before and after `CaughtUp`, HotCold has no switch at which to lose or repeat an
//! event.
//!
//! Opening (checking the start against the mode, decoding the checkpoint, ending after the first
//! error) is `photon_api::open_subscription`'s; this module owns only the cursor. It never
//! touches the version indexes or the writers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use photon_api::{
    cursor_stream, open_subscription, Checkpoint, Error, RecordedEvent, Selector, Start, StreamId,
    SubscriptionCursor, SubscriptionItem, SubscriptionMode, SubscriptionRequest, Timestamp,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::client::{Shared, TELEMETRY};
use crate::codec::{self, partition_for};
use crate::error;
use crate::position::{self, Position};
use crate::reader::{partition_bounds, position_of};

/// How often a live subscription looks for topics created since it started (the all stream, or
/// a category whose first event has not been written yet).
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Topics checked at once when a subscription opens over many (the all stream).
const FIRST_LOOKS: usize = 64;

/// How long one wait for a record lasts before the subscription re-checks replay ends and
/// new topics.
const POLL_WAIT: Duration = Duration::from_millis(300);

/// Opens a subscription: checked and decoded by photon-api, read by a [`Subscription`].
pub(crate) fn subscribe(
    shared: Arc<Shared>,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    open_subscription(
        &TELEMETRY,
        selector,
        start,
        mode,
        Position::for_selector,
        // Boxed, the opening future and the cursor are a pointer each: the stream moves its
        // state (the larger of the two) in and out once per event, which unboxed was a memcpy of
        // the whole opening state machine per event.
        |request| {
            Ok(cursor_stream(Box::pin(async move {
                Subscription::open(shared, request).await.map(Box::new)
            })))
        },
    )
}

enum Scope {
    Stream(StreamId, i32),
    Category(String),
    All,
}

/// One topic's read state.
struct TopicState {
    topic: String,
    /// Next offset per partition.
    next: Vec<i64>,
    /// Replay end per partition; None once that partition's history is delivered.
    end: Vec<Option<i64>>,
    /// Partitions this subscription reads (a stream subscription reads one).
    read: Vec<i32>,
}

/// What to do with a record of a topic.
enum Advance {
    /// Already delivered, or not this subscription's.
    Skip,
    /// Past the end of a Cold replay: stop fetching its partition.
    Pause,
    /// Next in its partition: deliver it if it is an event of the selector.
    Deliver,
}

impl TopicState {
    /// Moves partition `p` past offset `o`, ending its replay when `o` reaches the replay end.
    fn advance(&mut self, p: i32, o: i64, cold: bool) -> Advance {
        let slot = p as usize;
        if slot >= self.next.len() || o < self.next[slot] {
            return Advance::Skip;
        }
        if let Some(end) = self.end[slot] {
            if o >= end {
                // Past the history of the call: live for HotCold, beyond the end for Cold.
                self.end[slot] = None;
                if cold {
                    return Advance::Pause;
                }
            } else if o + 1 >= end {
                self.end[slot] = None;
            }
        } else if cold {
            return Advance::Skip;
        }
        self.next[slot] = o + 1;
        Advance::Deliver
    }
}

/// A subscription's consumer and what it has read.
struct Subscription {
    consumer: ClosingConsumer,
    progress: Progress,
}

/// Everything of a subscription but its consumer (kept apart so a record borrowed from the
/// consumer can be handled while this changes).
struct Progress {
    shared: Arc<Shared>,
    mode: SubscriptionMode,
    scope: Scope,
    start: Start,
    /// `Start::After`'s checkpoint, decoded.
    after: Option<Position>,
    /// By category.
    topics: BTreeMap<String, TopicState>,
    /// Only events recorded at or after this (µs), for `Start::Time`.
    since: Option<i64>,
    caught_up_sent: bool,
    /// `Start::Now` in a live mode: `CaughtUp` not before this, a window and a quarter (`now_start_wait`) after the
    /// stable ends were taken (see `answer_window` in the config). An append whose records were
    /// already readable at the start, below those ends, may not have answered its caller yet;
    /// its writer answers Ok only within the window, so before this `CaughtUp`.
    live_at: Option<Instant>,
    last_discovery: Instant,
    /// Time spent waiting on the broker since the replay last moved (a record or a partition's
    /// end arrived). Only waits inside `next()` count: the time the application takes between
    /// two calls is its own and never fails the subscription (a slow consumer only slows it).
    waited: Duration,
    /// The last stream and event type decoded, shared by the events that repeat them.
    names: codec::Names,
}

impl SubscriptionCursor for Box<Subscription> {
    async fn next_item(&mut self) -> Result<Option<SubscriptionItem>, Error> {
        self.next().await
    }
}

impl Subscription {
    async fn open(
        shared: Arc<Shared>,
        request: SubscriptionRequest<Position>,
    ) -> Result<Self, Error> {
        let consumer: StreamConsumer = shared
            .config
            .consumer_config()
            .create()
            .map_err(|e| error::from_kafka("creating a subscriber", e))?;
        let SubscriptionRequest {
            selector,
            start,
            after,
            mode,
        } = request;
        let (scope, categories) = match &selector {
            Selector::Stream(s) => (
                Scope::Stream(s.clone(), -1),
                vec![s.category_name().to_owned()],
            ),
            Selector::Category(c) => (
                Scope::Category(c.as_str().to_owned()),
                vec![c.as_str().to_owned()],
            ),
            Selector::All => (Scope::All, category_names(&shared).await?),
        };
        let mut progress = Progress {
            shared,
            mode,
            scope,
            since: match &start {
                Start::Time(t) => Some(t.unix_micros()),
                _ => None,
            },
            start,
            after,
            topics: BTreeMap::new(),
            caught_up_sent: false,
            live_at: None,
            names: codec::Names::default(),
            last_discovery: Instant::now(),
            waited: Duration::ZERO,
        };
        // A store checks each topic at its first use (its configuration, and the first event of
        // each partition): for the all stream, many topics at once rather than one by one.
        let checking = progress.shared.clone();
        let topics: Vec<String> = categories
            .iter()
            .map(|c| checking.config.topic(c))
            .collect();
        futures::stream::iter(topics)
            .map(move |topic| {
                let checking = checking.clone();
                async move { checking.partition_count(&topic).await }
            })
            .buffer_unordered(FIRST_LOOKS)
            .try_collect::<Vec<_>>()
            .await?;
        for c in categories {
            progress.add_topic(&c, true).await?;
        }
        if progress.start == Start::Now && progress.mode != SubscriptionMode::Cold {
            let wait = photon_api::now_start_wait(progress.shared.config.answer_window);
            progress.live_at = Some(Instant::now() + wait);
        }
        progress.assign(&consumer)?;
        Ok(Subscription {
            consumer: ClosingConsumer(Some(consumer)),
            progress,
        })
    }

    async fn next(&mut self) -> Result<Option<SubscriptionItem>, Error> {
        loop {
            if let Some(item) = self.progress.after_replay() {
                return Ok(item);
            }
            if !self.progress.topics_to_read(&self.consumer).await? {
                if self.progress.mode == SubscriptionMode::Cold {
                    return Ok(None);
                }
                tokio::time::sleep(self.progress.poll_wait()).await;
                continue;
            }
            self.progress.check_stall()?;
            // A record already fetched is taken without a timer: a replay finds one almost every
            // time, and reading the clock and arming a timeout per event cost more than the rest
            // of the loop.
            let (got, waiting) = match self.consumer.recv().now_or_never() {
                Some(got) => (got, None),
                None => {
                    let waiting = Instant::now();
                    let wait = self.progress.poll_wait();
                    match tokio::time::timeout(wait, self.consumer.recv()).await {
                        Err(_) => {
                            self.progress.waited += waiting.elapsed();
                            self.progress.check_positions(&self.consumer);
                            continue;
                        }
                        Ok(got) => (got, Some(waiting)),
                    }
                }
            };
            let msg = match got {
                Ok(msg) => msg,
                Err(KafkaError::PartitionEOF(_)) => {
                    self.progress.waited = Duration::ZERO;
                    self.progress.check_positions(&self.consumer);
                    continue;
                }
                Err(e) if error::is_passing(&e) => {
                    self.progress.waited += waiting.map_or(Duration::ZERO, |w| w.elapsed());
                    tracing::debug!(error = %e, "photon-kafka: passing client error in a subscription");
                    continue;
                }
                Err(e) => return Err(error::from_kafka("reading a subscription's partitions", e)),
            };
            self.progress.waited = Duration::ZERO;
            tokio::task::consume_budget().await;
            if let Some(event) = self.progress.accept(&msg, &self.consumer) {
                return Ok(Some(SubscriptionItem::Event(event)));
            }
        }
    }
}

/// The categories of every topic of ours.
async fn category_names(shared: &Shared) -> Result<Vec<String>, Error> {
    Ok(shared
        .categories()
        .await?
        .into_iter()
        .map(|(c, _, _)| c)
        .collect())
}

impl Progress {
    /// Starts reading `category`'s topic, if it exists. `at_open`: the topic existed when the
    /// subscription started, so `start` applies; a topic found later is read from its beginning
    /// (all of it was written after the start) and has no history to replay.
    async fn add_topic(&mut self, category: &str, at_open: bool) -> Result<(), Error> {
        let topic = self.shared.config.topic(category);
        let Some(n) = self.shared.partition_count(&topic).await? else {
            return Ok(());
        };
        let read: Vec<i32> = match &mut self.scope {
            Scope::Stream(s, p) => {
                *p = partition_for(s, n);
                vec![*p]
            }
            _ => (0..n).collect(),
        };
        let state = if at_open {
            self.replay_state(category, topic, n, read).await?
        } else {
            TopicState {
                topic,
                next: vec![0; n as usize],
                end: vec![None; n as usize],
                read,
            }
        };
        self.topics.insert(category.to_owned(), state);
        Ok(())
    }

    /// Where each partition of a topic that existed at the start begins, and where its replay
    /// ends.
    async fn replay_state(
        &self,
        category: &str,
        topic: String,
        n: i32,
        read: Vec<i32>,
    ) -> Result<TopicState, Error> {
        let bounds = partition_bounds(&self.shared, &topic, n).await?;
        let ends: Vec<i64> = bounds.iter().map(|(_, end)| *end).collect();
        let next: Vec<i64> = match &self.start {
            Start::Beginning => bounds.iter().map(|(start, _)| *start).collect(),
            Start::Now => ends.clone(),
            Start::After(cp) => {
                let after = self.after.as_ref().expect("decoded by open_subscription");
                offsets_after(after, cp, category, &topic, n, &read)?
            }
            Start::Time(t) => self.offsets_for_time(&topic, *t, &read, &ends).await?,
        };
        let end = (0..n as usize)
            .map(|p| {
                let done = self.mode == SubscriptionMode::Hot
                    || next[p] >= ends[p]
                    || !read.contains(&(p as i32));
                (!done).then_some(ends[p])
            })
            .collect();
        Ok(TopicState {
            topic,
            next,
            end,
            read,
        })
    }

    /// The first offset at or after `t` in each partition read (offsets-for-times); the
    /// partition's end where there is none.
    async fn offsets_for_time(
        &self,
        topic: &str,
        t: Timestamp,
        read: &[i32],
        ends: &[i64],
    ) -> Result<Vec<i64>, Error> {
        let context = || format!("looking up offsets for time {t} in {topic}");
        let mut tpl = TopicPartitionList::new();
        for &p in read {
            tpl.add_partition_offset(topic, p, Offset::Offset(t.unix_millis()))
                .map_err(|e| error::from_kafka(context(), e))?;
        }
        let timeout = self.shared.config.timeout;
        let (_, found) = self
            .shared
            .ask_meta(move |client| client.offsets_for_times(tpl, timeout))
            .await?;
        let found = found.map_err(|e| error::from_kafka(context(), e))?;
        let mut next = ends.to_vec();
        for &p in read {
            if let Some(Offset::Offset(o)) = found.find_partition(topic, p).map(|e| e.offset()) {
                next[p as usize] = o;
            }
        }
        Ok(next)
    }

    fn assign(&self, consumer: &StreamConsumer) -> Result<(), Error> {
        let context = "assigning a subscription's partitions";
        let mut tpl = TopicPartitionList::new();
        for t in self.topics.values() {
            for &p in &t.read {
                // An explicit offset: librdkafka resolves `Beginning` with an extra lookup that
                // costs about half a second.
                let offset = Offset::Offset(t.next[p as usize]);
                tpl.add_partition_offset(&t.topic, p, offset)
                    .map_err(|e| error::from_kafka(context, e))?;
            }
        }
        consumer
            .assign(&tpl)
            .map_err(|e| error::from_kafka(context, e))
    }

    fn replay_done(&self) -> bool {
        self.topics
            .values()
            .all(|t| t.end.iter().all(Option::is_none))
    }

    /// How long one wait for a record may last: [`POLL_WAIT`], shorter when `CaughtUp` is due
    /// sooner.
    fn poll_wait(&self) -> Duration {
        match self.live_at {
            Some(at) if !self.caught_up_sent => {
                POLL_WAIT.min(at.saturating_duration_since(Instant::now()))
            }
            _ => POLL_WAIT,
        }
    }

    /// Once the replay is done: `Some(None)` ends a Cold subscription, `Some(CaughtUp)` is said
    /// once by a live one (a `Start::Now` one not before `live_at`); None to read on.
    fn after_replay(&mut self) -> Option<Option<SubscriptionItem>> {
        if !self.replay_done() {
            return None;
        }
        match self.mode {
            SubscriptionMode::Cold => Some(None),
            _ if !self.caught_up_sent && self.live_at.is_some_and(|at| Instant::now() < at) => None,
            _ if !self.caught_up_sent => {
                self.caught_up_sent = true;
                Some(Some(SubscriptionItem::CaughtUp))
            }
            _ => None,
        }
    }

    /// Looks for new topics when due (live modes); whether there is any topic to read.
    async fn topics_to_read(&mut self, consumer: &StreamConsumer) -> Result<bool, Error> {
        let live = self.mode != SubscriptionMode::Cold;
        let looking = matches!(self.scope, Scope::All) || self.topics.is_empty();
        if live && looking && self.last_discovery.elapsed() >= DISCOVERY_INTERVAL {
            self.discover(consumer).await?;
        }
        Ok(!self.topics.is_empty())
    }

    /// A replay that makes no progress at all (a partition without a leader) ends with an error
    /// instead of waiting for ever; a live subscription may idle. Only time spent waiting on the
    /// broker counts, never the application's time between two `next()` calls.
    fn check_stall(&self) -> Result<(), Error> {
        let patience = self.shared.config.timeout * 3;
        if !self.replay_done() && self.waited > patience {
            return Err(error::unavailable(format!(
                "replay waited {:?} on the broker without progress: a partition is not readable",
                self.waited
            )));
        }
        Ok(())
    }

    /// Marks partitions whose consumer position reached their replay end.
    fn check_positions(&mut self, consumer: &StreamConsumer) {
        for t in self.topics.values_mut() {
            for &p in &t.read {
                if let Some(end) = t.end[p as usize] {
                    if position_of(consumer, &t.topic, p).is_some_and(|pos| pos >= end) {
                        t.end[p as usize] = None;
                        t.next[p as usize] = t.next[p as usize].max(end);
                        if self.mode == SubscriptionMode::Cold {
                            pause(consumer, &t.topic, p);
                        }
                    }
                }
            }
        }
    }

    /// Looks for topics that appeared since the start (live modes only).
    async fn discover(&mut self, consumer: &StreamConsumer) -> Result<(), Error> {
        self.last_discovery = Instant::now();
        let wanted: Vec<String> = match &self.scope {
            Scope::All => category_names(&self.shared).await?,
            Scope::Stream(s, _) => vec![s.category_name().to_owned()],
            Scope::Category(c) => vec![c.clone()],
        };
        let before = self.topics.len();
        for c in wanted {
            if !self.topics.contains_key(&c) {
                self.add_topic(&c, false).await?;
            }
        }
        if self.topics.len() != before {
            self.assign(consumer)?;
        }
        Ok(())
    }

    /// The event `msg` carries when it is the next one for this subscription.
    fn accept(
        &mut self,
        msg: &BorrowedMessage<'_>,
        consumer: &StreamConsumer,
    ) -> Option<RecordedEvent> {
        let cold = self.mode == SubscriptionMode::Cold;
        let topic = msg.topic();
        // A stream or category subscription reads one topic: comparing its name is cheaper than
        // taking the category out of it (which validates the name) per event.
        let t = if self.topics.len() == 1 {
            self.topics.values_mut().find(|t| t.topic == topic)?
        } else {
            let category = self.shared.config.category_of(topic)?;
            self.topics.get_mut(category)?
        };
        match t.advance(msg.partition(), msg.offset(), cold) {
            Advance::Skip => return None,
            Advance::Pause => {
                pause(consumer, &t.topic, msg.partition());
                return None;
            }
            Advance::Deliver => {}
        }
        if let Scope::Stream(s, _) = &self.scope {
            if codec::stream_key(msg) != Some(s.as_str()) {
                return None;
            }
        }
        let checkpoint = self.checkpoint();
        let event = match codec::recorded_event(msg, checkpoint, &mut self.names) {
            Ok(event) => event?,
            // Not written by photon's writer: skipped, like any foreign record.
            Err(e) => {
                tracing::warn!(error = %e, "photon-kafka: record skipped");
                return None;
            }
        };
        let early = self
            .since
            .is_some_and(|since| event.recorded_at.unix_micros() < since);
        (!early).then_some(event)
    }

    fn checkpoint(&self) -> Checkpoint {
        match &self.scope {
            Scope::Stream(s, p) => {
                let next = self
                    .topics
                    .get(s.category_name())
                    .map_or(0, |t| t.next[*p as usize]);
                position::partition_checkpoint(s.category_name(), *p, next)
            }
            Scope::Category(c) => position::category_checkpoint(
                c,
                self.topics.get(c).map_or(&[][..], |t| &t.next[..]),
            ),
            Scope::All => Position::All(
                self.topics
                    .iter()
                    .map(|(c, t)| (c.clone(), t.next.clone()))
                    .collect(),
            )
            .to_checkpoint(),
        }
    }
}

/// Where each partition read resumes after `after` (decoded from `checkpoint`).
///
/// # Errors
/// - [`Error::InvalidInput`] when a category checkpoint does not cover a partition read.
fn offsets_after(
    after: &Position,
    checkpoint: &Checkpoint,
    category: &str,
    topic: &str,
    n: i32,
    read: &[i32],
) -> Result<Vec<i64>, Error> {
    let mut next = vec![0; n as usize];
    for &p in read {
        next[p as usize] = match after.next_for(category, p) {
            Some(o) => o,
            // The all stream's checkpoint lists the topics it had seen; a newer topic is read
            // from its beginning.
            None if matches!(after, Position::All(_)) => 0,
            None => {
                return Err(Error::InvalidInput {
                    what: format!("checkpoint {checkpoint}"),
                    reason: format!("it does not cover partition {p} of {topic}"),
                })
            }
        };
    }
    Ok(next)
}

/// Stops fetching a partition whose Cold replay is complete.
fn pause(consumer: &StreamConsumer, topic: &str, p: i32) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    let _ = consumer.pause(&tpl);
}

/// A subscription's consumer, closed off the async threads when the subscription is dropped
/// (closing waits for librdkafka's threads).
struct ClosingConsumer(Option<StreamConsumer>);

impl std::ops::Deref for ClosingConsumer {
    type Target = StreamConsumer;
    fn deref(&self) -> &StreamConsumer {
        self.0.as_ref().expect("present until drop")
    }
}

impl Drop for ClosingConsumer {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || drop(consumer));
                }
                Err(_) => drop(consumer),
            }
        }
    }
}
