//! Registers on Kafka against a real broker (`PHOTON_TEST_KAFKA_URL`): the registers topic is
//! created compacted with settings that let the cleaner reclaim replaced saves, a registers topic
//! made by hand that would keep every save is refused naming `cleanup.policy`, two stores saving
//! alternately to one register each win exactly when their expectation holds (the fence passes
//! between them, and a store's view from before it lost the fence never wins a stale save), and
//! the cleaner does reclaim replaced saves; a record that is not a register save refuses its
//! register (naming partition and offset) while another partition's registers load; register
//! fences count as producers within `max_producers`; a topic made again is noticed; and saves
//! of different buckets of one partition keep their own fences. The contract's own cases run
//! in conformance.rs.

use std::time::{Duration, Instant};

use photon_api::{Bytes, Error, EventStore, Uuid};
use photon_conformance::server_url;
use photon_kafka::{KafkaStore, TopicRefused};
use rdkafka::admin::{NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

#[path = "support/admin.rs"]
mod admin;
use admin::{admin, bootstrap, fresh_prefix, make_topic, options, with_options, TIMEOUT};

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

fn text(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

/// A store's first save creates `<prefix>.photon-registers` compacted, never deleting by age or
/// size, with a 10-minute `segment.ms` and `max.compaction.lag.ms` and a dirty ratio of 0.1 (so
/// replaced saves are reclaimed within minutes, not the week Kafka's default segment takes),
/// and records that hold the largest value. It is not a category: no listing shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registers_topic_is_created_compacted() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('r');
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=3"),
    ))
    .await
    .unwrap();
    store
        .save_register("view/a", None, Uuid::new_v4(), text("x"))
        .await
        .unwrap();
    let topic = format!("{prefix}.photon-registers");
    let configs = admin(&url)
        .describe_configs([&ResourceSpecifier::Topic(&topic)], &options())
        .await
        .unwrap();
    let config = configs.into_iter().next().unwrap().unwrap();
    let value = |name: &str| {
        config
            .get(name)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("{topic} shows no {name}"))
    };
    assert_eq!(value("cleanup.policy"), "compact");
    assert_eq!(value("segment.ms"), "600000");
    assert_eq!(value("max.compaction.lag.ms"), "600000");
    assert_eq!(value("min.cleanable.dirty.ratio"), "0.1");
    assert_eq!(value("retention.ms"), "-1");
    assert_eq!(value("retention.bytes"), "-1");
    assert_eq!(value("unclean.leader.election.enable"), "false");
    let max: usize = value("max.message.bytes").parse().unwrap();
    assert!(max > photon_api::MAX_REGISTER_VALUE + 1024, "{max}");
    // 16 partitions by default (`register_partitions`), whatever `partitions` says for events.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(&topic), TIMEOUT).unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 16);
    assert!(store.list_categories().await.unwrap().is_empty());
}

/// A registers topic made by hand without compaction would keep every save for good: refused
/// with a `TopicRefused` naming `cleanup.policy`, for loads and saves, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registers_topic_that_is_not_compacted_is_refused() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('r');
    let topic = format!("{prefix}.photon-registers");
    make_topic(
        &url,
        &topic,
        3,
        &[("cleanup.policy", "delete"), ("retention.ms", "-1")],
    )
    .await;
    let store = KafkaStore::from_url(&with_options(&url, &format!("prefix={prefix}")))
        .await
        .unwrap();
    let saved = store
        .save_register("view/a", None, Uuid::new_v4(), text("x"))
        .await
        .unwrap_err();
    let loaded = store.load_register("view/a").await.unwrap_err();
    for e in [saved, loaded] {
        let why = refusal(&e).unwrap_or_else(|| panic!("not a TopicRefused: {e:?}"));
        assert_eq!(why.setting(), "cleanup.policy", "{why}");
        assert_eq!(why.topic(), topic);
        assert!(e.to_string().contains(&topic), "{e}");
        assert!(why.to_string().contains("cleanup.policy=delete"), "{why}");
        assert!(!e.is_retryable());
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    for p in 0..3 {
        assert_eq!(consumer.fetch_watermarks(&topic, p, TIMEOUT).unwrap().1, 0);
    }
}

