//! Subscriptions: one read_committed consumer with a manual assignment per subscription, pulled
//! by the caller (librdkafka's prefetch queue is bounded). The subscription tracks the next
//! offset of every partition it reads; that vector is each event's checkpoint.
//!
//! Replay ends ("history as of the call") are the partitions' stable end offsets taken on the
//! first poll. A partition's replay is done once an event at or past its end arrives, or once
//! the consumer's position (which counts transaction markers) reaches it. Because the consumer
//! is the same before and after `CaughtUp`, HotCold has no switch at which to lose or repeat an
//! event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use photon_api::validate::validate_subscription;
use photon_api::{
    error_stream, Error, Selector, Start, StreamId, SubscriptionItem, SubscriptionMode,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::position::{self, Position};
use crate::reader::{partition_bounds, position_of};
use crate::record::{self, partition_for};
use crate::{blocking, map_kafka, Shared};

/// How often a live subscription looks for topics created since it started (the all stream, or
/// a category whose first event has not been written yet).
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// How long one wait for a record lasts before the subscription re-checks replay ends and
/// new topics.
const POLL_WAIT: Duration = Duration::from_millis(300);

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

struct Sub {
    shared: Arc<Shared>,
    consumer: ClosingConsumer,
    mode: SubscriptionMode,
    scope: Scope,
    start: Start,
    /// By category.
    topics: BTreeMap<String, TopicState>,
    /// Only events recorded at or after this (µs), for `Start::Time`.
    since: Option<i64>,
    caught_up_sent: bool,
    last_discovery: Instant,
    last_progress: Instant,
    /// The last stream and event type decoded, shared by the events that repeat them.
    names: record::Names,
}

pub(crate) fn subscribe(
    shared: Arc<Shared>,
    selector: Selector,
    start: Start,
    mode: SubscriptionMode,
) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
    if let Err(e) = validate_subscription(&start, mode) {
        return error_stream(e);
    }
    if let Start::After(cp) = &start {
        let pos = match Position::from_checkpoint(cp) {
            Ok(pos) => pos,
            Err(e) => return error_stream(e),
        };
        let fits = match (&selector, &pos) {
            (Selector::All, Position::All(_)) => true,
            (Selector::All, _) => false,
            (Selector::Category(c), Position::Category { category, .. }) => category == c.as_str(),
            (Selector::Category(_), Position::All(_)) => true,
            (Selector::Category(_), Position::Partition { .. }) => false,
            (Selector::Stream(s), Position::Category { category, .. })
            | (Selector::Stream(s), Position::Partition { category, .. }) => {
                category == s.category_name()
            }
            (Selector::Stream(_), Position::All(_)) => true,
        };
        if !fits {
            return error_stream(Error::InvalidInput {
                what: format!("checkpoint {cp} for {selector:?}"),
                reason: "it was taken from another selector; resume a category or the all stream from its own subscription's checkpoints".into(),
            });
        }
    }
    let setup = async move { Sub::open(shared, selector, start, mode).await };
    stream::once(setup)
        .flat_map(|opened| match opened {
            Err(e) => error_stream(e),
            Ok(sub) => stream::unfold(Some(sub), |sub| async move {
                let mut sub = sub?;
                match sub.next().await {
                    Ok(Some(item)) => Some((Ok(item), Some(sub))),
                    Ok(None) => None,
                    // An error ends the subscription; resume from the last checkpoint.
                    Err(e) => Some((Err(e), None)),
                }
            })
            .boxed(),
        })
        .boxed()
}

