//! A writer process for the killed-writer scenario: appends to a few hot streams with `Exact`
//! expectations and prints, as JSON lines on stdout, each batch before it is sent (`intent`) and
//! its outcome after (`outcome`). The test kills it with `kill -9` at a random moment; an intent
//! without an outcome is an append whose outcome is unknown.
//!
//! Usage: `fault-writer URL CATEGORY STREAMS APPENDS SEED`

use std::io::Write;
use std::time::Duration;

use photon_api::StreamId;
use photon_faults::history::{classify, expect_after, retrying, AppendRecord};
use photon_faults::scenarios::{batch, Dice};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, category, streams, appends, seed] = args.as_slice() else {
        eprintln!("usage: fault-writer URL CATEGORY STREAMS APPENDS SEED");
        std::process::exit(2);
    };
    let category = photon_api::Category::new(category).expect("a category");
    let streams: u64 = streams.parse().expect("STREAMS");
    let appends: u64 = appends.parse().expect("APPENDS");
    let mut dice = Dice::new(seed.parse().expect("SEED"));
    let store = photon_faults::target::open(url).await;
    let name = format!("process-{}", std::process::id());
    let mut out = std::io::stdout().lock();
    writeln!(out, "{{\"ready\":true}}").expect("stdout");
    out.flush().expect("stdout");
    for _ in 0..appends {
        let stream =
            StreamId::new(&category, format!("hot{}", dice.below(streams))).expect("a stream");
        let Ok(version) = retrying(Duration::from_secs(30), || store.stream_version(&stream)).await
        else {
            continue;
        };
        let events = batch(&name, 1 + dice.below(3) as usize, "killed");
        let intent = AppendRecord {
            stream: stream.as_str().to_owned(),
            ids: events.iter().map(|e| e.event_id).collect(),
            outcome: photon_faults::history::Outcome::Unknown("killed before it answered".into()),
        };
        writeln!(out, "{}", serde_json::json!({ "intent": intent })).expect("stdout");
        out.flush().expect("stdout");
        let result = store.append(&stream, expect_after(version), events).await;
        let record = AppendRecord {
            outcome: classify(&result),
            ..intent
        };
        writeln!(out, "{}", serde_json::json!({ "outcome": record })).expect("stdout");
        out.flush().expect("stdout");
    }
}
