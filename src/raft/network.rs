//! The peer transport: Raft RPCs and forwarded writes between nodes, over QUIC with mutual
//! TLS (ALPN `agentreg-peer/1`).
//!
//! Every call is one bidirectional stream on a connection that is kept and reused:
//!
//! ```text
//! caller                                   callee
//!   open_bi ─── frame(bincode(PeerRequest)) ──▶   (finish)
//!           ◀── frame(bincode(PeerResponse)) ───  (finish)
//! frame = u32 big-endian length, then that many bytes (at most MAX_PEER_FRAME)
//! ```
//!
//! A follower forwards the writes agents send it to the leader as `Forward` (one) or
//! `ForwardBatch` (several that arrived together, see `node/forward.rs`). A callee that cannot
//! read a request closes its stream with [`BAD_FRAME`] without acting on it, which the caller
//! sees as [`PeerError::Refused`]: an older build refuses `ForwardBatch` that way.
//!
//! Snapshots travel as openraft's chunked `InstallSnapshot` calls (`snapshot_max_chunk_size`
//! bytes each), so a large snapshot never has to fit one frame. A peer that cannot be reached
//! is reported as `Unreachable`; openraft then waits out [`RaftNetwork::backoff`] (at most
//! [`UNREACHABLE_RETRY`]) before the next attempt, which reconnects. Dials outlive the calls
//! that started them (see [`PeerClient`]). A connection that carries nothing back
//! for [`SILENCE_LIMIT`] while calls on it time out is closed with [`SILENT`] and dialled
//! afresh: QUIC's retransmission backoff would keep it mute for seconds after a partition
//! heals.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::types::{codec, Node, NodeId, TypeConfig};
use crate::registry::{Command, Response};
use crate::transport::frame::{read_stream_frame, write_frame, FrameError};

/// Largest peer frame accepted: a full AppendEntries batch of the largest commands fits.
pub const MAX_PEER_FRAME: usize = 16 * 1024 * 1024;

/// Application error code with which the callee closes a stream whose request it could not
/// read (a bad frame, or a message it does not know, as an older build receiving a newer
/// request): it did nothing with it.
pub const BAD_FRAME: quinn::VarInt = quinn::VarInt::from_u32(0x10);

/// Application error code with which a node closes its connection to a peer that has sent
/// nothing back for [`SILENCE_LIMIT`] while calls on it timed out.
pub const SILENT: quinn::VarInt = quinn::VarInt::from_u32(0x11);

/// How long a connection may carry nothing back, while calls on it time out, before it is
/// given up and the next call dials afresh.
///
/// While a path drops everything, QUIC backs off its retransmissions exponentially (each
/// probe timeout doubles: after four seconds of loss the next probe is about three seconds
/// away), so a connection kept through a partition stays mute for seconds after it heals,
/// with both nodes up: a two-node quorum could not commit. A new connection has no backoff.
/// A healthy peer acknowledges a request within its ack delay (25 ms), so a second of
/// silence under timed-out calls is no slow peer.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(1);

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A write received by a follower, for the leader to propose.
    Forward(Command),
    /// A follower asks the leader for its read index (see node/read.rs).
    ReadIndex,
    /// Writes received by a follower while its earlier forwards were in flight, for the
    /// leader to propose together; answered one result per command, in order. (Last, so
    /// that the encoding of the variants before it is the same as before it existed.)
    ForwardBatch(Vec<Command>),
    /// The callee's wall clock, in milliseconds since the Unix epoch (node/clock.rs). A node
    /// of a build before it refuses the request unread.
    Clock,
    /// The leader, handing its leadership over (stopping, or asked by an operator), asks a
    /// follower whose log has all of the leader's to stand for election at once
    /// (node/handover.rs). The callee does so only while `leader` at `term` is the leader it
    /// follows. A node of a build before it refuses the request unread.
    Campaign {
        leader: NodeId,
        term: u64,
    },
    /// The callee's build: which kinds of log entry it reads (node/builds.rs). A node of a
    /// build before it refuses the request unread.
    Build,
}

