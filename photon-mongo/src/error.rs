//! The driver's errors as photon's, and the errors this backend builds itself.
//!
//! A driver error keeps its place as `source()`, so a caller can walk the chain down to the
//! `mongodb::error::Error` and its kind; the message only says what was being done. Which driver
//! errors are transient (`Unavailable`, retryable) and which refuse access (`AccessDenied`,
//! final) is decided here and nowhere else. Validation of the caller's input (`photon_api::validate`) builds its own errors; they are not repeated.

use std::collections::HashMap;
use std::time::Duration;

use mongodb::error::{Error as DriverError, ErrorKind, WriteFailure};
use mongodb::options::ServerAddress;
use photon_api::{AccessKind, Checkpoint, Error, StreamId};

use crate::client::BACKEND;
use crate::config::MongoConfig;

/// MongoDB's code for a unique index refusing an insert.
const DUPLICATE_KEY: i32 = 11000;

/// MongoDB's code for a command naming a collection that does not exist.
const NAMESPACE_NOT_FOUND: i32 = 26;

/// MongoDB's code for credentials the server does not accept: a wrong password or an unknown
/// user (the server does not say which).
const AUTHENTICATION_FAILED: i32 = 18;

/// MongoDB's code for a command the connection may not run: its user lacks the role (the
/// action, e.g. `insert` or `createIndex`), or, on a server that demands credentials, the
/// connection has no user at all.
const UNAUTHORIZED: i32 = 13;

/// A driver error met while doing `context` (e.g. `appending to account-7`).
///
/// A refusal of access (credentials, the TLS handshake, a permission) is `AccessDenied`, final:
/// retrying it would only hammer the server. Every other error after which the operation may
/// or may not have taken effect, or that a retry may get past (no server, a lost connection, a
/// write-concern error, a step-down, a time limit), is `Unavailable`; anything else is
/// `Backend`. All keep the driver's error as their source.
pub(crate) fn driver(context: impl Into<String>, e: DriverError) -> Error {
    driver_after(context, e, &Heartbeats::new())
}

/// The latest heartbeat of the driver's monitor for each server it knows, kept by the client:
/// `None` for one that succeeded, the error for one that failed. A server selection that times
/// out says only "no available servers", while the reason, for instance a certificate the
/// client does not trust, is the heartbeats'. A server the topology drops is dropped here too.
pub(crate) type Heartbeats = HashMap<ServerAddress, Option<DriverError>>;

/// [`driver`], knowing the monitor's latest heartbeat per server: a server selection that timed
/// out while the latest heartbeat of every known server was a refused TLS handshake (a
/// certificate one, see [`is_tls_failure`]) is `AccessDenied` (`Tls`), with one of those
/// handshake errors as its source, rather than `Unavailable`. The driver keeps trying a server
/// whose handshake fails, so without this a certificate nobody trusts would read as a server
/// that is down, and callers would retry it forever. One server that answers, or fails for
/// another reason (down, unreachable: a failover in progress), keeps the timeout
/// `Unavailable`: on a replica set, a member with a bad certificate that the selection does
/// not need must not turn an ordinary failover into a final refusal.
pub(crate) fn driver_after(
    context: impl Into<String>,
    e: DriverError,
    heartbeats: &Heartbeats,
) -> Error {
    let context = context.into();
    if let Some(kind) = denied(&e) {
        return Error::access_denied(BACKEND, kind, context, e);
    }
    if matches!(*e.kind, ErrorKind::ServerSelection { .. }) {
        if let Some((addresses, handshake)) = all_refused_tls(heartbeats) {
            return Error::access_denied(
                BACKEND,
                AccessKind::Tls,
                format!("{context}: no server could be selected, the TLS handshake with {addresses} failed"),
                handshake,
            );
        }
    }
    match transient(&e) {
        Some(what) => Error::unavailable(BACKEND, format!("{context}: {what}"), e),
        None => Error::backend(BACKEND, context, e),
    }
}

