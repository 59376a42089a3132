//! Typed views: a view over one aggregate's category whose handler gets the aggregate's events
//! decoded and upcast, in an [`Envelope`] with the stored event's stream, version, id, times and
//! metadata.
//!
//! This module owns the [`AggregateView`] trait and [`TypedView`], the adapter that makes one a
//! raw [`View`], so typed views run on the same [`ViewRunner`] with the same checkpoints, state
//! saving, rebuilds and failure policy. It must not decode any other way than through
//! [`Decoder`]: the repository, the test kit and typed views read old events alike.

// `ViewError` carries the store's error unboxed so callers can match on it.
#![allow(clippy::result_large_err)]

use std::fmt;

use async_trait::async_trait;
use photon_api::{
    BoxError, Category, Checkpoint, Error, Metadata, RecordedEvent, StreamId, Timestamp, Uuid,
    Version,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::aggregate::Aggregate;
use crate::failure::FailurePolicy;
use crate::upcast::Decoder;
use crate::view::{View, ViewError, ViewHandle, ViewRunner};

/// One decoded event of an aggregate and where it was stored.
///
/// Borrows the stored event rather than copying its stream name and metadata, so handing it to
/// a view costs nothing beyond the decode.
pub struct Envelope<'a, E> {
    /// The event, in the shape the code has now (upcast when it was stored at an older schema
    /// version).
    pub event: E,
    recorded: &'a RecordedEvent,
}

impl<'a, E> Envelope<'a, E> {
    /// `event`, decoded from `recorded`; for tests of a view's `handle` without a runner.
    pub fn new(event: E, recorded: &'a RecordedEvent) -> Self {
        Self { event, recorded }
    }

    /// The aggregate stream, e.g. `account-42`.
    pub fn stream(&self) -> &'a StreamId {
        &self.recorded.stream
    }

    /// The aggregate's id, e.g. `42` of `account-42`: the usual key of a view's rows.
    pub fn id(&self) -> &'a str {
        self.recorded.stream.id()
    }

    /// The stored event's version in its stream, for views idempotent by version. Events an
    /// upcaster split one stored event into share it.
    pub fn version(&self) -> Version {
        self.recorded.version
    }

    /// The stored event's id, for views idempotent by event id (shared by split events too).
    pub fn event_id(&self) -> Uuid {
        self.recorded.event_id
    }

    /// When the store accepted the event.
    pub fn recorded_at(&self) -> Timestamp {
        self.recorded.recorded_at
    }

    /// When the event happened, as its writer said.
    pub fn occurred_at(&self) -> Timestamp {
        self.recorded.occurred_at
    }

    /// Causation, correlation and headers.
    pub fn metadata(&self) -> &'a Metadata {
        &self.recorded.metadata
    }

    /// Where a subscription resumes right after this event.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        &self.recorded.checkpoint
    }

    /// The stored event itself (raw payload, type name, schema version), for what the envelope
    /// does not say.
    pub fn recorded(&self) -> &'a RecordedEvent {
        self.recorded
    }
}

impl<E: fmt::Debug> fmt::Debug for Envelope<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("event", &self.event)
            .field("stream", &self.recorded.stream)
            .field("version", &self.recorded.version)
            .field("event_id", &self.recorded.event_id)
            .finish_non_exhaustive()
    }
}

/// A read model built from the events of one aggregate type, decoded and upcast for it: the
/// pleasant way to write a view of one category. Start it with [`ViewRunner::start_typed`].
///
/// Everything [`View`] says holds: the runner owns `State` and saves it with the checkpoint
/// after handling, delivery is at-least-once for effects outside the state, and
/// [`Self::failure_policy`] says what a refused event does. A stored event that does not decode
/// (or whose schema version the code does not know) never reaches `handle`: it is a
/// [`ViewError::Decode`] that goes through the failure policy (without retries). For views of
/// several categories, or of events without a Rust type, implement [`View`] instead.
#[async_trait]
pub trait AggregateView: Send + Sync + 'static {
    /// The aggregate whose category the view reads and whose events it decodes.
    type Aggregate: Aggregate;

    /// The state the view builds.
    type State: Default + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Unique name including its version, as [`View::name`].
    fn name(&self) -> &str;

    /// What a refused event does; stopping the view by default.
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::default()
    }

    /// Applies one event to the state, as [`View::handle`]. A stored event that an upcaster split
    /// into several is handed over as several envelopes, in order, sharing one version; a retry
    /// or a redelivery hands all of them again.
    ///
    /// # Errors
    /// - Any error is a refusal, handled by [`Self::failure_policy`]. Change the state only once
    ///   nothing can fail any more: a skipped or parked event keeps what it changed.
    async fn handle(
        &self,
        state: &mut Self::State,
        event: &Envelope<'_, <Self::Aggregate as Aggregate>::Event>,
    ) -> Result<(), BoxError>;
}

/// An [`AggregateView`] as a [`View`]: reads the aggregate's category and decodes each stored
/// event through the event type's upcasters before the view sees it. What
/// [`ViewRunner::start_typed`] runs; a handle's [`ViewHandle::read`] sees the view's own state.
pub struct TypedView<V: AggregateView> {
    view: V,
    category: Category,
    decoder: Decoder<<V::Aggregate as Aggregate>::Event>,
}

impl<V: AggregateView> fmt::Debug for TypedView<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedView")
            .field("name", &self.view.name())
            .field("category", &self.category)
            .field("decoder", &self.decoder)
            .finish()
    }
}

impl<V: AggregateView> TypedView<V> {
    /// Wraps `view`, checking its event type's upcaster chains and its category name once.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] when the aggregate's category is not a valid category name, or
    ///   an upcaster chain of its event type does not step from version 1 without gaps.
    pub fn new(view: V) -> Result<Self, Error> {
        Ok(Self {
            category: Category::new(<V::Aggregate as Aggregate>::CATEGORY)?,
            decoder: Decoder::new()?,
            view,
        })
    }

    /// The wrapped view.
    pub fn inner(&self) -> &V {
        &self.view
    }
}

#[async_trait]
impl<V: AggregateView> View for TypedView<V> {
    type State = V::State;

    fn name(&self) -> &str {
        self.view.name()
    }

    fn categories(&self) -> Vec<Category> {
        vec![self.category.clone()]
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.view.failure_policy()
    }

    async fn handle(&self, state: &mut Self::State, event: &RecordedEvent) -> Result<(), BoxError> {
        // Decoded entirely before the first call, so a decode failure hands the view nothing.
        for decoded in self.decoder.decode(event)? {
            self.view
                .handle(state, &Envelope::new(decoded, event))
                .await?;
        }
        Ok(())
    }
}

impl ViewRunner {
    /// Starts a typed view: as [`Self::start`] for `TypedView::new(view)`.
    ///
    /// # Errors
    /// - [`ViewError::Store`] with [`Error::InvalidInput`] for a bad category, a broken upcaster
    ///   chain, or a name [`Self::start`] refuses.
    pub fn start_typed<V: AggregateView>(
        &self,
        view: V,
    ) -> Result<ViewHandle<TypedView<V>>, ViewError> {
        let name = view.name().to_owned();
        let typed =
            TypedView::new(view).map_err(|source| ViewError::Store { view: name, source })?;
        self.start(typed)
    }
}