impl Sub {
    async fn open(
        shared: Arc<Shared>,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> Result<Self, Error> {
        let consumer: StreamConsumer = shared
            .config
            .consumer()
            .create()
            .map_err(|e| map_kafka("creating a subscriber", e))?;
        let since = match &start {
            Start::Time(t) => Some(t.unix_micros()),
            _ => None,
        };
        let (scope, categories) = match &selector {
            Selector::Stream(s) => (
                Scope::Stream(s.clone(), -1),
                vec![s.category_name().to_owned()],
            ),
            Selector::Category(c) => (
                Scope::Category(c.as_str().to_owned()),
                vec![c.as_str().to_owned()],
            ),
            Selector::All => (
                Scope::All,
                shared
                    .categories()
                    .await?
                    .into_iter()
                    .map(|(c, _)| c)
                    .collect(),
            ),
        };
        let mut sub = Sub {
            shared,
            consumer: ClosingConsumer(Some(consumer)),
            mode,
            scope,
            start,
            topics: BTreeMap::new(),
            since,
            caught_up_sent: false,
            names: record::Names::default(),
            last_discovery: Instant::now(),
            last_progress: Instant::now(),
        };
        for c in categories {
            sub.add_topic(&c, true).await?;
        }
        sub.assign()?;
        Ok(sub)
    }

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
        if !at_open {
            self.topics.insert(
                category.to_owned(),
                TopicState {
                    topic,
                    next: vec![0; n as usize],
                    end: vec![None; n as usize],
                    read,
                },
            );
            return Ok(());
        }
        let bounds = partition_bounds(&self.shared, &topic, n).await?;
        let ends: Vec<i64> = bounds.iter().map(|(_, end)| *end).collect();
        let next: Vec<i64> = match &self.start {
            Start::Beginning => bounds.iter().map(|(start, _)| *start).collect(),
            Start::Now => ends.clone(),
            Start::After(cp) => {
                let pos = Position::from_checkpoint(cp)?;
                let mut next = vec![0; n as usize];
                for &p in &read {
                    next[p as usize] = match pos.next_for(category, p) {
                        Some(o) => o,
                        // The all stream's checkpoint lists the topics it had seen; a newer
                        // topic is read from its beginning.
                        None if matches!(pos, Position::All(_)) => 0,
                        None => {
                            return Err(Error::InvalidInput {
                                what: format!("checkpoint {cp}"),
                                reason: format!("it does not cover partition {p} of {topic}"),
                            })
                        }
                    };
                }
                next
            }
            Start::Time(t) => {
                let mut tpl = TopicPartitionList::new();
                for &p in &read {
                    tpl.add_partition_offset(&topic, p, Offset::Offset(t.unix_millis()))
                        .map_err(|e| map_kafka("offsets for time", e))?;
                }
                let meta = self.shared.meta.clone();
                let timeout = self.shared.config.timeout;
                let found = blocking(move || meta.offsets_for_times(tpl, timeout))
                    .await?
                    .map_err(|e| map_kafka(&format!("offsets for time in {topic}"), e))?;
                let mut next = ends.clone();
                for &p in &read {
                    if let Some(Offset::Offset(o)) =
                        found.find_partition(&topic, p).map(|e| e.offset())
                    {
                        next[p as usize] = o;
                    }
                }
                next
            }
        };
        let end = (0..n as usize)
            .map(|p| {
                let done = self.mode == SubscriptionMode::Hot || next[p] >= ends[p];
                (!done).then_some(ends[p])
            })
            .collect::<Vec<_>>();
        let mut end = end;
        for (p, e) in end.iter_mut().enumerate() {
            if !read.contains(&(p as i32)) {
                *e = None;
            }
        }
        self.topics.insert(
            category.to_owned(),
            TopicState {
                topic,
                next,
                end,
                read,
            },
        );
        Ok(())
    }

