//! Measures photon on every backend side by side with the limit it is read against: the raw
//! client of the same server doing the same I/O, a bare in-process loop, and a peer framework.
//!
//! Users choose an event store by its numbers, so the harness answers their questions with
//! ratios from one run on one machine: how fast appends are, how long loading an aggregate
//! takes, how long a new view takes to replay a big category and whether that slows everyone
//! else, how soon a live subscriber sees an append. Timing lives here, never in unit tests.
//!
//! ```text
//! cargo run --release -p photon-bench                                  # memory://, 1M replay
//! cargo run --release -p photon-bench -- --replay-events 20000000      # the 20M replay
//! cargo run --release -p photon-bench --features kafka,cassandra,mongo -- --url all
//! ```
//!
//! The binary prints a markdown table and writes `RESULTS.md`, `results.json` and `chart.svg` into
//! `--out`. See `bench/README.md` for what each workload does and how to read the figures.

pub mod bare;
pub mod domain;
pub mod measure;
pub mod peer;
pub mod photon;
pub mod progress;
pub mod raw;
pub mod report;
pub mod system;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::measure::Measurement;
use crate::photon::Target;
use crate::report::Report;

/// The error of the harness: anything stops the run with its message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The workloads of the issue, selectable with `--workloads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Batches of 1 and 100, 1 and 16 writers: events/s and latency per append.
    Append,
    /// Kafka only: one writer, batch 1, cycling over streams in 40 partitions (5 categories of
    /// 8), beside a raw transaction per append over the same 40: whether producers are kept
    /// for every partition in use (issue 14 item 5).
    Spread,
    /// Loading aggregates of 10, 1,000 and 10,000 events: latency per load.
    Load,
    /// A new view replays a category, decoding every payload: events/s and peak RSS.
    Replay,
    /// A second client's appends during that replay, as a ratio to alone.
    Isolation,
    /// Append to HotCold delivery, one event at a time.
    Live,
    /// Aggregate commands: newton against cqrs-es on memory (short streams, and streams of the
    /// command lengths); newton alone on the servers.
    Commands,
}

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    about = "Every Photon backend side by side with its raw client, the limit and a peer",
    args_override_self = true
)]
pub struct Options {
    /// A store URL (repeat for several), or `all`: memory:// plus every backend compiled in
    /// (features kafka, cassandra, mongo), at PHOTON_BENCH_<KAFKA|CASSANDRA|MONGO>_URL or the
    /// servers of `scripts/servers`.
    #[arg(long, env = "PHOTON_URL", default_value = "memory://")]
    pub url: Vec<String>,
    /// Events per append case (split among the writers).
    #[arg(long, default_value_t = 100_000)]
    pub append_events: u64,
    /// Events in the category a new view replays (20000000 for the big replay).
    #[arg(long, default_value_t = 1_000_000)]
    pub replay_events: u64,
    /// Stream lengths of the aggregate-load workload.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    pub load_lengths: Vec<u64>,
    /// Aggregates loaded per length (each a fresh stream, loaded once).
    #[arg(long, default_value_t = 20)]
    pub loads: u64,
    /// Events of the live-latency workload.
    #[arg(long, default_value_t = 1_000)]
    pub live_events: u64,
    /// Commands of the peer workload.
    #[arg(long, default_value_t = 20_000)]
    pub commands: u64,
    /// Stream lengths of the commands on long streams ("1 client, 1000-event streams").
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    pub command_lengths: Vec<u64>,
    /// Streams of each length the commands on long streams go to, in turn.
    #[arg(long, default_value_t = 20)]
    pub command_streams: u64,
    /// Commands on long streams, per length and subject.
    #[arg(long, default_value_t = 2_000)]
    pub stream_commands: u64,
    /// Rounds of the in-process replay, isolation and command workloads (photon and its
    /// baseline take turns; each reports its median).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Longest time any one phase may take (seconds); a phase cut short says so.
    #[arg(long, default_value_t = 60)]
    pub max_seconds: u64,
    /// Which workloads to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workloads: Vec<Workload>,
    /// Where RESULTS.md, results.json and chart.svg go.
    #[arg(long, default_value = "target/photon-bench")]
    pub out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Adds the measurements of an earlier run's results.json to this report (e.g. the 20M
    /// memory replay, run with the servers stopped, beside a run of the server backends); a
    /// workload this run measures again replaces the earlier rows of its backend.
    #[arg(long)]
    pub merge: Option<PathBuf>,
}

