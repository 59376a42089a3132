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
