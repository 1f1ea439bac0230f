//! A running agentreg node: the QUIC endpoint, the Raft instance, and the services on top.
//!
//! ```text
//!             UDP socket (one per node)
//!                   │ quinn endpoint
//!   ┌───────────────┼──────────────────┐
//!   agentreg/1      agentreg-peer/1    agentreg-admin/1
//!   (agents)        peer_service       admin
//!                   │                  │
//!                   └──── Raft (openraft) ─── sled (log, vote, snapshot)
//! ```

mod admin;
mod agent_service;
mod audit;
mod builds;
mod clock;
mod coalesce;
mod connections;
mod disk;
mod duties;
mod forward;
mod handover;
mod handshakes;
mod heartbeat;
mod limits;
mod metrics;
mod peer_service;
mod propose;
mod read;
mod tls_reload;
mod write;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use admin::{
    admin_code, AdminRequest, AgentInfo, ClaimInfo, HeartbeatStats, KeyInfo, ListFilter, ListFrame,
    MemberStatus, NodeHealth, NodeStatus, LIST_FRAME_ROWS,
};
pub use agent_service::close_code;
pub use clock::ClockStatus;
pub use disk::DiskUsage;
pub use duties::unix_now_f64;
pub use read::ReadError;
pub(crate) use tls_reload::left as time_left;
pub use write::{WriteError, Written};

use crate::config::{InitialClusterState, NodeConfig};
use crate::identity::Secret;
use crate::raft::network::{PeerDialer, Peers};
use crate::raft::types::{NodeId, Raft};
use crate::raft::{DataDir, DataDirError, StateReader};
use crate::transport::tls::{self, ConnectionKind, NodeTls, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("hmac secret file {path}: {reason}")]
    Secret {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Event counters of the node (status and metrics).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) pings_sent: std::sync::atomic::AtomicU64,
    pub(crate) pings_missed: std::sync::atomic::AtomicU64,
    pub(crate) evictions_proposed: std::sync::atomic::AtomicU64,
    pub(crate) evictions_committed: std::sync::atomic::AtomicU64,
}

/// Shared by every task of the node.
pub(crate) struct Inner {
    pub(crate) id: NodeId,
    pub(crate) config: NodeConfig,
    pub(crate) raft: Raft,
    /// Group commit of this node's proposals (see `propose.rs`).
    pub(crate) proposer: propose::Proposer,
    /// Batching of the writes this node forwards to the leader (see `forward.rs`).
    pub(crate) forwarder: forward::Forwarder,
    /// Read indexes for linearizable validations, fetched in shared rounds.
    pub(crate) reads: read::ReadIndexes,
    pub(crate) state: StateReader,
    pub(crate) peers: Peers,
    pub(crate) conns: connections::Connections,
    pub(crate) counters: Counters,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) log: crate::raft::LogStore,
    pub(crate) db: sled::Db,
    pub(crate) initial_secret: Option<Secret>,
    /// Checks that a peer connection comes from a node, not an operator.
    pub(crate) node_authority: tls::NodeAuthority,
    /// The TLS material every connection from now on uses (see `tls_reload.rs`).
    pub(crate) tls: Arc<tls::LiveTls>,
    pub(crate) tls_files: tls_reload::Watched,
    /// Cancelled first when the node stops: no new agent connections or requests, in-flight
    /// requests finish (see [`Node::shutdown`]).
    pub(crate) draining: CancellationToken,
    /// Agent and admin requests being served, waited for while draining.
    pub(crate) requests: TaskTracker,
    /// Writes forwarded by followers being served here (the leader), waited for after a
    /// leadership hand-over so that their answers (mostly "the leader is now...") are
    /// delivered before the connections close.
    pub(crate) forwards: TaskTracker,
    /// Cancelled once the requests are done: every background loop stops.
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// Set once, when Raft stops on a fault of its own (see [`Node::fault`]).
    pub(crate) fault: tokio::sync::watch::Sender<Option<String>>,
    /// The wall clock, and how far it is from the peers' (see `clock.rs`).
    pub(crate) clock: clock::Clock,
    /// Claims per source address (see `limits.rs`).
    pub(crate) claim_limits: limits::ClaimLimits,
    /// Agent connections, in all and per source address (see `limits.rs`).
    pub(crate) conn_limits: limits::ConnectionLimits,
    /// QUIC handshakes in progress (see `handshakes.rs`).
    pub(crate) handshakes: handshakes::Handshakes,
    /// Which kinds of log entry the other members read (see `builds.rs`).
    pub(crate) peer_formats: builds::PeerFormats,
    /// Why the leader's last sweep kept expired claims that were due (see `duties.rs`).
    pub(crate) forgetting_held_back: std::sync::Mutex<Option<String>>,
    /// Tests: answer `PeerRequest::Build` as a build before it does (refused unread).
    pub(crate) act_as_earlier_build: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// How long requests in flight are waited for before their connections close (on
    /// shutdown, or when a session ends): a write that outlasts an election, and a second.
    pub(crate) fn answer_budget(&self) -> Duration {
        self.config.write_timeout() + Duration::from_secs(1)
    }

    /// The session id of `agent_id` if `conn` holds its session.
    pub(crate) fn session_on(&self, agent_id: &str, conn: crate::registry::ConnRef) -> Option<u64> {
        self.state
            .read()
            .state
            .session(agent_id)
            .filter(|s| s.conn == conn)
            .map(|s| s.session_id)
    }
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    metrics_addr: Option<SocketAddr>,
}

