//! The peer: the same aggregate command workload on newton (photon-memory) and on the
//! `cqrs-es` crate with its own in-memory store. Each command loads the account by replaying
//! its events, decides, and appends, in both frameworks.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_es::mem_store::MemStore;
use cqrs_es::{CqrsFramework, EventStore};
use newton::Repository;

use crate::domain::{Account, Deposit, Deposited, ACCOUNTS};
use crate::measure::{run_writers, Latencies, Measurement, Role};
use crate::{progress, BoxError, Sizes};

/// The commands of one client: deposits to each of its own accounts in turn, so every
/// account's stream grows evenly and each command replays a longer history. Clients own
/// disjoint accounts (account `a` belongs to client `a % clients`), as commands to one
/// aggregate are serial in an application; neither framework then meets a conflict.
fn commands(client: u64, clients: u64, total: u64) -> Vec<Deposit> {
    let per_client = total / clients;
    let accounts = (ACCOUNTS / clients).max(1);
    (0..per_client)
        .map(|i| Deposit {
            account: client + clients * (i % accounts),
            amount: 1 + (i % 1_000) as i64,
            reference: format!("deposit {i} by client {client}"),
        })
        .collect()
}

fn case(clients: u64) -> String {
    format!(
        "{clients} client{}, {ACCOUNTS} accounts",
        if clients == 1 { "" } else { "s" }
    )
}

/// Runs `clients` concurrent clients, each its own commands through `execute`, each on its own
/// task; returns the commands done, their latencies and the wall time.
async fn drive<E, F>(
    clients: u64,
    total: u64,
    what: &str,
    execute: E,
) -> Result<(u64, Latencies, Duration), BoxError>
where
    E: Fn(Deposit) -> F + Clone + Send + 'static,
    F: Future<Output = Result<(), BoxError>> + Send,
{
    let bar = progress::bar(total, what);
    // Commands are built before the clock starts; each client runs on a task of its own.
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (execute, bar, commands) =
                (execute.clone(), bar.clone(), commands(c, clients, total));
            let task = tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let mut done = 0;
                for cmd in commands {
                    let t0 = Instant::now();
                    execute(cmd).await?;
                    latencies.record(t0.elapsed());
                    bar.inc(1);
                    done += 1;
                }
                Ok::<_, BoxError>((done, latencies))
            });
            async move { task.await? }
        })
        .collect();
    let result = run_writers(tasks).await;
    bar.finish_and_clear();
    result
}

/// Newton's repository on a fresh photon-memory store.
pub async fn newton(sizes: &Sizes, clients: u64) -> Result<Measurement, BoxError> {
    let store = newton::connect("memory://").await?;
    let repo: Repository<Account> = Repository::new(store);
    let (done, latencies, elapsed) = drive(
        clients,
        sizes.commands,
        "newton commands",
        move |cmd: Deposit| {
            let repo = repo.clone();
            async move {
                repo.execute(&cmd.account.to_string(), &cmd).await?;
                Ok(())
            }
        },
    )
    .await?;
    Ok(Measurement::throughput(
        "memory",
        "commands",
        case(clients),
        "newton on photon-memory",
        Role::Photon,
        done,
        elapsed,
    )
    .with_latency(&latencies))
}

/// cqrs-es's framework on its `MemStore`, the same commands.
pub async fn cqrs_es(sizes: &Sizes, clients: u64) -> Result<Measurement, BoxError> {
    let cqrs = Arc::new(CqrsFramework::new(
        MemStore::<Account>::default(),
        vec![],
        (),
    ));
    let (done, latencies, elapsed) = drive(
        clients,
        sizes.commands,
        "cqrs-es commands",
        move |cmd: Deposit| {
            let cqrs = cqrs.clone();
            async move {
                cqrs.execute(&cmd.account.to_string(), cmd)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        },
    )
    .await?;
    Ok(Measurement::throughput(
        "memory",
        "commands",
        case(clients),
        "cqrs-es 0.4 (MemStore)",
        Role::Baseline,
        done,
        elapsed,
    )
    .with_latency(&latencies))
}

/// A cqrs-es `MemStore` holding `sizes.command_streams` accounts of `length` deposits each,
/// committed 1,000 at a time (not timed), ids `s<i>`.
pub async fn cqrs_es_streams(sizes: &Sizes, length: u64) -> Result<MemStore<Account>, BoxError> {
    let store = MemStore::<Account>::default();
    let mut rng = rand::rng();
    for i in 0..sizes.command_streams {
        let id = format!("s{i}");
        let mut done = 0;
        while done < length {
            let n = (length - done).min(1_000);
            let events = (0..n)
                .map(|_| {
                    let mut d = Deposited::random(&mut rng);
                    d.account = i;
                    d
                })
                .collect();
            let context = store.load_aggregate(&id).await.map_err(|e| e.to_string())?;
            store
                .commit(events, context, Default::default())
                .await
                .map_err(|e| e.to_string())?;
            done += n;
        }
    }
    Ok(store)
}

/// cqrs-es's framework on `store` (from [`cqrs_es_streams`]): the same deposits as newton's
/// command rows on long streams, to the accounts in turn, one client.
pub async fn cqrs_es_on_streams(
    sizes: &Sizes,
    length: u64,
    store: &MemStore<Account>,
) -> Result<Measurement, BoxError> {
    let cqrs = &CqrsFramework::new(store.clone(), vec![], ());
    let commands = crate::photon::stream_commands(sizes, sizes.command_streams);
    let (done, latencies, elapsed) = crate::photon::one_client(
        commands,
        sizes,
        "cqrs-es commands",
        |(account, command)| async move {
            cqrs.execute(&format!("s{account}"), command)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        },
    )
    .await?;
    Ok(Measurement::throughput(
        "memory",
        "commands",
        crate::photon::commands_case(length),
        "cqrs-es 0.4 (MemStore)",
        Role::Baseline,
        done,
        elapsed,
    )
    .with_latency(&latencies)
    .capped(done < sizes.stream_commands))
}
