//! The bank example with `--metrics-addr` serves photon's and newton's metrics for Prometheus:
//! the example runs as a process (on the in-memory store), and its endpoint is scraped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the example may take to finish its run and start serving: far more than it needs,
/// so only a hung example fails the test (instead of hanging it).
const SERVING_DEADLINE: Duration = Duration::from_secs(60);

/// Builds the example in the profile this test was built in (a no-op when it is current) and
/// returns the path cargo reports for it, so neither a `--release` run nor a custom profile or
/// target finds a stale or missing binary.
fn bank_example() -> PathBuf {
    // This test runs from target/[<triple>/]<dir>/deps; <dir> is the profile's output directory,
    // `debug` for the dev (and test) profile, the profile's own name otherwise.
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .and_then(|d| d.file_name())
        .and_then(|d| d.to_str())
        .expect("target/<profile>/deps");
    let profile = if dir == "debug" { "dev" } else { dir };
    let output = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "newton", "--example", "bank"])
        .args(["--profile", profile, "--message-format", "json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "the bank example builds");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "bank")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reports the example's executable")
}

/// Kills the example however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_bank_example_serves_its_metrics() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(bank_example())
        .args(["--metrics-addr", &addr])
        .env_remove(newton::URL_VARIABLE)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the example starts");
    let stdout = child.stdout.take().expect("piped");
    let _running = Running(child);

    // The example says when its run is over and it only serves metrics. Its output is read on
    // a thread of its own, so the wait has a deadline; on failure `_running` kills the example,
    // which closes the pipe and ends the thread.
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let failed = line.is_err();
            if lines_tx.send(line).is_err() || failed {
                break;
            }
        }
    });
    let deadline = Instant::now() + SERVING_DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines_rx.recv_timeout(left) {
            Ok(line) => line.expect("a line of output"),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "the example did not start serving within {SERVING_DEADLINE:?}; it printed: \
                 {seen:#?}"
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the example ended early; it printed: {seen:#?}")
            }
        };
        if line.starts_with("metrics: serving") {
            break;
        }
        seen.push(line);
    }

    let mut http = TcpStream::connect(&addr).expect("the metrics endpoint answers");
    http.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        http,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    http.read_to_string(&mut page).expect("a page");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for metric in [
        r#"photon_appends_total{backend="memory",outcome="ok"}"#,
        r#"photon_appended_events_total{backend="memory"}"#,
        r#"photon_appended_bytes_total{backend="memory"}"#,
        r#"photon_append_duration_seconds{backend="memory",quantile="0.5"}"#,
        r#"photon_subscription_lag_seconds{backend="memory",quantile="0.5"}"#,
        r#"newton_view_lag_seconds{view="balances-v1"}"#,
        "# HELP photon_appends_total",
    ] {
        assert!(page.contains(metric), "no {metric} in:\n{page}");
    }
    assert!(
        !page.contains("stream="),
        "never labelled by stream:\n{page}"
    );
}
