//! Whether the cluster keeps guarantee 1 (an acknowledged append is stored) through a crash: read
//! once at connect from the keyspace's replication (`system_schema.keyspaces`) and the answering
//! node's commit-log settings (`system_views.settings`), classified, reported by `health()`, a
//! warning when an acknowledged append can be lost in a crash, and a refusal with
//! `require_durable=true`.
//!
//! This module only reads and judges; it never changes the cluster's settings.

use std::collections::HashMap;
use std::fmt;

use photon_api::Error;
use scylla::client::session::Session;
use scylla::errors::ExecutionError;
use scylla::statement::SerialConsistency;

use crate::config::CassandraConfig;
use crate::error;

/// When the node acknowledges a write relative to syncing its commit log to disk.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) enum CommitLogSync {
    /// `batch`: after the sync.
    Batch,
    /// `group`: after the sync of its group (this window).
    Group { window: String },
    /// `periodic`: before the sync, which runs every `period`; a crash (even of the process
    /// only: replay stops at the last sync marker) loses what came since.
    Periodic { period: String },
    /// Not known (the settings could not be read, or name a mode this store does not know).
    Unknown { why: String },
}

/// What a crash can do to an acknowledged append.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Verdict {
    /// Every copy is on disk before the append is acknowledged: no crash loses it.
    Synced,
    /// Acknowledged before the sync, but on at least two replicas: the crash of one node loses
    /// nothing; all of them crashing within one sync period (a power loss) can.
    Replicated,
    /// Acknowledged before the sync and on one replica only: a crash of that node can lose it.
    CrashCanLose,
    /// Not known: the settings could not be read or understood.
    Unknown,
}

/// The keyspace's replication and the commit-log settings, as read at connect.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct Durability {
    /// The replication as the keyspace states it, e.g. `SimpleStrategy 1`.
    pub(crate) replication: String,
    /// Replicas that hold an acknowledged append: a quorum of the replicas the conditional
    /// write's serial consistency counts (None when the strategy is not understood).
    pub(crate) copies: Option<u32>,
    /// Full replicas in all (a lost disk loses everything when this is 1).
    pub(crate) replicas: Option<u32>,
    pub(crate) sync: CommitLogSync,
}

impl Durability {
    /// What a crash can do to an acknowledged append.
    pub(crate) fn verdict(&self) -> Verdict {
        match (&self.sync, self.copies) {
            (CommitLogSync::Batch | CommitLogSync::Group { .. }, Some(_)) => Verdict::Synced,
            (CommitLogSync::Periodic { .. }, Some(n)) if n >= 2 => Verdict::Replicated,
            (CommitLogSync::Periodic { .. }, Some(_)) => Verdict::CrashCanLose,
            _ => Verdict::Unknown,
        }
    }

    /// Whether `require_durable=true` accepts this cluster: no crash of one node may lose an
    /// acknowledged append, and that must be known.
    pub(crate) fn is_durable(&self) -> bool {
        matches!(self.verdict(), Verdict::Synced | Verdict::Replicated)
    }

    /// The refusal of `require_durable=true`, naming the setting and how to fix it.
    pub(crate) fn refusal(&self, config: &CassandraConfig) -> Error {
        let fix = match self.verdict() {
            Verdict::Unknown => "photon-cassandra could not establish what a crash does to an acknowledged append (it reads system_schema.keyspaces and system_views.settings, Cassandra 4.0 or later); check the cluster by hand and connect without require_durable",
            _ => "set commitlog_sync: batch (or group) in cassandra.yaml on every node, or replicate the keyspace so that a quorum is at least 2 replicas (ALTER KEYSPACE ... WITH replication = ..., then nodetool repair), or connect without require_durable",
        };
        Error::InvalidInput {
            what: format!(
                "require_durable=true for keyspace {} on {}",
                config.keyspace,
                config.contact_points.join(",")
            ),
            reason: format!("{self}; {fix}"),
        }
    }
}

