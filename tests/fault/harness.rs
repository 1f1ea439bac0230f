//! Three `agentreg node` processes on 127.0.0.1, each with its own temp data dir and log, and a
//! UDP fault proxy in front of every node's peer address: kill -9 and restart, SIGSTOP and
//! SIGCONT, cut any link (both ways or one way), isolate any node, heal. Every process is
//! killed when the harness is dropped, also on a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentreg::cli::{AdminArgs, AdminClient};
use agentreg::node::{AdminRequest, AgentInfo, ClaimInfo, NodeStatus};
use agentreg::transport::tls;

use super::faultnet::FaultNet;
pub use super::wait::wait_for;

pub const NODES: [u64; 3] = [1, 2, 3];

pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub addrs: BTreeMap<u64, SocketAddr>,
    pub net: FaultNet,
    procs: BTreeMap<u64, Child>,
    paused: BTreeSet<u64>,
    admin: AdminClient,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_owned();
        tls::write_dev_material(&path.join("tls"), &NODES, &[], false).expect("tls material");
        // Reserve a port per node; released just before the node binds it.
        let addrs: BTreeMap<u64, SocketAddr> = NODES
            .iter()
            .map(|id| {
                let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
                (*id, s.local_addr().unwrap())
            })
            .collect();
        let net = FaultNet::start(&addrs);
        for id in NODES {
            write_config(&path, id, &addrs, &net.proxies);
        }
        let admin = AdminClient::new(&AdminArgs::for_dev_material(
            &path.join("tls"),
            addrs.values().map(ToString::to_string).collect(),
        ))
        .expect("admin client");
        let mut cluster = Cluster {
            dir: Some(dir),
            path,
            addrs,
            net,
            procs: BTreeMap::new(),
            paused: BTreeSet::new(),
            admin,
        };
        for id in NODES {
            cluster.spawn(id);
        }
        cluster
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.path.join("tls/ca.pem")).expect("ca")
    }

    /// Starts node `id` (again), appending to its log. The node writes to pipes that the test
    /// copies into the log, so that a file-size limit put on the node ([`Cluster::limit_file_size`])
    /// does not silence it.
    pub fn spawn(&mut self, id: u64) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentreg"))
            .args(["node", "--config"])
            .arg(self.path.join(format!("node{id}.toml")))
            .env("RUST_LOG", node_log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agentreg node");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        copy_into(stdout, log.try_clone().expect("log"));
        copy_into(stderr, log);
        self.procs.insert(id, child);
    }

    /// Limits the size of every file node `id` writes to `bytes` (RLIMIT_FSIZE): its disk
    /// writes beyond that fail as on a full disk (EFBIG). A restart lifts it.
    pub fn limit_file_size(&self, id: u64, bytes: u64) {
        let child = &self.procs[&id];
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: prlimit reads `limit`, a valid rlimit, and writes nothing (old is null).
        let r = unsafe {
            libc::prlimit(
                child.id() as libc::pid_t,
                libc::RLIMIT_FSIZE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    /// Waits up to `within` for node `id` to exit on its own; its exit status, if it did.
    pub async fn exited(&mut self, id: u64, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let child = self.procs.get_mut(&id)?;
            if let Some(status) = child.try_wait().expect("wait for a node") {
                self.procs.remove(&id);
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.procs.contains_key(&id)
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.procs.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.remove(&id);
    }

    fn signal(&self, id: u64, sig: &str) {
        if let Some(child) = self.procs.get(&id) {
            let _ = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status();
        }
    }

    /// SIGTERM: the node stops gracefully and exits.
    pub fn terminate(&self, id: u64) {
        self.signal(id, "-TERM");
    }

    /// SIGHUP: the node reloads its TLS files.
    pub fn hang_up(&self, id: u64) {
        self.signal(id, "-HUP");
    }

    /// The dev TLS material every node was started with (`ca.pem`, `node<ID>.pem`, ...).
    pub fn tls_dir(&self) -> PathBuf {
        self.path.join("tls")
    }

    /// SIGSTOP: the process stays, silent.
    pub fn pause(&mut self, id: u64) {
        self.signal(id, "-STOP");
        self.paused.insert(id);
    }

    pub fn resume(&mut self, id: u64) {
        self.signal(id, "-CONT");
        self.paused.remove(&id);
    }

    /// Heals the network, resumes paused nodes and restarts killed ones.
    pub fn restore_all(&mut self) {
        self.net.heal();
        for id in self.paused.clone() {
            self.resume(id);
        }
        for id in NODES {
            if !self.is_running(id) {
                self.spawn(id);
            }
        }
    }

    pub async fn status(&self, id: u64) -> Option<NodeStatus> {
        let addr = self.addrs[&id].to_string();
        let call = self.admin.call(&addr, &AdminRequest::Status);
        let v = tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .ok()?
            .ok()?;
        serde_json::from_value(v["status"].clone()).ok()
    }

    /// The leader, as the first node that answers says.
    pub async fn leader(&self) -> Option<u64> {
        for id in NODES {
            if self.paused.contains(&id) || !self.is_running(id) {
                continue;
            }
            if let Some(s) = self.status(id).await {
                if let Some(l) = s.leader {
                    return Some(l);
                }
            }
        }
        None
    }

    /// Node `id`'s claims and sessions, after its read barrier.
    pub async fn tables(&self, id: u64) -> Option<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
        let addr = self.addrs[&id].to_string();
        let claims = self
            .admin
            .call(
                &addr,
                &AdminRequest::ClaimsList {
                    only: Default::default(),
                    stream: false,
                },
            )
            .await
            .ok()?;
        let agents = self
            .admin
            .call(
                &addr,
                &AdminRequest::AgentsList {
                    only: Default::default(),
                    stream: false,
                },
            )
            .await
            .ok()?;
        let claims: Vec<ClaimInfo> = serde_json::from_value(claims["claims"].clone()).ok()?;
        let agents: Vec<AgentInfo> = serde_json::from_value(agents["agents"].clone()).ok()?;
        Some((
            claims.into_iter().map(|c| (c.agent_id, c.serial)).collect(),
            agents
                .into_iter()
                .map(|a| (a.agent_id, a.session_id))
                .collect(),
        ))
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.path.join(format!("node{id}.log"))
    }

    /// Keeps the data dirs and logs after the run (for a failure) and says where.
    pub fn keep(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.procs) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Copies a node's output into its log, on a thread of its own, until the node exits.
fn copy_into(mut from: impl std::io::Read + Send + 'static, mut log: std::fs::File) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut log);
    });
}

/// The nodes' log filter: AGENTREG_FAULT_LOG (e.g. `info`, to see openraft's elections),
/// else `info,openraft=warn`.
fn node_log_filter() -> String {
    std::env::var("AGENTREG_FAULT_LOG").unwrap_or_else(|_| "info,openraft=warn".into())
}

/// A debug build (the short run in the test suite) gets slower Raft timings: it is many times
/// slower and shares two cores with the workload. A release build (scripts/fault-run.sh)
/// runs with the shipped defaults, so the long run tests what operators deploy.
const RAFT_TIMING: &str = if cfg!(debug_assertions) {
    "heartbeat_interval_ms = 100\nelection_timeout_min_ms = 500\nelection_timeout_max_ms = 1000\n"
} else {
    "# the shipped heartbeat and election timings\n"
};

/// How long after losing its leader a quorum may take to elect another and make it known,
/// with [`RAFT_TIMING`]: openraft 0.9 campaigns after the leader lease (the longest election
/// timeout) plus an election timeout, checked every 1.5 heartbeats; then the vote and the
/// new leader's first heartbeat, and half a second to spare.
pub const TAKEOVER: std::time::Duration = if cfg!(debug_assertions) {
    std::time::Duration::from_millis(1000 + 1000 + 150 + 350 + 500)
} else {
    std::time::Duration::from_millis(200 + 200 + 75 + 125 + 500)
};

fn write_config(
    dir: &Path,
    id: u64,
    addrs: &BTreeMap<u64, SocketAddr>,
    proxies: &BTreeMap<u64, SocketAddr>,
) {
    let peers: String = proxies
        .iter()
        .map(|(id, a)| format!("  {{ id = {id}, addr = \"{a}\" }},\n"))
        .collect();
    let text = format!(
        r#"cluster_id = "fault"
node_id = {id}
listen = "{listen}"
advertise = "{advertise}"
data_dir = "node{id}"
peers = [
{peers}]

[tls]
ca = "tls/ca.pem"
cert = "tls/node{id}.pem"
key = "tls/node{id}.key"

[raft]
{raft_timing}write_timeout_ms = 3000
# Small, so that snapshots, purges and snapshot installs happen during the run.
snapshot_logs_since_last = 300
max_in_snapshot_log_to_keep = 50

[heartbeat]
interval_ms = 500
agent_timeout_ms = 2500
ping_timeout_ms = 400
"#,
        listen = addrs[&id],
        advertise = proxies[&id],
        raft_timing = RAFT_TIMING,
    );
    std::fs::write(dir.join(format!("node{id}.toml")), text).expect("write config");
}
