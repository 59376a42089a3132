//! What a crash does to an acknowledged append, as a real server (`PHOTON_TEST_CASSANDRA_URL`)
//! reports it: `health()` names the keyspace's replication and the node's commit-log sync, and
//! `require_durable=true` connects to a durable node. The test server is one node with
//! `commitlog_sync: batch` (servers/cassandra/cassandra.yaml) and a keyspace of replication 1:
//! crash-safe (every write is on disk before it is acknowledged), but one disk holds every event.
//! The refusal itself needs a node with `commitlog_sync: periodic`, which this server is not
//! (and may not be restarted into): `src/durability.rs` tests it on the settings such a node
//! reports.

use photon_api::{Category, EventData, EventStore, ExpectedVersion, StreamId};
use photon_cassandra::CassandraStore;
use photon_conformance::server_url;

mod common;
use common::{fresh, with_options};

/// The layout of the keyspace the other tests share.
const OPTIONS: &str = "settle_ms=250&timeout_ms=2000&repair_after_ms=5000&bucket_size=16";

#[tokio::test]
async fn health_reports_a_synced_single_replica_keyspace() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let store = CassandraStore::from_url(&with_options(&url, OPTIONS))
        .await
        .unwrap();
    let detail = store.health().await.unwrap().detail;
    for needle in [
        "replication SimpleStrategy 1",
        "commitlog_sync batch",
        "an acknowledged append is on 1 replica, on disk before it is acknowledged: a crash loses nothing",
        "with one replica, losing that node's disk loses every event",
    ] {
        assert!(detail.contains(needle), "want {needle:?} in: {detail}");
    }
    assert!(!detail.contains("CAN BE LOST"), "{detail}");
}

#[tokio::test]
async fn require_durable_accepts_a_synced_node() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, &format!("{OPTIONS}&require_durable=true"));
    let store = CassandraStore::from_url(&url).await.unwrap();
    assert!(store.config().require_durable);
    let category = Category::new(fresh("durable")).unwrap();
    let stream = StreamId::new(&category, "a").unwrap();
    let event = EventData::json("Opened", &serde_json::json!({ "n": 0 })).unwrap();
    let stored = store
        .append(&stream, ExpectedVersion::NoStream, vec![event])
        .await
        .unwrap();
    assert_eq!(stored.first_version.0, 0);
}
