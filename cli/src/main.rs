//! The `photon` binary: parses the command line, connects through `newton::connect` (the one
//! place that maps URLs to backends), runs one command of the library, and turns a failure into
//! one line on stderr, with credentials scrubbed, and an exit code.

use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use photon_api::{Category, EventStore, StreamId, Uuid};
use photon_cli::args::{parse_expected, parse_selector, parse_start};
use photon_cli::commands::{self, AppendRequest, Encoding, ReadRequest};
use photon_cli::error::{Secrets, EXIT_OK};
use photon_cli::render::Format;
use photon_cli::transfer::{copy_with, progress_bar, CopyOptions};
use photon_cli::{CliError, ImportReport};

/// Look inside, follow, export, import, copy and verify a Photon event store.
///
/// URL is a store URL: memory://, kafka://host:port,...?prefix=..., cassandra://host:port/keyspace,
/// mongodb://host:port/database. Exit codes: 0 ok, 1 failure, 2 usage, 3 verify found
/// differences, 4 append refused (wrong expected version, idempotency conflict), 5 store
/// unavailable (retryable), 6 access denied (credentials, certificate or permission; not retryable).
#[derive(Parser, Debug)]
#[command(name = "photon", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Checks that the store answers a real request.
    Health {
        /// Store URL.
        url: String,
    },
    /// Lists every category with at least one event.
    Categories {
        /// Store URL.
        url: String,
    },
    /// Prints a register (e.g. `newton_view-<view>`, a view's checkpoint) as JSON: revision,
    /// latest save id and value.
    Register {
        /// Store URL.
        url: String,
        /// Register name, e.g. `newton_view-balances-v1`.
        name: String,
    },
    /// Lists every stream of a category.
    Streams {
        /// Store URL.
        url: String,
        /// Category name, e.g. `account`.
        category: String,
    },
    /// Prints the events of one stream, payloads decoded.
    Read {
        /// Store URL.
        url: String,
        /// Stream name, e.g. `account-42`.
        stream: String,
        /// Newest first.
        #[arg(long)]
        backwards: bool,
        /// First version shown (inclusive).
        #[arg(long, value_name = "V")]
        from: Option<u64>,
        /// At most N events.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Output format; json and ndjson include every field and the metadata.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Appends one event; prints `<stream>@<version> <event id> <checkpoint>`.
    Append {
        /// Store URL.
        url: String,
        /// Stream name, e.g. `account-42`.
        stream: String,
        /// Event type name.
        #[arg(long = "type", value_name = "T")]
        event_type: String,
        /// The payload as JSON text.
        #[arg(
            long,
            value_name = "JSON",
            conflicts_with = "file",
            required_unless_present = "file"
        )]
        json: Option<String>,
        /// A file holding the JSON payload (`-` for standard input).
        #[arg(long, value_name = "F")]
        file: Option<PathBuf>,
        /// Expected version: any, none, exists or a version number.
        #[arg(long, default_value = "any")]
        expect: String,
        /// How the payload is stored.
        #[arg(long, value_enum, default_value_t = Encoding::Json)]
        encoding: Encoding,
        /// Event id (default: a fresh UUID v7); the same id makes a re-run a retry.
        #[arg(long)]
        id: Option<Uuid>,
        /// Payload schema version.
        #[arg(long, default_value_t = 1)]
        schema_version: u32,
        /// Causation id.
        #[arg(long)]
        causation_id: Option<Uuid>,
        /// Correlation id.
        #[arg(long)]
        correlation_id: Option<Uuid>,
        /// A header `KEY=VALUE`; repeatable.
        #[arg(long = "header", value_name = "KEY=VALUE")]
        headers: Vec<String>,
    },
    /// Follows a stream, a category or everything: replays, prints a CaughtUp line, then live
    /// events until interrupted (Ctrl-C).
    Tail {
        /// Store URL.
        url: String,
        /// `stream:<name>`, `category:<name>` or `all`.
        selector: String,
        /// beginning, now, a checkpoint (`<backend>:<hex>`) or an RFC 3339 time.
        #[arg(long, default_value = "beginning")]
        from: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = TailFormat::Table)]
        format: TailFormat,
    },
    /// Writes a dump (versioned NDJSON, see the photon-cli README) of a selector to stdout.
    Export {
        /// Store URL.
        url: String,
        /// `stream:<name>`, `category:<name>` or `all`.
        #[arg(default_value = "all")]
        selector: String,
    },
    /// Imports a dump from stdin (or --file); running it again resumes an interrupted import.
    Import {
        /// Store URL.
        url: String,
        /// Read the dump from this file instead of standard input.
        #[arg(long, value_name = "F")]
        file: Option<PathBuf>,
    },
    /// Copies every event of a selector from one store to another; re-running resumes.
    Copy {
        /// Source store URL.
        from: String,
        /// Target store URL.
        to: String,
        /// `stream:<name>`, `category:<name>` or `all`.
        #[arg(default_value = "all")]
        selector: String,
        /// Stay live after the history, copying new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// Keep the source checkpoint copied up to in this file, and resume after it.
        #[arg(long, value_name = "F")]
        checkpoint_file: Option<PathBuf>,
    },
    /// Compares two stores stream by stream (counts and content hash); prints the differences.
    Verify {
        /// First store URL.
        from: String,
        /// Second store URL.
        to: String,
        /// `stream:<name>`, `category:<name>` or `all`.
        #[arg(default_value = "all")]
        selector: String,
    },
}

