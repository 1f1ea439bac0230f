//! The agentreg side: three `agentreg node` processes from the release binary, clients on the
//! raw protocol (one request per QUIC stream, connections spread over the three nodes).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentreg::cli::{AdminArgs, AdminClient};
use agentreg::client::{AgentClient, ClientConfig, ClientEvent};
use agentreg::node::{AdminRequest, NodeStatus};
use agentreg::transport::frame::{read_stream_frame, write_frame, MAX_AGENT_FRAME};
use agentreg::transport::tls;
use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::stats::Cell;
use crate::Args;

pub struct Cluster {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bin: PathBuf,
    pub addrs: BTreeMap<u64, SocketAddr>,
    procs: BTreeMap<u64, Child>,
    admin: AdminClient,
    client_config: quinn::ClientConfig,
    ca_pem: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Cluster {
    async fn start(args: &Args) -> anyhow::Result<Cluster> {
        let (bin, heartbeat_ms) = (args.agentreg.as_path(), args.heartbeat_ms);
        let mut dir = tempfile::tempdir()?;
        if std::env::var_os("AGENTREG_BENCH_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("bench: agentreg nodes in {}", dir.path().display());
        }
        let path = dir.path().to_owned();
        tls::write_dev_material(&path.join("tls"), &[1, 2, 3], &[], false)?;
        let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|id| (id, free_udp())).collect();
        let peers: String = addrs
            .iter()
            .map(|(id, a)| format!("  {{ id = {id}, addr = \"{a}\" }},\n"))
            .collect();
        let threads = args
            .threads_per_server
            .map(|n| format!("worker_threads = {n}\n"))
            .unwrap_or_default();
        for (id, addr) in &addrs {
            let text = format!(
                "cluster_id = \"bench\"\nnode_id = {id}\nlisten = \"{addr}\"\ndata_dir = \"node{id}\"\n{threads}\
                 peers = [\n{peers}]\n\n[tls]\nca = \"tls/ca.pem\"\ncert = \"tls/node{id}.pem\"\nkey = \"tls/node{id}.key\"\n\n\
                 [heartbeat]\ninterval_ms = {heartbeat_ms}\nagent_timeout_ms = {}\nping_timeout_ms = {}\n",
                3 * heartbeat_ms,
                heartbeat_ms.min(5000) / 2,
            );
            std::fs::write(path.join(format!("node{id}.toml")), text)?;
        }
        let ca_pem = std::fs::read_to_string(path.join("tls/ca.pem"))?;
        let admin = AdminClient::new(&AdminArgs::for_dev_material(
            &path.join("tls"),
            addrs.values().map(ToString::to_string).collect(),
        ))?;
        let mut c = Cluster {
            _dir: dir,
            path,
            bin: bin.to_owned(),
            addrs,
            procs: BTreeMap::new(),
            admin,
            client_config: agent_client_config(args, &ca_pem)?,
            ca_pem,
        };
        for id in 1..=3 {
            c.spawn(id)?;
        }
        c.wait_ready().await?;
        Ok(c)
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.join(format!("node{id}.log")))?;
        let mut node = Command::new(&self.bin);
        node.args(["node", "--config"])
            .arg(self.path.join(format!("node{id}.toml")));
        // As shipped: the default filter, with its audit line for every identity event,
        // written to a file (no terminal, so no colours). AGENTREG_BENCH_LOG sets another.
        match std::env::var_os("AGENTREG_BENCH_LOG") {
            Some(filter) => node.env("RUST_LOG", filter),
            None => node.env_remove("RUST_LOG"),
        };
        let child = node
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.procs.insert(id, child);
        Ok(())
    }

    fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn status(&self, id: u64) -> Option<NodeStatus> {
        let addr = self.addrs[&id].to_string();
        let v = tokio::time::timeout(
            Duration::from_secs(1),
            self.admin.call(&addr, &AdminRequest::Status),
        )
        .await
        .ok()?
        .ok()?;
        serde_json::from_value(v["status"].clone()).ok()
    }

    /// The newest log index of the node that reports itself leader (its entries carry many
    /// claims: group commit), from one status call per node.
    async fn last_log_index(&self) -> Option<u64> {
        for id in self.procs.keys() {
            if let Some(s) = self.status(*id).await.filter(|s| s.role == "leader") {
                return s.last_log_index;
            }
        }
        None
    }

    async fn leader(&self) -> Option<u64> {
        for id in self.procs.keys() {
            if let Some(s) = self.status(*id).await {
                if s.leader.is_some_and(|l| self.procs.contains_key(&l)) {
                    return s.leader;
                }
            }
        }
        None
    }

    /// A leader, its signing key, and every running node caught up.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = self.leader().await.is_some();
            for id in self.procs.keys() {
                ok &= self.status(*id).await.is_some_and(|s| s.tables.keys > 0);
            }
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agentreg cluster not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn rss_bytes(&self) -> u64 {
        self.procs.values().map(|c| crate::rss_of(c.id())).sum()
    }

    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        node: u64,
    ) -> anyhow::Result<quinn::Connection> {
        let conn = endpoint
            .connect_with(
                self.client_config.clone(),
                self.addrs[&node],
                tls::DEFAULT_SERVER_NAME,
            )?
            .await?;
        Ok(conn)
    }

    /// `n` connections spread over the nodes in `nodes`, from a few client sockets.
    async fn connections(&self, n: usize, nodes: &[u64]) -> anyhow::Result<Vec<quinn::Connection>> {
        let sockets = n.div_ceil(500).max(1);
        let endpoints: Vec<quinn::Endpoint> = (0..sockets)
            .map(|_| client_endpoint())
            .collect::<Result<_, _>>()?;
        use futures::StreamExt;
        let endpoints = &endpoints;
        let started = Instant::now();
        let conns: Vec<anyhow::Result<quinn::Connection>> = futures::stream::iter(0..n)
            .map(|i| async move {
                let c = self
                    .connect(&endpoints[i % sockets], nodes[i % nodes.len()])
                    .await
                    .with_context(|| format!("connection {} of {n}", i + 1))?;
                agentreg::client::spawn_ping_answerer(c.clone());
                if (i + 1) % 10_000 == 0 {
                    eprintln!(
                        "bench: {} connections in {:.1} s",
                        i + 1,
                        started.elapsed().as_secs_f64()
                    );
                }
                Ok(c)
            })
            .buffered(64)
            .collect()
            .await;
        conns.into_iter().collect()
    }
}

