//! A store works again once its brokers answer after an outage, also when librdkafka's own
//! client would stay without a broker for good.
//!
//! A Kafka broker that is starting up (KRaft, not yet unfenced) answers a metadata request for
//! a topic with the topic and no broker. librdkafka (2.10 and later) takes such an answer as the
//! whole cluster: it forgets every broker it knew, the bootstrap ones too, stops its
//! re-bootstrap timer, and never connects again (librdkafka issue 5301). The fault suite's
//! `server_restart` with a minute's outage met it now and then: one store instance of six
//! answered every call `Unavailable` ("fetching the metadata of topic ...: Meta data fetch
//! error: BrokerTransportFailure") for as long as the test ran, after the broker was back.
//!
//! The real broker gives that answer only in the moment between starting to serve requests and
//! being unfenced, so this test plays the broker itself: a minimal Kafka broker on a local port
//! that speaks ApiVersions and Metadata (v4), and answers with no broker while told to.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use photon_api::EventStore;
use photon_kafka::KafkaStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const API_METADATA: i16 = 3;

const API_VERSIONS: i16 = 18;

/// A broker that knows one topic, `t`, of one partition, and answers only ApiVersions and
/// Metadata; while `starting` is set its metadata lists no broker, as a starting broker's does.
struct FakeBroker {
    port: u16,
    starting: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    /// Metadata answers it gave that listed no broker. Its own count: the tests of this binary
    /// run side by side, and one count for all let a test take the other's answers for its own
    /// (CI failed so at `991b565`).
    empty_answers: Arc<AtomicUsize>,
    /// Closes every open connection, as a broker that restarts does.
    restart: Arc<tokio::sync::Notify>,
}

impl FakeBroker {
    async fn start() -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let starting = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let empty_answers = Arc::new(AtomicUsize::new(0));
        let restart = Arc::new(tokio::sync::Notify::new());
        let (s, c, e, r) = (
            starting.clone(),
            connections.clone(),
            empty_answers.clone(),
            restart.clone(),
        );
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                let (s, e, r) = (s.clone(), e.clone(), r.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve(socket, port, s, e) => {}
                        () = r.notified() => {}
                    }
                });
            }
        });
        FakeBroker {
            port,
            starting,
            connections,
            empty_answers,
            restart,
        }
    }
}

async fn serve(
    mut socket: TcpStream,
    port: u16,
    starting: Arc<AtomicBool>,
    empty_answers: Arc<AtomicUsize>,
) {
    loop {
        let mut size = [0u8; 4];
        if socket.read_exact(&mut size).await.is_err() {
            return;
        }
        let mut request = vec![0u8; i32::from_be_bytes(size) as usize];
        if socket.read_exact(&mut request).await.is_err() {
            return;
        }
        let api_key = i16::from_be_bytes([request[0], request[1]]);
        let version = i16::from_be_bytes([request[2], request[3]]);
        let correlation = &request[4..8];
        let body = match api_key {
            API_VERSIONS => api_versions(version),
            API_METADATA => {
                let starting = starting.load(Ordering::Relaxed);
                if starting {
                    empty_answers.fetch_add(1, Ordering::Relaxed);
                }
                metadata(port, starting)
            }
            // Nothing else is advertised.
            _ => continue,
        };
        let mut response = Vec::new();
        response.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        response.extend_from_slice(correlation);
        response.extend_from_slice(&body);
        if socket.write_all(&response).await.is_err() {
            return;
        }
    }
}

/// ApiVersions: itself (0-3) and Metadata (0-4, the versions without tagged fields).
fn api_versions(version: i16) -> Vec<u8> {
    let apis: [(i16, i16, i16); 2] = [(API_VERSIONS, 0, 3), (API_METADATA, 0, 4)];
    let mut b = Vec::new();
    b.extend_from_slice(&0i16.to_be_bytes());
    if version >= 3 {
        // Flexible: a compact array (length + 1) and tagged fields.
        b.push(apis.len() as u8 + 1);
        for (key, min, max) in apis {
            for v in [key, min, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.push(0);
        }
        b.extend_from_slice(&0i32.to_be_bytes());
        b.push(0);
    } else {
        b.extend_from_slice(&(apis.len() as i32).to_be_bytes());
        for (key, min, max) in apis {
            for v in [key, min, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
        }
        if version >= 1 {
            b.extend_from_slice(&0i32.to_be_bytes());
        }
    }
    b
}

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as i16).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// Metadata v4: broker 1 (this one) and topic `t`, or, while starting, the topic and no broker.
fn metadata(port: u16, starting: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0i32.to_be_bytes()); // throttle_time_ms
    if starting {
        b.extend_from_slice(&0i32.to_be_bytes());
    } else {
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&1i32.to_be_bytes()); // node_id
        string(&mut b, "127.0.0.1");
        b.extend_from_slice(&(port as i32).to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes()); // rack: null
    }
    string(&mut b, "fake-cluster");
    let leader: i32 = if starting { -1 } else { 1 };
    b.extend_from_slice(&leader.to_be_bytes()); // controller_id
    b.extend_from_slice(&1i32.to_be_bytes()); // one topic
    let error: i16 = if starting { 5 } else { 0 }; // LEADER_NOT_AVAILABLE
    b.extend_from_slice(&0i16.to_be_bytes());
    string(&mut b, "t");
    b.push(0); // is_internal
    b.extend_from_slice(&1i32.to_be_bytes()); // one partition
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes()); // partition 0
    b.extend_from_slice(&leader.to_be_bytes());
    for _ in 0..2 {
        // replicas, isr
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&1i32.to_be_bytes());
    }
    b
}