/// `tail`'s formats: a JSON array never closes on a live feed, so it has none.
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum TailFormat {
    /// One aligned line per event.
    Table,
    /// One JSON object per event; the marker is `{"caught_up":true}`.
    Ndjson,
}

impl Command {
    fn urls(&self) -> Vec<&str> {
        match self {
            Command::Health { url }
            | Command::Categories { url }
            | Command::Streams { url, .. }
            | Command::Register { url, .. }
            | Command::Read { url, .. }
            | Command::Append { url, .. }
            | Command::Tail { url, .. }
            | Command::Export { url, .. }
            | Command::Import { url, .. } => vec![url],
            Command::Copy { from, to, .. } | Command::Verify { from, to, .. } => vec![from, to],
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let secrets = Secrets::from_urls(cli.command.urls());
    match run(cli.command, &secrets).await {
        Ok(()) => ExitCode::from(EXIT_OK as u8),
        Err(e) => {
            eprintln!("photon: error: {}", secrets.scrub(&e.to_string()));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn connect(url: &str) -> Result<Arc<dyn EventStore>, CliError> {
    Ok(newton::connect(url).await?)
}

/// Completes on Ctrl-C, or on SIGTERM where there is one (`timeout`, `kill`, service managers),
/// so `tail` ends cleanly with its output flushed.
async fn interrupted() {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    let int = async {
        // Without a signal handler there is nothing to wait for but the store.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term => {}
        _ = int => {}
    }
}

fn summary(secrets: &Secrets, text: String) {
    eprintln!("photon: {}", secrets.scrub(&text));
}

fn import_summary(r: &ImportReport) -> String {
    format!(
        "{} events: {} appended (or answered as retries of an earlier run), {} already present",
        r.events, r.appended, r.already_present
    )
}

async fn run(command: Command, secrets: &Secrets) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    match command {
        Command::Health { url } => {
            let store = connect(&url).await?;
            let mut text = Vec::new();
            commands::health(&*store, &mut text).await?;
            let text = secrets.scrub(&String::from_utf8_lossy(&text));
            stdout
                .lock()
                .write_all(text.as_bytes())
                .map_err(|e| CliError::io("writing to standard output", e))
        }
        Command::Categories { url } => {
            let store = connect(&url).await?;
            commands::categories(&*store, stdout.lock()).await
        }
        Command::Register { url, name } => {
            let store = connect(&url).await?;
            commands::register(&*store, &name, stdout.lock()).await
        }
        Command::Streams { url, category } => {
            let category = Category::new(&category)?;
            let store = connect(&url).await?;
            commands::streams(&*store, &category, stdout.lock()).await
        }
        Command::Read {
            url,
            stream,
            backwards,
            from,
            limit,
            format,
        } => {
            let stream = StreamId::parse(&stream)?;
            let store = connect(&url).await?;
            let request = ReadRequest {
                backwards,
                from,
                limit,
                format,
            };
            commands::read(&*store, &stream, request, stdout.lock())
                .await
                .map(drop)
        }
        Command::Append {
            url,
            stream,
            event_type,
            json,
            file,
            expect,
            encoding,
            id,
            schema_version,
            causation_id,
            correlation_id,
            headers,
        } => {
            let stream = StreamId::parse(&stream)?;
            let expected = parse_expected(&expect)?;
            let json = match (json, file) {
                (Some(json), _) => json,
                (None, Some(path)) if path.as_os_str() == "-" => {
                    std::io::read_to_string(std::io::stdin())
                        .map_err(|e| CliError::io("reading the payload from standard input", e))?
                }
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .map_err(|e| CliError::io(format!("reading {}", path.display()), e))?,
                (None, None) => return Err(CliError::Usage("give --json or --file".into())),
            };
            let headers = headers
                .into_iter()
                .map(|h| match h.split_once('=') {
                    Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
                    None => Err(CliError::Usage(format!("header {h:?} is not KEY=VALUE"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let store = connect(&url).await?;
            let request = AppendRequest {
                event_type,
                json,
                encoding,
                expected,
                event_id: id,
                schema_version,
                causation_id,
                correlation_id,
                headers,
            };
            commands::append(&*store, &stream, request, stdout.lock())
                .await
                .map(drop)
        }
        Command::Tail {
            url,
            selector,
            from,
            format,
        } => {
            let selector = parse_selector(&selector)?;
            let start = parse_start(&from)?;
            let store = connect(&url).await?;
            let format = match format {
                TailFormat::Table => Format::Table,
                TailFormat::Ndjson => Format::Ndjson,
            };
            let stop = interrupted();
            commands::tail(&*store, selector, start, format, stdout.lock(), stop)
                .await
                .map(drop)
        }
        Command::Export { url, selector } => {
            let selector = parse_selector(&selector)?;
            let store = connect(&url).await?;
            let bar = progress_bar("exporting");
            let n = photon_cli::export(&*store, selector, stdout.lock(), &bar).await;
            bar.finish_and_clear();
            summary(secrets, format!("exported {} events", n?));
            Ok(())
        }
        Command::Import { url, file } => {
            let store = connect(&url).await?;
            let bar = progress_bar("importing");
            let report = match file {
                Some(path) => {
                    let f = std::fs::File::open(&path)
                        .map_err(|e| CliError::io(format!("opening {}", path.display()), e))?;
                    photon_cli::import(&*store, BufReader::new(f), &bar).await
                }
                None => photon_cli::import(&*store, std::io::stdin().lock(), &bar).await,
            };
            bar.finish_and_clear();
            summary(secrets, format!("imported {}", import_summary(&report?)));
            Ok(())
        }
        Command::Copy {
            from,
            to,
            selector,
            follow,
            checkpoint_file,
        } => {
            let selector = parse_selector(&selector)?;
            let source = connect(&from).await?;
            let target = connect(&to).await?;
            let bar = progress_bar("copying");
            let options = CopyOptions {
                follow,
                checkpoint_file,
            };
            let report =
                copy_with(&*source, &*target, selector, &options, &bar, interrupted()).await;
            bar.finish_and_clear();
            summary(secrets, format!("copied {}", import_summary(&report?)));
            Ok(())
        }
        Command::Verify { from, to, selector } => {
            let selector = parse_selector(&selector)?;
            let a = connect(&from).await?;
            let b = connect(&to).await?;
            let report = photon_cli::verify(&*a, &*b, selector).await?;
            let mut out = stdout.lock();
            let io = |e| CliError::io("writing to standard output", e);
            for d in &report.differences {
                writeln!(out, "differs {d}").map_err(io)?;
            }
            writeln!(
                out,
                "{} streams, {} events compared, {} differ",
                report.streams,
                report.events,
                report.differences.len()
            )
            .map_err(io)?;
            match report.differences.len() {
                0 => Ok(()),
                n => Err(CliError::Differences(n)),
            }
        }
    }
}
