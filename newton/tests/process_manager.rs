//! Process managers: a transfer (debit, credit, refund when the credit is refused) completes
//! once, compensates once, survives redelivery, a deadline, a store outage and a real process
//! kill; execute_once takes another node's copy of a command from the store; a deadline set
//! again at its time does not spin; a panicking handler fails the process; bad input is a typed
//! error. On memory, and on every server configured (see `support::servers`).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use newton::store::{
    AppendResult, Capabilities, EventData, EventStore, ExpectedVersion, Health, ReadOptions,
    Selector, Start, SubscriptionItem, SubscriptionMode,
};
use newton::{
    command_event_id, process_stream, Aggregate, BoxError, Category, CheckpointStore,
    CommandContext, DomainEvent, Error, EventStoreCheckpointStore, ExecuteError,
    InMemoryCheckpointStore, ProcessError, ProcessManager, ProcessOptions, ProcessRunner,
    ProcessStatus, RecordedEvent, Repository, Steps, Uuid,
};
use serde::{Deserialize, Serialize};
use support::fresh_id;

// ---- An account, as in the bank example --------------------------------------------------

#[derive(Default, Debug, Clone)]
struct Account {
    open: bool,
    closed: bool,
    balance: u64,
}

#[derive(Debug, Clone)]
enum AccountCommand {
    Open,
    Deposit(u64),
    Withdraw(u64),
    /// Two withdrawals of half the amount each, in one batch.
    WithdrawInHalves(u64),
    Close,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum AccountEvent {
    Opened,
    Deposited { amount: u64 },
    Withdrawn { amount: u64 },
    Closed,
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened => "Opened",
            AccountEvent::Deposited { .. } => "Deposited",
            AccountEvent::Withdrawn { .. } => "Withdrawn",
            AccountEvent::Closed => "Closed",
        }
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum AccountError {
    #[error("not open")]
    NotOpen,
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("not empty")]
    NotEmpty,
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "pm_account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open => Ok(vec![AccountEvent::Opened]),
            _ if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit(amount) => {
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
            AccountCommand::Withdraw(amount) if *amount > self.balance => {
                Err(AccountError::InsufficientFunds)
            }
            AccountCommand::Withdraw(amount) => {
                Ok(vec![AccountEvent::Withdrawn { amount: *amount }])
            }
            AccountCommand::WithdrawInHalves(amount) if *amount > self.balance => {
                Err(AccountError::InsufficientFunds)
            }
            AccountCommand::WithdrawInHalves(amount) => Ok(vec![
                AccountEvent::Withdrawn { amount: amount / 2 },
                AccountEvent::Withdrawn {
                    amount: amount - amount / 2,
                },
            ]),
            AccountCommand::Close if self.balance > 0 => Err(AccountError::NotEmpty),
            AccountCommand::Close => Ok(vec![AccountEvent::Closed]),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened => self.open = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
            AccountEvent::Closed => {
                self.open = false;
                self.closed = true;
            }
        }
    }
}

// ---- The transfer process ------------------------------------------------------------------

/// A transfer request, appended by the test to a fresh category (so a runner on a server that
/// keeps earlier runs' requests replays only this test's).
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Requested {
    from: String,
    to: String,
    amount: u64,
    /// After the debit, wait this long for an approval that never comes (the deadline test),
    /// instead of crediting.
    approval_within_ms: Option<u64>,
}

#[derive(Default, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct TransferState {
    from: String,
    amount: u64,
    debited: bool,
    outcome: Option<String>,
}

struct Transfers {
    name: String,
    requests: Category,
    accounts: Repository<Account>,
    /// After the debit of this transfer, say so on stdout and never return: the crash test
    /// kills the process there.
    hang_after_debit: Option<Uuid>,
}

#[async_trait]
impl ProcessManager for Transfers {
    type State = TransferState;

    fn name(&self) -> &str {
        &self.name
    }

    fn categories(&self) -> Vec<Category> {
        vec![self.requests.clone()]
    }

