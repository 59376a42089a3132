//! A given / when / then kit for aggregates: state from past events, one command, and the exact
//! events or refusal expected. No store involved, because `handle` and `apply` are pure.

use std::fmt::Debug;

use crate::aggregate::{Aggregate, DomainEvent};

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
    /// encoding (so a serde attribute that loses a field is caught here, not in production).
    /// Returns the state after them.
    ///
    /// # Panics
    /// - When the command was refused, or recorded other events.
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        let events = match self.result {
            Ok(events) => events,
            Err(e) => panic!("expected events {expected:?}, the command was refused: {e}"),
        };
        assert_eq!(events, expected, "recorded events");
        let mut state = self.state;
        for e in &events {
            let bytes = rmp_serde::to_vec_named(e).expect("event encodes");
            let back: A::Event = rmp_serde::from_slice(&bytes).unwrap_or_else(|err| {
                panic!("event {} does not decode back: {err}", e.event_type())
            });
            assert_eq!(
                &back,
                e,
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
