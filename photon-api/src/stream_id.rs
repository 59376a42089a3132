//! Stream and category names.
//!
//! Owns the one place where names are validated, so that every backend can map a name onto its own
//! namespace (a Kafka topic, a Cassandra partition key, a Mongo field) without re-checking it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Longest category name, in bytes.
///
/// Kept short so that a category fits in a Kafka topic name (249 bytes) together with a prefix.
pub const MAX_CATEGORY_LEN: usize = 64;

/// Longest aggregate id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// The name of a category of aggregates, e.g. `account`.
///
/// Allowed: 1 to [`MAX_CATEGORY_LEN`] ASCII letters, digits and `_`, starting with a letter.
/// No `-`, because the first `-` of a stream name separates category from id; no `.`, so the name
/// is safe as a Kafka topic suffix, a Cassandra key and a Mongo field value alike.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Category(Arc<str>);

impl Category {
    /// Validates `name` as a category.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] naming the category and the first offending character or rule.
    pub fn new(name: impl AsRef<str>) -> Result<Self, Error> {
        let name = name.as_ref();
        validate_category(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The category name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate_category(name: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidInput {
        what: format!("category {name:?}"),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("is empty".into()));
    }
    if name.len() > MAX_CATEGORY_LEN {
        return Err(invalid(format!(
            "is {} bytes long, the limit is {MAX_CATEGORY_LEN}",
            name.len()
        )));
    }
    if !name.as_bytes()[0].is_ascii_alphabetic() {
        return Err(invalid("must start with an ASCII letter".into()));
    }
    if let Some((at, c)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(invalid(format!(
            "has {c:?} at byte {at}; allowed are ASCII letters, digits and '_'"
        )));
    }
    Ok(())
}

fn validate_id(stream: &str, id: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidInput {
        what: format!("stream {stream:?}"),
        reason,
    };
    if id.is_empty() {
        return Err(invalid("has an empty id after the category".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "has an id of {} bytes, the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if let Some((at, c)) = id
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@')))
    {
        return Err(invalid(format!(
            "has {c:?} at byte {} of its id; allowed are ASCII letters, digits and _ - . : @",
            at
        )));
    }
    Ok(())
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Category({:?})", &*self.0)
    }
}

impl FromStr for Category {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl Serialize for Category {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Category {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// The name of one aggregate stream: `<category>-<id>`, e.g. `account-42`.
///
/// The category follows the rules of [`Category`]; the id is 1 to [`MAX_ID_LEN`] ASCII letters,
/// digits and `_ - . : @` (so a UUID or `tenant:42` both fit). The first `-` separates the two,
/// which is why a category has none. Cloning is cheap: the name is shared, not copied, because
/// every recorded event carries its stream.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    // The name alone (16 bytes): every recorded event carries its stream, and each move of an
    // event copies it. The category ends at the first `-`, found again when asked for.
    name: Arc<str>,
}

impl StreamId {
    /// Builds the stream `<category>-<id>`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] when the id is empty, too long or has a character outside the set.
    pub fn new(category: &Category, id: impl AsRef<str>) -> Result<Self, Error> {
        let id = id.as_ref();
        let name = format!("{}-{}", category.as_str(), id);
        validate_id(&name, id)?;
        Ok(Self {
            name: Arc::from(name),
        })
    }

    /// Parses a full stream name such as `account-42`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] when the name is empty, has no `-`, or either part breaks its rules.
    pub fn parse(name: impl AsRef<str>) -> Result<Self, Error> {
        let name = name.as_ref();
        let Some((category, id)) = name.split_once('-') else {
            return Err(Error::InvalidInput {
                what: format!("stream {name:?}"),
                reason: "must be <category>-<id>, e.g. \"account-42\"".into(),
            });
        };
        validate_category(category).map_err(|e| match e {
            Error::InvalidInput { reason, .. } => Error::InvalidInput {
                what: format!("stream {name:?}"),
                reason: format!("category {category:?} {reason}"),
            },
            other => other,
        })?;
        validate_id(name, id)?;
        Ok(Self {
            name: Arc::from(name),
        })
    }

    /// The full name, `<category>-<id>`.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The category part, as a borrowed name.
    pub fn category_name(&self) -> &str {
        &self.name[..self.category_len()]
    }

    /// The category part; allocates a new shared name, so prefer [`Self::category_name`] in loops.
    pub fn category(&self) -> Category {
        Category(Arc::from(self.category_name()))
    }

    /// The id part (after the first `-`).
    pub fn id(&self) -> &str {
        &self.name[self.category_len() + 1..]
    }

    /// Where the category ends: at the first `-`, which every valid name has.
    fn category_len(&self) -> usize {
        self.name.find('-').unwrap_or(self.name.len())
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", &*self.name)
    }
}

impl FromStr for StreamId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_category_and_id() {
        let s = StreamId::parse("account-42-b").unwrap();
        assert_eq!(s.category_name(), "account");
        assert_eq!(s.id(), "42-b");
        assert_eq!(s.category(), Category::new("account").unwrap());
        assert_eq!(
            StreamId::new(&Category::new("account").unwrap(), "42-b").unwrap(),
            s
        );
    }

    #[test]
    fn rejects_malformed_names_with_the_reason() {
        for (name, needle) in [
            ("", "must be <category>-<id>"),
            ("account", "must be <category>-<id>"),
            ("-42", "is empty"),
            ("account-", "empty id"),
            ("acc ount-1", "' ' at byte 3"),
            ("1account-1", "start with an ASCII letter"),
            ("account-4 2", "' ' at byte 1"),
            ("account-é", "'é'"),
        ] {
            let err = StreamId::parse(name).unwrap_err();
            let Error::InvalidInput { what, reason } = &err else {
                panic!("{name:?}: {err:?}")
            };
            assert!(what.contains(&format!("{name:?}")), "{name:?}: {what}");
            assert!(reason.contains(needle), "{name:?}: {reason}");
        }
        let long = format!("a-{}", "x".repeat(MAX_ID_LEN + 1));
        assert!(StreamId::parse(long).is_err());
        assert!(Category::new("x".repeat(MAX_CATEGORY_LEN + 1)).is_err());
        assert!(Category::new("a-b").is_err());
    }

    #[test]
    fn serde_round_trip_validates() {
        let s = StreamId::parse("account-1").unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"account-1\"");
        assert_eq!(serde_json::from_str::<StreamId>(&json).unwrap(), s);
        assert!(serde_json::from_str::<StreamId>("\"nope\"").is_err());
    }
}