/// The sizes every workload reads.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Events per append case.
    pub append_events: u64,
    /// Events of the replay.
    pub replay_events: u64,
    /// Stream lengths of the load workload.
    pub load_lengths: Vec<u64>,
    /// Loads per length.
    pub loads: u64,
    /// Events of the live workload.
    pub live_events: u64,
    /// Commands of the peer workload.
    pub commands: u64,
    /// Stream lengths of the commands on long streams.
    pub command_lengths: Vec<u64>,
    /// Streams per length of the commands on long streams.
    pub command_streams: u64,
    /// Commands per length and subject on long streams.
    pub stream_commands: u64,
    /// Rounds of the in-process replay and command workloads.
    pub rounds: u64,
    /// The duration cap of one phase.
    pub cap: Duration,
}

/// The URLs `all` stands for: memory, then each compiled backend at its bench variable or the
/// local server `scripts/servers` starts. The MongoDB default takes a collection prefix of its
/// own per run: FerretDB answers photon-mongo's queries by scanning the collection, so earlier
/// runs' documents would slow this one (the raw baseline starts empty too).
fn all_urls() -> Vec<String> {
    let mut urls = vec!["memory://".to_owned()];
    let mongo = format!(
        "mongodb://127.0.0.1:27017/photon_bench?directConnection=true&photon_prefix=run{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let compiled = [
        (
            cfg!(feature = "mongo"),
            "PHOTON_BENCH_MONGO_URL",
            mongo.as_str(),
        ),
        (
            cfg!(feature = "kafka"),
            "PHOTON_BENCH_KAFKA_URL",
            "kafka://127.0.0.1:9092?prefix=bench",
        ),
        (
            cfg!(feature = "cassandra"),
            "PHOTON_BENCH_CASSANDRA_URL",
            "cassandra://127.0.0.1:9042/photon_bench",
        ),
    ];
    for (on, var, default) in compiled {
        if on {
            urls.push(std::env::var(var).unwrap_or_else(|_| default.to_owned()));
        } else {
            eprintln!(
                "note: {} is not compiled in; build with --features {}",
                default.split(':').next().unwrap_or(default),
                var.trim_start_matches("PHOTON_BENCH_")
                    .trim_end_matches("_URL")
                    .to_lowercase()
            );
        }
    }
    urls
}

