//! Global positions: one insert in flight per store, carrying every commit queued meanwhile.
//!
//! Every commit of a database takes the next global position, and a position is only taken
//! once the one below it is visible (so no reader waits for a position a dead writer left empty,
//! and a subscription from `Now` misses nothing, see the README). Racing for "highest + 1" with
//! every append, as each append did before, makes the writers of one process collide with each
//! other and pays a read of the highest position per append. Here a store keeps the highest
//! position it knows, and one turn at a time sends the commits queued since the last turn as one
//! ordered `insert_many` at the positions after it: one round trip for a whole group of appends,
//! and none spent finding the head while this store is the only writer. Other stores (other
//! processes) writing the same database make a claimed position taken; that insert is refused
//! by the unique `position` index, the store reads the head and claims again.
//!
//! This module decides positions and sends inserts; which version a commit claims and what a
//! refusal means for its append is `writer.rs`'s.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{Error as DriverError, ErrorKind};
use photon_api::{AccessKind, Error, StreamId, Timestamp};
use tokio::sync::{oneshot, OwnedMutexGuard};
use tokio::time::Instant;

use crate::client::Shared;
use crate::{error, subscription};

/// At most this many commits go in one insert: a refused one stops the rest of the group, which
/// is then sent again, so a group bounds how much one refusal delays. (FerretDB 1.24 stops an
/// ordered insert at its first error only within one batch of its own, 100 documents by
/// default: a group must stay below that.)
const GROUP_COMMITS: usize = 64;

/// At most this many bytes of commits go in one insert (a commit alone may be bigger).
const GROUP_BYTES: usize = 8 * 1024 * 1024;

/// How many `photon_timeout_ms` a commit may spend losing its claimed positions to other
/// stores' commits before its append answers `Unavailable`.
const POSITION_RACES_FOR: u32 = 6;

/// A store's queue of commits waiting for a position, and its turn to send them.
pub(crate) struct Sequencer {
    queue: Mutex<VecDeque<Queued>>,
    /// Names each queued commit, so a caller can take its own back out of the queue.
    next_id: AtomicU64,
    /// Held by the task sending a group; holds the highest position this store knows is taken
    /// (None when it must be read: at first, and after an insert with an unknown outcome).
    turn: Arc<tokio::sync::Mutex<Option<u64>>>,
}

/// One commit waiting for its position.
struct Queued {
    id: u64,
    stream: StreamId,
    /// The commit without its position, which its turn sets.
    commit: Document,
    bytes: usize,
    /// Inserts of this commit sent so far.
    sent: u32,
    /// Past this, losing positions to other stores is answered `Unavailable`.
    give_up: Instant,
    answer: oneshot::Sender<Result<Sent, Error>>,
}

/// What the server did with a commit.
#[derive(Debug)]
pub(crate) enum Sent {
    /// Stored at `position`; its insert answered `took` after it was sent.
    Stored {
        position: u64,
        took: Duration,
        inserts: u32,
    },
    /// Refused by a unique index other than `position` (the stream's version, its ids, or an
    /// index someone else made): nothing of it is stored, and its position was left free. The
    /// commit comes back for another try.
    Refused { inserts: u32, commit: Document },
}

impl Sequencer {
    pub(crate) fn new() -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
            turn: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Takes the commit `id` out of the queue if no turn took it yet: then it is never sent.
    fn withdraw(&self, id: u64) -> bool {
        let mut queue = lock(&self.queue);
        match queue.iter().position(|q| q.id == id) {
            Some(at) => {
                queue.remove(at);
                true
            }
            None => false,
        }
    }
}

/// Stores `commit` (an append to `stream`, `bytes` long encoded) at the next free global
/// position, with whatever else is queued in this store, and answers what became of it.
///
/// A commit still waiting for its turn after `photon_timeout_ms` (the inserts ahead of it do
/// not answer) is taken out of the queue and answered `Unavailable`: nothing is sent. So is one
/// whose caller stops waiting. Once sent, the insert runs to its answer whoever waits: stored,
/// refused, or with an unknown outcome, in which case its positions are fenced (see [`fence`]).
pub(crate) async fn store(
    shared: &Arc<Shared>,
    stream: &StreamId,
    commit: Document,
    bytes: usize,
) -> Result<Sent, Error> {
    let sequencer = &shared.sequencer;
    let id = sequencer.next_id.fetch_add(1, Ordering::Relaxed);
    let (answer, mut answered) = oneshot::channel();
    let queued = Queued {
        id,
        stream: stream.clone(),
        commit,
        bytes,
        sent: 0,
        give_up: Instant::now() + POSITION_RACES_FOR * shared.config.timeout,
        answer,
    };
    lock(&sequencer.queue).push_back(queued);
    take_turn(shared);
    let timeout = shared.config.timeout;
    let answer = match tokio::time::timeout(timeout, &mut answered).await {
        Ok(answer) => answer,
        Err(_) if sequencer.withdraw(id) => return Err(error::not_sent(stream, timeout)),
        // Taken by a turn: its insert is on its way, and answers within its own bounds.
        Err(_) => answered.await,
    };
    answer.unwrap_or_else(|_| {
        // The task sending the group ended without an answer (its runtime is shutting down).
        Err(error::unknown_outcome(
            stream,
            &Error::backend(
                crate::client::BACKEND,
                "appending",
                "the task sending it ended",
            ),
        ))
    })
}

