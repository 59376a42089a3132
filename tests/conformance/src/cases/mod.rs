//! The cases, one file per guarantee of the contract (the guarantees numbered 1 to 10 in
//! design.md, which is shared with the team rather than kept in this repository, and the
//! registers, guarantee 11 of the root README, in `register.rs`). Each case asserts the exact
//! events, versions and error variants its guarantee promises.
//!
//! Each file lists its own cases in one `macro_rules!` next to them; [`conformance_suite!`]
//! gathers those lists through `__conformance_all_cases!` below, so adding a case touches only
//! the file that holds it. This module owns the list of files; it holds no case and no tool (the
//! tools the files share are in `support.rs`). Every case is re-exported here by its bare name,
//! which is the path `conformance_suite!` calls (`cases::idempotent_retry`), whichever file holds
//! it.
//!
//! [`conformance_suite!`]: crate::conformance_suite

pub mod append;
pub mod backpressure;
pub mod category;
pub mod checkpoint;
pub mod concurrency;
pub mod idempotency;
pub mod input;
pub mod read;
pub mod register;
pub mod subscribe;
pub mod telemetry;

pub use self::append::*;
pub use self::backpressure::*;
pub use self::category::*;
pub use self::checkpoint::*;
pub use self::concurrency::*;
pub use self::idempotency::*;
pub use self::input::*;
pub use self::read::*;
pub use self::register::*;
pub use self::subscribe::*;
pub use self::telemetry::*;

/// Hands `$then` to every file's case list; a new file of cases is named here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_all_cases {
    ($($then:tt)*) => {
        $crate::__conformance_append_cases! { $($then)* }
        $crate::__conformance_concurrency_cases! { $($then)* }
        $crate::__conformance_idempotency_cases! { $($then)* }
        $crate::__conformance_read_cases! { $($then)* }
        $crate::__conformance_category_cases! { $($then)* }
        $crate::__conformance_subscribe_cases! { $($then)* }
        $crate::__conformance_checkpoint_cases! { $($then)* }
        $crate::__conformance_backpressure_cases! { $($then)* }
        $crate::__conformance_input_cases! { $($then)* }
        $crate::__conformance_telemetry_cases! { $($then)* }
        $crate::__conformance_register_cases! { $($then)* }
    };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// A case written but not named in its file's list would never run; a name listed twice
    /// would not compile in a backend's test file. This reads the case files as text and
    /// compares every `pub async fn` in them with the names the lists give `conformance_suite!`.
    #[test]
    fn every_case_is_listed_once() {
        let mut listed: Vec<&str> = Vec::new();
        crate::__conformance_all_cases! { @names listed; }
        let unique: BTreeSet<&str> = listed.iter().copied().collect();
        assert_eq!(
            unique.len(),
            listed.len(),
            "a case is listed twice: {listed:?}"
        );

        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cases");
        let mut written = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).expect("the cases directory") {
            let path = entry.expect("a directory entry").path();
            let source = std::fs::read_to_string(&path).expect("a readable case file");
            for line in source.lines() {
                if let Some(rest) = line.strip_prefix("pub async fn ") {
                    let name = rest.split(['(', '<']).next().expect("a name").trim();
                    assert!(
                        written.insert(name.to_owned()),
                        "{name} is written twice ({})",
                        path.display()
                    );
                }
            }
        }
        let listed: BTreeSet<String> = unique.into_iter().map(str::to_owned).collect();
        let unlisted: Vec<&String> = written.difference(&listed).collect();
        assert!(
            unlisted.is_empty(),
            "cases not named in their file's list, so no backend runs them: {unlisted:?}"
        );
        let unwritten: Vec<&String> = listed.difference(&written).collect();
        assert!(
            unwritten.is_empty(),
            "names listed for conformance_suite! with no `pub async fn` of that name: {unwritten:?}"
        );
    }
}
