//! Late writes against a real server (`PHOTON_TEST_CASSANDRA_URL`): an append's conditional
//! write that reaches the server after its pending marker was repaired. The repair must fence the
//! version, not guess the append absent, so the late write cannot land behind live readers: a
//! re-send stores the batch afresh, and live, replaying and resumed readers see it exactly once.
//! Once with the fault proxy holding the real write, once with a hand-built marker and the
//! stalled writer's conditional write sent by hand.

use std::time::Duration;

use photon_api::{
    Category, Error, EventStore, EventStoreExt, ExpectedVersion, ReadOptions, RecordedEvent,
    Selector, Start, StreamId, Uuid, Version,
};
use photon_cassandra::{schema, CassandraConfig, CassandraStore};
use photon_conformance::server_url;
use scylla::client::session::Session;
use scylla::value::CqlTimeuuid;

mod common;
use common::{fresh, live, next_event, number, numbered, numbers, proxied, with_options, Sub};

/// A repair after 4.5 s: at least `settle_ms` + 2 × `timeout_ms`, as the README asks.
const OPTIONS: &str = "settle_ms=200&timeout_ms=2000&repair_after_ms=4500&bucket_size=16";

/// What every reader must see after the late write and its re-send: the live subscriber gets
/// `late` (in order, once) after `before`; a replay of the category holds the live order exactly;
/// resuming from each delivered event's checkpoint gives exactly what followed it live.
async fn assert_seen_once(
    reader: &CassandraStore,
    category: &Category,
    mut sub: Sub,
    mut delivered: Vec<RecordedEvent>,
    late: &[u64],
) {
    for want in late {
        let got = next_event(&mut sub, Duration::from_secs(15)).await;
        let got = got.unwrap_or_else(|| {
            panic!(
                "the live subscriber never got event {want} of the late append (it has {:?})",
                numbers(&delivered)
            )
        });
        delivered.push(got);
    }
    let mut want: Vec<u64> = numbers(&delivered);
    want.sort_unstable();
    let mut all: Vec<u64> = late.to_vec();
    all.extend(numbers(&delivered[..delivered.len() - late.len()]));
    all.sort_unstable();
    assert_eq!(want, all, "live delivered each event once");
    if let Some(extra) = next_event(&mut sub, Duration::from_secs(2)).await {
        panic!("the live subscriber got {} twice", number(&extra));
    }
    let replay = reader
        .replay_to_vec(Selector::Category(category.clone()), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(numbers(&replay), numbers(&delivered), "replay = live order");
    for (i, e) in delivered.iter().enumerate() {
        let resumed = reader
            .replay_to_vec(
                Selector::Category(category.clone()),
                Start::After(e.checkpoint.clone()),
            )
            .await
            .unwrap();
        assert_eq!(
            numbers(&resumed),
            numbers(&delivered[i + 1..]),
            "resumed after event {}",
            number(e)
        );
    }
}

/// The conditional write held in the proxy past the client's timeout, a repair of its marker
/// while it is held, then released: it must not land behind the live reader.
#[tokio::test]
async fn a_conditional_write_released_after_its_repair_is_fenced() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let (proxy, proxied_url) = proxied(&url).await;

    let category = Category::new(fresh("late")).unwrap();
    let stream = StreamId::new(&category, "a").unwrap();
    let other = StreamId::new(&category, "b").unwrap();
    let reader = CassandraStore::from_url(&url).await.unwrap();
    let writer = CassandraStore::from_url(&proxied_url).await.unwrap();
    let mut sub = live(&reader, &category).await;
    writer
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![numbered(0, "first")],
        )
        .await
        .unwrap();
    let mut delivered = vec![next_event(&mut sub, Duration::from_secs(15)).await.unwrap()];

    // The commit of versions 1 and 2 is held in the proxy until the client gives up.
    let mark = Uuid::new_v4().simple().to_string();
    let hold = proxy.hold_next(mark.as_bytes());
    let late = vec![numbered(1, &mark), numbered(2, &mark)];
    let held = {
        let (writer, stream, late) = (writer.clone(), stream.clone(), late.clone());
        tokio::spawn(async move {
            writer
                .append(&stream, ExpectedVersion::Exact(Version(0)), late)
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(30), hold.matched())
        .await
        .expect("the commit reached the proxy");
    match tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("the held append answered")
        .unwrap()
    {
        Err(Error::Unavailable { .. }) => {}
        other => panic!("want Unavailable for a commit held in the proxy, got {other:?}"),
    }
    // Another writer appends; the live reader delivers it only once the marker of the held
    // commit is repaired (after `repair_after_ms`), while the commit is still held.
    let other_writer = CassandraStore::from_url(&url).await.unwrap();
    other_writer
        .append(
            &other,
            ExpectedVersion::NoStream,
            vec![numbered(100, "other")],
        )
        .await
        .unwrap();
    let after_repair = next_event(&mut sub, Duration::from_secs(30)).await.unwrap();
    assert_eq!(number(&after_repair), 100);
    delivered.push(after_repair);

    // The commit reaches the server now, long after its time, and the caller re-sends.
    hold.release();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resend = writer
        .append(&stream, ExpectedVersion::Exact(Version(0)), late.clone())
        .await
        .unwrap();
    assert_eq!(resend.first_version, Version(1));
    let read = reader
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(numbers(&read), vec![0, 1, 2]);
    assert_eq!(
        read.iter().map(|e| e.event_id).collect::<Vec<_>>()[1..],
        late.iter().map(|e| e.event_id).collect::<Vec<_>>()[..],
        "the re-send stored the caller's ids"
    );
    assert_seen_once(&reader, &category, sub, delivered, &[1, 2]).await;
}

/// A writer that stalled between its marker and its conditional write, as a hand-built marker
/// and the conditional write sent by hand once the marker is repaired: the write is refused,
/// and the re-send is stored afresh and delivered live.
#[tokio::test]
async fn a_stalled_writers_conditional_write_after_the_repair_is_fenced() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let store = CassandraStore::from_url(&url).await.unwrap();
    let config = store.config().clone();
    let ks = config.keyspace.clone();
    let category = Category::new(fresh("stall")).unwrap();
    let stream = StreamId::new(&category, "a").unwrap();
    let other = StreamId::new(&category, "b").unwrap();
    let mut sub = live(&store, &category).await;
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![numbered(0, "first")],
        )
        .await
        .unwrap();
    let mut delivered = vec![next_event(&mut sub, Duration::from_secs(15)).await.unwrap()];

    // The stalled writer's batch, encoded as the store encodes it: stored once in a scratch
    // category, its row read back.
    let late = vec![numbered(1, "late"), numbered(2, "late")];
    let scratch = StreamId::new(&Category::new(fresh("scratch")).unwrap(), "x").unwrap();
    store
        .append(&scratch, ExpectedVersion::NoStream, late.clone())
        .await
        .unwrap();
    let s = session(&config).await;
    let (count, ids, events) = s
        .query_unpaged(
            format!("SELECT count, event_ids, events FROM {ks}.commits WHERE stream = ? AND bucket = 0 AND version = 0"),
            (scratch.as_str(),),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row::<(i32, Vec<Uuid>, Vec<u8>)>()
        .unwrap();

    // Its markers, for version 1, as it wrote them before it stalled; then a later append by
    // another writer, which the live reader delivers once the marker is repaired.
    let time_id = stall_then_repair(
        &s,
        &ks,
        &config,
        &store,
        &category,
        &stream,
        &other,
        &mut sub,
        &mut delivered,
    )
    .await;

    // The writer wakes up and sends its conditional write, with its old time id.
    let mut insert = s
        .prepare(schema::INSERT_COMMIT.in_keyspace(&ks))
        .await
        .unwrap();
    insert.set_serial_consistency(Some(config.serial_consistency));
    let answer = s
        .execute_unpaged(
            &insert,
            (
                stream.as_str(),
                0_i64,
                1_i64,
                count,
                CqlTimeuuid::from(time_id),
                &ids,
                &events[..],
            ),
        )
        .await
        .unwrap();
    let applied = schema::conditional_write_applied(answer).unwrap();
    // Its caller re-sends (its first try answered Unavailable).
    let resend = store
        .append(&stream, ExpectedVersion::Exact(Version(0)), late.clone())
        .await
        .unwrap();
    assert_eq!(resend.first_version, Version(1));
    assert_seen_once(&store, &category, sub, delivered, &[1, 2]).await;
    assert!(
        !applied,
        "the repair fenced version 1 against the late write"
    );
}