/// Starts sending the queue unless a turn is running already (it will take what was queued).
fn take_turn(shared: &Arc<Shared>) {
    if let Ok(turn) = Arc::clone(&shared.sequencer.turn).try_lock_owned() {
        let shared = Arc::clone(shared);
        // A task of its own, so a caller that stops waiting cannot cut an insert off halfway:
        // the group's other appends wait for its answer.
        tokio::spawn(run(shared, turn));
    }
}

/// Sends groups until the queue is empty.
async fn run(shared: Arc<Shared>, turn: OwnedMutexGuard<Option<u64>>) {
    let mut relay = Relay(Some(Arc::clone(&shared)));
    let mut turn = Some(turn);
    let mut busy_since = Instant::now();
    while let Some(mut held) = turn.take() {
        let group = next_group(&shared.sequencer);
        if group.is_empty() {
            busy_since = Instant::now();
            drop(held);
            // A commit queued after the queue was found empty, while this turn was still held,
            // found the turn taken and left it to this one: take it back if nobody else has.
            if !lock(&shared.sequencer.queue).is_empty() {
                turn = Arc::clone(&shared.sequencer.turn).try_lock_owned().ok();
            }
            continue;
        }
        let sending = Instant::now();
        send(&shared, &mut held, group).await;
        if busy_since.elapsed() >= YIELD_AFTER && !lock(&shared.sequencer.queue).is_empty() {
            // Sending back to back, this store would take every position another store reads
            // the head for (its next claim leaves as soon as the last is answered, theirs after
            // a read): leave them a window of two inserts' time every 100 ms. Commits queued
            // meanwhile go in the next group; a saturated store (full groups) loses up to a
            // sixth of its throughput to it.
            let window = (sending.elapsed() * 2).clamp(YIELD_MIN, YIELD_MAX);
            tokio::time::sleep(window).await;
            busy_since = Instant::now();
        }
        turn = Some(held);
    }
    relay.0 = None;
}

/// How long a turn sends groups back to back before it yields (see [`run`]).
const YIELD_AFTER: Duration = Duration::from_millis(100);

/// Bounds of the pause a busy turn yields: twice its last insert, within these.
const YIELD_MIN: Duration = Duration::from_millis(1);
const YIELD_MAX: Duration = Duration::from_millis(20);

/// Hands the queue to a new turn if a turn's task ends without finishing (a panic): the
/// commits queued behind it would otherwise wait for the next append to start one.
struct Relay(Option<Arc<Shared>>);

impl Drop for Relay {
    fn drop(&mut self) {
        let Some(shared) = self.0.take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { take_turn(&shared) });
        }
    }
}

/// The next group: queued commits in order, up to the bounds, leaving out those nobody waits
/// for any more.
fn next_group(sequencer: &Sequencer) -> Vec<Queued> {
    let mut queue = lock(&sequencer.queue);
    let mut group: Vec<Queued> = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queue.front() {
        if next.answer.is_closed() {
            queue.pop_front();
            continue;
        }
        let full = group.len() >= GROUP_COMMITS || bytes + next.bytes > GROUP_BYTES;
        if !group.is_empty() && full {
            break;
        }
        bytes += next.bytes;
        group.extend(queue.pop_front());
    }
    group
}

/// What one ordered insert of a group came to.
enum Inserted {
    /// Every commit is stored.
    All,
    /// The commits before `index` are stored, the one at `index` was refused with `error`, and
    /// none after it was tried.
    Until { index: usize, error: DriverError },
}

