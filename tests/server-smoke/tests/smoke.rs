//! One real write and read-back per test server (see `scripts/servers`).
//!
//! Each test is gated on its URL variable (`PHOTON_TEST_KAFKA_URL`, `PHOTON_TEST_CASSANDRA_URL`,
//! `PHOTON_TEST_MONGO_URL`) and skipped when it is unset, unless `PHOTON_TEST_REQUIRE` names it.

use std::error::Error;
use std::time::Duration;

use mongodb::bson::{doc, Document};
use photon_conformance::server_url;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use server_smoke::{cassandra_contact_point, kafka_bootstrap};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn Error + Send + Sync>>;

/// Upper bound of each whole test, so that a hung server fails the test instead of the run.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn kafka_produce_and_consume() -> TestResult {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return Ok(());
    };
    tokio::time::timeout(TEST_TIMEOUT, kafka_round_trip(kafka_bootstrap(&url))).await?
}

async fn kafka_round_trip(bootstrap: &str) -> TestResult {
    let id = Uuid::new_v4().simple().to_string();
    let topic = format!("photon-smoke-{id}");
    let payload = format!("payload-{id}");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &options,
        )
        .await?;
    for result in created {
        result.map_err(|(name, code)| format!("create topic {name}: {code}"))?;
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "20000")
        .create()?;
    let delivery = producer
        .send(
            FutureRecord::to(&topic).key(id.as_str()).payload(&payload),
            Timeout::After(Duration::from_secs(20)),
        )
        .await
        .map_err(|(err, _)| err)?;
    println!("kafka: delivered to {topic}: {delivery:?}");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("photon-smoke-{id}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await??;
    assert_eq!(message.topic(), topic);
    assert_eq!(message.key(), Some(id.as_bytes()));
    assert_eq!(message.payload(), Some(payload.as_bytes()));
    drop(message);
    drop(consumer);

    admin.delete_topics(&[&topic], &options).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cassandra_insert_and_select() -> TestResult {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return Ok(());
    };
    tokio::time::timeout(
        TEST_TIMEOUT,
        cassandra_round_trip(cassandra_contact_point(&url)),
    )
    .await?
}

async fn cassandra_round_trip(contact_point: &str) -> TestResult {
    let session: Session = SessionBuilder::new()
        .known_node(contact_point)
        .build()
        .await?;
    session
        .query_unpaged(
            "CREATE KEYSPACE IF NOT EXISTS photon_smoke WITH replication = \
             {'class': 'SimpleStrategy', 'replication_factor': 1}",
            &[],
        )
        .await?;
    session
        .query_unpaged(
            "CREATE TABLE IF NOT EXISTS photon_smoke.items (id uuid PRIMARY KEY, body text)",
            &[],
        )
        .await?;

    let id = Uuid::new_v4();
    let body = format!("body-{id}");
    session
        .query_unpaged(
            "INSERT INTO photon_smoke.items (id, body) VALUES (?, ?)",
            (id, body.as_str()),
        )
        .await?;
    let rows = session
        .query_unpaged(
            "SELECT id, body FROM photon_smoke.items WHERE id = ?",
            (id,),
        )
        .await?
        .into_rows_result()?;
    let (read_id, read_body) = rows.single_row::<(Uuid, String)>()?;
    assert_eq!(read_id, id);
    assert_eq!(read_body, body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mongo_insert_and_find() -> TestResult {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return Ok(());
    };
    tokio::time::timeout(TEST_TIMEOUT, mongo_round_trip(&url)).await?
}

async fn mongo_round_trip(url: &str) -> TestResult {
    let client = mongodb::Client::with_uri_str(url).await?;
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon_test"));
    db.run_command(doc! { "ping": 1 }).await?;

    let id = Uuid::new_v4().simple().to_string();
    let collection = db.collection::<Document>(&format!("smoke_{id}"));
    collection
        .insert_one(doc! { "_id": &id, "n": 42_i64, "s": "hello" })
        .await?;
    let found = collection
        .find_one(doc! { "_id": &id })
        .await?
        .ok_or("inserted document not found")?;
    assert_eq!(found.get_str("_id")?, id);
    assert_eq!(found.get_i64("n")?, 42);
    assert_eq!(found.get_str("s")?, "hello");
    collection.drop().await?;
    Ok(())
}
