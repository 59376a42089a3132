//! Registers (`EventStore::load_register` / `save_register`): a named value a save replaces,
//! fenced by revision like an append by version, idempotent for a re-send of the latest save,
//! checked before anything is stored, and never an event.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::time::Duration;

use futures::StreamExt;
use photon_api::{
    Bytes, Error, ExpectedVersion, Register, Selector, Start, SubscriptionItem, SubscriptionMode,
    Uuid, MAX_REGISTER_NAME_LEN, MAX_REGISTER_VALUE,
};

use crate::support::{fresh_stream, next_event, next_within, numbered, read_all};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_register_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            register_saves_replace_and_load_the_latest,
            register_stale_save_is_refused,
            register_racing_savers_one_wins,
            register_resend_is_answered_once,
            register_bad_input_is_refused,
            registers_are_not_events,
        }
    };
}

/// A register name no other run uses, with characters a key-value mapping must keep as given.
fn fresh_name(h: &Harness, what: &str) -> String {
    format!("{}/{what}#3 ü", h.category())
}

fn value(text: &str) -> Bytes {
    Bytes::from(text.to_owned())
}

/// Saves start at revision 0, each replaces the value, a load returns the latest, from another
/// client too; the largest value the contract allows round-trips whole.
pub async fn register_saves_replace_and_load_the_latest(h: &Harness) {
    let store = h.client().await;
    let name = fresh_name(h, "view");
    assert_eq!(store.load_register(&name).await.unwrap(), None);

    let first = Uuid::new_v4();
    assert_eq!(
        store
            .save_register(&name, None, first, value("one"))
            .await
            .unwrap(),
        0
    );
    let second = Uuid::new_v4();
    assert_eq!(
        store
            .save_register(&name, Some(0), second, value("two"))
            .await
            .unwrap(),
        1
    );
    let other_client = h.client().await;
    assert_eq!(
        other_client.load_register(&name).await.unwrap(),
        Some(Register {
            revision: 1,
            save_id: second,
            value: value("two"),
        })
    );

    // The largest value, with every byte value, from the other client.
    let big: Bytes = (0..MAX_REGISTER_VALUE).map(|i| (i % 251) as u8).collect();
    let third = Uuid::new_v4();
    assert_eq!(
        other_client
            .save_register(&name, Some(1), third, big.clone())
            .await
            .unwrap(),
        2
    );
    let loaded = store.load_register(&name).await.unwrap().expect("saved");
    assert_eq!((loaded.revision, loaded.save_id), (2, third));
    assert!(loaded.value == big, "the largest value came back changed");

    // An empty value is a value, not an absence.
    let fourth = Uuid::new_v4();
    store
        .save_register(&name, Some(2), fourth, Bytes::new())
        .await
        .unwrap();
    let loaded = store.load_register(&name).await.unwrap().expect("saved");
    assert_eq!((loaded.revision, loaded.value.len()), (3, 0));

    // Names are distinct keys: a name that extends another is another register.
    let longer = format!("{name}/x");
    assert_eq!(store.load_register(&longer).await.unwrap(), None);
}

/// A save whose expectation does not hold is refused with the revision found and changes
/// nothing: a stale revision, "never saved" on a saved register, a revision on a new one.
pub async fn register_stale_save_is_refused(h: &Harness) {
    let store = h.client().await;
    let name = fresh_name(h, "stale");
    let fresh = fresh_name(h, "never");
    store
        .save_register(&name, None, Uuid::new_v4(), value("a"))
        .await
        .unwrap();
    let kept = Uuid::new_v4();
    store
        .save_register(&name, Some(0), kept, value("b"))
        .await
        .unwrap();

    for (target, expected, actual) in [
        (&name, Some(0), Some(1)),
        (&name, None, Some(1)),
        (&name, Some(7), Some(1)),
        (&fresh, Some(0), None),
    ] {
        let e = store
            .save_register(target, expected, Uuid::new_v4(), value("rival"))
            .await
            .unwrap_err();
        match &e {
            Error::RevisionConflict {
                register,
                expected: e_expected,
                actual: e_actual,
            } => {
                assert_eq!(register, target);
                assert_eq!((*e_expected, *e_actual), (expected, actual), "{e}");
            }
            other => panic!("expected RevisionConflict for {expected:?}, got {other:?}"),
        }
        assert!(!e.is_retryable());
    }
    assert_eq!(
        store.load_register(&name).await.unwrap(),
        Some(Register {
            revision: 1,
            save_id: kept,
            value: value("b"),
        })
    );
    assert_eq!(store.load_register(&fresh).await.unwrap(), None);
}

