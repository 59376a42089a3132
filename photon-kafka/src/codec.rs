//! The Kafka record format (documented in the crate README, which other tools rely on): the
//! partition of a stream, the `photon.*` headers, and the conversion between an event and its
//! record. Checkpoints (partition offsets) have their own layout in position.rs. Nothing here
//! talks to a broker.

use photon_api::{
    Bytes, Checkpoint, ContentType, Error, EventData, EventType, Headers, Metadata, Payload,
    RecordedEvent, StreamId, Timestamp, Uuid, Version,
};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};
use rdkafka::Message;

use crate::error::{self, Fault};

/// The names of the `photon.*` record headers (the README's record format). Every value is
/// UTF-8 text so any client can read it.
pub mod header {
    /// The event id, a UUID.
    pub const EVENT_ID: &str = "photon.event_id";
    /// The event's version in its stream, decimal, from 0.
    pub const VERSION: &str = "photon.version";
    /// The event type name.
    pub const EVENT_TYPE: &str = "photon.event_type";
    /// The payload's schema version, decimal.
    pub const SCHEMA_VERSION: &str = "photon.schema_version";
    /// The payload's MIME type.
    pub const CONTENT_TYPE: &str = "photon.content_type";
    /// When the event happened, microseconds since the Unix epoch.
    pub const OCCURRED_AT: &str = "photon.occurred_at";
    /// When it was stored, microseconds since the Unix epoch.
    pub const RECORDED_AT: &str = "photon.recorded_at";
    /// `<first version>+<count>`: the append the event was part of.
    pub const BATCH: &str = "photon.batch";
    /// The causation id, a UUID, when set.
    pub const CAUSATION_ID: &str = "photon.causation_id";
    /// The correlation id, a UUID, when set.
    pub const CORRELATION_ID: &str = "photon.correlation_id";
    /// The topic's partition count when the record was written, decimal: a reader that finds
    /// another count than the topic has now knows streams were placed by another modulo.
    pub const PARTITIONS: &str = "photon.partitions";
    /// Headers with this prefix are ours; an application header may not start with it.
    pub const PREFIX: &str = "photon.";
}

/// Kafka's default partitioner for keyed records (murmur2 of the key, as the Java client and
/// librdkafka's `murmur2_random` do), so a tool producing with the stream as key agrees with us.
pub(crate) fn partition_for(stream: &StreamId, partitions: i32) -> i32 {
    partition_of_key(stream.as_str(), partitions)
}

/// [`partition_for`] of a record's key as read.
pub(crate) fn partition_of_key(key: &str, partitions: i32) -> i32 {
    ((murmur2(key.as_bytes()) & 0x7fff_ffff) as i32) % partitions
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub(crate) fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        if rest.len() >= 3 {
            h ^= (rest[2] as u32) << 16;
        }
        if rest.len() >= 2 {
            h ^= (rest[1] as u32) << 8;
        }
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Refuses application headers that would be read back as ours.
pub(crate) fn check_headers(stream: &StreamId, events: &[EventData]) -> Result<(), Error> {
    for (i, e) in events.iter().enumerate() {
        if let Some((k, _)) = e
            .metadata
            .headers
            .iter()
            .find(|(k, _)| k.starts_with(header::PREFIX))
        {
            return Err(Error::InvalidInput {
                what: format!("header {k:?} of event {i} ({}) for {stream}", e.event_id),
                reason: format!(
                    "names starting with {:?} are reserved for photon-kafka's own headers",
                    header::PREFIX
                ),
            });
        }
    }
    Ok(())
}

/// The headers of one event as photon-kafka writes them.
pub(crate) fn headers_of(
    event: &EventData,
    version: Version,
    recorded_at: Timestamp,
    batch_first: Version,
    batch_len: usize,
    partitions: i32,
) -> OwnedHeaders {
    let text = |h: OwnedHeaders, key: &str, value: &str| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    };
    let mut h = OwnedHeaders::new_with_capacity(11 + event.metadata.headers.len());
    h = text(h, header::EVENT_ID, &event.event_id.to_string());
    h = text(h, header::VERSION, &version.0.to_string());
    h = text(h, header::EVENT_TYPE, event.event_type.as_str());
    h = text(h, header::SCHEMA_VERSION, &event.schema_version.to_string());
    h = text(h, header::CONTENT_TYPE, event.payload.content_type.as_str());
    h = text(
        h,
        header::OCCURRED_AT,
        &event.occurred_at.unix_micros().to_string(),
    );
    h = text(
        h,
        header::RECORDED_AT,
        &recorded_at.unix_micros().to_string(),
    );
    h = text(h, header::BATCH, &format!("{}+{batch_len}", batch_first.0));
    h = text(h, header::PARTITIONS, &partitions.to_string());
    if let Some(c) = event.metadata.causation_id {
        h = text(h, header::CAUSATION_ID, &c.to_string());
    }
    if let Some(c) = event.metadata.correlation_id {
        h = text(h, header::CORRELATION_ID, &c.to_string());
    }
    for (k, v) in event.metadata.headers.iter() {
        h = text(h, k, v);
    }
    h
}

