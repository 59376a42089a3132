//! How failures become `photon_api::Error`: librdkafka's errors are kept whole as the `source()`
//! (a caller walks the chain and downcasts to `rdkafka::error::KafkaError`), transient ones
//! become `Unavailable` (retry with the same event ids), the rest `Backend` with a short context
//! saying what was being done. Failures photon-kafka detects itself are a [`Fault`].
//!
//! Only the mapping lives here; which call failed, and whether a failed append is retried, is
//! decided where the call is made.

use std::fmt;

use photon_api::Error;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::client::BACKEND;
use crate::config::KafkaConfig;

/// A failure photon-kafka finds itself, with no librdkafka error behind it; the source of an
/// [`Error::Backend`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// An append needs a topic that does not exist, and creating topics is off.
    MissingTopic {
        topic: String,
        max_record_bytes: usize,
    },
    /// A record with photon's headers that does not decode.
    NotAnEvent {
        topic: String,
        partition: i32,
        offset: i64,
        reason: String,
    },
    /// The version index points at an offset that no longer holds the record it indexed.
    IndexedRecordMissing {
        topic: String,
        partition: i32,
        offset: i64,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::MissingTopic {
                topic,
                max_record_bytes,
            } => write!(
                f,
                "topic {topic} does not exist and topic creation is off (create=false): create it with a fixed partition count, retention.ms=-1 and max.message.bytes >= {max_record_bytes}"
            ),
            Fault::NotAnEvent {
                topic,
                partition,
                offset,
                reason,
            } => write!(
                f,
                "record {topic}/{partition}@{offset} is not a photon event: {reason}"
            ),
            Fault::IndexedRecordMissing {
                topic,
                partition,
                offset,
            } => write!(
                f,
                "{topic}/{partition}: the indexed record at offset {offset} is gone or not a photon event (was the topic deleted or truncated?)"
            ),
        }
    }
}

impl std::error::Error for Fault {}

/// `e`, which happened while doing `context` (e.g. `creating topic photon.account`), as ours:
/// timeouts and transport failures are `Unavailable`, the rest `Backend`; `e` is the source.
pub(crate) fn from_kafka(context: impl fmt::Display, e: KafkaError) -> Error {
    if is_transient(&e) {
        // The driver's words in the message too: a log line that prints only Display still
        // says "Broker transport failure" or "timed out".
        Error::unavailable(BACKEND, format!("{context}: {e}"), e)
    } else {
        Error::backend(BACKEND, context.to_string(), e)
    }
}

/// A [`Fault`] found while doing `context`.
pub(crate) fn fault(context: impl Into<String>, fault: Fault) -> Error {
    Error::backend(BACKEND, context, fault)
}

/// Whether `e` may pass by itself: a timeout, a lost or refused connection, a leader or
/// coordinator that moved. Whatever the call was, it may or may not have taken effect.
pub(crate) fn is_transient(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::OperationTimedOut
                | C::MessageTimedOut
                | C::RequestTimedOut
                | C::TimedOutQueue
                | C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::Resolve
                | C::NetworkException
                | C::DestroyBroker
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::ConcurrentTransactions
        )
    ) || matches!(e, KafkaError::Transaction(t) if t.is_retriable())
}

/// Whether an error a consumer hands out belongs to no partition and passes by itself: librdkafka
/// forwards the client's connection trouble (and group errors: our readers carry a `group.id`
/// but never join) into the consumer queue. Reads bound their waits with timeouts anyway.
pub(crate) fn is_passing(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e,
        KafkaError::MessageConsumption(
            C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::Resolve
                | C::NetworkException
                | C::OperationTimedOut
                | C::RequestTimedOut
                | C::GroupAuthorizationFailed
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
        )
    )
}

/// A wait of photon-kafka's own that ran out (no driver error behind it): `Unavailable`.
pub(crate) fn unavailable(message: String) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message,
        source: None,
    }
}

/// A blocking librdkafka call whose thread panicked or was cancelled.
pub(crate) fn blocking_failed(e: tokio::task::JoinError) -> Error {
    Error::backend(BACKEND, "running a blocking librdkafka call", e)
}

