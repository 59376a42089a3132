//! Registers (`EventStore::load_register` / `save_register`): one row per register in the
//! `registers` table, overwritten in place by a conditional write on its revision, and read
//! with the serial consistency (README, "Registers").
//!
//! This module owns every read and write of `registers` and nothing else: a register is not an
//! event, so nothing here touches `commits`, the category tables or the pending markers, and no
//! reader or subscription ever sees a save.

use photon_api::{classify_save, validate_register, Bytes, Error, Register, Uuid};
use scylla::response::query_result::QueryResult;
use scylla::value::{CqlValue, Row};

use crate::client::Shared;
use crate::error;

/// What a conditional save answered.
#[derive(Debug, PartialEq, Eq)]
enum SaveAnswer {
    Applied,
    /// Not applied; the register's revision and save id as the Paxos round that refused it
    /// read them (None: never saved).
    Refused(Option<(u64, Uuid)>),
    /// Not applied, with the revision but not the save id (a server that answers only the
    /// condition's columns and not the one this store adds for it).
    RefusedWithoutSaveId,
}

impl Shared {
    /// The latest save of register `name`, by a read with the serial consistency: a Paxos read
    /// from a quorum, which completes a save whose round was left unfinished before it answers,
    /// so every save acknowledged before the call is seen, whichever replicas it reached, and
    /// the register reads as the saves' own conditions read it.
    pub(crate) async fn load_register(&self, name: &str) -> Result<Option<Register>, Error> {
        validate_register(name, None)?;
        let (session, st) = self.registers_ready().await?;
        let context = || format!("loading register {name:?}");
        let rows = session
            .execute_unpaged(&st.load, (name,))
            .await
            .map_err(|e| error::request(context(), e))?
            .into_rows_result()
            .map_err(|e| error::driver(context(), e))?;
        let Some((revision, save_id, value)) = rows
            .maybe_first_row::<(i64, Uuid, Vec<u8>)>()
            .map_err(|e| error::driver(context(), e))?
        else {
            return Ok(None);
        };
        Ok(Some(Register {
            revision: stored_revision(name, revision)?,
            save_id,
            value: Bytes::from(value),
        }))
    }

    /// Saves `value` as register `name`'s next revision if it is at `expected`: one conditional
    /// write (serial consistency for its Paxos round, the configured consistency for its
    /// commit, so it is as durable as an append). The first save inserts the row
    /// `IF NOT EXISTS`; a later one overwrites it `IF revision = expected`. Revisions only grow
    /// and the row is never deleted, so a save that reaches the server late (after its caller
    /// heard `Unavailable`) either is still the next save, or is refused: it never lands over a
    /// newer one. A refusal carries the register as it is, and `classify_save` tells a re-send
    /// of the latest save (answered with its revision) from a rival's (`RevisionConflict`).
    pub(crate) async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: Uuid,
        value: Bytes,
    ) -> Result<u64, Error> {
        validate_register(name, Some((&value, save_id)))?;
        let (session, st) = self.registers_ready().await?;
        let context = || format!("saving register {name:?}");
        let (answer, revision) = match expected {
            None => {
                let values = (name, 0_i64, save_id, &value[..]);
                let answer = session.execute_unpaged(&st.save_first, values).await;
                (answer, 0)
            }
            Some(expected) => {
                // No revision past what a bigint holds is stored: a save expecting the last
                // one (or more) is refused here, as the register is.
                let Some(condition) = i64::try_from(expected).ok().filter(|e| *e < i64::MAX) else {
                    let actual = self.load_register(name).await?.map(|r| r.revision);
                    return Err(past_the_last_revision(name, expected, actual));
                };
                let values = (condition + 1, save_id, &value[..], name, condition);
                let answer = session.execute_unpaged(&st.save_next, values).await;
                (answer, expected + 1)
            }
        };
        // A timeout, a lost connection or a server failure mid-write leaves the outcome
        // unknown: `Unavailable`, and a re-send with the same save id finds out which.
        let answer = answer.map_err(|e| error::saving(context(), e))?;
        let current = match save_answer(name, answer)? {
            SaveAnswer::Applied => return Ok(revision),
            SaveAnswer::Refused(current) => current,
            SaveAnswer::RefusedWithoutSaveId => {
                // Whose save the register holds decides a re-send: read it (serially).
                let current = self.load_register(name).await?;
                current.map(|r| (r.revision, r.save_id))
            }
        };
        classify_save(name, expected, save_id, current)
    }
}

