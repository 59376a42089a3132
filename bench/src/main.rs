//! Measures an event store's throughput and prints a table.
//!
//! The same scenarios run on every backend (the store comes from `--url`, as applications get
//! it), so backend figures are comparable with each other and with raw-driver baselines. Timing
//! lives here, never in unit tests.
//!
//! ```text
//! cargo run -p photon-bench --release -- --url memory:// --events 100000
//! cargo run -p photon-bench --release --features kafka -- --url 'kafka://127.0.0.1:9092?prefix=bench'
//! cargo run -p photon-bench --release --features cassandra -- --url 'cassandra://127.0.0.1:9042/bench_1?settle_ms=200'
//! ```
//!
//! For `mongodb://` (feature `mongo`), `kafka://` (feature `kafka`) and `cassandra://` (feature
//! `cassandra`) URLs the table also has rows from the plain driver doing the same I/O, so
//! photon's overhead reads as a ratio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use newton::store::{
    ContentType, EventData, EventStore, EventType, ExpectedVersion, Payload, ReadOptions, Selector,
    Start, SubscriptionItem, SubscriptionMode,
};
use newton::{Category, StreamId};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "Throughput of a Photon event store")]
struct Options {
    /// The store to measure (also read from PHOTON_URL).
    #[arg(long, env = "PHOTON_URL", default_value = "memory://")]
    url: String,
    /// Events per scenario.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Concurrent writers (each on its own client and streams).
    #[arg(long, default_value_t = 1)]
    writers: u64,
    /// Streams the events are spread over.
    #[arg(long, default_value_t = 100)]
    streams: u64,
}

struct Row {
    scenario: String,
    events: u64,
    elapsed: Duration,
}

fn event(payload: &[u8]) -> EventData {
    EventData::new(
        EventType::new("BenchEvent").expect("valid"),
        Payload::raw(
            ContentType::from_mime("application/octet-stream"),
            payload.to_vec(),
        ),
    )
}

