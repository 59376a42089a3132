//! How events look on a terminal or to `jq`: payloads decoded by their content type, and three
//! output formats written one event at a time (no format buffers a whole stream).
//!
//! Display only: the exact, re-importable form of an event is the dump format ([`crate::dump`]).

use std::io::Write;

use base64::Engine as _;
use photon_api::{ContentType, Payload, RecordedEvent};
use serde_json::{json, Value};

use crate::error::CliError;

/// How `read` and `tail` print events.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, clap::ValueEnum)]
pub enum Format {
    /// One aligned line per event: stream@version, type, time, payload as compact JSON.
    #[default]
    Table,
    /// One JSON array of event objects with every field, metadata included.
    Json,
    /// One JSON object per line, the same objects as `json`.
    Ndjson,
}

/// The payload as JSON: JSON payloads as they are, MessagePack decoded to the same JSON, anything
/// that does not decode (another content type, binary MessagePack, corrupt bytes) as
/// `{"content_type": ..., "base64": ...}` so nothing is hidden.
pub fn payload_json(payload: &Payload) -> Value {
    let decoded = match payload.content_type {
        ContentType::Json => serde_json::from_slice::<Value>(&payload.bytes).ok(),
        ContentType::MessagePack => rmp_serde::from_slice::<Value>(&payload.bytes).ok(),
        ContentType::Other(_) => None,
    };
    decoded.unwrap_or_else(|| {
        json!({
            "content_type": payload.content_type.as_str(),
            "base64": base64::engine::general_purpose::STANDARD.encode(&payload.bytes),
        })
    })
}

/// Every field of an event as one JSON object, the payload decoded.
pub fn event_json(e: &RecordedEvent) -> Value {
    let headers: serde_json::Map<String, Value> = e
        .metadata
        .headers
        .iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect();
    json!({
        "stream": e.stream.as_str(),
        "version": e.version.value(),
        "event_id": e.event_id,
        "event_type": e.event_type.as_str(),
        "schema_version": e.schema_version,
        "occurred_at": e.occurred_at.to_string(),
        "recorded_at": e.recorded_at.to_string(),
        "content_type": e.payload.content_type.as_str(),
        "payload": payload_json(&e.payload),
        "metadata": {
            "causation_id": e.metadata.causation_id,
            "correlation_id": e.metadata.correlation_id,
            "headers": headers,
        },
        "checkpoint": e.checkpoint.to_string(),
    })
}

/// Writes events in one [`Format`], one at a time; `finish` closes what the format opened.
#[derive(Debug)]
pub struct EventWriter<W: Write> {
    out: W,
    format: Format,
    written: u64,
}

impl<W: Write> EventWriter<W> {
    /// A writer of `format` onto `out`.
    pub fn new(out: W, format: Format) -> Self {
        Self {
            out,
            format,
            written: 0,
        }
    }

    /// Writes one event and flushes, so a `tail` shows it at once.
    ///
    /// # Errors
    /// - [`CliError::Io`] when the output fails.
    pub fn event(&mut self, e: &RecordedEvent) -> Result<(), CliError> {
        let io = |err| CliError::io("writing to standard output", err);
        match self.format {
            Format::Table => writeln!(
                self.out,
                "{:<32} {:<24} {} {}",
                format!("{}@{}", e.stream, e.version),
                e.event_type.as_str(),
                e.occurred_at,
                payload_json(&e.payload)
            )
            .map_err(io)?,
            Format::Ndjson => writeln!(self.out, "{}", event_json(e)).map_err(io)?,
            Format::Json => {
                let sep = if self.written == 0 { "[\n" } else { ",\n" };
                write!(self.out, "{sep}  {}", event_json(e)).map_err(io)?;
            }
        }
        self.written += 1;
        self.out.flush().map_err(io)
    }

    /// Writes the marker a `HotCold` subscription sends once it reached the head: a line that
    /// says so in table form, `{"caught_up":true}` in ndjson so every line stays JSON.
    ///
    /// # Errors
    /// - [`CliError::Io`] when the output fails.
    pub fn caught_up(&mut self) -> Result<(), CliError> {
        let io = |err| CliError::io("writing to standard output", err);
        match self.format {
            Format::Ndjson | Format::Json => writeln!(self.out, "{{\"caught_up\":true}}"),
            Format::Table => writeln!(self.out, "-- CaughtUp: live from here --"),
        }
        .map_err(io)?;
        self.out.flush().map_err(io)
    }

    /// Closes the format (the JSON array) and flushes; returns how many events were written.
    ///
    /// # Errors
    /// - [`CliError::Io`] when the output fails.
    pub fn finish(mut self) -> Result<u64, CliError> {
        let io = |err| CliError::io("writing to standard output", err);
        if self.format == Format::Json {
            let text = if self.written == 0 { "[]\n" } else { "\n]\n" };
            self.out.write_all(text.as_bytes()).map_err(io)?;
        }
        self.out.flush().map_err(io)?;
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_decode_by_content_type() {
        let json = Payload::json(&json!({"amount": 5})).unwrap();
        assert_eq!(payload_json(&json), json!({"amount": 5}));
        let msgpack = Payload::msgpack(&json!({"amount": 6, "who": "x"})).unwrap();
        assert_eq!(payload_json(&msgpack), json!({"amount": 6, "who": "x"}));
        let other = Payload::raw(ContentType::from_mime("text/plain"), &b"hi"[..]);
        assert_eq!(
            payload_json(&other),
            json!({"content_type": "text/plain", "base64": "aGk="})
        );
    }
}
