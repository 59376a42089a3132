//! Schema evolution: events stored in older shapes read through their type's upcasters on load,
//! in views and in the test kit, in both payload encodings; each way it can go wrong is a typed
//! error. The repository and view cases also run against every real server whose
//! `PHOTON_TEST_<BACKEND>_URL` is set (and whose cargo feature is on).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use newton::store::{ContentType, EventData, EventStore, EventType, ExpectedVersion, Payload};
use newton::testing::{read_stored, AggregateTest};
use newton::upcast::{
    self, field_mut, rename_field, set_field, take_field, variant, Decoder, Value,
};
use newton::{
    Aggregate, BoxError, Category, DomainEvent, Error, InMemoryCheckpointStore, RecordedEvent,
    Repository, StreamId, Upcasters, View, ViewError, ViewRunner, ViewStatus,
};
use photon_memory::MemoryStore;
use serde::{Deserialize, Serialize};
use serde_json::json;

mod support;

// ---- A ledger whose events changed shape over four versions ---------------------------------

#[derive(Default, Debug, Clone, PartialEq)]
struct Ledger {
    balance: i64,
    notes: Vec<String>,
}

#[derive(Debug, Clone)]
enum LedgerCommand {
    Credit(u64),
    Debit(u64),
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum LedgerEvent {
    /// v1 `{"amt": "5"}`, v2 `{"amount": "5"}`, v3 `{"amount": 5}`, v4 adds the currency.
    Credited {
        amount: u64,
        currency: String,
    },
    Debited {
        amount: u64,
    },
    /// v1 had no note. Binary and integer map keys, which only MessagePack keeps as they are.
    Tagged {
        tags: BTreeMap<u32, String>,
        blob: Bytes,
        note: String,
    },
}

impl DomainEvent for LedgerEvent {
    fn event_type(&self) -> &'static str {
        match self {
            LedgerEvent::Credited { .. } => "Credited",
            LedgerEvent::Debited { .. } => "Debited",
            LedgerEvent::Tagged { .. } => "Tagged",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            LedgerEvent::Credited { .. } => 4,
            LedgerEvent::Debited { .. } => 1,
            LedgerEvent::Tagged { .. } => 2,
        }
    }

    fn upcasters() -> Upcasters {
        Upcasters::new()
            // A rename.
            .step("Credited", 1, |mut v| {
                rename_field(field_mut(&mut v, "Credited")?, "amt", "amount")?;
                Ok(v)
            })
            // A changed type: the amount was a decimal string.
            .step("Credited", 2, |mut v| {
                let body = field_mut(&mut v, "Credited")?;
                let amount = take_field(body, "amount")?;
                let amount: u64 = amount.as_str().ok_or("amount is not a string")?.parse()?;
                set_field(body, "amount", amount)?;
                Ok(v)
            })
            // An added field with its default.
            .step("Credited", 3, |mut v| {
                set_field(field_mut(&mut v, "Credited")?, "currency", "EUR")?;
                Ok(v)
            })
            // A split: "Moved" is no longer written; each one reads as a debit and a credit.
            .split("Moved", 1, |mut v| {
                let amount = take_field(field_mut(&mut v, "Moved")?, "amount")?;
                Ok(vec![
                    variant("Debited", vec![("amount", amount.clone())]),
                    variant(
                        "Credited",
                        vec![("amount", amount), ("currency", Value::from("EUR"))],
                    ),
                ])
            })
            .step("Tagged", 1, |mut v| {
                set_field(field_mut(&mut v, "Tagged")?, "note", "")?;
                Ok(v)
            })
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("never refused")]
struct Never;

impl Aggregate for Ledger {
    const CATEGORY: &'static str = "ledger";
    type Command = LedgerCommand;
    type Event = LedgerEvent;
    type Error = Never;