    async fn handle(
        &self,
        state: &mut TransferState,
        event: &RecordedEvent,
        steps: &mut Steps,
    ) -> Result<(), BoxError> {
        let request: Requested = event.decode()?;
        state.from = request.from.clone();
        state.amount = request.amount;
        match steps
            .execute(
                "debit",
                &self.accounts,
                &request.from,
                &AccountCommand::Withdraw(request.amount),
            )
            .await
        {
            Ok(_) => state.debited = true,
            Err(ExecuteError::Rejected { source, .. }) => {
                state.outcome = Some(format!("refused: {source}"));
                steps.finish();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        if self.hang_after_debit == Some(steps.correlation_id()) {
            println!("FIRST LEG STORED");
            std::future::pending::<()>().await;
        }
        if let Some(within) = request.approval_within_ms {
            steps.set_deadline(Duration::from_millis(within));
            return Ok(());
        }
        match steps
            .execute(
                "credit",
                &self.accounts,
                &request.to,
                &AccountCommand::Deposit(request.amount),
            )
            .await
        {
            Ok(_) => state.outcome = Some("completed".into()),
            Err(ExecuteError::Rejected { .. }) => {
                steps
                    .execute(
                        "refund",
                        &self.accounts,
                        &request.from,
                        &AccountCommand::Deposit(request.amount),
                    )
                    .await?;
                state.outcome = Some("refunded".into());
            }
            Err(e) => return Err(e.into()),
        }
        steps.finish();
        Ok(())
    }

    async fn on_deadline(
        &self,
        state: &mut TransferState,
        steps: &mut Steps,
    ) -> Result<(), BoxError> {
        // The approval never came: give the money back.
        steps
            .execute(
                "refund",
                &self.accounts,
                &state.from,
                &AccountCommand::Deposit(state.amount),
            )
            .await?;
        state.outcome = Some("timed out".into());
        steps.finish();
        Ok(())
    }
}

/// What one test sets up: a store, the accounts, a fresh request category and process name.
struct Bank {
    store: Arc<dyn EventStore>,
    accounts: Repository<Account>,
    requests: Category,
    name: String,
}

impl Bank {
    fn new(store: Arc<dyn EventStore>) -> Self {
        let run = &fresh_id()[..12];
        Self {
            accounts: Repository::<Account>::new(store.clone()),
            requests: Category::new(format!("pm_transfer_{run}")).unwrap(),
            name: format!("transfers-{run}"),
            store,
        }
    }

    fn process(&self) -> Transfers {
        Transfers {
            name: self.name.clone(),
            requests: self.requests.clone(),
            accounts: Repository::<Account>::new(self.store.clone()),
            hang_after_debit: None,
        }
    }

    fn runner(&self, checkpoints: Arc<dyn CheckpointStore>) -> ProcessRunner {
        ProcessRunner::new(self.store.clone(), checkpoints).with_options(ProcessOptions {
            save_interval: Duration::from_millis(50),
            retry_delay: Duration::from_millis(50),
            ..ProcessOptions::default()
        })
    }

    async fn open(&self, balance: u64) -> String {
        let id = fresh_id();
        self.accounts
            .execute(&id, &AccountCommand::Open)
            .await
            .unwrap();
        if balance > 0 {
            self.accounts
                .execute(&id, &AccountCommand::Deposit(balance))
                .await
                .unwrap();
        }
        id
    }

    /// Appends a transfer request; returns its correlation id.
    async fn request(&self, from: &str, to: &str, amount: u64) -> Uuid {
        self.request_with(from, to, amount, None).await
    }

    /// Appends a transfer request that waits for an approval after the debit.
    async fn request_with(
        &self,
        from: &str,
        to: &str,
        amount: u64,
        approval_within_ms: Option<u64>,
    ) -> Uuid {
        let transfer = Uuid::now_v7();
        let stream = newton::StreamId::new(&self.requests, transfer.simple().to_string()).unwrap();
        let request = Requested {
            from: from.into(),
            to: to.into(),
            amount,
            approval_within_ms,
        };
        let event = EventData::msgpack("TransferRequested", &request)
            .unwrap()
            .with_correlation_id(transfer);
        self.store
            .append(&stream, ExpectedVersion::NoStream, vec![event])
            .await
            .unwrap();
        transfer
    }

    /// Every event of account `id`, decoded.
    async fn history(&self, id: &str) -> Vec<AccountEvent> {
        let stream = self.accounts.stream_of(id).unwrap();
        let events: Vec<RecordedEvent> = self
            .store
            .read_stream(&stream, ReadOptions::forwards())
            .try_collect()
            .await
            .unwrap();
        events.iter().map(|e| e.decode().unwrap()).collect()
    }

    /// The balance as stored (a fresh repository: no cache).
    async fn balance(&self, id: &str) -> u64 {
        Repository::<Account>::new(self.store.clone())
            .load(id)
            .await
            .unwrap()
            .state
            .balance
    }
}

const WAIT: Duration = Duration::from_secs(30);

async fn finished(handle: &newton::ProcessHandle<Transfers>, transfer: Uuid) -> TransferState {
    tokio::time::timeout(WAIT, handle.wait_until_finished(transfer))
        .await
        .expect("the transfer finishes in time")
        .unwrap()
}

fn deposits(history: &[AccountEvent]) -> usize {
    history
        .iter()
        .filter(|e| matches!(e, AccountEvent::Deposited { .. }))
        .count()
}

fn withdrawals(history: &[AccountEvent]) -> usize {
    history
        .iter()
        .filter(|e| matches!(e, AccountEvent::Withdrawn { .. }))
        .count()
}

// ---- The scenarios, for every store -------------------------------------------------------

async fn a_transfer_completes(store: Arc<dyn EventStore>) {
    let bank = Bank::new(store);
    let (a, b) = (bank.open(100).await, bank.open(5).await);
    let handle = bank
        .runner(Arc::new(InMemoryCheckpointStore::new()))
        .start(bank.process())
        .unwrap();
    let transfer = bank.request(&a, &b, 40).await;
    let state = finished(&handle, transfer).await;
    assert_eq!(state.outcome.as_deref(), Some("completed"));
    assert_eq!((bank.balance(&a).await, bank.balance(&b).await), (60, 45));
    // The events the steps stored carry the transfer's correlation id and derived ids.
    let stream = bank.accounts.stream_of(&b).unwrap();
    let credit: Vec<RecordedEvent> = bank
        .store
        .read_stream(
            &stream,
            ReadOptions::forwards().from_version(newton::Version(2)),
        )
        .try_collect()
        .await
        .unwrap();
    assert_eq!(credit.len(), 1);
    assert_eq!(credit[0].metadata.correlation_id, Some(transfer));
    assert_eq!(
        credit[0].metadata.headers.get("newton-step"),
        Some("credit")
    );
    handle.stop().await.unwrap();
}

async fn a_refused_credit_is_compensated_once(store: Arc<dyn EventStore>) {
    let bank = Bank::new(store);
    let (a, b) = (bank.open(100).await, bank.open(0).await);
    bank.accounts
        .execute(&b, &AccountCommand::Close)
        .await
        .unwrap();
    let checkpoints = Arc::new(InMemoryCheckpointStore::new());
    let handle = bank.runner(checkpoints).start(bank.process()).unwrap();
    let transfer = bank.request(&a, &b, 30).await;
    let state = finished(&handle, transfer).await;
    assert_eq!(state.outcome.as_deref(), Some("refunded"));
    handle.stop().await.unwrap();

    // Every event delivered again (a runner with no position): nothing happens twice.
    let again = bank
        .runner(Arc::new(InMemoryCheckpointStore::new()))
        .start(bank.process())
        .unwrap();
    tokio::time::timeout(WAIT, again.wait_until_live())
        .await
        .unwrap()
        .unwrap();
    again.stop().await.unwrap();
    let history = bank.history(&a).await;
    assert_eq!(
        (withdrawals(&history), deposits(&history)),
        (1, 2),
        "the first deposit, the refund once: {history:?}"
    );
    assert_eq!(bank.balance(&a).await, 100);
    assert_eq!(bank.history(&b).await.len(), 2, "opened and closed only");
}

/// A runner restarted from an older position (here: none), twice, gets every request again;
/// the instances (finished, with the requests among their handled causes) skip them, so nothing
/// is doubled. Re-issuing a stored command with the same id is checked by
/// `execute_once_stores_a_command_once`, not here.
async fn redelivery_never_doubles_an_effect(store: Arc<dyn EventStore>) {
    let bank = Bank::new(store);
    let (a, b) = (bank.open(100).await, bank.open(0).await);
    let handle = bank
        .runner(Arc::new(InMemoryCheckpointStore::new()))
        .start(bank.process())
        .unwrap();
    let transfers = [
        bank.request(&a, &b, 10).await,
        bank.request(&a, &b, 20).await,
    ];
    for t in transfers {
        finished(&handle, t).await;
    }
    handle.stop().await.unwrap();
    for _ in 0..2 {
        let again = bank
            .runner(Arc::new(InMemoryCheckpointStore::new()))
            .start(bank.process())
            .unwrap();
        tokio::time::timeout(WAIT, again.wait_until_live())
            .await
            .unwrap()
            .unwrap();
        again.stop().await.unwrap();
    }
    assert_eq!((bank.balance(&a).await, bank.balance(&b).await), (70, 30));
    assert_eq!(withdrawals(&bank.history(&a).await), 2);
    assert_eq!(deposits(&bank.history(&b).await), 2);
}

/// `execute_once` on its own: the same command id twice stores once, also when the aggregate
/// would now refuse (the whole balance withdrawn) or decide another number of events.
async fn execute_once_stores_a_command_once(store: Arc<dyn EventStore>) {
    let bank = Bank::new(store);
    let a = bank.open(50).await;
    let ctx = CommandContext::default();
    let command_id = Uuid::new_v4();
    let first = bank
        .accounts
        .execute_once(&a, &AccountCommand::Withdraw(50), command_id, &ctx)
        .await
        .unwrap();
    assert_eq!(first.events, vec![AccountEvent::Withdrawn { amount: 50 }]);
    // Again, through another repository (no cache): refused on today's state, but stored before.
    let other = Repository::<Account>::new(bank.store.clone());
    let again = other
        .execute_once(&a, &AccountCommand::Withdraw(50), command_id, &ctx)
        .await
        .unwrap();
    assert_eq!(again.events, vec![AccountEvent::Withdrawn { amount: 50 }]);
    assert_eq!(again.state.balance, 0);
    assert_eq!(again.version, first.version);
    // A deposit re-sent: the store answers it as a retry.
    let deposit_id = Uuid::new_v4();
    for _ in 0..2 {
        let done = other
            .execute_once(&a, &AccountCommand::Deposit(7), deposit_id, &ctx)
            .await
            .unwrap();
        assert_eq!(done.state.balance, 7);
    }
    // A refusal that was never stored is a refusal.
    match other
        .execute_once(&a, &AccountCommand::Withdraw(99), Uuid::new_v4(), &ctx)
        .await
    {
        Err(ExecuteError::Rejected { source, .. }) => {
            assert_eq!(source, AccountError::InsufficientFunds)
        }
        other => panic!("{other:?}"),
    }
    // Two events in one batch, repeated when it would be refused: the store answers the probe of
    // its first id as part of a longer batch, and both events come back.
    let halves_id = Uuid::new_v4();
    let halves = other
        .execute_once(&a, &AccountCommand::WithdrawInHalves(7), halves_id, &ctx)
        .await
        .unwrap();
    let again = bank
        .accounts
        .execute_once(&a, &AccountCommand::WithdrawInHalves(7), halves_id, &ctx)
        .await
        .unwrap();
    assert_eq!(again.events, halves.events);
    assert_eq!(again.events.len(), 2);
    assert_eq!((again.state.balance, again.version), (0, halves.version));
    let history = bank.history(&a).await;
    assert_eq!(
        history.len(),
        6,
        "opened, deposited, withdrawn, deposited, two halves: {history:?}"
    );
    // The ids are the derived ones.
    let stream = bank.accounts.stream_of(&a).unwrap();
    let stored: Vec<RecordedEvent> = bank
        .store
        .read_stream(&stream, ReadOptions::forwards())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(stored[2].event_id, command_event_id(command_id, 0));
    assert_eq!(stored[3].event_id, command_event_id(deposit_id, 0));
}

/// The debit is stored, the approval never comes: the deadline fires and refunds, also when the
/// runner was stopped before it and started again after it.
async fn a_step_that_never_answers_hits_its_deadline(store: Arc<dyn EventStore>) {
    let bank = Bank::new(store);
    let (a, b) = (bank.open(100).await, bank.open(0).await);
    let checkpoints: Arc<dyn CheckpointStore> =
        Arc::new(EventStoreCheckpointStore::new(bank.store.clone()));
    let handle = bank
        .runner(checkpoints.clone())
        .start(bank.process())
        .unwrap();
    let transfer = bank.request_with(&a, &b, 40, Some(400)).await;
    // Wait for the debit, then stop before the deadline, and start again after it.
    loop {
        if let Some(i) = handle.instance(transfer).await.unwrap() {
            if i.state.debited {
                assert!(
                    i.deadline.is_some(),
                    "the deadline is stored with the state"
                );
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.stop().await.unwrap();
    assert_eq!(bank.balance(&a).await, 60);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let restarted = bank.runner(checkpoints).start(bank.process()).unwrap();
    let state = finished(&restarted, transfer).await;
    assert_eq!(state.outcome.as_deref(), Some("timed out"));
    assert_eq!(bank.balance(&a).await, 100);
    assert_eq!(
        deposits(&bank.history(&a).await),
        2,
        "the first deposit and one refund"
    );
    assert_eq!(bank.history(&b).await.len(), 1, "never credited");
    restarted.stop().await.unwrap();
}

// ---- A store that lets the test step in -----------------------------------------------------

/// Forwards to `inner`, except: before the next append it first runs `before_append` (another
/// node's writes, between a load and its append), it counts stream reads, and until
/// `unavailable_until` its appends and reads answer [`Error::Unavailable`] (an outage).
struct Staged {
    inner: Arc<dyn EventStore>,
    before_append: Mutex<Option<BoxFuture<'static, ()>>>,
    reads: AtomicUsize,
    unavailable_until: Mutex<Option<Instant>>,
}

impl Staged {
    fn new(inner: Arc<dyn EventStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            before_append: Mutex::new(None),
            reads: AtomicUsize::new(0),
            unavailable_until: Mutex::new(None),
        })
    }

    /// The outage's error, if the store is out now.
    fn out(&self) -> Option<Error> {
        let until = (*self.unavailable_until.lock().unwrap())?;
        (Instant::now() < until).then(|| Error::Unavailable {
            backend: "staged",
            message: "a test outage".into(),
            source: None,
        })
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl EventStore for Staged {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn append(
        &self,
        stream: &newton::StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, Error> {
        let before = self.before_append.lock().unwrap().take();
        if let Some(before) = before {
            before.await;
        }
        if let Some(e) = self.out() {
            return Err(e);
        }
        self.inner.append(stream, expected, events).await
    }
    fn read_stream(
        &self,
        stream: &newton::StreamId,
        options: ReadOptions,
    ) -> BoxStream<'static, Result<RecordedEvent, Error>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if let Some(e) = self.out() {
            return Box::pin(futures::stream::iter([Err(e)]));
        }
        self.inner.read_stream(stream, options)
    }
    fn subscribe(
        &self,
        selector: Selector,
        start: Start,
        mode: SubscriptionMode,
    ) -> BoxStream<'static, Result<SubscriptionItem, Error>> {
        self.inner.subscribe(selector, start, mode)
    }
    async fn stream_version(
        &self,
        stream: &newton::StreamId,
    ) -> Result<Option<newton::Version>, Error> {
        self.inner.stream_version(stream).await
    }
    async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        self.inner.list_categories().await
    }
    fn list_streams(
        &self,
        category: &Category,
    ) -> BoxStream<'static, Result<newton::StreamId, Error>> {
        self.inner.list_streams(category)
    }
    async fn health(&self) -> Result<Health, Error> {
        self.inner.health().await
    }
    // An outage is the whole store's: registers (where view and process positions live) too.
    async fn load_register(&self, name: &str) -> Result<Option<newton::store::Register>, Error> {
        if let Some(e) = self.out() {
            return Err(e);
        }
        self.inner.load_register(name).await
    }
    async fn save_register(
        &self,
        name: &str,
        expected: Option<u64>,
        save_id: newton::store::Uuid,
        value: newton::store::Bytes,
    ) -> Result<u64, Error> {
        if let Some(e) = self.out() {
            return Err(e);
        }
        self.inner
            .save_register(name, expected, save_id, value)
            .await
    }
}

/// Node B loads an account (balance 50); before B's append of a command, another writer
/// withdraws 30 and node A stores the same command (same id, a deposit of 5) after that. The
/// store answers B's batch as a retry, at versions after B's load: B must take its answer and
/// its cached state from the store (balance 25), not apply its decision to the state it loaded
/// (55), and so a later withdrawal of 40 through B is refused.
async fn execute_once_after_another_nodes_copy_caches_the_stored_state(store: Arc<dyn EventStore>) {
    let staged = Staged::new(store.clone());
    let bank = Bank::new(staged.clone());
    let a = bank.open(50).await;
    let node_b = Repository::<Account>::new(staged.clone());
    assert_eq!(node_b.load(&a).await.unwrap().state.balance, 50);
    let ctx = CommandContext::default();
    let command_id = Uuid::new_v4();
    let (node_a, other, id) = (
        Repository::<Account>::new(store.clone()),
        Repository::<Account>::new(store.clone()),
        a.clone(),
    );
    *staged.before_append.lock().unwrap() = Some(Box::pin(async move {
        other
            .execute(&id, &AccountCommand::Withdraw(30))
            .await
            .unwrap();
        node_a
            .execute_once(
                &id,
                &AccountCommand::Deposit(5),
                command_id,
                &CommandContext::default(),
            )
            .await
            .unwrap();
    }));
    let executed = node_b
        .execute_once(&a, &AccountCommand::Deposit(5), command_id, &ctx)
        .await
        .unwrap();
    assert_eq!(executed.events, vec![AccountEvent::Deposited { amount: 5 }]);
    assert_eq!(
        (executed.state.balance, executed.version),
        (25, Some(newton::Version(3))),
        "the state as stored"
    );
    let cached = node_b.load(&a).await.unwrap();
    let fresh = Repository::<Account>::new(store.clone())
        .load(&a)
        .await
        .unwrap();
    assert_eq!(
        (cached.state.balance, cached.version),
        (fresh.state.balance, fresh.version),
        "B's cache holds what the store holds"
    );
    match node_b.execute(&a, &AccountCommand::Withdraw(40)).await {
        Err(ExecuteError::Rejected { source, .. }) => {
            assert_eq!(source, AccountError::InsufficientFunds)
        }
        other => panic!("a withdrawal of 40 from 25 is refused: {other:?}"),
    }
    assert_eq!(bank.balance(&a).await, 25);
}

// ---- A deadline set again at the time it fired -------------------------------------------------

/// Each request starts an instance with a deadline 100 ms on. Its first firing deposits 1 into
/// the account the request names and sets the deadline again at the very time it fired at; the
/// second firing (a new deadline, due at once) finishes the instance.
struct Expiring {
    name: String,
    requests: Category,
    accounts: Repository<Account>,
    fired: Arc<AtomicUsize>,
}

#[derive(Default, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct ExpiringState {
    account: String,
    expiry: i64,
}

