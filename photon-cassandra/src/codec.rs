//! What photon-cassandra stores and hands out, as bytes: the events of a commit (MessagePack,
//! documented in the README so other languages can read them), commits as `RecordedEvent`s,
//! time ids, checkpoint tokens and the answer to a conditional write.
//!
//! Nothing here talks to a server: the rows come in and go out through `writer`, `reader` and
//! `subscription`.

use std::collections::BTreeMap;

use photon_api::{
    Bytes, Checkpoint, ContentType, Error, EventData, EventType, Headers, Metadata, Payload,
    RecordedEvent, StreamId, Timestamp, Uuid, Version,
};
use scylla::response::query_result::QueryResult;
use scylla::value::{CqlValue, Row};
use serde::{Deserialize, Serialize};

use crate::client::BACKEND;
use crate::error;

/// One event inside a commit's `events` blob: a MessagePack array of maps with these names.
#[derive(Serialize)]
struct StoredEvent {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: String,
    schema_version: u32,
    occurred_at: i64,
    content_type: String,
    payload: Bytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    causation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

/// Encodes the events of one append.
pub(crate) fn encode_events(events: &[EventData]) -> Result<Vec<u8>, Error> {
    let stored: Vec<StoredEvent> = events
        .iter()
        .map(|e| StoredEvent {
            id: e.event_id,
            event_type: e.event_type.as_str().to_owned(),
            schema_version: e.schema_version,
            occurred_at: e.occurred_at.unix_micros(),
            content_type: e.payload.content_type.as_str().to_owned(),
            payload: e.payload.bytes.clone(),
            causation_id: e.metadata.causation_id,
            correlation_id: e.metadata.correlation_id,
            headers: e
                .metadata
                .headers
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        })
        .collect();
    rmp_serde::to_vec_named(&stored).map_err(|e| Error::Encode {
        content_type: "application/msgpack".into(),
        source: Box::new(e),
    })
}

/// A commit row as read: which stream and versions it holds, and its events still encoded.
#[derive(Clone, Debug)]
pub(crate) struct Commit {
    pub(crate) stream: StreamId,
    pub(crate) first: u64,
    pub(crate) time_id: Uuid,
    pub(crate) events: Bytes,
}

/// One event of a stored blob as read: borrowed from the commit's bytes, so decoding copies
/// neither the payload (shared with the commit's `Bytes`) nor the names.
#[derive(Deserialize)]
struct StoredEventRef<'a> {
    id: Uuid,
    #[serde(rename = "type", borrow)]
    event_type: &'a str,
    schema_version: u32,
    occurred_at: i64,
    #[serde(borrow)]
    content_type: &'a str,
    #[serde(borrow)]
    payload: &'a [u8],
    #[serde(default)]
    causation_id: Option<Uuid>,
    #[serde(default)]
    correlation_id: Option<Uuid>,
    #[serde(default, borrow)]
    headers: BTreeMap<&'a str, &'a str>,
}

/// An event's payload: a slice of its commit's bytes when the event is the commit's only one
/// (the common case: no copy) or its payload most of the bytes, else a copy of its own, so
/// that an event a consumer keeps does not keep the rest of a large commit in memory with it.
fn payload_bytes(commit: &Commit, sole: bool, payload: &[u8]) -> Bytes {
    if sole || payload.len() * 2 >= commit.events.len() {
        commit.events.slice_ref(payload)
    } else {
        Bytes::copy_from_slice(payload)
    }
}

