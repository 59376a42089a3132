//! The version index of one partition: for every stream in it, the offset of each version, the
//! appends (for idempotent retries) and the event ids. It is rebuilt by reading the partition and
//! kept current by reading only what was added since, so loading an aggregate never scans the
//! topic, and a partition is read in full at most once per process.
//!
//! Memory: about 40 bytes per event, 16 per append, and each stream's name plus about 120 bytes
//! per stream; [`PartitionIndex::bytes`] counts it, and every index of a store adds to one shared
//! [`IndexBytes`] as it grows (and takes its share back when dropped), so the store can tell in
//! O(1) whether its indexes hold more than their bound (client.rs then drops the least recently
//! used).
//!
//! The index talks to no broker: reader.rs feeds it the records it reads, writer.rs its own
//! committed records, and both hold the partition's lock while they do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use photon_api::validate::StoredId;
use photon_api::{Uuid, Version};

use crate::codec::IndexEntry;

/// What one indexed event costs: its offset, and its id in the id map with the map's overhead.
const EVENT_BYTES: usize = 40;

/// What a stream costs beyond its name: its entry, its map slot, its vectors' headers.
const STREAM_BYTES: usize = 120;

/// What one append costs: its first version and length.
const BATCH_BYTES: usize = 16;

/// What all the indexes of one store hold together, in bytes: each index adds what it grows by
/// and subtracts what it held when it is dropped, so checking the store's bound after every
/// commit and catch-up costs one load instead of a look at every partition.
#[derive(Clone, Default, Debug)]
pub(crate) struct IndexBytes(Arc<AtomicUsize>);

