//! The writes an append makes besides its conditional write, grouped across the appends of a
//! process: before it, its pending markers (and the registration of a time bucket new to the
//! process); after it, once its caller has its answer, its category and all-stream rows, then
//! the clearing of its markers, in the background.
//!
//! Markers: the appends that queue for their markers while a group is in flight make up the
//! next group (groups go one after another), written in one unlogged batch (one per `pending`
//! partition, a category's or the all stream's time bucket, for a large group). So concurrent
//! appends to a category cost the server one request per group, not one per append; an append
//! alone waits for no one.
//!
//! Rows: an append is acknowledged once its conditional write applied: it is then stored, and
//! its pending markers hold category readers back until its rows are written, by this module in
//! a moment, or by a reader if this process stops first (see `writer`'s `index_if_committed`
//! and `settle_marker`). So the caller does not wait for these writes, and the writes of appends
//! committed meanwhile are sent together: one unlogged batch per partition (rows of one
//! `category_commits` partition are one mutation, so such a batch is as cheap to the server as
//! one row and is not subject to `batch_size_fail_threshold`), then the markers' deletes, as
//! the markers were written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::join_all;
use photon_api::{Error, StreamId, Uuid};
use scylla::errors::ExecutionError;
use scylla::statement::batch::BatchType;
use scylla::value::CqlTimeuuid;
use tokio::sync::{oneshot, Notify};

use crate::client::{Shared, ALL, BACKEND};
use crate::codec::{self, Commit};
use crate::{error, schema};

/// Appends whose markers are written together, at most.
const MARKER_GROUP: usize = 256;

/// Commits written together, at most.
const GROUP_COMMITS: usize = 256;

/// Bytes of events written together, at most (a single larger commit goes alone): a batch of
/// one partition's rows is one mutation, which must stay under the server's
/// `max_mutation_size` (half the commit log segment, 16 MiB by default).
const GROUP_BYTES: usize = 4 * 1024 * 1024;

/// An append's pending marker, written to its category's and the all stream's time bucket
/// `bucket`, with its time (µs) as the write timestamp.
pub(crate) struct Marker {
    pub(crate) stream: StreamId,
    pub(crate) first: u64,
    pub(crate) time_id: Uuid,
    pub(crate) micros: i64,
    pub(crate) bucket: i64,
}

/// An append waiting for its marker, and where to tell it the outcome.
struct MarkerWaiter {
    marker: Marker,
    written: oneshot::Sender<Result<(), ExecutionError>>,
}

/// The appends waiting for their markers, and whether a task is writing them.
#[derive(Default)]
pub(crate) struct MarkerQueue {
    state: Mutex<Waiting<MarkerWaiter>>,
}

/// A committed append waiting for its rows, its events counted in the queue's room until it
/// is dropped (written, or given up to readers).
pub(crate) struct Indexing {
    commit: Commit,
    count: i32,
    _held: Held,
}

/// The appends waiting for their rows, and whether a task is writing them.
#[derive(Default)]
pub(crate) struct IndexQueue {
    state: Mutex<Waiting<Indexing>>,
    room: Arc<Room>,
}

/// Bytes of events queued or being written, and a wake-up when some are let go.
#[derive(Default)]
struct Room {
    bytes: AtomicUsize,
    freed: Notify,
}

/// One append's bytes in a [`Room`], let go when it is dropped, however it ends (written,
/// failed, or dropped with a task that stopped), so the count cannot drift.
struct Held {
    room: Arc<Room>,
    bytes: usize,
}

impl Room {
    /// Returns once fewer than `limit` bytes are held.
    async fn below(&self, limit: usize) {
        loop {
            // Registered before the check, so a release between the two is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.bytes.load(Ordering::Relaxed) < limit {
                return;
            }
            freed.await;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.room.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        self.room.freed.notify_waiters();
    }
}

/// Bytes of events an index queue holds before appends wait for room (the server is behind,
/// and appends slow down to its pace rather than fill this process's memory). Each append may
/// add its own on top, so the queue holds at most this and one append per caller.
const INDEX_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Writes waiting for a group, and whether a task is taking them.
struct Waiting<T> {
    waiting: Vec<T>,
    /// A task is taking from `waiting`; it ends when it finds it empty.
    running: bool,
}

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Self {
            waiting: Vec::new(),
            running: false,
        }
    }
}