/// Sends `group` at the positions after the head, again after each refusal, until every commit
/// in it is answered.
async fn send(shared: &Arc<Shared>, head: &mut Option<u64>, mut group: Vec<Queued>) {
    loop {
        // None of these is stored here, so a commit whose caller left can still be dropped.
        group.retain(|q| !q.answer.is_closed());
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) = group
            .into_iter()
            .partition(|q| q.sent > 0 && now >= q.give_up);
        group = kept;
        for q in expired {
            let gave_up = error::position_races(&q.stream, q.sent);
            let _ = q.answer.send(Err(gave_up));
        }
        if group.is_empty() {
            return;
        }
        let base = match *head {
            Some(known) => known,
            None => match shared.head().await {
                Ok(read) => read,
                Err(e) => return fail(group, e),
            },
        };
        let recorded_at = Timestamp::now().unix_micros();
        for (i, q) in group.iter_mut().enumerate() {
            q.commit.insert("position", (base + 1 + i as u64) as i64);
            q.commit.insert("recorded_at", recorded_at);
            q.sent += 1;
        }
        let sending = std::time::Instant::now();
        let insert = async {
            let docs = group.iter().map(|q| &q.commit);
            match shared.commits.insert_many(docs).await {
                Ok(_) => Ok(Inserted::All),
                Err(error) => match refused_at(&error) {
                    Some(index) => Ok(Inserted::Until { index, error }),
                    None => Err(error),
                },
            }
        };
        // The context is written only for an error, not on every insert.
        let context = || format!("appending to {}", streams(&group));
        let answer = shared.bounded(context, insert).await;
        let took = sending.elapsed();
        let (index, refusal) = match answer {
            Ok(Inserted::All) => {
                *head = Some(base + group.len() as u64);
                for (i, q) in group.into_iter().enumerate() {
                    answer_stored(q, base + 1 + i as u64, took);
                }
                return;
            }
            Ok(Inserted::Until { index, error }) if index < group.len() => (index, error),
            Ok(Inserted::Until { error, .. }) => {
                // An index past the group: the answer cannot be read, so the outcome is not known.
                let context = format!("appending to {}", streams(&group));
                let e = error::driver_after(context, error, &shared.heartbeats());
                return unanswered(shared, head, base, group, e).await;
            }
            Err(e) => return unanswered(shared, head, base, group, e).await,
        };
        let rest = group.split_off(index);
        *head = Some(base + index as u64);
        for (i, q) in group.into_iter().enumerate() {
            answer_stored(q, base + 1 + i as u64, took);
        }
        group = rest;
        if !error::is_duplicate_key(&refusal) {
            // Refused for a reason of its own: for that commit only, unless it is the login or
            // the permission, which every other commit would meet too.
            let context = format!("appending to {}", group[0].stream);
            let e = error::driver_after(context, refusal, &shared.heartbeats());
            if refused_for_good(&e) {
                return fail(group, e);
            }
            let q = group.remove(0);
            let _ = q.answer.send(Err(e));
            continue;
        }
        // Which unique index refused it: the commit's own version or ids (held by a commit of
        // its stream; its append decides), or else the claimed position (another store's
        // commit got there first: claim again after the head, with whatever was queued
        // meanwhile), or else an index someone else made (refused for good).
        let claimed = base + 1 + index as u64;
        match refused_by(shared, &group[0], claimed).await {
            Ok(Refusal::OwnKeys) => {
                let q = group.remove(0);
                let refused = Sent::Refused {
                    inserts: q.sent,
                    commit: q.commit,
                };
                let _ = q.answer.send(Ok(refused));
            }
            Ok(Refusal::Position) => {
                *head = None;
                return requeue(shared, group);
            }
            Ok(Refusal::Foreign) => {
                let q = group.remove(0);
                let _ = q.answer.send(Err(error::foreign_index(&q.stream, claimed)));
            }
            Err(e) => {
                *head = None;
                return fail(group, e);
            }
        }
    }
}

/// Puts commits that lost their positions back at the front of the queue, in order, to go
/// with the commits queued meanwhile in the turn's next insert.
fn requeue(shared: &Shared, group: Vec<Queued>) {
    let mut queue = lock(&shared.sequencer.queue);
    for q in group.into_iter().rev() {
        queue.push_front(q);
    }
}

/// Which unique index refused a commit.
enum Refusal {
    /// Its stream's version or one of its ids is taken.
    OwnKeys,
    /// Its claimed position is taken.
    Position,
    /// Neither: a unique index that is not photon's.
    Foreign,
}

/// A group's insert got no answer (or one that does not say what it stored): its positions are
/// fenced, in order, before this turn goes on, and each commit's append hears that its outcome
/// is unknown. A refused login or permission stored nothing: no fence.
async fn unanswered(
    shared: &Arc<Shared>,
    head: &mut Option<u64>,
    base: u64,
    group: Vec<Queued>,
    e: Error,
) {
    if !refused_for_good(&e) {
        *head = None;
        fence(shared, base + 1, group.len()).await;
    }
    let mut group = group.into_iter();
    let Some(first) = group.next() else { return };
    for q in group {
        let _ = q.answer.send(Err(error::unknown_outcome(&q.stream, &e)));
    }
    let e = error::into_unknown_outcome(&first.stream, e);
    let _ = first.answer.send(Err(e));
}

