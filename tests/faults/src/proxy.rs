//! An in-process TCP fault proxy for fault-injection tests against real servers.
//!
//! A test puts a [`FaultProxy`] between a client and a server on loopback and points the client's
//! URL at [`FaultProxy::local_addr`]. The proxy then injects the faults a networked event store must
//! survive: latency, a stalled link, cut connections, refused connections, and one request held
//! back until the test lets it go ([`FaultProxy::hold_next`]).
//!
//! This module owns only the proxy's sockets and tasks. It never parses a wire protocol: it sees
//! byte chunks, so "a request" is whatever chunk contains the test's byte pattern.
//!
//! Every accepted connection gets two pump tasks, client→server and server→client. A pump reads a
//! chunk, lets a matching hold claim it (the reading stops there), and queues it; beside the
//! reading, the pump takes the queue in order, waits out the latency (counted from the chunk's
//! arrival), waits out a stall, and writes the chunk. Because one queue carries one direction in
//! order, no fault can reorder or lose bytes; past [`CHUNKS_IN_FLIGHT`] queued chunks, bytes not
//! yet read stay in the kernel's buffers, which is also what applies back-pressure to the sender.
//! Every wait is raced against the cut signal, so a cut closes a connection at once whatever its
//! pumps are waiting for.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Read buffer of one pump: large enough that bulk transfers (a few MiB) are not slowed down by the
/// per-chunk work, small enough that a few hundred connections stay cheap.
const CHUNK_SIZE: usize = 64 * 1024;

/// How long a proxied connection waits for the upstream to accept before giving up and closing the
/// client side; a test server that is down should show up as a closed connection, not a hang.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunks read but not yet written, per direction of a connection: while a latency or a stall
/// holds them, more than this waits in the kernel's buffers (back-pressure on the sender).
const CHUNKS_IN_FLIGHT: usize = 256;

/// Pause after a failed `accept` (for example too many open files) so the accept loop cannot spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

/// A TCP proxy on loopback that forwards to one upstream and injects faults on command.
///
/// Why it exists: the fault tests of the Kafka, Cassandra and MongoDB backends need to break the
/// network between the store and a real server in controlled, repeatable ways, without root
/// privileges or `tc`/`iptables`.
///
/// All fault controls take `&self` and act at once, on current connections and on connections
/// accepted later. Dropping the proxy stops accepting and closes every proxied connection.
pub struct FaultProxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept_task: JoinHandle<()>,
    runtime: tokio::runtime::Handle,
}

/// State shared by the handle, the accept loop and every pump.
struct Shared {
    upstream: String,
    /// Extra delay of every chunk, in nanoseconds (an atomic so pumps read it without locking).
    latency_nanos: AtomicU64,
    /// `true` while traffic is stalled; pumps wait on it before each write.
    stalled: watch::Sender<bool>,
    /// Bumped by every `stall`/`resume`, so a `stall_for` timer only ends its own stall.
    stall_generation: AtomicU64,
    refusing: AtomicBool,
    /// Cut epoch and shutdown flag; pumps race every wait against it.
    control: watch::Sender<Control>,
    /// Holds registered by `hold_next` that no chunk has matched yet, oldest first.
    pending_holds: Mutex<Vec<Arc<HoldState>>>,
    /// Longest pattern ever registered, which sets how many bytes a pump carries over between
    /// chunks so that a pattern split across two reads still matches.
    longest_pattern: AtomicUsize,
    open_connections: AtomicUsize,
    bytes_forwarded: AtomicU64,
    next_connection_id: AtomicU64,
    /// Patterns registered by `count`, each with its number of occurrences so far.
    counters: Mutex<Vec<Arc<CounterState>>>,
}

/// What every connection watches to learn that it must close.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// Incremented by `cut`; a connection accepted at epoch `e` closes once the epoch exceeds `e`.
    cut_epoch: u64,
    /// Set when the `FaultProxy` is dropped.
    closed: bool,
}

impl Control {
    fn closes(&self, epoch: u64) -> bool {
        self.closed || self.cut_epoch > epoch
    }
}