/// What a node says of its build (`PeerRequest::Build`, and `agentreg status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The crate version.
    pub version: String,
    /// The newest kind of log entry it reads ([`crate::registry::LOG_FORMAT`]).
    pub log_format: u32,
}

impl BuildInfo {
    /// This build's.
    pub fn this() -> BuildInfo {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            log_format: crate::registry::LOG_FORMAT,
        }
    }
}

/// Why a forwarded write was not applied by the node it was sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    /// Certainly not applied: the callee is not the leader.
    #[error("node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, String)> },
    /// May or may not have been applied.
    #[error("write outcome unknown: {0}")]
    Unknown(String),
}

/// The answer to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The log index the write was committed at, and its result.
    Forward(Result<(u64, Response), ForwardError>),
    ReadIndex(Result<u64, ForwardError>),
    ForwardBatch(Vec<Result<(u64, Response), ForwardError>>),
    Clock(u64),
    /// Whether the callee stood for election; if not, why.
    Campaign(Result<(), String>),
    Build(BuildInfo),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The request was certainly not delivered.
    #[error("cannot reach node {target} at {addr}: {reason}")]
    Unreachable {
        target: NodeId,
        addr: String,
        reason: String,
    },
    /// The request may have been delivered; its answer was lost.
    #[error("call to node {target} failed: {reason}")]
    Failed { target: NodeId, reason: String },
    /// The callee could not read the request and did nothing with it.
    #[error("node {target} could not read the request: {reason}")]
    Refused { target: NodeId, reason: String },
    #[error("call to node {target} timed out after {after:?}")]
    Timeout { target: NodeId, after: Duration },
    #[error("node {target} answered with a {got} response to a {sent} request")]
    Mismatch {
        target: NodeId,
        sent: &'static str,
        got: &'static str,
    },
}

impl PeerRequest {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PeerRequest::AppendEntries(_) => "append_entries",
            PeerRequest::Vote(_) => "vote",
            PeerRequest::InstallSnapshot(_) => "install_snapshot",
            PeerRequest::Forward(_) => "forward",
            PeerRequest::ForwardBatch(_) => "forward_batch",
            PeerRequest::ReadIndex => "read_index",
            PeerRequest::Clock => "clock",
            PeerRequest::Campaign { .. } => "campaign",
            PeerRequest::Build => "build",
        }
    }
}

impl PeerResponse {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PeerResponse::AppendEntries(_) => "append_entries",
            PeerResponse::Vote(_) => "vote",
            PeerResponse::InstallSnapshot(_) => "install_snapshot",
            PeerResponse::Forward(_) => "forward",
            PeerResponse::ForwardBatch(_) => "forward_batch",
            PeerResponse::ReadIndex(_) => "read_index",
            PeerResponse::Clock(_) => "clock",
            PeerResponse::Campaign(_) => "campaign",
            PeerResponse::Build(_) => "build",
        }
    }
}

/// Everything a node needs to dial its peers.
#[derive(Clone)]
pub struct PeerDialer {
    pub endpoint: quinn::Endpoint,
    pub client_config: quinn::ClientConfig,
    pub server_name: String,
}

/// A request a peer of an older build may refuse unread (during a rolling upgrade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Newer {
    /// `ForwardBatch`: several forwarded writes in one call.
    Batches = 1,
    /// A forwarded claim with a claim token (`Op::ClaimWithToken`).
    ClaimTokens = 2,
}

/// The IP addresses at which this node has met other nodes: dialled one there, or been
/// dialled from there by one (certificate checked either way). A node's handshake gate lets
/// a connection from such an address through when it is full (`handshakes.rs`), so that a
/// flood of handshakes cannot keep a node's peers from reconnecting. Only a node's
/// certificate adds an address, and there are at most [`NodeAddresses::MAX`].
#[derive(Clone, Default)]
pub struct NodeAddresses(Arc<Mutex<HashSet<IpAddr>>>);

impl NodeAddresses {
    /// Addresses kept; past this many (nodes moved often), the set starts again.
    pub const MAX: usize = 64;

    /// An IPv4 address as a dual-stack socket sees it (`::ffff:a.b.c.d`) counts as itself.
    pub fn note(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !set.contains(&ip) {
            if set.len() >= Self::MAX {
                set.clear();
            }
            set.insert(ip);
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&ip.to_canonical())
    }
}

