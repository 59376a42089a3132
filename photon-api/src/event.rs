//! The event model: what a writer hands to `append` ([`EventData`]) and what every reader gets
//! back ([`RecordedEvent`]).
//!
//! A recorded event is readable without the Rust type that wrote it: the payload stays raw bytes
//! with a content type, and the type is a stable name, so tools and other languages can consume
//! it. Clones are cheap (shared names, `Bytes`, shared headers) because replay hands the same
//! stored event to many subscribers.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::checkpoint::Checkpoint;
use crate::error::Error;
use crate::stream_id::StreamId;
use crate::version::Version;

/// Longest event type name, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// A point in time, UTC, with microsecond precision.
///
/// Microseconds because that is what every backend stores exactly (Kafka and Cassandra natively
/// keep milliseconds, so we store the full value ourselves); a time read back equals the time
/// written.
///
/// Kept as the microseconds themselves (8 bytes, where chrono's value takes 12): every recorded
/// event carries two, and each move of an event copies them. Serialised as chrono's value.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// Now, truncated to microseconds.
    pub fn now() -> Self {
        Self::from(Utc::now())
    }

    /// From microseconds since the Unix epoch; None when out of chrono's range.
    pub fn from_unix_micros(micros: i64) -> Option<Self> {
        DateTime::from_timestamp_micros(micros).map(|_| Self(micros))
    }

    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0
    }

    /// Milliseconds since the Unix epoch (Kafka's and Cassandra's native unit), rounded down as
    /// chrono does.
    pub fn unix_millis(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// The chrono value, for formatting and arithmetic.
    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0)
            .expect("a timestamp is made only from microseconds in chrono's range")
    }
}

impl From<DateTime<Utc>> for Timestamp {
    /// Truncated to microseconds. A leap second (`23:59:60.x`) becomes the microseconds of the
    /// next second, as every backend has always stored it; on chrono's very last day that would
    /// be out of range, so it stays at the last representable microsecond.
    fn from(t: DateTime<Utc>) -> Self {
        let last = DateTime::<Utc>::MAX_UTC.timestamp_micros();
        Self(t.trunc_subsecs(6).timestamp_micros().min(last))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_datetime().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    /// As chrono reads a time, truncated to microseconds; a leap second as [`From`] says.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DateTime::<Utc>::deserialize(d).map(Self::from)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            self.to_datetime()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The stable name of an event's type, e.g. `AccountOpened`: not a Rust path, so renaming or
/// moving a Rust type does not orphan stored events.
///
/// 1 to [`MAX_EVENT_TYPE_LEN`] bytes of printable ASCII (no spaces or control characters).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventType(Arc<str>);

impl EventType {
    /// Validates a type name.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] naming the type and the rule it breaks.
    pub fn new(name: impl AsRef<str>) -> Result<Self, Error> {
        let name = name.as_ref();
        let invalid = |reason: String| Error::InvalidInput {
            what: format!("event type {name:?}"),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("is empty".into()));
        }
        if name.len() > MAX_EVENT_TYPE_LEN {
            return Err(invalid(format!(
                "is {} bytes long, the limit is {MAX_EVENT_TYPE_LEN}",
                name.len()
            )));
        }
        if let Some((at, c)) = name.char_indices().find(|(_, c)| !c.is_ascii_graphic()) {
            return Err(invalid(format!(
                "has {c:?} at byte {at}; allowed is printable ASCII without spaces"
            )));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventType({:?})", &*self.0)
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// How a payload's bytes are encoded. Stored as its MIME name so other languages can decode it.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum ContentType {
    /// `application/msgpack`, written by rmp-serde with field names (`to_vec_named`), so fields can
    /// be added and other languages see a map, not positions.
    MessagePack,
    /// `application/json`.
    Json,
    /// Any other MIME type; the store keeps the bytes as they are.
    Other(Arc<str>),
}

impl ContentType {
    /// The MIME name as stored.
    pub fn as_str(&self) -> &str {
        match self {
            ContentType::MessagePack => "application/msgpack",
            ContentType::Json => "application/json",
            ContentType::Other(s) => s,
        }
    }

    /// The content type for a stored MIME name.
    pub fn from_mime(s: &str) -> Self {
        match s {
            "application/msgpack" | "application/x-msgpack" => ContentType::MessagePack,
            "application/json" => ContentType::Json,
            other => ContentType::Other(Arc::from(other)),
        }
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Free string headers; shared on clone because every replayed copy of an event carries them.
///
/// No headers, the common case, is no allocation at all: an empty set is created, cloned and
/// dropped for free, which is most of the metadata of most events.
#[derive(Clone, Default)]
pub struct Headers(Option<Arc<BTreeMap<String, String>>>);

impl Headers {
    /// Sets a header, replacing an earlier value of the same key.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        Arc::make_mut(self.0.get_or_insert_with(Default::default)).insert(key.into(), value.into());
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.as_ref()?.get(key).map(String::as_str)
    }

    /// All headers in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .flat_map(|m| m.iter())
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of all keys and values, counted towards the event size limit.
    pub fn byte_len(&self) -> usize {
        self.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Headers((!map.is_empty()).then(|| Arc::new(map)))
    }
}

/// Who caused an event and which conversation it belongs to, plus free headers.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct Metadata {
    /// The id of the event or command that caused this one.
    pub causation_id: Option<Uuid>,
    /// The id shared by every event of one business conversation (a transfer, a request).
    pub correlation_id: Option<Uuid>,
    /// Free string headers.
    pub headers: Headers,
}

/// Payload bytes and how they are encoded.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Payload {
    /// The encoding of `bytes`.
    pub content_type: ContentType,
    /// The encoded payload, shared rather than copied on clone.
    pub bytes: Bytes,
}

impl Payload {
    /// Encodes `value` as MessagePack with field names (the default encoding).
    ///
    /// # Errors
    /// - [`Error::Encode`] when serde refuses the value (e.g. a map with non-string keys in JSON).
    pub fn msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        let bytes = rmp_serde::to_vec_named(value).map_err(|e| Error::Encode {
            content_type: ContentType::MessagePack.as_str().to_owned(),
            source: Box::new(e),
        })?;
        Ok(Self {
            content_type: ContentType::MessagePack,
            bytes: Bytes::from(bytes),
        })
    }

    /// Encodes `value` as JSON.
    ///
    /// # Errors
    /// - [`Error::Encode`] when serde refuses the value.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Encode {
            content_type: ContentType::Json.as_str().to_owned(),
            source: Box::new(e),
        })?;
        Ok(Self {
            content_type: ContentType::Json,
            bytes: Bytes::from(bytes),
        })
    }

    /// Bytes already encoded elsewhere, with their MIME type.
    pub fn raw(content_type: ContentType, bytes: impl Into<Bytes>) -> Self {
        Self {
            content_type,
            bytes: bytes.into(),
        }
    }
}