impl FaultProxy {
    /// Listens on `listen` (e.g. `"127.0.0.1:0"` or a fixed `"127.0.0.1:29092"`) and forwards every
    /// accepted connection to `upstream` (e.g. `"127.0.0.1:9042"`).
    ///
    /// The upstream is connected per accepted connection, not here, so the proxy can be started
    /// before the server. If the upstream cannot be reached, that client connection is closed.
    ///
    /// # Errors
    /// - The listen address cannot be parsed or bound (for example the port is taken).
    pub async fn start(listen: &str, upstream: &str) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            latency_nanos: AtomicU64::new(0),
            stalled: watch::Sender::new(false),
            stall_generation: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            control: watch::Sender::new(Control::default()),
            pending_holds: Mutex::new(Vec::new()),
            longest_pattern: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
            bytes_forwarded: AtomicU64::new(0),
            next_connection_id: AtomicU64::new(0),
            counters: Mutex::new(Vec::new()),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        tracing::debug!(%local_addr, upstream, "fault proxy started");
        Ok(FaultProxy {
            shared,
            local_addr,
            accept_task,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The address the proxy listens on, so a test can build the client's URL (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Delays every chunk, in both directions, by `d` from when the proxy read it; `Duration::ZERO`
    /// turns latency off.
    ///
    /// Chunks are delayed side by side, as on a long link: a busy connection's chunks each arrive
    /// `d` after they were sent, in order, not one `d` apart.
    pub fn set_latency(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shared.latency_nanos.store(nanos, Ordering::Relaxed);
        tracing::debug!(latency = ?d, "fault proxy latency set");
    }

    /// Holds all traffic, on every connection and in both directions, including connections
    /// accepted later, until [`resume`](Self::resume). Nothing is lost or reordered.
    ///
    /// New connections are still accepted and connected upstream; only their bytes wait. A chunk
    /// whose write had already begun when the stall started is finished.
    pub fn stall(&self) {
        self.shared.stall_generation.fetch_add(1, Ordering::Relaxed);
        self.shared.stalled.send_replace(true);
        tracing::debug!("fault proxy stalled");
    }

    /// Ends a stall; held traffic flows again in its original order.
    pub fn resume(&self) {
        self.shared.stall_generation.fetch_add(1, Ordering::Relaxed);
        self.shared.stalled.send_replace(false);
        tracing::debug!("fault proxy resumed");
    }

    /// Stalls now and resumes after `d`, without the test having to spawn a timer.
    ///
    /// A later `stall`, `resume` or `stall_for` takes over: this timer then does nothing, so it can
    /// never end a stall it did not start.
    pub fn stall_for(&self, d: Duration) {
        self.stall();
        let generation = self.shared.stall_generation.load(Ordering::Relaxed);
        // Weak, so a pending timer does not keep a dropped proxy's state alive.
        let shared = Arc::downgrade(&self.shared);
        self.runtime.spawn(async move {
            tokio::time::sleep(d).await;
            if let Some(shared) = shared.upgrade() {
                if shared
                    .stall_generation
                    .compare_exchange(
                        generation,
                        generation + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    shared.stalled.send_replace(false);
                    tracing::debug!(after = ?d, "fault proxy resumed by stall_for");
                }
            }
        });
    }

    /// Closes every current connection at once, both the client and the upstream socket, with an
    /// abortive close (RST), even while its pumps are stalled or held.
    ///
    /// Connections accepted afterwards work normally; this models a network blip or a server
    /// restart, not an outage (use [`refuse`](Self::refuse) for that).
    pub fn cut(&self) {
        self.shared.control.send_modify(|c| c.cut_epoch += 1);
        tracing::debug!("fault proxy cut all connections");
    }

    /// While `yes`, new connections are accepted and reset at once (the client sees a reset or
    /// EOF); existing connections keep working. `refuse(false)` accepts normally again.
    pub fn refuse(&self, yes: bool) {
        self.shared.refusing.store(yes, Ordering::Relaxed);
        tracing::debug!(refusing = yes, "fault proxy refuse set");
    }

    /// Holds the next client→server chunk that contains `pattern`, and everything after it on that
    /// connection in that direction, until the returned [`Hold`] is released or dropped.
    ///
    /// Why: to freeze one specific request (say, a commit) in flight, so a test can observe what the
    /// store does while it is outstanding. Other connections, and the server→client direction of
    /// the held one, keep flowing.
    ///
    /// The pattern is searched across chunk boundaries of one connection (the last
    /// `pattern.len() - 1` bytes are carried over), and the whole chunk in which the match ends is
    /// held. An empty pattern matches the next chunk of any connection. Several holds match in the
    /// order they were registered, each one chunk.
    pub fn hold_next(&self, pattern: &[u8]) -> Hold {
        let state = Arc::new(HoldState {
            pattern: pattern.to_vec(),
            matched: watch::Sender::new(false),
            decision: watch::Sender::new(Decision::Pending),
        });
        self.shared
            .longest_pattern
            .fetch_max(pattern.len(), Ordering::Relaxed);
        self.shared
            .pending_holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&state));
        tracing::debug!(pattern = %String::from_utf8_lossy(pattern), "fault proxy hold registered");
        Hold { state }
    }

