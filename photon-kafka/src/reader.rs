//! Reading partitions: the pool of reader consumers, keeping a partition's version index current,
//! fetching one stream's records by the offsets the index gives, and the listings of categories
//! and streams. Subscriptions have their own long-lived consumers (subscription.rs); appends go
//! through writer.rs. Nothing here writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use photon_api::telemetry::record_outcome;
use photon_api::{
    error_stream, Category, Direction, Error, ReadOptions, RecordedEvent, StreamId, Version,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::Instrument;

use crate::client::{Shared, SharedPartition, MAX_POOLED_READERS, TELEMETRY};
use crate::codec::{self, partition_for};
use crate::error::{self, Fault};
use crate::index::PartitionIndex;
use crate::position;

/// Events fetched per step of a stream read: the read is lazy, so memory holds one step.
const READ_STEP: usize = 500;

/// Offsets further apart than this are reached by a new fetch position rather than read through.
const SEEK_GAP: i64 = 256;

/// Records of a partition's start read to find the partition count its events were written with:
/// every photon event among them must fit (its `photon.partitions`, or its key's partition under
/// the current count on records written before that header).
const PROBE_RECORDS: i64 = 64;

/// Records read back from a partition's end first when looking for a photon event (a listing);
/// each further window is this many times larger, back to the partition's start.
const LISTING_WINDOW: i64 = 64;

/// Topics a listing reads at once, each with a consumer of its own.
const LISTING_READS: usize = 64;

/// How long a reader waits before asking again for the watermarks of a partition whose leader
/// is not known yet.
const LEADER_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// A pooled consumer, handed back (unassigned) when dropped.
pub(crate) struct PooledReader {
    consumer: Option<StreamConsumer>,
    shared: Arc<Shared>,
    /// Handed back to the pool when dropped; else closed.
    pool: bool,
    /// Set when a wait for its next message ran out ([`next_message`]): such a consumer may
    /// have no broker left (librdkafka can leave a client so after an outage), so it is closed
    /// rather than handed to the next read.
    unanswered: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for PooledReader {
    type Target = StreamConsumer;
    fn deref(&self) -> &StreamConsumer {
        self.consumer.as_ref().expect("present until drop")
    }
}

impl Drop for PooledReader {
    fn drop(&mut self) {
        let Some(c) = self.consumer.take() else {
            return;
        };
        if self.pool && !self.unanswered.load(Ordering::Relaxed) && c.unassign().is_ok() {
            let mut pool = self.shared.readers.lock().expect("readers lock");
            if pool.len() < MAX_POOLED_READERS {
                pool.push(c);
                return;
            }
        }
        // Closing a consumer joins librdkafka's threads: not on an async thread, where it
        // held up every task of the worker (a listing over many topics closed dozens).
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(c))),
            Err(_) => drop(c),
        }
    }
}

/// An idle consumer from the pool, or a new one.
pub(crate) fn pooled_reader(shared: &Arc<Shared>) -> Result<PooledReader, Error> {
    let pooled = shared.readers.lock().expect("readers lock").pop();
    let consumer = match pooled {
        Some(c) => c,
        None => shared
            .config
            .consumer_config()
            .create()
            .map_err(|e| error::from_kafka("creating a reader", e))?,
    };
    Ok(PooledReader {
        consumer: Some(consumer),
        shared: shared.clone(),
        pool: true,
        unanswered: Default::default(),
    })
}

/// A new consumer, closed (off the async threads) when dropped, for a listing's look at a topic:
/// a pooled consumer that last read another topic took about a second to deliver the first
/// record of a new one (its metadata of the new topic is fetched first), a new one tens of
/// milliseconds, and a listing looks at every topic once.
fn new_reader(shared: &Arc<Shared>) -> Result<PooledReader, Error> {
    let consumer = shared
        .config
        .consumer_config()
        .create()
        .map_err(|e| error::from_kafka("creating a reader", e))?;
    Ok(PooledReader {
        consumer: Some(consumer),
        shared: shared.clone(),
        pool: false,
        unanswered: Default::default(),
    })
}

pub(crate) fn assign(
    consumer: &StreamConsumer,
    topic: &str,
    p: i32,
    offset: i64,
) -> Result<(), Error> {
    let context = || format!("reading {topic}/{p} from offset {offset}");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(offset))
        .map_err(|e| error::from_kafka(context(), e))?;
    consumer
        .assign(&tpl)
        .map_err(|e| error::from_kafka(context(), e))
}