/// An event as the writer hands it to `append`.
#[derive(Clone, PartialEq, Debug)]
pub struct EventData {
    /// Chosen by the writer and kept across retries: the idempotency key within the stream.
    pub event_id: Uuid,
    /// Stable type name.
    pub event_type: EventType,
    /// Schema version of the payload, for upcasting old events on read.
    pub schema_version: u32,
    /// When it happened (not when it was stored).
    pub occurred_at: Timestamp,
    /// The encoded payload.
    pub payload: Payload,
    /// Causation, correlation and headers.
    pub metadata: Metadata,
}

impl EventData {
    /// A new event with a fresh time-ordered id (UUID v7), schema version 1, happening now.
    pub fn new(event_type: EventType, payload: Payload) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type,
            schema_version: 1,
            occurred_at: Timestamp::now(),
            payload,
            metadata: Metadata::default(),
        }
    }

    /// A new event with a MessagePack payload.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a bad type name; [`Error::Encode`] when serde refuses `value`.
    pub fn msgpack<T: Serialize + ?Sized>(event_type: &str, value: &T) -> Result<Self, Error> {
        Ok(Self::new(
            EventType::new(event_type)?,
            Payload::msgpack(value)?,
        ))
    }

    /// A new event with a JSON payload.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a bad type name; [`Error::Encode`] when serde refuses `value`.
    pub fn json<T: Serialize + ?Sized>(event_type: &str, value: &T) -> Result<Self, Error> {
        Ok(Self::new(
            EventType::new(event_type)?,
            Payload::json(value)?,
        ))
    }

    /// Sets the event id, e.g. to one derived from a command id so a retried command is idempotent.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.event_id = id;
        self
    }

    /// Sets the schema version.
    pub fn with_schema_version(mut self, v: u32) -> Self {
        self.schema_version = v;
        self
    }

    /// Sets when it happened.
    pub fn with_occurred_at(mut self, t: Timestamp) -> Self {
        self.occurred_at = t;
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.metadata.causation_id = Some(id);
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.metadata.correlation_id = Some(id);
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.headers.insert(key, value);
        self
    }

    /// The size counted against a store's event size limit: payload, type name and headers.
    /// Every backend counts the same way so a batch accepted by one is accepted by all.
    pub fn size(&self) -> usize {
        self.payload.bytes.len() + self.event_type.as_str().len() + self.metadata.headers.byte_len()
    }
}