impl<T> Waiting<T> {
    /// Adds `item`; true when no task is taking them (the caller starts one).
    fn push(&mut self, item: T) -> bool {
        self.waiting.push(item);
        !std::mem::replace(&mut self.running, true)
    }

    /// The next group, taken by `take`; None (and no task running) when none is waiting.
    fn next(&mut self, take: impl FnOnce(&mut Vec<T>) -> Vec<T>) -> Option<Vec<T>> {
        if self.waiting.is_empty() {
            self.running = false;
            return None;
        }
        Some(take(&mut self.waiting))
    }
}

impl Shared {
    /// Writes `marker` with the markers of the appends waiting meanwhile (see the module).
    ///
    /// # Errors
    /// - As the driver's: the batch holding the marker failed (a timeout is `Unavailable`; the
    ///   marker may be written, and is then repaired like any other).
    pub(crate) async fn write_marker(self: &Arc<Self>, marker: Marker) -> Result<(), Error> {
        let context = format!(
            "writing the pending marker of {}@{}",
            marker.stream, marker.first
        );
        // Connected before queueing, so the task writing the group has a session.
        self.ready().await?;
        let (written, answer) = oneshot::channel();
        let start = self
            .marker_queue
            .state
            .lock()
            .expect("marker queue")
            .push(MarkerWaiter { marker, written });
        if start {
            tokio::spawn(write_waiting_markers(self.clone()));
        }
        match answer.await {
            Ok(result) => result.map_err(|e| error::request(context, e)),
            // The task ended without answering: it panicked, or the runtime is shutting down.
            Err(_) => Err(Error::Unavailable {
                backend: BACKEND,
                message: format!("{context}: the task writing markers stopped"),
                source: None,
            }),
        }
    }

    /// Writes a group's markers, with the registrations of time buckets this process has not
    /// registered, all at once; the outcome for each waiter (the batch holding its markers and
    /// its bucket's registration), so one partition's failure fails only its appends.
    async fn write_markers(&self, group: &[MarkerWaiter]) -> Vec<Result<(), ExecutionError>> {
        let (session, st) = self
            .connected()
            .expect("every waiter connected before queueing");
        let mut partitions: HashMap<(&str, i64), Vec<usize>> = HashMap::new();
        let mut unregistered: HashMap<(&str, i64), Vec<usize>> = HashMap::new();
        for (i, w) in group.iter().enumerate() {
            let m = &w.marker;
            let category = m.stream.category_name();
            for key in [category, ALL] {
                partitions.entry((key, m.bucket)).or_default().push(i);
            }
            if !self.bucket_registered(category, m.bucket) {
                unregistered
                    .entry((category, m.bucket))
                    .or_default()
                    .push(i);
            }
        }
        let parts = partitions
            .iter()
            .map(|(&(key, bucket), members)| {
                let rows = members.iter().map(|&i| {
                    let m = &group[i].marker;
                    let t = CqlTimeuuid::from(m.time_id);
                    (key, bucket, t, m.stream.as_str(), m.first as i64, m.micros)
                });
                (members.clone(), rows.collect::<Vec<_>>())
            })
            .collect();
        let markers = batches(parts).into_iter().map(|(members, values)| {
            let batch = schema::batch(
                &self.config,
                BatchType::Unlogged,
                &vec![&st.insert_pending; values.len()],
            );
            async move { (members, session.batch(&batch, values).await.map(drop)) }
        });
        let registrations = unregistered
            .iter()
            .map(|(&(category, bucket), members)| async move {
                let [c, a] = [category, ALL]
                    .map(|key| session.execute_unpaged(&st.insert_bucket, (key, bucket)));
                let (c, a) = tokio::join!(c, a);
                let written = c.and(a).map(drop);
                if written.is_ok() {
                    self.remember_bucket(category, bucket);
                }
                (members.clone(), written)
            });
        let (markers, registrations) = tokio::join!(join_all(markers), join_all(registrations));
        let mut results: Vec<Result<(), ExecutionError>> = vec![Ok(()); group.len()];
        for (members, written) in markers.into_iter().chain(registrations) {
            if let Err(e) = written {
                for i in members {
                    if results[i].is_ok() {
                        results[i] = Err(e.clone());
                    }
                }
            }
        }
        results
    }

