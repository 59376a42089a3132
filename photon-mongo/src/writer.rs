//! The append protocol: one commit document per append, inserted at the stream's next version
//! and the next global position, both claimed by unique indexes in that one insert.
//!
//! An append decides the version its commit claims (from the expectation and what this store
//! knows of the stream, reading the stream only when it knows nothing that will do) and what a
//! refusal means; `sequencer.rs` gives the commit its global position and sends it. This module
//! must not decide how commits are laid out (`codec.rs`) or read for callers (`reader.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use photon_api::telemetry::Attempts;
use photon_api::validate::{classify_batch, validate_batch, BatchKind, StoredId};
use photon_api::{
    AppendResult, Error, EventData, ExpectedVersion, StreamId, Timestamp, Uuid, Version,
};

use crate::client::{Shared, MAX_APPEND_SIZE};
use crate::sequencer::{self, Sent};
use crate::{codec, error, reader};

/// MongoDB's document size limit, checked on the encoded commit before it is sent.
const MAX_DOCUMENT_SIZE: usize = 16 * 1024 * 1024 - 16 * 1024;

/// Appends `events` to `stream` if it is at `expected`; a re-send of a stored batch answers as
/// the first send did, whatever `expected` says. `attempts` is set to the inserts sent (each
/// one after the first lost a race, for the stream's version or for a global position).
///
/// In the common case this is one insert: the version comes from the expectation and what this
/// store knows of the stream (its own last append to it, or its last read of it), the unique
/// `stream_version` index is the concurrency check, and the stream is read only when the store
/// knows nothing that will do or the insert was refused. Losing a global position to another
/// store's commit is the sequencer's to retry, bounded in time; only races for this stream's
/// version (another writer appended to it in between, and the expectation still holds) count
/// against [`crate::MongoConfig::append_races`], with a growing random pause between them.
pub(crate) async fn append(
    shared: &Arc<Shared>,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
    attempts: &Attempts,
) -> Result<AppendResult, Error> {
    validate_batch(
        stream,
        &events,
        shared.config.max_event_size,
        Some(MAX_APPEND_SIZE),
    )?;
    let ids_by_index = shared.ready().await?.ids_unique_per_element;
    let (mut commit, bytes) = encode(stream, &events)?;
    let mut stream_races = 0;
    let mut inserts = 0;
    // Whether the next decision must read the stream rather than trust what the store knows.
    let mut read = false;
    // Whether the last insert, based on a read of the stream, was refused for its version.
    let mut lost = false;
    loop {
        let (current, fresh) = match known_head(shared, stream, expected, read) {
            Some(known) => (known, false),
            None => (last_version(shared, stream).await?, true),
        };
        if std::mem::take(&mut lost) && expected.matches(current) {
            // Another writer of this stream got in first and the expectation still holds: try
            // again after a short random pause that spreads the writers that collided. (When
            // it no longer holds, the next try answers WrongExpectedVersion or the earlier
            // send's result: no race to count.)
            stream_races += 1;
            if stream_races >= shared.config.append_races {
                return Err(error::too_contended(stream, stream_races));
            }
            tracing::debug!(%stream, stream_races, "append lost its version; retrying");
            pause(8 * u64::from(stream_races.min(8))).await;
            read = true;
            continue;
        }
        let holds = expected.matches(current);
        if !holds && !fresh {
            // What the store knows may be behind the stream: read it before saying so.
            read = true;
            continue;
        }
        if !holds || !ids_by_index {
            if let Some(earlier) = stored_batch(shared, stream, &events).await? {
                return Ok(earlier);
            }
        }
        if !holds {
            return Err(Error::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual: current,
            });
        }
        let first = current.map_or(Version(0), Version::next);
        commit.insert("version", first.0 as i64);
        match sequencer::store(shared, stream, commit, bytes).await? {
            Sent::Stored {
                position,
                took,
                inserts: sent,
            } => {
                attempts.set(inserts + sent);
                let result = appended(first, position, events.len());
                shared.stream_heads.set(stream, result.last_version);
                if took > shared.config.answer_window {
                    // Stored, but a subscription from now may have started meanwhile, past it.
                    return Err(error::answered_late(
                        stream,
                        took,
                        shared.config.answer_window,
                    ));
                }
                return Ok(result);
            }
            // Refused, so nothing was stored: another commit holds this version or (the
            // `stream_event_ids` index) one of these ids. Only the last needs an answer now;
            // for the other the caller decides again, from a read of the stream.
            Sent::Refused {
                inserts: sent,
                commit: refused,
            } => {
                inserts += sent;
                attempts.set(inserts);
                commit = refused;
                // Where the ids index refuses a repeated id, the refusal may be a re-send:
                // answer it now. Elsewhere the next try looks the ids up anyway, after its read
                // of the stream (once is enough).
                if ids_by_index {
                    if let Some(earlier) = stored_batch(shared, stream, &events).await? {
                        return Ok(earlier);
                    }
                }
                shared.stream_heads.forget(stream);
                read = true;
                // Refused while claiming the version after what the store remembered: the
                // stream moved before, not in a race with this insert.
                lost = fresh;
            }
        }
    }
}

