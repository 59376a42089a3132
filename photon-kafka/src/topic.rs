//! What a topic must be for the guarantees to hold, and the refusals when it is not. A stream's
//! partition is its key's hash modulo the partition count, so a count changed after events were
//! written splits streams over two partitions (two writers, two version indexes, history hidden);
//! a compacted or expiring topic deletes events; too few in-sync replicas or an unclean leader
//! election lose acknowledged ones.
//!
//! This module only decides, from values client.rs and reader.rs hand it; it asks no broker and
//! keeps no state.

use std::fmt;

use photon_api::Error;

use crate::client::BACKEND;

/// Why photon-kafka refuses to use a topic: the `source()` of the [`Error::Backend`] every call
/// that needs the topic answers, so a caller (or an operator's tool) can downcast it and tell a
/// layout to repair from a passing failure. Nothing is written into a refused topic.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopicRefused {
    /// The topic's partition count is not the one its events were written with: streams would be
    /// looked for, and written, in other partitions than their history.
    PartitionsChanged {
        /// The topic.
        topic: String,
        /// The count the events were written with, when a record says so (`photon.partitions`).
        was: Option<i32>,
        /// The count the brokers report now.
        now: i32,
        /// What showed it, e.g. a record written with another count.
        evidence: String,
    },
    /// `cleanup.policy` includes `compact`: all but the last record of each stream would be
    /// deleted.
    Compacted {
        /// The topic.
        topic: String,
        /// The topic's `cleanup.policy`.
        cleanup_policy: String,
    },
    /// `retention.ms` or `retention.bytes` is finite, so old events are deleted, and the URL does
    /// not allow it (`allow_finite_retention=true`).
    FiniteRetention {
        /// The topic.
        topic: String,
        /// `retention.ms` or `retention.bytes`.
        setting: &'static str,
        /// Its value.
        value: String,
    },
    /// The topic is replicated but `min.insync.replicas` is below 2: an append acknowledged by one
    /// broker is lost with that broker.
    TooFewInSyncReplicas {
        /// The topic.
        topic: String,
        /// The topic's `min.insync.replicas`.
        min_insync_replicas: i32,
        /// Replicas of its partitions.
        replication_factor: i32,
    },
    /// `unclean.leader.election.enable=true`: a replica that missed acknowledged appends may
    /// become the leader and drop them.
    UncleanLeaderElection {
        /// The topic.
        topic: String,
    },
    /// The registers topic (`<prefix>.photon-registers`) is not compacted: every save would stay
    /// for good (or be deleted by age, registers with it), where compaction keeps each
    /// register's latest.
    NotCompacted {
        /// The topic.
        topic: String,
        /// The topic's `cleanup.policy`.
        cleanup_policy: String,
    },
    /// The registers topic's `max.message.bytes` is below a register record of the largest
    /// value the contract allows.
    RecordsTooSmall {
        /// The topic.
        topic: String,
        /// The topic's `max.message.bytes`.
        max_message_bytes: String,
        /// What a register record of the largest value needs.
        needed: usize,
    },
}

impl TopicRefused {
    /// The topic refused.
    pub fn topic(&self) -> &str {
        match self {
            TopicRefused::PartitionsChanged { topic, .. }
            | TopicRefused::Compacted { topic, .. }
            | TopicRefused::FiniteRetention { topic, .. }
            | TopicRefused::TooFewInSyncReplicas { topic, .. }
            | TopicRefused::UncleanLeaderElection { topic }
            | TopicRefused::NotCompacted { topic, .. }
            | TopicRefused::RecordsTooSmall { topic, .. } => topic,
        }
    }

    /// The topic setting at fault, as Kafka names it (`partitions` for the count), so a tool can
    /// point at the line to change.
    pub fn setting(&self) -> &'static str {
        match self {
            TopicRefused::PartitionsChanged { .. } => "partitions",
            TopicRefused::Compacted { .. } => "cleanup.policy",
            TopicRefused::FiniteRetention { setting, .. } => setting,
            TopicRefused::TooFewInSyncReplicas { .. } => "min.insync.replicas",
            TopicRefused::UncleanLeaderElection { .. } => "unclean.leader.election.enable",
            TopicRefused::NotCompacted { .. } => "cleanup.policy",
            TopicRefused::RecordsTooSmall { .. } => "max.message.bytes",
        }
    }
}

