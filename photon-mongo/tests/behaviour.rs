//! Behaviour specific to the MongoDB backend, against a real server (`PHOTON_TEST_MONGO_URL`):
//! the documented document layout, refusing to run without its indexes when creation is off,
//! and driver errors that reach the caller as their source.

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use photon_api::{
    Category, Error, EventData, EventStore, EventStoreExt, ExpectedVersion, Selector, Start,
    StreamId,
};
use photon_conformance::server_url;
use photon_mongo::MongoStore;

fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

fn fresh_prefix() -> String {
    format!("b{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

#[tokio::test]
async fn commits_are_readable_with_the_plain_driver_as_documented() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = MongoStore::from_url(&with_options(&url, &format!("photon_prefix={prefix}")))
        .await
        .unwrap();
    let stream = StreamId::parse("account-7").unwrap();
    let events = vec![
        EventData::json("Opened", &serde_json::json!({"owner": "ada"}))
            .unwrap()
            .with_header("a.b", "dotted key")
            .with_header("$x", "dollar key"),
        EventData::json("Deposited", &serde_json::json!({"amount": 5})).unwrap(),
    ];
    let ids: Vec<_> = events.iter().map(|e| e.event_id).collect();
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();

    // Read back with nothing but the driver and the README's layout.
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    let commits: Vec<Document> = db
        .collection::<Document>(&format!("{prefix}_commits"))
        .find(doc! { "stream": "account-7" })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(commits.len(), 1, "one document per append");
    let c = &commits[0];
    assert_eq!(c.get_str("category").unwrap(), "account");
    assert_eq!(c.get_i64("version").unwrap(), 0);
    assert_eq!(c.get_i64("count").unwrap(), 2);
    assert_eq!(c.get_i64("position").unwrap(), 1);
    let events = c.get_array("events").unwrap();
    let Bson::Document(first) = &events[0] else {
        panic!("events[0] is a document")
    };
    assert_eq!(first.get_str("type").unwrap(), "Opened");
    assert_eq!(first.get_str("content_type").unwrap(), "application/json");
    let Some(Bson::Binary(payload)) = first.get("payload") else {
        panic!("payload is binary")
    };
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&payload.bytes).unwrap(),
        serde_json::json!({"owner": "ada"})
    );
    let Some(Bson::Binary(id)) = first.get("id") else {
        panic!("id is binary")
    };
    assert_eq!(id.bytes, ids[0].as_bytes().to_vec());
    let headers = first.get_array("headers").unwrap();
    assert_eq!(
        headers[0],
        Bson::Document(doc! { "key": "$x", "value": "dollar key" })
    );
    assert_eq!(
        headers[1],
        Bson::Document(doc! { "key": "a.b", "value": "dotted key" })
    );

    // And the store reads the headers back unchanged.
    let read = store
        .replay_to_vec(
            Selector::Category(Category::new("account").unwrap()),
            Start::Beginning,
        )
        .await
        .unwrap();
    assert_eq!(read[0].metadata.headers.get("a.b"), Some("dotted key"));
    assert_eq!(read[0].metadata.headers.get("$x"), Some("dollar key"));
}