/// The stream's head as this store knows it, when that will do for `expected` (and `read` does
/// not ask for a read): `Some(None)` claims version 0 of a new stream, `Some(Some(v))` version
/// `v + 1`. Knowing is enough because versions are never removed: if the stream moved on since,
/// the insert is refused by `stream_version` and the append reads. A store that knows nothing,
/// or whose memory contradicts the expectation, reads instead.
fn known_head(
    shared: &Shared,
    stream: &StreamId,
    expected: ExpectedVersion,
    read: bool,
) -> Option<Option<Version>> {
    if read {
        return None;
    }
    let known = shared.stream_heads.get(stream);
    match (expected, known) {
        // A new stream's first commit needs no read: version 0 is free or the insert is refused.
        (ExpectedVersion::NoStream, None) => Some(None),
        (ExpectedVersion::Exact(v), Some(k)) if v == k => Some(Some(k)),
        (ExpectedVersion::Any | ExpectedVersion::StreamExists, Some(k)) => Some(Some(k)),
        _ => None,
    }
}

/// The version of the stream's last event, read, and remembered.
async fn last_version(shared: &Shared, stream: &StreamId) -> Result<Option<Version>, Error> {
    let current = reader::last_commit(shared, stream)
        .await?
        .map(|h| h.last_version());
    match current {
        Some(v) => shared.stream_heads.set(stream, v),
        None => shared.stream_heads.forget(stream),
    }
    Ok(current)
}

/// The last version a store knows of the streams it appended to or read for an append: what
/// lets an append claim its version without reading the stream. Bounded; when full it starts
/// over (a forgotten stream costs one read).
#[derive(Default)]
pub(crate) struct StreamHeads(Mutex<HashMap<StreamId, Version>>);

/// How many streams a store remembers the head of.
const KNOWN_STREAMS: usize = 16_384;

impl StreamHeads {
    fn get(&self, stream: &StreamId) -> Option<Version> {
        self.lock().get(stream).copied()
    }

    /// Remembers `version` unless a later one is known (concurrent appends answer in any order).
    fn set(&self, stream: &StreamId, version: Version) {
        let mut heads = self.lock();
        if heads.len() >= KNOWN_STREAMS && !heads.contains_key(stream) {
            heads.clear();
        }
        let known = heads.entry(stream.clone()).or_insert(version);
        *known = (*known).max(version);
    }

    fn forget(&self, stream: &StreamId) {
        self.lock().remove(stream);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, Version>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A random pause below `below_ms` milliseconds.
async fn pause(below_ms: u64) {
    let id = Uuid::new_v4();
    let random = u64::from(u16::from_le_bytes([id.as_bytes()[0], id.as_bytes()[1]]));
    tokio::time::sleep(Duration::from_millis(random % below_ms.max(1))).await;
}

/// What a batch some of whose ids the stream holds already answers: the original append's
/// result for a retry, `IdempotencyConflict` for anything else; None when no id is stored.
async fn stored_batch(
    shared: &Shared,
    stream: &StreamId,
    events: &[EventData],
) -> Result<Option<AppendResult>, Error> {
    let stored = stored_ids(shared, stream, events).await?;
    if stored.is_empty() {
        return Ok(None);
    }
    retry_result(stream, events, &stored)
}

/// The commit document and its encoded size, refused before it is sent when MongoDB would
/// refuse its size. Its version is set per attempt, its position and time by its turn to be
/// sent (neither changes the size).
fn encode(stream: &StreamId, events: &[EventData]) -> Result<(Document, usize), Error> {
    let commit = codec::commit(stream, Version(0), 0, Timestamp::now(), events);
    let encoded = mongodb::bson::to_vec(&commit)
        .map_err(|e| error::encoding(stream, e))?
        .len();
    if encoded > MAX_DOCUMENT_SIZE {
        return Err(Error::BatchTooLarge {
            stream: stream.clone(),
            size: encoded,
            limit: MAX_DOCUMENT_SIZE,
        });
    }
    Ok((commit, encoded))
}

/// What an append of `count` events stored at `first` and `position` answers.
fn appended(first: Version, position: u64, count: usize) -> AppendResult {
    AppendResult {
        first_version: first,
        last_version: Version(first.0 + count as u64 - 1),
        checkpoints: codec::checkpoints(position, count),
    }
}

/// The stream's commits holding any of the batch's ids.
async fn stored_ids(
    shared: &Shared,
    stream: &StreamId,
    events: &[EventData],
) -> Result<Vec<Document>, Error> {
    let ids: Vec<Bson> = events
        .iter()
        .map(|e| codec::uuid_bson(e.event_id))
        .collect();
    let mut fields = codec::head_fields();
    fields.insert("event_ids", 1);
    let stored = async {
        shared
            .commits
            .find(doc! { "stream": stream.as_str(), "event_ids": { "$in": ids } })
            .projection(fields)
            .max_time(shared.config.timeout)
            .await?
            .try_collect()
            .await
    };
    shared
        .bounded(|| format!("looking up event ids in {stream}"), stored)
        .await
}

/// The result of re-sending an append that landed, None for a new batch, or the conflict it is.
fn retry_result(
    stream: &StreamId,
    events: &[EventData],
    stored: &[Document],
) -> Result<Option<AppendResult>, Error> {
    let mut where_stored = HashMap::new();
    let mut positions = HashMap::new();
    for d in stored {
        let head = codec::head(d)?;
        positions.insert(head.version, head.position);
        for (i, id) in codec::event_ids(d)?.into_iter().enumerate() {
            let stored = StoredId {
                version: Version(head.version.0 + i as u64),
                batch_first: head.version,
                batch_len: head.count as usize,
            };
            where_stored.insert(id, stored);
        }
    }
    match classify_batch(stream, events, |id| where_stored.get(id).copied())? {
        BatchKind::New => Ok(None),
        BatchKind::Retry { first } => Ok(Some(appended(first, positions[&first], events.len()))),
    }
}