    /// Waits until the index queue has room: called before an append picks its time id, so
    /// that its wait does not count against its answer window nor hold a marker that readers
    /// wait behind.
    pub(crate) async fn index_room(&self) {
        self.index_queue.room.below(INDEX_QUEUE_BYTES).await;
    }

    /// Queues a committed append's rows; they are written in a moment, with those of the
    /// appends committed meanwhile. No task outlives the queue's last entry, so a store that is
    /// dropped lets its session go.
    pub(crate) fn index(self: &Arc<Self>, commit: Commit, count: i32) {
        let room = &self.index_queue.room;
        let bytes = commit.events.len();
        room.bytes.fetch_add(bytes, Ordering::Relaxed);
        let indexing = Indexing {
            commit,
            count,
            _held: Held {
                room: room.clone(),
                bytes,
            },
        };
        let start = self
            .index_queue
            .state
            .lock()
            .expect("index queue")
            .push(indexing);
        if start {
            tokio::spawn(index_waiting(self.clone()));
        }
    }

    /// Writes one group's rows, then clears the markers of the commits whose rows are all
    /// written. A commit whose rows failed keeps its markers: a reader repairs it.
    async fn index_group(&self, group: &[Indexing]) -> Result<(), Error> {
        let (session, st) = self.ready().await?;
        // Rows, one batch per partition of `category_commits`.
        let mut rows: HashMap<(&str, i64), Vec<usize>> = HashMap::new();
        for (i, job) in group.iter().enumerate() {
            let tb = self.time_bucket_of(codec::time_micros(&job.commit.time_id));
            rows.entry((job.commit.stream.category_name(), tb))
                .or_default()
                .push(i);
            rows.entry((ALL, tb)).or_default().push(i);
        }
        let row_writes = rows.iter().map(|(&(category, tb), members)| async move {
            let batch = schema::batch(
                &self.config,
                BatchType::Unlogged,
                &vec![&st.insert_category; members.len()],
            );
            let values: Vec<_> = members
                .iter()
                .map(|&i| {
                    let c = &group[i].commit;
                    (
                        category,
                        tb,
                        CqlTimeuuid::from(c.time_id),
                        c.stream.as_str(),
                        c.first as i64,
                        group[i].count,
                        &c.events[..],
                    )
                })
                .collect();
            let written = session.batch(&batch, values).await;
            (members, written)
        });
        // Streams the writer could not list before its answer (it answered `Unavailable`).
        let unlisted: Vec<&StreamId> = group
            .iter()
            .map(|job| &job.commit.stream)
            .filter(|s| !self.stream_listed(s.as_str()))
            .collect();
        let listing = join_all(unlisted.iter().map(|s| self.list_stream(s)));
        let (written, listed) = tokio::join!(join_all(row_writes), listing);
        // A commit is indexed once both its rows are written and its stream listed.
        let mut failed: Option<Error> = None;
        let mut indexed = vec![true; group.len()];
        for (members, result) in written {
            if let Err(e) = result {
                members.iter().for_each(|&i| indexed[i] = false);
                failed.get_or_insert(error::request("writing the category rows", e));
            }
        }
        for (stream, result) in unlisted.iter().zip(listed) {
            if let Err(e) = result {
                for (i, job) in group.iter().enumerate() {
                    if &job.commit.stream == *stream {
                        indexed[i] = false;
                    }
                }
                failed.get_or_insert(e);
            }
        }
        let done: Vec<&Commit> = group
            .iter()
            .zip(&indexed)
            .filter(|(_, ok)| **ok)
            .map(|(job, _)| &job.commit)
            .collect();
        let cleared = self.clear_group(&done).await;
        match failed {
            Some(e) => Err(e),
            None => cleared,
        }
    }

