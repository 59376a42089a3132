//! The peer: the same aggregate command workload on newton (photon-memory) and on the
//! `cqrs-es` crate with its own in-memory store. Each command loads the account by replaying
//! its events, decides, and appends, in both frameworks.

use std::sync::Arc;
use std::time::Instant;

use cqrs_es::mem_store::MemStore;
use cqrs_es::CqrsFramework;
use futures::future::try_join_all;
use newton::Repository;

use crate::domain::{Account, Deposit, ACCOUNTS};
use crate::measure::{Latencies, Measurement, Role};
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

/// Newton's repository on a fresh photon-memory store.
pub async fn newton(sizes: &Sizes, clients: u64) -> Result<Measurement, BoxError> {
    let store = newton::connect("memory://").await?;
    let repo: Repository<Account> = Repository::new(store);
    let bar = progress::bar(sizes.commands, "newton commands");
    let total = sizes.commands;
    let started = Instant::now();
    let tasks = (0..clients).map(|c| {
        let (repo, bar) = (repo.clone(), bar.clone());
        tokio::spawn(async move {
            let mut latencies = Latencies::default();
            for cmd in commands(c, clients, total) {
                let t0 = Instant::now();
                repo.execute(&cmd.account.to_string(), &cmd).await?;
                latencies.record(t0.elapsed());
                bar.inc(1);
            }
            Ok::<_, BoxError>(latencies)
        })
    });
    let results = try_join_all(tasks).await?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let mut latencies = Latencies::default();
    for l in results {
        latencies.merge(&l?);
    }
    Ok(Measurement::throughput(
        "memory",
        "commands",
        case(clients),
        "newton on photon-memory",
        Role::Photon,
        sizes.commands / clients * clients,
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
    let bar = progress::bar(sizes.commands, "cqrs-es commands");
    let total = sizes.commands;
    let started = Instant::now();
    let tasks = (0..clients).map(|c| {
        let (cqrs, bar) = (cqrs.clone(), bar.clone());
        tokio::spawn(async move {
            let mut latencies = Latencies::default();
            for cmd in commands(c, clients, total) {
                let t0 = Instant::now();
                cqrs.execute(&cmd.account.to_string(), cmd)
                    .await
                    .map_err(|e| e.to_string())?;
                latencies.record(t0.elapsed());
                bar.inc(1);
            }
            Ok::<_, BoxError>(latencies)
        })
    });
    let results = try_join_all(tasks).await?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let mut latencies = Latencies::default();
    for l in results {
        latencies.merge(&l?);
    }
    Ok(Measurement::throughput(
        "memory",
        "commands",
        case(clients),
        "cqrs-es 0.4 (MemStore)",
        Role::Baseline,
        sizes.commands / clients * clients,
        elapsed,
    )
    .with_latency(&latencies))
}
