//! Between what callers see and what the log keeps: [`EventData`] into a compact [`Record`],
//! a [`Record`] back into a [`RecordedEvent`], and log positions to and from checkpoints.
//!
//! Pure conversions: no locking and no checks of the caller's input happen here.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use photon_api::{
    Checkpoint, ContentType, Error, EventData, EventType, Metadata, Payload, RecordedEvent,
    StreamId, Timestamp, Version,
};

use crate::client::{Kind, Log, Map, Record, Sealed, BACKEND, PAYLOAD_BUFFER, SMALL_PAYLOAD};

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
// Inlined so the event is built where the subscription answers it, not built and then copied.
#[inline(always)]
fn recorded_event(record: &Record, stream: &StreamId, position: u64) -> RecordedEvent {
    // The payload's clone is a call through `Bytes`' vtable: made first, before any field is
    // written, the fields after it go straight where the event is answered instead of being
    // spilled around the call and copied.
    let bytes = record.payload.clone();
    RecordedEvent {
        stream: stream.clone(),
        version: Version(record.version),
        event_id: record.event_id,
        event_type: record.kind.event_type.clone(),
        schema_version: record.schema_version,
        occurred_at: record.occurred_at,
        recorded_at: record.recorded_at,
        payload: Payload {
            content_type: record.kind.content_type.clone(),
            bytes,
        },
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
    #[inline(always)]
    pub(crate) fn event(&self, position: u64) -> RecordedEvent {
        let record = self.get(position);
        recorded_event(record, self.name(record.stream), position)
    }
}

/// What encoding keeps between events: the shared payload buffer and the kinds in use.
#[derive(Default)]
pub(crate) struct Encoder {
    /// The free tail of the current shared payload buffer.
    payloads: BytesMut,
    /// One shared [`Kind`] for every event type and encoding: stored events point at it instead
    /// of each keeping its own type name and encoding, so a replay touches one hot reference
    /// count, not one cold one per event, and a stored event takes less memory.
    kinds: Map<(EventType, ContentType), Arc<Kind>>,
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
        let Payload {
            content_type,
            bytes,
        } = event.payload;
        Record {
            event_id: event.event_id,
            version,
            stream,
            schema_version: event.schema_version,
            kind: self.kind(event.event_type, content_type),
            occurred_at: event.occurred_at,
            recorded_at,
            payload: compact(&mut self.payloads, bytes),
            metadata: boxed(event.metadata),
        }
    }

    /// The shared kind of `event_type` and `content_type`, kept from its first use on.
    fn kind(&mut self, event_type: EventType, content_type: ContentType) -> Arc<Kind> {
        self.kinds
            .entry((event_type, content_type))
            .or_insert_with_key(|(event_type, content_type)| {
                Arc::new(Kind {
                    event_type: event_type.clone(),
                    content_type: content_type.clone(),
                })
            })
            .clone()
    }
}

/// A small payload copied into the shared buffer `buffers` (starting a new one when it is
/// full); an empty or large one as given.
fn compact(buffers: &mut BytesMut, bytes: Bytes) -> Bytes {
    let len = bytes.len();
    if (1..=SMALL_PAYLOAD).contains(&len) {
        if buffers.capacity() - buffers.len() < len {
            *buffers = BytesMut::with_capacity(PAYLOAD_BUFFER);
        }
        buffers.extend_from_slice(&bytes);
        return buffers.split().freeze();
    }
    bytes
}

/// Metadata to keep: None when it is empty, the common case.
fn boxed(metadata: Metadata) -> Option<Box<Metadata>> {
    (metadata.causation_id.is_some()
        || metadata.correlation_id.is_some()
        || !metadata.headers.is_empty())
    .then(|| Box::new(metadata))
}
