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
