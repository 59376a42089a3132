//! The store under test: which backend, its URL with the suite's timeouts, and how to reach it
//! through a [`FaultProxy`].

use std::sync::Arc;
use std::time::Duration;

use photon_api::{Category, EventStore};
use tokio::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::proxy::FaultProxy;

/// The client timeout the server stores of the suite are opened with: short, so a stall of a
/// few timeouts stays a few seconds.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The MongoDB-wire test server (FerretDB 1.24, over PostgreSQL as over SQLite) scans a
/// collection for every filtered query, and under the suite's writers on 2 cores an answer can
/// take longer than 2 s: its store gets photon-mongo's default timeout instead, so a fault, not
/// the test server's pace, is tested.
pub const MONGO_TIMEOUT: Duration = Duration::from_secs(5);

/// Scenarios that stop or restart a server hold this for writing; every other scenario of the
/// same test binary holds it for reading, so a restart never lands in another scenario.
static SERVER: RwLock<()> = RwLock::const_new(());

/// The broker advertises one fixed address for the fault listener, so one Kafka proxy at a time.
static KAFKA_PROXY_PORT: Mutex<()> = Mutex::const_new(());

/// One backend under test.
#[derive(Clone, Debug)]
pub struct Target {
    /// `memory`, `kafka`, `cassandra` or `mongo`.
    pub backend: &'static str,
    /// Its name for `scripts/servers` (None for memory).
    pub server: Option<&'static str>,
    /// The URL with the suite's options, straight to the server.
    url: String,
    /// Where a proxy forwards to, and the address it must listen on (Kafka: the advertised one).
    proxy_upstream: Option<(String, String)>,
    /// How long after the faults end the category and all streams may still be completing (the
    /// backend's documented settle or repair time); the checker polls at most this long.
    pub repair: Duration,
    /// The store's client timeout (the `timeout_ms` of its URL); stalls and pauses are multiples.
    pub timeout: Duration,
    /// A test server that answers each query with a scan (FerretDB 1.24, over PostgreSQL or
    /// SQLite): its scenarios keep their writers and faults but make a third of the appends, so
    /// the suite stays within CI's minutes.
    pub slow_server: bool,
    /// memory: the one store every "instance" shares (each `memory://` open is a new, empty
    /// store, so separate instances of one store are clones of one handle).
    one: Arc<tokio::sync::OnceCell<Arc<dyn EventStore>>>,
}

impl Target {
    /// The in-process store.
    pub fn memory() -> Target {
        Target {
            backend: "memory",
            server: None,
            url: "memory://".into(),
            proxy_upstream: None,
            repair: Duration::ZERO,
            timeout: TIMEOUT,
            slow_server: false,
            one: Arc::default(),
        }
    }

    /// The in-process store playing production's weaker guarantees from a seed: partitioned
    /// order, delayed category delivery, `Unavailable` before and after landing, dropped
    /// subscriptions (`faults=production`).
    /// `extra` options override the preset's (e.g. `subscription_drop=0`).
    pub fn weak_memory(seed: u64, extra: &str) -> Target {
        Target {
            url: format!("memory://?faults=production&seed={seed}{extra}"),
            repair: Duration::from_secs(2),
            ..Target::memory()
        }
    }

    /// The backend whose URL is in its `PHOTON_TEST_*_URL` variable; None skips (unless
    /// `PHOTON_TEST_REQUIRE` names it, then this panics).
    #[track_caller]
    pub fn server(backend: &'static str) -> Option<Target> {
        let ms = TIMEOUT.as_millis();
        match backend {
            "kafka" => {
                let url = photon_conformance::server_url("kafka", "PHOTON_TEST_KAFKA_URL")?;
                let listener = std::env::var("PHOTON_TEST_KAFKA_FAULTS_LISTENER")
                    .unwrap_or_else(|_| "127.0.0.1:19092".into());
                let advertised = std::env::var("PHOTON_TEST_KAFKA_FAULTS_ADVERTISED")
                    .unwrap_or_else(|_| "127.0.0.1:29092".into());
                Some(Target {
                    backend,
                    server: Some("kafka"),
                    url: with_options(
                        &url,
                        &format!(
                            "partitions=3&timeout_ms={ms}&prefix={}&answer_window_ms=1000",
                            kafka_prefix()
                        ),
                    ),
                    proxy_upstream: Some((advertised, listener)),
                    repair: Duration::from_secs(30),
                    timeout: TIMEOUT,
                    slow_server: false,
                    one: Arc::default(),
                })
            }
            "cassandra" => {
                let url = photon_conformance::server_url("cassandra", "PHOTON_TEST_CASSANDRA_URL")?;
                let url = replace_path(&url, "photon_faults");
                let upstream = host_of(&url).to_owned();
                Some(Target {
                    backend,
                    server: Some("cassandra"),
                    url: with_options(
                        &url,
                        &format!("settle_ms=250&timeout_ms={ms}&repair_after_ms=5000"),
                    ),
                    proxy_upstream: Some(("127.0.0.1:0".into(), upstream)),
                    repair: Duration::from_secs(20),
                    timeout: TIMEOUT,
                    slow_server: false,
                    one: Arc::default(),
                })
            }
            "mongo" => {
                let ms = MONGO_TIMEOUT.as_millis();
                let url = photon_conformance::server_url("mongo", "PHOTON_TEST_MONGO_URL")?;
                let url = replace_path(&url, "photon_faults");
                let upstream = host_of(&url).to_owned();
                Some(Target {
                    backend,
                    server: Some("ferretdb"),
                    url: with_options(
                        &url,
                        &format!(
                            "photon_timeout_ms={ms}&serverSelectionTimeoutMS={ms}&connectTimeoutMS={ms}&photon_answer_window_ms=800"
                        ),
                    ),
                    proxy_upstream: Some(("127.0.0.1:0".into(), upstream)),
                    repair: Duration::from_secs(20),
                    timeout: MONGO_TIMEOUT,
                    slow_server: true,
                    one: Arc::default(),
                })
            }
            other => panic!("no fault target {other}"),
        }
    }

