//! Between what callers see and what the log keeps: [`EventData`] into a compact [`Record`],
//! a [`Record`] back into a [`RecordedEvent`], and log positions to and from checkpoints.
//!
//! Pure conversions: no locking and no checks of the caller's input happen here.

use bytes::BytesMut;
use photon_api::{
    Checkpoint, Error, EventData, EventType, Metadata, Payload, RecordedEvent, StreamId, Timestamp,
    Version,
};

use crate::client::{Log, Record, Sealed, Set, BACKEND, PAYLOAD_BUFFER, SMALL_PAYLOAD};

/// The checkpoint of the event at `position`.
pub(crate) fn checkpoint(position: u64) -> Checkpoint {
    Checkpoint::from_position(BACKEND, position)
}

/// The log position a checkpoint names.
///
/// # Errors
/// - As [`Checkpoint::position_for`]: another backend's checkpoint, or a malformed one.
pub(crate) fn position(checkpoint: &Checkpoint) -> Result<u64, Error> {
    checkpoint.position_for(BACKEND)
}

/// The event a reader gets for `record`, stored at `position` in `stream`.
fn recorded_event(record: &Record, stream: &StreamId, position: u64) -> RecordedEvent {
    RecordedEvent {
        stream: stream.clone(),
        version: Version(record.version),
        event_id: record.event_id,
        event_type: record.event_type.clone(),
        schema_version: record.schema_version,
        occurred_at: record.occurred_at,
        recorded_at: record.recorded_at,
        payload: record.payload.clone(),
        // Empty metadata is not stored, and an empty one costs nothing to make.
        metadata: record.metadata.as_deref().cloned().unwrap_or_default(),
        checkpoint: checkpoint(position),
    }
}

impl Log {
    /// The event at `position`, as readers get it.
    pub(crate) fn event(&self, position: u64) -> RecordedEvent {
        let record = self.get(position);
        recorded_event(record, self.name(record.stream), position)
    }
}

impl Sealed {
    /// The event at `position`, which must be below [`Sealed::len`], as readers get it.
    pub(crate) fn event(&self, position: u64) -> RecordedEvent {
        let record = self.get(position);
        recorded_event(record, self.name(record.stream), position)
    }
}

/// What encoding keeps between events: the shared payload buffer and type names.
#[derive(Default)]
pub(crate) struct Encoder {
    /// The free tail of the current shared payload buffer.
    payloads: BytesMut,
    /// One shared copy of every event type name: stored events point at it instead of each
    /// keeping its own allocation, so a replay touches one hot reference count, not one cold
    /// one per event, and a stored event takes less memory.
    event_types: Set<EventType>,
}

impl Encoder {
    /// `event` as the log keeps it: version `version` of stream number `stream`.
    pub(crate) fn record(
        &mut self,
        event: EventData,
        stream: u32,
        version: u64,
        recorded_at: Timestamp,
    ) -> Record {
        Record {
            event_id: event.event_id,
            version,
            stream,
            schema_version: event.schema_version,
            event_type: intern(&mut self.event_types, event.event_type),
            occurred_at: event.occurred_at,
            recorded_at,
            payload: compact(&mut self.payloads, event.payload),
            metadata: boxed(event.metadata),
        }
    }
}

/// The shared copy of `t`, kept in `types` from its first use on.
fn intern(types: &mut Set<EventType>, t: EventType) -> EventType {
    match types.get(&t) {
        Some(shared) => shared.clone(),
        None => {
            types.insert(t.clone());
            t
        }
    }
}

/// A small payload copied into the shared buffer `buffers` (starting a new one when it is
/// full); an empty or large one as given.
fn compact(buffers: &mut BytesMut, mut payload: Payload) -> Payload {
    let len = payload.bytes.len();
    if (1..=SMALL_PAYLOAD).contains(&len) {
        if buffers.capacity() - buffers.len() < len {
            *buffers = BytesMut::with_capacity(PAYLOAD_BUFFER);
        }
        buffers.extend_from_slice(&payload.bytes);
        payload.bytes = buffers.split().freeze();
    }
    payload
}

/// Metadata to keep: None when it is empty, the common case.
fn boxed(metadata: Metadata) -> Option<Box<Metadata>> {
    (metadata.causation_id.is_some()
        || metadata.correlation_id.is_some()
        || !metadata.headers.is_empty())
    .then(|| Box::new(metadata))
}
