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

/// Expands each named scenario of [`scenarios`] into a `#[tokio::test]` against the server
/// backend `$backend` (`Target::server`; skipped without its URL unless `PHOTON_TEST_REQUIRE`
/// names it). `killed_writers` also gets the path of the `fault-writer` binary, which only an
/// integration test of this crate knows.
#[macro_export]
macro_rules! fault_suite {
    ($backend:literal, [$($name:ident),* $(,)?]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                if let Some(target) = $crate::target::Target::server($backend) {
                    $crate::fault_suite!(@run $name, target);
                }
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