/// Two stores (own producers, as two processes) save alternately to one register, each
/// expecting the revision it last saw itself: after the first round each store's expectation is
/// one behind, so each such save is refused with the revision the other store saved, and the
/// store then saves from what it loads. Each stale save is made by a store that held the fence
/// when it last saved and has read nothing since (a third store checks each round): its view
/// says its expectation holds, and only the fence hand-over (its commit fails, it reads, it
/// decides again) keeps that stale save from winning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_saving_alternately_each_win_exactly_when_their_expectation_holds() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let url = with_options(&url, "partitions=3");
    let stores = [
        KafkaStore::from_url(&url).await.unwrap(),
        KafkaStore::from_url(&url).await.unwrap(),
    ];
    // Checks each round from outside: a load by one of the two would refresh its view.
    let observer = KafkaStore::from_url(&url).await.unwrap();
    let name = format!("lease/{}", Uuid::new_v4());
    let started = Instant::now();
    // What each store last saw of the register (None: never saved).
    let mut seen: [Option<u64>; 2] = [None, None];
    let mut revision: Option<u64> = None;
    for round in 0..12u64 {
        let i = (round % 2) as usize;
        let store = &stores[i];
        let id = Uuid::new_v4();
        let value = text(&format!("{round}"));
        let result = store.save_register(&name, seen[i], id, value.clone()).await;
        if seen[i] == revision {
            // Only the first save of each store can hold: the other saved since.
            assert_eq!(
                result.unwrap(),
                revision.map_or(0, |r| r + 1),
                "round {round}"
            );
            revision = Some(revision.map_or(0, |r| r + 1));
        } else {
            match result {
                Err(Error::RevisionConflict {
                    expected, actual, ..
                }) => assert_eq!((expected, actual), (seen[i], revision), "round {round}"),
                other => panic!("round {round}: a stale save answered {other:?}"),
            }
            // Now up to date, from a load: this save must win, taking the fence back.
            let loaded = store.load_register(&name).await.unwrap().unwrap();
            assert_eq!(Some(loaded.revision), revision);
            let r = store
                .save_register(&name, revision, id, value.clone())
                .await
                .unwrap();
            assert_eq!(Some(r), revision.map(|r| r + 1), "round {round}");
            revision = Some(r);
        }
        seen[i] = revision;
        let seen_outside = observer.load_register(&name).await.unwrap().unwrap();
        assert_eq!(
            (
                Some(seen_outside.revision),
                seen_outside.save_id,
                seen_outside.value
            ),
            (revision, id, value),
            "round {round}"
        );
    }
    // One save stored per round.
    assert_eq!(revision, Some(11));
    println!(
        "12 rounds of alternating saves between two stores: {:?}",
        started.elapsed()
    );
}

/// The cleaner reclaims replaced saves: a registers topic made with a tiny `segment.ms` and
/// dirty ratio, 300 saves to 3 registers, then one more save after the segment's time has
/// passed (a segment rolls on a write), and within the broker's cleaner passes
/// (`log.cleaner.backoff.ms`, 15 s by default) the partition holds a handful of records, not
/// 300; every register still loads its latest save, in a new store too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_reclaims_replaced_saves() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('r');
    let topic = format!("{prefix}.photon-registers");
    make_topic(
        &url,
        &topic,
        1,
        &[
            ("cleanup.policy", "compact"),
            ("segment.ms", "100"),
            ("min.cleanable.dirty.ratio", "0.01"),
            ("max.compaction.lag.ms", "100"),
            ("max.message.bytes", "1100000"),
        ],
    )
    .await;
    let store_url = with_options(&url, &format!("prefix={prefix}"));
    let store = KafkaStore::from_url(&store_url).await.unwrap();
    const SAVES: u64 = 300;
    let names = ["a", "b", "c"];
    let mut last = Vec::new();
    let saving = Instant::now();
    for (i, name) in names.iter().enumerate() {
        let mut expected = None;
        let mut id = Uuid::nil();
        for n in 0..SAVES / 3 {
            id = Uuid::new_v4();
            let r = store
                .save_register(name, expected, id, text(&format!("{i}:{n}")))
                .await
                .unwrap();
            expected = Some(r);
        }
        last.push((expected.unwrap(), id));
    }
    println!(
        "{SAVES} saves by the fence holder, one at a time: {:?}",
        saving.elapsed()
    );
    let started = Instant::now();
    let mut held = i64::MAX;
    while started.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A write rolls the segment whose time has passed, so the saves above become cleanable.
        let id = Uuid::new_v4();
        let r = store
            .save_register("a", Some(last[0].0), id, text("roll"))
            .await
            .unwrap();
        last[0] = (r, id);
        held = committed_records(&url, &topic);
        if held < 20 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "after {SAVES} saves and {:?} of cleaning, {topic} holds {held} records",
        started.elapsed()
    );
    assert!(
        held < 20,
        "{held} records of {SAVES} saves left after compaction"
    );
    let fresh = KafkaStore::from_url(&store_url).await.unwrap();
    for (name, (revision, id)) in names.iter().zip(&last) {
        let loaded = fresh.load_register(name).await.unwrap().unwrap();
        assert_eq!(
            (loaded.revision, loaded.save_id),
            (*revision, *id),
            "{name}"
        );
    }
}

