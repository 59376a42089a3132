//! The append protocol: validate outside the lock, then under one short write lock classify the
//! batch (new or retry), check the expected version, and only then store, so a refused batch
//! changes nothing and an accepted one lands whole; finally move the head that live
//! subscriptions wait on.
//!
//! Nothing here reads for callers (that is `reader`) or decides how a record is encoded (that is
//! `codec`).

use photon_api::validate::{classify_batch, validate_batch, BatchKind};
use photon_api::{AppendResult, Error, EventData, ExpectedVersion, StreamId, Timestamp, Version};

use crate::client::{Shared, State, StreamIndex};
use crate::codec::checkpoint;
use crate::error;

/// Appends `events` to `stream` if it is at `expected`; see [`photon_api::EventStore::append`].
pub(crate) fn append(
    shared: &Shared,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
) -> Result<AppendResult, Error> {
    validate_batch(stream, &events, shared.config.max_event_size, None)?;
    let (result, len) = {
        let mut state = shared.write();
        let result = state.append(stream, expected, events)?;
        (result, state.log.len())
    };
    shared.head.send_if_modified(|head| {
        let grew = len > *head;
        *head = (*head).max(len);
        grew
    });
    Ok(result)
}

impl State {
    fn append(
        &mut self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        let existing = self.streams.get(stream);
        let kind = classify_batch(stream, &events, |id| existing.and_then(|s| s.stored(id)))?;
        if let BatchKind::Retry { first } = kind {
            let index = existing.expect("a retry has a stream");
            return Ok(retried(index, first, events.len()));
        }
        let current = existing.and_then(StreamIndex::version);
        if !expected.matches(current) {
            return Err(error::wrong_expected_version(stream, expected, current));
        }
        // Every check passed: from here on nothing fails, so the batch lands whole.
        Ok(self.store(stream, current.map_or(Version(0), Version::next), events))
    }

    /// Stores a checked batch from `first_version` on.
    fn store(
        &mut self,
        stream: &StreamId,
        first_version: Version,
        events: Vec<EventData>,
    ) -> AppendResult {
        let recorded_at = self.stamp();
        self.index_stream(stream);
        let batch_len = events.len();
        let index = self.streams.get_mut(stream).expect("the stream is indexed");
        let category = self
            .categories
            .get_mut(stream.category_name())
            .expect("a stream's category is indexed with the stream");
        index.batches.push(first_version.0);
        index.positions.reserve(batch_len);
        index.ids.reserve(batch_len);
        category.positions.reserve(batch_len);
        let mut checkpoints = Vec::with_capacity(batch_len);
        for (i, e) in events.into_iter().enumerate() {
            let position = self.log.len();
            let version = first_version.0 + i as u64;
            index.positions.push(position);
            index.ids.insert(e.event_id.as_u128(), version);
            category.positions.push(position);
            checkpoints.push(checkpoint(position));
            let record = self.encoder.record(e, index.number, version, recorded_at);
            self.log.push(record);
        }
        AppendResult {
            first_version,
            last_version: Version(first_version.0 + batch_len as u64 - 1),
            checkpoints,
        }
    }

    /// The time to record a batch at: now, or the last batch's time if the clock went back, so
    /// `recorded_at` never decreases along the log.
    fn stamp(&mut self) -> Timestamp {
        let now = Timestamp::now();
        let recorded_at = match self.last_recorded {
            Some(last) if last > now => last,
            _ => now,
        };
        self.last_recorded = Some(recorded_at);
        recorded_at
    }

    /// Indexes `stream` and its category if this is the stream's first append.
    fn index_stream(&mut self, stream: &StreamId) {
        if self.streams.contains_key(stream) {
            return;
        }
        let number = self.log.add_stream(stream.clone());
        let category = match self.categories.get_mut(stream.category_name()) {
            Some(c) => c,
            None => self
                .categories
                .entry(stream.category_name().into())
                .or_default(),
        };
        category.streams.insert(stream.clone());
        self.streams.insert(
            stream.clone(),
            StreamIndex {
                number,
                ..StreamIndex::default()
            },
        );
    }
}

/// What a retry of the append that stored `len` events from `first` on reports.
fn retried(index: &StreamIndex, first: Version, len: usize) -> AppendResult {
    let range = first.0 as usize..first.0 as usize + len;
    AppendResult {
        first_version: first,
        last_version: Version(range.end as u64 - 1),
        checkpoints: index.positions[range]
            .iter()
            .map(|p| checkpoint(*p))
            .collect(),
    }
}
