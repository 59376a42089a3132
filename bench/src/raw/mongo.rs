//! The plain `mongodb` driver doing photon-mongo's I/O shape with its durability: a document
//! per append (`stream`, `version`, `category`, `position`, an `events` array carrying the
//! payloads), inserted into a collection with photon's indexes, with photon's client settings
//! (write concern majority + journal, read concern majority, timeouts), both read from
//! photon-mongo itself ([`photon_mongo::client_options`], [`photon_mongo::commit_indexes`]) so
//! the baseline cannot drift from the backend. Everything photon adds is left out: reading the
//! stream's head and the global head before each insert (two more round trips), ids,
//! metadata.
//!
//! Every run writes to a fresh collection `rawbench_<id>` in the URL's database (photon-mongo's
//! reading of the URL, `photon` when it names none) and drops it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use mongodb::{Client, Collection};
use photon_mongo::MongoConfig;

use super::Raw;
use crate::domain::{self, Balances};
use crate::measure::{run_writers, Cap, Latencies, Measurement, Role};
use crate::photon::{append_case, load_case};
use crate::{progress, BoxError, Sizes};

const SUBJECT: &str = "raw mongodb (insert_one, w:majority, j:true)";

/// The reference row: the id lookup photon-mongo needs on FerretDB, then the same insert.
const LOOKUP_SUBJECT: &str = "raw mongodb (find by stream and event ids, then insert_one)";

/// The raw client and its collection.
pub struct RawMongo {
    coll: Collection<Document>,
    /// The reference row's collection (lookup, then insert): its own, so its lookups scan only
    /// what that row wrote, as photon's scan only what photon wrote.
    lookup_coll: Collection<Document>,
    /// The next global position, handed out locally (photon reads it from the server).
    position: Arc<AtomicI64>,
}

impl std::fmt::Debug for RawMongo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawMongo")
            .field("collection", &self.coll.name())
            .finish()
    }
}

impl RawMongo {
    /// Connects with photon-mongo's client settings and creates a fresh collection with its
    /// indexes.
    ///
    /// # Errors
    /// - A URL photon-mongo refuses, or the driver's error.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let config = MongoConfig::from_url(url)?;
        let client = Client::with_options(photon_mongo::client_options(&config).await?)?;
        let name = format!(
            "rawbench_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let database = client.database(&config.database);
        let coll = database.collection::<Document>(&name);
        let lookup_coll = database.collection::<Document>(&format!("{name}_lookup"));
        // One index per command, as photon-mongo creates them.
        for index in photon_mongo::commit_indexes() {
            coll.create_index(index.clone()).await?;
            lookup_coll.create_index(index).await?;
        }
        Ok(Self {
            coll,
            lookup_coll,
            position: Arc::new(AtomicI64::new(1)),
        })
    }

    /// The document of one append.
    fn commit(&self, category: &str, stream: &str, version: u64, payloads: &[Bytes]) -> Document {
        let events: Vec<Bson> = payloads
            .iter()
            .map(|p| {
                Bson::Document(doc! {
                    "type": domain::EVENT_TYPE,
                    "payload": Binary { subtype: BinarySubtype::Generic, bytes: p.to_vec() },
                })
            })
            .collect();
        // Each event's id, as photon-mongo keeps them beside the events (what its id lookup
        // reads, and the reference row's lookup too).
        let ids: Vec<Bson> = payloads
            .iter()
            .map(|_| {
                Bson::Binary(Binary {
                    subtype: BinarySubtype::Uuid,
                    bytes: uuid::Uuid::new_v4().as_bytes().to_vec(),
                })
            })
            .collect();
        doc! {
            "stream": stream, "category": category, "version": version as i64,
            "count": payloads.len() as i64,
            "position": self.position.fetch_add(1, Ordering::Relaxed),
            "event_ids": ids,
            "events": events,
        }
    }

    /// Writes `streams` streams of `length` events in documents of up to 1,000 (not timed).
    async fn write(&self, category: &str, streams: u64, length: u64) -> Result<(), BoxError> {
        let bar = progress::bar(streams * length, "raw mongodb: writing");
        for s in 0..streams {
            let mut done = 0;
            while done < length {
                let n = (length - done).min(1_000);
                let doc = self.commit(
                    category,
                    &format!("{category}-{s}"),
                    done,
                    &domain::payloads(n as usize),
                );
                self.coll.insert_one(doc).await?;
                done += n;
                bar.inc(n);
            }
        }
        bar.finish_and_clear();
        Ok(())
    }
}

/// Decodes every payload of a commit document into the view.
fn apply(view: &mut Balances, commit: &Document) -> Result<(), BoxError> {
    for e in commit.get_array("events")? {
        let Bson::Document(e) = e else {
            return Err("an event that is not a document".into());
        };
        view.apply_bytes(e.get_binary_generic("payload")?)?;
    }
    Ok(())
}

