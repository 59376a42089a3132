//! Plain rdkafka doing photon-kafka's I/O shape with the settings its guarantees rest on.
//!
//! photon-kafka makes each append one transaction of a transactional producer (acks=all,
//! idempotence, linger.ms=0) whose records carry the stream as key, an explicit partition and
//! eight text headers, and it returns once the commit is done and the partition's
//! read_committed high watermark has passed the last record. The baseline does the same minus
//! everything photon adds (no version index, no expected-version check, no wait for the
//! watermark): a transaction per append, one transactional producer per writer. A reference
//! row produces idempotently (acks=all) without transactions. The replay set is written by an
//! idempotent producer (photon's is written in transactions, so its topic also holds one
//! commit marker per append of 1,000, which its consumer skips); the replay is one
//! read_committed consumer assigned every partition from offset 0, read to the end, decoding
//! every payload into the same view. Live latency is a transaction of one record until a
//! read_committed consumer receives it.
//!
//! Both commit with [`commit_delivered`], which waits until the delivered records are released
//! before committing: rust-rdkafka's commit otherwise stalls 100 ms now and then, for either.
//!
//! Every client setting (producer, consumer, timeouts, record limits, and the URL's
//! credentials and TLS) comes from photon-kafka's own [`KafkaConfig`] for the same URL, so the
//! baseline cannot drift from the backend it is compared with; so do the header names and the
//! partition count. Every run writes to fresh topics (`bench-raw-<id>-…`, with a replication
//! factor of one) and deletes them at the end. Creating topics and producers
//! (`init_transactions`) happens before the clock starts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use photon_kafka::{commit_delivered, header, KafkaConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::Raw;
use crate::domain::{self, Balances};
use crate::measure::{run_writers, Cap, Latencies, Measurement, Role};
use crate::photon::append_case;
use crate::{progress, BoxError, Sizes};

