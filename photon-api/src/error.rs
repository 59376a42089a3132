//! The one error type every backend returns.
//!
//! Variants are what a caller decides on (retry, reload and retry, fix the input, give up);
//! backends keep their own private error types and convert into these.

use crate::stream_id::StreamId;
use crate::version::{ExpectedVersion, Version};
use uuid::Uuid;

/// A boxed error from a driver or codec, kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to an event store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream was not at the version the append expected: someone else wrote first. Reload
    /// and decide again. Nothing of this append was stored.
    #[error("wrong expected version on stream {stream}: expected {expected}, the stream is at {}", .actual.map(|v| format!("version {v}")).unwrap_or_else(|| "no stream".into()))]
    WrongExpectedVersion {
        /// The stream written to.
        stream: StreamId,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's last version when the store checked (None: no stream).
        actual: Option<Version>,
    },

    /// A register save expected a revision the register is no longer at: someone else saved it
    /// first (another runner of the same view, a taker of a lease). Nothing was saved. Load the
    /// register again and decide whether to go on.
    #[error("register {register} was saved by someone else: expected {}, it {}", .expected.map(|r| format!("revision {r}")).unwrap_or_else(|| "no save yet".into()), .actual.map(|r| format!("is at revision {r}")).unwrap_or_else(|| "has never been saved".into()))]
    RevisionConflict {
        /// The register's name.
        register: String,
        /// The revision the save expected (None: never saved).
        expected: Option<u64>,
        /// The register's revision when the store checked (None: never saved).
        actual: Option<u64>,
    },

    /// An event id of the batch is already stored in the stream, but the batch is not a retry of
    /// the append that stored it (other ids, other order or other place). Nothing was stored.
    #[error("event {event_id} is already stored in stream {stream} at version {version}, and this batch is not a retry of that append")]
    IdempotencyConflict {
        /// The stream written to.
        stream: StreamId,
        /// The id found stored.
        event_id: Uuid,
        /// Where it is stored.
        version: Version,
    },

    /// Input that can never succeed: a malformed name, an empty batch, a bad URL, a start that
    /// does not fit the mode. `what` names the input, `reason` the rule.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// The offending input, e.g. `stream "account-"`.
        what: String,
        /// The rule it breaks.
        reason: String,
    },

    /// One event is larger than the store's configured limit. Nothing of the batch was stored.
    #[error("event {event_id} (index {index} of the batch for stream {stream}) is {size} bytes, the limit is {limit}")]
    EventTooLarge {
        /// The stream written to.
        stream: StreamId,
        /// The oversize event.
        event_id: Uuid,
        /// Its index in the batch.
        index: usize,
        /// Its size as [`crate::EventData::size`] counts.
        size: usize,
        /// The store's limit.
        limit: usize,
    },

    /// A whole batch is larger than the backend can store in one atomic write (e.g. MongoDB's
    /// 16 MiB document limit). Nothing was stored; split the batch, if atomicity allows.
    #[error("the batch for stream {stream} is {size} bytes, the backend stores at most {limit} in one append")]
    BatchTooLarge {
        /// The stream written to.
        stream: StreamId,
        /// The batch's size, the sum of [`crate::EventData::size`].
        size: usize,
        /// The backend's limit (`Capabilities::max_append_size`).
        limit: usize,
    },

    /// A checkpoint made by another backend (or another kind of subscription) was handed in.
    #[error("checkpoint {checkpoint} was not made by the {expected_backend} backend")]
    ForeignCheckpoint {
        /// The backend that received it.
        expected_backend: String,
        /// The checkpoint, in text form.
        checkpoint: String,
    },

    /// A stored payload does not decode as the requested type. The stored event is unchanged.
    #[error(
        "cannot decode event {stream}@{version} of type {event_type} ({content_type}): {reason}"
    )]
    Decode {
        /// The event's stream.
        stream: StreamId,
        /// The event's version.
        version: Version,
        /// The event's type name.
        event_type: String,
        /// The payload's content type.
        content_type: String,
        /// What the decoder said.
        reason: String,
    },

    /// A stored event has a schema version newer than the reading code knows: a newer release
    /// wrote it. Reading it as an older shape would mis-decode a fact, so the read stops; deploy
    /// the code that knows the version (or roll the writer back). Not retryable.
    #[error("event {stream}@{version} of type {event_type} has schema version {schema_version}, but this code knows versions up to {known} only: it was written by a newer release")]
    UnknownSchemaVersion {
        /// The event's stream.
        stream: StreamId,
        /// The event's version (position) in its stream.
        version: Version,
        /// The event's type name.
        event_type: String,
        /// The schema version stored with the event.
        schema_version: u32,
        /// The newest schema version of this type the code can read.
        known: u32,
    },

    /// An old stored event could not be brought to the current schema: an upcaster refused it,
    /// or no upcaster starts at its version. The stored event is unchanged.
    #[error("cannot upcast event {stream}@{version} of type {event_type} from schema version {schema_version}: {source}")]
    Upcast {
        /// The event's stream.
        stream: StreamId,
        /// The event's version (position) in its stream.
        version: Version,
        /// The event's type name.
        event_type: String,
        /// The schema version the failing step started from.
        schema_version: u32,
        /// The upcaster's error, or why there is none.
        #[source]
        source: BoxError,
    },

    /// A value could not be encoded as a payload.
    #[error("cannot encode payload as {content_type}: {source}")]
    Encode {
        /// The target content type.
        content_type: String,
        /// The encoder's error.
        #[source]
        source: BoxError,
    },

    /// The backend cannot be reached or did not answer in time. Retryable: the operation may or
    /// may not have taken effect, which is why appends are idempotent by event id.
    #[error("{backend} backend unavailable: {message}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// What failed, with the address or the timeout.
        message: String,
        /// The driver's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The backend cannot do this at all; see its `Capabilities`.
    #[error("{backend} backend does not support {operation}")]
    Unsupported {
        /// Which backend.
        backend: &'static str,
        /// What was asked.
        operation: String,
    },

    /// The URL names a backend that exists but was not compiled in.
    #[error("{url:?} needs the {backend} backend: enable cargo feature {feature:?}")]
    BackendNotCompiled {
        /// The URL given (credentials removed).
        url: String,
        /// The backend it names.
        backend: &'static str,
        /// The cargo feature that compiles it in.
        feature: &'static str,
    },

    /// The server would not let this client in, or not let it do this: wrong credentials, an
    /// unknown user, a server certificate the client does not trust, or a missing permission.
    /// Not retryable: the same call is refused until the configuration or the server's grants
    /// change, and retrying would hammer an authentication endpoint forever. Nothing was stored
    /// by a refused append. The message never contains a password or key.
    #[error("{backend} backend refused access ({kind}) while {context}: {source}")]
    AccessDenied {
        /// Which backend.
        backend: &'static str,
        /// Which check failed, so a caller (or an operator's alert) can tell them apart.
        kind: AccessKind,
        /// What was being done, e.g. `connecting to 127.0.0.1:9094` or `appending to account-7`.
        context: String,
        /// The driver's or server's own error, secrets removed.
        #[source]
        source: BoxError,
    },

    /// Any other failure inside a backend (a driver error that is not a timeout, corrupt data,
    /// a refused permission). Not retryable: the same call fails the same way until something
    /// changes. `source()` is the driver's own error, so a caller can tell a TLS failure from an
    /// authorization failure by walking the chain.
    #[error("{backend} backend error while {context}: {source}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What was being done, e.g. `appending to account-7` or `creating table events`.
        context: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

