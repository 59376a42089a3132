//! What a run records: one [`Measurement`] per subject and case, latency histograms, and the
//! phase clock that enforces the duration cap.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Who produced a figure: the point of the harness is to read photon's rows against the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Photon (or newton) on the backend under test.
    Photon,
    /// The limit photon is compared with: the raw client with the same durability, the bare
    /// loop, or the peer framework. Ratios are photon ÷ this.
    Baseline,
    /// Another raw figure shown for context (e.g. a weaker durability setting); no ratio.
    Reference,
}

/// One figure of the results table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    /// The backend's name (`memory`, `kafka`, `cassandra`, `mongodb`).
    pub backend: String,
    /// `append`, `load`, `replay`, `live`, `isolation` or `commands`.
    pub workload: String,
    /// The parameters, e.g. `batch 100, 16 writers`.
    pub case: String,
    /// What ran, e.g. `photon`, `raw rdkafka (transaction per append)`.
    pub subject: String,
    /// How the figure is compared.
    pub role: Role,
    /// Events (or commands, or loads) completed.
    pub count: u64,
    /// Wall time of the timed part.
    pub seconds: f64,
    /// `count / seconds`, when throughput is the figure.
    pub per_second: Option<f64>,
    /// Median latency of one operation, microseconds.
    pub p50_us: Option<f64>,
    /// 99th percentile latency, microseconds.
    pub p99_us: Option<f64>,
    /// Peak resident memory of the process during the timed part, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Resident memory the stored events added before the timed part, MiB (memory backend).
    pub stored_rss_mib: Option<f64>,
    /// Photon ÷ baseline throughput of the same case (filled in by the report), or for
    /// `isolation` the throughput during the replay ÷ alone.
    pub ratio: Option<f64>,
    /// The duration cap stopped this phase before its planned size.
    pub capped: bool,
    /// Anything the figure needs to be read right.
    pub note: Option<String>,
}

impl Measurement {
    /// A throughput figure: `count` operations in `elapsed`.
    pub fn throughput(
        backend: &str,
        workload: &str,
        case: impl Into<String>,
        subject: impl Into<String>,
        role: Role,
        count: u64,
        elapsed: Duration,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        Self {
            backend: backend.into(),
            workload: workload.into(),
            case: case.into(),
            subject: subject.into(),
            role,
            count,
            seconds,
            per_second: (seconds > 0.0).then(|| count as f64 / seconds),
            p50_us: None,
            p99_us: None,
            peak_rss_mib: None,
            stored_rss_mib: None,
            ratio: None,
            capped: false,
            note: None,
        }
    }

    /// Adds the latency percentiles.
    pub fn with_latency(mut self, l: &Latencies) -> Self {
        if !l.is_empty() {
            self.p50_us = Some(l.percentile_us(50.0));
            self.p99_us = Some(l.percentile_us(99.0));
        }
        self
    }

    /// Drops the throughput column, for workloads whose figure is latency only.
    pub fn latency_only(mut self) -> Self {
        self.per_second = None;
        self
    }

    /// Marks the phase as stopped by the cap.
    pub fn capped(mut self, capped: bool) -> Self {
        self.capped = capped;
        self
    }

    /// Adds a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// Operation latencies in nanoseconds, kept as a histogram (3 significant digits) so a long
/// phase costs constant memory and writers' histograms merge.
#[derive(Clone, Debug)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds"))
    }
}

impl Latencies {
    /// Records one operation.
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record(d.as_nanos().max(1) as u64);
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latencies) {
        self.0.add(&other.0).expect("same bounds");
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The latency at `p` percent, microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        self.0.value_at_percentile(p) as f64 / 1_000.0
    }
}

/// The duration cap of one phase: loops ask it whether to go on.
#[derive(Clone, Copy, Debug)]
pub struct Cap {
    deadline: Instant,
}

impl Cap {
    /// A cap `limit` from now.
    pub fn new(limit: Duration) -> Self {
        Self {
            deadline: Instant::now() + limit,
        }
    }

    /// Whether the phase has run out of time.
    pub fn reached(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

/// Runs writers that were built beforehand, all at once, on one clock: the operations they
/// completed, their latencies merged, and the wall time from start to the last one's end.
///
/// # Errors
/// - The first writer's error.
pub async fn run_writers<F>(writers: Vec<F>) -> Result<(u64, Latencies, Duration), crate::BoxError>
where
    F: Future<Output = Result<(u64, Latencies), crate::BoxError>>,
{
    let started = Instant::now();
    let results = futures::future::try_join_all(writers).await?;
    let elapsed = started.elapsed();
    let mut latencies = Latencies::default();
    let mut total = 0;
    for (n, l) in results {
        total += n;
        latencies.merge(&l);
    }
    Ok((total, latencies, elapsed))
}
