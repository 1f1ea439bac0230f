//! A cluster of in-process nodes on loopback for tests: OS-chosen ports, a temp dir per
//! cluster (removed on drop, also when a test fails), and waits with deadlines.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use agentreg::config::{
    HeartbeatConfig, IdentityConfig, InitialClusterState, NodeConfig, Peer, RaftConfig, TlsConfig,
};
use agentreg::node::{Node, Written};
use agentreg::registry::{ClaimArgs, Command, Op, Outcome, Tables};
use agentreg::transport::tls;

pub mod faultnet;
pub mod pki;
pub mod wait;

pub use wait::wait_for;

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,agentreg=info")),
        )
        .with_test_writer()
        .try_init();
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub addrs: BTreeMap<u64, SocketAddr>,
    pub nodes: BTreeMap<u64, Node>,
    pub configs: BTreeMap<u64, NodeConfig>,
    /// Present when the cluster was started with `Options::faults`.
    pub net: Option<faultnet::FaultNet>,
}

/// Options for a test cluster.
#[derive(Clone)]
pub struct Options {
    pub nodes: u64,
    pub raft: RaftConfig,
    pub heartbeat: HeartbeatConfig,
    /// Route node-to-node traffic through a fault proxy (see `faultnet`).
    pub faults: bool,
    /// Contents of an `identity.hmac_secret_file` given to every node.
    pub hmac_secret: Option<Vec<u8>>,
    /// Extra nodes prepared (certificate, port, config with initial_cluster_state =
    /// "existing") but not started: see `start_spare`.
    pub spares: u64,
    pub limits: agentreg::config::LimitsConfig,
    /// The loopback address the nodes listen (and dial their peers) on.
    pub host: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            raft: RaftConfig {
                heartbeat_interval_ms: 100,
                election_timeout_min_ms: 400,
                election_timeout_max_ms: 800,
                snapshot_logs_since_last: 10_000,
                max_in_snapshot_log_to_keep: 100,
                write_timeout_ms: 10_000,
            },
            heartbeat: HeartbeatConfig {
                interval_ms: 300,
                agent_timeout_ms: 1_500,
                ping_timeout_ms: 300,
            },
            faults: false,
            hmac_secret: None,
            spares: 0,
            limits: Default::default(),
            host: "127.0.0.1",
        }
    }
}

impl TestCluster {
    pub async fn start(opts: Options) -> TestCluster {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let ids: Vec<u64> = (1..=opts.nodes + opts.spares).collect();
        tls::write_dev_material(&dir.path().join("tls"), &ids, &[], false).expect("dev tls");
        let mut sockets: BTreeMap<u64, UdpSocket> = ids
            .iter()
            .map(|id| (*id, UdpSocket::bind((opts.host, 0)).expect("bind")))
            .collect();
        let addrs: BTreeMap<u64, SocketAddr> = sockets
            .iter()
            .map(|(id, s)| (*id, s.local_addr().unwrap()))
            .collect();
        let net = opts.faults.then(|| faultnet::FaultNet::start(&addrs));
        let peer_addrs = net.as_ref().map_or(addrs.clone(), |n| n.proxies.clone());
        let peers: Vec<Peer> = peer_addrs
            .iter()
            .filter(|(id, _)| **id <= opts.nodes)
            .map(|(id, a)| Peer {
                id: *id,
                addr: a.to_string(),
            })
            .collect();
        let secret_file = opts.hmac_secret.as_ref().map(|s| {
            let p = dir.path().join("hmac.secret");
            std::fs::write(&p, s).expect("secret file");
            p
        });
        let mut configs = BTreeMap::new();
        for id in &ids {
            let tls_dir = dir.path().join("tls");
            let c = NodeConfig {
                cluster_id: "test".into(),
                node_id: *id,
                listen: addrs[id],
                advertise: None,
                data_dir: dir.path().join(format!("node{id}")),
                initial_cluster_state: if *id <= opts.nodes {
                    InitialClusterState::New
                } else {
                    InitialClusterState::Existing
                },
                peers: peers.clone(),
                tls: TlsConfig {
                    ca: tls_dir.join("ca.pem"),
                    cert: tls_dir.join(format!("node{id}.pem")),
                    key: tls_dir.join(format!("node{id}.key")),
                    server_name: tls::DEFAULT_SERVER_NAME.into(),
                    reload_check_secs: 60,
                },
                raft: opts.raft.clone(),
                identity: IdentityConfig {
                    hmac_secret_file: secret_file.clone(),
                    ..IdentityConfig::default()
                },
                heartbeat: opts.heartbeat.clone(),
                metrics: agentreg::config::MetricsConfig {
                    listen: Some("127.0.0.1:0".parse().unwrap()),
                },
                limits: opts.limits.clone(),
                worker_threads: None,
            };
            c.validate().expect("valid test config");
            configs.insert(*id, c);
        }
        let spare_sockets: BTreeMap<u64, UdpSocket> = (opts.nodes + 1..=opts.nodes + opts.spares)
            .filter_map(|id| Some((id, sockets.remove(&id)?)))
            .collect();
        drop(spare_sockets);
        let mut cluster = TestCluster {
            dir,
            addrs,
            nodes: BTreeMap::new(),
            configs,
            net,
        };
        for (id, socket) in sockets {
            let node = Node::start(cluster.configs[&id].clone(), Some(socket))
                .await
                .expect("node starts");
            cluster.nodes.insert(id, node);
        }
        cluster
    }

