//! Registers (`EventStore::load_register` / `save_register`): one document per save in
//! `<prefix>_registers`, the revision claimed by the unique index `name_revision`, and only the
//! latest [`KEPT`] saves of a name kept.
//!
//! This module owns the registers collection and nothing else: it must not touch the commits
//! (a register is never an event, so no reader, subscription or listing may meet one).
//!
//! Why inserts and not a conditional update: `update_one({name, revision: r}, ...)` is atomic on
//! MongoDB, but FerretDB 1.24 (the test server) reads, changes and writes the document back
//! without a lock, so two savers expecting one revision could both "win" there. A unique index
//! refuses the second insert of a key on both servers, so a save inserts its new revision and
//! lets the index decide. What the index cannot do alone, with old revisions deleted to keep
//! storage bounded, is refuse an insert at a revision that was taken and has since been deleted:
//! the check after the insert does that (see [`save`]).

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Bson, Document};
use mongodb::options::{Hint, ReadConcern};
use mongodb::ClientSession;
use photon_api::{classify_save, validate_register, Bytes, Error, Register, Uuid};

use crate::client::{Shared, REGISTER_INDEX};
use crate::{codec, error};

/// How many revisions of a name a save keeps (the latest and the three before it). The check
/// after an insert reads the revision just above its own; with four kept, that evidence is
/// deleted only when five saves land between a saver's insert and its check.
pub(crate) const KEPT: u64 = 4;

/// The latest save of register `name`, None when it was never saved.
///
/// Read from the primary with read concern `linearizable` (bounded by `maxTimeMS`): the primary
/// confirms with a majority that it still is the primary after reading, so a save acknowledged
/// (`w: majority`) before the call began is in what it returns, even from a primary that was
/// partitioned away or has just been elected (a `majority` read can be older there). The
/// highest revision is the register: a document below it is an older save not yet deleted, or
/// a refused save's insert about to be deleted, and is never returned.
pub(crate) async fn load(shared: &Shared, name: &str) -> Result<Option<Register>, Error> {
    validate_register(name, None)?;
    shared.registers_ready().await?;
    let find = async {
        shared
            .registers
            .find(doc! { "name": name })
            .sort(doc! { "revision": -1 })
            .limit(1)
            .projection(doc! { "_id": 0, "revision": 1, "save_id": 1, "value": 1 })
            .read_concern(ReadConcern::linearizable())
            .max_time(shared.config.timeout)
            .await?
            .try_next()
            .await
    };
    shared
        .bounded(|| format!("loading register {name:?}"), find)
        .await?
        .map(|d| decode(name, &d))
        .transpose()
}