impl fmt::Display for TopicRefused {
    /// Says what is wrong and how to recover, since the fix is on the cluster, not in the code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicRefused::PartitionsChanged {
                topic,
                was,
                now,
                evidence,
            } => {
                let was = was.map_or_else(|| "another count".to_owned(), |n| n.to_string());
                write!(
                    f,
                    "the partition count of topic {topic} changed from {was} to {now} after events were written ({evidence}); a stream's partition is its key's hash modulo the count, so photon-kafka refuses the topic rather than split streams over two partitions. Kafka cannot reduce a count: copy the events into a new topic with {was} partitions (e.g. under a new prefix) and use that; streams written since the change may be in two partitions"
                )
            }
            TopicRefused::Compacted {
                topic,
                cleanup_policy,
            } => write!(
                f,
                "topic {topic} has cleanup.policy={cleanup_policy}: compaction deletes all but the last event of each stream; set cleanup.policy=delete (kafka-configs --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=delete)"
            ),
            TopicRefused::FiniteRetention {
                topic,
                setting,
                value,
            } => write!(
                f,
                "topic {topic} has {setting}={value}: events older (or beyond that size) are deleted; set {setting}=-1, or accept losing old events with the URL option allow_finite_retention=true"
            ),
            TopicRefused::TooFewInSyncReplicas {
                topic,
                min_insync_replicas,
                replication_factor,
            } => write!(
                f,
                "topic {topic} has {replication_factor} replicas but min.insync.replicas={min_insync_replicas}: an append acknowledged by one broker is lost with it; set min.insync.replicas=2"
            ),
            TopicRefused::UncleanLeaderElection { topic } => write!(
                f,
                "topic {topic} has unclean.leader.election.enable=true: a replica that missed acknowledged appends may become leader and drop them; set it to false"
            ),
            TopicRefused::NotCompacted {
                topic,
                cleanup_policy,
            } => write!(
                f,
                "registers topic {topic} has cleanup.policy={cleanup_policy}: without compaction every register save stays for good (or registers are deleted by age); set cleanup.policy=compact (kafka-configs --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact)"
            ),
            TopicRefused::RecordsTooSmall {
                topic,
                max_message_bytes,
                needed,
            } => write!(
                f,
                "registers topic {topic} has max.message.bytes={max_message_bytes}: a register of the largest value allowed needs {needed}; set max.message.bytes={needed}"
            ),
        }
    }
}

impl std::error::Error for TopicRefused {}

/// The error every call that needs the topic answers: not retryable, the cluster must change.
pub(crate) fn refused(why: TopicRefused) -> Error {
    Error::backend(BACKEND, format!("using topic {}", why.topic()), why)
}

/// `min.insync.replicas` of topics photon-kafka creates: 2 when there is a second replica (an
/// append is on two brokers before it is acknowledged), else 1 (a single replica cannot do more).
pub(crate) fn created_min_insync(replication_factor: i32) -> i32 {
    replication_factor.clamp(1, 2)
}

/// Whether a topic with these settings (`value` gives a setting's current value) and
/// `replication_factor` keeps every acknowledged event. Finite retention passes only when
/// `allow_finite_retention`.
pub(crate) fn check_config<'v>(
    topic: &str,
    value: impl Fn(&str) -> Option<&'v str>,
    replication_factor: i32,
    allow_finite_retention: bool,
) -> Result<(), TopicRefused> {
    if let Some(policy) = value("cleanup.policy") {
        if policy.split(',').any(|p| p.trim() == "compact") {
            return Err(TopicRefused::Compacted {
                topic: topic.to_owned(),
                cleanup_policy: policy.to_owned(),
            });
        }
    }
    if !allow_finite_retention {
        for setting in ["retention.ms", "retention.bytes"] {
            let Some(v) = value(setting) else { continue };
            if v.trim().parse::<i64>().map_or(true, |n| n >= 0) {
                return Err(TopicRefused::FiniteRetention {
                    topic: topic.to_owned(),
                    setting,
                    value: v.to_owned(),
                });
            }
        }
    }
    if replication_factor >= 2 {
        let min = value("min.insync.replicas").and_then(|v| v.trim().parse::<i32>().ok());
        if let Some(min) = min.filter(|m| *m < 2) {
            return Err(TopicRefused::TooFewInSyncReplicas {
                topic: topic.to_owned(),
                min_insync_replicas: min,
                replication_factor,
            });
        }
    }
    if value("unclean.leader.election.enable").is_some_and(|v| v.trim() == "true") {
        return Err(TopicRefused::UncleanLeaderElection {
            topic: topic.to_owned(),
        });
    }
    Ok(())
}