    fn assign(&self) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        for t in self.topics.values() {
            for &p in &t.read {
                // An explicit offset: librdkafka resolves `Beginning` with an extra lookup that
                // costs about half a second.
                let offset = Offset::Offset(t.next[p as usize]);
                tpl.add_partition_offset(&t.topic, p, offset)
                    .map_err(|e| map_kafka("assign", e))?;
            }
        }
        self.consumer
            .assign(&tpl)
            .map_err(|e| map_kafka("subscribing", e))
    }

    fn replay_done(&self) -> bool {
        self.topics
            .values()
            .all(|t| t.end.iter().all(Option::is_none))
    }

    /// Marks partitions whose consumer position reached their replay end.
    fn check_positions(&mut self) {
        for t in self.topics.values_mut() {
            for &p in &t.read {
                if let Some(end) = t.end[p as usize] {
                    if position_of(&self.consumer, &t.topic, p).is_some_and(|pos| pos >= end) {
                        t.end[p as usize] = None;
                        t.next[p as usize] = t.next[p as usize].max(end);
                        if self.mode == SubscriptionMode::Cold {
                            pause(&self.consumer, &t.topic, p);
                        }
                    }
                }
            }
        }
    }

    /// Looks for topics that appeared since the start (live modes only).
    async fn discover(&mut self) -> Result<(), Error> {
        self.last_discovery = Instant::now();
        let wanted: Vec<String> = match &self.scope {
            Scope::All => self
                .shared
                .categories()
                .await?
                .into_iter()
                .map(|(c, _)| c)
                .collect(),
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
            self.assign()?;
        }
        Ok(())
    }

    fn checkpoint(&self) -> photon_api::Checkpoint {
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

    async fn next(&mut self) -> Result<Option<SubscriptionItem>, Error> {
        loop {
            if self.replay_done() {
                match self.mode {
                    SubscriptionMode::Cold => return Ok(None),
                    _ if !self.caught_up_sent => {
                        self.caught_up_sent = true;
                        return Ok(Some(SubscriptionItem::CaughtUp));
                    }
                    _ => {}
                }
            }
            let live = self.mode != SubscriptionMode::Cold;
            let looking = matches!(self.scope, Scope::All) || self.topics.is_empty();
            if live && looking && self.last_discovery.elapsed() >= DISCOVERY_INTERVAL {
                self.discover().await?;
            }
            if self.topics.is_empty() {
                if !live {
                    return Ok(None);
                }
                tokio::time::sleep(POLL_WAIT).await;
                continue;
            }
            // A replay that makes no progress at all (a partition without a leader) ends with
            // an error instead of waiting for ever; a live subscription may idle.
            if !self.replay_done() && self.last_progress.elapsed() > self.shared.config.timeout * 3
            {
                return Err(crate::unavailable(format!(
                    "replay made no progress for {:?}: a partition is not readable",
                    self.shared.config.timeout * 3
                )));
            }
            let got = match tokio::time::timeout(POLL_WAIT, self.consumer.recv()).await {
                Err(_) => {
                    self.check_positions();
                    continue;
                }
                Ok(got) => got,
            };
            let msg = match got {
                Ok(msg) => msg,
                Err(KafkaError::PartitionEOF(_)) => {
                    self.last_progress = Instant::now();
                    self.check_positions();
                    continue;
                }
                Err(e) if crate::is_passing(&e) => {
                    tracing::debug!(error = %e, "photon-kafka: passing client error in a subscription");
                    continue;
                }
                Err(e) => return Err(map_kafka("subscription", e)),
            };
            self.last_progress = Instant::now();
            tokio::task::consume_budget().await;
            let Some(category) = self.shared.config.category_of(msg.topic()) else {
                continue;
            };
            let (p, o) = (msg.partition(), msg.offset());
            let cold = self.mode == SubscriptionMode::Cold;
            let Some(t) = self.topics.get_mut(category) else {
                continue;
            };
            let slot = p as usize;
            if slot >= t.next.len() || o < t.next[slot] {
                continue;
            }
            if let Some(end) = t.end[slot] {
                if o >= end {
                    // Past the history of the call: live for HotCold, beyond the end for Cold.
                    t.end[slot] = None;
                    if cold {
                        pause(&self.consumer, &t.topic, p);
                        continue;
                    }
                } else if o + 1 >= end {
                    t.end[slot] = None;
                }
            } else if cold {
                continue;
            }
            t.next[slot] = o + 1;
            if let Scope::Stream(s, _) = &self.scope {
                if record::stream_key(&msg) != Some(s.as_str()) {
                    continue;
                }
            }
            let checkpoint = self.checkpoint();
            let event = match record::recorded_event(&msg, checkpoint, &mut self.names) {
                Ok(Some(event)) => event,
                Ok(None) => continue,
                // Not written by photon's writer: skipped, like any foreign record.
                Err(e) => {
                    tracing::warn!(error = %e, "photon-kafka: record skipped");
                    continue;
                }
            };
            if self
                .since
                .is_some_and(|since| event.recorded_at.unix_micros() < since)
            {
                continue;
            }
            return Ok(Some(SubscriptionItem::Event(event)));
        }
    }
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
