//! Registers (`EventStore::load_register` / `save_register`) on Kafka: one compacted topic,
//! `<prefix>.photon-registers`, keyed by register name, so the log keeps each register's latest
//! save and the cleaner reclaims the ones it replaced. Kafka has no compare-and-set, so a save is
//! fenced as an append is, per bucket of names: every process uses one transactional id per
//! partition of that topic and bucket of the name's hash (`photon.<prefix>.photon-registers.
//! <p>.<bucket>`, [`bucket_of`], fixed forever: every process must agree on it);
//! `init_transactions` fences that id's writer in every other process (its open transaction is
//! aborted, its later sends and commits fail), and only then, once the stable end reached the
//! log end as of the take-over (another bucket's open transaction can hold it below a save
//! committed before), is the partition read to its stable end and the expected revision
//! checked, so the check sees every committed save of the name and no other process can commit
//! one until this one is fenced. Registers of other
//! buckets are written meanwhile by other holders, in the same partition. Two shortcuts, both
//! safe by the fence: a store that does not hold the bucket's fence first reads to the stable
//! end and refuses a stale save from that read without fencing anyone; a store that holds it
//! decides a name *of that bucket* from what it read plus its own commits (nobody else can have
//! committed one: a take-over would make its commit fail, and it then reads and decides
//! again). Every other decision reads to the stable end first.
//!
//! Memory: per register read, its revision, save id and offset, never its value; a load seeks
//! to that offset for the value (or takes it from the record its read just passed). A
//! partition is read when a register of it is first used, not at the topic's first look.
//!
//! This module owns the register record format, the registers topic's checks and each
//! partition's fences (a producer per bucket held, the latest save of each register read so
//! far). It uses client.rs for topic metadata and creation, reader.rs for consumers and offsets,
//! topic.rs for the decision on the topic's settings; it touches no event topic or index, and
//! event writers only through client.rs's eviction, when `max_producers` needs room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use photon_api::{classify_save, validate_register, Bytes, Error, Register, Uuid};
use rand::Rng;
use rdkafka::admin::ResourceSpecifier;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::Message;

use crate::client::{blocking, Shared, BACKEND, RECHECK, TOPIC_POLL};
use crate::codec::partition_of_key;
use crate::error::{self, Fault};
use crate::reader::{
    assign, next_message, pass_or_fail, pooled_reader, position_of, stable_end, watermarks,
};
use crate::topic;

/// Partitions read at once where several are (the topic's first look).
const READ_CONCURRENCY: usize = 4;

/// Fences per registers partition: processes saving registers of different buckets never
/// fence each other. Part of the protocol (it names transactional ids): never changed.
const BUCKETS: u32 = 8;

/// The bucket of register `name` within its partition: FNV-1a (32 bits) of its bytes modulo
/// [`BUCKETS`], independent of the partition's murmur2. Part of the protocol: never changed.
fn bucket_of(name: &str) -> u32 {
    let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % BUCKETS
}

/// The first byte of a register record's value: the layout below, version 1.
const FORMAT: u8 = 1;

/// A register record's value: [`FORMAT`], the topic's partition count when it was written (u32,
/// big-endian), the revision (u64, big-endian), the save id (16 bytes), then the value as saved.
/// Never empty, so never a tombstone (compaction would delete the register), also for an empty
/// value.
const FRAME: usize = 1 + 4 + 8 + 16;

/// How long before the end of its three request timeouts a call's work stops, so its own answer
/// reaches the caller in time (as for appends).
const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// The longest pause between two looks at whether a committed save is readable yet.
const VISIBLE_POLL_MAX: Duration = Duration::from_millis(20);

/// The registers of one store and its clones: the topic's first look, and the fences of each
/// partition of the registers topic used.
#[derive(Default)]
pub(crate) struct Registers {
    /// Held during the topic's first look (creation, checks, a look at the first record of
    /// every partition), so concurrent first calls do it once.
    first_look: tokio::sync::Mutex<()>,
    fences: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<Fence>>>>,
    /// A read_uncommitted client, made on first need: its high watermark is a partition's log
    /// end, open transactions included ([`log_end`]).
    uncommitted: std::sync::OnceLock<Arc<BaseConsumer>>,
}

impl std::fmt::Debug for Registers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registers").finish_non_exhaustive()
    }
}

/// One partition of the registers topic in this store: the latest committed save of every
/// register read so far (without its value), up to `next_offset` (and this store's own saves
/// past it, which a later read passes again), and a producer per bucket whose fence this store
/// holds. Locked for a save's attempt (decision, transaction, wait
/// until readable; not during its backoff) and for a load's read, so a decision never runs on a
/// half-updated view.
#[derive(Default)]
struct Fence {
    latest: HashMap<String, Saved>,
    next_offset: i64,
    /// Past the last record this store knows of in the partition (read, or its own save): a
    /// stable end below it means the topic was made again.
    known_end: i64,
    producers: HashMap<u32, Held>,
}

/// What is kept of a register's latest save: enough to decide a save and to find the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Saved {
    revision: u64,
    save_id: Uuid,
    /// The offset of its record, where a load reads the value.
    offset: i64,
}

