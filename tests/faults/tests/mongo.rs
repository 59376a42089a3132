//! Every fault scenario against the real mongo test server (`PHOTON_TEST_MONGO_URL`;
//! the suite skips without it unless `PHOTON_TEST_REQUIRE` names mongo).

use photon_faults::scenarios;
use photon_faults::target::Target;

fn target() -> Option<Target> {
    Target::server("mongo")
}

macro_rules! scenario {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            if let Some(target) = target() {
                scenarios::$name(&target).await;
            }
        }
    };
}

scenario!(concurrent_writers);
scenario!(network_stall);
scenario!(late_write);
scenario!(server_restart);
scenario!(cancelled_appends);
scenario!(slow_consumers);
// Not `paused_consumer_memory`: FerretDB on SQLite answers each query with a scan of the whole
// collection, and 32 MiB of 64 KiB events make every later query of the run read them all
// (minutes). photon-mongo reads 64 commits per page, pulled as the consumer asks.
scenario!(hot_start_now);
scenario!(newton_under_stall);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_writers() {
    if let Some(target) = target() {
        scenarios::killed_writers(&target, env!("CARGO_BIN_EXE_fault-writer")).await;
    }
}