/// A client socket for up to 500 agents' connections, with the buffers a node asks for too:
/// with the default 208 KiB, answers arriving while this process waits for a core
/// overflow the socket and the kernel drops them (visible as RcvbufErrors in
/// /proc/net/snmp), and agents' connections time out.
pub(crate) fn client_endpoint() -> std::io::Result<quinn::Endpoint> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let s = socket2::SockRef::from(&socket);
    s.set_recv_buffer_size(4 << 20)?;
    s.set_send_buffer_size(4 << 20)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The bench's agents' client config. Agents held by the ten thousand send a keep-alive
/// every third of the node's idle timeout (its agent_timeout, at least 10 s) rather than the
/// library's every second: all of them share this machine's two cores with the three nodes.
pub(crate) fn agent_client_config(
    args: &Args,
    ca_pem: &str,
) -> anyhow::Result<quinn::ClientConfig> {
    let idle = args.agent_timeout().max(tls::IDLE_TIMEOUT);
    let mut cc = tls::agent_client_config(ca_pem)?;
    cc.transport_config(tls::agent_transport(idle / 3, idle));
    Ok(cc)
}

/// One request on a new stream, with its `type` set; the answer's bytes, read to the end.
pub(crate) async fn exchange(conn: &quinn::Connection, mut req: Value) -> Result<Vec<u8>, String> {
    req["type"] = json!("system_request");
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, req.to_string().as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    read_stream_frame(&mut recv, MAX_AGENT_FRAME)
        .await
        .map_err(|e| e.to_string())
}