/// The app position of `topic`/`p` on `consumer`: the next offset it will hand out, past any
/// transaction markers already skipped.
pub(crate) fn position_of(consumer: &StreamConsumer, topic: &str, p: i32) -> Option<i64> {
    let tpl = consumer.position().ok()?;
    match tpl.find_partition(topic, p)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Per partition of `topic`: the first offset still in the log (0 unless records were deleted,
/// where "from the beginning" starts, without librdkafka's slower lookup of it) and the last
/// stable offset (everything committed so far lies below it).
pub(crate) async fn partition_bounds(
    shared: &Shared,
    topic: &str,
    n: i32,
) -> Result<Vec<(i64, i64)>, Error> {
    futures::future::try_join_all((0..n).map(|p| async move {
        let (low, high) = watermarks(shared, topic, p).await?;
        Ok::<_, Error>((low.max(0), high))
    }))
    .await
}

/// The last stable offset of `topic`/`p`, in one ListOffsets request: librdkafka's
/// offsets-for-times asks with the client's isolation level (read_committed), so "latest" is the
/// last stable offset, where [`watermarks`] sends two requests (log start and end). A writer
/// asks this after each commit until its records are readable. A leader not known yet is
/// retried within the request timeout, as [`watermarks`] does.
pub(crate) async fn stable_end(shared: &Shared, topic: &str, p: i32) -> Result<i64, Error> {
    let deadline = tokio::time::Instant::now() + shared.config.timeout;
    let context = || format!("fetching the last stable offset of {topic}/{p}");
    loop {
        let (t, timeout) = (topic.to_owned(), shared.config.timeout);
        let (_, asked) = shared
            .ask_meta(move |client| {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&t, p, Offset::End)?;
                let found = client.offsets_for_times(tpl, timeout)?;
                let e = found.find_partition(&t, p).ok_or(KafkaError::OffsetFetch(
                    rdkafka::error::RDKafkaErrorCode::UnknownPartition,
                ))?;
                e.error()?;
                Ok(e.offset())
            })
            .await?;
        let code = asked.as_ref().err().and_then(|e| e.rdkafka_error_code());
        match asked {
            Ok(Offset::Offset(o)) => return Ok(o),
            Ok(other) => {
                return Err(error::unavailable(format!(
                    "{}: the brokers answered {other:?}",
                    context()
                )))
            }
            Err(_) if leader_unknown(code) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(LEADER_POLL).await;
            }
            Err(e) => return Err(error::from_kafka(context(), e)),
        }
    }
}

/// Whether a watermark or offset request failed because the client does not know the
/// partition's leader yet (right after the topic was created): asked again within the timeout.
fn leader_unknown(code: Option<rdkafka::error::RDKafkaErrorCode>) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        code,
        Some(
            C::NotLeaderForPartition
                | C::LeaderNotAvailable
                | C::UnknownTopicOrPartition
                | C::UnknownPartition
        )
    )
}

/// The log start and last stable offset (read_committed watermarks) of `topic`/`p`. Right after
/// a topic is created a client may not know its leader yet; that answer is retried within the
/// request timeout.
pub(crate) async fn watermarks(shared: &Shared, topic: &str, p: i32) -> Result<(i64, i64), Error> {
    let deadline = tokio::time::Instant::now() + shared.config.timeout;
    loop {
        let (t, timeout) = (topic.to_owned(), shared.config.timeout);
        let (_, asked) = shared
            .ask_meta(move |client| client.fetch_watermarks(&t, p, timeout))
            .await?;
        match asked {
            Ok(marks) => return Ok(marks),
            Err(e)
                if leader_unknown(e.rdkafka_error_code())
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(LEADER_POLL).await;
            }
            Err(e) => {
                let context = format!("fetching the watermarks of {topic}/{p}");
                return Err(error::from_kafka(context, e));
            }
        }
    }
}

/// The next message or consumer error on `consumer`, within the request timeout; `at` says
/// where the read is, for the error when nothing comes.
pub(crate) async fn next_message<'c>(
    shared: &Shared,
    consumer: &'c PooledReader,
    at: impl FnOnce() -> String,
) -> Result<KafkaResult<BorrowedMessage<'c>>, Error> {
    let timeout = shared.config.timeout;
    tokio::time::timeout(timeout, consumer.recv())
        .await
        .map_err(|_| {
            consumer.unanswered.store(true, Ordering::Relaxed);
            error::unavailable(format!("{}: no answer within {timeout:?}", at()))
        })
}

/// How far a catch-up reads.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reach {
    /// To the partition's stable end as the brokers report it now: what a writer needs before
    /// it decides an expected version.
    StableEnd,
    /// At most about `records` records (to the end of the append the last one belongs to), and
    /// not past `bounds` (the log start and the stable end a read took when it began): a first
    /// read of a large partition hands out what it found before it indexed the rest, and lets
    /// appends have the partition's lock between steps.
    Step { bounds: (i64, i64), records: i64 },
}

/// Reads `topic`/`p` from `index.next_offset` to its current stable end. Returns whether photon
/// records were added. Traced as a `photon.catch_up` span with the offsets advanced (`offsets`:
/// every record passed, photon's or not, transaction markers and offsets lost to retention too)
/// and the outcome.
pub(crate) async fn catch_up(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    index: &mut PartitionIndex,
) -> Result<bool, Error> {
    catch_up_to(shared, topic, p, index, Reach::StableEnd).await
}

/// [`catch_up`] as far as `reach` says.
pub(crate) async fn catch_up_to(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    index: &mut PartitionIndex,
    reach: Reach,
) -> Result<bool, Error> {
    let span = TELEMETRY.catch_up_span(&format_args!("{topic}/{p}"));
    let from = index.next_offset;
    let result = read_into_index(shared, topic, p, index, reach)
        .instrument(span.clone())
        .await;
    span.record("offsets", index.next_offset.saturating_sub(from));
    record_outcome(&span, &result, None);
    result
}

