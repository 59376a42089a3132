//! A small bank on Newton: two aggregates (accounts and transfers), a process manager that moves
//! the money of a transfer, three views (one of them typed, with a dead-letter policy), a
//! side-by-side view version and a rebuild. Runs on the
//! in-memory store by default; the same code runs on any backend compiled in, chosen by
//! `PHOTON_URL`.
//!
//! ```text
//! cargo run --example bank
//! ```
//!
//! With `--metrics-addr 127.0.0.1:9000` it also serves its metrics (photon's appends, latencies
//! and lags, newton's view lag) for Prometheus at `http://127.0.0.1:9000/metrics`, and keeps
//! serving them after its run until interrupted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use newton::store::{EventData, ExpectedVersion, Timestamp};
use newton::upcast::{self, Upcasters};
use newton::{
    Aggregate, AggregateView, BoxError, Category, CommandContext, DomainEvent, Envelope,
    EventStoreCheckpointStore, ExecuteError, FailurePolicy, ProcessManager, ProcessRunner,
    RecordedEvent, Repository, SnapshotPolicy, Steps, Uuid, View, ViewRunner,
};
use serde::{Deserialize, Serialize};

// ---- The aggregate -------------------------------------------------------------------------

/// One bank account. Balances are whole cents, never negative. Serializable, so that the
/// repository can keep snapshots of it.
#[derive(Default, Debug, Clone, Serialize, Deserialize)]
struct Account {
    open: bool,
    closed: bool,
    balance: u64,
}

#[derive(Debug, Clone)]
enum AccountCommand {
    Open { owner: String },
    Deposit { amount: u64 },
    Withdraw { amount: u64 },
    Close,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum AccountEvent {
    Opened { owner: String },
    Deposited { amount: u64 },
    Withdrawn { amount: u64 },
    Closed,
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened { .. } => "AccountOpened",
            AccountEvent::Deposited { .. } => "MoneyDeposited",
            AccountEvent::Withdrawn { .. } => "MoneyWithdrawn",
            AccountEvent::Closed => "AccountClosed",
        }
    }

    /// Older releases recorded an account opened with a first deposit as one event; it reads
    /// as the two events recorded today. The repository and the views read it the same way.
    fn upcasters() -> Upcasters {
        Upcasters::new().split("AccountOpenedWithDeposit", 1, |mut v| {
            let old = upcast::field_mut(&mut v, "OpenedWithDeposit")?;
            let (owner, amount) = (
                upcast::take_field(old, "owner")?,
                upcast::take_field(old, "amount")?,
            );
            Ok(vec![
                upcast::variant("Opened", [("owner", owner)]),
                upcast::variant("Deposited", [("amount", amount)]),
            ])
        })
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum AccountError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("amounts must be positive")]
    ZeroAmount,
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds { balance: u64, requested: u64 },
    #[error("the balance must be zero to close, it is {0}")]
    NotEmpty(u64),
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        use AccountCommand::*;
        match command {
            Open { .. } if self.open || self.closed => Err(AccountError::AlreadyOpen),
            Open { owner } => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
            }]),
            _ if !self.open => Err(AccountError::NotOpen),
            Deposit { amount: 0 } | Withdraw { amount: 0 } => Err(AccountError::ZeroAmount),
            Deposit { amount } => Ok(vec![AccountEvent::Deposited { amount: *amount }]),
            Withdraw { amount } if *amount > self.balance => Err(AccountError::InsufficientFunds {
                balance: self.balance,
                requested: *amount,
            }),
            Withdraw { amount } => Ok(vec![AccountEvent::Withdrawn { amount: *amount }]),
            Close if self.balance > 0 => Err(AccountError::NotEmpty(self.balance)),
            Close => Ok(vec![AccountEvent::Closed]),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { .. } => self.open = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
            AccountEvent::Closed => {
                self.open = false;
                self.closed = true;
            }
        }
    }
}

// ---- Views ---------------------------------------------------------------------------------

fn accounts() -> Vec<Category> {
    vec![Category::new(Account::CATEGORY).expect("valid category")]
}