#[tokio::test]
async fn without_creation_a_missing_index_is_a_clear_error() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let url = with_options(
        &url,
        &format!("photon_prefix={}&photon_create=false", fresh_prefix()),
    );
    let store = MongoStore::from_url(&url).await.unwrap();
    let stream = StreamId::parse("account-1").unwrap();
    match store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![EventData::json("Opened", &1).unwrap()],
        )
        .await
    {
        Err(Error::InvalidInput { what, reason }) => {
            assert!(what.contains("_commits"), "{what}");
            assert!(reason.contains("stream_version"), "{reason}");
            assert!(reason.contains("photon_create=false"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Nothing was created or stored.
    assert!(matches!(
        store.stream_version(&stream).await,
        Err(Error::InvalidInput { .. })
    ));
}

#[tokio::test]
async fn a_commit_over_the_document_limit_is_refused_before_it_is_sent() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let url = with_options(&url, &format!("photon_prefix={}", fresh_prefix()));
    let store = MongoStore::from_url(&url).await.unwrap();
    let stream = StreamId::parse("account-big").unwrap();
    // Tiny events (well under the 12 MiB size limit in sum) whose per-event document overhead
    // (ids, field names) takes the commit past MongoDB's 16 MiB.
    let events: Vec<EventData> = (0..120_000)
        .map(|_| EventData::json("T", &0).unwrap())
        .collect();
    match store.append(&stream, ExpectedVersion::Any, events).await {
        Err(Error::BatchTooLarge {
            stream: s,
            size,
            limit,
        }) => {
            assert_eq!(s, stream);
            assert!(size > limit, "{size} <= {limit}");
            assert!(limit < 16 * 1024 * 1024);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.stream_version(&stream).await.unwrap(), None);
}

/// The driver's own error, found by walking `source()` from `e`.
fn driver_error(e: &Error) -> Option<&mongodb::error::Error> {
    let mut next = std::error::Error::source(e);
    while let Some(source) = next {
        if let Some(driver) = source.downcast_ref::<mongodb::error::Error>() {
            return Some(driver);
        }
        next = source.source();
    }
    None
}

/// `url` with its path (the database) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority_end..]
        .find('/')
        .map_or(base.len(), |i| authority_end + i);
    format!("{}/{database}?{query}", &base[..host_end])
}

#[tokio::test]
async fn a_refused_command_reaches_the_caller_with_the_drivers_error() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    // MongoDB and FerretDB both refuse a database name of 64 bytes or more, when the first
    // command reaches the server (the driver does not check it).
    let store = MongoStore::from_url(&with_database(&url, &"d".repeat(70)))
        .await
        .unwrap();
    let stream = StreamId::parse("account-1").unwrap();
    let err = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![EventData::json("Opened", &1).unwrap()],
        )
        .await
        .unwrap_err();
    let Error::Backend {
        backend, context, ..
    } = &err
    else {
        panic!("not a Backend error: {err:?}");
    };
    // The first command of a store creates its first index.
    assert_eq!(
        (*backend, context.as_str()),
        ("mongo", "creating index stream_version")
    );
    assert!(
        !err.is_retryable(),
        "the same call fails the same way again"
    );
    let driver = driver_error(&err).expect("the driver's error is in the chain");
    match &*driver.kind {
        mongodb::error::ErrorKind::Command(c) => {
            assert_eq!((c.code, c.code_name.as_str()), (73, "InvalidNamespace"))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_server_stays_unavailable_with_the_drivers_error() {
    let store = MongoStore::from_url(
        "mongodb://127.0.0.1:1/photon_test?directConnection=true&photon_timeout_ms=500",
    )
    .await
    .unwrap();
    let stream = StreamId::parse("account-1").unwrap();
    let err = store.stream_version(&stream).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Unavailable {
                source: Some(_),
                ..
            }
        ) && err.is_retryable(),
        "{err:?}"
    );
    let driver = driver_error(&err).expect("the driver's error is in the chain");
    assert!(
        matches!(
            *driver.kind,
            mongodb::error::ErrorKind::ServerSelection { .. }
        ),
        "{driver:?}"
    );
    assert!(err.to_string().contains("no server answered"), "{err}");
}

/// A UUID as the commits store it (BSON binary of the UUID subtype).
fn uuid_bson(id: uuid::Uuid) -> Bson {
    Bson::Binary(mongodb::bson::Binary {
        subtype: mongodb::bson::spec::BinarySubtype::Uuid,
        bytes: id.as_bytes().to_vec(),
    })
}

/// Whether the driver's error is a unique index refusing the write.
fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
}

