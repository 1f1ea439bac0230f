//! The `agentreg` command line: run a node, write dev TLS material and configs, operate a
//! cluster. `main.rs` only parses arguments and sets up logging; everything is here.

mod admin_client;
mod agent;
mod dev;
mod health;
mod keys;
pub mod logging;
mod members;
mod snapshot;
mod status;
mod tables;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

pub use admin_client::{AdminClient, NoEndpoint, Refused};

#[derive(Debug, Parser)]
#[command(
    name = "agentreg",
    version,
    about = "A clustered registry of agent identities"
)]
pub struct Cli {
    /// Log format: text or json. The level comes from RUST_LOG (default: info,openraft=warn);
    /// each openraft message site logs at most once every 10 s.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node.
    Node {
        /// The node's TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write development TLS material: a cluster CA, a certificate per node, one for the operator.
    DevCerts {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Node ids to issue certificates for.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        nodes: Vec<u64>,
        /// Extra DNS names or IP addresses to put in every node certificate.
        #[arg(long)]
        san: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Write TLS material and node configs for a local cluster on 127.0.0.1 (kept if present).
    DevCluster {
        /// Directory to write into.
        #[arg(long, default_value = ".local-cluster")]
        dir: PathBuf,
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// UDP port of node 1; node N listens on base_port + N - 1.
        #[arg(long, default_value_t = 7101)]
        base_port: u16,
    },
    /// Act as an agent: claim, validate, revoke, release, or stay registered.
    Agent {
        #[command(flatten)]
        conn: agent::AgentConn,
        #[command(subcommand)]
        command: agent::AgentCommand,
    },
    /// Manage the replicated signing keyring.
    Keys {
        #[command(flatten)]
        conn: AdminArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Cluster membership: list, add a node, remove a node, move the leadership.
    Members {
        #[command(flatten)]
        conn: AdminArgs,
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: members::MembersCommand,
    },
    /// Registered agents.
    Agents {
        #[command(flatten)]
        conn: AdminArgs,
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: tables::AgentsCommand,
    },
    /// Claims of agent ids.
    Claims {
        #[command(flatten)]
        conn: AdminArgs,
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: tables::ClaimsCommand,
    },
    /// Revoke the current certificate of an agent id (the id becomes free).
    Revoke {
        #[command(flatten)]
        conn: AdminArgs,
        #[arg(long)]
        json: bool,
        agent_id: String,
    },
    /// Backups: save one from the cluster, inspect one, restore a node's data dir from one.
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// Show every member: role, leader, term, log and applied index, table sizes.
    Status {
        #[command(flatten)]
        conn: AdminArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check every member serves (quorum, clock, certificate) and their tables agree; exit
    /// status 5 if not.
    Health {
        #[command(flatten)]
        conn: AdminArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How the operator reaches the cluster.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Node addresses (host:port), tried in order.
    #[arg(
        long,
        value_delimiter = ',',
        env = "AGENTREG_ENDPOINTS",
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    )]
    pub endpoints: Vec<String>,
    /// Cluster CA certificate.
    #[arg(long, env = "AGENTREG_CA", default_value = ".local-cluster/tls/ca.pem")]
    pub ca: PathBuf,
    /// Operator certificate.
    #[arg(
        long,
        env = "AGENTREG_CERT",
        default_value = ".local-cluster/tls/operator.pem"
    )]
    pub cert: PathBuf,
    /// Operator private key.
    #[arg(
        long,
        env = "AGENTREG_KEY",
        default_value = ".local-cluster/tls/operator.key"
    )]
    pub key: PathBuf,
    /// Name to verify in node certificates.
    #[arg(long, default_value = crate::transport::tls::DEFAULT_SERVER_NAME)]
    pub server_name: String,
}

impl AdminArgs {
    /// Operator access to the nodes at `endpoints` with the dev material that
    /// [`crate::transport::tls::write_dev_material`] wrote into `tls_dir`.
    pub fn for_dev_material(tls_dir: &std::path::Path, endpoints: Vec<String>) -> AdminArgs {
        AdminArgs {
            endpoints,
            ca: tls_dir.join("ca.pem"),
            cert: tls_dir.join("operator.pem"),
            key: tls_dir.join("operator.key"),
            server_name: crate::transport::tls::DEFAULT_SERVER_NAME.into(),
        }
    }
}

/// Exit statuses of the `agentreg` command (docs/operations.md): 2 is clap's, for a wrong
/// command line.
pub mod exit {
    /// A refusal on the request's merits, or a local error (files, TLS material).
    pub const FAILED: i32 = 1;
    /// `agent validate`: the certificate is not valid.
    pub const INVALID: i32 = 3;
    /// The cluster could not answer: no node reachable, no quorum, stopping, or the outcome
    /// of a write is unknown. Worth retrying later.
    pub const UNAVAILABLE: i32 = 4;
    /// `health`: some member does not serve, or the members' tables disagree.
    pub const UNHEALTHY: i32 = 5;
}

