//! The `scylla` driver's errors as `photon_api::Error`, each with a short context saying what was
//! being done and the driver's own error kept as `source()`, so a caller can walk the chain down
//! to, say, the `DbError` the server answered.
//!
//! This module decides only which errors are transient (`Unavailable`: the request may or may not
//! have taken effect; retry with the same event ids), which are the server refusing this client
//! (`AccessDenied`: wrong credentials, an untrusted certificate, a missing permission; final, as
//! retrying changes nothing) and which are neither (`Backend`). Refusals of the caller's input
//! are built where the input is checked, not here.

use std::time::Duration;

use photon_api::{AccessKind, Error, StreamId};
use scylla::errors::{
    ConnectionError, ConnectionPoolError, ConnectionSetupRequestErrorKind, DbError, ExecutionError,
    MetadataError, NewSessionError, PrepareError, RequestAttemptError, UseKeyspaceError,
};

use crate::client::BACKEND;

/// A failed request: a refused login, certificate or permission is `AccessDenied`; timeouts,
/// unavailable replicas and lost connections are `Unavailable`; the rest `Backend`.
pub(crate) fn request(context: impl Into<String>, e: impl Into<ExecutionError>) -> Error {
    let e = e.into();
    if let Some(kind) = execution_access(&e) {
        Error::access_denied(BACKEND, kind, context, e)
    } else if is_transient(&e) {
        // The driver's words in the message too: a log line that prints only Display still
        // says which replica timed out.
        Error::unavailable(BACKEND, format!("{}: {e}", context.into()), e)
    } else {
        Error::backend(BACKEND, context, e)
    }
}

/// A failed conditional save of a register: as [`request`], except that the server failing
/// while it ran the write (`ServerError`, say an exception in its Paxos round) is
/// `Unavailable` too. It is not a clean refusal: the write may have been accepted and be
/// completed by the next Paxos round, so the caller must re-send with the same save id to learn
/// the outcome. (Appends keep `request`'s mapping.)
pub(crate) fn saving(context: impl Into<String>, e: impl Into<ExecutionError>) -> Error {
    let e = e.into();
    if let ExecutionError::LastAttemptError(RequestAttemptError::DbError(DbError::ServerError, _)) =
        &e
    {
        return Error::unavailable(BACKEND, format!("{}: {e}", context.into()), e);
    }
    request(context, e)
}

/// A driver error that is not a request's (reading rows of an answer, a pager's page): kept
/// whole as the source of a `Backend` error.
pub(crate) fn driver(
    context: impl Into<String>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::backend(BACKEND, context, e)
}

/// An append whose pending markers took longer than half the settle delay to write, `attempts`
/// times in a row and for at least a request timeout (the last in `took`): readers may pass a time once it is `settle` old, so
/// such markers are cleared and the append takes a new time, which a link this slow never makes
/// in time. Nothing was stored; the caller may retry once the link is faster, or raise
/// `settle_ms` above twice the round trip.
pub(crate) fn markers_too_slow(
    stream: &StreamId,
    attempts: u32,
    took: Duration,
    settle: Duration,
) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "{stream}: writing the pending markers took more than half of settle_ms ({settle:?}) \
             in {attempts} attempts in a row, the last {took:?}; nothing was stored (the link to the \
             cluster is slower than the settle delay allows: retry later, or raise settle_ms \
             above twice the round trip)"
        ),
        source: None,
    }
}

/// An append stored, but answered more than the answer window after its commit was sent: a
/// `Start::Now` subscription may have started meanwhile, passed over it and said `CaughtUp`
/// before this answer, so the caller is not told Ok (design.md, "Hot / Start::Now").
pub(crate) fn answered_late(stream: &StreamId, took: Duration, window: Duration) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "{stream}: the commit was stored, but answered {took:?} after it was sent, past the \
             answer window of {window:?} (answer_window_ms); a re-send with the same ids is \
             answered as a retry"
        ),
        source: None,
    }
}