/// What this server's unique index on `{stream, event_ids}` refuses, tried with the plain
/// driver: a commit with the same whole array of ids (every server), and one that shares only
/// one id with a stored commit of its stream (MongoDB, whose multikey index holds one entry per
/// element; not FerretDB 1.24, which indexes the array as one value). The store must find out
/// the same and say so in its health: it relies on the index only where the index refuses
/// the second kind, and looks the ids up before each insert elsewhere.
#[tokio::test]
async fn the_store_finds_out_what_the_ids_index_refuses_on_this_server() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    let commits = db.collection::<Document>(&format!("{prefix}_commits"));
    commits
        .create_index(photon_mongo::idempotency_index())
        .await
        .unwrap();
    let [a, b, c] = [(); 3].map(|()| uuid_bson(uuid::Uuid::new_v4()));
    commits
        .insert_one(doc! { "stream": "s-1", "event_ids": [a.clone(), b.clone()] })
        .await
        .unwrap();
    let same = commits
        .insert_one(doc! { "stream": "s-1", "event_ids": [a.clone(), b.clone()] })
        .await
        .expect_err("the same ids in the same stream are refused");
    assert!(is_duplicate_key(&same), "{same}");
    // The ids are unique within a stream only: another stream may hold the same ones.
    commits
        .insert_one(doc! { "stream": "s-2", "event_ids": [a.clone(), b.clone()] })
        .await
        .unwrap();
    let per_element = match commits
        .insert_one(doc! { "stream": "s-1", "event_ids": [b, c] })
        .await
    {
        Ok(_) => false,
        Err(e) if is_duplicate_key(&e) => true,
        Err(e) => panic!("{e}"),
    };
    println!(
        "this server's unique index on an array refuses {}",
        if per_element {
            "any repeated element"
        } else {
            "only the same whole array"
        }
    );

    let store = MongoStore::from_url(&with_options(
        &url,
        &format!("photon_prefix={}", fresh_prefix()),
    ))
    .await
    .unwrap();
    let health = store.health().await.unwrap();
    let want = if per_element {
        photon_mongo::IDS_BY_INDEX
    } else {
        photon_mongo::IDS_LOOKED_UP
    };
    assert!(health.detail.contains(want), "{}", health.detail);
}
/// Every query of the store has an index to serve it on a real MongoDB (FerretDB scans anyway,
/// over PostgreSQL as over SQLite, so only the indexes' presence can be checked here): a stream
/// subscription reads one stream's commits in position order after a checkpoint, which neither
/// `stream_version` nor `position` alone serves without a scan.
#[tokio::test]
async fn the_store_creates_an_index_for_each_of_its_queries() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store = MongoStore::from_url(&with_options(&url, &format!("photon_prefix={prefix}")))
        .await
        .unwrap();
    store.health().await.unwrap();
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    let indexes: Vec<Document> = db
        .collection::<Document>(&format!("{prefix}_commits"))
        .list_indexes()
        .await
        .unwrap()
        .map_ok(|m| m.keys)
        .try_collect()
        .await
        .unwrap();
    for keys in [
        doc! { "stream": 1, "version": 1 },
        doc! { "stream": 1, "event_ids": 1 },
        doc! { "position": 1 },
        doc! { "category": 1, "position": 1 },
        doc! { "stream": 1, "position": 1 },
    ] {
        assert!(indexes.contains(&keys), "no index on {keys}: {indexes:?}");
    }
}

/// The commits collection `prefix` names, through the plain driver.
async fn commits_of(url: &str, prefix: &str) -> mongodb::Collection<Document> {
    let client = mongodb::Client::with_uri_str(url).await.unwrap();
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    db.collection::<Document>(&format!("{prefix}_commits"))
}

/// A collection written before `stream_event_ids` existed holds a tombstone with
/// `event_ids: []` for each fenced append and each gap given up (the shape the code wrote
/// before 9e1e9e8); several of them share that key, so the index cannot be built over them as
/// they are. The store rewrites them to `[-position]` and works on.
#[tokio::test]
async fn a_collection_with_old_empty_tombstones_opens_and_serves_appends() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let commits = commits_of(&url, &prefix).await;
    for model in photon_mongo::commit_indexes() {
        commits.create_index(model).await.unwrap();
    }
    for position in 1..=3_i64 {
        commits
            .insert_one(doc! {
                "stream": "~gap", "category": "~gap", "version": -position, "count": 0_i64,
                "position": position, "recorded_at": 0_i64, "event_ids": [], "events": [],
            })
            .await
            .unwrap();
    }
    let store = MongoStore::from_url(&with_options(&url, &format!("photon_prefix={prefix}")))
        .await
        .unwrap();
    let stream = StreamId::parse("account-1").unwrap();
    let event = EventData::json("Opened", &1).unwrap();
    let id = event.event_id;
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event])
        .await
        .expect("the store opens over old tombstones");
    let all = store
        .replay_to_vec(Selector::All, Start::Beginning)
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![id],
        "tombstones are skipped"
    );
    let tombstones: Vec<Document> = commits
        .find(doc! { "stream": "~gap" })
        .sort(doc! { "position": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let ids: Vec<_> = tombstones
        .iter()
        .map(|t| t.get_array("event_ids").unwrap().clone())
        .collect();
    assert_eq!(
        ids,
        vec![
            vec![Bson::Int64(-1)],
            vec![Bson::Int64(-2)],
            vec![Bson::Int64(-3)]
        ]
    );
    // A re-send is still a retry, a partial repeat still refused.
    let again = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![EventData::json("Opened", &1).unwrap().with_id(id)],
        )
        .await
        .unwrap();
    assert_eq!(again.first_version, photon_api::Version(0));
}

