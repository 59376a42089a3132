//! The raw clients of the servers photon's backends use, doing the same I/O shape as photon's
//! workloads with the same durability settings: the floor under photon's figures, so the table
//! reads photon's overhead as a ratio. Each works in fresh topics, keyspaces or collections of
//! its own and removes them in [`Raw::clean_up`].

use async_trait::async_trait;

use crate::measure::Measurement;
use crate::{BoxError, Sizes};

#[cfg(feature = "cassandra")]
pub mod cassandra;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mongo")]
pub mod mongo;

/// One server's raw client running the workloads' shapes.
#[async_trait]
pub trait Raw: Send + Sync {
    /// Appends of `batch` events from `writers` concurrent writers, as photon's append case:
    /// the baseline row with photon's durability, and possibly weaker reference rows.
    async fn append(
        &self,
        sizes: &Sizes,
        batch: u64,
        writers: u64,
    ) -> Result<Vec<Measurement>, BoxError>;

    /// Reading one stream's events back, per length; empty where the server has no per-stream
    /// read (Kafka).
    async fn load(&self, sizes: &Sizes) -> Result<Vec<Measurement>, BoxError>;

    /// Writing `events` (not timed), then reading them all back decoding every payload into the
    /// same view.
    async fn replay(&self, events: u64, sizes: &Sizes) -> Result<Vec<Measurement>, BoxError>;

    /// Write-to-delivery latency where the raw client can push (Kafka); empty elsewhere.
    async fn live(&self, sizes: &Sizes) -> Result<Vec<Measurement>, BoxError>;

    /// Removes what the rows wrote.
    async fn clean_up(&self) -> Result<(), BoxError>;
}

/// The raw client for `url`'s server; None for `memory://`, whose limit is the bare loop.
///
/// # Errors
/// - The driver's error when the server cannot be reached or set up.
pub async fn connect(url: &str) -> Result<Option<Box<dyn Raw>>, BoxError> {
    let scheme = newton::store::url::scheme(url)?;
    let _scheme = scheme.as_str();
    #[cfg(feature = "kafka")]
    if photon_kafka::SCHEMES.contains(&_scheme) {
        return Ok(Some(Box::new(kafka::RawKafka::connect(url).await?)));
    }
    #[cfg(feature = "cassandra")]
    if photon_cassandra::SCHEMES.contains(&_scheme) {
        return Ok(Some(Box::new(cassandra::RawCassandra::connect(url).await?)));
    }
    #[cfg(feature = "mongo")]
    if photon_mongo::SCHEMES.contains(&_scheme) {
        return Ok(Some(Box::new(mongo::RawMongo::connect(url).await?)));
    }
    Ok(None)
}