/// How long a dial goes on before it is given up (the peer is down, or does not answer).
///
/// A dial given up while the peer answers leaves the peer a handshake that never finishes,
/// which it keeps, resending with QUIC's backoff, for tens of seconds. QUIC sends a dial's
/// first packet again about a second after the first (the initial RTT estimate, 333 ms, makes
/// the probe timeout about a second), and then three seconds after it: so a dial to a peer
/// that was down when it began is answered at about one second once the peer is back, and
/// is not given up before two.
const DIAL_LIMIT: Duration = Duration::from_secs(2);

/// How long after one dial a call that finds no connection starts another, the first going
/// on beside it. A peer that is down loses a dial's first packet, and QUIC sends it again
/// only after about a second; a peer just started must be reached sooner than that (see
/// [`UNREACHABLE_RETRY`]), so calls keep sending fresh first packets: at most fourteen dials are
/// out towards a peer that is down, each sending a packet a second. A dial is never dropped
/// because a call timed out (see [`DIAL_LIMIT`] for why).
const REDIAL_AFTER: Duration = Duration::from_millis(150);

/// One peer: its address and the connection to it, kept for reuse.
///
/// The connection is dialled by a task of its own, which the calls that need it wait for
/// (each within its own timeout) and none holds up: a call that times out leaves the dial
/// going, for the next call to find done. Another dial starts when none is out or the last
/// is [`REDIAL_AFTER`] old; the first to be answered is kept, any later one closed.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    dialer: PeerDialer,
    /// Where the peer's address is noted once dialled.
    met: NodeAddresses,
    conn: Arc<Mutex<ConnSlot>>,
    /// Woken when a dial ends.
    dialled: Arc<tokio::sync::Notify>,
    /// When a call to this peer last succeeded.
    last_ok: Mutex<Option<tokio::time::Instant>>,
    /// What the peer refused unread on the current connection (an older build): a bit per
    /// [`Newer`] kind; cleared when a new connection is dialled, as the peer may have been
    /// upgraded meanwhile.
    refuses: Arc<std::sync::atomic::AtomicU8>,
    /// What a timed-out call last saw of the connection: see [`PeerClient::silent_for`].
    heard: Mutex<Option<Heard>>,
}

/// The connection to a peer and the dials towards it.
#[derive(Default)]
struct ConnSlot {
    open: Option<quinn::Connection>,
    /// When the last dial began.
    dialled_at: Option<tokio::time::Instant>,
    /// Dials not yet ended.
    dialling: usize,
    /// When a dial last failed, and why.
    failed: Option<(tokio::time::Instant, String)>,
}

impl ConnSlot {
    fn open(&self) -> Option<&quinn::Connection> {
        self.open.as_ref().filter(|c| c.close_reason().is_none())
    }
}

/// The datagrams a connection had received when a timed-out call looked, and since when that
/// count had not changed.
#[derive(Clone, Copy)]
struct Heard {
    conn: usize,
    datagrams: u64,
    since: tokio::time::Instant,
}

impl PeerClient {
    pub fn new(target: NodeId, addr: String, dialer: PeerDialer) -> Self {
        PeerClient {
            target,
            addr,
            dialer,
            met: NodeAddresses::default(),
            conn: Arc::default(),
            dialled: Arc::default(),
            last_ok: Mutex::new(None),
            refuses: Arc::default(),
            heard: Mutex::new(None),
        }
    }