#[async_trait]
impl ProcessManager for Expiring {
    type State = ExpiringState;

    fn name(&self) -> &str {
        &self.name
    }

    fn categories(&self) -> Vec<Category> {
        vec![self.requests.clone()]
    }

    async fn handle(
        &self,
        state: &mut ExpiringState,
        event: &RecordedEvent,
        steps: &mut Steps,
    ) -> Result<(), BoxError> {
        let request: Requested = event.decode()?;
        state.account = request.from;
        state.expiry = newton::store::Timestamp::now().unix_micros() + 100_000;
        steps.set_deadline_at(newton::store::Timestamp::from_unix_micros(state.expiry).unwrap());
        Ok(())
    }

    async fn on_deadline(
        &self,
        state: &mut ExpiringState,
        steps: &mut Steps,
    ) -> Result<(), BoxError> {
        if self.fired.fetch_add(1, Ordering::SeqCst) == 0 {
            steps
                .execute(
                    "effect",
                    &self.accounts,
                    &state.account,
                    &AccountCommand::Deposit(1),
                )
                .await?;
            steps
                .set_deadline_at(newton::store::Timestamp::from_unix_micros(state.expiry).unwrap());
        } else {
            steps.finish();
        }
        Ok(())
    }
}

/// A deadline set again at the time it fired is a new deadline: it fires once more (the
/// instance finishes), the first firing's effect happens once, and the runner then rests
/// (before, the fired deadline kept its number, was skipped as handled and tracked as due
/// again, without end: the instance never finished, and each turn read the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_deadline_set_again_at_its_time_fires_once_and_rests() {
    let staged = Staged::new(support::store());
    let bank = Bank::new(staged.clone());
    let a = bank.open(0).await;
    let fired = Arc::new(AtomicUsize::new(0));
    let process = Expiring {
        name: bank.name.clone(),
        requests: bank.requests.clone(),
        accounts: Repository::<Account>::new(staged.clone()),
        fired: fired.clone(),
    };
    let handle = bank
        .runner(Arc::new(InMemoryCheckpointStore::new()))
        .start(process)
        .unwrap();
    let instance = bank.request(&a, &a, 0).await;
    tokio::time::timeout(Duration::from_secs(5), handle.wait_until_finished(instance))
        .await
        .expect("the instance finishes")
        .unwrap();
    let reads = staged.reads.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_reads = staged.reads.load(Ordering::SeqCst) - reads;
    assert!(
        idle_reads < 20,
        "{idle_reads} store reads in 500 ms at rest"
    );
    assert_eq!(fired.load(Ordering::SeqCst), 2, "fired, set again, fired");
    assert_eq!(deposits(&bank.history(&a).await), 1, "the effect once");
    handle.stop().await.unwrap();
}

