//! Registers: a map from name to its latest save, kept beside the log and never in it, so no
//! read or subscription meets one and a register takes one entry however often it is saved.
//!
//! A save is decided and stored under the map's lock: the check of the revision and the
//! replacement are one step, as the contract asks.

use std::sync::PoisonError;

use photon_api::{classify_save, validate_register, Bytes, Error, Register, Uuid};

use crate::client::Shared;

/// The latest save of `name`, as [`photon_api::EventStore::load_register`] describes.
pub(crate) fn load(shared: &Shared, name: &str) -> Result<Option<Register>, Error> {
    validate_register(name, None)?;
    let registers = shared
        .registers
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(registers.get(name).cloned())
}

/// Replaces `name` if it is at `expected`, as [`photon_api::EventStore::save_register`]
/// describes.
pub(crate) fn save(
    shared: &Shared,
    name: &str,
    expected: Option<u64>,
    save_id: Uuid,
    value: Bytes,
) -> Result<u64, Error> {
    validate_register(name, Some((&value, save_id)))?;
    // Nothing between the check and the replacement can panic, so a poisoned map is whole.
    let mut registers = shared
        .registers
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let current = registers.get(name);
    if current.map(|r| r.revision) != expected {
        return classify_save(
            name,
            expected,
            save_id,
            current.map(|r| (r.revision, r.save_id)),
        );
    }
    let revision = expected.map_or(0, |r| r + 1);
    registers.insert(
        name.to_owned(),
        Register {
            revision,
            save_id,
            value,
        },
    );
    Ok(revision)
}
