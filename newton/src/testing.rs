//! A given / when / then kit for aggregates: state from past events, one command, and the exact
//! events or refusal expected. No store involved, because `handle` and `apply` are pure; stored
//! events (in an older schema version, say) go through the same [`Decoder`] as a repository's
//! load, so a test sees exactly what production would.

use std::fmt::Debug;

use photon_api::{Category, Checkpoint, Error, EventData, RecordedEvent, StreamId, Version};

use crate::aggregate::{Aggregate, DomainEvent};
use crate::repository::{encode, CommandContext};
use crate::upcast::Decoder;

/// The domain events that `stored` events read as, in order, through `E`'s upcasters, exactly
/// as a repository's load would apply them: to assert what an old event shape becomes. The
/// events are placed at versions 0, 1, ... of a stream `given-stored`, which errors name.
///
/// # Errors
/// - As [`Decoder::new`] and [`Decoder::decode_each`]: a broken chain, a newer schema version
///   than the code knows, a failing upcaster, or a payload that does not decode.
pub fn read_stored<E: DomainEvent>(
    stored: impl IntoIterator<Item = EventData>,
) -> Result<Vec<E>, Error> {
    let stream = StreamId::parse("given-stored")?;
    read_at(&stream, stored)
}

fn read_at<E: DomainEvent>(
    stream: &StreamId,
    stored: impl IntoIterator<Item = EventData>,
) -> Result<Vec<E>, Error> {
    let decoder = Decoder::<E>::new()?;
    let mut events = Vec::new();
    for (version, data) in (0..).zip(stored) {
        decoder.decode_each(&as_recorded(stream, version, data), |e| events.push(e))?;
    }
    Ok(events)
}

/// `data` as the store would hand it back at `version` of `stream`.
fn as_recorded(stream: &StreamId, version: u64, data: EventData) -> RecordedEvent {
    RecordedEvent {
        stream: stream.clone(),
        version: Version(version),
        event_id: data.event_id,
        event_type: data.event_type,
        schema_version: data.schema_version,
        occurred_at: data.occurred_at,
        recorded_at: data.occurred_at,
        payload: data.payload,
        metadata: data.metadata,
        checkpoint: Checkpoint::from_position("testing", version),
    }
}

/// A scenario for aggregate `A`.
#[derive(Debug)]
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// Starts from the state these events build.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for e in events {
            state.apply(&e);
        }
        Self { state }
    }

    /// Starts from the state that these *stored* events build, read through the event type's
    /// upcasters as a repository's load reads them: given v1 events in the store, the aggregate
    /// sees the current shape. Build them with [`EventData::msgpack`] or [`EventData::json`] and
    /// [`EventData::with_schema_version`].
    ///
    /// # Panics
    /// - With the load's error when the events do not read (see [`read_stored`]); to assert on
    ///   that error, call [`read_stored`] instead.
    pub fn given_stored(stored: impl IntoIterator<Item = EventData>) -> Self {
        let stream = Category::new(A::CATEGORY)
            .and_then(|c| StreamId::new(&c, "given"))
            .unwrap_or_else(|e| panic!("Aggregate::CATEGORY: {e}"));
        match read_at::<A::Event>(&stream, stored) {
            Ok(events) => Self::given(events),
            Err(e) => panic!("the given stored events do not read: {e}"),
        }
    }

    /// Starts from an aggregate with no history.
    pub fn given_no_history() -> Self {
        Self::given([])
    }

    /// Handles `command` against the given state.
    pub fn when(self, command: A::Command) -> Outcome<A> {
        let result = self.state.handle(&command);
        Outcome {
            state: self.state,
            result,
        }
    }
}

/// The outcome of a scenario, to assert on.
#[derive(Debug)]
pub struct Outcome<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Outcome<A>
where
    A::Event: PartialEq + Debug,
{
    /// Asserts that exactly `expected` were recorded, and that each survives the store's
    /// encoding and the repository's decoding (so a serde attribute that loses a field, or a
    /// schema version that disagrees with the type's upcasters, is caught here, not in
    /// production). Returns the state after them.
    ///
    /// # Panics
    /// - When the command was refused, or recorded other events.
    /// - When an event's [`DomainEvent::schema_version`] is not the current version of its
    ///   type's upcaster chain (it would be upcast again on every read), or does not read back.
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        let events = match self.result {
            Ok(events) => events,
            Err(e) => panic!("expected events {expected:?}, the command was refused: {e}"),
        };
        assert_eq!(events, expected, "recorded events");
        let decoder = Decoder::<A::Event>::new()
            .unwrap_or_else(|err| panic!("the event type's upcasters are refused: {err}"));
        let stream = StreamId::parse("then-recorded").expect("a valid stream id");
        let mut state = self.state;
        for (version, e) in (0..).zip(&events) {
            let current = decoder.current_version(e.event_type());
            assert_eq!(
                e.schema_version(),
                current,
                "event {} is written at schema version {}, but its upcasters read it at {current}: \
                 make schema_version() return {current}",
                e.event_type(),
                e.schema_version()
            );
            let data = encode(e, &CommandContext::default()).expect("event encodes");
            let back = decoder
                .decode(&as_recorded(&stream, version, data))
                .unwrap_or_else(|err| {
                    panic!("event {} does not decode back: {err}", e.event_type())
                });
            assert_eq!(
                back.as_slice(),
                std::slice::from_ref(e),
                "event {} changes through encoding",
                e.event_type()
            );
            state.apply(e);
        }
        state
    }

    /// Asserts that the command was refused, and passes the error to `check`.
    ///
    /// # Panics
    /// - When the command recorded events.
    pub fn then_expect_error(self, check: impl FnOnce(&A::Error)) {
        match self.result {
            Ok(events) => panic!("expected a refusal, the command recorded {events:?}"),
            Err(e) => check(&e),
        }
    }

    /// Asserts that the command was refused with exactly `expected`.
    ///
    /// # Panics
    /// - When the command recorded events or was refused otherwise.
    pub fn then_expect_error_eq(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        self.then_expect_error(|e| assert_eq!(e, &expected, "refusal"));
    }
}