/// A transactional producer holding a fence (partition and bucket), counted in the store's live producers
/// (`WriterStats::producers`, bounded by `max_producers`). Closed off the async threads, its
/// open transaction (if any) aborted first, so readers are not held up until it times out.
struct Held {
    producer: Arc<FutureProducer>,
    live: Arc<AtomicUsize>,
    last_used: Instant,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
        let producer = self.producer.clone();
        let close = move || {
            let _ = producer.abort_transaction(Duration::from_secs(2));
            drop(producer);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(close)),
            Err(_) => close(),
        }
    }
}

/// Why one attempt at a save did not finish.
enum Attempt {
    /// Fenced by another process, or the outcome is unknown: read what changed and decide again.
    Again(Error),
    /// Final (a refused permission or setting): retrying cannot help.
    Stop(Error),
}

impl Registers {
    /// The latest save of `name`: read where saves are decided, from the partition's committed
    /// records up to its stable end as of the call, so every save acknowledged before the call
    /// (by any process: a save answers only once readable) is seen. What was read before is
    /// kept, so a load reads only what was committed since.
    pub(crate) async fn load(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        name: &str,
    ) -> Result<Option<Register>, Error> {
        validate_register(name, None)?;
        let cutoff = cutoff(shared);
        let what = || format!("loading register {name:?}");
        by(cutoff, what, async {
            let topic = shared.config.registers_topic();
            // No registers topic yet: nothing was ever saved. A load does not create it (a
            // reader may not be allowed to).
            let Some(n) = self.partitions(shared, &topic, false, cutoff).await? else {
                return Ok(None);
            };
            let p = partition_of_key(name, n);
            let (saved, value) = {
                let fence = self.fence(p);
                let mut fence = fence.lock().await;
                let caught = catch_up(shared, &topic, p, n, &mut fence, Some(name)).await?;
                let Some(saved) = fence.latest.get(name).copied() else {
                    return Ok(None);
                };
                (saved, caught.value.filter(|(at, _)| *at == saved.offset))
            };
            if let Some((_, value)) = value {
                return Ok(Some(saved.with(value)));
            }
            // Read without the partition's lock: a record of `name` at or past its offset is
            // its latest save as of the call or a later one, either a right answer.
            value_at(shared, &topic, p, name, saved.offset)
                .await
                .map(Some)
        })
        .await
    }

    /// Saves `value` as register `name`'s next revision if it is at `expected` (see
    /// [`photon_api::EventStore::save_register`]). Runs in a task of its own, so a caller that
    /// drops its future leaves no transaction open; the task ends by the call's deadline.
    pub(crate) async fn save(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error> {
        validate_register(name, Some((&value, save_id)))?;
        let cutoff = cutoff(shared);
        let (me, shared, name) = (self.clone(), shared.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            let what = || format!("saving register {name:?}");
            let save = me.save_fenced(&shared, &name, expected, save_id, &value, cutoff);
            by(cutoff, what, save).await
        });
        task.await.map_err(error::blocking_failed)?
    }

