//! The connection and what every part of the store shares: the driver client with the concerns
//! the guarantees rest on, the commits collection and its indexes, the global head.
//!
//! The append protocol, reads and subscriptions live in their own modules and reach the server
//! through [`Shared`]; the document layout is `codec.rs`'s.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex, PoisonError};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::event::sdam::SdamEvent;
use mongodb::event::EventHandler;
use mongodb::options::{
    Acknowledgment, ClientOptions, CollectionOptions, IndexOptions, ReadConcern, ReadPreference,
    SelectionCriteria, ServerAddress, WriteConcern,
};
use mongodb::{Client, Collection, IndexModel};
use photon_api::{Error, Health};
use tokio::sync::OnceCell;

use crate::codec::{self, TOMBSTONE_STREAM};
use crate::config::MongoConfig;
use crate::error;
use crate::sequencer::Sequencer;
use crate::writer::StreamHeads;

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "mongo";

/// This backend's metric labels, `backend="mongo"`.
static LABELS: photon_api::telemetry::Labels = photon_api::telemetry::Labels::new(BACKEND);

/// This backend's spans and metrics.
pub(crate) static TELEMETRY: photon_api::telemetry::Telemetry =
    photon_api::telemetry::Telemetry::new(&LABELS);

/// The largest batch (sum of event sizes) one append accepts: a commit is one document, and
/// MongoDB refuses documents over 16 MiB; the rest is room for field names and ids.
pub const MAX_APPEND_SIZE: usize = 12 * 1024 * 1024;

/// The driver settings photon-mongo connects with: the URL's own options, `config`'s timeouts,
/// and the concerns durability rests on (write concern `majority` with journal, read concern
/// `majority`). Public so that tools reading the commits directly (the bench's raw baseline)
/// use exactly these.
///
/// # Errors
/// - [`Error::InvalidInput`] for a connection string the driver refuses.
pub async fn client_options(config: &MongoConfig) -> Result<ClientOptions, Error> {
    let mut options = ClientOptions::parse(config.driver_url())
        .await
        .map_err(|e| error::refused_url(config, &e))?;
    // Four fifths of photon's bound on a round trip, so an unreachable server is answered with
    // the driver's own server-selection error (which says what it tried) rather than photon's
    // bare "no answer within": with equal timeouts the two raced.
    options.server_selection_timeout = Some(config.timeout.mul_f64(0.8));
    options.connect_timeout = Some(config.timeout);
    options.app_name.get_or_insert_with(|| "photon".into());
    // Acknowledged only once a majority has it in its journal: the strongest ordinary setting.
    options.write_concern = Some(
        WriteConcern::builder()
            .w(Acknowledgment::Majority)
            .journal(true)
            // A majority that does not confirm in time answers a write-concern error (an
            // unknown outcome, `Unavailable`) instead of holding the call.
            .w_timeout(config.timeout)
            .build(),
    );
    // Readers see only majority-committed commits, which a failover cannot roll back.
    options.read_concern = Some(ReadConcern::majority());
    // Every read of the store goes to the primary, whatever the URL's `readPreference`: a
    // secondary's stream head can be behind, and a writer that reads it would collide with
    // the commit it does not see, again and again; a subscription on one would wait out gaps
    // the primary has filled.
    options.selection_criteria = Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
    Ok(options)
}

/// The indexes of the commits collection that reads and the global order rest on, each named:
/// `stream_version` unique on `{stream, version}` (the concurrency check), `position` unique
/// (the global order), `category_position` (category subscriptions), `stream_position` (stream
/// subscriptions, which read one stream's commits in position order after a checkpoint).
/// Public for the same reason as [`client_options`]. The store also creates
/// [`idempotency_index`].
pub fn commit_indexes() -> Vec<IndexModel> {
    [
        ("stream_version", doc! { "stream": 1, "version": 1 }, true),
        ("position", doc! { "position": 1 }, true),
        (
            "category_position",
            doc! { "category": 1, "position": 1 },
            false,
        ),
        (
            "stream_position",
            doc! { "stream": 1, "position": 1 },
            false,
        ),
    ]
    .into_iter()
    .map(|(name, keys, unique)| index(name, keys, unique))
    .collect()
}

