//! `agentreg agent ...`: the agent side from a shell, for scripts and demos.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Map, Value};

use crate::client::{load_certificate, save_certificate, AgentClient, ClientConfig, ClientEvent};

#[derive(Debug, Clone, Args)]
pub struct AgentConn {
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
    /// Name to verify in node certificates.
    #[arg(long, default_value = crate::transport::tls::DEFAULT_SERVER_NAME)]
    pub server_name: String,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Claim an id and save its certificate.
    Claim {
        #[arg(long)]
        id: String,
        /// Where to write the certificate (JSON).
        #[arg(long)]
        out: PathBuf,
        /// Re-issue the certificate of an id you hold (needs --cert).
        #[arg(long)]
        force: bool,
        /// Current certificate, as proof for --force.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
    /// Ask the cluster whether a certificate is valid.
    Validate {
        #[arg(long)]
        cert: PathBuf,
    },
    /// Revoke a certificate: no node validates it again.
    Revoke {
        #[arg(long)]
        cert: PathBuf,
    },
    /// Give up the id of a certificate (the certificate is revoked).
    Release {
        #[arg(long)]
        cert: PathBuf,
    },
    /// Stay registered: answer pings, reconnect elsewhere on failure, renew the certificate.
    Run {
        #[arg(long)]
        id: String,
        /// Certificate to register with (needed for a claimed id); renewals are written back.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Metadata, a JSON object.
        #[arg(long, default_value = "{}")]
        metadata: String,
        /// Take over a session of the id held elsewhere.
        #[arg(long)]
        force_reconnect: bool,
    },
}

async fn connect(conn: &AgentConn) -> anyhow::Result<AgentClient> {
    let ca = std::fs::read_to_string(&conn.ca)
        .with_context(|| format!("cannot read CA {}", conn.ca.display()))?;
    let mut config = ClientConfig::new(conn.endpoints.clone(), ca);
    config.server_name = conn.server_name.clone();
    Ok(AgentClient::connect(config).await?)
}

pub async fn run(conn: &AgentConn, cmd: AgentCommand) -> anyhow::Result<()> {
    let client = connect(conn).await?;
    match cmd {
        AgentCommand::Claim {
            id,
            out,
            force,
            cert,
        } => {
            if let Some(p) = cert {
                client.set_certificate(load_certificate(&p)?);
            }
            let c = client.claim_agent_id(&id, force).await?;
            save_certificate(&c, &out)?;
            println!(
                "claimed {id}: serial {}, expires at {} (certificate in {})",
                c.serial,
                c.expires_at,
                out.display()
            );
        }
        AgentCommand::Validate { cert } => {
            let c = load_certificate(&cert)?;
            let v = client.validate_certificate(&c).await?;
            if v.valid {
                println!("valid: certificate {} of {}", c.serial, v.agent_id);
            } else {
                println!("invalid: {}", v.reason.unwrap_or_default());
                client.close().await;
                std::process::exit(super::exit::INVALID);
            }
        }
        AgentCommand::Revoke { cert } => {
            let c = load_certificate(&cert)?;
            client.revoke_certificate(&c).await?;
            println!("revoked certificate {} of {}", c.serial, c.agent_id);
        }
        AgentCommand::Release { cert } => {
            let c = load_certificate(&cert)?;
            client.release_agent_id(&c).await?;
            println!("released {} (certificate {} revoked)", c.agent_id, c.serial);
        }
        AgentCommand::Run {
            id,
            cert,
            metadata,
            force_reconnect,
        } => return run_agent(client, &id, cert, &metadata, force_reconnect).await,
    }
    client.close().await;
    Ok(())
}

async fn run_agent(
    client: AgentClient,
    id: &str,
    cert_path: Option<PathBuf>,
    metadata: &str,
    force_reconnect: bool,
) -> anyhow::Result<()> {
    let metadata: Map<String, Value> =
        serde_json::from_str(metadata).context("--metadata must be a JSON object")?;
    let cert = cert_path.as_deref().map(load_certificate).transpose()?;
    let mut events = client.events();
    let reg = client.register(id, metadata, cert, force_reconnect).await?;
    tracing::info!(
        agent_id = id,
        session_id = reg.session_id,
        node_id = reg.node_id,
        took_over = reg.took_over,
        "registered"
    );
    loop {
        tokio::select! {
            _ = super::shutdown_signal() => break,
            ev = events.recv() => match ev {
                Ok(ClientEvent::Reconnected { node, session_id }) => tracing::info!(%node, session_id, "registered again after losing the node"),
                Ok(ClientEvent::Renewed { serial, expires_at }) => {
                    tracing::info!(serial, expires_at, "certificate renewed");
                    if let (Some(p), Some(c)) = (&cert_path, client.certificate()) {
                        if let Err(e) = save_certificate(&c, p) {
                            tracing::warn!(error = %e, "cannot save the renewed certificate");
                        }
                    }
                }
                Ok(ClientEvent::SessionLost { reason }) => {
                    tracing::error!(%reason, "session ended by the cluster");
                    anyhow::bail!("session ended: {reason}");
                }
                Ok(ClientEvent::Trouble { error }) => tracing::warn!(%error, "trouble"),
                Err(_) => {}
            },
        }
    }
    tracing::info!("unregistering");
    client.close().await;
    Ok(())
}
