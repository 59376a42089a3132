//! The stored form: the commit document (one per append, holding its events, so that a batch is
//! atomic without transactions) to and from `RecordedEvent`, and a global position to and from a
//! checkpoint. The layout is documented in the crate README for other tools and languages, so
//! a change here is a change of that documented format. No I/O here.

use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Bson, Document};
use photon_api::{
    Bytes, Checkpoint, ContentType, Error, EventData, EventType, Headers, Metadata, Payload,
    RecordedEvent, StreamId, Timestamp, Uuid, Version,
};

use crate::client::BACKEND;
use crate::error::{self, corrupt};

/// The `stream` value of a tombstone: a position a reader gave up after waiting `gap_timeout`
/// for its commit. No real stream name can look like it.
pub(crate) const TOMBSTONE_STREAM: &str = "~gap";

/// A UUID as BSON binary of the UUID subtype.
pub(crate) fn uuid_bson(id: Uuid) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Uuid,
        bytes: id.as_bytes().to_vec(),
    })
}

/// The checkpoint of event `index` of the commit at `position`: resuming skips the rest of that
/// commit up to and including `index`.
pub(crate) fn checkpoint(position: u64, index: u32) -> Checkpoint {
    let mut token = [0u8; 12];
    token[..8].copy_from_slice(&position.to_be_bytes());
    token[8..].copy_from_slice(&index.to_be_bytes());
    Checkpoint::new(BACKEND, &token)
}

/// The (position, index) inside a checkpoint of this backend.
pub(crate) fn parse_checkpoint(c: &Checkpoint) -> Result<(u64, u32), Error> {
    let token = c.token_for(BACKEND)?;
    if token.len() != 12 {
        return Err(error::checkpoint_length(c, token.len()));
    }
    let position = u64::from_be_bytes(token[..8].try_into().expect("8 bytes"));
    let index = u32::from_be_bytes(token[8..].try_into().expect("4 bytes"));
    Ok((position, index))
}

/// The checkpoints of the `count` events of the commit at `position`, in order.
pub(crate) fn checkpoints(position: u64, count: usize) -> Vec<Checkpoint> {
    (0..count).map(|i| checkpoint(position, i as u32)).collect()
}

/// The commit document for `events`, appended to `stream` at `first` and global `position`.
pub(crate) fn commit(
    stream: &StreamId,
    first: Version,
    position: u64,
    recorded_at: Timestamp,
    events: &[EventData],
) -> Document {
    doc! {
        "stream": stream.as_str(),
        "category": stream.category_name(),
        "version": first.0 as i64,
        "count": events.len() as i64,
        "position": position as i64,
        "recorded_at": recorded_at.unix_micros(),
        "event_ids": events.iter().map(|e| uuid_bson(e.event_id)).collect::<Vec<_>>(),
        "events": events.iter().map(event).collect::<Vec<_>>(),
    }
}

/// One event inside a commit. Headers are an array of pairs so any key (with `.` or `$`) fits.
fn event(e: &EventData) -> Bson {
    let headers: Vec<Bson> = e
        .metadata
        .headers
        .iter()
        .map(|(k, v)| Bson::Document(doc! { "key": k, "value": v }))
        .collect();
    Bson::Document(doc! {
        "id": uuid_bson(e.event_id),
        "type": e.event_type.as_str(),
        "schema_version": i64::from(e.schema_version),
        "occurred_at": e.occurred_at.unix_micros(),
        "content_type": e.payload.content_type.as_str(),
        "payload": Bson::Binary(Binary {
            subtype: BinarySubtype::Generic,
            bytes: e.payload.bytes.to_vec(),
        }),
        "causation_id": e.metadata.causation_id.map_or(Bson::Null, uuid_bson),
        "correlation_id": e.metadata.correlation_id.map_or(Bson::Null, uuid_bson),
        "headers": headers,
    })
}

/// The tombstone for an abandoned position. Its `version` and its one `event_ids` entry are
/// `-position`, so that tombstones, which share their `stream`, never meet in the unique
/// `stream_version` and `stream_event_ids` indexes (an empty array is a key of its own there,
/// the same for every tombstone).
pub(crate) fn tombstone(position: u64) -> Document {
    doc! {
        "stream": TOMBSTONE_STREAM,
        "category": TOMBSTONE_STREAM,
        "version": -(position as i64),
        "count": 0_i64,
        "position": position as i64,
        "recorded_at": Timestamp::now().unix_micros(),
        "event_ids": [-(position as i64)],
        "events": [],
    }
}

fn get_i64(d: &Document, key: &str, position: Option<i64>) -> Result<i64, Error> {
    match d.get(key) {
        Some(Bson::Int64(n)) => Ok(*n),
        Some(Bson::Int32(n)) => Ok(i64::from(*n)),
        _ => Err(corrupt(position, format!("{key} is not an integer"))),
    }
}

fn get_str<'a>(d: &'a Document, key: &str, position: Option<i64>) -> Result<&'a str, Error> {
    d.get_str(key)
        .map_err(|_| corrupt(position, format!("{key} is not a string")))
}