/// Balance per account. Idempotent: remembers the last version applied per account.
struct Balances;

#[derive(Default, Serialize, Deserialize)]
struct BalanceRow {
    owner: String,
    balance: u64,
    version: u64,
}

#[async_trait::async_trait]
impl View for Balances {
    type State = BTreeMap<String, BalanceRow>;

    fn name(&self) -> &str {
        "balances-v1"
    }

    fn categories(&self) -> Vec<Category> {
        accounts()
    }

    async fn handle(&self, state: &mut Self::State, event: &RecordedEvent) -> Result<(), BoxError> {
        // Upcast (an old event may read as several) before any change: a failure changes nothing.
        let decoded = upcast::decode::<AccountEvent>(event)?;
        let row = state.entry(event.stream.id().to_owned()).or_default();
        if event.version.value() < row.version {
            return Ok(()); // already applied (at-least-once delivery)
        }
        row.version = event.version.value() + 1;
        for decoded in decoded {
            match decoded {
                AccountEvent::Opened { owner } => row.owner = owner,
                AccountEvent::Deposited { amount } => row.balance += amount,
                AccountEvent::Withdrawn { amount } => row.balance -= amount,
                AccountEvent::Closed => {}
            }
        }
        Ok(())
    }
}

/// Version 2 of the balances view: also flags low balances. Runs beside v1 during a migration,
/// with its own checkpoint, replaying from the beginning.
struct BalancesV2;

#[derive(Default, Serialize, Deserialize)]
struct BalancesV2State {
    rows: BTreeMap<String, BalanceRow>,
    low: Vec<String>,
}

#[async_trait::async_trait]
impl View for BalancesV2 {
    type State = BalancesV2State;

    fn name(&self) -> &str {
        "balances-v2"
    }

    fn categories(&self) -> Vec<Category> {
        accounts()
    }

    async fn handle(&self, state: &mut Self::State, event: &RecordedEvent) -> Result<(), BoxError> {
        Balances.handle(&mut state.rows, event).await?;
        state.low = state
            .rows
            .iter()
            .filter(|(_, r)| r.balance < 100)
            .map(|(id, _)| id.clone())
            .collect();
        Ok(())
    }
}

/// Money movements: counts, volume and completed transfers (two events sharing a correlation id).
/// A typed view: it gets account events decoded and upcast (a v1 `AccountOpenedWithDeposit`
/// arrives as `Opened` then `Deposited`), with their stream, time and metadata beside them.
struct Activity;

#[derive(Default, Serialize, Deserialize)]
struct ActivityState {
    deposits: u64,
    withdrawals: u64,
    volume: u64,
    /// The accounts each transfer (correlation id) touched; two accounts: completed.
    transfer_legs: BTreeMap<Uuid, BTreeSet<String>>,
    last_event_at: Option<Timestamp>,
}

#[async_trait::async_trait]
impl AggregateView for Activity {
    type Aggregate = Account;
    type State = ActivityState;

    fn name(&self) -> &str {
        "activity-v1"
    }

    /// An event this view cannot count (say, a newer release's event type) is set aside in
    /// `newton_deadletter-activity-v1` after two more tries, instead of stopping the view.
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::park().with_retries(2, std::time::Duration::from_millis(100))
    }

    async fn handle(
        &self,
        state: &mut Self::State,
        event: &Envelope<'_, AccountEvent>,
    ) -> Result<(), BoxError> {
        match event.event {
            AccountEvent::Deposited { amount } => {
                state.deposits += 1;
                state.volume += amount;
            }
            AccountEvent::Withdrawn { amount } => {
                state.withdrawals += 1;
                state.volume += amount;
            }
            _ => {}
        }
        if let Some(transfer) = event.metadata().correlation_id {
            let legs = state.transfer_legs.entry(transfer).or_default();
            legs.insert(event.id().to_owned());
        }
        state.last_event_at = Some(event.recorded_at());
        Ok(())
    }
}

// ---- Transfers: an aggregate and the process manager that carries them out --------------------

