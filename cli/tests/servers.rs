//! The `photon` binary against the real servers (`eval "$(scripts/servers env)"`): looking,
//! appending and tailing on each, and export → import → verify and copy → verify between two
//! different backends. A backend whose `PHOTON_TEST_<BACKEND>_URL` is unset is skipped with a
//! printed line, and fails instead when `PHOTON_TEST_REQUIRE` names it.
//!
//! Events are written in-process through `newton::connect` (fast, and several batches per
//! stream); everything else goes through the binary, as an operator would.

// With a backend's feature off its tests are compiled out, and some helpers go unused.
#![cfg_attr(
    not(all(feature = "kafka", feature = "cassandra", feature = "mongo")),
    allow(dead_code, unused_imports)
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use photon_api::{EventData, ExpectedVersion, StreamId, Uuid};
use photon_conformance::server_url;
use serde_json::json;

fn photon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_photon"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run photon")
}

#[track_caller]
fn ok(args: &[&str]) -> (String, String) {
    let o = photon(args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "photon {args:?} failed ({:?}): {err}",
        o.status.code()
    );
    (out, err)
}

fn kafka() -> Option<String> {
    server_url("kafka", "PHOTON_TEST_KAFKA_URL")
}

/// The Cassandra URL with a keyspace of this crate's own: a keyspace's layout options are fixed
/// by whoever creates it, and other suites create `photon_test` with theirs.
fn cassandra() -> Option<String> {
    let url = server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL")?;
    let (scheme, rest) = url.split_once("://")?;
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (rest, String::new()),
    };
    let hosts = base.split('/').next().unwrap_or(base);
    Some(format!("{scheme}://{hosts}/photon_cli_test{query}"))
}

fn mongo() -> Option<String> {
    server_url("mongo", "PHOTON_TEST_MONGO_URL")
}

