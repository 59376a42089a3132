//! Schema evolution: upcasters bring events stored in an older shape to the shape the code has.
//!
//! Stored events never change (design.md: corrections are new events), so an event type whose
//! shape changes keeps its old events as they are and reads them through a chain of upcasters,
//! one per schema version step, every time they are read. This module owns those chains and the
//! one entry point that decodes a stored event through them, [`Decoder`], used by the
//! repository's load, the test kit, and views and process managers that want typed events. It
//! must not touch the store: upcasting is a pure function of the stored event.
//!
//! # The value type
//! Upcasters work on [`rmpv::Value`], MessagePack's own value model, because it holds everything
//! either payload encoding can store: a MessagePack payload reads into it and writes back
//! byte-exact (binary fields stay binary, integer map keys stay integers, `u64` above `i64::MAX`
//! and extension types survive), which `serde_json::Value` cannot do; a JSON payload reads into
//! it through serde and writes back as the same JSON. The upcast value is re-encoded in the
//! event's own content type and decoded with the same decoder as a current event, so an upcast
//! event and a freshly written one of the same shape decode identically.
//!
//! # Cost
//! An event already at its type's current version is decoded exactly as before upcasters
//! existed (serde straight from the payload bytes), after one lookup of its type's current
//! version; only older events take the detour through [`rmpv::Value`].

use std::any::TypeId;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock, RwLock};

use photon_api::{BoxError, ContentType, Error, EventType, Payload, RecordedEvent};
use serde::de::DeserializeOwned;

use crate::aggregate::DomainEvent;

pub use rmpv;
pub use rmpv::Value;

/// One step of a chain: the stored value at version n, in the shape of version n + 1. Several
/// values split one stored event into several domain events; none drops it.
type Step = Arc<dyn Fn(Value) -> Result<Vec<Value>, BoxError> + Send + Sync>;

/// The upcasters of one event enum, per stored event type: a chain of steps from schema version
/// 1 to the version the code writes.
///
/// Return it from [`DomainEvent::upcasters`]; the repository, the test kit and [`Decoder`] then
/// read old events through it, so no reader of the type can forget it. A chain is keyed by the
/// *stored* type name, and what a step returns stays in that chain: a step may change the type
/// inside the value (e.g. the enum variant), rename fields, add defaulted ones, change a field's
/// type, or split the event into several, and the last step's output is decoded as the event
/// enum. The current version of a type is one past its last step (1 for a type without steps),
/// and is the version [`DomainEvent::schema_version`] must return for events of that type.
///
/// Chains are checked when first used, not here, so that registration reads as a list: a chain
/// that does not start at 1, repeats a version or misses a step is refused by [`Decoder::new`]
/// with [`Error::InvalidInput`] naming the type and the missing step, and so is every load of
/// the aggregate, before any event is decoded.
///
/// ```
/// use newton::upcast::{self, Upcasters, Value};
///
/// // v1 {"amt": 5} -> v2 {"amount": 5} -> v3 {"amount": 5, "currency": "EUR"}
/// let upcasters = Upcasters::new()
///     .step("MoneyDeposited", 1, |mut v| {
///         upcast::rename_field(upcast::field_mut(&mut v, "Deposited")?, "amt", "amount")?;
///         Ok(v)
///     })
///     .step("MoneyDeposited", 2, |mut v| {
///         upcast::set_field(upcast::field_mut(&mut v, "Deposited")?, "currency", "EUR")?;
///         Ok(v)
///     });
/// # let _ = upcasters;
/// ```
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: Vec<(String, u32, Step)>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.steps.iter().map(|(t, from, _)| (t, from)))
            .finish()
    }
}

impl Upcasters {
    /// No upcasters: every type is at schema version 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the step that turns a stored `event_type` value of schema version `from` into the
    /// shape of version `from + 1` (a rename, an added field with its default, a changed type).
    /// An error from `upcast` stops the read with [`Error::Upcast`] naming the event.
    pub fn step(
        self,
        event_type: &str,
        from: u32,
        upcast: impl Fn(Value) -> Result<Value, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.split(event_type, from, move |v| upcast(v).map(|v| vec![v]))
    }

    /// As [`Self::step`], for a step that turns one stored event into several of the next
    /// version (in order), or into none when the event no longer means anything. The events it
    /// yields share the stored event's stream version and id: a view that is idempotent by
    /// version handles all of them or none.
    pub fn split(
        mut self,
        event_type: &str,
        from: u32,
        upcast: impl Fn(Value) -> Result<Vec<Value>, BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.steps
            .push((event_type.to_owned(), from, Arc::new(upcast)));
        self
    }

