#![doc = include_str!("../README.md")]

mod aggregate;
mod cache;
mod checkpoint_store;
mod connect;
mod failure;
mod partitioned;
mod process;
mod repository;
mod snapshot;
#[cfg(feature = "sqlite")]
mod sqlite_view;
pub mod testing;
mod typed_view;
pub mod upcast;
mod view;

pub use aggregate::{Aggregate, DomainEvent};
pub use cache::{CacheOptions, CacheUsage};
pub use checkpoint_store::{
    CheckpointStore, EventStoreCheckpointStore, InMemoryCheckpointStore,
    Loaded as LoadedCheckpoint, SavedView, CHECKPOINT_CATEGORY,
};
pub use connect::{
    connect, connect_from_env, KnownBackend, DEFAULT_URL, KNOWN_BACKENDS, URL_VARIABLE,
};
pub use failure::{
    dead_letter_id, dead_letter_stream, dead_letters, DeadLetter, FailurePolicy, OnFailure, Retry,
    DEAD_LETTER_CATEGORY, DEAD_LETTER_EVENT_TYPE, MAX_DEAD_LETTER_ERROR_LEN,
};
pub use partitioned::{
    load_partitions, members_key, partition_key, partition_of, MemberOverview, PartitionOptions,
    PartitionedStatus, PartitionedViewHandle, PartitionedViewRunner, SavedPartition,
    MAX_PARTITIONS, MIN_LEASE,
};
pub use process::{
    process_stream, Instance, ProcessError, ProcessHandle, ProcessManager, ProcessOptions,
    ProcessRunner, ProcessStatus, Steps, FINISHED_POLL, MAX_RETRY_DELAY, PROCESS_CATEGORY,
};
pub use repository::{
    command_event_id, encode, CommandContext, ExecuteError, Executed, Loaded, Repository,
    RetryPolicy, RESERVED_CATEGORY_PREFIX,
};
/// `rusqlite`, re-exported so a SQLite view names the same `Transaction` type as newton.
#[cfg(feature = "sqlite")]
pub use rusqlite;
pub use snapshot::{
    snapshot_stream, SnapshotDue, SnapshotPolicy, SNAPSHOT_CATEGORY, SNAPSHOT_EVENT_TYPE,
};
#[cfg(feature = "sqlite")]
pub use sqlite_view::{
    SqliteAdapter, SqliteView, SqliteViewError, SqliteViewRunner, CHECKPOINT_TABLE, SQLITE_BACKEND,
};
pub use typed_view::{AggregateView, Envelope, TypedView};
pub use upcast::{Decoder, Upcasters};
pub use view::{RunnerOptions, View, ViewError, ViewHandle, ViewRunner, ViewStatus};

/// The event-store contract, re-exported so applications depend on `newton` alone.
pub use photon_api as store;
pub use photon_api::{
    BoxError, Category, Checkpoint, Error, EventStore, EventStoreExt, RecordedEvent, StreamId,
    Uuid, Version,
};