/// A request to move money, and how it ended. Its stream is `transfer-<id>`; the id is also the
/// correlation id of every event the transfer causes, in both accounts.
#[derive(Default, Debug, Clone)]
struct Transfer {
    requested: bool,
    ended: bool,
    /// Failed after the debit: the source is owed its money back.
    refund_owed: bool,
}

#[derive(Debug, Clone)]
enum TransferCommand {
    Request {
        from: String,
        to: String,
        amount: u64,
    },
    Complete,
    Fail {
        reason: String,
        refunded: bool,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum TransferEvent {
    Requested {
        from: String,
        to: String,
        amount: u64,
    },
    Completed,
    Failed {
        reason: String,
        refunded: bool,
    },
}

impl DomainEvent for TransferEvent {
    fn event_type(&self) -> &'static str {
        match self {
            TransferEvent::Requested { .. } => "TransferRequested",
            TransferEvent::Completed => "TransferCompleted",
            TransferEvent::Failed { .. } => "TransferFailed",
        }
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum TransferError {
    #[error("the transfer was already requested")]
    AlreadyRequested,
    #[error("the transfer was not requested, or has ended")]
    NotInProgress,
    #[error("a transfer moves a positive amount between two accounts")]
    Invalid,
}

impl Aggregate for Transfer {
    const CATEGORY: &'static str = "transfer";
    type Command = TransferCommand;
    type Event = TransferEvent;
    type Error = TransferError;

    fn handle(&self, command: &TransferCommand) -> Result<Vec<TransferEvent>, TransferError> {
        match command {
            TransferCommand::Request { .. } if self.requested => {
                Err(TransferError::AlreadyRequested)
            }
            TransferCommand::Request { from, to, amount } if *amount == 0 || from == to => {
                Err(TransferError::Invalid)
            }
            TransferCommand::Request { from, to, amount } => Ok(vec![TransferEvent::Requested {
                from: from.clone(),
                to: to.clone(),
                amount: *amount,
            }]),
            _ if !self.requested || self.ended => Err(TransferError::NotInProgress),
            TransferCommand::Complete => Ok(vec![TransferEvent::Completed]),
            TransferCommand::Fail { reason, refunded } => Ok(vec![TransferEvent::Failed {
                reason: reason.clone(),
                refunded: *refunded,
            }]),
        }
    }

    fn apply(&mut self, event: &TransferEvent) {
        match event {
            TransferEvent::Requested { .. } => self.requested = true,
            TransferEvent::Completed => self.ended = true,
            TransferEvent::Failed { refunded, .. } => {
                self.ended = true;
                self.refund_owed = *refunded;
            }
        }
    }
}

/// Carries out requested transfers: debits the source, then credits the target; when the credit
/// is refused (the target is closed, say), refunds the source. It reacts to `TransferRequested`
/// events, so a transfer requested while it was down, or interrupted by a crash between the
/// legs, is carried on when it starts again: each leg is a step whose event ids derive from the
/// request's id, so a leg stored before the crash is found, not done twice.
struct TransferProcess {
    accounts: Repository<Account>,
    transfers: Repository<Transfer>,
}

/// What the process remembers of one transfer.
#[derive(Default, Serialize, Deserialize)]
struct TransferProgress {
    outcome: String,
}

#[async_trait::async_trait]
impl ProcessManager for TransferProcess {
    type State = TransferProgress;

    fn name(&self) -> &str {
        "transfers-v1"
    }

    fn categories(&self) -> Vec<Category> {
        vec![Category::new(Transfer::CATEGORY).expect("valid category")]
    }

    async fn handle(
        &self,
        progress: &mut TransferProgress,
        event: &RecordedEvent,
        steps: &mut Steps,
    ) -> Result<(), BoxError> {
        let Some(TransferEvent::Requested { from, to, amount }) =
            upcast::decode::<TransferEvent>(event)?.pop()
        else {
            return Ok(()); // its own Completed and Failed, which end nothing new
        };
        let transfer = event.stream.id().to_owned();
        let (debit, credit) = (
            AccountCommand::Withdraw { amount },
            AccountCommand::Deposit { amount },
        );
        // Handled again after a crash, a step refused the first time would be decided again, on
        // the accounts as they are now: once the transfer has an outcome, only its refund (an
        // idempotent step, a no-op when it was stored) may still be due, so the legs are not run
        // again and the outcome stays the one recorded.
        let recorded = self.transfers.load(&transfer).await?.state;
        if recorded.ended {
            if recorded.refund_owed {
                steps
                    .execute("refund", &self.accounts, &from, &credit)
                    .await?;
            }
            steps.finish();
            return Ok(());
        }
        // An error other than a refusal (the store unavailable) is returned as it is: the runner
        // handles the request again, and the steps already stored are not repeated.
        if let Err(e) = steps.execute("debit", &self.accounts, &from, &debit).await {
            let ExecuteError::Rejected { source, .. } = e else {
                return Err(e.into());
            };
            progress.outcome = format!("refused by {from} ({source})");
            let fail = TransferCommand::Fail {
                reason: source.to_string(),
                refunded: false,
            };
            steps
                .execute("fail", &self.transfers, &transfer, &fail)
                .await?;
            steps.finish();
            return Ok(());
        }
        match steps.execute("credit", &self.accounts, &to, &credit).await {
            Ok(_) => {
                progress.outcome = "completed".into();
                let complete = TransferCommand::Complete;
                steps
                    .execute("complete", &self.transfers, &transfer, &complete)
                    .await?;
            }
            // Refused: nothing landed on the target, so give the money back to the source. The
            // failure is recorded first: from then on the outcome is fixed (a crash before the
            // refund is carried on by the check above), and a credit decided again after a crash
            // can no longer land beside a refund.
            Err(ExecuteError::Rejected { source, .. }) => {
                let fail = TransferCommand::Fail {
                    reason: source.to_string(),
                    refunded: true,
                };
                steps
                    .execute("fail", &self.transfers, &transfer, &fail)
                    .await?;
                steps
                    .execute("refund", &self.accounts, &from, &credit)
                    .await?;
                progress.outcome = format!("refused by {to} ({source}), refunded to {from}");
            }
            // Unknown outcome: the credit may have landed, so never refund blindly; handled
            // again, the step finds out.
            Err(e) => return Err(e.into()),
        }
        steps.finish();
        Ok(())
    }
}

// ---- The application -----------------------------------------------------------------------

/// Requests a transfer: one event, which the transfer process reacts to. Returns its id.
async fn request_transfer(
    transfers: &Repository<Transfer>,
    from: &str,
    to: &str,
    amount: u64,
) -> Result<Uuid, ExecuteError<TransferError>> {
    let transfer_id = Uuid::now_v7();
    let context = CommandContext {
        correlation_id: Some(transfer_id),
        headers: vec![("transfer".into(), format!("{from}->{to}"))],
        ..CommandContext::default()
    };
    let request = TransferCommand::Request {
        from: from.into(),
        to: to.into(),
        amount,
    };
    transfers
        .execute_with(&transfer_id.simple().to_string(), &request, &context)
        .await?;
    Ok(transfer_id)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let metrics_addr = metrics_addr()?;
    if let Some(addr) = metrics_addr {
        // Installed before the store is connected and the views start, so every metric of the
        // run is recorded.
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()?;
        newton::store::telemetry::describe();
    }
    let url = std::env::var(newton::URL_VARIABLE).unwrap_or_else(|_| newton::DEFAULT_URL.into());
    let store = newton::connect(&url).await?;
    println!(
        "connected to {} ({})",
        store.backend(),
        store.health().await?.detail
    );

    // Fresh account ids per run, so the example runs again and again on a persistent backend.
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let id = |name: &str| format!("{name}-{run}");
    let (ada, bob, cy) = (id("ada"), id("bob"), id("cy"));
    // A snapshot every 3 events: tiny, so that this short run takes some (a real account would
    // take one every few hundred); loads then read the latest one and the events after it.
    let accounts =
        Repository::<Account>::new(store.clone()).with_snapshots(SnapshotPolicy::EveryEvents(3));
    let transfers = Repository::<Transfer>::new(store.clone());
    // Views and processes keep their positions in the store too, so both resume after a restart.
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let transfer_process =
        ProcessRunner::new(store.clone(), checkpoints.clone()).start(TransferProcess {
            accounts: accounts.clone(),
            transfers: transfers.clone(),
        })?;

    println!("\n== commands");
    for (account, owner) in [(&ada, "Ada"), (&bob, "Bob"), (&cy, "Cy")] {
        accounts
            .execute(
                account,
                &AccountCommand::Open {
                    owner: owner.into(),
                },
            )
            .await?;
        println!("opened {account} for {owner}");
    }
    accounts
        .execute(&ada, &AccountCommand::Deposit { amount: 500 })
        .await?;
    accounts
        .execute(&bob, &AccountCommand::Deposit { amount: 120 })
        .await?;
    let done = accounts
        .execute(&ada, &AccountCommand::Withdraw { amount: 80 })
        .await?;
    println!(
        "ada: deposit 500, withdraw 80 -> balance {} at version {:?}",
        done.state.balance, done.version
    );
    let t = request_transfer(&transfers, &ada, &bob, 150).await?;
    let done = transfer_process.wait_until_finished(t).await?;
    println!("transfer {t}: 150 from {ada} to {bob}: {}", done.outcome);
    match accounts
        .execute(&cy, &AccountCommand::Withdraw { amount: 1 })
        .await
    {
        Err(ExecuteError::Rejected { source, .. }) => {
            println!("cy withdraws 1: refused ({source})")
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }

    // Two clients deposit into one account at once: the store's version check makes one of
    // them reload and decide again; both deposits land.
    let (a, b) = (accounts.clone(), accounts.clone());
    let (ra, rb) = tokio::join!(
        a.execute(&cy, &AccountCommand::Deposit { amount: 30 }),
        b.execute(&cy, &AccountCommand::Deposit { amount: 40 })
    );
    println!(
        "concurrent deposits to {cy}: both landed (attempts {} and {}; a loser reloads and retries), balance now {}",
        ra?.attempts,
        rb?.attempts,
        accounts.load(&cy).await?.state.balance
    );
    match accounts.execute(&cy, &AccountCommand::Close).await {
        Err(ExecuteError::Rejected { source, .. }) => println!("close {cy}: refused ({source})"),
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }

    // A transfer to a closed account: the debit lands, the credit is refused, the process
    // refunds the source. Its two events in ada's account share the transfer's correlation id.
    let eve = id("eve");
    for command in [
        AccountCommand::Open {
            owner: "Eve".into(),
        },
        AccountCommand::Close,
    ] {
        accounts.execute(&eve, &command).await?;
    }
    let t = request_transfer(&transfers, &ada, &eve, 20).await?;
    let done = transfer_process.wait_until_finished(t).await?;
    println!(
        "transfer {t}: 20 from {ada} to closed {eve}: {}",
        done.outcome
    );

    // An account as an older release stored it: one event of a type no longer written, at
    // schema version 1, appended as it was. The upcaster reads it as Opened + Deposited.
    let dee = id("dee");
    let v1 = EventData::msgpack(
        "AccountOpenedWithDeposit",
        &serde_json::json!({"OpenedWithDeposit": {"owner": "Dee", "amount": 25}}),
    )?
    .with_schema_version(1);
    let dee_stream = accounts.stream_of(&dee)?;
    store
        .append(&dee_stream, ExpectedVersion::NoStream, vec![v1])
        .await?;
    let loaded = accounts.load(&dee).await?;
    println!(
        "{dee}: a v1 AccountOpenedWithDeposit in the store reads as Opened + Deposited: open {}, balance {}",
        loaded.state.open, loaded.state.balance
    );

    println!("\n== views (replaying history, then live)");
    let runner = ViewRunner::new(store.clone(), checkpoints.clone());
    let balances = runner.start(Balances)?;
    let activity = runner.start_typed(Activity)?;
    balances.wait_until_live().await?;
    activity.wait_until_live().await?;
    print_balances("balances-v1", &balances.read(|s| render(s, &run)).await);

    // A live event reaches the views without a restart.
    let volume_before = activity.read(|s| s.volume).await;
    accounts
        .execute(&bob, &AccountCommand::Withdraw { amount: 200 })
        .await?;
    let bob_id = bob.clone();
    balances
        .wait_until(|s| s.get(&bob_id).is_some_and(|r| r.balance == 70))
        .await?;
    println!(
        "live: bob withdrew 200 -> balances-v1 shows {}",
        balances.read(|s| s[&bob].balance).await
    );
    // Every view follows on its own schedule: wait for this one to see the withdrawal too.
    activity
        .wait_until(|s| s.volume >= volume_before + 200)
        .await?;
    let parked = activity.parked();
    activity
        .read(|s| {
            let transfers = s.transfer_legs.values().filter(|legs| legs.len() == 2).count();
            println!(
                "activity-v1: {} deposits, {} withdrawals, volume {}, {} completed transfer(s), last event at {}, {} event(s) parked",
                s.deposits,
                s.withdrawals,
                s.volume,
                transfers,
                s.last_event_at.map(|t| t.to_string()).unwrap_or_default(),
                parked
            )
        })
        .await;

    println!("\n== balances-v2 beside balances-v1 (a migration)");
    let v2 = runner.start(BalancesV2)?;
    v2.wait_until_live().await?;
    let low = v2
        .read(|s| {
            s.low
                .iter()
                .filter(|id| id.ends_with(&run))
                .cloned()
                .collect::<Vec<_>>()
        })
        .await;
    print_balances("balances-v2", &v2.read(|s| render(&s.rows, &run)).await);
    println!("balances-v2 low balances: {low:?}");

    println!("\n== rebuild balances-v1 from scratch");
    let before = balances.read(|s| render(s, &run)).await;
    let handled_before = balances.handled();
    balances.rebuild().await?;
    let after = balances.read(|s| render(s, &run)).await;
    println!(
        "rebuilt: {} events replayed, same balances: {}",
        balances.handled() - handled_before,
        before == after
    );
    if before != after {
        return Err("a rebuild changed the balances".into());
    }

    println!("\n== restart: views resume from their saved checkpoints");
    balances.stop().await?;
    activity.stop().await?;
    v2.stop().await?;
    let restarted = ViewRunner::new(store.clone(), checkpoints).start(Balances)?;
    restarted.wait_until_live().await?;
    println!(
        "balances-v1 restarted: {} events handled after resuming, balances equal: {}",
        restarted.handled(),
        restarted.read(|s| render(s, &run)).await == after
    );
    restarted.stop().await?;
    transfer_process.stop().await?;
    if let Some(addr) = metrics_addr {
        println!("\nmetrics: serving http://{addr}/metrics until interrupted");
        std::future::pending::<()>().await;
    }
    Ok(())
}

/// The address given with `--metrics-addr ADDR` (or `--metrics-addr=ADDR`), if any.
fn metrics_addr() -> Result<Option<std::net::SocketAddr>, Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(arg) = args.next() else {
        return Ok(None);
    };
    let value = match arg.strip_prefix("--metrics-addr") {
        Some("") => args.next(),
        Some(v) if v.starts_with('=') => Some(v[1..].to_owned()),
        _ => None,
    };
    let value = value.ok_or_else(|| {
        format!("unexpected {arg:?}: the one option is --metrics-addr ADDR, e.g. 127.0.0.1:9000")
    })?;
    if let Some(extra) = args.next() {
        return Err(format!("unexpected {extra:?} after --metrics-addr {value}").into());
    }
    let addr = value
        .parse()
        .map_err(|e| format!("--metrics-addr {value:?}: {e}"))?;
    Ok(Some(addr))
}

fn render(rows: &BTreeMap<String, BalanceRow>, run: &str) -> Vec<(String, String, u64)> {
    rows.iter()
        .filter(|(id, _)| id.ends_with(run))
        .map(|(id, r)| (id.clone(), r.owner.clone(), r.balance))
        .collect()
}

fn print_balances(view: &str, rows: &[(String, String, u64)]) {
    for (id, owner, balance) in rows {
        println!("{view}: {id:<14} {owner:<4} {balance:>5}");
    }
}
