//! Input checks every backend runs before it writes, so that all backends refuse the same input
//! with the same error, and refuse it before anything is stored.

use std::collections::HashSet;

use foldhash::fast::RandomState;
use uuid::Uuid;

use crate::error::Error;
use crate::event::EventData;
use crate::stream_id::StreamId;
use crate::subscription::{Start, SubscriptionMode};
use crate::version::Version;

/// The default limit on one event's size ([`EventData::size`]): 1 MiB.
pub const DEFAULT_MAX_EVENT_SIZE: usize = 1024 * 1024;

/// Checks a batch before it is appended to `stream`; returns its size (the sum of
/// [`EventData::size`]).
///
/// # Errors
/// - [`Error::InvalidInput`] for an empty batch, a nil event id, or an id given twice.
/// - [`Error::EventTooLarge`] for the first event over `max_event_size`.
/// - [`Error::BatchTooLarge`] when the whole batch is over `max_append_size`.
pub fn validate_batch(
    stream: &StreamId,
    events: &[EventData],
    max_event_size: usize,
    max_append_size: Option<usize>,
) -> Result<usize, Error> {
    if events.is_empty() {
        return Err(Error::InvalidInput {
            what: format!("append to stream {stream}"),
            reason: "the batch is empty; an append stores at least one event".into(),
        });
    }
    // Only duplicates within the batch are looked for: a fast seeded hash of the 128-bit id is
    // enough, SipHash would cost more than the rest of the check.
    let mut seen = HashSet::with_capacity_and_hasher(events.len(), RandomState::default());
    let mut total = 0;
    for (index, e) in events.iter().enumerate() {
        if e.event_id.is_nil() {
            return Err(Error::InvalidInput {
                what: format!("event at index {index} of the batch for stream {stream}"),
                reason: "the event id is the nil UUID; ids are the idempotency key".into(),
            });
        }
        if !seen.insert(e.event_id.as_u128()) {
            return Err(Error::InvalidInput {
                what: format!("event at index {index} of the batch for stream {stream}"),
                reason: format!("event id {} appears twice in the batch", e.event_id),
            });
        }
        let size = e.size();
        if size > max_event_size {
            return Err(Error::EventTooLarge {
                stream: stream.clone(),
                event_id: e.event_id,
                index,
                size,
                limit: max_event_size,
            });
        }
        total += size;
    }
    if let Some(limit) = max_append_size.filter(|limit| total > *limit) {
        return Err(Error::BatchTooLarge {
            stream: stream.clone(),
            size: total,
            limit,
        });
    }
    Ok(total)
}

/// Checks that a subscription's start fits its mode.
///
/// # Errors
/// - [`Error::InvalidInput`] for a `Hot` subscription with a start other than `Now`: history is
///   what `HotCold` is for, and silently ignoring the start would hide a bug.
pub fn validate_subscription(start: &Start, mode: SubscriptionMode) -> Result<(), Error> {
    if mode == SubscriptionMode::Hot && *start != Start::Now {
        return Err(Error::InvalidInput {
            what: format!("Hot subscription starting at {start:?}"),
            reason: "Hot subscriptions deliver only live events and start Now; use HotCold to replay from a point".into(),
        });
    }
    Ok(())
}

/// Checks a batched subscription's largest batch.
///
/// # Errors
/// - [`Error::InvalidInput`] for 0: a batch holds at least one event, and a subscription that
///   could deliver nothing would never end.
pub fn validate_max_batch(max_batch: usize) -> Result<(), Error> {
    if max_batch == 0 {
        return Err(Error::InvalidInput {
            what: "max_batch 0 of a batched subscription".into(),
            reason: "a batch holds at least one event; give 1 or more".into(),
        });
    }
    Ok(())
}

/// What a batch is, given which of its ids the stream already holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BatchKind {
    /// No id is stored yet: check the expected version and write.
    New,
    /// Every id is stored, in this order, at consecutive versions from `first`: a retry of an
    /// append that already landed. Report success, store nothing.
    Retry {
        /// The version of the batch's first event.
        first: Version,
    },
}

/// Where an event id is stored, as [`classify_batch`] needs to know it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StoredId {
    /// The version of the event with this id.
    pub version: Version,
    /// The first version of the append that stored it.
    pub batch_first: Version,
    /// How many events that append stored.
    pub batch_len: usize,
}