/// One request on a new stream; `Err` for a transport failure or `success: false`.
pub async fn request(conn: &quinn::Connection, req: Value) -> Result<Value, String> {
    let answer = exchange(conn, req).await?;
    let v: Value = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
    if v["success"] == true {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("refused").to_owned())
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A claim of `agent_id` as `AgentClient` sends it: with a claim token of its own (128
/// random bits as 32 hex digits), which makes it safe to send again.
fn claim_request(agent_id: &str) -> Value {
    let token: String = (0..2)
        .map(|_| format!("{:016x}", rand::random::<u64>()))
        .collect();
    json!({"command": "claim_agent_id", "agent_id": agent_id, "claim_token": token})
}

pub async fn run(args: &Args) -> anyhow::Result<Vec<(String, Cell)>> {
    let mut rows = Vec::new();
    if args.runs("floor") {
        // Before the cluster starts: the floor's server must be the only child running.
        crate::floor::rows(args, &mut rows).await?;
    }
    let mut c = Cluster::start(args).await?;
    let all = [1, 2, 3];
    let conns = Arc::new(c.connections(48, &all).await?);
    if args.runs("claims") {
        claims(args, &c, &conns, "", &mut rows).await;
        // The same, with every connection on the leader: what forwarding costs.
        let leader = c.leader().await.context("no leader")?;
        let on_leader = Arc::new(c.connections(48, &[leader]).await?);
        claims(args, &c, &on_leader, ", all on the leader", &mut rows).await;
        for conn in on_leader.iter() {
            conn.close(quinn::VarInt::from_u32(0), b"done");
        }
    }
    if args.runs("validate") {
        validations(args, &conns, &mut rows).await?;
    }
    if args.runs("register") {
        let own = Cluster::start(&args.with_shipped_heartbeat()).await?;
        registrations(&own, &mut rows).await?;
    }
    if args.runs("agents") {
        // On a cluster of its own, so the memory it reports is the agents' alone.
        let fresh = Cluster::start(args).await?;
        held_agents(args, &fresh, &mut rows).await?;
    }
    if args.runs("eviction") {
        eviction(args, &c, &mut rows).await?;
    }
    if args.runs("failover") {
        leader_failover(args, &mut c, &mut rows).await?;
        leader_stopped(args, &mut c, &mut rows).await?;
        node_failover(args, &mut c, &mut rows).await?;
    }
    Ok(rows)
}

/// Claims of fresh ids, connections spread over all three nodes (followers forward). Also
/// prints how many claims shared a log entry (the leader's group commit).
async fn claims(
    args: &Args,
    c: &Cluster,
    conns: &Arc<Vec<quinn::Connection>>,
    via: &str,
    rows: &mut Vec<(String, Cell)>,
) {
    for inflight in [1usize, 64, 256] {
        let before = quic_counts(conns);
        let entries_before = c.last_log_index().await;
        let rate = crate::drive(inflight, args.duration(), {
            let conns = conns.clone();
            move |slot| {
                let conn = conns[slot % conns.len()].clone();
                async move {
                    request(&conn, claim_request(&fresh("claim")))
                        .await
                        .map(|_| ())
                }
            }
        })
        .await;
        if let (Some(from), Some(to)) = (entries_before, c.last_log_index().await) {
            let entries = to.saturating_sub(from);
            eprintln!(
                "bench: claim, {inflight} in flight{via}: {entries} log entries, {:.1} claims per entry",
                rate.ok as f64 / entries.max(1) as f64
            );
        }
        if std::env::var_os("AGENTREG_BENCH_QUIC_STATS").is_some() {
            let after = quic_counts(conns);
            let per = |i: usize| (after[i] - before[i]) as f64 / rate.ok.max(1) as f64;
            eprintln!(
                "claim, {inflight} in flight{via}: per claim, client sent {:.2} datagrams ({:.2} ACK frames, {:.2} stream frames), received {:.2} datagrams ({:.2} ACK frames)",
                per(0), per(1), per(2), per(3), per(4)
            );
        }
        rows.push((
            format!("claim, {inflight} in flight{via}"),
            Cell::Rate(rate),
        ));
    }
}

/// The bench connections' QUIC counters, summed: datagrams sent, ACK frames sent, stream
/// frames sent, datagrams received, ACK frames received (AGENTREG_BENCH_QUIC_STATS).
fn quic_counts(conns: &[quinn::Connection]) -> [u64; 5] {
    conns.iter().fold([0; 5], |mut t, c| {
        let s = c.stats();
        t[0] += s.udp_tx.datagrams;
        t[1] += s.frame_tx.acks;
        t[2] += s.frame_tx.stream;
        t[3] += s.udp_rx.datagrams;
        t[4] += s.frame_rx.acks;
        t
    })
}

/// Validations of one certificate, linearizable and local.
async fn validations(
    args: &Args,
    conns: &Arc<Vec<quinn::Connection>>,
    rows: &mut Vec<(String, Cell)>,
) -> anyhow::Result<()> {
    let cert = request(&conns[0], claim_request(&fresh("v")))
        .await
        .map_err(anyhow::Error::msg)?["certificate"]
        .clone();
    for (name, consistency) in [
        ("linearizable", "linearizable"),
        ("local/serializable", "local"),
    ] {
        let conns = conns.clone();
        let cert = cert.clone();
        let rate = crate::drive(64, args.duration(), move |slot| {
            let conn = conns[slot % conns.len()].clone();
            let req = json!({"command": "validate_certificate", "certificate": cert, "consistency": consistency});
            async move {
                let v = request(&conn, req).await?;
                if v["valid"] == true { Ok(()) } else { Err("invalid".into()) }
            }
        })
        .await;
        rows.push((format!("validate, {name}, 64 in flight"), Cell::Rate(rate)));
    }
    Ok(())
}

/// Registrations of new agents (each on its own connection, opened beforehand), then
/// takeovers of those ids with their certificates from other connections.
async fn registrations(c: &Cluster, rows: &mut Vec<(String, Cell)>) -> anyhow::Result<()> {
    use futures::{StreamExt, TryStreamExt};
    let all = [1, 2, 3];
    let n = crate::REGISTRATIONS;
    let first = c.connections(n, &all).await?;
    let second = c.connections(n, &all).await?;
    let ids: Vec<String> = (0..n).map(|_| fresh("reg")).collect();
    // The ids are claimed beforehand, 64 at a time (not measured).
    let certs: Vec<Value> = futures::stream::iter(ids.iter().zip(&first))
        .map(|(id, conn)| async move {
            let v = request(conn, claim_request(id)).await?;
            Ok::<_, String>(v["certificate"].clone())
        })
        .buffered(64)
        .try_collect()
        .await
        .map_err(anyhow::Error::msg)?;
    let work: Arc<Vec<(quinn::Connection, Value)>> = Arc::new(
        (0..n)
            .map(|i| {
                (first[i].clone(), json!({"command": "register_agent", "agent_id": ids[i], "certificate": certs[i]}))
            })
            .collect(),
    );
    rows.push((
        "register (new agent), 64 in flight".into(),
        Cell::Rate(crate::drive_list(64, work).await),
    ));
    let work: Arc<Vec<(quinn::Connection, Value)>> = Arc::new(
        (0..n)
            .map(|i| {
                (second[i].clone(), json!({"command": "register_agent", "agent_id": ids[i], "certificate": certs[i]}))
            })
            .collect(),
    );
    rows.push((
        "takeover, 64 in flight".into(),
        Cell::Rate(crate::drive_list(64, work).await),
    ));
    for conn in first.iter().chain(second.iter()) {
        conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    Ok(())
}

/// Agents held connected with heartbeats for three rounds: memory per agent, missed pings,
/// evictions (there must be none).
async fn held_agents(
    args: &Args,
    c: &Cluster,
    rows: &mut Vec<(String, Cell)>,
) -> anyhow::Result<()> {
    let all = [1, 2, 3];
    c.wait_ready().await?;
    let before = c.rss_bytes();
    let held = c.connections(args.agents, &all).await?;
    let work: Arc<Vec<(quinn::Connection, Value)>> = Arc::new(
        held.iter()
            .map(|conn| {
                (
                    conn.clone(),
                    json!({"command": "register_agent", "agent_id": fresh("held")}),
                )
            })
            .collect(),
    );
    let registering = Instant::now();
    let reg = crate::drive_list(64, work).await;
    eprintln!(
        "bench: {} agents registered in {:.1} s{}",
        reg.ok,
        registering.elapsed().as_secs_f64(),
        match &reg.first_error {
            Some(e) => format!(", {} failed (first: {e})", reg.failed),
            None => String::new(),
        }
    );
    let (missed_before, evicted_before) = heartbeat_counts(c).await;
    let rounds = 3;
    tokio::time::sleep(Duration::from_millis(rounds * args.heartbeat_ms)).await;
    let after = c.rss_bytes();
    let (missed, evicted) = heartbeat_counts(c).await;
    let sessions = match c.status(1).await {
        Some(s) => s.tables.sessions,
        None => 0,
    };
    let per = after.saturating_sub(before) as f64 / args.agents as f64;
    rows.push((
        format!("agents held with heartbeats ({})", args.agents),
        Cell::BytesPer(
            per,
            format!(
                "({} registered, {sessions} sessions after {rounds} rounds, {} pings missed, {} evicted)",
                reg.ok,
                missed - missed_before,
                evicted - evicted_before
            ),
        ),
    ));
    for conn in &held {
        conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    Ok(())
}

/// Eviction: an agent registers and then never answers a ping.
async fn eviction(args: &Args, c: &Cluster, rows: &mut Vec<(String, Cell)>) -> anyhow::Result<()> {
    let mut times = Vec::new();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap())?;
    for _ in 0..args.repeat {
        let conn = c.connect(&endpoint, 2).await?; // no ping answerer
        let id = fresh("silent");
        request(&conn, json!({"command": "register_agent", "agent_id": id}))
            .await
            .map_err(anyhow::Error::msg)?;
        let silent_since = Instant::now();
        loop {
            let gone = c
                .admin
                .call(
                    &c.addrs[&1].to_string(),
                    &AdminRequest::ClaimsShow {
                        agent_id: id.clone(),
                    },
                )
                .await
                .is_err();
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.push(silent_since.elapsed());
        conn.close(quinn::VarInt::from_u32(0), b"done");
    }
    rows.push((
        format!(
            "eviction after silence (timeout {} ms)",
            args.agent_timeout().as_millis()
        ),
        Cell::Times(times),
    ));
    Ok(())
}

/// Once the cluster is ready: its leader, and a connection to another node.
async fn leader_and_survivor(
    c: &Cluster,
    endpoint: &quinn::Endpoint,
) -> anyhow::Result<(u64, quinn::Connection)> {
    c.wait_ready().await?;
    let leader = c.leader().await.context("no leader")?;
    let survivor = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    Ok((leader, c.connect(endpoint, survivor).await?))
}

/// Leader killed -> next acknowledged claim, through a survivor.
async fn leader_failover(
    args: &Args,
    c: &mut Cluster,
    rows: &mut Vec<(String, Cell)>,
) -> anyhow::Result<()> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap())?;
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        let (leader, conn) = leader_and_survivor(c, &endpoint).await?;
        request(&conn, claim_request(&fresh("pre")))
            .await
            .map_err(anyhow::Error::msg)?;
        let killed = Instant::now();
        c.kill(leader);
        times.push(
            crate::first_success(killed, Duration::from_millis(20), || {
                let conn = conn.clone();
                async move { request(&conn, claim_request(&fresh("fo"))).await.is_ok() }
            })
            .await,
        );
        conn.close(quinn::VarInt::from_u32(0), b"done");
        c.spawn(leader)?;
    }
    rows.push((
        "leader killed -> next acknowledged claim".into(),
        Cell::Times(times),
    ));
    Ok(())
}

/// Leader stopped gracefully (SIGTERM) -> the longest a claim through a survivor waited.
async fn leader_stopped(
    args: &Args,
    c: &mut Cluster,
    rows: &mut Vec<(String, Cell)>,
) -> anyhow::Result<()> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap())?;
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        let (leader, conn) = leader_and_survivor(c, &endpoint).await?;
        let mut child = c.procs.remove(&leader).context("leader not running")?;
        let gap = crate::longest_gap(
            || {
                let conn = conn.clone();
                async move { request(&conn, claim_request(&fresh("gs"))).await.is_ok() }
            },
            || crate::terminate(&child),
        )
        .await;
        times.push(gap);
        conn.close(quinn::VarInt::from_u32(0), b"done");
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        c.spawn(leader)?;
    }
    rows.push((
        "leader stopped (SIGTERM) -> longest wait between claims".into(),
        Cell::Times(times),
    ));
    Ok(())
}

