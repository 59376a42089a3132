//! Comparing two stores stream by stream: counts, a content hash and the first version that
//! differs, so a copy or an import can be checked before the source is switched off.
//!
//! Compared per event: stream, version, event id, type, schema version, time of occurrence,
//! content type, payload bytes, causation and correlation ids and headers: everything an
//! import keeps. Not compared: `recorded_at` and checkpoints, which each store makes itself.
//! The two streams are read side by side, one event of each at a time; only the names of one
//! category's streams are held in memory.

use std::collections::BTreeSet;
use std::fmt;

use futures::{StreamExt, TryStreamExt};
use photon_api::{Category, EventStore, ReadOptions, RecordedEvent, Selector, StreamId};
use sha2::{Digest, Sha256};

use crate::error::CliError;

/// How one stream differs between the two stores.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StreamDifference {
    /// The stream.
    pub stream: StreamId,
    /// Events in the first store (`from`).
    pub from_events: u64,
    /// Events in the second store (`to`).
    pub to_events: u64,
    /// Content hash of the stream in `from` (hex SHA-256).
    pub from_hash: String,
    /// Content hash of the stream in `to`.
    pub to_hash: String,
    /// The first version whose events differ, or where one side ends.
    pub first_difference: u64,
}

impl fmt::Display for StreamDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: from has {} events (sha256 {}), to has {} (sha256 {}); first difference at version {}",
            self.stream,
            self.from_events,
            &self.from_hash[..16],
            self.to_events,
            &self.to_hash[..16],
            self.first_difference
        )
    }
}

/// What a verification found.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct VerifyReport {
    /// Streams compared (present in either store).
    pub streams: u64,
    /// Events compared (in `from`).
    pub events: u64,
    /// The streams that differ, in the order compared.
    pub differences: Vec<StreamDifference>,
}

/// Compares every stream `selector` names in `from` or `to`.
///
/// # Errors
/// - [`CliError::Store`] when either store fails. Differences are not errors; they are in the
///   report.
pub async fn verify(
    from: &dyn EventStore,
    to: &dyn EventStore,
    selector: Selector,
) -> Result<VerifyReport, CliError> {
    let mut report = VerifyReport::default();
    let categories: Vec<Category> = match &selector {
        Selector::Stream(s) => {
            compare_stream(from, to, s, &mut report).await?;
            return Ok(report);
        }
        Selector::Category(c) => vec![c.clone()],
        Selector::All => {
            let mut all: BTreeSet<Category> = from.list_categories().await?.into_iter().collect();
            all.extend(to.list_categories().await?);
            all.into_iter().collect()
        }
    };
    for category in categories {
        let mut streams: BTreeSet<StreamId> = from.list_streams(&category).try_collect().await?;
        let more: Vec<StreamId> = to.list_streams(&category).try_collect().await?;
        streams.extend(more);
        for stream in streams {
            compare_stream(from, to, &stream, &mut report).await?;
        }
    }
    Ok(report)
}

async fn compare_stream(
    from: &dyn EventStore,
    to: &dyn EventStore,
    stream: &StreamId,
    report: &mut VerifyReport,
) -> Result<(), CliError> {
    // Fused: one side usually ends first, and is asked again while the other goes on.
    let mut a = from.read_stream(stream, ReadOptions::forwards()).fuse();
    let mut b = to.read_stream(stream, ReadOptions::forwards()).fuse();
    let (mut hash_a, mut hash_b) = (Sha256::new(), Sha256::new());
    let (mut count_a, mut count_b) = (0u64, 0u64);
    let mut first_difference = None;
    let mut position = 0u64;
    loop {
        let (ea, eb) = (a.next().await.transpose()?, b.next().await.transpose()?);
        if ea.is_none() && eb.is_none() {
            break;
        }
        let da = ea.as_ref().map(canonical);
        let db = eb.as_ref().map(canonical);
        if let Some(d) = &da {
            hash_a.update(d);
            count_a += 1;
        }
        if let Some(d) = &db {
            hash_b.update(d);
            count_b += 1;
        }
        if first_difference.is_none() && da != db {
            first_difference = Some(position);
        }
        position += 1;
    }
    report.streams += 1;
    report.events += count_a;
    if let Some(first_difference) = first_difference {
        report.differences.push(StreamDifference {
            stream: stream.clone(),
            from_events: count_a,
            to_events: count_b,
            from_hash: hex(&hash_a.finalize()),
            to_hash: hex(&hash_b.finalize()),
            first_difference,
        });
    }
    Ok(())
}

/// The bytes of an event that a faithful copy keeps, length-prefixed so that no two different
/// events encode the same.
fn canonical(e: &RecordedEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + e.payload.bytes.len());
    let mut field = |bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    field(e.stream.as_str().as_bytes());
    field(&e.version.value().to_be_bytes());
    field(e.event_id.as_bytes());
    field(e.event_type.as_str().as_bytes());
    field(&e.schema_version.to_be_bytes());
    field(&e.occurred_at.unix_micros().to_be_bytes());
    field(e.payload.content_type.as_str().as_bytes());
    field(&e.payload.bytes);
    field(e.metadata.causation_id.unwrap_or_default().as_bytes());
    field(e.metadata.correlation_id.unwrap_or_default().as_bytes());
    field(&(e.metadata.headers.len() as u64).to_be_bytes());
    for (k, v) in e.metadata.headers.iter() {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
