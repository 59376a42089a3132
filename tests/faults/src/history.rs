//! What was appended and what was delivered, and the checker that compares both with what the
//! store holds once the faults are over.
//!
//! Every append of a scenario goes through [`History::append`] (or is recorded by the writer
//! binary), which records the batch's ids and its outcome: acknowledged with versions, refused
//! with a definite error, or unknown (`Unavailable`, a dropped call, a killed process). The checker
//! then reads the store with the servers healthy and holds it to the contract under faults
//! (`shared/design.md`, "When things go wrong").

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use photon_api::{
    AppendResult, Category, Checkpoint, Error, EventData, EventStore, ExpectedVersion, ReadOptions,
    RecordedEvent, Selector, Start, StreamId, SubscriptionItem, SubscriptionMode, Version,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How an append ended, as its caller saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// `Ok`: the batch is stored at `first..=last`.
    Acked {
        /// Version of the first event.
        first: u64,
        /// Version of the last event.
        last: u64,
    },
    /// A definite error: nothing of the batch may ever be stored.
    Refused(String),
    /// `Unavailable`, a call dropped by its caller or a killed writer: stored entirely or not at
    /// all.
    Unknown(String),
}

/// One append call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppendRecord {
    /// The aggregate stream written.
    pub stream: String,
    /// The batch's event ids, in order.
    pub ids: Vec<Uuid>,
    /// How it ended.
    pub outcome: Outcome,
}

/// Sorts an append error into refused or unknown, as the contract defines them: only errors that
/// say nothing was stored are definite. A `Backend` error is taken as definite too, because the
/// contract says every "may have landed" error must be `Unavailable`; the checker then catches a
/// backend that answers `Backend` for a write that landed.
pub fn classify(result: &Result<AppendResult, Error>) -> Outcome {
    match result {
        Ok(r) => Outcome::Acked {
            first: r.first_version.0,
            last: r.last_version.0,
        },
        Err(e @ Error::Unavailable { .. }) => Outcome::Unknown(e.to_string()),
        Err(e) => Outcome::Refused(e.to_string()),
    }
}

/// The appends of a run, shared by every task of a scenario.
#[derive(Clone, Default, Debug)]
pub struct History {
    records: Arc<Mutex<Vec<AppendRecord>>>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one append call.
    pub fn record(&self, record: AppendRecord) {
        self.records.lock().expect("history lock").push(record);
    }

    /// Appends through `store` and records the outcome.
    pub async fn append(
        &self,
        store: &dyn EventStore,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        let ids = events.iter().map(|e| e.event_id).collect();
        let result = store.append(stream, expected, events).await;
        self.record(AppendRecord {
            stream: stream.as_str().to_owned(),
            ids,
            outcome: classify(&result),
        });
        result
    }

    /// Every record so far.
    pub fn records(&self) -> Vec<AppendRecord> {
        self.records.lock().expect("history lock").clone()
    }

    /// How many appends were acknowledged.
    pub fn acknowledged(&self) -> usize {
        self.records()
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Acked { .. }))
            .count()
    }
}

/// One event as a subscriber received it.
#[derive(Clone, Debug)]
pub struct Delivered {
    /// Its stream.
    pub stream: String,
    /// Its version.
    pub version: u64,
    /// Its id.
    pub id: Uuid,
    /// The checkpoint that resumes after it.
    pub checkpoint: Checkpoint,
}

impl From<&RecordedEvent> for Delivered {
    fn from(e: &RecordedEvent) -> Self {
        Self {
            stream: e.stream.as_str().to_owned(),
            version: e.version.0,
            id: e.event_id,
            checkpoint: e.checkpoint.clone(),
        }
    }
}

/// What the store holds for the scenario's streams: stream -> events in version order.
pub type Stored = BTreeMap<String, Vec<(u64, Uuid)>>;

/// The checker's findings; empty when the store kept the contract.
#[derive(Debug, Default)]
pub struct Findings(pub Vec<String>);

impl Findings {
    fn push(&mut self, finding: String) {
        // A broken run can produce thousands of findings; the first ones tell the story.
        if self.0.len() < 40 {
            self.0.push(finding);
        }
    }