/// A node killed -> its agents registered elsewhere (AgentClient with failover).
async fn node_failover(
    args: &Args,
    c: &mut Cluster,
    rows: &mut Vec<(String, Cell)>,
) -> anyhow::Result<()> {
    let all = [1, 2, 3];
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        c.wait_ready().await?;
        let victim = c.leader().await.map_or(1, |l| if l == 3 { 2 } else { 3 });
        let mut order: Vec<String> = vec![c.addrs[&victim].to_string()];
        order.extend(
            all.iter()
                .filter(|n| **n != victim)
                .map(|n| c.addrs[n].to_string()),
        );
        let mut clients = Vec::new();
        for _ in 0..100 {
            let mut config = ClientConfig::new(order.clone(), c.ca_pem.clone());
            config.server_name = tls::DEFAULT_SERVER_NAME.into();
            let client = AgentClient::connect(config).await?;
            let id = fresh("mover");
            let cert = client.claim_agent_id(&id, false).await?;
            client
                .register(&id, serde_json::Map::new(), Some(cert), false)
                .await?;
            clients.push(client);
        }
        let mut events: Vec<_> = clients.iter().map(|c| c.events()).collect();
        let killed = Instant::now();
        c.kill(victim);
        for ev in &mut events {
            loop {
                match tokio::time::timeout(Duration::from_secs(60), ev.recv()).await {
                    Ok(Ok(ClientEvent::Reconnected { .. })) => break,
                    Ok(Ok(_)) => continue,
                    _ => bail!("an agent did not re-register within 60 s"),
                }
            }
        }
        times.push(killed.elapsed());
        for client in clients {
            client.close().await;
        }
        c.spawn(victim)?;
    }
    rows.push((
        "node killed -> its 100 agents registered elsewhere".into(),
        Cell::Times(times),
    ));
    Ok(())
}

/// Pings missed and sessions evicted, summed over the nodes.
async fn heartbeat_counts(c: &Cluster) -> (u64, u64) {
    let (mut missed, mut evicted) = (0, 0);
    for id in 1..=3 {
        if let Some(s) = c.status(id).await {
            missed += s.heartbeat.pings_missed;
            evicted += s.heartbeat.evictions_committed;
        }
    }
    (missed, evicted)
}