/// Decodes a commit's events; event `i` gets the checkpoint `checkpoint(i)`.
///
/// The replay's hot path: the names are borrowed from the commit's blob while decoding, a
/// commit of one event shares its payload with the blob (see [`payload_bytes`]), and the event
/// type and content type are shared with the previous event's when they are the same, as they
/// usually are within one commit.
pub(crate) fn decode_events(
    commit: &Commit,
    checkpoint: impl Fn(usize) -> Checkpoint,
) -> Result<Vec<RecordedEvent>, Error> {
    let context = || format!("decoding commit {}@{}", commit.stream, commit.first);
    let stored: Vec<StoredEventRef<'_>> =
        rmp_serde::from_slice(&commit.events).map_err(|e| error::driver(context(), e))?;
    let recorded_at = Timestamp::from_unix_micros(time_micros(&commit.time_id))
        .ok_or_else(|| error::corrupt(context(), "its time id is out of range"))?;
    let mut types: Option<EventType> = None;
    let mut contents: Option<ContentType> = None;
    let mut out = Vec::with_capacity(stored.len());
    let sole = stored.len() == 1;
    for (i, s) in stored.into_iter().enumerate() {
        let bad = |what: &str| {
            let event = format!(
                "decoding event {}@{}",
                commit.stream,
                commit.first + i as u64
            );
            error::corrupt(event, what)
        };
        let event_type = match &types {
            Some(t) if t.as_str() == s.event_type => t.clone(),
            _ => EventType::new(s.event_type).map_err(|_| bad("bad event type"))?,
        };
        types = Some(event_type.clone());
        let content_type = match &contents {
            Some(c) if c.as_str() == s.content_type => c.clone(),
            _ => ContentType::from_mime(s.content_type),
        };
        contents = Some(content_type.clone());
        out.push(RecordedEvent {
            stream: commit.stream.clone(),
            version: Version(commit.first + i as u64),
            event_id: s.id,
            event_type,
            schema_version: s.schema_version,
            occurred_at: Timestamp::from_unix_micros(s.occurred_at)
                .ok_or_else(|| bad("occurred_at out of range"))?,
            recorded_at,
            payload: Payload {
                content_type,
                bytes: payload_bytes(commit, sole, s.payload),
            },
            metadata: Metadata {
                causation_id: s.causation_id,
                correlation_id: s.correlation_id,
                headers: s.headers.into_iter().collect::<Headers>(),
            },
            checkpoint: checkpoint(i),
        });
    }
    Ok(out)
}

/// Decodes a commit's events with their checkpoints.
pub(crate) fn events_of(commit: &Commit) -> Result<Vec<RecordedEvent>, Error> {
    decode_events(commit, |i| {
        Position {
            time_id: commit.time_id,
            index: i as u32,
            version: commit.first + i as u64,
        }
        .to_checkpoint()
    })
}

/// 100-nanosecond intervals between the UUID epoch (1582-10-15) and the Unix epoch.
const UUID_EPOCH_OFFSET: u64 = 0x01B2_1DD2_1381_4000;

/// The earliest time a time UUID holds, µs since the Unix epoch: 1582-10-15, the UUID epoch.
pub(crate) const MIN_TIME_MICROS: i64 = -((UUID_EPOCH_OFFSET / 10) as i64);

/// The latest time a time UUID holds (60 bits of 100 ns ticks), µs since the Unix epoch: in
/// the year 5236.
pub(crate) const MAX_TIME_MICROS: i64 = (((1u64 << 60) - 1 - UUID_EPOCH_OFFSET) / 10) as i64;

/// Whether a time UUID can hold `micros`: times before 1970 included, back to 1582.
pub(crate) fn holds_time(micros: i64) -> bool {
    (MIN_TIME_MICROS..=MAX_TIME_MICROS).contains(&micros)
}

/// A version-1 (time) UUID for `micros` since the Unix epoch, with random clock sequence and
/// node, as Cassandra's `timeuuid` orders them: by time first. The `time_id` of a commit.
/// A time outside what a time UUID holds (before 1582-10-15, after the year 5236) is clamped to
/// the nearest one it holds, never wrapped around.
pub fn time_id(micros: i64) -> Uuid {
    let micros = micros.clamp(MIN_TIME_MICROS, MAX_TIME_MICROS);
    // In range, so the ticks fit in 60 bits and nothing overflows, before 1970 too.
    let ticks = (micros - MIN_TIME_MICROS) as u64 * 10;
    let random: [u8; 8] = rand::random();
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&((ticks & 0xffff_ffff) as u32).to_be_bytes());
    b[4..6].copy_from_slice(&(((ticks >> 32) & 0xffff) as u16).to_be_bytes());
    b[6..8].copy_from_slice(&((((ticks >> 48) & 0x0fff) as u16) | 0x1000).to_be_bytes());
    b[8] = (random[0] & 0x3f) | 0x80;
    b[9..16].copy_from_slice(&random[1..8]);
    Uuid::from_bytes(b)
}

/// The smallest time UUID of `micros` (to start a range of `time_id`s there).
pub fn min_time_id(micros: i64) -> Uuid {
    let mut b = *time_id(micros).as_bytes();
    // Cassandra compares the rest as signed bytes: 0x80 is the smallest.
    for x in &mut b[8..16] {
        *x = 0x80;
    }
    Uuid::from_bytes(b)
}

/// The largest time UUID of `micros` (to end a range of `time_id`s there, inclusive).
pub fn max_time_id(micros: i64) -> Uuid {
    let mut b = *time_id(micros).as_bytes();
    for x in &mut b[8..16] {
        *x = 0x7f;
    }
    Uuid::from_bytes(b)
}

