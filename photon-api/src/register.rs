//! Registers: named values that a save replaces instead of appending to.
//!
//! A view's checkpoint, a process's position or a partition's lease is one small value that
//! changes often and whose history nobody reads. Kept as events, each save would be a new event
//! in a stream that never shrinks, and in the all stream that every subscriber reads. A register
//! keeps only its latest save, so storage stays bounded however often it is saved, and it is never
//! an event: no stream, category, subscription or listing shows it.
//!
//! Saves are fenced by revision, as appends are by version: of two savers that read the same
//! revision, exactly one wins, which is what lets a runner notice that another took its work.

use bytes::Bytes;
use uuid::Uuid;

use crate::error::Error;

/// The longest register name, in bytes: room for a view name, a partition and a prefix, while a
/// key stays small in every backend's index.
pub const MAX_REGISTER_NAME_LEN: usize = 256;

/// The largest register value, in bytes. Below every backend's single-record limit (Kafka's
/// default `max.message.bytes` is 1 MiB including the record's framing), so a value the contract
/// accepts is one every backend can store.
pub const MAX_REGISTER_VALUE: usize = 1_000_000;

/// A register's latest save.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    /// 0 for the first save, one more for each save after it; the `expected` of the next save.
    pub revision: u64,
    /// The id the saver gave this save: a re-send of it is recognised by this id.
    pub save_id: Uuid,
    /// The saved bytes, as given.
    pub value: Bytes,
}

/// Checks a register name and value before anything is sent.
///
/// # Errors
/// - [`Error::InvalidInput`] naming the register when the name is empty, longer than
///   [`MAX_REGISTER_NAME_LEN`] bytes or holds a control character, or when the value is larger
///   than [`MAX_REGISTER_VALUE`]; `save_id` must not be nil (nil cannot tell a re-send apart).
pub fn validate_register(name: &str, value: Option<(&Bytes, Uuid)>) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidInput {
        what: format!("register {name:?}"),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("a register name must not be empty".into()));
    }
    if name.len() > MAX_REGISTER_NAME_LEN {
        return Err(invalid(format!(
            "the name is {} bytes, the limit is {MAX_REGISTER_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(invalid(format!(
            "the name holds the control character {c:?}"
        )));
    }
    if let Some((value, save_id)) = value {
        if value.len() > MAX_REGISTER_VALUE {
            return Err(invalid(format!(
                "the value is {} bytes, the limit is {MAX_REGISTER_VALUE}",
                value.len()
            )));
        }
        if save_id.is_nil() {
            return Err(invalid(
                "the save id is nil; give each save a fresh id and reuse it only to re-send".into(),
            ));
        }
    }
    Ok(())
}

/// What a save whose expectation did not hold means, given the register as it is now
/// (`current`: revision and save id; None: never saved).
///
/// A save is a re-send of the latest one when that one carries its id and sits exactly one
/// revision above what it expected: then it landed before (its answer was lost), and the answer
/// is that revision. Anything else is someone else's save: [`Error::RevisionConflict`].
///
/// # Errors
/// - [`Error::RevisionConflict`] naming the register, the expectation and the revision found.
pub fn classify_save(
    name: &str,
    expected: Option<u64>,
    save_id: Uuid,
    current: Option<(u64, Uuid)>,
) -> Result<u64, Error> {
    match current {
        Some((revision, id))
            if id == save_id && expected.map_or(0, |e| e.saturating_add(1)) == revision =>
        {
            Ok(revision)
        }
        _ => Err(Error::RevisionConflict {
            register: name.to_owned(),
            expected,
            actual: current.map(|(r, _)| r),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_are_checked() {
        let id = Uuid::new_v4();
        let small = Bytes::from_static(b"x");
        assert!(validate_register("view/orders#3", Some((&small, id))).is_ok());
        assert!(validate_register("view", None).is_ok());
        for (name, needle) in [
            ("", "empty"),
            ("a\nb", "control character"),
            (&"n".repeat(MAX_REGISTER_NAME_LEN + 1), "limit is 256"),
        ] {
            let e = validate_register(name, None).unwrap_err();
            assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
        let big = Bytes::from(vec![0u8; MAX_REGISTER_VALUE + 1]);
        let e = validate_register("v", Some((&big, id))).unwrap_err();
        assert!(e.to_string().contains("register \"v\""), "{e}");
        assert!(e.to_string().contains("1000001 bytes"), "{e}");
        let e = validate_register("v", Some((&small, Uuid::nil()))).unwrap_err();
        assert!(e.to_string().contains("save id is nil"), "{e}");
    }

    #[test]
    fn a_resend_of_the_latest_save_is_its_revision_and_anything_else_a_conflict() {
        let (mine, other) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(classify_save("r", None, mine, Some((0, mine))).unwrap(), 0);
        assert_eq!(
            classify_save("r", Some(4), mine, Some((5, mine))).unwrap(),
            5
        );
        // My save was replaced by a later one: the re-send cannot be told from a rival's.
        let e = classify_save("r", Some(4), mine, Some((6, other))).unwrap_err();
        assert!(matches!(
            e,
            Error::RevisionConflict {
                expected: Some(4),
                actual: Some(6),
                ..
            }
        ));
        assert!(classify_save("r", Some(4), mine, Some((5, other))).is_err());
        assert!(classify_save("r", Some(0), mine, None).is_err());
        assert!(classify_save("r", None, mine, Some((1, mine))).is_err());
        assert_eq!(
            classify_save("r", Some(3), mine, None)
                .unwrap_err()
                .to_string(),
            "register r was saved by someone else: expected revision 3, it has never been saved"
        );
    }
}
