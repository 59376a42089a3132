//! Measures an event store's throughput and prints a table.
//!
//! The same scenarios run on every backend (the store comes from `--url`, as applications get
//! it), so backend figures are comparable with each other and with raw-driver baselines. Timing
//! lives here, never in unit tests.
//!
//! ```text
//! cargo run -p photon-bench --release -- --url memory:// --events 100000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use newton::store::{
    ContentType, EventData, EventStore, EventType, ExpectedVersion, Payload, ReadOptions, Selector,
    Start, SubscriptionItem, SubscriptionMode,
};
use newton::{Category, StreamId};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "Throughput of a Photon event store")]
struct Options {
    /// The store to measure (also read from PHOTON_URL).
    #[arg(long, env = "PHOTON_URL", default_value = "memory://")]
    url: String,
    /// Events per scenario.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Concurrent writers (each on its own client and streams).
    #[arg(long, default_value_t = 1)]
    writers: u64,
    /// Streams the events are spread over.
    #[arg(long, default_value_t = 100)]
    streams: u64,
}

struct Row {
    scenario: String,
    events: u64,
    elapsed: Duration,
}

fn event(payload: &[u8]) -> EventData {
    EventData::new(
        EventType::new("BenchEvent").expect("valid"),
        Payload::raw(
            ContentType::from_mime("application/octet-stream"),
            payload.to_vec(),
        ),
    )
}

