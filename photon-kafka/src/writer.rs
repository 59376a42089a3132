//! Appends: one transactional producer per partition, with a `transactional.id` every process
//! derives the same way, so at most one writer per partition is alive cluster-wide. Taking a
//! partition over (`init_transactions`) fences the previous writer: its open transaction is
//! aborted and its later sends and commits fail. The new writer then reads the partition to its
//! stable end before it checks an expected version, so the check sees every committed event.
//!
//! An append is one transaction: all of its records become visible to read_committed readers at
//! once, or none do.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use photon_api::validate::{classify_batch, validate_batch, BatchKind};
use photon_api::{AppendResult, Error, EventData, ExpectedVersion, StreamId, Timestamp, Version};
use rand::Rng;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::index::PartitionIndex;
use crate::position::Position;
use crate::reader::{catch_up, stable_end};
use crate::record::{self, partition_for};
use crate::{blocking, map_kafka, PartitionState, Shared};

/// Live producers kept per store before idle ones are closed.
const MAX_WRITERS: usize = 32;

/// This process's producer for one partition while it holds the partition's writer role.
pub(crate) struct Writer {
    producer: Arc<FutureProducer>,
    pub(crate) last_used: Instant,
    shared: Arc<Shared>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.live_writers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why one attempt did not finish.
enum Attempt {
    /// Another process took the partition over (or the outcome is unknown): take it back, read
    /// what changed, decide again.
    Again(Error),
    /// Final.
    Done(Result<AppendResult, Error>),
    /// Final, and the producer's state is unknown: replace it before the next append.
    Stop(Error),
}

/// The transactional id of a partition's writer: the same in every process, which is what makes
/// a second writer fence the first.
fn transactional_id(topic: &str, p: i32) -> String {
    format!("photon.{topic}.{p}")
}

pub(crate) async fn append(
    shared: &Arc<Shared>,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
) -> Result<AppendResult, Error> {
    let config = &shared.config;
    validate_batch(
        stream,
        &events,
        config.max_event_size,
        Some(config.max_append_size),
    )?;
    record::check_headers(stream, &events)?;
    let topic = config.topic(stream.category_name());
    let n = shared.ensure_topic(&topic).await?;
    let p = partition_for(stream, n);
    let state = shared.partition(&topic, p);
    let mut state = state.lock().await;
    // Contention between processes ends when one of them commits; bound the whole append by
    // a few request timeouts so a caller always hears back.
    let deadline = Instant::now() + config.timeout * 3;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match try_append(shared, &topic, p, &mut state, stream, expected, &events).await {
            Attempt::Done(result) => return result,
            Attempt::Stop(e) => {
                state.producer = None;
                return Err(e);
            }
            Attempt::Again(why) => {
                state.producer = None;
                if Instant::now() >= deadline {
                    return Err(why);
                }
                tracing::debug!(%stream, attempt, error = %why, "photon-kafka: append retried");
                let jitter = rand::rng().random_range(5..30 * attempt.min(10) as u64);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
        }
    }
}

/// Becomes the partition's writer: a new producer whose `init_transactions` fences any other,
/// then the index read up to the stable end, which now includes everything committed.
async fn take_over(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    state: &mut PartitionState,
) -> Result<(), Error> {
    shared.evict_writers(MAX_WRITERS.saturating_sub(1));
    let producer: FutureProducer = shared
        .config
        .producer(&transactional_id(topic, p))
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| map_kafka("creating a producer", e))?;
    let producer = Arc::new(producer);
    let (pr, timeout) = (producer.clone(), shared.config.timeout);
    blocking(move || pr.init_transactions(timeout))
        .await?
        .map_err(|e| map_kafka(&format!("becoming the writer of {topic}/{p}"), e))?;
    shared.live_writers.fetch_add(1, Ordering::Relaxed);
    state.producer = Some(Writer {
        producer,
        last_used: Instant::now(),
        shared: shared.clone(),
    });
    catch_up(shared, topic, p, &mut state.index).await?;
    Ok(())
}

fn result_of(
    index: &PartitionIndex,
    stream: &StreamId,
    category: &str,
    p: i32,
    first: Version,
    len: usize,
) -> AppendResult {
    let offsets = index.offsets(stream.as_str());
    let checkpoints = (first.0..first.0 + len as u64)
        .map(|v| {
            Position::Partition {
                category: category.to_owned(),
                partition: p,
                next: offsets[v as usize] + 1,
            }
            .to_checkpoint()
        })
        .collect();
    AppendResult {
        first_version: first,
        last_version: Version(first.0 + len as u64 - 1),
        checkpoints,
    }
}

