//! The connection and the state every clone of a store shares: the session with its prepared
//! statements (made on first use), this process's cache of what it knows of each stream, and
//! the constants the other modules share.
//!
//! This module connects and remembers; what an append or a read means is `writer` and
//! `reader`, and the keyspace's layout is `schema`. Nothing here reaches up into the crate root.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use photon_api::validate::StoredId;
use photon_api::{Error, Health, StreamId, Timestamp, Uuid, Version};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::unprepared::Statement;
use scylla::value::CqlTimeuuid;
use tokio::sync::OnceCell;

use crate::codec;
use crate::config::CassandraConfig;
use crate::durability::{self, Durability};
use crate::error;
use crate::indexer::{IndexQueue, MarkerQueue};
use crate::schema::{self, RegisterStatements, Statements};

/// The backend name, also the tag of its checkpoints.
pub const BACKEND: &str = "cassandra";

/// This backend's metric labels, `backend="cassandra"`.
static LABELS: photon_api::telemetry::Labels = photon_api::telemetry::Labels::new(BACKEND);

/// This backend's spans and metrics.
pub(crate) static TELEMETRY: photon_api::telemetry::Telemetry =
    photon_api::telemetry::Telemetry::new(&LABELS);

/// Commits fetched per page of a read or a subscription, at most (`LIMIT` of each page's
/// `SELECT`; fewer when they would not fit in `page_bytes`): memory holds one page however long
/// the stream or category.
pub const COMMITS_PER_PAGE: i32 = 64;

/// The category key under which the all stream is kept in the category tables.
pub(crate) const ALL: &str = "$all";

/// How long live readers pause between polls when nothing is new (doubling up to
/// [`MAX_POLL`] while nothing comes).
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// The longest pause of a live reader between polls.
pub(crate) const MAX_POLL: Duration = Duration::from_millis(500);

/// Streams whose metadata is cached, at most; beyond it the cache is emptied (it is rebuilt
/// from the table on demand).
const META_CACHE_STREAMS: usize = 10_000;

/// Time buckets remembered as registered, and streams as listed, at most each; beyond, the set
/// is emptied (one registered or listed again costs one idempotent write).
const REGISTERED_BUCKETS: usize = 10_000;

/// A first connection fetches the cluster's metadata, which a node that just started can be
/// slow to give: connecting may take at least this long, whatever `timeout_ms` says.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema agreement after creating tables may take at least this long.
const MIN_SCHEMA_AGREEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Event ids kept per stream, at most, of its latest commits: enough to recognise the re-send
/// of a recent append without a read (16 bytes each). Older ids are read from the stream when
/// a batch must be checked against them (see `writer`).
const RECENT_IDS: usize = 64;

/// Latest commits kept per stream, at most.
const RECENT_COMMITS: usize = 16;

/// One of a stream's latest commits, as this process knows it.
#[derive(Clone)]
struct RecentCommit {
    first: u64,
    time_id: Uuid,
    ids: Arc<[Uuid]>,
}

/// What this process knows of one stream: where its next commit goes, the time of its last
/// commit, and the ids of its latest commits. Bounded whatever the stream's length, so an
/// append copies and keeps a few hundred bytes of it, not every id the stream holds.
#[derive(Default, Clone)]
pub(crate) struct StreamMeta {
    pub(crate) next_first: u64,
    pub(crate) last_time: i64,
    /// The latest commits, oldest first: at most `RECENT_COMMITS`, with at most `RECENT_IDS`
    /// ids in all (a commit with more is not kept).
    recent: VecDeque<RecentCommit>,
    recent_ids: usize,
    /// The time id of the void (a repair's fence) at `next_first`, if one was seen there: the
    /// next commit replaces it, conditionally on that time id.
    pub(crate) void: Option<Uuid>,
}

impl StreamMeta {
    /// Records a commit of `ids` from `first`, the stream's new head, with `time_id`.
    pub(crate) fn push(&mut self, first: u64, time_id: Uuid, ids: Arc<[Uuid]>) {
        self.next_first = first + ids.len() as u64;
        self.last_time = self.last_time.max(codec::time_micros(&time_id));
        self.void = None;
        self.recent_ids += ids.len();
        self.recent.push_back(RecentCommit {
            first,
            time_id,
            ids,
        });
        while self.recent_ids > RECENT_IDS || self.recent.len() > RECENT_COMMITS {
            let Some(old) = self.recent.pop_front() else {
                break;
            };
            self.recent_ids -= old.ids.len();
        }
    }