/// Which access check `e` is a refusal by, if any: the credentials (the driver's own
/// authentication error, or the server's code 18), a permission (code 13, as a command or a
/// write error), or the TLS handshake of the connection the operation itself opened.
fn denied(e: &DriverError) -> Option<AccessKind> {
    let unauthorized_write = |m: &mongodb::error::InsertManyError| {
        m.write_errors
            .iter()
            .flatten()
            .any(|w| w.code == UNAUTHORIZED)
    };
    match &*e.kind {
        // The driver makes any ok:0 answer to saslStart / saslContinue an authentication
        // error, keeping the server's as its source: a shutdown or step-down during a rolling
        // restart is not a refusal (see `transient`).
        ErrorKind::Authentication { .. } if login_interrupted(e) => None,
        ErrorKind::Authentication { .. } => Some(AccessKind::Authentication),
        ErrorKind::Command(c) if c.code == AUTHENTICATION_FAILED => {
            Some(AccessKind::Authentication)
        }
        ErrorKind::Command(c) if c.code == UNAUTHORIZED => Some(AccessKind::Authorization),
        ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == UNAUTHORIZED => {
            Some(AccessKind::Authorization)
        }
        ErrorKind::InsertMany(m) if unauthorized_write(m) => Some(AccessKind::Authorization),
        _ if is_tls_failure(e) => Some(AccessKind::Tls),
        _ => None,
    }
}