/// Two commits of one stream holding the same event ids (a re-send stored twice by the
/// idempotency bug of older versions) make the unique index `stream_event_ids` impossible to
/// build. The store refuses to work on that collection with an error naming it, the stream
/// and the ids, and saying how to repair it, instead of a bare duplicate-key error on every call.
#[tokio::test]
async fn a_collection_with_commits_sharing_ids_is_refused_with_the_stream_and_ids() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    let store_url = with_options(&url, &format!("photon_prefix={prefix}"));
    let stream = StreamId::parse("account-9").unwrap();
    let event = EventData::json("Opened", &1).unwrap();
    let id = event.event_id;
    MongoStore::from_url(&store_url)
        .await
        .unwrap()
        .append(&stream, ExpectedVersion::NoStream, vec![event])
        .await
        .unwrap();
    // As an older version left it: no ids index, the commit stored twice.
    let commits = commits_of(&url, &prefix).await;
    commits.drop_index("stream_event_ids").await.unwrap();
    let mut twin = commits
        .find_one(doc! { "stream": "account-9" })
        .await
        .unwrap()
        .unwrap();
    twin.remove("_id");
    twin.insert("version", 1_i64);
    twin.insert("position", 2_i64);
    commits.insert_one(twin).await.unwrap();

    let store = MongoStore::from_url(&store_url).await.unwrap();
    let refused = store
        .append(
            &StreamId::parse("account-10").unwrap(),
            ExpectedVersion::Any,
            vec![EventData::json("Opened", &1).unwrap()],
        )
        .await;
    match refused {
        Err(Error::InvalidInput { what, reason }) => {
            assert!(what.contains(&format!("{prefix}_commits")), "{what}");
            assert!(reason.contains("account-9"), "{reason}");
            assert!(reason.contains(&id.to_string()), "{reason}");
            assert!(reason.contains("stream_event_ids"), "{reason}");
            assert!(reason.contains("README"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.health().await,
        Err(Error::InvalidInput { .. })
    ));
}

/// A store on a fresh prefix that gives up after `races` lost races for a stream's version;
/// None without a test server.
async fn racing_store(races: u32) -> Option<MongoStore> {
    let url = server_url("mongo", "PHOTON_TEST_MONGO_URL")?;
    let url = with_options(
        &url,
        &format!(
            "photon_prefix={}&photon_append_races={races}",
            fresh_prefix()
        ),
    );
    Some(MongoStore::from_url(&url).await.unwrap())
}

/// Issue 16 item 3: every append of a database races for the next global position, but losing
/// that race to an append to another stream is not contention on this stream. With a limit of
/// two lost races, eight writers, each alone on its own stream, all get their appends stored
/// (before, every lost position race counted and most of them were told `Unavailable`), and the
/// log holds every event once, in one global order.
#[tokio::test]
async fn appends_to_uncontended_streams_never_fail_because_others_write_elsewhere() {
    let Some(store) = racing_store(2).await else {
        return;
    };
    const WRITERS: usize = 8;
    const APPENDS: u64 = 6;
    let writers = (0..WRITERS).map(|w| {
        let store = store.clone();
        async move {
            let stream = StreamId::parse(format!("race-w{w}")).unwrap();
            for n in 0..APPENDS {
                let expected = match n {
                    0 => ExpectedVersion::NoStream,
                    n => ExpectedVersion::Exact(photon_api::Version(n - 1)),
                };
                let event = EventData::json("Raced", &n).unwrap();
                store.append(&stream, expected, vec![event]).await?;
            }
            Ok::<_, Error>(())
        }
    });
    let results = futures::future::join_all(writers).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} writers failed: {failed:?}",
        failed.len()
    );
    let all = store
        .subscribe(
            Selector::Category(Category::new("race").unwrap()),
            Start::Beginning,
            photon_api::SubscriptionMode::Cold,
        )
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let events = all
        .iter()
        .filter(|i| matches!(i, photon_api::SubscriptionItem::Event(_)))
        .count();
    assert_eq!(events as u64, WRITERS as u64 * APPENDS);
}