async fn read_into_index(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    index: &mut PartitionIndex,
    reach: Reach,
) -> Result<bool, Error> {
    let ((start, end), records) = match reach {
        Reach::StableEnd => (watermarks(shared, topic, p).await?, i64::MAX),
        Reach::Step { bounds, records } => (bounds, records),
    };
    // Records before the log start were deleted (finite retention, allowed by the URL): the
    // index starts where the log does.
    index.next_offset = index.next_offset.max(start);
    index.used = Some(std::time::Instant::now());
    if index.next_offset >= end {
        return Ok(false);
    }
    // The count streams were placed with; a record that says otherwise refuses the topic.
    let partitions = shared.known_partitions(topic);
    let consumer = pooled_reader(shared)?;
    assign(&consumer, topic, p, index.next_offset)?;
    let (mut added, mut read) = (false, 0i64);
    while index.next_offset < end {
        let from = index.next_offset;
        let got = next_message(shared, &consumer, || {
            format!("reading {topic}/{p} from offset {from} to {end}")
        })
        .await?;
        match got {
            Ok(msg) => {
                if msg.topic() != topic || msg.partition() != p || msg.offset() < from {
                    continue;
                }
                if msg.offset() >= end {
                    // A transaction committed after `end` was taken. `end` lies on a transaction
                    // boundary; reading on could stop inside this one and expose part of an
                    // append. Everything before this record has been read.
                    index.next_offset = msg.offset();
                    break;
                }
                if let Some((was, evidence)) = partitions.and_then(|n| misplaced(&msg, p, n)) {
                    let n = partitions.expect("checked");
                    return Err(shared.partitions_changed(topic, was, n, evidence));
                }
                added |= index_record(index, &msg);
                // Before the yield: a catch-up given up there (an append's deadline, a read's
                // future dropped) resumes after this record, never indexing it twice. Given up
                // there, the index may hold part of an append: it says so (`mid_append`), and
                // no read ends or plans from it until the rest is indexed.
                index.next_offset = msg.offset() + 1;
                read += 1;
                // A step that runs its course stops between appends.
                if read >= records && !index.mid_append() {
                    break;
                }
                tokio::task::consume_budget().await;
            }
            Err(KafkaError::PartitionEOF(_)) => {
                // Transaction markers take offsets too, and the consumer's position counts them.
                // An end-of-partition notice may be left over from the pooled consumer's earlier
                // use, so only the position decides that the end was reached.
                if let Some(pos) = position_of(&consumer, topic, p) {
                    index.next_offset = index.next_offset.max(pos.min(end));
                }
            }
            Err(e) => pass_or_fail(e, topic, p)?,
        }
    }
    if added {
        shared.bound_indexes();
    }
    Ok(added)
}

/// What a photon record in partition `p` shows when it does not fit a topic of `n` partitions
/// (written with another count, or keyed for another partition).
fn misplaced(msg: &BorrowedMessage<'_>, p: i32, n: i32) -> Option<(Option<i32>, String)> {
    let (key, written_with) = codec::layout_of(msg)?;
    codec::misplaced(key, written_with, p, n, || {
        format!("{}/{p}@{}", msg.topic(), msg.offset())
    })
}

