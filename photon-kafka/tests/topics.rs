//! Topics photon-kafka did not shape itself, against a real broker (`PHOTON_TEST_KAFKA_URL`): a
//! partition count changed after events were written, and topics made by hand whose
//! configuration loses events, are refused with a typed error ([`TopicRefused`]) naming what is
//! wrong, and nothing is written into them; topics holding no photon event (only aborted or
//! foreign records) are not listed as categories.

use std::time::Duration;

use futures::StreamExt;
use photon_api::{
    Category, Error, EventData, EventStore, ExpectedVersion, ReadOptions, StreamId, Uuid, Version,
};
use photon_conformance::server_url;
use photon_kafka::{KafkaStore, TopicRefused};
use rdkafka::admin::{ConfigSource, NewPartitions, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use rdkafka::Message;

#[path = "support/admin.rs"]
mod admin;
use admin::{
    admin, bootstrap, fresh_prefix, make_topic, options, wait_for_partitions, with_options, TIMEOUT,
};

fn event(n: u64) -> EventData {
    EventData::json("Numbered", &serde_json::json!({ "n": n })).unwrap()
}

/// The records `topic` holds, committed or not (the sum of its partitions' high watermarks).
fn records_in(url: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(topic), TIMEOUT).unwrap();
    let n = md.topics()[0].partitions().len() as i32;
    (0..n)
        .map(|p| consumer.fetch_watermarks(topic, p, TIMEOUT).unwrap().1)
        .sum()
}

/// The [`TopicRefused`] in `e`'s chain of sources.
fn refusal(e: &Error) -> Option<&TopicRefused> {
    let mut next = std::error::Error::source(e);
    while let Some(source) = next {
        if let Some(r) = source.downcast_ref() {
            return Some(r);
        }
        next = source.source();
    }
    None
}