/// What the version index keeps of a record.
#[derive(Debug)]
pub(crate) struct IndexEntry {
    pub(crate) stream: String,
    pub(crate) event_id: Uuid,
    pub(crate) version: u64,
    pub(crate) batch_first: u64,
    pub(crate) batch_len: u32,
    pub(crate) recorded_at: i64,
}

fn bad(msg: &BorrowedMessage<'_>, reason: String) -> Error {
    let fault = Fault::NotAnEvent {
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
        reason,
    };
    error::fault("decoding a record", fault)
}

/// The `photon.*` headers photon reads, by their place in [`KNOWN`]: decoding a record looks
/// each name up once, in the one pass over its headers, and allocates nothing for them. Values
/// are kept as bytes: numbers and ids are parsed from them directly, and only text that is read
/// as text is checked to be UTF-8.
struct PhotonHeaders<'m> {
    values: [Option<&'m [u8]>; KNOWN.len()],
    /// Whether the record carries headers that are not ours (the application's): only then is
    /// there a second pass to copy them.
    user: bool,
}

/// Every header photon reads; other `photon.*` names are ignored.
const KNOWN: [&str; 11] = [
    header::EVENT_ID,
    header::VERSION,
    header::EVENT_TYPE,
    header::SCHEMA_VERSION,
    header::CONTENT_TYPE,
    header::OCCURRED_AT,
    header::RECORDED_AT,
    header::BATCH,
    header::CAUSATION_ID,
    header::CORRELATION_ID,
    header::PARTITIONS,
];

/// The place of `name` in [`KNOWN`].
fn slot(name: &str) -> Option<usize> {
    KNOWN.iter().position(|k| *k == name)
}

impl<'m> PhotonHeaders<'m> {
    /// The value of `name` as text; None when absent or not UTF-8.
    fn get(&self, name: &str) -> Option<&'m str> {
        std::str::from_utf8(self.bytes(name)?).ok()
    }

    fn bytes(&self, name: &str) -> Option<&'m [u8]> {
        self.values[slot(name)?]
    }
}

/// The record's `photon.*` headers; None when it has no `photon.event_id` (not written by
/// photon, e.g. by another tool into our topic: skipped, never an error).
fn photon_headers<'m>(msg: &'m BorrowedMessage<'_>) -> Option<PhotonHeaders<'m>> {
    let headers = msg.headers()?;
    collect_headers(headers.iter().map(|h| (h.key, h.value)))
}