    /// Whether the latest commits kept are the whole stream: then an id not among them is not
    /// stored in it.
    pub(crate) fn knows_every_id(&self) -> bool {
        self.recent
            .front()
            .map_or(self.next_first == 0, |c| c.first == 0)
    }

    /// Where `id` is stored, if among the latest commits kept.
    pub(crate) fn stored(&self, id: &Uuid) -> Option<StoredId> {
        self.recent.iter().find_map(|c| {
            let i = c.ids.iter().position(|x| x == id)?;
            Some(StoredId {
                version: Version(c.first + i as u64),
                batch_first: Version(c.first),
                batch_len: c.ids.len(),
            })
        })
    }

    /// The time id of the commit from `first`, if among the latest commits kept.
    pub(crate) fn time_of(&self, first: u64) -> Option<Uuid> {
        self.recent
            .iter()
            .find(|c| c.first == first)
            .map(|c| c.time_id)
    }

    /// What this holds, in bytes (about).
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.recent.len() * (std::mem::size_of::<RecentCommit>() + 16)
            + self.recent_ids * std::mem::size_of::<Uuid>()
    }
}

/// How long a reading of the server's clock is trusted before an append reads it again.
const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Readings of the server's clock per check; the one with the shortest round trip is kept.
const CLOCK_SAMPLES: usize = 3;

/// The server's clock against this machine's, as last read.
#[derive(Clone, Copy, Debug)]
struct ClockReading {
    taken: Instant,
    /// The server's clock minus the machine's, µs (at the round trip's middle).
    server_ahead: i64,
    /// The round trip of the reading, µs: the reading is good to half of it (and the server's
    /// millisecond).
    round_trip: i64,
}

impl ClockReading {
    /// How far the reading may be off, µs: half its round trip and the server's millisecond.
    fn doubt(&self) -> i64 {
        self.round_trip / 2 + 1_000
    }
}

/// What every clone of a store shares.
pub(crate) struct Shared {
    pub(crate) config: CassandraConfig,
    ready: OnceCell<(Session, Statements)>,
    /// The statements of `registers`, made on the first register call (the table is not
    /// needed to connect); a failed attempt is not kept, so the next call tries again.
    registers: OnceCell<RegisterStatements>,
    meta: Mutex<HashMap<String, StreamMeta>>,
    crash_after_commit: AtomicBool,
    /// µs added to the machine's clock (`CassandraStore::set_clock_offset_ms`, for tests).
    clock_offset: AtomicI64,
    /// The last reading of the server's clock (one check at a time).
    clock: tokio::sync::Mutex<Option<ClockReading>>,
    /// What a crash does to an acknowledged append, as read at connect.
    durability: OnceLock<Durability>,
    /// Appends waiting for their pending markers (see `indexer`).
    pub(crate) marker_queue: MarkerQueue,
    /// Committed appends waiting for their category rows (see `indexer`).
    pub(crate) index_queue: IndexQueue,
    /// The time buckets (category or `$all`, bucket) this process registered: rows of
    /// `category_buckets` are never removed, so each is written once per process.
    registered: Mutex<HashSet<(String, i64)>>,
    /// The streams this process listed in `streams` (rows never removed either).
    listed: Mutex<HashSet<String>>,
}

impl Shared {
    pub(crate) fn new(config: CassandraConfig) -> Self {
        Self {
            config,
            ready: OnceCell::new(),
            registers: OnceCell::new(),
            meta: Mutex::default(),
            crash_after_commit: AtomicBool::new(false),
            clock_offset: AtomicI64::new(0),
            clock: tokio::sync::Mutex::new(None),
            durability: OnceLock::new(),
            marker_queue: MarkerQueue::default(),
            index_queue: IndexQueue::default(),
            registered: Mutex::default(),
            listed: Mutex::default(),
        }
    }

    /// Whether this process listed `stream` in `streams`.
    pub(crate) fn stream_listed(&self, stream: &str) -> bool {
        self.listed.lock().expect("listed streams").contains(stream)
    }

    /// Records that `stream` is listed in `streams`.
    pub(crate) fn remember_listed(&self, stream: &str) {
        let mut listed = self.listed.lock().expect("listed streams");
        if listed.len() >= REGISTERED_BUCKETS {
            listed.clear();
        }
        listed.insert(stream.to_owned());
    }

    /// Whether this process registered time bucket `tb` of `category` (and of `$all`).
    pub(crate) fn bucket_registered(&self, category: &str, tb: i64) -> bool {
        self.registered
            .lock()
            .expect("registered buckets")
            .contains(&(category.to_owned(), tb))
    }

