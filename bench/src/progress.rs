//! Progress bars for the long phases (loading millions of events, replays), on stderr so the
//! table on stdout stays clean; hidden with `--quiet` or when stderr is not a terminal.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Hides every bar from now on.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A bar counting up to `total` events, labelled `what`.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    if QUIET.load(Ordering::Relaxed) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>40} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({per_sec}, eta {eta})",
        )
        .expect("a valid template"),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Prints a phase heading above the bars (stderr).
pub fn phase(text: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("-- {text}");
    }
}
