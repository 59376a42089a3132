//! Reads for callers: one stream by version, the chunks a subscription copies out, versions
//! and listings. Nothing here writes.
//!
//! A read takes the read lock once per chunk (at most [`CHUNK`] events), and only to pick the
//! chunk's positions: events in sealed segments are copied out after the lock is released, so
//! an append waits for a reader for well under a microsecond. Only a chunk in the log's tail
//! is copied under the lock. Copies share the stored payloads and names (no payload copies).

use std::collections::VecDeque;
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use photon_api::{
    Category, Direction, Error, ReadOptions, RecordedEvent, Selector, StreamId, Timestamp, Version,
};

use crate::client::{Sealed, Shared, State, StreamIndex, CHUNK};

/// The events of one stream, as [`photon_api::EventStore::read_stream`] describes.
pub(crate) fn read_stream(
    shared: &Arc<Shared>,
    stream: &StreamId,
    options: ReadOptions,
) -> BoxStream<'static, Result<RecordedEvent, Error>> {
    let shared = shared.clone();
    let stream = stream.clone();
    // The next version to return; None once exhausted. Backwards reads clamp it to the last
    // version, so "from the end" is simply "from the largest version".
    let next = Some(options.from.map_or(
        match options.direction {
            Direction::Forwards => 0,
            Direction::Backwards => u64::MAX,
        },
        Version::value,
    ));
    let remaining = options.limit.unwrap_or(usize::MAX);
    stream::unfold((next, remaining), move |(next, remaining)| {
        let (shared, stream) = (shared.clone(), stream.clone());
        async move {
            let v = next?;
            if remaining == 0 {
                return None;
            }
            let take = remaining.min(CHUNK) as u64;
            let (chunk, next) = shared
                .read()
                .stream_chunk(&stream, v, take, options.direction)?;
            // The lock is released: copy out of sealed segments now.
            let chunk = chunk.copy();
            let remaining = remaining - chunk.len();
            Some((stream::iter(chunk.into_iter().map(Ok)), (next, remaining)))
        }
    })
    .flatten()
    .boxed()
}

/// The current version of `stream`; None while it has no events.
pub(crate) fn stream_version(shared: &Shared, stream: &StreamId) -> Option<Version> {
    shared
        .read()
        .streams
        .get(stream)
        .and_then(StreamIndex::version)
}

/// Every category with events, sorted.
pub(crate) fn list_categories(shared: &Shared) -> Result<Vec<Category>, Error> {
    let mut names: Vec<Category> = shared
        .read()
        .categories
        .keys()
        .map(|k| Category::new(&**k))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

/// Every stream of `category`, sorted.
pub(crate) fn list_streams(
    shared: &Shared,
    category: &Category,
) -> BoxStream<'static, Result<StreamId, Error>> {
    let streams: Vec<StreamId> = shared
        .read()
        .categories
        .get(category.as_str())
        .map(|c| c.streams.iter().cloned().collect())
        .unwrap_or_default();
    stream::iter(streams.into_iter().map(Ok)).boxed()
}

/// How many events the store holds.
pub(crate) fn len(shared: &Shared) -> u64 {
    shared.read().log.len()
}

/// The log positions a selector covers, in order.
enum Positions<'a> {
    All,
    Some(&'a [u64]),
}

/// A subscription's place in the log, kept between fetches.
pub(crate) struct Place {
    /// The smallest log position not yet fetched.
    pub(crate) next: u64,
    /// Where `next` was in the selector's positions after the last fetch: the next fetch looks
    /// there first instead of searching the whole list under the lock.
    index: usize,
}

impl Place {
    /// At log position `next`.
    pub(crate) fn at(next: u64) -> Self {
        Self { next, index: 0 }
    }
}

/// A chunk's events: copied under the lock (from the tail), or still to copy from sealed
/// segments once the lock is released.
enum Chunk {
    Copied(Vec<RecordedEvent>),
    Sealed(Arc<Sealed>, Vec<u64>),
}

impl Chunk {
    /// The events, copying those of sealed segments now.
    fn copy(self) -> Vec<RecordedEvent> {
        match self {
            Chunk::Copied(events) => events,
            Chunk::Sealed(sealed, positions) => {
                positions.iter().map(|p| sealed.event(*p)).collect()
            }
        }
    }
}