/// A category no other test or run uses.
fn fresh_category() -> String {
    format!("cli{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Writes 3 streams of `category` in several batches, JSON and MessagePack payloads with every
/// kind of metadata; returns the number of events.
async fn populate(url: &str, category: &str) -> u64 {
    let store = newton::connect(url).await.expect("connect");
    let mut n = 0;
    for i in 0..3u64 {
        let stream = StreamId::parse(format!("{category}-{i}")).unwrap();
        let mut expected = ExpectedVersion::NoStream;
        for batch in 1..=3u64 {
            let events: Vec<EventData> = (0..batch)
                .map(|k| {
                    let e = if k % 2 == 0 {
                        EventData::json("Deposited", &json!({"amount": k, "stream": i})).unwrap()
                    } else {
                        EventData::msgpack("Withdrawn", &json!({"amount": k})).unwrap()
                    };
                    e.with_correlation_id(Uuid::now_v7())
                        .with_causation_id(Uuid::now_v7())
                        .with_schema_version(2)
                        .with_header("tenant", format!("t{i}"))
                })
                .collect();
            n += events.len() as u64;
            let result = store
                .append(&stream, expected, events)
                .await
                .expect("append");
            expected = result.next_expected();
        }
    }
    n
}

/// Export from `from`, import into `to` (twice: the re-run is answered as retries), verify;
/// then a difference is found and reported with exit code 3.
async fn export_import_verify(from: &str, to: &str) {
    let category = fresh_category();
    let n = populate(from, &category).await;
    let selector = format!("category:{category}");
    let dump = std::env::temp_dir().join(format!("{category}.ndjson"));
    let dump_path = dump.to_str().expect("utf-8");

    let o = photon(&["export", from, &selector]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!("photon: exported {n} events\n")
    );
    std::fs::write(&dump, &o.stdout).expect("write dump");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count() as u64,
        n + 2
    );

    for _ in 0..2 {
        let (_, err) = ok(&["import", to, "--file", dump_path]);
        assert!(err.contains(&format!("imported {n} events: ")), "{err}");
    }
    let (out, _) = ok(&["verify", from, to, &selector]);
    assert_eq!(out, format!("3 streams, {n} events compared, 0 differ\n"));

    // The target reads the same, payloads decoded, metadata kept.
    let (out, _) = ok(&[
        "read",
        to,
        &format!("{category}-1"),
        "--format",
        "ndjson",
        "--backwards",
        "--limit",
        "2",
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("ndjson"))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["version"], 5);
    assert_eq!(lines[0]["payload"], json!({"amount": 2, "stream": 1}));
    assert_eq!(lines[1]["payload"], json!({"amount": 1}));
    assert_eq!(lines[1]["content_type"], "application/msgpack");
    assert_eq!(lines[1]["schema_version"], 2);
    assert_eq!(lines[1]["metadata"]["headers"], json!({"tenant": "t1"}));

    // One more event in the target, through the binary with an expected version.
    let (out, _) = ok(&[
        "append",
        to,
        &format!("{category}-2"),
        "--type",
        "Late",
        "--json",
        "{}",
        "--expect",
        "5",
    ]);
    assert!(out.starts_with(&format!("{category}-2@6 ")), "{out}");
    let o = photon(&["verify", from, to, &selector]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(
        out.starts_with(&format!("differs {category}-2: from has 6 events (sha256 "))
            && out.contains("to has 7 (sha256 ")
            && out.contains("first difference at version 6"),
        "{out}"
    );
    assert!(out.ends_with(&format!("3 streams, {n} events compared, 1 differ\n")));
    std::fs::remove_file(&dump).ok();
}

/// `copy` between two backends, re-run, and verify.
async fn copy_verify(from: &str, to: &str) {
    let category = fresh_category();
    let n = populate(from, &category).await;
    let selector = format!("category:{category}");
    for _ in 0..2 {
        let (_, err) = ok(&["copy", from, to, &selector]);
        assert!(err.contains(&format!("copied {n} events: ")), "{err}");
    }
    let (out, _) = ok(&["verify", from, to, &selector]);
    assert_eq!(out, format!("3 streams, {n} events compared, 0 differ\n"));

    // With a kept checkpoint: the first run copies (answered as retries) and keeps where it got
    // to; then a live copy resumes after it and copies an event appended while it runs.
    let file = std::env::temp_dir().join(format!("{category}.checkpoint"));
    let file_arg = file.to_str().expect("utf-8");
    let (_, err) = ok(&["copy", from, to, &selector, "--checkpoint-file", file_arg]);
    assert!(err.contains(&format!("copied {n} events: ")), "{err}");
    let child = Command::new(env!("CARGO_BIN_EXE_photon"))
        .args([
            "copy",
            from,
            to,
            &selector,
            "--checkpoint-file",
            file_arg,
            "--follow",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run photon copy --follow");
    let late = format!("{category}-late");
    ok(&["append", from, &late, "--type", "Late", "--json", "{}"]);
    let mut copied = false;
    for _ in 0..120 {
        let (out, _) = ok(&["read", to, &late]);
        if out.lines().count() == 1 {
            copied = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(copied, "the live copy did not copy {late}: {err}");
    assert!(o.status.success(), "{err}");
    assert!(err.contains("copied 1 events: "), "{err}");
    let (out, _) = ok(&["verify", from, to, &selector]);
    assert_eq!(
        out,
        format!("4 streams, {} events compared, 0 differ\n", n + 1)
    );
    std::fs::remove_file(&file).ok();
    // The listing commands see what was copied.
    let (out, _) = ok(&["streams", to, &category]);
    assert_eq!(
        out,
        format!("{category}-0\n{category}-1\n{category}-2\n{category}-late\n")
    );
    // Not on Kafka: listing categories there visits every topic of the shared test broker
    // (minutes, with the topics every test run leaves behind).
    if !to.starts_with("kafka://") {
        let (out, _) = ok(&["categories", to]);
        assert!(
            out.lines().any(|l| l == category),
            "{category} not in {out}"
        );
    }
}

/// `tail` on a server: replay, the marker, then an event appended by another process.
async fn tail_follows_live(url: &str) {
    let category = fresh_category();
    let store = newton::connect(url).await.expect("connect");
    let old = StreamId::parse(format!("{category}-old")).unwrap();
    store
        .append(
            &old,
            ExpectedVersion::NoStream,
            vec![EventData::json("Old", &json!({"n": 0})).unwrap()],
        )
        .await
        .expect("append");
    let mut child = Command::new(env!("CARGO_BIN_EXE_photon"))
        .args([
            "tail",
            url,
            &format!("category:{category}"),
            "--format",
            "ndjson",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run photon tail");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {what} line from photon tail"))
    };
    let first: serde_json::Value = serde_json::from_str(&next("replayed")).unwrap();
    assert_eq!(first["stream"], old.as_str());
    assert_eq!(next("caught up"), r#"{"caught_up":true}"#);
    let (out, _) = ok(&[
        "append",
        url,
        &format!("{category}-new"),
        "--type",
        "New",
        "--json",
        r#"{"n":1}"#,
        "--expect",
        "none",
    ]);
    let live: serde_json::Value = serde_json::from_str(&next("live")).unwrap();
    assert_eq!(live["stream"], format!("{category}-new"));
    assert_eq!(live["payload"], json!({"n": 1}));
    assert!(out.contains(live["event_id"].as_str().unwrap()), "{out}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}

fn health(url: &str, backend: &str) {
    let (out, _) = ok(&["health", url]);
    assert!(out.starts_with(&format!("{backend} ok: ")), "{out}");
}

#[cfg(all(feature = "kafka", feature = "cassandra"))]
#[tokio::test(flavor = "multi_thread")]
async fn export_import_verify_kafka_to_cassandra() {
    let (Some(k), Some(c)) = (kafka(), cassandra()) else {
        return;
    };
    export_import_verify(&k, &c).await;
}

#[cfg(all(feature = "cassandra", feature = "mongo"))]
#[tokio::test(flavor = "multi_thread")]
async fn export_import_verify_cassandra_to_mongo() {
    let (Some(c), Some(m)) = (cassandra(), mongo()) else {
        return;
    };
    export_import_verify(&c, &m).await;
}

#[cfg(all(feature = "mongo", feature = "kafka"))]
#[tokio::test(flavor = "multi_thread")]
async fn export_import_verify_mongo_to_kafka() {
    let (Some(m), Some(k)) = (mongo(), kafka()) else {
        return;
    };
    export_import_verify(&m, &k).await;
}

#[cfg(all(feature = "mongo", feature = "cassandra"))]
#[tokio::test(flavor = "multi_thread")]
async fn copy_verify_mongo_to_cassandra() {
    let (Some(m), Some(c)) = (mongo(), cassandra()) else {
        return;
    };
    copy_verify(&m, &c).await;
}

#[cfg(all(feature = "kafka", feature = "mongo"))]
#[tokio::test(flavor = "multi_thread")]
async fn copy_verify_kafka_to_mongo() {
    let (Some(k), Some(m)) = (kafka(), mongo()) else {
        return;
    };
    copy_verify(&k, &m).await;
}

#[cfg(all(feature = "cassandra", feature = "kafka"))]
#[tokio::test(flavor = "multi_thread")]
async fn copy_verify_cassandra_to_kafka() {
    let (Some(c), Some(k)) = (cassandra(), kafka()) else {
        return;
    };
    copy_verify(&c, &k).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread")]
async fn kafka_health_and_tail() {
    let Some(url) = kafka() else { return };
    health(&url, "kafka");
    tail_follows_live(&url).await;
}

#[cfg(feature = "cassandra")]
#[tokio::test(flavor = "multi_thread")]
async fn cassandra_health_and_tail() {
    let Some(url) = cassandra() else { return };
    health(&url, "cassandra");
    tail_follows_live(&url).await;
}

#[cfg(feature = "mongo")]
#[tokio::test(flavor = "multi_thread")]
async fn mongo_health_and_tail() {
    let Some(url) = mongo() else { return };
    health(&url, "mongo");
    tail_follows_live(&url).await;
}

/// The helpers checked where no server runs (`memory://` lives in one process, so only its
/// health can be asked across processes).
#[test]
fn memory_health() {
    health("memory://", "memory");
}