/// A stored event, as every read and subscription returns it.
#[derive(Clone, PartialEq, Debug)]
pub struct RecordedEvent {
    /// The aggregate stream it belongs to.
    pub stream: StreamId,
    /// Its 0-based index in that stream.
    pub version: Version,
    /// The writer's id (idempotency key).
    pub event_id: Uuid,
    /// Stable type name.
    pub event_type: EventType,
    /// Payload schema version.
    pub schema_version: u32,
    /// When it happened, as the writer said.
    pub occurred_at: Timestamp,
    /// When the store accepted it; what `Start::Time` subscriptions compare against.
    pub recorded_at: Timestamp,
    /// The encoded payload.
    pub payload: Payload,
    /// Causation, correlation and headers.
    pub metadata: Metadata,
    /// Where a subscription resumes to get exactly the events after this one.
    pub checkpoint: Checkpoint,
}

// A replay hands out every event by value, and each move copies all of it: keep it this small
// (the stream's name, the checkpoint and the timestamps were made smaller for it).
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<RecordedEvent>() <= 216);

impl RecordedEvent {
    /// Decodes the payload into `T` by its content type.
    ///
    /// # Errors
    /// - [`Error::Decode`] naming the stream, version, type and content type when the bytes do not
    ///   decode as `T`. The stored event is untouched; read the raw bytes to inspect it.
    // Each decoder's answer goes straight into this one's (no `Result<T, String>` between): a
    // replay decodes every event, and each move of a decoded value is a measurable share of it.
    #[inline]
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let bytes = &self.payload.bytes;
        match &self.payload.content_type {
            ContentType::MessagePack => {
                rmp_serde::from_slice(bytes).map_err(|e| self.decode_error(e.to_string()))
            }
            ContentType::Json => {
                serde_json::from_slice(bytes).map_err(|e| self.decode_error(e.to_string()))
            }
            ContentType::Other(t) => {
                Err(self.decode_error(format!("content type {t:?} has no built-in decoder")))
            }
        }
    }

    #[cold]
    fn decode_error(&self, reason: String) -> Error {
        Error::Decode {
            stream: self.stream.clone(),
            version: self.version,
            event_type: self.event_type.as_str().to_owned(),
            content_type: self.payload.content_type.as_str().to_owned(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Deposited {
        amount: u64,
    }

    fn recorded(payload: Payload) -> RecordedEvent {
        RecordedEvent {
            stream: StreamId::parse("account-1").unwrap(),
            version: Version(3),
            event_id: Uuid::now_v7(),
            event_type: EventType::new("Deposited").unwrap(),
            schema_version: 1,
            occurred_at: Timestamp::now(),
            recorded_at: Timestamp::now(),
            payload,
            metadata: Metadata::default(),
            checkpoint: Checkpoint::new("test", &[1]),
        }
    }

    #[test]
    fn msgpack_and_json_round_trip() {
        let e = EventData::msgpack("Deposited", &Deposited { amount: 5 }).unwrap();
        assert_eq!(e.payload.content_type, ContentType::MessagePack);
        assert_eq!(
            recorded(e.payload).decode::<Deposited>().unwrap(),
            Deposited { amount: 5 }
        );
        let e = EventData::json("Deposited", &Deposited { amount: 6 }).unwrap();
        assert_eq!(&e.payload.bytes[..], br#"{"amount":6}"#);
        assert_eq!(
            recorded(e.payload).decode::<Deposited>().unwrap(),
            Deposited { amount: 6 }
        );
    }

    #[test]
    fn undecodable_payload_names_stream_version_and_type() {
        let bad = recorded(Payload::raw(ContentType::MessagePack, &b"\xc1"[..]));
        let err = bad.decode::<Deposited>().unwrap_err();
        let Error::Decode {
            stream,
            version,
            event_type,
            content_type,
            ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(stream.as_str(), "account-1");
        assert_eq!(*version, Version(3));
        assert_eq!(event_type, "Deposited");
        assert_eq!(content_type, "application/msgpack");
        assert!(err.to_string().contains("account-1"));
        let other = recorded(Payload::raw(ContentType::from_mime("text/plain"), "x"));
        assert!(matches!(
            other.decode::<Deposited>(),
            Err(Error::Decode { .. })
        ));
    }

    #[test]
    fn event_type_rules() {
        assert!(EventType::new("AccountOpened").is_ok());
        assert!(EventType::new("bank.account.opened:v2").is_ok());
        assert!(EventType::new("").is_err());
        assert!(EventType::new("has space").is_err());
        assert!(EventType::new("x".repeat(MAX_EVENT_TYPE_LEN + 1)).is_err());
    }

    #[test]
    fn timestamps_keep_microseconds() {
        let t = Timestamp::now();
        assert_eq!(Timestamp::from_unix_micros(t.unix_micros()), Some(t));
        assert!(t.to_string().ends_with('Z'));
    }

    #[test]
    fn timestamps_agree_with_chrono() {
        // Before the epoch too: milliseconds round down, as chrono's do.
        for micros in [0, 1, 999, 1_000, -1, -999, -1_001, 1_796_166_725_123_456] {
            let t = Timestamp::from_unix_micros(micros).expect("in range");
            let chrono = DateTime::from_timestamp_micros(micros).expect("in range");
            assert_eq!(t.to_datetime(), chrono);
            assert_eq!(t.unix_millis(), chrono.timestamp_millis(), "{micros}");
            assert_eq!(Timestamp::from(chrono), t);
            // Serialised as chrono's value, so stored checkpoints and views read as before.
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, serde_json::to_string(&chrono).unwrap());
            assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        }
        let nanos = DateTime::from_timestamp(5, 123_456_789).unwrap();
        assert_eq!(Timestamp::from(nanos).unix_micros(), 5_123_456);
        assert_eq!(Timestamp::from_unix_micros(i64::MAX), None);
        assert!(Timestamp::from_unix_micros(-5).unwrap() < Timestamp::from_unix_micros(3).unwrap());
        // A leap second on chrono's last day (serde reads one) stays in range and prints.
        let last: Timestamp = serde_json::from_str("\"+262142-12-31T23:59:60.5Z\"").unwrap();
        assert_eq!(
            last.unix_micros(),
            DateTime::<Utc>::MAX_UTC.timestamp_micros()
        );
        assert!(last.to_string().starts_with("+262142-12-31T23:59:59"));
        let leap: Timestamp = serde_json::from_str("\"2016-12-31T23:59:60.5Z\"").unwrap();
        assert_eq!(leap.to_string(), "2017-01-01T00:00:00.500000Z");
    }

    #[test]
    fn headers_empty_or_not() {
        let empty = Headers::default();
        assert!(empty.is_empty());
        assert_eq!(empty.get("k"), None);
        assert_eq!(empty, Headers::from_iter(Vec::<(String, String)>::new()));
        let mut h = Headers::default();
        h.insert("b", "2");
        h.insert("a", "1");
        h.insert("b", "3");
        let copy = h.clone();
        h.insert("c", "4");
        assert_eq!(copy.len(), 2);
        assert_eq!(h.len(), 3);
        assert_eq!(h.get("b"), Some("3"));
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            vec![("a", "1"), ("b", "3"), ("c", "4")]
        );
        assert_eq!(h.byte_len(), 6);
        assert_eq!(
            h,
            [("c", "4"), ("a", "1"), ("b", "3")].into_iter().collect()
        );
        assert_ne!(h, empty);
        assert_eq!(format!("{copy:?}"), r#"{"a": "1", "b": "3"}"#);
    }

    #[test]
    fn size_counts_payload_type_and_headers() {
        let e = EventData::new(
            EventType::new("T").unwrap(),
            Payload::raw(ContentType::Json, vec![0u8; 10]),
        )
        .with_header("k", "vv");
        assert_eq!(e.size(), 10 + 1 + 3);
    }
}
