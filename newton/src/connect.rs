//! Choosing the backend at run time, by URL, among those compiled in by cargo features.
//!
//! This is the one place that names backend crates, so application code never does: the same
//! binary runs on `memory://` in tests and on a cluster in production.

use std::sync::Arc;

use photon_api::{url, Error, EventStore};

/// The environment variable [`connect_from_env`] reads.
pub const URL_VARIABLE: &str = "PHOTON_URL";

/// The URL used when [`URL_VARIABLE`] is unset.
pub const DEFAULT_URL: &str = "memory://";

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
    match scheme.as_str() {
        #[cfg(feature = "memory")]
        photon_memory::SCHEME => Ok(Arc::new(photon_memory::MemoryStore::from_url(url)?)),
        #[cfg(feature = "mongo")]
        photon_mongo::SCHEME | "mongodb+srv" => {
            Ok(Arc::new(photon_mongo::MongoStore::from_url(url).await?))
        }
        #[cfg(feature = "kafka")]
        photon_kafka::SCHEME => Ok(Arc::new(photon_kafka::KafkaStore::from_url(url).await?)),
        #[cfg(feature = "cassandra")]
        photon_cassandra::SCHEME | "scylla" => Ok(Arc::new(
            photon_cassandra::CassandraStore::from_url(url).await?,
        )),
        _ => Err(url::not_compiled(url)),
    }
}

/// Connects to the store named by `PHOTON_URL`, or `memory://` when it is unset.
///
/// # Errors
/// - As [`connect`].
pub async fn connect_from_env() -> Result<Arc<dyn EventStore>, Error> {
    let url = std::env::var(URL_VARIABLE).unwrap_or_else(|_| DEFAULT_URL.to_owned());
    connect(&url).await
}