/// A store on a broker that answered metadata with no broker while it was starting works again
/// once the broker answers as usual. Before the fix its metadata client kept no broker and
/// never connected again: every call answered `Unavailable` (BrokerTransportFailure) for as
/// long as the test waited, while a new client worked at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_works_again_after_a_starting_broker_listed_no_broker() {
    let broker = FakeBroker::start().await;
    let url = format!("kafka://127.0.0.1:{}?timeout_ms=1000", broker.port);
    let store = KafkaStore::from_url(&url).await.unwrap();
    let health = store.health().await.expect("the broker answers");
    assert!(
        health
            .detail
            .contains(&format!("127.0.0.1:{}", broker.port)),
        "{health:?}"
    );

    // The broker restarts: while starting, it lists no broker.
    let connections = broker.connections.load(Ordering::Relaxed);
    broker.starting.store(true, Ordering::Relaxed);
    let during = store.health().await;
    // Long enough for librdkafka to close the brokers it forgot (the next calls see none).
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = store.health().await;
    }
    broker.starting.store(false, Ordering::Relaxed);

    // Started: the store works again, at once (it needs no outage of its own to notice).
    let took = works_again(&store, Duration::from_secs(20), Duration::from_millis(100)).await;
    assert!(
        took < Duration::from_secs(5),
        "the store took {took:?} to work again"
    );
    assert!(
        broker.connections.load(Ordering::Relaxed) > connections,
        "the store connected to the broker anew"
    );
    assert!(
        matches!(during, Err(photon_api::Error::Unavailable { .. })),
        "a cluster that lists no broker is unavailable: {during:?}"
    );
    // A new client, not one the old client's stuck state would answer for: a fresh store on
    // the same broker works too (the broker itself is fine).
    let fresh = KafkaStore::from_url(&url).await.unwrap();
    fresh.health().await.expect("a new store works");
}

/// The same, when the client learns of the empty list by itself: the broker closes every
/// connection as it restarts, and librdkafka's own metadata request on reconnecting gets the
/// answer. The store's calls then only ever fail without reaching a broker, and the store
/// replaces the client once they have for 10 s. Before, nothing replaced it: every call failed
/// for as long as the test waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_replaces_a_client_that_lost_every_broker_by_itself() {
    let broker = FakeBroker::start().await;
    let url = format!("kafka://127.0.0.1:{}?timeout_ms=1000", broker.port);
    let store = KafkaStore::from_url(&url).await.unwrap();
    store.health().await.expect("the broker answers");

    // The broker restarts without the store asking anything meanwhile, until the store's
    // metadata client is the one left without a broker (whether the empty answer poisons it
    // depends on librdkafka's timing: the admin client may get it instead, or the client may
    // learn the broker again first): its next call then fails although the broker answers
    // again. A restart takes about 0.1 s; on a loaded machine one in 6 to 50 poisons the
    // client, so the test tries for up to 30 s rather than a fixed number of times.
    let mut poisoned = false;
    let trying = Instant::now();
    while trying.elapsed() < Duration::from_secs(30) {
        let before = broker.empty_answers.load(Ordering::Relaxed);
        broker.starting.store(true, Ordering::Relaxed);
        broker.restart.notify_waiters();
        let restarted = Instant::now();
        while broker.empty_answers.load(Ordering::Relaxed) < before + 2
            && restarted.elapsed() < Duration::from_secs(3)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker.starting.store(false, Ordering::Relaxed);
        if store.health().await.is_err() {
            poisoned = true;
            break;
        }
    }
    assert!(
        poisoned,
        "the client never lost every broker: the test did not set the bug up"
    );

    let took = works_again(&store, Duration::from_secs(40), Duration::from_millis(200)).await;
    // Within the 10 s of failures it waits for, and a few requests.
    assert!(
        took < Duration::from_secs(20),
        "the store took {took:?} to work again"
    );
}

/// How long until `store` answers a health check again, asking every `pause`; fails the test
/// with the last error when it still fails after `limit`.
async fn works_again(store: &KafkaStore, limit: Duration, pause: Duration) -> Duration {
    let back = Instant::now();
    loop {
        match store.health().await {
            Ok(_) => return back.elapsed(),
            Err(e) if back.elapsed() >= limit => panic!(
                "the store still fails {:?} after the broker answers again: {e:?}",
                back.elapsed()
            ),
            Err(_) => tokio::time::sleep(pause).await,
        }
    }
}