/// Issue 14 item 3: after `kafka-topics --alter --partitions`, a store that starts afterwards
/// would look for (and write) half of the streams in new, empty partitions: their history
/// hidden, a second `NoStream` append winning under another transactional id. Every store
/// refuses the topic instead, a fresh one at its first use (the records say which count they
/// were written with), one that used the topic before at its next look at the count or its next
/// take-over, and nothing more is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_partition_count_is_refused_instead_of_splitting_streams() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('t');
    let url3 = with_options(&url, &format!("prefix={prefix}&partitions=3"));
    let early = KafkaStore::from_url(&url3).await.unwrap();
    let streams: Vec<StreamId> = (0..24)
        .map(|i| StreamId::parse(format!("moved-{i}")).unwrap())
        .collect();
    for s in &streams {
        early
            .append(s, ExpectedVersion::NoStream, vec![event(0)])
            .await
            .unwrap();
    }
    // A store that has used the topic (read it) just before the change.
    let reader = KafkaStore::from_url(&url3).await.unwrap();
    assert_eq!(
        reader.stream_version(&streams[0]).await.unwrap(),
        Some(Version(0))
    );

    let topic = format!("{prefix}.moved");
    let grown = NewPartitions::new(&topic, 6);
    for r in admin(&url)
        .create_partitions([&grown], &options())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    wait_for_partitions(&url, &topic, 6).await;
    let stored = records_in(&url, &topic);

    // None when `r` is the refusal the change calls for, else what went wrong instead.
    let check = |who: &str, what: &str, r: Result<String, Error>| match r {
        Err(e) => match refusal(&e) {
            Some(TopicRefused::PartitionsChanged {
                topic: t, was, now, ..
            }) if *t == topic && *now == 6 && *was == Some(3) => {
                let shown = e.to_string();
                assert!(
                    shown.contains("from 3 to 6") && shown.contains("new topic with 3 partitions"),
                    "says what changed and how to recover: {shown}"
                );
                assert!(!e.is_retryable());
                None
            }
            _ => Some(format!("{who} {what}: {e}")),
        },
        Ok(v) => Some(format!("{who} {what}: {v}")),
    };
    let mut wrong: Vec<String> = Vec::new();

    // A store started after the change.
    let fresh = KafkaStore::from_url(&url3).await.unwrap();
    for s in &streams {
        let r = fresh.stream_version(s).await;
        wrong.extend(check(
            "fresh",
            &format!("stream_version({s})"),
            r.map(|v| format!("{v:?}")),
        ));
        let r = fresh
            .append(s, ExpectedVersion::NoStream, vec![event(1)])
            .await;
        wrong.extend(check(
            "fresh",
            &format!("append({s}, NoStream)"),
            r.map(|r| format!("a second NoStream append won at {}", r.first_version)),
        ));
    }
    let mut read = fresh
        .read_stream(&streams[0], ReadOptions::forwards())
        .collect::<Vec<_>>()
        .await;
    match (read.len(), read.pop()) {
        (1, Some(Err(e))) => wrong.extend(check("fresh", "read_stream", Err(e))),
        (n, last) => wrong.push(format!("fresh read_stream: {n} items, last {last:?}")),
    }
    // The store that read before the change, at its take-over of a partition it never wrote.
    let r = reader
        .append(
            &streams[1],
            ExpectedVersion::Exact(Version(0)),
            vec![event(2)],
        )
        .await;
    wrong.extend(check(
        "reader",
        "append",
        r.map(|r| format!("appended at {}", r.first_version)),
    ));
    // The store that wrote before the change holds its producers; it looks at the count again
    // within a few seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for s in &streams[2..6] {
        let r = early
            .append(s, ExpectedVersion::Exact(Version(0)), vec![event(3)])
            .await;
        wrong.extend(check(
            "early",
            &format!("append({s})"),
            r.map(|r| format!("appended at {}", r.first_version)),
        ));
    }
    let added = records_in(&url, &topic) - stored;
    if added != 0 {
        wrong.push(format!("{added} records written after the change"));
    }
    assert!(
        wrong.is_empty(),
        "{} calls worked on the changed topic instead of refusing it:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Records written before photon-kafka said the count in each record (no `photon.partitions`)
/// show a changed count only by their keys: after a count doubled, a stream stays in its
/// partition with probability 1/2, so a check of one event per partition passes the change half
/// the time. Here each partition starts with an event of a stream that stays: every event of the
/// window is checked, so a moved one is found and the topic refused (before, a fresh store saw
/// the moved streams' new partitions empty and answered their versions as None).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doubled_count_under_records_without_the_count_header_is_refused() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    // Real photon records, keyed and placed by photon-kafka, in a topic of 6 partitions: a
    // record's partition there is its key's hash modulo 6, so modulo 3 it is its partition under
    // 3, and it stays in place when the count goes from 3 to 6 exactly when it is below 3.
    let source = fresh_prefix('t');
    let store6 = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={source}&partitions=6"),
    ))
    .await
    .unwrap();
    let streams: Vec<StreamId> = (0..60)
        .map(|i| StreamId::parse(format!("old-{i}")).unwrap())
        .collect();
    for s in &streams {
        store6
            .append(s, ExpectedVersion::NoStream, vec![event(0)])
            .await
            .unwrap();
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .set("group.id", "photon-test-copy")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..6 {
        assignment
            .add_partition_offset(&format!("{source}.old"), p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    // (partition under 6, key, payload, headers but photon.partitions), as written before it.
    type Record = (i32, String, Vec<u8>, Vec<(String, Vec<u8>)>);
    let mut old: Vec<Record> = Vec::new();
    let started = std::time::Instant::now();
    while old.len() < streams.len() {
        assert!(
            started.elapsed() < TIMEOUT * 3,
            "read {} records",
            old.len()
        );
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.unwrap();
        let headers = msg.headers().map_or_else(Vec::new, |h| {
            h.iter()
                .filter(|h| h.key != "photon.partitions")
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        });
        let key = String::from_utf8(msg.key().unwrap().to_vec()).unwrap();
        old.push((
            msg.partition(),
            key,
            msg.payload().unwrap().to_vec(),
            headers,
        ));
    }
    // Each partition of 3 starts with a record that stays under 6, then the others.
    old.sort_by_key(|(p6, key, ..)| (*p6 % 3, *p6 >= 3, key.clone()));
    for p in 0..3 {
        let mut here = old.iter().filter(|(p6, ..)| p6 % 3 == p);
        assert!(
            here.next().is_some_and(|(p6, ..)| *p6 == p),
            "{p} starts with a staying stream"
        );
        assert!(
            here.any(|(p6, ..)| *p6 == p + 3),
            "{p} holds a stream that moves"
        );
    }
    let prefix = fresh_prefix('t');
    let topic = format!("{prefix}.old");
    let keeps = [("retention.ms", "-1"), ("retention.bytes", "-1")];
    make_topic(&url, &topic, 3, &keeps).await;
    let plain: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .create()
        .unwrap();
    for (p6, key, payload, headers) in &old {
        let headers = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v),
            })
        });
        let record = FutureRecord::to(&topic)
            .partition(p6 % 3)
            .key(key)
            .payload(payload)
            .headers(headers);
        plain.send(record, TIMEOUT).await.unwrap();
    }
    let grown = NewPartitions::new(&topic, 6);
    for r in admin(&url)
        .create_partitions([&grown], &options())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    wait_for_partitions(&url, &topic, 6).await;
    let stored = records_in(&url, &topic);

    let fresh = KafkaStore::from_url(&with_options(&url, &format!("prefix={prefix}")))
        .await
        .unwrap();
    let moved = old
        .iter()
        .find(|(p6, ..)| *p6 >= 3)
        .map(|(_, key, ..)| StreamId::parse(key.clone()).unwrap())
        .expect("checked above");
    let r = fresh.stream_version(&moved).await;
    match &r {
        Err(e) => match refusal(e) {
            Some(TopicRefused::PartitionsChanged {
                topic: t, was, now, ..
            }) if *t == topic && *now == 6 && was.is_none() => {}
            _ => panic!("stream_version({moved}): {e}"),
        },
        Ok(v) => panic!("stream_version({moved}) on the changed topic answered {v:?}"),
    }
    let r = fresh
        .append(&moved, ExpectedVersion::NoStream, vec![event(1)])
        .await;
    assert!(r.as_ref().err().and_then(refusal).is_some(), "{r:?}");
    assert_eq!(records_in(&url, &topic), stored, "nothing written");
}