    /// When a call to this peer last got an answer.
    pub fn last_ok(&self) -> Option<tokio::time::Instant> {
        *self.last_ok.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node this client calls.
    pub fn target(&self) -> NodeId {
        self.target
    }

    /// Whether the peer reads `kind`, as far as this client knows.
    pub fn takes(&self, kind: Newer) -> bool {
        self.refuses.load(std::sync::atomic::Ordering::Relaxed) & kind as u8 == 0
    }

    /// Records that the peer refused `kind` unread.
    pub fn refused(&self, kind: Newer) {
        self.refuses
            .fetch_or(kind as u8, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> PeerError {
        PeerError::Unreachable {
            target: self.target,
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    /// The open connection to this peer; if there is none, waits for a dial (starting one
    /// unless one is out that began less than [`REDIAL_AFTER`] ago). Returns `Unreachable` if
    /// a dial fails meanwhile; the caller's timeout bounds the wait.
    async fn connection(&self) -> Result<quinn::Connection, PeerError> {
        let asked = tokio::time::Instant::now();
        loop {
            let dialled = self.dialled.notified();
            tokio::pin!(dialled);
            // Registered before the slot is read, so a dial ending in between still wakes it.
            dialled.as_mut().enable();
            let redial_in = {
                let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(conn) = slot.open() {
                    return Ok(conn.clone());
                }
                slot.open = None;
                if let Some((_, why)) = slot.failed.as_ref().filter(|(at, _)| *at >= asked) {
                    return Err(self.unreachable(why));
                }
                let since = slot.dialled_at.map(|at| at.elapsed());
                match since {
                    Some(since) if since < REDIAL_AFTER && slot.dialling > 0 => {
                        REDIAL_AFTER - since
                    }
                    _ => {
                        slot.dialled_at = Some(tokio::time::Instant::now());
                        slot.dialling += 1;
                        self.spawn_dial();
                        REDIAL_AFTER
                    }
                }
            };
            let _ = tokio::time::timeout(redial_in, dialled).await;
        }
    }

    /// Dials the peer in a task of its own: see [`PeerClient`].
    fn spawn_dial(&self) {
        let (target, addr) = (self.target, self.addr.clone());
        let dialer = self.dialer.clone();
        let (slot, dialled) = (self.conn.clone(), self.dialled.clone());
        let (met, refuses) = (self.met.clone(), self.refuses.clone());
        tokio::spawn(async move {
            let dial = async {
                let to = resolve(&addr).await.map_err(|e| e.to_string())?;
                let connecting = dialer
                    .endpoint
                    .connect_with(dialer.client_config.clone(), to, &dialer.server_name)
                    .map_err(|e| e.to_string())?;
                connecting.await.map_err(|e| e.to_string())
            };
            let result = tokio::time::timeout(DIAL_LIMIT, dial).await;
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.dialling -= 1;
            match result {
                Ok(Ok(conn)) if slot.open().is_some() => {
                    drop(slot);
                    conn.close(quinn::VarInt::from_u32(0), b"connected already");
                }
                Ok(Ok(conn)) => {
                    met.note(conn.remote_address().ip());
                    refuses.store(0, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(target_node = target, %addr, "connected to peer");
                    slot.open = Some(conn);
                }
                Ok(Err(why)) => slot.failed = Some((tokio::time::Instant::now(), why)),
                // Not answered: the calls waiting for it have timed out, and have said so.
                Err(_) => {}
            }
            dialled.notify_waiters();
        });
    }

    /// Forgets `conn` if it is still the cached one, so the next call dials afresh.
    fn discard(&self, conn: &quinn::Connection) {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if slot
            .open
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            slot.open = None;
        }
    }

    /// How long `conn` has received nothing, as far as timed-out calls have looked (they are
    /// the only ones that look, so a healthy connection costs nothing): zero when its count of
    /// received datagrams moved since the last look, or on the first look.
    fn silent_for(&self, conn: &quinn::Connection) -> Duration {
        let now = tokio::time::Instant::now();
        let datagrams = conn.stats().udp_rx.datagrams;
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        match *heard {
            Some(h) if h.conn == conn.stable_id() && h.datagrams == datagrams => now - h.since,
            _ => {
                *heard = Some(Heard {
                    conn: conn.stable_id(),
                    datagrams,
                    since: now,
                });
                Duration::ZERO
            }
        }
    }

    /// Sends one request and waits for its answer, for at most `timeout`.
    ///
    /// A call that times out on a connection that has carried nothing back for
    /// [`SILENCE_LIMIT`] closes it, so the next call dials afresh.
    ///
    /// # Errors
    /// [`PeerError::Unreachable`] when the request was certainly not delivered; the other
    /// variants when it may have been.
    pub async fn call(
        &self,
        req: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let mut used = None;
        match tokio::time::timeout(timeout, self.call_inner(req, &mut used)).await {
            Ok(r) => {
                if r.is_ok() {
                    *self.last_ok.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(tokio::time::Instant::now());
                }
                r
            }
            Err(_) => {
                if let Some(conn) = used {
                    let silent = self.silent_for(&conn);
                    if silent >= SILENCE_LIMIT {
                        tracing::warn!(
                            target_node = self.target,
                            addr = %self.addr,
                            silent_ms = silent.as_millis() as u64,
                            "peer connection carries nothing back; dialling anew"
                        );
                        conn.close(SILENT, b"silent");
                        self.discard(&conn);
                    }
                }
                Err(PeerError::Timeout {
                    target: self.target,
                    after: timeout,
                })
            }
        }
    }

    /// One call; `used` is set to the connection it went out on, for [`PeerClient::call`] to
    /// judge when the call times out.
    async fn call_inner(
        &self,
        req: &PeerRequest,
        used: &mut Option<quinn::Connection>,
    ) -> Result<PeerResponse, PeerError> {
        let bytes = codec::encode(req).map_err(|e| PeerError::Failed {
            target: self.target,
            reason: format!("cannot encode request: {e}"),
        })?;
        let conn = self.connection().await?;
        *used = Some(conn.clone());
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.discard(&conn);
                return Err(self.unreachable(e));
            }
        };
        let failed = |reason: String| PeerError::Failed {
            target: self.target,
            reason,
        };
        let failed_frame = |doing: &str, e: FrameError| {
            if refused(&e) {
                PeerError::Refused {
                    target: self.target,
                    reason: format!("{} request: {e}", req.kind()),
                }
            } else {
                failed(format!("{doing}: {e}"))
            }
        };
        let exchange = async {
            write_frame(&mut send, &bytes)
                .await
                .map_err(|e| failed_frame("sending", e))?;
            send.finish().map_err(|e| failed(format!("sending: {e}")))?;
            read_stream_frame(&mut recv, MAX_PEER_FRAME)
                .await
                .map_err(|e| failed_frame("receiving", e))
        };
        let answer = match exchange.await {
            Ok(a) => a,
            Err(e) => {
                if conn.close_reason().is_some() {
                    self.discard(&conn);
                }
                return Err(e);
            }
        };
        let resp: PeerResponse =
            codec::decode(&answer).map_err(|e| failed(format!("malformed response: {e}")))?;
        Ok(resp)
    }
}

/// Whether `e` is the callee closing the stream with [`BAD_FRAME`]: it did not read the
/// request.
fn refused(e: &FrameError) -> bool {
    matches!(e.source_of::<quinn::ReadError>(), Some(quinn::ReadError::Reset(c)) if *c == BAD_FRAME)
        || matches!(e.source_of::<quinn::WriteError>(), Some(quinn::WriteError::Stopped(c)) if *c == BAD_FRAME)
}

async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))
}