/// librdkafka refused the settings a client was built with.
///
/// Names the setting and librdkafka's reason, never a value: librdkafka's refusal of one
/// setting carries its value (`sasl.oauthbearer.client.secret` in a build without OIDC, a
/// misspelt `sasl.pasword`), and a setting it does not know is not hidden by
/// [`KafkaConfig`]'s `Debug`, so neither the value nor the config is shown.
pub(crate) fn refused_settings(config: &KafkaConfig, e: KafkaError) -> Error {
    let what = format!("Kafka settings for {}", config.bootstrap_servers);
    let reason = match &e {
        KafkaError::ClientConfig(_, description, key, _value) => {
            format!("librdkafka refuses setting {key}: {description}")
        }
        other => other.to_string(),
    };
    Error::InvalidInput { what, reason }
}

/// The same failure again, for the next append of a group that failed as one (`Error` is not
/// `Clone`): the variant and message stay, and so does the source when it is librdkafka's, a
/// [`Fault`] or a `TopicRefused` (plain values). Another source (a panicked thread) is kept as its message.
pub(crate) fn duplicate(e: &Error) -> Error {
    match e {
        Error::Unavailable {
            backend, message, ..
        } => Error::Unavailable {
            backend,
            message: message.clone(),
            source: source_copy(e),
        },
        Error::Backend {
            backend, context, ..
        } => Error::Backend {
            backend,
            context: context.clone(),
            source: source_copy(e).unwrap_or_else(|| source_text(e).into()),
        },
        other => Error::backend(BACKEND, "appending", other.to_string()),
    }
}

fn source_copy(e: &Error) -> Option<photon_api::BoxError> {
    let source = std::error::Error::source(e)?;
    if let Some(kafka) = source.downcast_ref::<KafkaError>() {
        return Some(Box::new(kafka.clone()));
    }
    if let Some(refused) = source.downcast_ref::<crate::topic::TopicRefused>() {
        return Some(Box::new(refused.clone()));
    }
    source
        .downcast_ref::<Fault>()
        .map(|f| Box::new(f.clone()) as photon_api::BoxError)
}

fn source_text(e: &Error) -> String {
    std::error::Error::source(e).map_or_else(String::new, ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn transient_errors_are_unavailable_and_keep_their_source() {
        let e = from_kafka(
            "fetching the metadata of topic photon.a",
            KafkaError::MetadataFetch(RDKafkaErrorCode::RequestTimedOut),
        );
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        let copy = duplicate(&e);
        for e in [&e, &copy] {
            let source = e.source().expect("kept");
            assert_eq!(
                source.downcast_ref::<KafkaError>(),
                Some(&KafkaError::MetadataFetch(
                    RDKafkaErrorCode::RequestTimedOut
                ))
            );
        }
    }

    /// Seen in the fault suite's server restart: a broker handle that librdkafka replaced while
    /// the watermarks of a partition were asked for. The broker is coming back; it passes.
    #[test]
    fn a_broker_handle_destroyed_under_a_request_is_unavailable() {
        let e = from_kafka(
            "fetching the watermarks of faults.a/2",
            KafkaError::MetadataFetch(RDKafkaErrorCode::DestroyBroker),
        );
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    }

    #[test]
    fn other_errors_are_backend_errors_with_context() {
        let e = from_kafka(
            "creating topic photon.a",
            KafkaError::AdminOp(RDKafkaErrorCode::TopicAuthorizationFailed),
        );
        let shown = e.to_string();
        assert!(shown.contains("while creating topic photon.a"), "{shown}");
        assert!(!e.is_retryable());
        let copy = duplicate(&e);
        assert_eq!(copy.to_string(), shown);
        assert!(copy
            .source()
            .unwrap()
            .downcast_ref::<KafkaError>()
            .is_some());
        let f = fault(
            "appending to a-1",
            Fault::MissingTopic {
                topic: "photon.a".into(),
                max_record_bytes: 1,
            },
        );
        let copy = duplicate(&f);
        assert!(copy.source().unwrap().downcast_ref::<Fault>().is_some());
        let why = crate::topic::TopicRefused::UncleanLeaderElection {
            topic: "photon.a".into(),
        };
        let copy = duplicate(&crate::topic::refused(why.clone()));
        assert_eq!(copy.source().unwrap().downcast_ref(), Some(&why));
    }
}
