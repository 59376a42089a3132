//! How many transactional producers a store keeps, against a real broker
//! (`PHOTON_TEST_KAFKA_URL`): a writer cycling over more partitions than the old fixed cache of
//! 32 keeps a producer for each (no `init_transactions` per append), and `max_producers` bounds
//! them when asked to.

use futures::StreamExt;
use photon_api::{EventData, EventStore, ExpectedVersion, StreamId, Uuid};
use photon_conformance::server_url;
use photon_kafka::{partition_for, KafkaStore};

fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

fn event(n: u64) -> EventData {
    EventData::json("Numbered", &serde_json::json!({ "n": n })).unwrap()
}

/// One stream of category `category` in each of `partitions` partitions.
fn one_stream_per_partition(category: &str, partitions: i32) -> Vec<StreamId> {
    let mut found: Vec<Option<StreamId>> = vec![None; partitions as usize];
    let mut i = 0;
    while found.iter().any(Option::is_none) {
        let s = StreamId::parse(format!("{category}-{i}")).unwrap();
        let p = partition_for(&s, partitions) as usize;
        found[p].get_or_insert(s);
        i += 1;
    }
    found.into_iter().map(Option::unwrap).collect()
}

async fn cycle(store: &KafkaStore, streams: &[StreamId], round: u64) {
    for s in streams {
        store
            .append(s, ExpectedVersion::Any, vec![event(round)])
            .await
            .unwrap();
    }
}

/// Issue 14 item 5: one writer appending to 40 partitions in turn takes each over once, then
/// keeps all 40 producers: the second round takes nothing over again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_cycling_over_40_partitions_keeps_its_producers() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("w{}", &Uuid::new_v4().simple().to_string()[..12]);
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=40"),
    ))
    .await
    .unwrap();
    let streams = one_stream_per_partition("spread", 40);
    cycle(&store, &streams, 0).await;
    let first = store.writer_stats();
    assert!(first.take_overs >= 40, "{first:?}");
    cycle(&store, &streams, 1).await;
    let second = store.writer_stats();
    assert_eq!(
        second.take_overs - first.take_overs,
        0,
        "producers re-initialised while cycling over 40 partitions: {first:?} then {second:?}"
    );
    assert_eq!(second.producers, 40, "{second:?}");
}

/// `max_producers` bounds the producers a store keeps, whatever it cycles over; the cost is a
/// take-over per hand-back (the README says so, and a warning does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_producers_bounds_the_producers_kept() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("w{}", &Uuid::new_v4().simple().to_string()[..12]);
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=6&max_producers=4"),
    ))
    .await
    .unwrap();
    let streams = one_stream_per_partition("bounded", 6);
    cycle(&store, &streams, 0).await;
    cycle(&store, &streams, 1).await;
    let stats = store.writer_stats();
    assert!(stats.producers <= 4, "{stats:?}");
    assert!(
        stats.take_overs >= 12,
        "each hand-back is a take-over: {stats:?}"
    );
}

/// Issue 14 item 7: the version indexes are bounded in bytes (`max_index_bytes`). Over the
/// bound, the partition used least recently is dropped (index and producer) and rebuilt by
/// reading it when used again: its streams' versions are decided exactly as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_over_max_index_bytes_are_dropped_and_rebuilt_exactly() {
    use photon_api::{Error, Version};
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("w{}", &Uuid::new_v4().simple().to_string()[..12]);
    let streams = one_stream_per_partition("indexed", 2);
    for (bound, dropped) in [("", false), ("&max_index_bytes=1", true)] {
        let store = KafkaStore::from_url(&with_options(
            &url,
            &format!(
                "prefix={prefix}{}&partitions=2{bound}",
                if dropped { "b" } else { "a" }
            ),
        ))
        .await
        .unwrap();
        for s in &streams {
            store
                .append(s, ExpectedVersion::NoStream, vec![event(0)])
                .await
                .unwrap();
        }
        // Partition 0 was used least recently: over the bound its index is gone.
        let before = store.writer_stats();
        let r = store
            .append(&streams[0], ExpectedVersion::NoStream, vec![event(1)])
            .await;
        match r {
            Err(Error::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, Some(Version(0))),
            other => panic!("{bound}: a stale expectation after the index was dropped: {other:?}"),
        }
        let r = store
            .append(
                &streams[0],
                ExpectedVersion::Exact(Version(0)),
                vec![event(2)],
            )
            .await
            .unwrap();
        assert_eq!(r.first_version, Version(1));
        let after = store.writer_stats();
        assert_eq!(after.indexes_dropped > 0, dropped, "{bound}: {after:?}");
        assert_eq!(
            after.take_overs > before.take_overs,
            dropped,
            "{bound}: a dropped partition is taken over again, a kept one is not: {before:?} {after:?}"
        );
    }
}