/// Appends `events` in batches of `batch` from `writers` clients; returns the category used.
async fn append(
    o: &Options,
    store: &Arc<dyn EventStore>,
    batch: u64,
) -> Result<(Category, Row), Box<dyn std::error::Error + Send + Sync>> {
    let category = Category::new(format!(
        "bench{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))?;
    let payload = vec![7u8; o.payload];
    let per_writer = o.events / o.writers;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..o.writers {
        // One shared client: `memory://` makes a new, separate store per connect.
        let store = store.clone();
        let (category, payload) = (category.clone(), payload.clone());
        let streams = (o.streams / o.writers).max(1);
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            let mut i = 0u64;
            while written < per_writer {
                let n = batch.min(per_writer - written);
                let stream = StreamId::new(&category, format!("w{w}-s{}", i % streams))?;
                let events = (0..n).map(|_| event(&payload)).collect();
                store.append(&stream, ExpectedVersion::Any, events).await?;
                written += n;
                i += 1;
            }
            Ok::<_, newton::Error>(written)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((
        category,
        Row {
            scenario: format!("append, batches of {batch}, {} writer(s)", o.writers),
            events: total,
            elapsed: started.elapsed(),
        },
    ))
}

async fn replay(store: &Arc<dyn EventStore>, category: &Category) -> Result<Row, newton::Error> {
    let started = Instant::now();
    let n = store
        .subscribe(
            Selector::Category(category.clone()),
            Start::Beginning,
            SubscriptionMode::Cold,
        )
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await?;
    Ok(Row {
        scenario: "category replay (Cold)".into(),
        events: n,
        elapsed: started.elapsed(),
    })
}

async fn read_streams(
    store: &Arc<dyn EventStore>,
    category: &Category,
) -> Result<Row, newton::Error> {
    let streams: Vec<StreamId> = store.list_streams(category).try_collect().await?;
    let started = Instant::now();
    let mut n = 0;
    for s in &streams {
        n += store
            .read_stream(s, ReadOptions::forwards())
            .try_fold(0u64, |n, _| async move { Ok(n + 1) })
            .await?;
    }
    Ok(Row {
        scenario: format!("read {} aggregate streams", streams.len()),
        events: n,
        elapsed: started.elapsed(),
    })
}

/// A HotCold subscriber follows a writer appending batches of 10: end-to-end live throughput.
async fn live(
    o: &Options,
    store: &Arc<dyn EventStore>,
) -> Result<Row, Box<dyn std::error::Error + Send + Sync>> {
    let category = Category::new(format!(
        "live{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))?;
    let mut sub = store.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    assert!(matches!(
        sub.next().await,
        Some(Ok(SubscriptionItem::CaughtUp))
    ));
    let writer = store.clone();
    let payload = vec![7u8; o.payload];
    let total = o.events;
    let started = Instant::now();
    let w = tokio::spawn(async move {
        let stream = StreamId::new(&category, "live")?;
        for _ in 0..total / 10 {
            let events = (0..10).map(|_| event(&payload)).collect();
            writer.append(&stream, ExpectedVersion::Any, events).await?;
        }
        Ok::<_, newton::Error>(())
    });
    let mut seen = 0;
    while seen < total / 10 * 10 {
        match sub.next().await {
            Some(Ok(SubscriptionItem::Event(_))) => seen += 1,
            Some(Ok(SubscriptionItem::CaughtUp)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err("live subscription ended".into()),
        }
    }
    w.await??;
    Ok(Row {
        scenario: "live: append -> HotCold subscriber".into(),
        events: seen,
        elapsed: started.elapsed(),
    })
}

/// The same shapes written and read with the plain `mongodb` driver: the floor under
/// photon-mongo's figures (one insert per event or per 100, one indexed find).
#[cfg(feature = "mongo")]
async fn raw_mongo(o: &Options) -> Result<Vec<Row>, Box<dyn std::error::Error + Send + Sync>> {
    use mongodb::bson::{doc, spec::BinarySubtype, Binary, Document};
    let client = mongodb::Client::with_uri_str(&o.url).await?;
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    let coll = db.collection::<Document>(&format!(
        "rawbench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! { "category": 1, "position": 1 })
            .build(),
    )
    .await?;
    let payload = Binary {
        subtype: BinarySubtype::Generic,
        bytes: vec![7u8; o.payload],
    };
    let shaped = |position: u64| {
        doc! {
            "stream": format!("raw-s{}", position % o.streams), "category": "raw",
            "version": position as i64, "count": 1_i64, "position": position as i64,
            "events": [ { "type": "BenchEvent", "payload": payload.clone() } ],
        }
    };
    let mut rows = Vec::new();
    let started = Instant::now();
    for p in 0..o.events {
        coll.insert_one(shaped(p)).await?;
    }
    rows.push(Row {
        scenario: "raw driver: insert_one per event".into(),
        events: o.events,
        elapsed: started.elapsed(),
    });
    let started = Instant::now();
    for chunk in (o.events..2 * o.events).collect::<Vec<_>>().chunks(100) {
        coll.insert_many(chunk.iter().map(|p| shaped(*p))).await?;
    }
    rows.push(Row {
        scenario: "raw driver: insert_many of 100".into(),
        events: o.events,
        elapsed: started.elapsed(),
    });
    let started = Instant::now();
    let n = coll
        .find(doc! { "category": "raw" })
        .sort(doc! { "position": 1 })
        .await?
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await?;
    rows.push(Row {
        scenario: "raw driver: find by category".into(),
        events: n,
        elapsed: started.elapsed(),
    });
    coll.drop().await?;
    Ok(rows)
}

/// The same shapes written and read with plain rdkafka, against the broker of a `kafka://` URL:
/// the floor under photon-kafka's figures, with the settings photon-kafka's guarantees rest on.
///
/// photon-kafka makes each append one transaction of a transactional producer (acks=all,
/// idempotence, linger.ms=0) whose records carry the stream as key, an explicit partition and
/// eight text headers, and it returns once the commit is done and the partition's
/// read_committed high watermark has passed the last record. The raw rows do the same minus
/// everything photon adds: no version index, no expected-version check, no wait for the
/// watermark. A category replay is one read_committed consumer assigned every partition from
/// the beginning, read to the end.
///
/// Every run writes to fresh topics (`bench-raw-<id>-…`, 6 partitions, replication factor 1),
/// one per append row, and deletes them at the end. Creating the topics and the producers
/// (`init_transactions`) happens before the clock starts; the rows use one writer whatever
/// `--writers` says.
#[cfg(feature = "kafka")]
mod raw_kafka {
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use futures::future::join_all;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    use rdkafka::util::Timeout;
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

    use super::{Options, Row};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    fn producer(
        bootstrap: &str,
        transactional_id: Option<&str>,
    ) -> Result<FutureProducer, BoxError> {
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
            ("photon.content_type", "application/octet-stream"),
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

    /// Writes `--events` records to `topic` in batches of `batch`, each batch to one stream
    /// (the streams taken in turn, as the photon append rows do) and awaited before the next.
    /// With `transactional`, each batch is one committed transaction.
    async fn produce(
        o: &Options,
        producer: &Arc<FutureProducer>,
        topic: &str,
        batch: u64,
        transactional: bool,
    ) -> Result<Row, BoxError> {
        let payload = vec![7u8; o.payload];
        let streams = o.streams.max(1);
        let mut versions = vec![0u64; streams as usize];
        let (mut written, mut i) = (0u64, 0u64);
        let started = Instant::now();
        while written < o.events {
            let n = batch.min(o.events - written);
            let s = i % streams;
            let key = format!("raw-s{s}");
            let partition = (s % PARTITIONS as u64) as i32;
            let first = versions[s as usize];
            let now = now_micros();
            if transactional {
                producer.begin_transaction()?;
            }
            let sends = (0..n).map(|k| {
                let record = FutureRecord::to(topic)
                    .partition(partition)
                    .key(key.as_str())
                    .payload(&payload[..])
                    .timestamp(now / 1000)
                    .headers(headers(first + k, first, n, now));
                producer.send(record, Timeout::After(TIMEOUT))
            });
            for delivery in join_all(sends).await {
                delivery.map_err(|(e, _)| e)?;
            }
            if transactional {
                let p = producer.clone();
                tokio::task::spawn_blocking(move || p.commit_transaction(TIMEOUT)).await??;
            }
            versions[s as usize] += n;
            written += n;
            i += 1;
        }
        let kind = if transactional {
            "transactional append"
        } else {
            "idempotent produce acks=all"
        };
        Ok(Row {
            scenario: format!("raw rdkafka: {kind}, batches of {batch}"),
            events: written,
            elapsed: started.elapsed(),
        })
    }

    /// Reads every partition of `topic` from the beginning to its end with one read_committed
    /// consumer (manual assignment), touching each record's key, payload and headers. Like the
    /// photon row it includes creating the consumer, starting at offset 0 and
    /// photon-kafka's prefetch limits, each of which can add fixed delays on small topics.
    async fn replay(bootstrap: &str, topic: &str) -> Result<Row, BoxError> {
        let started = Instant::now();
        let consumer: StreamConsumer = consumer_config(bootstrap).create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            // Offset 0 as photon uses the log start (0 on a fresh topic): no Beginning lookup.
            tpl.add_partition_offset(topic, p, Offset::Offset(0))?;
        }
        consumer.assign(&tpl)?;
        let mut at_end = [false; PARTITIONS as usize];
        let (mut n, mut touched) = (0u64, 0usize);
        while !at_end.iter().all(|e| *e) {
            let got = tokio::time::timeout(TIMEOUT, consumer.recv())
                .await
                .map_err(|_| format!("replay of {topic}: nothing within {TIMEOUT:?}"))?;
            match got {
                Ok(msg) => {
                    n += 1;
                    touched += msg.key().map_or(0, <[u8]>::len);
                    touched += msg.payload().map_or(0, <[u8]>::len);
                    if let Some(hs) = msg.headers() {
                        touched += hs
                            .iter()
                            .map(|h| h.value.map_or(0, <[u8]>::len))
                            .sum::<usize>();
                    }
                }
                Err(KafkaError::PartitionEOF(p)) => at_end[p as usize] = true,
                Err(e) => return Err(e.into()),
            }
        }
        std::hint::black_box(touched);
        Ok(Row {
            scenario: "raw rdkafka: replay (read_committed consumer, assign)".into(),
            events: n,
            elapsed: started.elapsed(),
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
                let md =
                    tokio::task::spawn_blocking(move || m.fetch_metadata(Some(&name), TIMEOUT))
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

    /// The raw rows: transactional and idempotent appends in batches of 1 and 100, then a
    /// replay of what the transactional batches of 100 wrote (as the photon replay row reads
    /// the category its batches of 100 wrote).
    pub(super) async fn raw_kafka(o: &Options) -> Result<Vec<Row>, BoxError> {
        let bootstrap = bootstrap_servers(&o.url);
        let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let topic = |row: &str| format!("bench-raw-{id}-{row}");
        let topics = [
            topic("tx1"),
            topic("tx100"),
            topic("idem1"),
            topic("idem100"),
        ];
        let admin: AdminClient<DefaultClientContext> = base(bootstrap).create()?;
        create_topics(&admin, bootstrap, &topics).await?;

        let transactional = Arc::new(producer(bootstrap, Some(&format!("bench-raw-{id}")))?);
        let p = transactional.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(TIMEOUT)).await??;
        let idempotent = Arc::new(producer(bootstrap, None)?);

        let mut rows = vec![
            produce(o, &transactional, &topics[0], 1, true).await?,
            produce(o, &transactional, &topics[1], 100, true).await?,
            produce(o, &idempotent, &topics[2], 1, false).await?,
            produce(o, &idempotent, &topics[3], 100, false).await?,
        ];
        rows.push(replay(bootstrap, &topics[1]).await?);

        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options = AdminOptions::new().request_timeout(Some(TIMEOUT));
        for r in admin.delete_topics(&names, &options).await? {
            r.map_err(|(t, code)| format!("deleting topic {t}: {code}"))?;
        }
        Ok(rows)
    }
}

/// The same shapes written and read with the plain `scylla` driver, against the cluster of a
/// `cassandra://` URL: the floor under photon-cassandra's figures, with its consistency (QUORUM
/// for reads and writes, SERIAL for conditional writes) and request timeout.
///
/// photon-cassandra stores each append as one row of `commits((stream, bucket), version)`
/// (count, time id, event ids, and all the append's events MessagePack-encoded in one blob),
/// written with `INSERT ... IF NOT EXISTS` (a Paxos round). Around it, per append, it writes a
/// logged batch of four small inserts before (pending markers, time buckets), then three plain
/// inserts (two copies of the blob into `category_commits((category, bucket), time_id)`, one
/// `streams` row) and an unlogged batch of two deletes (the markers). The raw rows do the two
/// writes that carry the blob, each on its own, minus everything photon adds: the conditional
/// commit row (a blob of the same length as photon's, event ids included) and the plain
/// category row. A category replay reads one category partition (one time bucket holding every
/// append of the row) in pages of 64 rows by time id, as photon does, touching each blob; it
/// reads what the plain inserts in batches of 100 wrote with `--writers` writers (as the photon
/// replay row reads the category its batches of 100 wrote).
///
/// Every run works in a fresh keyspace (`bench_raw_<id>`, SimpleStrategy with one replica) with
/// photon's two tables, created before the clock starts and dropped at the end. Each append
/// row runs with 1 writer and, when `--writers` is more, again with that many concurrent
/// writers on one shared session, the `--events` split among them; each writer appends to a
/// stream of its own, one append after the other, versions increasing. (Credentials and TLS
/// options of the URL are not carried over.)
#[cfg(feature = "cassandra")]
mod raw_cassandra {
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use scylla::client::session::Session;
    use scylla::client::session_builder::SessionBuilder;
    use scylla::response::query_result::QueryResult;
    use scylla::statement::prepared::PreparedStatement;
    use scylla::statement::{Consistency, SerialConsistency};
    use scylla::value::{CqlTimeuuid, CqlValue, Row as CqlRow};
    use uuid::Uuid;

    use super::{Options, Row};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    /// Bound on every request, photon-cassandra's default `timeout_ms`.
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Rows fetched per page of a read: photon-cassandra's `PAGE`.
    const PAGE: i32 = 64;

    /// Width of a category partition in time: photon-cassandra's default `time_bucket_s`.
    const TIME_BUCKET_MICROS: i64 = 3_600 * 1_000_000;

    /// 100-nanosecond intervals between the UUID epoch (1582-10-15) and the Unix epoch.
    const UUID_EPOCH_OFFSET: u64 = 0x01B2_1DD2_1381_4000;

    /// photon-cassandra's two tables that carry an append's events, as it creates them.
    const TABLES: &[&str] = &[
        "CREATE TABLE {ks}.commits (
            stream text, bucket bigint, version bigint,
            count int, time_id timeuuid, event_ids list<uuid>, events blob,
            PRIMARY KEY ((stream, bucket), version))",
        "CREATE TABLE {ks}.category_commits (
            category text, bucket bigint, time_id timeuuid,
            stream text, version bigint, count int, events blob,
            PRIMARY KEY ((category, bucket), time_id))",
    ];

    /// The `host:port` contact points of a `cassandra://` URL (port 9042 when none is given):
    /// no credentials, keyspace or options.
    fn contact_points(url: &str) -> Vec<String> {
        let rest = url.strip_prefix("cassandra://").unwrap_or(url);
        let rest = rest.split_once('?').map_or(rest, |(a, _)| a);
        let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains(':') {
                    h.to_owned()
                } else {
                    format!("{h}:9042")
                }
            })
            .collect()
    }

    /// Microseconds since the Unix epoch.
    fn now_micros() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64)
    }

    /// A version-1 (time) UUID for `micros` with the given clock sequence and node bytes, laid
    /// out as photon-cassandra's time ids are.
    fn time_uuid(micros: i64, tail: [u8; 8]) -> Uuid {
        let ticks = micros as u64 * 10 + UUID_EPOCH_OFFSET;
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&((ticks & 0xffff_ffff) as u32).to_be_bytes());
        b[4..6].copy_from_slice(&(((ticks >> 32) & 0xffff) as u16).to_be_bytes());
        b[6..8].copy_from_slice(&((((ticks >> 48) & 0x0fff) as u16) | 0x1000).to_be_bytes());
        b[8..16].copy_from_slice(&tail);
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid::from_bytes(b)
    }

    /// A time id of `micros` with random clock sequence and node, as photon-cassandra's.
    fn time_id(micros: i64) -> Uuid {
        let random = Uuid::new_v4();
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&random.as_bytes()[8..16]);
        time_uuid(micros, tail)
    }

    /// The length of photon-cassandra's blob of `n` bench events of `payload` bytes: a
    /// MessagePack array of maps (id, type, schema_version, occurred_at, content_type,
    /// payload), 121 bytes around each payload and its own bin header.
    fn blob_len(n: u64, payload: usize) -> usize {
        let array = match n {
            0..=15 => 1,
            16..=65_535 => 3,
            _ => 5,
        };
        let bin = match payload {
            0..=255 => 2,
            256..=65_535 => 3,
            _ => 5,
        };
        array + n as usize * (121 + bin + payload)
    }

    /// The statements of the raw rows, prepared with photon-cassandra's settings.
    struct Statements {
        /// The commit row, conditional (`IF NOT EXISTS`).
        insert_commit: PreparedStatement,
        /// The category row, plain.
        insert_category: PreparedStatement,
        /// One page of a category partition after a time id (photon's `category_page`).
        category_page: PreparedStatement,
    }

    async fn prepare(session: &Session, ks: &str) -> Result<Statements, BoxError> {
        let prep = |cql: String| async move {
            let mut p = session.prepare(cql).await?;
            p.set_consistency(Consistency::Quorum);
            p.set_serial_consistency(Some(SerialConsistency::Serial));
            p.set_request_timeout(Some(TIMEOUT));
            Ok::<_, BoxError>(p)
        };
        Ok(Statements {
            insert_commit: prep(format!(
                "INSERT INTO {ks}.commits (stream, bucket, version, count, time_id, event_ids, events) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            insert_category: prep(format!(
                "INSERT INTO {ks}.category_commits (category, bucket, time_id, stream, version, count, events) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            category_page: prep(format!(
                "SELECT time_id, stream, version, count, events FROM {ks}.category_commits WHERE category = ? AND bucket = ? AND time_id > ? AND time_id <= ? LIMIT ?"
            ))
            .await?,
        })
    }

    /// Whether a conditional write applied: the `[applied]` column of its answer.
    fn applied(answer: QueryResult) -> Result<bool, BoxError> {
        let rows = answer.into_rows_result()?;
        let first = rows.rows::<CqlRow>()?.next().transpose()?;
        Ok(matches!(
            first.and_then(|r| r.columns.into_iter().next()),
            Some(Some(CqlValue::Boolean(true)))
        ))
    }

    /// Which write an append row makes.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Write {
        /// The commit row, `IF NOT EXISTS`, in the writer's stream partition.
        Lwt,
        /// The category row, plain, in the row's one category partition.
        Plain,
    }

    /// Writes `--events` events in appends of `batch`, one row per append, from `writers`
    /// concurrent writers (each on a stream of its own, appends in sequence). `key` names the
    /// row's streams and category; returns the row and the category partition's bucket.
    async fn append(
        o: &Options,
        session: &Arc<Session>,
        st: &Arc<Statements>,
        write: Write,
        batch: u64,
        writers: u64,
        key: &str,
    ) -> Result<(Row, i64), BoxError> {
        let per_writer = o.events / writers;
        let bucket = now_micros().div_euclid(TIME_BUCKET_MICROS);
        let full = Arc::new(vec![7u8; blob_len(batch, o.payload)]);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (session, st, full) = (session.clone(), st.clone(), full.clone());
            let (category, stream) = (key.to_owned(), format!("{key}-w{w}"));
            let payload = o.payload;
            tasks.push(tokio::spawn(async move {
                let (mut written, mut last) = (0u64, 0i64);
                while written < per_writer {
                    let n = batch.min(per_writer - written);
                    let short;
                    let blob: &[u8] = if n == batch {
                        &full
                    } else {
                        short = vec![7u8; blob_len(n, payload)];
                        &short
                    };
                    // A stream's time ids only grow, as photon's do.
                    let micros = now_micros().max(last + 1);
                    last = micros;
                    let t = CqlTimeuuid::from(time_id(micros));
                    let version = written as i64;
                    match write {
                        Write::Lwt => {
                            let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
                            let answer = session
                                .execute_unpaged(
                                    &st.insert_commit,
                                    (stream.as_str(), 0_i64, version, n as i32, t, &ids, blob),
                                )
                                .await?;
                            if !applied(answer)? {
                                return Err::<u64, BoxError>(
                                    format!("{stream}@{version}: IF NOT EXISTS did not apply")
                                        .into(),
                                );
                            }
                        }
                        Write::Plain => {
                            session
                                .execute_unpaged(
                                    &st.insert_category,
                                    (
                                        category.as_str(),
                                        bucket,
                                        t,
                                        stream.as_str(),
                                        version,
                                        n as i32,
                                        blob,
                                    ),
                                )
                                .await?;
                        }
                    }
                    written += n;
                }
                Ok(written)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let kind = match write {
            Write::Lwt => "LWT insert per append (IF NOT EXISTS)",
            Write::Plain => "plain insert per append (QUORUM)",
        };
        Ok((
            Row {
                scenario: format!("raw scylla: {kind}, batches of {batch}, {writers} writer(s)"),
                events: total,
                elapsed: started.elapsed(),
            },
            bucket,
        ))
    }

    /// Reads the category partition `(category, bucket)` from its start to now in pages of
    /// [`PAGE`] rows, each page after the last time id seen, touching each row's stream and
    /// blob; counts the events the rows hold.
    async fn replay(
        session: &Session,
        st: &Statements,
        category: &str,
        bucket: i64,
    ) -> Result<Row, BoxError> {
        let started = Instant::now();
        let mut lower = CqlTimeuuid::from(time_uuid(bucket * TIME_BUCKET_MICROS, [0x80; 8]));
        let upper = CqlTimeuuid::from(time_uuid(now_micros(), [0x7f; 8]));
        let (mut n, mut touched) = (0u64, 0usize);
        loop {
            let rows = session
                .execute_unpaged(&st.category_page, (category, bucket, lower, upper, PAGE))
                .await?
                .into_rows_result()?;
            let mut seen = 0;
            for row in rows.rows::<(CqlTimeuuid, String, i64, i32, Vec<u8>)>()? {
                let (t, stream, _version, count, events) = row?;
                n += count as u64;
                touched += stream.len() + events.len();
                lower = t;
                seen += 1;
            }
            if seen < PAGE {
                break;
            }
        }
        std::hint::black_box(touched);
        Ok(Row {
            scenario: "raw scylla: category replay (paged SELECT by partition)".into(),
            events: n,
            elapsed: started.elapsed(),
        })
    }

    /// The raw rows: LWT and plain inserts in batches of 1 and 100, each with 1 writer and
    /// with `--writers`, then a replay of what the plain inserts in batches of 100 with
    /// `--writers` wrote.
    pub(super) async fn raw_cassandra(o: &Options) -> Result<Vec<Row>, BoxError> {
        let session = Arc::new(
            SessionBuilder::new()
                .known_nodes(contact_points(&o.url))
                .connection_timeout(TIMEOUT)
                .build()
                .await?,
        );
        let ks = format!(
            "bench_raw_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        session
            .query_unpaged(
                format!(
                    "CREATE KEYSPACE {ks} WITH replication = \
                     {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
                ),
                (),
            )
            .await?;
        for table in TABLES {
            session
                .query_unpaged(table.replace("{ks}", &ks), ())
                .await?;
        }
        session.await_schema_agreement().await?;
        let st = Arc::new(prepare(&session, &ks).await?);

        let mut writer_counts = vec![1];
        if o.writers > 1 {
            writer_counts.push(o.writers);
        }
        let mut rows = Vec::new();
        let mut replayed = None;
        for write in [Write::Lwt, Write::Plain] {
            for batch in [1, 100] {
                for &writers in &writer_counts {
                    let key = match write {
                        Write::Lwt => format!("lwt{batch}-{writers}w"),
                        Write::Plain => format!("plain{batch}-{writers}w"),
                    };
                    let (row, bucket) =
                        append(o, &session, &st, write, batch, writers, &key).await?;
                    rows.push(row);
                    if write == Write::Plain && batch == 100 && writers == o.writers.max(1) {
                        replayed = Some((key, bucket));
                    }
                }
            }
        }
        if let Some((category, bucket)) = replayed {
            rows.push(replay(&session, &st, &category, bucket).await?);
        }

        session
            .query_unpaged(format!("DROP KEYSPACE {ks}"), ())
            .await?;
        Ok(rows)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let o = Options::parse();
    let store = newton::connect(&o.url).await?;
    println!(
        "store: {} ({}), {} events of {} bytes, {} writer(s), {} streams",
        store.backend(),
        store.health().await?.detail,
        o.events,
        o.payload,
        o.writers,
        o.streams
    );
    let mut rows = Vec::new();
    let (_, single) = append(&o, &store, 1).await?;
    rows.push(single);
    let (category, batched) = append(&o, &store, 100).await?;
    rows.push(batched);
    rows.push(replay(&store, &category).await?);
    rows.push(read_streams(&store, &category).await?);
    rows.push(live(&o, &store).await?);
    #[cfg(feature = "mongo")]
    if o.url.starts_with("mongodb") {
        rows.extend(raw_mongo(&o).await?);
    }
    #[cfg(feature = "kafka")]
    if o.url.starts_with("kafka://") {
        rows.extend(raw_kafka::raw_kafka(&o).await?);
    }
    #[cfg(feature = "cassandra")]
    if o.url.starts_with("cassandra://") {
        rows.extend(raw_cassandra::raw_cassandra(&o).await?);
    }

    // The scenario column fits the longest name (raw-driver rows are long).
    let w = rows
        .iter()
        .map(|r| r.scenario.len())
        .max()
        .unwrap_or(0)
        .max(42);
    println!();
    println!(
        "| {:<w$} | {:>9} | {:>9} | {:>12} |",
        "scenario", "events", "seconds", "events/s"
    );
    println!(
        "|{:-<w2$}|{:->11}|{:->11}|{:->14}|",
        "",
        "",
        "",
        "",
        w2 = w + 2
    );
    for r in rows {
        let secs = r.elapsed.as_secs_f64();
        println!(
            "| {:<w$} | {:>9} | {:>9.3} | {:>12.0} |",
            r.scenario,
            r.events,
            secs,
            r.events as f64 / secs
        );
    }
    Ok(())
}