/// The time of a version-1 UUID, microseconds since the Unix epoch (negative before 1970).
pub(crate) fn time_micros(id: &Uuid) -> i64 {
    let b = id.as_bytes();
    let low = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let mid = u16::from_be_bytes([b[4], b[5]]) as u64;
    let high = (u16::from_be_bytes([b[6], b[7]]) & 0x0fff) as u64;
    let ticks = (high << 48) | (mid << 32) | low;
    // 60 bits of ticks fit in an i64; a time before the Unix epoch is negative, rounded down.
    (ticks as i64 - UUID_EPOCH_OFFSET as i64).div_euclid(10)
}

/// Where a subscription resumes: after event `index` of the commit with `time_id` (category and
/// all subscriptions), or after `version` (stream subscriptions).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Position {
    pub(crate) time_id: Uuid,
    pub(crate) index: u32,
    pub(crate) version: u64,
}

impl Position {
    /// 28 bytes: time id, index in the commit (u32), version (u64), big-endian.
    pub(crate) fn to_checkpoint(self) -> Checkpoint {
        let mut b = [0u8; 28];
        b[..16].copy_from_slice(self.time_id.as_bytes());
        b[16..20].copy_from_slice(&self.index.to_be_bytes());
        b[20..].copy_from_slice(&self.version.to_be_bytes());
        Checkpoint::new(BACKEND, &b)
    }

    pub(crate) fn from_checkpoint(checkpoint: &Checkpoint) -> Result<Self, Error> {
        let token = checkpoint.token_for(BACKEND)?;
        let malformed = || Error::InvalidInput {
            what: format!("checkpoint {checkpoint}"),
            reason: "not a photon-cassandra checkpoint (time id, index, version)".into(),
        };
        if token.len() != 28 {
            return Err(malformed());
        }
        let time_id = Uuid::from_slice(&token[..16]).map_err(|_| malformed())?;
        if time_id.get_version_num() != 1 {
            return Err(malformed());
        }
        Ok(Position {
            time_id,
            index: u32::from_be_bytes(token[16..20].try_into().expect("4 bytes")),
            version: u64::from_be_bytes(token[20..].try_into().expect("8 bytes")),
        })
    }
}

/// Whether a conditional write (`IF NOT EXISTS`) applied, from the server's answer.
///
/// # Errors
/// - [`Error::Backend`] for an answer without an `[applied]` column or without rows.
pub fn conditional_write_applied(answer: QueryResult) -> Result<bool, Error> {
    let context = "reading a conditional write's answer";
    let rows = answer
        .into_rows_result()
        .map_err(|e| error::driver(context, e))?;
    let names: Vec<&str> = rows.column_specs().iter().map(|c| c.name()).collect();
    let values: Vec<Vec<Option<bool>>> = rows
        .rows::<Row>()
        .map_err(|e| error::driver(context, e))?
        .map(|r| r.map(|row| row.columns.into_iter().map(as_bool).collect()))
        .collect::<Result<_, _>>()
        .map_err(|e| error::driver(context, e))?;
    applied(&names, &values)
}

fn as_bool(value: Option<CqlValue>) -> Option<bool> {
    match value {
        Some(CqlValue::Boolean(b)) => Some(b),
        _ => None,
    }
}