    /// Counts, from now on, the occurrences of `pattern` in what clients send (every connection),
    /// so a test can tell how many requests of a kind a call made (say, MongoDB's `insert`
    /// commands, whose body starts with the key `insert`). Matched across chunk boundaries as
    /// [`Self::hold_next`] does.
    pub fn count(&self, pattern: &[u8]) -> Counter {
        let state = Arc::new(CounterState {
            pattern: pattern.to_vec(),
            seen: AtomicUsize::new(0),
        });
        self.shared
            .longest_pattern
            .fetch_max(pattern.len(), Ordering::Relaxed);
        self.shared
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&state));
        Counter { state }
    }

    /// How many proxied connections are open now (client accepted and upstream connected), so a
    /// test can wait until its client has actually connected, or has noticed a cut.
    pub fn connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::Relaxed)
    }

    /// Bytes written to either side so far, both directions summed, so a test can check that
    /// traffic really went through the proxy.
    pub fn bytes_forwarded(&self) -> u64 {
        self.shared.bytes_forwarded.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.shared.upstream)
            .field("connections", &self.connections())
            .field("latency", &self.shared.latency())
            .field("stalled", &*self.shared.stalled.borrow())
            .field("refusing", &self.shared.refusing.load(Ordering::Relaxed))
            .field("bytes_forwarded", &self.bytes_forwarded())
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.shared.control.send_modify(|c| c.closed = true);
        tracing::debug!(local_addr = %self.local_addr, "fault proxy dropped");
    }
}

/// One request held back by [`FaultProxy::hold_next`].
///
/// Dropping it without calling [`release`](Self::release) or
/// [`drop_connection`](Self::drop_connection) releases it, so a failing test never wedges a
/// connection forever.
pub struct Hold {
    state: Arc<HoldState>,
}

/// What the pump holding a chunk waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Pending,
    Release,
    DropConnection,
}

struct HoldState {
    pattern: Vec<u8>,
    matched: watch::Sender<bool>,
    decision: watch::Sender<Decision>,
}

impl HoldState {
    fn is_pending(&self) -> bool {
        *self.decision.borrow() == Decision::Pending
    }

    /// Records the test's decision; only the first one counts.
    fn decide(&self, decision: Decision) {
        self.decision.send_if_modified(|d| {
            if *d == Decision::Pending {
                *d = decision;
                true
            } else {
                false
            }
        });
    }

    async fn decided(&self) -> Decision {
        let mut rx = self.decision.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait. The `let` ends
        // the borrow of `rx` (held by the returned `Ref`) before `rx` is dropped.
        let decision = match rx.wait_for(|d| *d != Decision::Pending).await {
            Ok(d) => *d,
            Err(_) => Decision::Release,
        };
        decision
    }
}

impl Hold {
    /// Resolves once a chunk matched, i.e. the held request has reached the proxy; a test awaits
    /// this before asserting what the client does while its request is outstanding.
    pub async fn matched(&self) {
        let mut rx = self.state.matched.subscribe();
        // The sender lives in `self.state`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|m| *m).await;
    }

    /// Whether a chunk has matched yet, for polling without awaiting.
    pub fn is_matched(&self) -> bool {
        *self.state.matched.borrow()
    }

    /// Forwards the held chunk and lets the connection flow again, in order.
    ///
    /// Before a match, this cancels the hold: no chunk will be held.
    pub fn release(self) {
        tracing::debug!("fault proxy hold released");
        self.state.decide(Decision::Release);
    }

    /// Discards the held chunk and closes that connection (both sockets, abortively), modelling a
    /// request lost together with its connection.
    ///
    /// Before a match, this cancels the hold: no chunk will be held and no connection closed.
    pub fn drop_connection(self) {
        tracing::debug!("fault proxy hold drops its connection");
        self.state.decide(Decision::DropConnection);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.state.decide(Decision::Release);
    }
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold")
            .field("pattern", &String::from_utf8_lossy(&self.state.pattern))
            .field("matched", &self.is_matched())
            .field("decision", &*self.state.decision.borrow())
            .finish()
    }
}

impl Shared {
    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    /// Resolves when a connection accepted at `epoch` must close: cut or proxy dropped.
    async fn closes(&self, epoch: u64) {
        let mut rx = self.control.subscribe();
        // The sender lives in `self`, so an error cannot happen; treat it as "close" anyway.
        let _ = rx.wait_for(|c| c.closes(epoch)).await;
    }

