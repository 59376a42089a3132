//! Checkpoint tokens: partition offsets. A subscription over several partitions interleaves them
//! in no fixed order, so "after this event" is the next offset of *every* partition it reads, not
//! one number. Layout (big-endian), documented in the README:
//!
//! - `1, len, category, n: u16, n × next offset: i64`: one category topic, all its partitions.
//! - `2, len, category, partition: u16, next offset: i64`: one partition (a stream's).
//! - `3, topics: u16, then per topic len, category, n: u16, n × i64`: the all stream.
//!
//! Kept beside codec.rs rather than in it: the checkpoint layout is a format of its own, with its
//! own tests, and knows nothing of records.

use photon_api::{Checkpoint, Error, Selector};

use crate::client::BACKEND;

/// The next offset to read of each partition of one topic, indexed by partition.
pub(crate) type Offsets = Vec<i64>;

/// A decoded checkpoint.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) enum Position {
    /// Every partition of one category.
    Category { category: String, next: Offsets },
    /// One partition of one category: where a stream resumes.
    Partition {
        category: String,
        partition: i32,
        next: i64,
    },
    /// Every partition of every category.
    All(Vec<(String, Offsets)>),
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

fn put_offsets(out: &mut Vec<u8>, next: &[i64]) {
    out.extend_from_slice(&(next.len() as u16).to_be_bytes());
    for o in next {
        out.extend_from_slice(&o.to_be_bytes());
    }
}

/// The checkpoint of `Position::Category` from borrowed parts: a subscription makes one per
/// event, so it does not clone its offsets first, and the token is built in a reused buffer,
/// one allocation in all (the checkpoint's).
pub(crate) fn category_checkpoint(category: &str, next: &[i64]) -> Checkpoint {
    built(|out| {
        out.push(1);
        put_name(out, category);
        put_offsets(out, next);
    })
}

/// The checkpoint of `Position::Partition` from borrowed parts, the same way.
pub(crate) fn partition_checkpoint(category: &str, partition: i32, next: i64) -> Checkpoint {
    built(|out| {
        out.push(2);
        put_name(out, category);
        out.extend_from_slice(&(partition as u16).to_be_bytes());
        out.extend_from_slice(&next.to_be_bytes());
    })
}

