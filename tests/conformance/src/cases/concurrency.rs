//! Guarantee 3 (optimistic concurrency): every expected version against a new and an existing
//! stream, and separate clients racing with the same expectation, of which exactly one wins.
//!
//! Every case of this file is named once, in the macro below, which `conformance_suite!` reads:
//! a new case is a `pub async fn name(h: &Harness)` here plus its name in that list. Tools other
//! files use too belong in `support.rs`.

use std::sync::Arc;

use photon_api::{Error, ExpectedVersion, Version};

use crate::support::{
    append_numbered, append_until_definite, fresh_stream, number_of, numbered, numbers, read_all,
    versions,
};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_concurrency_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            expected_version_matrix,
            concurrent_appenders_exactly_one_wins,
        }
    };
}

/// Guarantee 3: each expectation against a new and an existing stream, with the exact error and
/// nothing stored on failure.
pub async fn expected_version_matrix(h: &Harness) {
    use ExpectedVersion::*;
    let store = h.client().await;
    let category = h.category();
    // (expectation, stream exists with last version 1?, should succeed)
    let cases = [
        (Any, false, true),
        (Any, true, true),
        (NoStream, false, true),
        (NoStream, true, false),
        (StreamExists, false, false),
        (StreamExists, true, true),
        (Exact(Version(0)), false, false),
        (Exact(Version(1)), true, true),
        (Exact(Version(0)), true, false),
        (Exact(Version(2)), true, false),
    ];
    for (i, (expected, exists, ok)) in cases.into_iter().enumerate() {
        let stream = fresh_stream(&category, format!("m{i}"));
        let actual = if exists {
            append_numbered(&*store, &stream, NoStream, 0, 2).await;
            Some(Version(1))
        } else {
            None
        };
        let outcome = store.append(&stream, expected, vec![numbered(9)]).await;
        let after = read_all(&*store, &stream).await;
        if ok {
            let r = outcome.unwrap_or_else(|e| panic!("{expected:?} on exists={exists}: {e}"));
            let want = actual.map_or(Version(0), Version::next);
            assert_eq!((r.first_version, r.last_version), (want, want));
            assert_eq!(numbers(&after).last(), Some(&9));
        } else {
            match outcome {
                Err(Error::WrongExpectedVersion {
                    stream: s,
                    expected: e,
                    actual: a,
                }) => {
                    assert_eq!((s, e, a), (stream.clone(), expected, actual));
                }
                other => panic!(
                    "{expected:?} on exists={exists}: want WrongExpectedVersion, got {other:?}"
                ),
            }
            assert_eq!(
                numbers(&after),
                if exists { vec![0, 1] } else { vec![] },
                "a refused append changed the stream"
            );
        }
    }
}

/// Guarantee 3 across clients: N separate clients race with the same expectation; exactly one
/// wins, the others get `WrongExpectedVersion` naming the winner's version.
pub async fn concurrent_appenders_exactly_one_wins(h: &Harness) {
    const N: usize = 8;
    let category = h.category();
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(h.client().await);
    }
    for (round, expected, actual_after) in [
        (0, ExpectedVersion::NoStream, Version(0)),
        (1, ExpectedVersion::Exact(Version(0)), Version(1)),
        (2, ExpectedVersion::Exact(Version(1)), Version(2)),
    ] {
        let stream = fresh_stream(&category, format!("contended{round}"));
        // Bring the stream to the round's starting point with one writer first.
        if round > 0 {
            let store = &clients[0];
            let seed: Vec<_> = (0..round).map(|n| numbered(1000 + n)).collect();
            store
                .append(&stream, ExpectedVersion::NoStream, seed)
                .await
                .unwrap();
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(N));
        let tasks: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (c, s, b) = (c.clone(), stream.clone(), barrier.clone());
                tokio::spawn(async move {
                    b.wait().await;
                    let batch = vec![numbered(i as u64)];
                    (i, append_until_definite(&*c, &s, expected, batch).await)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            match r {
                Ok(r) => {
                    assert_eq!(r.last_version, actual_after);
                    winners.push(i as u64);
                }
                Err(Error::WrongExpectedVersion {
                    stream: s,
                    expected: e,
                    actual,
                }) => {
                    assert_eq!(s, stream);
                    assert_eq!(e, expected);
                    assert_eq!(
                        actual,
                        Some(actual_after),
                        "loser {i} saw the wrong actual version"
                    );
                }
                Err(e) => panic!("client {i}: unexpected error {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let events = read_all(&*clients[N - 1], &stream).await;
        assert_eq!(versions(&events), (0..=actual_after.0).collect::<Vec<_>>());
        assert_eq!(number_of(events.last().unwrap()), winners[0]);
    }
}
