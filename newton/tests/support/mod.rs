//! A small aggregate and helpers shared by newton's integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::sync::Arc;

use newton::store::EventStore;
use newton::{Aggregate, DomainEvent};
use photon_memory::MemoryStore;
use serde::{Deserialize, Serialize};

#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub total: u64,
    pub entries: u32,
}

#[derive(Debug, Clone)]
pub enum TallyCommand {
    Add(u64),
    /// Records nothing: tests the "no events" path.
    Touch,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum TallyEvent {
    Added { amount: u64 },
}

impl DomainEvent for TallyEvent {
    fn event_type(&self) -> &'static str {
        "Added"
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum TallyError {
    #[error("cannot add zero")]
    Zero,
}

impl Aggregate for Tally {
    const CATEGORY: &'static str = "tally";
    type Command = TallyCommand;
    type Event = TallyEvent;
    type Error = TallyError;

    fn handle(&self, command: &TallyCommand) -> Result<Vec<TallyEvent>, TallyError> {
        match command {
            TallyCommand::Add(0) => Err(TallyError::Zero),
            TallyCommand::Add(n) => Ok(vec![TallyEvent::Added { amount: *n }]),
            TallyCommand::Touch => Ok(vec![]),
        }
    }

    fn apply(&mut self, TallyEvent::Added { amount }: &TallyEvent) {
        self.total += amount;
        self.entries += 1;
    }
}

pub fn store() -> Arc<dyn EventStore> {
    Arc::new(MemoryStore::new())
}

/// A fresh instance id, so tests sharing a store never collide.
pub fn fresh_id() -> String {
    newton::Uuid::new_v4().simple().to_string()
}

/// `(backend, URL)` of every real server compiled in whose `PHOTON_TEST_<BACKEND>_URL` is set;
/// an unset one is skipped with a printed line, or fails when `PHOTON_TEST_REQUIRE` names it.
pub fn servers() -> Vec<(&'static str, String)> {
    #[allow(unused_mut)]
    let mut servers = Vec::new();
    #[cfg(feature = "mongo")]
    servers.extend(
        photon_conformance::server_url("mongo", "PHOTON_TEST_MONGO_URL").map(|u| ("mongo", u)),
    );
    #[cfg(feature = "kafka")]
    servers.extend(
        photon_conformance::server_url("kafka", "PHOTON_TEST_KAFKA_URL").map(|u| ("kafka", u)),
    );
    // A keyspace of newton's own: a keyspace's layout options are fixed by whoever creates
    // it, and other suites create the URL's keyspace with theirs.
    #[cfg(feature = "cassandra")]
    servers.extend(
        photon_conformance::server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL").map(|url| {
            let (address, query) = url.split_once('?').unwrap_or((&url, ""));
            let (scheme, rest) = address.split_once("://").unwrap_or(("cassandra", address));
            let hosts = rest.split('/').next().unwrap_or(rest);
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{query}")
            };
            (
                "cassandra",
                format!("{scheme}://{hosts}/newton_test{query}"),
            )
        }),
    );
    if servers.is_empty() {
        println!(
            "no server backend: build with --features mongo, kafka or cassandra and set PHOTON_TEST_<BACKEND>_URL"
        );
    }
    servers
}