impl Node {
    /// Starts a node: opens its data dir, binds its UDP port (or uses `socket`, already bound),
    /// starts Raft and its services, and initialises a brand-new cluster once.
    ///
    /// # Errors
    /// The data dir belongs to another cluster or node, the TLS files are unusable, the
    /// port cannot be bound, or Raft refuses the configuration.
    pub async fn start(
        config: NodeConfig,
        socket: Option<std::net::UdpSocket>,
    ) -> Result<Node, NodeError> {
        let initial_secret = read_secret_file(&config)?;
        let files = config.tls.files();
        // Seen before they are read: a renewal written meanwhile is taken up at the first look.
        let tls_files = tls_reload::Watched::seen(&files);
        let tls = NodeTls::load(&files)?;
        tls.check_node_certificate(&config.tls.server_name)?;
        let live_tls = tls::LiveTls::new(&tls)?;
        let data = DataDir::open(&config.data_dir, &config.cluster_id, config.node_id)?;
        let pristine = data.pristine;

        let socket = match socket {
            Some(s) => s,
            None => std::net::UdpSocket::bind(config.listen).map_err(|source| NodeError::Bind {
                addr: config.listen,
                source,
            })?,
        };
        tune_socket(&socket);
        let endpoint_secret = data.endpoint_secret(&config.data_dir, || tls.endpoint_secret())?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&endpoint_secret),
            // An agent may stay silent between pings for as long as it may stay silent at
            // all (agent_timeout): a large fleet need not send a keep-alive every few
            // seconds. Peers and operators ask for 10 s themselves.
            Some(live_tls.server_config(config.heartbeat.agent_timeout().max(tls::IDLE_TIMEOUT))?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| NodeError::Bind {
            addr: config.listen,
            source,
        })?;
        let node_authority = live_tls.node_authority(&config.tls.server_name)?;
        let peers = Peers::new(PeerDialer {
            endpoint: endpoint.clone(),
            client_config: live_tls.peer_client_config()?,
            server_name: config.tls.server_name.clone(),
        });