/// An append stored (its conditional write applied) whose answer failed after it, listing its
/// stream: whatever that failure was, the caller is told `Unavailable`, since a definite error
/// would read as "nothing stored". A re-send with the same ids is answered as a retry.
pub(crate) fn stored_but_unanswered(stream: &StreamId, first: u64, e: Error) -> Error {
    Error::unavailable(
        BACKEND,
        format!(
            "{stream}@{first}: the commit was stored, but listing the stream failed; a re-send \
             with the same ids is answered as a retry"
        ),
        e,
    )
}

/// Stored data or an answer that is not what this store writes or expects: `reason` is the
/// source, as there is no driver error to keep.
pub(crate) fn corrupt(context: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::backend(BACKEND, context, reason.into())
}

/// The session could not be built: the node refused this client (`AccessDenied`: the
/// credentials, its certificate, a permission), or the cluster is unreachable or not answering
/// yet (`Unavailable`, with the driver's words in the message, so a log line that prints only
/// Display says why). `tls`: whether the client spoke TLS; a node that requires TLS resets a
/// plaintext connection at its first request, which the driver cannot tell from a node going
/// away, so that case stays `Unavailable` but says to check `tls`/`tls_ca`.
pub(crate) fn connecting(contact_points: &[String], tls: bool, e: NewSessionError) -> Error {
    let context = format!("connecting to {}", contact_points.join(","));
    match session_access(&e) {
        Some(kind) => Error::access_denied(BACKEND, kind, context, e),
        None => {
            let hint = if !tls && setup_connection_broken(&e) {
                " (the connection was closed before the first answer: a node that requires TLS does that to a plaintext client; set tls_ca or tls=true if it does)"
            } else {
                ""
            };
            Error::unavailable(BACKEND, format!("{context}: {e}{hint}"), e)
        }
    }
}

/// The control connection broke while it was being set up, before the node answered anything.
fn setup_connection_broken(e: &NewSessionError) -> bool {
    let NewSessionError::MetadataError(MetadataError::ConnectionPoolError(
        ConnectionPoolError::Broken {
            last_connection_error: ConnectionError::ConnectionSetupRequestError(setup),
        },
    )) = e
    else {
        return false;
    };
    matches!(
        setup.get_error(),
        ConnectionSetupRequestErrorKind::BrokenConnection(_)
    )
}

/// Which access check a failed request is the refusal of, if any. A pool that broke because
/// its connections were refused at login or at the TLS handshake counts: every new connection
/// would be refused the same way.
fn execution_access(e: &ExecutionError) -> Option<AccessKind> {
    match e {
        ExecutionError::LastAttemptError(a) => attempt_access(a),
        ExecutionError::ConnectionPoolError(p) => pool_access(p),
        ExecutionError::PrepareError(p) => prepare_access(p),
        ExecutionError::UseKeyspaceError(u) => use_keyspace_access(u),
        ExecutionError::MetadataError(m) => metadata_access(m),
        _ => None,
    }
}

fn session_access(e: &NewSessionError) -> Option<AccessKind> {
    match e {
        NewSessionError::MetadataError(m) => metadata_access(m),
        NewSessionError::UseKeyspaceError(u) => use_keyspace_access(u),
        _ => None,
    }
}

fn metadata_access(e: &MetadataError) -> Option<AccessKind> {
    match e {
        MetadataError::ConnectionPoolError(p) => pool_access(p),
        _ => None,
    }
}

fn prepare_access(e: &PrepareError) -> Option<AccessKind> {
    match e {
        PrepareError::ConnectionPoolError(p) => pool_access(p),
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_access(first_attempt),
        _ => None,
    }
}

fn use_keyspace_access(e: &UseKeyspaceError) -> Option<AccessKind> {
    match e {
        UseKeyspaceError::RequestError(a) => attempt_access(a),
        _ => None,
    }
}

fn pool_access(e: &ConnectionPoolError) -> Option<AccessKind> {
    match e {
        ConnectionPoolError::Broken {
            last_connection_error,
        } => connection_access(last_connection_error),
        _ => None,
    }
}