/// The committed records partition 0 of `topic` holds, read with a plain read_committed
/// consumer from its start to its end.
fn committed_records(url: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .set("group.id", "photon-test")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let (_, end) = consumer.fetch_watermarks(topic, 0, TIMEOUT).unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut count = 0;
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                count += 1;
                if m.offset() + 1 >= end {
                    break;
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    count
}

/// The high watermarks of every partition of `topic` (uncommitted records and markers counted).
fn high_marks(url: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| consumer.fetch_watermarks(topic, p, TIMEOUT).unwrap().1)
        .collect()
}

/// The partition whose high watermark moved between `before` and now.
fn moved(url: &str, topic: &str, before: &[i64]) -> i32 {
    let now = high_marks(url, topic, before.len() as i32);
    let moved: Vec<i32> = (0..before.len())
        .filter(|&p| now[p] != before[p])
        .map(|p| p as i32)
        .collect();
    assert_eq!(moved.len(), 1, "{before:?} -> {now:?}");
    moved[0]
}

/// Writes a record by hand (no transaction, as another tool would) to `topic`/`p`; its offset.
async fn produce_raw(url: &str, topic: &str, p: i32, key: &str, value: Option<&[u8]>) -> i64 {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .create()
        .unwrap();
    let mut record = FutureRecord::<str, [u8]>::to(topic).partition(p).key(key);
    if let Some(v) = value {
        record = record.payload(v);
    }
    producer.send(record, TIMEOUT).await.unwrap().offset
}

/// Saves registers named `<stem>-<i>` until one lands in each of the topic's 2 partitions:
/// the names by partition, each with the value saved.
async fn one_per_partition(
    store: &KafkaStore,
    url: &str,
    topic: &str,
    stem: &str,
    value: &Bytes,
) -> [String; 2] {
    let mut found: [Option<String>; 2] = [None, None];
    for i in 0.. {
        let name = format!("{stem}-{i}");
        let before = high_marks(url, topic, 2);
        store
            .save_register(&name, None, Uuid::new_v4(), value.clone())
            .await
            .unwrap();
        let p = moved(url, topic, &before) as usize;
        found[p].get_or_insert(name);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.map(Option::unwrap)
}

/// A record under a register's key that is not a register save (a tombstone, a future format)
/// refuses that register with an error naming the record's partition and offset, where it was
/// once passed by (and the register's older save answered). A store reads a partition only
/// when one of its registers is first used: a register of the other partition loads its value
/// (100 KB, read back from its offset once nothing new was committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_is_not_a_register_save_refuses_its_register() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('r');
    let topic = format!("{prefix}.photon-registers");
    let store_url = with_options(&url, &format!("prefix={prefix}&register_partitions=2"));
    let writer = KafkaStore::from_url(&store_url).await.unwrap();
    let big = Bytes::from(vec![7u8; 100_000]);
    // The first save creates the topic; each partition's first record is then a register.
    writer
        .save_register("first", None, Uuid::new_v4(), big.clone())
        .await
        .unwrap();
    let [a, b] = one_per_partition(&writer, &url, &topic, "view", &big).await;
    let [other_a, _] = one_per_partition(&writer, &url, &topic, "lease", &big).await;
    let tombstone = produce_raw(&url, &topic, 0, &a, None).await;

    let reader = KafkaStore::from_url(&store_url).await.unwrap();
    // Partition 1 holds only saves: read, and loaded twice (the second from the offset).
    for _ in 0..2 {
        let loaded = reader.load_register(&b).await.unwrap().unwrap();
        assert_eq!((loaded.revision, loaded.value.len()), (0, big.len()));
        assert_eq!(loaded.value, big);
    }
    let e = match reader.load_register(&a).await {
        Err(e) => e,
        Ok(r) => panic!("answered revision {:?}", r.map(|r| r.revision)),
    };
    let at = format!("{topic}/0@{tombstone}");
    assert!(e.to_string().contains(&at), "{e}");
    assert!(e.to_string().contains("tombstone"), "{e}");
    assert!(!e.is_retryable(), "{e:?}");
    // The partition stays refused, for every register in it and for saves too.
    let e = reader.load_register(&other_a).await.unwrap_err();
    assert!(e.to_string().contains(&at), "{e}");
    let e = reader
        .save_register(&a, Some(0), Uuid::new_v4(), text("x"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&at), "{e}");

    // A future format under a register's key, after its save, in the other partition.
    let mut future = vec![2u8];
    future.extend_from_slice(&[0; 40]);
    let newer = produce_raw(&url, &topic, 1, &b, Some(&future)).await;
    let e = reader.load_register(&b).await.unwrap_err();
    assert!(e.to_string().contains(&format!("{topic}/1@{newer}")), "{e}");
    assert!(e.to_string().contains("format byte 2"), "{e}");
}

