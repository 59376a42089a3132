//! The driver's errors as photon's, and the errors this backend builds itself.
//!
//! A driver error keeps its place as `source()`, so a caller can walk the chain down to the
//! `mongodb::error::Error` and its kind; the message only says what was being done. Which driver
//! errors are transient (`Unavailable`, retryable) is decided here and nowhere else. Validation
//! of the caller's input (`photon_api::validate`) builds its own errors; they are not repeated.

use mongodb::error::{Error as DriverError, ErrorKind, WriteFailure};
use photon_api::{Checkpoint, Error, StreamId};

use crate::client::BACKEND;
use crate::config::MongoConfig;

/// MongoDB's code for a unique index refusing an insert.
const DUPLICATE_KEY: i32 = 11000;

/// MongoDB's code for a command naming a collection that does not exist.
const NAMESPACE_NOT_FOUND: i32 = 26;

/// A driver error met while doing `context` (e.g. `appending to account-7`).
///
/// Failing to reach a server (selection, I/O, DNS, a cleared pool) is `Unavailable`; anything
/// else is `Backend`. Both keep the driver's error as their source.
pub(crate) fn driver(context: impl Into<String>, e: DriverError) -> Error {
    let context = context.into();
    match transient(&e) {
        Some(what) => Error::unavailable(BACKEND, format!("{context}: {what}"), e),
        None => Error::backend(BACKEND, context, e),
    }
}

/// What went wrong, in a few words, when `e` is a failure to reach a server.
fn transient(e: &DriverError) -> Option<&'static str> {
    match *e.kind {
        ErrorKind::ServerSelection { .. } => Some("no server answered within the timeout"),
        ErrorKind::Io(_) => Some("the connection failed"),
        ErrorKind::ConnectionPoolCleared { .. } => Some("the connection pool was cleared"),
        ErrorKind::DnsResolve { .. } => Some("the server's name did not resolve"),
        _ => None,
    }
}

/// Whether a unique index refused the write: another commit holds that version or position.
pub(crate) fn is_duplicate_key(e: &DriverError) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Whether the collection a command named does not exist (yet).
pub(crate) fn is_namespace_missing(e: &DriverError) -> bool {
    matches!(&*e.kind, ErrorKind::Command(c) if c.code == NAMESPACE_NOT_FOUND)
}

/// A connection string the driver refuses; `reason` is the driver's rule.
pub(crate) fn refused_url(config: &MongoConfig, e: &DriverError) -> Error {
    config.invalid(e.to_string())
}

/// An index the guarantees need is missing and we may not create it.
pub(crate) fn missing_index(collection: &str, index: &str) -> Error {
    Error::InvalidInput {
        what: format!("collection {collection}"),
        reason: format!(
            "index {index:?} is missing and photon_create=false; create it (see the photon-mongo README) or allow creation"
        ),
    }
}

/// An append that kept losing the race for a version or position.
pub(crate) fn too_contended(stream: &StreamId, attempts: usize) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!("{stream}: lost {attempts} races in a row; the stream is too contended"),
        source: None,
    }
}

/// A stored commit that does not have the documented layout.
pub(crate) fn corrupt(position: Option<i64>, what: impl Into<String>) -> Error {
    let at = position.map_or("?".into(), |p| p.to_string());
    Error::backend(
        BACKEND,
        format!("decoding the commit at position {at}"),
        what.into(),
    )
}

/// A commit that could not be encoded as BSON.
pub(crate) fn encoding(stream: &StreamId, e: mongodb::bson::ser::Error) -> Error {
    Error::backend(BACKEND, format!("encoding the commit for {stream}"), e)
}

/// A checkpoint of this backend whose token is not (position, index).
pub(crate) fn checkpoint_length(checkpoint: &Checkpoint, len: usize) -> Error {
    Error::InvalidInput {
        what: format!("checkpoint {checkpoint}"),
        reason: format!(
            "a {BACKEND} checkpoint holds 12 bytes (position and index), this one {len}"
        ),
    }
}

/// A checkpoint whose position this store has not reached: another store made it.
pub(crate) fn checkpoint_not_here(checkpoint: &Checkpoint, position: u64, head: u64) -> Error {
    Error::InvalidInput {
        what: format!("checkpoint {checkpoint}"),
        reason: format!("position {position} is not in this store (last position {head})"),
    }
}