/// The peers this node talks to, one [`PeerClient`] each. Clones share the clients.
#[derive(Clone)]
pub struct Peers {
    dialer: PeerDialer,
    clients: Arc<Mutex<HashMap<NodeId, Arc<PeerClient>>>>,
    met: NodeAddresses,
}

impl Peers {
    pub fn new(dialer: PeerDialer) -> Self {
        Peers {
            dialer,
            clients: Arc::default(),
            met: NodeAddresses::default(),
        }
    }

    /// Where this node has met other nodes (its clients note the addresses they dial).
    pub fn node_addresses(&self) -> &NodeAddresses {
        &self.met
    }

    /// The client for `target` at `addr`; a changed address replaces the old client.
    pub fn client(&self, target: NodeId, addr: &str) -> Arc<PeerClient> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&target) {
            if c.addr == addr {
                return c.clone();
            }
        }
        let mut c = PeerClient::new(target, addr.to_owned(), self.dialer.clone());
        c.met = self.met.clone();
        let c = Arc::new(c);
        clients.insert(target, c.clone());
        c
    }
}

impl Peers {
    /// When a call to `target` last got an answer, if there is a client for it.
    pub fn last_ok(&self, target: NodeId) -> Option<tokio::time::Instant> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.get(&target).and_then(|c| c.last_ok())
    }
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerNetwork {
        PeerNetwork {
            client: self.client(target, &node.addr),
        }
    }
}