    fn handle(&self, command: &LedgerCommand) -> Result<Vec<LedgerEvent>, Never> {
        Ok(vec![match command {
            LedgerCommand::Credit(amount) => LedgerEvent::Credited {
                amount: *amount,
                currency: "EUR".into(),
            },
            LedgerCommand::Debit(amount) => LedgerEvent::Debited { amount: *amount },
        }])
    }

    fn apply(&mut self, event: &LedgerEvent) {
        match event {
            LedgerEvent::Credited { amount, .. } => self.balance += *amount as i64,
            LedgerEvent::Debited { amount } => self.balance -= *amount as i64,
            LedgerEvent::Tagged { note, .. } => self.notes.push(note.clone()),
        }
    }
}

fn credited(amount: u64) -> LedgerEvent {
    LedgerEvent::Credited {
        amount,
        currency: "EUR".into(),
    }
}

/// A stored event of `event_type` at `schema_version`, as MessagePack (the default encoding).
fn msgpack(event_type: &str, schema_version: u32, payload: serde_json::Value) -> EventData {
    EventData::msgpack(event_type, &payload)
        .unwrap()
        .with_schema_version(schema_version)
}

/// As [`msgpack`], as JSON.
fn json(event_type: &str, schema_version: u32, payload: serde_json::Value) -> EventData {
    EventData::json(event_type, &payload)
        .unwrap()
        .with_schema_version(schema_version)
}

/// A credit of 5 in each of its four stored shapes.
fn credit_of_5_in_every_version(
    encode: fn(&str, u32, serde_json::Value) -> EventData,
) -> Vec<EventData> {
    vec![
        encode("Credited", 1, json!({"Credited": {"amt": "5"}})),
        encode("Credited", 2, json!({"Credited": {"amount": "5"}})),
        encode("Credited", 3, json!({"Credited": {"amount": 5}})),
        encode(
            "Credited",
            4,
            json!({"Credited": {"amount": 5, "currency": "EUR"}}),
        ),
    ]
}

// ---- Each kind of change, both encodings ---------------------------------------------------

#[test]
fn a_chain_renames_changes_a_type_and_adds_a_default_in_both_encodings() {
    for encode in [msgpack, json] {
        let read: Vec<LedgerEvent> = read_stored(credit_of_5_in_every_version(encode)).unwrap();
        assert_eq!(read, vec![credited(5); 4]);
    }
}

#[test]
fn a_split_reads_one_stored_event_as_two_domain_events() {
    for encode in [msgpack, json] {
        let read: Vec<LedgerEvent> =
            read_stored([encode("Moved", 1, json!({"Moved": {"amount": 7}}))]).unwrap();
        assert_eq!(read, vec![LedgerEvent::Debited { amount: 7 }, credited(7)]);
    }
}

#[test]
fn messagepack_binary_and_integer_keys_survive_an_upcast() {
    let v1 = Value::Map(vec![(
        Value::from("Tagged"),
        Value::Map(vec![
            (
                Value::from("tags"),
                Value::Map(vec![(Value::from(7u32), Value::from("seven"))]),
            ),
            (Value::from("blob"), Value::Binary(vec![0, 159, 255])),
        ]),
    )]);
    let mut bytes = Vec::new();
    upcast::rmpv::encode::write_value(&mut bytes, &v1).unwrap();
    let stored = EventData::new(
        EventType::new("Tagged").unwrap(),
        Payload::raw(ContentType::MessagePack, bytes),
    );
    let read: Vec<LedgerEvent> = read_stored([stored]).unwrap();
    assert_eq!(
        read,
        [LedgerEvent::Tagged {
            tags: BTreeMap::from([(7, "seven".to_owned())]),
            blob: Bytes::from_static(&[0, 159, 255]),
            note: String::new(),
        }]
    );
}

#[test]
fn current_events_and_unchained_types_decode_as_written() {
    let decoder = Decoder::<LedgerEvent>::new().unwrap();
    assert_eq!(decoder.current_version("Credited"), 4);
    assert_eq!(decoder.current_version("Moved"), 2);
    assert_eq!(decoder.current_version("Debited"), 1);
    let read: Vec<LedgerEvent> = read_stored([
        newton::encode(&credited(3), &Default::default()).unwrap(),
        newton::encode(&LedgerEvent::Debited { amount: 1 }, &Default::default()).unwrap(),
    ])
    .unwrap();
    assert_eq!(read, [credited(3), LedgerEvent::Debited { amount: 1 }]);
}

#[test]
fn upcast_values_are_in_the_current_shape() {
    let stored = store_as_recorded(msgpack("Credited", 1, json!({"Credited": {"amt": "9"}})));
    let values = Decoder::<LedgerEvent>::new()
        .unwrap()
        .upcast(&stored)
        .unwrap();
    assert_eq!(values.len(), 1);
    let body = &values[0]["Credited"];
    assert_eq!(body["amount"].as_u64(), Some(9));
    assert_eq!(body["currency"].as_str(), Some("EUR"));
}

/// A stored event as a read hands it back, at `account-x@0`... of category ledger.
fn store_as_recorded(data: EventData) -> RecordedEvent {
    RecordedEvent {
        stream: StreamId::parse("ledger-x").unwrap(),
        version: newton::Version(3),
        event_id: data.event_id,
        event_type: data.event_type,
        schema_version: data.schema_version,
        occurred_at: data.occurred_at,
        recorded_at: data.occurred_at,
        payload: data.payload,
        metadata: data.metadata,
        checkpoint: newton::Checkpoint::from_position("memory", 3),
    }
}

// ---- The test kit --------------------------------------------------------------------------

#[test]
fn the_test_kit_starts_from_stored_old_events() {
    let state = AggregateTest::<Ledger>::given_stored([
        msgpack("Credited", 1, json!({"Credited": {"amt": "10"}})),
        json("Moved", 1, json!({"Moved": {"amount": 4}})),
    ])
    .when(LedgerCommand::Debit(1))
    .then_expect_events([LedgerEvent::Debited { amount: 1 }]);
    assert_eq!(state.balance, 10 - 4 + 4 - 1);
}

#[test]
#[should_panic(expected = "cannot upcast event ledger-given@0 of type Credited")]
fn the_test_kit_reports_stored_events_that_do_not_read() {
    AggregateTest::<Ledger>::given_stored([msgpack(
        "Credited",
        1,
        json!({"Credited": {"amt": "ten"}}),
    )]);
}

/// Written at version 1 while its upcasters say 2: would be upcast again on every read.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Stale {
    Happened { at: u64 },
}

