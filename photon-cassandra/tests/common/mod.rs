//! Helpers the real-server test files of this crate share (each uses some of them).
#![allow(dead_code)]

use photon_api::{EventData, RecordedEvent, Uuid};
use photon_cassandra::CassandraConfig;
use photon_faults::proxy::FaultProxy;

/// `url` with `options` appended to its query.
pub(crate) fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

/// A fresh name: `prefix` and 12 random hex digits.
pub(crate) fn fresh(prefix: &str) -> String {
    format!("{prefix}{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// An event numbered `n`, with `mark` in its payload (for the fault proxy to find).
pub(crate) fn numbered(n: u64, mark: &str) -> EventData {
    EventData::json("Numbered", &serde_json::json!({ "n": n, "mark": mark })).unwrap()
}

/// The number of an event made by `numbered` (or with an `n` field).
pub(crate) fn number(e: &RecordedEvent) -> u64 {
    e.decode::<serde_json::Value>().unwrap()["n"]
        .as_u64()
        .unwrap()
}

/// A fault proxy in front of the first contact point of `url`, and `url` through it.
pub(crate) async fn proxied(url: &str) -> (FaultProxy, String) {
    let config = CassandraConfig::from_url(url).unwrap();
    let upstream = config.contact_points[0].clone();
    let proxy = FaultProxy::start("127.0.0.1:0", &upstream).await.unwrap();
    let proxied_url = url.replacen(&upstream, &proxy.local_addr().to_string(), 1);
    assert_ne!(proxied_url, url, "the URL goes through the proxy");
    (proxy, proxied_url)
}
