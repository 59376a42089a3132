//! Snapshots of aggregate state, kept in the event store itself so that they work on every
//! backend with nothing else to run.
//!
//! The snapshot of stream `account-42` is an event in stream `newton_snapshot-account-42`:
//! category [`SNAPSHOT_CATEGORY`], one category for every aggregate's snapshots. Snapshots are
//! thus never in the aggregate's own category, so views and subscriptions of `account` never see
//! them (subscribers of the all stream, `$all`, do). Each snapshot is one more event; loading
//! reads the last one only (backwards, limit 1). Nothing trims a snapshot stream: the older
//! snapshots stay, so it grows by one state per snapshot taken, at 1 / N of its stream's rate
//! (view checkpoints, which grew with time, moved to the store's registers instead).
//!
//! The event's schema version is the aggregate's [`crate::Aggregate::SNAPSHOT_VERSION`]: a
//! snapshot of another version is skipped before its payload is looked at, so a changed state
//! shape is replayed from events instead of being mis-decoded. The payload also names the
//! aggregate type ([`crate::Aggregate::snapshot_name`]; another type on the same category skips
//! it), the stream, and the version and id of the event the state is after (the repository uses
//! the snapshot only when its stream has that event there). This module owns naming, policy
//! and the payload; it does not decode events (the repository does, in one place).

use photon_api::{
    Category, Error, EventData, EventType, Payload, RecordedEvent, StreamId, Uuid, Version,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The category of every snapshot stream: `newton_snapshot-<aggregate stream>`.
///
/// A category of its own (not the aggregate's) keeps snapshots out of the aggregate's category
/// subscriptions, so views never have to skip them; `newton_` marks it as newton's, like
/// [`crate::CHECKPOINT_CATEGORY`].
pub const SNAPSHOT_CATEGORY: &str = "newton_snapshot";

/// The event type of a snapshot, so tools can tell snapshots apart without newton.
pub const SNAPSHOT_EVENT_TYPE: &str = "AggregateSnapshot";

/// When the repository takes a snapshot, checked after each command that recorded events.
///
/// A snapshot costs one more append; it saves every later cold load (a new process, a cache
/// miss) the events before it. Taking one never fails the command: a failed write is logged and
/// tried again after as many events again.
#[derive(Clone, Copy, Debug)]
pub enum SnapshotPolicy {
    /// Once at least this many events were stored since the last snapshot (0 counts as 1).
    EveryEvents(u64),
    /// When the function says so, e.g. only past a length, or for states that are costly to
    /// rebuild.
    When(fn(&SnapshotDue) -> bool),
}

impl SnapshotPolicy {
    pub(crate) fn due(&self, due: &SnapshotDue) -> bool {
        match self {
            SnapshotPolicy::EveryEvents(n) => due.events_since >= (*n).max(1),
            SnapshotPolicy::When(f) => f(due),
        }
    }
}

/// What a [`SnapshotPolicy::When`] function decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotDue {
    /// The stream's version after the command.
    pub version: Version,
    /// Events stored since the last snapshot this process knows of (taken, tried or loaded),
    /// or since the start of the stream.
    pub events_since: u64,
}

/// The snapshot stream of aggregate stream `stream`: `newton_snapshot-<stream>`, or, when that
/// is longer than a stream id may be, `newton_snapshot-<category>-@<128-bit hash of stream>`.
/// The payload names its stream, so a hash shared by two streams makes their snapshots ignored,
/// never applied to the wrong aggregate.
pub fn snapshot_stream(stream: &StreamId) -> StreamId {
    let category = Category::new(SNAPSHOT_CATEGORY).expect("a valid category");
    StreamId::new(&category, stream.as_str()).unwrap_or_else(|_| {
        let name = stream.as_str().as_bytes();
        let id = format!(
            "{}-@{:016x}{:016x}",
            stream.category_name(),
            fnv1a(name, 0xcbf2_9ce4_8422_2325),
            fnv1a(name, 0x6c62_272e_07bb_0142)
        );
        StreamId::new(&category, id).expect("a category and hex digits fit a stream id")
    })
}

/// FNV-1a over `bytes` from `basis`: stable across processes and Rust versions, unlike the
/// standard library's hasher, because two processes must name the same snapshot stream.
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Serialize)]
struct BodyRef<'a, S> {
    stream: &'a str,
    aggregate: &'a str,
    version: u64,
    event_id: Uuid,
    state: &'a S,
}