/// The index `stream_event_ids`, unique on `{stream, event_ids}`: the idempotency check, where
/// the server indexes each id of the array (see the README). Apart from [`commit_indexes`]
/// because it constrains every document of the collection: documents without `event_ids`
/// (such as the bench's raw baseline writes) all share its key `(stream, null)`, so a tool
/// that writes such documents leaves it out.
pub fn idempotency_index() -> IndexModel {
    index(
        "stream_event_ids",
        doc! { "stream": 1, "event_ids": 1 },
        true,
    )
}

/// The name every index of ours has.
fn index_name(model: &IndexModel) -> &str {
    model
        .options
        .as_ref()
        .and_then(|o| o.name.as_deref())
        .expect("every index is named")
}

/// Whether `index`, an entry of `listIndexes`, is `stream_event_ids` as [`idempotency_index`]
/// defines it: unique, on exactly `{stream: 1, event_ids: 1}` in that order, over every
/// document (no `partialFilterExpression`, not sparse) and comparing strings as bytes (no
/// collation). An index of that name made otherwise (by hand, or by another tool) may let a
/// repeated id in, so the store does not rely on it.
pub(crate) fn is_ids_index(index: &Document) -> bool {
    is_index_as_defined(index, "stream_event_ids", ["stream", "event_ids"])
}

/// The index `name_revision` of the registers collection, unique on `{name: 1, revision: 1}`:
/// the only check a register save rests on (see `register.rs`). Public for the same reason as
/// [`commit_indexes`]: an administrator who runs with `photon_create=false` creates it.
pub fn register_indexes() -> Vec<IndexModel> {
    vec![index(
        REGISTER_INDEX,
        doc! { "name": 1, "revision": 1 },
        true,
    )]
}

/// How many register cleanups of one store may run at once after their saves answered; a save
/// that finds them all busy leaves its old revisions to the next save.
const REGISTER_CLEANUPS: usize = 8;

/// The name of the registers collection's one index.
pub(crate) const REGISTER_INDEX: &str = "name_revision";

/// Whether `index`, an entry of `listIndexes`, is the unique index `name` on exactly `wanted`
/// (ascending, in that order), over every document (no `partialFilterExpression`, not sparse)
/// and comparing strings as bytes (no collation).
pub(crate) fn is_index_as_defined<const N: usize>(
    index: &Document,
    name: &str,
    wanted: [&str; N],
) -> bool {
    let one = |b: &Bson| match b {
        Bson::Int32(n) => *n == 1,
        Bson::Int64(n) => *n == 1,
        Bson::Double(n) => *n == 1.0,
        _ => false,
    };
    let truthy = |b: Option<&Bson>| match b {
        Some(Bson::Boolean(b)) => *b,
        Some(n) => one(n),
        None => false,
    };
    let keys = match index.get_document("key") {
        Ok(keys) => keys.iter().collect::<Vec<_>>(),
        Err(_) => return false,
    };
    index.get_str("name") == Ok(name)
        && truthy(index.get("unique"))
        && keys.len() == N
        && keys
            .iter()
            .zip(wanted)
            .all(|((field, order), want)| field.as_str() == want && one(order))
        && !index.contains_key("partialFilterExpression")
        && !truthy(index.get("sparse"))
        && !index.contains_key("collation")
}

/// An event id as an error message shows it: a UUID as a UUID, anything else as BSON.
fn render_id(id: &Bson) -> String {
    match id {
        Bson::Binary(b) if b.bytes.len() == 16 => photon_api::Uuid::from_slice(&b.bytes)
            .map_or_else(|_| id.to_string(), |u| u.to_string()),
        other => other.to_string(),
    }
}

/// A named index on `keys`.
fn index(name: &str, keys: Document, unique: bool) -> IndexModel {
    let options = IndexOptions::builder()
        .name(name.to_owned())
        .unique(unique)
        .build();
    IndexModel::builder().keys(keys).options(options).build()
}

/// Keeps the latest heartbeat of each server the monitor checks: a failure replaces only that
/// server's entry and a success clears only its own, so one member's answer does not hide
/// another's refused handshake, and one member's bad certificate does not speak for the
/// others. A server the topology closes (removed from a replica set's configuration) is
/// forgotten.
fn record_heartbeat(heartbeats: &mut error::Heartbeats, event: SdamEvent) {
    let beat = match event {
        SdamEvent::ServerHeartbeatFailed(e) => Beat::Failed(e.server_address, e.failure),
        SdamEvent::ServerHeartbeatSucceeded(e) => Beat::Succeeded(e.server_address),
        SdamEvent::ServerClosed(e) => Beat::Closed(e.address),
        _ => return,
    };
    record(heartbeats, beat);
}

