//! The typed errors this backend builds itself.
//!
//! An in-process store has no driver whose errors need mapping: every failure is a refusal of
//! the caller's input, built here so its message names what was refused and why. The shared
//! checks (`photon_api::validate`) build their own errors; they are not repeated here.

use photon_api::{Checkpoint, Error, ExpectedVersion, StreamId, Version};

/// An append whose expected version does not match the stream's.
pub(crate) fn wrong_expected_version(
    stream: &StreamId,
    expected: ExpectedVersion,
    actual: Option<Version>,
) -> Error {
    Error::WrongExpectedVersion {
        stream: stream.clone(),
        expected,
        actual,
    }
}

/// A memory checkpoint at or past the end of this store's log: another store made it.
pub(crate) fn checkpoint_past_end(checkpoint: &Checkpoint, position: u64, len: u64) -> Error {
    Error::InvalidInput {
        what: format!("checkpoint {checkpoint}"),
        reason: format!(
            "position {position} is past the end of this store ({len} events): it was made by another memory store"
        ),
    }
}