/// The known headers among `(name, value)` pairs; None without an event id.
fn collect_headers<'m>(
    pairs: impl Iterator<Item = (&'m str, Option<&'m [u8]>)>,
) -> Option<PhotonHeaders<'m>> {
    let mut map = PhotonHeaders {
        values: [None; KNOWN.len()],
        user: false,
    };
    for (key, value) in pairs {
        let Some(rest) = key.strip_prefix(header::PREFIX) else {
            map.user = true;
            continue;
        };
        // Every known name starts with the prefix; compare only what follows it.
        let Some(i) = KNOWN
            .iter()
            .position(|k| &k[header::PREFIX.len()..] == rest)
        else {
            continue;
        };
        if let Some(v) = value {
            // A repeated name keeps its last value, as inserting into a map would.
            map.values[i] = Some(v);
        }
    }
    map.get(header::EVENT_ID).is_some().then_some(map)
}

fn field<T: std::str::FromStr>(
    msg: &BorrowedMessage<'_>,
    map: &PhotonHeaders<'_>,
    name: &str,
) -> Result<T, Error> {
    let raw = text(msg, map, name)?;
    raw.parse()
        .map_err(|_| bad(msg, format!("header {name} is {raw:?}")))
}

/// A decimal header (`[+-]digits`, as `str::parse` reads it) parsed from its bytes.
fn number<T: TryFrom<i128>>(
    msg: &BorrowedMessage<'_>,
    map: &PhotonHeaders<'_>,
    name: &str,
) -> Result<T, Error> {
    let raw = map
        .bytes(name)
        .ok_or_else(|| bad(msg, format!("header {name} missing")))?;
    decimal(raw)
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| {
            let shown = String::from_utf8_lossy(raw);
            bad(msg, format!("header {name} is {shown:?}"))
        })
}

/// `[+-]digits`, wide enough for any i64 or u64 (the caller narrows it).
fn decimal(raw: &[u8]) -> Option<i128> {
    let (negative, digits) = match raw {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, raw),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i128 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i128::from(d - b'0'))?;
    }
    Some(if negative { -n } else { n })
}

/// A UUID header parsed from its bytes; None when absent.
fn uuid(
    msg: &BorrowedMessage<'_>,
    map: &PhotonHeaders<'_>,
    name: &str,
) -> Result<Option<Uuid>, Error> {
    map.bytes(name)
        .map(|v| {
            Uuid::try_parse_ascii(v).map_err(|_| {
                let shown = String::from_utf8_lossy(v);
                bad(msg, format!("{name} is {shown:?}"))
            })
        })
        .transpose()
}

fn text<'m>(
    msg: &BorrowedMessage<'_>,
    map: &PhotonHeaders<'m>,
    name: &str,
) -> Result<&'m str, Error> {
    map.get(name)
        .ok_or_else(|| bad(msg, format!("header {name} missing")))
}

/// The stream and event type of the last record decoded: consecutive records of one append
/// repeat them, and reusing them saves validating and allocating both per event.
#[derive(Default)]
pub(crate) struct Names {
    stream: Option<StreamId>,
    event_type: Option<EventType>,
}

impl Names {
    fn stream(&mut self, msg: &BorrowedMessage<'_>, key: &str) -> Result<StreamId, Error> {
        match &self.stream {
            Some(s) if s.as_str() == key => Ok(s.clone()),
            _ => {
                let s = StreamId::parse(key).map_err(|e| bad(msg, e.to_string()))?;
                self.stream = Some(s.clone());
                Ok(s)
            }
        }
    }

    fn event_type(&mut self, msg: &BorrowedMessage<'_>, name: &str) -> Result<EventType, Error> {
        match &self.event_type {
            Some(t) if t.as_str() == name => Ok(t.clone()),
            _ => {
                let t = EventType::new(name).map_err(|e| bad(msg, e.to_string()))?;
                self.event_type = Some(t.clone());
                Ok(t)
            }
        }
    }
}

fn key_of<'m>(msg: &'m BorrowedMessage<'_>) -> Result<&'m str, Error> {
    msg.key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .ok_or_else(|| bad(msg, "key is not a UTF-8 stream name".into()))
}

