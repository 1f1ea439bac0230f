//! Node configuration: one TOML file per node.
//!
//! Every key is documented in docs/configuration.md. Unknown keys are refused, so a typo
//! never silently falls back to a default.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most runtime worker threads a node may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Whether this node starts a brand-new cluster or joins an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialClusterState {
    /// Members in `peers` form a new cluster; a pristine node initialises the membership once.
    #[default]
    New,
    /// The node waits to be added by `agentreg members add`; it never initialises.
    Existing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: u64,
    /// The peer's UDP address (host:port); it serves all three ALPNs there.
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), signed by the CA.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The name peers and agents verify in this node's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// How often the node looks whether the three files changed, and takes up renewed
    /// material; 0: only on SIGHUP.
    #[serde(default = "default_reload_check_secs")]
    pub reload_check_secs: u64,
}

impl TlsConfig {
    /// The three files, as the TLS layer loads them.
    pub fn files(&self) -> crate::transport::tls::TlsFiles {
        crate::transport::tls::TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

fn default_server_name() -> String {
    crate::transport::tls::DEFAULT_SERVER_NAME.to_owned()
}

fn default_reload_check_secs() -> u64 {
    60
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log before it) after this many applied entries.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind the snapshot, so slightly lagging followers catch up
    /// without a snapshot.
    pub max_in_snapshot_log_to_keep: u64,
    /// How long a write may wait for a leader and its commit before failing.
    pub write_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            // openraft 0.9 waits election_timeout_max (the leader lease) plus this node's
            // random election timeout (fixed at start, between min and max) after it last
            // heard from the leader, checked every 1.5 heartbeats: a killed leader is
            // replaced after 350-475 ms with these values (see docs/configuration.md).
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 200,
            snapshot_logs_since_last: 10_000,
            max_in_snapshot_log_to_keep: 1_000,
            write_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Lifetime of issued certificates.
    pub certificate_ttl_hours: u64,
    /// File holding the initial HMAC secret (at least 32 bytes); when absent the first
    /// leader generates one from the OS random source.
    pub hmac_secret_file: Option<PathBuf>,
    /// Whether `force_reconnect` without a certificate may take over a session of an
    /// unclaimed id (a migration aid for legacy agents; off by default).
    pub allow_uncertified_takeover: bool,
    /// Furthest this node's clock may be from its peers' for it to stamp writes and judge
    /// certificates (see `node::clock`).
    pub max_clock_skew_ms: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            certificate_ttl_hours: 24,
            hmac_secret_file: None,
            allow_uncertified_takeover: false,
            max_clock_skew_ms: 5_000,
        }
    }
}

/// Limits on what one source may ask of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Claims this node accepts per hour from one address (an IPv6 /64 counts as one); 0:
    /// no limit. Each node counts its own.
    pub claims_per_hour_per_address: u64,
    /// Claims one address may send at once before the hourly rate applies.
    pub claim_burst: u64,
    /// Agent connections this node holds at most; 0: no limit.
    pub max_agent_connections: u64,
    /// Agent connections this node holds at most from one address (an IPv6 /64 counts as
    /// one); 0: no limit.
    pub max_agent_connections_per_address: u64,
    /// QUIC handshakes (of any connection: agents, peers, operators) in progress at most;
    /// more are refused before any TLS work. 0: no limit.
    pub max_handshakes: u64,
    /// QUIC handshakes in progress at most from one validated address (an IPv6 /64 counts
    /// as one); 0: no limit.
    pub max_handshakes_per_address: u64,
    /// With this many handshakes in progress, a new connection from an address not yet
    /// validated is sent a QUIC Retry first (a spoofed source never answers). 0: always.
    pub retry_after_handshakes: u64,
    /// A handshake not done by then is dropped.
    pub handshake_timeout_ms: u64,
    /// An agent request whose frame has not arrived in full by then (from its stream's
    /// opening) is answered `bad_request` and its stream stopped.
    pub request_read_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            claims_per_hour_per_address: 0,
            claim_burst: 20,
            max_agent_connections: 200_000,
            max_agent_connections_per_address: 0,
            max_handshakes: 1_024,
            max_handshakes_per_address: 0,
            retry_after_handshakes: 64,
            handshake_timeout_ms: 10_000,
            request_read_timeout_ms: 10_000,
        }
    }
}

/// How a node watches its agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// How often each registered agent is pinged.
    pub interval_ms: u64,
    /// An agent with no sign of life for this long is evicted. Also how long the leader
    /// waits to hear from a node before evicting that node's sessions.
    pub agent_timeout_ms: u64,
    /// How long one ping may wait for its answer.
    pub ping_timeout_ms: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_ms: 30_000,
            agent_timeout_ms: 90_000,
            ping_timeout_ms: 5_000,
        }
    }
}

