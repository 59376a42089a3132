//! The `photon` binary run as a process against `memory://`: what an operator types, the exit
//! codes and the one error line. `memory://` is new and empty in every process, so round trips
//! across commands are in `library.rs` (in-process) and `servers.rs` (real servers).

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn photon(args: &[&str]) -> Output {
    photon_with_input(args, "")
}

fn photon_with_input(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_photon"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run photon");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("photon output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure is exactly one line on stderr, prefixed so it is recognisable in a script's log.
#[track_caller]
fn assert_one_error_line(o: &Output, code: i32, contains: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("photon: error: "), "{err}");
    assert!(err.contains(contains), "{err:?} lacks {contains:?}");
}

#[test]
fn health_categories_and_streams() {
    let o = photon(&["health", "memory://"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("memory ok: "), "{}", stdout(&o));
    let o = photon(&["categories", "memory://"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "");
    let o = photon(&["streams", "memory://", "account"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "");
    let o = photon(&["streams", "memory://", "not-a-category"]);
    assert_one_error_line(&o, 1, "invalid category \"not-a-category\"");
}

#[test]
fn read_of_an_empty_stream_in_every_format() {
    let o = photon(&["read", "memory://", "account-1", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "[]\n");
    for format in ["table", "ndjson"] {
        let o = photon(&["read", "memory://", "account-1", "--format", format]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), "");
    }
    let o = photon(&["read", "memory://", "account"]);
    assert_one_error_line(&o, 1, "invalid stream \"account\"");
}

#[test]
fn append_prints_stream_version_id_and_checkpoint() {
    let id = "01a22c4c-ff07-7586-bbb1-c98fbf988b27";
    let o = photon(&[
        "append",
        "memory://",
        "account-1",
        "--type",
        "Deposited",
        "--json",
        r#"{"amount": 5}"#,
        "--expect",
        "none",
        "--id",
        id,
        "--header",
        "tenant=t1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("account-1@0 {id} memory:0000000000000000\n")
    );
    let o = photon_with_input(
        &[
            "append",
            "memory://",
            "account-1",
            "--type",
            "Deposited",
            "--file",
            "-",
            "--encoding",
            "msgpack",
        ],
        r#"{"amount": 6}"#,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("account-1@0 "), "{}", stdout(&o));
}

#[test]
fn a_refused_append_is_one_line_and_exit_code_4() {
    let o = photon(&[
        "append",
        "memory://",
        "account-1",
        "--type",
        "Deposited",
        "--json",
        "{}",
        "--expect",
        "3",
    ]);
    assert_one_error_line(
        &o,
        4,
        "wrong expected version on stream account-1: expected version 3, the stream is at no stream",
    );
    assert_eq!(stdout(&o), "");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let base = ["append", "memory://", "account-1", "--type", "T"];
    let o = photon(&[&base[..], &["--json", "{not json"]].concat());
    assert_one_error_line(&o, 2, "the payload is not JSON");
    let o = photon(&[&base[..], &["--json", "{}", "--expect", "maybe"]].concat());
    assert_one_error_line(&o, 2, "expected version \"maybe\"");
    let o = photon(&[&base[..], &["--json", "{}", "--header", "novalue"]].concat());
    assert_one_error_line(&o, 2, "header \"novalue\" is not KEY=VALUE");
    let o = photon(&["tail", "memory://", "account"]);
    assert_one_error_line(&o, 2, "selector \"account\"");
    let o = photon(&["tail", "memory://", "all", "--from", "yesterday"]);
    assert_one_error_line(&o, 2, "start \"yesterday\"");
    // clap's own refusals use the same code.
    let o = photon(&base);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn credentials_never_appear_in_output() {
    for url in [
        "memory://admin:s3cretpw@somewhere",
        "mongodb://admin:s3cretpw@127.0.0.1:1/db?password=s3cretpw",
        "redis://admin:s3cretpw@127.0.0.1:1",
        "kafka://127.0.0.1:1?sasl.password=s3cretpw&nonsense=1",
        "cassandra://admin:s3cret%70w@127.0.0.1:1/ks?nonsense=1",
    ] {
        for args in [
            vec!["health", url],
            vec!["export", url, "all"],
            vec!["verify", "memory://", url],
        ] {
            let o = photon(&args);
            assert!(!o.status.success(), "{args:?} succeeded");
            let all = format!("{}{}", stdout(&o), stderr(&o));
            assert!(
                !all.contains("s3cret"),
                "{args:?} showed the password: {all}"
            );
            assert!(all.contains("photon: error: "), "{args:?}: {all}");
        }
    }
}

#[test]
fn tail_prints_the_caught_up_marker_and_stops_on_sigterm() {
    let child = Command::new(env!("CARGO_BIN_EXE_photon"))
        .args(["tail", "memory://", "all", "--format", "ndjson"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run photon");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let o = child.wait_with_output().expect("output");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "{\"caught_up\":true}\n");
}

#[test]
fn export_of_an_empty_store_is_a_header_and_an_end() {
    let o = photon(&["export", "memory://", "category:account"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(
        r#"{"kind":"header","format":"photon-dump","version":1,"selector":"category:account","source_backend":"memory""#
    ));
    assert_eq!(lines[1], r#"{"kind":"end","events":0}"#);
    assert_eq!(stderr(&o), "photon: exported 0 events\n");
}

const DUMP: &str = r#"{"kind":"header","format":"photon-dump","version":1,"selector":"all","source_backend":"kafka","exported_at":"2026-11-30T12:00:00Z"}
{"kind":"event","stream":"account-1","version":0,"event_id":"01a22c4d-d1d9-7372-af85-0f350f1a056a","event_type":"Opened","schema_version":1,"occurred_at":"2026-11-30T11:53:47.226007Z","recorded_at":"2026-11-30T11:53:47.715033Z","causation_id":null,"correlation_id":null,"headers":{},"content_type":"application/json","payload":"eyJhIjoxfQ==","checkpoint":"kafka:00"}
{"kind":"event","stream":"account-2","version":0,"event_id":"01a22c4d-d640-768e-937c-07fadf4804cf","event_type":"Opened","schema_version":1,"occurred_at":"2026-11-30T11:53:48.352447Z","recorded_at":"2026-11-30T11:53:50.072270Z","causation_id":null,"correlation_id":null,"headers":{},"content_type":"application/json","payload":"eyJiIjoxfQ==","checkpoint":"kafka:01"}
{"kind":"event","stream":"account-1","version":1,"event_id":"01a22c4d-d43b-77c7-9a0a-c9de468634f7","event_type":"Dep","schema_version":1,"occurred_at":"2026-11-30T11:53:47.835316Z","recorded_at":"2026-11-30T11:53:48.231031Z","causation_id":null,"correlation_id":null,"headers":{"k":"v"},"content_type":"application/msgpack","payload":"gaFhAg==","checkpoint":"kafka:02"}
{"kind":"end","events":3}
"#;

#[test]
fn import_reads_a_dump_from_stdin_or_a_file() {
    let o = photon_with_input(&["import", "memory://"], DUMP);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "photon: imported 3 events: 3 appended (or answered as retries of an earlier run), 0 already present\n"
    );
    let path = std::env::temp_dir().join(format!("photon-cli-{}.ndjson", std::process::id()));
    std::fs::write(&path, DUMP).expect("write dump");
    let o = photon(&[
        "import",
        "memory://",
        "--file",
        path.to_str().expect("utf-8"),
    ]);
    std::fs::remove_file(&path).ok();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_cut_short_or_foreign_dump_is_refused_with_its_line() {
    let cut: String = DUMP.lines().take(3).map(|l| format!("{l}\n")).collect();
    let o = photon_with_input(&["import", "memory://"], &cut);
    assert_one_error_line(&o, 1, "dump line 3: the dump ends without its end line");
    let newer = DUMP.replacen(r#""version":1"#, r#""version":2"#, 1);
    let o = photon_with_input(&["import", "memory://"], &newer);
    assert_one_error_line(&o, 1, "dump line 1: dump format version 2");
    let o = photon_with_input(&["import", "memory://"], "hello\n");
    assert_one_error_line(&o, 1, "dump line 1: not JSON");
    let o = photon_with_input(&["import", "memory://"], "");
    assert_one_error_line(&o, 1, "the dump is empty");
    let bad_event = DUMP.replacen("account-2", "account", 1);
    let o = photon_with_input(&["import", "memory://"], &bad_event);
    assert_one_error_line(&o, 1, "dump line 3: ");
}

#[test]
fn verify_of_two_empty_stores_agrees() {
    let o = photon(&["verify", "memory://", "memory://"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "0 streams, 0 events compared, 0 differ\n");
}