/// Issue 14's speed section: the first append to a topic initialises a producer for each of
/// the topic's partitions at once, in the background, so the first append to each later one
/// does not pay `init_transactions` in its own time. Before, the store held one producer after
/// one append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_append_to_a_topic_warms_a_producer_for_each_partition() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("w{}", &Uuid::new_v4().simple().to_string()[..12]);
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=6"),
    ))
    .await
    .unwrap();
    let streams = one_stream_per_partition("warm", 6);
    cycle(&store, &streams[..1], 0).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.writer_stats().producers < 6 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let warmed = store.writer_stats();
    assert_eq!(warmed.producers, 6, "{warmed:?}");
    // The warm producers are the ones the take-overs use: no seventh producer, and every
    // partition appends.
    cycle(&store, &streams, 1).await;
    let after = store.writer_stats();
    assert_eq!(after.producers, 6, "{after:?}");
    assert_eq!(after.take_overs, 6, "{after:?}");
}

/// An append is answered Ok only once its records are readable, i.e. below the partition's last
/// stable offset (the one-request look of `stable_end`, which must not see the high watermark):
/// while another client's transaction stays open in the partition, records behind it are not
/// readable, so the append answers `Unavailable` (committed, not seen readable) within its
/// deadline, and after that transaction ends its re-send is answered as a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_behind_an_open_transaction_is_not_answered_ok() {
    use rdkafka::producer::Producer;
    let Some((store, s, foreign, timeout)) = behind_an_open_transaction("open").await else {
        return;
    };
    let batch = vec![event(1)];
    let started = std::time::Instant::now();
    let answer = store
        .append(
            &s,
            ExpectedVersion::Exact(photon_api::Version(0)),
            batch.clone(),
        )
        .await;
    let took = started.elapsed();
    let e = answer.expect_err("answered Ok while its records were not readable");
    assert!(e.is_retryable(), "{e:?}");
    assert!(took < std::time::Duration::from_millis(4_600), "{took:?}");
    foreign.abort_transaction(timeout).unwrap();
    let retried = store
        .append(&s, ExpectedVersion::Exact(photon_api::Version(0)), batch)
        .await
        .unwrap();
    assert_eq!(retried.first_version, photon_api::Version(1));
    let versions: Vec<u64> = store
        .read_stream(&s, Default::default())
        .map(|e| e.unwrap().version.0)
        .collect()
        .await;
    assert_eq!(versions, vec![0, 1]);
}

/// Warm producers count against `max_producers` and are the first to go when a take-over needs
/// room (found by review): before, with `max_producers=4` a store's first append to category
/// `a` warmed three more, and then every alternate append to `a` and `b` closed the other's
/// producer in use, a take-over per append, while the unused warm ones stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_producers_give_way_to_producers_in_use() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("w{}", &Uuid::new_v4().simple().to_string()[..12]);
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=6&max_producers=4"),
    ))
    .await
    .unwrap();
    let a = StreamId::parse("alpha-x").unwrap();
    let b = StreamId::parse("beta-x").unwrap();
    store
        .append(&a, ExpectedVersion::Any, vec![event(0)])
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    for round in 1..=10 {
        for s in [&a, &b] {
            store
                .append(s, ExpectedVersion::Any, vec![event(round)])
                .await
                .unwrap();
        }
    }
    let stats = store.writer_stats();
    assert!(stats.take_overs <= 2, "{stats:?}");
    assert!(stats.producers <= 4, "{stats:?}");
}

