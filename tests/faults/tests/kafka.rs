//! Every fault scenario against the real kafka test server (`PHOTON_TEST_KAFKA_URL`;
//! the suite skips without it unless `PHOTON_TEST_REQUIRE` names kafka).

use photon_faults::scenarios;
use photon_faults::target::Target;

fn target() -> Option<Target> {
    Target::server("kafka")
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
scenario!(paused_consumer_memory);
scenario!(hot_start_now);
scenario!(newton_under_stall);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_writers() {
    if let Some(target) = target() {
        scenarios::killed_writers(&target, env!("CARGO_BIN_EXE_fault-writer")).await;
    }
}
