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
    Checkpoint, Error, EventData, EventStore, ExpectedVersion, ReadOptions, RecordedEvent,
    Selector, Start, StreamId, SubscriptionItem, SubscriptionMode, Version,
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

/// What the progress bar shows: a count, since the size of a store or a stdin dump is unknown.
const PROGRESS_TEMPLATE: &str = "{spinner} {msg} {human_pos} events ({per_sec}) {elapsed}";

/// A progress bar on stderr counting events; hidden when stderr is not a terminal, so logs and
/// tests see only the summary line.
pub fn progress_bar(what: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(PROGRESS_TEMPLATE)
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
    /// The source checkpoint of the last event in `batch`.
    batch_checkpoint: Option<Checkpoint>,
    /// The source checkpoint of the last event stored: every event pushed before it is stored.
    stored_checkpoint: Option<Checkpoint>,
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
            batch_checkpoint: None,
            stored_checkpoint: None,
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
        self.push_at(stream, version, event, None).await
    }

    /// As [`Self::push`], for an event read from a source store at `checkpoint`, so that
    /// [`Self::stored_checkpoint`] can say where to resume.
    ///
    /// # Errors
    /// - As [`Self::finish`], for the batch appended now.
    pub async fn push_at(
        &mut self,
        stream: StreamId,
        version: Version,
        event: EventData,
        checkpoint: Option<Checkpoint>,
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
        self.batch_checkpoint = checkpoint;
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

    /// The source checkpoint after which nothing pushed is left unstored: where a copy resumes.
    pub fn stored_checkpoint(&self) -> Option<&Checkpoint> {
        self.stored_checkpoint.as_ref()
    }

    /// What was done so far.
    pub fn report(&self) -> ImportReport {
        self.report
    }

    /// Appends the batch being gathered now, instead of waiting for an event that does not
    /// continue it: a live copy calls this when the source goes quiet.
    ///
    /// # Errors
    /// - As [`Self::finish`].
    pub async fn flush(&mut self) -> Result<(), CliError> {
        self.flush_batch().await?;
        if let Some(c) = self.batch_checkpoint.take() {
            self.stored_checkpoint = Some(c);
        }
        Ok(())
    }

    async fn flush_batch(&mut self) -> Result<(), CliError> {
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
    copy_with(
        from,
        to,
        selector,
        &CopyOptions::default(),
        progress,
        std::future::pending(),
    )
    .await
}

/// How [`copy_with`] runs.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct CopyOptions {
    /// Stay live after the history (a `HotCold` subscription) until `stop`, instead of ending
    /// at the head as of the start.
    pub follow: bool,
    /// A file holding the source checkpoint after which everything is copied: read at the start
    /// (the copy resumes after it), rewritten after each append. None: from the beginning.
    pub checkpoint_file: Option<std::path::PathBuf>,
}

/// How long a live copy gathers events into a batch before appending what it has.
const FOLLOW_IDLE: Duration = Duration::from_millis(100);

/// [`copy`], resuming from a kept checkpoint and optionally staying live until `stop`.
///
/// # Errors
/// - [`CliError::Io`] when the checkpoint file cannot be read or written;
///   [`CliError::Store`] for a checkpoint the source refuses (another backend's), or as
///   [`copy`].
pub async fn copy_with(
    from: &dyn EventStore,
    to: &dyn EventStore,
    selector: Selector,
    options: &CopyOptions,
    progress: &ProgressBar,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ImportReport, CliError> {
    let start = match &options.checkpoint_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Start::After(text.trim().parse::<Checkpoint>()?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Start::Beginning,
            Err(e) => return Err(CliError::io(format!("reading {}", path.display()), e)),
        },
        None => Start::Beginning,
    };
    let mode = if options.follow {
        SubscriptionMode::HotCold
    } else {
        SubscriptionMode::Cold
    };
    let mut importer = Importer::new(to);
    let mut items = from.subscribe(selector, start, mode);
    let mut saved: Option<Checkpoint> = None;
    tokio::pin!(stop);
    loop {
        let item = tokio::select! {
            _ = &mut stop => break,
            item = tokio::time::timeout(FOLLOW_IDLE, items.next()) => item,
        };
        match item {
            // Quiet source: store what was gathered, so a live copy lags by at most this.
            Err(_) | Ok(Some(Ok(SubscriptionItem::CaughtUp))) => importer.flush().await?,
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(SubscriptionItem::Event(e)))) => {
                let (stream, version, checkpoint) =
                    (e.stream.clone(), e.version, e.checkpoint.clone());
                importer
                    .push_at(stream, version, event_data(e), Some(checkpoint))
                    .await?;
                progress.inc(1);
            }
        }
        save_checkpoint(options, &importer, &mut saved)?;
    }
    importer.flush().await?;
    save_checkpoint(options, &importer, &mut saved)?;
    Ok(importer.report())
}

/// Rewrites the checkpoint file when the stored checkpoint moved; written aside and renamed,
/// so a crash leaves the old checkpoint or the new one, never half of one.
fn save_checkpoint(
    options: &CopyOptions,
    importer: &Importer<'_>,
    saved: &mut Option<Checkpoint>,
) -> Result<(), CliError> {
    let (Some(path), Some(current)) = (&options.checkpoint_file, importer.stored_checkpoint())
    else {
        return Ok(());
    };
    if saved.as_ref() == Some(current) {
        return Ok(());
    }
    let aside = path.with_extension("tmp");
    let io = |e| CliError::io(format!("writing {}", path.display()), e);
    std::fs::write(&aside, format!("{current}\n")).map_err(io)?;
    std::fs::rename(&aside, path).map_err(io)?;
    *saved = Some(current.clone());
    Ok(())
}

/// The appendable part of a recorded event: what a faithful copy appends to reproduce it.
pub fn event_data(e: RecordedEvent) -> EventData {
    EventData {
        event_id: e.event_id,
        event_type: e.event_type,
        schema_version: e.schema_version,
        occurred_at: e.occurred_at,
        payload: e.payload,
        metadata: e.metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_template_parses() {
        assert!(ProgressStyle::with_template(PROGRESS_TEMPLATE).is_ok());
    }
}