/// Register fences are producers like any other: counted in `WriterStats` (producers alive,
/// take-overs) and kept within `max_producers`: with a limit of 1, a save to the other
/// partition closes the idle fence producer of the first, and a later save there takes the
/// fence again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_fences_count_as_producers_and_keep_to_max_producers() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('r');
    let topic = format!("{prefix}.photon-registers");
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&register_partitions=2&max_producers=1&warm_producers=false"),
    ))
    .await
    .unwrap();
    // The first save creates the topic.
    store
        .save_register("first", None, Uuid::new_v4(), text("0"))
        .await
        .unwrap();
    let [a, b] = one_per_partition(&store, &url, &topic, "view", &text("0")).await;
    let stats = store.writer_stats();
    assert_eq!(stats.producers, 1, "{stats:?}");
    let taken = stats.take_overs;
    assert!(taken >= 2, "{stats:?}");
    let mut revisions = [0u64, 0];
    for round in 0..4 {
        for (i, name) in [&a, &b].into_iter().enumerate() {
            let r = store
                .save_register(name, Some(revisions[i]), Uuid::new_v4(), text("n"))
                .await
                .unwrap();
            revisions[i] = r;
            let stats = store.writer_stats();
            assert_eq!(stats.producers, 1, "round {round}: {stats:?}");
        }
    }
    // Each save took its partition's fence back from the other's producer.
    let stats = store.writer_stats();
    assert_eq!(stats.take_overs, taken + 8, "{stats:?}");
    assert_eq!(store.load_register(&a).await.unwrap().unwrap().revision, 4);
    assert_eq!(store.load_register(&b).await.unwrap().unwrap().revision, 4);
    drop(store);
}

/// A registers topic deleted and made again under a store that had read it (its stable end now
/// below where the store had read) is not taken for the same topic: the next call refuses,
/// saying so, and the one after reads the new topic from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registers_topic_made_again_is_noticed() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('r');
    let topic = format!("{prefix}.photon-registers");
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&register_partitions=1"),
    ))
    .await
    .unwrap();
    let r = store
        .save_register("a", None, Uuid::new_v4(), text("0"))
        .await
        .unwrap();
    store
        .save_register("a", Some(r), Uuid::new_v4(), text("1"))
        .await
        .unwrap();
    for r in admin(&url)
        .delete_topics(&[topic.as_str()], &options())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let settings = [
        ("cleanup.policy", "compact"),
        ("max.message.bytes", "1100000"),
    ];
    let started = Instant::now();
    loop {
        let new = settings.iter().fold(
            NewTopic::new(&topic, 1, TopicReplication::Fixed(1)),
            |new, (k, v)| new.set(k, v),
        );
        let made = admin(&url).create_topics([&new], &options()).await.unwrap();
        match made.into_iter().next().unwrap() {
            Ok(_) => break,
            // The deletion is still under way.
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                println!("making {topic} again: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("making {topic} again: {e:?}"),
        }
    }
    let e = loop {
        match store.load_register("a").await {
            Err(e) if e.to_string().contains("made again") => break e,
            // The new topic's partition may need a moment to get a leader.
            Err(e) if e.is_retryable() && started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("a load after the topic was made again answered {other:?}"),
        }
    };
    assert!(e.to_string().contains(&format!("{topic}/0")), "{e}");
    assert!(!e.is_retryable(), "{e:?}");
    assert_eq!(store.load_register("a").await.unwrap(), None);
    assert_eq!(
        store
            .save_register("a", None, Uuid::new_v4(), text("again"))
            .await
            .unwrap(),
        0
    );
}