impl IndexBytes {
    /// The bytes every live index of the store holds.
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One stream's entry.
#[derive(Default, Debug)]
pub(crate) struct StreamEntry {
    /// `offsets[v]` is the offset of version `v`.
    pub(crate) offsets: Vec<i64>,
    /// Appends as (first version, length), in version order.
    batches: Vec<(u64, u32)>,
    ids: HashMap<Uuid, u64>,
}

/// The index of one partition, complete up to `next_offset`.
#[derive(Default, Debug)]
pub(crate) struct PartitionIndex {
    /// The first offset not read yet.
    pub(crate) next_offset: i64,
    /// Whether the last photon record indexed was not its append's last: a catch-up cut off
    /// there (its deadline, its future dropped, an error) left part of an append indexed,
    /// which no read may end or plan at (design.md guarantee 2) until the rest is indexed.
    mid_append: bool,
    /// `photon.recorded_at` of the last event, so the next append's time never goes backwards in
    /// the partition even when writers' clocks differ (offsets-for-times relies on it).
    pub(crate) last_recorded: i64,
    streams: HashMap<String, StreamEntry>,
    /// An estimate of the memory held, see [`EVENT_BYTES`] and the others.
    bytes: usize,
    /// When a reader or writer last brought it up to date: the least recently used index is
    /// the first dropped when the store's indexes hold too much.
    pub(crate) used: Option<Instant>,
    /// The store's total, which `bytes` is part of.
    total: IndexBytes,
}

impl Drop for PartitionIndex {
    fn drop(&mut self) {
        self.total.0.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl PartitionIndex {
    /// An empty index counted in the store's `total`.
    pub(crate) fn counted(total: IndexBytes) -> Self {
        Self {
            next_offset: 0,
            mid_append: false,
            last_recorded: 0,
            streams: HashMap::new(),
            bytes: 0,
            used: None,
            total,
        }
    }

    /// Adds what the index grew by to its own count and the store's.
    fn grow(&mut self, bytes: usize) {
        self.bytes += bytes;
        self.total.0.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Adds the record at `offset`. A version out of sequence (a record not written through
    /// photon's writer) is left out and reported, so the index never claims a gap or a repeat.
    pub(crate) fn apply(&mut self, offset: i64, e: IndexEntry) -> bool {
        let mut grew = 0;
        if !self.streams.contains_key(&e.stream) {
            grew += e.stream.len() + STREAM_BYTES;
        }
        let s = self.streams.entry(e.stream).or_default();
        if e.version != s.offsets.len() as u64 {
            let expected = s.offsets.len();
            self.grow(grew);
            tracing::warn!(
                offset,
                version = e.version,
                expected,
                "photon-kafka: record out of version sequence left out of the index"
            );
            return false;
        }
        // Only an event indexed moves it: a record left out (foreign, out of sequence) is not
        // part of an append photon can complete, and waiting for its rest would never end.
        self.mid_append = e.version + 1 < e.batch_first + u64::from(e.batch_len);
        if e.version == e.batch_first {
            s.batches.push((e.batch_first, e.batch_len));
            grew += BATCH_BYTES;
        }
        grew += EVENT_BYTES;
        s.ids.insert(e.event_id, e.version);
        s.offsets.push(offset);
        self.last_recorded = self.last_recorded.max(e.recorded_at);
        self.grow(grew);
        true
    }

    /// Whether the index holds the first events of an append but not its last: a read must
    /// index on to the append's end before it hands out or plans from what is indexed.
    pub(crate) fn mid_append(&self) -> bool {
        self.mid_append
    }

    /// An estimate of the memory this index holds, in bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The stream's last version.
    pub(crate) fn current(&self, stream: &str) -> Option<Version> {
        self.streams
            .get(stream)
            .and_then(|s| s.offsets.len().checked_sub(1))
            .map(|v| Version(v as u64))
    }

    /// Where `id` is stored in `stream`.
    pub(crate) fn stored(&self, stream: &str, id: &Uuid) -> Option<StoredId> {
        let s = self.streams.get(stream)?;
        let version = *s.ids.get(id)?;
        let at = s.batches.partition_point(|(first, _)| *first <= version);
        let (first, len) = s.batches[at.checked_sub(1)?];
        Some(StoredId {
            version: Version(version),
            batch_first: Version(first),
            batch_len: len as usize,
        })
    }

    /// The offsets of the stream's versions.
    pub(crate) fn offsets(&self, stream: &str) -> &[i64] {
        self.streams
            .get(stream)
            .map(|s| s.offsets.as_slice())
            .unwrap_or_default()
    }

    /// Every stream with at least one event.
    pub(crate) fn streams(&self) -> impl Iterator<Item = &str> {
        self.streams.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stream: &str, id: u128, version: u64, batch: (u64, u32)) -> IndexEntry {
        IndexEntry {
            stream: stream.into(),
            event_id: Uuid::from_u128(id),
            version,
            batch_first: batch.0,
            batch_len: batch.1,
            recorded_at: version as i64,
        }
    }

    #[test]
    fn tracks_versions_batches_and_ids() {
        let mut ix = PartitionIndex::default();
        assert!(ix.apply(10, entry("a-1", 1, 0, (0, 2))));
        assert!(ix.apply(11, entry("a-1", 2, 1, (0, 2))));
        assert!(ix.apply(12, entry("a-2", 3, 0, (0, 1))));
        assert!(ix.apply(14, entry("a-1", 4, 2, (2, 1))));
        assert_eq!(ix.current("a-1"), Some(Version(2)));
        assert_eq!(ix.current("a-3"), None);
        assert_eq!(ix.offsets("a-1"), &[10, 11, 14]);
        let s = ix.stored("a-1", &Uuid::from_u128(2)).unwrap();
        assert_eq!(
            (s.version, s.batch_first, s.batch_len),
            (Version(1), Version(0), 2)
        );
        let s = ix.stored("a-1", &Uuid::from_u128(4)).unwrap();
        assert_eq!((s.batch_first, s.batch_len), (Version(2), 1));
        assert!(ix.stored("a-2", &Uuid::from_u128(1)).is_none());
        assert_eq!(ix.last_recorded, 2);
        assert_eq!(
            ix.bytes(),
            2 * (3 + STREAM_BYTES) + 4 * EVENT_BYTES + 3 * BATCH_BYTES
        );
    }

    #[test]
    fn the_store_total_follows_every_index_and_forgets_a_dropped_one() {
        let total = IndexBytes::default();
        let mut a = PartitionIndex::counted(total.clone());
        let mut b = PartitionIndex::counted(total.clone());
        a.apply(0, entry("a-1", 1, 0, (0, 1)));
        b.apply(0, entry("b-1", 2, 0, (0, 2)));
        b.apply(1, entry("b-1", 3, 1, (0, 2)));
        b.apply(2, entry("b-1", 4, 7, (7, 1)));
        assert_eq!(total.get(), a.bytes() + b.bytes());
        drop(b);
        assert_eq!(total.get(), a.bytes());
        drop(a);
        assert_eq!(total.get(), 0);
    }

    #[test]
    fn knows_when_it_holds_part_of_an_append() {
        let mut ix = PartitionIndex::default();
        assert!(!ix.mid_append());
        assert!(ix.apply(0, entry("a-1", 1, 0, (0, 1))));
        assert!(!ix.mid_append());
        // A catch-up cut off after two of an append's three events.
        assert!(ix.apply(1, entry("a-1", 2, 1, (1, 3))));
        assert!(ix.mid_append());
        assert!(ix.apply(2, entry("a-1", 3, 2, (1, 3))));
        assert!(ix.mid_append());
        // A record left out does not change it either way.
        assert!(!ix.apply(3, entry("a-1", 9, 9, (9, 1))));
        assert!(ix.mid_append());
        assert!(ix.apply(4, entry("a-1", 4, 3, (1, 3))));
        assert!(!ix.mid_append());
    }

    #[test]
    fn leaves_out_records_out_of_sequence() {
        let mut ix = PartitionIndex::default();
        assert!(ix.apply(0, entry("a-1", 1, 0, (0, 1))));
        assert!(!ix.apply(1, entry("a-1", 2, 5, (5, 1))));
        assert!(!ix.apply(2, entry("a-1", 3, 0, (0, 1))));
        assert_eq!(ix.offsets("a-1"), &[0]);
    }
}
