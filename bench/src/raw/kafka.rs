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
//! Every run writes to fresh topics (`bench-raw-<id>-…`, 6 partitions, replication factor 1)
//! and deletes them at the end. Creating topics and producers (`init_transactions`) happens
//! before the clock starts. (Credentials and TLS options of the URL are not carried over.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::Raw;
use crate::domain::{self, Balances};
use crate::measure::{run_writers, Cap, Latencies, Measurement, Role};
use crate::photon::append_case;
use crate::{progress, BoxError, Sizes};

/// Partitions of the raw topics: photon-kafka's default.
const PARTITIONS: i32 = 6;

/// Bound on every request, photon-kafka's default `timeout_ms`.
const TIMEOUT: Duration = Duration::from_secs(10);

/// photon-kafka's largest record (1 MiB event plus 64 KiB for key and headers), which it
/// hands librdkafka as `message.max.bytes` and `fetch.message.max.bytes`.
const MAX_RECORD_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// The `host:port[,host:port...]` of a `kafka://` URL: no scheme, no options. (Credentials
/// and TLS options are not carried over; the raw rows speak plaintext.)
fn bootstrap_servers(url: &str) -> &str {
    let rest = url.strip_prefix("kafka://").unwrap_or(url);
    let authority = rest.split_once('?').map_or(rest, |(a, _)| a);
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hosts.trim_end_matches('/')
}

/// Settings every client shares, as photon-kafka sets them.
fn base(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    let ms = TIMEOUT.as_millis().to_string();
    c.set("bootstrap.servers", bootstrap)
        .set("socket.timeout.ms", &ms)
        .set("socket.connection.setup.timeout.ms", &ms)
        .set("log_level", "3");
    c
}

/// photon-kafka's producer settings; transactional when `transactional_id` is given,
/// otherwise only idempotent (acks=all either way).
fn producer(bootstrap: &str, transactional_id: Option<&str>) -> Result<FutureProducer, BoxError> {
    let mut c = base(bootstrap);
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
        .set("batch.size", MAX_RECORD_BYTES.min(1_000_000).to_string())
        .set("message.timeout.ms", (TIMEOUT.as_millis() * 3).to_string());
    if let Some(id) = transactional_id {
        c.set("transactional.id", id).set(
            "transaction.timeout.ms",
            (TIMEOUT.as_millis() * 6).to_string(),
        );
    }
    Ok(c.create()?)
}

/// photon-kafka's reader settings: read_committed, no group offsets, end-of-partition
/// notices, bounded prefetch.
fn consumer_config(bootstrap: &str) -> ClientConfig {
    let mut c = base(bootstrap);
    c.set("group.id", "photon-bench-raw")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.message.max.bytes", MAX_RECORD_BYTES.to_string())
        .set("queued.max.messages.kbytes", "8192")
        .set("queued.min.messages", "1000")
        .set("fetch.queue.backoff.ms", "10");
    c
}