impl HeartbeatConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.agent_timeout_ms)
    }

    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.ping_timeout_ms)
    }

    /// # Errors
    /// One line naming the key and the problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 {
            return Err("heartbeat.interval_ms must be above 0".into());
        }
        if self.agent_timeout_ms <= self.interval_ms {
            return Err(format!(
                "heartbeat.agent_timeout_ms ({}) must be above heartbeat.interval_ms ({}), or every agent would be evicted between two pings",
                self.agent_timeout_ms, self.interval_ms
            ));
        }
        if self.ping_timeout_ms == 0 || self.ping_timeout_ms > self.interval_ms {
            return Err(format!(
                "heartbeat.ping_timeout_ms ({}) must be above 0 and at most heartbeat.interval_ms ({})",
                self.ping_timeout_ms, self.interval_ms
            ));
        }
        Ok(())
    }
}

/// The HTTP endpoint for Prometheus and health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// TCP address serving /metrics, /healthz and /readyz; none when absent.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of the cluster; a data dir written for another cluster is refused.
    pub cluster_id: String,
    pub node_id: u64,
    /// UDP address to bind (agents, peers and operators all use it).
    pub listen: SocketAddr,
    /// Address other nodes and agents use to reach this node; defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    #[serde(default)]
    pub initial_cluster_state: InitialClusterState,
    /// The initial members of the cluster, this node included.
    pub peers: Vec<Peer>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Threads of the node's async runtime; one per core when absent. Nodes that share a
    /// machine's cores (a test or dev cluster, a benchmark) waste fewer wake-ups with one.
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

impl NodeConfig {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// The file cannot be read, a key is missing, unknown or of the wrong type, or the
    /// values do not make sense together; the message names the file and the key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: NodeConfig =
            serde_path_to_error::deserialize(toml::Deserializer::new(&text)).map_err(|e| {
                ConfigError::Parse {
                    path: path.to_owned(),
                    message: one_line(&text, &e),
                }
            })?;
        // Relative paths in the file are relative to the file, not to the working directory.
        if let Some(base) = path.parent() {
            config.resolve_paths(base);
        }
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        if let Some(p) = self.identity.hmac_secret_file.as_mut() {
            fix(p);
        }
    }

    /// Checks the values make sense together.
    ///
    /// # Errors
    /// One line naming the key and the problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_id.trim().is_empty() {
            return Err("cluster_id must not be empty".into());
        }
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for p in &self.peers {
            if !ids.insert(p.id) {
                return Err(format!("peers: node id {} appears twice", p.id));
            }
            if !addrs.insert(p.addr.as_str()) {
                return Err(format!("peers: address {} appears twice", p.addr));
            }
            check_host_port(&p.addr)
                .map_err(|e| format!("peers: node {}: addr {:?}: {e}", p.id, p.addr))?;
        }
        if self.initial_cluster_state == InitialClusterState::New && !ids.contains(&self.node_id) {
            return Err(format!(
                "node_id {} is not among the peers of a new cluster (add it to peers)",
                self.node_id
            ));
        }
        if let Some(a) = &self.advertise {
            check_host_port(a).map_err(|e| format!("advertise {a:?}: {e}"))?;
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return Err("raft.heartbeat_interval_ms must be above 0".into());
        }
        if r.election_timeout_min_ms <= 2 * r.heartbeat_interval_ms {
            return Err(format!(
                "raft.election_timeout_min_ms ({}) must be more than twice raft.heartbeat_interval_ms ({})",
                r.election_timeout_min_ms, r.heartbeat_interval_ms
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(format!(
                "raft.election_timeout_max_ms ({}) must be above raft.election_timeout_min_ms ({})",
                r.election_timeout_max_ms, r.election_timeout_min_ms
            ));
        }
        if r.snapshot_logs_since_last == 0 {
            return Err("raft.snapshot_logs_since_last must be above 0".into());
        }
        if r.write_timeout_ms < r.election_timeout_max_ms {
            return Err(format!(
                "raft.write_timeout_ms ({}) must be at least raft.election_timeout_max_ms ({}) so a write can outlast an election",
                r.write_timeout_ms, r.election_timeout_max_ms
            ));
        }
        self.heartbeat.validate()?;
        if let Some(n) = self.worker_threads {
            if n == 0 || n > MAX_WORKER_THREADS {
                return Err(format!(
                    "worker_threads ({n}) must be between 1 and {MAX_WORKER_THREADS} (leave it out for one per core)"
                ));
            }
        }
        let ttl = self.identity.certificate_ttl_hours;
        if ttl == 0 || ttl > 10 * 365 * 24 {
            return Err(format!(
                "identity.certificate_ttl_hours ({ttl}) must be between 1 and 87600"
            ));
        }
        if self.tls.reload_check_secs > 86_400 {
            return Err(format!(
                "tls.reload_check_secs ({}) must be at most 86400 (0: only on SIGHUP)",
                self.tls.reload_check_secs
            ));
        }
        let burst = self.limits.claim_burst;
        if !(1..=1_000_000).contains(&burst) {
            return Err(format!(
                "limits.claim_burst ({burst}) must be between 1 and 1000000"
            ));
        }
        let handshake = self.limits.handshake_timeout_ms;
        if !(100..=600_000).contains(&handshake) {
            return Err(format!(
                "limits.handshake_timeout_ms ({handshake}) must be between 100 and 600000"
            ));
        }
        let read = self.limits.request_read_timeout_ms;
        if !(100..=600_000).contains(&read) {
            return Err(format!(
                "limits.request_read_timeout_ms ({read}) must be between 100 and 600000"
            ));
        }
        let skew = self.identity.max_clock_skew_ms;
        if !(100..=3_600_000).contains(&skew) {
            return Err(format!(
                "identity.max_clock_skew_ms ({skew}) must be between 100 and 3600000"
            ));
        }
        Ok(())
    }

    /// The address this node is reached at.
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.raft.write_timeout_ms)
    }

    pub fn certificate_ttl_secs(&self) -> u64 {
        self.identity.certificate_ttl_hours * 3600
    }
}