/// Every workload on one backend, photon and its baselines in turn.
async fn run_backend(
    url: &str,
    sizes: &Sizes,
    workloads: &[Workload],
    out: &mut Vec<Measurement>,
) -> Result<(), BoxError> {
    let store = newton::connect(url).await?;
    let backend = store.backend().to_owned();
    let target = Target {
        backend: backend.clone(),
        url: url.to_owned(),
        store,
    };
    let raw = raw::connect(url).await?;
    let on = |w: Workload| workloads.is_empty() || workloads.contains(&w);
    let push = |m: Vec<Measurement>, out: &mut Vec<Measurement>| {
        for m in m {
            println!("{}", one_line(&m));
            out.push(m);
        }
    };
    progress::phase(&format!("{backend}: {}", newton::store::url::redact(url)));

    if on(Workload::Append) {
        for (batch, writers) in [(1, 1), (100, 1), (1, 16), (100, 16)] {
            progress::phase(&format!(
                "{backend}: append, batch {batch}, {writers} writer(s)"
            ));
            push(
                vec![photon::append(&target, sizes, batch, writers).await?],
                out,
            );
            if let Some(raw) = &raw {
                push(raw.append(sizes, batch, writers).await?, out);
            }
        }
    }
    #[cfg(feature = "kafka")]
    if on(Workload::Spread) && backend == "kafka" {
        use crate::raw::Raw as _;
        let case = raw::kafka::spread_case();
        progress::phase(&format!("{backend}: append, {case}"));
        let (spread, streams, kafka) = raw::kafka::spread_target(url)?;
        let mut row = photon::append_cycling(&spread, &streams, sizes, &case).await?;
        // One take-over per partition is the warm-up; any more happened while cycling.
        let taken = kafka.writer_stats().take_overs;
        let note = row.note.take().unwrap_or_default();
        row.note = Some(format!(
            "{note}; {taken} take-overs in all, {} of them while measured",
            taken.saturating_sub(streams.len() as u64)
        ));
        push(vec![row], out);
        let baseline = raw::kafka::RawKafka::connect(url).await?;
        let raw_row = baseline.spread(sizes).await;
        baseline.clean_up().await?;
        push(vec![raw_row?], out);
    }
    if on(Workload::Load) {
        progress::phase(&format!("{backend}: aggregate loads"));
        push(photon::load(&target, sizes).await?, out);
        if backend == "memory" {
            push(bare::load(sizes)?, out);
        }
        if let Some(raw) = &raw {
            push(raw.load(sizes).await?, out);
        }
    }
    if on(Workload::Replay) || on(Workload::Isolation) {
        progress::phase(&format!(
            "{backend}: writing {} events to replay",
            sizes.replay_events
        ));
        let set = photon::write_replay_set(&target, sizes).await?;
        let replay = if backend == "memory" {
            // A few seconds in one process vary by a third from run to run (the heap, the
            // other core): photon and the bare loop take turns, and each reports its median.
            // The first round runs before the bare loop's payloads exist, so its peak is
            // photon's alone; that is the peak reported.
            let first = photon::replay(&target, &set).await?;
            let peak = first.peak_rss_mib;
            let bare_set = bare::replay_set(set.events);
            let (mut ours, mut limit) = (vec![first], vec![bare::replay(&bare_set)?]);
            for _ in 1..sizes.rounds {
                ours.push(photon::replay(&target, &set).await?);
                limit.push(bare::replay(&bare_set)?);
            }
            drop(bare_set);
            let mut replay = median(ours);
            replay.peak_rss_mib = peak;
            if on(Workload::Replay) {
                push(vec![replay.clone(), median(limit)], out);
            }
            replay
        } else {
            let replay = photon::replay(&target, &set).await?;
            if on(Workload::Replay) {
                push(vec![replay.clone()], out);
                if let Some(raw) = &raw {
                    push(raw.replay(set.events, sizes).await?, out);
                }
            }
            replay
        };
        let took = Duration::from_secs_f64(replay.seconds);
        if on(Workload::Isolation) {
            progress::phase(&format!("{backend}: appends beside a replay"));
            // In-process rounds vary as the replay's do (both cores are busy): the median
            // ratio of the rounds counts.
            let rounds = if backend == "memory" { sizes.rounds } else { 1 };
            let mut all = Vec::new();
            for _ in 0..rounds {
                all.push(photon::isolation(&target, &set, took, sizes).await?);
            }
            push(vec![median_ratio(all)], out);
        }
    }
    if on(Workload::Live) {
        progress::phase(&format!("{backend}: live latency"));
        let live = photon::live(&target, sizes).await?;
        push(vec![with_settle_note(live, &backend, url)], out);
        if let Some(raw) = &raw {
            push(raw.live(sizes).await?, out);
        }
    }
    if on(Workload::Commands) && backend == "memory" {
        for &length in &sizes.command_lengths {
            progress::phase(&format!(
                "commands on {length}-event streams: newton and cqrs-es"
            ));
            let ids = photon::write_command_streams(&target, sizes, length).await?;
            let peer_store = peer::cqrs_es_streams(sizes, length).await?;
            let (mut ours, mut uncached, mut peer) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..sizes.rounds {
                ours.push(photon::commands_on_streams(&target, sizes, length, &ids, true).await?);
                uncached
                    .push(photon::commands_on_streams(&target, sizes, length, &ids, false).await?);
                peer.push(peer::cqrs_es_on_streams(sizes, length, &peer_store).await?);
            }
            push(vec![median(ours), median(uncached), median(peer)], out);
        }
    }
    if on(Workload::Commands) && backend != "memory" {
        for &length in &sizes.command_lengths {
            progress::phase(&format!("{backend}: commands on {length}-event streams"));
            let ids = photon::write_command_streams(&target, sizes, length).await?;
            push(
                vec![photon::commands_on_streams(&target, sizes, length, &ids, true).await?],
                out,
            );
        }
    }
    if on(Workload::Commands) && backend == "memory" {
        for clients in [1, 16] {
            progress::phase(&format!(
                "commands, {clients} client(s): newton and cqrs-es"
            ));
            // Short in-process runs vary from run to run: the two take turns, medians count.
            let (mut ours, mut peer) = (Vec::new(), Vec::new());
            for _ in 0..sizes.rounds {
                ours.push(peer::newton(sizes, clients).await?);
                peer.push(peer::cqrs_es(sizes, clients).await?);
            }
            push(vec![median(ours), median(peer)], out);
        }
    }
    if let Some(raw) = raw {
        raw.clean_up().await?;
    }
    Ok(())
}