    /// Records that time bucket `tb` of `category` and of `$all` are registered.
    pub(crate) fn remember_bucket(&self, category: &str, tb: i64) {
        let mut registered = self.registered.lock().expect("registered buckets");
        if registered.len() >= REGISTERED_BUCKETS {
            registered.clear();
        }
        registered.insert((category.to_owned(), tb));
    }

    /// The session and prepared statements, connecting and creating the schema on first use.
    /// Connecting also reads what a crash does to an acknowledged append: a warning when one can
    /// be lost, a refusal (and no session kept) with `require_durable=true`.
    pub(crate) async fn ready(&self) -> Result<&(Session, Statements), Error> {
        self.ready
            .get_or_try_init(|| async {
                let ready = connect(&self.config).await?;
                let found = durability::read(&ready.0, &self.config).await?;
                durability::accept(&found, &self.config)?;
                let _ = self.durability.set(found);
                Ok(ready)
            })
            .await
    }

    /// The session and prepared statements if connected, without connecting.
    pub(crate) fn connected(&self) -> Option<&(Session, Statements)> {
        self.ready.get()
    }

    /// The session and the statements of `registers`, creating the table on first use when it
    /// is missing and creation is on (see `schema::prepare_register_statements`).
    pub(crate) async fn registers_ready(&self) -> Result<(&Session, &RegisterStatements), Error> {
        let (session, _) = self.ready().await?;
        let statements = self
            .registers
            .get_or_try_init(|| schema::prepare_register_statements(session, &self.config))
            .await?;
        Ok((session, statements))
    }

    /// The stream partition (`bucket` of `commits`) holding the commit that starts at `version`.
    pub(crate) fn bucket_of(&self, version: u64) -> i64 {
        (version / self.config.bucket_size) as i64
    }

    /// The category partition (`bucket` of `category_commits`) of a time, in µs.
    pub(crate) fn time_bucket_of(&self, micros: i64) -> i64 {
        micros.div_euclid(self.config.time_bucket_micros())
    }

    /// What this process knows of `stream`, possibly nothing (a default).
    pub(crate) fn cached_meta(&self, stream: &StreamId) -> StreamMeta {
        self.meta
            .lock()
            .expect("meta lock")
            .get(stream.as_str())
            .cloned()
            .unwrap_or_default()
    }

    /// Keeps `meta` unless the cache already knows more of the stream.
    pub(crate) fn remember(&self, stream: &StreamId, meta: &StreamMeta) {
        let mut cache = self.meta.lock().expect("meta lock");
        if cache.len() >= META_CACHE_STREAMS && !cache.contains_key(stream.as_str()) {
            cache.clear();
        }
        let known = cache.entry(stream.as_str().to_owned()).or_default();
        if meta.next_first >= known.next_first {
            *known = meta.clone();
        }
    }

    /// What the stream cache holds, in bytes (about): see `CassandraStore::stream_cache_bytes`.
    pub(crate) fn stream_cache_bytes(&self) -> usize {
        let cache = self.meta.lock().expect("meta lock");
        cache
            .iter()
            .map(|(name, meta)| name.len() + meta.bytes())
            .sum()
    }

    /// This store's clock, µs since the Unix epoch: the machine's, moved by the offset tests
    /// set. Every time id, horizon and marker age is read from it.
    pub(crate) fn now_micros(&self) -> i64 {
        Timestamp::now().unix_micros() + self.clock_offset.load(Ordering::Relaxed)
    }

    /// Refuses to write while this store's clock and the server's differ by more than
    /// `CassandraConfig::max_clock_skew` (README, "Clocks"): a writer behind gives its appends
    /// time ids that readers may have passed (they would never be delivered live), one ahead
    /// holds its stream's later commits back from every reader. The server's clock is read
    /// (`now()` of the node that answers) at most every `CLOCK_CHECK_EVERY`; the machine's
    /// clock and the test offset are compared with it at every call.
    ///
    /// # Errors
    /// - `InvalidInput` naming the skew, its direction and the bound, when beyond it.
    /// - `Unavailable` or `Backend` when the server's clock cannot be read.
    pub(crate) async fn check_clock(&self) -> Result<(), Error> {
        let reading = self.clock_reading().await?;
        let skew = self.clock_offset.load(Ordering::Relaxed) - reading.server_ahead;
        // Refuse only a skew certainly beyond the bound.
        let doubt = reading.doubt();
        let bound = self.config.max_clock_skew().as_micros() as i64;
        if skew.abs() <= bound + doubt {
            return Ok(());
        }
        let ms = |micros: i64| micros.abs() / 1_000;
        Err(Error::InvalidInput {
            what: format!(
                "the clock of this client against the Cassandra node it reads ({})",
                self.config.contact_points.join(",")
            ),
            reason: format!(
                "it is {} ms {} the server's (read to within {} ms); photon-cassandra refuses to write while a writer's clock is more than {} ms (settle_ms / 4) off the server's, since category readers could pass its appends (behind) or be held back by them (ahead): set the clock right (NTP), or raise settle_ms",
                ms(skew),
                if skew < 0 { "behind" } else { "ahead of" },
                ms(doubt),
                ms(bound),
            ),
        })
    }

