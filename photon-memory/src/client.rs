//! The state every clone of a store shares: the log, its indexes, the lock around them and the
//! head that live subscriptions wait on, with the constants that size them.
//!
//! This module owns the data layout and the locking discipline; it decides nothing about what
//! an append or a read means (that is `writer` and `reader`), and nothing here reaches up into
//! the crate root.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use photon_api::validate::StoredId;
use photon_api::{
    Bytes, ContentType, EventType, Metadata, Register, StreamId, Timestamp, Uuid, Version,
};
use tokio::sync::watch;

use crate::codec::Encoder;
use crate::config::MemoryConfig;
use crate::faults::FaultState;

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "memory";

/// This backend's metric labels, `backend="memory"`.
static LABELS: photon_api::telemetry::Labels = photon_api::telemetry::Labels::new(BACKEND);

/// This backend's spans and metrics.
pub(crate) static TELEMETRY: photon_api::telemetry::Telemetry =
    photon_api::telemetry::Telemetry::new(&LABELS);

/// How many events a read or subscription copies out per lock; bounds both lock hold time and
/// per-subscriber memory.
pub(crate) const CHUNK: usize = 256;

/// Log records per storage segment. The log grows by whole segments instead of reallocating (and
/// copying) one ever larger vector, so a big store never needs twice its size for a moment.
const SEGMENT_BITS: u32 = 16;
const SEGMENT: usize = 1 << SEGMENT_BITS;

/// Payloads up to this size are copied into the store's shared payload buffers (no allocation,
/// allocator overhead or reference-count block per event); larger ones are kept as given.
pub(crate) const SMALL_PAYLOAD: usize = 1024;
/// The size of one shared payload buffer.
pub(crate) const PAYLOAD_BUFFER: usize = 256 * 1024;

/// The hash maps of the store: a fast, randomly seeded hash (foldhash) instead of SipHash.
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// What every clone of one store shares.
pub(crate) struct Shared {
    state: RwLock<State>,
    /// The log length after the last append; subscriptions wait on it.
    pub(crate) head: watch::Sender<u64>,
    pub(crate) config: MemoryConfig,
    /// The weaker guarantees played, if any ([`crate::Faults`]); None costs each call one check.
    pub(crate) faults: Option<FaultState>,
    /// Every register's latest save, by name ([`crate::register`]).
    pub(crate) registers: Mutex<HashMap<String, Register>>,
}