/// Microseconds since the Unix epoch.
fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The eight text headers photon-kafka puts on a record of a bench event (names and value
/// shapes alike, so records are the same size).
fn headers(version: u64, batch_first: u64, batch_len: u64, now: i64) -> OwnedHeaders {
    let (id, now) = (uuid::Uuid::new_v4().to_string(), now.to_string());
    let (version, batch) = (version.to_string(), format!("{batch_first}+{batch_len}"));
    [
        ("photon.event_id", id.as_str()),
        ("photon.version", version.as_str()),
        ("photon.event_type", "BenchEvent"),
        ("photon.schema_version", "1"),
        ("photon.content_type", "application/msgpack"),
        ("photon.occurred_at", now.as_str()),
        ("photon.recorded_at", now.as_str()),
        ("photon.batch", batch.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(8), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    })
}

/// Creates `topics` and waits until their partitions show in the metadata.
async fn create_topics(
    admin: &AdminClient<DefaultClientContext>,
    bootstrap: &str,
    topics: &[String],
) -> Result<(), BoxError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT));
    for r in admin.create_topics(&new, &options).await? {
        r.map_err(|(t, code)| format!("creating topic {t}: {code}"))?;
    }
    let meta: Arc<BaseConsumer> = Arc::new(consumer_config(bootstrap).create()?);
    let deadline = Instant::now() + TIMEOUT;
    for t in topics {
        loop {
            let (m, name) = (meta.clone(), t.clone());
            let md = tokio::task::spawn_blocking(move || m.fetch_metadata(Some(&name), TIMEOUT))
                .await??;
            let ready = md.topics().iter().any(|mt| {
                mt.name() == t
                    && mt.error().is_none()
                    && mt.partitions().len() == PARTITIONS as usize
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

/// A stream's partition: streams are spread over the partitions in turn.
fn partition_of(stream: u64) -> i32 {
    (stream % PARTITIONS as u64) as i32
}

/// Sends one append's records to `partition` and waits for every delivery.
async fn send_batch(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &str,
    first_version: u64,
    payloads: &[Bytes],
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
        producer.send(record, Timeout::After(TIMEOUT))
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

/// The raw client: an admin client and the topics it made.
pub struct RawKafka {
    bootstrap: String,
    admin: AdminClient<DefaultClientContext>,
    id: String,
    topics: Mutex<Vec<String>>,
}

impl std::fmt::Debug for RawKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawKafka")
            .field("bootstrap", &self.bootstrap)
            .field("id", &self.id)
            .finish()
    }
}

impl RawKafka {
    /// Connects the admin client.
    ///
    /// # Errors
    /// - librdkafka's error for bad settings.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let bootstrap = bootstrap_servers(url).to_owned();
        Ok(Self {
            admin: base(&bootstrap).create()?,
            bootstrap,
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            topics: Mutex::new(Vec::new()),
        })
    }

    /// A fresh topic named after `row`, created and visible.
    async fn topic(&self, row: &str) -> Result<String, BoxError> {
        let name = format!("bench-raw-{}-{row}", self.id);
        create_topics(&self.admin, &self.bootstrap, std::slice::from_ref(&name)).await?;
        self.topics.lock().expect("not poisoned").push(name.clone());
        Ok(name)
    }

    /// A transactional producer, initialised (fencing any earlier one of the same id).
    async fn transactional(&self, id: &str) -> Result<Arc<FutureProducer>, BoxError> {
        let p = Arc::new(producer(
            &self.bootstrap,
            Some(&format!("bench-raw-{}-{id}", self.id)),
        )?);
        blocking(&p, |p| p.init_transactions(TIMEOUT)).await?;
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
        let shared = Arc::new(producer(&self.bootstrap, None)?);
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
                        send_batch(&producer, &topic, partition_of(s), &key, version, payloads)
                            .await?;
                        if transactional {
                            blocking(&producer, |p| p.commit_transaction(TIMEOUT)).await?;
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
        let producer = producer(&self.bootstrap, None)?;
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
                        topic,
                        partition_of(s),
                        &key,
                        first / 1_000_000 * 1_000,
                        payloads,
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
        let consumer: StreamConsumer = consumer_config(&self.bootstrap).create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            // Offset 0 as photon uses the log start (0 on a fresh topic): no Beginning lookup.
            tpl.add_partition_offset(&topic, p, Offset::Offset(0))?;
        }
        consumer.assign(&tpl)?;
        let mut at_end = [false; PARTITIONS as usize];
        let mut view = Balances::default();
        while !at_end.iter().all(|e| *e) {
            let got = tokio::time::timeout(TIMEOUT, consumer.recv())
                .await
                .map_err(|_| format!("replay of {topic}: nothing within {TIMEOUT:?}"))?;
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
        let consumer: StreamConsumer = consumer_config(&self.bootstrap)
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
                &topic,
                0,
                "raw-live",
                i as u64,
                std::slice::from_ref(payload),
            )
            .await?;
            blocking(&producer, |p| p.commit_transaction(TIMEOUT)).await?;
            let msg = tokio::time::timeout(TIMEOUT, consumer.recv())
                .await
                .map_err(|_| format!("live on {topic}: nothing within {TIMEOUT:?}"))??;
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
        let options = AdminOptions::new().request_timeout(Some(TIMEOUT));
        for r in self.admin.delete_topics(&names, &options).await? {
            r.map_err(|(t, code)| format!("deleting topic {t}: {code}"))?;
        }
        Ok(())
    }
}