    async fn save_fenced(
        &self,
        shared: &Arc<Shared>,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: &Bytes,
        cutoff: Instant,
    ) -> Result<u64, Error> {
        let topic = shared.config.registers_topic();
        let n = self
            .partitions(shared, &topic, true, cutoff)
            .await?
            .expect("created when missing");
        let p = partition_of_key(name, n);
        let fence = self.fence(p);
        let save = Save {
            shared,
            topic: &topic,
            p,
            bucket: bucket_of(name),
            n,
            name,
            expected,
            save_id,
            value,
        };
        let mut last_failure: Option<Error> = None;
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            // Locked for one attempt only: loads and other saves of the partition go ahead
            // while this one backs off.
            let mut fence = fence.lock().await;
            match save.attempt(self, &mut fence, cutoff).await {
                // Decided by what was committed: final, also after an attempt whose outcome was
                // unknown (it was read, if it landed).
                Ok(answer) => return answer,
                Err(Attempt::Stop(e)) => {
                    fence.producers.remove(&save.bucket);
                    return Err(final_answer(e, last_failure.as_ref()));
                }
                Err(Attempt::Again(why)) => {
                    fence.producers.remove(&save.bucket);
                    drop(fence);
                    tracing::debug!(topic, p, attempt, error = %why, "photon-kafka: register save retried");
                    if remaining(cutoff).is_zero() {
                        return Err(late(name, &why));
                    }
                    // Exponential backoff with jitter, so racing processes stop fencing each
                    // other (one of them commits, and the others then read that and refuse).
                    let cap = 10u64 << attempt.min(6);
                    let pause = rand::rng().random_range(cap / 2..=cap);
                    let until = (Instant::now() + Duration::from_millis(pause)).min(cutoff);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                    last_failure = Some(why);
                }
            }
        }
    }

    /// The partition count of the registers topic (None: it does not exist, and `create` is
    /// false): at this store's first use the topic is created (when `create` and the URL allow
    /// it) or checked, and every partition read once; afterwards the count is asked again
    /// whenever it was last confirmed [`RECHECK`] ago, and a changed count refuses the topic for
    /// good (a register's partition is its name's hash modulo the count).
    async fn partitions(
        &self,
        shared: &Arc<Shared>,
        topic: &str,
        create: bool,
        cutoff: Instant,
    ) -> Result<Option<i32>, Error> {
        match shared.known(topic)? {
            Some((n, checked)) if checked.elapsed() < RECHECK => Ok(Some(n)),
            Some(_) => shared.partition_count_now(topic).await.map(Some),
            None => {
                let _first = self.first_look.lock().await;
                if let Some((n, _)) = shared.known(topic)? {
                    return Ok(Some(n));
                }
                self.first_look(shared, topic, create, cutoff).await
            }
        }
    }

    /// Creates the registers topic when missing (and allowed), refuses one whose settings would
    /// keep every save or lose registers, warns of one that keeps replaced saves long, and
    /// reads the first record of each partition (a few at a time): every record says the count
    /// it was written with, and a register placed under an older count keeps its record, and
    /// every older one, in its old partition, so the oldest record of some partition says so.
    /// A count changed before this store came is caught here, also for a register whose
    /// partition under the new count is empty. Partitions are read in full only when used.
    async fn first_look(
        &self,
        shared: &Arc<Shared>,
        topic: &str,
        create: bool,
        cutoff: Instant,
    ) -> Result<Option<i32>, Error> {
        let mut found = shared.fetch_partition_count(topic).await?;
        if found.is_none() && !create {
            // A broker whose metadata lags may not know a topic another process just made:
            // absence is confirmed once more before a load answers None.
            tokio::time::sleep(TOPIC_POLL).await;
            found = shared.fetch_partition_count(topic).await?;
        }
        let (n, replicas) = match found {
            Some(found) => found,
            None if !create => return Ok(None),
            None => {
                if !shared.config.create_topics {
                    let missing = Fault::MissingRegistersTopic {
                        topic: topic.to_owned(),
                        max_record_bytes: shared.config.register_record_bytes(),
                    };
                    return Err(error::fault(format!("looking up topic {topic}"), missing));
                }
                let settings = shared.config.register_topic_settings();
                let partitions = shared.config.register_partitions;
                shared
                    .create_topic_with(topic, partitions, &settings)
                    .await?;
                wait_for_partitions(shared, topic, cutoff).await?
            }
        };
        let context = format!("checking the configuration of topic {topic}");
        let config = shared
            .describe(ResourceSpecifier::Topic(topic), context)
            .await?;
        let needed = shared.config.register_record_bytes();
        topic::check_register_config(
            topic,
            |name| config.get(name).and_then(|e| e.value.as_deref()),
            replicas,
            needed,
        )
        .map_err(topic::refused)?;
        let value = |name: &str| config.get(name).and_then(|e| e.value.as_deref());
        for (setting, v) in topic::register_config_warnings(value) {
            tracing::warn!(
                topic,
                setting,
                value = %v,
                "photon-kafka: the registers topic keeps replaced saves long: the cleaner leaves the active segment and records younger than min.compaction.lag.ms alone, so a store's first read of a partition may read every save of that time; set segment.ms=600000 and min.compaction.lag.ms=0"
            );
        }
        use futures::stream::{StreamExt, TryStreamExt};
        futures::stream::iter((0..n).map(|p| first_count(shared, topic, p, n)))
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect::<()>()
            .await?;
        shared.remember(topic, n);
        Ok(Some(n))
    }

    fn fence(&self, p: i32) -> Arc<tokio::sync::Mutex<Fence>> {
        self.fences
            .lock()
            .expect("fences lock")
            .entry(p)
            .or_default()
            .clone()
    }
}

/// One save, as the attempts at it see it.
struct Save<'a> {
    shared: &'a Arc<Shared>,
    topic: &'a str,
    p: i32,
    bucket: u32,
    n: i32,
    name: &'a str,
    expected: Option<u64>,
    save_id: Uuid,
    value: &'a Bytes,
}

/// What the registers read so far say about a save.
enum Decision {
    /// Its expectation holds: write it as this revision.
    Write(u64),
    /// Decided without writing: a re-send of the latest save (its revision) or a conflict.
    Answer(Result<u64, Error>),
}