impl fmt::Display for Durability {
    /// Says plainly what a crash does to an acknowledged append.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let copies = match self.copies {
            Some(1) => "1 replica".to_owned(),
            Some(n) => format!("{n} replicas"),
            None => "an unknown number of replicas".to_owned(),
        };
        let sync = match &self.sync {
            CommitLogSync::Batch => "commitlog_sync batch".to_owned(),
            CommitLogSync::Group { window } => format!("commitlog_sync group ({window})"),
            CommitLogSync::Periodic { period } => format!("commitlog_sync periodic ({period})"),
            CommitLogSync::Unknown { why } => format!("commitlog_sync unknown ({why})"),
        };
        write!(
            f,
            "replication {}, {sync}: an acknowledged append is on {copies}",
            self.replication
        )?;
        match (&self.sync, self.verdict()) {
            (_, Verdict::Synced) => {
                write!(f, ", on disk before it is acknowledged: a crash loses nothing")?;
                if self.replicas == Some(1) {
                    write!(f, " (but with one replica, losing that node's disk loses every event)")?;
                }
                Ok(())
            }
            (CommitLogSync::Periodic { period }, Verdict::Replicated) => write!(
                f,
                ", acknowledged before it is on disk: the crash of one node loses nothing, but all of them crashing within {period} (a power loss) can lose acknowledged appends"
            ),
            (CommitLogSync::Periodic { period }, _) => write!(
                f,
                ", acknowledged before it is on disk: AN ACKNOWLEDGED APPEND CAN BE LOST IN A CRASH (up to {period} of them when the node crashes, even a killed process)"
            ),
            _ => write!(f, ": whether a crash can lose an acknowledged append is unknown"),
        }
    }
}

/// The decision at connect: a cluster where a crash can lose an acknowledged append (or where
/// that is unknown) is refused with `require_durable=true`, and otherwise named in a warning.
///
/// # Errors
/// - [`Error::InvalidInput`] (see [`Durability::refusal`]) when `require_durable` is set and
///   the cluster is not durable.
pub(crate) fn accept(found: &Durability, config: &CassandraConfig) -> Result<(), Error> {
    if found.is_durable() {
        return Ok(());
    }
    if config.require_durable {
        return Err(found.refusal(config));
    }
    tracing::warn!(
        keyspace = %config.keyspace,
        "photon-cassandra: {found} (require_durable=true refuses such a cluster)"
    );
    Ok(())
}

/// Reads the keyspace's replication and the answering node's commit-log settings.
///
/// # Errors
/// - `Unavailable` when a read times out or the node cannot answer; `Backend` when the keyspace
///   is not in `system_schema` (it was just created or checked). Settings that cannot be read
///   (no `system_views`: Cassandra before 4.0, ScyllaDB) make the sync mode unknown, not an error.
pub(crate) async fn read(session: &Session, config: &CassandraConfig) -> Result<Durability, Error> {
    let context = || format!("reading the replication of keyspace {}", config.keyspace);
    let (replication,) = session
        .query_unpaged(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (config.keyspace.as_str(),),
        )
        .await
        .map_err(|e| error::request(context(), e))?
        .into_rows_result()
        .map_err(|e| error::driver(context(), e))?
        .single_row::<(HashMap<String, String>,)>()
        .map_err(|e| error::driver(context(), e))?;
    let settings = match session
        .query_unpaged("SELECT name, value FROM system_views.settings", ())
        .await
    {
        Ok(answer) => {
            let context = || "reading the commit-log settings (system_views.settings)".to_owned();
            answer
                .into_rows_result()
                .map_err(|e| error::driver(context(), e))?
                .rows::<(String, Option<String>)>()
                .map_err(|e| error::driver(context(), e))?
                .filter_map(|r| match r {
                    Ok((name, value)) if name.starts_with("commitlog_sync") => {
                        Some(Ok((name, value.unwrap_or_default())))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(error::driver(context(), e))),
                })
                .collect::<Result<HashMap<_, _>, _>>()?
        }
        Err(e) => unreadable_settings(e)?,
    };
    Ok(classify(
        &replication,
        &settings,
        config.serial_consistency,
        config.local_dc.as_deref(),
    ))
}

