//! The dump format `photon export` writes and `photon import` reads: newline-delimited JSON, one
//! object per line, tagged by `kind`.
//!
//! ```text
//! {"kind":"header","format":"photon-dump","version":1,"selector":"category:account","source_backend":"kafka","exported_at":"2026-11-30T12:00:00.000000Z"}
//! {"kind":"event","stream":"account-42","version":0,"event_id":"0193…","event_type":"Deposited","schema_version":1,"occurred_at":"…","recorded_at":"…","causation_id":null,"correlation_id":null,"headers":{},"content_type":"application/msgpack","payload":"gaZhbW91bnQF","checkpoint":"kafka:…"}
//! {"kind":"end","events":1}
//! ```
//!
//! The first line is the header; its `version` is [`FORMAT_VERSION`], and a reader refuses a
//! version it does not know instead of guessing. Every field of a recorded event is kept; the
//! payload is standard base64 of the exact stored bytes, so a dump is byte-exact whatever the
//! content type. The last line, `end`, counts the events: a dump without it was cut short (an
//! export that was interrupted), which `import` reports after importing what is there.
//!
//! This module owns the line types and their conversions; reading and writing stores is
//! [`crate::transfer`].

use std::collections::BTreeMap;

use base64::Engine as _;
use photon_api::{
    ContentType, EventData, EventType, Headers, Metadata, Payload, RecordedEvent, StreamId,
    Timestamp, Uuid, Version,
};
use serde::{Deserialize, Serialize};

/// The `format` field of every header, so a file that is not a dump is refused at line 1.
pub const FORMAT_NAME: &str = "photon-dump";

/// The version of the line format this crate writes and reads. Bumped on any change a reader of
/// the previous version would misread.
pub const FORMAT_VERSION: u32 = 1;

/// One line of a dump.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DumpLine {
    /// The first line.
    Header(Header),
    /// One recorded event.
    Event(DumpEvent),
    /// The last line of a complete dump.
    End(End),
}

/// What a dump holds and where it came from.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// The line format's version, [`FORMAT_VERSION`] when written by this crate.
    pub version: u32,
    /// The selector exported (`all`, `category:<name>`, `stream:<name>`).
    pub selector: String,
    /// The backend the events were read from (whose checkpoints the event lines carry).
    pub source_backend: String,
    /// When the export started.
    pub exported_at: Timestamp,
}

impl Header {
    /// A header of the current version.
    pub fn new(selector: String, source_backend: &str) -> Self {
        Self {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            selector,
            source_backend: source_backend.to_owned(),
            exported_at: Timestamp::now(),
        }
    }
}

/// The closing line of a complete dump.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct End {
    /// How many event lines the dump holds.
    pub events: u64,
}

/// Every field of a recorded event, in a form any language can read back exactly.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct DumpEvent {
    /// The aggregate stream.
    pub stream: StreamId,
    /// The event's version in it.
    pub version: u64,
    /// The writer's id, the idempotency key that makes a re-run import a retry.
    pub event_id: Uuid,
    /// Stable type name.
    pub event_type: EventType,
    /// Payload schema version.
    pub schema_version: u32,
    /// When it happened, as the writer said; kept on import.
    pub occurred_at: Timestamp,
    /// When the source store accepted it. Informational: an append cannot set it, so the target
    /// store records its own time.
    pub recorded_at: Timestamp,
    /// The causation id.
    pub causation_id: Option<Uuid>,
    /// The correlation id.
    pub correlation_id: Option<Uuid>,
    /// Free string headers.
    pub headers: BTreeMap<String, String>,
    /// The payload's MIME type.
    pub content_type: String,
    /// The exact payload bytes, standard base64.
    pub payload: String,
    /// The source store's checkpoint of the event. Informational: checkpoints belong to one
    /// backend, and the target store makes its own.
    pub checkpoint: String,
}

impl DumpEvent {
    /// The dump form of a recorded event.
    pub fn from_recorded(e: &RecordedEvent) -> Self {
        Self {
            stream: e.stream.clone(),
            version: e.version.value(),
            event_id: e.event_id,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            occurred_at: e.occurred_at,
            recorded_at: e.recorded_at,
            causation_id: e.metadata.causation_id,
            correlation_id: e.metadata.correlation_id,
            headers: e
                .metadata
                .headers
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            content_type: e.payload.content_type.as_str().to_owned(),
            payload: base64::engine::general_purpose::STANDARD.encode(&e.payload.bytes),
            checkpoint: e.checkpoint.to_string(),
        }
    }