/// Separate clients saving over the same revision at once: exactly one is stored each round,
/// the others hear `RevisionConflict`, and the register holds the winner's value.
pub async fn register_racing_savers_one_wins(h: &Harness) {
    const RACERS: usize = 6;
    const ROUNDS: u64 = 3;
    let mut clients = Vec::new();
    for _ in 0..RACERS {
        clients.push(h.client().await);
    }
    let name = fresh_name(h, "race");
    let mut expected = None;
    for round in 0..ROUNDS {
        let saves = clients.iter().enumerate().map(|(i, c)| {
            let (c, name) = (c.clone(), name.clone());
            let id = Uuid::new_v4();
            async move {
                let result = c
                    .save_register(&name, expected, id, value(&format!("{round}:{i}")))
                    .await;
                (i, id, result)
            }
        });
        let results = futures::future::join_all(saves).await;
        let mut winners = Vec::new();
        for (i, id, result) in results {
            match result {
                Ok(revision) => winners.push((i, id, revision)),
                Err(Error::RevisionConflict { .. }) => {}
                Err(e) => panic!("round {round}, saver {i}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let (i, id, revision) = winners[0];
        assert_eq!(revision, round);
        let loaded = clients[0]
            .load_register(&name)
            .await
            .unwrap()
            .expect("saved");
        assert_eq!(
            (loaded.revision, loaded.save_id, loaded.value),
            (round, id, value(&format!("{round}:{i}")))
        );
        expected = Some(round);
    }
}

/// A re-send of the latest save (its answer was lost) stores nothing and answers its revision,
/// from another client too; once a later save replaced it, a re-send is a conflict.
pub async fn register_resend_is_answered_once(h: &Harness) {
    let store = h.client().await;
    let name = fresh_name(h, "resend");
    let first = Uuid::new_v4();
    store
        .save_register(&name, None, first, value("first"))
        .await
        .unwrap();
    // The first save re-sent.
    assert_eq!(
        store
            .save_register(&name, None, first, value("first"))
            .await
            .unwrap(),
        0
    );
    let second = Uuid::new_v4();
    assert_eq!(
        store
            .save_register(&name, Some(0), second, value("second"))
            .await
            .unwrap(),
        1
    );
    let other_client = h.client().await;
    assert_eq!(
        other_client
            .save_register(&name, Some(0), second, value("second"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .load_register(&name)
            .await
            .unwrap()
            .map(|r| r.revision),
        Some(1)
    );
    store
        .save_register(&name, Some(1), Uuid::new_v4(), value("third"))
        .await
        .unwrap();
    let e = store
        .save_register(&name, Some(0), second, value("second"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::RevisionConflict {
                expected: Some(0),
                actual: Some(2),
                ..
            }
        ),
        "{e}"
    );
}

/// Names and values the contract refuses are `InvalidInput` naming the register, before
/// anything is stored or sent.
pub async fn register_bad_input_is_refused(h: &Harness) {
    let store = h.client().await;
    let name = fresh_name(h, "input");
    let too_long = "n".repeat(MAX_REGISTER_NAME_LEN + 1);
    for bad in ["", "line\nbreak", too_long.as_str()] {
        let e = store.load_register(bad).await.unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "load {bad:?}: {e}");
        let e = store
            .save_register(bad, None, Uuid::new_v4(), value("x"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "save {bad:?}: {e}");
    }
    let big = Bytes::from(vec![7u8; MAX_REGISTER_VALUE + 1]);
    let e = store
        .save_register(&name, None, Uuid::new_v4(), big)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput { what, .. } if what.contains(&name)),
        "{e}"
    );
    let e = store
        .save_register(&name, None, Uuid::nil(), value("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    assert_eq!(store.load_register(&name).await.unwrap(), None);
}

/// Saves are not events: a register named like a stream leaves that stream, its category and the
/// listings empty, and a live subscription to everything delivers an append made after the saves
/// as its first event.
pub async fn registers_are_not_events(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "r");
    let name = stream.to_string();
    let mut everything = store
        .capabilities()
        .all_stream
        .then(|| store.subscribe(Selector::All, Start::Now, SubscriptionMode::Hot));
    if let Some(sub) = &mut everything {
        // Other cases' appends may come before CaughtUp (a backend delivers what arrives while
        // it waits to say it); none of them is ours.
        loop {
            match next_within(sub, h.patience, "CaughtUp").await {
                Ok(SubscriptionItem::CaughtUp) => break,
                Ok(SubscriptionItem::Event(e)) => assert_ne!(e.stream, stream),
                Err(e) => panic!("waiting for CaughtUp: {e}"),
            }
        }
    }
    let mut revision = None;
    for _ in 0..3 {
        revision = Some(
            store
                .save_register(&name, revision, Uuid::new_v4(), value("not an event"))
                .await
                .unwrap(),
        );
    }
    assert_eq!(store.stream_version(&stream).await.unwrap(), None);
    assert!(read_all(&*store, &stream).await.is_empty());
    assert!(!store.list_categories().await.unwrap().contains(&category));
    assert_eq!(store.list_streams(&category).count().await, 0);

    // The marker append goes to a fresh category, so only it (or another case's events) follows.
    let marker_category = h.category();
    let marker = fresh_stream(&marker_category, "after-saves");
    store
        .append(&marker, ExpectedVersion::NoStream, vec![numbered(1)])
        .await
        .unwrap();
    if let Some(sub) = &mut everything {
        // Other cases append concurrently: skip their events, but no event may be a register's.
        let deadline = tokio::time::Instant::now() + h.patience;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let e = next_event(sub, left.max(Duration::from_millis(1)), "the marker append").await;
            assert_ne!(
                e.stream, stream,
                "a register save was delivered as an event"
            );
            assert_ne!(e.stream.category(), category);
            if e.stream == marker {
                break;
            }
        }
    }
}