    /// The present for a category reader, µs: this store's clock, or the server's when this
    /// one runs ahead of it. A reader ahead would pass times at which writers are still
    /// writing their markers; one behind only waits longer. So readers' clocks need no bound.
    ///
    /// # Errors
    /// - `Unavailable` or `Backend` when the server's clock cannot be read.
    pub(crate) async fn reader_now(&self) -> Result<i64, Error> {
        let reading = self.clock_reading().await?;
        let skew = self.clock_offset.load(Ordering::Relaxed) - reading.server_ahead;
        // Only what is certainly ahead: a reading distorted by a slow answer (half its round
        // trip of doubt) must not hold the reader back for the next 10 s.
        Ok(self.now_micros() - (skew - reading.doubt()).max(0))
    }

    /// The last reading of the server's clock, read again when older than
    /// `CLOCK_CHECK_EVERY`.
    async fn clock_reading(&self) -> Result<ClockReading, Error> {
        let mut last = self.clock.lock().await;
        match *last {
            Some(r) if r.taken.elapsed() < CLOCK_CHECK_EVERY => Ok(r),
            _ => {
                let r = self.read_server_clock().await?;
                *last = Some(r);
                Ok(r)
            }
        }
    }

    /// Reads the server's clock a few times, keeping the reading with the shortest round trip.
    async fn read_server_clock(&self) -> Result<ClockReading, Error> {
        let (session, _) = self.ready().await?;
        let context = "reading the server's clock (SELECT now() FROM system.local)";
        let mut statement = Statement::new("SELECT now() FROM system.local");
        statement.set_request_timeout(Some(self.config.timeout));
        let mut best: Option<ClockReading> = None;
        for _ in 0..CLOCK_SAMPLES {
            let before = Timestamp::now().unix_micros();
            let (now,) = session
                .query_unpaged(statement.clone(), ())
                .await
                .map_err(|e| error::request(context, e))?
                .into_rows_result()
                .map_err(|e| error::driver(context, e))?
                .single_row::<(CqlTimeuuid,)>()
                .map_err(|e| error::driver(context, e))?;
            let after = Timestamp::now().unix_micros();
            let reading = ClockReading {
                taken: Instant::now(),
                server_ahead: codec::time_micros(&Uuid::from(now)) - (before + after) / 2,
                round_trip: after - before,
            };
            if best.is_none_or(|b| reading.round_trip < b.round_trip) {
                best = Some(reading);
            }
        }
        Ok(best.expect("at least one sample"))
    }

    /// See `CassandraStore::set_clock_offset_ms`.
    pub(crate) fn set_clock_offset_ms(&self, offset_ms: i64) {
        self.clock_offset
            .store(offset_ms.saturating_mul(1_000), Ordering::Relaxed);
    }

    /// See `CassandraStore::set_crash_after_commit`.
    pub(crate) fn set_crash_after_commit(&self, on: bool) {
        self.crash_after_commit.store(on, Ordering::SeqCst);
    }

    pub(crate) fn crash_after_commit(&self) -> bool {
        self.crash_after_commit.load(Ordering::SeqCst)
    }

    /// The server's release, read through the store's session, and what a crash does to an
    /// acknowledged append (the settings read at connect, in words).
    pub(crate) async fn health(&self) -> Result<Health, Error> {
        let (session, _) = self.ready().await?;
        let context = "reading the release for health";
        let (version,) = session
            .query_unpaged("SELECT release_version FROM system.local", ())
            .await
            .map_err(|e| error::request(context, e))?
            .into_rows_result()
            .map_err(|e| error::driver(context, e))?
            .single_row::<(String,)>()
            .map_err(|e| error::driver(context, e))?;
        Ok(Health {
            backend: BACKEND,
            detail: format!(
                "{} (release {version}), keyspace {}; {}",
                self.config.contact_points.join(","),
                self.config.keyspace,
                self.durability
                    .get()
                    .map_or_else(|| "durability not read".to_owned(), ToString::to_string)
            ),
        })
    }
}