    /// The event to append to reproduce this one: same id, type, schema version, time of
    /// occurrence, metadata and payload bytes.
    ///
    /// # Errors
    /// - A reason when the payload is not valid base64.
    pub fn to_event_data(&self) -> Result<(StreamId, Version, EventData), String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.payload)
            .map_err(|e| format!("payload of event {} is not base64: {e}", self.event_id))?;
        let event = EventData {
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            occurred_at: self.occurred_at,
            payload: Payload::raw(ContentType::from_mime(&self.content_type), bytes),
            metadata: Metadata {
                causation_id: self.causation_id,
                correlation_id: self.correlation_id,
                headers: self
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect::<Headers>(),
            },
        };
        Ok((self.stream.clone(), Version(self.version), event))
    }
}

/// Reads one dump line; for the first line, also checks that it is a header of a version this
/// crate reads.
///
/// # Errors
/// - A reason naming what is wrong (not JSON, unknown kind, a newer format version).
pub fn parse_line(text: &str, first: bool) -> Result<DumpLine, String> {
    if first {
        // Checked before the strict parse, so a newer dump says "newer" rather than naming a
        // field this version does not know.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("header")
            || value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME)
        {
            return Err(format!(
                "not a photon dump: the first line must be a header with \"format\":\"{FORMAT_NAME}\""
            ));
        }
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "dump format version {v}; this photon reads version {FORMAT_VERSION}"
                ))
            }
            None => return Err("the header has no numeric \"version\"".to_owned()),
        }
    }
    let line: DumpLine = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match (&line, first) {
        (DumpLine::Header(_), true) => Ok(line),
        (DumpLine::Header(_), false) => Err("a second header".to_owned()),
        (_, _) => Ok(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use photon_api::Checkpoint;

    fn recorded() -> RecordedEvent {
        RecordedEvent {
            stream: StreamId::parse("account-1").unwrap(),
            version: Version(3),
            event_id: Uuid::now_v7(),
            event_type: EventType::new("Deposited").unwrap(),
            schema_version: 2,
            occurred_at: Timestamp::from_unix_micros(1_700_000_000_123_456).unwrap(),
            recorded_at: Timestamp::now(),
            payload: Payload::msgpack(&serde_json::json!({"amount": 5})).unwrap(),
            metadata: Metadata {
                causation_id: Some(Uuid::now_v7()),
                correlation_id: Some(Uuid::now_v7()),
                headers: [("tenant", "t1"), ("b", "2")].into_iter().collect(),
            },
            checkpoint: Checkpoint::from_position("memory", 9),
        }
    }

    #[test]
    fn an_event_line_round_trips_every_appendable_field() {
        let e = recorded();
        let line = serde_json::to_string(&DumpLine::Event(DumpEvent::from_recorded(&e))).unwrap();
        assert!(!line.contains('\n'));
        let DumpLine::Event(back) = parse_line(&line, false).unwrap() else {
            panic!("{line}")
        };
        assert_eq!(back.recorded_at, e.recorded_at);
        assert_eq!(back.checkpoint, "memory:0000000000000009");
        let (stream, version, data) = back.to_event_data().unwrap();
        assert_eq!(stream, e.stream);
        assert_eq!(version, e.version);
        assert_eq!(data.event_id, e.event_id);
        assert_eq!(data.event_type, e.event_type);
        assert_eq!(data.schema_version, 2);
        assert_eq!(data.occurred_at, e.occurred_at);
        assert_eq!(data.payload, e.payload);
        assert_eq!(data.metadata, e.metadata);
    }

    #[test]
    fn the_header_is_checked_first() {
        let header =
            serde_json::to_string(&DumpLine::Header(Header::new("all".into(), "memory"))).unwrap();
        assert!(header.starts_with(r#"{"kind":"header","format":"photon-dump","version":1"#));
        assert!(matches!(parse_line(&header, true), Ok(DumpLine::Header(_))));
        assert!(parse_line(&header, false)
            .unwrap_err()
            .contains("second header"));
        let newer = header.replace(r#""version":1"#, r#""version":2"#);
        assert!(parse_line(&newer, true).unwrap_err().contains("version 2"));
        assert!(parse_line(r#"{"kind":"end","events":0}"#, true)
            .unwrap_err()
            .contains("not a photon dump"));
        assert!(parse_line("hello", true).unwrap_err().contains("not JSON"));
    }
}