/// A writer that found a void at the head (an earlier repair's fence) and stalled before its
/// write over it: the repair of its marker renews the void, so that write is refused too.
#[tokio::test]
async fn a_stalled_write_over_a_void_after_the_repair_is_fenced() {
    let Some(url) = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL") else {
        return;
    };
    let url = with_options(&url, OPTIONS);
    let store = CassandraStore::from_url(&url).await.unwrap();
    let config = store.config().clone();
    let ks = config.keyspace.clone();
    let category = Category::new(fresh("revoid")).unwrap();
    let stream = StreamId::new(&category, "a").unwrap();
    let other = StreamId::new(&category, "b").unwrap();
    let mut sub = live(&store, &category).await;
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![numbered(0, "first")],
        )
        .await
        .unwrap();
    let mut delivered = vec![next_event(&mut sub, Duration::from_secs(15)).await.unwrap()];
    let s = session(&config).await;
    let prepare = |cql: schema::Cql| {
        let (s, text) = (&s, cql.in_keyspace(&ks));
        async move {
            let mut p = s.prepare(text).await.unwrap();
            p.set_serial_consistency(Some(config.serial_consistency));
            p
        }
    };
    let (insert, fill) = (
        prepare(schema::INSERT_COMMIT).await,
        prepare(schema::FILL_VOID).await,
    );
    // A void at version 1, as an earlier repair leaves it.
    let no_ids: Vec<Uuid> = Vec::new();
    let void = schema::time_id(photon_api::Timestamp::now().unix_micros() - 60_000_000);
    let answer = s
        .execute_unpaged(
            &insert,
            (
                stream.as_str(),
                0_i64,
                1_i64,
                0_i32,
                CqlTimeuuid::from(void),
                &no_ids,
                &[][..] as &[u8],
            ),
        )
        .await
        .unwrap();
    assert!(schema::conditional_write_applied(answer).unwrap());
    // A writer saw it, wrote its markers for version 1, and stalled before its write over it;
    // another writer's append is delivered once the marker is repaired.
    let time_id = stall_then_repair(
        &s,
        &ks,
        &config,
        &store,
        &category,
        &stream,
        &other,
        &mut sub,
        &mut delivered,
    )
    .await;
    // The writer wakes up: its write over the void it saw must not apply.
    let late = vec![numbered(1, "late"), numbered(2, "late")];
    let ids: Vec<Uuid> = late.iter().map(|e| e.event_id).collect();
    let answer = s
        .execute_unpaged(
            &fill,
            (
                2_i32,
                CqlTimeuuid::from(time_id),
                &ids,
                &b"not read"[..],
                stream.as_str(),
                0_i64,
                1_i64,
                CqlTimeuuid::from(void),
            ),
        )
        .await
        .unwrap();
    assert!(
        !schema::conditional_write_applied(answer).unwrap(),
        "the repair renewed the void against the stalled write"
    );
    // Appends go on over the void: the stream reads, versions stay contiguous.
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        Some(Version(0))
    );
    for options in [ReadOptions::forwards(), ReadOptions::backwards()] {
        let read = store.read_to_vec(&stream, options).await.unwrap();
        assert_eq!(numbers(&read), vec![0], "a void is not read as events");
    }
    let resend = store
        .append(&stream, ExpectedVersion::Exact(Version(0)), late.clone())
        .await
        .unwrap();
    assert_eq!(resend.first_version, Version(1));
    let read = store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(numbers(&read), vec![0, 1, 2]);
    assert_seen_once(&store, &category, sub, delivered, &[1, 2]).await;
}

