//! The repository's cache of recent aggregates: state and version per stream, bounded in entries
//! and in bytes, least recently used out first.
//!
//! It owns no I/O and knows nothing of the store: an entry is only ever a state the repository
//! read from the store or had stored by an append, at the version it was read or stored at. A
//! command works on a clone of the entry, which stays in place: a second command on the same
//! stream meanwhile starts from it too, instead of missing and replaying the whole stream. Two
//! commands never mutate one state, and the store's expected-version check, not the cache,
//! decides which of them wins; the loser reads the winner's events from its version. Putting a
//! state back keeps whichever of the two is at the later version.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use photon_api::{StreamId, Uuid, Version};

/// Bounds of a repository's aggregate cache.
///
/// The cache makes a command read only the events after the version it last saw, instead of
/// the whole stream; it is always safe to have, because the store's version check at append
/// time, not the cache, decides conflicts. Both bounds hold at once; `max_entries: 0` turns the
/// cache off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// Aggregates kept at most.
    pub max_entries: usize,
    /// Bytes kept at most, as [`crate::Aggregate::cached_size`] counts a state plus the
    /// stream name and a fixed overhead per entry.
    pub max_bytes: usize,
}

impl CacheOptions {
    /// No cache: every command reads its aggregate from the store (or its snapshot).
    pub fn disabled() -> Self {
        Self {
            max_entries: 0,
            max_bytes: 0,
        }
    }
}

impl Default for CacheOptions {
    /// 10,000 aggregates and 64 MiB: the hot set of a busy service, small beside a process.
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

/// What a repository's cache holds now, for tests and dashboards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Aggregates held.
    pub entries: usize,
    /// Bytes held, as the bound counts them.
    pub bytes: usize,
    /// Aggregates dropped to stay within the bounds, since the repository was made.
    pub evictions: u64,
}

/// Bytes counted for an entry beyond its state: its stream name and the bookkeeping of the two
/// maps (hash slot, order key, pointers), rounded up.
const ENTRY_OVERHEAD: usize = 96;

/// A state as of a stored version, with what the snapshot policy needs to know about it.
#[derive(Debug, Clone)]
pub(crate) struct Current<A> {
    pub(crate) state: A,
    /// The last event applied; None before the first event.
    pub(crate) version: Option<Version>,
    /// The id of the event at `version`, recorded in snapshots so that a snapshot is only used
    /// on the stream it was taken from.
    pub(crate) last_event_id: Option<Uuid>,
    /// The version of the last snapshot taken or tried for this stream, as far as this process
    /// knows; the snapshot policy counts events from there.
    pub(crate) snapshot_base: Option<Version>,
}

struct Slot<A> {
    current: Current<A>,
    bytes: usize,
    tick: u64,
}

struct Inner<A> {
    slots: HashMap<StreamId, Slot<A>>,
    /// Use order: the smallest tick is the least recently used.
    order: BTreeMap<u64, StreamId>,
    next_tick: u64,
    bytes: usize,
    evictions: u64,
}

pub(crate) struct AggregateCache<A> {
    options: CacheOptions,
    inner: Mutex<Inner<A>>,
}

impl<A> std::fmt::Debug for AggregateCache<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateCache")
            .field("options", &self.options)
            .field("usage", &self.usage())
            .finish()
    }
}

impl<A> AggregateCache<A> {
    pub(crate) fn new(options: CacheOptions) -> Self {
        Self {
            options,
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                order: BTreeMap::new(),
                next_tick: 0,
                bytes: 0,
                evictions: 0,
            }),
        }
    }

    fn enabled(&self) -> bool {
        self.options.max_entries > 0 && self.options.max_bytes > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<A>> {
        // Nothing panics while the lock is held; a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the entry of `stream`, if there is one, marked as just used; the entry stays
    /// for other commands on the stream.
    pub(crate) fn get(&self, stream: &StreamId) -> Option<Current<A>>
    where
        A: Clone,
    {
        if !self.enabled() {
            return None;
        }
        let mut inner = self.lock();
        let tick = inner.next_tick;
        let slot = inner.slots.get_mut(stream)?;
        let old_tick = std::mem::replace(&mut slot.tick, tick);
        let current = slot.current.clone();
        inner.next_tick += 1;
        inner.order.remove(&old_tick);
        inner.order.insert(tick, stream.clone());
        Some(current)
    }

    /// Drops the entry of `stream`, e.g. when the events after it cannot be read as the
    /// aggregate's: it would fail every command the same way, and only hold memory.
    pub(crate) fn remove(&self, stream: &StreamId) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.remove(stream) {
            inner.order.remove(&slot.tick);
            inner.bytes -= slot.bytes;
        }
    }

    pub(crate) fn usage(&self) -> CacheUsage {
        let inner = self.lock();
        CacheUsage {
            entries: inner.slots.len(),
            bytes: inner.bytes,
            evictions: inner.evictions,
        }
    }
}

impl<A: crate::Aggregate> AggregateCache<A> {
    /// Keeps `current` as the state of `stream`, unless an entry of a later version arrived
    /// meanwhile; then evicts the least recently used entries until both bounds hold. A state
    /// larger than the byte bound alone is not kept.
    pub(crate) fn put(&self, stream: &StreamId, current: Current<A>) {
        if !self.enabled() {
            return;
        }
        let bytes = current
            .state
            .cached_size()
            .saturating_add(stream.as_str().len() + ENTRY_OVERHEAD);
        let mut inner = self.lock();
        if bytes > self.options.max_bytes {
            inner.evictions += 1;
            return;
        }
        if let Some(old) = inner.slots.get(stream) {
            if old.current.version >= current.version {
                return;
            }
            let (tick, old_bytes) = (old.tick, old.bytes);
            inner.order.remove(&tick);
            inner.slots.remove(stream);
            inner.bytes -= old_bytes;
        }
        let tick = inner.next_tick;
        inner.next_tick += 1;
        inner.order.insert(tick, stream.clone());
        inner.slots.insert(
            stream.clone(),
            Slot {
                current,
                bytes,
                tick,
            },
        );
        inner.bytes += bytes;
        while inner.slots.len() > self.options.max_entries || inner.bytes > self.options.max_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some(slot) = inner.slots.remove(&oldest) {
                inner.bytes -= slot.bytes;
                inner.evictions += 1;
            }
        }
    }
}