    /// Deletes the pending markers of `commits`: one batch per `pending` partition. Each delete
    /// carries its marker's time plus one as its write timestamp, so it wins over the insert.
    async fn clear_group(&self, commits: &[&Commit]) -> Result<(), Error> {
        if commits.is_empty() {
            return Ok(());
        }
        let (session, st) = self.ready().await?;
        let mut partitions: HashMap<(&str, i64), Vec<&Commit>> = HashMap::new();
        for c in commits {
            let tb = self.time_bucket_of(codec::time_micros(&c.time_id));
            partitions
                .entry((c.stream.category_name(), tb))
                .or_default()
                .push(c);
            partitions.entry((ALL, tb)).or_default().push(c);
        }
        let parts = partitions
            .iter()
            .map(|(&(category, tb), members)| {
                let rows = members.iter().map(|c| {
                    let micros = codec::time_micros(&c.time_id);
                    (micros + 1, category, tb, CqlTimeuuid::from(c.time_id))
                });
                (Vec::new(), rows.collect::<Vec<_>>())
            })
            .collect();
        let deletes = batches(parts).into_iter().map(|(_, values)| {
            let batch = schema::batch(
                &self.config,
                BatchType::Unlogged,
                &vec![&st.delete_pending; values.len()],
            );
            async move { session.batch(&batch, values).await }
        });
        for result in join_all(deletes).await {
            // A timed-out delete is `Unavailable`: the marker stays, and a reader repairs it.
            result.map_err(|e| error::request("clearing the pending markers", e))?;
        }
        Ok(())
    }
}

/// Rows of markers (or their deletes) sent in one batch across partitions, at most: a few
/// KiB, under Cassandra's `batch_size_warn_threshold` (5 KiB) for a batch of several
/// partitions. One request serves an append alone, or a few together.
const SMALL_BATCH_ROWS: usize = 32;

/// The batches that write `partitions` (each the appends it serves and its rows): all in one
/// when they are few (one request, where one per partition would cost the server one request
/// each), else one per partition (a batch of one partition is one mutation, held to no batch
/// size threshold).
fn batches<T>(partitions: Vec<(Vec<usize>, Vec<T>)>) -> Vec<(Vec<usize>, Vec<T>)> {
    let rows: usize = partitions.iter().map(|(_, rows)| rows.len()).sum();
    if rows > SMALL_BATCH_ROWS {
        return partitions;
    }
    let mut one = (Vec::new(), Vec::new());
    for (members, rows) in partitions {
        one.0.extend(members);
        one.1.extend(rows);
    }
    one.0.sort_unstable();
    one.0.dedup();
    vec![one]
}

/// Resets its queue when the task taking from it ends other than by finding it empty (a panic,
/// or a runtime shutting down and dropping the task): the next append starts a new task, and
/// appends waiting for their markers are answered (their senders dropped: `Unavailable`)
/// rather than left waiting for a task that is gone.
struct TaskGuard<'a, T> {
    queue: &'a Mutex<Waiting<T>>,
    drop_waiting: bool,
    finished: bool,
}

impl<T> Drop for TaskGuard<'_, T> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Ok(mut state) = self.queue.lock() {
            state.running = false;
            if self.drop_waiting {
                state.waiting.clear();
            }
        }
    }
}

/// Writes the waiting appends' markers, a group at a time, until none wait. Appends whose
/// caller went away while queued are dropped: a marker with no conditional write after it
/// would only hold readers back until the repair.
async fn write_waiting_markers(shared: Arc<Shared>) {
    let mut guard = TaskGuard {
        queue: &shared.marker_queue.state,
        drop_waiting: true,
        finished: false,
    };
    loop {
        let next = guard.queue.lock().expect("marker queue").next(|w| {
            w.retain(|waiter| !waiter.written.is_closed());
            let n = w.len().min(MARKER_GROUP);
            w.drain(..n).collect()
        });
        let Some(group) = next else {
            guard.finished = true;
            return;
        };
        if group.is_empty() {
            continue;
        }
        let results = shared.write_markers(&group).await;
        for (waiter, result) in group.into_iter().zip(results) {
            // A caller that went away no longer needs the answer.
            let _ = waiter.written.send(result);
        }
    }
}