/// What a monitor event says about one server (the driver's events cannot be built outside
/// it, so the tests give these).
enum Beat {
    Failed(ServerAddress, mongodb::error::Error),
    Succeeded(ServerAddress),
    Closed(ServerAddress),
}

fn record(heartbeats: &mut error::Heartbeats, beat: Beat) {
    match beat {
        Beat::Failed(address, failure) => {
            heartbeats.insert(address, Some(failure));
        }
        Beat::Succeeded(address) => {
            heartbeats.insert(address, None);
        }
        Beat::Closed(address) => {
            heartbeats.remove(&address);
        }
    }
}

/// What `health()` says when the `stream_event_ids` index refuses any repeated event id.
pub const IDS_BY_INDEX: &str = "event ids enforced by the unique index";

/// What `health()` says when the server's unique index compares whole arrays, so appends look
/// the ids up before they write.
pub const IDS_LOOKED_UP: &str = "event ids looked up before each insert";

/// What the store found out about the server before its first operation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Readiness {
    /// The `stream_event_ids` index refuses a commit that shares any one event id with another
    /// commit of its stream, as MongoDB's unique multikey indexes do. False where the server
    /// compares the whole array instead (FerretDB 1.24 indexes an array as one value) or where
    /// it was not tried (`photon_create=false`): appends then look the ids up before writing.
    pub(crate) ids_unique_per_element: bool,
}

/// The connection, the commits collection and the settings, shared by every clone of a store.
pub(crate) struct Shared {
    client: Client,
    pub(crate) commits: Collection<Document>,
    /// The commits, read with local read concern: what the unique indexes see on the primary
    /// (see `sequencer.rs`, telling which index refused an insert).
    pub(crate) commits_local: Collection<Document>,
    /// The registers, one document per save kept (see `register.rs`).
    pub(crate) registers: Collection<Document>,
    pub(crate) config: MongoConfig,
    /// The monitor's latest heartbeat per server (see [`record_heartbeat`]): what a server
    /// selection that times out is classified by (see [`error::driver_after`]).
    heartbeats: Arc<Mutex<error::Heartbeats>>,
    ready: OnceCell<Readiness>,
    /// Set once the registers' index is created (when allowed) and checked.
    registers_ready: OnceCell<()>,
    /// Set once a save has shown that this store may delete from the registers collection
    /// (see [`Self::registers_writable`]).
    registers_writable: OnceCell<()>,
    /// Bounds the register cleanups running after their saves answered (see `register.rs`).
    pub(crate) register_cleanups: Arc<tokio::sync::Semaphore>,
    /// The commits waiting for a global position, and the highest one this store knows.
    pub(crate) sequencer: Sequencer,
    /// The last version this store knows of each stream it appended to or read the head of.
    pub(crate) stream_heads: StreamHeads,
}

impl Shared {
    /// A lazily connecting client for `config`: nothing is sent before the first operation.
    pub(crate) async fn connect(config: MongoConfig) -> Result<Self, Error> {
        let mut options = client_options(&config).await?;
        let heartbeats = Arc::new(Mutex::new(error::Heartbeats::new()));
        let seen = Arc::clone(&heartbeats);
        options.sdam_event_handler = Some(EventHandler::callback(move |event| {
            record_heartbeat(
                &mut seen.lock().unwrap_or_else(PoisonError::into_inner),
                event,
            );
        }));
        let client =
            Client::with_options(options).map_err(|e| error::driver("creating the client", e))?;
        let commits: Collection<Document> = client
            .database(&config.database)
            .collection(&config.commits());
        let local = CollectionOptions::builder()
            .read_concern(ReadConcern::local())
            .build();
        Ok(Self {
            commits_local: client
                .database(&config.database)
                .collection_with_options(&config.commits(), local),
            commits,
            registers: client
                .database(&config.database)
                .collection(&config.registers()),
            client,
            config,
            heartbeats,
            ready: OnceCell::new(),
            registers_ready: OnceCell::new(),
            registers_writable: OnceCell::new(),
            register_cleanups: Arc::new(tokio::sync::Semaphore::new(REGISTER_CLEANUPS)),
            sequencer: Sequencer::new(),
            stream_heads: StreamHeads::default(),
        })
    }

