//! A node's data directory: one sled database holding the state machine, the vote and the
//! identity of the node that wrote it; the log's entries in segments beside it (`log/`); and
//! the latest snapshot in a file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::log_store::{self, LogStore};
use super::state_machine::StateMachineStore;
use super::types::StorageError;

/// Opened data directory.
pub struct DataDir {
    pub db: sled::Db,
    pub log: LogStore,
    pub state_machine: StateMachineStore,
    /// Whether the Raft log had never been written (no vote, entry or purge) when opened:
    /// a node with such a dir may initialise a new cluster.
    pub pristine: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot open data dir {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "data dir {path} belongs to cluster {found:?}, node {found_node}, but this node is configured as \
         cluster {expected:?}, node {expected_node}; refusing to start (nothing was changed)"
    )]
    Mismatch {
        path: PathBuf,
        found: String,
        found_node: u64,
        expected: String,
        expected_node: u64,
    },
    #[error("data dir {path} holds Raft data but no node identity; refusing to start (nothing was changed)")]
    Unidentified { path: PathBuf },
    #[error("cannot read data dir {path}: {source}")]
    Storage { path: PathBuf, source: StorageError },
    #[error("cannot open the raft log in data dir {path}: {source}")]
    Log {
        path: PathBuf,
        source: log_store::OpenError,
    },
    #[error(
        "data dir {path} holds a QUIC endpoint secret of {len} bytes, not {expected}; \
         refusing to start (nothing was changed)"
    )]
    EndpointSecret {
        path: PathBuf,
        len: usize,
        expected: usize,
    },
}

/// How long [`open_sled`] waits for sled's lock on the directory.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens the sled database in `path`. sled holds an advisory lock on its directory, and
/// releases it only once its background threads let go of the database, a moment after
/// the last handle was dropped: a database this process just closed (a data dir refused
/// for the wrong node, a node restarted in place) can still be locked. Waits for that up to
/// [`LOCK_WAIT`]; a lock that another process holds is still held then, and reported.
fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

const CLUSTER_ID: &[u8] = b"cluster_id";
const NODE_ID: &[u8] = b"node_id";
const ENDPOINT_SECRET: &[u8] = b"quic_endpoint_secret";

impl DataDir {
    /// Opens (or creates) the data directory of `node_id` in `cluster_id`.
    ///
    /// # Errors
    /// The directory cannot be opened, or it was written by another cluster or node id. In
    /// that case nothing in it is modified.
    pub fn open(path: &Path, cluster_id: &str, node_id: u64) -> Result<Self, DataDirError> {
        let open_err = |source| DataDirError::Open {
            path: path.to_owned(),
            source,
        };
        let db = open_sled(&path.join("db")).map_err(open_err)?;
        let identity = db.open_tree("identity").map_err(open_err)?;
        let stored_cluster = identity.get(CLUSTER_ID).map_err(open_err)?;
        let stored_node = identity.get(NODE_ID).map_err(open_err)?;
        let pristine = log_store::is_pristine(&db, path).map_err(|source| DataDirError::Log {
            path: path.to_owned(),
            source,
        })?;
        match (stored_cluster, stored_node) {
            (Some(c), Some(n)) => {
                let found = String::from_utf8_lossy(&c).into_owned();
                let found_node = n
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                if found != cluster_id || found_node != node_id {
                    return Err(DataDirError::Mismatch {
                        path: path.to_owned(),
                        found,
                        found_node,
                        expected: cluster_id.to_owned(),
                        expected_node: node_id,
                    });
                }
            }
            _ => {
                if !pristine {
                    return Err(DataDirError::Unidentified {
                        path: path.to_owned(),
                    });
                }
                identity
                    .insert(CLUSTER_ID, cluster_id.as_bytes())
                    .map_err(open_err)?;
                identity
                    .insert(NODE_ID, &node_id.to_be_bytes())
                    .map_err(open_err)?;
                db.flush().map_err(open_err)?;
            }
        }
        // Only now, with the directory known to be this node's, may the log write to it.
        let log = LogStore::open(&db, path).map_err(|source| DataDirError::Log {
            path: path.to_owned(),
            source,
        })?;
        let state_machine =
            StateMachineStore::open(&db, path).map_err(|source| DataDirError::Storage {
                path: path.to_owned(),
                source,
            })?;
        Ok(DataDir {
            db,
            log,
            state_machine,
            pristine,
        })
    }

    /// The secret of the node's QUIC endpoint (its stateless-reset and connection-id keys),
    /// which must be the same in every run of the node and so is kept here: written once,
    /// from `first`, when the directory has none yet, and read back ever after. Kept apart
    /// from the TLS key, which a renewal may replace while the node runs.
    ///
    /// # Errors
    /// sled cannot read or write it, or what is kept is not `N` bytes (then nothing is
    /// changed).
    pub fn endpoint_secret<const N: usize>(
        &self,
        path: &Path,
        first: impl FnOnce() -> [u8; N],
    ) -> Result<[u8; N], DataDirError> {
        let open_err = |source| DataDirError::Open {
            path: path.to_owned(),
            source,
        };
        let identity = self.db.open_tree("identity").map_err(open_err)?;
        if let Some(kept) = identity.get(ENDPOINT_SECRET).map_err(open_err)? {
            return kept
                .as_ref()
                .try_into()
                .map_err(|_| DataDirError::EndpointSecret {
                    path: path.to_owned(),
                    len: kept.len(),
                    expected: N,
                });
        }
        let secret = first();
        identity
            .insert(ENDPOINT_SECRET, &secret[..])
            .map_err(open_err)?;
        self.db.flush().map_err(open_err)?;
        Ok(secret)
    }
}