/// The longest openraft waits before trying again to reach a peer it could not reach.
///
/// A peer that restarts must hear from the leader before its own patience runs out (its
/// leader lease plus an election timeout from its start: 350-400 ms as shipped); else it
/// stands for election, and its higher term deposes the leader (openraft 0.9 has no
/// pre-vote), pausing writes for an election on every step of a rolling restart. A backoff
/// that grew to seconds while the peer was stopping (it refuses connections as it drains)
/// made that the rule. Trying every 100 ms costs little: a call that merely times out (a
/// peer gone) puts no backoff, and is tried again at every heartbeat anyway.
pub const UNREACHABLE_RETRY: Duration = Duration::from_millis(100);

/// openraft's view of one peer.
pub struct PeerNetwork {
    client: Arc<PeerClient>,
}

type RpcError<E = openraft::error::Infallible> = RPCError<NodeId, Node, RaftError<NodeId, E>>;

impl PeerNetwork {
    async fn rpc<T, E: std::error::Error>(
        &self,
        req: PeerRequest,
        action: RPCTypes,
        option: &RPCOption,
        unpack: impl FnOnce(PeerResponse) -> Option<Result<T, RaftError<NodeId, E>>>,
    ) -> Result<T, RpcError<E>> {
        let target = self.client.target;
        let sent = req.kind();
        let timeout = option.hard_ttl();
        let resp = self.client.call(&req, timeout).await.map_err(|e| match e {
            PeerError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            PeerError::Timeout { .. } => RPCError::Timeout(Timeout {
                action,
                id: 0,
                target,
                timeout,
            }),
            _ => RPCError::Network(NetworkError::new(&e)),
        })?;
        let got = resp.kind();
        match unpack(resp) {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            None => Err(RPCError::Network(NetworkError::new(&PeerError::Mismatch {
                target,
                sent,
                got,
            }))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        self.rpc(
            PeerRequest::AppendEntries(rpc),
            RPCTypes::AppendEntries,
            &option,
            |r| match r {
                PeerResponse::AppendEntries(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        self.rpc(
            PeerRequest::InstallSnapshot(rpc),
            RPCTypes::InstallSnapshot,
            &option,
            |r| match r {
                PeerResponse::InstallSnapshot(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        self.rpc(
            PeerRequest::Vote(rpc),
            RPCTypes::Vote,
            &option,
            |r| match r {
                PeerResponse::Vote(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    /// How long openraft waits between attempts to replicate to a peer it could not reach
    /// (refused, as by a draining node, or not dialled): 50 ms, then [`UNREACHABLE_RETRY`].
    fn backoff(&self) -> Backoff {
        Backoff::new(
            std::iter::once(Duration::from_millis(50)).chain(std::iter::repeat(UNREACHABLE_RETRY)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_kept_up_to_a_bound() {
        let met = NodeAddresses::default();
        let ip = |n: usize| IpAddr::from([10, 0, (n / 256) as u8, (n % 256) as u8]);
        for n in 0..NodeAddresses::MAX {
            met.note(ip(n));
            met.note(ip(n));
        }
        assert!((0..NodeAddresses::MAX).all(|n| met.contains(ip(n))));
        assert!(!met.contains(ip(NodeAddresses::MAX)));
        // One more: the set starts again, from it.
        met.note(ip(NodeAddresses::MAX));
        assert!(met.contains(ip(NodeAddresses::MAX)));
        assert!(!met.contains(ip(0)));
        // Clones share the set.
        let clone = met.clone();
        clone.note(ip(0));
        assert!(met.contains(ip(0)));
        // The same IPv4 address, seen by a dual-stack socket or not.
        let v4 = std::net::Ipv4Addr::new(192, 0, 2, 7);
        met.note(IpAddr::V6(v4.to_ipv6_mapped()));
        assert!(met.contains(IpAddr::V4(v4)));
    }
}