    /// How many appends a writer of a scenario makes where `n` is the usual number: a third on a
    /// slow test server, ten times more in a soak.
    pub fn appends(&self, n: usize) -> usize {
        let n = if self.slow_server { (n / 3).max(3) } else { n };
        n * crate::scenarios::scale()
    }

    /// The URL straight to the server.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new store instance straight to the server (as another process would have).
    pub async fn open(&self) -> Arc<dyn EventStore> {
        if self.server.is_none() {
            return self.one.get_or_init(|| open(&self.url)).await.clone();
        }
        open(&self.url).await
    }

    /// Whether this target can put a proxy between store and server.
    pub fn has_proxy(&self) -> bool {
        self.proxy_upstream.is_some()
    }

    /// A fault proxy in front of the server, and the URL that reaches the server through it.
    pub async fn proxy(&self) -> Proxied {
        let (listen, upstream) = self
            .proxy_upstream
            .clone()
            .unwrap_or_else(|| panic!("{} has no server to proxy", self.backend));
        let guard = if self.backend == "kafka" {
            Some(KAFKA_PROXY_PORT.lock().await)
        } else {
            None
        };
        // The previous scenario's proxy on a fixed port closes its listener as its task ends,
        // which may be a moment after the port's lock was released: retry the bind briefly.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let proxy = loop {
            match FaultProxy::start(&listen, &upstream).await {
                Ok(proxy) => break proxy,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("fault proxy on {listen} to {upstream}: {e}"),
            }
        };
        let url = replace_host(&self.url, &proxy.local_addr().to_string());
        Proxied {
            proxy,
            url,
            _port: guard,
        }
    }

    /// Shares the server with other scenarios that leave it running.
    pub async fn share(&self) -> RwLockReadGuard<'static, ()> {
        SERVER.read().await
    }

    /// Holds the server alone, for a scenario that kills or restarts it.
    pub async fn exclusive(&self) -> RwLockWriteGuard<'static, ()> {
        SERVER.write().await
    }
}

/// A proxy in front of a server, with the URL through it.
#[derive(Debug)]
pub struct Proxied {
    /// The proxy; dropping it closes every connection through it.
    pub proxy: FaultProxy,
    /// The store URL through the proxy.
    pub url: String,
    _port: Option<MutexGuard<'static, ()>>,
}

impl Proxied {
    /// A new store instance through the proxy.
    pub async fn open(&self) -> Arc<dyn EventStore> {
        open(&self.url).await
    }
}

/// Opens a store by URL, as an application does.
pub async fn open(url: &str) -> Arc<dyn EventStore> {
    newton::connect(url)
        .await
        .unwrap_or_else(|e| panic!("opening {}: {e}", photon_api::url::redact(url)))
}

/// The topic prefix of one run of the suite: the all stream's checks replay every topic under
/// the prefix, and with one prefix for every run they replayed every earlier run's topics too
/// (on a broker kept between runs, 327 partitions and 369 MiB after a few dozen runs, read again
/// by every scenario's check).
fn kafka_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        let id = uuid::Uuid::new_v4().simple().to_string();
        format!("faults{}", &id[..12])
    })
}

/// A fresh category (`f` + 20 hex digits), so runs never collide.
pub fn fresh_category() -> Category {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Category::new(format!("f{}", &id[..20])).expect("valid category")
}

fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

/// The `host:port` part of a one-host URL.
fn host_of(url: &str) -> &str {
    let rest = &url[url.find("://").expect("a URL") + 3..];
    let rest = &rest[rest.rfind('@').map_or(0, |i| i + 1)..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    &rest[..end]
}

fn replace_host(url: &str, host: &str) -> String {
    url.replacen(host_of(url), host, 1)
}

/// The URL with its path (keyspace, database) replaced.
fn replace_path(url: &str, path: &str) -> String {
    let host = host_of(url);
    let at = url.find(host).expect("host in URL") + host.len();
    let query = url[at..].find('?').map_or("", |i| &url[at + i..]);
    format!("{}/{path}{query}", &url[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten_for_the_proxy() {
        let mongo = "mongodb://127.0.0.1:27017/photon_test?directConnection=true";
        assert_eq!(host_of(mongo), "127.0.0.1:27017");
        assert_eq!(
            replace_path(mongo, "x"),
            "mongodb://127.0.0.1:27017/x?directConnection=true"
        );
        assert_eq!(
            replace_host(mongo, "127.0.0.1:5"),
            "mongodb://127.0.0.1:5/photon_test?directConnection=true"
        );
        assert_eq!(
            replace_path("cassandra://127.0.0.1:9042/photon_test", "k"),
            "cassandra://127.0.0.1:9042/k"
        );
        assert_eq!(host_of("kafka://127.0.0.1:9092"), "127.0.0.1:9092");
    }
}