/// Issue 14 item 4: topics made by hand (or by the broker's auto-create) whose settings lose
/// events are refused at first use, naming the setting; nothing is written into them. Finite
/// retention passes when the URL allows it; compaction never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_that_lose_events_are_refused_naming_the_setting() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('t');
    let keeps: [(&str, &str); 3] = [
        ("cleanup.policy", "delete"),
        ("retention.ms", "-1"),
        ("retention.bytes", "-1"),
    ];
    let cases: [(&str, (&str, &str), &str); 5] = [
        ("compacted", ("cleanup.policy", "compact"), "cleanup.policy"),
        ("expiring", ("retention.ms", "604800000"), "retention.ms"),
        (
            "capped",
            ("retention.bytes", "1073741824"),
            "retention.bytes",
        ),
        (
            "unclean",
            ("unclean.leader.election.enable", "true"),
            "unclean.leader.election.enable",
        ),
        // The broker's own default (log.retention.hours): what auto-create gives.
        ("defaults", ("cleanup.policy", "delete"), "retention.ms"),
    ];
    for (category, change, _) in &cases {
        let mut settings: Vec<(&str, &str)> = keeps
            .iter()
            .filter(|(k, _)| *k != change.0)
            .copied()
            .collect();
        settings.push(*change);
        if *category == "defaults" {
            settings = vec![];
        }
        make_topic(&url, &format!("{prefix}.{category}"), 2, &settings).await;
    }
    let strict = KafkaStore::from_url(&with_options(&url, &format!("prefix={prefix}")))
        .await
        .unwrap();
    let mut wrong: Vec<String> = Vec::new();
    for (category, _, setting) in &cases {
        let topic = format!("{prefix}.{category}");
        let stream = StreamId::parse(format!("{category}-1")).unwrap();
        let r = strict
            .append(&stream, ExpectedVersion::NoStream, vec![event(1)])
            .await;
        match &r {
            Err(e) => match refusal(e) {
                Some(why) if why.setting() == *setting && why.topic() == topic => {
                    assert!(e.to_string().contains(setting), "{e}");
                }
                _ => wrong.push(format!("{category}: append: {e}")),
            },
            Ok(_) => wrong.push(format!(
                "{category}: append stored into a topic that loses events ({setting})"
            )),
        }
        let read = strict
            .read_stream(&stream, ReadOptions::forwards())
            .collect::<Vec<_>>()
            .await;
        if !matches!(read.as_slice(), [Err(Error::Backend { .. })]) {
            wrong.push(format!("{category}: read: {read:?}"));
        }
        if records_in(&url, &topic) != 0 && r.is_err() {
            wrong.push(format!("{category}: records written although refused"));
        }
    }
    let lenient = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&allow_finite_retention=true"),
    ))
    .await;
    let lenient = match lenient {
        Ok(store) => Some(store),
        Err(e) => {
            wrong.push(format!("allow_finite_retention=true: {e}"));
            None
        }
    };
    for (category, _, setting) in cases.iter().filter(|_| lenient.is_some()) {
        let lenient = lenient.as_ref().expect("filtered");
        let stream = StreamId::parse(format!("{category}-1")).unwrap();
        let allowed = setting.starts_with("retention");
        let r = lenient
            .append(&stream, ExpectedVersion::Any, vec![event(2)])
            .await;
        match (allowed, &r) {
            (true, Ok(_)) => {}
            (false, Err(e)) if refusal(e).map(TopicRefused::setting) == Some(*setting) => {}
            _ => wrong.push(format!(
                "{category} with allow_finite_retention: {:?}",
                r.map(|r| r.first_version)
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} calls worked on topics that lose events:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Topics photon-kafka creates carry `min.insync.replicas` as a topic setting: 2 where there is
/// a second replica, 1 on this one-broker test cluster (and so pass its own check).
#[tokio::test]
async fn created_topics_set_min_insync_replicas() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('t');
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=2"),
    ))
    .await
    .unwrap();
    store
        .append(
            &StreamId::parse("isr-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![event(1)],
        )
        .await
        .unwrap();
    let topic = format!("{prefix}.isr");
    let configs = admin(&url)
        .describe_configs([&ResourceSpecifier::Topic(&topic)], &options())
        .await
        .unwrap();
    let config = configs.into_iter().next().unwrap().unwrap();
    let entry = config.get("min.insync.replicas").unwrap();
    assert_eq!(entry.source, ConfigSource::DynamicTopic, "{entry:?}");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(&topic), TIMEOUT).unwrap();
    let replicas = md.topics()[0].partitions()[0].replicas().len() as i32;
    assert_eq!(
        entry.value.as_deref(),
        Some(replicas.clamp(1, 2).to_string().as_str())
    );
}

