//! `agentreg keys list|rotate|retire`: the replicated signing keyring.

use anyhow::Context;
use clap::Subcommand;

use super::{AdminArgs, AdminClient};
use crate::node::{AdminRequest, KeyInfo};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List the signing keys and their states (never the secrets).
    List,
    /// Make a fresh key the active signing key; older keys keep validating their certificates.
    Rotate,
    /// Retire a key: certificates it signed stop validating.
    Retire { key_id: String },
}

pub async fn run(args: &AdminArgs, cmd: KeysCommand, json: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(args)?;
    let req = match &cmd {
        KeysCommand::List => AdminRequest::KeysList,
        KeysCommand::Rotate => AdminRequest::KeysRotate,
        KeysCommand::Retire { key_id } => AdminRequest::KeysRetire {
            key_id: key_id.clone(),
        },
    };
    let (_, answer) = client.call_any(&args.endpoints, &req).await?;
    client.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    match cmd {
        KeysCommand::List => {
            let keys: Vec<KeyInfo> =
                serde_json::from_value(answer["keys"].clone()).context("malformed answer")?;
            println!("{:<12} {:<11} CREATED", "KEY", "STATE");
            for k in keys {
                println!("{:<12} {:<11} {}", k.key_id, k.state, k.created_at);
            }
        }
        KeysCommand::Rotate => println!(
            "active signing key is now {}",
            answer["key_id"].as_str().unwrap_or("?")
        ),
        KeysCommand::Retire { key_id } => println!("retired {key_id}"),
    }
    Ok(())
}