impl Save<'_> {
    fn decide(&self, fence: &Fence) -> Decision {
        let current = fence.latest.get(self.name).map(|s| (s.revision, s.save_id));
        match (self.expected, current) {
            (None, None) => Decision::Write(0),
            (Some(e), Some((r, _))) if e == r => Decision::Write(r + 1),
            _ => Decision::Answer(classify_save(
                self.name,
                self.expected,
                self.save_id,
                current,
            )),
        }
    }

    /// One attempt: decide from committed saves, take the fence only when something is to be
    /// written, write in a transaction, and answer once the save is readable. `Ok` is the
    /// save's answer (its revision, a re-send's revision, or a conflict); `Err` says why the
    /// attempt did not get that far.
    async fn attempt(
        &self,
        registers: &Registers,
        fence: &mut Fence,
        cutoff: Instant,
    ) -> Result<Result<u64, Error>, Attempt> {
        let (shared, topic, p, n) = (self.shared, self.topic, self.p, self.n);
        // Without the bucket's fence the view may be behind: read to the stable end first.
        // Losing a race is learnt there, without fencing the winner.
        let current = !fence.producers.contains_key(&self.bucket);
        if current {
            self.catch_up(fence).await?;
        }
        if let Decision::Answer(answer) = self.decide(fence) {
            if current {
                return Ok(answer);
            }
            // With the fence held the view is current unless another process took the fence
            // (then the write below fails); a refusal is final only against a fresh read.
            self.catch_up(fence).await?;
            if let Decision::Answer(answer) = self.decide(fence) {
                return Ok(answer);
            }
        }
        // Taken out while it writes: should this future be dropped (the call's deadline), the
        // producer closes with its transaction aborted and the next save takes the fence anew.
        let producer = match fence.producers.remove(&self.bucket) {
            Some(held) => held,
            None => {
                // A count changed since this store placed registers refuses the topic before
                // anyone is fenced.
                shared
                    .partition_count_now(topic)
                    .await
                    .map_err(Attempt::Stop)?;
                registers.make_room(shared, (p, self.bucket));
                let held = take_fence(shared, topic, p, self.bucket, cutoff).await?;
                // Every save committed before the fence was taken is below the log end now, but
                // not always below the stable end: another bucket's transaction still open below
                // a save the previous holder of this bucket committed holds the stable end back,
                // and a read to it would miss that save (both answered Ok for one expectation).
                // So the stable end must first reach the log end as of the take-over.
                let end = log_end(shared, registers, topic, p)
                    .await
                    .map_err(retry_or_stop)?;
                wait_stable(shared, topic, p, end, cutoff)
                    .await
                    .map_err(Attempt::Again)?;
                catch_up(shared, topic, p, n, fence, None)
                    .await
                    .map_err(retry_or_stop)?;
                held
            }
        };
        let revision = match self.decide(fence) {
            Decision::Write(revision) => revision,
            Decision::Answer(answer) => {
                fence.producers.insert(self.bucket, producer);
                return Ok(answer);
            }
        };
        let offset = self.write(&producer.producer, revision, cutoff).await?;
        // The commit is decided; its markers reach the partition a moment later. Answered once
        // the stable end passed the record, so a load that starts after the answer, in any
        // process, sees it. The partition stays locked meanwhile, so nothing is decided from a
        // save not readable yet.
        wait_readable(shared, topic, p, offset, cutoff)
            .await
            .map_err(Attempt::Again)?;
        fence.latest.insert(
            self.name.to_owned(),
            Saved {
                revision,
                save_id: self.save_id,
                offset,
            },
        );
        // `next_offset` stays: other buckets' holders may have committed below this offset.
        // The next read passes this record again and knows it by its offset.
        fence.known_end = fence.known_end.max(offset + 1);
        let mut producer = producer;
        producer.last_used = Instant::now();
        fence.producers.insert(self.bucket, producer);
        Ok(Ok(revision))
    }

    /// Reads the partition to its stable end (a bucket's fence is given up there when a save of
    /// it that this store did not write is read).
    async fn catch_up(&self, fence: &mut Fence) -> Result<(), Attempt> {
        catch_up(self.shared, self.topic, self.p, self.n, fence, None)
            .await
            .map_err(retry_or_stop)?;
        Ok(())
    }

    /// Writes the save in one transaction and commits it before `cutoff`; its offset.
    async fn write(
        &self,
        producer: &Arc<FutureProducer>,
        revision: u64,
        cutoff: Instant,
    ) -> Result<i64, Attempt> {
        let (topic, p) = (self.topic, self.p);
        let pr = producer.clone();
        blocking(move || pr.begin_transaction())
            .await
            .map_err(Attempt::Again)?
            .map_err(|e| failed(format!("beginning a transaction on {topic}/{p}"), e))?;
        let payload = encode(self.n, revision, self.save_id, self.value);
        let record = FutureRecord::to(topic)
            .partition(p)
            .key(self.name)
            .payload(&payload[..])
            .timestamp(photon_api::Timestamp::now().unix_millis());
        let sent = match producer.send_result(record) {
            Ok(delivery) => {
                tokio::time::timeout_at(tokio::time::Instant::from_std(cutoff), delivery)
                    .await
                    .ok()
            }
            Err((e, _)) => return Err(failed(format!("saving to {topic}/{p}"), e)),
        };
        // On a failure nothing is committed, and nothing will be: the fence is given up and its
        // transaction aborted as the producer closes (and by the next holder's take-over).
        let offset = match sent {
            Some(Ok(Ok(delivery))) => delivery.offset,
            Some(Ok(Err((e, _)))) => return Err(failed(format!("saving to {topic}/{p}"), e)),
            Some(Err(_)) => {
                let e = KafkaError::Canceled;
                return Err(failed(format!("saving to {topic}/{p}"), e));
            }
            None => {
                return Err(Attempt::Again(error::unavailable(format!(
                    "{topic}/{p}: the save was not acknowledged before its deadline; not committed"
                ))))
            }
        };
        let left = remaining(cutoff).min(self.shared.config.timeout);
        if left.is_zero() {
            return Err(Attempt::Again(error::unavailable(format!(
                "{topic}/{p}: the deadline passed before the save could be committed; not committed"
            ))));
        }
        let pr = producer.clone();
        match blocking(move || crate::writer::commit_delivered(&pr, left)).await {
            Ok(Ok(())) => Ok(offset),
            // The outcome is unknown (a commit can land and still report an error): the next
            // attempt takes the fence, which settles the transaction, and reads it, so a landed
            // save is recognised by its id.
            Ok(Err(e)) => Err(failed(format!("committing to {topic}/{p}"), e)),
            Err(e) => Err(Attempt::Again(e)),
        }
    }
}