/// A re-send of a batch committed in the last group, whose records are not readable yet, is not
/// answered Ok before they are (found by review of the pipelined commit: the next group found
/// the batch in the index and answered it at once). With another client's transaction open in
/// the partition nothing behind it becomes readable, so both the first send and the re-send
/// answer `Unavailable`; after it ends, a further re-send is the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_of_a_batch_not_readable_yet_is_not_answered_ok() {
    use rdkafka::producer::Producer;
    let Some((store, s, foreign, timeout)) = behind_an_open_transaction("resend").await else {
        return;
    };
    let batch = vec![event(1)];
    let exact = ExpectedVersion::Exact(photon_api::Version(0));
    let first = {
        let (store, s, batch) = (store.clone(), s.clone(), batch.clone());
        tokio::spawn(async move { store.append(&s, exact, batch).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let resend = store.append(&s, exact, batch.clone()).await;
    let e = resend.expect_err("a re-send answered Ok while its batch was not readable");
    assert!(e.is_retryable(), "{e:?}");
    let e = first
        .await
        .unwrap()
        .expect_err("answered Ok while not readable");
    assert!(e.is_retryable(), "{e:?}");
    foreign.abort_transaction(timeout).unwrap();
    let retried = store.append(&s, exact, batch).await.unwrap();
    assert_eq!(retried.first_version, photon_api::Version(1));
}

/// Warm-ups of several topics at once stay within `max_producers` (found by review: each
/// looked at the room when it began, and a producer counts alive only once initialised, so
/// three first appends at once kept about 12 producers with `max_producers=4`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_ups_of_several_topics_at_once_stay_within_max_producers() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("w{}", &Uuid::new_v4().simple().to_string()[..12]);
    let store = KafkaStore::from_url(&with_options(
        &url,
        &format!("prefix={prefix}&partitions=6&max_producers=4"),
    ))
    .await
    .unwrap();
    let streams: Vec<StreamId> = ["alpha-x", "beta-x", "gamma-x"]
        .iter()
        .map(|s| StreamId::parse(*s).unwrap())
        .collect();
    futures::future::join_all(
        streams
            .iter()
            .map(|s| store.append(s, ExpectedVersion::Any, vec![event(0)])),
    )
    .await
    .into_iter()
    .for_each(|r| {
        r.unwrap();
    });
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let stats = store.writer_stats();
    assert!(stats.producers <= 4, "{stats:?}");
}

/// A store (partitions=1, timeout_ms=1500) holding one event in `<category>-1`, behind which
/// another client's transaction is left open with one record in the partition: nothing appended
/// after it is readable until it ends. None without a broker.
async fn behind_an_open_transaction(
    category: &str,
) -> Option<(
    KafkaStore,
    StreamId,
    rdkafka::producer::FutureProducer,
    std::time::Duration,
)> {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    let url = server_url("kafka", "PHOTON_TEST_KAFKA_URL")?;
    let prefix = format!("w{}", &Uuid::new_v4().simple().to_string()[..12]);
    let url = with_options(
        &url,
        &format!("prefix={prefix}&partitions=1&timeout_ms=1500"),
    );
    let store = KafkaStore::from_url(&url).await.unwrap();
    let s = StreamId::parse(format!("{category}-1")).unwrap();
    store
        .append(&s, ExpectedVersion::NoStream, vec![event(0)])
        .await
        .unwrap();
    let config = photon_kafka::KafkaConfig::from_url(&url).unwrap();
    let topic = config.topic(category);
    let foreign: FutureProducer = config
        .transactional_producer_config(&format!("foreign-{prefix}"))
        .create()
        .unwrap();
    let timeout = std::time::Duration::from_secs(10);
    foreign.init_transactions(timeout).unwrap();
    foreign.begin_transaction().unwrap();
    foreign
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key("foreign")
                .payload("x"),
            timeout,
        )
        .await
        .unwrap();
    Some((store, s, foreign, timeout))
}
