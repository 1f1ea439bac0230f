//! `agentreg members list|add|remove|move-leader`: membership changes while the cluster
//! serves, and moving its leadership.

use anyhow::Context;
use clap::Subcommand;

use super::{AdminArgs, AdminClient};
use crate::node::{AdminRequest, NodeStatus};

#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// The members, their addresses and whether they vote.
    List,
    /// Add a node (started with initial_cluster_state = "existing"); it votes once caught up.
    Add { node_id: u64, addr: String },
    /// Remove a node, dead or alive (replace a dead node: add the new one, remove the old).
    Remove { node_id: u64 },
    /// Hand the leadership to a node (by default, any voter that has all of the leader's
    /// log); writes pause for milliseconds, not an election. Two or three voters only.
    MoveLeader { node_id: Option<u64> },
}

pub async fn run(args: &AdminArgs, cmd: MembersCommand, json: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(args)?;
    let (_, v) = client
        .call_any(&args.endpoints, &AdminRequest::Status)
        .await?;
    let status: NodeStatus =
        serde_json::from_value(v["status"].clone()).context("malformed status")?;
    let req = match cmd {
        MembersCommand::List => {
            client.close().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&status.members)?);
            } else {
                println!("{:<4} {:<24} {:<6} LEADER", "ID", "ADDRESS", "VOTER");
                for m in &status.members {
                    let leads = if status.leader == Some(m.id) { "*" } else { "" };
                    println!("{:<4} {:<24} {:<6} {leads}", m.id, m.addr, m.voter);
                }
            }
            return Ok(());
        }
        MembersCommand::Add { node_id, addr } => AdminRequest::MembersAdd { node_id, addr },
        MembersCommand::Remove { node_id } => AdminRequest::MembersRemove { node_id },
        MembersCommand::MoveLeader { node_id } => AdminRequest::MembersMoveLeader { node_id },
    };
    // Membership changes and leadership moves run on the leader.
    let leader = status.leader.ok_or_else(|| {
        super::NoEndpoint("none is the leader right now (an election?); retry".into())
    })?;
    let addr = status
        .members
        .iter()
        .find(|m| m.id == leader)
        .map(|m| m.addr.clone())
        .context("the leader is not in the membership")?;
    let answer = client.call(&addr, &req).await?;
    client.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else if matches!(req, AdminRequest::MembersMoveLeader { .. }) {
        println!(
            "done: node {} leads at term {} (writes held {} ms)",
            answer["leader"], answer["term"], answer["writes_held_ms"]
        );
    } else {
        println!(
            "done: membership change committed at index {}",
            answer["index"]
        );
    }
    Ok(())
}