impl Registers {
    /// Before a fence is taken: while the store's producers (event writers and register fences)
    /// are at `max_producers`, the fence producer of another partition used least recently and
    /// idle now (its lock free) is closed (a later save there takes the fence again), then, if
    /// still at the limit, the event writers' own eviction closes theirs.
    fn make_room(&self, shared: &Shared, taking: (i32, u32)) {
        let max = shared.config.max_producers;
        if shared.live_writers.load(Ordering::Relaxed) < max {
            return;
        }
        let fences: Vec<_> = self
            .fences
            .lock()
            .expect("fences lock")
            .iter()
            .map(|(p, f)| (*p, f.clone()))
            .collect();
        let mut idle: Vec<_> = fences
            .iter()
            .filter_map(|(p, f)| {
                let guard = f.try_lock().ok()?;
                let held: Vec<_> = guard
                    .producers
                    .iter()
                    .filter(|(b, _)| (*p, **b) != taking)
                    .map(|(b, h)| (h.last_used, *b, f))
                    .collect();
                Some(held)
            })
            .flatten()
            .collect();
        idle.sort_by_key(|(used, _, _)| *used);
        for (_, bucket, f) in idle {
            if shared.live_writers.load(Ordering::Relaxed) < max {
                return;
            }
            if let Ok(mut guard) = f.try_lock() {
                guard.producers.remove(&bucket);
            }
        }
        if shared.live_writers.load(Ordering::Relaxed) >= max {
            shared.evict_writers(max.saturating_sub(1), Duration::MAX);
        }
    }
}

/// A new transactional producer for `bucket` of the registers partition `p`, initialised before
/// `cutoff`: its `init_transactions` fences that bucket's producer in every other process and
/// settles that producer's open transaction (aborted, or completed if its commit was already
/// asked for).
/// Counted in the store's live producers and take-overs (`WriterStats`).
async fn take_fence(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    bucket: u32,
    cutoff: Instant,
) -> Result<Held, Attempt> {
    let config = &shared.config;
    let id = format!("photon.{topic}.{p}.{bucket}");
    let mut settings = config.transactional_producer_config(&id);
    // A register of the largest value fits, and so does an event's record when
    // `max_event_size` makes that the larger of the two.
    let max = config
        .register_record_bytes()
        .max(config.max_record_bytes());
    settings
        .set("message.max.bytes", max.to_string())
        .set("batch.size", max.to_string());
    let producer: FutureProducer = settings
        .create()
        .map_err(|e| Attempt::Stop(error::from_kafka("creating a producer", e)))?;
    shared.live_writers.fetch_add(1, Ordering::Relaxed);
    let held = Held {
        producer: Arc::new(producer),
        live: shared.live_writers.clone(),
        last_used: Instant::now(),
    };
    let timeout = shared.config.timeout.min(remaining(cutoff));
    let pr = held.producer.clone();
    match blocking(move || pr.init_transactions(timeout)).await {
        Ok(Ok(())) => {
            shared.take_overs.fetch_add(1, Ordering::Relaxed);
            Ok(held)
        }
        Ok(Err(e)) => Err(failed(
            format!("becoming the register writer of {topic}/{p} (bucket {bucket})"),
            e,
        )),
        Err(e) => Err(Attempt::Again(e)),
    }
}

/// A read's failure during a save: one that may pass (a slow broker, a moved leader) is another
/// attempt within the deadline; the rest (a refused topic, a record that is not a register)
/// end the save.
fn retry_or_stop(e: Error) -> Attempt {
    if e.is_retryable() {
        Attempt::Again(e)
    } else {
        Attempt::Stop(e)
    }
}

/// What a [`catch_up`] read.
struct Caught {
    /// The offset and value of the last save of the register asked for read by this pass.
    value: Option<(i64, Bytes)>,
}

