//! The bank example with `--metrics-addr` serves photon's and newton's metrics for Prometheus:
//! the example runs as a process (on the in-memory store), and its endpoint is scraped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Builds the example (a no-op when it is current) and returns its path, next to this test's
/// binary in the same target directory and profile.
fn bank_example() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "newton", "--example", "bank"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "the bank example builds");
    let deps = std::env::current_exe().expect("the test's path");
    let profile = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    profile
        .join("examples")
        .join(format!("bank{}", std::env::consts::EXE_SUFFIX))
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

    // The example says when its run is over and it only serves metrics.
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the example ended early; it printed: {seen:#?}"))
            .expect("a line of output");
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
