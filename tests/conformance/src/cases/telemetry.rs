//! Operability (issue 18): every backend traces its appends, reads and subscriptions as spans
//! with the same names and fields, and records the same metrics, labelled by backend, through the
//! `metrics` facade (`photon_api::telemetry` names them all).
//!
//! The case installs its own span collector and metrics recorder for the thread that runs it
//! (`#[tokio::test]` polls the case itself on that thread; only tasks a backend spawns run
//! elsewhere), so cases running beside it neither see nor disturb what it counts.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use photon_api::telemetry::{
    APPENDED_BYTES, APPENDED_EVENTS, APPENDS, APPEND_SECONDS, CONFLICTS, SUBSCRIPTION_LAG_SECONDS,
};
use photon_api::{
    Error, EventStoreExt, ExpectedVersion, ReadOptions, Selector, Start, SubscriptionBatch,
    SubscriptionMode,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use crate::support::{append_numbered, fresh_stream};
use crate::Harness;

/// The cases of this file, for `conformance_suite!`: name a new case here.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_telemetry_cases {
    ($($then:tt)*) => {
        $crate::conformance_suite! { $($then)*
            spans_and_metrics,
        }
    };
}

/// An append, a refused append, a read and a replay each leave their span with the backend, the
/// stream or selector, the events and the outcome, and the append counters and latency
/// histogram count them under the backend's label.
pub async fn spans_and_metrics(h: &Harness) {
    let store = h.client().await;
    let category = h.category();
    let stream = fresh_stream(&category, "traced");
    let spans = Spans::default();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    {
        let _metrics = metrics::set_default_local_recorder(&recorder);
        // With a single subscriber registered, tracing-core asks a callsite reached for the first
        // time only the subscriber of the thread reaching it: on another case's thread, none,
        // and the callsite would stay off for this case too. A second, silent one makes it ask
        // every subscriber; then every callsite is asked again.
        let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let subscriber = tracing_subscriber::registry().with(spans.clone());
        let _spans = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();

        append_numbered(&*store, &stream, ExpectedVersion::NoStream, 0, 3).await;
        let refused = store
            .append(&stream, ExpectedVersion::NoStream, vec![crate::numbered(3)])
            .await;
        assert!(
            matches!(refused, Err(Error::WrongExpectedVersion { .. })),
            "{refused:?}"
        );
        let read = store
            .read_to_vec(&stream, ReadOptions::forwards())
            .await
            .unwrap();
        assert_eq!(read.len(), 3);
        let replayed = store
            .replay_to_vec(Selector::Category(category.clone()), Start::Beginning)
            .await
            .unwrap();
        assert_eq!(replayed.len(), 3);
        // A batched replay is traced and counted as one subscription too.
        let mut batches = store.subscribe_batches(
            Selector::Category(category.clone()),
            Start::Beginning,
            SubscriptionMode::Cold,
            2,
        );
        let mut batched = 0;
        while let Some(batch) = batches.next().await {
            if let SubscriptionBatch::Events(events) = batch.unwrap() {
                batched += events.len();
            }
        }
        assert_eq!(batched, 3);
    }

    let backend = h.backend();
    let spans = spans.0.lock().unwrap().finished.clone();
    let find = |name: &str, want: &[(&str, &str)]| {
        spans.iter().any(|s| {
            s.name == name
                && s.get("backend") == Some(backend)
                && want.iter().all(|(k, v)| s.get(k) == Some(*v))
        })
    };
    let stream_name = stream.as_str();
    let selector = format!("category:{category}");
    let expected = [
        (
            "photon.append",
            vec![("stream", stream_name), ("events", "3"), ("outcome", "ok")],
        ),
        (
            "photon.append",
            vec![
                ("stream", stream_name),
                ("events", "1"),
                ("outcome", "conflict"),
            ],
        ),
        (
            "photon.read",
            vec![("stream", stream_name), ("events", "3"), ("outcome", "ok")],
        ),
        (
            "photon.subscribe",
            vec![
                ("selector", selector.as_str()),
                ("mode", "Cold"),
                ("events", "3"),
                ("outcome", "ok"),
            ],
        ),
        ("photon.catch_up", vec![("events", "3"), ("outcome", "ok")]),
    ];
    for (name, want) in &expected {
        assert!(
            find(name, want),
            "{backend}: no {name} span with {want:?}; spans seen: {spans:#?}"
        );
    }
    let replays = spans
        .iter()
        .filter(|s| {
            s.name == "photon.subscribe"
                && s.get("selector") == Some(selector.as_str())
                && s.get("events") == Some("3")
                && s.get("bytes").is_some_and(|b| b != "0")
                && s.get("outcome") == Some("ok")
        })
        .count();
    assert_eq!(
        replays, 2,
        "{backend}: the replay and the batched replay each have their span: {spans:#?}"
    );
    assert!(
        spans.iter().any(|s| s.name == "photon.append"
            && s.get("outcome") == Some("ok")
            && s.get("attempts")
                .is_some_and(|a| a.parse::<u32>().unwrap() >= 1)),
        "{backend}: the append span says its attempts: {spans:#?}"
    );
    assert!(
        spans
            .iter()
            .any(|s| s.name == "photon.append" && s.get("bytes").is_some_and(|b| b != "0")),
        "{backend}: the append span says its bytes"
    );

    let metrics: Vec<Recorded> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.key().name().to_owned(), labels, value)
        })
        .collect();
    let value = |name: &str, outcome: Option<&str>| {
        metrics.iter().find_map(|(n, labels, v)| {
            let label = |k: &str| {
                labels
                    .iter()
                    .find(|(lk, _)| lk == k)
                    .map(|(_, v)| v.as_str())
            };
            assert_ne!(
                label("stream"),
                Some(stream_name),
                "never labelled by stream"
            );
            (n == name && label("backend") == Some(backend) && label("outcome") == outcome)
                .then_some(v)
        })
    };
    let counter = |name: &str, outcome: Option<&str>| match value(name, outcome) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{backend}: counter {name} {outcome:?} is {other:?}; all: {metrics:?}"),
    };
    let samples = |name: &str| match value(name, None) {
        Some(DebugValue::Histogram(values)) => values.len(),
        other => panic!("{backend}: histogram {name} is {other:?}; all: {metrics:?}"),
    };
    assert_eq!(counter(APPENDS, Some("ok")), 1);
    assert_eq!(counter(APPENDS, Some("conflict")), 1);
    assert_eq!(counter(APPENDED_EVENTS, None), 3);
    assert!(counter(APPENDED_BYTES, None) > 0);
    assert_eq!(counter(CONFLICTS, None), 1);
    assert_eq!(samples(APPEND_SECONDS), 2);
    assert!(samples(SUBSCRIPTION_LAG_SECONDS) >= 1);
}