    /// The checked chains, or the `(what, reason)` of an [`Error::InvalidInput`] saying why
    /// they do not form chains from version 1.
    fn into_schema(self) -> Result<Schema, (String, String)> {
        let mut by_type: BTreeMap<String, BTreeMap<u32, Step>> = BTreeMap::new();
        for (event_type, from, step) in self.steps {
            let invalid =
                |reason: String| (format!("upcasters of event type {event_type:?}"), reason);
            if let Err(e) = EventType::new(&event_type) {
                return Err(invalid(e.to_string()));
            }
            let chain = by_type.entry(event_type.clone()).or_default();
            if from == 0 {
                return Err(invalid(
                    "schema versions start at 1, so no upcaster starts at 0".into(),
                ));
            }
            if chain.insert(from, step).is_some() {
                return Err(invalid(format!(
                    "two upcasters start at schema version {from}"
                )));
            }
        }
        let mut chains = foldhash::HashMap::default();
        for (event_type, steps) in by_type {
            if let Some(missing) = (1..).zip(steps.keys()).find(|(want, have)| want != *have) {
                let registered: Vec<String> = steps.keys().map(|v| v.to_string()).collect();
                return Err((
                    format!("upcasters of event type {event_type:?}"),
                    format!(
                        "no upcaster from schema version {} to {}: the chain must step from 1 \
                         without gaps (steps registered from {})",
                        missing.0,
                        missing.0 + 1,
                        registered.join(", ")
                    ),
                ));
            }
            chains.insert(event_type.into_boxed_str(), steps.into_values().collect());
        }
        Ok(Schema { chains })
    }
}

/// Checked chains: `chains[t][i]` upcasts type `t` from version `i + 1`.
struct Schema {
    chains: foldhash::HashMap<Box<str>, Vec<Step>>,
}

impl Schema {
    #[inline]
    fn current(&self, event_type: &str) -> u32 {
        if self.chains.is_empty() {
            return 1;
        }
        self.chains
            .get(event_type)
            .map_or(1, |steps| steps.len() as u32 + 1)
    }
}

/// A type's checked chains, or the `(what, reason)` of the refusal, built once per event enum.
type Cached = Result<Arc<Schema>, (String, String)>;

fn schema_of<E: DomainEvent>() -> Result<Arc<Schema>, Error> {
    static CACHE: OnceLock<RwLock<foldhash::HashMap<TypeId, Cached>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = TypeId::of::<E>();
    let found = cache
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    let cached = match found {
        Some(cached) => cached,
        None => {
            // Built outside the lock: user code runs here. Two first readers may both build;
            // the chains are equal, so either result is right.
            let built = E::upcasters().into_schema().map(Arc::new);
            cache
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .or_insert(built)
                .clone()
        }
    };
    cached.map_err(|(what, reason)| Error::InvalidInput { what, reason })
}

/// Reads stored events as `E`, through `E`'s upcasters: the one way to decode an aggregate's
/// events, for the repository, the test kit, typed views and process managers, so all of them
/// see the same current shape.
///
/// Cheap to create (the chains are checked and cached once per type) and to clone.
///
/// ```
/// use newton::upcast::{Decoder, Upcasters};
/// use newton::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// enum Event { Named { name: String } }
///
/// impl DomainEvent for Event {
///     fn event_type(&self) -> &'static str { "Named" }
///     fn schema_version(&self) -> u32 { 2 }
///     fn upcasters() -> Upcasters {
///         // v1 was {"Named": {"title": ...}}
///         Upcasters::new().step("Named", 1, |mut v| {
///             let body = newton::upcast::field_mut(&mut v, "Named")?;
///             newton::upcast::rename_field(body, "title", "name")?;
///             Ok(v)
///         })
///     }
/// }
///
/// let decoder = Decoder::<Event>::new()?;
/// assert_eq!(decoder.current_version("Named"), 2);
/// let v1 = newton::store::EventData::json("Named", &serde_json::json!({"Named": {"title": "Ada"}}))?
///     .with_schema_version(1);
/// let read: Vec<Event> = newton::testing::read_stored([v1])?;
/// assert_eq!(read, [Event::Named { name: "Ada".into() }]);
/// # Ok::<(), newton::Error>(())
/// ```
pub struct Decoder<E> {
    schema: Arc<Schema>,
    _event: PhantomData<fn() -> E>,
}

impl<E> Clone for Decoder<E> {
    fn clone(&self) -> Self {
        Self {
            schema: self.schema.clone(),
            _event: PhantomData,
        }
    }
}

impl<E> fmt::Debug for Decoder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut versions: Vec<(&str, usize)> = self
            .schema
            .chains
            .iter()
            .map(|(t, steps)| (&**t, steps.len() + 1))
            .collect();
        versions.sort_unstable();
        f.debug_struct("Decoder")
            .field("event", &std::any::type_name::<E>())
            .field("current_versions", &versions)
            .finish()
    }
}