        let metrics_listener = match config.metrics.listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|source| NodeError::Bind { addr, source })?;
                l.set_nonblocking(true)
                    .map_err(|source| NodeError::Bind { addr, source })?;
                Some(
                    tokio::net::TcpListener::from_std(l)
                        .map_err(|source| NodeError::Bind { addr, source })?,
                )
            }
            None => None,
        };
        let log_handle = data.log.clone();
        let raft_config = raft_config(&config)?;
        let state = data.state_machine.reader();
        let session_ends = data.state_machine.subscribe();
        let raft = Raft::new(
            config.node_id,
            raft_config,
            peers.clone(),
            data.log,
            data.state_machine,
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;

        let shutdown = CancellationToken::new();
        let metrics = metrics::Metrics::new();
        let clock = clock::Clock::new(config.identity.max_clock_skew_ms, metrics.clock_offsets());
        let peer_formats = builds::PeerFormats::new(metrics.peer_log_formats.clone());
        let claim_limits = limits::ClaimLimits::new(&config.limits);
        let conn_limits = limits::ConnectionLimits::new(&config.limits);
        let handshakes = handshakes::Handshakes::new(&config.limits, metrics.handshakes.clone());
        let inner = Arc::new(Inner {
            id: config.node_id,
            proposer: propose::Proposer::start(
                raft.clone(),
                config.write_timeout(),
                shutdown.clone(),
            ),
            reads: read::ReadIndexes::start(
                raft.clone(),
                config.node_id,
                peers.clone(),
                metrics.read_index(),
                shutdown.clone(),
            ),
            config,
            forwarder: forward::Forwarder::start(shutdown.clone(), metrics.forwarding()),
            raft,
            state,
            peers,
            conns: connections::Connections::new(),
            counters: Counters::default(),
            metrics,
            log: log_handle,
            db: data.db,
            initial_secret,
            node_authority,
            tls: live_tls,
            tls_files,
            draining: CancellationToken::new(),
            requests: TaskTracker::new(),
            forwards: TaskTracker::new(),
            shutdown,
            tasks: TaskTracker::new(),
            fault: tokio::sync::watch::Sender::new(None),
            clock,
            claim_limits,
            conn_limits,
            handshakes,
            peer_formats,
            forgetting_held_back: Default::default(),
            act_as_earlier_build: Default::default(),
        });
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = metrics_listener {
            metrics::spawn(inner.clone(), l);
        }
        let node = Node {
            inner,
            endpoint,
            metrics_addr,
        };
        node.spawn_accept_loop();
        duties::spawn(node.inner.clone());
        heartbeat::spawn(node.inner.clone());
        clock::spawn_probes(node.inner.clone());
        builds::spawn_probes(node.inner.clone());
        tls_reload::spawn_watch(node.inner.clone());
        agent_service::spawn_session_closer(node.inner.clone(), session_ends);

        if pristine && node.inner.config.initial_cluster_state == InitialClusterState::New {
            node.initialize().await?;
        }
        tracing::info!(node_id = node.inner.id, addr = %node.local_addr(), "node started");
        Ok(node)
    }

    async fn initialize(&self) -> Result<(), NodeError> {
        let members: BTreeMap<NodeId, BasicNode> = self
            .inner
            .config
            .peers
            .iter()
            .map(|p| (p.id, BasicNode::new(&p.addr)))
            .collect();
        // Every member of a new cluster initialises with the same membership; openraft
        // accepts that, and refuses (NotAllowed) on a node that already has a log.
        match self.inner.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(
                    node_id = self.inner.id,
                    "initialised a new cluster membership"
                );
                Ok(())
            }
            Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(e),
            )) => {
                tracing::info!(node_id = self.inner.id, reason = %e, "cluster already initialised");
                Ok(())
            }
            Err(e) => Err(NodeError::Raft(e.to_string())),
        }
    }

    fn spawn_accept_loop(&self) {
        let inner = self.inner.clone();
        let endpoint = self.endpoint.clone();
        self.inner.tasks.spawn(async move {
            loop {
                // Peers still connect while the node drains: the leader must reach it, also
                // after giving up a silent connection to it, to replicate the writes whose
                // answers it is waiting for.
                let incoming = tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    i = endpoint.accept() => match i {
                        Some(i) => i,
                        None => break,
                    },
                };
                let nodes = inner.peers.node_addresses();
                let Some((incoming, handshake)) = inner.handshakes.admit(incoming, nodes) else {
                    continue;
                };
                let inner = inner.clone();
                inner.tasks.clone().spawn(async move {
                    let remote = incoming.remote_address();
                    let timeout = inner.handshakes.timeout();
                    let conn = match tokio::time::timeout(timeout, incoming).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "handshake failed");
                            return;
                        }
                        Err(_) => {
                            inner.handshakes.timed_out();
                            tracing::debug!(%remote, "handshake unfinished in time; dropped");
                            return;
                        }
                    };
                    drop(handshake);
                    match tls::classify(&conn) {
                        Ok(ConnectionKind::Peer) => match inner.node_authority.check(&conn) {
                            Ok(()) => {
                                inner.peers.node_addresses().note(remote.ip());
                                tls::widen_streams(&conn);
                                peer_service::serve(inner, conn).await
                            }
                            Err(e) => {
                                tracing::warn!(%remote, error = %e, "refusing peer connection");
                                conn.close(quinn::VarInt::from_u32(1), e.to_string().as_bytes());
                            }
                        },
                        Ok(ConnectionKind::Admin) => {
                            tls::widen_streams(&conn);
                            admin::serve(inner, conn).await
                        }
                        Ok(ConnectionKind::Agent) if inner.draining.is_cancelled() => conn.close(
                            quinn::VarInt::from_u32(close_code::SHUTTING_DOWN),
                            crate::proto::agent::NOT_SERVED_REASON.as_bytes(),
                        ),
                        Ok(ConnectionKind::Agent) => agent_service::serve(inner, conn).await,
                        Err(e) => {
                            tracing::warn!(%remote, error = %e, "refusing connection");
                            conn.close(quinn::VarInt::from_u32(1), e.to_string().as_bytes());
                        }
                    }
                });
            }
        });
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The UDP address the node is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.inner.config.listen)
    }

    /// Where /metrics, /healthz and /readyz are served, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The applied tables, as this node knows them.
    pub fn state(&self) -> &StateReader {
        &self.inner.state
    }

    /// Commits a command through the leader, forwarding it if this node is not the leader.
    ///
    /// # Errors
    /// See [`WriteError`]; a refusal by the registry is not an error but `Written::response`.
    pub async fn write(&self, cmd: crate::registry::Command) -> Result<Written, WriteError> {
        write::write(&self.inner, cmd).await
    }

    /// Waits until this node has applied every write acknowledged before the call.
    ///
    /// # Errors
    /// No leader with a quorum could be reached in time.
    pub async fn read_barrier(&self) -> Result<(), ReadError> {
        read::barrier(&self.inner).await
    }

    /// Agent and admin requests being served right now.
    pub fn requests_in_flight(&self) -> usize {
        self.inner.requests.len()
    }

    /// Agent connections currently open on this node.
    pub fn agent_connections(&self) -> usize {
        self.inner.conns.len()
    }

    /// Resolves, with what went wrong, if Raft stops on a fault of its own rather than by
    /// [`Node::shutdown`]: a write to the log or the state machine failed (a full or failing
    /// disk), or openraft stopped on an error. The node can no longer commit or learn of
    /// commits, so it has stopped serving agents by then (their connections closed with
    /// 0x103, new requests answered "node is shutting down"); what is left is to stop it
    /// ([`Node::halt`]: it cannot hand its sessions back) and start it again, which
    /// `agentreg node` leaves to its supervisor by exiting with status 1.
    pub async fn fault(&self) -> String {
        let mut fault = self.inner.fault.subscribe();
        let seen = fault
            .wait_for(Option::is_some)
            .await
            .expect("the node holds the sender");
        seen.clone().unwrap_or_default()
    }

    /// Makes this node answer its peers' build probes as a build before them does (it
    /// cannot read the request): for tests of a cluster mid-upgrade.
    #[doc(hidden)]
    pub fn act_as_earlier_build_for_tests(&self, earlier: bool) {
        self.inner
            .act_as_earlier_build
            .store(earlier, std::sync::atomic::Ordering::Relaxed);
    }

    /// Moves this node's clock by `ms` from the system's: a node with a wrong clock, for
    /// tests of what it may still do.
    #[doc(hidden)]
    pub fn shift_clock_for_tests(&self, ms: i64) {
        self.inner.clock.shift(ms);
    }

    /// Reads the TLS files named in the config again and uses them for every connection from
    /// now on (what `agentreg node` does on SIGHUP); returns until when the new certificate
    /// chain verifies, in seconds since the Unix epoch.
    ///
    /// # Errors
    /// The files are unusable (see [`NodeTls::load`]) or the certificate is not a node
    /// certificate for the cluster's server name; the node then goes on with the material
    /// it has.
    pub fn reload_tls(&self) -> Result<u64, TlsError> {
        tls_reload::reload(&self.inner)
    }

    /// This node's view of itself and the cluster.
    pub fn status(&self) -> NodeStatus {
        admin::status(&self.inner)
    }

    /// Stops the node gracefully:
    ///
    /// 1. drain: close new agent connections at once (0x103, before reading anything);
    ///    answer new agent and admin requests with "node is shutting down"; let the requests
    ///    in flight finish (up to `write_timeout`), so an agent never loses the answer to a
    ///    write that was committed. Peers still connect: the leader must reach this node to
    ///    replicate those writes, also after giving up a silent connection to it;
    /// 2. close every agent connection with code 0x103 (move to another node), and hand this
    ///    node's sessions back through the log (one EvictNode), so the agents find their ids
    ///    free wherever they reconnect;
    /// 3. if this node leads, hand its leadership to a caught-up follower (`handover.rs`), so
    ///    that writes do not wait out a leader lease and an election;
    /// 4. stop the background loops and Raft, flush sled, close QUIC.
    pub async fn shutdown(self) {
        self.stop(true).await;
    }

    /// Stops at once, leaving the replicated tables as a crash would: no draining (requests
    /// in flight are cut off) and no hand-back (the node's sessions stay until this node
    /// restarts or the leader evicts them as a lost node's). Agents are still told to move.
    /// For tests and tools that need a node gone without its goodbyes.
    pub async fn halt(self) {
        self.stop(false).await;
    }

    async fn stop(self, graceful: bool) {
        let inner = &self.inner;
        inner.draining.cancel();
        if graceful {
            tracing::info!(
                node_id = inner.id,
                in_flight = inner.requests.len(),
                "shutting down: draining requests"
            );
            inner.requests.close();
            let budget = inner.answer_budget();
            if tokio::time::timeout(budget, inner.requests.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    in_flight = inner.requests.len(),
                    "requests still unanswered after {budget:?}; closing their connections"
                );
            }
        } else {
            tracing::info!(node_id = inner.id, "halting");
        }
        inner.conns.close_all(
            quinn::VarInt::from_u32(close_code::SHUTTING_DOWN),
            b"node shutting down; reconnect to another node",
        );
        if graceful {
            heartbeat::release_own_sessions(inner).await;
            handover::hand_over(inner).await;
            inner.forwards.close();
            if tokio::time::timeout(handover::STEP, inner.forwards.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    in_flight = inner.forwards.len(),
                    "forwarded writes still unanswered; closing their connections"
                );
            }
        }
        inner.shutdown.cancel();
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node shutting down");
        if let Err(e) = inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not stop cleanly");
        }
        inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), inner.tasks.wait()).await;
        if let Err(e) = inner.db.flush_async().await {
            tracing::error!(error = %e, "flushing sled on shutdown failed");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        tracing::info!(node_id = inner.id, "stopped");
    }
}

