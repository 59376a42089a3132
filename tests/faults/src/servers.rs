//! Control of the real test servers from a test: `scripts/servers ACTION NAME`.
//!
//! The script owns the servers' processes (it started them); the tests only ask it to kill,
//! start, pause or resume one, so a crash looks to photon exactly as it would in production.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to do to a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `kill -9` the server, as a crash.
    Kill,
    /// Start it and wait until it answers a real request.
    Start,
    /// Kill it and start it again, waiting until it answers.
    Restart,
    /// SIGSTOP: the server holds every connection open and answers nothing.
    Pause,
    /// SIGCONT after [`Action::Pause`].
    Resume,
}

impl Action {
    fn word(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Start => "start",
            Action::Restart => "restart",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }
}

/// The repository root, where `scripts/servers` lives.
pub fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `scripts/servers ACTION NAME` and returns how long it took; panics with the script's
/// output when it fails, since a scenario cannot go on with a server in an unknown state.
pub async fn control(action: Action, name: &str) -> Duration {
    let started = Instant::now();
    let out = tokio::process::Command::new(repository().join("scripts/servers"))
        .arg(action.word())
        .arg(name)
        .current_dir(repository())
        .output()
        .await
        .expect("runs scripts/servers");
    assert!(
        out.status.success(),
        "scripts/servers {} {name} failed ({}):\n{}{}",
        action.word(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}