    async fn wait_unstalled(&self) {
        if !*self.stalled.borrow() {
            return;
        }
        let mut rx = self.stalled.subscribe();
        let _ = rx.wait_for(|stalled| !*stalled).await;
    }

    /// Finds the oldest pending hold whose pattern ends inside `chunk` (with `carry`, the bytes
    /// before `chunk` on this connection, in front of it), marks it matched and takes it.
    fn claim_hold(&self, carry: &[u8], chunk: &[u8]) -> Option<Arc<HoldState>> {
        let mut pending = self
            .pending_holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Holds released or dropped before matching are cancelled.
        pending.retain(|h| h.is_pending());
        if pending.is_empty() {
            return None;
        }
        let mut window = Vec::with_capacity(carry.len() + chunk.len());
        window.extend_from_slice(carry);
        window.extend_from_slice(chunk);
        let index = pending.iter().position(|hold| {
            // At most `len - 1` carried bytes, so the match must end inside this chunk: a match
            // wholly inside the carry belonged to an earlier chunk.
            let back = hold.pattern.len().saturating_sub(1).min(carry.len());
            contains(&window[carry.len() - back..], &hold.pattern)
        })?;
        let hold = pending.remove(index);
        hold.matched.send_replace(true);
        Some(hold)
    }

    /// Adds the occurrences of each counted pattern that end inside `chunk`.
    fn count_matches(&self, carry: &[u8], chunk: &[u8]) {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        if counters.is_empty() {
            return;
        }
        let mut window = Vec::with_capacity(carry.len() + chunk.len());
        window.extend_from_slice(carry);
        window.extend_from_slice(chunk);
        for counter in counters.iter() {
            let len = counter.pattern.len();
            if len == 0 {
                continue;
            }
            let back = (len - 1).min(carry.len());
            let found = window[carry.len() - back..]
                .windows(len)
                .filter(|w| *w == counter.pattern.as_slice())
                .count();
            counter.seen.fetch_add(found, Ordering::Relaxed);
        }
    }

    /// Keeps the last `longest_pattern - 1` bytes of the stream in `carry`.
    fn update_carry(&self, carry: &mut Vec<u8>, chunk: &[u8]) {
        let keep = self
            .longest_pattern
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        if chunk.len() >= keep {
            carry.clear();
            carry.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else {
            carry.extend_from_slice(chunk);
            let excess = carry.len().saturating_sub(keep);
            carry.drain(..excess);
        }
    }
}

/// Occurrences of a pattern in what clients sent, from [`FaultProxy::count`].
pub struct Counter {
    state: Arc<CounterState>,
}

struct CounterState {
    pattern: Vec<u8>,
    seen: AtomicUsize,
}

impl Counter {
    /// How many times the pattern was sent since the counter was made.
    pub fn get(&self) -> usize {
        self.state.seen.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counter")
            .field("pattern", &String::from_utf8_lossy(&self.state.pattern))
            .field("seen", &self.get())
            .finish()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                if shared.refusing.load(Ordering::Relaxed) {
                    tracing::debug!(%peer, "fault proxy refused a connection");
                    reset(client);
                    continue;
                }
                // Taken at accept, so a cut while the upstream connect is under way closes it too.
                let epoch = shared.control.borrow().cut_epoch;
                tokio::spawn(serve_connection(Arc::clone(&shared), client, peer, epoch));
            }
            Err(error) => {
                tracing::debug!(%error, "fault proxy accept failed");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
            }
        }
    }
}

/// Closes a socket with RST instead of FIN, which is what a crashed peer or a dropped link looks
/// like to a client.
fn reset(stream: TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "fault proxy could not set SO_LINGER 0; closing normally");
    }
    drop(stream);
}

/// One proxied connection, shared by its two pumps; dropping the last pump's reference counts the
/// connection as closed.
struct Connection {
    id: u64,
    epoch: u64,
    /// Set when one pump fails or a hold drops the connection, so the other pump closes too.
    kill: watch::Sender<bool>,
    shared: Weak<Shared>,
}

impl Connection {
    /// Resolves when this connection must close abortively.
    async fn killed(&self, shared: &Shared) {
        let mut kill = self.kill.subscribe();
        tokio::select! {
            () = shared.closes(self.epoch) => {}
            _ = kill.wait_for(|k| *k) => {}
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.open_connections.fetch_sub(1, Ordering::Relaxed);
        }
        tracing::debug!(connection = self.id, "fault proxy connection closed");
    }
}

