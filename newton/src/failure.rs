//! What a view does with an event its handler refuses: stop (the default), retry with backoff,
//! skip it, or park it in a dead-letter stream in the event store and go on.
//!
//! This module owns the policy ([`FailurePolicy`]), the dead-letter record ([`DeadLetter`]) and
//! where it is kept ([`dead_letter_stream`], [`dead_letter_id`]); the runner in `view.rs` applies
//! them. It must not touch checkpoints: a skipped or parked event is saved past by the runner
//! exactly like a handled one, after the skip is counted or the record is stored.

use std::time::Duration;

use photon_api::{
    Category, Checkpoint, Error, EventStore, EventStoreExt, ReadOptions, RecordedEvent, StreamId,
    Uuid, Version,
};
use serde::{Deserialize, Serialize};

/// The category of dead-letter streams, one stream per view: `newton_deadletter-<view name>`.
///
/// Outside every aggregate's category, so views of the aggregates never see parked records;
/// `newton_` marks it as newton's, like [`crate::CHECKPOINT_CATEGORY`].
pub const DEAD_LETTER_CATEGORY: &str = "newton_deadletter";

/// The event type of a dead-letter record, so tools tell them apart without newton.
pub const DEAD_LETTER_EVENT_TYPE: &str = "ViewEventParked";

/// The longest error text a dead-letter record keeps, in bytes: an error that prints a whole
/// payload must not make the record too large for the store (and so unparkable).
pub const MAX_DEAD_LETTER_ERROR_LEN: usize = 4096;

/// What a view does with an event its handler refused, after any retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnFailure {
    /// Stop the view ([`crate::ViewStatus::Failed`]) without saving past the event, so a fixed
    /// handler meets it again after a restart. The default: nothing is lost without a decision.
    #[default]
    Stop,
    /// Log the event, count it ([`crate::ViewHandle::skipped`]) and go on: for views where one
    /// missing event is better than a stopped view, and nobody needs to look at it again.
    Skip,
    /// Append a [`DeadLetter`] record to the view's dead-letter stream
    /// ([`dead_letter_stream`]), count it ([`crate::ViewHandle::parked`]) and go on: the event
    /// can be looked at, and replayed by hand, later.
    Park,
}

/// Retries of a refused event before the policy's [`OnFailure`] step: for failures that pass
/// (a database the handler writes to restarting), not for events that can never be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// How many times the handler is called again after its first failure.
    pub retries: u32,
    /// The wait before the first retry; each next wait doubles, up to `max_delay`.
    pub first_delay: Duration,
    /// The longest wait between two attempts.
    pub max_delay: Duration,
}

impl Retry {
    /// The wait before retry `n` (1-based): `first_delay * 2^(n-1)`, at most `max_delay`.
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.first_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }
}

/// A view's answer to an event its handler refuses: optional retries with backoff, then stop,
/// skip or park. Returned by [`crate::View::failure_policy`]; the default stops the view, as
/// views did before policies existed.
///
/// A decode or upcast failure ([`crate::ViewError::Decode`]: the stored bytes do not read as
/// the event type, or its schema version is unknown) goes to the [`OnFailure`] step without
/// retries: the stored event never changes, so retrying cannot help and only delays the view.
///
/// While a handler is retried, the view handles nothing else (its lag grows); a
/// [`crate::ViewHandle::stop`], a rebuild or dropping every handle ends the wait at once, saving
/// only up to the event before, so the event is tried again after a restart.
///
/// ```
/// use std::time::Duration;
/// use newton::{FailurePolicy, OnFailure};
///
/// // Three retries 100 ms, 200 ms, 400 ms apart, then park the event and go on.
/// let policy = FailurePolicy::park().with_retries(3, Duration::from_millis(100));
/// assert_eq!(policy.then, OnFailure::Park);
/// assert_eq!(policy.retry.unwrap().delay(3), Duration::from_millis(400));
/// assert_eq!(FailurePolicy::default(), FailurePolicy::stop());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FailurePolicy {
    /// Retries first, if any.
    pub retry: Option<Retry>,
    /// What happens once the retries are used up (or at once without retries).
    pub then: OnFailure,
}

impl FailurePolicy {
    /// The wait between retries that [`Self::with_retries`] does not exceed unless
    /// [`Self::with_max_delay`] says otherwise.
    pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(10);

    /// Stop the view at the first refusal: the default.
    pub fn stop() -> Self {
        Self::without_retries(OnFailure::Stop)
    }

    /// Skip a refused event (logged and counted).
    pub fn skip() -> Self {
        Self::without_retries(OnFailure::Skip)
    }