/// Reads the committed records of `topic`/`p` in `[from, to)` and hands each to `visit` until it
/// answers Some; None once `to` is reached. Aborted records and transaction markers are passed
/// by the consumer (read_committed); its position says when `to` is reached.
async fn scan<T>(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    (from, to): (i64, i64),
    mut visit: impl FnMut(&BorrowedMessage<'_>) -> Option<T>,
) -> Result<Option<T>, Error> {
    if from >= to {
        return Ok(None);
    }
    let consumer = pooled_reader(shared)?;
    assign(&consumer, topic, p, from)?;
    let mut next = from;
    while next < to {
        let at = next;
        let got = next_message(shared, &consumer, || {
            format!("reading {topic}/{p} from offset {at} to {to}")
        })
        .await?;
        match got {
            Ok(msg) => {
                if msg.topic() != topic || msg.partition() != p || msg.offset() < next {
                    continue;
                }
                if msg.offset() >= to {
                    break;
                }
                next = msg.offset() + 1;
                if let Some(found) = visit(&msg) {
                    return Ok(Some(found));
                }
            }
            Err(KafkaError::PartitionEOF(_)) => {
                if let Some(pos) = position_of(&consumer, topic, p) {
                    next = next.max(pos.min(to));
                }
            }
            Err(e) => pass_or_fail(e, topic, p)?,
        }
    }
    Ok(None)
}

/// The evidence that `topic`'s partition count is not `n` any more, from the photon events among
/// the first [`PROBE_RECORDS`] records of each partition (their `photon.partitions`, or, on
/// records written before that header, their key's partition): None when every one fits. Every
/// event counts, not only the first: without the header a stream of a doubled count stays in its
/// partition with probability 1/2, so one event per partition would pass such a change half the
/// time. Read once per store and topic, at its first use.
pub(crate) async fn probe_layout(
    shared: &Arc<Shared>,
    topic: &str,
    n: i32,
) -> Result<Option<(Option<i32>, String)>, Error> {
    for (p, (low, high)) in (0..).zip(partition_bounds(shared, topic, n).await?) {
        let window = (low, high.min(low + PROBE_RECORDS));
        if let Some(evidence) = scan(shared, topic, p, window, |msg| misplaced(msg, p, n)).await? {
            return Ok(Some(evidence));
        }
    }
    Ok(None)
}

/// Adds a record to the index: whether it was a photon event that fits. Whether an append goes
/// on after it the index keeps ([`PartitionIndex::mid_append`]).
fn index_record(index: &mut PartitionIndex, msg: &BorrowedMessage<'_>) -> bool {
    match codec::index_entry(msg) {
        Ok(Some(entry)) => index.apply(msg.offset(), entry),
        Ok(None) => false,
        // Not written by photon's writer: left out, like any foreign record.
        Err(e) => {
            tracing::warn!(error = %e, "photon-kafka: record left out of the index");
            false
        }
    }
}

/// A consumer error while reading `topic`/`p`: Ok for one that passes by itself, else the error.
pub(crate) fn pass_or_fail(e: KafkaError, topic: &str, p: i32) -> Result<(), Error> {
    if error::is_passing(&e) {
        tracing::debug!(error = %e, "photon-kafka: passing client error while reading");
        return Ok(());
    }
    Err(error::from_kafka(format!("reading {topic}/{p}"), e))
}

/// Fetches the records at `offsets` (ascending) of `topic`/`p` as events.
pub(crate) async fn fetch(
    shared: &Arc<Shared>,
    topic: &str,
    category: &str,
    p: i32,
    offsets: &[i64],
) -> Result<Vec<RecordedEvent>, Error> {
    let mut out = Vec::with_capacity(offsets.len());
    if offsets.is_empty() {
        return Ok(out);
    }
    let consumer = pooled_reader(shared)?;
    let mut names = codec::Names::default();
    let missing = |offset| {
        let fault = Fault::IndexedRecordMissing {
            topic: topic.to_owned(),
            partition: p,
            offset,
        };
        error::fault(format!("reading {topic}/{p}"), fault)
    };
    assign(&consumer, topic, p, offsets[0])?;
    while out.len() < offsets.len() {
        let want = offsets[out.len()];
        let got = next_message(shared, &consumer, || {
            format!("reading {topic}/{p} at offset {want}")
        })
        .await?;
        match got {
            Ok(msg) => {
                if msg.topic() != topic || msg.partition() != p || msg.offset() < want {
                    continue;
                }
                if msg.offset() > want {
                    return Err(missing(want));
                }
                let checkpoint = position::partition_checkpoint(category, p, want + 1);
                let event = codec::recorded_event(&msg, checkpoint, &mut names)?
                    .ok_or_else(|| missing(want))?;
                out.push(event);
                if let Some(next) = offsets.get(out.len()).filter(|o| **o - want > SEEK_GAP) {
                    assign(&consumer, topic, p, *next)?;
                }
            }
            Err(KafkaError::PartitionEOF(_)) => {
                if position_of(&consumer, topic, p).is_some_and(|pos| pos > want) {
                    return Err(missing(want));
                }
            }
            Err(e) => pass_or_fail(e, topic, p)?,
        }
    }
    Ok(out)
}

/// Where `stream` lives, and its partition's shared state: None when its topic does not exist
/// (the stream has no events).
async fn locate(
    shared: &Arc<Shared>,
    stream: &StreamId,
) -> Result<Option<(String, i32, SharedPartition)>, Error> {
    let topic = shared.config.topic(stream.category_name());
    let Some(n) = shared.partition_count(&topic).await? else {
        return Ok(None);
    };
    let p = partition_for(stream, n);
    let state = shared.partition(&topic, p);
    Ok(Some((topic, p, state)))
}

/// The last version of `stream`, from its partition's index brought up to date.
pub(crate) async fn stream_version(
    shared: &Arc<Shared>,
    stream: &StreamId,
) -> Result<Option<Version>, Error> {
    let Some((topic, p, state)) = locate(shared, stream).await? else {
        return Ok(None);
    };
    let mut state = state.lock().await;
    catch_up(shared, &topic, p, &mut state.index).await?;
    Ok(state.index.current(stream.as_str()))
}

/// Whether any partition of `topic` (of `n` partitions) holds a committed photon event: records
/// of aborted appends and records other tools wrote do not make a category. Read from each
/// partition's end backwards in growing windows (a photon topic's last records are events), every
/// partition's window at once with one consumer, and remembered once seen.
async fn holds_events(shared: &Arc<Shared>, topic: &str, n: i32) -> Result<bool, Error> {
    if shared.seen_with_events(topic) {
        return Ok(true);
    }
    // (partition, log start, end of what is left to read back from)
    let mut left: Vec<(i32, i64, i64)> = (0..)
        .zip(partition_bounds(shared, topic, n).await?)
        .filter(|(_, (low, high))| low < high)
        .map(|(p, (low, high))| (p, low, high))
        .collect();
    let mut window = LISTING_WINDOW;
    while !left.is_empty() {
        let ranges: Vec<(i32, (i64, i64))> = left
            .iter()
            .map(|&(p, low, to)| (p, (to.saturating_sub(window).max(low), to)))
            .collect();
        if scan_partitions(shared, topic, &ranges, |msg| {
            codec::layout_of(msg).is_some()
        })
        .await?
        {
            shared.saw_events(topic);
            return Ok(true);
        }
        left = ranges
            .into_iter()
            .zip(left)
            .filter(|((_, (from, _)), (_, low, _))| from > low)
            .map(|((p, (from, _)), (_, low, _))| (p, low, from))
            .collect();
        window = window.saturating_mul(LISTING_WINDOW);
    }
    Ok(false)
}

/// Reads the committed records of `topic` in each partition's range `[from, to)` with one
/// consumer assigned to all of them, until `found` answers true for one (then true) or every
/// range is read (false). One consumer for all partitions costs one assignment and fetches
/// that serve every partition at once, where a consumer per partition in turn cost a round
/// trip each (a listing over hundreds of topics took minutes).
async fn scan_partitions(
    shared: &Arc<Shared>,
    topic: &str,
    ranges: &[(i32, (i64, i64))],
    mut found: impl FnMut(&BorrowedMessage<'_>) -> bool,
) -> Result<bool, Error> {
    // Per partition: the next offset to read and the end of its range.
    let mut open: HashMap<i32, (i64, i64)> = ranges
        .iter()
        .filter(|(_, (from, to))| from < to)
        .map(|&(p, range)| (p, range))
        .collect();
    if open.is_empty() {
        return Ok(false);
    }
    let consumer = new_reader(shared)?;
    let count = open.len();
    let context = || format!("reading {topic} back from the end of {count} partitions");
    let mut tpl = TopicPartitionList::new();
    for (&p, &(from, _)) in &open {
        tpl.add_partition_offset(topic, p, Offset::Offset(from))
            .map_err(|e| error::from_kafka(context(), e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| error::from_kafka(context(), e))?;
    while !open.is_empty() {
        let got = next_message(shared, &consumer, context).await?;
        match got {
            Ok(msg) => {
                if msg.topic() != topic {
                    continue;
                }
                let p = msg.partition();
                let Some(&(next, to)) = open.get(&p) else {
                    continue;
                };
                if msg.offset() < next {
                    continue;
                }
                if msg.offset() >= to {
                    open.remove(&p);
                    continue;
                }
                if found(&msg) {
                    return Ok(true);
                }
                if msg.offset() + 1 >= to {
                    open.remove(&p);
                } else {
                    open.insert(p, (msg.offset() + 1, to));
                }
            }
            Err(KafkaError::PartitionEOF(p)) => {
                // Only the position decides (a notice may be left over from earlier use).
                if let Some(&(_, to)) = open.get(&p) {
                    if position_of(&consumer, topic, p).is_some_and(|pos| pos >= to) {
                        open.remove(&p);
                    }
                }
            }
            Err(e) if error::is_passing(&e) => {
                tracing::debug!(error = %e, "photon-kafka: passing client error while reading");
            }
            Err(e) => return Err(error::from_kafka(context(), e)),
        }
    }
    Ok(false)
}

/// Our categories, sorted. A topic exists from the first append; it is listed once it holds a
/// committed event.
pub(crate) async fn list_categories(shared: &Arc<Shared>) -> Result<Vec<Category>, Error> {
    // Each topic not seen with an event yet costs a read: many topics at once, in order.
    let listed: Vec<(String, bool)> =
        stream::iter(shared.categories().await?)
            .map(|(c, topic, n)| async move {
                Ok::<_, Error>((c, holds_events(shared, &topic, n).await?))
            })
            .buffered(LISTING_READS)
            .try_collect()
            .await?;
    listed
        .into_iter()
        .filter(|(_, events)| *events)
        .map(|(c, _)| Category::new(c))
        .collect()
}

/// Names a listing holds at most (bytes, with [`NAME_BYTES`] each besides the name), and at
/// most `max_index_bytes`: a listing of more streams than fit reads the category again for
/// the next names.
const LISTING_BYTES: usize = 16 << 20;

/// What a held name costs beyond its text: its tree node and string header.
const NAME_BYTES: usize = 48;

/// Every stream of `category`, sorted, as a stream of names, yielded window by window: each pass
/// over the category's partitions keeps only the smallest names after the last one yielded
/// that fit in [`LISTING_BYTES`] (or `max_index_bytes`), yields them, and starts another pass
/// only when names were left out. A listing builds no version index: a partition whose index
/// already reaches its stable end gives its names from the index (its lock held only to read
/// them); any other is read through for the keys of its photon events, holding nothing but
/// the window. Sorting needs every name of a pass seen before the first is yielded, so a pass
/// reads the whole category; what a listing holds is bounded, not proportional to the
/// partitions, and appends go on while it reads.
pub(crate) fn list_streams(
    shared: Arc<Shared>,
    category: Category,
) -> BoxStream<'static, Result<StreamId, Error>> {
    let limit = LISTING_BYTES.min(shared.config.max_index_bytes);
    let first = Some((shared, category, None::<String>));
    stream::try_unfold(first, move |pass| async move {
        let Some((shared, category, after)) = pass else {
            return Ok(None);
        };
        let window = names_after(&shared, &category, after, limit).await?;
        let more = window.left_out.is_some();
        let last = window.names.last().cloned();
        let names: Vec<Result<StreamId, Error>> =
            window.names.into_iter().map(StreamId::parse).collect();
        let next = match last {
            Some(last) if more => Some((shared, category, Some(last))),
            _ => None,
        };
        Ok::<_, Error>(Some((stream::iter(names), next)))
    })
    .try_flatten()
    .boxed()
}

/// The smallest names after `after` that fit in `limit` bytes.
#[derive(Debug, Default)]
struct NameWindow {
    names: std::collections::BTreeSet<String>,
    bytes: usize,
    limit: usize,
    after: Option<String>,
    /// The smallest name left out for want of room: names from it on wait for the next pass
    /// (keeping a larger one now would yield it before a smaller one left out).
    left_out: Option<String>,
}

impl NameWindow {
    fn new(after: Option<String>, limit: usize) -> Self {
        Self {
            after,
            limit,
            ..Self::default()
        }
    }

    /// Keeps `name` if it belongs to this pass and fits, leaving out the largest names held
    /// when it does not (one name always fits).
    fn offer(&mut self, name: &str) {
        let after = self.after.as_deref().is_some_and(|a| name <= a);
        let beyond = self.left_out.as_deref().is_some_and(|l| name >= l);
        if after || beyond || self.names.contains(name) {
            return;
        }
        self.bytes += name.len() + NAME_BYTES;
        self.names.insert(name.to_owned());
        while self.bytes > self.limit && self.names.len() > 1 {
            let largest = self.names.pop_last().expect("more than one");
            self.bytes -= largest.len() + NAME_BYTES;
            self.left_out = Some(largest);
        }
    }
}

/// One pass of a listing over `category`'s partitions (see [`list_streams`]).
async fn names_after(
    shared: &Arc<Shared>,
    category: &Category,
    after: Option<String>,
    limit: usize,
) -> Result<NameWindow, Error> {
    let mut window = NameWindow::new(after, limit);
    let topic = shared.config.topic(category.as_str());
    let Some(n) = shared.partition_count(&topic).await? else {
        return Ok(window);
    };
    for (p, (low, high)) in (0..).zip(partition_bounds(shared, &topic, n).await?) {
        {
            let state = shared.partition(&topic, p);
            let state = state.lock().await;
            if state.index.next_offset >= high {
                for name in state.index.streams() {
                    window.offer(name);
                }
                continue;
            }
        }
        scan(shared, &topic, p, (low, high), |msg| {
            if let Some(name) = codec::stream_key(msg) {
                window.offer(name);
            }
            None::<()>
        })
        .await?;
    }
    Ok(window)
}

/// What a stream read fetches: the offsets of the versions to read, in delivery order.
struct ReadPlan {
    shared: Arc<Shared>,
    topic: String,
    category: String,
    p: i32,
    offsets: Vec<i64>,
}

/// Reads one stream lazily, [`READ_STEP`] events at a time, by the offsets its index holds.
/// The index is brought up to the stable end the read began at in steps ([`Reach::Step`]), the
/// partition's lock held only for one step: a forwards read hands out the versions found so far
/// before it indexes further, so the first read of a stream in a large partition not indexed yet
/// starts with what the partition's start holds instead of after reading all of it. A backwards
/// read starts at the stream's last version (or at `from`), so it indexes until it knows where
/// that is.
pub(crate) fn read_stream(
    shared: Arc<Shared>,
    stream: StreamId,
    options: ReadOptions,
) -> BoxStream<'static, Result<RecordedEvent, Error>> {
    stream::once(start_read(shared, stream, options))
        .flat_map(|r| match r {
            Ok(None) => stream::empty().boxed(),
            Err(e) => error_stream(e),
            Ok(Some(read)) if read.options.direction == Direction::Backwards => {
                stream::once(read.plan_backwards())
                    .flat_map(|r| match r {
                        Ok(plan) => read_planned(plan),
                        Err(e) => error_stream(e),
                    })
                    .boxed()
            }
            Ok(Some(read)) => stream::try_unfold(read, StreamRead::next_step)
                .map_ok(|events| stream::iter(events.into_iter().map(Ok)))
                .try_flatten()
                .boxed(),
        })
        .boxed()
}

/// Records the first step of a read indexes; each next step reads twice as many, up to
/// [`MAX_INDEX_STEP`].
const FIRST_INDEX_STEP: i64 = 1_000;

/// The most records one step of a read indexes while it holds the partition's lock.
const MAX_INDEX_STEP: i64 = 64_000;

/// A stream read under way: where its stream lives, what it delivered, how far it indexes.
struct StreamRead {
    shared: Arc<Shared>,
    stream: StreamId,
    topic: String,
    p: i32,
    state: SharedPartition,
    options: ReadOptions,
    /// The log start and the stable end when the read began: it delivers what was committed
    /// before it.
    bounds: (i64, i64),
    /// Forwards: the next version to deliver.
    next: u64,
    /// Events still to deliver (the read's limit).
    left: usize,
    /// Records the next indexing step reads.
    step: i64,
    /// How far this read's steps brought the index: an index found short of it was dropped
    /// meanwhile (over `max_index_bytes`).
    reached: i64,
    /// Offsets taken from the index and not fetched yet, in version order from `next`.
    pending: std::collections::VecDeque<i64>,
    /// Held from the read's first look at the index to its end.
    pin: Option<ReadPin>,
}

/// Where `stream` lives and the bounds of its partition; None when its topic does not exist.
async fn start_read(
    shared: Arc<Shared>,
    stream: StreamId,
    options: ReadOptions,
) -> Result<Option<StreamRead>, Error> {
    let Some((topic, p, state)) = locate(&shared, &stream).await? else {
        return Ok(None);
    };
    let bounds = watermarks(&shared, &topic, p).await?;
    Ok(Some(StreamRead {
        next: options.from.map_or(0, |v| v.0),
        left: options.limit.unwrap_or(usize::MAX),
        step: FIRST_INDEX_STEP,
        reached: 0,
        pending: std::collections::VecDeque::new(),
        pin: None,
        shared,
        stream,
        topic,
        p,
        state,
        options,
        bounds,
    }))
}

impl StreamRead {
    /// Indexes one more step of the partition, with its lock held for that step only; false
    /// when the index already reaches the stable end the read began at and holds no part of an
    /// append. An index left holding part of one (a catch-up cut off) is read on to that
    /// append's end first, past the read's bounds if need be: the rest was committed with it,
    /// so it lies below the stable end as the brokers report it now.
    async fn index_step(&mut self, index: &mut PartitionIndex) -> Result<bool, Error> {
        if index.mid_append() {
            let end = stable_end(&self.shared, &self.topic, self.p).await?;
            let reach = Reach::Step {
                bounds: (self.bounds.0, end.max(self.bounds.1)),
                records: 0,
            };
            catch_up_to(&self.shared, &self.topic, self.p, index, reach).await?;
            self.reached = index.next_offset;
            if index.mid_append() {
                // Only a record not written by photon's writer in the middle of an append (or
                // another tool's transaction still open there) stops it short of the append's
                // end: nothing part of it may be read, so the read fails and may be tried again.
                return Err(error::unavailable(format!(
                    "reading {}/{}: the append before offset {} does not end below the stable end {end}",
                    self.topic, self.p, index.next_offset
                )));
            }
            return Ok(true);
        }
        if index.next_offset >= self.bounds.1 {
            return Ok(false);
        }
        if index.next_offset < self.reached {
            // Dropped between two steps (a read pins its partition, so only if that changes):
            // the rest is read in one, so the read always ends.
            self.step = i64::MAX;
        }
        let reach = Reach::Step {
            bounds: self.bounds,
            records: self.step,
        };
        catch_up_to(&self.shared, &self.topic, self.p, index, reach).await?;
        self.reached = index.next_offset;
        if self.step < MAX_INDEX_STEP {
            self.step = (self.step * 2).min(MAX_INDEX_STEP);
        }
        Ok(true)
    }

    /// The next events of a forwards read: the versions the index holds from `next` on (at
    /// most [`READ_STEP`]), indexing further steps while it holds none; None at the end. Once
    /// the index reaches the read's end, every offset still to read is taken in the same hold
    /// of the lock, so the rest of the read takes it no more.
    async fn next_step(mut self) -> Result<Option<(Vec<RecordedEvent>, Self)>, Error> {
        loop {
            if self.left == 0 {
                return Ok(None);
            }
            if self.pending.is_empty() {
                let state = self.state.clone();
                let mut state = state.lock().await;
                self.pin.get_or_insert_with(|| ReadPin::new(&state.reads));
                // Nothing is handed out of an index holding part of an append: an append is
                // read whole or not at all.
                if !state.index.mid_append() {
                    let offsets = state.index.offsets(self.stream.as_str());
                    let found = offsets.get(self.next as usize..).unwrap_or_default();
                    let complete = state.index.next_offset >= self.bounds.1;
                    let take = if complete {
                        self.left
                    } else {
                        READ_STEP.min(self.left)
                    };
                    self.pending.extend(found.iter().take(take));
                }
                if self.pending.is_empty() {
                    if !self.index_step(&mut state.index).await? {
                        return Ok(None);
                    }
                    continue;
                }
            }
            let n = self.pending.len().min(READ_STEP);
            let wanted: Vec<i64> = self.pending.drain(..n).collect();
            let category = self.stream.category_name();
            let events = fetch(&self.shared, &self.topic, category, self.p, &wanted).await?;
            self.next += n as u64;
            self.left -= n;
            return Ok(Some((events, self)));
        }
    }

    /// The whole plan of a backwards read, once the index holds the version it starts at (the
    /// stream's last as of the read's start, or `from`) and no part of an append.
    async fn plan_backwards(mut self) -> Result<ReadPlan, Error> {
        let state = self.state.clone();
        loop {
            let mut state = state.lock().await;
            self.pin.get_or_insert_with(|| ReadPin::new(&state.reads));
            let len = state.index.offsets(self.stream.as_str()).len() as u64;
            let known = !state.index.mid_append() && self.options.from.is_some_and(|v| v.0 < len);
            if known || !self.index_step(&mut state.index).await? {
                let all = state.index.offsets(self.stream.as_str());
                let offsets = versions_to_read(all.len() as u64, &self.options)
                    .map(|v| all[v as usize])
                    .collect();
                return Ok(ReadPlan {
                    category: self.stream.category_name().to_owned(),
                    shared: self.shared,
                    topic: self.topic,
                    p: self.p,
                    offsets,
                });
            }
        }
    }
}

/// A read's hold on its partition: while one is held, the index bound (client.rs
/// `bound_indexes`) drops neither the partition's index nor its producer, though the read
/// releases the lock between its steps and while its caller handles what it delivered.
#[derive(Debug)]
struct ReadPin(Arc<AtomicUsize>);

impl ReadPin {
    /// Taken with the partition's lock held, which `bound_indexes` also holds to look.
    fn new(reads: &Arc<AtomicUsize>) -> Self {
        reads.fetch_add(1, Ordering::Relaxed);
        Self(reads.clone())
    }
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The versions a read of a stream of `len` events delivers, in delivery order.
fn versions_to_read(len: u64, options: &ReadOptions) -> Box<dyn Iterator<Item = u64>> {
    let limit = options.limit.unwrap_or(usize::MAX);
    match options.direction {
        Direction::Forwards => {
            let from = options.from.map_or(0, |v| v.0);
            Box::new((from..len).take(limit))
        }
        Direction::Backwards => {
            let from = options.from.map_or(len, |v| (v.0 + 1).min(len));
            Box::new((0..from).rev().take(limit))
        }
    }
}

/// Fetches a planned read step by step. A backwards step is fetched forwards (offsets ascend)
/// and delivered reversed.
fn read_planned(plan: ReadPlan) -> BoxStream<'static, Result<RecordedEvent, Error>> {
    let ReadPlan {
        shared,
        topic,
        category,
        p,
        offsets,
    } = plan;
    let steps: Vec<Vec<i64>> = offsets.chunks(READ_STEP).map(<[i64]>::to_vec).collect();
    stream::iter(steps)
        .then(move |mut wanted| {
            let (shared, topic, category) = (shared.clone(), topic.clone(), category.clone());
            let backwards = wanted.len() > 1 && wanted[0] > wanted[1];
            async move {
                if backwards {
                    wanted.reverse();
                }
                let mut events = fetch(&shared, &topic, &category, p, &wanted).await?;
                if backwards {
                    events.reverse();
                }
                Ok::<_, Error>(events)
            }
        })
        .flat_map(|r| match r {
            Ok(events) => stream::iter(events.into_iter().map(Ok)).boxed(),
            Err(e) => error_stream(e),
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(after: Option<&str>, limit: usize, names: &[&str]) -> (Vec<String>, Option<String>) {
        let mut w = NameWindow::new(after.map(str::to_owned), limit);
        for n in names {
            w.offer(n);
        }
        (w.names.into_iter().collect(), w.left_out)
    }

    #[test]
    fn a_window_keeps_the_smallest_names_after_the_last_yielded() {
        let names = ["c-3", "c-1", "c-5", "c-2", "c-1", "c-4", "c-0"];
        let two = 2 * (3 + NAME_BYTES);
        let (first, left) = pass(None, two, &names);
        assert_eq!(first, ["c-0", "c-1"]);
        assert!(left.is_some());
        let (second, left) = pass(Some("c-1"), two, &names);
        assert_eq!(second, ["c-2", "c-3"]);
        assert!(left.is_some());
        let (third, left) = pass(Some("c-3"), two, &names);
        assert_eq!(third, ["c-4", "c-5"]);
        // Full, but nothing was left out: the listing ends here.
        assert_eq!(left, None);
        let (all, left) = pass(None, usize::MAX, &names);
        assert_eq!(all, ["c-0", "c-1", "c-2", "c-3", "c-4", "c-5"]);
        assert_eq!(left, None);
    }

    #[test]
    fn a_window_too_small_for_one_name_still_holds_one() {
        let names = ["c-b", "c-a", "c-c"];
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let (got, left) = pass(after.as_deref(), 1, &names);
            listed.extend(got.iter().cloned());
            after = got.last().cloned();
            if left.is_none() {
                break;
            }
        }
        assert_eq!(listed, ["c-a", "c-b", "c-c"]);
    }

    #[test]
    fn a_name_larger_than_one_left_out_waits_for_the_next_pass() {
        // "c-long12345" is left out to make room for "c-2"; "c-m" arrives with room for it,
        // but it would be yielded before "c-long12345" was: it waits too. Each pass yields in
        // order, and no name is lost.
        let limit = 160;
        let (got, left) = pass(None, limit, &["c-1", "c-long12345", "c-2", "c-m"]);
        assert_eq!(got, ["c-1", "c-2"]);
        assert_eq!(left.as_deref(), Some("c-long12345"));
    }
}
