//! Every fault scenario against the real MongoDB-wire test server (`PHOTON_TEST_MONGO_URL`; the
//! suite skips without it unless `PHOTON_TEST_REQUIRE` names mongo).
//!
//! Not `paused_consumer_memory`: FerretDB 1.24 (over PostgreSQL or SQLite) answers each query
//! with a scan of the whole collection, and 32 MiB of 64 KiB events make every later query of
//! the run read them all (minutes). photon-mongo reads 64 commits per page, pulled as the
//! consumer asks.

photon_faults::fault_suite!(
    "mongo",
    [
        concurrent_writers,
        network_stall,
        late_write,
        server_restart,
        cancelled_appends,
        slow_consumers,
        hot_start_now,
        hot_start_late_answer,
        newton_under_stall,
        killed_writers,
    ]
);