/// A Cassandra live row notes the settle delay it was measured with: live delivery lags by it,
/// and the report checks the row against it.
fn with_settle_note(m: Measurement, backend: &str, url: &str) -> Measurement {
    #[cfg(feature = "cassandra")]
    if backend == "cassandra" {
        if let Ok(config) = photon_cassandra::CassandraConfig::from_url(url) {
            let settle = format!("settle_ms {}", config.settle.as_millis());
            let note = match &m.note {
                Some(n) => format!("{n}; {settle}"),
                None => settle,
            };
            return m.note(note);
        }
    }
    #[cfg(not(feature = "cassandra"))]
    let _ = (backend, url);
    m
}

/// The round with the median throughput, noting the spread of all rounds.
fn median(mut rounds: Vec<Measurement>) -> Measurement {
    rounds.sort_by(|a, b| a.per_second.partial_cmp(&b.per_second).expect("not NaN"));
    let (low, high) = (
        rounds.first().and_then(|m| m.per_second).unwrap_or(0.0),
        rounds.last().and_then(|m| m.per_second).unwrap_or(0.0),
    );
    let n = rounds.len();
    let mut m = rounds.swap_remove(n / 2);
    if n > 1 {
        let spread = format!("median of {n} rounds ({low:.0} to {high:.0} events/s)");
        m.note = Some(match m.note.take() {
            Some(note) => format!("{spread}; {note}"),
            None => spread,
        });
    }
    m
}

/// The round with the median ratio, noting the spread of all rounds' ratios.
fn median_ratio(mut rounds: Vec<Measurement>) -> Measurement {
    rounds.sort_by(|a, b| {
        let (a, b) = (a.ratio.unwrap_or(0.0), b.ratio.unwrap_or(0.0));
        a.partial_cmp(&b).expect("not NaN")
    });
    let (low, high) = (
        rounds.first().and_then(|m| m.ratio).unwrap_or(0.0),
        rounds.last().and_then(|m| m.ratio).unwrap_or(0.0),
    );
    let n = rounds.len();
    let mut m = rounds.swap_remove(n / 2);
    if n > 1 {
        let spread = format!("median ratio of {n} rounds ({low:.2} to {high:.2})");
        m.note = Some(match m.note.take() {
            Some(note) => format!("{spread}; {note}"),
            None => spread,
        });
    }
    m
}

/// A measurement as one line, printed as it lands so a long run shows progress.
fn one_line(m: &Measurement) -> String {
    let mut s = format!(
        "{} | {} | {} | {}",
        m.backend, m.workload, m.case, m.subject
    );
    if let Some(r) = m.per_second {
        s += &format!(" | {r:.0}/s");
    }
    if let (Some(p50), Some(p99)) = (m.p50_us, m.p99_us) {
        s += &format!(" | p50 {p50:.0} µs, p99 {p99:.0} µs");
    }
    if let Some(r) = m.peak_rss_mib {
        s += &format!(" | peak RSS {r:.0} MiB");
    }
    s
}