/// The other side of the limit: writers racing for one stream's versions do count, and one that
/// loses more than `photon_append_races` of them hears `Unavailable` naming the stream and the
/// option, with nothing of its batch stored; every append answered Ok is stored once.
#[tokio::test]
async fn an_append_that_keeps_losing_its_streams_version_gives_up_with_unavailable() {
    let Some(store) = racing_store(1).await else {
        return;
    };
    let stream = StreamId::parse("race-shared").unwrap();
    let mut refused = 0;
    let mut stored = 0u64;
    // Rounds of eight writers at once until one loses: with a limit of one race, the first
    // race lost on the stream is the end of that append.
    for _ in 0..20 {
        let writers = (0..8).map(|n| {
            let (store, stream) = (store.clone(), stream.clone());
            async move {
                let event = EventData::json("Raced", &n).unwrap();
                store
                    .append(&stream, ExpectedVersion::Any, vec![event])
                    .await
            }
        });
        for result in futures::future::join_all(writers).await {
            match result {
                Ok(_) => stored += 1,
                Err(Error::Unavailable { message, .. }) => {
                    assert!(message.contains("race-shared"), "{message}");
                    assert!(message.contains("photon_append_races"), "{message}");
                    refused += 1;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "no append lost a race in 20 rounds of 8");
    // One event per append: the stream's last version is the count of stored appends - 1.
    let last = store.stream_version(&stream).await.unwrap();
    assert_eq!(last.map(|v| v.value() + 1), Some(stored));
}

/// With `Exact`, a lost race for the stream's version is a conflict, whatever the race limit:
/// the loser hears `WrongExpectedVersion` (not a retryable `Unavailable`), even with
/// `photon_append_races=1`.
#[tokio::test]
async fn a_lost_race_under_exact_is_a_conflict_not_contention() {
    let Some(store) = racing_store(1).await else {
        return;
    };
    let stream = StreamId::parse("race-exact").unwrap();
    let mut conflicts = 0;
    for round in 0..10u64 {
        let expected = match round {
            0 => ExpectedVersion::NoStream,
            n => ExpectedVersion::Exact(photon_api::Version(n - 1)),
        };
        let writers = (0..6).map(|n| {
            let (store, stream) = (store.clone(), stream.clone());
            async move {
                let event = EventData::json("Raced", &n).unwrap();
                store.append(&stream, expected, vec![event]).await
            }
        });
        let mut stored = 0;
        for result in futures::future::join_all(writers).await {
            match result {
                Ok(_) => stored += 1,
                Err(Error::WrongExpectedVersion { .. }) => conflicts += 1,
                Err(other) => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(stored, 1, "round {round}");
    }
    assert!(conflicts > 0);
}

/// A refusal by a unique index of someone else's (here on `event_ids` alone, refusing an id
/// another stream holds), on a busy database where other streams keep writing: the store finds
/// that neither the commit's version, nor its ids in its stream, nor its claimed position is
/// taken, and answers at once with a definite `Backend` error naming the stream and saying
/// that an index not photon-mongo's refused it; nothing is stored. (The first design looped
/// forever; the second, which took such a refusal for a lost position, answered `Unavailable`
/// after 6 × `photon_timeout_ms`, holding up the store's other appends meanwhile.)
#[tokio::test]
async fn a_refusal_by_an_index_not_photons_is_answered_at_once() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    let prefix = fresh_prefix();
    // Set-up and checks with the default timeout (creating the indexes on a busy test server
    // can take longer than the bound under test); the raced appends with a short one.
    let setup = MongoStore::from_url(&with_options(&url, &format!("photon_prefix={prefix}")))
        .await
        .unwrap();
    let url = with_options(
        &url,
        &format!("photon_prefix={prefix}&photon_timeout_ms=400"),
    );
    let store = MongoStore::from_url(&url).await.unwrap();
    let mut first = EventData::json("Once", &1).unwrap();
    let a = StreamId::parse("race-a").unwrap();
    // The short-timeout store checks the indexes once, at its first call: retried here, so a
    // slow answer to that check is not mistaken for the bound under test.
    for _ in 0..50 {
        if store.stream_version(&a).await.is_ok() {
            break;
        }
    }
    setup
        .append(&a, ExpectedVersion::NoStream, vec![first.clone()])
        .await
        .unwrap();
    let driver_url = url.split('?').next().unwrap().to_owned();
    let commits = commits_of(&driver_url, &prefix).await;
    commits
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"event_ids": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .name("foreign_ids".to_owned())
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    // Other streams keep writing meanwhile.
    let busy = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 0u64.. {
                let s = StreamId::parse(format!("race-busy{}", n % 4)).unwrap();
                let e = EventData::json("Busy", &n).unwrap();
                let _ = store.append(&s, ExpectedVersion::Any, vec![e]).await;
            }
        })
    };
    let b = StreamId::parse("race-b").unwrap();
    first.event_type = photon_api::EventType::new("Again").unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        store.append(&b, ExpectedVersion::Any, vec![first]),
    )
    .await;
    let took = started.elapsed();
    busy.abort();
    match answer {
        Ok(Err(e @ Error::Backend { .. })) => {
            let text = e.to_string();
            assert!(text.contains("race-b"), "{text}");
            assert!(text.contains("not photon-mongo's"), "{text}");
            assert!(!e.is_retryable(), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    // Well within the 6 × 400 ms the lost-position retries may take.
    assert!(took < std::time::Duration::from_millis(2400), "{took:?}");
    assert_eq!(setup.stream_version(&b).await.unwrap(), None);
    assert_eq!(
        setup.stream_version(&a).await.unwrap().map(|v| v.value()),
        Some(0)
    );
}