/// Issue 14 item 7: a topic under the prefix that holds only records of an aborted transaction,
/// or only records another tool wrote, has no event: it is not a category.
#[tokio::test]
async fn topics_without_events_are_not_listed() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('t');
    let keeps = [("retention.ms", "-1"), ("retention.bytes", "-1")];
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=2"),
    ))
    .await
    .unwrap();
    store
        .append(
            &StreamId::parse("real-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![event(1)],
        )
        .await
        .unwrap();
    let foreign = format!("{prefix}.foreign");
    make_topic(&url, &foreign, 2, &keeps).await;
    let plain: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .create()
        .unwrap();
    plain
        .send(
            FutureRecord::to(&foreign)
                .key("foreign-1")
                .payload("not an event"),
            TIMEOUT,
        )
        .await
        .unwrap();
    let aborted = format!("{prefix}.aborted");
    make_topic(&url, &aborted, 2, &keeps).await;
    let txn: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .set("transactional.id", format!("{prefix}-aborting"))
        .create()
        .unwrap();
    txn.init_transactions(TIMEOUT).unwrap();
    txn.begin_transaction().unwrap();
    let id = Uuid::new_v4().to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "photon.event_id",
            value: Some(id.as_bytes()),
        })
        .insert(Header {
            key: "photon.version",
            value: Some(b"0"),
        });
    txn.send(
        FutureRecord::to(&aborted)
            .key("aborted-1")
            .payload("{}")
            .headers(headers),
        TIMEOUT,
    )
    .await
    .unwrap();
    txn.abort_transaction(TIMEOUT).unwrap();
    assert!(records_in(&url, &aborted) > 0 && records_in(&url, &foreign) > 0);

    let listed = store.list_categories().await.unwrap();
    assert_eq!(listed, vec![Category::new("real").unwrap()]);
}
