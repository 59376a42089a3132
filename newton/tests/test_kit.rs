//! The given/when/then kit.

mod support;

use newton::testing::AggregateTest;
use support::{Tally, TallyCommand, TallyError, TallyEvent};

#[test]
fn given_when_then_events() {
    let state = AggregateTest::<Tally>::given([TallyEvent::Added { amount: 2 }])
        .when(TallyCommand::Add(3))
        .then_expect_events([TallyEvent::Added { amount: 3 }]);
    assert_eq!(state.total, 5);
    AggregateTest::<Tally>::given_no_history()
        .when(TallyCommand::Touch)
        .then_expect_events([]);
}

#[test]
fn given_when_then_error() {
    AggregateTest::<Tally>::given_no_history()
        .when(TallyCommand::Add(0))
        .then_expect_error_eq(TallyError::Zero);
    AggregateTest::<Tally>::given_no_history()
        .when(TallyCommand::Add(0))
        .then_expect_error(|e| assert_eq!(e.to_string(), "cannot add zero"));
}

#[test]
#[should_panic(expected = "recorded events")]
fn wrong_events_fail_the_test() {
    AggregateTest::<Tally>::given_no_history()
        .when(TallyCommand::Add(1))
        .then_expect_events([TallyEvent::Added { amount: 2 }]);
}

#[test]
#[should_panic(expected = "the command was refused")]
fn a_refusal_where_events_were_expected_fails_the_test() {
    AggregateTest::<Tally>::given_no_history()
        .when(TallyCommand::Add(0))
        .then_expect_events([TallyEvent::Added { amount: 0 }]);
}

#[test]
#[should_panic(expected = "expected a refusal")]
fn events_where_a_refusal_was_expected_fail_the_test() {
    AggregateTest::<Tally>::given_no_history()
        .when(TallyCommand::Add(1))
        .then_expect_error(|_| {});
}