#[derive(Deserialize)]
struct Body<S> {
    stream: String,
    aggregate: String,
    version: u64,
    event_id: Uuid,
    state: S,
}

/// A snapshot read back: the state after the event `event_id` at `version` of its stream.
///
/// The version alone is only a claim: a snapshot copied or imported before its stream, restored
/// from elsewhere, or appended by another writer may name a version the stream does not have,
/// or have at another event. The repository therefore uses it only when the event it reads at
/// `version` is `event_id`.
#[derive(Debug)]
pub(crate) struct Decoded<S> {
    pub(crate) state: S,
    pub(crate) version: Version,
    pub(crate) event_id: Uuid,
}

/// The snapshot event of `state` of aggregate type `aggregate` (its
/// [`crate::Aggregate::snapshot_name`]) after event `event_id`, at `version` of `stream`.
pub(crate) fn encode<S: Serialize>(
    stream: &StreamId,
    version: Version,
    event_id: Uuid,
    (aggregate, snapshot_version): (&str, u32),
    state: &S,
) -> Result<EventData, Error> {
    let body = BodyRef {
        stream: stream.as_str(),
        aggregate,
        version: version.value(),
        event_id,
        state,
    };
    Ok(EventData::new(
        EventType::new(SNAPSHOT_EVENT_TYPE)?,
        Payload::msgpack(&body)?,
    )
    .with_schema_version(snapshot_version))
}

/// What `event` claims, or why it cannot be used for `stream` by aggregate type `aggregate`. A
/// snapshot written before the event id and the type were recorded does not decode, and is
/// replayed over once.
pub(crate) fn decode<S: DeserializeOwned>(
    event: &RecordedEvent,
    stream: &StreamId,
    (aggregate, snapshot_version): (&str, u32),
) -> Result<Decoded<S>, String> {
    if event.event_type.as_str() != SNAPSHOT_EVENT_TYPE {
        return Err(format!(
            "event type {:?} is not a snapshot",
            event.event_type.as_str()
        ));
    }
    if event.schema_version != snapshot_version {
        return Err(format!(
            "snapshot version {}, the aggregate's is {snapshot_version}",
            event.schema_version
        ));
    }
    let body: Body<S> = event.decode().map_err(|e| e.to_string())?;
    if body.stream != stream.as_str() {
        return Err(format!("a snapshot of {:?}", body.stream));
    }
    if body.aggregate != aggregate {
        return Err(format!(
            "a snapshot of aggregate type {:?}, this is {aggregate:?}",
            body.aggregate
        ));
    }
    Ok(Decoded {
        state: body.state,
        version: Version(body.version),
        event_id: body.event_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_streams_are_valid_and_outside_the_aggregate_category() {
        let account = Category::new("account").unwrap();
        let short = StreamId::new(&account, "42").unwrap();
        let s = snapshot_stream(&short);
        assert_eq!(s.as_str(), "newton_snapshot-account-42");
        assert_eq!(s.category_name(), SNAPSHOT_CATEGORY);

        let long_id = "x".repeat(photon_api::MAX_ID_LEN);
        let long = StreamId::new(&account, &long_id).unwrap();
        let s = snapshot_stream(&long);
        assert_eq!(s.category_name(), SNAPSHOT_CATEGORY);
        assert!(s.id().starts_with("account-@"), "{s}");
        assert_eq!(StreamId::parse(s.as_str()).unwrap(), s);
        // Stable: the same name from every process.
        assert_eq!(snapshot_stream(&long), s);
        let other = StreamId::new(&account, format!("{}y", &long_id[1..])).unwrap();
        assert_ne!(snapshot_stream(&other), s);
    }

    #[test]
    fn policy_counts_from_the_last_snapshot() {
        let due = |events_since| SnapshotDue {
            version: Version(99),
            events_since,
        };
        assert!(!SnapshotPolicy::EveryEvents(100).due(&due(99)));
        assert!(SnapshotPolicy::EveryEvents(100).due(&due(100)));
        assert!(SnapshotPolicy::EveryEvents(0).due(&due(1)));
        assert!(SnapshotPolicy::When(|d| d.version.value() > 50).due(&due(0)));
    }
}
