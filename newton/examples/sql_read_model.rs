//! A read model in a SQL table, exactly-once: account balances kept by a non-idempotent
//! `UPDATE balance = balance + amount`, whose checkpoint commits in the same SQLite transaction.
//!
//! Run with `cargo run -p newton --features sqlite --example sql_read_model`; `PHOTON_URL` picks
//! the store (default `memory://`), the first argument the database file (default: a new file in
//! the temp dir). Run it twice against a server store and one file: the second run only reads
//! the events appended since the first, and the balances are still exact.

use std::sync::Arc;

use newton::rusqlite::{params, Transaction};
use newton::store::{EventData, ExpectedVersion};
use newton::{
    BoxError, Category, EventStore, RecordedEvent, SqliteView, SqliteViewRunner, StreamId,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: i64,
}

/// Balances per account in table `balances`.
struct Balances {
    category: Category,
}

impl SqliteView for Balances {
    fn name(&self) -> &str {
        "sql-balances-v1"
    }

    fn categories(&self) -> Vec<Category> {
        vec![self.category.clone()]
    }

    fn migrate(&self, tx: &Transaction<'_>) -> newton::rusqlite::Result<()> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS balances (
                account TEXT PRIMARY KEY NOT NULL,
                balance INTEGER NOT NULL
            )",
        )
    }

    fn handle(&self, tx: &Transaction<'_>, event: &RecordedEvent) -> Result<(), BoxError> {
        // Decode first: a refusal after a change is rolled back anyway (savepoint), but there
        // is no need to start one.
        let Deposited { amount } = event.decode()?;
        tx.execute(
            "INSERT INTO balances (account, balance) VALUES (?1, ?2)
             ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance",
            params![event.stream.as_str(), amount],
        )?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<dyn EventStore> = newton::connect_from_env().await?;
    let path = std::env::args().nth(1).map(Into::into).unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "newton-sql-read-model-{}.db",
            newton::Uuid::new_v4()
        ))
    });
    let category = Category::new("sqldemo")?;
    for (account, amount) in [("1", 100), ("2", 40), ("1", -30)] {
        let stream = StreamId::parse(format!("{category}-{account}"))?;
        let event = EventData::msgpack("Deposited", &Deposited { amount })?;
        store
            .append(&stream, ExpectedVersion::Any, vec![event])
            .await?;
    }

    let runner = SqliteViewRunner::new(store, &path);
    let view = runner.start(Balances { category })?;
    view.wait_until_live().await?;
    println!("handled {} new events", view.handled());
    view.stop().await?;

    let conn = newton::rusqlite::Connection::open(&path)?;
    let mut rows = conn.prepare("SELECT account, balance FROM balances ORDER BY account")?;
    for row in rows.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (account, balance) = row?;
        println!("{account}: {balance}");
    }
    println!("database: {}", path.display());
    Ok(())
}