/// The addresses (sorted, joined) and one handshake error, when every server in `heartbeats`
/// (at least one) last failed its TLS handshake; `None` otherwise.
fn all_refused_tls(heartbeats: &Heartbeats) -> Option<(String, DriverError)> {
    let mut refused = heartbeats
        .iter()
        .map(|(address, last)| match last {
            Some(e) if is_tls_failure(e) => Some((address.to_string(), e)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    refused.sort_by(|a, b| a.0.cmp(&b.0));
    let (_, first) = refused.first()?;
    let first = (*first).clone();
    let addresses = refused
        .iter()
        .map(|(a, _)| a.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Some((addresses, first))
}

/// Whether `e` is a refused TLS handshake: the driver (built with rustls, its default) hands
/// rustls's error over as the inner error of an I/O error. tokio-rustls wraps errors met after
/// the handshake (a record that does not decrypt, a malformed message, an internal-error
/// alert) the same way, and a request may have been sent by then; so only the certificate
/// kind counts: a certificate the client does not trust or that does not name the server, a
/// server that presented none or whose parameters the client cannot use, and the alerts by
/// which a server refuses the client's certificate or the handshake. Every other one stays an
/// I/O error (`Unavailable`, outcome unknown).
pub(crate) fn is_tls_failure(e: &DriverError) -> bool {
    let ErrorKind::Io(io) = &*e.kind else {
        return false;
    };
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(is_certificate_refusal)
}

/// Whether a rustls error is a certificate (or handshake) refusal; see [`is_tls_failure`].
fn is_certificate_refusal(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::UnsupportedNameType
        | rustls::Error::PeerIncompatible(_) => true,
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::CertificateRequired
                | A::HandshakeFailure
                | A::AccessDenied
        ),
        _ => false,
    }
}

/// Whether the driver's authentication error wraps (as its source) a server's answer after
/// which a retry may get past: a code of [`UNKNOWN_OUTCOME_CODES`] (a shutdown, a step-down,
/// a network failure between nodes) or a retryable label. Not for a
/// refusal (code 18) nor an error the driver raised itself (no source).
fn login_interrupted(e: &DriverError) -> bool {
    std::error::Error::source(e)
        .and_then(|source| source.downcast_ref::<DriverError>())
        .is_some_and(login_answer_is_transient)
}

/// Whether the server's answer to a login step is transient; see [`login_interrupted`].
fn login_answer_is_transient(answer: &DriverError) -> bool {
    let code = matches!(&*answer.kind, ErrorKind::Command(c) if unknown_outcome_code(c.code));
    code || UNKNOWN_OUTCOME_LABELS
        .iter()
        .any(|label| answer.contains_label(label))
}

/// A round trip that got no answer within `timeout`: whatever it asked may still happen.
pub(crate) fn timed_out(
    context: impl Into<String>,
    timeout: Duration,
    elapsed: tokio::time::error::Elapsed,
) -> Error {
    Error::unavailable(
        BACKEND,
        format!(
            "{}: no answer within {} ms; the outcome is unknown",
            context.into(),
            timeout.as_millis()
        ),
        elapsed,
    )
}

/// The server's codes after which an operation may or may not have happened, or that a retry
/// against the (new) primary may get past: a step-down or shutdown in progress, a node that is
/// not (or no longer) primary, a network failure between nodes, a time limit, a write concern
/// that was not satisfied in time. They are the driver's "retryable" and "state change" codes
/// (the SDAM and retryable-writes specifications) plus the time limits.
const UNKNOWN_OUTCOME_CODES: &[(i32, &str)] = &[
    (6, "HostUnreachable"),
    (7, "HostNotFound"),
    (50, "MaxTimeMSExpired"),
    (64, "WriteConcernFailed"),
    (89, "NetworkTimeout"),
    (91, "ShutdownInProgress"),
    (189, "PrimarySteppedDown"),
    (262, "ExceededTimeLimit"),
    (9001, "SocketException"),
    (10107, "NotWritablePrimary"),
    (11600, "InterruptedAtShutdown"),
    (11602, "InterruptedDueToReplStateChange"),
    (13435, "NotPrimaryNoSecondaryOk"),
    (13436, "NotPrimaryOrSecondary"),
];

/// The driver's labels for an error a retry may get past, or whose outcome is unknown.
const UNKNOWN_OUTCOME_LABELS: &[&str] = &[
    mongodb::error::RETRYABLE_WRITE_ERROR,
    mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT,
    mongodb::error::TRANSIENT_TRANSACTION_ERROR,
];

/// What went wrong, in a few words, when `e` leaves the outcome unknown or is transient.
fn transient(e: &DriverError) -> Option<&'static str> {
    let by_kind = match &*e.kind {
        ErrorKind::ServerSelection { .. } => Some("no server answered within the timeout"),
        ErrorKind::Io(_) => Some("the connection failed; the outcome is unknown"),
        ErrorKind::ConnectionPoolCleared { .. } => Some("the connection pool was cleared"),
        ErrorKind::DnsResolve { .. } => Some("the server's name did not resolve"),
        ErrorKind::Authentication { .. } if login_interrupted(e) => {
            Some("the server could not complete the login (step-down, shutdown or time limit)")
        }
        // The write was applied on the primary but not confirmed by a majority: it may stay
        // or be rolled back.
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => {
            Some("the write concern was not satisfied; the write may or may not be stored")
        }
        ErrorKind::InsertMany(m) if m.write_concern_error.is_some() => {
            Some("the write concern was not satisfied; the write may or may not be stored")
        }
        ErrorKind::Command(c) if unknown_outcome_code(c.code) => {
            Some("the server could not complete it (step-down, shutdown or time limit); the outcome is unknown")
        }
        ErrorKind::Write(WriteFailure::WriteError(w)) if unknown_outcome_code(w.code) => {
            Some("the server could not complete the write (step-down, shutdown or time limit); the outcome is unknown")
        }
        ErrorKind::InsertMany(m)
            if m
                .write_errors
                .iter()
                .flatten()
                .any(|w| unknown_outcome_code(w.code)) =>
        {
            Some("the server could not complete the write (step-down, shutdown or time limit); the outcome is unknown")
        }
        _ => None,
    };
    // The driver's labels first: they are its own verdict on the outcome.
    let labelled = UNKNOWN_OUTCOME_LABELS
        .iter()
        .any(|label| e.contains_label(label))
        .then_some("the driver labels it retryable; the outcome is unknown");
    labelled.or(by_kind)
}

fn unknown_outcome_code(code: i32) -> bool {
    UNKNOWN_OUTCOME_CODES.iter().any(|(c, _)| *c == code)
}

/// Whether a unique index refused the write: another commit holds that version or position.
pub(crate) fn is_duplicate_key(e: &DriverError) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        // An ordered insert of several documents stops at its first refused one.
        ErrorKind::InsertMany(m) => {
            m.write_concern_error.is_none()
                && m.write_errors
                    .as_ref()
                    .and_then(|errors| errors.iter().min_by_key(|w| w.index))
                    .is_some_and(|first| first.code == DUPLICATE_KEY)
        }
        _ => false,
    }
}

/// MongoDB's codes for createIndexes meeting an index of the same name or keys defined otherwise.
const INDEX_CONFLICT_CODES: [i32; 2] = [85, 86];

/// Whether createIndexes met an index of that name or those keys with another definition.
pub(crate) fn is_index_conflict(e: &DriverError) -> bool {
    matches!(&*e.kind, ErrorKind::Command(c) if INDEX_CONFLICT_CODES.contains(&c.code))
}

/// Whether the collection a command named does not exist (yet).
pub(crate) fn is_namespace_missing(e: &DriverError) -> bool {
    matches!(&*e.kind, ErrorKind::Command(c) if c.code == NAMESPACE_NOT_FOUND)
}