/// Connects, creates the schema when allowed (or checks it), and prepares the statements.
async fn connect(config: &CassandraConfig) -> Result<(Session, Statements), Error> {
    let bound = config.timeout.max(MIN_CONNECT_TIMEOUT);
    let session = tokio::time::timeout(bound, session_builder(config)?.build())
        .await
        .map_err(|e| error::connect_timeout(&config.contact_points, bound, e))?
        .map_err(|e| error::connecting(&config.contact_points, config.tls, e))?;
    schema::create_or_check(&session, config).await?;
    let statements = schema::prepare_statements(&session, config).await?;
    Ok((session, statements))
}

/// A session builder with the store's client settings: the contact points, the timeouts, the
/// credentials, the preferred datacenter and TLS of `config`. Tools that talk to the store's
/// keyspace directly (the benchmark's raw baseline) connect with it, as the store does.
///
/// # Errors
/// - [`Error::InvalidInput`] when the TLS settings cannot be used (a CA file that does not
///   load).
pub fn session_builder(config: &CassandraConfig) -> Result<SessionBuilder, Error> {
    let mut b = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .connection_timeout(config.timeout)
        .schema_agreement_timeout(config.timeout.max(MIN_SCHEMA_AGREEMENT_TIMEOUT))
        .metadata_request_serverside_timeout(config.timeout)
        .hostname_resolution_timeout(Some(config.timeout));
    if let Some((user, password)) = &config.credentials {
        b = b.user(user, password);
    }
    if let Some(dc) = &config.local_dc {
        b = b.prefer_datacenter(dc.clone());
    }
    if config.tls {
        b = b.tls_context(Some(tls_context(config)?));
    }
    Ok(b)
}

/// TLS verifying the servers against `tls_ca`, or the system's CAs.
fn tls_context(config: &CassandraConfig) -> Result<openssl::ssl::SslContext, Error> {
    use openssl::ssl::{SslContextBuilder, SslMethod, SslVerifyMode};
    // A setting that does not load is the caller's to fix: named, with OpenSSL's reason.
    let invalid = |e: openssl::error::ErrorStack| Error::InvalidInput {
        what: format!("TLS settings of {config:?}"),
        reason: e.to_string(),
    };
    let mut ctx = SslContextBuilder::new(SslMethod::tls()).map_err(invalid)?;
    match &config.tls_ca {
        Some(ca) => ctx.set_ca_file(ca).map_err(invalid)?,
        None => {
            // OpenSSL's default paths are those of its build: the vendored one looks under
            // /usr/local/ssl, which a system rarely has. So the system's bundle and hashed
            // directories are found where the distribution keeps them (SSL_CERT_FILE and
            // SSL_CERT_DIR first), and the default paths loaded too.
            ctx.set_default_verify_paths().map_err(invalid)?;
            let found = openssl_probe::probe();
            if let Some(file) = &found.cert_file {
                ctx.load_verify_locations(Some(file), None)
                    .map_err(invalid)?;
            }
            for dir in &found.cert_dir {
                ctx.load_verify_locations(None, Some(dir))
                    .map_err(invalid)?;
            }
        }
    }
    ctx.set_verify(SslVerifyMode::PEER);
    Ok(ctx.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tls=true` without `tls_ca` trusts the system's CAs even where nothing points OpenSSL at
    /// them: the vendored OpenSSL's default paths are under /usr/local/ssl, which does not exist
    /// here, so without SSL_CERT_FILE/SSL_CERT_DIR its store was empty. Runs the check below in
    /// a child process (this test binary) with those variables removed.
    #[test]
    fn tls_without_a_ca_file_trusts_the_system_bundle() {
        if !std::path::Path::new("/etc/ssl/certs").is_dir() {
            eprintln!("no /etc/ssl/certs: nothing to check");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "client::tests::tls_true_loads_a_trust_store"])
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .env_remove("NIX_SSL_CERT_FILE")
            .output()
            .expect("runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
    }

    /// Run as is (with whatever SSL_CERT_* this machine sets) and, by the test above, again in a
    /// child process without them.
    #[test]
    fn tls_true_loads_a_trust_store() {
        let config = CassandraConfig::from_url("cassandra://127.0.0.1:9142/photon?tls=true")
            .expect("a valid URL");
        assert!(config.tls && config.tls_ca.is_none(), "{config:?}");
        let ctx = tls_context(&config).expect("loads");
        let trusted = ctx.cert_store().all_certificates().len();
        assert!(trusted > 0, "no trusted CA loaded");
    }
}