impl Shared {
    /// A new, empty store's state.
    pub(crate) fn new(config: MemoryConfig) -> Self {
        let (head, _) = watch::channel(0);
        Self {
            state: RwLock::new(State::default()),
            head,
            faults: config.faults.clone().map(FaultState::new),
            registers: Mutex::default(),
            config,
        }
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written (appends mutate
        // only after every check), so a poisoned lock is still consistent.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The log and its indexes, behind [`Shared`]'s lock.
#[derive(Default)]
pub(crate) struct State {
    /// Every event, in commit order; an event's position is its index.
    pub(crate) log: Log,
    pub(crate) streams: Map<StreamId, StreamIndex>,
    pub(crate) categories: Map<Box<str>, CategoryIndex>,
    /// `recorded_at` never goes backwards along the log, so `Start::Time` is a binary search.
    pub(crate) last_recorded: Option<Timestamp>,
    /// Turns appended events into records.
    pub(crate) encoder: Encoder,
}

/// An event as stored: a [`photon_api::RecordedEvent`] without what the log already knows (its
/// checkpoint is its position, its stream a number), so a stored event takes about half the
/// memory.
pub(crate) struct Record {
    pub(crate) event_id: Uuid,
    pub(crate) version: u64,
    /// The stream's number in the log ([`Log::name`]).
    pub(crate) stream: u32,
    pub(crate) schema_version: u32,
    /// Its type and encoding, one shared copy per pair ([`Kind`]).
    pub(crate) kind: Arc<Kind>,
    pub(crate) occurred_at: Timestamp,
    pub(crate) recorded_at: Timestamp,
    /// The payload's bytes; its encoding is the kind's.
    pub(crate) payload: Bytes,
    /// None for empty metadata, the common case.
    pub(crate) metadata: Option<Box<Metadata>>,
}

// A replay reads every record of the log: keep them this small.
const _: () = assert!(std::mem::size_of::<Record>() <= 96);

/// An event type and payload encoding, kept once for every record of that pair: a record then
/// holds one pointer where the two took 40 bytes (96 bytes a record instead of 128), which a
/// replay of a large log reads less of, and the store takes less memory.
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct Kind {
    pub(crate) event_type: EventType,
    pub(crate) content_type: ContentType,
}

/// The log: every record in commit order (a record's position is its index) and every stream's
/// name by number.
///
/// Full segments are sealed: moved behind an `Arc` and never changed again, and published with
/// the names their records use as one [`Sealed`] value that a seal replaces instead of changing.
/// A reader clones that `Arc` under the lock and copies records out after releasing it, so a
/// long replay holds the lock only to pick positions; only records still in the tail (the last
/// `SEGMENT` at most) are copied under it.
#[derive(Default)]
pub(crate) struct Log {
    sealed: Arc<Sealed>,
    /// The segment being filled.
    tail: Vec<Record>,
    names: Names,
}

impl Log {
    pub(crate) fn len(&self) -> u64 {
        self.sealed.len() + self.tail.len() as u64
    }

    /// The full segments, to read after the lock is released.
    pub(crate) fn sealed(&self) -> &Arc<Sealed> {
        &self.sealed
    }

    pub(crate) fn get(&self, position: u64) -> &Record {
        match position.checked_sub(self.sealed.len()) {
            Some(in_tail) => &self.tail[in_tail as usize],
            None => self.sealed.get(position),
        }
    }

    /// The name of stream number `number`.
    pub(crate) fn name(&self, number: u32) -> &StreamId {
        self.names.get(number)
    }

    /// Numbers a new stream; its records carry the number.
    pub(crate) fn add_stream(&mut self, name: StreamId) -> u32 {
        self.names.push(name)
    }

    pub(crate) fn push(&mut self, record: Record) {
        // The first segment grows as usual, so a small store stays small; later ones are
        // allocated whole once, when their first record comes.
        if self.tail.capacity() == 0 && !self.sealed.segments.is_empty() {
            self.tail.reserve_exact(SEGMENT);
        }
        self.tail.push(record);
        if self.tail.len() == SEGMENT {
            self.seal();
        }
    }

    /// Moves the full tail into the sealed segments. Readers holding the previous [`Sealed`]
    /// keep it; when none does, it is extended in place.
    fn seal(&mut self) {
        let segment = Arc::new(std::mem::take(&mut self.tail));
        let names = self.names.snapshot();
        let sealed = Arc::make_mut(&mut self.sealed);
        sealed.segments.push(segment);
        sealed.names = names;
    }

    /// The first position whose record does not satisfy `pred`, which must hold for a prefix of
    /// the log.
    pub(crate) fn partition_point(&self, pred: impl Fn(&Record) -> bool) -> u64 {
        let segments = &self.sealed.segments;
        let full = segments.partition_point(|s| s.last().is_some_and(&pred));
        match segments.get(full) {
            Some(s) => (full * SEGMENT + s.partition_point(pred)) as u64,
            None => self.sealed.len() + self.tail.partition_point(pred) as u64,
        }
    }
}

/// The sealed part of the log: full segments, never changed, and the names of every stream
/// numbered before the last seal (so of every stream their records name).
#[derive(Clone, Default)]
pub(crate) struct Sealed {
    segments: Vec<Arc<Vec<Record>>>,
    /// Chunks of [`NAME_CHUNK`] names, the last one possibly shorter.
    names: Vec<Arc<[StreamId]>>,
}

impl Sealed {
    /// The positions below this are sealed.
    pub(crate) fn len(&self) -> u64 {
        (self.segments.len() * SEGMENT) as u64
    }

    pub(crate) fn get(&self, position: u64) -> &Record {
        &self.segments[(position >> SEGMENT_BITS) as usize][position as usize & (SEGMENT - 1)]
    }

    /// The name of stream number `number`, which a sealed record carries.
    pub(crate) fn name(&self, number: u32) -> &StreamId {
        let n = number as usize;
        &self.names[n >> NAME_CHUNK_BITS][n & (NAME_CHUNK - 1)]
    }
}

/// Stream names per chunk of [`Names`]: full chunks are shared with every later [`Sealed`], so
/// a seal copies only the names of the last, open chunk.
const NAME_CHUNK_BITS: u32 = 10;
const NAME_CHUNK: usize = 1 << NAME_CHUNK_BITS;

/// Every stream's name, by number.
#[derive(Default)]
struct Names {
    full: Vec<Arc<[StreamId]>>,
    tail: Vec<StreamId>,
}

impl Names {
    fn get(&self, number: u32) -> &StreamId {
        let n = number as usize;
        match self.full.get(n >> NAME_CHUNK_BITS) {
            Some(chunk) => &chunk[n & (NAME_CHUNK - 1)],
            None => &self.tail[n & (NAME_CHUNK - 1)],
        }
    }

    fn push(&mut self, name: StreamId) -> u32 {
        let number = self.full.len() * NAME_CHUNK + self.tail.len();
        let number = u32::try_from(number).expect("fewer than 2^32 streams fit in memory");
        self.tail.push(name);
        if self.tail.len() == NAME_CHUNK {
            self.full.push(std::mem::take(&mut self.tail).into());
        }
        number
    }

    /// Every name so far, as [`Sealed::names`] keeps them.
    fn snapshot(&self) -> Vec<Arc<[StreamId]>> {
        let mut chunks = self.full.clone();
        if !self.tail.is_empty() {
            chunks.push(self.tail.as_slice().into());
        }
        chunks
    }
}

/// One aggregate stream's index.
#[derive(Default)]
pub(crate) struct StreamIndex {
    /// The stream's number in the log ([`Log::name`]).
    pub(crate) number: u32,
    /// Log position of each version.
    pub(crate) positions: Vec<u64>,
    /// The first version of each append, for idempotent retries.
    pub(crate) batches: Vec<u64>,
    /// The version of each event id, for idempotent retries.
    pub(crate) ids: Map<u128, u64>,
}

impl StreamIndex {
    /// The stream's current version; None while it has no events.
    pub(crate) fn version(&self) -> Option<Version> {
        self.positions
            .len()
            .checked_sub(1)
            .map(|v| Version(v as u64))
    }

    /// Where an event id is stored and by which append.
    pub(crate) fn stored(&self, id: &Uuid) -> Option<StoredId> {
        let version = *self.ids.get(&id.as_u128())?;
        let batch = self.batches.partition_point(|first| *first <= version) - 1;
        let batch_first = self.batches[batch];
        let batch_end = self
            .batches
            .get(batch + 1)
            .copied()
            .unwrap_or(self.positions.len() as u64);
        Some(StoredId {
            version: Version(version),
            batch_first: Version(batch_first),
            batch_len: (batch_end - batch_first) as usize,
        })
    }
}

/// One category's index.
#[derive(Default)]
pub(crate) struct CategoryIndex {
    pub(crate) positions: Vec<u64>,
    pub(crate) streams: BTreeSet<StreamId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u64, recorded_at: Timestamp) -> Record {
        Record {
            event_id: Uuid::now_v7(),
            version,
            stream: 0,
            schema_version: 1,
            kind: Arc::new(Kind {
                event_type: EventType::new("T").unwrap(),
                content_type: ContentType::Json,
            }),
            occurred_at: recorded_at,
            recorded_at,
            payload: Bytes::new(),
            metadata: None,
        }
    }

    #[test]
    fn log_segments_index_and_search() {
        let at = |i: u64| Timestamp::from_unix_micros(1_000 + (i / 3) as i64).unwrap();
        let mut log = Log::default();
        assert_eq!(log.partition_point(|_| true), 0);
        let n = 2 * SEGMENT as u64 + 5;
        for i in 0..n {
            log.push(record(i, at(i)));
        }
        assert_eq!(log.len(), n);
        assert_eq!(log.sealed().len(), 2 * SEGMENT as u64);
        assert_eq!(log.tail.len(), 5);
        let edge = SEGMENT as u64;
        for p in [0, 1, edge - 1, edge, 2 * edge, n - 1] {
            assert_eq!(log.get(p).version, p);
        }
        // The first position recorded at or after t, across segment edges, as a linear scan.
        for p in [0, 1, 2, 3, edge - 1, edge, edge + 1, n - 1] {
            let t = at(p);
            let want = (0..n).find(|i| at(*i) >= t).unwrap();
            assert_eq!(log.partition_point(|r| r.recorded_at < t), want, "t of {p}");
        }
        assert_eq!(log.partition_point(|_| true), n);
        assert_eq!(log.partition_point(|_| false), 0);
    }

    #[test]
    fn sealed_segments_stay_readable_and_name_their_streams() {
        let at = Timestamp::from_unix_micros(1_000).unwrap();
        let name = |n: usize| StreamId::parse(format!("c-{n}")).unwrap();
        let mut log = Log::default();
        // More streams than one name chunk, numbered in order.
        for n in 0..NAME_CHUNK + 3 {
            assert_eq!(log.add_stream(name(n)), n as u32);
        }
        let push = |log: &mut Log, p: u64| {
            let mut r = record(p, at);
            r.stream = (p % (NAME_CHUNK as u64 + 3)) as u32;
            log.push(r);
        };
        for p in 0..SEGMENT as u64 - 1 {
            push(&mut log, p);
        }
        assert_eq!(log.sealed().len(), 0, "not full yet");
        let empty = log.sealed().clone();
        push(&mut log, SEGMENT as u64 - 1);
        let first = log.sealed().clone();
        assert_eq!((empty.len(), first.len()), (0, SEGMENT as u64));
        // A name added after a seal is in the next snapshot, not in the one readers hold.
        assert_eq!(log.add_stream(name(NAME_CHUNK + 3)), NAME_CHUNK as u32 + 3);
        for p in SEGMENT as u64..2 * SEGMENT as u64 {
            push(&mut log, p);
        }
        let second = log.sealed().clone();
        assert_eq!(
            first.len(),
            SEGMENT as u64,
            "a reader's snapshot never changes"
        );
        assert_eq!(second.len(), 2 * SEGMENT as u64);
        for p in [
            0,
            1,
            SEGMENT as u64 - 1,
            SEGMENT as u64,
            2 * SEGMENT as u64 - 1,
        ] {
            let record = second.get(p);
            assert_eq!(record.version, p);
            assert_eq!(second.name(record.stream), log.name(record.stream));
            assert_eq!(second.name(record.stream), &name(record.stream as usize));
        }
        assert_eq!(second.name(NAME_CHUNK as u32 + 3), &name(NAME_CHUNK + 3));
        assert_eq!(first.get(7).version, 7);
    }
}
