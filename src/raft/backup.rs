//! Backups (`agentreg snapshot save|status|restore`, like etcdctl's): a node's applied state
//! as one self-checking file, and a fresh data directory restored from it.
//!
//! ```text
//! file = "AGENTREG-BACKUP1" | bincode(Backup) | SHA-256 of everything before it (32 bytes)
//! ```
//!
//! Restoring writes the backup as the node's snapshot with the membership taken from the
//! node's config (so a cluster can be rebuilt on new addresses), marks the log as purged up
//! to the snapshot, and records a vote in the snapshot's term, so the first election after the
//! restore starts above every term the log already holds. Every member of the rebuilt cluster
//! is restored from the same file; each then starts from exactly the backed-up tables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::storage::RaftLogStorage;
use openraft::{Membership, SnapshotMeta as RaftSnapshotMeta};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::state_machine::{capture, decode_tables, Applied};
use super::store::DataDir;
use super::types::{codec, LogId, Node, NodeId, SnapshotMeta, StoredMembership, Vote};
use crate::registry::{TableSizes, Tables};

const MAGIC: &[u8; 16] = b"AGENTREG-BACKUP1";
const CHECKSUM_LEN: usize = 32;

/// What a backup file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backup {
    pub cluster_id: String,
    /// The node the backup was taken from.
    pub taken_from: NodeId,
    pub meta: SnapshotMeta,
    /// The snapshot payload (tables), as the state machine encodes it.
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not an agentreg backup (bad magic)")]
    NotABackup,
    #[error("backup is damaged: checksum mismatch")]
    Checksum,
    #[error("backup is malformed: {0}")]
    Malformed(String),
    #[error("backup holds no applied entries; nothing to restore")]
    Empty,
    #[error("backup is of cluster {found:?}, but the config names cluster {expected:?}")]
    WrongCluster { found: String, expected: String },
    #[error("the config's peers do not include this node ({0})")]
    NotAPeer(NodeId),
    #[error("data dir {0} already holds data; restore only into a new or empty directory")]
    DataDirInUse(String),
    #[error("cannot write data dir: {0}")]
    Storage(String),
}

/// A summary for `agentreg snapshot status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupSummary {
    pub cluster_id: String,
    pub taken_from: NodeId,
    pub last_index: Option<u64>,
    pub last_term: Option<u64>,
    pub members: BTreeMap<NodeId, String>,
    pub tables: TableSizes,
    pub state_digest: String,
    pub bytes: usize,
    pub sha256: String,
}

impl Backup {
    /// Captures `applied` as a backup of `cluster_id`, taken on `taken_from`.
    ///
    /// # Errors
    /// The tables cannot be encoded.
    pub fn capture(
        applied: &Applied,
        cluster_id: &str,
        taken_from: NodeId,
    ) -> Result<Self, String> {
        let (meta, data) = capture(applied).map_err(|e| e.to_string())?;
        Ok(Backup {
            cluster_id: cluster_id.to_owned(),
            taken_from,
            meta,
            data,
        })
    }

    /// The file bytes: magic, body, checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(codec::encode(self).expect("a backup always encodes"));
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Reads a backup file's bytes, checking magic and checksum.
    ///
    /// # Errors
    /// See [`BackupError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BackupError> {
        if bytes.len() < MAGIC.len() + CHECKSUM_LEN || !bytes.starts_with(MAGIC) {
            return Err(BackupError::NotABackup);
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if Sha256::digest(body).as_slice() != sum {
            return Err(BackupError::Checksum);
        }
        codec::decode(&body[MAGIC.len()..]).map_err(|e| BackupError::Malformed(e.to_string()))
    }

    /// The tables the backup holds.
    ///
    /// # Errors
    /// The payload does not decode.
    pub fn tables(&self) -> Result<Tables, BackupError> {
        decode_tables(&self.data).map_err(BackupError::Malformed)
    }

    /// # Errors
    /// The payload does not decode.
    pub fn summary(&self) -> Result<BackupSummary, BackupError> {
        let tables = self.tables()?;
        let bytes = self.to_bytes();
        let state = crate::registry::RegistryState::from_tables(tables);
        Ok(BackupSummary {
            cluster_id: self.cluster_id.clone(),
            taken_from: self.taken_from,
            last_index: self.meta.last_log_id.map(|l| l.index),
            last_term: self.meta.last_log_id.map(|l| l.leader_id.term),
            members: self
                .meta
                .last_membership
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            tables: state.sizes(),
            state_digest: state.tables().digest(),
            bytes: bytes.len(),
            sha256: hex::encode(&bytes[bytes.len() - CHECKSUM_LEN..]),
        })
    }
}

/// Creates the data directory of `node_id` at `path` from `backup`, with `peers`
/// (id, address) as the cluster's voting members.
///
/// # Errors
/// The backup is empty or of another cluster, `node_id` is not among `peers`, `path` already
/// holds data (it is left untouched), or the directory cannot be written.
pub async fn restore(
    backup: &Backup,
    path: &Path,
    cluster_id: &str,
    node_id: NodeId,
    peers: &[(NodeId, String)],
) -> Result<LogId, BackupError> {
    if backup.cluster_id != cluster_id {
        return Err(BackupError::WrongCluster {
            found: backup.cluster_id.clone(),
            expected: cluster_id.to_owned(),
        });
    }
    let last = backup.meta.last_log_id.ok_or(BackupError::Empty)?;
    if !peers.iter().any(|(id, _)| *id == node_id) {
        return Err(BackupError::NotAPeer(node_id));
    }
    backup.tables()?;
    let in_use = std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some());
    if in_use {
        return Err(BackupError::DataDirInUse(path.display().to_string()));
    }
    let storage = |e: &dyn std::fmt::Display| BackupError::Storage(e.to_string());
    let data = DataDir::open(path, cluster_id, node_id).map_err(|e| storage(&e))?;

    let voters: BTreeSet<NodeId> = peers.iter().map(|(id, _)| *id).collect();
    let nodes: BTreeMap<NodeId, Node> = peers
        .iter()
        .map(|(id, addr)| (*id, Node::new(addr)))
        .collect();
    let meta = RaftSnapshotMeta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(Some(last), Membership::new(vec![voters], nodes)),
        snapshot_id: format!("restored-{}-{}", last.leader_id, last.index),
    };
    data.state_machine
        .restore_snapshot(&meta, &backup.data)
        .await
        .map_err(|e| storage(&e))?;
    let mut log = data.log.clone();
    log.purge(last).await.map_err(|e| storage(&e))?;
    log.save_vote(&Vote::new(last.leader_id.term, node_id))
        .await
        .map_err(|e| storage(&e))?;
    data.db.flush_async().await.map_err(|e| storage(&e))?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Backup {
        Backup::capture(&Applied::default(), "c", 1).unwrap()
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let b = sample();
        let bytes = b.to_bytes();
        let back = Backup::from_bytes(&bytes).unwrap();
        assert_eq!(back.cluster_id, "c");
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(matches!(
            Backup::from_bytes(&bad),
            Err(BackupError::Checksum)
        ));
        assert!(matches!(
            Backup::from_bytes(b"not a backup at all, no no no no no no"),
            Err(BackupError::NotABackup)
        ));
    }

    #[tokio::test]
    async fn refuses_what_it_cannot_restore_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec![(1, "127.0.0.1:1".to_owned())];
        // Empty backup.
        let err = restore(&sample(), dir.path(), "c", 1, &peers)
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::Empty), "{err}");
        // Another cluster.
        let err = restore(&sample(), dir.path(), "other", 1, &peers)
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::WrongCluster { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