/// Whether a conditional write applied, from its result rows. Cassandra answers one row for a
/// conditional statement or batch; ScyllaDB one row per statement of a batch. Either way each
/// row has an `[applied]` column, and the write applied only if every row says so.
fn applied(column_names: &[&str], rows: &[Vec<Option<bool>>]) -> Result<bool, Error> {
    let context = "reading a conditional write's answer";
    let at = column_names
        .iter()
        .position(|c| *c == "[applied]")
        .ok_or_else(|| error::corrupt(context, "it has no [applied] column"))?;
    if rows.is_empty() {
        return Err(error::corrupt(context, "it has no rows"));
    }
    Ok(rows
        .iter()
        .all(|r| r.get(at).copied().flatten() == Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let e = EventData::json("Opened", &serde_json::json!({"a": 1}))
            .unwrap()
            .with_schema_version(3)
            .with_causation_id(Uuid::new_v4())
            .with_header("tenant", "t");
        let bytes = encode_events(std::slice::from_ref(&e)).unwrap();
        let commit = Commit {
            stream: StreamId::parse("acc-1").unwrap(),
            first: 4,
            time_id: time_id(1_700_000_000_123_456),
            events: Bytes::from(bytes),
        };
        let out = decode_events(&commit, |i| Checkpoint::from_position(BACKEND, i as u64)).unwrap();
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!((r.version, r.event_id), (Version(4), e.event_id));
        assert_eq!(r.payload, e.payload);
        assert_eq!(r.metadata, e.metadata);
        assert_eq!(r.occurred_at, e.occurred_at);
        assert_eq!(r.recorded_at.unix_micros(), 1_700_000_000_123_456);
    }

    /// A kept event does not keep a commit of several events in memory: their payloads are
    /// copies; the one event of a commit shares its payload with the blob.
    #[test]
    fn payloads_share_the_blob_only_in_a_commit_of_one_event() {
        let event = |n: i32| EventData::json("Opened", &serde_json::json!({ "n": n })).unwrap();
        let within = |commit: &Commit, bytes: &Bytes| {
            let blob = commit.events.as_ptr_range();
            blob.contains(&bytes.as_ptr())
        };
        for (events, shared) in [(vec![event(1)], true), (vec![event(1), event(2)], false)] {
            let commit = Commit {
                stream: StreamId::parse("acc-1").unwrap(),
                first: 0,
                time_id: time_id(1_700_000_000_000_000),
                events: Bytes::from(encode_events(&events).unwrap()),
            };
            let out =
                decode_events(&commit, |i| Checkpoint::from_position(BACKEND, i as u64)).unwrap();
            for (got, sent) in out.iter().zip(&events) {
                assert_eq!(got.payload, sent.payload);
                assert_eq!(
                    within(&commit, &got.payload.bytes),
                    shared,
                    "{} events",
                    events.len()
                );
            }
        }
    }

    #[test]
    fn time_ids_carry_their_time_and_order() {
        let t = 1_764_000_000_000_001;
        let id = time_id(t);
        assert_eq!(id.get_version_num(), 1);
        assert_eq!(time_micros(&id), t);
        assert_eq!(time_micros(&min_time_id(t)), t);
        assert_ne!(time_id(t), time_id(t), "random node: unique");
    }

    #[test]
    fn time_ids_hold_times_before_1970_and_clamp_what_they_cannot_hold() {
        let sixties = -300_000_000_000_000; // 1960-06-30
        assert_eq!(time_micros(&time_id(sixties)), sixties);
        assert_eq!(time_micros(&max_time_id(-1)), -1);
        assert_eq!(time_micros(&time_id(MIN_TIME_MICROS)), MIN_TIME_MICROS);
        assert_eq!(time_micros(&time_id(MAX_TIME_MICROS)), MAX_TIME_MICROS);
        assert_eq!(time_micros(&time_id(i64::MIN)), MIN_TIME_MICROS);
        assert_eq!(time_micros(&time_id(i64::MAX)), MAX_TIME_MICROS);
        assert!(holds_time(sixties) && holds_time(0));
        assert!(!holds_time(MIN_TIME_MICROS - 1) && !holds_time(MAX_TIME_MICROS + 1));
    }

    #[test]
    fn positions_round_trip_and_malformed_ones_are_refused() {
        let p = Position {
            time_id: time_id(5),
            index: 2,
            version: 9,
        };
        let text = p.to_checkpoint().to_string();
        assert_eq!(
            Position::from_checkpoint(&text.parse().unwrap()).unwrap(),
            p
        );
        for token in [&[1u8, 2][..], &[0u8; 28][..]] {
            assert!(matches!(
                Position::from_checkpoint(&Checkpoint::new(BACKEND, token)),
                Err(Error::InvalidInput { .. })
            ));
        }
        assert!(matches!(
            Position::from_checkpoint(&Checkpoint::from_position("memory", 1)),
            Err(Error::ForeignCheckpoint { .. })
        ));
    }

    #[test]
    fn lwt_answers_of_cassandra_and_scylla() {
        // Cassandra, one row; not applied carries the existing row's columns.
        assert!(applied(&["[applied]"], &[vec![Some(true)]]).unwrap());
        assert!(!applied(&["[applied]", "stream"], &[vec![Some(false), None]]).unwrap());
        // ScyllaDB, a row per statement of a batch.
        assert!(applied(&["[applied]"], &[vec![Some(true)], vec![Some(true)]]).unwrap());
        assert!(!applied(&["[applied]"], &[vec![Some(true)], vec![Some(false)]]).unwrap());
        assert!(applied(&["x"], &[vec![Some(true)]]).is_err());
        assert!(applied(&["[applied]"], &[]).is_err());
    }
}