    /// Park a refused event in the view's dead-letter stream and go on.
    pub fn park() -> Self {
        Self::without_retries(OnFailure::Park)
    }

    fn without_retries(then: OnFailure) -> Self {
        Self { retry: None, then }
    }

    /// Calls the handler again up to `retries` times, waiting `first_delay`, then twice as long
    /// each time (up to [`Self::DEFAULT_MAX_DELAY`]), before the policy's [`OnFailure`] step.
    pub fn with_retries(mut self, retries: u32, first_delay: Duration) -> Self {
        let max_delay = self.retry.map_or(Self::DEFAULT_MAX_DELAY, |r| r.max_delay);
        self.retry = Some(Retry {
            retries,
            first_delay,
            max_delay,
        });
        self
    }

    /// Caps the wait between retries (no effect without [`Self::with_retries`]).
    pub fn with_max_delay(mut self, max_delay: Duration) -> Self {
        if let Some(retry) = &mut self.retry {
            retry.max_delay = max_delay;
        }
        self
    }
}

/// What a view parks for an event it could not handle: enough to find the event again
/// (stream, version, event id), to resume a subscription right after it (checkpoint), and to
/// see why (error). Stored as JSON, so tools and other languages read it without newton.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The view that refused the event.
    pub view: String,
    /// The event's aggregate stream.
    pub stream: StreamId,
    /// The event's version in that stream.
    pub version: Version,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// The event's stored schema version.
    pub schema_version: u32,
    /// The event's checkpoint in the view's category subscription.
    pub checkpoint: Checkpoint,
    /// The last error, as text (at most [`MAX_DEAD_LETTER_ERROR_LEN`] bytes).
    pub error: String,
    /// How many times the handler was called on the event.
    pub attempts: u32,
}

impl DeadLetter {
    /// The record of `event` refused by `view` with `error` after `attempts` calls.
    pub fn new(view: &str, event: &RecordedEvent, error: &str, attempts: u32) -> Self {
        let mut end = error.len().min(MAX_DEAD_LETTER_ERROR_LEN);
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            view: view.to_owned(),
            stream: event.stream.clone(),
            version: event.version,
            event_id: event.event_id,
            event_type: event.event_type.as_str().to_owned(),
            schema_version: event.schema_version,
            checkpoint: event.checkpoint.clone(),
            error: error[..end].to_owned(),
            attempts,
        }
    }
}

/// The stream `view`'s parked events go to: `newton_deadletter-<view>`.
///
/// # Errors
/// - [`Error::InvalidInput`] when `view` is not usable as a stream id (the runner refuses such
///   a view at start when its policy parks).
pub fn dead_letter_stream(view: &str) -> Result<StreamId, Error> {
    StreamId::new(
        &Category::new(DEAD_LETTER_CATEGORY).expect("a valid category"),
        view,
    )
}

/// The id of the dead-letter record of event `event_id` parked by `view`: a UUID v5 of both, so
/// a view that parks the same event again (a crash before its checkpoint save, a restart from an
/// older checkpoint, a rebuild) re-sends the same id and the store keeps one record.
pub fn dead_letter_id(view: &str, event_id: Uuid) -> Uuid {
    Uuid::new_v5(&event_id, format!("newton/deadletter/{view}").as_bytes())
}

/// Every record `view` parked, oldest first; none when it never parked.
///
/// # Errors
/// - The store's error for the read; [`Error::Decode`] for a record that does not decode.
pub async fn dead_letters(store: &dyn EventStore, view: &str) -> Result<Vec<DeadLetter>, Error> {
    let stream = dead_letter_stream(view)?;
    store
        .read_to_vec(&stream, ReadOptions::forwards())
        .await?
        .iter()
        .map(RecordedEvent::decode)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let retry = FailurePolicy::skip()
            .with_retries(10, Duration::from_millis(10))
            .with_max_delay(Duration::from_millis(50))
            .retry
            .unwrap();
        let delays: Vec<u128> = (1..=5).map(|n| retry.delay(n).as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 50, 50]);
        assert_eq!(retry.delay(200), Duration::from_millis(50));
    }

    #[test]
    fn the_record_id_depends_on_the_view_and_the_event_only() {
        let event = Uuid::new_v4();
        assert_eq!(dead_letter_id("a-v1", event), dead_letter_id("a-v1", event));
        assert_ne!(dead_letter_id("a-v1", event), dead_letter_id("a-v2", event));
        assert_ne!(
            dead_letter_id("a-v1", event),
            dead_letter_id("a-v1", Uuid::new_v4())
        );
    }
}
