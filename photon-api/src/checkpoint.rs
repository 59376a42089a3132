//! Checkpoints: opaque resume tokens, tagged with the backend that made them.
//!
//! Each backend decides what is inside (a log position, partition offsets, a time bucket and id);
//! this module only carries the bytes and the tag, so that a token handed to the wrong backend is
//! a typed error instead of a silent wrong position. Tokens of up to 15 bytes (a position) are kept
//! inline, because every recorded event carries one and replay should not allocate per event;
//! a longer token takes one allocation.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The longest token kept inline: a position (8 bytes) with room to spare, in a checkpoint of 32
/// bytes, where every event of a replay carries one and each move of an event copies it.
const INLINE: usize = 15;

#[derive(Clone)]
enum Repr {
    /// A backend of this process (a `&'static` tag) with a short token: no allocation.
    Inline {
        backend: &'static str,
        len: u8,
        buf: [u8; INLINE],
    },
    /// A long token, or a tag parsed from text, in one shared allocation (cloned by count): the
    /// tag's length (4 bytes, little-endian), the tag, the token.
    Shared(Arc<[u8]>),
}

// Every recorded event carries a checkpoint: keep it at 32 bytes.
const _: () = assert!(std::mem::size_of::<Checkpoint>() <= 32);

/// An opaque, serialisable token from which a subscription resumes exactly after one event.
///
/// Its text form is `<backend>:<hex token>`, stable across versions of this crate, so it can be
/// stored in any database column or file; serde uses the same text.
#[derive(Clone)]
pub struct Checkpoint(Repr);

impl Checkpoint {
    /// A checkpoint of `backend` holding `token`.
    pub fn new(backend: &'static str, token: &[u8]) -> Self {
        if token.len() <= INLINE {
            return Self::inline(backend, token);
        }
        Self::shared(backend, token)
    }

    /// A checkpoint of `backend` holding `token`; equal to [`Self::new`] of the same bytes, for a
    /// backend that builds its token in a `Vec`.
    pub fn from_vec(backend: &'static str, token: Vec<u8>) -> Self {
        Self::new(backend, &token)
    }

    // Inlined so a backend's per-event checkpoint is written where the event is built.
    #[inline(always)]
    fn inline(backend: &'static str, token: &[u8]) -> Self {
        let mut buf = [0u8; INLINE];
        buf[..token.len()].copy_from_slice(token);
        Self(Repr::Inline {
            backend,
            len: token.len() as u8,
            buf,
        })
    }

    fn shared(backend: &str, token: &[u8]) -> Self {
        // Collected from iterators of known length: one allocation, no `Vec` first. A tag is a
        // backend's name or parsed from text, so its length fits in 4 bytes.
        let len = u32::try_from(backend.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes();
        let bytes: Arc<[u8]> = len
            .into_iter()
            .chain(backend.bytes())
            .chain(token.iter().copied())
            .collect();
        Self(Repr::Shared(bytes))
    }

    /// Where the tag ends in a shared checkpoint's bytes.
    fn tag_end(bytes: &[u8]) -> usize {
        let len: [u8; 4] = bytes[..4]
            .try_into()
            .expect("a shared checkpoint starts with its tag's length");
        4 + u32::from_le_bytes(len) as usize
    }

    /// A checkpoint holding one big-endian `u64` position, the common case of log-shaped backends.
    #[inline(always)]
    pub fn from_position(backend: &'static str, position: u64) -> Self {
        Self::inline(backend, &position.to_be_bytes())
    }

    /// The backend that made it.
    pub fn backend(&self) -> &str {
        match &self.0 {
            Repr::Inline { backend, .. } => backend,
            Repr::Shared(bytes) => {
                std::str::from_utf8(&bytes[4..Self::tag_end(bytes)]).expect("made from a str")
            }
        }
    }

    /// The backend's bytes.
    pub fn token(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, buf, .. } => &buf[..*len as usize],
            Repr::Shared(bytes) => &bytes[Self::tag_end(bytes)..],
        }
    }

    /// The token, checked to come from `backend`.
    ///
    /// # Errors
    /// - [`Error::ForeignCheckpoint`] when another backend made it.
    pub fn token_for(&self, backend: &str) -> Result<&[u8], Error> {
        if self.backend() != backend {
            return Err(Error::ForeignCheckpoint {
                expected_backend: backend.to_owned(),
                checkpoint: self.to_string(),
            });
        }
        Ok(self.token())
    }

    /// The `u64` position of a checkpoint made by [`Self::from_position`] for `backend`.
    ///
    /// # Errors
    /// - [`Error::ForeignCheckpoint`] when another backend made it.
    /// - [`Error::InvalidInput`] when the token is not 8 bytes.
    pub fn position_for(&self, backend: &str) -> Result<u64, Error> {
        let token = self.token_for(backend)?;
        let bytes: [u8; 8] = token.try_into().map_err(|_| Error::InvalidInput {
            what: format!("checkpoint {self}"),
            reason: format!(
                "a {backend} checkpoint holds 8 bytes, this one {}",
                token.len()
            ),
        })?;
        Ok(u64::from_be_bytes(bytes))
    }
}

