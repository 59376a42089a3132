//! Moving events between stores: `export` (store → dump), `import` (dump → store) and `copy`
//! (store → store), all streaming in constant memory.
//!
//! Every write goes through [`Importer`], which appends each stream's events at the versions
//! they had in the source, with the expected version that says so. That is what makes a re-run
//! safe: a batch that already landed is a retry by the contract (same ids in the same batch:
//! nothing stored twice, the original versions returned), and a batch that a different run cut
//! differently is recognised by reading the target's events at those versions and comparing ids.
//! So an interrupted import or copy resumes by running it again.
//!
//! What cannot be carried over: `recorded_at` and checkpoints belong to the store that recorded
//! the event; the target records its own time and makes its own checkpoints. `occurred_at`, the
//! time the writer gave the event, is kept exactly.

use std::io::{BufRead, Write};
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use photon_api::{
    Error, EventData, EventStore, ExpectedVersion, ReadOptions, RecordedEvent, Selector, Start,
    StreamId, SubscriptionItem, SubscriptionMode, Version,
};

use crate::args::selector_text;
use crate::dump::{parse_line, DumpEvent, DumpLine, End, Header};
use crate::error::CliError;

/// The most events one append of an import carries. Fixed, so that a re-run cuts a dump into the
/// same batches as the run it resumes and each batch is answered as a retry.
pub const MAX_BATCH_EVENTS: usize = 100;

/// The most bytes (as `EventData::size` counts) one append of an import carries, below the
/// target's own `max_append_size` when it has one.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How often a batch answered `Unavailable` is sent again before the import gives up (it is
/// idempotent, so re-sending is always safe).
const UNAVAILABLE_ATTEMPTS: u32 = 4;

/// A progress bar on stderr counting events; hidden when stderr is not a terminal, so logs and
/// tests see only the summary line.
pub fn progress_bar(what: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {human_pos} events ({per_sec}) {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(what);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// What an import or copy did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ImportReport {
    /// Events read from the source.
    pub events: u64,
    /// Events in appends the target accepted (new, or answered as a retry of an earlier run).
    pub appended: u64,
    /// Events the target already held at their versions, with the same ids (an earlier run
    /// stored them in other batches).
    pub already_present: u64,
    /// Appends sent (re-sends after `Unavailable` included).
    pub batches: u64,
}

/// Appends events at the versions they had in their source, batching consecutive events of one
/// stream; see the module docs for why a re-run is safe.
#[derive(Debug)]
pub struct Importer<'a> {
    store: &'a dyn EventStore,
    max_batch_bytes: usize,
    stream: Option<StreamId>,
    first: Version,
    batch: Vec<EventData>,
    batch_bytes: usize,
    report: ImportReport,
}

impl<'a> Importer<'a> {
    /// An importer writing into `store`.
    pub fn new(store: &'a dyn EventStore) -> Self {
        let max_batch_bytes = store
            .capabilities()
            .max_append_size
            .map_or(MAX_BATCH_BYTES, |max| max.min(MAX_BATCH_BYTES));
        Self {
            store,
            max_batch_bytes,
            stream: None,
            first: Version(0),
            batch: Vec::with_capacity(MAX_BATCH_EVENTS),
            batch_bytes: 0,
            report: ImportReport::default(),
        }
    }

    /// Adds the event that had `version` in `stream`; appends the batch before it when the event
    /// does not continue it.
    ///
    /// # Errors
    /// - As [`Self::finish`], for the batch appended now.
    pub async fn push(
        &mut self,
        stream: StreamId,
        version: Version,
        event: EventData,
    ) -> Result<(), CliError> {
        self.report.events += 1;
        let size = event.size();
        let continues = self.stream.as_ref() == Some(&stream)
            && version.value() == self.first.value() + self.batch.len() as u64
            && self.batch.len() < MAX_BATCH_EVENTS
            && self.batch_bytes + size <= self.max_batch_bytes;
        if !continues {
            self.flush().await?;
            self.stream = Some(stream);
            self.first = version;
        }
        self.batch_bytes += size;
        self.batch.push(event);
        Ok(())
    }