impl State {
    /// Up to `take` events of `stream` from version `v` on in `direction`, and the version to
    /// continue from; None when there are none.
    fn stream_chunk(
        &self,
        stream: &StreamId,
        v: u64,
        take: u64,
        direction: Direction,
    ) -> Option<(Chunk, Option<u64>)> {
        let all = self.streams.get(stream).map_or(&[][..], |s| &s.positions);
        let len = all.len() as u64;
        let sealed = self.log.sealed().len();
        let (positions, next) = match direction {
            Direction::Forwards => {
                let window = &all[v.min(len) as usize..v.saturating_add(take).min(len) as usize];
                let n = same_side(window.iter(), sealed);
                let to = v + n as u64;
                (window[..n].to_vec(), (to < len).then_some(to))
            }
            Direction::Backwards => {
                let top = len.checked_sub(1).map(|last| v.min(last))?;
                let window = &all[(top + 1).saturating_sub(take) as usize..=top as usize];
                let n = same_side(window.iter().rev(), sealed);
                let taken = window[window.len() - n..].iter().rev().copied().collect();
                (taken, (top + 1 - n as u64).checked_sub(1))
            }
        };
        (!positions.is_empty()).then(|| (self.chunk(positions), next))
    }

    /// The events at `positions`, all sealed or all in the tail: those in the tail copied now.
    fn chunk(&self, positions: Vec<u64>) -> Chunk {
        let sealed = self.log.sealed();
        match positions.first() {
            Some(p) if *p < sealed.len() => Chunk::Sealed(sealed.clone(), positions),
            _ => Chunk::Copied(positions.iter().map(|p| self.log.event(*p)).collect()),
        }
    }

    /// The log positions a selector covers, in order; empty for a stream or category with no
    /// events yet (it may get some later).
    fn positions(&self, selector: &Selector) -> Positions<'_> {
        match selector {
            Selector::All => Positions::All,
            Selector::Category(c) => Positions::Some(
                self.categories
                    .get(c.as_str())
                    .map_or(&[][..], |c| &c.positions),
            ),
            Selector::Stream(s) => {
                Positions::Some(self.streams.get(s).map_or(&[][..], |s| &s.positions))
            }
        }
    }

    /// Picks up to [`CHUNK`] positions of `selector` from `place` on and below `end`, all sealed
    /// or all in the tail, and moves `place` past them. Events in the tail are copied into
    /// `out` now; sealed ones are left in `positions`, with the segments to copy them from once
    /// the lock is released. Returns the log length seen as well.
    pub(crate) fn fetch(
        &self,
        selector: &Selector,
        place: &mut Place,
        end: u64,
        positions: &mut Vec<u64>,
        out: &mut VecDeque<RecordedEvent>,
    ) -> (u64, Option<Arc<Sealed>>) {
        let len = self.log.len();
        let end = end.min(len);
        let sealed = self.log.sealed();
        match self.positions(selector) {
            Positions::All => {
                let from = place.next;
                let mut to = end.min(from.saturating_add(CHUNK as u64));
                if from < sealed.len() {
                    to = to.min(sealed.len());
                }
                positions.extend(from..to);
            }
            Positions::Some(all) => {
                let from = find(all, place.next, place.index);
                let window = &all[from..all.len().min(from + CHUNK)];
                let window = &window[..window.partition_point(|p| *p < end)];
                let n = same_side(window.iter(), sealed.len());
                positions.extend_from_slice(&window[..n]);
                place.index = from + n;
            }
        }
        let Some(last) = positions.last() else {
            return (len, None);
        };
        place.next = last + 1;
        if positions[0] < sealed.len() {
            return (len, Some(sealed.clone()));
        }
        out.extend(positions.drain(..).map(|p| self.log.event(p)));
        (len, None)
    }

    /// The first log position recorded at or after `t`.
    pub(crate) fn position_at(&self, t: Timestamp) -> u64 {
        self.log.partition_point(|e| e.recorded_at < t)
    }
}

/// How many of `positions`, in read order, lie on the same side of the sealed end `sealed` as
/// the first one: a chunk is copied either under the lock or after it, never partly each.
fn same_side<'a>(mut positions: impl Iterator<Item = &'a u64>, sealed: u64) -> usize {
    let Some(first) = positions.next() else {
        return 0;
    };
    let in_sealed = *first < sealed;
    1 + positions
        .take_while(|p| (**p < sealed) == in_sealed)
        .count()
}

/// The index of the first of `all` at or after `next`: `hint` when it is that index (the usual
/// case: a cursor goes on where it stopped), else found by binary search.
fn find(all: &[u64], next: u64, hint: usize) -> usize {
    let fits = hint <= all.len()
        && (hint == 0 || all[hint - 1] < next)
        && all.get(hint).is_none_or(|p| *p >= next);
    if fits {
        hint
    } else {
        all.partition_point(|p| *p < next)
    }
}
