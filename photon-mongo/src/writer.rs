//! The append protocol: one commit document per append, inserted at the stream's next version
//! and the next global position, both claimed by unique indexes in that one insert.
//!
//! This module decides what an append stores and answers; it must not decide how commits are
//! laid out (`codec.rs`) or read for callers (`reader.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use photon_api::telemetry::Attempts;
use photon_api::validate::{classify_batch, validate_batch, BatchKind, StoredId};
use photon_api::{
    AccessKind, AppendResult, Error, EventData, ExpectedVersion, StreamId, Timestamp, Uuid, Version,
};

use crate::client::{Shared, MAX_APPEND_SIZE};
use crate::{codec, error, reader, subscription};

/// MongoDB's document size limit, checked on the encoded commit before it is sent.
const MAX_DOCUMENT_SIZE: usize = 16 * 1024 * 1024 - 16 * 1024;

/// Appends `events` to `stream` if it is at `expected`; a re-send of a stored batch answers as
/// the first send did, whatever `expected` says. `attempts` is set to the inserts tried (each
/// one after the first lost a race).
///
/// Every append of the database races for the next global position, so losing an insert is
/// normal under load and says nothing about this stream: such a loss is retried after a short
/// pause, bounded only in time ([`POSITION_RACES_FOR`]). Only races for this stream's version
/// (another writer appended to it in between, and the expectation still holds) count against
/// [`crate::MongoConfig::append_races`], with a growing random pause between them.
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
    let mut stream_races = 0;
    let mut inserts = 0;
    let mut lost: Option<Lost> = None;
    // Position races are not counted, but they are bounded in time, so a refusal that only
    // looks like one (a unique index of someone else's, a head read that lags) cannot retry
    // forever.
    let give_up = tokio::time::Instant::now() + POSITION_RACES_FOR * shared.config.timeout;
    loop {
        let current = reader::last_commit(shared, stream)
            .await?
            .map(|h| h.last_version());
        if let Some(lost) = lost.take() {
            if !lost.to_another_stream(shared, current).await? {
                // When the expectation no longer holds, the next try answers
                // WrongExpectedVersion (or the earlier send's result): no race to count.
                if expected.matches(current) {
                    stream_races += 1;
                    if stream_races >= shared.config.append_races {
                        return Err(error::too_contended(stream, stream_races));
                    }
                    // Another writer of this stream got in first: decide again after a short
                    // random pause that spreads the writers that collided.
                    tracing::debug!(%stream, stream_races, "append lost its version; retrying");
                    pause(8 * u64::from(stream_races.min(8))).await;
                    continue;
                }
            } else {
                if tokio::time::Instant::now() >= give_up {
                    return Err(error::position_races(stream, inserts));
                }
                tracing::debug!(%stream, inserts, "append lost the global position; retrying");
                // A pause of up to 2 ms so the writers that all lost one position do not all
                // claim the next one at once.
                pause(3).await;
                continue;
            }
        }
        inserts += 1;
        attempts.set(inserts);
        match try_append(shared, stream, expected, current, &events, ids_by_index).await? {
            Attempt::Stored(result) => return Ok(result),
            Attempt::Lost(l) => lost = Some(l),
        }
    }
}

/// How many `photon_timeout_ms` an append may spend losing the global position to other
/// streams' commits before it answers `Unavailable`.
const POSITION_RACES_FOR: u32 = 6;

/// A random pause below `below_ms` milliseconds.
async fn pause(below_ms: u64) {
    let id = Uuid::new_v4();
    let random = u64::from(u16::from_le_bytes([id.as_bytes()[0], id.as_bytes()[1]]));
    tokio::time::sleep(Duration::from_millis(random % below_ms.max(1))).await;
}

/// What one attempt did.
enum Attempt {
    /// Stored now, or found stored by an earlier send.
    Stored(AppendResult),
    /// Refused by a unique index: another commit took the version or the position first.
    Lost(Lost),
}

/// What a refused insert was based on, to tell afterwards which race it lost.
struct Lost {
    /// The stream's last version it read.
    stream_head: Option<Version>,
    /// The global position it claimed.
    position: u64,
}

impl Lost {
    /// Whether the insert lost its position to a commit of another stream: this stream is still
    /// where the insert found it (`current`), and the position it claimed is taken now.
    /// Anything else (this stream moved, or a refusal neither explains) counts as a race on the
    /// stream, so an append cannot retry forever on a refusal nobody explains.
    async fn to_another_stream(
        &self,
        shared: &Shared,
        current: Option<Version>,
    ) -> Result<bool, Error> {
        Ok(current == self.stream_head && shared.head().await? >= self.position)
    }
}