    /// Operator connection settings for this cluster.
    pub fn admin_args(&self) -> agentreg::cli::AdminArgs {
        agentreg::cli::AdminArgs::for_dev_material(
            &self.tls_dir(),
            self.addrs.values().map(|a| a.to_string()).collect(),
        )
    }

    pub fn net(&self) -> &faultnet::FaultNet {
        self.net
            .as_ref()
            .expect("cluster started with faults: true")
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// Stops a node (its data dir stays).
    pub async fn stop(&mut self, id: u64) {
        tracing::info!("--- stopping node {id}");
        let node = self.nodes.remove(&id).expect("node running");
        node.shutdown().await;
    }

    /// Stops a node the way a crash leaves the tables: no draining, no hand-back of its
    /// sessions (see `Node::halt`). Its data dir stays.
    pub async fn crash(&mut self, id: u64) {
        tracing::info!("--- crashing node {id}");
        let node = self.nodes.remove(&id).expect("node running");
        node.halt().await;
    }

    /// Restarts a stopped node from its data dir, on its old address.
    pub async fn restart(&mut self, id: u64) {
        tracing::info!("--- restarting node {id}");
        let socket = wait_for(
            &format!("port of node {id} free again"),
            TIMEOUT,
            || async { UdpSocket::bind(self.addrs[&id]).ok() },
        )
        .await;
        let node = Node::start(self.configs[&id].clone(), Some(socket))
            .await
            .expect("node restarts");
        self.nodes.insert(id, node);
    }

    /// Starts a spare node (see `Options::spares`); it waits to be added to the membership.
    pub async fn start_spare(&mut self, id: u64) {
        self.restart(id).await;
    }

    /// Waits until every running node agrees on one leader, and returns it.
    pub async fn leader(&self) -> u64 {
        wait_for("a leader all running nodes agree on", TIMEOUT, || async {
            let leaders: Vec<Option<u64>> = self
                .nodes
                .values()
                .map(|n| n.raft().metrics().borrow().current_leader)
                .collect();
            let first = leaders.first().copied().flatten()?;
            (leaders.iter().all(|l| *l == Some(first)) && self.nodes.contains_key(&first))
                .then_some(first)
        })
        .await
    }

    /// Waits until every node of `group` names the same leader, one of `group` (the side of a
    /// partition that holds a quorum), and returns it.
    pub async fn leader_among(&self, group: &[u64]) -> u64 {
        wait_for(
            &format!("a leader among nodes {group:?}"),
            TIMEOUT,
            || async {
                let leaders: Vec<Option<u64>> = group
                    .iter()
                    .map(|id| self.node(*id).raft().metrics().borrow().current_leader)
                    .collect();
                let first = leaders.first().copied().flatten()?;
                (group.contains(&first) && leaders.iter().all(|l| *l == Some(first)))
                    .then_some(first)
            },
        )
        .await
    }

    /// A cluster started with `options`, with a leader and its first signing key on every
    /// node; the leader's id.
    pub async fn ready(options: Options) -> (TestCluster, u64) {
        let cluster = TestCluster::start(options).await;
        let leader = cluster.leader().await;
        cluster.keyring_ready().await;
        (cluster, leader)
    }

    /// [`TestCluster::ready`] behind the fault proxy (`net()`).
    pub async fn ready_with_faults() -> (TestCluster, u64) {
        TestCluster::ready(Options {
            faults: true,
            ..Options::default()
        })
        .await
    }

    /// Waits until the signing keyring is replicated to every running node.
    pub async fn keyring_ready(&self) {
        wait_for("signing keyring on every node", TIMEOUT, || async {
            self.nodes
                .values()
                .all(|n| !n.state().read().state.keyring().is_empty())
                .then_some(())
        })
        .await
    }

    /// Waits until every running node applied at least `index`.
    pub async fn applied_everywhere(&self, index: u64) {
        for (id, node) in &self.nodes {
            node.raft()
                .wait(Some(TIMEOUT))
                .applied_index_at_least(Some(index), format!("node {id} applies {index}"))
                .await
                .unwrap_or_else(|e| panic!("node {id} did not apply {index}: {e}"));
        }
    }

    /// The Raft term a running node is at.
    pub fn term(&self, id: u64) -> u64 {
        self.node(id).raft().metrics().borrow().current_term
    }

    /// The tables of a running node.
    pub fn tables(&self, id: u64) -> Tables {
        self.node(id).state().read().state.tables().clone()
    }

    /// Every node started (spares included) but `id`: in a three-node cluster, the side that
    /// keeps the quorum when `id` is cut off.
    pub fn others(&self, id: u64) -> Vec<u64> {
        self.addrs.keys().copied().filter(|n| *n != id).collect()
    }

    /// A follower (a running node that is not the leader).
    pub async fn follower(&self) -> u64 {
        let leader = self.leader().await;
        *self
            .nodes
            .keys()
            .find(|id| **id != leader)
            .expect("a follower")
    }
}

/// GET `path` from a node's HTTP endpoint: (status code, body).
pub async fn http_get(node: &Node, path: &str) -> (u16, String) {
    http_get_at(node.metrics_addr().expect("metrics enabled"), path).await
}

/// The value a node's `/metrics` gives `name` (with its labels as the text shows them, e.g.
/// `agentreg_peer_log_format{peer="2"}`), if it has that line.
pub async fn metric(node: &Node, name: &str) -> Option<f64> {
    let (_, text) = http_get(node, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// GET `path` from `addr`: (status code, body).
#[allow(dead_code)]
pub async fn http_get_at(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get_at(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// As [`http_get_at`], the failure to connect or read returned, for polls that ask again:
/// a poll of a draining node once had its connection reset (in CI, cause not found) and
/// failed its test.
#[allow(dead_code)]
pub async fn try_http_get_at(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(TIMEOUT, s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn claim(agent_id: &str) -> Command {
    Command {
        at: now(),
        op: Op::Claim(ClaimArgs {
            agent_id: agent_id.into(),
            ttl_secs: 3600,
            force: false,
            proof: None,
            conn: None,
        }),
    }
}

/// Claims `agent_id` through `node`; panics unless the claim is acknowledged as granted.
pub async fn claim_ok(node: &Node, agent_id: &str) -> Written {
    let w = node
        .write(claim(agent_id))
        .await
        .expect("write acknowledged");
    assert!(
        matches!(w.response, Ok(Outcome::Claimed { .. })),
        "claim of {agent_id} refused: {:?}",
        w.response
    );
    w
}

// ---- agent side ----

use agentreg::client::{AgentClient, ClientConfig};

impl TestCluster {
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.tls_dir().join("ca.pem")).expect("ca.pem")
    }

    /// Client config listing `first` first, then the other nodes.
    pub fn client_config(&self, first: u64) -> ClientConfig {
        let mut nodes = vec![self.addrs[&first].to_string()];
        nodes.extend(
            self.addrs
                .iter()
                .filter(|(id, _)| **id != first)
                .map(|(_, a)| a.to_string()),
        );
        let mut c = ClientConfig::new(nodes, self.ca_pem());
        c.request_timeout = Duration::from_secs(15);
        c.reconnect_max = Duration::from_millis(500);
        c
    }

    /// An AgentClient connected to node `first` (falling over to the others).
    pub async fn agent(&self, first: u64) -> AgentClient {
        AgentClient::connect(self.client_config(first))
            .await
            .expect("client connects")
    }

    /// A raw QUIC connection to node `id` speaking ALPN agentreg/1.
    pub async fn raw(&self, id: u64) -> RawAgent {
        self.raw_from(id, "127.0.0.1").await
    }

    /// [`TestCluster::raw`] from the loopback address `from` (a node sees another source).
    pub async fn raw_from(&self, id: u64, from: &str) -> RawAgent {
        let mut endpoint = quinn::Endpoint::client(format!("{from}:0").parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::agent_client_config(&self.ca_pem()).unwrap());
        let conn = endpoint
            .connect(self.addrs[&id], tls::DEFAULT_SERVER_NAME)
            .unwrap()
            .await
            .expect("raw agent connects");
        RawAgent {
            _endpoint: endpoint,
            conn,
        }
    }
}

/// `v` as an agent-protocol frame: 4-byte big-endian length, then the JSON.
pub fn frame(v: &serde_json::Value) -> Vec<u8> {
    let body = v.to_string().into_bytes();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// The one answer frame on `recv` (agent or admin protocol), read to the stream's end; None
/// when the stream or its connection ended without one. Panics after [`TIMEOUT`].
pub async fn read_answer(recv: &mut quinn::RecvStream) -> Option<serde_json::Value> {
    let answer = tokio::time::timeout(TIMEOUT, recv.read_to_end(1 << 20))
        .await
        .expect("answer in time")
        .ok()?;
    if answer.len() < 4 {
        return None;
    }
    Some(serde_json::from_slice(&answer[4..]).expect("answer is JSON"))
}

/// Speaks the agent protocol byte by byte, for bad-input tests.
pub struct RawAgent {
    _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

impl RawAgent {
    /// A raw agent on a connection made with a client config of the test's own.
    pub fn from_parts(endpoint: quinn::Endpoint, conn: quinn::Connection) -> RawAgent {
        RawAgent {
            _endpoint: endpoint,
            conn,
        }
    }

    /// Writes `bytes` as-is on a new stream, finishes, returns what came back (None when the
    /// stream was closed without an answer).
    pub async fn send_raw(&self, bytes: &[u8]) -> Option<serde_json::Value> {
        let (mut send, mut recv) = self.conn.open_bi().await.expect("open stream");
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        read_answer(&mut recv).await
    }

    /// Sends one JSON request in a proper frame.
    pub async fn request(&self, v: serde_json::Value) -> serde_json::Value {
        self.send_raw(&frame(&v)).await.expect("an answer")
    }
}