// ---- Outages and panics ------------------------------------------------------------------------

/// The store (events, instances and the position) is out for 2.5 s while a transfer is
/// requested: longer than the old limits (10 tries 50 ms apart for a reaction, 10 for a position
/// save). The runner says it is retrying, and once the store answers the transfer completes,
/// once. Then a runner starts while the store is out (before, its first position load was not
/// tried again): it goes live once the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_store_outage_delays_a_process_and_does_not_stop_it() {
    let inner = support::store();
    let staged = Staged::new(inner.clone());
    let bank = Bank::new(staged.clone());
    let (a, b) = (bank.open(100).await, bank.open(0).await);
    let checkpoints: Arc<dyn CheckpointStore> =
        Arc::new(EventStoreCheckpointStore::new(staged.clone()));
    let handle = bank
        .runner(checkpoints.clone())
        .start(bank.process())
        .unwrap();
    tokio::time::timeout(WAIT, handle.wait_until_live())
        .await
        .unwrap()
        .unwrap();
    let until = Instant::now() + Duration::from_millis(2500);
    *staged.unavailable_until.lock().unwrap() = Some(until);
    // The request goes in beside the outage (its category's subscription still delivers).
    let transfer = Uuid::now_v7();
    let request = EventData::msgpack(
        "TransferRequested",
        &Requested {
            from: a.clone(),
            to: b.clone(),
            amount: 40,
            approval_within_ms: None,
        },
    )
    .unwrap()
    .with_correlation_id(transfer);
    inner
        .append(
            &newton::StreamId::new(&bank.requests, transfer.simple().to_string()).unwrap(),
            ExpectedVersion::NoStream,
            vec![request],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match handle.status() {
        ProcessStatus::Retrying(e) => assert!(e.to_string().contains("a test outage"), "{e}"),
        other => panic!("retrying 1.5 s into the outage, not {other:?}"),
    }
    tokio::time::sleep_until(until.into()).await;
    let state = finished(&handle, transfer).await;
    assert_eq!(state.outcome.as_deref(), Some("completed"));
    let live_by = Instant::now() + Duration::from_secs(5);
    while !matches!(handle.status(), ProcessStatus::Live) {
        assert!(
            Instant::now() < live_by,
            "live again: {:?}",
            handle.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((bank.balance(&a).await, bank.balance(&b).await), (60, 40));
    assert_eq!(withdrawals(&bank.history(&a).await), 1);
    assert_eq!(deposits(&bank.history(&b).await), 1);
    handle.stop().await.unwrap();

    // A start in an outage: the position's load is tried again until the store answers.
    *staged.unavailable_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(1));
    let restarted = bank.runner(checkpoints).start(bank.process()).unwrap();
    tokio::time::timeout(WAIT, restarted.wait_until_live())
        .await
        .expect("live once the store answers")
        .unwrap();
    restarted.stop().await.unwrap();
    assert_eq!((bank.balance(&a).await, bank.balance(&b).await), (60, 40));
}

/// A handler that panics.
struct Panicking {
    name: String,
    requests: Category,
}

#[async_trait]
impl ProcessManager for Panicking {
    type State = ();

    fn name(&self) -> &str {
        &self.name
    }

    fn categories(&self) -> Vec<Category> {
        vec![self.requests.clone()]
    }

    async fn handle(
        &self,
        _state: &mut (),
        _event: &RecordedEvent,
        _steps: &mut Steps,
    ) -> Result<(), BoxError> {
        panic!("the handler's own bug");
    }
}

/// A panicking handler stops the process as failed, with the panic's message (before, the task
/// died and the status stayed as it was).
#[tokio::test]
async fn memory_a_panicking_handler_fails_the_process() {
    let bank = Bank::new(support::store());
    let a = bank.open(0).await;
    let handle = bank
        .runner(Arc::new(InMemoryCheckpointStore::new()))
        .start(Panicking {
            name: bank.name.clone(),
            requests: bank.requests.clone(),
        })
        .unwrap();
    bank.request(&a, &a, 1).await;
    let started = Instant::now();
    let failure = loop {
        match handle.status() {
            ProcessStatus::Failed(e) => break e,
            other => assert!(
                started.elapsed() < Duration::from_secs(5),
                "failed within 5 s, still {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let message = failure.to_string();
    assert!(
        message.contains("panicked") && message.contains("the handler's own bug"),
        "{message}"
    );
    assert!(handle.stop().await.is_err(), "the task has ended");
}

// ---- On memory -------------------------------------------------------------------------------

#[tokio::test]
async fn memory_a_transfer_completes() {
    a_transfer_completes(support::store()).await;
}

#[tokio::test]
async fn memory_a_refused_credit_is_compensated_once() {
    a_refused_credit_is_compensated_once(support::store()).await;
}

#[tokio::test]
async fn memory_redelivery_never_doubles_an_effect() {
    redelivery_never_doubles_an_effect(support::store()).await;
}

#[tokio::test]
async fn memory_execute_once_stores_a_command_once() {
    execute_once_stores_a_command_once(support::store()).await;
}

#[tokio::test]
async fn memory_execute_once_after_another_nodes_copy_caches_the_stored_state() {
    execute_once_after_another_nodes_copy_caches_the_stored_state(support::store()).await;
}

#[tokio::test]
async fn memory_a_step_that_never_answers_hits_its_deadline() {
    a_step_that_never_answers_hits_its_deadline(support::store()).await;
}

/// Two runners of one process at once (each with its own position, as two nodes whose
/// checkpoint saves do not fence each other): both handle every request, each effect happens
/// once. Each instance here has one cause (its request); two runners handling *different*
/// causes of one instance at once can both run their commands (see the module docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_two_runners_at_once_never_double_an_effect() {
    let bank = Bank::new(support::store());
    let (a, b) = (bank.open(1000).await, bank.open(0).await);
    let runners = [
        bank.runner(Arc::new(InMemoryCheckpointStore::new()))
            .start(bank.process())
            .unwrap(),
        bank.runner(Arc::new(InMemoryCheckpointStore::new()))
            .start(bank.process())
            .unwrap(),
    ];
    let mut transfers = Vec::new();
    for amount in 1..=10 {
        transfers.push(bank.request(&a, &b, amount).await);
    }
    for runner in &runners {
        for t in &transfers {
            assert_eq!(
                finished(runner, *t).await.outcome.as_deref(),
                Some("completed")
            );
        }
    }
    for runner in &runners {
        runner.stop().await.unwrap();
    }
    assert_eq!((bank.balance(&a).await, bank.balance(&b).await), (945, 55));
    assert_eq!(withdrawals(&bank.history(&a).await), 10);
    assert_eq!(deposits(&bank.history(&b).await), 10);
}

// ---- Bad input -------------------------------------------------------------------------------

#[tokio::test]
async fn bad_input_is_a_typed_error() {
    let bank = Bank::new(support::store());
    let runner = bank.runner(Arc::new(InMemoryCheckpointStore::new()));
    let invalid = |result: Result<newton::ProcessHandle<Transfers>, ProcessError>| match result {
        Err(ProcessError::Store {
            source: Error::InvalidInput { reason, .. },
            ..
        }) => reason,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    let mut p = bank.process();
    p.name = "has space".into();
    assert!(invalid(runner.start(p)).contains("stream id"));
    let mut p = bank.process();
    p.name = String::new();
    assert!(invalid(runner.start(p)).contains("empty"));
    let mut p = bank.process();
    p.requests = Category::new("newton_view").unwrap();
    assert!(invalid(runner.start(p)).contains("newton_view"));
    struct Nothing;
    #[async_trait]
    impl ProcessManager for Nothing {
        type State = ();
        fn name(&self) -> &str {
            "nothing"
        }
        fn categories(&self) -> Vec<Category> {
            vec![]
        }
        async fn handle(
            &self,
            _: &mut (),
            _: &RecordedEvent,
            _: &mut Steps,
        ) -> Result<(), BoxError> {
            Ok(())
        }
    }
    match runner.start(Nothing) {
        Err(ProcessError::Store {
            source: Error::InvalidInput { reason, .. },
            ..
        }) => assert!(reason.contains("no category")),
        other => panic!("{other:?}"),
    }
    // A nil command id.
    let a = bank.open(0).await;
    match bank
        .accounts
        .execute_once(
            &a,
            &AccountCommand::Deposit(1),
            Uuid::nil(),
            &CommandContext::default(),
        )
        .await
    {
        Err(ExecuteError::Store(Error::InvalidInput { what, .. })) => {
            assert!(what.contains("command id"))
        }
        other => panic!("{other:?}"),
    }
    // A request that does not decode: the handler's error stops the process, typed, naming the
    // event; nothing is saved for the instance.
    let handle = runner.start(bank.process()).unwrap();
    let stream = newton::StreamId::new(&bank.requests, "garbled").unwrap();
    let transfer = Uuid::now_v7();
    let garbled = EventData::msgpack("TransferRequested", &"not a request")
        .unwrap()
        .with_correlation_id(transfer);
    bank.store
        .append(&stream, ExpectedVersion::NoStream, vec![garbled])
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, handle.wait_until_finished(transfer))
        .await
        .unwrap()
    {
        Err(ProcessError::Failed { reason, .. }) => {
            assert!(reason.contains("garbled"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    match handle.status() {
        ProcessStatus::Failed(e) => {
            assert!(matches!(&*e, ProcessError::Handler { stream: s, .. } if *s == stream))
        }
        other => panic!("{other:?}"),
    }
    assert!(handle.instance(transfer).await.unwrap().is_none());
    assert!(matches!(
        handle.stop().await,
        Err(ProcessError::Stopped { .. })
    ));
    // A stored instance that is not the process's state.
    let stream = process_stream(&bank.name, transfer).unwrap();
    bank.store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![EventData::msgpack("ProcessSaved", &"junk").unwrap()],
        )
        .await
        .unwrap();
    assert!(matches!(
        handle.instance(transfer).await,
        Err(ProcessError::State { .. })
    ));
}

// ---- A real process, killed after the first leg -----------------------------------------------

/// Set for the child: `<url>|<process name>|<request category>|<transfer to stop in>`.
const CHILD_VAR: &str = "NEWTON_TEST_PROCESS_CHILD";

/// The child's side of the crash test: runs the transfer process, which stops forever after the
/// debit of one transfer; the parent kills it there. Without the variable this test does
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_runs_transfers_until_killed() {
    let Ok(spec) = std::env::var(CHILD_VAR) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [url, name, category, transfer] = parts[..] else {
        panic!("{CHILD_VAR}={spec:?}")
    };
    let store = newton::connect(url).await.unwrap();
    let process = Transfers {
        name: name.into(),
        requests: Category::new(category).unwrap(),
        accounts: Repository::<Account>::new(store.clone()),
        hang_after_debit: Some(transfer.parse().unwrap()),
    };
    let checkpoints = Arc::new(EventStoreCheckpointStore::new(store.clone()));
    let _handle = ProcessRunner::new(store, checkpoints)
        .start(process)
        .unwrap();
    std::future::pending::<()>().await;
}

/// A process is killed (SIGKILL) after the debit of a transfer of the source's whole balance;
/// started again, it completes the transfer exactly once (deciding the debit again would be
/// refused: the repository finds it stored). Beside it, a transfer whose credit is refused is
/// compensated once and one whose approval never comes hits its deadline; a third runner with
/// no position, handling everything again, changes nothing.
async fn a_killed_process_completes_the_transfer_once_after_a_restart(url: &str) {
    let t0 = Instant::now();
    let phase = |name: &str| println!("  {name} at {:?}", t0.elapsed());
    let store = newton::connect(url).await.unwrap();
    let bank = Bank::new(store);
    let (a, b) = (bank.open(100).await, bank.open(0).await);
    let (c, closed) = (bank.open(30).await, bank.open(0).await);
    bank.accounts
        .execute(&closed, &AccountCommand::Close)
        .await
        .unwrap();
    let killed_in = bank.request(&a, &b, 100).await;
    let refused = bank.request(&c, &closed, 10).await;
    let timed_out = bank.request_with(&c, &b, 5, Some(300)).await;

    phase("set up");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_runs_transfers_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_VAR,
            format!("{url}|{}|{}|{killed_in}", bank.name, bank.requests),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    loop {
        match lines_rx.recv_timeout(WAIT.saturating_sub(started.elapsed())) {
            Ok(line) if line.contains("FIRST LEG STORED") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("the child did not store the first leg: {e}")
            }
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor runs, nothing more is saved
    child.wait().unwrap();
    phase("killed");
    assert_eq!((bank.balance(&a).await, bank.balance(&b).await), (0, 0));

    let checkpoints = Arc::new(EventStoreCheckpointStore::new(bank.store.clone()));
    let handle = bank.runner(checkpoints).start(bank.process()).unwrap();
    let outcomes = [
        finished(&handle, killed_in).await.outcome,
        finished(&handle, refused).await.outcome,
        finished(&handle, timed_out).await.outcome,
    ];
    handle.stop().await.unwrap();
    phase("restarted and finished");
    let outcomes = outcomes.each_ref().map(|o| o.as_deref());
    assert_eq!(
        outcomes,
        [Some("completed"), Some("refunded"), Some("timed out")]
    );

    let again = bank
        .runner(Arc::new(InMemoryCheckpointStore::new()))
        .start(bank.process())
        .unwrap();
    tokio::time::timeout(WAIT, again.wait_until_live())
        .await
        .unwrap()
        .unwrap();
    again.stop().await.unwrap();
    phase("everything delivered again");

    assert_eq!((bank.balance(&a).await, bank.balance(&b).await), (0, 100));
    assert_eq!(withdrawals(&bank.history(&a).await), 1);
    assert_eq!(deposits(&bank.history(&b).await), 1);
    let c_history = bank.history(&c).await;
    assert_eq!(
        (withdrawals(&c_history), deposits(&c_history)),
        (2, 3),
        "two debits, the first deposit and two refunds: {c_history:?}"
    );
    assert_eq!(bank.balance(&c).await, 30);
}

// ---- On every server configured ---------------------------------------------------------------

/// The scenarios above whose outcome depends on the backend (its idempotency answers, its
/// subscriptions, the instance and position streams) on every server configured; the others run
/// on memory only, to keep the servers' share of CI short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_process_manager() {
    for (backend, url) in support::servers() {
        let started = Instant::now();
        execute_once_stores_a_command_once(newton::connect(&url).await.unwrap()).await;
        println!("{backend}: execute_once, {:?}", started.elapsed());
        let started = Instant::now();
        execute_once_after_another_nodes_copy_caches_the_stored_state(
            newton::connect(&url).await.unwrap(),
        )
        .await;
        println!(
            "{backend}: execute_once after another node's copy, {:?}",
            started.elapsed()
        );
        let started = Instant::now();
        a_killed_process_completes_the_transfer_once_after_a_restart(&url).await;
        println!("{backend}: killed and restarted, {:?}", started.elapsed());
    }
}