/// One attempt, based on the stream's last version as just read (`current`).
///
/// Which ids are stored decides before the expectation does: a batch holding a stored id is a
/// retry (answered as the first send was) or a conflict, whatever `expected` says. Where the
/// server's `stream_event_ids` index refuses any repeated id (`ids_by_index`, MongoDB), the
/// insert itself is that check, and the ids are looked up only when it is refused or when the
/// expectation fails. Elsewhere (FerretDB 1.24, whose unique index compares whole arrays) they
/// are looked up before every insert, after the read of the stream's head, which makes the
/// lookup exact: a commit holding one of these ids at a version up to the head was visible to
/// that read, so to the lookup after it; one not visible yet can only be at head + 1, the
/// version this insert claims, so at most one of the two lands.
async fn try_append(
    shared: &Arc<Shared>,
    stream: &StreamId,
    expected: ExpectedVersion,
    current: Option<Version>,
    events: &[EventData],
    ids_by_index: bool,
) -> Result<Attempt, Error> {
    let holds = expected.matches(current);
    if !holds || !ids_by_index {
        if let Some(earlier) = stored_batch(shared, stream, events).await? {
            return Ok(Attempt::Stored(earlier));
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
    // The next global position is the highest one + 1, claimed by the unique index on
    // `position`: a commit is written with its position in one insert, so no position is ever
    // reserved and then left empty, and a position is only taken once the one below it is
    // visible. (An $inc counter would be simpler, but FerretDB 1.24 loses concurrent
    // increments; this works the same on both.)
    let position = shared.head().await? + 1;
    let commit = encode(stream, first, position, events)?;
    let fence = Fence::arm(shared, position);
    // The commit cannot be stored before it is sent: from here on, how long the answer takes
    // counts against the answer window.
    let sending = std::time::Instant::now();
    let insert = async {
        match shared.commits.insert_one(commit).await {
            Ok(_) => Ok(true),
            Err(e) if error::is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e),
        }
    };
    match shared
        .bounded(|| format!("appending to {stream}"), insert)
        .await
    {
        Ok(true) => {
            fence.disarm();
            let took = sending.elapsed();
            if took > shared.config.answer_window {
                // Stored, but a subscription from now may have started meanwhile, past it.
                return Err(error::answered_late(
                    stream,
                    took,
                    shared.config.answer_window,
                ));
            }
            Ok(Attempt::Stored(appended(first, position, events.len())))
        }
        // Refused, so nothing was stored: another commit holds this version or this position,
        // or (the `stream_event_ids` index) one of these ids. Only the last needs an answer
        // now; for the others the caller decides again.
        Ok(false) => {
            fence.disarm();
            Ok(match stored_batch(shared, stream, events).await? {
                Some(earlier) => Attempt::Stored(earlier),
                None => Attempt::Lost(Lost {
                    stream_head: current,
                    position,
                }),
            })
        }
        // Refused access (credentials, a permission): the server did not take the insert, so
        // nothing is stored and there is no window to close; the fence would only be refused
        // in turn (and log it, and log in again) on every such append.
        Err(e) if refused_for_good(&e) => {
            fence.disarm();
            Err(e)
        }
        // The outcome is unknown: the commit may have landed, or may still land. The fence
        // (on drop) closes that window; re-sending the same batch is safe, since the ids make
        // it idempotent.
        Err(e) => Err(e),
    }
}

/// Whether the insert's error is a refusal of the login or of the permission: the server
/// answered and stored nothing.
fn refused_for_good(e: &Error) -> bool {
    matches!(
        e,
        Error::AccessDenied {
            kind: AccessKind::Authentication | AccessKind::Authorization,
            ..
        }
    )
}

/// Closes the window in which an insert whose answer we did not get (a timeout, a lost
/// connection, a dropped call) can still land: once armed and dropped, it fills the commit's
/// position with a tombstone, in the background. The unique index on `position` then refuses
/// the insert if it arrives later, so a write either landed before the fence or never does,
/// and never after newer appends (they take this position or higher). If the commit did land
/// first, the tombstone is refused and the commit stays, seen exactly once by every reader.
/// A re-send that takes the position first is the same: the tombstone is refused.
struct Fence {
    shared: Option<Arc<Shared>>,
    position: u64,
}

impl Fence {
    fn arm(shared: &Arc<Shared>, position: u64) -> Self {
        Self {
            shared: Some(shared.clone()),
            position,
        }
    }

    /// The insert was answered: it is stored, or refused for good.
    fn disarm(mut self) {
        self.shared = None;
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let position = self.position;
        // Dropped outside a runtime (the runtime is shutting down): nothing can run the fence;
        // the position stays open until a reader or a newer append takes it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            match subscription::tombstone(&shared, position).await {
                Ok(()) => tracing::debug!(position, "fenced an append with an unknown outcome"),
                // The fence itself got no answer: the late insert may still land, but only
                // while this position is free, i.e. before any newer append.
                Err(e) => tracing::warn!(position, error = %e, "could not fence an append"),
            }
        });
    }
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

/// The commit document, refused before it is sent when MongoDB would refuse its size.
fn encode(
    stream: &StreamId,
    first: Version,
    position: u64,
    events: &[EventData],
) -> Result<Document, Error> {
    let commit = codec::commit(stream, first, position, Timestamp::now(), events);
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
    Ok(commit)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(kind: AccessKind) -> Error {
        Error::access_denied(crate::client::BACKEND, kind, "appending to a-1", "refused")
    }

    #[test]
    fn only_a_refused_login_or_permission_disarms_the_fence() {
        assert!(refused_for_good(&denied(AccessKind::Authentication)));
        assert!(refused_for_good(&denied(AccessKind::Authorization)));
        // An outcome that may be unknown keeps the fence armed.
        assert!(!refused_for_good(&denied(AccessKind::Tls)));
        let lost = Error::unavailable(crate::client::BACKEND, "appending to a-1", "reset");
        assert!(!refused_for_good(&lost));
    }
}