/// The answer to a save expecting revision `expected` when no revision can follow it (the
/// last a bigint holds, `i64::MAX`, or past it), the register being at `actual`: at that
/// last revision, the register cannot be saved again (`InvalidInput`, saying so), which a
/// `RevisionConflict` expecting the revision it has would not tell; anywhere else the
/// expectation does not hold (`RevisionConflict`).
fn past_the_last_revision(name: &str, expected: u64, actual: Option<u64>) -> Error {
    if actual == Some(expected) {
        return Error::InvalidInput {
            what: format!("a save of register {name:?} at revision {expected}"),
            reason: format!(
                "the revision limit is reached: {expected} is the last revision this store keeps (the largest a Cassandra bigint holds), so the register cannot be saved again; save to a register of another name"
            ),
        };
    }
    Error::RevisionConflict {
        register: name.to_owned(),
        expected: Some(expected),
        actual,
    }
}

/// A stored revision, which this store writes from 0 up.
fn stored_revision(name: &str, revision: i64) -> Result<u64, Error> {
    u64::try_from(revision).map_err(|_| {
        error::corrupt(
            format!("reading register {name:?}"),
            format!("its revision is {revision}, which this store never writes"),
        )
    })
}

/// Reads a conditional save's answer by column name: `[applied]`, and when refused the
/// register's `revision` and `save_id` (Cassandra answers the whole row to a refused
/// `IF NOT EXISTS`, the columns of the conditions to a refused `IF revision = ...`, and only
/// `[applied]` when the row does not exist; ScyllaDB may answer more columns).
fn save_answer(name: &str, answer: QueryResult) -> Result<SaveAnswer, Error> {
    let context = || format!("reading the answer of a save of register {name:?}");
    let rows = answer
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?;
    let names: Vec<String> = rows
        .column_specs()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let row = rows
        .maybe_first_row::<Row>()
        .map_err(|e| error::driver(context(), e))?
        .ok_or_else(|| error::corrupt(context(), "it has no rows"))?;
    let column = |wanted: &str| {
        names
            .iter()
            .position(|n| n == wanted)
            .and_then(|at| row.columns.get(at).cloned().flatten())
    };
    match column("[applied]") {
        Some(CqlValue::Boolean(true)) => return Ok(SaveAnswer::Applied),
        Some(CqlValue::Boolean(false)) => {}
        other => {
            return Err(error::corrupt(
                context(),
                format!("its [applied] column is {other:?}"),
            ))
        }
    }
    let revision = match column("revision") {
        None => return Ok(SaveAnswer::Refused(None)),
        Some(CqlValue::BigInt(r)) => stored_revision(name, r)?,
        Some(other) => {
            return Err(error::corrupt(
                context(),
                format!("its revision column is {other:?}"),
            ))
        }
    };
    Ok(match column("save_id") {
        Some(CqlValue::Uuid(id)) => SaveAnswer::Refused(Some((revision, id))),
        _ => SaveAnswer::RefusedWithoutSaveId,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_register_at_the_last_revision_says_the_limit_is_reached() {
        let last = i64::MAX as u64;
        let e = past_the_last_revision("lease", last, Some(last));
        match &e {
            Error::InvalidInput { what, reason } => {
                assert!(
                    what.contains("\"lease\"") && what.contains(&last.to_string()),
                    "{e}"
                );
                assert!(reason.contains("revision limit is reached"), "{e}");
            }
            other => panic!("want InvalidInput, got {other:?}"),
        }
        assert!(!e.is_retryable());
        // An expectation that does not hold stays a conflict, with the revision found.
        assert!(matches!(
            past_the_last_revision("lease", last, Some(7)),
            Error::RevisionConflict { expected: Some(e), actual: Some(7), .. } if e == last
        ));
        assert!(matches!(
            past_the_last_revision("lease", u64::MAX, None),
            Error::RevisionConflict {
                expected: Some(u64::MAX),
                actual: None,
                ..
            }
        ));
    }
}
