#![doc = include_str!("../README.md")]

mod config;
mod document;
mod subscription;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{Acknowledgment, ClientOptions, IndexOptions, ReadConcern, WriteConcern};
use mongodb::{Client, Collection, IndexModel};
use photon_api::validate::{classify_batch, validate_batch, BatchKind, StoredId};
use photon_api::{
    error_stream, AppendResult, Capabilities, Category, Direction, Error, EventData, EventStore,
    ExpectedVersion, Health, ReadOptions, RecordedEvent, Selector, Start, StreamId,
    SubscriptionItem, SubscriptionMode, Timestamp, Uuid, Version,
};
use tokio::sync::OnceCell;

pub use config::MongoConfig;

/// The URL scheme of this backend (`mongodb+srv://` works too).
pub const SCHEME: &str = "mongodb";

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "mongo";

/// The largest batch (sum of event sizes) one append accepts: a commit is one document, and
/// MongoDB refuses documents over 16 MiB; the rest is room for field names and ids.
pub const MAX_APPEND_SIZE: usize = 12 * 1024 * 1024;

/// MongoDB's document size limit, checked on the encoded commit before it is sent.
const MAX_DOCUMENT_SIZE: usize = 16 * 1024 * 1024 - 16 * 1024;

/// How many times an append retries after losing a race (another commit took its version or a
/// reader gave its position up) before it reports the stream as too contended.
const APPEND_ATTEMPTS: usize = 200;

/// The event store on MongoDB. Clones share one connection pool.
#[derive(Clone)]
pub struct MongoStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    commits: Collection<Document>,
    config: MongoConfig,
    ready: OnceCell<()>,
}

impl fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