/// A checkpoint of the token `build` writes into this thread's reused buffer.
fn built(build: impl FnOnce(&mut Vec<u8>)) -> Checkpoint {
    thread_local! {
        static TOKEN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    TOKEN.with_borrow_mut(|out| {
        out.clear();
        build(out);
        Checkpoint::new(BACKEND, out)
    })
}

impl Position {
    pub(crate) fn to_checkpoint(&self) -> Checkpoint {
        let mut out = Vec::with_capacity(64);
        match self {
            Position::Category { category, next } => {
                out.push(1);
                put_name(&mut out, category);
                put_offsets(&mut out, next);
            }
            Position::Partition {
                category,
                partition,
                next,
            } => {
                out.push(2);
                put_name(&mut out, category);
                out.extend_from_slice(&(*partition as u16).to_be_bytes());
                out.extend_from_slice(&next.to_be_bytes());
            }
            Position::All(topics) => {
                out.push(3);
                out.extend_from_slice(&(topics.len() as u16).to_be_bytes());
                for (category, next) in topics {
                    put_name(&mut out, category);
                    put_offsets(&mut out, next);
                }
            }
        }
        Checkpoint::from_vec(BACKEND, out)
    }

    /// Decodes a checkpoint of this backend.
    ///
    /// # Errors
    /// - [`Error::ForeignCheckpoint`] for another backend's checkpoint.
    /// - [`Error::InvalidInput`] for a token that is not one of the three layouts.
    pub(crate) fn from_checkpoint(checkpoint: &Checkpoint) -> Result<Self, Error> {
        let token = checkpoint.token_for(BACKEND)?;
        let malformed = || Error::InvalidInput {
            what: format!("checkpoint {checkpoint}"),
            reason: "not a photon-kafka checkpoint (partition offsets)".into(),
        };
        let mut r = Reader(token);
        let pos = match r.u8().ok_or_else(malformed)? {
            1 => {
                let category = r.name().ok_or_else(malformed)?;
                let next = r.offsets().ok_or_else(malformed)?;
                Position::Category { category, next }
            }
            2 => Position::Partition {
                category: r.name().ok_or_else(malformed)?,
                partition: r.u16().ok_or_else(malformed)? as i32,
                next: r.i64().ok_or_else(malformed)?,
            },
            3 => {
                let n = r.u16().ok_or_else(malformed)?;
                let mut topics = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let category = r.name().ok_or_else(malformed)?;
                    topics.push((category, r.offsets().ok_or_else(malformed)?));
                }
                Position::All(topics)
            }
            _ => return Err(malformed()),
        };
        if !r.0.is_empty() {
            return Err(malformed());
        }
        Ok(pos)
    }

    /// Decodes a checkpoint to resume `selector` from: one taken from a subscription to the same
    /// category (or to the all stream) fits, a stream's fits its category's streams.
    ///
    /// # Errors
    /// - As [`Position::from_checkpoint`].
    /// - [`Error::InvalidInput`] for a checkpoint taken from another selector.
    pub(crate) fn for_selector(
        checkpoint: &Checkpoint,
        selector: &Selector,
    ) -> Result<Self, Error> {
        let pos = Self::from_checkpoint(checkpoint)?;
        let fits = match (selector, &pos) {
            (Selector::All, Position::All(_)) => true,
            (Selector::All, _) => false,
            (Selector::Category(c), Position::Category { category, .. }) => category == c.as_str(),
            (Selector::Category(_), Position::All(_)) => true,
            (Selector::Category(_), Position::Partition { .. }) => false,
            (Selector::Stream(s), Position::Category { category, .. })
            | (Selector::Stream(s), Position::Partition { category, .. }) => {
                category == s.category_name()
            }
            (Selector::Stream(_), Position::All(_)) => true,
        };
        if !fits {
            return Err(Error::InvalidInput {
                what: format!("checkpoint {checkpoint} for {selector:?}"),
                reason: "it was taken from another selector; resume a category or the all stream from its own subscription's checkpoints".into(),
            });
        }
        Ok(pos)
    }

    /// Where `partition` of `category` resumes: Some(next offset) when the checkpoint covers it.
    pub(crate) fn next_for(&self, wanted: &str, wanted_partition: i32) -> Option<i64> {
        let pick = |next: &Offsets| next.get(wanted_partition as usize).copied();
        match self {
            Position::Category { category, next } if category == wanted => pick(next),
            Position::Partition {
                category,
                partition,
                next,
            } if category == wanted && *partition == wanted_partition => Some(*next),
            Position::All(topics) => topics
                .iter()
                .find(|(c, _)| c == wanted)
                .and_then(|(_, next)| pick(next)),
            _ => None,
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .map(|b| i64::from_be_bytes(b.try_into().expect("8 bytes")))
            .filter(|o| *o >= 0)
    }
    fn name(&mut self) -> Option<String> {
        let n = self.u8()? as usize;
        let s = std::str::from_utf8(self.take(n)?).ok()?;
        photon_api::Category::new(s).ok().map(|_| s.to_owned())
    }
    fn offsets(&mut self) -> Option<Offsets> {
        let n = self.u16()? as usize;
        (0..n).map(|_| self.i64()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for p in [
            Position::Category {
                category: "account".into(),
                next: vec![0, 5, 12],
            },
            Position::Partition {
                category: "account".into(),
                partition: 2,
                next: 99,
            },
            Position::All(vec![("a".into(), vec![1]), ("b".into(), vec![0, 0, 7])]),
        ] {
            let text = p.to_checkpoint().to_string();
            let back = Position::from_checkpoint(&text.parse().unwrap()).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn finds_a_partition_in_every_layout() {
        let cat = Position::Category {
            category: "a".into(),
            next: vec![3, 4],
        };
        assert_eq!(cat.next_for("a", 1), Some(4));
        assert_eq!(cat.next_for("a", 2), None);
        assert_eq!(cat.next_for("b", 0), None);
        let one = Position::Partition {
            category: "a".into(),
            partition: 1,
            next: 9,
        };
        assert_eq!(
            (one.next_for("a", 1), one.next_for("a", 0)),
            (Some(9), None)
        );
        let all = Position::All(vec![("a".into(), vec![1, 2])]);
        assert_eq!(
            (all.next_for("a", 1), all.next_for("z", 0)),
            (Some(2), None)
        );
    }

    #[test]
    fn a_checkpoint_fits_only_the_selectors_it_can_resume() {
        let stream = photon_api::StreamId::parse("a-1").unwrap();
        let category = Selector::Category(stream.category());
        let cat = Position::Category {
            category: "a".into(),
            next: vec![3],
        }
        .to_checkpoint();
        let one = Position::Partition {
            category: "a".into(),
            partition: 0,
            next: 3,
        }
        .to_checkpoint();
        let all = Position::All(vec![("a".into(), vec![3])]).to_checkpoint();
        for (cp, selector, fits) in [
            (&cat, &category, true),
            (&cat, &Selector::Stream(stream.clone()), true),
            (&cat, &Selector::All, false),
            (&one, &Selector::Stream(stream.clone()), true),
            (&one, &category, false),
            (&all, &Selector::All, true),
            (&all, &category, true),
        ] {
            match Position::for_selector(cp, selector) {
                Ok(_) => assert!(fits, "{cp} for {selector:?}"),
                Err(Error::InvalidInput { reason, .. }) => {
                    assert!(!fits && reason.contains("another selector"), "{reason}")
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        let other = Selector::Category(photon_api::Category::new("b").unwrap());
        assert!(Position::for_selector(&cat, &other).is_err());
    }

    #[test]
    fn malformed_tokens_are_invalid_input() {
        for token in [
            &[][..],
            &[9],
            &[1, 1, b'a'],
            &[2, 1, b'a', 0, 1, 0, 0],
            &[1, 1, b'a', 0, 1, 255, 255, 255, 255, 255, 255, 255, 255],
            &[1, 1, b'!', 0, 0],
            &[1, 1, b'a', 0, 0, 7],
        ] {
            match Position::from_checkpoint(&Checkpoint::new(BACKEND, token)) {
                Err(Error::InvalidInput { what, .. }) => assert!(what.contains("checkpoint")),
                other => panic!("{token:?}: {other:?}"),
            }
        }
        assert!(matches!(
            Position::from_checkpoint(&Checkpoint::from_position("memory", 1)),
            Err(Error::ForeignCheckpoint { .. })
        ));
    }
}
