//! `agentreg agents list`, `claims list|show`, `revoke`: the replicated tables, read
//! linearizably from any node.

use std::io::Write;

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

fn print_agents(agents: &[AgentInfo]) -> std::io::Result<()> {
    let mut out = std::io::stdout();
    agents_header(&mut out)?;
    agents.iter().try_for_each(|a| agent_line(&mut out, a))
}

fn agents_header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32} {:<6} {:>10} {:>12} {:>8}",
        "AGENT", "NODE", "SESSION", "REGISTERED", "CERT"
    )
}

fn agent_line(out: &mut impl Write, a: &AgentInfo) -> std::io::Result<()> {
    let cert = a
        .certificate_serial
        .map_or("-".to_owned(), |s| s.to_string());
    writeln!(
        out,
        "{:<32} {:<6} {:>10} {:>12} {:>8}",
        a.agent_id, a.node_id, a.session_id, a.registered_at, cert
    )
}

fn print_claims(claims: &[ClaimInfo]) -> std::io::Result<()> {
    let mut out = std::io::stdout();
    claims_header(&mut out)?;
    claims.iter().try_for_each(|c| claim_line(&mut out, c))
}

fn claims_header(out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32} {:>10} {:>12} {:>12} {:<8}",
        "AGENT", "SERIAL", "ISSUED", "EXPIRES", "KEY"
    )
}

fn claim_line(out: &mut impl Write, c: &ClaimInfo) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32} {:>10} {:>12} {:>12} {:<8}",
        c.agent_id, c.serial, c.issued_at, c.expires_at, c.key_id
    )
}

/// Prints a list as its rows arrive: a table (`header`, then a `line` for each row), or
/// with `--json` one JSON array. Then says on stderr (so that JSON output stays JSON) how
/// many rows a limit left out.
async fn print_list<R: serde::de::DeserializeOwned>(
    args: &AdminArgs,
    req: AdminRequest,
    json: bool,
    header: fn(&mut std::io::BufWriter<std::io::Stdout>) -> std::io::Result<()>,
    line: fn(&mut std::io::BufWriter<std::io::Stdout>, &R) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let client = AdminClient::new(args)?;
    let mut rows = client.list_any(&args.endpoints, &req).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut array = PrettyArray::default();
    if !json {
        header(&mut out)?;
    }
    while let Some(batch) = rows.next().await? {
        for row in batch {
            if json {
                array.push(&mut out, &row)?;
            } else {
                let row: R = serde_json::from_value(row).context("malformed answer")?;
                line(&mut out, &row)?;
            }
        }
        out.flush()?;
    }
    if json {
        array.end(&mut out)?;
    }
    out.flush()?;
    if rows.more() > 0 {
        eprintln!(
            "({} more not shown: raise --limit or narrow --prefix)",
            rows.more()
        );
    }
    client.close().await;
    Ok(())
}

/// Writes a JSON array an element at a time, byte for byte as `serde_json::to_string_pretty`
/// writes the whole array, and a newline after it.
#[derive(Default)]
struct PrettyArray {
    started: bool,
}

impl PrettyArray {
    fn push(&mut self, out: &mut impl Write, v: &serde_json::Value) -> std::io::Result<()> {
        out.write_all(if self.started { b",\n" } else { b"[\n" })?;
        self.started = true;
        // A JSON text holds no raw line break inside a string: every line is the value's.
        for (i, line) in serde_json::to_string_pretty(v)?.lines().enumerate() {
            if i > 0 {
                out.write_all(b"\n")?;
            }
            write!(out, "  {line}")?;
        }
        Ok(())
    }

    fn end(self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(if self.started { b"\n]\n" } else { b"[]\n" })
    }
}

pub async fn agents(args: &AdminArgs, cmd: AgentsCommand, json: bool) -> anyhow::Result<()> {
    let AgentsCommand::List { only } = cmd;
    let req = AdminRequest::AgentsList {
        only: only.filter(),
        stream: true,
    };
    print_list::<AgentInfo>(args, req, json, agents_header, agent_line).await
}

pub async fn claims(args: &AdminArgs, cmd: ClaimsCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ClaimsCommand::List { only } => {
            let req = AdminRequest::ClaimsList {
                only: only.filter(),
                stream: true,
            };
            print_list::<ClaimInfo>(args, req, json, claims_header, claim_line).await?;
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
                    Some(c) => print_claims(&[c])?,
                    None => println!("not claimed"),
                }
                match session {
                    Some(s) => print_agents(&[s])?,
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

#[cfg(test)]
mod tests {
    use super::PrettyArray;

    /// A list printed a row at a time is the JSON the whole array printed at once was.
    #[test]
    fn a_json_list_printed_row_by_row_is_the_whole_array() {
        let arrays = [
            serde_json::json!([]),
            serde_json::json!([{"agent_id": "a", "node_id": 1, "metadata": null}]),
            serde_json::json!([
                {"agent_id": "a", "metadata": {"role": "x\ny", "tags": ["t", 2, {}], "e": []}},
                {"agent_id": "b", "certificate_serial": null, "metadata": {}},
            ]),
        ];
        for whole in arrays {
            let mut out = Vec::new();
            let mut array = PrettyArray::default();
            for row in whole.as_array().unwrap() {
                array.push(&mut out, row).unwrap();
            }
            array.end(&mut out).unwrap();
            let expected = serde_json::to_string_pretty(&whole).unwrap() + "\n";
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