impl RawMongo {
    /// `insert_one` per append; with `lookup`, each one after a `find` of the stream's commits
    /// holding any of its event ids, the lookup photon-mongo makes before each insert on a
    /// server whose unique index compares whole arrays (FerretDB 1.24), shown beside the
    /// baseline so the part of the distance that server sets is visible.
    async fn inserts(
        &self,
        sizes: &Sizes,
        batch: u64,
        writers: u64,
        lookup: bool,
    ) -> Result<Measurement, BoxError> {
        let category = format!("append{batch}x{writers}{}", if lookup { "l" } else { "" });
        let per_writer = (sizes.append_events / writers).max(1);
        let cap = Cap::new(sizes.cap);
        let tasks = (0..writers)
            .map(|w| {
                let category = category.clone();
                let plan: Vec<Document> = (0..per_writer.div_ceil(batch))
                    .map(|i| {
                        let n = batch.min(per_writer - i * batch);
                        let stream = format!("{category}-w{w}-{}", i % 100);
                        self.commit(
                            &category,
                            &stream,
                            i / 100 * batch,
                            &domain::payloads(n as usize),
                        )
                    })
                    .collect();
                let coll = if lookup {
                    &self.lookup_coll
                } else {
                    &self.coll
                }
                .clone();
                async move {
                    let mut latencies = Latencies::default();
                    let mut written = 0u64;
                    for doc in plan {
                        if cap.reached() {
                            break;
                        }
                        let n = doc.get_i64("count")? as u64;
                        let t0 = Instant::now();
                        if lookup {
                            let ids = doc.get_array("event_ids")?.clone();
                            let stream = doc.get_str("stream")?.to_owned();
                            coll.find_one(doc! { "stream": stream, "event_ids": { "$in": ids } })
                                .await?;
                        }
                        coll.insert_one(doc).await?;
                        latencies.record(t0.elapsed());
                        written += n;
                    }
                    Ok::<_, BoxError>((written, latencies))
                }
            })
            .collect::<Vec<_>>();
        // Every writer's appends are built above, before the clock starts, as photon's are.
        let (total, latencies, elapsed) = run_writers(tasks).await?;
        let (subject, role) = if lookup {
            (LOOKUP_SUBJECT, Role::Reference)
        } else {
            (SUBJECT, Role::Baseline)
        };
        Ok(Measurement::throughput(
            "mongo",
            "append",
            append_case(batch, writers),
            subject,
            role,
            total,
            elapsed,
        )
        .with_latency(&latencies)
        .capped(total < per_writer * writers))
    }
}

#[async_trait]
impl Raw for RawMongo {
    async fn append(
        &self,
        sizes: &Sizes,
        batch: u64,
        writers: u64,
    ) -> Result<Vec<Measurement>, BoxError> {
        let mut rows = vec![self.inserts(sizes, batch, writers, false).await?];
        rows.push(self.inserts(sizes, batch, writers, true).await?);
        Ok(rows)
    }

    async fn load(&self, sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        let mut rows = Vec::new();
        for &length in &sizes.load_lengths {
            let category = format!("load{length}");
            self.write(&category, sizes.loads, length).await?;
            let mut latencies = Latencies::default();
            let started = Instant::now();
            for s in 0..sizes.loads {
                let t0 = Instant::now();
                let mut view = Balances::default();
                let mut cursor = self
                    .coll
                    .find(doc! { "stream": format!("{category}-{s}") })
                    .sort(doc! { "version": 1 })
                    .await?;
                while let Some(commit) = cursor.try_next().await? {
                    apply(&mut view, &commit)?;
                }
                latencies.record(t0.elapsed());
                if view.events() != length {
                    return Err(format!("raw mongodb load: {} of {length}", view.events()).into());
                }
            }
            rows.push(
                Measurement::throughput(
                    "mongo",
                    "load",
                    load_case(length),
                    "raw mongodb (find by stream, sorted)",
                    Role::Baseline,
                    sizes.loads,
                    started.elapsed(),
                )
                .with_latency(&latencies)
                .latency_only(),
            );
        }
        Ok(rows)
    }

    async fn replay(&self, events: u64, _sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        let category = "replay";
        self.write(category, 1, events).await?;
        let started = Instant::now();
        let mut view = Balances::default();
        let mut cursor = self
            .coll
            .find(doc! { "category": category })
            .sort(doc! { "position": 1 })
            .await?;
        while let Some(commit) = cursor.try_next().await? {
            apply(&mut view, &commit)?;
        }
        Ok(vec![Measurement::throughput(
            "mongo",
            "replay",
            format!("{events} events"),
            "raw mongodb (find by category, sorted by position)",
            Role::Baseline,
            view.events(),
            started.elapsed(),
        )])
    }

    async fn live(&self, _sizes: &Sizes) -> Result<Vec<Measurement>, BoxError> {
        // The driver's push is change streams, which FerretDB does not offer; photon-mongo
        // polls. No raw row.
        Ok(vec![])
    }

    async fn clean_up(&self) -> Result<(), BoxError> {
        self.coll.drop().await?;
        self.lookup_coll.drop().await?;
        Ok(())
    }
}
