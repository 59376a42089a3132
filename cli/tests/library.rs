//! The commands as library functions on `memory://`, which lives in one process: read, tail,
//! and the export → import → verify round trip, its re-runs and resumes, and copy.

use std::sync::Arc;

use indicatif::ProgressBar;
use photon_api::{
    Category, EventData, EventStore, EventStoreExt, ExpectedVersion, Payload, ReadOptions,
    Selector, Start, StreamId, Uuid, Version,
};
use photon_cli::commands::{self, AppendRequest, Encoding, ReadRequest};
use photon_cli::render::Format;
use photon_cli::{copy, export, import, verify, CliError, ImportReport};
use photon_memory::MemoryStore;
use serde_json::json;

fn store() -> Arc<dyn EventStore> {
    Arc::new(MemoryStore::new())
}

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).unwrap()
}

/// Three streams in two categories, several batches, JSON and MessagePack payloads, every kind
/// of metadata, times of occurrence in the past.
async fn populate(store: &dyn EventStore) -> u64 {
    let mut n = 0;
    for i in 0..3u64 {
        let s = stream(&format!("account-{i}"));
        for batch in 0..3u64 {
            let events: Vec<EventData> = (0..=batch)
                .map(|k| {
                    let e = if k % 2 == 0 {
                        EventData::json("Deposited", &json!({"amount": k, "i": i})).unwrap()
                    } else {
                        EventData::msgpack("Withdrawn", &json!({"amount": k})).unwrap()
                    };
                    e.with_occurred_at(
                        photon_api::Timestamp::from_unix_micros(1_600_000_000_000_000 + k as i64)
                            .unwrap(),
                    )
                    .with_correlation_id(Uuid::now_v7())
                    .with_causation_id(Uuid::now_v7())
                    .with_schema_version(2)
                    .with_header("tenant", format!("t{i}"))
                })
                .collect();
            n += events.len() as u64;
            store
                .append(&s, ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
    }
    store
        .append_one(
            &stream("order-7"),
            ExpectedVersion::NoStream,
            EventData::new(
                photon_api::EventType::new("Placed").unwrap(),
                Payload::raw(photon_api::ContentType::from_mime("text/plain"), "hi"),
            ),
        )
        .await
        .unwrap();
    n + 1
}

async fn dump_of(store: &dyn EventStore, selector: Selector) -> Vec<u8> {
    let mut out = Vec::new();
    export(store, selector, &mut out, &ProgressBar::hidden())
        .await
        .unwrap();
    out
}

async fn assert_same(a: &dyn EventStore, b: &dyn EventStore, streams: u64, events: u64) {
    let report = verify(a, b, Selector::All).await.unwrap();
    assert_eq!(report.differences, vec![]);
    assert_eq!((report.streams, report.events), (streams, events));
}

#[tokio::test]
async fn export_import_verify_round_trip_keeps_every_field() {
    let source = store();
    let n = populate(&*source).await;
    let dump = dump_of(&*source, Selector::All).await;
    assert_eq!(
        String::from_utf8_lossy(&dump).lines().count() as u64,
        n + 2,
        "header, events, end"
    );
    let target = store();
    let report = import(&*target, &dump[..], &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!(report.events, n);
    assert_eq!(report.appended, n);
    assert_same(&*source, &*target, 4, n).await;
    // Field by field, for one stream: everything but recorded_at and checkpoint is the same.
    let s = stream("account-2");
    let a = source
        .read_to_vec(&s, ReadOptions::forwards())
        .await
        .unwrap();
    let b = target
        .read_to_vec(&s, ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(a.len(), 6);
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(
            (
                &a.stream,
                a.version,
                a.event_id,
                &a.event_type,
                a.schema_version
            ),
            (
                &b.stream,
                b.version,
                b.event_id,
                &b.event_type,
                b.schema_version
            )
        );
        assert_eq!(
            (a.occurred_at, &a.payload, &a.metadata),
            (b.occurred_at, &b.payload, &b.metadata)
        );
    }
    // And the target's own export holds the same events.
    let again = dump_of(&*target, Selector::All).await;
    assert_eq!(
        String::from_utf8_lossy(&again).lines().count(),
        String::from_utf8_lossy(&dump).lines().count()
    );
}

#[tokio::test]
async fn a_re_run_import_is_answered_as_retries_and_stores_nothing_twice() {
    let source = store();
    let n = populate(&*source).await;
    let dump = dump_of(&*source, Selector::All).await;
    let target = store();
    import(&*target, &dump[..], &ProgressBar::hidden())
        .await
        .unwrap();
    let second = import(&*target, &dump[..], &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!(second.events, n);
    assert_eq!(second.appended + second.already_present, n);
    assert_same(&*source, &*target, 4, n).await;
    assert_eq!(
        target.stream_version(&stream("account-0")).await.unwrap(),
        Some(Version(5))
    );
}

#[tokio::test]
async fn an_interrupted_import_resumes_by_running_it_again() {
    let source = store();
    let n = populate(&*source).await;
    let dump = dump_of(&*source, Selector::All).await;
    let text = String::from_utf8(dump.clone()).unwrap();
    let target = store();
    // Cut after 8 events (a stream half done): the import stores them and says it was cut.
    let cut: String = text.lines().take(9).map(|l| format!("{l}\n")).collect();
    let err = import(&*target, cut.as_bytes(), &ProgressBar::hidden())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CliError::Dump { line: 9, reason } if reason.contains("cut short (8 events imported)")),
        "{err}"
    );
    let resumed = import(&*target, &dump[..], &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!(resumed.events, n);
    assert_eq!(resumed.appended + resumed.already_present, n);
    assert!(resumed.already_present > 0, "{resumed:?}");
    assert_same(&*source, &*target, 4, n).await;
}

#[tokio::test]
async fn events_already_there_in_other_batches_count_as_present() {
    let source = store();
    let n = populate(&*source).await;
    // The target got the same events one at a time (another tool, an older photon).
    let target = store();
    for e in source
        .replay_to_vec(Selector::All, Start::Beginning)
        .await
        .unwrap()
    {
        let stream = e.stream.clone();
        target
            .append_one(
                &stream,
                ExpectedVersion::Any,
                photon_cli::transfer::event_data(e),
            )
            .await
            .unwrap();
    }
    let dump = dump_of(&*source, Selector::All).await;
    let report = import(&*target, &dump[..], &ProgressBar::hidden())
        .await
        .unwrap();
    // order-7's single event was one append in both: answered as a retry, not found present.
    assert_eq!((report.already_present, report.appended), (n - 1, 1));
    assert_same(&*source, &*target, 4, n).await;
}

#[tokio::test]
async fn other_events_at_the_same_versions_are_a_conflict_not_overwritten() {
    let source = store();
    populate(&*source).await;
    let target = store();
    target
        .append_one(
            &stream("account-1"),
            ExpectedVersion::NoStream,
            EventData::json("Other", &json!({})).unwrap(),
        )
        .await
        .unwrap();
    let dump = dump_of(
        &*source,
        Selector::Category(Category::new("account").unwrap()),
    )
    .await;
    let err = import(&*target, &dump[..], &ProgressBar::hidden())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            CliError::Store(photon_api::Error::WrongExpectedVersion { stream, .. }) if stream.as_str() == "account-1"
        ),
        "{err}"
    );
    assert_eq!(err.exit_code(), photon_cli::error::EXIT_CONFLICT);
    assert_eq!(
        target.stream_version(&stream("account-1")).await.unwrap(),
        Some(Version(0))
    );
}

#[tokio::test]
async fn copy_moves_a_selector_and_verify_prints_what_differs() {
    let source = store();
    let n = populate(&*source).await;
    let target = store();
    let report = copy(&*source, &*target, Selector::All, &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!(
        report,
        ImportReport {
            events: n,
            appended: n,
            already_present: 0,
            // One append per source batch at most 100 events: 3 streams in one batch each, order-7.
            batches: 4,
        }
    );
    assert_same(&*source, &*target, 4, n).await;
    // Copy again: nothing new.
    let again = copy(&*source, &*target, Selector::All, &ProgressBar::hidden())
        .await
        .unwrap();
    assert_eq!(again.appended + again.already_present, n);
    assert_same(&*source, &*target, 4, n).await;

    // One more event in the source, one stream only in the target.
    source
        .append_one(
            &stream("account-1"),
            ExpectedVersion::Exact(Version(5)),
            EventData::json("Late", &json!({})).unwrap(),
        )
        .await
        .unwrap();
    target
        .append_one(
            &stream("order-8"),
            ExpectedVersion::NoStream,
            EventData::json("Placed", &json!({})).unwrap(),
        )
        .await
        .unwrap();
    let report = verify(&*source, &*target, Selector::All).await.unwrap();
    let found: Vec<(String, u64, u64, u64)> = report
        .differences
        .iter()
        .map(|d| {
            (
                d.stream.to_string(),
                d.from_events,
                d.to_events,
                d.first_difference,
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            ("account-1".to_owned(), 7, 6, 6),
            ("order-8".to_owned(), 0, 1, 0)
        ]
    );
    assert!(report.differences[0]
        .to_string()
        .starts_with("account-1: from has 7 events (sha256 "));
    // A stream selector compares that stream only.
    let one = verify(&*source, &*target, Selector::Stream(stream("account-0")))
        .await
        .unwrap();
    assert_eq!((one.streams, one.differences.len()), (1, 0));
}

#[tokio::test]
async fn read_and_append_print_events_decoded() {
    let s = store();
    let request = |json: &str, encoding| AppendRequest {
        event_type: "Deposited".into(),
        json: json.into(),
        encoding,
        expected: ExpectedVersion::Any,
        event_id: None,
        schema_version: 1,
        causation_id: None,
        correlation_id: Some(Uuid::nil()),
        headers: vec![("k".into(), "v".into())],
    };
    let mut out = Vec::new();
    commands::append(
        &*s,
        &stream("account-1"),
        request(r#"{"b":1, "a":2}"#, Encoding::Json),
        &mut out,
    )
    .await
    .unwrap();
    commands::append(
        &*s,
        &stream("account-1"),
        request(r#"{"amount":3}"#, Encoding::Msgpack),
        &mut out,
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let read = ReadRequest {
        backwards: true,
        from: None,
        limit: Some(5),
        format: Format::Ndjson,
    };
    commands::read(&*s, &stream("account-1"), read, &mut out)
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["version"], 1);
    assert_eq!(lines[0]["content_type"], "application/msgpack");
    assert_eq!(lines[0]["payload"], json!({"amount": 3}));
    assert_eq!(lines[1]["payload"], json!({"b": 1, "a": 2}));
    assert_eq!(lines[1]["metadata"]["headers"], json!({"k": "v"}));
    assert_eq!(
        lines[1]["metadata"]["correlation_id"],
        "00000000-0000-0000-0000-000000000000"
    );
    // JSON payloads are stored as given.
    let stored = s
        .read_to_vec(&stream("account-1"), ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(&stored[0].payload.bytes[..], br#"{"b":1, "a":2}"#);
    let mut out = Vec::new();
    let table = ReadRequest {
        from: Some(1),
        ..ReadRequest::default()
    };
    commands::read(&*s, &stream("account-1"), table, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("account-1@1 "), "{text}");
    assert!(text.trim_end().ends_with(r#"{"amount":3}"#), "{text}");
}

#[tokio::test]
async fn tail_replays_marks_caught_up_then_follows_live() {
    let s = store();
    s.append_one(
        &stream("account-1"),
        ExpectedVersion::Any,
        EventData::json("Old", &json!({})).unwrap(),
    )
    .await
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let tail = tokio::spawn({
        let s = s.clone();
        let out = Shared(buffer.clone());
        async move {
            commands::tail(
                &*s,
                Selector::Category(Category::new("account").unwrap()),
                Start::Beginning,
                Format::Table,
                out,
                async {
                    stop_rx.await.ok();
                },
            )
            .await
        }
    });
    let text = || String::from_utf8(buffer.lock().unwrap().clone()).unwrap();
    let wait_for = |lines: usize| async move {
        for _ in 0..200 {
            if text().lines().count() >= lines {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no {lines} lines: {}", text());
    };
    wait_for(2).await;
    s.append_one(
        &stream("account-2"),
        ExpectedVersion::Any,
        EventData::json("New", &json!({"x": 1})).unwrap(),
    )
    .await
    .unwrap();
    wait_for(3).await;
    stop_tx.send(()).unwrap();
    assert_eq!(tail.await.unwrap().unwrap(), 2);
    let text = text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("account-1@0 "), "{text}");
    assert_eq!(lines[1], "-- CaughtUp: live from here --");
    assert!(lines[2].starts_with("account-2@0 "), "{text}");
    assert!(lines[2].ends_with(r#"{"x":1}"#), "{text}");
}

#[tokio::test]
async fn copy_resumes_after_the_checkpoint_it_keeps() {
    use photon_cli::transfer::{copy_with, CopyOptions};
    let source = store();
    let n = populate(&*source).await;
    let target = store();
    let file = std::env::temp_dir().join(format!("photon-cli-copy-{}.checkpoint", Uuid::new_v4()));
    let options = CopyOptions {
        follow: false,
        checkpoint_file: Some(file.clone()),
    };
    let hidden = ProgressBar::hidden();
    let first = copy_with(
        &*source,
        &*target,
        Selector::All,
        &options,
        &hidden,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(first.events, n);
    let last = source
        .replay_to_vec(Selector::All, Start::Beginning)
        .await
        .unwrap();
    let kept = std::fs::read_to_string(&file).unwrap();
    assert_eq!(kept.trim(), last.last().unwrap().checkpoint.to_string());
    // Two more events; the next run reads only them.
    source
        .append(
            &stream("account-1"),
            ExpectedVersion::Exact(Version(5)),
            vec![
                EventData::json("Late", &json!({"n": 1})).unwrap(),
                EventData::json("Late", &json!({"n": 2})).unwrap(),
            ],
        )
        .await
        .unwrap();
    let second = copy_with(
        &*source,
        &*target,
        Selector::All,
        &options,
        &hidden,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!((second.events, second.appended), (2, 2));
    assert_same(&*source, &*target, 4, n + 2).await;
    // A checkpoint of another backend is refused by the source, naming it.
    std::fs::write(&file, "kafka:00\n").unwrap();
    let err = copy_with(
        &*source,
        &*target,
        Selector::All,
        &options,
        &hidden,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &err,
            CliError::Store(photon_api::Error::ForeignCheckpoint { .. })
        ),
        "{err}"
    );
    std::fs::remove_file(&file).ok();
}

#[tokio::test]
async fn copy_follow_stays_live_until_stopped() {
    use photon_cli::transfer::{copy_with, CopyOptions};
    let source = store();
    let n = populate(&*source).await;
    let target = store();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let (source, target) = (source.clone(), target.clone());
        async move {
            let options = CopyOptions {
                follow: true,
                checkpoint_file: None,
            };
            copy_with(
                &*source,
                &*target,
                Selector::All,
                &options,
                &ProgressBar::hidden(),
                async {
                    stop_rx.await.ok();
                },
            )
            .await
        }
    });
    let live = stream("order-99");
    source
        .append_one(
            &live,
            ExpectedVersion::NoStream,
            EventData::json("Placed", &json!({})).unwrap(),
        )
        .await
        .unwrap();
    for _ in 0..300 {
        if target.stream_version(&live).await.unwrap() == Some(Version(0)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop_tx.send(()).unwrap();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.events, n + 1);
    assert_same(&*source, &*target, 5, n + 1).await;
}

/// `register` prints a register's revision, latest save and value decoded (MessagePack as JSON,
/// other bytes as base64), nulls for one never saved, and refuses a name no register can have.
#[tokio::test]
async fn register_prints_the_latest_save_decoded() {
    let s = store();
    let print = |name: &'static str| {
        let s = s.clone();
        async move {
            let mut out = Vec::new();
            commands::register(&*s, name, &mut out).await.map(|()| {
                serde_json::from_slice::<serde_json::Value>(&out).expect("one JSON object")
            })
        }
    };
    assert_eq!(
        print("newton_view-balances-v1").await.unwrap(),
        json!({"register": "newton_view-balances-v1", "revision": null, "save_id": null, "value": null})
    );
    let id = Uuid::new_v4();
    let value = rmp_serde::to_vec_named(&json!({"positions": {"account": "memory:00"}})).unwrap();
    s.save_register(
        "newton_view-balances-v1",
        None,
        Uuid::new_v4(),
        value.clone().into(),
    )
    .await
    .unwrap();
    s.save_register("newton_view-balances-v1", Some(0), id, value.into())
        .await
        .unwrap();
    assert_eq!(
        print("newton_view-balances-v1").await.unwrap(),
        json!({
            "register": "newton_view-balances-v1",
            "revision": 1,
            "save_id": id,
            "value": {"positions": {"account": "memory:00"}},
        })
    );
    s.save_register("raw", None, id, vec![0xc1].into())
        .await
        .unwrap();
    assert_eq!(
        print("raw").await.unwrap()["value"],
        json!({"content_type": "application/msgpack", "base64": "wQ=="})
    );
    match print("").await {
        Err(CliError::Store(photon_api::Error::InvalidInput { .. })) => {}
        other => panic!("{other:?}"),
    }
}