impl<E: DomainEvent> Decoder<E> {
    /// The decoder of `E`, with the chains of [`DomainEvent::upcasters`].
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] naming the event type when its chain does not start at 1,
    ///   repeats a version or misses a step, or the type name is not valid.
    pub fn new() -> Result<Self, Error> {
        Ok(Self {
            schema: schema_of::<E>()?,
            _event: PhantomData,
        })
    }

    /// The schema version the code reads `event_type` at, and must write it at: one past the
    /// last upcaster of the type, 1 for a type without upcasters.
    pub fn current_version(&self, event_type: &str) -> u32 {
        self.schema.current(event_type)
    }

    /// The domain events a stored event reads as: one, or several (or none) when an upcaster
    /// split (or dropped) it.
    ///
    /// # Errors
    /// - As [`Self::decode_each`].
    pub fn decode(&self, event: &RecordedEvent) -> Result<Vec<E>, Error> {
        let mut events = Vec::with_capacity(1);
        self.decode_each(event, |e| events.push(e))?;
        Ok(events)
    }

    /// Calls `apply` with each domain event a stored event reads as, without collecting them:
    /// the replay path. A current event goes straight from its bytes to `E`; an older one is
    /// upcast and decoded entirely before the first call, so a failure applies nothing of it.
    ///
    /// # Errors
    /// - [`Error::UnknownSchemaVersion`] when the stored version is newer than the type's
    ///   current one (a newer release wrote it).
    /// - [`Error::Upcast`] when an upcaster fails, or the stored version is 0.
    /// - [`Error::Decode`] when the payload, or what the upcasters made of it, does not decode
    ///   as `E`.
    #[inline]
    pub fn decode_each(
        &self,
        event: &RecordedEvent,
        mut apply: impl FnMut(E),
    ) -> Result<(), Error> {
        let current = self.schema.current(event.event_type.as_str());
        if event.schema_version == current {
            apply(event.decode()?);
            return Ok(());
        }
        let values = self.upcast_to(event, current)?;
        let decoded = values
            .into_iter()
            .map(|value| decode_value(event, &value, current))
            .collect::<Result<Vec<E>, Error>>()?;
        decoded.into_iter().for_each(apply);
        Ok(())
    }

    /// The stored event's payload as values of the current schema version, for views that work
    /// on values rather than on `E` (e.g. to forward a field without knowing the whole enum).
    /// A current event gives its payload as one value.
    ///
    /// # Errors
    /// - [`Error::UnknownSchemaVersion`] and [`Error::Upcast`] as for [`Self::decode_each`].
    /// - [`Error::Decode`] when the payload is not valid in its content type.
    pub fn upcast(&self, event: &RecordedEvent) -> Result<Vec<Value>, Error> {
        let current = self.schema.current(event.event_type.as_str());
        self.upcast_to(event, current)
    }

    fn upcast_to(&self, event: &RecordedEvent, current: u32) -> Result<Vec<Value>, Error> {
        let stored = event.schema_version;
        let event_type = event.event_type.as_str();
        if stored > current {
            return Err(Error::UnknownSchemaVersion {
                stream: event.stream.clone(),
                version: event.version,
                event_type: event_type.to_owned(),
                schema_version: stored,
                known: current,
            });
        }
        let upcast_error = |from: u32, source: BoxError| Error::Upcast {
            stream: event.stream.clone(),
            version: event.version,
            event_type: event_type.to_owned(),
            schema_version: from,
            source,
        };
        if stored == 0 {
            return Err(upcast_error(
                0,
                "schema versions start at 1, so no upcaster starts at 0".into(),
            ));
        }
        let mut values = vec![read_value(event)?];
        if stored == current {
            return Ok(values);
        }
        let steps = self
            .schema
            .chains
            .get(event_type)
            .expect("a type whose current version is past 1 has a chain");
        for from in stored..current {
            let step = &steps[(from - 1) as usize];
            let mut next = Vec::with_capacity(values.len());
            for value in values {
                next.extend(step(value).map_err(|e| upcast_error(from, e))?);
            }
            values = next;
        }
        Ok(values)
    }
}

/// The payload as a value, by its content type.
fn read_value(event: &RecordedEvent) -> Result<Value, Error> {
    let payload = &event.payload;
    let value = match &payload.content_type {
        // Through rmp-serde, the decoder of current events, rather than rmpv's own reader,
        // which takes the reserved marker 0xc1 for nil: both paths refuse the same bytes.
        ContentType::MessagePack => {
            rmp_serde::from_slice(&payload.bytes).map_err(|e| e.to_string())
        }
        ContentType::Json => serde_json::from_slice(&payload.bytes).map_err(|e| e.to_string()),
        ContentType::Other(t) => Err(format!("content type {t:?} has no built-in decoder")),
    };
    value.map_err(|reason| decode_error(event, &event.payload, reason))
}

