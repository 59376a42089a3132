//! What photon-mongo's design rests on in the MongoDB-wire test server, checked against the server
//! itself (`PHOTON_TEST_MONGO_URL`) with the plain driver: a unique index refuses concurrent
//! duplicates (the position and version checks of every append). A server that failed this could
//! not tell a correct design from a broken one (see the README, "Verified where").
//!
//! Not checked here: `findAndModify` with `$inc` is not atomic on FerretDB 1.24 (it reads the
//! document, applies the operators itself and writes it back by `_id`), measured by hand on
//! 2026-11-30 and recorded in the README; nothing in photon-mongo relies on it.

use futures::future::join_all;
use mongodb::bson::{doc, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::{Client, Collection, IndexModel};
use photon_conformance::server_url;

/// Concurrent requests, spread over this many clients (connection pools), as separate writer
/// processes would send them.
const CLIENTS: usize = 4;

async fn clients(url: &str) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::with_uri_str(url).await.expect("connects"));
    }
    clients
}

fn collection(client: &Client, name: &str) -> Collection<Document> {
    client
        .default_database()
        .unwrap_or_else(|| client.database("photon"))
        .collection(name)
}

fn fresh_name(what: &str) -> String {
    format!(
        "s{}_{what}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unique_index_refuses_concurrent_duplicates() {
    let Some(url) = server_url("mongo", "PHOTON_TEST_MONGO_URL") else {
        return;
    };
    const KEYS: i64 = 5;
    const INSERTS: i64 = 100;
    let clients = clients(&url).await;
    let name = fresh_name("unique");
    let first = collection(&clients[0], &name);
    first
        .create_index(
            IndexModel::builder()
                .keys(doc! { "k": 1, "v": 1 })
                .options(
                    mongodb::options::IndexOptions::builder()
                        .name("k_v".to_string())
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();

    // 20 concurrent inserts of each of 5 compound keys: exactly one of each may land.
    let calls = (0..INSERTS).map(|i| {
        let coll = collection(&clients[i as usize % CLIENTS], &name);
        async move {
            match coll
                .insert_one(doc! { "k": i % KEYS, "v": "x", "writer": i })
                .await
            {
                Ok(_) => true,
                Err(e) => match *e.kind {
                    ErrorKind::Write(WriteFailure::WriteError(ref w)) if w.code == 11000 => false,
                    _ => panic!("insert {i}: expected success or duplicate key 11000, got {e}"),
                },
            }
        }
    });
    let landed = join_all(calls).await.into_iter().filter(|ok| *ok).count() as i64;
    let mut keys = Vec::new();
    let mut cursor = first.find(doc! {}).await.unwrap();
    while cursor.advance().await.unwrap() {
        keys.push(cursor.deserialize_current().unwrap().get_i64("k").unwrap());
    }
    keys.sort_unstable();
    first.drop().await.unwrap();

    assert_eq!(landed, KEYS, "inserts acknowledged");
    assert_eq!(keys, (0..KEYS).collect::<Vec<_>>(), "documents stored");
}