/// A connection refused while it was set up: the server's answer to the login (wrong password,
/// unknown user, or credentials missing where the node demands them), or a TLS handshake that
/// OpenSSL refused (the server's certificate does not verify against the trusted CAs, no
/// protocol in common, a plaintext port). An I/O error of the socket itself is not one: the
/// node may come back.
fn connection_access(e: &ConnectionError) -> Option<AccessKind> {
    match e {
        ConnectionError::ConnectionSetupRequestError(setup) => match setup.get_error() {
            ConnectionSetupRequestErrorKind::DbError(db, msg) => db_access(db, msg),
            ConnectionSetupRequestErrorKind::MissingAuthentication => {
                Some(AccessKind::Authentication)
            }
            _ => None,
        },
        ConnectionError::IoError(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<openssl::ssl::Error>())
            .filter(|tls| tls.ssl_error().is_some())
            .map(|_| AccessKind::Tls),
        ConnectionError::UseKeyspaceError(u) => use_keyspace_access(u),
        _ => None,
    }
}

fn attempt_access(e: &RequestAttemptError) -> Option<AccessKind> {
    match e {
        RequestAttemptError::DbError(db, msg) => db_access(db, msg),
        _ => None,
    }
}

/// The server's own refusals: `BadCredentials` (0x0100) and `Unauthorized` (0x2100), unless
/// the node only failed to read `system_auth` (see `auth_lookup_failed`).
fn db_access(db: &DbError, msg: &str) -> Option<AccessKind> {
    if auth_lookup_failed(db, msg) {
        return None;
    }
    match db {
        DbError::AuthenticationError => Some(AccessKind::Authentication),
        DbError::Unauthorized => Some(AccessKind::Authorization),
        _ => None,
    }
}

/// Cassandra answers with the refusal codes when its own read of `system_auth` failed (a
/// timeout or an unavailable replica): PasswordAuthenticator's "Unable to perform
/// authentication: ..." (0x0100), CassandraAuthorizer's, Roles' and CassandraRoleManager's
/// "Unable to perform authorization of permissions / super-user / login permission: ..."
/// (0x2100). Those say nothing about this client's credentials or permissions: transient.
fn auth_lookup_failed(db: &DbError, msg: &str) -> bool {
    match db {
        DbError::AuthenticationError => msg.starts_with("Unable to perform authentication"),
        DbError::Unauthorized => msg.starts_with("Unable to perform authorization"),
        _ => false,
    }
}

fn attempt_auth_lookup_failed(a: &RequestAttemptError) -> bool {
    matches!(a, RequestAttemptError::DbError(db, msg) if auth_lookup_failed(db, msg))
}

/// No session within `bound`: the cluster is unreachable or too slow to give its metadata.
pub(crate) fn connect_timeout(
    contact_points: &[String],
    bound: Duration,
    elapsed: tokio::time::error::Elapsed,
) -> Error {
    Error::unavailable(
        BACKEND,
        format!(
            "no answer from {} within {bound:?}",
            contact_points.join(",")
        ),
        elapsed,
    )
}

