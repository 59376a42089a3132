//! The fault-injection suite: what every backend must keep when the network stalls, the server
//! restarts, writers die, callers give up and consumers are slow.
//!
//! The harness is a TCP [`proxy`] placed between a store and its server, control of the test
//! servers ([`servers`]), a writer binary the tests kill (`fault-writer`), and a [`history`]
//! checker that compares what was appended (acknowledged, refused, unknown) with what is stored
//! and delivered. [`scenarios`] are the cases; `tests/<backend>.rs` runs them per backend.

pub mod history;
pub mod proxy;
pub mod scenarios;
pub mod servers;
pub mod target;

use std::io::Write as _;
use std::sync::mpsc;
use std::time::Duration;

/// The longest one scenario may take, its wait for the other scenarios sharing the server
/// included (the slowest suite passes in about 3 minutes on the 2-core CI machine, one test at
/// most 2): past it the test binary is stopped. A hang then fails the suite naming its test,
/// instead of running until CI's own limit with nothing said.
pub const TEST_LIMIT: Duration = Duration::from_secs(600);

/// Stops the process when the test `name` is still running after a limit. A plain thread, not a
/// timer of the test's runtime: a hang may block the runtime's threads (a client's close that
/// never returns) or its shutdown (which waits for blocking tasks), and a timer there would
/// never fire.
#[derive(Debug)]
pub struct Watchdog {
    /// Dropped when the test ends, which lets the watching thread go.
    _done: mpsc::Sender<()>,
}

impl Watchdog {
    /// Watches the test `name`, stopping the process with a message `limit` from now.
    pub fn start(name: &'static str, limit: Duration) -> Self {
        let (done, ended) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(format!("watchdog {name}"))
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(limit) {
                    // Straight to the process's stderr: `eprintln!` in a thread a test spawned
                    // goes to the test's captured output, which the abort throws away.
                    let _ = writeln!(
                        std::io::stderr(),
                        "fault suite: {name} still running after {limit:?} (a hang: the suite's tests each pass in a few minutes); stopping the test binary"
                    );
                    dump_threads();
                    std::process::abort();
                }
            })
            .expect("a watchdog thread");
        Self { _done: done }
    }
}

/// Writes every thread's stack of this process to stderr with gdb, where gdb is installed and
/// may attach (nothing otherwise): where a hang waits is what its diagnosis needs, and CI keeps
/// only the output.
fn dump_threads() {
    let pid = std::process::id().to_string();
    let dumped = std::process::Command::new("gdb")
        .args(["-p", &pid, "-batch", "-nx", "-ex", "thread apply all bt"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .status();
    if let Err(e) = dumped {
        let _ = writeln!(std::io::stderr(), "fault suite: no thread dump ({e})");
    }
}

/// Expands each named scenario of [`scenarios`] into a test against the server backend
/// `$backend` (`Target::server`; skipped without its URL unless `PHOTON_TEST_REQUIRE` names it),
/// on a runtime of its own under a [`Watchdog`] of [`TEST_LIMIT`] that also covers the runtime's
/// shutdown. `killed_writers` also gets the path of the `fault-writer` binary, which only an
/// integration test of this crate knows.
#[macro_export]
macro_rules! fault_suite {
    ($backend:literal, [$($name:ident),* $(,)?]) => {
        $(
            #[test]
            fn $name() {
                let _watchdog = $crate::Watchdog::start(
                    concat!($backend, "::", stringify!($name)),
                    $crate::TEST_LIMIT,
                );
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(4)
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async {
                    if let Some(target) = $crate::target::Target::server($backend) {
                        $crate::fault_suite!(@run $name, target);
                    }
                });
                // Dropped here, under the watchdog: a shutdown waiting forever on a blocking
                // task is a hang too.
                drop(runtime);
            }
        )*
    };
    (@run killed_writers, $target:ident) => {
        $crate::scenarios::killed_writers(&$target, env!("CARGO_BIN_EXE_fault-writer")).await
    };
    (@run $name:ident, $target:ident) => {
        $crate::scenarios::$name(&$target).await
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process [`a_hung_test_stops_the_binary_with_its_name`] starts.
    const PROBE: &str = "PHOTON_FAULTS_WATCHDOG_PROBE";

    /// Hangs under a short watchdog, only in the child process the test below starts.
    #[test]
    fn watchdog_probe() {
        if std::env::var_os(PROBE).is_none() {
            return;
        }
        let _watchdog = Watchdog::start("faults::watchdog_probe", Duration::from_millis(200));
        std::thread::sleep(Duration::from_secs(30));
    }

    #[test]
    fn a_hung_test_stops_the_binary_with_its_name() {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(std::env::current_exe().expect("this test binary"))
            // Captured, as in a suite run: the message must get out anyway.
            .args(["--exact", "tests::watchdog_probe"])
            .env(PROBE, "1")
            .output()
            .expect("the test binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the hung probe passed: {stderr}");
        assert!(
            stderr.contains("faults::watchdog_probe still running after 200ms"),
            "no message naming the test: {stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "stopped only after the hang ended"
        );
        if std::path::Path::new("/usr/bin/gdb").exists() {
            // The hung thread's stack is in the dump.
            assert!(
                stderr.contains("watchdog_probe"),
                "no thread dump: {stderr}"
            );
        }
    }

    #[test]
    fn a_test_that_ends_lets_its_watchdog_go() {
        let watchdog = Watchdog::start("faults::quick", Duration::from_millis(100));
        drop(watchdog);
        // Past the limit: a watchdog still armed would have stopped this binary.
        std::thread::sleep(Duration::from_millis(300));
    }
}