/// Decodes an upcast value as `E`: encoded again in the event's content type and read by the
/// same decoder as a current event, so both paths agree on every serde attribute.
fn decode_value<E: DeserializeOwned>(
    event: &RecordedEvent,
    value: &Value,
    current: u32,
) -> Result<E, Error> {
    let decoded = match &event.payload.content_type {
        ContentType::MessagePack => {
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, value)
                .map_err(|e| e.to_string())
                .and_then(|()| rmp_serde::from_slice(&bytes).map_err(|e| e.to_string()))
        }
        ContentType::Json => serde_json::to_vec(value)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string())),
        ContentType::Other(t) => Err(format!("content type {t:?} has no built-in decoder")),
    };
    decoded.map_err(|reason| {
        decode_error(
            event,
            &event.payload,
            format!(
                "after upcasting from schema version {} to {current}: {reason}",
                event.schema_version
            ),
        )
    })
}

fn decode_error(event: &RecordedEvent, payload: &Payload, reason: String) -> Error {
    Error::Decode {
        stream: event.stream.clone(),
        version: event.version,
        event_type: event.event_type.as_str().to_owned(),
        content_type: payload.content_type.as_str().to_owned(),
        reason,
    }
}

/// The domain events a stored event reads as, through `E`'s upcasters: for a view's `handle`.
/// Same as `Decoder::<E>::new()?.decode(event)`.
///
/// # Errors
/// - As [`Decoder::new`] and [`Decoder::decode_each`].
pub fn decode<E: DomainEvent>(event: &RecordedEvent) -> Result<Vec<E>, Error> {
    Decoder::<E>::new()?.decode(event)
}

// ---- Helpers for writing upcasters ---------------------------------------------------------

/// The fields of a map value (a struct, or an enum variant's wrapper), to edit in place.
///
/// # Errors
/// - When `value` is not a map, naming what it is.
pub fn fields_mut(value: &mut Value) -> Result<&mut Vec<(Value, Value)>, BoxError> {
    match value {
        Value::Map(fields) => Ok(fields),
        other => Err(format!("expected a map, found {}", kind(other)).into()),
    }
}

/// The value of field `name` of a map, to edit in place; for an externally tagged enum (serde's
/// default) the variant's fields are `field_mut(&mut value, "Variant")`.
///
/// # Errors
/// - When `value` is not a map or has no field `name`.
pub fn field_mut<'v>(value: &'v mut Value, name: &str) -> Result<&'v mut Value, BoxError> {
    fields_mut(value)?
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
        .ok_or_else(|| format!("no field {name:?}").into())
}

/// Removes field `name` from a map and returns its value, e.g. to move it or change its type.
///
/// # Errors
/// - When `value` is not a map or has no field `name`.
pub fn take_field(value: &mut Value, name: &str) -> Result<Value, BoxError> {
    let fields = fields_mut(value)?;
    let at = fields
        .iter()
        .position(|(k, _)| k.as_str() == Some(name))
        .ok_or_else(|| -> BoxError { format!("no field {name:?}").into() })?;
    Ok(fields.remove(at).1)
}

/// Sets field `name` of a map, replacing it or adding it at the end: the usual step for a field
/// added with a default.
///
/// # Errors
/// - When `value` is not a map.
pub fn set_field(value: &mut Value, name: &str, new: impl Into<Value>) -> Result<(), BoxError> {
    let new = new.into();
    let fields = fields_mut(value)?;
    match fields.iter_mut().find(|(k, _)| k.as_str() == Some(name)) {
        Some((_, v)) => *v = new,
        None => fields.push((Value::from(name), new)),
    }
    Ok(())
}

/// Renames field `from` of a map to `to`, keeping its place.
///
/// # Errors
/// - When `value` is not a map, has no field `from`, or already has a field `to`.
pub fn rename_field(value: &mut Value, from: &str, to: &str) -> Result<(), BoxError> {
    let fields = fields_mut(value)?;
    if fields.iter().any(|(k, _)| k.as_str() == Some(to)) {
        return Err(format!("cannot rename {from:?} to {to:?}: {to:?} is already there").into());
    }
    let (key, _) = fields
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some(from))
        .ok_or_else(|| -> BoxError { format!("no field {from:?}").into() })?;
    *key = Value::from(to);
    Ok(())
}

/// `{name: {fields}}`: an enum variant as serde writes it by default (externally tagged), for a
/// step that turns an event into another variant, or splits it into several.
pub fn variant<'f>(name: &str, fields: impl IntoIterator<Item = (&'f str, Value)>) -> Value {
    let fields = fields
        .into_iter()
        .map(|(k, v)| (Value::from(k), v))
        .collect();
    Value::Map(vec![(Value::from(name), Value::Map(fields))])
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}
