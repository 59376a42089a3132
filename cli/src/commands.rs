//! The looking and writing commands (`health`, `categories`, `streams`, `read`, `append`,
//! `tail`) as functions over any store and any output, so tests can run them in-process on
//! `memory://` as well as through the binary.
//!
//! Moving events (`export`, `import`, `copy`) is [`crate::transfer`]; comparing is
//! [`mod@crate::verify`]. Nothing here connects to a store or parses a URL.

use std::future::Future;
use std::io::Write;

use futures::StreamExt;
use photon_api::{
    AppendResult, Category, ContentType, Direction, EventData, EventStore, EventType,
    ExpectedVersion, Payload, ReadOptions, Selector, Start, StreamId, SubscriptionItem,
    SubscriptionMode, Uuid, Version,
};

use crate::error::CliError;
use crate::render::{EventWriter, Format};

fn stdout_err(e: std::io::Error) -> CliError {
    CliError::io("writing to standard output", e)
}

/// Writes the backend and what it checked, e.g. `kafka ok: 1 broker answered`.
///
/// # Errors
/// - [`CliError::Store`] with `Unavailable` when the store does not answer.
pub async fn health(store: &dyn EventStore, mut out: impl Write) -> Result<(), CliError> {
    let h = store.health().await?;
    writeln!(out, "{} ok: {}", h.backend, h.detail).map_err(stdout_err)
}

/// Writes register `name` as one JSON object: its revision, the id of its latest save and the
/// value decoded as MessagePack when it is (view checkpoints are), else base64; all three `null`
/// when it was never saved. An operator sees where a view is, now that its saves are no longer
/// events `read` would show.
///
/// # Errors
/// - [`CliError::Store`] with `InvalidInput` for a name no register can have, `Unavailable` when
///   the store does not answer.
pub async fn register(
    store: &dyn EventStore,
    name: &str,
    mut out: impl Write,
) -> Result<(), CliError> {
    let json = match store.load_register(name).await? {
        Some(register) => serde_json::json!({
            "register": name,
            "revision": register.revision,
            "save_id": register.save_id,
            "value": crate::render::payload_json(&photon_api::Payload {
                content_type: photon_api::ContentType::MessagePack,
                bytes: register.value,
            }),
        }),
        None => serde_json::json!({
            "register": name,
            "revision": null,
            "save_id": null,
            "value": null,
        }),
    };
    writeln!(out, "{json}").map_err(stdout_err)
}

/// Writes every category, one per line.
///
/// # Errors
/// - [`CliError::Store`] when the store fails.
pub async fn categories(store: &dyn EventStore, mut out: impl Write) -> Result<(), CliError> {
    for c in store.list_categories().await? {
        writeln!(out, "{c}").map_err(stdout_err)?;
    }
    Ok(())
}

/// Writes every stream of `category`, one per line, as the store lists them.
///
/// # Errors
/// - [`CliError::Store`] when the store fails.
pub async fn streams(
    store: &dyn EventStore,
    category: &Category,
    mut out: impl Write,
) -> Result<(), CliError> {
    let mut streams = store.list_streams(category);
    while let Some(s) = streams.next().await {
        writeln!(out, "{}", s?).map_err(stdout_err)?;
    }
    Ok(())
}

/// What `read` reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ReadRequest {
    /// Newest first.
    pub backwards: bool,
    /// The first version shown (inclusive).
    pub from: Option<u64>,
    /// At most this many events.
    pub limit: Option<usize>,
    /// How they are printed.
    pub format: Format,
}

/// Writes the events of one stream; returns how many.
///
/// # Errors
/// - [`CliError::Store`] when the store fails mid-read; [`CliError::Io`] when `out` fails.
pub async fn read(
    store: &dyn EventStore,
    stream: &StreamId,
    request: ReadRequest,
    out: impl Write,
) -> Result<u64, CliError> {
    let options = ReadOptions {
        direction: if request.backwards {
            Direction::Backwards
        } else {
            Direction::Forwards
        },
        from: request.from.map(Version),
        limit: request.limit,
    };
    let mut writer = EventWriter::new(out, request.format);
    let mut events = store.read_stream(stream, options);
    while let Some(e) = events.next().await {
        writer.event(&e?)?;
    }
    writer.finish()
}