/// Which access check refused a call ([`Error::AccessDenied`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AccessKind {
    /// The server did not accept the credentials: a wrong password or an unknown user (servers
    /// deliberately do not say which).
    Authentication,
    /// The TLS handshake failed: the server's certificate is not trusted by the configured CA,
    /// names another host, or the server refused the client's certificate.
    Tls,
    /// The credentials were accepted but the user may not do this (a missing ACL, grant or role).
    Authorization,
}

impl std::fmt::Display for AccessKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessKind::Authentication => "authentication failed",
            AccessKind::Tls => "TLS handshake failed",
            AccessKind::Authorization => "not authorized",
        })
    }
}

impl Error {
    /// Whether retrying the same call later can succeed without changing it.
    ///
    /// Only [`Error::Unavailable`]: a `WrongExpectedVersion` needs a reload first, the rest need
    /// different input or code.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// A `Backend` error: `source` (kept as [`std::error::Error::source`]) happened while doing
    /// `context`.
    pub fn backend(
        backend: &'static str,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            backend,
            context: context.into(),
            source: source.into(),
        }
    }

    /// An `AccessDenied` error: the server refused `kind` of access while doing `context`.
    pub fn access_denied(
        backend: &'static str,
        kind: AccessKind,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::AccessDenied {
            backend,
            kind,
            context: context.into(),
            source: source.into(),
        }
    }

    /// An `Unavailable` error keeping the driver's error as its source.
    pub fn unavailable(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Unavailable {
            backend,
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_stream_and_versions() {
        let e = Error::WrongExpectedVersion {
            stream: StreamId::parse("account-7").unwrap(),
            expected: ExpectedVersion::Exact(Version(2)),
            actual: Some(Version(5)),
        };
        assert_eq!(
            e.to_string(),
            "wrong expected version on stream account-7: expected version 2, the stream is at version 5"
        );
        assert!(!e.is_retryable());
        let u = Error::Unavailable {
            backend: "kafka",
            message: "127.0.0.1:9092 did not answer in 5s".into(),
            source: None,
        };
        assert!(u.is_retryable());
    }

    #[test]
    fn backend_errors_keep_their_source_and_context() {
        use std::error::Error as _;
        let driver = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "not authorized");
        let e = Error::backend("kafka", "creating topic photon.account", driver);
        assert_eq!(
            e.to_string(),
            "kafka backend error while creating topic photon.account: not authorized"
        );
        let source = e.source().expect("kept");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the driver's own error");
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(!e.is_retryable());
        let u = Error::unavailable("mongo", "127.0.0.1:27017 did not answer", driver_timeout());
        assert!(u.is_retryable() && u.source().is_some());
    }

    #[test]
    fn access_denied_names_the_check_and_is_final() {
        let driver = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "SASL failed");
        let e = Error::access_denied(
            "kafka",
            AccessKind::Authentication,
            "connecting to 127.0.0.1:9094",
            driver,
        );
        assert_eq!(
            e.to_string(),
            "kafka backend refused access (authentication failed) while connecting to 127.0.0.1:9094: SASL failed"
        );
        assert!(!e.is_retryable());
        assert!(matches!(
            e,
            Error::AccessDenied {
                kind: AccessKind::Authentication,
                ..
            }
        ));
    }

    fn driver_timeout() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")
    }
}