/// Fences are per bucket of names within a partition: two stores (as two processes) saving
/// different registers of one partition ("a" and "b", of different buckets) each keep their
/// fence, so neither save aborts the other's and each later save needs no take-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_of_different_registers_of_one_partition_do_not_take_each_others_fence() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('r');
    let url = with_options(&url, &format!("prefix={prefix}&register_partitions=1"));
    let stores = [
        KafkaStore::from_url(&url).await.unwrap(),
        KafkaStore::from_url(&url).await.unwrap(),
    ];
    let mut revisions = [None, None];
    for round in 0..4 {
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let r = stores[i]
                .save_register(name, revisions[i], Uuid::new_v4(), text(name))
                .await
                .unwrap();
            assert_eq!(r, round, "{name}");
            revisions[i] = Some(r);
        }
    }
    for store in &stores {
        // One take-over each: the first save.
        assert_eq!(
            store.writer_stats().take_overs,
            1,
            "{:?}",
            store.writer_stats()
        );
    }
    let b = stores[0].load_register("b").await.unwrap().unwrap();
    assert_eq!((b.revision, b.value), (3, text("b")));
}

/// Kafka's last stable offset stops at the first open transaction of the partition, whoever
/// holds it: with one fence per bucket, another bucket's transaction open below a save can keep
/// that save (committed by the bucket's previous holder) above the stable end after a store takes
/// the fence over. Here store B holds the fence of "n"'s bucket; a raw transaction opens in the
/// registers partition; B saves "n" at revision 1 (committed, waiting to be readable); store A
/// then saves "n" with the same expectation and takes the fence; the raw transaction aborts. Exactly one of them is answered Ok: A waits for
/// the stable end to reach the log end it saw after the take-over, then reads B's save and is
/// refused. (Both were answered Ok before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_take_over_reads_saves_held_above_the_stable_end_by_another_transaction() {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = fresh_prefix('r');
    let url = with_options(
        &url,
        &format!("prefix={prefix}&register_partitions=1&timeout_ms=10000"),
    );
    let topic = format!("{prefix}.photon-registers");
    let (a, b) = (
        KafkaStore::from_url(&url).await.unwrap(),
        KafkaStore::from_url(&url).await.unwrap(),
    );
    // Creates the topic (one partition); B holds the fence of n's bucket from here on.
    b.save_register("n", None, Uuid::new_v4(), text("b0"))
        .await
        .unwrap();

    let open: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(&url))
        .set("transactional.id", format!("{prefix}-other-tool"))
        .create()
        .unwrap();
    open.init_transactions(TIMEOUT).unwrap();
    open.begin_transaction().unwrap();
    open.send(
        FutureRecord::<str, [u8]>::to(&topic)
            .partition(0)
            .key("other")
            .payload(b"open"),
        TIMEOUT,
    )
    .await
    .unwrap();
    let uncommitted = |url: &str| {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap(url))
            .set("isolation.level", "read_uncommitted")
            .create()
            .unwrap();
        c.fetch_watermarks(&topic, 0, TIMEOUT).unwrap().1
    };
    let before = uncommitted(&url);

    // B decides from what it holds (no take-over, no wait) and commits above the open record.
    let b_save = tokio::spawn(async move {
        let r = b
            .save_register("n", Some(0), Uuid::new_v4(), text("b"))
            .await;
        (r, b)
    });
    // B's record and its commit marker are in the log: B's transaction is complete.
    let waited = Instant::now();
    while uncommitted(&url) < before + 2 {
        assert!(waited.elapsed() < TIMEOUT, "B's save did not reach the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reads to the stable end (revision 0 only), takes the fence over from B and must not
    // decide before it has read B's revision 1.
    let a_save = tokio::spawn(async move {
        let r = a
            .save_register("n", Some(0), Uuid::new_v4(), text("a"))
            .await;
        (r, a)
    });
    // Long enough for A to take the fence and read (the scenario, not an assertion).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    open.abort_transaction(TIMEOUT).unwrap();

    let (from_b, b) = b_save.await.unwrap();
    let (from_a, _a) = a_save.await.unwrap();
    assert_eq!(from_b.as_ref().ok(), Some(&1), "B: {from_b:?}");
    assert!(
        matches!(
            from_a,
            Err(Error::RevisionConflict {
                expected: Some(0),
                actual: Some(1),
                ..
            })
        ),
        "A: {from_a:?}"
    );
    let n = b.load_register("n").await.unwrap().unwrap();
    assert_eq!((n.revision, n.value), (1, text("b")));
}