async fn serve_connection(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr, epoch: u64) {
    let connect = tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(shared.upstream.as_str()),
    );
    let server = tokio::select! {
        () = shared.closes(epoch) => {
            reset(client);
            return;
        }
        result = connect => match result {
            Ok(Ok(server)) => server,
            Ok(Err(error)) => {
                tracing::debug!(%peer, upstream = shared.upstream, %error, "fault proxy upstream connect failed");
                reset(client);
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, upstream = shared.upstream, "fault proxy upstream connect timed out");
                reset(client);
                return;
            }
        },
    };
    // Small request/response chunks must not wait for Nagle, or latency tests would measure it.
    for stream in [&client, &server] {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "fault proxy could not set TCP_NODELAY");
        }
    }
    let id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
    shared.open_connections.fetch_add(1, Ordering::Relaxed);
    let connection = Arc::new(Connection {
        id,
        epoch,
        kill: watch::Sender::new(false),
        shared: Arc::downgrade(&shared),
    });
    tracing::debug!(connection = id, %peer, upstream = shared.upstream, "fault proxy connection open");
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::spawn(pump(
        Arc::clone(&shared),
        Arc::clone(&connection),
        Direction::ServerToClient,
        server_read,
        client_write,
    ));
    pump(
        shared,
        connection,
        Direction::ClientToServer,
        client_read,
        server_write,
    )
    .await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ClientToServer,
    ServerToClient,
}

/// Why a pump's forwarding loop stopped.
enum PumpEnd {
    /// The reading side sent FIN: propagate it as a half-close.
    Eof,
    /// A hold dropped the connection.
    Dropped,
    /// Reading or writing failed (usually a reset by a peer): close the whole connection.
    Failed(io::Error),
    /// Cut, proxy dropped, or the other pump failed.
    Killed,
}

async fn pump(
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    direction: Direction,
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
) {
    let end = tokio::select! {
        biased;
        () = connection.killed(&shared) => PumpEnd::Killed,
        end = forward(&shared, direction, &mut read, &mut write) => end,
    };
    let id = connection.id;
    match end {
        PumpEnd::Eof => {
            tracing::debug!(connection = id, ?direction, "fault proxy propagating EOF");
            // A cut during the shutdown must still win.
            tokio::select! {
                biased;
                () = connection.killed(&shared) => abort(read, write),
                result = write.shutdown() => {
                    if let Err(error) = result {
                        tracing::debug!(connection = id, ?direction, %error, "fault proxy shutdown failed");
                    }
                }
            }
        }
        PumpEnd::Killed => abort(read, write),
        PumpEnd::Dropped => {
            connection.kill.send_replace(true);
            abort(read, write);
        }
        PumpEnd::Failed(error) => {
            tracing::debug!(connection = id, ?direction, %error, "fault proxy pump failed; closing connection");
            connection.kill.send_replace(true);
            abort(read, write);
        }
    }
}

/// Closes both sockets of this pump abortively. The other pump owns the other halves; the sockets
/// close (with RST) once both halves of each are gone, which the other pump does at once too.
fn abort(read: OwnedReadHalf, write: OwnedWriteHalf) {
    for stream in [read.as_ref(), write.as_ref()] {
        if let Err(error) = stream.set_zero_linger() {
            tracing::debug!(%error, "fault proxy could not set SO_LINGER 0");
        }
    }
    // `forget` skips the FIN that dropping a write half would send, so the peer sees only RST.
    write.forget();
    drop(read);
}