/// Whether the registers topic with these settings keeps each register's latest save and only
/// that: compacted (`NotCompacted` otherwise), never deleted by age or size should `delete` be
/// part of the policy too (finite retention is refused whatever `allow_finite_retention` says:
/// a lost register is a lost checkpoint), records of `needed` bytes accepted, and the
/// replication rules of event topics. Compaction keeps the record of the highest offset per
/// key, and one fenced writer per partition gives the latest save the highest offset.
pub(crate) fn check_register_config<'v>(
    topic: &str,
    value: impl Fn(&str) -> Option<&'v str>,
    replication_factor: i32,
    needed: usize,
) -> Result<(), TopicRefused> {
    let policy = value("cleanup.policy").unwrap_or("delete");
    let policies: Vec<&str> = policy.split(',').map(str::trim).collect();
    if !policies.contains(&"compact") {
        return Err(TopicRefused::NotCompacted {
            topic: topic.to_owned(),
            cleanup_policy: policy.to_owned(),
        });
    }
    if let Some(v) = value("max.message.bytes") {
        if v.trim().parse::<usize>().map_or(true, |n| n < needed) {
            return Err(TopicRefused::RecordsTooSmall {
                topic: topic.to_owned(),
                max_message_bytes: v.to_owned(),
                needed,
            });
        }
    }
    // Retention is checked only where it applies (a compact-only topic ignores it, and its
    // broker default shows as finite); the rest as for events.
    let deletes = policies.contains(&"delete");
    let rest = |name: &str| match name {
        "cleanup.policy" => None,
        "retention.ms" | "retention.bytes" if !deletes => None,
        other => value(other),
    };
    check_config(topic, rest, replication_factor, false)
}

/// The longest `segment.ms` or `min.compaction.lag.ms` of the registers topic not warned
/// about: the cleaner never touches the active segment nor records younger than the lag, so
/// every save within that time stays, and a store's first read of a partition reads them all.
pub(crate) const REGISTER_LAG_WARNED_MS: u64 = 3_600_000;