/// Saves `value` as register `name`'s next revision if its latest is `expected` (None: never
/// saved); answers the new revision.
///
/// Every round trip of a save runs in one causally consistent session, so each read sees the
/// save's own insert and whatever an earlier read of it saw, on whichever node is primary.
///
/// The protocol, and why each step is there:
///
/// 1. Read the latest revision. If it is not `expected`, [`classify_save`] answers: a re-send
///    of the latest save (its answer was lost) is that save's revision, anything else a
///    `RevisionConflict`. This read is also what keeps an insert from landing *above* the
///    register (a save expecting 7 of a register at 1 would otherwise claim 8 unopposed): a
///    save only ever inserts one above a revision it saw as the latest.
/// 2. Insert `{name, revision: expected + 1, save_id, parent, value}`, where `parent` is the
///    `_id` of the document it replaces (the one read in 1). The unique index refuses it when
///    that revision is taken: see [`holder_decides`].
/// 3. The insert landed, but that alone does not prove the revision was free *in the
///    register's history*: between the read in 1 and the insert, others may have saved that
///    revision and more, and the cleanup of a later save (4) may have deleted it again. One
///    query reads every document of the name, and [`judge`] decides from that one snapshot.
/// 4. After answering, delete the name's revisions below `new - 3` ([`KEPT`] stay), and a
///    stale insert of this save (see [`cleanup`]).
///
/// The highest revision of a name is never deleted (a save deletes its own document only when
/// it has shown it stale, below a higher one, and cleans up only below its own), so a register
/// never goes back; and a save that was the latest at any moment is deleted only by a cleanup.
pub(crate) async fn save(
    shared: &Arc<Shared>,
    name: &str,
    expected: Option<u64>,
    save_id: Uuid,
    value: Bytes,
) -> Result<u64, Error> {
    validate_register(name, Some((&value, save_id)))?;
    shared.registers_ready().await?;
    shared.registers_writable().await?;
    let mut session = shared
        .bounded(
            || format!("starting a session to save register {name:?}"),
            shared.registers.client().start_session(),
        )
        .await?;

    // 1. The expectation against the latest revision.
    let read = latest(shared, &mut session, name).await?;
    let current = read.as_ref().map(|(head, _)| *head);
    if current.map(|(revision, _)| revision) != expected {
        let answer = classify_save(name, expected, save_id, current);
        return confirmed(shared, name, expected, save_id, answer).await;
    }
    let new = expected.map_or(0, |e| e + 1);
    let Ok(stored_new) = i64::try_from(new) else {
        // No register reaches this revision (one save per revision); nothing to claim.
        return classify_save(name, expected, save_id, current);
    };

    // 2. The insert at the new revision: the unique index decides who has it.
    let document = doc! {
        "name": name,
        "revision": stored_new,
        "save_id": codec::uuid_bson(save_id),
        "parent": read.map_or(Bson::Null, |(_, id)| id),
        "value": Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: value.to_vec() }),
    };
    let insert = async {
        match shared
            .registers
            .insert_one(document)
            .session(&mut session)
            .await
        {
            Ok(inserted) => Ok(Some(inserted.inserted_id)),
            Err(e) if error::is_duplicate_key(&e) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let inserted = shared
        .bounded(
            || format!("saving register {name:?} at revision {new}"),
            insert,
        )
        .await?;
    let Some(own) = inserted else {
        return holder_decides(shared, &mut session, name, expected, save_id, new).await;
    };

    // 3. Was the revision still free in the register's history, or free again after a cleanup?
    let snapshot = all_of(shared, &mut session, name).await?;
    let verdict = judge(new, &own, &snapshot);
    // 4. Answer first; the cleanup follows on its own (see `cleanup`).
    let (answer, stale) = match verdict {
        Verdict::Stored => (Ok(new), None),
        Verdict::Stale { highest } => (
            Err(Error::RevisionConflict {
                register: name.to_owned(),
                expected,
                actual: Some(highest),
            }),
            Some(own),
        ),
        Verdict::Unknown { above } => (Err(error::register_overtaken(name, new, above)), None),
    };
    let below = match &answer {
        Ok(_) => new.checked_sub(KEPT - 1).filter(|&b| b > 0),
        Err(_) => None,
    };
    cleanup(shared, name, below, stale);
    answer
}

/// `answer`, decided from a read, when it is a conflict; when it is Ok (a re-send of the latest
/// save, answered without a write of its own) decided again from a linearizable read. A majority
/// read on a primary cut off from its majority (or a new primary whose majority point lags) can
/// still show a save another primary has replaced: Ok from it would tell a re-sent lease that it
/// still holds. A conflict from a stale read is at worst spurious, and stands.
async fn confirmed(
    shared: &Shared,
    name: &str,
    expected: Option<u64>,
    save_id: Uuid,
    answer: Result<u64, Error>,
) -> Result<u64, Error> {
    answer?;
    let head = load(shared, name).await?.map(|r| (r.revision, r.save_id));
    classify_save(name, expected, save_id, head)
}

/// What the one snapshot after an insert that landed says about it (step 3 of [`save`]).
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The save is stored: the latest, or saved on top of.
    Stored,
    /// The insert took the place of another save of its revision after a cleanup: never the
    /// latest, never loaded. `highest` is the highest revision of the same snapshot.
    Stale { highest: u64 },
    /// The evidence is gone: the save may or may not have been the latest for a while.
    Unknown { above: u64 },
}

/// One stored document of a name, as the check after an insert reads it.
#[derive(Debug)]
struct Entry {
    id: Bson,
    revision: u64,
    /// The `_id` of the document this one's saver read as the latest (None: the first save).
    parent: Option<Bson>,
}

