//! Where views keep their position (and their state) between runs.
//!
//! A saved view is one record: the checkpoint of every category it reads plus its encoded state,
//! written together after the events were handled, so a restart never resumes past an event whose
//! effect was lost. Saves carry the revision they expect, which fences off a second runner of the
//! same view: only one can save.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use photon_api::{
    Category, Checkpoint, Error, EventData, EventStore, ExpectedVersion, ReadOptions, StreamId,
    Uuid, Version,
};
use serde::{Deserialize, Serialize};

/// What a view saved: where it is in each category, and its state as of there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SavedView {
    /// The checkpoint of the last handled event, per category name.
    pub positions: BTreeMap<String, Checkpoint>,
    /// The view's state, MessagePack-encoded by the runner.
    pub state: Bytes,
}

/// A saved view and the revision to pass to the next save.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// What was saved.
    pub saved: SavedView,
    /// Its revision.
    pub revision: u64,
    /// The id of the save that wrote it.
    pub save_id: Uuid,
}

/// Persists view checkpoints.
#[async_trait]
pub trait CheckpointStore: Send + Sync + fmt::Debug + 'static {
    /// The last save of `view`, if any.
    ///
    /// # Errors
    /// - [`Error::Unavailable`] when the storage does not answer; [`Error::Decode`] for a save
    ///   that does not decode.
    async fn load(&self, view: &str) -> Result<Option<Loaded>, Error>;

    /// Saves `saved` if the last save has revision `expected` (None: never saved); returns the
    /// new revision. `save_id` names this save across retries: re-sending a save that landed
    /// (after a timeout) succeeds with the same revision instead of looking like a rival runner.
    ///
    /// # Errors
    /// - [`Error::WrongExpectedVersion`] when another runner of the same view saved in between.
    /// - [`Error::Unavailable`] when the storage does not answer (retry with the same `save_id`).
    async fn save(
        &self,
        view: &str,
        saved: &SavedView,
        expected: Option<u64>,
        save_id: Uuid,
    ) -> Result<u64, Error>;
}

/// Checkpoints in process memory: for tests, and for views that rebuild at every start anyway.
#[derive(Debug, Default, Clone)]
pub struct InMemoryCheckpointStore {
    saves: Arc<Mutex<HashMap<String, Loaded>>>,
}

impl InMemoryCheckpointStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl CheckpointStore for InMemoryCheckpointStore {
    async fn load(&self, view: &str) -> Result<Option<Loaded>, Error> {
        Ok(self.saves.lock().expect("not poisoned").get(view).cloned())
    }

    async fn save(
        &self,
        view: &str,
        saved: &SavedView,
        expected: Option<u64>,
        save_id: Uuid,
    ) -> Result<u64, Error> {
        let mut saves = self.saves.lock().expect("not poisoned");
        if let Some(last) = saves.get(view).filter(|l| l.save_id == save_id) {
            return Ok(last.revision); // a retry of the save that landed
        }
        let current = saves.get(view).map(|l| l.revision);
        if current != expected {
            return Err(Error::WrongExpectedVersion {
                stream: checkpoint_stream(view)?,
                expected: expected_revision(expected),
                actual: current.map(Version),
            });
        }
        let revision = current.map_or(0, |r| r + 1);
        saves.insert(
            view.to_owned(),
            Loaded {
                saved: saved.clone(),
                revision,
                save_id,
            },
        );
        Ok(revision)
    }
}

/// The category of the streams that [`EventStoreCheckpointStore`] writes.
pub const CHECKPOINT_CATEGORY: &str = "newton_view";

fn checkpoint_stream(view: &str) -> Result<StreamId, Error> {
    StreamId::new(
        &Category::new(CHECKPOINT_CATEGORY).expect("valid category"),
        view,
    )
}

/// A revision expectation as the event store's: revision r is version r of the checkpoint stream.
fn expected_revision(expected: Option<u64>) -> ExpectedVersion {
    expected.map_or(ExpectedVersion::NoStream, |r| {
        ExpectedVersion::Exact(Version(r))
    })
}

/// Checkpoints kept in the event store itself, so views resume on every backend with nothing
/// else to run: each save is one event in stream `newton_view-<view name>`, the revision is its
/// version, and loading reads the last event only.
///
/// Each save is limited by the store's event size limit (1 MiB by default); views with large
/// state should keep it in their own database and save only positions (state `()`). Every save is
/// a new event (the store has no delete), so the stream grows by one event per save: the runner
/// saves at most every `RunnerOptions::save_interval` while events arrive and never while idle.
#[derive(Debug, Clone)]
pub struct EventStoreCheckpointStore {
    store: Arc<dyn EventStore>,
}

impl EventStoreCheckpointStore {
    /// Checkpoints in `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self { store }
    }
}

const SAVED_TYPE: &str = "ViewSaved";

#[async_trait]
impl CheckpointStore for EventStoreCheckpointStore {
    async fn load(&self, view: &str) -> Result<Option<Loaded>, Error> {
        let stream = checkpoint_stream(view)?;
        let last = self
            .store
            .read_stream(&stream, ReadOptions::backwards().limit(1))
            .try_next()
            .await?;
        match last {
            None => Ok(None),
            Some(e) => Ok(Some(Loaded {
                saved: e.decode()?,
                revision: e.version.0,
                save_id: e.event_id,
            })),
        }
    }

    async fn save(
        &self,
        view: &str,
        saved: &SavedView,
        expected: Option<u64>,
        save_id: Uuid,
    ) -> Result<u64, Error> {
        let stream = checkpoint_stream(view)?;
        // The save id is the event id, so the store's idempotency makes a re-sent save a no-op.
        let event = EventData::msgpack(SAVED_TYPE, saved)?.with_id(save_id);
        let result = self
            .store
            .append(&stream, expected_revision(expected), vec![event])
            .await?;
        Ok(result.last_version.0)
    }
}
