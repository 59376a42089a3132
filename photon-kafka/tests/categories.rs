//! Listing categories over many topics, against a real broker (`PHOTON_TEST_KAFKA_URL`): each
//! topic is checked for a committed photon event, and with hundreds of topics that check must
//! stay proportionate (it took 220 s on a broker with hundreds of topics). The listing is
//! exact here (topics with an event listed, topics with only other tools' records or none not);
//! the time it took is printed, not asserted.

use std::time::{Duration, Instant};

use photon_api::{Category, EventStore, Uuid};
use photon_conformance::server_url;
use photon_kafka::{header, KafkaConfig, KafkaStore};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Topics of the listing, of [`PARTITIONS`] each (created [`CREATED_AT_ONCE`] per request: a
/// broker that already holds a thousand topics times out on a request for a hundred).
const TOPICS: usize = 90;
const PARTITIONS: i32 = 3;
const CREATED_AT_ONCE: usize = 10;
/// Records another tool wrote into each topic that holds no photon event, in one partition:
/// more than the first window a listing reads back from a partition's end.
const FOREIGN_RECORDS: usize = 200;

fn options() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT))
}

/// Of 90 topics of 3 partitions under one prefix, a third hold a committed photon event (in
/// their last partition, behind 200 foreign records in another), a third only 200 records of
/// another tool, a third nothing: the listing names exactly the first third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_categories_over_many_topics_names_exactly_those_with_events() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("c{}", &Uuid::new_v4().simple().to_string()[..12]);
    let url = format!(
        "{url}{}prefix={prefix}",
        if url.contains('?') { "&" } else { "?" }
    );
    let config = KafkaConfig::from_url(&url).unwrap();
    let admin: AdminClient<DefaultClientContext> = config.client_config().create().unwrap();
    let names: Vec<String> = (0..TOPICS).map(|i| format!("{prefix}.cat{i:03}")).collect();
    let created = Instant::now();
    for chunk in names.chunks(CREATED_AT_ONCE) {
        let new: Vec<NewTopic<'_>> = chunk
            .iter()
            .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
            .collect();
        for r in admin.create_topics(&new, &options()).await.unwrap() {
            r.unwrap();
        }
    }
    eprintln!("created {TOPICS} topics in {:?}", created.elapsed());
    let producer: FutureProducer = config.producer_config().create().unwrap();
    let mut sends = Vec::new();
    for (i, topic) in names.iter().enumerate() {
        if i % 3 == 2 {
            continue;
        }
        for n in 0..FOREIGN_RECORDS {
            let record = FutureRecord::to(topic)
                .partition(0)
                .key("other-tool")
                .payload(&b"not photon's"[..])
                .headers(OwnedHeaders::new().insert(Header {
                    key: "origin",
                    value: Some(format!("{n}").as_bytes()),
                }));
            sends.push(producer.send(record, Timeout::After(TIMEOUT)));
        }
        if i % 3 == 0 {
            let id = Uuid::new_v4().to_string();
            let record = FutureRecord::to(topic)
                .partition(PARTITIONS - 1)
                .key("cat-1")
                .payload(&b"{}"[..])
                .headers(OwnedHeaders::new().insert(Header {
                    key: header::EVENT_ID,
                    value: Some(id.as_bytes()),
                }));
            sends.push(producer.send(record, Timeout::After(TIMEOUT)));
        }
    }
    for s in futures::future::join_all(sends).await {
        s.unwrap();
    }

    let store = KafkaStore::from_url(&url).await.unwrap();
    let started = Instant::now();
    let listed = store.list_categories().await.unwrap();
    let took = started.elapsed();
    eprintln!("list_categories over {TOPICS} topics of {PARTITIONS} partitions: {took:?}");
    let want: Vec<Category> = (0..TOPICS)
        .filter(|i| i % 3 == 0)
        .map(|i| Category::new(format!("cat{i:03}")).unwrap())
        .collect();
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names_ref, &options()).await;
    assert_eq!(listed, want);
}