/// Settings that cannot be read: a transient failure is `Unavailable` (connect again); a refusal
/// (no such table) leaves the sync mode unknown.
fn unreadable_settings(e: ExecutionError) -> Result<HashMap<String, String>, Error> {
    let context = "reading the commit-log settings (system_views.settings)";
    match error::request(context, e) {
        e @ Error::Unavailable { .. } => Err(e),
        e => Ok(HashMap::from([(
            "commitlog_sync".to_owned(),
            format!("unreadable: {e}"),
        )])),
    }
}

/// Judges a keyspace's `replication` map (as `system_schema.keyspaces` gives it) and the
/// `commitlog_sync*` settings (as `system_views.settings` gives them).
pub(crate) fn classify(
    replication: &HashMap<String, String>,
    settings: &HashMap<String, String>,
    serial: SerialConsistency,
    local_dc: Option<&str>,
) -> Durability {
    let class = replication
        .get("class")
        .map(|c| c.rsplit('.').next().unwrap_or(c))
        .unwrap_or("unknown");
    // A factor is `n`, or `n/t` with t transient replicas (which hold no data for long).
    let full = |v: &str| -> Option<u32> {
        match v.split_once('/') {
            Some((n, t)) => n.parse::<u32>().ok()?.checked_sub(t.parse().ok()?),
            None => v.parse().ok(),
        }
    };
    let quorum = |n: u32| n / 2 + 1;
    let (description, replicas, copies) = match class {
        "SimpleStrategy" => {
            let n = replication.get("replication_factor").and_then(|v| full(v));
            let shown = replication
                .get("replication_factor")
                .map_or("?", String::as_str);
            (format!("SimpleStrategy {shown}"), n, n.map(quorum))
        }
        "NetworkTopologyStrategy" => {
            let mut dcs: Vec<(&String, &String)> = replication
                .iter()
                .filter(|(k, _)| k.as_str() != "class")
                .collect();
            dcs.sort();
            let shown: Vec<String> = dcs.iter().map(|(dc, n)| format!("{dc}:{n}")).collect();
            let factors: Option<Vec<(&str, u32)>> = dcs
                .iter()
                .map(|(dc, n)| Some((dc.as_str(), full(n)?)))
                .collect();
            let total = factors
                .as_ref()
                .map(|f| f.iter().map(|(_, n)| n).sum::<u32>());
            let copies = match (serial, &factors) {
                (_, None) => None,
                (SerialConsistency::Serial, Some(_)) => total.filter(|n| *n > 0).map(quorum),
                // LOCAL_SERIAL: a quorum of the local datacenter only (the smallest one when the
                // local datacenter is not named).
                (SerialConsistency::LocalSerial, Some(f)) => f
                    .iter()
                    .filter(|(dc, _)| local_dc.is_none_or(|l| l == *dc))
                    .map(|(_, n)| *n)
                    .filter(|n| *n > 0)
                    .min()
                    .map(quorum),
            };
            (
                format!("NetworkTopologyStrategy {}", shown.join(",")),
                total,
                copies,
            )
        }
        other => (other.to_owned(), None, None),
    };
    let setting = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| settings.get(*n))
            .cloned()
            .unwrap_or_else(|| "?".to_owned())
    };
    let mode = settings.get("commitlog_sync");
    let is = |m: &str| mode.is_some_and(|s| s.eq_ignore_ascii_case(m));
    let sync = match mode {
        _ if is("batch") => CommitLogSync::Batch,
        _ if is("group") => CommitLogSync::Group {
            window: setting(&[
                "commitlog_sync_group_window",
                "commitlog_sync_group_window_in_ms",
            ]),
        },
        _ if is("periodic") => CommitLogSync::Periodic {
            period: setting(&["commitlog_sync_period", "commitlog_sync_period_in_ms"]),
        },
        Some(other) => CommitLogSync::Unknown { why: other.clone() },
        None => CommitLogSync::Unknown {
            why: "not in system_views.settings".to_owned(),
        },
    };
    Durability {
        replication: description,
        copies,
        replicas,
        sync,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn simple(n: &str) -> HashMap<String, String> {
        map(&[
            ("class", "org.apache.cassandra.locator.SimpleStrategy"),
            ("replication_factor", n),
        ])
    }

    fn sync(mode: &str) -> HashMap<String, String> {
        map(&[
            ("commitlog_sync", mode),
            ("commitlog_sync_period", "10000ms"),
            ("commitlog_sync_group_window", "15ms"),
        ])
    }

    fn judge(replication: &HashMap<String, String>, mode: &str) -> Durability {
        classify(replication, &sync(mode), SerialConsistency::Serial, None)
    }

    #[test]
    fn batch_and_group_are_synced_whatever_the_replication() {
        for mode in ["batch", "group", "BATCH"] {
            let d = judge(&simple("1"), mode);
            assert_eq!(d.verdict(), Verdict::Synced, "{mode}");
            assert!(d.is_durable());
            let shown = d.to_string();
            assert!(shown.contains("a crash loses nothing"), "{shown}");
            assert!(shown.contains("losing that node's disk"), "{shown}");
        }
        let d = judge(&simple("3"), "group");
        assert_eq!(d.copies, Some(2));
        assert!(!d.to_string().contains("disk loses"), "{d}");
        assert!(d.to_string().contains("group (15ms)"), "{d}");
    }

    #[test]
    fn periodic_with_one_copy_can_lose_an_acknowledged_append() {
        for replication in [simple("1"), simple("2")] {
            // Two replicas: a quorum is both, but one replica: one copy.
            let d = judge(&replication, "periodic");
            if d.copies == Some(1) {
                assert_eq!(d.verdict(), Verdict::CrashCanLose);
                assert!(!d.is_durable());
                let shown = d.to_string();
                assert!(
                    shown.contains("AN ACKNOWLEDGED APPEND CAN BE LOST IN A CRASH")
                        && shown.contains("10000ms"),
                    "{shown}"
                );
            } else {
                assert_eq!(d.copies, Some(2));
                assert_eq!(d.verdict(), Verdict::Replicated);
            }
        }
    }

    #[test]
    fn periodic_on_a_quorum_of_two_or_more_survives_one_crash() {
        let nts = map(&[
            (
                "class",
                "org.apache.cassandra.locator.NetworkTopologyStrategy",
            ),
            ("dc1", "3"),
            ("dc2", "3"),
        ]);
        let d = judge(&nts, "periodic");
        assert_eq!((d.replicas, d.copies), (Some(6), Some(4)));
        assert_eq!(d.verdict(), Verdict::Replicated);
        assert!(d.is_durable());
        assert!(
            d.to_string()
                .contains("the crash of one node loses nothing"),
            "{d}"
        );
        assert_eq!(d.replication, "NetworkTopologyStrategy dc1:3,dc2:3");
        // LOCAL_SERIAL counts the local datacenter only.
        let one_local = map(&[
            (
                "class",
                "org.apache.cassandra.locator.NetworkTopologyStrategy",
            ),
            ("dc1", "1"),
            ("dc2", "3"),
        ]);
        let local = |dc| {
            classify(
                &one_local,
                &sync("periodic"),
                SerialConsistency::LocalSerial,
                dc,
            )
        };
        assert_eq!(local(Some("dc1")).verdict(), Verdict::CrashCanLose);
        assert_eq!(local(Some("dc2")).verdict(), Verdict::Replicated);
        assert_eq!(local(None).verdict(), Verdict::CrashCanLose, "the smallest");
        // Transient replicas hold nothing for long: 3/2 is one full replica.
        let transient = map(&[
            (
                "class",
                "org.apache.cassandra.locator.NetworkTopologyStrategy",
            ),
            ("dc1", "3/2"),
        ]);
        assert_eq!(
            judge(&transient, "periodic").verdict(),
            Verdict::CrashCanLose
        );
    }

    #[test]
    fn what_is_not_understood_is_unknown_and_not_durable() {
        let unknown_sync = classify(
            &simple("3"),
            &map(&[("commitlog_sync", "sometimes")]),
            SerialConsistency::Serial,
            None,
        );
        let no_settings = classify(
            &simple("3"),
            &HashMap::new(),
            SerialConsistency::Serial,
            None,
        );
        let odd_strategy = judge(
            &map(&[("class", "org.apache.cassandra.locator.LocalStrategy")]),
            "batch",
        );
        let bad_factor = judge(&simple("many"), "batch");
        for d in [unknown_sync, no_settings, odd_strategy, bad_factor] {
            assert_eq!(d.verdict(), Verdict::Unknown, "{d:?}");
            assert!(!d.is_durable());
            assert!(d.to_string().contains("unknown"), "{d}");
        }
    }

    #[test]
    fn the_refusal_names_the_setting_and_the_fix() {
        let config = CassandraConfig::from_url("cassandra://h1:9042/ks?require_durable=true")
            .expect("valid");
        match judge(&simple("1"), "periodic").refusal(&config) {
            Error::InvalidInput { what, reason } => {
                assert_eq!(what, "require_durable=true for keyspace ks on h1:9042");
                for needle in [
                    "commitlog_sync periodic (10000ms)",
                    "SimpleStrategy 1",
                    "commitlog_sync: batch",
                    "ALTER KEYSPACE",
                ] {
                    assert!(reason.contains(needle), "{needle}: {reason}");
                }
            }
            other => panic!("want InvalidInput, got {other:?}"),
        }
        let unknown = classify(
            &simple("1"),
            &HashMap::new(),
            SerialConsistency::Serial,
            None,
        );
        let reason = unknown.refusal(&config).to_string();
        assert!(reason.contains("could not establish"), "{reason}");
    }

    #[test]
    fn connect_refuses_only_with_require_durable() {
        let strict = CassandraConfig::from_url("cassandra://h/ks?require_durable=true").unwrap();
        let lenient = CassandraConfig::from_url("cassandra://h/ks").unwrap();
        let lossy = judge(&simple("1"), "periodic");
        let unknown = classify(
            &simple("1"),
            &HashMap::new(),
            SerialConsistency::Serial,
            None,
        );
        for d in [&lossy, &unknown] {
            match accept(d, &strict) {
                Err(Error::InvalidInput { what, .. }) => {
                    assert!(what.starts_with("require_durable=true"), "{what}")
                }
                other => panic!("want the refusal for {d}, got {other:?}"),
            }
            assert!(accept(d, &lenient).is_ok(), "a warning only: {d}");
        }
        for d in [
            judge(&simple("1"), "batch"),
            judge(&simple("3"), "periodic"),
        ] {
            assert!(accept(&d, &strict).is_ok(), "{d}");
        }
    }

    #[test]
    fn settings_that_are_refused_are_unknown_and_timeouts_unavailable() {
        use scylla::errors::{DbError, RequestAttemptError};
        let refused = ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::Invalid,
            "table settings does not exist".into(),
        ));
        let settings = unreadable_settings(refused).expect("unknown, not an error");
        let d = classify(&simple("1"), &settings, SerialConsistency::Serial, None);
        assert_eq!(d.verdict(), Verdict::Unknown);
        assert!(d.to_string().contains("does not exist"), "{d}");
        let timeout = ExecutionError::RequestTimeout(std::time::Duration::from_secs(1));
        match unreadable_settings(timeout) {
            Err(e @ Error::Unavailable { .. }) => assert!(e.is_retryable()),
            other => panic!("want Unavailable, got {other:?}"),
        }
    }
}
