//! Behaviour specific to the Kafka backend, against a real broker (`PHOTON_TEST_KAFKA_URL`): the
//! documented record format read by a plain consumer, fencing between store instances, topic
//! creation settings, refusing to create topics when told not to, and librdkafka's errors
//! reaching the caller whole.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use photon_api::{
    Error, EventData, EventStore, EventStoreExt, ExpectedVersion, ReadOptions, Selector, Start,
    StreamId, SubscriptionMode, Uuid, Version,
};
use photon_conformance::server_url;
use photon_kafka::{KafkaConfig, KafkaStore};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

fn fresh_prefix() -> String {
    format!("k{}", &Uuid::new_v4().simple().to_string()[..12])
}

fn bootstrap(url: &str) -> String {
    KafkaConfig::from_url(url).unwrap().bootstrap_servers
}

fn numbered(n: u64) -> EventData {
    EventData::json("Numbered", &serde_json::json!({ "n": n })).unwrap()
}

fn number(e: &photon_api::RecordedEvent) -> u64 {
    e.decode::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

async fn store(url: &str) -> KafkaStore {
    KafkaStore::from_url(url).await.unwrap()
}

#[tokio::test]
async fn records_are_readable_by_a_plain_consumer_as_documented() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = store(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=4"),
    ))
    .await;
    let stream = StreamId::parse("account-7").unwrap();
    let (cause, correlation) = (Uuid::new_v4(), Uuid::new_v4());
    let events = vec![
        EventData::json("Opened", &serde_json::json!({"owner": "ada"}))
            .unwrap()
            .with_schema_version(2)
            .with_causation_id(cause)
            .with_correlation_id(correlation)
            .with_header("tenant", "t-1"),
        EventData::json("Deposited", &serde_json::json!({"amount": 5})).unwrap(),
    ];
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    let written = store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();

    // Another tool writes a record keyed by the same stream with Kafka's default partitioner.
    // It must land in the stream's partition (the README's partitioning rule), and photon's
    // reads must skip it (no photon.event_id header).
    let topic = format!("{prefix}.account");
    let foreign: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let foreign_partition = foreign
        .send(
            FutureRecord::to(&topic)
                .key("account-7")
                .payload("not an event"),
            Duration::from_secs(10),
        )
        .await
        .unwrap()
        .partition;

    // Read every partition with a plain read_committed consumer and decode by the README alone.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .set("group.id", "format-test")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut records = Vec::new();
    while records.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("records arrive")
            .unwrap();
        let headers: HashMap<String, String> = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        records.push((
            msg.partition(),
            String::from_utf8(msg.key().unwrap().to_vec()).unwrap(),
            msg.payload().unwrap_or_default().to_vec(),
            msg.timestamp().to_millis().unwrap(),
            headers,
        ));
    }
    let (photon, others): (Vec<_>, Vec<_>) = records
        .into_iter()
        .partition(|r| r.4.contains_key("photon.event_id"));
    assert_eq!(others.len(), 1);
    assert_eq!(photon.len(), 2);
    assert!(photon.iter().all(|r| r.0 == foreign_partition));
    for (i, (_, key, value, millis, h)) in photon.iter().enumerate() {
        let e = &written[i];
        assert_eq!(key, "account-7");
        assert_eq!(value, &e.payload.bytes.to_vec());
        assert_eq!(h["photon.event_id"], ids[i].to_string());
        assert_eq!(h["photon.version"], i.to_string());
        assert_eq!(h["photon.event_type"], ["Opened", "Deposited"][i]);
        assert_eq!(h["photon.content_type"], "application/json");
        assert_eq!(h["photon.batch"], "0+2");
        let recorded: i64 = h["photon.recorded_at"].parse().unwrap();
        assert_eq!(recorded, e.recorded_at.unix_micros());
        assert_eq!(
            *millis,
            recorded / 1000,
            "record timestamp is recorded_at in ms"
        );
        let occurred: i64 = h["photon.occurred_at"].parse().unwrap();
        assert_eq!(occurred, e.occurred_at.unix_micros());
    }
    let first = &photon[0].4;
    assert_eq!(first["photon.schema_version"], "2");
    assert_eq!(first["photon.causation_id"], cause.to_string());
    assert_eq!(first["photon.correlation_id"], correlation.to_string());
    assert_eq!(first["tenant"], "t-1");
    assert!(!photon[1].4.contains_key("photon.causation_id"));

    // photon skips the foreign record everywhere.
    let again = store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(again, written);
    let replay = store
        .replay_to_vec(Selector::Category(stream.category()), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(replay.len(), 2);
    // An application header may not pass itself off as one of ours.
    let sneaky = numbered(9).with_header("photon.version", "0");
    assert!(matches!(
        store
            .append(&stream, ExpectedVersion::Any, vec![sneaky])
            .await,
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        Some(Version(1))
    );
}

/// Guarantees 3 and 4 across store instances: a writer fenced by another instance takes the
/// partition back, sees what the other wrote, and neither loses nor repeats an acknowledged
/// event; a restarted writer continues from what is stored.
#[tokio::test]
async fn fenced_and_restarted_writers_lose_and_repeat_nothing() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    // One partition, so every stream shares the writer role.
    let url = with_options(&url, &format!("prefix={}&partitions=1", fresh_prefix()));
    let a = store(&url).await;
    let b = store(&url).await;
    let stream = StreamId::parse("order-1").unwrap();
    let other = StreamId::parse("order-2").unwrap();
    a.append(
        &stream,
        ExpectedVersion::NoStream,
        vec![numbered(0), numbered(1)],
    )
    .await
    .unwrap();
    // B takes the partition over (fencing A) and writes to both streams.
    b.append(
        &stream,
        ExpectedVersion::Exact(Version(1)),
        vec![numbered(2)],
    )
    .await
    .unwrap();
    let batch_b = vec![numbered(100)];
    b.append(&other, ExpectedVersion::NoStream, batch_b.clone())
        .await
        .unwrap();
    // A still believes it is the writer with version 1; its stale expectation is refused with
    // the real version, and a correct one succeeds after it takes the partition back.
    match a
        .append(
            &stream,
            ExpectedVersion::Exact(Version(1)),
            vec![numbered(99)],
        )
        .await
    {
        Err(Error::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, Some(Version(2))),
        other => panic!("want WrongExpectedVersion from the fenced writer, got {other:?}"),
    }
    let r = a
        .append(
            &stream,
            ExpectedVersion::Exact(Version(2)),
            vec![numbered(3)],
        )
        .await
        .unwrap();
    assert_eq!(r.first_version, Version(3));
    // B's retry of its own batch, after A took over, is recognised: nothing stored twice.
    let retried = b
        .append(&other, ExpectedVersion::NoStream, batch_b.clone())
        .await
        .unwrap();
    assert_eq!(retried.first_version, Version(0));
    // And the same retry through A, which never saw that append happen itself.
    let via_a = a
        .append(&other, ExpectedVersion::Any, batch_b)
        .await
        .unwrap();
    assert_eq!(via_a.first_version, Version(0));
    // Alternate writers on the same stream: every acknowledged append is there once, in order.
    for i in 4..10u64 {
        let w = if i % 2 == 0 { &a } else { &b };
        w.append(
            &stream,
            ExpectedVersion::Exact(Version(i - 1)),
            vec![numbered(i)],
        )
        .await
        .unwrap();
    }
    // A restarted process (a new store) continues from what is stored.
    drop(a);
    let c = store(&url).await;
    c.append(
        &stream,
        ExpectedVersion::Exact(Version(9)),
        vec![numbered(10)],
    )
    .await
    .unwrap();
    let read = c
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(
        read.iter().map(number).collect::<Vec<_>>(),
        (0..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        read.iter().map(|e| e.version.0).collect::<Vec<_>>(),
        (0..=10).collect::<Vec<_>>()
    );
    let others = c
        .read_to_vec(&other, ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(others.iter().map(number).collect::<Vec<_>>(), vec![100]);
    // The category stream holds each event once, aborted attempts of fenced writers included.
    let replay = c
        .replay_to_vec(Selector::Category(stream.category()), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(replay.len(), 12);
}

#[tokio::test]
async fn topics_are_created_with_the_configured_settings() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = store(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=5&replication_factor=1&max_event_size=200000"),
    ))
    .await;
    store
        .append(
            &StreamId::parse("cart-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![numbered(1)],
        )
        .await
        .unwrap();
    let topic = format!("{prefix}.cart");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .create()
        .unwrap();
    let configs = admin
        .describe_configs([&ResourceSpecifier::Topic(&topic)], &AdminOptions::new())
        .await
        .unwrap();
    let config = configs.into_iter().next().unwrap().unwrap();
    let value = |name: &str| {
        config
            .get(name)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(value("retention.ms"), "-1", "events are kept for good");
    assert_eq!(value("retention.bytes"), "-1");
    assert_eq!(value("message.timestamp.type"), "CreateTime");
    assert_eq!(
        value("max.message.bytes"),
        (200_000 + 64 * 1024).to_string()
    );
    let md = topic_metadata(&url, &topic);
    assert_eq!(md.topics()[0].partitions().len(), 5, "partitions");
}

/// The broker's metadata of `topic`, read with a plain client.
fn topic_metadata(url: &str, topic: &str) -> rdkafka::metadata::Metadata {
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .create()
        .unwrap();
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap()
}

#[tokio::test]
async fn without_topic_creation_a_missing_topic_is_named() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = store(&with_options(
        &url,
        &format!("prefix={prefix}&create=false"),
    ))
    .await;
    let stream = StreamId::parse("ghost-1").unwrap();
    match store
        .append(&stream, ExpectedVersion::Any, vec![numbered(1)])
        .await
    {
        Err(Error::Backend {
            context, source, ..
        }) => {
            assert!(context.contains(&format!("{prefix}.ghost")), "{context}");
            let m = source.to_string();
            assert!(m.contains(&format!("{prefix}.ghost")), "{m}");
            assert!(m.contains("create=false"), "{m}");
        }
        other => panic!("want a Backend error naming the topic, got {other:?}"),
    }
    // Reads of a category that has no topic are empty, not errors; nothing was created.
    assert!(store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap()
        .is_empty());
    let mut cold = store.subscribe(
        Selector::Category(stream.category()),
        Start::Beginning,
        SubscriptionMode::Cold,
    );
    assert!(cold.next().await.is_none());
    assert!(!store
        .list_categories()
        .await
        .unwrap()
        .iter()
        .any(|c| c.as_str() == "ghost"));
    let ghost = format!("{prefix}.ghost");
    assert!(topic_metadata(&url, &ghost)
        .topics()
        .iter()
        .all(|t| t.name() != ghost || t.error().is_some() || t.partitions().is_empty()));
}

/// Appends from many tasks of one process to one partition are committed in shared
/// transactions: each lands once, versions stay contiguous per stream, and a batch sent twice at
/// once (same ids) is stored once.
#[tokio::test]
async fn concurrent_appends_in_one_store_are_grouped_correctly() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let url = with_options(&url, &format!("prefix={}&partitions=1", fresh_prefix()));
    let shared = std::sync::Arc::new(store(&url).await);
    let twice = vec![numbered(7000), numbered(7001)];
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let store = shared.clone();
        let twice = twice.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::parse(format!("load-{}", t % 16)).unwrap();
            for i in 0..10u64 {
                store
                    .append(&stream, ExpectedVersion::Any, vec![numbered(t * 100 + i)])
                    .await
                    .unwrap();
            }
            if t < 2 {
                let same = StreamId::parse("load-twice").unwrap();
                store
                    .append(&same, ExpectedVersion::Any, twice)
                    .await
                    .unwrap()
                    .first_version
            } else {
                Version(0)
            }
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            Version(0),
            "the repeated batch kept its versions"
        );
    }
    let fresh = store(&url).await;
    for s in 0..16u64 {
        let stream = StreamId::parse(format!("load-{s}")).unwrap();
        let events = fresh
            .read_to_vec(&stream, ReadOptions::forwards())
            .await
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.version.0).collect::<Vec<_>>(),
            (0..20).collect::<Vec<_>>()
        );
        let mut numbers: Vec<u64> = events.iter().map(number).collect();
        numbers.sort();
        let mut want: Vec<u64> = (0..10).map(|i| s * 100 + i).collect();
        want.extend((0..10).map(|i| (s + 16) * 100 + i));
        assert_eq!(numbers, want);
    }
    let same = StreamId::parse("load-twice").unwrap();
    assert_eq!(
        fresh
            .read_to_vec(&same, ReadOptions::forwards())
            .await
            .unwrap()
            .len(),
        2
    );
    let replay = fresh
        .replay_to_vec(Selector::Category(same.category()), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(replay.len(), 16 * 20 + 2);
}