/// The record's stream name, when it is a photon event.
pub(crate) fn stream_key<'m>(msg: &'m BorrowedMessage<'_>) -> Option<&'m str> {
    photon_headers(msg)?;
    key_of(msg).ok()
}

/// Reads what the index needs; Ok(None) for a record that is not a photon event.
pub(crate) fn index_entry(msg: &BorrowedMessage<'_>) -> Result<Option<IndexEntry>, Error> {
    let Some(map) = photon_headers(msg) else {
        return Ok(None);
    };
    let batch = text(msg, &map, header::BATCH)?;
    let (first, len) = batch
        .split_once('+')
        .and_then(|(f, l)| Some((f.parse().ok()?, l.parse().ok()?)))
        .ok_or_else(|| bad(msg, format!("header photon.batch is {batch:?}")))?;
    Ok(Some(IndexEntry {
        stream: key_of(msg)?.to_owned(),
        event_id: field(msg, &map, header::EVENT_ID)?,
        version: field(msg, &map, header::VERSION)?,
        batch_first: first,
        batch_len: len,
        recorded_at: field(msg, &map, header::RECORDED_AT)?,
    }))
}

/// What a record says about its topic's layout: for a photon event, its key and the partition
/// count it was written with (when the record carries it). None for any other record.
pub(crate) fn layout_of<'m>(msg: &'m BorrowedMessage<'_>) -> Option<(&'m str, Option<i32>)> {
    let map = photon_headers(msg)?;
    let key = key_of(msg).ok()?;
    Some((
        key,
        map.get(header::PARTITIONS).and_then(|v| v.parse().ok()),
    ))
}

/// Whether a photon record of stream `key`, written with `written_with` partitions (when known)
/// and found in partition `p`, fits a topic of `now` partitions; otherwise what it shows: the
/// count it was written with (when known) and the evidence, for the refusal.
pub(crate) fn misplaced(
    key: &str,
    written_with: Option<i32>,
    p: i32,
    now: i32,
    at: impl FnOnce() -> String,
) -> Option<(Option<i32>, String)> {
    match written_with {
        Some(w) if w != now => Some((
            Some(w),
            format!("record {} was written when the topic had {w} partitions", at()),
        )),
        _ if partition_of_key(key, now) != p => Some((
            written_with.filter(|w| *w != now),
            format!(
                "record {} of stream {key} is in partition {p}, but with {now} partitions the stream belongs in partition {}",
                at(),
                partition_of_key(key, now)
            ),
        )),
        _ => None,
    }
}

