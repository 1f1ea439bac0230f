//! `agentreg snapshot save|status|restore`: backups of the replicated tables, like
//! `etcdctl snapshot`. The file format and the restore procedure are in `raft::backup`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use super::{AdminArgs, AdminClient};
use crate::config::NodeConfig;
use crate::node::AdminRequest;
use crate::raft::backup::{self, Backup};

/// Largest backup the CLI accepts.
const MAX_BACKUP: usize = 1 << 30;
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a backup of the tables, taken from the first node that answers after it has
    /// applied everything acknowledged so far.
    Save {
        #[command(flatten)]
        conn: AdminArgs,
        /// Where to write the backup (written to FILE.part, then renamed).
        file: PathBuf,
    },
    /// Check a backup file and show what it holds.
    Status {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Create a stopped node's data dir from a backup. Restore every member of the new
    /// cluster from the same file, then start them. The data dir must be new or empty.
    Restore {
        file: PathBuf,
        /// The node's config: cluster_id, node_id, data_dir and peers are taken from it.
        #[arg(long)]
        config: PathBuf,
    },
}

pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Save { conn, file } => save(&conn, &file).await,
        SnapshotCommand::Status { file, json } => {
            let summary = read(&file)?.summary()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
                println!("cluster       {}", summary.cluster_id);
                println!("taken from    node {}", summary.taken_from);
                println!("last index    {}", opt(summary.last_index));
                println!("last term     {}", opt(summary.last_term));
                let members: Vec<String> = summary
                    .members
                    .iter()
                    .map(|(id, addr)| format!("{id}={addr}"))
                    .collect();
                println!("members       {}", members.join(" "));
                println!(
                    "tables        {} claims, {} sessions, {} revocations, {} keys",
                    summary.tables.claims,
                    summary.tables.sessions,
                    summary.tables.revocations,
                    summary.tables.keys
                );
                println!("state digest  {}", summary.state_digest);
                println!("size          {} bytes", summary.bytes);
                println!("sha256        {}", summary.sha256);
            }
            Ok(())
        }
        SnapshotCommand::Restore { file, config } => {
            let backup = read(&file)?;
            let config = NodeConfig::load(&config)?;
            let peers: Vec<(u64, String)> = config
                .peers
                .iter()
                .map(|p| (p.id, p.addr.clone()))
                .collect();
            let last = backup::restore(
                &backup,
                &config.data_dir,
                &config.cluster_id,
                config.node_id,
                &peers,
            )
            .await
            .with_context(|| format!("restoring into {}", config.data_dir.display()))?;
            println!(
                "restored node {} of cluster {} into {} at index {} (term {}); start it with its config",
                config.node_id,
                config.cluster_id,
                config.data_dir.display(),
                last.index,
                last.leader_id.term
            );
            Ok(())
        }
    }
}

fn read(file: &Path) -> anyhow::Result<Backup> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    Backup::from_bytes(&bytes).with_context(|| format!("{}", file.display()))
}

async fn save(args: &AdminArgs, file: &Path) -> anyhow::Result<()> {
    let client = AdminClient::new(args)?;
    let mut failures = Vec::new();
    let mut got = None;
    for addr in &args.endpoints {
        match client
            .call_with_data(addr, &AdminRequest::SnapshotSave, MAX_BACKUP, SAVE_TIMEOUT)
            .await
        {
            Ok(v) => {
                got = Some((addr.clone(), v));
                break;
            }
            Err(e) => {
                eprintln!("{addr}: {e:#}; trying the next endpoint");
                failures.push(format!("{addr}: {e:#}"));
            }
        }
    }
    client.close().await;
    let Some((addr, (_, data))) = got else {
        return Err(super::NoEndpoint(failures.join("; ")).into());
    };
    let backup = Backup::from_bytes(&data).with_context(|| format!("backup from {addr}"))?;
    let part = file.with_extension("part");
    std::fs::write(&part, &data).with_context(|| format!("cannot write {}", part.display()))?;
    std::fs::File::open(&part)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", part.display()))?;
    std::fs::rename(&part, file).with_context(|| format!("cannot write {}", file.display()))?;
    println!(
        "saved a backup of cluster {} at index {} from {addr} to {} ({} bytes)",
        backup.cluster_id,
        backup.meta.last_log_id.map_or(0, |l| l.index),
        file.display(),
        data.len()
    );
    Ok(())
}