/// A plain driver session, connected as the store connects.
/// A writer's markers for version 1 of `stream`, written by hand as it wrote them before it
/// stalled; then an append to `other` by another writer, which the live reader `sub` delivers
/// only once the marker is repaired (pushed to `delivered`). Returns the marker's time id.
#[allow(clippy::too_many_arguments)]
async fn stall_then_repair(
    s: &Session,
    ks: &str,
    config: &CassandraConfig,
    store: &CassandraStore,
    category: &Category,
    stream: &StreamId,
    other: &StreamId,
    sub: &mut Sub,
    delivered: &mut Vec<RecordedEvent>,
) -> Uuid {
    let micros = photon_api::Timestamp::now().unix_micros();
    let time_id = schema::time_id(micros);
    let bucket = micros.div_euclid(config.time_bucket.as_micros() as i64);
    for key in [category.as_str(), "$all"] {
        s.query_unpaged(
            format!("INSERT INTO {ks}.pending (category, bucket, time_id, stream, version) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"),
            (key, bucket, CqlTimeuuid::from(time_id), stream.as_str(), 1_i64, micros),
        )
        .await
        .unwrap();
    }
    store
        .append(
            other,
            ExpectedVersion::NoStream,
            vec![numbered(100, "other")],
        )
        .await
        .unwrap();
    let after_repair = next_event(sub, Duration::from_secs(30)).await.unwrap();
    assert_eq!(number(&after_repair), 100);
    delivered.push(after_repair);
    time_id
}

async fn session(config: &CassandraConfig) -> Session {
    photon_cassandra::session_builder(config)
        .unwrap()
        .build()
        .await
        .unwrap()
}