/// Whether the request may succeed if sent again: the driver gave up waiting, the connection
/// went away, or the replicas could not (yet) serve it.
fn is_transient(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::RequestTimeout(_)
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::EmptyPlan => true,
        ExecutionError::PrepareError(PrepareError::AllAttemptsFailed { first_attempt }) => {
            attempt_auth_lookup_failed(first_attempt)
        }
        ExecutionError::LastAttemptError(a) if attempt_auth_lookup_failed(a) => true,
        ExecutionError::LastAttemptError(a) => match a {
            RequestAttemptError::BrokenConnectionError(_)
            | RequestAttemptError::UnableToAllocStreamId => true,
            RequestAttemptError::DbError(db, _) => matches!(
                db,
                DbError::Unavailable { .. }
                    | DbError::Overloaded
                    | DbError::IsBootstrapping
                    | DbError::ReadTimeout { .. }
                    | DbError::WriteTimeout { .. }
                    | DbError::ReadFailure { .. }
                    | DbError::WriteFailure { .. }
                    | DbError::RateLimitReached { .. }
            ),
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn timeouts_are_unavailable_and_keep_the_driver_error() {
        let e = request(
            "appending to acc-1",
            ExecutionError::RequestTimeout(Duration::from_secs(1)),
        );
        assert!(e.is_retryable(), "{e:?}");
        let source = e.source().expect("kept");
        assert!(matches!(
            source.downcast_ref::<ExecutionError>(),
            Some(ExecutionError::RequestTimeout(_))
        ));
    }

    #[test]
    fn failed_system_auth_reads_are_unavailable_not_access_denied() {
        // Cassandra 5.0's own failed reads of system_auth, answered with the refusal codes.
        let authorization = RequestAttemptError::DbError(
            DbError::Unauthorized,
            "Unable to perform authorization of permissions: Operation timed out - received only 0 responses.".into(),
        );
        let e = request(
            "appending to acc-1",
            ExecutionError::LastAttemptError(authorization.clone()),
        );
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(e.is_retryable(), "{e:?}");
        assert!(
            e.to_string().contains("Unable to perform authorization"),
            "{e}"
        );
        let e = request(
            "preparing a read",
            PrepareError::AllAttemptsFailed {
                first_attempt: authorization,
            },
        );
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        let authentication =
            "Unable to perform authentication: Cannot achieve consistency level LOCAL_ONE";
        let e = request(
            "appending to acc-1",
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                DbError::AuthenticationError,
                authentication.into(),
            )),
        );
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(
            db_access(&DbError::AuthenticationError, authentication).is_none(),
            "the login path (ConnectionSetupRequestErrorKind::DbError) too"
        );
        assert!(db_access(
            &DbError::Unauthorized,
            "Unable to perform authorization of super-user permission: Cannot achieve consistency level QUORUM"
        )
        .is_none());
    }

    #[test]
    fn refused_permissions_and_logins_are_final_access_denials() {
        let unauthorized = RequestAttemptError::DbError(
            DbError::Unauthorized,
            "User r has no MODIFY permission on <table ks.commits> or any of its parents".into(),
        );
        let e = request(
            "appending to acc-1",
            ExecutionError::LastAttemptError(unauthorized),
        );
        assert!(
            matches!(
                &e,
                Error::AccessDenied { kind: AccessKind::Authorization, context, .. }
                    if context == "appending to acc-1"
            ),
            "{e:?}"
        );
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("no MODIFY permission"), "{e}");
        let bad_login = RequestAttemptError::DbError(
            DbError::AuthenticationError,
            "Provided username u and/or password are incorrect".into(),
        );
        let e = request(
            "preparing a read",
            PrepareError::AllAttemptsFailed {
                first_attempt: bad_login,
            },
        );
        assert!(
            matches!(
                e,
                Error::AccessDenied {
                    kind: AccessKind::Authentication,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn refusals_are_backend_errors_with_their_context() {
        let refused = RequestAttemptError::DbError(DbError::Invalid, "no such column".into());
        let e = request(
            "preparing a read",
            ExecutionError::LastAttemptError(refused),
        );
        match &e {
            Error::Backend { context, .. } => assert_eq!(context, "preparing a read"),
            other => panic!("want Backend, got {other:?}"),
        }
        assert!(!e.is_retryable());
        assert!(e
            .source()
            .unwrap()
            .downcast_ref::<ExecutionError>()
            .is_some());
    }

    #[test]
    fn a_server_error_during_a_save_is_an_unknown_outcome() {
        let failed = || {
            ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                DbError::ServerError,
                "java.lang.RuntimeException: paxos round failed".into(),
            ))
        };
        let e = saving("saving register \"lease\"", failed());
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("saving register"), "{e}");
        // Elsewhere (appends, reads) a server error stays `Backend`.
        assert!(matches!(
            request("appending to acc-1", failed()),
            Error::Backend { .. }
        ));
        // A save's clean refusals keep their mapping.
        let unauthorized = ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::Unauthorized,
            "User r has no MODIFY permission on <table ks.registers> or any of its parents".into(),
        ));
        assert!(matches!(
            saving("saving register \"lease\"", unauthorized),
            Error::AccessDenied { .. }
        ));
        let invalid = ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::Invalid,
            "no such column".into(),
        ));
        assert!(matches!(
            saving("saving register \"lease\"", invalid),
            Error::Backend { .. }
        ));
    }
}