fn check_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr.rsplit_once(':').ok_or("expected host:port")?;
    if host.is_empty() {
        return Err("host is empty".into());
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or("port must be a number from 1 to 65535")?;
    Ok(())
}

/// toml's errors span several lines (with a source excerpt); keep them on one line, led by
/// where in the file's structure they are (the path serde was deserializing, as in
/// `heartbeat.interval_ms` or `peers[1].addr`, inline tables included) and followed by the
/// line and column, unless the error is about a whole table (a key missing from it).
fn one_line(text: &str, e: &serde_path_to_error::Error<toml::de::Error>) -> String {
    let inner = e.inner();
    let msg = inner.message().trim_end();
    // The root's path displays as "."; an error there needs no lead.
    let lead = if e.path().iter().next().is_none() {
        String::new()
    } else {
        format!("{}: ", e.path())
    };
    let at = inner
        .span()
        .and_then(|span| Some((text.get(..span.start)?, text.get(span)?)))
        // A span over several lines is a whole table: no one place to point at.
        .filter(|(_, spanned)| !spanned.trim_end().contains('\n'))
        .map(|(before, _)| {
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let line = before.matches('\n').count() + 1;
            let column = before[line_start..].chars().count() + 1;
            format!(" (line {line}, column {column})")
        })
        .unwrap_or_default();
    format!("{lead}{msg}{at}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster_id = "test"
node_id = 1
listen = "127.0.0.1:7101"
data_dir = "data/node1"
peers = [
  { id = 1, addr = "127.0.0.1:7101" },
  { id = 2, addr = "127.0.0.1:7102" },
  { id = 3, addr = "127.0.0.1:7103" },
]
[tls]
ca = "tls/ca.pem"
cert = "tls/node1.pem"
key = "tls/node1.key"
"#;

    fn load(text: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        NodeConfig::load(&path)
    }

    #[test]
    fn good_config_loads_with_defaults_and_paths_relative_to_the_file() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.identity.certificate_ttl_hours, 24);
        assert!(c.data_dir.is_absolute() && c.data_dir.ends_with("data/node1"));
        assert!(c.tls.ca.ends_with("tls/ca.pem"));
        assert_eq!(c.tls.server_name, "agentreg");
        assert_eq!(c.worker_threads, None);
        let c = load(&GOOD.replace("node_id = 1", "node_id = 1\nworker_threads = 1")).unwrap();
        assert_eq!(c.worker_threads, Some(1));
    }

    fn err(text: &str) -> String {
        let e = load(text).expect_err("accepted").to_string();
        assert!(e.contains("node.toml"), "error does not name the file: {e}");
        assert!(!e.contains('\n'), "error spans lines: {e}");
        e
    }

    #[test]
    fn missing_unknown_and_mistyped_keys_are_named() {
        let e = err(&GOOD.replace("node_id = 1\n", ""));
        assert!(e.ends_with(": missing field `node_id`"), "{e}");
        let e = err(&GOOD.replace("key = \"tls/node1.key\"\n", ""));
        assert!(e.ends_with(": tls: missing field `key`"), "{e}");
        let e = err(&GOOD.replace("node_id = 1", "node_id = 1\nnode_idd = 2"));
        assert!(e.contains("node_idd"), "{e}");
        let e = err(&GOOD.replace("node_id = 1", "node_id = \"one\""));
        assert!(e.contains("node_id: invalid type"), "{e}");
        assert!(e.contains("(line 3, column 11)"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[heartbeat] # pings\ninterval_ms = \"often\"\n"
        ));
        assert!(e.contains("heartbeat.interval_ms: invalid type"), "{e}");
        let e = err(&GOOD.replace("listen = \"127.0.0.1:7101\"", "listen = \"nowhere\""));
        assert!(e.contains("invalid socket address"), "{e}");
        let e = err(&format!("{GOOD}\n[raft]\nheartbeat_ms = 5\n"));
        assert!(e.contains("heartbeat_ms"), "{e}");
    }

    /// The peers are an array of inline tables: an error in one names which peer and key,
    /// not only the line.
    #[test]
    fn errors_inside_inline_tables_name_the_peer_and_key() {
        let e = err(&GOOD.replace("{ id = 2, addr", "{ id = \"two\", addr"));
        assert!(
            e.contains(
                "peers[1].id: invalid type: string \"two\", expected u64 (line 8, column 10)"
            ),
            "{e}"
        );
        let e = err(&GOOD.replace("{ id = 3, addr = \"127.0.0.1:7103\" }", "{ id = 3 }"));
        assert!(e.contains("peers[2]: missing field `addr`"), "{e}");
        let e = err(&GOOD.replace("{ id = 2, addr", "{ id = 2, adr"));
        assert!(e.contains("peers[1].adr: unknown field `adr`"), "{e}");
    }

    #[test]
    fn nonsense_values_are_refused() {
        let e = err(&GOOD.replace("node_id = 1", "node_id = 9"));
        assert!(e.contains("node_id 9"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:7102", "127.0.0.1:7101"));
        assert!(e.contains("appears twice"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:7103", "127.0.0.1"));
        assert!(e.contains("host:port"), "{e}");
        let e = err(&format!("{GOOD}\n[raft]\nheartbeat_interval_ms = 300\n"));
        assert!(e.contains("election_timeout_min_ms"), "{e}");
        let e = err(&format!("{GOOD}\n[identity]\ncertificate_ttl_hours = 0\n"));
        assert!(e.contains("certificate_ttl_hours"), "{e}");
        let e = err(&format!("{GOOD}\n[identity]\nmax_clock_skew_ms = 0\n"));
        assert!(e.contains("max_clock_skew_ms"), "{e}");
        let e = err(&format!("{GOOD}\n[limits]\nhandshake_timeout_ms = 50\n"));
        assert!(e.contains("limits.handshake_timeout_ms (50)"), "{e}");
        let e = err(&format!("{GOOD}\n[limits]\nrequest_read_timeout_ms = 0\n"));
        assert!(e.contains("limits.request_read_timeout_ms (0)"), "{e}");
        let e = err(&format!("{GOOD}\n[limits]\nclaim_burst = 0\n"));
        assert!(e.contains("limits.claim_burst"), "{e}");
        // GOOD ends in its [tls] table.
        let e = err(&format!("{GOOD}reload_check_secs = 86401\n"));
        assert!(e.contains("reload_check_secs"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[heartbeat]\ninterval_ms = 1000\nagent_timeout_ms = 1000\n"
        ));
        assert!(
            e.contains("heartbeat.agent_timeout_ms (1000) must be above heartbeat.interval_ms"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}\n[heartbeat]\ninterval_ms = 1000\nping_timeout_ms = 2000\n"
        ));
        assert!(e.contains("heartbeat.ping_timeout_ms"), "{e}");
        for n in [0, MAX_WORKER_THREADS + 1] {
            let e =
                err(&GOOD.replace("node_id = 1", &format!("node_id = 1\nworker_threads = {n}")));
            assert!(
                e.contains(&format!("worker_threads ({n}) must be between 1 and")),
                "{e}"
            );
        }
        let e = err(&GOOD.replace("node_id = 1", "node_id = 1\nworker_threads = -1"));
        assert!(
            e.contains("worker_threads: ") && e.contains("expected usize"),
            "{e}"
        );
    }
}
