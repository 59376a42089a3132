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
    Category, Checkpoint, Error, EventStore, ExpectedVersion, ReadOptions, StreamId, Uuid, Version,
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

/// The prefix of the registers [`EventStoreCheckpointStore`] writes (`newton_view-<view name>`),
/// and the category of the streams earlier releases wrote them to, still read once to carry a
/// view's last save over. Reserved: no aggregate may use it.
pub const CHECKPOINT_CATEGORY: &str = "newton_view";

fn checkpoint_stream(view: &str) -> Result<StreamId, Error> {
    StreamId::new(
        &Category::new(CHECKPOINT_CATEGORY).expect("valid category"),
        view,
    )
}

/// A revision expectation in the words of `WrongExpectedVersion`, which views are fenced by.
fn expected_revision(expected: Option<u64>) -> ExpectedVersion {
    expected.map_or(ExpectedVersion::NoStream, |r| {
        ExpectedVersion::Exact(Version(r))
    })
}

/// Checkpoints kept in the event store itself, so views resume on every backend with nothing
/// else to run: each view's save is the store's register `newton_view-<view name>`
/// ([`EventStore::save_register`]), which keeps only the latest save. However often a view saves,
/// its checkpoint takes the space of one save, and no subscriber of the all stream reads it.
///
/// A view saved by an earlier release, as events in stream `newton_view-<view name>`, is carried
/// over on its first load: the stream's last save becomes the register's first (with that event's
/// id, so two runners doing it at once agree), and the stream is no longer written or read.
///
/// A save's encoded size is limited by [`photon_api::MAX_REGISTER_VALUE`] (about 1 MB); views
/// with a larger state should keep it in their own database and save only positions (state
/// `()`).
#[derive(Debug, Clone)]
pub struct EventStoreCheckpointStore {
    store: Arc<dyn EventStore>,
}

impl EventStoreCheckpointStore {
    /// Checkpoints in `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self { store }
    }

    /// The last save an earlier release appended to the view's stream, if any.
    async fn legacy(&self, view: &str) -> Result<Option<(SavedView, Uuid)>, Error> {
        let stream = checkpoint_stream(view)?;
        let last = self
            .store
            .read_stream(&stream, ReadOptions::backwards().limit(1))
            .try_next()
            .await?;
        last.map(|e| Ok((e.decode()?, e.event_id))).transpose()
    }
}

/// The register that holds `view`'s saves: the name its event stream had, so an operator finds it
/// under the same name.
fn register_name(view: &str) -> Result<String, Error> {
    Ok(checkpoint_stream(view)?.to_string())
}

/// The type name a save is decoded as in errors (and was stored under as an event).
const SAVED_TYPE: &str = "ViewSaved";

#[async_trait]
impl CheckpointStore for EventStoreCheckpointStore {
    async fn load(&self, view: &str) -> Result<Option<Loaded>, Error> {
        let name = register_name(view)?;
        if let Some(register) = self.store.load_register(&name).await? {
            let stream = checkpoint_stream(view)?;
            let saved = rmp_serde::from_slice(&register.value).map_err(|e| Error::Decode {
                stream,
                version: Version(register.revision),
                event_type: SAVED_TYPE.to_owned(),
                content_type: "application/msgpack".to_owned(),
                reason: e.to_string(),
            })?;
            return Ok(Some(Loaded {
                saved,
                revision: register.revision,
                save_id: register.save_id,
            }));
        }
        let Some((saved, id)) = self.legacy(view).await? else {
            return Ok(None);
        };
        // Carried over as the register's first save; a rival doing the same at once sends the
        // same save, which the store answers as a re-send.
        let revision = self.save(view, &saved, None, id).await?;
        Ok(Some(Loaded {
            saved,
            revision,
            save_id: id,
        }))
    }

    async fn save(
        &self,
        view: &str,
        saved: &SavedView,
        expected: Option<u64>,
        save_id: Uuid,
    ) -> Result<u64, Error> {
        let name = register_name(view)?;
        let value = rmp_serde::to_vec_named(saved).map_err(|e| Error::Encode {
            content_type: "application/msgpack".to_owned(),
            source: e.into(),
        })?;
        match self
            .store
            .save_register(&name, expected, save_id, value.into())
            .await
        {
            // The view runner tells a rival runner by the error every checkpoint store gives.
            Err(Error::RevisionConflict { actual, .. }) => Err(Error::WrongExpectedVersion {
                stream: checkpoint_stream(view)?,
                expected: expected_revision(expected),
                actual: actual.map(Version),
            }),
            other => other,
        }
    }
}
