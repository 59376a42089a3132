//! The broker as an operator or another tool sees it, for the tests that set topics up by hand:
//! URL options, fresh prefixes, an admin client and `make_topic`. Each test file uses some of
//! them.
#![allow(dead_code)]

use std::time::Duration;

use photon_api::Uuid;
use photon_kafka::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// How long an admin or metadata request may take here.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// `url` with `options` appended.
pub(crate) fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

/// A topic prefix no other run uses, starting with `letter`.
pub(crate) fn fresh_prefix(letter: char) -> String {
    format!("{letter}{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// The URL's bootstrap servers.
pub(crate) fn bootstrap(url: &str) -> String {
    KafkaConfig::from_url(url).unwrap().bootstrap_servers
}

/// A plain admin client of the URL's brokers.
pub(crate) fn admin(url: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .create()
        .unwrap()
}

/// Admin options bounded by [`TIMEOUT`].
pub(crate) fn options() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT))
}

/// Makes `topic` by hand, as an operator or the broker's auto-create would, with `settings`,
/// and waits until the metadata shows its partitions.
pub(crate) async fn make_topic(url: &str, topic: &str, partitions: i32, settings: &[(&str, &str)]) {
    let new = settings.iter().fold(
        NewTopic::new(topic, partitions, TopicReplication::Fixed(1)),
        |new, (k, v)| new.set(k, v),
    );
    for r in admin(url).create_topics([&new], &options()).await.unwrap() {
        r.unwrap();
    }
    wait_for_partitions(url, topic, partitions as usize).await;
}

/// Waits until the metadata shows `n` partitions of `topic`.
pub(crate) async fn wait_for_partitions(url: &str, topic: &str, n: usize) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap(url))
        .create()
        .unwrap();
    for _ in 0..200 {
        let md = consumer.fetch_metadata(Some(topic), TIMEOUT).unwrap();
        if md.topics()[0].partitions().len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{topic} never showed {n} partitions");
}