/// The exit status for a command that failed with `e`.
pub fn exit_status(e: &anyhow::Error) -> i32 {
    use crate::client::ClientError;
    let transient = if let Some(e) = e.downcast_ref::<ClientError>() {
        match e {
            ClientError::Unreachable(_) | ClientError::Failed(_) => true,
            ClientError::Refused(r) => r.code.worth_repeating() || r.code.refused_for_closing(),
            _ => false,
        }
    } else if let Some(r) = e.downcast_ref::<Refused>() {
        r.transient()
    } else {
        e.downcast_ref::<NoEndpoint>().is_some()
    };
    if transient {
        exit::UNAVAILABLE
    } else {
        exit::FAILED
    }
}

/// Runs a parsed command on a runtime built for it: `node` on one with the worker threads
/// its config asks for (one per core by default), anything else on tokio's default.
///
/// # Errors
/// Whatever the command fails with, with context for the operator.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    // A node's config is read before its runtime exists: the runtime's size is in it.
    let node = match &cli.command {
        Command::Node { config } => Some(crate::config::NodeConfig::load(config)?),
        _ => None,
    };
    let runtime = runtime(node.as_ref().and_then(|c| c.worker_threads))
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match node {
            Some(config) => run_node(config).await,
            None => run(cli).await,
        }
    })
}

/// A multi-threaded runtime with `worker_threads` workers, or tokio's default (one per
/// core, or `TOKIO_WORKER_THREADS`) when `None`.
///
/// # Errors
/// The OS refused the threads.
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder.enable_all().build()
}

/// Runs a parsed command.
///
/// # Errors
/// Whatever the command fails with, with context for the operator.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node { config } => run_node(crate::config::NodeConfig::load(&config)?).await,
        Command::DevCerts {
            out,
            nodes,
            san,
            force,
        } => dev::certs(&out, &nodes, &san, force),
        Command::DevCluster {
            dir,
            nodes,
            base_port,
        } => dev::cluster(&dir, nodes, base_port),
        Command::Status { conn, json } => status::run(&conn, json).await,
        Command::Health { conn, json } => health::run(&conn, json).await,
        Command::Snapshot { command } => snapshot::run(command).await,
        Command::Agent { conn, command } => agent::run(&conn, command).await,
        Command::Keys {
            conn,
            json,
            command,
        } => keys::run(&conn, command, json).await,
        Command::Members {
            conn,
            json,
            command,
        } => members::run(&conn, command, json).await,
        Command::Agents {
            conn,
            json,
            command,
        } => tables::agents(&conn, command, json).await,
        Command::Claims {
            conn,
            json,
            command,
        } => tables::claims(&conn, command, json).await,
        Command::Revoke {
            conn,
            json,
            agent_id,
        } => tables::revoke(&conn, agent_id, json).await,
    }
}

async fn run_node(config: crate::config::NodeConfig) -> anyhow::Result<()> {
    // A write past the file-size limit (`ulimit -f`) raises SIGXFSZ, whose default is to
    // kill the process on the spot. Handled (and ignored), the write fails with EFBIG
    // instead and the node stops as on any failed disk write: logged, agents told to move,
    // exit status 1. The handler stays installed after this value is dropped.
    #[cfg(unix)]
    if let Err(e) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ))
    {
        tracing::warn!(error = %e, "cannot handle SIGXFSZ");
    }
    let node = crate::node::Node::start(config, None).await?;
    let mut reload = reload_signal();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let fault = {
        let fault = node.fault();
        tokio::pin!(fault);
        loop {
            tokio::select! {
                _ = &mut shutdown => break None,
                fault = &mut fault => break Some(fault),
                // The outcome is logged; refused material leaves the node as it was.
                Some(()) = reload.recv() => {
                    let _ = node.reload_tls();
                }
            }
        }
    };
    match fault {
        None => {
            node.shutdown().await;
            Ok(())
        }
        Some(fault) => {
            node.halt().await;
            Err(anyhow::anyhow!("the node stopped on a fault: {fault}"))
        }
    }
}

/// Yields at each SIGHUP: reload the TLS files (see `Node::reload_tls`).
fn reload_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    // Signals that arrive while a reload is pending make one reload.
                    let _ = tx.try_send(());
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP: TLS files reload only by themselves")
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    /// A node's `worker_threads` sizes its runtime; without it tokio's default applies.
    #[test]
    fn the_runtime_has_the_worker_threads_asked_for() {
        for n in [1, 3] {
            let rt = super::runtime(Some(n)).unwrap();
            assert_eq!(rt.metrics().num_workers(), n);
        }
        let default = super::runtime(None).unwrap();
        let expected = std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        assert_eq!(default.metrics().num_workers(), expected);
    }
}