/// What refused `q`, claimed at `claimed`: a commit of its stream holding the version it claims
/// or one of its ids, else a commit (or tombstone) at its position, else a unique index that is
/// not photon's. The version, the ids and the position only ever get taken, so what this finds
/// after the refusal was there at the refusal. (Reading the highest position cannot tell this:
/// while other stores write, a position left free by a refused commit is taken a moment later.)
/// Read with local read concern, as the unique indexes see the primary's own data: a majority
/// read could miss what refused the commit.
async fn refused_by(shared: &Shared, q: &Queued, claimed: u64) -> Result<Refusal, Error> {
    let version = q.commit.get("version").cloned().unwrap_or(Bson::Null);
    let ids = q.commit.get("event_ids").cloned().unwrap_or(Bson::Null);
    let own = doc! {
        "stream": q.stream.as_str(),
        "$or": [ { "version": version }, { "event_ids": { "$in": ids } } ],
    };
    if holds(shared, own, || {
        format!("reading what refused the commit to {}", q.stream)
    })
    .await?
    {
        return Ok(Refusal::OwnKeys);
    }
    let position = doc! { "position": claimed as i64 };
    if holds(shared, position, || format!("reading position {claimed}")).await? {
        return Ok(Refusal::Position);
    }
    Ok(Refusal::Foreign)
}

/// Whether a document matches `filter`, read from the primary's own data.
async fn holds(
    shared: &Shared,
    filter: Document,
    context: impl FnOnce() -> String,
) -> Result<bool, Error> {
    let found = shared
        .bounded(
            context,
            shared
                .commits_local
                .find_one(filter)
                .projection(doc! { "_id": 1 })
                .max_time(shared.config.timeout),
        )
        .await?;
    Ok(found.is_some())
}

/// Answers a stored commit.
fn answer_stored(q: Queued, position: u64, took: Duration) {
    let inserts = q.sent;
    let _ = q.answer.send(Ok(Sent::Stored {
        position,
        took,
        inserts,
    }));
}

/// Answers every commit of `group` with the failure `e` of the read or insert they waited
/// for: the first with `e` itself (and its source), the others with a copy.
fn fail(group: Vec<Queued>, e: Error) {
    let mut group = group.into_iter();
    let Some(first) = group.next() else { return };
    for q in group {
        let _ = q.answer.send(Err(error::copy_for(&e)));
    }
    let _ = first.answer.send(Err(e));
}

/// The streams a group appends to, for an error's context (the first few).
fn streams(group: &[Queued]) -> String {
    let mut names: Vec<&str> = group.iter().map(|q| q.stream.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let more = names.len().saturating_sub(4);
    names.truncate(4);
    let mut listed = names.join(", ");
    if more > 0 {
        listed.push_str(&format!(" and {more} more streams"));
    }
    listed
}

/// The index in the group of the commit an ordered insert stopped at, when the server answered
/// with write errors only: every commit before it is stored, none after it was tried. `None`
/// for anything else (a write-concern error among them: the outcome is unknown).
fn refused_at(e: &DriverError) -> Option<usize> {
    match &*e.kind {
        ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => m
            .write_errors
            .as_ref()
            .and_then(|errors| errors.iter().map(|w| w.index).min()),
        _ => None,
    }
}

/// Whether an insert's error is a refusal of the login or of the permission: the server
/// answered and stored nothing.
pub(crate) fn refused_for_good(e: &Error) -> bool {
    matches!(
        e,
        Error::AccessDenied {
            kind: AccessKind::Authentication | AccessKind::Authorization,
            ..
        }
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes the window in which an insert that got no answer (a timeout, a lost connection, a
/// write-concern error) can still land: tombstones at its positions, in order, before the
/// store's next insert. The unique index on `position` then refuses the late insert, which,
/// being ordered, stops at its first refused commit: it lands before the fence or not at all,
/// and never after newer appends. A commit that did land first keeps its position (the
/// tombstone is refused) and is seen exactly once by every reader.
///
/// The fence stops at the first tombstone that gets no answer (or after one timeout in all), and
/// the store reads the head
/// before its next insert: the positions from there on stay free, so the store's next commits
/// claim them and the late insert can only land before those, never above them. (Skipping a
/// position and fencing the ones after it would let the late insert land there, below commits
/// answered after it.)
async fn fence(shared: &Shared, first: u64, count: usize) {
    let tombstones = async {
        for position in first..first + count as u64 {
            match subscription::tombstone(shared, position).await {
                Ok(()) => tracing::debug!(position, "fenced an append with an unknown outcome"),
                Err(e) => {
                    tracing::warn!(position, error = %e, "could not fence an append; the next insert claims this position");
                    return;
                }
            }
        }
    };
    // One timeout in all: stopping anywhere is as safe as a tombstone without answer.
    if tokio::time::timeout(shared.config.timeout, tombstones)
        .await
        .is_err()
    {
        tracing::warn!(
            first,
            count,
            "fencing an append took too long; the next insert claims the positions left"
        );
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
