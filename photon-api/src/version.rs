//! Versions of aggregate streams and the expectations appends state about them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An event's 0-based index in its aggregate stream. Versions are contiguous: no gaps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Version(pub u64);

impl Version {
    /// The version of the first event of every stream.
    pub const FIRST: Version = Version(0);

    /// The plain number.
    pub fn value(self) -> u64 {
        self.0
    }

    /// The version after this one.
    pub fn next(self) -> Version {
        Version(self.0 + 1)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl From<u64> for Version {
    fn from(v: u64) -> Self {
        Version(v)
    }
}

/// What the writer believes about the stream before its append; the store checks it atomically
/// with the write, which is what makes a decision taken on a loaded state safe to store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check: append whatever the stream holds.
    Any,
    /// The stream must not exist yet (no event stored).
    NoStream,
    /// The stream must hold at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version.
    Exact(Version),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `current` (None: no stream) satisfies this.
    pub fn matches(self, current: Option<Version>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current.is_none(),
            ExpectedVersion::StreamExists => current.is_some(),
            ExpectedVersion::Exact(v) => current == Some(v),
        }
    }

    /// The expectation to pass next after a load that saw `current`.
    pub fn from_current(current: Option<Version>) -> Self {
        match current {
            None => ExpectedVersion::NoStream,
            Some(v) => ExpectedVersion::Exact(v),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix() {
        use ExpectedVersion::*;
        let cases = [
            (Any, None, true),
            (Any, Some(Version(3)), true),
            (NoStream, None, true),
            (NoStream, Some(Version(0)), false),
            (StreamExists, None, false),
            (StreamExists, Some(Version(0)), true),
            (Exact(Version(0)), None, false),
            (Exact(Version(2)), Some(Version(2)), true),
            (Exact(Version(2)), Some(Version(3)), false),
        ];
        for (e, current, want) in cases {
            assert_eq!(e.matches(current), want, "{e:?} vs {current:?}");
        }
        assert_eq!(ExpectedVersion::from_current(None), NoStream);
        assert_eq!(
            ExpectedVersion::from_current(Some(Version(4))),
            Exact(Version(4))
        );
    }
}