/// A connection string the driver refuses; `reason` is the driver's rule, with the URL's
/// secrets hidden: the driver quotes what it refuses (an entry of `authMechanismProperties`
/// without its `:` came back whole, token and all).
pub(crate) fn refused_url(config: &MongoConfig, e: &DriverError) -> Error {
    config.invalid(config.hide_secrets(&e.to_string()))
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

/// An index of ours whose name another index holds, with other keys or options.
pub(crate) fn index_conflict(collection: &str, index: &str, conflict: &str) -> Error {
    // The README section that defines the index: the registers' one, or the commits'.
    let section = if index == crate::client::REGISTER_INDEX {
        "Registers"
    } else {
        "Documents"
    };
    Error::InvalidInput {
        what: format!("collection {collection}"),
        reason: format!(
            "an index named {index:?} exists with other keys or options than photon-mongo's (see the photon-mongo README, {section}); drop it so that the store can create its own ({conflict})"
        ),
    }
}

/// One event id that two commits of a stream hold.
#[derive(Debug)]
pub(crate) struct SharedId {
    pub(crate) stream: String,
    pub(crate) id: String,
    /// The global positions of the two commits.
    pub(crate) positions: (String, String),
}

/// Commits of one stream that share event ids (a re-send stored twice by a version before the
/// `stream_event_ids` index), so that index cannot be built.
pub(crate) fn shared_ids(collection: &str, shared: &[SharedId]) -> Error {
    let list = shared
        .iter()
        .map(|s| {
            format!(
                "stream {} holds event id {} in the commits at positions {} and {}",
                s.stream, s.id, s.positions.0, s.positions.1
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Error::InvalidInput {
        what: format!("collection {collection}"),
        reason: format!(
            "the unique index \"stream_event_ids\" (the idempotency check) cannot be built: commits of one stream share event ids, stored twice by an older photon-mongo ({list}{}); the store does not work on this collection until it is repaired by hand (see \"Collections written by older versions\" in the photon-mongo README)",
            if shared.len() >= 5 { "; there may be more" } else { "" }
        ),
    }
}

/// An insert that was stored but answered more than the answer window after it was sent: a
/// `Start::Now` subscription may have started after it was stored and said `CaughtUp` before
/// this answer, so the caller is not told Ok (design.md, "Hot / Start::Now").
pub(crate) fn answered_late(stream: &StreamId, took: Duration, window: Duration) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "{stream}: the commit was stored, but its insert answered after {took:?}, past the \
             answer window of {window:?} (photon_answer_window_ms); a re-send with the same ids \
             is answered as a retry"
        ),
        source: None,
    }
}

/// The failure of one insert (or head read) that carried several appends, for each of them:
/// the same kind, backend and message, with the original's text as the source (photon errors
/// are not `Clone`, and each append must hear whether the outcome is unknown, refused access,
/// or an error of the server).
pub(crate) fn copy_for(e: &Error) -> Error {
    let source = || -> photon_api::BoxError { e.to_string().into() };
    match e {
        Error::Unavailable {
            backend, message, ..
        } => Error::Unavailable {
            backend,
            message: message.clone(),
            source: Some(source()),
        },
        Error::AccessDenied {
            backend,
            kind,
            context,
            ..
        } => Error::access_denied(backend, *kind, context.clone(), source()),
        Error::Backend {
            backend, context, ..
        } => Error::backend(backend, context.clone(), source()),
        other => Error::backend(BACKEND, "appending", other.to_string()),
    }
}

/// What an append hears when the insert that carried its commit got no answer, or an answer
/// that does not say what became of each commit: the commit may be stored (a re-send with the
/// same ids answers as a retry). `e` is the insert's error; a refused login or permission
/// (nothing stored) is kept as it is.
pub(crate) fn unknown_outcome(stream: &StreamId, e: &Error) -> Error {
    match e {
        Error::Unavailable { .. } | Error::AccessDenied { .. } => copy_for(e),
        other => Error::Unavailable {
            backend: BACKEND,
            message: format!(
                "appending to {stream}: the insert's outcome is unknown; a re-send with the same \
                 ids is answered as a retry"
            ),
            source: Some(other.to_string().into()),
        },
    }
}

/// [`unknown_outcome`] for the one append that gets the insert's error itself, kept as the
/// source.
pub(crate) fn into_unknown_outcome(stream: &StreamId, e: Error) -> Error {
    match e {
        Error::Unavailable { .. } | Error::AccessDenied { .. } => e,
        other => Error::Unavailable {
            backend: BACKEND,
            message: format!(
                "appending to {stream}: the insert's outcome is unknown; a re-send with the same \
                 ids is answered as a retry"
            ),
            source: Some(Box::new(other)),
        },
    }
}

/// A commit refused by a unique index that is not photon's (its version, ids and claimed
/// position were all free): nothing is stored, and a re-send is refused the same way.
pub(crate) fn foreign_index(stream: &StreamId, position: u64) -> Error {
    Error::backend(
        BACKEND,
        format!("appending to {stream}"),
        format!(
            "a unique index that is not photon-mongo's refused the commit (its version, its event \
             ids and global position {position} were free); nothing is stored: drop that index \
             or change the events"
        ),
    )
}

/// A commit that waited `waited` for its turn behind inserts that did not answer: it was
/// never sent, and is not stored.
pub(crate) fn not_sent(stream: &StreamId, waited: Duration) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "appending to {stream}: not sent, after waiting {waited:?} (photon_timeout_ms) for \
             the inserts ahead of it; nothing is stored"
        ),
        source: None,
    }
}