impl DomainEvent for Stale {
    fn event_type(&self) -> &'static str {
        "Happened"
    }

    fn upcasters() -> Upcasters {
        Upcasters::new().step("Happened", 1, Ok)
    }
}

#[derive(Default, Debug, Clone)]
struct StaleAggregate;

impl Aggregate for StaleAggregate {
    const CATEGORY: &'static str = "stale";
    type Command = ();
    type Event = Stale;
    type Error = Never;

    fn handle(&self, _: &()) -> Result<Vec<Stale>, Never> {
        Ok(vec![Stale::Happened { at: 1 }])
    }

    fn apply(&mut self, _: &Stale) {}
}

#[test]
#[should_panic(
    expected = "event Happened is written at schema version 1, but its upcasters read it at 2"
)]
fn the_test_kit_catches_a_schema_version_behind_its_chain() {
    AggregateTest::<StaleAggregate>::given_no_history()
        .when(())
        .then_expect_events([Stale::Happened { at: 1 }]);
}

// ---- Typed errors --------------------------------------------------------------------------

#[test]
fn a_newer_schema_version_than_the_code_knows_is_a_typed_error() {
    let err = read_stored::<LedgerEvent>([
        msgpack("Debited", 1, json!({"Debited": {"amount": 1}})),
        msgpack("Credited", 5, json!({"Credited": {"cents": 5}})),
    ])
    .unwrap_err();
    match &err {
        Error::UnknownSchemaVersion {
            stream,
            version,
            event_type,
            schema_version,
            known,
        } => {
            assert_eq!(stream.as_str(), "given-stored");
            assert_eq!(version.value(), 1);
            assert_eq!(event_type, "Credited");
            assert_eq!((*schema_version, *known), (5, 4));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "event given-stored@1 of type Credited has schema version 5, but this code knows versions up to 4 only: it was written by a newer release"
    );
    // A type without upcasters is at version 1.
    assert!(matches!(
        read_stored::<LedgerEvent>([msgpack("Debited", 2, json!({"Debited": {"amount": 1}}))]),
        Err(Error::UnknownSchemaVersion {
            known: 1,
            schema_version: 2,
            ..
        })
    ));
}

#[test]
fn a_failing_upcaster_is_a_typed_error_naming_the_event() {
    let err =
        read_stored::<LedgerEvent>([msgpack("Credited", 1, json!({"Credited": {"amt": "five"}}))])
            .unwrap_err();
    let Error::Upcast {
        stream,
        version,
        event_type,
        schema_version,
        source,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(
        (stream.as_str(), version.value(), event_type.as_str()),
        ("given-stored", 0, "Credited")
    );
    // Step 1 renamed; step 2 (from version 2) parses the amount and fails.
    assert_eq!(*schema_version, 2);
    assert!(source.downcast_ref::<std::num::ParseIntError>().is_some());
    assert!(err.to_string().starts_with(
        "cannot upcast event given-stored@0 of type Credited from schema version 2: "
    ));
    // A helper's refusal says what was missing.
    let err =
        read_stored::<LedgerEvent>([msgpack("Credited", 1, json!({"Credited": {}}))]).unwrap_err();
    assert!(
        matches!(&err, Error::Upcast { schema_version: 1, source, .. } if source.to_string() == "no field \"amt\""),
        "{err:?}"
    );
}

#[test]
fn schema_version_0_is_a_typed_error() {
    let err =
        read_stored::<LedgerEvent>([msgpack("Debited", 0, json!({"Debited": {}}))]).unwrap_err();
    assert!(
        matches!(&err, Error::Upcast { schema_version: 0, event_type, .. } if event_type == "Debited"),
        "{err:?}"
    );
}

#[test]
fn what_does_not_decode_after_upcasting_is_a_decode_error_naming_the_event() {
    // The upcasters succeed, the result is not a LedgerEvent.
    let err =
        read_stored::<LedgerEvent>([json("Credited", 3, json!({"Credited": {"amount": -1}}))])
            .unwrap_err();
    match &err {
        Error::Decode {
            stream,
            event_type,
            content_type,
            reason,
            ..
        } => {
            assert_eq!(
                (stream.as_str(), event_type.as_str(), content_type.as_str()),
                ("given-stored", "Credited", "application/json")
            );
            assert!(
                reason.starts_with("after upcasting from schema version 3 to 4: "),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_old_payload_that_is_not_valid_in_its_encoding_is_a_decode_error() {
    for payload in [
        Payload::raw(ContentType::MessagePack, &b"\xc1"[..]),
        Payload::raw(ContentType::Json, &b"{"[..]),
        Payload::raw(ContentType::from_mime("text/plain"), &b"5"[..]),
    ] {
        let content_type = payload.content_type.as_str().to_owned();
        let stored =
            EventData::new(EventType::new("Credited").unwrap(), payload).with_schema_version(1);
        match read_stored::<LedgerEvent>([stored]) {
            Err(Error::Decode {
                content_type: c, ..
            }) => assert_eq!(c, content_type),
            other => panic!("{content_type}: {other:?}"),
        }
    }
}

/// Each chain below is broken in one way.
macro_rules! broken_event {
    ($name:ident, $upcasters:expr) => {
        #[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
        enum $name {
            Happened,
        }
        impl DomainEvent for $name {
            fn event_type(&self) -> &'static str {
                "Happened"
            }
            fn upcasters() -> Upcasters {
                $upcasters
            }
        }
    };
}

broken_event!(
    MissingStep,
    Upcasters::new()
        .step("Happened", 1, Ok)
        .step("Happened", 3, Ok)
);
broken_event!(NotFromOne, Upcasters::new().step("Happened", 2, Ok));
broken_event!(
    TwiceFromOne,
    Upcasters::new()
        .step("Happened", 1, Ok)
        .step("Happened", 1, Ok)
);
broken_event!(FromZero, Upcasters::new().step("Happened", 0, Ok));
broken_event!(BadTypeName, Upcasters::new().step("", 1, Ok));

fn refusal<E: DomainEvent>() -> (String, String) {
    match Decoder::<E>::new() {
        Err(Error::InvalidInput { what, reason }) => (what, reason),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_broken_chain_is_refused_naming_the_type_and_the_missing_step() {
    let (what, reason) = refusal::<MissingStep>();
    assert_eq!(what, "upcasters of event type \"Happened\"");
    assert_eq!(
        reason,
        "no upcaster from schema version 2 to 3: the chain must step from 1 without gaps (steps registered from 1, 3)"
    );
    assert!(refusal::<NotFromOne>()
        .1
        .starts_with("no upcaster from schema version 1 to 2"));
    assert_eq!(
        refusal::<TwiceFromOne>().1,
        "two upcasters start at schema version 1"
    );
    assert_eq!(
        refusal::<FromZero>().1,
        "schema versions start at 1, so no upcaster starts at 0"
    );
    assert!(refusal::<BadTypeName>().0.contains("event type"));
    // Every reader refuses it, not only the decoder: the test kit and the decode helper too.
    assert!(matches!(
        read_stored::<MissingStep>([]),
        Err(Error::InvalidInput { .. })
    ));
    let any = store_as_recorded(msgpack("Happened", 1, json!("Happened")));
    assert!(matches!(
        upcast::decode::<MissingStep>(&any),
        Err(Error::InvalidInput { .. })
    ));
}

#[derive(Default, Debug, Clone)]
struct Broken;

impl Aggregate for Broken {
    const CATEGORY: &'static str = "broken";
    type Command = ();
    type Event = MissingStep;
    type Error = Never;

    fn handle(&self, _: &()) -> Result<Vec<MissingStep>, Never> {
        Ok(vec![])
    }

    fn apply(&mut self, _: &MissingStep) {}
}

#[tokio::test]
async fn a_repository_with_a_broken_chain_refuses_to_load() {
    let repository = Repository::<Broken>::new(Arc::new(MemoryStore::new()));
    assert!(matches!(
        repository.load("x").await,
        Err(Error::InvalidInput { what, .. }) if what == "upcasters of event type \"Happened\""
    ));
}

#[test]
#[should_panic(expected = "the given stored events do not read: invalid upcasters of event type")]
fn the_test_kit_refuses_a_broken_chain() {
    AggregateTest::<Broken>::given_stored([]);
}

#[test]
fn the_value_helpers_say_what_is_wrong() {
    let mut not_a_map = Value::from(5);
    assert_eq!(
        field_mut(&mut not_a_map, "a").unwrap_err().to_string(),
        "expected a map, found an integer"
    );
    let mut fields = variant("V", vec![("a", Value::from(1)), ("b", Value::from(2))]);
    let body = field_mut(&mut fields, "V").unwrap();
    assert_eq!(
        rename_field(body, "a", "b").unwrap_err().to_string(),
        "cannot rename \"a\" to \"b\": \"b\" is already there"
    );
    assert_eq!(
        take_field(body, "c").unwrap_err().to_string(),
        "no field \"c\""
    );
    assert_eq!(
        rename_field(body, "c", "d").unwrap_err().to_string(),
        "no field \"c\""
    );
    set_field(body, "a", 10).unwrap();
    rename_field(body, "a", "c").unwrap();
    assert_eq!(
        body,
        &Value::Map(vec![
            (Value::from("c"), Value::from(10)),
            (Value::from("b"), Value::from(2))
        ])
    );
    assert_eq!(
        upcast::fields_mut(&mut Value::Nil).unwrap_err().to_string(),
        "expected a map, found nil"
    );
}

// ---- On a store: load and views, on memory and every configured server ----------------------

/// Old events of one account written straight to the store, as an older release wrote them,
/// then one current event through the repository.
async fn write_history(store: &Arc<dyn EventStore>, repository: &Repository<Ledger>, id: &str) {
    let stream = repository.stream_of(id).unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![
                msgpack("Credited", 1, json!({"Credited": {"amt": "100"}})),
                json("Credited", 2, json!({"Credited": {"amount": "20"}})),
                msgpack("Moved", 1, json!({"Moved": {"amount": 30}})),
                json("Credited", 3, json!({"Credited": {"amount": 1}})),
            ],
        )
        .await
        .unwrap();
    repository
        .execute(id, &LedgerCommand::Debit(6))
        .await
        .unwrap();
}

/// The balance per account, from events decoded through the upcasters; the accounts of `run`
/// only, since a server's category holds earlier runs too.
struct Balances {
    run: String,
}

#[async_trait]
impl View for Balances {
    type State = BTreeMap<String, i64>;

    fn name(&self) -> &str {
        &self.run
    }

    fn categories(&self) -> Vec<Category> {
        vec![Category::new(Ledger::CATEGORY).unwrap()]
    }

    async fn handle(&self, state: &mut Self::State, event: &RecordedEvent) -> Result<(), BoxError> {
        if !event.stream.id().starts_with(&self.run) {
            return Ok(());
        }
        for decoded in upcast::decode::<LedgerEvent>(event)? {
            let balance = state.entry(event.stream.id().to_owned()).or_default();
            match decoded {
                LedgerEvent::Credited { amount, .. } => *balance += amount as i64,
                LedgerEvent::Debited { amount } => *balance -= amount as i64,
                LedgerEvent::Tagged { .. } => {}
            }
        }
        Ok(())
    }
}

async fn old_events_load_and_reach_views_upcast(store: Arc<dyn EventStore>) {
    let run = format!("u{}", newton::Uuid::new_v4().simple());
    let repository = Repository::<Ledger>::new(store.clone());
    let (a, b) = (format!("{run}-a"), format!("{run}-b"));
    write_history(&store, &repository, &a).await;
    write_history(&store, &repository, &b).await;
    let expected = 100 + 20 - 30 + 30 + 1 - 6;
    let loaded = repository.load(&a).await.unwrap();
    assert_eq!(loaded.state.balance, expected);
    // Five stored events (the split one counts once), the last written by the repository.
    assert_eq!(loaded.version.map(|v| v.value()), Some(4));

    let runner = ViewRunner::new(store.clone(), Arc::new(InMemoryCheckpointStore::default()));
    let balances = runner.start(Balances { run: run.clone() }).unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        balances.wait_until(|s| s.len() == 2 && s.values().all(|b| *b == expected)),
    )
    .await
    .expect("the view sees both accounts in time")
    .unwrap();
    balances.stop().await.unwrap();
}

#[tokio::test]
async fn old_events_load_and_reach_views_upcast_on_memory() {
    old_events_load_and_reach_views_upcast(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn old_events_load_and_reach_views_upcast_on_servers() {
    for (backend, url) in support::servers() {
        println!("on {backend}");
        let store = newton::connect(&url).await.unwrap();
        old_events_load_and_reach_views_upcast(store).await;
    }
}

#[tokio::test]
async fn a_newer_event_stops_the_load_and_the_view_with_a_typed_error() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let repository = Repository::<Ledger>::new(store.clone());
    let run = format!("u{}", newton::Uuid::new_v4().simple());
    let id = format!("{run}-a");
    let stream = repository.stream_of(&id).unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![
                msgpack("Debited", 1, json!({"Debited": {"amount": 1}})),
                msgpack("Credited", 9, json!({"Credited": {"cents": 1}})),
            ],
        )
        .await
        .unwrap();
    match repository.load(&id).await {
        Err(Error::UnknownSchemaVersion {
            stream: s,
            version,
            schema_version: 9,
            known: 4,
            ..
        }) => {
            assert_eq!(s, stream);
            assert_eq!(version.value(), 1);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        repository.execute(&id, &LedgerCommand::Credit(1)).await,
        Err(newton::ExecuteError::Store(
            Error::UnknownSchemaVersion { .. }
        ))
    ));

    let runner = ViewRunner::new(store.clone(), Arc::new(InMemoryCheckpointStore::default()));
    let balances = runner.start(Balances { run }).unwrap();
    assert!(matches!(
        balances.wait_until_live().await,
        Err(ViewError::Failed { .. })
    ));
    let ViewStatus::Failed(failure) = balances.status() else {
        panic!("{:?}", balances.status())
    };
    // A stored event the code cannot read never changes, so the view stops with `Decode`
    // (not retried, not a handler failure) naming the event.
    let ViewError::Decode { source, .. } = &*failure else {
        panic!("{failure:?}")
    };
    let Error::UnknownSchemaVersion {
        version,
        schema_version: 9,
        ..
    } = source
    else {
        panic!("{source:?}")
    };
    assert_eq!(version.value(), 1);
}

#[test]
#[should_panic(
    expected = "the event type's upcasters are refused: invalid upcasters of event type"
)]
fn then_expect_events_refuses_a_broken_chain() {
    AggregateTest::<Broken>::given_no_history()
        .when(())
        .then_expect_events([]);
}

/// Its one step makes a map with a nil key, which JSON cannot hold.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum NilKey {
    Happened,
}

impl DomainEvent for NilKey {
    fn event_type(&self) -> &'static str {
        "Happened"
    }

    fn upcasters() -> Upcasters {
        Upcasters::new().step("Happened", 1, |_| {
            Ok(Value::Map(vec![(Value::Nil, Value::from(1))]))
        })
    }
}

#[test]
fn an_upcast_value_that_its_encoding_cannot_hold_is_a_decode_error() {
    let err = read_stored::<NilKey>([json("Happened", 1, json!("Happened"))]).unwrap_err();
    assert!(
        matches!(&err, Error::Decode { reason, content_type, .. }
            if content_type == "application/json" && reason.starts_with("after upcasting from schema version 1 to 2: ")),
        "{err:?}"
    );
}

#[test]
fn a_current_event_upcasts_to_its_own_payload() {
    let current = store_as_recorded(newton::encode(&credited(2), &Default::default()).unwrap());
    let values = Decoder::<LedgerEvent>::new()
        .unwrap()
        .upcast(&current)
        .unwrap();
    assert_eq!(
        values,
        [variant(
            "Credited",
            [("amount", Value::from(2)), ("currency", Value::from("EUR"))]
        )]
    );
}

#[tokio::test]
async fn an_event_written_behind_its_chain_is_refused_before_the_store() {
    let err = newton::encode(&Stale::Happened { at: 1 }, &Default::default()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { what, reason }
            if what == "event of type \"Happened\""
                && reason == "schema_version() is 1, but the type's upcasters read it at 2"),
        "{err:?}"
    );
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let repository = Repository::<StaleAggregate>::new(store.clone());
    assert!(matches!(
        repository.execute("x", &()).await,
        Err(newton::ExecuteError::Store(Error::InvalidInput { .. }))
    ));
    let stream = repository.stream_of("x").unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), None);
}