/// Microseconds since the Unix epoch.
fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The eight text headers photon-kafka puts on a record of a bench event (its names, and value
/// shapes alike, so records are the same size).
fn headers(version: u64, batch_first: u64, batch_len: u64, now: i64) -> OwnedHeaders {
    let (id, now) = (uuid::Uuid::new_v4().to_string(), now.to_string());
    let (version, batch) = (version.to_string(), format!("{batch_first}+{batch_len}"));
    [
        (header::EVENT_ID, id.as_str()),
        (header::VERSION, version.as_str()),
        (header::EVENT_TYPE, "BenchEvent"),
        (header::SCHEMA_VERSION, "1"),
        (header::CONTENT_TYPE, "application/msgpack"),
        (header::OCCURRED_AT, now.as_str()),
        (header::RECORDED_AT, now.as_str()),
        (header::BATCH, batch.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(8), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    })
}

/// Creates `topics` with photon-kafka's partition count and waits until their partitions show
/// in the metadata.
async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaConfig,
    topics: &[String],
) -> Result<(), BoxError> {
    let (partitions, timeout) = (config.partitions, config.timeout);
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    for r in admin.create_topics(&new, &options).await? {
        r.map_err(|(t, code)| format!("creating topic {t}: {code}"))?;
    }
    let meta: Arc<BaseConsumer> = Arc::new(config.consumer_config().create()?);
    let deadline = Instant::now() + timeout;
    for t in topics {
        loop {
            let (m, name) = (meta.clone(), t.clone());
            let md = tokio::task::spawn_blocking(move || m.fetch_metadata(Some(&name), timeout))
                .await??;
            let ready = md.topics().iter().any(|mt| {
                mt.name() == t
                    && mt.error().is_none()
                    && mt.partitions().len() == partitions as usize
            });
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("topic {t} was created but did not appear").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Categories of the 40-partition row, and the partitions of each: their topics total 40.
pub const SPREAD_CATEGORIES: usize = 5;

/// Partitions of each topic of the 40-partition row.
pub const SPREAD_PARTITIONS: i32 = 8;

/// The case label of the 40-partition row, shared by photon's row and its baseline.
pub fn spread_case() -> String {
    format!(
        "batch 1, 1 writer, {} partitions ({SPREAD_CATEGORIES} categories of {SPREAD_PARTITIONS})",
        SPREAD_CATEGORIES as i32 * SPREAD_PARTITIONS
    )
}

/// The 40-partition row on photon (issue 14 item 5): a store for `url` whose topics get
/// [`SPREAD_PARTITIONS`] partitions, and one stream in each partition of
/// [`SPREAD_CATEGORIES`] fresh categories, which one writer appends to in turn; the store
/// itself too, for its [`photon_kafka::WriterStats`] (take-overs while cycling would mean
/// producers were closed and re-initialised).
///
/// # Errors
/// - photon-kafka's error for a URL it refuses.
pub fn spread_target(
    url: &str,
) -> Result<
    (
        crate::photon::Target,
        Vec<newton::StreamId>,
        photon_kafka::KafkaStore,
    ),
    BoxError,
> {
    let mut config = KafkaConfig::from_url(url)?;
    config.partitions = SPREAD_PARTITIONS;
    let store = photon_kafka::KafkaStore::connect(config)?;
    let mut streams = Vec::new();
    for _ in 0..SPREAD_CATEGORIES {
        let category = crate::photon::fresh_category("spread");
        let mut found: Vec<Option<newton::StreamId>> = vec![None; SPREAD_PARTITIONS as usize];
        let mut i = 0u64;
        while found.iter().any(Option::is_none) {
            let s = newton::StreamId::new(&category, format!("s{i}"))?;
            let p = photon_kafka::partition_for(&s, SPREAD_PARTITIONS) as usize;
            found[p].get_or_insert(s);
            i += 1;
        }
        streams.extend(found.into_iter().flatten());
    }
    let target = crate::photon::Target {
        backend: "kafka".into(),
        url: url.to_owned(),
        store: Arc::new(store.clone()),
    };
    Ok((target, streams, store))
}

/// A stream's partition: streams are spread over the `partitions` in turn.
fn partition_of(stream: u64, partitions: i32) -> i32 {
    (stream % partitions as u64) as i32
}

/// Sends one append's records to `partition` and waits for every delivery (a full send queue
/// is waited out for up to `timeout`).
async fn send_batch(
    producer: &FutureProducer,
    (topic, partition): (&str, i32),
    key: &str,
    first_version: u64,
    payloads: &[Bytes],
    timeout: Duration,
) -> Result<(), BoxError> {
    let now = now_micros();
    let n = payloads.len() as u64;
    let sends = payloads.iter().enumerate().map(|(k, p)| {
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(&p[..])
            .timestamp(now / 1000)
            .headers(headers(first_version + k as u64, first_version, n, now));
        producer.send(record, Timeout::After(timeout))
    });
    for delivery in join_all(sends).await {
        delivery.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Runs a blocking librdkafka transaction call off the async threads.
async fn blocking<T: Send + 'static>(
    p: &Arc<FutureProducer>,
    f: impl FnOnce(&FutureProducer) -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, BoxError> {
    let p = p.clone();
    Ok(tokio::task::spawn_blocking(move || f(&p)).await??)
}

/// The raw client: photon-kafka's settings for the URL, an admin client and the topics it made.
pub struct RawKafka {
    config: KafkaConfig,
    admin: AdminClient<DefaultClientContext>,
    id: String,
    topics: Mutex<Vec<String>>,
}

impl std::fmt::Debug for RawKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawKafka")
            .field("config", &self.config)
            .field("id", &self.id)
            .finish()
    }
}

impl RawKafka {
    /// Reads the URL as photon-kafka does and connects the admin client.
    ///
    /// # Errors
    /// - photon-kafka's `InvalidInput` for a URL it refuses; librdkafka's error for bad settings.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let config = KafkaConfig::from_url(url)?;
        Ok(Self {
            admin: config.client_config().create()?,
            config,
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            topics: Mutex::new(Vec::new()),
        })
    }

    /// A fresh topic named after `row`, created and visible.
    async fn topic(&self, row: &str) -> Result<String, BoxError> {
        let name = format!("bench-raw-{}-{row}", self.id);
        create_topics(&self.admin, &self.config, std::slice::from_ref(&name)).await?;
        self.topics.lock().expect("not poisoned").push(name.clone());
        Ok(name)
    }

    /// The baseline of the 40-partition row: one transactional producer appending one record
    /// per transaction to each partition of [`SPREAD_CATEGORIES`] topics of
    /// [`SPREAD_PARTITIONS`] in turn, after one unmeasured transaction per partition (as
    /// photon's row is measured after its take-overs).
    ///
    /// # Errors
    /// - librdkafka's error for a topic, producer or transaction that fails.
    pub async fn spread(&self, sizes: &Sizes) -> Result<Measurement, BoxError> {
        let mut config = self.config.clone();
        config.partitions = SPREAD_PARTITIONS;
        let names: Vec<String> = (0..SPREAD_CATEGORIES)
            .map(|c| format!("bench-raw-{}-spread{c}", self.id))
            .collect();
        create_topics(&self.admin, &config, &names).await?;
        self.topics
            .lock()
            .expect("not poisoned")
            .extend(names.iter().cloned());
        let producer = self.transactional("spread").await?;
        let timeout = self.config.timeout;
        let targets: Vec<(&str, i32)> = names
            .iter()
            .flat_map(|t| (0..SPREAD_PARTITIONS).map(move |p| (t.as_str(), p)))
            .collect();
        let payloads = domain::payloads(sizes.append_events as usize + targets.len());
        let (warm, measured) = payloads.split_at(targets.len());
        let mut versions = vec![0u64; targets.len()];
        let mut append = |k: usize, payload: &Bytes| {
            let (producer, to, version) = (producer.clone(), targets[k], versions[k]);
            versions[k] += 1;
            let key = format!("raw-spread-{k}");
            let payload = std::slice::from_ref(payload).to_vec();
            async move {
                producer.begin_transaction()?;
                send_batch(&producer, to, &key, version, &payload, timeout).await?;
                blocking(&producer, move |p| commit_delivered(p, timeout)).await?;
                Ok::<_, BoxError>(())
            }
        };
        for (k, payload) in warm.iter().enumerate() {
            append(k, payload).await?;
        }
        let cap = Cap::new(sizes.cap);
        let mut latencies = Latencies::default();
        let mut written = 0u64;
        let started = Instant::now();
        for (i, payload) in measured.iter().enumerate() {
            if cap.reached() {
                break;
            }
            let t0 = Instant::now();
            append(i % targets.len(), payload).await?;
            latencies.record(t0.elapsed());
            written += 1;
        }
        Ok(Measurement::throughput(
            "kafka",
            "append",
            spread_case(),
            "raw rdkafka (a transaction per append)",
            Role::Baseline,
            written,
            started.elapsed(),
        )
        .with_latency(&latencies)
        .capped(written < sizes.append_events)
        .note(format!(
            "one transactional producer over {} partitions in turn; after one unmeasured transaction on each",
            targets.len()
        )))
    }

    /// A transactional producer, initialised (fencing any earlier one of the same id).
    async fn transactional(&self, id: &str) -> Result<Arc<FutureProducer>, BoxError> {
        let id = format!("bench-raw-{}-{id}", self.id);
        let p = Arc::new(self.config.transactional_producer_config(&id).create()?);
        let timeout = self.config.timeout;
        blocking(&p, move |p| p.init_transactions(timeout)).await?;
        Ok(p)
    }

    /// One append case with `writers` writers, each on 100 streams of its own in turn: with a
    /// transaction per append (each writer its own transactional producer) or idempotent
    /// produce (one shared producer).
    async fn append_rows(
        &self,
        sizes: &Sizes,
        batch: u64,
        writers: u64,
        transactional: bool,
    ) -> Result<Measurement, BoxError> {
        let kind = if transactional { "tx" } else { "idem" };
        let topic = self.topic(&format!("{kind}{batch}x{writers}")).await?;
        let shared: Arc<FutureProducer> = Arc::new(self.config.producer_config().create()?);
        let mut producers = Vec::new();
        for w in 0..writers {
            producers.push(if transactional {
                self.transactional(&format!("{batch}x{writers}-{w}"))
                    .await?
            } else {
                shared.clone()
            });
        }
        let per_writer = (sizes.append_events / writers).max(1);
        let cap = Cap::new(sizes.cap);
        let (partitions, timeout) = (self.config.partitions, self.config.timeout);
        let tasks = producers
            .into_iter()
            .enumerate()
            .map(|(w, producer)| {
                let topic = topic.clone();
                let plan: Vec<Vec<Bytes>> = (0..per_writer.div_ceil(batch))
                    .map(|i| domain::payloads(batch.min(per_writer - i * batch) as usize))
                    .collect();
                async move {
                    let mut latencies = Latencies::default();
                    let mut written = 0u64;
                    for (i, payloads) in plan.iter().enumerate() {
                        if cap.reached() {
                            break;
                        }
                        let s = (w as u64) * 100 + (i as u64 % 100);
                        let version = (i as u64 / 100) * batch;
                        let t0 = Instant::now();
                        if transactional {
                            producer.begin_transaction()?;
                        }
                        let key = format!("raw-{s}");
                        let to = (topic.as_str(), partition_of(s, partitions));
                        send_batch(&producer, to, &key, version, payloads, timeout).await?;
                        if transactional {
                            blocking(&producer, move |p| commit_delivered(p, timeout)).await?;
                        }
                        latencies.record(t0.elapsed());
                        written += payloads.len() as u64;
                    }
                    Ok::<_, BoxError>((written, latencies))
                }
            })
            .collect::<Vec<_>>();
        // Every writer's appends are built above, before the clock starts, as photon's are.
        let (total, latencies, elapsed) = run_writers(tasks).await?;
        let (subject, role) = if transactional {
            ("raw rdkafka (a transaction per append)", Role::Baseline)
        } else {
            (
                "raw rdkafka (idempotent produce, acks=all)",
                Role::Reference,
            )
        };
        Ok(Measurement::throughput(
            "kafka",
            "append",
            append_case(batch, writers),
            subject,
            role,
            total,
            elapsed,
        )
        .with_latency(&latencies)
        .capped(total < per_writer * writers))
    }
}

#[async_trait]
impl Raw for RawKafka {
    async fn append(
        &self,
        sizes: &Sizes,
        batch: u64,
        writers: u64,
    ) -> Result<Vec<Measurement>, BoxError> {
        Ok(vec![
            self.append_rows(sizes, batch, writers, true).await?,
            self.append_rows(sizes, batch, writers, false).await?,
        ])
    }

    async fn load(&self, _sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        // Kafka has no read by key: a raw client would scan the partition, which photon's
        // version index exists to avoid. No raw row.
        Ok(vec![])
    }

    async fn replay(&self, events: u64, _sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        let topic = self.topic("replay").await?;
        let producer: FutureProducer = self.config.producer_config().create()?;
        let (partitions, timeout) = (self.config.partitions, self.config.timeout);
        let bar = progress::bar(events, "raw rdkafka: writing");
        let mut done = 0u64;
        while done < events {
            // Appends of 1,000 to 1,000 streams in turn, as photon's replay set; up to 10
            // appends in flight.
            let chunk: Vec<(u64, Vec<Bytes>)> = (0..10)
                .map(|k| done + k * 1_000)
                .take_while(|first| *first < events)
                .map(|first| {
                    (
                        first,
                        domain::payloads((events - first).min(1_000) as usize),
                    )
                })
                .collect();
            let sends = chunk.iter().map(|(first, payloads)| {
                let s = (first / 1_000) % 1_000;
                let key = format!("raw-{s}");
                let (topic, producer) = (&topic, &producer);
                async move {
                    send_batch(
                        producer,
                        (topic.as_str(), partition_of(s, partitions)),
                        &key,
                        first / 1_000_000 * 1_000,
                        payloads,
                        timeout,
                    )
                    .await
                }
            });
            for r in join_all(sends).await {
                r?;
            }
            let n: u64 = chunk.iter().map(|(_, p)| p.len() as u64).sum();
            done += n;
            bar.inc(n);
        }
        bar.finish_and_clear();

        let started = Instant::now();
        let consumer: StreamConsumer = self.config.consumer_config().create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            // Offset 0 as photon uses the log start (0 on a fresh topic): no Beginning lookup.
            tpl.add_partition_offset(&topic, p, Offset::Offset(0))?;
        }
        consumer.assign(&tpl)?;
        let mut at_end = vec![false; partitions as usize];
        let mut view = Balances::default();
        while !at_end.iter().all(|e| *e) {
            let got = tokio::time::timeout(timeout, consumer.recv())
                .await
                .map_err(|_| format!("replay of {topic}: nothing within {timeout:?}"))?;
            match got {
                Ok(msg) => {
                    if let Some(hs) = msg.headers() {
                        std::hint::black_box(hs.iter().count());
                    }
                    view.apply_bytes(msg.payload().unwrap_or_default())?;
                }
                Err(KafkaError::PartitionEOF(p)) => at_end[p as usize] = true,
                Err(e) => return Err(e.into()),
            }
        }
        if view.events() != events {
            return Err(format!(
                "raw replay of {topic}: {} events, {events} written",
                view.events()
            )
            .into());
        }
        Ok(vec![Measurement::throughput(
            "kafka",
            "replay",
            format!("{events} events"),
            "raw rdkafka (read_committed consumer)",
            Role::Baseline,
            view.events(),
            started.elapsed(),
        )])
    }

    async fn live(&self, sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        let topic = self.topic("live").await?;
        let producer = self.transactional("live").await?;
        let timeout = self.config.timeout;
        let consumer: StreamConsumer = self
            .config
            .consumer_config()
            .set("enable.partition.eof", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(0))?;
        consumer.assign(&tpl)?;
        // As photon's row, one unmeasured record first: the consumer's first fetch and the
        // producer's first transaction are not live latency.
        let payloads = domain::payloads(sizes.live_events as usize + 1);
        let cap = Cap::new(sizes.cap);
        let mut latencies = Latencies::default();
        let mut started = Instant::now();
        let mut n = 0;
        for (i, payload) in payloads.iter().enumerate() {
            if i == 1 {
                latencies = Latencies::default();
                started = Instant::now();
                n = 0;
            }
            if cap.reached() {
                break;
            }
            let t0 = Instant::now();
            producer.begin_transaction()?;
            send_batch(
                &producer,
                (topic.as_str(), 0),
                "raw-live",
                i as u64,
                std::slice::from_ref(payload),
                timeout,
            )
            .await?;
            blocking(&producer, move |p| commit_delivered(p, timeout)).await?;
            let msg = tokio::time::timeout(timeout, consumer.recv())
                .await
                .map_err(|_| format!("live on {topic}: nothing within {timeout:?}"))??;
            if msg.payload() != Some(&payload[..]) {
                return Err(
                    format!("live on {topic}: unexpected record at {}", msg.offset()).into(),
                );
            }
            latencies.record(t0.elapsed());
            n += 1;
        }
        Ok(vec![Measurement::throughput(
            "kafka",
            "live",
            "append -> HotCold delivery, one event at a time",
            "raw rdkafka (transaction, then read_committed consumer)",
            Role::Baseline,
            n,
            started.elapsed(),
        )
        .with_latency(&latencies)
        .latency_only()
        .capped(n < sizes.live_events)])
    }

    async fn clean_up(&self) -> Result<(), BoxError> {
        let topics = std::mem::take(&mut *self.topics.lock().expect("not poisoned"));
        if topics.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options = AdminOptions::new().request_timeout(Some(self.config.timeout));
        for r in self.admin.delete_topics(&names, &options).await? {
            r.map_err(|(t, code)| format!("deleting topic {t}: {code}"))?;
        }
        Ok(())
    }
}