/// Decides an insert that landed at `new` (document `own`) from one snapshot of the name's
/// documents, ascending by revision:
///
/// - Nothing above `new`: ours is the latest, stored (ours gone too, which no save or cleanup
///   does to the highest revision: a rollback, unknown).
/// - The revision just above, with `parent` = our document: it was saved on top of this very
///   insert, which was therefore the latest when it was read: stored by this call (and
///   replaced since). A `parent` naming another document of the same save id (an earlier send
///   of a re-send) does not count: that send stored it, not this call, and the contract answers
///   a re-send of a replaced save `RevisionConflict`.
/// - The revision just above with another parent: it replaced another save of our revision,
///   whose document ours took the place of after a cleanup: stale.
/// - Only revisions two or more above (the one just above is gone): a save on top of ours
///   would have been deleted only by a cleanup that ran after ours was visible, and a cleanup
///   deletes in ascending revision order (one statement on FerretDB; on MongoDB the index
///   `name_revision` is hinted, so the scan walks upwards), so it would have deleted ours
///   first. Ours still there: nobody saved on top of it, stale. Ours gone as well: the two
///   cannot be told apart, unknown.
fn judge(new: u64, own: &Bson, snapshot: &[Entry]) -> Verdict {
    let ours = snapshot.iter().any(|e| &e.id == own);
    let highest = snapshot.iter().map(|e| e.revision).max().unwrap_or(new);
    match snapshot.iter().find(|e| e.revision > new) {
        None if ours => Verdict::Stored,
        None => Verdict::Unknown { above: new },
        Some(above) if above.revision == new + 1 && above.parent.as_ref() == Some(own) => {
            Verdict::Stored
        }
        Some(above) if above.revision == new + 1 || ours => Verdict::Stale { highest },
        Some(above) => Verdict::Unknown {
            above: above.revision,
        },
    }
}