/// Classifies a batch by looking up where each of its ids is stored in the stream.
///
/// Ids are the idempotency key *within one stream*: the same id in another stream is another
/// event. A batch is a retry only when it is exactly one earlier append: the same ids, in the same
/// order, no more and no fewer; then the original append's versions are reported.
///
/// # Errors
/// - [`Error::IdempotencyConflict`] when some ids are stored but the batch is not exactly one
///   earlier append (a prefix of one, a run spanning two, new ids mixed in): storing it would
///   duplicate those events, refusing it loses nothing.
pub fn classify_batch(
    stream: &StreamId,
    events: &[EventData],
    mut stored: impl FnMut(&Uuid) -> Option<StoredId>,
) -> Result<BatchKind, Error> {
    // Most batches are new: look each id up once and allocate nothing until one is found.
    let Some((hit, hit_at)) = events
        .iter()
        .enumerate()
        .find_map(|(i, e)| stored(&e.event_id).map(|s| (i, s)))
    else {
        return Ok(BatchKind::New);
    };
    if hit == 0 {
        let first = hit_at;
        let whole_append = first.version == first.batch_first
            && first.batch_len == events.len()
            && events[1..].iter().enumerate().all(|(i, e)| {
                stored(&e.event_id)
                    .is_some_and(|s| s.version == Version(first.version.0 + 1 + i as u64))
            });
        if whole_append {
            return Ok(BatchKind::Retry {
                first: first.version,
            });
        }
    }
    Err(Error::IdempotencyConflict {
        stream: stream.clone(),
        event_id: events[hit].event_id,
        version: hit_at.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ContentType, EventType, Payload};

    fn event(size: usize) -> EventData {
        EventData::new(
            EventType::new("T").unwrap(),
            Payload::raw(ContentType::Json, vec![b'1'; size]),
        )
    }

    #[test]
    fn batch_errors() {
        let s = StreamId::parse("a-1").unwrap();
        assert!(matches!(
            validate_batch(&s, &[], 10, None),
            Err(Error::InvalidInput { .. })
        ));
        let e = event(1);
        assert!(matches!(
            validate_batch(&s, &[e.clone(), e.clone()], 10, None),
            Err(Error::InvalidInput { reason, .. }) if reason.contains("twice")
        ));
        assert!(matches!(
            validate_batch(&s, &[event(1).with_id(Uuid::nil())], 10, None),
            Err(Error::InvalidInput { reason, .. }) if reason.contains("nil")
        ));
        let big = event(10);
        assert!(matches!(
            validate_batch(&s, &[event(1), big.clone()], 10, None),
            Err(Error::EventTooLarge { index: 1, size: 11, limit: 10, event_id, .. }) if event_id == big.event_id
        ));
        assert_eq!(validate_batch(&s, &[event(9)], 10, None).unwrap(), 10);
        assert!(matches!(
            validate_batch(&s, &[event(5), event(5)], 10, Some(11)),
            Err(Error::BatchTooLarge {
                size: 12,
                limit: 11,
                ..
            })
        ));
    }

    #[test]
    fn classify_new_retry_conflict() {
        let s = StreamId::parse("a-1").unwrap();
        let (a, b, c, d) = (event(1), event(1), event(1), event(1));
        // Stored: [a, b] at versions 3-4 (one append), then [c] at 5.
        let stored = |id: &Uuid| {
            let at = |v, first, len| {
                Some(StoredId {
                    version: Version(v),
                    batch_first: Version(first),
                    batch_len: len,
                })
            };
            match *id {
                x if x == a.event_id => at(3, 3, 2),
                x if x == b.event_id => at(4, 3, 2),
                x if x == c.event_id => at(5, 5, 1),
                _ => None,
            }
        };
        assert_eq!(
            classify_batch(&s, std::slice::from_ref(&d), stored).unwrap(),
            BatchKind::New
        );
        assert_eq!(
            classify_batch(&s, &[a.clone(), b.clone()], stored).unwrap(),
            BatchKind::Retry { first: Version(3) }
        );
        assert_eq!(
            classify_batch(&s, std::slice::from_ref(&c), stored).unwrap(),
            BatchKind::Retry { first: Version(5) }
        );
        // Reordered, a prefix, a suffix, spanning two appends, or mixed with a new id: conflict
        // naming the first stored id of the batch.
        for (batch, first_stored) in [
            (vec![b.clone(), a.clone()], &b),
            (vec![a.clone()], &a),
            (vec![b.clone()], &b),
            (vec![b.clone(), c.clone()], &b),
            (vec![a.clone(), b.clone(), c.clone()], &a),
            (vec![a.clone(), d.clone()], &a),
            (vec![d.clone(), a.clone()], &a),
        ] {
            match classify_batch(&s, &batch, stored) {
                Err(Error::IdempotencyConflict { event_id, .. }) => {
                    assert_eq!(event_id, first_stored.event_id)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn hot_needs_now() {
        assert!(validate_subscription(&Start::Now, SubscriptionMode::Hot).is_ok());
        assert!(validate_subscription(&Start::Beginning, SubscriptionMode::Hot).is_err());
        assert!(validate_subscription(&Start::Beginning, SubscriptionMode::HotCold).is_ok());
    }
}