impl PartialEq for Checkpoint {
    fn eq(&self, other: &Self) -> bool {
        self.backend() == other.backend() && self.token() == other.token()
    }
}

impl Eq for Checkpoint {}

impl std::hash::Hash for Checkpoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.backend().hash(state);
        self.token().hash(state);
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.backend())?;
        f.write_str(":")?;
        for b in self.token() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checkpoint({self})")
    }
}

impl FromStr for Checkpoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidInput {
            what: format!("checkpoint {s:?}"),
            reason: reason.to_owned(),
        };
        let (backend, hex) = s
            .split_once(':')
            .ok_or_else(|| invalid("must be <backend>:<hex token>"))?;
        if backend.is_empty()
            || !backend
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(invalid("backend tag must be ASCII letters, digits or '_'"));
        }
        if hex.len() % 2 != 0 {
            return Err(invalid("token has an odd number of hex digits"));
        }
        let token = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| invalid("token is not hexadecimal"))?;
        Ok(Self::shared(backend, &token))
    }
}

impl Serialize for Checkpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Checkpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_inline_and_shared() {
        for token in [vec![], vec![0, 1, 255], vec![7u8; 100]] {
            let c = Checkpoint::new("memory", &token);
            let text = c.to_string();
            let back: Checkpoint = text.parse().unwrap();
            assert_eq!(back, c);
            assert_eq!(back.backend(), "memory");
            assert_eq!(back.token(), &token[..]);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Checkpoint>(&json).unwrap(), c);
        }
        assert_eq!(
            Checkpoint::from_position("memory", 42).to_string(),
            "memory:000000000000002a"
        );
    }

    #[test]
    fn from_vec_equals_new() {
        for token in [
            vec![],
            vec![3u8; INLINE],
            vec![7u8; INLINE + 1],
            vec![9u8; 100],
        ] {
            let owned = Checkpoint::from_vec("kafka", token.clone());
            assert_eq!(owned, Checkpoint::new("kafka", &token));
            assert_eq!(owned.token(), &token[..]);
            assert_eq!(owned.to_string().parse::<Checkpoint>().unwrap(), owned);
        }
    }

    #[test]
    fn foreign_and_malformed_tokens_are_typed_errors() {
        let c = Checkpoint::from_position("kafka", 1);
        assert!(matches!(
            c.position_for("memory"),
            Err(Error::ForeignCheckpoint { ref expected_backend, .. }) if expected_backend == "memory"
        ));
        assert!(matches!(
            Checkpoint::new("memory", &[1, 2]).position_for("memory"),
            Err(Error::InvalidInput { .. })
        ));
        // Any tag length, as before the inline form (a tag of 300 bytes, a token of 1).
        let long = format!("{}:0a", "m".repeat(300));
        let parsed: Checkpoint = long.parse().unwrap();
        assert_eq!((parsed.backend().len(), parsed.token()), (300, &[10u8][..]));
        assert_eq!(parsed.to_string(), long);
        for bad in ["", "memory", "memory:0", "memory:zz", ":00", "me mory:00"] {
            assert!(
                matches!(bad.parse::<Checkpoint>(), Err(Error::InvalidInput { .. })),
                "{bad:?}"
            );
        }
    }
}