/// The answer to a save whose insert at `new` the unique index refused: another document holds
/// that revision.
///
/// On a replica set the holder may be on the primary and not yet majority-committed (its saver
/// still waits for the majority), so a `majority` read may still show the register below `new`.
/// So the holder is read with read concern `local` from the primary: another save's means this
/// save is not stored and `expected` no longer holds: `RevisionConflict` at once, with the
/// highest revision seen. This save's (an earlier send, still in flight or answered lost): wait,
/// with a short backoff, until the majority snapshot shows the register at `new` or above, and
/// let [`classify_save`] answer from it (Ok when it is still the latest, `RevisionConflict`
/// once another save replaced it). `Unavailable` only when `photon_timeout_ms` passes first.
async fn holder_decides(
    shared: &Shared,
    session: &mut ClientSession,
    name: &str,
    expected: Option<u64>,
    save_id: Uuid,
    new: u64,
) -> Result<u64, Error> {
    let deadline = tokio::time::Instant::now() + shared.config.timeout;
    let at_or_above = holders(shared, session, name, new).await?;
    if let (Some((revision, holder)), Some((highest, _))) =
        (at_or_above.first(), at_or_above.last())
    {
        if *revision == new && *holder != save_id {
            return Err(Error::RevisionConflict {
                register: name.to_owned(),
                expected,
                actual: Some(*highest),
            });
        }
    }
    let mut pause = Duration::from_millis(10);
    loop {
        let now = latest(shared, session, name).await?.map(|(head, _)| head);
        if now.is_some_and(|(revision, _)| revision >= new) {
            let answer = classify_save(name, expected, save_id, now);
            return confirmed(shared, name, expected, save_id, answer).await;
        }
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(error::register_unsettled(name, new));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The revisions and save ids of `name` at `revision` and above, ascending, read with read
/// concern `local`: what the primary holds, majority-committed or not.
async fn holders(
    shared: &Shared,
    session: &mut ClientSession,
    name: &str,
    revision: u64,
) -> Result<Vec<(u64, Uuid)>, Error> {
    let from = i64::try_from(revision).unwrap_or(i64::MAX);
    let find = async {
        let mut cursor = shared
            .registers
            .find(doc! { "name": name, "revision": { "$gte": from } })
            .sort(doc! { "revision": 1 })
            .projection(doc! { "_id": 0, "revision": 1, "save_id": 1 })
            .read_concern(ReadConcern::local())
            .max_time(shared.config.timeout)
            .session(&mut *session)
            .await?;
        cursor.stream(&mut *session).try_collect::<Vec<_>>().await
    };
    let found = shared
        .bounded(
            || format!("reading who holds revision {revision} of register {name:?}"),
            find,
        )
        .await?;
    found.iter().map(|d| head(name, d)).collect()
}

/// The latest revision of `name` and its save id, with its document's `_id`, in the majority
/// snapshot.
async fn latest(
    shared: &Shared,
    session: &mut ClientSession,
    name: &str,
) -> Result<Option<((u64, Uuid), Bson)>, Error> {
    let find = async {
        let mut cursor = shared
            .registers
            .find(doc! { "name": name })
            .sort(doc! { "revision": -1 })
            .limit(1)
            .projection(doc! { "_id": 1, "revision": 1, "save_id": 1 })
            .max_time(shared.config.timeout)
            .session(&mut *session)
            .await?;
        cursor.next(&mut *session).await.transpose()
    };
    shared
        .bounded(|| format!("loading register {name:?}"), find)
        .await?
        .map(|d| Ok((head(name, &d)?, d.get("_id").cloned().unwrap_or(Bson::Null))))
        .transpose()
}

/// Every document of `name` (id, revision, parent), ascending by revision, which the check
/// after an insert decides from. A name holds [`KEPT`] documents, plus stale inserts about to be
/// deleted.
///
/// Read descending and turned around: a MongoDB query is not one snapshot (it may yield and go
/// on over a newer one), but cleanups delete upwards, so a scan that meets the revision just
/// above ours before ours can never find ours while missing that one (it was deleted after ours,
/// if at all). Read ascending, a cleanup between the two reads made a stored save look stale.
async fn all_of(
    shared: &Shared,
    session: &mut ClientSession,
    name: &str,
) -> Result<Vec<Entry>, Error> {
    let find = async {
        let mut cursor = shared
            .registers
            .find(doc! { "name": name })
            .sort(doc! { "revision": -1 })
            .projection(doc! { "_id": 1, "revision": 1, "save_id": 1, "parent": 1 })
            .max_time(shared.config.timeout)
            .session(&mut *session)
            .await?;
        cursor.stream(&mut *session).try_collect::<Vec<_>>().await
    };
    let found = shared
        .bounded(|| format!("checking the saves of register {name:?}"), find)
        .await?;
    found
        .into_iter()
        .rev()
        .map(|d| {
            let parent = match d.get("parent") {
                None | Some(Bson::Null) => None,
                Some(id) => Some(id.clone()),
            };
            Ok(Entry {
                id: d.get("_id").cloned().unwrap_or(Bson::Null),
                revision: revision_of(name, &d)?,
                parent,
            })
        })
        .collect()
}

/// Deletes, after the save answered, `name`'s revisions below `below` and this save's own
/// `stale` document (by `_id`), which a higher revision has made garbage.
///
/// The caller does not wait for it: it runs as a task of its own. Why a task and not inline:
/// the answer is decided before any delete, and a delete the server is slow with (or a
/// connection that stalls) would otherwise hold every save, up to `photon_timeout_ms` more,
/// for work that is not the caller's. Bounded: each delete by `photon_timeout_ms`, and at most
/// eight tasks at once per store (a save that finds them busy leaves its garbage to the next
/// save, which deletes everything below its bound), so a task outlives its store by at most
/// two round trips and cannot pile up. A failure leaves the documents to the next save, below
/// the latest where no load returns them; one that is not transient (a refused permission,
/// say) is logged at `warn`, because then no later save will do better.
fn cleanup(shared: &Arc<Shared>, name: &str, below: Option<u64>, stale: Option<Bson>) {
    if below.is_none() && stale.is_none() {
        return;
    }
    let Ok(permit) = Arc::clone(&shared.register_cleanups).try_acquire_owned() else {
        tracing::debug!(
            register = name,
            "cleanups busy; old revisions left for the next save"
        );
        return;
    };
    let (shared, name) = (Arc::clone(shared), name.to_owned());
    let work = async move {
        if let Some(own) = stale {
            let deleted = shared
                .bounded(
                    || format!("deleting a refused save of register {name:?}"),
                    shared.registers.delete_one(doc! { "_id": own }),
                )
                .await;
            if let Err(e) = deleted {
                log_failure(&name, &e, "refused save left for the next cleanup");
            }
        }
        if let Some(bound) = below.and_then(|b| i64::try_from(b).ok()) {
            let deleted = shared
                .bounded(
                    || format!("deleting old revisions of register {name:?}"),
                    shared
                        .registers
                        .delete_many(doc! { "name": &name, "revision": { "$lt": bound } })
                        // Ascending revision order, which the check after an insert rests on.
                        .hint(Hint::Name(REGISTER_INDEX.to_owned())),
                )
                .await;
            if let Err(e) = deleted {
                log_failure(&name, &e, "old revisions left for the next save");
            }
        }
        drop(permit);
    };
    // A save runs inside a tokio runtime (the driver needs one), so there is one to spawn on.
    tokio::spawn(work);
}

fn log_failure(name: &str, e: &Error, what: &str) {
    if e.is_retryable() {
        tracing::debug!(register = name, error = %e, "{what}");
    } else {
        tracing::warn!(register = name, error = %e, "{what}; storage grows until this is fixed");
    }
}

/// A stored register document as a [`Register`].
fn decode(name: &str, d: &Document) -> Result<Register, Error> {
    let (revision, save_id) = head(name, d)?;
    let value = match d.get("value") {
        Some(Bson::Binary(b)) => Bytes::from(b.bytes.clone()),
        _ => return Err(error::corrupt_register(name, "value is not binary")),
    };
    Ok(Register {
        revision,
        save_id,
        value,
    })
}

/// A stored register document's revision and save id.
fn head(name: &str, d: &Document) -> Result<(u64, Uuid), Error> {
    let save_id = uuid(name, d.get("save_id").unwrap_or(&Bson::Null), "save_id")?;
    Ok((revision_of(name, d)?, save_id))
}

fn revision_of(name: &str, d: &Document) -> Result<u64, Error> {
    let revision = match d.get("revision") {
        Some(Bson::Int64(r)) => *r,
        Some(Bson::Int32(r)) => i64::from(*r),
        _ => return Err(error::corrupt_register(name, "revision is not an integer")),
    };
    u64::try_from(revision).map_err(|_| error::corrupt_register(name, "revision is negative"))
}

fn uuid(name: &str, b: &Bson, field: &str) -> Result<Uuid, Error> {
    match b {
        Bson::Binary(b) => Uuid::from_slice(&b.bytes)
            .map_err(|_| error::corrupt_register(name, format!("{field} is not a UUID"))),
        _ => Err(error::corrupt_register(
            name,
            format!("{field} is not binary"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One snapshot's document: (`_id` as a number, revision, its parent's `_id`).
    fn entries(list: &[(i32, u64, Option<i32>)]) -> Vec<Entry> {
        list.iter()
            .map(|&(id, revision, parent)| Entry {
                id: Bson::Int32(id),
                revision,
                parent: parent.map(Bson::Int32),
            })
            .collect()
    }

    #[test]
    fn one_snapshot_decides_an_insert_that_landed() {
        // Our document is `_id` 0 at revision 2; 8 is another document of revision 2 (a rival's,
        // or an earlier send of this same save), 9 the one at revision 1.
        let own = Bson::Int32(0);
        let judged = |list: &[(i32, u64, Option<i32>)]| judge(2, &own, &entries(list));
        // The latest.
        assert_eq!(judged(&[(9, 1, None), (0, 2, Some(9))]), Verdict::Stored);
        // Saved on top of, by up to four others before the check: the evidence stays.
        let on_top = [
            (0, 2, Some(9)),
            (3, 3, Some(0)),
            (4, 4, Some(3)),
            (5, 5, Some(4)),
            (6, 6, Some(5)),
        ];
        assert_eq!(judged(&on_top), Verdict::Stored);
        // Even with ours deleted by the cleanup of 6 (< 3): the parent proves it.
        assert_eq!(judged(&on_top[1..]), Verdict::Stored);
        // Just above, saved on another document of revision 2 (even one of the same save id:
        // an earlier send stored it, not this call): stale, with the highest of the snapshot.
        assert_eq!(
            judged(&[(0, 2, Some(9)), (3, 3, Some(8)), (4, 6, Some(5))]),
            Verdict::Stale { highest: 6 }
        );
        assert_eq!(
            judged(&[(3, 3, Some(8)), (4, 6, Some(5))]),
            Verdict::Stale { highest: 6 }
        );
        // Only further above, ours still there: stale.
        assert_eq!(
            judged(&[(0, 2, Some(9)), (4, 4, Some(3)), (5, 7, Some(6))]),
            Verdict::Stale { highest: 7 }
        );
        // Only further above and ours gone: unknown.
        assert_eq!(
            judged(&[(4, 4, Some(3)), (5, 7, Some(6))]),
            Verdict::Unknown { above: 4 }
        );
        // Ours gone and nothing above (a rollback): unknown, never Ok.
        assert_eq!(judged(&[(9, 1, None)]), Verdict::Unknown { above: 2 });
    }

    #[test]
    fn stored_documents_decode_and_malformed_ones_are_named() {
        let id = Uuid::new_v4();
        let stored = doc! {
            "revision": 3_i64,
            "save_id": codec::uuid_bson(id),
            "value": Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: vec![1, 2] }),
        };
        assert_eq!(
            decode("r", &stored).unwrap(),
            Register {
                revision: 3,
                save_id: id,
                value: Bytes::from_static(&[1, 2]),
            }
        );
        let mut bad = stored.clone();
        bad.insert("revision", "3");
        let e = decode("view/x", &bad).unwrap_err();
        assert!(e.to_string().contains("register \"view/x\""), "{e}");
        assert!(e.to_string().contains("revision"), "{e}");
        let mut bad = stored;
        bad.remove("value");
        assert!(decode("r", &bad).is_err());
    }
}
