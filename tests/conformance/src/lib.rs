#![doc = include_str!("../README.md")]

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use photon_api::{Category, EventStore};

pub mod capture;
pub mod cases;
mod support;

pub use support::{collect_cold, fresh_category, fresh_stream, number_of, numbered};

type Connect = Arc<dyn Fn() -> BoxFuture<'static, Arc<dyn EventStore>> + Send + Sync>;

/// How the suite reaches one backend.
///
/// `connect` must return a *new client* of the *same* data each time (for a server backend, a new
/// connection; for the in-memory one, a clone of one store), because the concurrency cases race
/// separate clients as separate processes would.
#[derive(Clone)]
pub struct Harness {
    backend: &'static str,
    connect: Connect,
    unreachable: Option<Connect>,
    /// How long a case waits for an event that must arrive before it fails.
    pub patience: Duration,
    /// At most this many cases of this backend run at once (0: no limit).
    max_parallel_cases: usize,
}

impl Harness {
    /// A harness for `backend` whose `connect` opens a new client of the same data.
    pub fn new<F, Fut>(backend: &'static str, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn EventStore>> + Send + 'static,
    {
        Self {
            backend,
            connect: Arc::new(move || connect().boxed()),
            unreachable: None,
            patience: Duration::from_secs(30),
            max_parallel_cases: 0,
        }
    }

    /// Waits this long for an event that must arrive: a slow server (FerretDB, a
    /// loaded CI machine) needs more than the default 30 s.
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Runs at most `n` cases of this backend at once. The test harness runs every case in
    /// parallel; a small server answers a few well and starves the rest, which would fail on
    /// timeouts that say nothing about the backend.
    pub fn with_max_parallel_cases(mut self, n: usize) -> Self {
        self.max_parallel_cases = n;
        self
    }

    /// Waits for a turn to run a case (see [`Self::with_max_parallel_cases`]); hold the permit
    /// for the whole case. Used by [`conformance_suite!`].
    pub async fn case_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.max_parallel_cases == 0 {
            return None;
        }
        static LIMITS: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<&'static str, Arc<tokio::sync::Semaphore>>>,
        > = std::sync::OnceLock::new();
        let semaphore = LIMITS
            .get_or_init(Default::default)
            .lock()
            .expect("not poisoned")
            .entry(self.backend)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.max_parallel_cases)))
            .clone();
        Some(semaphore.acquire_owned().await.expect("never closed"))
    }

    /// Adds a way to build a client pointed at an address where no server listens, for the
    /// "unreachable server gives `Unavailable` in bounded time" case. Backends without a server
    /// (in-memory) leave it out and the case says so.
    pub fn with_unreachable<F, Fut>(mut self, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn EventStore>> + Send + 'static,
    {
        self.unreachable = Some(Arc::new(move || connect().boxed()));
        self
    }

    /// The backend's name as the store reports it.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// A new client of the shared data.
    pub async fn client(&self) -> Arc<dyn EventStore> {
        let store = (self.connect)().await;
        assert_eq!(
            store.backend(),
            self.backend,
            "harness built the wrong backend"
        );
        store
    }

    /// A client of nothing (a closed port), if the backend has a server.
    pub async fn unreachable_client(&self) -> Option<Arc<dyn EventStore>> {
        match &self.unreachable {
            Some(f) => Some(f().await),
            None => None,
        }
    }

    /// A fresh random category for one case.
    pub fn category(&self) -> Category {
        fresh_category()
    }
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("backend", &self.backend)
            .field("unreachable", &self.unreachable.is_some())
            .field("patience", &self.patience)
            .field("max_parallel_cases", &self.max_parallel_cases)
            .finish()
    }
}

/// The variable listing the backends whose real-server tests must not be skipped.
pub const REQUIRE_VAR: &str = "PHOTON_TEST_REQUIRE";

/// The URL of a real server to test against, from `var`; None (skip) when unset.
///
/// Prints which variable to set when skipping. Panics instead when `PHOTON_TEST_REQUIRE` (a comma
/// list such as `kafka,cassandra,mongo`) names `backend`, so that CI cannot pass by skipping.
#[track_caller]
pub fn server_url(backend: &str, var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_owned()),
        _ => {
            let required = std::env::var(REQUIRE_VAR).unwrap_or_default();
            if is_required(&required, backend) {
                panic!(
                    "{REQUIRE_VAR} names {backend}, but {var} is not set: start the servers (scripts/servers up) and export its URL"
                );
            }
            println!("skipping {backend} test: set {var} to run it against a real server");
            None
        }
    }
}

/// Whether the comma list `list` (the value of `PHOTON_TEST_REQUIRE`) names `backend`.
pub fn is_required(list: &str, backend: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|item| item.eq_ignore_ascii_case(backend))
}

/// Expands every case of [`cases`] into one `#[tokio::test]` for the harness returned by the
/// async function `$harness` (returning `Option<Harness>`; None skips).
///
/// The case names come from the list each file of [`cases`] keeps next to its cases, so this
/// macro names none of them. Each test waits for a [`Harness::case_permit`] and holds it for the
/// whole case. The `@cases` and `@names` forms are the macro's own plumbing.
#[macro_export]
macro_rules! conformance_suite {
    ($harness:path) => {
        $crate::__conformance_all_cases! { @cases $harness; }
    };
    (@cases $harness:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(harness) = $harness().await else { return };
                let _turn = harness.case_permit().await;
                $crate::cases::$case(&harness).await;
            }
        )+
    };
    // Appends the case names to the `Vec<&str>` `$names` (the crate's own listing test).
    (@names $names:ident; $($case:ident),+ $(,)?) => {
        $names.extend([$(stringify!($case)),+]);
    };
}

#[cfg(test)]
mod tests {
    use super::is_required;

    #[test]
    fn require_list() {
        assert!(is_required("kafka,cassandra,mongo", "cassandra"));
        assert!(is_required(" kafka , Mongo ", "mongo"));
        assert!(!is_required("kafka", "mongo"));
        assert!(!is_required("", "kafka"));
    }
}