/// Reads `topic`/`p` from `fence.next_offset` to its stable end as the brokers report it now,
/// keeping each register's latest save (without its value; the value of `want`'s last save
/// read is kept for the caller) and giving up the fence of every bucket a save this store did
/// not write was read of. A record written with another partition count than `n`
/// refuses the topic; a record that is not a register save refuses the partition
/// ([`Fault::NotARegister`]); a stable end below what was read is a deleted and re-made topic
/// ([`Fault::RegistersReset`]: this store forgets the partition and refuses this once).
async fn catch_up(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    n: i32,
    fence: &mut Fence,
    want: Option<&str>,
) -> Result<Caught, Error> {
    let (start, end) = watermarks(shared, topic, p).await?;
    if end < fence.next_offset.max(fence.known_end) {
        let read_to = fence.next_offset.max(fence.known_end);
        *fence = Fence::default();
        let reset = Fault::RegistersReset {
            topic: topic.to_owned(),
            partition: p,
            stable_end: end,
            read_to,
        };
        return Err(error::fault(
            format!("reading registers {topic}/{p}"),
            reset,
        ));
    }
    // Compaction and a deleted log start leave gaps: the log start is where reading begins.
    fence.next_offset = fence.next_offset.max(start);
    let mut caught = Caught { value: None };
    if fence.next_offset >= end {
        return Ok(caught);
    }
    let (latest, producers) = (&mut fence.latest, &mut fence.producers);
    let next = scan(shared, topic, p, fence.next_offset, end, |msg| {
        let record = decode(topic, p, msg)?;
        if record.partitions != n {
            let evidence = format!(
                "register {:?} at {topic}/{p}@{} was written with {} partitions",
                record.name, record.saved.offset, record.partitions
            );
            return Err(shared.partitions_changed(topic, Some(record.partitions), n, evidence));
        }
        if want == Some(record.name) {
            caught.value = Some((record.saved.offset, Bytes::copy_from_slice(record.value)));
        }
        // A record at or below the offset known for its name is that save (this store's own,
        // read again) or an older one; a later one is a save this store did not write, so
        // another process holds its bucket's fence now.
        let new = match latest.get_mut(record.name) {
            Some(saved) if saved.offset >= record.saved.offset => false,
            Some(saved) => {
                *saved = record.saved;
                true
            }
            None => {
                latest.insert(record.name.to_owned(), record.saved);
                true
            }
        };
        if new {
            producers.remove(&bucket_of(record.name));
        }
        Ok(false)
    })
    .await;
    // What was read stays read, also when a later record failed.
    fence.next_offset = fence.next_offset.max(next.1);
    fence.known_end = fence.known_end.max(fence.next_offset);
    next.0?;
    Ok(caught)
}

/// Reads `topic`/`p`, read_committed, from `from` up to `end`, handing each record to `each`
/// until it answers true (stop) or fails. Answers how it ended and the offset after the last
/// record handed over (or the consumer's position where it passed markers and gaps).
async fn scan(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    from: i64,
    end: i64,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> Result<bool, Error>,
) -> (Result<(), Error>, i64) {
    let mut next = from;
    let consumer = match pooled_reader(shared) {
        Ok(c) => c,
        Err(e) => return (Err(e), next),
    };
    if let Err(e) = assign(&consumer, topic, p, from) {
        return (Err(e), next);
    }
    while next < end {
        let at = next;
        let got = next_message(shared, &consumer, || {
            format!("reading registers {topic}/{p} from offset {at} to {end}")
        })
        .await;
        match got {
            Err(e) => return (Err(e), next),
            Ok(Ok(msg)) => {
                if msg.topic() != topic || msg.partition() != p || msg.offset() < at {
                    continue;
                }
                if msg.offset() >= end {
                    next = msg.offset();
                    break;
                }
                let stop = each(&msg);
                match stop {
                    Ok(stop) => {
                        next = msg.offset() + 1;
                        if stop {
                            break;
                        }
                    }
                    Err(e) => return (Err(e), next),
                }
            }
            Ok(Err(KafkaError::PartitionEOF(_))) => {
                // Transaction markers and compacted records take offsets too: the consumer's
                // position says when the end is reached.
                if let Some(pos) = position_of(&consumer, topic, p) {
                    next = next.max(pos.min(end));
                }
            }
            Ok(Err(e)) => {
                if let Err(e) = pass_or_fail(e, topic, p) {
                    return (Err(e), next);
                }
            }
        }
    }
    (Ok(()), next)
}

/// The save of `name` whose record is at `offset`, read with a seek: the record there, or,
/// should the cleaner have removed it since (a later save of `name` replaced it), the next
/// record of `name` after it, a later save.
async fn value_at(
    shared: &Arc<Shared>,
    topic: &str,
    p: i32,
    name: &str,
    offset: i64,
) -> Result<Register, Error> {
    let (_, end) = watermarks(shared, topic, p).await?;
    let mut found = None;
    let (read, _) = scan(shared, topic, p, offset, end, |msg| {
        if msg.key() != Some(name.as_bytes()) {
            return Ok(false);
        }
        let record = decode(topic, p, msg)?;
        found = Some(record.saved.with(Bytes::copy_from_slice(record.value)));
        Ok(true)
    })
    .await;
    read?;
    found.ok_or_else(|| {
        let reset = Fault::RegistersReset {
            topic: topic.to_owned(),
            partition: p,
            stable_end: end,
            read_to: offset + 1,
        };
        error::fault(
            format!("loading register {name:?} from {topic}/{p}@{offset}"),
            reset,
        )
    })
}

/// Checks the partition count the first record of `topic`/`p` was written with (see
/// [`Registers::first_look`]).
async fn first_count(shared: &Arc<Shared>, topic: &str, p: i32, n: i32) -> Result<(), Error> {
    let (start, end) = watermarks(shared, topic, p).await?;
    if start >= end {
        return Ok(());
    }
    let mut written_with = None;
    let (read, _) = scan(shared, topic, p, start, end, |msg| {
        let record = decode(topic, p, msg)?;
        written_with = Some((
            record.partitions,
            record.name.to_owned(),
            record.saved.offset,
        ));
        Ok(true)
    })
    .await;
    read?;
    match written_with {
        Some((was, name, at)) if was != n => {
            let evidence =
                format!("register {name:?} at {topic}/{p}@{at} was written with {was} partitions");
            Err(shared.partitions_changed(topic, Some(was), n, evidence))
        }
        _ => Ok(()),
    }
}