/// Appends `events` in batches of `batch` from `writers` clients; returns the category used.
async fn append(
    o: &Options,
    store: &Arc<dyn EventStore>,
    batch: u64,
) -> Result<(Category, Row), Box<dyn std::error::Error + Send + Sync>> {
    let category = Category::new(format!(
        "bench{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))?;
    let payload = vec![7u8; o.payload];
    let per_writer = o.events / o.writers;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..o.writers {
        // One shared client: `memory://` makes a new, separate store per connect.
        let store = store.clone();
        let (category, payload) = (category.clone(), payload.clone());
        let streams = (o.streams / o.writers).max(1);
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            let mut i = 0u64;
            while written < per_writer {
                let n = batch.min(per_writer - written);
                let stream = StreamId::new(&category, format!("w{w}-s{}", i % streams))?;
                let events = (0..n).map(|_| event(&payload)).collect();
                store.append(&stream, ExpectedVersion::Any, events).await?;
                written += n;
                i += 1;
            }
            Ok::<_, newton::Error>(written)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((
        category,
        Row {
            scenario: format!("append, batches of {batch}, {} writer(s)", o.writers),
            events: total,
            elapsed: started.elapsed(),
        },
    ))
}

async fn replay(store: &Arc<dyn EventStore>, category: &Category) -> Result<Row, newton::Error> {
    let started = Instant::now();
    let n = store
        .subscribe(
            Selector::Category(category.clone()),
            Start::Beginning,
            SubscriptionMode::Cold,
        )
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await?;
    Ok(Row {
        scenario: "category replay (Cold)".into(),
        events: n,
        elapsed: started.elapsed(),
    })
}

async fn read_streams(
    store: &Arc<dyn EventStore>,
    category: &Category,
) -> Result<Row, newton::Error> {
    let streams: Vec<StreamId> = store.list_streams(category).try_collect().await?;
    let started = Instant::now();
    let mut n = 0;
    for s in &streams {
        n += store
            .read_stream(s, ReadOptions::forwards())
            .try_fold(0u64, |n, _| async move { Ok(n + 1) })
            .await?;
    }
    Ok(Row {
        scenario: format!("read {} aggregate streams", streams.len()),
        events: n,
        elapsed: started.elapsed(),
    })
}

/// A HotCold subscriber follows a writer appending batches of 10: end-to-end live throughput.
async fn live(
    o: &Options,
    store: &Arc<dyn EventStore>,
) -> Result<Row, Box<dyn std::error::Error + Send + Sync>> {
    let category = Category::new(format!(
        "live{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ))?;
    let mut sub = store.subscribe(
        Selector::Category(category.clone()),
        Start::Beginning,
        SubscriptionMode::HotCold,
    );
    assert!(matches!(
        sub.next().await,
        Some(Ok(SubscriptionItem::CaughtUp))
    ));
    let writer = store.clone();
    let payload = vec![7u8; o.payload];
    let total = o.events;
    let started = Instant::now();
    let w = tokio::spawn(async move {
        let stream = StreamId::new(&category, "live")?;
        for _ in 0..total / 10 {
            let events = (0..10).map(|_| event(&payload)).collect();
            writer.append(&stream, ExpectedVersion::Any, events).await?;
        }
        Ok::<_, newton::Error>(())
    });
    let mut seen = 0;
    while seen < total / 10 * 10 {
        match sub.next().await {
            Some(Ok(SubscriptionItem::Event(_))) => seen += 1,
            Some(Ok(SubscriptionItem::CaughtUp)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err("live subscription ended".into()),
        }
    }
    w.await??;
    Ok(Row {
        scenario: "live: append -> HotCold subscriber".into(),
        events: seen,
        elapsed: started.elapsed(),
    })
}

/// The same shapes written and read with the plain `mongodb` driver: the floor under
/// photon-mongo's figures (one insert per event or per 100, one indexed find).
#[cfg(feature = "mongo")]
async fn raw_mongo(o: &Options) -> Result<Vec<Row>, Box<dyn std::error::Error + Send + Sync>> {
    use mongodb::bson::{doc, spec::BinarySubtype, Binary, Document};
    let client = mongodb::Client::with_uri_str(&o.url).await?;
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("photon"));
    let coll = db.collection::<Document>(&format!(
        "rawbench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! { "category": 1, "position": 1 })
            .build(),
    )
    .await?;
    let payload = Binary {
        subtype: BinarySubtype::Generic,
        bytes: vec![7u8; o.payload],
    };
    let shaped = |position: u64| {
        doc! {
            "stream": format!("raw-s{}", position % o.streams), "category": "raw",
            "version": position as i64, "count": 1_i64, "position": position as i64,
            "events": [ { "type": "BenchEvent", "payload": payload.clone() } ],
        }
    };
    let mut rows = Vec::new();
    let started = Instant::now();
    for p in 0..o.events {
        coll.insert_one(shaped(p)).await?;
    }
    rows.push(Row {
        scenario: "raw driver: insert_one per event".into(),
        events: o.events,
        elapsed: started.elapsed(),
    });
    let started = Instant::now();
    for chunk in (o.events..2 * o.events).collect::<Vec<_>>().chunks(100) {
        coll.insert_many(chunk.iter().map(|p| shaped(*p))).await?;
    }
    rows.push(Row {
        scenario: "raw driver: insert_many of 100".into(),
        events: o.events,
        elapsed: started.elapsed(),
    });
    let started = Instant::now();
    let n = coll
        .find(doc! { "category": "raw" })
        .sort(doc! { "position": 1 })
        .await?
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await?;
    rows.push(Row {
        scenario: "raw driver: find by category".into(),
        events: n,
        elapsed: started.elapsed(),
    });
    coll.drop().await?;
    Ok(rows)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let o = Options::parse();
    let store = newton::connect(&o.url).await?;
    println!(
        "store: {} ({}), {} events of {} bytes, {} writer(s), {} streams",
        store.backend(),
        store.health().await?.detail,
        o.events,
        o.payload,
        o.writers,
        o.streams
    );
    let mut rows = Vec::new();
    let (_, single) = append(&o, &store, 1).await?;
    rows.push(single);
    let (category, batched) = append(&o, &store, 100).await?;
    rows.push(batched);
    rows.push(replay(&store, &category).await?);
    rows.push(read_streams(&store, &category).await?);
    rows.push(live(&o, &store).await?);
    #[cfg(feature = "mongo")]
    if o.url.starts_with("mongodb") {
        rows.extend(raw_mongo(&o).await?);
    }

    println!();
    println!(
        "| {:<42} | {:>9} | {:>9} | {:>12} |",
        "scenario", "events", "seconds", "events/s"
    );
    println!("|{:-<44}|{:->11}|{:->11}|{:->14}|", "", "", "", "");
    for r in rows {
        let secs = r.elapsed.as_secs_f64();
        println!(
            "| {:<42} | {:>9} | {:>9.3} | {:>12.0} |",
            r.scenario,
            r.events,
            secs,
            r.events as f64 / secs
        );
    }
    Ok(())
}