async fn forward(
    shared: &Shared,
    direction: Direction,
    read: &mut OwnedReadHalf,
    write: &mut OwnedWriteHalf,
) -> PumpEnd {
    // Read and write run side by side, so a latency delays each chunk from its arrival, as a
    // long link does, instead of spacing the chunks of a busy connection one latency apart.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let reading = async move {
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut carry = Vec::new();
        loop {
            let n = match read.read(&mut buf).await {
                Ok(0) => return PumpEnd::Eof,
                Ok(n) => n,
                Err(error) => return PumpEnd::Failed(error),
            };
            let arrived = Instant::now();
            let chunk = &buf[..n];
            if direction == Direction::ClientToServer {
                if let Some(hold) = shared.claim_hold(&carry, chunk) {
                    tracing::debug!(bytes = n, "fault proxy holding a chunk");
                    if hold.decided().await == Decision::DropConnection {
                        return PumpEnd::Dropped;
                    }
                }
                shared.count_matches(&carry, chunk);
                shared.update_carry(&mut carry, chunk);
            }
            if tx.send((arrived, chunk.to_vec())).await.is_err() {
                return PumpEnd::Killed;
            }
        }
    };
    let writing = async {
        while let Some((arrived, chunk)) = rx.recv().await {
            let latency = shared.latency();
            if !latency.is_zero() {
                tokio::time::sleep_until(arrived + latency).await;
            }
            shared.wait_unstalled().await;
            write.write_all(&chunk).await?;
            shared
                .bytes_forwarded
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        Ok::<(), io::Error>(())
    };
    tokio::pin!(reading, writing);
    let mut read_end = None;
    loop {
        tokio::select! {
            // What was read before the end (a FIN, a dropped hold, a reset) is still written,
            // as bytes already on the wire would arrive; then the end is passed on.
            end = &mut reading, if read_end.is_none() => read_end = Some(end),
            written = &mut writing => {
                return match written {
                    Err(error) => PumpEnd::Failed(error),
                    Ok(()) => read_end.unwrap_or(PumpEnd::Killed),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bound on every await that is expected to complete; generous so a loaded CI machine passes.
    const PATIENCE: Duration = Duration::from_secs(10);
    /// How long "nothing arrives" is watched for.
    const QUIET: Duration = Duration::from_millis(300);

    /// An echo server on an ephemeral loopback port; each connection echoes until EOF, then
    /// half-closes back.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    async fn proxy_to_echo() -> FaultProxy {
        let upstream = echo_server().await;
        FaultProxy::start("127.0.0.1:0", &upstream.to_string())
            .await
            .expect("start proxy")
    }

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        let stream = tokio::time::timeout(PATIENCE, TcpStream::connect(proxy.local_addr()))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
    }

    async fn send(stream: &mut TcpStream, bytes: &[u8]) {
        tokio::time::timeout(PATIENCE, stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    async fn receive(stream: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut buf))
            .await
            .expect("read timed out")
            .expect("read");
        buf
    }

    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) {
        send(stream, bytes).await;
        assert_eq!(receive(stream, bytes.len()).await, bytes);
    }

    /// Asserts that no byte arrives within `QUIET`.
    async fn assert_quiet(stream: &mut TcpStream) {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(QUIET, stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(result) => panic!("expected silence, got {result:?} ({:?})", &buf[..]),
        }
    }

    /// Asserts that the peer closed: reads return EOF or an error (reset) within `PATIENCE`.
    async fn assert_closed(stream: &mut TcpStream) {
        let mut buf = [0u8; 1024];
        let result = tokio::time::timeout(PATIENCE, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(result.is_ok(), "connection still open after {PATIENCE:?}");
    }

    async fn wait_for_connections(proxy: &FaultProxy, n: usize) {
        let waited = tokio::time::timeout(PATIENCE, async {
            while proxy.connections() != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "expected {n} connections, have {}",
            proxy.connections()
        );
    }

    /// Deterministic bytes that are not periodic at small scale, so a reordered or duplicated
    /// chunk shows up as a mismatch.
    fn payload(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_a_large_payload_intact_and_propagates_half_close() {
        let proxy = proxy_to_echo().await;
        let stream = connect(&proxy).await;
        let data = payload(4 * 1024 * 1024);
        let (mut r, mut w) = stream.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.expect("write payload");
            // The echo only finishes (and our read_to_end only ends) if this FIN is propagated
            // to the server and the server's FIN back to us.
            w.shutdown().await.expect("shutdown");
        });
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut echoed))
            .await
            .expect("echo timed out")
            .expect("read echo");
        tokio::time::timeout(PATIENCE, writer)
            .await
            .expect("writer timed out")
            .expect("writer");
        assert_eq!(echoed.len(), data.len());
        assert!(echoed == data, "payload corrupted or reordered");
        assert_eq!(proxy.bytes_forwarded(), 2 * data.len() as u64);
    }

    #[tokio::test]
    async fn latency_delays_a_round_trip_by_at_least_twice_the_latency() {
        let proxy = proxy_to_echo().await;
        let latency = Duration::from_millis(150);
        proxy.set_latency(latency);
        let mut stream = connect(&proxy).await;
        let started = Instant::now();
        round_trip(&mut stream, b"ping").await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= 2 * latency,
            "round trip took {elapsed:?}, latency is {latency:?} each way"
        );
    }

    #[tokio::test]
    async fn latency_delays_chunks_side_by_side_not_one_after_the_other() {
        let proxy = proxy_to_echo().await;
        let latency = Duration::from_millis(300);
        proxy.set_latency(latency);
        let mut stream = connect(&proxy).await;
        let started = Instant::now();
        // Five chunks 20 ms apart: each arrives about two latencies after it was sent, so all
        // are back after about 0.7 s; one latency per chunk and direction would take 3 s.
        let mut sent = Vec::new();
        for i in 0..5u8 {
            let chunk = [b'a' + i; 8];
            send(&mut stream, &chunk).await;
            sent.extend_from_slice(&chunk);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(receive(&mut stream, sent.len()).await, sent, "in order");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= 2 * latency && elapsed < 6 * latency,
            "five chunks took {elapsed:?} with {latency:?} each way"
        );
    }

    #[tokio::test]
    async fn an_end_of_stream_follows_the_chunks_still_waiting_out_the_latency() {
        let proxy = proxy_to_echo().await;
        proxy.set_latency(Duration::from_millis(200));
        let mut stream = connect(&proxy).await;
        send(&mut stream, b"last words").await;
        stream.shutdown().await.expect("half-close");
        // The echo server gets the bytes before the FIN, echoes them and closes back.
        assert_eq!(receive(&mut stream, 10).await, b"last words");
        assert_closed(&mut stream).await;
    }

    #[tokio::test]
    async fn stall_holds_all_traffic_and_delivers_it_in_order_after_resume() {
        let proxy = proxy_to_echo().await;
        let mut old = connect(&proxy).await;
        round_trip(&mut old, b"warm-up").await;

        proxy.stall();
        send(&mut old, b"one,").await;
        send(&mut old, b"two,").await;
        // A connection opened during the stall is stalled too.
        let mut new = connect(&proxy).await;
        send(&mut new, b"new").await;
        assert_quiet(&mut old).await;
        assert_quiet(&mut new).await;
        send(&mut old, b"three").await;
        assert_quiet(&mut old).await;

        proxy.resume();
        assert_eq!(receive(&mut old, 13).await, b"one,two,three");
        assert_eq!(receive(&mut new, 3).await, b"new");
    }

    #[tokio::test]
    async fn stall_for_resumes_by_itself() {
        let proxy = proxy_to_echo().await;
        let mut stream = connect(&proxy).await;
        round_trip(&mut stream, b"warm-up").await;
        proxy.stall_for(Duration::from_secs(2));
        send(&mut stream, b"later").await;
        assert_quiet(&mut stream).await;
        assert_eq!(receive(&mut stream, 5).await, b"later");
    }

    #[tokio::test]
    async fn cut_closes_open_connections_even_when_stalled_and_new_ones_work() {
        let proxy = proxy_to_echo().await;
        let mut idle = connect(&proxy).await;
        round_trip(&mut idle, b"hello").await;
        let mut stalled = connect(&proxy).await;
        round_trip(&mut stalled, b"hello").await;
        wait_for_connections(&proxy, 2).await;

        proxy.stall();
        send(&mut stalled, b"stuck").await;
        proxy.cut();
        assert_closed(&mut idle).await;
        assert_closed(&mut stalled).await;
        wait_for_connections(&proxy, 0).await;

        proxy.resume();
        let mut fresh = connect(&proxy).await;
        round_trip(&mut fresh, b"after the cut").await;
    }

    #[tokio::test]
    async fn refuse_closes_new_connections_only_until_turned_off() {
        let proxy = proxy_to_echo().await;
        let mut old = connect(&proxy).await;
        round_trip(&mut old, b"before").await;

        proxy.refuse(true);
        // The kernel may complete the handshake, but the proxy resets it at once.
        if let Ok(Ok(mut refused)) =
            tokio::time::timeout(PATIENCE, TcpStream::connect(proxy.local_addr())).await
        {
            let _ = refused.write_all(b"anyone?").await;
            assert_closed(&mut refused).await;
        }
        round_trip(&mut old, b"still here").await;

        proxy.refuse(false);
        let mut again = connect(&proxy).await;
        round_trip(&mut again, b"welcome back").await;
    }

    #[tokio::test]
    async fn hold_next_holds_only_the_matching_request_until_released() {
        let proxy = proxy_to_echo().await;
        let hold = proxy.hold_next(b"COMMIT");
        let mut held = connect(&proxy).await;
        round_trip(&mut held, b"BEGIN").await;
        let mut other = connect(&proxy).await;

        send(&mut held, b"do COMMIT now;").await;
        tokio::time::timeout(PATIENCE, hold.matched())
            .await
            .expect("hold never matched");
        assert!(hold.is_matched());
        round_trip(&mut other, b"not held").await;
        assert_quiet(&mut held).await;
        // Bytes after the held chunk wait behind it.
        send(&mut held, b"then this").await;
        assert_quiet(&mut held).await;

        hold.release();
        assert_eq!(receive(&mut held, 23).await, b"do COMMIT now;then this");
        // The hold was for one chunk only.
        round_trip(&mut held, b"COMMIT again").await;
    }

    #[tokio::test]
    async fn count_counts_what_clients_send_across_chunks_and_connections() {
        let proxy = proxy_to_echo().await;
        let before = proxy.count(b"insert");
        let mut first = connect(&proxy).await;
        round_trip(&mut first, b"insert").await;
        let inserts = proxy.count(b"insert");
        // Split across two chunks of one connection, twice in one chunk, on another connection;
        // the echoed replies are not counted.
        round_trip(&mut first, b"ins").await;
        round_trip(&mut first, b"ert").await;
        let mut second = connect(&proxy).await;
        round_trip(&mut second, b"insert insert find").await;
        assert_eq!(inserts.get(), 3, "{inserts:?}");
        assert_eq!(before.get(), 4, "{before:?}");
    }

    #[tokio::test]
    async fn hold_drop_connection_discards_the_request_and_closes() {
        let proxy = proxy_to_echo().await;
        let hold = proxy.hold_next(b"COMMIT");
        let mut held = connect(&proxy).await;
        send(&mut held, b"COMMIT").await;
        tokio::time::timeout(PATIENCE, hold.matched())
            .await
            .expect("hold never matched");
        let forwarded = proxy.bytes_forwarded();
        hold.drop_connection();
        assert_closed(&mut held).await;
        assert_eq!(
            proxy.bytes_forwarded(),
            forwarded,
            "held bytes were forwarded"
        );
        wait_for_connections(&proxy, 0).await;
        let mut fresh = connect(&proxy).await;
        round_trip(&mut fresh, b"COMMIT").await;
    }

    #[tokio::test]
    async fn hold_matches_a_pattern_split_across_two_writes() {
        let proxy = proxy_to_echo().await;
        let hold = proxy.hold_next(b"HELLO-WORLD");
        let mut stream = connect(&proxy).await;
        // The first half alone does not match, so it passes (and proves it was its own chunk).
        round_trip(&mut stream, b"xxHELLO-").await;
        assert!(!hold.is_matched());
        send(&mut stream, b"WORLDyy").await;
        tokio::time::timeout(PATIENCE, hold.matched())
            .await
            .expect("split pattern never matched");
        assert_quiet(&mut stream).await;
        hold.release();
        assert_eq!(receive(&mut stream, 7).await, b"WORLDyy");
    }

    #[tokio::test]
    async fn dropping_a_hold_releases_it() {
        let proxy = proxy_to_echo().await;
        let hold = proxy.hold_next(b"X");
        let mut stream = connect(&proxy).await;
        send(&mut stream, b"X marks").await;
        tokio::time::timeout(PATIENCE, hold.matched())
            .await
            .expect("hold never matched");
        assert_quiet(&mut stream).await;
        drop(hold);
        assert_eq!(receive(&mut stream, 7).await, b"X marks");
    }

    #[tokio::test]
    async fn cut_closes_a_held_connection() {
        let proxy = proxy_to_echo().await;
        let hold = proxy.hold_next(b"COMMIT");
        let mut stream = connect(&proxy).await;
        send(&mut stream, b"COMMIT").await;
        tokio::time::timeout(PATIENCE, hold.matched())
            .await
            .expect("hold never matched");
        proxy.cut();
        assert_closed(&mut stream).await;
        drop(hold);
    }

    #[tokio::test]
    async fn unreachable_upstream_closes_the_client() {
        // A port that was just free: nothing listens there.
        let vacant = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = vacant.local_addr().expect("addr");
        drop(vacant);
        let proxy = FaultProxy::start("127.0.0.1:0", &upstream.to_string())
            .await
            .expect("start proxy");
        let mut stream = connect(&proxy).await;
        let _ = stream.write_all(b"hello?").await;
        assert_closed(&mut stream).await;
        assert_eq!(proxy.connections(), 0);
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let proxy = proxy_to_echo().await;
        let addr = proxy.local_addr();
        let mut stream = connect(&proxy).await;
        round_trip(&mut stream, b"hi").await;
        assert!(format!("{proxy:?}").contains("FaultProxy"));
        drop(proxy);
        assert_closed(&mut stream).await;
        // The listener is gone too (or, if the accept task had not yet stopped, resets us).
        if let Ok(Ok(mut late)) = tokio::time::timeout(PATIENCE, TcpStream::connect(addr)).await {
            let _ = late.write_all(b"hello?").await;
            assert_closed(&mut late).await;
        }
    }
}