    /// Appends the last batch and reports.
    ///
    /// # Errors
    /// - [`CliError::Store`] with `WrongExpectedVersion` or `IdempotencyConflict` when the target
    ///   holds other events at a version the source had (not an earlier run of this import).
    /// - [`CliError::Store`] with `Unavailable` when the target kept not answering.
    /// - Any other typed error of the target (`EventTooLarge`, ...).
    pub async fn finish(mut self) -> Result<ImportReport, CliError> {
        self.flush().await?;
        Ok(self.report)
    }

    async fn flush(&mut self) -> Result<(), CliError> {
        let Some(stream) = self.stream.take() else {
            return Ok(());
        };
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(MAX_BATCH_EVENTS));
        self.batch_bytes = 0;
        // Normally one pass. After a conflict, the events the target already holds at their
        // versions (an earlier run cut the dump elsewhere, or stopped inside this batch) are
        // skipped and the rest is sent after them.
        let mut offset = 0;
        while offset < batch.len() {
            let first = self.first.value() + offset as u64;
            let part = &batch[offset..];
            match self.append_part(&stream, first, part).await {
                Ok(()) => {
                    self.report.appended += part.len() as u64;
                    return Ok(());
                }
                Err(
                    e @ (Error::WrongExpectedVersion { .. } | Error::IdempotencyConflict { .. }),
                ) => {
                    let held = self.held_prefix(&stream, first, part).await?;
                    if held == 0 {
                        return Err(e.into());
                    }
                    self.report.already_present += held as u64;
                    offset += held;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Appends `part` as the events from version `first` on, re-sending while the target
    /// answers `Unavailable` (safe: the same ids in the same batch are a retry).
    async fn append_part(
        &mut self,
        stream: &StreamId,
        first: u64,
        part: &[EventData],
    ) -> Result<(), Error> {
        let expected = match first {
            0 => ExpectedVersion::NoStream,
            v => ExpectedVersion::Exact(Version(v - 1)),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.report.batches += 1;
            // A copy per attempt: the append takes the batch, and a retry needs it again.
            match self.store.append(stream, expected, part.to_vec()).await {
                Err(Error::Unavailable { .. }) if attempt < UNAVAILABLE_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
                other => return other.map(drop),
            }
        }
    }

    /// How many leading events of `part` the target already holds, with the same ids, at the
    /// versions from `first` on.
    async fn held_prefix(
        &self,
        stream: &StreamId,
        first: u64,
        part: &[EventData],
    ) -> Result<usize, CliError> {
        let options = ReadOptions::forwards()
            .from_version(Version(first))
            .limit(part.len());
        let mut stored = self.store.read_stream(stream, options);
        let mut held = 0;
        for (i, wanted) in part.iter().enumerate() {
            match stored.next().await {
                Some(Ok(e))
                    if e.event_id == wanted.event_id && e.version.value() == first + i as u64 =>
                {
                    held += 1;
                }
                Some(Err(e)) => return Err(e.into()),
                _ => break,
            }
        }
        Ok(held)
    }
}

/// The events of `selector` from the beginning to the head as of the call (a `Cold`
/// subscription): what export and copy read.
fn replay(
    store: &dyn EventStore,
    selector: Selector,
) -> futures::stream::BoxStream<'static, Result<RecordedEvent, Error>> {
    store
        .subscribe(selector, Start::Beginning, SubscriptionMode::Cold)
        .filter_map(|item| {
            futures::future::ready(match item {
                Ok(SubscriptionItem::Event(e)) => Some(Ok(e)),
                Ok(SubscriptionItem::CaughtUp) => None,
                Err(e) => Some(Err(e)),
            })
        })
        .boxed()
}

/// Writes a dump of `selector` (header, one line per event, end line) onto `out`; returns the
/// number of events.
///
/// # Errors
/// - [`CliError::Store`] when the source fails (the dump then has no end line).
/// - [`CliError::Io`] when `out` fails.
pub async fn export(
    store: &dyn EventStore,
    selector: Selector,
    out: impl Write,
    progress: &ProgressBar,
) -> Result<u64, CliError> {
    let mut out = std::io::BufWriter::new(out);
    let io = |e| CliError::io("writing the dump", e);
    let header = Header::new(selector_text(&selector), store.backend());
    write_line(&mut out, &DumpLine::Header(header)).map_err(io)?;
    let mut events = replay(store, selector);
    let mut n = 0u64;
    while let Some(e) = events.next().await {
        let e = e?;
        write_line(&mut out, &DumpLine::Event(DumpEvent::from_recorded(&e))).map_err(io)?;
        n += 1;
        progress.inc(1);
    }
    write_line(&mut out, &DumpLine::End(End { events: n })).map_err(io)?;
    out.flush().map_err(io)?;
    Ok(n)
}

fn write_line(out: &mut impl Write, line: &DumpLine) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")
}

/// Imports a dump from `input` into `store`, one line at a time.
///
/// # Errors
/// - [`CliError::Dump`] for a line that is not a dump line (the first must be a header of a
///   known version), for a dump whose end line is missing (cut short: the events before it were
///   imported) or whose count disagrees.
/// - As [`Importer::finish`].
pub async fn import(
    store: &dyn EventStore,
    mut input: impl BufRead,
    progress: &ProgressBar,
) -> Result<ImportReport, CliError> {
    let mut importer = Importer::new(store);
    let mut text = String::new();
    let mut line_no = 0u64;
    let mut end: Option<(u64, End)> = None;
    loop {
        text.clear();
        let read = input
            .read_line(&mut text)
            .map_err(|e| CliError::io("reading the dump", e))?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let trimmed = text.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            continue;
        }
        let dump_err = |reason: String| CliError::Dump {
            line: line_no,
            reason,
        };
        if end.is_some() {
            return Err(dump_err("a line after the end line".to_owned()));
        }
        match parse_line(trimmed, line_no == 1).map_err(dump_err)? {
            DumpLine::Header(_) => {}
            DumpLine::Event(e) => {
                let (stream, version, data) = e.to_event_data().map_err(dump_err)?;
                importer.push(stream, version, data).await?;
                progress.inc(1);
            }
            DumpLine::End(e) => end = Some((line_no, e)),
        }
    }
    let report = importer.finish().await?;
    match end {
        None if line_no == 0 => Err(CliError::Dump {
            line: 1,
            reason: "the dump is empty (no header)".to_owned(),
        }),
        None => Err(CliError::Dump {
            line: line_no,
            reason: format!(
                "the dump ends without its end line: the export was cut short ({} events imported)",
                report.events
            ),
        }),
        Some((line, e)) if e.events != report.events => Err(CliError::Dump {
            line,
            reason: format!(
                "the end line counts {} events, the dump holds {}",
                e.events, report.events
            ),
        }),
        Some(_) => Ok(report),
    }
}

/// Copies every event of `selector` from `from` into `to`, keeping streams, versions, ids, times
/// of occurrence, metadata and payloads; re-running it resumes (see the module docs).
///
/// This is how `memory://`, which lives in one process, is moved: an application calls this
/// with both stores.
///
/// # Errors
/// - [`CliError::Store`] when the source fails, or as [`Importer::finish`].
pub async fn copy(
    from: &dyn EventStore,
    to: &dyn EventStore,
    selector: Selector,
    progress: &ProgressBar,
) -> Result<ImportReport, CliError> {
    let mut importer = Importer::new(to);
    let mut events = replay(from, selector);
    while let Some(e) = events.next().await {
        let e = e?;
        let version = e.version;
        let stream = e.stream.clone();
        importer.push(stream, version, event_data(e)).await?;
        progress.inc(1);
    }
    importer.finish().await
}

/// The appendable part of a recorded event.
fn event_data(e: RecordedEvent) -> EventData {
    EventData {
        event_id: e.event_id,
        event_type: e.event_type,
        schema_version: e.schema_version,
        occurred_at: e.occurred_at,
        payload: e.payload,
        metadata: e.metadata,
    }
}