fn get_uuid(d: &Document, key: &str, position: Option<i64>) -> Result<Option<Uuid>, Error> {
    match d.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::Binary(b)) => Uuid::from_slice(&b.bytes)
            .map(Some)
            .map_err(|_| corrupt(position, format!("{key} is not a UUID"))),
        _ => Err(corrupt(position, format!("{key} is not a UUID"))),
    }
}

/// The header fields of a commit, without decoding its events.
pub(crate) struct CommitHead {
    pub(crate) position: u64,
    pub(crate) version: Version,
    pub(crate) count: u64,
}

impl CommitHead {
    /// The version of the commit's last event.
    pub(crate) fn last_version(&self) -> Version {
        Version(self.version.0 + self.count - 1)
    }
}

/// The projection that reads a [`CommitHead`] and nothing more.
pub(crate) fn head_fields() -> Document {
    doc! { "position": 1, "version": 1, "count": 1 }
}

/// The head of a commit read with [`head_fields`] (or whole).
pub(crate) fn head(d: &Document) -> Result<CommitHead, Error> {
    let position = get_i64(d, "position", None)?;
    Ok(CommitHead {
        position: position as u64,
        version: Version(get_i64(d, "version", Some(position))? as u64),
        count: get_i64(d, "count", Some(position))? as u64,
    })
}

/// The ids of a commit's events, in order.
pub(crate) fn event_ids(d: &Document) -> Result<Vec<Uuid>, Error> {
    let position = get_i64(d, "position", None).ok();
    let ids = d
        .get_array("event_ids")
        .map_err(|_| corrupt(position, "event_ids is not an array"))?;
    ids.iter()
        .map(|b| match b {
            Bson::Binary(b) => Uuid::from_slice(&b.bytes)
                .map_err(|_| corrupt(position, "an event id is not a UUID")),
            _ => Err(corrupt(position, "an event id is not a UUID")),
        })
        .collect()
}

/// The global position of a commit (or tombstone).
pub(crate) fn position(d: &Document) -> Result<u64, Error> {
    Ok(get_i64(d, "position", None)? as u64)
}

/// Decodes a commit into its recorded events.
pub(crate) fn events(d: &Document) -> Result<Vec<RecordedEvent>, Error> {
    let head = head(d)?;
    let p = Some(head.position as i64);
    let stream = StreamId::parse(get_str(d, "stream", p)?)
        .map_err(|e| corrupt(p, format!("stream: {e}")))?;
    let recorded_at = Timestamp::from_unix_micros(get_i64(d, "recorded_at", p)?)
        .ok_or_else(|| corrupt(p, "recorded_at is out of range"))?;
    let events = d
        .get_array("events")
        .map_err(|_| corrupt(p, "events is not an array"))?;
    events
        .iter()
        .enumerate()
        .map(|(i, e)| recorded_event(e, i, &stream, &head, recorded_at))
        .collect()
}

/// Event `i` of the commit `head` of `stream`.
fn recorded_event(
    e: &Bson,
    i: usize,
    stream: &StreamId,
    head: &CommitHead,
    recorded_at: Timestamp,
) -> Result<RecordedEvent, Error> {
    let p = Some(head.position as i64);
    let Bson::Document(e) = e else {
        return Err(corrupt(p, "an event is not a document"));
    };
    let payload = match e.get("payload") {
        Some(Bson::Binary(b)) => Bytes::from(b.bytes.clone()),
        _ => return Err(corrupt(p, "payload is not binary")),
    };
    Ok(RecordedEvent {
        stream: stream.clone(),
        version: Version(head.version.0 + i as u64),
        event_id: get_uuid(e, "id", p)?.ok_or_else(|| corrupt(p, "an event has no id"))?,
        event_type: EventType::new(get_str(e, "type", p)?)
            .map_err(|err| corrupt(p, err.to_string()))?,
        schema_version: get_i64(e, "schema_version", p)? as u32,
        occurred_at: Timestamp::from_unix_micros(get_i64(e, "occurred_at", p)?)
            .ok_or_else(|| corrupt(p, "occurred_at is out of range"))?,
        recorded_at,
        payload: Payload {
            content_type: ContentType::from_mime(get_str(e, "content_type", p)?),
            bytes: payload,
        },
        metadata: Metadata {
            causation_id: get_uuid(e, "causation_id", p)?,
            correlation_id: get_uuid(e, "correlation_id", p)?,
            headers: headers(e, p)?,
        },
        checkpoint: checkpoint(head.position, i as u32),
    })
}

/// An event's headers, stored as an array of `{key, value}`.
fn headers(e: &Document, p: Option<i64>) -> Result<Headers, Error> {
    let mut headers = Headers::default();
    for h in e
        .get_array("headers")
        .map_err(|_| corrupt(p, "headers is not an array"))?
    {
        let Bson::Document(h) = h else {
            return Err(corrupt(p, "a header is not a document"));
        };
        headers.insert(get_str(h, "key", p)?, get_str(h, "value", p)?);
    }
    Ok(headers)
}
