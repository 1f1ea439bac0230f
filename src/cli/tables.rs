//! `agentreg agents list`, `claims list|show`, `revoke`: the replicated tables, read
//! linearizably from any node.

use anyhow::Context;
use clap::Subcommand;

use super::{AdminArgs, AdminClient};
use crate::node::{AdminRequest, AgentInfo, ClaimInfo, ListFilter};

/// Which rows a list shows.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only agent ids that start with this.
    #[arg(long)]
    prefix: Option<String>,
    /// At most this many rows (the first by agent id); says how many more there are.
    #[arg(long)]
    limit: Option<usize>,
}

impl ListArgs {
    fn filter(self) -> ListFilter {
        ListFilter {
            prefix: self.prefix,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Registered agents, by id: node, session id, certificate serial.
    List {
        #[command(flatten)]
        only: ListArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClaimsCommand {
    /// Claims, by agent id: serial, expiry, signing key.
    List {
        #[command(flatten)]
        only: ListArgs,
    },
    /// One agent id: its claim and its session.
    Show { agent_id: String },
}

async fn ask(args: &AdminArgs, req: AdminRequest) -> anyhow::Result<serde_json::Value> {
    let client = AdminClient::new(args)?;
    let (_, answer) = client.call_any(&args.endpoints, &req).await?;
    client.close().await;
    Ok(answer)
}

fn print_agents(agents: &[AgentInfo]) {
    println!(
        "{:<32} {:<6} {:>10} {:>12} {:>8}",
        "AGENT", "NODE", "SESSION", "REGISTERED", "CERT"
    );
    for a in agents {
        let cert = a
            .certificate_serial
            .map_or("-".to_owned(), |s| s.to_string());
        println!(
            "{:<32} {:<6} {:>10} {:>12} {:>8}",
            a.agent_id, a.node_id, a.session_id, a.registered_at, cert
        );
    }
}

fn print_claims(claims: &[ClaimInfo]) {
    println!(
        "{:<32} {:>10} {:>12} {:>12} {:<8}",
        "AGENT", "SERIAL", "ISSUED", "EXPIRES", "KEY"
    );
    for c in claims {
        println!(
            "{:<32} {:>10} {:>12} {:>12} {:<8}",
            c.agent_id, c.serial, c.issued_at, c.expires_at, c.key_id
        );
    }
}

/// Says how many rows a limit left out (on stderr, so that JSON output stays JSON).
fn more(answer: &serde_json::Value) {
    if let Some(n) = answer["more"].as_u64().filter(|n| *n > 0) {
        eprintln!("({n} more not shown: raise --limit or narrow --prefix)");
    }
}

pub async fn agents(args: &AdminArgs, cmd: AgentsCommand, json: bool) -> anyhow::Result<()> {
    let AgentsCommand::List { only } = cmd;
    let answer = ask(
        args,
        AdminRequest::AgentsList {
            only: only.filter(),
        },
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer["agents"])?);
    } else {
        let agents: Vec<AgentInfo> =
            serde_json::from_value(answer["agents"].clone()).context("malformed answer")?;
        print_agents(&agents);
    }
    more(&answer);
    Ok(())
}

pub async fn claims(args: &AdminArgs, cmd: ClaimsCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ClaimsCommand::List { only } => {
            let answer = ask(
                args,
                AdminRequest::ClaimsList {
                    only: only.filter(),
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer["claims"])?);
            } else {
                let claims: Vec<ClaimInfo> =
                    serde_json::from_value(answer["claims"].clone()).context("malformed answer")?;
                print_claims(&claims);
            }
            more(&answer);
        }
        ClaimsCommand::Show { agent_id } => {
            let answer = ask(args, AdminRequest::ClaimsShow { agent_id }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let claim: Option<ClaimInfo> =
                    serde_json::from_value(answer["claim"].clone()).context("malformed answer")?;
                let session: Option<AgentInfo> = serde_json::from_value(answer["session"].clone())
                    .context("malformed answer")?;
                match claim {
                    Some(c) => print_claims(&[c]),
                    None => println!("not claimed"),
                }
                match session {
                    Some(s) => print_agents(&[s]),
                    None => println!("not connected"),
                }
            }
        }
    }
    Ok(())
}

pub async fn revoke(args: &AdminArgs, agent_id: String, json: bool) -> anyhow::Result<()> {
    let answer = ask(
        args,
        AdminRequest::Revoke {
            agent_id: agent_id.clone(),
        },
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!(
            "revoked certificate {} of {agent_id}{}",
            answer["serial"],
            if answer["session_ended"] == true {
                "; its session was ended"
            } else {
                ""
            }
        );
    }
    Ok(())
}