/// The settings of a registers topic that are accepted but keep replaced saves long (Kafka's
/// default `segment.ms` of 7 days, a large `min.compaction.lag.ms`): each with its value, for a
/// warning naming it. A missing value is taken as Kafka's default.
pub(crate) fn register_config_warnings<'v>(
    value: impl Fn(&str) -> Option<&'v str>,
) -> Vec<(&'static str, String)> {
    [("segment.ms", "604800000"), ("min.compaction.lag.ms", "0")]
        .into_iter()
        .filter_map(|(setting, default)| {
            let v = value(setting).unwrap_or(default).trim();
            let long = v
                .parse::<u64>()
                .map_or(true, |ms| ms > REGISTER_LAG_WARNED_MS);
            long.then(|| (setting, v.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(settings: &[(&str, &str)], rf: i32, allow: bool) -> Result<(), TopicRefused> {
        check_config(
            "p.t",
            |name| settings.iter().find(|(k, _)| *k == name).map(|(_, v)| *v),
            rf,
            allow,
        )
    }

    const KEEPS: &[(&str, &str)] = &[
        ("cleanup.policy", "delete"),
        ("retention.ms", "-1"),
        ("retention.bytes", "-1"),
        ("min.insync.replicas", "2"),
        ("unclean.leader.election.enable", "false"),
    ];

    fn with(change: (&'static str, &'static str)) -> Vec<(&'static str, &'static str)> {
        let mut s: Vec<_> = KEEPS
            .iter()
            .filter(|(k, _)| *k != change.0)
            .copied()
            .collect();
        s.push(change);
        s
    }

    #[test]
    fn a_topic_that_keeps_everything_passes() {
        assert_eq!(check(KEEPS, 3, false), Ok(()));
        assert_eq!(check(&with(("min.insync.replicas", "1")), 1, false), Ok(()));
    }

    #[test]
    fn each_setting_that_loses_events_is_named() {
        for (change, rf, setting) in [
            (("cleanup.policy", "compact"), 1, "cleanup.policy"),
            (("cleanup.policy", "delete,compact"), 1, "cleanup.policy"),
            (("retention.ms", "604800000"), 1, "retention.ms"),
            (("retention.bytes", "1073741824"), 1, "retention.bytes"),
            (("min.insync.replicas", "1"), 3, "min.insync.replicas"),
            (("min.insync.replicas", "1"), 2, "min.insync.replicas"),
            (
                ("unclean.leader.election.enable", "true"),
                1,
                "unclean.leader.election.enable",
            ),
        ] {
            let e = check(&with(change), rf, false).expect_err(setting);
            assert_eq!(e.setting(), setting, "{change:?}");
            assert_eq!(e.topic(), "p.t");
            let shown = e.to_string();
            assert!(shown.contains(setting) && shown.contains("p.t"), "{shown}");
        }
        let e = check(&with(("min.insync.replicas", "1")), 3, false).unwrap_err();
        assert_eq!(
            e,
            TopicRefused::TooFewInSyncReplicas {
                topic: "p.t".into(),
                min_insync_replicas: 1,
                replication_factor: 3
            }
        );
    }

    #[test]
    fn finite_retention_passes_only_when_allowed_and_compaction_never() {
        assert_eq!(check(&with(("retention.ms", "86400000")), 1, true), Ok(()));
        assert_eq!(check(&with(("retention.bytes", "10")), 1, true), Ok(()));
        let e = check(&with(("cleanup.policy", "compact")), 1, true).unwrap_err();
        assert_eq!(e.setting(), "cleanup.policy");
        let refusal = refused(e);
        assert!(!refusal.is_retryable());
        assert!(refusal.to_string().contains("using topic p.t"), "{refusal}");
    }

    #[test]
    fn a_registers_topic_must_be_compacted_and_take_the_largest_register() {
        let compacted: Vec<(&str, &str)> = vec![
            ("cleanup.policy", "compact"),
            ("retention.ms", "604800000"),
            ("max.message.bytes", "1000000"),
            ("min.insync.replicas", "2"),
        ];
        let check = |s: &[(&str, &str)], rf: i32| {
            check_register_config(
                "p.photon-registers",
                |name| s.iter().find(|(k, _)| *k == name).map(|(_, v)| *v),
                rf,
                1_065_536,
            )
        };
        // A compact-only topic ignores retention: its broker default does not refuse it.
        let e = check(&compacted, 3).unwrap_err();
        assert_eq!(e.setting(), "max.message.bytes", "{e}");
        let mut fine = compacted.clone();
        fine[2] = ("max.message.bytes", "1065536");
        assert_eq!(check(&fine, 3), Ok(()));
        for (change, setting) in [
            (("cleanup.policy", "delete"), "cleanup.policy"),
            (("cleanup.policy", "compact,delete"), "retention.ms"),
            (("min.insync.replicas", "1"), "min.insync.replicas"),
            (
                ("unclean.leader.election.enable", "true"),
                "unclean.leader.election.enable",
            ),
        ] {
            let mut s: Vec<_> = fine
                .iter()
                .filter(|(k, _)| *k != change.0)
                .copied()
                .collect();
            s.push(change);
            let e = check(&s, 3).expect_err(setting);
            assert_eq!(e.setting(), setting, "{change:?}");
            assert!(e.to_string().contains(setting), "{e}");
        }
        // No policy shown is Kafka's default, delete.
        assert_eq!(check(&[], 1).unwrap_err().setting(), "cleanup.policy");
    }

    #[test]
    fn a_registers_topic_that_keeps_saves_long_is_warned_about() {
        let warned = |s: &[(&str, &str)]| {
            register_config_warnings(|name| s.iter().find(|(k, _)| *k == name).map(|(_, v)| *v))
                .into_iter()
                .map(|(setting, _)| setting)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            warned(&[("segment.ms", "600000"), ("min.compaction.lag.ms", "0")]),
            Vec::<&str>::new()
        );
        // Kafka's defaults: a week of saves in the active segment.
        assert_eq!(warned(&[]), ["segment.ms"]);
        assert_eq!(
            warned(&[
                ("segment.ms", "604800000"),
                ("min.compaction.lag.ms", "86400000")
            ]),
            ["segment.ms", "min.compaction.lag.ms"]
        );
    }

    #[test]
    fn created_topics_ask_for_two_in_sync_replicas_where_there_are_two() {
        assert_eq!(created_min_insync(1), 1);
        assert_eq!(created_min_insync(2), 2);
        assert_eq!(created_min_insync(3), 2);
    }
}