    /// One round trip to the server (or a few, e.g. a find and its getMores), answered within
    /// the configured timeout: a driver error as [`error::driver`] maps it, no answer in time
    /// as `Unavailable`. The driver has no socket timeout, and `maxTimeMS` and `wtimeout` only
    /// bound the server's own work, not a request or reply lost or held on the way; this bound
    /// is what makes every call answer. A request given up on may still reach the server
    /// (the driver closes that connection, but the bytes may be on their way): callers that
    /// write decide what that means (see `writer.rs`).
    pub(crate) async fn bounded<T, F>(
        &self,
        context: impl FnOnce() -> String,
        op: F,
    ) -> Result<T, Error>
    where
        F: IntoFuture<Output = mongodb::error::Result<T>>,
    {
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, op.into_future()).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(error::driver_after(context(), e, &self.heartbeats())),
            Err(elapsed) => Err(error::timed_out(context(), timeout, elapsed)),
        }
    }

    /// The monitor's latest heartbeat per server, as it stands now.
    pub(crate) fn heartbeats(&self) -> error::Heartbeats {
        self.heartbeats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Creates (or checks) the indexes the guarantees rest on and finds out how the server
    /// applies the ids index, once per store. The ids index is relied on only where it is
    /// `stream_event_ids` exactly as [`idempotency_index`] defines it ([`is_ids_index`]) and the
    /// probe shows the server refusing a shared element; otherwise appends look the ids up.
    pub(crate) async fn ready(&self) -> Result<Readiness, Error> {
        self.ready
            .get_or_try_init(|| async {
                if self.config.create {
                    self.create_indexes().await?;
                }
                let indexes = self.indexes().await?;
                for model in commit_indexes().into_iter().chain([idempotency_index()]) {
                    let name = index_name(&model);
                    if !indexes.iter().any(|i| i.get_str("name") == Ok(name)) {
                        return Err(error::missing_index(self.commits.name(), name));
                    }
                }
                let ids_index = indexes.iter().any(is_ids_index);
                if !ids_index {
                    tracing::warn!(
                        collection = self.commits.name(),
                        "index stream_event_ids is not unique on exactly {{stream: 1, event_ids: 1}}; appends look the ids up before each insert"
                    );
                }
                Ok(Readiness {
                    ids_unique_per_element: ids_index && self.ids_unique_per_element().await?,
                })
            })
            .await
            .copied()
    }

    /// Creates (when allowed) and checks the registers' index, once per store, at the first
    /// register call: apart from [`Self::ready`], so a store that never uses registers (an
    /// older deployment with `photon_create=false`, a reader with only the `read` role) neither
    /// needs nor touches the collection. The index must be [`register_indexes`]' exactly
    /// (unique on `{name: 1, revision: 1}` over every document): a save's revision check is
    /// that index's refusal, so an index of that name defined otherwise (FerretDB 1.24 accepts
    /// a `createIndexes` that differs only in `unique`, silently) is an error, not a warning.
    pub(crate) async fn registers_ready(&self) -> Result<(), Error> {
        self.registers_ready
            .get_or_try_init(|| async {
                let collection = self.registers.name();
                if self.config.create {
                    for model in register_indexes() {
                        let name = index_name(&model).to_owned();
                        if let Err(conflict) = self.create_index_on(&self.registers, model).await? {
                            return Err(error::index_conflict(collection, &name, &conflict));
                        }
                    }
                }
                let indexes = self.indexes_of(&self.registers).await?;
                match indexes
                    .iter()
                    .find(|i| i.get_str("name") == Ok(REGISTER_INDEX))
                {
                    None => Err(error::missing_index(collection, REGISTER_INDEX)),
                    Some(i) if !is_index_as_defined(i, REGISTER_INDEX, ["name", "revision"]) => {
                        Err(error::index_conflict(
                            collection,
                            REGISTER_INDEX,
                            &i.to_string(),
                        ))
                    }
                    Some(_) => Ok(()),
                }
            })
            .await
            .copied()
    }

    /// Checks, once per store at its first register save, that it may delete from the
    /// registers collection: a save keeps storage bounded by deleting old revisions after it
    /// answered, where a refusal would only be logged, so a role without `remove` would let
    /// the collection grow without anyone being told. `delete_one` of a fresh `ObjectId`
    /// matches nothing but needs that action; a refusal is `AccessDenied` (code 13, as
    /// [`error::driver`] maps it).
    pub(crate) async fn registers_writable(&self) -> Result<(), Error> {
        self.registers_writable
            .get_or_try_init(|| async {
                let probe = doc! { "_id": mongodb::bson::oid::ObjectId::new() };
                self.bounded(
                    || {
                        format!(
                            "checking that old register revisions may be deleted from {}",
                            self.registers.name()
                        )
                    },
                    self.registers.delete_one(probe),
                )
                .await
                .map(|_| ())
            })
            .await
            .copied()
    }

    /// Tries, on a scratch collection `<prefix>_probe` with the same kind of index, whether a
    /// unique index on `{key, array}` refuses a second document that shares one element of the
    /// array with the first. MongoDB does (a multikey index holds one entry per element);
    /// FerretDB 1.24 does not (its SQLite and PostgreSQL indexes hold the array as one value).
    /// No server says which it does, and a wrong guess would store a repeated id twice, so it
    /// is tried. Not tried when creation is off: the answer is then false, the safe one.
    async fn ids_unique_per_element(&self) -> Result<bool, Error> {
        if !self.config.create {
            return Ok(false);
        }
        let probe = self
            .database()
            .collection::<Document>(&format!("{}_probe", self.config.collection_prefix));
        self.bounded(
            || "creating the probe index".into(),
            probe.create_index(index("key_ids", doc! { "key": 1, "ids": 1 }, true)),
        )
        .await?;
        // A key of its own, so that stores probing at once do not meet.
        let key = photon_api::Uuid::new_v4().to_string();
        self.bounded(
            || "probing the ids index".into(),
            probe.insert_one(doc! { "key": &key, "ids": [1, 2] }),
        )
        .await?;
        let overlapping = async {
            match probe.insert_one(doc! { "key": &key, "ids": [2, 3] }).await {
                Ok(_) => Ok(false),
                Err(e) if error::is_duplicate_key(&e) => Ok(true),
                Err(e) => Err(e),
            }
        };
        let refused = self
            .bounded(|| "probing the ids index".into(), overlapping)
            .await?;
        // Only tidying: a document left behind changes no answer.
        let _ = self
            .bounded(
                || "clearing the probe".into(),
                probe.delete_many(doc! { "key": &key }),
            )
            .await;
        tracing::debug!(
            per_element = refused,
            "how the server applies a unique index to an array"
        );
        Ok(refused)
    }

    fn database(&self) -> mongodb::Database {
        self.client.database(&self.config.database)
    }

    /// Asks for every index, one per command (FerretDB 1.24 drops the connection when one
    /// createIndexes names several indexes of which some exist already), rather than skipping
    /// the ones whose names are listed: createIndexes is idempotent, and on MongoDB it waits for
    /// a build of the same index still in progress (which `listIndexes` already lists but which
    /// refuses no duplicate before it commits). Old tombstones with `event_ids: []` are
    /// rewritten first, and a collection whose commits share ids is refused with the ids.
    async fn create_indexes(&self) -> Result<(), Error> {
        for model in commit_indexes() {
            let name = index_name(&model).to_owned();
            if let Err(conflict) = self.create_index(model).await? {
                return Err(error::index_conflict(self.commits.name(), &name, &conflict));
            }
        }
        // A writer of an older version may add an empty tombstone between the rewrite and the
        // build: one more rewrite gets past it.
        for attempt in 0..2 {
            let rewritten = self.rewrite_empty_tombstones().await?;
            if rewritten > 0 {
                tracing::info!(
                    collection = self.commits.name(),
                    rewritten,
                    "tombstones with event_ids [] given event_ids [-position]"
                );
            }
            match self.create_index(idempotency_index()).await {
                Ok(Ok(())) => return Ok(()),
                // Another index holds the name: `is_ids_index` decides what it is worth.
                Ok(Err(conflict)) => {
                    tracing::warn!(
                        collection = self.commits.name(),
                        %conflict,
                        "index stream_event_ids exists with another definition"
                    );
                    return Ok(());
                }
                Err(e @ Error::Backend { .. }) if attempt > 0 => {
                    return Err(self.shared_ids(e).await?);
                }
                Err(e @ Error::Backend { .. }) => {
                    tracing::debug!(error = %e, "building stream_event_ids failed; trying again");
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Creates `model`: `Ok(Err(message))` when an index of that name (or those keys) exists
    /// with another definition (MongoDB's IndexOptionsConflict, IndexKeySpecsConflict).
    async fn create_index(&self, model: IndexModel) -> Result<Result<(), String>, Error> {
        self.create_index_on(&self.commits, model).await
    }

    /// [`Self::create_index`] on `collection`.
    async fn create_index_on(
        &self,
        collection: &Collection<Document>,
        model: IndexModel,
    ) -> Result<Result<(), String>, Error> {
        let name = index_name(&model).to_owned();
        let create = async {
            match collection.create_index(model).await {
                Ok(_) => Ok(Ok(())),
                Err(e) if error::is_index_conflict(&e) => Ok(Err(e.to_string())),
                Err(e) => Err(e),
            }
        };
        self.bounded(|| format!("creating index {name}"), create)
            .await
    }

    /// Gives every tombstone with `event_ids: []` (as versions before the `stream_event_ids`
    /// index wrote them) the `[-position]` of today's, one document at a time (FerretDB 1.24
    /// has no pipeline updates). Returns how many it changed.
    async fn rewrite_empty_tombstones(&self) -> Result<u64, Error> {
        let filter = doc! { "stream": TOMBSTONE_STREAM, "event_ids": { "$size": 0 } };
        let mut rewritten = 0;
        loop {
            let page: Vec<Document> = self
                .bounded(|| "finding tombstones with event_ids []".into(), async {
                    self.commits
                        .find(filter.clone())
                        .projection(doc! { "_id": 1, "position": 1 })
                        .limit(256)
                        .max_time(self.config.timeout)
                        .await?
                        .try_collect()
                        .await
                })
                .await?;
            if page.is_empty() {
                return Ok(rewritten);
            }
            for tombstone in page {
                let position = match tombstone.get("position") {
                    Some(Bson::Int64(p)) => *p,
                    Some(Bson::Int32(p)) => i64::from(*p),
                    _ => {
                        return Err(error::corrupt(
                            None,
                            "a tombstone's position is not an integer",
                        ))
                    }
                };
                let id = tombstone.get("_id").cloned().unwrap_or(Bson::Null);
                let done = self
                    .bounded(
                        || format!("rewriting the tombstone at position {position}"),
                        self.commits.update_one(
                            doc! { "_id": id, "event_ids": { "$size": 0 } },
                            doc! { "$set": { "event_ids": [-position] } },
                        ),
                    )
                    .await?;
                rewritten += done.modified_count;
            }
        }
    }

    /// After `build` (the failed creation of `stream_event_ids`): the error naming commits of
    /// one stream that share event ids, if there are any, else `build` itself. Reads every
    /// commit's stream and ids in stream order, holding one stream's ids at a time; each round
    /// trip is bounded, not the whole scan.
    async fn shared_ids(&self, build: Error) -> Result<Error, Error> {
        const ENOUGH: usize = 5;
        let context = || "looking for commits that share event ids".to_owned();
        let mut cursor = self
            .bounded(
                context,
                self.commits
                    .find(doc! { "stream": { "$ne": TOMBSTONE_STREAM } })
                    .projection(doc! { "_id": 0, "stream": 1, "event_ids": 1, "position": 1 })
                    .sort(doc! { "stream": 1, "version": 1 }),
            )
            .await?;
        let mut found = Vec::new();
        let mut stream = String::new();
        let mut seen: HashMap<String, Bson> = HashMap::new();
        while let Some(commit) = self.bounded(context, cursor.try_next()).await? {
            let this = commit.get_str("stream").unwrap_or_default();
            if this != stream {
                this.clone_into(&mut stream);
                seen.clear();
            }
            let position = commit.get("position").cloned().unwrap_or(Bson::Null);
            let ids = commit
                .get_array("event_ids")
                .map(Vec::as_slice)
                .unwrap_or_default();
            for id in ids {
                let id = render_id(id);
                match seen.get(&id) {
                    Some(first) => found.push(error::SharedId {
                        stream: stream.clone(),
                        id,
                        positions: (first.to_string(), position.to_string()),
                    }),
                    None => {
                        seen.insert(id, position.clone());
                    }
                }
            }
            if found.len() >= ENOUGH {
                break;
            }
        }
        Ok(if found.is_empty() {
            build
        } else {
            error::shared_ids(self.commits.name(), &found)
        })
    }

    /// The commits collection's indexes as `listIndexes` describes them.
    async fn indexes(&self) -> Result<Vec<Document>, Error> {
        self.indexes_of(&self.commits).await
    }

    /// `collection`'s indexes as `listIndexes` describes them.
    async fn indexes_of(&self, collection: &Collection<Document>) -> Result<Vec<Document>, Error> {
        let indexes = async {
            match self
                .database()
                .run_cursor_command(doc! { "listIndexes": collection.name() })
                .await
            {
                Ok(cursor) => cursor.try_collect().await,
                // A collection that does not exist yet has no indexes.
                Err(e) if error::is_namespace_missing(&e) => Ok(vec![]),
                Err(e) => Err(e),
            }
        };
        self.bounded(|| "listing indexes".into(), indexes).await
    }

    /// The highest global position taken (0 before the first append).
    pub(crate) async fn head(&self) -> Result<u64, Error> {
        let top = self
            .bounded(
                || "reading the last position".into(),
                self.commits
                    .find_one(doc! {})
                    .sort(doc! { "position": -1 })
                    .projection(codec::head_fields())
                    .max_time(self.config.timeout),
            )
            .await?;
        Ok(top
            .as_ref()
            .map(codec::head)
            .transpose()?
            .map_or(0, |h| h.position))
    }

    /// Pings the database, then makes sure the indexes are there.
    pub(crate) async fn health(&self) -> Result<Health, Error> {
        self.bounded(
            || "ping".into(),
            self.client
                .database(&self.config.database)
                .run_command(doc! { "ping": 1 }),
        )
        .await?;
        let readiness = self.ready().await?;
        Ok(Health {
            backend: BACKEND,
            detail: format!(
                "database {} answers ping; collection {}; {}",
                self.config.database,
                self.commits.name(),
                if readiness.ids_unique_per_element {
                    IDS_BY_INDEX
                } else {
                    IDS_LOOKED_UP
                }
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A refused handshake as the monitor reports it (rustls's error inside an I/O error).
    fn untrusted() -> mongodb::error::Error {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        mongodb::error::ErrorKind::Io(Arc::new(io)).into()
    }

    #[test]
    fn each_server_keeps_its_own_latest_heartbeat() {
        let a = ServerAddress::parse("db1:27017").expect("an address");
        let b = ServerAddress::parse("db2:27017").expect("an address");
        let mut heartbeats = error::Heartbeats::new();
        record(&mut heartbeats, Beat::Failed(a.clone(), untrusted()));
        record(&mut heartbeats, Beat::Succeeded(b.clone()));
        // b's success does not clear a's refusal, and a's refusal is not b's.
        assert!(heartbeats[&a].is_some());
        assert!(heartbeats[&b].is_none());
        record(&mut heartbeats, Beat::Failed(b.clone(), untrusted()));
        record(&mut heartbeats, Beat::Succeeded(a.clone()));
        assert!(heartbeats[&a].is_none());
        assert!(heartbeats[&b].is_some());
        // A server the topology closed no longer counts.
        record(&mut heartbeats, Beat::Closed(a.clone()));
        assert_eq!(heartbeats.keys().collect::<Vec<_>>(), [&b]);
    }

    #[tokio::test]
    async fn the_driver_gets_its_options_and_ours_are_applied() {
        let config = MongoConfig::from_url("mongodb://h/db?photon_timeout_ms=1500&appName=x")
            .expect("parses");
        let options = client_options(&config)
            .await
            .expect("the driver accepts it");
        assert_eq!(
            options.server_selection_timeout,
            Some(Duration::from_millis(1200)),
            "within photon's bound, so the driver's error comes first"
        );
        assert_eq!(options.app_name.as_deref(), Some("x"));
        let write = options.write_concern.expect("set");
        assert_eq!(
            (write.w, write.journal, write.w_timeout),
            (
                Some(Acknowledgment::Majority),
                Some(true),
                Some(Duration::from_millis(1500))
            )
        );
        assert_eq!(options.read_concern, Some(ReadConcern::majority()));
    }

    #[tokio::test]
    async fn reads_go_to_the_primary_whatever_the_url_says() {
        for preference in [
            "secondary",
            "secondaryPreferred",
            "nearest&maxStalenessSeconds=120",
            "primaryPreferred",
        ] {
            let url = format!("mongodb://h1,h2/db?replicaSet=rs&readPreference={preference}");
            let config = MongoConfig::from_url(&url).expect("parses");
            let options = client_options(&config)
                .await
                .expect("the driver accepts it");
            assert!(
                matches!(
                    options.selection_criteria,
                    Some(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                ),
                "{preference}: {:?}",
                options.selection_criteria
            );
        }
    }

    /// `stream_event_ids` as MongoDB 6+ and FerretDB 1.24 list it after `idempotency_index()`.
    fn listed_ids_index() -> Document {
        doc! {
            "v": 2, "key": { "stream": 1, "event_ids": 1 }, "name": "stream_event_ids",
            "unique": true,
        }
    }

    #[test]
    fn the_ids_index_is_relied_on_only_as_defined() {
        assert!(is_ids_index(&listed_ids_index()));
        // Numbers as other tools write them are the same spec.
        for one in [Bson::Int64(1), Bson::Double(1.0)] {
            let mut index = listed_ids_index();
            index.insert("key", doc! { "stream": one.clone(), "event_ids": one });
            assert!(is_ids_index(&index), "{index}");
        }
        let changed = |f: &dyn Fn(&mut Document)| {
            let mut index = listed_ids_index();
            f(&mut index);
            index
        };
        for index in [
            // Not unique, or not said to be.
            changed(&|i| {
                i.remove("unique");
            }),
            changed(&|i| {
                i.insert("unique", false);
            }),
            // Other keys: reversed, one more, one fewer, descending, hashed.
            changed(&|i| {
                i.insert("key", doc! { "event_ids": 1, "stream": 1 });
            }),
            changed(&|i| {
                i.insert("key", doc! { "stream": 1, "event_ids": 1, "version": 1 });
            }),
            changed(&|i| {
                i.insert("key", doc! { "stream": 1 });
            }),
            changed(&|i| {
                i.insert("key", doc! { "stream": 1, "event_ids": -1 });
            }),
            changed(&|i| {
                i.insert("key", doc! { "stream": 1, "event_ids": "hashed" });
            }),
            changed(&|i| {
                i.remove("key");
            }),
            // Not over every document, or comparing streams otherwise.
            changed(&|i| {
                i.insert("partialFilterExpression", doc! { "version": { "$gte": 0 } });
            }),
            changed(&|i| {
                i.insert("sparse", true);
            }),
            changed(&|i| {
                i.insert("collation", doc! { "locale": "en", "strength": 2 });
            }),
            // Another index.
            changed(&|i| {
                i.insert("name", "stream_1_event_ids_1");
            }),
        ] {
            assert!(!is_ids_index(&index), "{index}");
        }
    }

    #[test]
    fn the_registers_index_is_relied_on_only_as_defined() {
        let listed = doc! {
            "v": 2, "key": { "name": 1, "revision": 1 }, "name": "name_revision", "unique": true,
        };
        assert!(is_index_as_defined(
            &listed,
            "name_revision",
            ["name", "revision"]
        ));
        for (field, value) in [
            ("unique", Bson::Boolean(false)),
            ("key", Bson::Document(doc! { "name": 1 })),
            ("key", Bson::Document(doc! { "revision": 1, "name": 1 })),
            ("key", Bson::Document(doc! { "name": 1, "revision": -1 })),
            ("sparse", Bson::Boolean(true)),
            (
                "partialFilterExpression",
                Bson::Document(doc! { "revision": { "$gt": 0 } }),
            ),
            (
                "collation",
                Bson::Document(doc! { "locale": "en", "strength": 2 }),
            ),
        ] {
            let mut index = listed.clone();
            index.insert(field, value);
            assert!(
                !is_index_as_defined(&index, "name_revision", ["name", "revision"]),
                "{index}"
            );
        }
        let model = &register_indexes()[0];
        assert_eq!(index_name(model), REGISTER_INDEX);
        assert_eq!(model.keys, doc! { "name": 1, "revision": 1 });
        assert_eq!(model.options.as_ref().and_then(|o| o.unique), Some(true));
    }

    #[test]
    fn event_ids_are_shown_as_uuids() {
        let id = photon_api::Uuid::new_v4();
        let stored = Bson::Binary(mongodb::bson::Binary {
            subtype: mongodb::bson::spec::BinarySubtype::Uuid,
            bytes: id.as_bytes().to_vec(),
        });
        assert_eq!(render_id(&stored), id.to_string());
        assert_eq!(render_id(&Bson::Int64(-3)), "-3");
    }

    #[tokio::test]
    async fn options_the_driver_does_not_know_are_refused_by_it() {
        let config = MongoConfig::from_url("mongodb://h/?photon_prefix=a&nope=1").expect("ours");
        match client_options(&config).await {
            Err(Error::InvalidInput { reason, .. }) => {
                assert!(reason.contains("nope is an invalid option"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
