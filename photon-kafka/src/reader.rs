//! Reading partitions: the pool of reader consumers, keeping a partition's version index current,
//! and fetching one stream's records by the offsets the index gives. Subscriptions have their own
//! long-lived consumers (subscription.rs); appends go through writer.rs.

use std::sync::Arc;

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use photon_api::{
    error_stream, Category, Direction, Error, ReadOptions, RecordedEvent, StreamId, Version,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::index::PartitionIndex;
use crate::position;
use crate::record::{self, partition_for};
use crate::{blocking, map_kafka, unavailable, Shared};

/// Events fetched per step of a stream read: the read is lazy, so memory holds one step.
const READ_STEP: usize = 500;

/// Offsets further apart than this are reached by a new fetch position rather than read through.
const SEEK_GAP: i64 = 256;

/// A pooled consumer, handed back (unassigned) when dropped.
pub(crate) struct PooledReader {
    consumer: Option<StreamConsumer>,
    shared: Arc<Shared>,
}

impl std::ops::Deref for PooledReader {
    type Target = StreamConsumer;
    fn deref(&self) -> &StreamConsumer {
        self.consumer.as_ref().expect("present until drop")
    }
}

impl Drop for PooledReader {
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            if c.unassign().is_ok() {
                let mut pool = self.shared.readers.lock().expect("readers lock");
                if pool.len() < 8 {
                    pool.push(c);
                }
            }
        }
    }
}

pub(crate) fn pooled_reader(shared: &Arc<Shared>) -> Result<PooledReader, Error> {
    let pooled = shared.readers.lock().expect("readers lock").pop();
    let consumer = match pooled {
        Some(c) => c,
        None => shared
            .config
            .consumer()
            .create()
            .map_err(|e| map_kafka("creating a reader", e))?,
    };
    Ok(PooledReader {
        consumer: Some(consumer),
        shared: shared.clone(),
    })
}

fn assign(consumer: &StreamConsumer, topic: &str, p: i32, offset: i64) -> Result<(), Error> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(offset))
        .map_err(|e| map_kafka("assign", e))?;
    consumer
        .assign(&tpl)
        .map_err(|e| map_kafka(&format!("reading {topic}/{p}"), e))
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

/// The last stable offset of `topic`/`p`.
pub(crate) async fn stable_end(shared: &Shared, topic: &str, p: i32) -> Result<i64, Error> {
    Ok(watermarks(shared, topic, p).await?.1)
}

/// The log start and last stable offset (read_committed watermarks) of `topic`/`p`. Right after
/// a topic is created a client may not know its leader yet; that answer is retried within the
/// request timeout.
async fn watermarks(shared: &Shared, topic: &str, p: i32) -> Result<(i64, i64), Error> {
    use rdkafka::error::RDKafkaErrorCode as C;
    let deadline = tokio::time::Instant::now() + shared.config.timeout;
    loop {
        let meta = shared.meta.clone();
        let (t, timeout) = (topic.to_owned(), shared.config.timeout);
        match blocking(move || meta.fetch_watermarks(&t, p, timeout)).await? {
            Ok(marks) => return Ok(marks),
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        C::NotLeaderForPartition
                            | C::LeaderNotAvailable
                            | C::UnknownTopicOrPartition
                            | C::UnknownPartition
                    )
                ) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(map_kafka(&format!("watermarks of {topic}/{p}"), e)),
        }
    }
}

/// Reads `topic`/`p` from `index.next_offset` to its current stable end. Returns whether photon
/// records were added.
pub(crate) async fn catch_up(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    index: &mut PartitionIndex,
) -> Result<bool, Error> {
    let end = stable_end(shared, topic, p).await?;
    if index.next_offset >= end {
        return Ok(false);
    }
    let consumer = pooled_reader(shared)?;
    assign(&consumer, topic, p, index.next_offset)?;
    let mut added = false;
    while index.next_offset < end {
        let got = tokio::time::timeout(shared.config.timeout, consumer.recv())
            .await
            .map_err(|_| {
                unavailable(format!(
                    "reading {topic}/{p} from offset {} to {end}: no answer within {:?}",
                    index.next_offset, shared.config.timeout
                ))
            })?;
        match got {
            Ok(msg) => {
                if msg.topic() != topic || msg.partition() != p || msg.offset() < index.next_offset
                {
                    continue;
                }
                if msg.offset() >= end {
                    // A transaction committed after `end` was taken. `end` lies on a transaction
                    // boundary; reading on could stop inside this one and expose part of an
                    // append. Everything before this record has been read.
                    index.next_offset = msg.offset();
                    break;
                }
                match record::index_entry(&msg) {
                    Ok(Some(entry)) => added |= index.apply(msg.offset(), entry),
                    Ok(None) => {}
                    // Not written by photon's writer: left out, like any foreign record.
                    Err(e) => {
                        tracing::warn!(error = %e, "photon-kafka: record left out of the index")
                    }
                }
                tokio::task::consume_budget().await;
                index.next_offset = msg.offset() + 1;
            }
            Err(KafkaError::PartitionEOF(_)) => {
                // Transaction markers take offsets too, and the consumer's position counts them.
                // An end-of-partition notice may be left over from the pooled consumer's earlier
                // use, so only the position decides that the end was reached.
                if let Some(pos) = position_of(&consumer, topic, p) {
                    index.next_offset = index.next_offset.max(pos.min(end));
                }
            }
            Err(e) if crate::is_passing(&e) => {
                tracing::debug!(error = %e, "photon-kafka: passing client error while reading")
            }
            Err(e) => return Err(map_kafka(&format!("reading {topic}/{p}"), e)),
        }
    }
    Ok(added)
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
    let mut names = record::Names::default();
    let mut i = 0;
    assign(&consumer, topic, p, offsets[0])?;
    while i < offsets.len() {
        let want = offsets[i];
        let got = tokio::time::timeout(shared.config.timeout, consumer.recv())
            .await
            .map_err(|_| {
                unavailable(format!(
                    "reading {topic}/{p} at offset {want}: no answer within {:?}",
                    shared.config.timeout
                ))
            })?;
        match got {
            Ok(msg) => {
                if msg.topic() != topic || msg.partition() != p || msg.offset() < want {
                    continue;
                }
                if msg.offset() > want {
                    return Err(Error::backend(
                        crate::BACKEND,
                        format!("{topic}/{p}: the indexed record at offset {want} is gone (was the topic deleted or truncated?)"),
                    ));
                }
                let checkpoint = position::partition_checkpoint(category, p, want + 1);
                let event =
                    record::recorded_event(&msg, checkpoint, &mut names)?.ok_or_else(|| {
                        Error::backend(
                            crate::BACKEND,
                            format!("{topic}/{p}@{want} is indexed but not a photon event"),
                        )
                    })?;
                out.push(event);
                i += 1;
                if i < offsets.len() && offsets[i] - want > SEEK_GAP {
                    assign(&consumer, topic, p, offsets[i])?;
                }
            }
            Err(KafkaError::PartitionEOF(_)) => {
                if position_of(&consumer, topic, p).is_some_and(|pos| pos > want) {
                    return Err(Error::backend(
                        crate::BACKEND,
                        format!("{topic}/{p}: the indexed record at offset {want} was not found"),
                    ));
                }
            }
            Err(e) if crate::is_passing(&e) => {
                tracing::debug!(error = %e, "photon-kafka: passing client error while reading")
            }
            Err(e) => return Err(map_kafka(&format!("reading {topic}/{p}"), e)),
        }
    }
    Ok(out)
}

