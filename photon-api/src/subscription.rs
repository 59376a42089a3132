//! What to read and how: stream reads, subscription selectors, starts and modes.

use crate::checkpoint::Checkpoint;
use crate::event::{RecordedEvent, Timestamp};
use crate::stream_id::{Category, StreamId};
use crate::version::Version;

/// Which way to read one stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forwards,
    /// Newest first.
    Backwards,
}

/// Where and how far to read one aggregate stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ReadOptions {
    /// Which way.
    pub direction: Direction,
    /// The first version returned (inclusive). None: the start (forwards) or the end (backwards).
    pub from: Option<Version>,
    /// At most this many events. None: no limit.
    pub limit: Option<usize>,
}

impl ReadOptions {
    /// The whole stream, oldest first.
    pub fn forwards() -> Self {
        Self::default()
    }

    /// The whole stream, newest first.
    pub fn backwards() -> Self {
        Self {
            direction: Direction::Backwards,
            ..Self::default()
        }
    }

    /// Starts at `version` (inclusive).
    pub fn from_version(mut self, version: Version) -> Self {
        self.from = Some(version);
        self
    }

    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// Which events a subscription delivers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Selector {
    /// One aggregate stream.
    Stream(StreamId),
    /// Every stream of one category, the input of views.
    Category(Category),
    /// Every event in the store, where `Capabilities::all_stream` says so.
    All,
}

/// Where a subscription starts.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Start {
    /// The first event there is.
    Beginning,
    /// Just after the event that carried this checkpoint.
    After(Checkpoint),
    /// The first event the store recorded at or after this time (`RecordedEvent::recorded_at`).
    Time(Timestamp),
    /// After the last event stored when the subscription starts.
    Now,
}

/// How a subscription treats history and the live tail.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SubscriptionMode {
    /// Replay from the start up to the head as of the moment the subscription starts, then end.
    Cold,
    /// Live only: events stored after the subscription started. The start must be `Start::Now`.
    Hot,
    /// Replay, then live, with no gap and no duplicate between the two.
    HotCold,
}

/// One item of a subscription.
// Boxing the event would cost an allocation per delivered event; `CaughtUp` is sent once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, Debug)]
pub enum SubscriptionItem {
    /// A stored event, in per-stream order.
    Event(RecordedEvent),
    /// Sent once: in `HotCold` when the replay has reached the head (a view is "current", a
    /// rebuild is done), in `Hot` as soon as the subscription is live (events stored after this
    /// item are delivered). Never sent in `Cold`.
    CaughtUp,
}

/// A run of a subscription's items, as [`crate::EventStore::subscribe_batches`] delivers them:
/// consecutive events, or `CaughtUp`.
///
/// A replay handed out one event per poll pays for every event what a batch pays once (a
/// poll through the stream's layers, a move of the event through each) — on photon-memory
/// about a tenth of a replay's time. A batch is read in place.
#[derive(Clone, PartialEq, Debug)]
pub enum SubscriptionBatch {
    /// One or more events, in the order [`crate::EventStore::subscribe`] delivers them; never
    /// empty.
    Events(Vec<RecordedEvent>),
    /// As [`SubscriptionItem::CaughtUp`]: sent once, between the events before it and after.
    CaughtUp,
}

impl SubscriptionItem {
    /// The event, if this item is one.
    pub fn into_event(self) -> Option<RecordedEvent> {
        match self {
            SubscriptionItem::Event(e) => Some(e),
            SubscriptionItem::CaughtUp => None,
        }
    }
}