/// librdkafka's own error reaches the caller as the `source()` of ours: a topic the broker
/// refuses to create (a replication factor above the brokers there are; the test cluster has
/// one broker) is a `Backend` error whose chain holds the broker's refusal, and an unreachable
/// broker is `Unavailable`, retryable, with librdkafka's error behind it too.
#[tokio::test]
async fn driver_errors_reach_the_caller_and_transient_ones_stay_unavailable() {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let brokers = topic_metadata(&url, &format!("{prefix}.none"))
        .brokers()
        .len();
    let refusing = store(&with_options(
        &url,
        &format!("prefix={prefix}&replication_factor={}", brokers + 1),
    ))
    .await;
    let stream = StreamId::parse("refused-1").unwrap();
    let e = refusing
        .append(&stream, ExpectedVersion::Any, vec![numbered(1)])
        .await
        .expect_err("the broker refuses the topic");
    let Error::Backend { ref context, .. } = e else {
        panic!("want a Backend error, got {e:?}");
    };
    assert_eq!(context, &format!("creating topic {prefix}.refused"));
    assert!(!e.is_retryable());
    let kafka = driver_error(&e).expect("librdkafka's error is in the chain");
    assert_eq!(
        kafka,
        &KafkaError::AdminOp(RDKafkaErrorCode::InvalidReplicationFactor),
        "the broker's answer to CreateTopics"
    );

    let unreachable = store("kafka://127.0.0.1:1?timeout_ms=1500").await;
    for result in [
        unreachable.health().await.map(|_| ()),
        unreachable
            .append(&stream, ExpectedVersion::Any, vec![numbered(1)])
            .await
            .map(|_| ()),
    ] {
        let e = result.expect_err("nothing listens on port 1");
        assert!(
            matches!(e, Error::Unavailable { .. }) && e.is_retryable(),
            "{e:?}"
        );
        let kafka = driver_error(&e).expect("librdkafka's error is in the chain");
        assert!(
            kafka.rdkafka_error_code().is_some(),
            "a librdkafka error code: {kafka:?}"
        );
    }
}

/// The first `KafkaError` in `e`'s chain of sources.
fn driver_error(e: &Error) -> Option<&rdkafka::error::KafkaError> {
    let mut next = std::error::Error::source(e);
    while let Some(source) = next {
        if let Some(kafka) = source.downcast_ref() {
            return Some(kafka);
        }
        next = source.source();
    }
    None
}