/// A driver error as ours: network and server-selection failures are `Unavailable`.
pub(crate) fn map_error(context: &str, e: mongodb::error::Error) -> Error {
    match *e.kind {
        ErrorKind::ServerSelection { .. }
        | ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => Error::Unavailable {
            backend: BACKEND,
            message: format!("{context}: {e}"),
            source: Some(Box::new(e)),
        },
        _ => Error::Backend {
            backend: BACKEND,
            source: format!("{context}: {e}").into(),
        },
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

impl MongoStore {
    /// Connects lazily to the server of a `mongodb://` URL (see [`MongoConfig::from_url`]); the
    /// first operation creates the collections and indexes when allowed.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a URL the driver or we refuse.
    pub async fn from_url(url: &str) -> Result<Self, Error> {
        Self::connect(MongoConfig::from_url(url)?).await
    }

    /// Connects with `config`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for a connection string the driver refuses.
    pub async fn connect(config: MongoConfig) -> Result<Self, Error> {
        let mut options = ClientOptions::parse(&config.driver_url)
            .await
            .map_err(|e| Error::InvalidInput {
                what: format!(
                    "MongoDB URL {:?}",
                    photon_api::url::redact(&config.driver_url)
                ),
                reason: e.to_string(),
            })?;
        options.server_selection_timeout = Some(config.timeout);
        options.connect_timeout = Some(config.timeout);
        options.app_name.get_or_insert_with(|| "photon".into());
        // Acknowledged only once a majority has it in its journal: the strongest ordinary setting.
        options.write_concern = Some(
            WriteConcern::builder()
                .w(Acknowledgment::Majority)
                .journal(true)
                .build(),
        );
        // Readers see only majority-committed commits, which a failover cannot roll back.
        options.read_concern = Some(ReadConcern::majority());
        let client = Client::with_options(options).map_err(|e| map_error("client", e))?;
        let db = client.database(&config.database);
        Ok(Self {
            inner: Arc::new(Inner {
                commits: db.collection(&config.commits()),
                client,
                config,
                ready: OnceCell::new(),
            }),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &MongoConfig {
        &self.inner.config
    }

    pub(crate) fn commits(&self) -> &Collection<Document> {
        &self.inner.commits
    }

    /// Creates (or checks) the indexes the guarantees rest on, once per store.
    pub(crate) async fn ready(&self) -> Result<(), Error> {
        self.inner
            .ready
            .get_or_try_init(|| async {
                let indexes = [
                    ("stream_version", doc! { "stream": 1, "version": 1 }, true),
                    ("position", doc! { "position": 1 }, true),
                    ("category_position", doc! { "category": 1, "position": 1 }, false),
                ];
                let commits = &self.inner.commits;
                // Only the missing ones, one per command: FerretDB 1.24 drops the connection
                // when one createIndexes names several indexes of which some exist already.
                let existing = match commits.list_index_names().await {
                    Ok(names) => names,
                    // A collection that does not exist yet has no indexes.
                    Err(e) if matches!(&*e.kind, ErrorKind::Command(c) if c.code == 26) => vec![],
                    Err(e) => return Err(map_error("listing indexes", e)),
                };
                for (name, keys, unique) in &indexes {
                    if existing.iter().any(|n| n == name) {
                        continue;
                    }
                    if !self.inner.config.create {
                        return Err(Error::InvalidInput {
                            what: format!("collection {}", commits.name()),
                            reason: format!(
                                "index {name:?} is missing and photon_create=false; create it (see the photon-mongo README) or allow creation"
                            ),
                        });
                    }
                    let model = IndexModel::builder()
                        .keys(keys.clone())
                        .options(
                            IndexOptions::builder()
                                .name(name.to_string())
                                .unique(*unique)
                                .build(),
                        )
                        .build();
                    commits
                        .create_index(model)
                        .await
                        .map_err(|e| map_error(&format!("creating index {name}"), e))?;
                }
                Ok(())
            })
            .await
            .copied()
    }

    /// The highest global position taken (0 before the first append).
    pub(crate) async fn head(&self) -> Result<u64, Error> {
        let top = self
            .inner
            .commits
            .find_one(doc! {})
            .sort(doc! { "position": -1 })
            .projection(doc! { "position": 1, "version": 1, "count": 1 })
            .await
            .map_err(|e| map_error("reading the last position", e))?;
        Ok(top
            .as_ref()
            .map(document::head)
            .transpose()?
            .map_or(0, |h| h.position))
    }

    /// Gives up a reserved position for good, so readers do not wait for it. A duplicate means
    /// the position is already taken (by its commit or an earlier tombstone): nothing to do.
    pub(crate) async fn tombstone(&self, position: u64) -> Result<(), Error> {
        match self
            .inner
            .commits
            .insert_one(document::tombstone(position))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(map_error("writing a tombstone", e)),
        }
    }

    async fn last_commit(&self, stream: &StreamId) -> Result<Option<document::CommitHead>, Error> {
        let last = self
            .inner
            .commits
            .find_one(doc! { "stream": stream.as_str() })
            .sort(doc! { "version": -1 })
            .projection(doc! { "position": 1, "version": 1, "count": 1 })
            .await
            .map_err(|e| map_error(&format!("reading the version of {stream}"), e))?;
        last.as_ref().map(document::head).transpose()
    }

    /// Where the batch's ids are stored already, if anywhere.
    async fn stored_ids(
        &self,
        stream: &StreamId,
        events: &[EventData],
    ) -> Result<Vec<Document>, Error> {
        let ids: Vec<Bson> = events
            .iter()
            .map(|e| document::uuid_bson(e.event_id))
            .collect();
        self.inner
            .commits
            .find(doc! { "stream": stream.as_str(), "event_ids": { "$in": ids } })
            .projection(doc! { "position": 1, "version": 1, "count": 1, "event_ids": 1 })
            .await
            .map_err(|e| map_error(&format!("looking up event ids in {stream}"), e))?
            .try_collect()
            .await
            .map_err(|e| map_error(&format!("looking up event ids in {stream}"), e))
    }

    /// The result of re-sending an append that landed, or the conflict it is.
    fn retry_result(
        stream: &StreamId,
        events: &[EventData],
        stored: &[Document],
    ) -> Result<Option<AppendResult>, Error> {
        let mut where_stored = std::collections::HashMap::new();
        let mut positions = std::collections::HashMap::new();
        for d in stored {
            let head = document::head(d)?;
            positions.insert(head.version, head.position);
            for (i, id) in document::event_ids(d)?.into_iter().enumerate() {
                where_stored.insert(
                    id,
                    StoredId {
                        version: Version(head.version.0 + i as u64),
                        batch_first: head.version,
                        batch_len: head.count as usize,
                    },
                );
            }
        }
        match classify_batch(stream, events, |id| where_stored.get(id).copied())? {
            BatchKind::New => Ok(None),
            BatchKind::Retry { first } => {
                let position = positions[&first];
                Ok(Some(AppendResult {
                    first_version: first,
                    last_version: Version(first.0 + events.len() as u64 - 1),
                    checkpoints: (0..events.len())
                        .map(|i| document::checkpoint(position, i as u32))
                        .collect(),
                }))
            }
        }
    }
}

#[async_trait]
impl EventStore for MongoStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            all_stream: true,
            subscribe_from_time: true,
            total_order: true,
            max_event_size: self.inner.config.max_event_size,
            max_append_size: Some(MAX_APPEND_SIZE),
        }
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        validate_batch(
            stream,
            &events,
            self.inner.config.max_event_size,
            Some(MAX_APPEND_SIZE),
        )?;
        self.ready().await?;
        for attempt in 1..=APPEND_ATTEMPTS {
            let current = self
                .last_commit(stream)
                .await?
                .map(|h| Version(h.version.0 + h.count - 1));
            // A batch whose ids are stored already is a retry (or a conflict), whatever the
            // expectation: check before anything is written. With an exact expectation that
            // holds, the batch cannot have landed, so the lookup is skipped.
            if expected == ExpectedVersion::Any || !expected.matches(current) {
                let stored = self.stored_ids(stream, &events).await?;
                if !stored.is_empty() {
                    if let Some(result) = Self::retry_result(stream, &events, &stored)? {
                        return Ok(result);
                    }
                }
            }
            if !expected.matches(current) {
                return Err(Error::WrongExpectedVersion {
                    stream: stream.clone(),
                    expected,
                    actual: current,
                });
            }
            let first = current.map_or(Version(0), Version::next);
            // The next global position is the highest one + 1, claimed by the unique index on
            // `position`: a commit is written with its position in one insert, so no position
            // is ever reserved and then left empty, and a position is only taken once the one
            // below it is visible. (An $inc counter would be simpler, but FerretDB 1.24 loses
            // concurrent increments; this works the same on both.)
            let position = self.head().await? + 1;
            let commit = document::commit(stream, first, position, Timestamp::now(), &events);
            let encoded = mongodb::bson::to_vec(&commit)
                .map_err(|e| Error::backend(BACKEND, e))?
                .len();
            if encoded > MAX_DOCUMENT_SIZE {
                return Err(Error::BatchTooLarge {
                    stream: stream.clone(),
                    size: encoded,
                    limit: MAX_DOCUMENT_SIZE,
                });
            }
            match self.inner.commits.insert_one(commit).await {
                Ok(_) => {
                    return Ok(AppendResult {
                        first_version: first,
                        last_version: Version(first.0 + events.len() as u64 - 1),
                        checkpoints: (0..events.len())
                            .map(|i| document::checkpoint(position, i as u32))
                            .collect(),
                    })
                }
                Err(e) if is_duplicate_key(&e) => {
                    // Another commit took this version or this position: decide again. A short
                    // random pause spreads writers that collided.
                    tracing::debug!(%stream, position, attempt, "append lost a race; retrying");
                    let jitter = u64::from(Uuid::new_v4().as_bytes()[0] % 8);
                    tokio::time::sleep(Duration::from_millis(jitter * attempt.min(8) as u64)).await;
                }
                // The outcome is unknown: the commit may have landed. Re-sending the same
                // batch is safe, since the ids make it idempotent.
                Err(e) => return Err(map_error(&format!("appending to {stream}"), e)),
            }
        }
        Err(Error::Unavailable {
            backend: BACKEND,
            message: format!(
                "{stream}: lost {APPEND_ATTEMPTS} races in a row; the stream is too contended"
            ),
            source: None,
        })
    }

    fn read_stream(
        &self,
        stream: &StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        let store = self.clone();
        let stream_id = stream.clone();
        stream::once(async move { store.open_read(stream_id, options).await })
            .map(|opened| opened.unwrap_or_else(error_stream))
            .flatten()
            .boxed()
    }

    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
        subscription::subscribe(self.clone(), selector, start, mode)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
        self.ready().await?;
        Ok(self
            .last_commit(stream)
            .await?
            .map(|h| Version(h.version.0 + h.count - 1)))
    }

    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        self.ready().await?;
        let names = self
            .inner
            .commits
            .distinct(
                "category",
                doc! { "category": { "$ne": document::TOMBSTONE_STREAM } },
            )
            .await
            .map_err(|e| map_error("listing categories", e))?;
        let mut categories = names
            .iter()
            .filter_map(Bson::as_str)
            .map(Category::new)
            .collect::<Result<Vec<_>, _>>()?;
        categories.sort();
        Ok(categories)
    }

    fn list_streams(&self, category: &Category) -> BoxStream<'static, Result<StreamId, Error>> {
        let store = self.clone();
        let category = category.clone();
        stream::once(async move {
            store.ready().await?;
            let names = store
                .inner
                .commits
                .distinct("stream", doc! { "category": category.as_str() })
                .await
                .map_err(|e| map_error(&format!("listing streams of {category}"), e))?;
            let mut streams = names
                .iter()
                .filter_map(Bson::as_str)
                .map(StreamId::parse)
                .collect::<Result<Vec<_>, _>>()?;
            streams.sort();
            Ok::<_, Error>(stream::iter(streams.into_iter().map(Ok)).boxed())
        })
        .map(|r| r.unwrap_or_else(error_stream))
        .flatten()
        .boxed()
    }

    async fn health(&self) -> Result<Health, Error> {
        self.inner
            .client
            .database(&self.inner.config.database)
            .run_command(doc! { "ping": 1 })
            .await
            .map_err(|e| map_error("ping", e))?;
        self.ready().await?;
        Ok(Health {
            backend: BACKEND,
            detail: format!(
                "database {} answers ping; collection {}",
                self.inner.config.database,
                self.inner.commits.name()
            ),
        })
    }
}