/// An append that kept losing its stream's next version to other writers of the stream.
pub(crate) fn too_contended(stream: &StreamId, races: u32) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "{stream}: lost its version to another writer of the stream {races} times; the \
             stream is too contended (photon_append_races)"
        ),
        source: None,
    }
}

/// An append that kept losing the global position to other streams' commits for longer than
/// its time allows: the database is too busy (or refuses the insert for a reason it does not
/// say). Nothing of the batch is stored.
pub(crate) fn position_races(stream: &StreamId, inserts: u32) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "{stream}: {inserts} inserts refused while other streams' commits took the next \
             position; the database is too busy"
        ),
        source: None,
    }
}

/// A register save whose revision is held by an earlier send of the same save, which did not
/// reach the majority snapshot within `photon_timeout_ms` (its writer still waits for the
/// majority, or it is being rolled back).
pub(crate) fn register_unsettled(name: &str, revision: u64) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "register {name:?}: revision {revision} is taken by a save not yet confirmed by a \
             majority; the outcome is unknown, re-send with the same save id"
        ),
        source: None,
    }
}

/// A register save whose insert landed, but the register moved on by more than one revision
/// before the check after it, so whether it was the latest for a moment cannot be told: it may
/// or may not be stored (the contract's answer to an unknown outcome: re-send it).
pub(crate) fn register_overtaken(name: &str, revision: u64, above: u64) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "register {name:?}: the save at revision {revision} was overtaken by revision \
             {above} before it could be checked; the outcome is unknown, re-send with the same \
             save id"
        ),
        source: None,
    }
}