/// Writes the waiting appends' rows, a group at a time, until none wait.
async fn index_waiting(shared: Arc<Shared>) {
    // A task that stops abnormally drops what waits: those appends' markers stay, and readers
    // write their rows (see `writer`'s `index_if_committed`); their bytes are let go.
    let mut guard = TaskGuard {
        queue: &shared.index_queue.state,
        drop_waiting: true,
        finished: false,
    };
    loop {
        let next = guard.queue.lock().expect("index queue").next(take_group);
        let Some(group) = next else {
            guard.finished = true;
            return;
        };
        let indexed = shared.index_group(&group).await;
        if let Err(e) = indexed {
            tracing::warn!(commits = group.len(), error = %e, "photon-cassandra: category rows left for readers to write");
        }
    }
}

/// The oldest waiting appends that fit in one group (at least one).
fn take_group(waiting: &mut Vec<Indexing>) -> Vec<Indexing> {
    let mut bytes = 0;
    let mut n = 0;
    for job in waiting.iter() {
        bytes += job.commit.events.len();
        if n > 0 && (n == GROUP_COMMITS || bytes > GROUP_BYTES) {
            break;
        }
        n += 1;
    }
    waiting.drain(..n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use photon_api::{Bytes, Category, StreamId, Uuid};

    fn job(bytes: usize) -> Indexing {
        let category = Category::new("c").unwrap();
        let room = Arc::new(Room::default());
        room.bytes.fetch_add(bytes, Ordering::Relaxed);
        Indexing {
            commit: Commit {
                stream: StreamId::new(&category, "s").unwrap(),
                first: 0,
                time_id: Uuid::nil(),
                events: Bytes::from(vec![0; bytes]),
            },
            count: 1,
            _held: Held { room, bytes },
        }
    }

    /// Appends wait for room while the queue holds its bound, and go on once enough is let
    /// go, whichever way an entry ends.
    #[tokio::test]
    async fn appends_wait_for_room_until_queued_bytes_are_let_go() {
        let room = Arc::new(Room::default());
        let held = |bytes: usize| {
            room.bytes.fetch_add(bytes, Ordering::Relaxed);
            Held {
                room: room.clone(),
                bytes,
            }
        };
        let full = held(INDEX_QUEUE_BYTES);
        let small = held(10);
        let waiter = {
            let room = room.clone();
            tokio::spawn(async move { room.below(INDEX_QUEUE_BYTES).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "waits while the queue is full");
        drop(small);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "still full");
        drop(full);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("goes on once room is let go")
            .unwrap();
        assert_eq!(room.bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn few_rows_go_in_one_batch_and_many_in_one_per_partition() {
        let few = batches(vec![(vec![0, 1], vec![1, 2]), (vec![1], vec![3])]);
        assert_eq!(few, vec![(vec![0, 1], vec![1, 2, 3])]);
        let many = batches(vec![
            (vec![0], vec![0; SMALL_BATCH_ROWS]),
            (vec![1], vec![1]),
        ]);
        assert_eq!(
            many,
            vec![(vec![0], vec![0; SMALL_BATCH_ROWS]), (vec![1], vec![1])]
        );
    }

    #[test]
    fn a_group_is_bounded_by_commits_and_bytes_and_takes_at_least_one() {
        let mut waiting: Vec<_> = (0..300).map(|_| job(10)).collect();
        assert_eq!(take_group(&mut waiting).len(), GROUP_COMMITS);
        assert_eq!(waiting.len(), 300 - GROUP_COMMITS);

        let mut waiting: Vec<_> = (0..5).map(|_| job(GROUP_BYTES / 2)).collect();
        assert_eq!(take_group(&mut waiting).len(), 2);

        let mut waiting = vec![job(GROUP_BYTES * 2), job(1)];
        assert_eq!(
            take_group(&mut waiting).len(),
            1,
            "a large commit goes alone"
        );
        assert_eq!(take_group(&mut waiting).len(), 1);
        assert!(waiting.is_empty());
    }
}
