//! The one domain every workload uses: bank accounts receiving deposits.
//!
//! Every subject (photon on each backend, the raw clients, the bare loop, cqrs-es) writes and
//! reads the same MessagePack payloads, so the figures differ only by what sits between the
//! application and the bytes.

use std::collections::HashMap;

use bytes::Bytes;
use newton::store::{ContentType, EventData, EventType, Payload};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Accounts the events are spread over: enough for the view's map to matter, few enough to
/// stay in cache as a real view's hot set would.
pub const ACCOUNTS: u64 = 1_000;

/// The event type name of [`Deposited`].
pub const EVENT_TYPE: &str = "Deposited";

/// A deposit: the payload of every benchmark event, about 100 bytes as MessagePack with field
/// names (the encoding newton uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deposited {
    /// Which account.
    pub account: u64,
    /// Cents.
    pub amount: i64,
    /// Free text, random so that payloads do not compress or repeat.
    pub reference: String,
}

impl Deposited {
    /// A random deposit.
    pub fn random(rng: &mut impl Rng) -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let reference = (0..64)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        Self {
            account: rng.random_range(0..ACCOUNTS),
            amount: rng.random_range(1..100_000),
            reference,
        }
    }

    /// The MessagePack bytes, as newton's `Payload::msgpack` writes them.
    pub fn encode(&self) -> Bytes {
        Bytes::from(rmp_serde::to_vec_named(self).expect("a plain struct encodes"))
    }
}

/// `n` freshly encoded random payloads, each its own allocation as a store would hold them.
pub fn payloads(n: usize) -> Vec<Bytes> {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| Deposited::random(&mut rng).encode())
        .collect()
}

/// An event carrying `payload`, with a fresh id, as an application hands it to `append`.
pub fn event(payload: Bytes) -> EventData {
    EventData::new(
        EventType::new(EVENT_TYPE).expect("a valid type name"),
        Payload::raw(ContentType::MessagePack, payload),
    )
}

/// A read model: the balance of every account. Replays fold into it, decoding every payload.
#[derive(Debug, Default)]
pub struct Balances {
    balances: HashMap<u64, i64>,
    events: u64,
}

impl Balances {
    /// Decodes one payload and applies it.
    ///
    /// # Errors
    /// - The decoder's error when the bytes are not a [`Deposited`].
    pub fn apply_bytes(&mut self, payload: &[u8]) -> Result<(), rmp_serde::decode::Error> {
        let d: Deposited = rmp_serde::from_slice(payload)?;
        self.apply(&d);
        Ok(())
    }

    /// Applies a decoded deposit.
    pub fn apply(&mut self, d: &Deposited) {
        *self.balances.entry(d.account).or_default() += d.amount;
        self.events += 1;
    }

    /// Events applied so far.
    pub fn events(&self) -> u64 {
        self.events
    }
}

/// A deposit command, for the command workload (newton and cqrs-es alike).
#[derive(Clone, Debug)]
pub struct Deposit {
    /// The account's number (also its id).
    pub account: u64,
    /// Cents; must be positive.
    pub amount: i64,
    /// Carried into the event.
    pub reference: String,
}

/// Why an account refuses a deposit.
#[derive(Debug, thiserror::Error)]
#[error("deposit of {amount} refused: amounts must be positive")]
pub struct Refused {
    /// The amount asked for.
    pub amount: i64,
}

/// The event-sourced account: the same decisions under newton and under cqrs-es.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Account {
    balance: i64,
    deposits: u64,
}

impl Account {
    fn decide(command: &Deposit) -> Result<Vec<Deposited>, Refused> {
        if command.amount <= 0 {
            return Err(Refused {
                amount: command.amount,
            });
        }
        Ok(vec![Deposited {
            account: command.account,
            amount: command.amount,
            reference: command.reference.clone(),
        }])
    }

    fn evolve(&mut self, event: &Deposited) {
        self.balance += event.amount;
        self.deposits += 1;
    }

    /// Deposits applied, for checking that loads rebuilt everything.
    pub fn deposits(&self) -> u64 {
        self.deposits
    }
}

impl newton::DomainEvent for Deposited {
    fn event_type(&self) -> &'static str {
        EVENT_TYPE
    }
}

impl newton::Aggregate for Account {
    const CATEGORY: &'static str = "benchaccount";
    type Command = Deposit;
    type Event = Deposited;
    type Error = Refused;

    fn handle(&self, command: &Deposit) -> Result<Vec<Deposited>, Refused> {
        Self::decide(command)
    }

    fn apply(&mut self, event: &Deposited) {
        self.evolve(event);
    }
}

impl cqrs_es::DomainEvent for Deposited {
    fn event_type(&self) -> String {
        EVENT_TYPE.into()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

#[async_trait::async_trait]
impl cqrs_es::Aggregate for Account {
    type Command = Deposit;
    type Event = Deposited;
    type Error = Refused;
    type Services = ();

    fn aggregate_type() -> String {
        "benchaccount".into()
    }

    async fn handle(&self, command: Deposit, _: &()) -> Result<Vec<Deposited>, Refused> {
        Self::decide(&command)
    }

    fn apply(&mut self, event: Deposited) {
        self.evolve(&event);
    }
}