/// Finishes an answer stream and waits (briefly) until the peer has it. Request tasks end
/// only then, so a draining node that closes its connections once the requests are done
/// never discards an answer still in flight: closing a QUIC connection drops unsent data.
pub(crate) async fn finish_and_wait(mut send: quinn::SendStream) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(ANSWER_DELIVERY_WAIT, send.stopped()).await;
    }
}

const ANSWER_DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// Socket buffer size asked for: thousands of agent connections send bursts (handshakes,
/// ping answers) that overflow the kernel's default (~200 KiB) and turn into packet loss.
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

fn tune_socket(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = s.set_send_buffer_size(UDP_BUFFER_BYTES);
    let got = s.recv_buffer_size().unwrap_or(0);
    if got < UDP_BUFFER_BYTES {
        tracing::warn!(
            asked = UDP_BUFFER_BYTES,
            got,
            "UDP receive buffer is smaller than asked; raise net.core.rmem_max for many agents"
        );
    }
}

fn raft_config(config: &NodeConfig) -> Result<Arc<openraft::Config>, NodeError> {
    let r = &config.raft;
    let c = openraft::Config {
        cluster_name: config.cluster_id.clone(),
        heartbeat_interval: r.heartbeat_interval_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: r.max_in_snapshot_log_to_keep,
        // Chunks well under MAX_PEER_FRAME: snapshots stream instead of filling one frame.
        snapshot_max_chunk_size: 1024 * 1024,
        max_payload_entries: 256,
        ..Default::default()
    };
    Ok(Arc::new(
        c.validate().map_err(|e| NodeError::Raft(e.to_string()))?,
    ))
}

fn read_secret_file(config: &NodeConfig) -> Result<Option<Secret>, NodeError> {
    let Some(path) = &config.identity.hmac_secret_file else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).map_err(|e| NodeError::Secret {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // A trailing newline from `echo` or an editor is not part of the secret.
    let trimmed = bytes.trim_ascii_end().to_vec();
    if trimmed.len() < 32 {
        return Err(NodeError::Secret {
            path: path.clone(),
            reason: format!(
                "holds {} bytes without trailing whitespace; at least 32 are needed (e.g. \
                 head -c 32 /dev/urandom | base64 > FILE)",
                trimmed.len()
            ),
        });
    }
    Ok(Some(Secret::new(trimmed)))
}