/// How `append` encodes the JSON it is given.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, clap::ValueEnum)]
pub enum Encoding {
    /// Stored as the JSON text given (`application/json`).
    #[default]
    Json,
    /// Converted to MessagePack with field names (`application/msgpack`), the encoding Rust
    /// applications on newton write by default.
    Msgpack,
}

/// One event to append from the command line.
#[derive(Clone, PartialEq, Debug)]
pub struct AppendRequest {
    /// The event type name.
    pub event_type: String,
    /// The payload as JSON text.
    pub json: String,
    /// How to store it.
    pub encoding: Encoding,
    /// The expected version.
    pub expected: ExpectedVersion,
    /// The event id; a fresh UUID v7 when None. Give one to make a retried command idempotent.
    pub event_id: Option<Uuid>,
    /// The payload's schema version.
    pub schema_version: u32,
    /// Causation id.
    pub causation_id: Option<Uuid>,
    /// Correlation id.
    pub correlation_id: Option<Uuid>,
    /// Free headers.
    pub headers: Vec<(String, String)>,
}

/// Appends one event and writes `<stream>@<version> <event id> <checkpoint>`.
///
/// # Errors
/// - [`CliError::Usage`] when the payload is not JSON.
/// - [`CliError::Store`] with the store's typed refusal (`WrongExpectedVersion`,
///   `InvalidInput`, `EventTooLarge`, ...).
pub async fn append(
    store: &dyn EventStore,
    stream: &StreamId,
    request: AppendRequest,
    mut out: impl Write,
) -> Result<AppendResult, CliError> {
    let value: serde_json::Value = serde_json::from_str(&request.json)
        .map_err(|e| CliError::Usage(format!("the payload is not JSON: {e}")))?;
    let payload = match request.encoding {
        // The text as given, so its key order and spacing are what readers see.
        Encoding::Json => Payload::raw(ContentType::Json, request.json.trim().as_bytes().to_vec()),
        Encoding::Msgpack => Payload::msgpack(&value)?,
    };
    let mut event = EventData::new(EventType::new(&request.event_type)?, payload)
        .with_schema_version(request.schema_version);
    if let Some(id) = request.event_id {
        event = event.with_id(id);
    }
    event.metadata.causation_id = request.causation_id;
    event.metadata.correlation_id = request.correlation_id;
    for (k, v) in request.headers {
        event.metadata.headers.insert(k, v);
    }
    let id = event.event_id;
    let result = store.append(stream, request.expected, vec![event]).await?;
    let checkpoint = result
        .checkpoints
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    writeln!(
        out,
        "{stream}@{} {id} {checkpoint}",
        result.last_version.value()
    )
    .map_err(stdout_err)?;
    Ok(result)
}

/// Follows `selector` from `start` (replay, then live) until `stop` completes or the store
/// ends the subscription; prints the `CaughtUp` marker once. Returns the number of events.
///
/// # Errors
/// - [`CliError::Store`] when the subscription fails (a foreign checkpoint, an unsupported
///   start, the server going away); [`CliError::Io`] when `out` fails.
pub async fn tail(
    store: &dyn EventStore,
    selector: Selector,
    start: Start,
    format: Format,
    out: impl Write,
    stop: impl Future<Output = ()>,
) -> Result<u64, CliError> {
    let mut writer = EventWriter::new(out, format);
    let mut items = store.subscribe(selector, start, SubscriptionMode::HotCold);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            item = items.next() => match item {
                None => break,
                Some(Ok(SubscriptionItem::Event(e))) => writer.event(&e)?,
                Some(Ok(SubscriptionItem::CaughtUp)) => writer.caught_up()?,
                Some(Err(e)) => return Err(e.into()),
            },
        }
    }
    writer.finish()
}
