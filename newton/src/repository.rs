//! Loading aggregates by replay and executing commands against them with optimistic concurrency.
//!
//! The repository writes the aggregate stream only, once per command; the store maintains the
//! category stream that views read. The expected version is checked by the store at append time,
//! never only on the client.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use photon_api::{
    Category, Error, EventData, EventStore, EventType, ExpectedVersion, Payload, ReadOptions,
    StreamId, Uuid, Version,
};

use crate::aggregate::{Aggregate, DomainEvent};

/// How many times `execute` retries after a concurrent writer won (reload and decide again) or
/// the store was unavailable (re-send the same events), and how long it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included. At least 1.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub initial_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(2),
        }
    }
}

/// Correlation, causation and headers stamped on every event a command records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandContext {
    /// Shared by every event of one business conversation (a transfer touches two accounts).
    pub correlation_id: Option<Uuid>,
    /// The command or event that caused this command.
    pub causation_id: Option<Uuid>,
    /// Free headers, e.g. the user who asked.
    pub headers: Vec<(String, String)>,
}

/// An aggregate's state as of a version.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The state after every stored event.
    pub state: A,
    /// The last stored version; None when the aggregate has no events.
    pub version: Option<Version>,
}

/// What an executed command did.
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    /// The state after the new events.
    pub state: A,
    /// The events recorded (empty when the command changed nothing).
    pub events: Vec<A::Event>,
    /// The stream's version after the command.
    pub version: Option<Version>,
    /// How many attempts it took (more than 1 after conflicts).
    pub attempts: u32,
}

/// Why `execute` failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error + 'static> {
    /// The aggregate refused the command. Nothing was stored.
    #[error("command refused by {stream}: {source}")]
    Rejected {
        /// The aggregate's stream.
        stream: StreamId,
        /// The aggregate's reason.
        #[source]
        source: E,
    },
    /// Other writers kept winning; nothing of this command was stored.
    #[error("{stream}: gave up after {attempts} attempts lost to concurrent writers")]
    TooManyConflicts {
        /// The aggregate's stream.
        stream: StreamId,
        /// Attempts made.
        attempts: u32,
    },
    /// The store failed (unavailable, undecodable history, ...).
    #[error(transparent)]
    Store(#[from] Error),
}

/// Loads and changes aggregates of type `A` in one event store.
pub struct Repository<A> {
    store: Arc<dyn EventStore>,
    category: Category,
    retry: RetryPolicy,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            category: self.category.clone(),
            retry: self.retry,
            _aggregate: PhantomData,
        }
    }
}

impl<A> fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("category", &self.category)
            .field("retry", &self.retry)
            .field("store", &self.store.backend())
            .finish()
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository for `A` on `store`.
    ///
    /// # Panics
    /// - When `A::CATEGORY` is not a valid category name: that is a bug in the aggregate's code,
    ///   found the first time it runs.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        let category = Category::new(A::CATEGORY).unwrap_or_else(|e| {
            panic!("Aggregate::CATEGORY of {}: {e}", std::any::type_name::<A>())
        });
        Self {
            store,
            category,
            retry: RetryPolicy::default(),
            _aggregate: PhantomData,
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The stream of instance `id`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] when `id` is not a valid stream id.
    pub fn stream_of(&self, id: &str) -> Result<StreamId, Error> {
        StreamId::new(&self.category, id)
    }

    /// Rebuilds instance `id` by replaying its stream.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a bad id; [`Error::Decode`] for an event that does not
    ///   decode as `A::Event`; [`Error::Unavailable`] when the store fails.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, Error> {
        let stream = self.stream_of(id)?;
        self.load_stream(&stream).await
    }

    async fn load_stream(&self, stream: &StreamId) -> Result<Loaded<A>, Error> {
        let mut state = A::default();
        let mut version = None;
        let mut events = self.store.read_stream(stream, ReadOptions::forwards());
        while let Some(recorded) = events.try_next().await? {
            let event: A::Event = recorded.decode()?;
            state.apply(&event);
            version = Some(recorded.version);
        }
        Ok(Loaded { state, version })
    }

    /// Loads instance `id`, lets it handle `command`, and appends the resulting events with the
    /// loaded version as expectation; on a conflict, reloads and decides again, as the policy
    /// allows.
    ///
    /// # Errors
    /// - [`ExecuteError::Rejected`] when the aggregate refuses.
    /// - [`ExecuteError::TooManyConflicts`] when concurrent writers won every attempt.
    /// - [`ExecuteError::Store`] for store failures, including [`Error::Unavailable`] once the
    ///   re-sends are used up (the events may then have landed; re-sending the same command
    ///   decides again on the state it finds).
    pub async fn execute(
        &self,
        id: &str,
        command: &A::Command,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        self.execute_with(id, command, &CommandContext::default())
            .await
    }

    /// As [`Self::execute`], stamping `context` on every recorded event.
    ///
    /// # Errors
    /// - As [`Self::execute`].
    pub async fn execute_with(
        &self,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        let stream = self.stream_of(id)?;
        let max_attempts = self.retry.max_attempts.max(1);
        let mut backoff = self.retry.initial_backoff;
        for attempt in 1..=max_attempts {
            let Loaded { mut state, version } = self.load_stream(&stream).await?;
            let events = state
                .handle(command)
                .map_err(|source| ExecuteError::Rejected {
                    stream: stream.clone(),
                    source,
                })?;
            if events.is_empty() {
                return Ok(Executed {
                    state,
                    events,
                    version,
                    attempts: attempt,
                });
            }
            let data = events
                .iter()
                .map(|e| encode(e, context))
                .collect::<Result<Vec<_>, _>>()?;
            let expected = ExpectedVersion::from_current(version);
            let mut outcome = self.store.append(&stream, expected, data.clone()).await;
            // A timeout says nothing about whether the batch landed: re-send the very same
            // events (same ids), which the store's idempotency turns into a no-op if it did.
            let mut resends = 1;
            while matches!(&outcome, Err(e) if e.is_retryable()) && resends < max_attempts {
                tracing::debug!(%stream, resends, "store unavailable; re-sending the same events");
                tokio::time::sleep(self.retry.initial_backoff * resends).await;
                resends += 1;
                outcome = self.store.append(&stream, expected, data.clone()).await;
            }
            match outcome {
                Ok(result) => {
                    for e in &events {
                        state.apply(e);
                    }
                    return Ok(Executed {
                        state,
                        events,
                        version: Some(result.last_version),
                        attempts: attempt,
                    });
                }
                Err(Error::WrongExpectedVersion { .. }) if attempt < max_attempts => {
                    tracing::debug!(%stream, attempt, "concurrent write; reloading");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(Error::WrongExpectedVersion { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ExecuteError::TooManyConflicts {
            stream,
            attempts: max_attempts,
        })
    }
}

/// Encodes a domain event as the store's [`EventData`].
///
/// # Errors
/// - [`Error::Encode`] when serde refuses the event; [`Error::InvalidInput`] for a bad type name.
pub fn encode<E: DomainEvent>(event: &E, context: &CommandContext) -> Result<EventData, Error> {
    let mut data = EventData::new(
        EventType::new(event.event_type())?,
        Payload::msgpack(event)?,
    )
    .with_schema_version(event.schema_version());
    data.metadata.correlation_id = context.correlation_id;
    data.metadata.causation_id = context.causation_id;
    for (k, v) in &context.headers {
        data.metadata.headers.insert(k.clone(), v.clone());
    }
    Ok(data)
}