/// Decodes a record into an event carrying `checkpoint`; Ok(None) for a record that is not a
/// photon event.
pub(crate) fn recorded_event(
    msg: &BorrowedMessage<'_>,
    checkpoint: Checkpoint,
    names: &mut Names,
) -> Result<Option<RecordedEvent>, Error> {
    let Some(map) = photon_headers(msg) else {
        return Ok(None);
    };
    let stream = names.stream(msg, key_of(msg)?)?;
    let micros = |name: &str| -> Result<Timestamp, Error> {
        let us: i64 = number(msg, &map, name)?;
        Timestamp::from_unix_micros(us).ok_or_else(|| bad(msg, format!("{name} out of range")))
    };
    let event_type = names.event_type(msg, text(msg, &map, header::EVENT_TYPE)?)?;
    let content_type = text(msg, &map, header::CONTENT_TYPE)?;
    let user: Headers = match msg.headers() {
        Some(hs) if map.user => hs
            .iter()
            .filter(|h| !h.key.starts_with(header::PREFIX))
            .map(|h| {
                let v = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                (h.key.to_owned(), v.into_owned())
            })
            .collect(),
        _ => Headers::default(),
    };
    Ok(Some(RecordedEvent {
        stream,
        version: Version(number(msg, &map, header::VERSION)?),
        event_id: uuid(msg, &map, header::EVENT_ID)?
            .ok_or_else(|| bad(msg, format!("header {} missing", header::EVENT_ID)))?,
        event_type,
        schema_version: number(msg, &map, header::SCHEMA_VERSION)?,
        occurred_at: micros(header::OCCURRED_AT)?,
        recorded_at: micros(header::RECORDED_AT)?,
        payload: Payload {
            content_type: ContentType::from_mime(content_type),
            bytes: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
        },
        metadata: Metadata {
            causation_id: uuid(msg, &map, header::CAUSATION_ID)?,
            correlation_id: uuid(msg, &map, header::CORRELATION_ID)?,
            headers: user,
        },
        checkpoint,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_headers_are_found_whatever_else_a_record_carries() {
        let junk: Vec<String> = (0..40).map(|i| format!("photon.other{i}")).collect();
        let mut pairs: Vec<(&str, Option<&[u8]>)> =
            junk.iter().map(|k| (k.as_str(), Some(&b"x"[..]))).collect();
        pairs.push((header::VERSION, Some(b"1")));
        pairs.push((header::VERSION, Some(b"2")));
        pairs.push((header::EVENT_TYPE, Some(&[0xff][..])));
        pairs.push(("app.header", Some(b"v")));
        pairs.push((header::EVENT_ID, Some(b"id")));
        let map = collect_headers(pairs.iter().copied()).expect("an event id is there");
        assert_eq!(map.get(header::EVENT_ID), Some("id"));
        assert_eq!(map.get(header::VERSION), Some("2"), "the last value wins");
        assert_eq!(
            map.get(header::EVENT_TYPE),
            None,
            "a non-UTF-8 value is skipped"
        );
        assert_eq!(map.get("photon.other3"), None, "unknown names are ignored");
        assert!(collect_headers([(header::VERSION, Some(&b"1"[..]))].into_iter()).is_none());
    }

    #[test]
    fn decimals_parse_as_str_parse_does() {
        for text in [
            "0",
            "7",
            "+7",
            "-7",
            "0042",
            "9223372036854775807",
            "18446744073709551615",
        ] {
            assert_eq!(
                decimal(text.as_bytes()),
                text.parse::<i128>().ok(),
                "{text}"
            );
        }
        for text in [
            "",
            "-",
            "+",
            "1 ",
            " 1",
            "1.0",
            "x",
            "--1",
            "999999999999999999999999999999999999999999",
        ] {
            assert_eq!(decimal(text.as_bytes()), None, "{text:?}");
        }
        assert_eq!(
            decimal(b"18446744073709551616").and_then(|n| u64::try_from(n).ok()),
            None
        );
    }

    /// The values of Kafka's own `UtilsTest.testMurmur2`, checked against the Java client.
    #[test]
    fn murmur2_matches_kafka() {
        for (key, want) in [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, want, "{key}");
        }
    }

    #[test]
    fn partitions_stay_in_range_and_stable() {
        let s = StreamId::parse("account-42").unwrap();
        let p = partition_for(&s, 6);
        assert!((0..6).contains(&p));
        assert_eq!(p, partition_for(&s, 6));
        assert_eq!(partition_for(&s, 1), 0);
    }

    #[test]
    fn reserved_header_names_are_refused() {
        let s = StreamId::parse("account-1").unwrap();
        let ok = EventData::new(
            EventType::new("T").unwrap(),
            Payload::raw(ContentType::Json, b"{}".to_vec()),
        )
        .with_header("tenant", "a");
        assert!(check_headers(&s, std::slice::from_ref(&ok)).is_ok());
        let bad = ok.with_header("photon.version", "7");
        match check_headers(&s, &[bad]) {
            Err(Error::InvalidInput { what, reason }) => {
                assert!(what.contains("photon.version") && what.contains("account-1"));
                assert!(reason.contains("reserved"));
            }
            other => panic!("{other:?}"),
        }
    }
}