/// A metric as the recorder holds it: name, labels, value.
type Recorded = (String, Vec<(String, String)>, DebugValue);

/// The spans seen, each with its fields as text, in the order they were opened.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Seen>>);

#[derive(Default)]
struct Seen {
    finished: Vec<SpanSeen>,
    /// Open spans by id (ids are reused once a span closes, so they index `finished` only while
    /// the span is open).
    open: HashMap<Id, usize>,
}

#[derive(Clone)]
struct SpanSeen {
    name: &'static str,
    fields: BTreeMap<&'static str, String>,
}

impl SpanSeen {
    fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }
}

impl fmt::Debug for SpanSeen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.name, self.fields)
    }
}

impl Visit for SpanSeen {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.fields.insert(field.name(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.fields.insert(field.name(), value.to_owned());
    }
}

impl<S: Subscriber> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut span = SpanSeen {
            name: attrs.metadata().name(),
            fields: BTreeMap::new(),
        };
        attrs.record(&mut span);
        let mut seen = self.0.lock().unwrap();
        seen.finished.push(span);
        let at = seen.finished.len() - 1;
        seen.open.insert(id.clone(), at);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut seen = self.0.lock().unwrap();
        if let Some(&at) = seen.open.get(id) {
            values.record(&mut seen.finished[at]);
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        self.0.lock().unwrap().open.remove(&id);
    }
}
