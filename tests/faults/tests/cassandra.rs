//! Every fault scenario against the real cassandra test server (`PHOTON_TEST_CASSANDRA_URL`;
//! the suite skips without it unless `PHOTON_TEST_REQUIRE` names cassandra).

photon_faults::fault_suite!(
    "cassandra",
    [
        concurrent_writers,
        network_stall,
        late_write,
        server_restart,
        cancelled_appends,
        slow_consumers,
        paused_consumer_memory,
        hot_start_now,
        hot_start_late_answer,
        newton_under_stall,
        killed_writers,
    ]
);