/// The log end of `topic`/`p` with the records of open transactions (the high watermark as a
/// read_uncommitted client sees it): every save committed before now is below it.
async fn log_end(
    shared: &Shared,
    registers: &Registers,
    topic: &str,
    p: i32,
) -> Result<i64, Error> {
    let client = match registers.uncommitted.get() {
        Some(client) => client.clone(),
        None => {
            let mut settings = shared.config.consumer_config();
            settings.set("isolation.level", "read_uncommitted");
            let made: BaseConsumer = settings
                .create()
                .map_err(|e| error::from_kafka("creating a read_uncommitted client", e))?;
            registers.uncommitted.get_or_init(|| Arc::new(made)).clone()
        }
    };
    let (t, timeout) = (topic.to_owned(), shared.config.timeout);
    match blocking(move || client.fetch_watermarks(&t, p, timeout)).await? {
        Ok((_, high)) => Ok(high),
        Err(e) => Err(error::from_kafka(
            format!("fetching the log end of {topic}/{p}"),
            e,
        )),
    }
}

/// Waits until the stable end of `topic`/`p` reached `end` (every transaction open below it
/// ended), before `cutoff` and at most a request timeout.
async fn wait_stable(
    shared: &Shared,
    topic: &str,
    p: i32,
    end: i64,
    cutoff: Instant,
) -> Result<(), Error> {
    let until = cutoff.min(Instant::now() + shared.config.timeout);
    let mut pause = Duration::from_millis(1);
    loop {
        let stable = stable_end(shared, topic, p).await?;
        if stable >= end {
            return Ok(());
        }
        if Instant::now() + pause >= until {
            return Err(error::unavailable(format!(
                "{topic}/{p}: transactions open below offset {end} did not end in time (the last stable offset is {stable}); nothing was saved, re-send with the same save id"
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(VISIBLE_POLL_MAX);
    }
}

/// Waits until the stable end of `topic`/`p` passed `offset` (the save's commit markers were
/// written), before `cutoff` and at most a request timeout.
async fn wait_readable(
    shared: &Shared,
    topic: &str,
    p: i32,
    offset: i64,
    cutoff: Instant,
) -> Result<(), Error> {
    let until = cutoff.min(Instant::now() + shared.config.timeout);
    let mut pause = Duration::from_millis(1);
    loop {
        let end = stable_end(shared, topic, p).await?;
        if end > offset {
            return Ok(());
        }
        if Instant::now() + pause >= until {
            return Err(error::unavailable(format!(
                "{topic}/{p}: the save was committed, but offset {offset} was not readable in time (the last stable offset is {end}); re-send it with the same save id"
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(VISIBLE_POLL_MAX);
    }
}

/// Creation is asynchronous on the brokers: waits until the metadata shows the partitions.
async fn wait_for_partitions(
    shared: &Shared,
    topic: &str,
    cutoff: Instant,
) -> Result<(i32, i32), Error> {
    loop {
        if let Some(found) = shared.fetch_partition_count(topic).await? {
            return Ok(found);
        }
        if Instant::now() + TOPIC_POLL >= cutoff {
            return Err(error::unavailable(format!(
                "topic {topic} was created but its partitions did not appear in time"
            )));
        }
        tokio::time::sleep(TOPIC_POLL).await;
    }
}

/// A register record's value (see [`FRAME`]).
fn encode(partitions: i32, revision: u64, save_id: Uuid, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME + value.len());
    out.push(FORMAT);
    out.extend_from_slice(&(partitions as u32).to_be_bytes());
    out.extend_from_slice(&revision.to_be_bytes());
    out.extend_from_slice(save_id.as_bytes());
    out.extend_from_slice(value);
    out
}

/// A register save as its record says it.
struct Record<'m> {
    /// The partition count it was written with.
    partitions: i32,
    name: &'m str,
    saved: Saved,
    value: &'m [u8],
}

impl Saved {
    fn with(self, value: Bytes) -> Register {
        Register {
            revision: self.revision,
            save_id: self.save_id,
            value,
        }
    }
}

/// The register save in `msg`, or [`Fault::NotARegister`] naming the partition and offset: a
/// record without a name, a tombstone (compaction would delete the register), a future format
/// or a record of another tool is refused, never passed by (it may be a register's latest
/// save, and passing it by would answer an older one).
fn decode<'m>(topic: &str, p: i32, msg: &'m BorrowedMessage<'_>) -> Result<Record<'m>, Error> {
    let offset = msg.offset();
    let refuse = |reason: String| {
        let fault = Fault::NotARegister {
            topic: topic.to_owned(),
            partition: p,
            offset,
            reason,
        };
        error::fault(format!("reading registers {topic}/{p}"), fault)
    };
    let name = match msg.key().map(std::str::from_utf8) {
        None => return Err(refuse("it has no key (a register's name)".into())),
        Some(Err(_)) => return Err(refuse("its key is not UTF-8".into())),
        Some(Ok(name)) => name,
    };
    let Some(payload) = msg.payload() else {
        return Err(refuse(format!(
            "register {name:?} has a null value (a tombstone; photon-kafka never writes one)"
        )));
    };
    let (partitions, revision, save_id, value) =
        decode_value(payload).map_err(|why| refuse(format!("register {name:?}: {why}")))?;
    Ok(Record {
        partitions,
        name,
        saved: Saved {
            revision,
            save_id,
            offset,
        },
        value,
    })
}

fn decode_value(bytes: &[u8]) -> Result<(i32, u64, Uuid, &[u8]), String> {
    match bytes.first() {
        Some(&FORMAT) => {}
        Some(other) => {
            return Err(format!(
                "format byte {other}, where this version reads format {FORMAT} (written by a newer version, or by another tool)"
            ))
        }
        None => return Err("an empty value".into()),
    }
    if bytes.len() < FRAME {
        return Err(format!(
            "{} bytes, shorter than the {FRAME}-byte frame",
            bytes.len()
        ));
    }
    let partitions = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as i32;
    let revision = u64::from_be_bytes(bytes[5..13].try_into().expect("8 bytes"));
    let save_id = Uuid::from_slice(&bytes[13..29]).expect("16 bytes");
    Ok((partitions, revision, save_id, &bytes[FRAME..]))
}

/// A librdkafka failure of a save's step: a refused permission or record is final, anything
/// else (fenced, timed out, a coordinator that moved) is tried again after a fresh read.
fn failed(context: String, e: KafkaError) -> Attempt {
    let last = error::is_final_send(&e);
    let error = error::from_kafka(context, e);
    if last {
        Attempt::Stop(error)
    } else {
        Attempt::Again(error)
    }
}

/// The answer to a save an attempt ended with `e` for good. After an earlier attempt whose
/// outcome is unknown a definite error would be wrong (that attempt may have committed); a
/// conflict is still definite, since it was decided by reading what was committed.
fn final_answer(e: Error, earlier: Option<&Error>) -> Error {
    match earlier {
        Some(earlier) if !e.is_retryable() && !matches!(e, Error::RevisionConflict { .. }) => {
            Error::unavailable(
                BACKEND,
                format!(
                    "an earlier attempt's outcome is unknown ({earlier}), and the next one failed; re-send with the same save id"
                ),
                e,
            )
        }
        _ => e,
    }
}

/// The answer to a save whose deadline passed while it was tried again.
fn late(name: &str, why: &Error) -> Error {
    Error::unavailable(
        BACKEND,
        format!(
            "the save of register {name:?} did not commit before its deadline; its outcome is unknown, re-send it with the same save id"
        ),
        error::duplicate(why),
    )
}

/// The deadline of a register call's work: three request timeouts from the call, as an append's,
/// less a margin for the answer.
fn cutoff(shared: &Shared) -> Instant {
    let timeout = shared.config.timeout;
    Instant::now() + timeout * 3 - ANSWER_MARGIN.min(timeout / 10)
}

fn remaining(cutoff: Instant) -> Duration {
    cutoff.saturating_duration_since(Instant::now())
}

/// `step`, given up at `cutoff`: then `Unavailable`, saying what did not finish.
async fn by<T>(
    cutoff: Instant,
    what: impl FnOnce() -> String,
    step: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout_at(tokio::time::Instant::from_std(cutoff), step).await {
        Ok(r) => r,
        Err(_) => Err(error::unavailable(format!(
            "{} did not finish before its deadline; a save's outcome is unknown, re-send it with the same save id",
            what()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_fixed() {
        // Part of the protocol: processes that disagree on a name's bucket would not fence each
        // other. tests/registers.rs relies on "a" and "b" being in different buckets.
        assert_eq!(bucket_of("a"), 4);
        assert_eq!(bucket_of("b"), 5);
        assert_eq!(bucket_of(""), 0x811c_9dc5 % BUCKETS);
        let mut seen = [0; BUCKETS as usize];
        for i in 0..8000 {
            seen[bucket_of(&format!("view/{i}")) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn a_register_record_round_trips_and_is_never_empty() {
        let id = Uuid::new_v4();
        for value in [&b""[..], b"checkpoint", &[0u8, 255, 7][..]] {
            let bytes = encode(6, 41, id, value);
            assert_eq!(bytes.len(), FRAME + value.len());
            assert_eq!(decode_value(&bytes), Ok((6, 41, id, value)));
        }
        // Records of other tools and future formats are refused, saying why.
        let why = decode_value(b"{\"json\": 1}").unwrap_err();
        assert!(why.contains("format byte 123"), "{why}");
        let mut future = encode(6, 41, id, b"x");
        future[0] = FORMAT + 1;
        assert!(decode_value(&future).unwrap_err().contains("format byte 2"));
        let short = decode_value(&[FORMAT; FRAME - 1]).unwrap_err();
        assert!(short.contains("shorter"), "{short}");
        assert!(decode_value(b"").is_err());
    }
}