/// Runs every selected workload on every URL and writes the report into `o.out`.
///
/// # Errors
/// - The first failure of any workload, prefixed with the (redacted) URL it ran against.
pub async fn run(o: &Options) -> Result<Report, BoxError> {
    progress::set_quiet(o.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let sizes = Sizes {
        append_events: o.append_events,
        replay_events: o.replay_events,
        load_lengths: o.load_lengths.clone(),
        loads: o.loads,
        live_events: o.live_events,
        commands: o.commands,
        command_lengths: o.command_lengths.clone(),
        command_streams: o.command_streams.max(1),
        stream_commands: o.stream_commands,
        rounds: o.rounds,
        cap: Duration::from_secs(o.max_seconds),
    };
    let urls: Vec<String> = if o.url.iter().any(|u| u == "all") {
        all_urls()
    } else {
        o.url.clone()
    };
    let machine = system::Machine::describe();
    let (mut measurements, mut commands) = match &o.merge {
        Some(path) => {
            let earlier: Report = serde_json::from_slice(
                &std::fs::read(path).map_err(|e| format!("--merge {}: {e}", path.display()))?,
            )
            .map_err(|e| format!("--merge {}: not a results.json: {e}", path.display()))?;
            // Ratios and targets are worked out again over everything.
            let rows = earlier.measurements.into_iter().map(|mut m| {
                if m.workload != "isolation" {
                    m.ratio = None;
                }
                m
            });
            (rows.collect(), earlier.commands)
        }
        None => (Vec::new(), Vec::new()),
    };
    let mut fresh = Vec::new();
    for url in &urls {
        run_backend(url, &sizes, &o.workloads, &mut fresh)
            .await
            .map_err(|e| format!("{}: {e}", newton::store::url::redact(url)))?;
    }
    // A workload measured again replaces the merged rows of the same backend and workload.
    measurements.retain(|m: &Measurement| {
        !fresh
            .iter()
            .any(|f| f.backend == m.backend && f.workload == m.workload)
    });
    measurements.extend(fresh);
    report::fill_ratios(&mut measurements);
    let targets = report::check_targets(&measurements);
    commands.push(command_line(std::env::args()));
    let report = Report {
        machine,
        commands,
        measurements,
        targets,
    };
    report::write(&report, &o.out)?;
    Ok(report)
}

/// This run's command line as a reader of the results can run it again from the repository: the
/// binary as `cargo run`, paths under the current folder relative to it, no passwords.
fn command_line(args: impl Iterator<Item = String>) -> String {
    let here = std::env::current_dir().ok();
    let features: Vec<&str> = [
        (cfg!(feature = "kafka"), "kafka"),
        (cfg!(feature = "cassandra"), "cassandra"),
        (cfg!(feature = "mongo"), "mongo"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    let mut line = String::from("cargo run --release -p photon-bench");
    if !features.is_empty() {
        line.push_str(&format!(" --features {}", features.join(",")));
    }
    line.push_str(" --");
    for arg in args.skip(1) {
        let relative = here
            .as_deref()
            .and_then(|h| std::path::Path::new(&arg).strip_prefix(h).ok())
            .map(|p| p.display().to_string());
        line.push(' ');
        line.push_str(&newton::store::url::redact(
            relative.as_deref().unwrap_or(&arg),
        ));
    }
    line
}

#[cfg(test)]
mod command_line_tests {
    use super::command_line;

    #[test]
    fn names_no_folder_of_this_machine_and_no_password() {
        let here = std::env::current_dir().unwrap();
        let out = here.join("target/x").display().to_string();
        let line = command_line(
            [
                "/somewhere/photon-bench",
                "--url",
                "mongodb://u:secret@h/db",
                "--out",
                &out,
            ]
            .into_iter()
            .map(String::from),
        );
        assert!(
            line.starts_with("cargo run --release -p photon-bench"),
            "{line}"
        );
        assert!(
            line.ends_with("-- --url mongodb://u:***@h/db --out target/x"),
            "{line}"
        );
    }
}