impl MongoStore {
    async fn open_read(
        &self,
        stream: StreamId,
        options: ReadOptions,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
        self.ready().await?;
        let limit = options.limit.unwrap_or(usize::MAX);
        let context = format!("reading {stream}");
        let (filter, sort) = match (options.direction, options.from) {
            (Direction::Forwards, None) => (doc! { "stream": stream.as_str() }, 1),
            (Direction::Forwards, Some(v)) => {
                // Start at the commit holding `v`, which may begin before it.
                let holder = self
                    .inner
                    .commits
                    .find_one(doc! { "stream": stream.as_str(), "version": { "$lte": v.0 as i64 } })
                    .sort(doc! { "version": -1 })
                    .projection(doc! { "version": 1, "position": 1, "count": 1 })
                    .await
                    .map_err(|e| map_error(&context, e))?;
                let from = match holder.as_ref().map(document::head).transpose()? {
                    Some(h) => h.version.0,
                    None => 0,
                };
                (
                    doc! { "stream": stream.as_str(), "version": { "$gte": from as i64 } },
                    1,
                )
            }
            (Direction::Backwards, None) => (doc! { "stream": stream.as_str() }, -1),
            (Direction::Backwards, Some(v)) => (
                doc! { "stream": stream.as_str(), "version": { "$lte": v.0 as i64 } },
                -1,
            ),
        };
        let cursor = self
            .inner
            .commits
            .find(filter)
            .sort(doc! { "version": sort })
            .await
            .map_err(|e| map_error(&context, e))?;
        let from = options.from;
        let backwards = options.direction == Direction::Backwards;
        let events = cursor
            .map_err(move |e| map_error(&context, e))
            .map(move |commit| -> Result<Vec<RecordedEvent>, Error> {
                let mut events = document::events(&commit?)?;
                if let Some(v) = from {
                    events.retain(|e| {
                        if backwards {
                            e.version <= v
                        } else {
                            e.version >= v
                        }
                    });
                }
                if backwards {
                    events.reverse();
                }
                Ok(events)
            })
            .map_ok(|events| stream::iter(events.into_iter().map(Ok)))
            .try_flatten()
            .take(limit);
        Ok(events.boxed())
    }
}

/// The next pause of a poll loop: double the current one, at least 5 ms, at most `max`; how live
/// subscriptions poll without spinning.
pub(crate) fn next_pause(current: Duration, max: Duration) -> Duration {
    (current * 2).clamp(Duration::from_millis(5), max)
}