#[allow(clippy::too_many_arguments)]
async fn try_append(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    state: &mut PartitionState,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Attempt {
    let category = stream.category_name();
    let fresh = state.producer.is_none();
    if fresh {
        if let Err(e) = take_over(shared, topic, p, state).await {
            // init_transactions already waits out other writers' transactions; a failure here
            // is an unreachable broker or a refused setting.
            return Attempt::Stop(e);
        }
    }
    // Decide from the index. A writer that has not been fenced has seen every committed event;
    // one that has been fenced without knowing it may be behind, so a refusal is only final
    // once the index is confirmed current.
    let decision = decide(&state.index, stream, expected, events);
    let decision = match decision {
        Ok(d) => d,
        Err(refusal) if !fresh => match catch_up(shared, topic, p, &mut state.index).await {
            Ok(false) => return Attempt::Done(Err(refusal)),
            // Someone else wrote here: this producer has been fenced; take over and decide again.
            Ok(true) => return Attempt::Again(refusal),
            Err(e) => return Attempt::Done(Err(e)),
        },
        Err(refusal) => return Attempt::Done(Err(refusal)),
    };
    let first = match decision {
        BatchKind::Retry { first } => {
            return Attempt::Done(Ok(result_of(
                &state.index,
                stream,
                category,
                p,
                first,
                events.len(),
            )))
        }
        BatchKind::New => state
            .index
            .current(stream.as_str())
            .map_or(Version(0), Version::next),
    };
    let writer = state.producer.as_mut().expect("taken over above");
    writer.last_used = Instant::now();
    let producer = writer.producer.clone();
    // Recorded time never goes backwards within a partition, whatever the writers' clocks say.
    let now = Timestamp::now()
        .unix_micros()
        .max(state.index.last_recorded);
    let recorded_at = Timestamp::from_unix_micros(now).expect("a current time");
    if let Err(e) = producer.begin_transaction() {
        return failed("begin transaction", e);
    }
    let key = stream.as_str();
    let timeout = Timeout::After(shared.config.timeout);
    let deliveries = join_all(events.iter().enumerate().map(|(i, e)| {
        let version = Version(first.0 + i as u64);
        let headers = record::headers_of(e, version, recorded_at, first, events.len());
        let record = FutureRecord::to(topic)
            .partition(p)
            .key(key)
            .payload(&e.payload.bytes[..])
            .timestamp(recorded_at.unix_millis())
            .headers(headers);
        producer.send(record, timeout)
    }))
    .await;
    let mut offsets = Vec::with_capacity(events.len());
    let mut failure = None;
    for d in deliveries {
        match d {
            Ok(delivery) => offsets.push(delivery.offset),
            Err((e, _)) => {
                failure.get_or_insert(e);
            }
        }
    }
    let (pr, t) = (producer.clone(), shared.config.timeout);
    if let Some(e) = failure {
        // Nothing is committed; abort so a replacement writer need not wait for the timeout.
        let _ = blocking(move || pr.abort_transaction(t)).await;
        return failed(&format!("appending to {stream} in {topic}/{p}"), e);
    }
    match blocking(move || pr.commit_transaction(t)).await {
        Ok(Ok(())) => {}
        // The outcome is unknown (a commit can land and still report an error): the next
        // attempt takes the partition over, which settles the transaction, then reads it, so a
        // landed batch is recognised by its ids.
        Ok(Err(e)) => return failed(&format!("committing to {stream}"), e),
        Err(e) => return Attempt::Again(e),
    }
    for (i, (e, offset)) in events.iter().zip(&offsets).enumerate() {
        state.index.apply(
            *offset,
            record::IndexEntry {
                stream: key.to_owned(),
                event_id: e.event_id,
                version: first.0 + i as u64,
                batch_first: first.0,
                batch_len: events.len() as u32,
                recorded_at: now,
            },
        );
    }
    // Our own records are indexed; the next catch-up starts after them. Offsets of transaction
    // markers are read past then.
    let last = offsets.iter().copied().max().unwrap_or_default();
    state.index.next_offset = state.index.next_offset.max(last + 1);
    // A commit returns once the coordinator has decided it; the markers that make the records
    // readable reach the partition a moment later. Wait for them, so that whoever reads after
    // this append returns sees it.
    if let Err(e) = wait_visible(shared, topic, p, last).await {
        tracing::warn!(%stream, error = %e, "photon-kafka: committed, not yet readable");
    }
    Attempt::Done(Ok(result_of(
        &state.index,
        stream,
        category,
        p,
        first,
        events.len(),
    )))
}

/// Waits until the stable end of `topic`/`p` is past `last`, bounded by the request timeout.
async fn wait_visible(shared: &Arc<Shared>, topic: &str, p: i32, last: i64) -> Result<(), Error> {
    let deadline = Instant::now() + shared.config.timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if stable_end(shared, topic, p).await? > last {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(crate::unavailable(format!(
                "{topic}/{p}: offset {last} not readable after {:?}",
                shared.config.timeout
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn decide(
    index: &PartitionIndex,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<BatchKind, Error> {
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

/// A failed send, commit or begin: decided again after a take-over, unless retrying cannot help
/// (a record the broker refuses as too large, a missing permission). The transaction did not
/// commit, or its outcome is unknown; either way the producer is replaced.
fn failed(context: &str, e: KafkaError) -> Attempt {
    use RDKafkaErrorCode as C;
    let last = matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::TopicAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::ClusterAuthorizationFailed
        )
    );
    let error = map_kafka(context, e);
    if last {
        Attempt::Stop(error)
    } else {
        Attempt::Again(error)
    }
}