    /// Panics listing every finding, naming the scenario.
    #[track_caller]
    pub fn assert_none(&self, scenario: &str) {
        assert!(
            self.0.is_empty(),
            "{scenario}: the store broke the contract:\n  - {}",
            self.0.join("\n  - ")
        );
    }
}

/// Reads every stream the history wrote, in full, retrying `Unavailable` for up to `patience`.
pub async fn read_stored(
    store: &dyn EventStore,
    history: &[AppendRecord],
    patience: Duration,
) -> Result<Stored, Error> {
    let streams: HashSet<&str> = history.iter().map(|r| r.stream.as_str()).collect();
    let mut stored = Stored::new();
    for name in streams {
        let stream = StreamId::parse(name)?;
        let events = retrying(patience, || async {
            store
                .read_stream(&stream, ReadOptions::default())
                .map_ok(|e| (e.version.0, e.event_id))
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        stored.insert(name.to_owned(), events);
    }
    Ok(stored)
}

/// Retries `f` while it answers `Unavailable`, for at most `patience`.
pub async fn retrying<T, F, Fut>(patience: Duration, mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = Instant::now() + patience;
    loop {
        match f().await {
            Err(Error::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// Checks the aggregate streams against the history: every acknowledged event stored exactly once
/// at its acknowledged version, nothing of a refused append stored, an unknown append stored
/// entirely or not at all, nothing stored that no append sent, versions contiguous from 0.
pub fn check_streams(history: &[AppendRecord], stored: &Stored) -> Findings {
    let mut findings = Findings::default();
    for (stream, events) in stored {
        let mut seen = HashSet::new();
        for (i, (version, id)) in events.iter().enumerate() {
            if *version != i as u64 {
                findings.push(format!(
                    "{stream}: event {i} has version {version} (versions must be contiguous from 0)"
                ));
            }
            if !seen.insert(*id) {
                findings.push(format!("{stream}: event {id} is stored twice"));
            }
        }
    }
    // Every batch sent, by (stream, ids); a re-send adds a record of the same batch.
    let mut batches: HashMap<(&str, &[Uuid]), Vec<&Outcome>> = HashMap::new();
    let mut sent: HashMap<&str, HashSet<Uuid>> = HashMap::new();
    for r in history {
        batches
            .entry((r.stream.as_str(), r.ids.as_slice()))
            .or_default()
            .push(&r.outcome);
        sent.entry(r.stream.as_str())
            .or_default()
            .extend(r.ids.iter().copied());
    }
    let at: HashMap<(&str, Uuid), u64> = stored
        .iter()
        .flat_map(|(s, events)| events.iter().map(move |(v, id)| ((s.as_str(), *id), *v)))
        .collect();
    for ((stream, ids), outcomes) in &batches {
        let versions: Vec<Option<u64>> = ids
            .iter()
            .map(|id| at.get(&(*stream, *id)).copied())
            .collect();
        let stored_count = versions.iter().flatten().count();
        let whole = stored_count == ids.len();
        if stored_count != 0 && !whole {
            findings.push(format!(
                "{stream}: only {stored_count} of the {} events of batch {} are stored (atomicity)",
                ids.len(),
                ids[0]
            ));
            continue;
        }
        if whole {
            let first = versions[0].expect("whole");
            let contiguous = versions
                .iter()
                .enumerate()
                .all(|(i, v)| *v == Some(first + i as u64));
            if !contiguous {
                findings.push(format!(
                    "{stream}: batch {} is stored at versions {versions:?}, not in one run",
                    ids[0]
                ));
            }
        }
        for outcome in outcomes {
            match outcome {
                Outcome::Acked { first, last } => {
                    if !whole {
                        findings.push(format!(
                            "{stream}: acknowledged batch {} at {first}..={last} is not stored (lost)",
                            ids[0]
                        ));
                    } else if versions[0] != Some(*first) || versions[ids.len() - 1] != Some(*last)
                    {
                        findings.push(format!(
                            "{stream}: batch {} was acknowledged at {first}..={last} but is stored at {versions:?}",
                            ids[0]
                        ));
                    }
                }
                Outcome::Refused(why) => {
                    if whole {
                        findings.push(format!(
                            "{stream}: batch {} was refused ({why}) but is stored at {versions:?}",
                            ids[0]
                        ));
                    }
                }
                Outcome::Unknown(_) => {}
            }
        }
    }
    for (stream, events) in stored {
        let ours = sent.get(stream.as_str());
        for (version, id) in events {
            if !ours.is_some_and(|ids| ids.contains(id)) {
                findings.push(format!(
                    "{stream}: version {version} holds {id}, which no append of the run sent"
                ));
            }
        }
    }
    findings
}

/// Checks a category (or the all stream, filtered to the category) against the stored streams:
/// exactly the union of the category's stored events, each once, each stream in version order.
pub fn check_selector(what: &str, delivered: &[Delivered], stored: &Stored) -> Findings {
    let mut findings = Findings::default();
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    for d in delivered {
        if !seen.insert(d.id) {
            findings.push(format!(
                "{what}: {} v{} ({}) delivered twice",
                d.stream, d.version, d.id
            ));
            continue;
        }
        let expected_next = last.get(d.stream.as_str()).map_or(0, |v| v + 1);
        if d.version != expected_next {
            findings.push(format!(
                "{what}: {} v{} delivered after v{:?} (per-stream order, no gap)",
                d.stream,
                d.version,
                last.get(d.stream.as_str())
            ));
        }
        last.insert(d.stream.as_str(), d.version);
    }
    let delivered_ids: HashMap<Uuid, &Delivered> = delivered.iter().map(|d| (d.id, d)).collect();
    for (stream, events) in stored {
        for (version, id) in events {
            match delivered_ids.get(id) {
                None => findings.push(format!("{what}: {stream} v{version} ({id}) is missing")),
                Some(d) if d.version != *version || d.stream != *stream => findings.push(format!(
                    "{what}: {id} delivered as {} v{}, stored as {stream} v{version}",
                    d.stream, d.version
                )),
                Some(_) => {}
            }
        }
    }
    let stored_ids: HashSet<Uuid> = stored.values().flatten().map(|(_, id)| *id).collect();
    for d in delivered {
        if !stored_ids.contains(&d.id) {
            findings.push(format!(
                "{what}: delivered {} v{} ({}), which the stream does not hold",
                d.stream, d.version, d.id
            ));
        }
    }
    findings
}

/// A cold replay of `selector` from `start`, keeping only events of `category`. A replay that
/// ends with `Unavailable` after some progress goes on from its last checkpoint, as a consumer
/// would; one that fails before any event answers the error.
pub async fn cold(
    store: &dyn EventStore,
    selector: Selector,
    start: Start,
    category: &Category,
) -> Result<Vec<Delivered>, Error> {
    let prefix = format!("{}-", category.as_str());
    let mut out = Vec::new();
    let mut start = start;
    let mut failures = 0;
    loop {
        let mut sub = store.subscribe(selector.clone(), start.clone(), SubscriptionMode::Cold);
        let mut progressed = false;
        let mut failed = None;
        while let Some(item) = futures::StreamExt::next(&mut sub).await {
            match item {
                Ok(SubscriptionItem::Event(e)) => {
                    progressed = true;
                    start = Start::After(e.checkpoint.clone());
                    if e.stream.as_str().starts_with(&prefix) {
                        out.push(Delivered::from(&e));
                    }
                }
                Ok(SubscriptionItem::CaughtUp) => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            None => return Ok(out),
            Some(e @ Error::Unavailable { .. }) if progressed || failures < 3 => {
                failures += usize::from(!progressed);
                tracing::debug!("cold replay resumes after: {e}");
            }
            Some(e) => return Err(e),
        }
    }
}

/// Checks the category stream (and the all stream, when the backend has one) against `stored`,
/// polling for up to `repair` while the backend's documented repair or settle time may still be
/// completing it; reports the findings of the last attempt.
pub async fn check_category(
    store: &dyn EventStore,
    category: &Category,
    stored: &Stored,
    repair: Duration,
) -> Findings {
    let deadline = Instant::now() + repair;
    let mut selectors = vec![("category", Selector::Category(category.clone()))];
    if store.capabilities().all_stream {
        selectors.push(("all stream", Selector::All));
    }
    let mut findings = Findings::default();
    for (what, selector) in selectors {
        loop {
            let found = match cold(store, selector.clone(), Start::Beginning, category).await {
                Ok(delivered) => check_selector(what, &delivered, stored),
                Err(e) => Findings(vec![format!("{what}: cold replay failed: {e}")]),
            };
            if found.0.is_empty() || Instant::now() >= deadline {
                findings.0.extend(found.0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    findings
}

/// Checks that resuming `selector` from delivered checkpoints gives exactly what followed each
/// one: in the same order when the backend promises one total order, else the same events with
/// each stream in order. Samples up to `samples` checkpoints spread over the delivery, always the
/// first and the last.
pub async fn check_resume(
    store: &dyn EventStore,
    selector: &Selector,
    category: &Category,
    delivered: &[Delivered],
    samples: usize,
) -> Findings {
    let mut findings = Findings::default();
    if delivered.is_empty() {
        return findings;
    }
    let total_order = store.capabilities().total_order;
    let n = delivered.len();
    let mut picks: Vec<usize> = (0..samples.max(2))
        .map(|k| k * (n - 1) / (samples.max(2) - 1))
        .collect();
    picks.dedup();
    for i in picks {
        let start = Start::After(delivered[i].checkpoint.clone());
        let got = match retrying(Duration::from_secs(30), || {
            cold(store, selector.clone(), start.clone(), category)
        })
        .await
        {
            Ok(got) => got,
            Err(e) => {
                findings.push(format!("resume after #{i}: {e}"));
                continue;
            }
        };
        let want = &delivered[i + 1..];
        let ids = |d: &[Delivered]| d.iter().map(|d| d.id).collect::<Vec<_>>();
        let same = if total_order {
            ids(&got) == ids(want)
        } else {
            let a: HashSet<Uuid> = ids(&got).into_iter().collect();
            let b: HashSet<Uuid> = ids(want).into_iter().collect();
            a == b && got.len() == want.len()
        };
        if !same {
            findings.push(format!(
                "resume after delivered #{i} of {n} ({} v{}): got {} events, {} followed it",
                delivered[i].stream,
                delivered[i].version,
                got.len(),
                want.len()
            ));
        }
    }
    findings
}

/// A version as the next `Exact` expectation, or `NoStream` for a stream not yet written.
pub fn expect_after(version: Option<Version>) -> ExpectedVersion {
    version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stream: &str, ids: &[Uuid], outcome: Outcome) -> AppendRecord {
        AppendRecord {
            stream: stream.into(),
            ids: ids.to_vec(),
            outcome,
        }
    }

    #[test]
    fn the_checker_finds_each_kind_of_breach() {
        let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        let history = vec![
            rec("c-a", &ids[0..2], Outcome::Acked { first: 0, last: 1 }),
            rec(
                "c-a",
                &ids[2..3],
                Outcome::Refused("wrong expected version".into()),
            ),
            rec("c-a", &ids[3..5], Outcome::Unknown("timed out".into())),
            rec("c-a", &ids[5..6], Outcome::Acked { first: 2, last: 2 }),
        ];
        // Healthy: the acked batches at their versions, the unknown one not stored.
        let mut stored = Stored::new();
        stored.insert("c-a".into(), vec![(0, ids[0]), (1, ids[1]), (2, ids[5])]);
        check_streams(&history, &stored).assert_none("healthy");

        // The refused one stored, a lost ack, a half-stored unknown batch, a stranger.
        let mut bad = Stored::new();
        bad.insert(
            "c-a".into(),
            vec![
                (0, ids[0]),
                (1, ids[1]),
                (2, ids[2]),
                (3, ids[3]),
                (4, Uuid::new_v4()),
            ],
        );
        let found = check_streams(&history, &bad).0.join("\n");
        for needle in [
            "was refused",
            "is not stored (lost)",
            "only 1 of the 2",
            "no append of the run sent",
        ] {
            assert!(found.contains(needle), "missing {needle:?} in:\n{found}");
        }

        // Delivery: a duplicate, a gap, a missing event.
        let cp = Checkpoint::from_position("memory", 0);
        let d = |v: u64, id: Uuid| Delivered {
            stream: "c-a".into(),
            version: v,
            id,
            checkpoint: cp.clone(),
        };
        let delivered = vec![d(0, ids[0]), d(0, ids[0]), d(2, ids[5])];
        let found = check_selector("category", &delivered, &stored).0.join("\n");
        for needle in ["delivered twice", "no gap", "v1", "is missing"] {
            assert!(found.contains(needle), "missing {needle:?} in:\n{found}");
        }
    }
}