/// A stored register document that does not have the documented layout.
pub(crate) fn corrupt_register(name: &str, what: impl Into<String>) -> Error {
    Error::backend(BACKEND, format!("decoding register {name:?}"), what.into())
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

#[cfg(test)]
mod tests {
    //! Driver errors built as the driver builds them from a server's reply (its error types
    //! deserialize from the reply document), or met for real (an unreachable server).

    use std::sync::Arc;

    use mongodb::bson::{doc, from_document, Document};
    use mongodb::error::{CommandError, InsertManyError, WriteConcernError, WriteError};
    use photon_api::AccessKind;

    use super::*;

    #[test]
    fn register_errors_point_to_the_registers_and_ask_for_a_resend() {
        let e = index_conflict("p_registers", crate::client::REGISTER_INDEX, "x").to_string();
        assert!(e.contains("README, Registers"), "{e}");
        let e = index_conflict("p_commits", "stream_version", "x").to_string();
        assert!(e.contains("README, Documents"), "{e}");
        for e in [
            register_overtaken("view", 2, 5),
            register_unsettled("view", 2),
        ] {
            assert!(e.is_retryable(), "{e}");
            let shown = e.to_string();
            assert!(shown.contains("re-send with the same save id"), "{shown}");
            assert!(!shown.contains("load the register"), "{shown}");
        }
    }

    fn command(code: i32, name: &str) -> DriverError {
        let reply = doc! { "ok": 0, "code": code, "codeName": name, "errmsg": "from the server" };
        ErrorKind::Command(from_document::<CommandError>(reply).expect("a command error")).into()
    }

    fn write_error(code: i32) -> DriverError {
        let reply = doc! { "index": 0, "code": code, "errmsg": "from the server" };
        let e: WriteError = from_document(reply).expect("a write error");
        ErrorKind::Write(WriteFailure::WriteError(e)).into()
    }

    fn write_concern(reply: Document) -> WriteConcernError {
        from_document(reply).expect("a write concern error")
    }

    fn wtimeout() -> Document {
        doc! {
            "code": 64,
            "codeName": "WriteConcernFailed",
            "errmsg": "waiting for replication timed out",
            "errInfo": { "wtimeout": true },
        }
    }

    /// `driver` answers Unavailable whose message has `needle` and whose source is the
    /// driver's error.
    #[track_caller]
    fn assert_unavailable(e: DriverError, needle: &str) {
        let shown = e.to_string();
        match driver("appending to a-1", e) {
            Error::Unavailable {
                message, source, ..
            } => {
                assert!(message.starts_with("appending to a-1: "), "{message}");
                assert!(message.contains(needle), "{message}");
                let source = source.expect("the driver's error is the source");
                let inner = source
                    .downcast_ref::<DriverError>()
                    .expect("a driver error");
                assert_eq!(inner.to_string(), shown);
            }
            other => panic!("{shown}: {other:?}"),
        }
    }

    #[test]
    fn write_concern_errors_leave_the_outcome_unknown() {
        let e: DriverError =
            ErrorKind::Write(WriteFailure::WriteConcernError(write_concern(wtimeout()))).into();
        assert_unavailable(e, "write concern was not satisfied");
        // A step-down while waiting for the majority comes as a write concern error too.
        let stepdown = doc! { "code": 189, "codeName": "PrimarySteppedDown", "errmsg": "x" };
        let e: DriverError =
            ErrorKind::Write(WriteFailure::WriteConcernError(write_concern(stepdown))).into();
        assert_unavailable(e, "write concern was not satisfied");
    }

    #[test]
    fn an_insert_many_with_a_write_concern_error_is_unknown_too() {
        let reply = doc! { "writeConcernError": wtimeout() };
        let e: InsertManyError = from_document(reply).expect("an insert-many error");
        assert_unavailable(ErrorKind::InsertMany(e).into(), "write concern");
    }

    #[test]
    fn a_label_from_the_driver_is_its_verdict() {
        let mut reply = wtimeout();
        reply.insert("errorLabels", vec!["RetryableWriteError"]);
        let e: DriverError =
            ErrorKind::Write(WriteFailure::WriteConcernError(write_concern(reply))).into();
        assert!(e.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR));
        assert_unavailable(e, "the driver labels it retryable");
    }

    #[test]
    fn step_downs_shutdowns_and_time_limits_are_unknown_outcomes() {
        for (code, name) in UNKNOWN_OUTCOME_CODES {
            assert_unavailable(command(*code, name), "the outcome is unknown");
            assert_unavailable(write_error(*code), "the outcome is unknown");
        }
    }

    #[test]
    fn a_lost_connection_is_an_unknown_outcome() {
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::TimedOut,
        ] {
            let e: DriverError = ErrorKind::Io(Arc::new(kind.into())).into();
            assert_unavailable(e, "the connection failed; the outcome is unknown");
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        assert_unavailable(selection_error().await, "no server answered");
    }

    #[tokio::test]
    async fn a_round_trip_past_its_timeout_is_unavailable() {
        let elapsed = tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
            .await
            .expect_err("never ready");
        match timed_out("appending to a-1", Duration::from_millis(2000), elapsed) {
            Error::Unavailable {
                message, source, ..
            } => {
                assert_eq!(
                    message,
                    "appending to a-1: no answer within 2000 ms; the outcome is unknown"
                );
                assert!(source.is_some());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn definite_refusals_stay_definite() {
        let duplicate = write_error(DUPLICATE_KEY);
        assert!(is_duplicate_key(&duplicate));
        for e in [
            duplicate,
            command(NAMESPACE_NOT_FOUND, "NamespaceNotFound"),
            command(2, "BadValue"),
            write_error(121),
        ] {
            let shown = e.to_string();
            assert!(
                matches!(driver("appending to a-1", e), Error::Backend { .. }),
                "{shown}"
            );
        }
    }

    /// `e`, mapped with `heartbeats`, is AccessDenied of `kind`, final, with `e` (or the
    /// heartbeat's error, for a selection) as its source.
    #[track_caller]
    fn assert_denied(e: DriverError, heartbeats: &Heartbeats, kind: AccessKind) {
        let shown = format!("{e:?}");
        let mapped = driver_after("appending to a-1", e, heartbeats);
        assert!(!mapped.is_retryable(), "{shown}");
        match mapped {
            Error::AccessDenied {
                kind: k,
                context,
                source,
                ..
            } => {
                assert_eq!(k, kind, "{shown}");
                assert!(context.starts_with("appending to a-1"), "{context}");
                assert!(source.downcast_ref::<DriverError>().is_some(), "{shown}");
            }
            other => panic!("{shown}: {other:?}"),
        }
    }

    /// A TLS handshake failure as the driver reports it: tokio-rustls's I/O error (kind
    /// `InvalidData`) around the handshake's `rustls::Error`.
    fn tls_failure(e: rustls::Error) -> DriverError {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        ErrorKind::Io(Arc::new(io)).into()
    }

    fn address() -> ServerAddress {
        ServerAddress::parse("127.0.0.1:27018").expect("an address")
    }

    #[test]
    fn refused_credentials_are_access_denied_authentication() {
        // The server's AuthenticationFailed (a wrong password, an unknown user) ...
        assert_denied(
            command(AUTHENTICATION_FAILED, "AuthenticationFailed"),
            &Heartbeats::new(),
            AccessKind::Authentication,
        );
        // The driver's own `ErrorKind::Authentication` (which wraps the server's code 18 in a
        // handshake) cannot be built outside the driver: tests/secured.rs meets it for real.
    }

    /// A real server selection timeout: the driver's own error for port 1 on the loopback,
    /// which refuses connections (its variant cannot be built outside the driver).
    async fn selection_error() -> DriverError {
        let client = mongodb::Client::with_uri_str(
            "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=200&connectTimeoutMS=200",
        )
        .await
        .expect("a client");
        let e = client
            .database("x")
            .run_command(doc! { "ping": 1 })
            .await
            .expect_err("nothing listens there");
        assert!(
            matches!(*e.kind, ErrorKind::ServerSelection { .. }),
            "{e:?}"
        );
        e
    }

    #[test]
    fn a_missing_permission_is_access_denied_authorization() {
        assert_denied(
            command(UNAUTHORIZED, "Unauthorized"),
            &Heartbeats::new(),
            AccessKind::Authorization,
        );
        assert_denied(
            write_error(UNAUTHORIZED),
            &Heartbeats::new(),
            AccessKind::Authorization,
        );
        let reply = doc! { "writeErrors": [ { "index": 0, "code": UNAUTHORIZED, "errmsg": "not authorized" } ] };
        let e: InsertManyError = from_document(reply).expect("an insert-many error");
        assert_denied(
            ErrorKind::InsertMany(e).into(),
            &Heartbeats::new(),
            AccessKind::Authorization,
        );
    }

    #[tokio::test]
    async fn a_failed_tls_handshake_is_access_denied_tls() {
        use rustls::{AlertDescription, CertificateError};
        for e in [
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            // The server refused the client's certificate.
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        ] {
            // Met by the operation's own connection ...
            assert_denied(tls_failure(e.clone()), &Heartbeats::new(), AccessKind::Tls);
            // ... or by the monitor, while the operation waited for a server.
            assert_denied(
                selection_error().await,
                &Heartbeats::from([(address(), Some(tls_failure(e)))]),
                AccessKind::Tls,
            );
        }
    }

    #[tokio::test]
    async fn a_selection_timeout_after_other_failures_stays_unavailable() {
        let refused: DriverError =
            ErrorKind::Io(Arc::new(std::io::ErrorKind::ConnectionRefused.into())).into();
        for last in [
            Heartbeats::new(),
            Heartbeats::from([(address(), Some(refused))]),
        ] {
            match driver_after("appending to a-1", selection_error().await, &last) {
                Error::Unavailable { message, .. } => {
                    assert!(message.contains("no server answered"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
        // An I/O error that is not a TLS one (a reset) is not a refusal either.
        let reset: DriverError =
            ErrorKind::Io(Arc::new(std::io::ErrorKind::ConnectionReset.into())).into();
        assert!(!is_tls_failure(&reset));
    }

    fn other_address() -> ServerAddress {
        ServerAddress::parse("127.0.0.2:27018").expect("an address")
    }

    fn untrusted() -> DriverError {
        tls_failure(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
    }

    /// A selection timeout mapped with `heartbeats` is Unavailable (a server down or busy).
    #[track_caller]
    fn assert_selection_unavailable(e: DriverError, heartbeats: &Heartbeats) {
        match driver_after("appending to a-1", e, heartbeats) {
            Error::Unavailable { message, .. } => {
                assert!(message.contains("no server answered"), "{message}");
            }
            other => panic!("{heartbeats:?}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn one_member_with_a_bad_certificate_does_not_speak_for_the_others() {
        let refused: DriverError =
            ErrorKind::Io(Arc::new(std::io::ErrorKind::ConnectionRefused.into())).into();
        // A replica set in a failover: the primary is down, a member nobody needs has a bad
        // certificate. Not a refusal of access.
        assert_selection_unavailable(
            selection_error().await,
            &Heartbeats::from([
                (address(), Some(refused)),
                (other_address(), Some(untrusted())),
            ]),
        );
        // A healthy member's success does not hide a refused handshake, nor make one final.
        assert_selection_unavailable(
            selection_error().await,
            &Heartbeats::from([(address(), None), (other_address(), Some(untrusted()))]),
        );
        // Every known member refusing the handshake is one.
        assert_denied(
            selection_error().await,
            &Heartbeats::from([
                (address(), Some(untrusted())),
                (other_address(), Some(untrusted())),
            ]),
            AccessKind::Tls,
        );
    }

    #[test]
    fn a_tls_error_after_the_handshake_is_an_unknown_outcome() {
        use rustls::{AlertDescription, PeerMisbehaved};
        for e in [
            rustls::Error::DecryptError,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            rustls::Error::PeerMisbehaved(PeerMisbehaved::TooMuchEarlyDataReceived),
            rustls::Error::AlertReceived(AlertDescription::InternalError),
            rustls::Error::AlertReceived(AlertDescription::DecodeError),
            rustls::Error::General("x".into()),
        ] {
            let shown = format!("{e:?}");
            let io = tls_failure(e);
            assert!(!is_tls_failure(&io), "{shown}");
            assert_unavailable(io, "the connection failed; the outcome is unknown");
        }
    }

    #[test]
    fn certificate_refusals_are_tls() {
        use rustls::{AlertDescription as A, CertificateError, PeerIncompatible};
        for e in [
            rustls::Error::InvalidCertificate(CertificateError::Expired),
            rustls::Error::NoCertificatesPresented,
            rustls::Error::UnsupportedNameType,
            rustls::Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered),
            rustls::Error::AlertReceived(A::BadCertificate),
            rustls::Error::AlertReceived(A::UnsupportedCertificate),
            rustls::Error::AlertReceived(A::CertificateRevoked),
            rustls::Error::AlertReceived(A::CertificateExpired),
            rustls::Error::AlertReceived(A::CertificateUnknown),
            rustls::Error::AlertReceived(A::UnknownCA),
            rustls::Error::AlertReceived(A::HandshakeFailure),
            rustls::Error::AlertReceived(A::AccessDenied),
        ] {
            assert_denied(tls_failure(e), &Heartbeats::new(), AccessKind::Tls);
        }
    }

    #[test]
    fn a_login_interrupted_by_a_restart_is_transient() {
        // The server's answers to saslStart / saslContinue that the driver wraps in its
        // `ErrorKind::Authentication` (as the source; that error cannot be built outside the
        // driver, so the classification of its source is what is tested here).
        for (code, name) in [
            (91, "ShutdownInProgress"),
            (11600, "InterruptedAtShutdown"),
            (11602, "InterruptedDueToReplStateChange"),
            (6, "HostUnreachable"),
            (89, "NetworkTimeout"),
            (189, "PrimarySteppedDown"),
        ] {
            assert!(login_answer_is_transient(&command(code, name)), "{name}");
        }
        assert!(!login_answer_is_transient(&command(
            AUTHENTICATION_FAILED,
            "AuthenticationFailed"
        )));
        assert!(!login_answer_is_transient(&command(
            UNAUTHORIZED,
            "Unauthorized"
        )));
        // An error that is not the driver's authentication error has no login answer to read.
        assert!(!login_interrupted(&command(91, "ShutdownInProgress")));
    }
}
