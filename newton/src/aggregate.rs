//! Aggregates: the pure decision and evolution logic of one kind of entity.
//!
//! Nothing here does I/O; the repository loads, decides through [`Aggregate::handle`] and stores.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::upcast::Upcasters;

/// An event of an aggregate, stored as MessagePack with field names.
///
/// The type name is stored beside the payload so that tools and other languages can tell events
/// apart without this Rust type; keep names stable (renaming a variant is a schema change).
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable type name, e.g. `"Deposited"`.
    fn event_type(&self) -> &'static str;

    /// The payload's schema version; bump it when the shape changes incompatibly, and add the
    /// upcaster from the previous version to [`Self::upcasters`], so events already stored in
    /// the old shape still read. It must equal the end of the type's chain (1 without one):
    /// an event written at a lower version would be upcast again on every read, so
    /// [`encode`](crate::encode) (and with it the repository) refuses to write one.
    fn schema_version(&self) -> u32 {
        1
    }

    /// How events stored at older schema versions become this enum: one chain per stored type.
    /// Declared on the event type rather than on each reader, so the repository, views through
    /// [`Decoder`](crate::upcast::Decoder) and the test kit all read old events the same way.
    /// None by default: every type is at version 1.
    fn upcasters() -> Upcasters {
        Upcasters::new()
    }
}

/// One kind of event-sourced entity: decides on commands, evolves by events.
///
/// State is rebuilt by applying the aggregate's events in order from `Default`, so `apply` must
/// be deterministic and must not fail: an event is a fact that already happened. `Clone`, because
/// the repository keeps a copy of recent states in its cache while handing one to the caller.
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// The category of its streams: instance `42` lives in stream `<CATEGORY>-42`.
    const CATEGORY: &'static str;
    /// What callers ask of it.
    type Command: Send + Sync;
    /// What it records.
    type Event: DomainEvent;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides what happens: the events to record, or a refusal. Pure: no I/O, no clock reads
    /// that should be in the command.
    ///
    /// # Errors
    /// - The aggregate's refusal, e.g. insufficient funds.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves the state by one event.
    fn apply(&mut self, event: &Self::Event);

    /// The version of the state's shape as snapshots store it. Bump it whenever the state's
    /// fields or their meaning change, or `apply` or an upcaster changes what stored events
    /// make of the state: snapshots of another version are then skipped and the state is rebuilt
    /// from events, instead of an old snapshot decoding into a wrong state.
    /// Only read when the repository takes snapshots ([`crate::Repository::with_snapshots`]).
    const SNAPSHOT_VERSION: u32 = 1;

    /// The name snapshots record as the aggregate type that wrote them; a snapshot recorded
    /// under another name is skipped and the events replayed. Two aggregate types on one
    /// category, with the same [`Self::SNAPSHOT_VERSION`] and states that decode alike, would
    /// otherwise load each other's snapshots into a wrong state without a sign.
    ///
    /// The default is the Rust type's path ([`std::any::type_name`]): distinct for distinct
    /// types, which is what correctness needs, but not promised stable across compiler versions
    /// and changed by renaming or moving the type. A change only costs one replay per stream
    /// (its snapshot is skipped, then a new one taken), never a wrong state; return a fixed name
    /// to keep snapshots across such changes. Only read when the repository takes snapshots.
    fn snapshot_name() -> &'static str {
        std::any::type_name::<Self>()
    }

    /// About how many bytes this state holds, heap included, so that the repository's cache
    /// ([`crate::CacheOptions::max_bytes`]) stays within its byte bound. The default counts the
    /// inline size only, which is exact for states of plain numbers and flags; a state holding
    /// strings or collections should add what they hold, or the cache keeps more than its bound.
    fn cached_size(&self) -> usize {
        std::mem::size_of::<Self>()
    }
}