/// Where `stream` lives, and its partition's index brought up to date: None when its topic does
/// not exist (the stream has no events).
async fn locate(
    shared: &Arc<Shared>,
    stream: &StreamId,
) -> Result<Option<(String, i32, crate::SharedPartition)>, Error> {
    let topic = shared.config.topic(stream.category_name());
    let Some(n) = shared.partition_count(&topic).await? else {
        return Ok(None);
    };
    let p = partition_for(stream, n);
    let state = shared.partition(&topic, p);
    Ok(Some((topic, p, state)))
}

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

/// Whether any partition of `topic` holds a record.
pub(crate) async fn holds_events(shared: &Arc<Shared>, topic: &str) -> Result<bool, Error> {
    let Some(n) = shared.partition_count(topic).await? else {
        return Ok(false);
    };
    Ok(partition_bounds(shared, topic, n)
        .await?
        .iter()
        .any(|(low, high)| high > low))
}

/// Every stream of `category`, sorted, from the partitions' indexes.
pub(crate) async fn stream_names(
    shared: &Arc<Shared>,
    category: &Category,
) -> Result<Vec<StreamId>, Error> {
    let topic = shared.config.topic(category.as_str());
    let Some(n) = shared.partition_count(&topic).await? else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for p in 0..n {
        let state = shared.partition(&topic, p);
        let mut state = state.lock().await;
        catch_up(shared, &topic, p, &mut state.index).await?;
        for s in state.index.streams() {
            names.push(StreamId::parse(s)?);
        }
    }
    names.sort();
    Ok(names)
}

/// Reads one stream lazily, [`READ_STEP`] events at a time, by the offsets its index holds.
pub(crate) fn read_stream(
    shared: Arc<Shared>,
    stream: StreamId,
    options: ReadOptions,
) -> BoxStream<'static, Result<RecordedEvent, Error>> {
    let start = async move {
        let Some((topic, p, state)) = locate(&shared, &stream).await? else {
            return Ok::<_, Error>(None);
        };
        let offsets: Vec<i64> = {
            let mut state = state.lock().await;
            catch_up(&shared, &topic, p, &mut state.index).await?;
            state.index.offsets(stream.as_str()).to_vec()
        };
        // The versions to read, in delivery order.
        let len = offsets.len() as u64;
        let limit = options.limit.unwrap_or(usize::MAX) as u64;
        let versions: Vec<u64> = match options.direction {
            Direction::Forwards => {
                let from = options.from.map_or(0, |v| v.0);
                (from..len).take(limit as usize).collect()
            }
            Direction::Backwards => {
                let from = options.from.map_or(len, |v| (v.0 + 1).min(len));
                (0..from).rev().take(limit as usize).collect()
            }
        };
        Ok(Some((shared, topic, p, offsets, versions)))
    };
    stream::once(start)
        .flat_map(|r| match r {
            Ok(None) => stream::empty().boxed(),
            Err(e) => error_stream(e),
            Ok(Some((shared, topic, p, offsets, versions))) => {
                let category = topic
                    .rsplit_once('.')
                    .map(|(_, c)| c.to_owned())
                    .unwrap_or_default();
                stream::iter(
                    versions
                        .chunks(READ_STEP)
                        .map(<[u64]>::to_vec)
                        .collect::<Vec<_>>(),
                )
                .then(move |chunk| {
                    let (shared, topic, category) =
                        (shared.clone(), topic.clone(), category.clone());
                    let mut wanted: Vec<i64> = chunk.iter().map(|v| offsets[*v as usize]).collect();
                    let backwards = chunk.len() > 1 && chunk[0] > chunk[1];
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
        })
        .boxed()
}
