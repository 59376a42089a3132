//! Choosing the backend at run time, by URL, among those compiled in by cargo features.
//!
//! This is the one place that names backend crates, so application code never does: the same
//! binary runs on `memory://` in tests and on a cluster in production. It also owns the table of
//! which cargo feature compiles which scheme in, since newton is the crate that has the features.

use std::sync::Arc;

use photon_api::{url, Error, EventStore};

/// The environment variable [`connect_from_env`] reads.
pub const URL_VARIABLE: &str = "PHOTON_URL";

/// The URL used when [`URL_VARIABLE`] is unset.
pub const DEFAULT_URL: &str = "memory://";

/// A backend of this project, compiled in or not: the answer for a scheme whose feature is off.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct KnownBackend {
    /// The backend's name (also its checkpoint tag).
    pub backend: &'static str,
    /// The URL schemes it answers, without `://`.
    pub schemes: &'static [&'static str],
    /// The newton cargo feature that compiles it in.
    pub feature: &'static str,
}

/// Every backend of the project. The schemes are written here rather than read from the backend
/// crates because a backend that is not compiled in cannot be asked.
pub const KNOWN_BACKENDS: &[KnownBackend] = &[
    KnownBackend {
        backend: "memory",
        schemes: &["memory"],
        feature: "memory",
    },
    KnownBackend {
        backend: "kafka",
        schemes: &["kafka"],
        feature: "kafka",
    },
    KnownBackend {
        backend: "cassandra",
        schemes: &["cassandra", "scylla"],
        feature: "cassandra",
    },
    KnownBackend {
        backend: "mongo",
        schemes: &["mongodb", "mongodb+srv"],
        feature: "mongo",
    },
];

/// Connects to the store `url` names: `memory://` (feature `memory`, default), `mongodb://`
/// (feature `mongo`), `kafka://` (feature `kafka`), `cassandra://` or `scylla://` (feature
/// `cassandra`).
///
/// `memory://` makes a new, private store on every call: share the returned `Arc` rather than
/// connecting twice.
///
/// # Errors
/// - [`Error::BackendNotCompiled`] naming the cargo feature for a known scheme that is off.
/// - [`Error::InvalidInput`] for an unknown scheme or bad options.
/// - The backend's own errors, e.g. [`Error::Unavailable`].
pub async fn connect(url: &str) -> Result<Arc<dyn EventStore>, Error> {
    let scheme = url::scheme(url)?;
    let scheme = scheme.as_str();
    #[cfg(feature = "memory")]
    if photon_memory::SCHEMES.contains(&scheme) {
        return Ok(Arc::new(photon_memory::MemoryStore::from_url(url)?));
    }
    #[cfg(feature = "mongo")]
    if photon_mongo::SCHEMES.contains(&scheme) {
        return Ok(Arc::new(photon_mongo::MongoStore::from_url(url).await?));
    }
    #[cfg(feature = "kafka")]
    if photon_kafka::SCHEMES.contains(&scheme) {
        return Ok(Arc::new(photon_kafka::KafkaStore::from_url(url).await?));
    }
    #[cfg(feature = "cassandra")]
    if photon_cassandra::SCHEMES.contains(&scheme) {
        return Ok(Arc::new(
            photon_cassandra::CassandraStore::from_url(url).await?,
        ));
    }
    Err(not_compiled(url, scheme))
}

/// Connects to the store named by `PHOTON_URL`, or `memory://` when it is unset.
///
/// # Errors
/// - As [`connect`].
pub async fn connect_from_env() -> Result<Arc<dyn EventStore>, Error> {
    let url = std::env::var(URL_VARIABLE).unwrap_or_else(|_| DEFAULT_URL.to_owned());
    connect(&url).await
}

/// The error for a URL whose backend is not compiled in, or that no backend answers.
fn not_compiled(url: &str, scheme: &str) -> Error {
    let shown = url::redact(url);
    match KNOWN_BACKENDS.iter().find(|b| b.schemes.contains(&scheme)) {
        Some(b) => Error::BackendNotCompiled {
            url: shown,
            backend: b.backend,
            feature: b.feature,
        },
        None => Error::InvalidInput {
            what: format!("store URL {shown:?}"),
            reason: format!(
                "unknown scheme {scheme:?}; known are {}",
                KNOWN_BACKENDS
                    .iter()
                    .flat_map(|b| b.schemes.iter().copied())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_scheme_names_its_feature_and_hides_the_password() {
        let e = not_compiled("mongodb://u:secret@h/db", "mongodb");
        assert!(
            matches!(
                &e,
                Error::BackendNotCompiled {
                    feature: "mongo",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("enable cargo feature \"mongo\""));
        assert!(!e.to_string().contains("secret"));
        let e = not_compiled("scylla://h", "scylla");
        assert!(matches!(
            &e,
            Error::BackendNotCompiled {
                feature: "cassandra",
                ..
            }
        ));
    }

    #[test]
    fn unknown_scheme_is_invalid_input_listing_the_known_ones() {
        let e = not_compiled("redis://x", "redis");
        assert!(
            matches!(&e, Error::InvalidInput { reason, .. } if reason.contains("unknown scheme \"redis\"") && reason.contains("mongodb+srv")),
            "{e:?}"
        );
    }

    /// The table and the backends compiled in agree, so a scheme is never answered "enable a
    /// feature" while that feature is on.
    #[test]
    fn the_table_matches_the_backends_compiled_in() {
        let schemes = |backend: &str| {
            KNOWN_BACKENDS
                .iter()
                .find(|b| b.backend == backend)
                .expect("listed")
                .schemes
        };
        #[cfg(feature = "memory")]
        assert_eq!(schemes(photon_memory::BACKEND), photon_memory::SCHEMES);
        #[cfg(feature = "mongo")]
        assert_eq!(schemes(photon_mongo::BACKEND), photon_mongo::SCHEMES);
        #[cfg(feature = "kafka")]
        assert_eq!(schemes(photon_kafka::BACKEND), photon_kafka::SCHEMES);
        #[cfg(feature = "cassandra")]
        assert_eq!(
            schemes(photon_cassandra::BACKEND),
            photon_cassandra::SCHEMES
        );
        let _ = schemes;
    }
}
