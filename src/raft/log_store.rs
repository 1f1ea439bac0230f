//! The Raft log: its entries in segment files of their own ([`super::wal`]), the vote and
//! the purge point in sled.
//!
//! ```text
//! <data dir>/log/*.wal   the entries (see wal.rs)
//! sled tree meta         "vote" -> bincode(Vote)   "committed" -> bincode(LogId)
//!                        "last_purged" -> bincode(LogId)
//! ```
//!
//! A vote or an append is acknowledged to openraft only after it is on disk: a node that
//! crashes or loses power right after never forgets a vote it cast or an entry it
//! acknowledged. An append is one write and one `fdatasync` of a segment. For the vote and
//! the purge point sled's own flush is not enough: on Linux it writes its buffers with
//! `sync_file_range`, which neither flushes the disk's write cache nor the file's size (sled
//! itself calls `fsync` only every 500 ms), so [`LogStore::sync`] follows it with an
//! `fdatasync` of sled's data file.
//!
//! Data directories written before the entries moved out of sled have them in sled's `log`
//! tree; [`LogStore::open`] moves them into segments once (see [`migrate`]).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogReader, StorageIOError};

use super::types::{codec, Entry, LogId, StorageError, TypeConfig, Vote};
use super::wal::{Wal, WalError, SEGMENT_BYTES};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The file in a sled 0.34 directory that holds its log-structured data.
const SLED_DATA_FILE: &str = "db";

/// The directory of the entries' segments, in the data directory.
const WAL_DIR: &str = "log";

/// Handle to the log; clones share the same files and trees.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    meta: sled::Tree,
    /// sled's data file, for `fdatasync` (see the module docs).
    data_file: Arc<std::fs::File>,
    wal: Arc<Wal>,
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Sled(#[from] sled::Error),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("raft log: {0}")]
    Io(#[from] std::io::Error),
    #[error("raft log: {0}")]
    Decode(#[from] bincode::error::DecodeError),
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

impl LogStore {
    /// Opens the log of the data directory `data_dir`, whose sled database is `db`.
    ///
    /// # Errors
    /// sled, its data file or the log's segments cannot be read, or a segment is damaged.
    pub fn open(db: &sled::Db, data_dir: &Path) -> Result<Self, OpenError> {
        let meta = db.open_tree("meta")?;
        let data_file = Arc::new(std::fs::File::open(
            data_dir.join("db").join(SLED_DATA_FILE),
        )?);
        let purged = match meta.get(LAST_PURGED)? {
            Some(bytes) => Some(codec::decode::<LogId>(&bytes)?.index),
            None => None,
        };
        let wal = migrate(db, data_dir, purged)?;
        Ok(LogStore {
            db: db.clone(),
            meta,
            data_file,
            wal: Arc::new(wal),
        })
    }

    /// Makes every write so far durable: sled's flush, then `fdatasync` of its data file
    /// (one trip to a blocking thread for both).
    async fn sync(&self) -> std::io::Result<()> {
        let db = self.db.clone();
        let file = self.data_file.clone();
        tokio::task::spawn_blocking(move || {
            db.flush().map_err(std::io::Error::other)?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes).map(Some).map_err(read_err),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError> {
        let bytes = codec::encode(v).map_err(write_err)?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.sync().await.map_err(write_err)
    }

    /// Index of the newest entry on disk, if any (for status output).
    pub fn last_index(&self) -> Option<u64> {
        self.wal.last_log_id().map(|id| id.index)
    }

    /// The last index openraft reported committed (saved as a hint, see `save_committed`).
    pub fn committed_index(&self) -> Option<u64> {
        self.get_meta::<LogId>(COMMITTED)
            .ok()
            .flatten()
            .map(|l| l.index)
    }
}

/// Whether the log of the data directory `data_dir` (sled database `db`) has never been
/// written: no vote, no entry (in segments, or in sled from an earlier version), no purge.
/// Reads only, so it can be asked before the directory's identity is checked.
///
/// # Errors
/// sled or the segments' directory cannot be read.
pub fn is_pristine(db: &sled::Db, data_dir: &Path) -> Result<bool, OpenError> {
    let meta = db.open_tree("meta")?;
    Ok(meta.get(VOTE)?.is_none()
        && meta.get(LAST_PURGED)?.is_none()
        && db.open_tree("log")?.is_empty()
        && !super::wal::holds_records(&data_dir.join(WAL_DIR))?)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.wal.read(start, end).map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(LAST_PURGED)?;
        let last_log_id = self.wal.last_log_id().or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        self.sync()
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on purpose: it is a hint that lets a restarted node re-apply what it
        // knows to be committed before hearing from a leader; losing it loses nothing.
        match committed {
            Some(c) => self.put_meta(COMMITTED, &c),
            None => {
                self.meta.remove(COMMITTED).map_err(write_err)?;
                Ok(())
            }
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.get_meta(COMMITTED)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self.on_wal(move |wal| wal.append(entries)).await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.on_wal(move |wal| wal.truncate(log_id.index))
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash in between leaves entries that are merely
        // redundant, never a log that seems to start later than it does.
        self.put_meta(LAST_PURGED, &log_id)?;
        self.flush().await?;
        self.on_wal(move |wal| wal.purge(log_id.index))
            .await
            .map_err(write_err)
    }
}

impl LogStore {
    /// Runs `op` on the segments on a blocking thread (it waits for the disk).
    async fn on_wal(
        &self,
        op: impl FnOnce(&Wal) -> Result<(), WalError> + Send + 'static,
    ) -> Result<(), WalError> {
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || op(&wal))
            .await
            .map_err(|e| WalError::Io {
                path: WAL_DIR.into(),
                source: std::io::Error::other(e),
            })?
    }
}

/// Opens the segments in `data_dir`, first moving the entries of a data directory written
/// before they left sled (its `log` tree) into them.
///
/// The entries are written to `log.new` and synced, which is renamed to `log` and the data
/// directory synced; only then is the tree emptied. A crash before the rename leaves the
/// tree as it was (and the next start writes `log.new` afresh); after it, the segments are
/// what counts and the tree is emptied again on the next start.
fn migrate(db: &sled::Db, data_dir: &Path, purged: Option<u64>) -> Result<Wal, OpenError> {
    let dir = data_dir.join(WAL_DIR);
    let legacy = db.open_tree("log")?;
    if !dir.exists() && !legacy.is_empty() {
        let fresh = data_dir.join("log.new");
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh)?;
        }
        let wal = Wal::open(&fresh, SEGMENT_BYTES, purged)?;
        let mut batch = Vec::new();
        for kv in legacy.iter() {
            let (_, bytes) = kv?;
            let entry: Entry = codec::decode(&bytes)?;
            if purged.is_some_and(|p| openraft::RaftLogId::get_log_id(&entry).index <= p) {
                continue;
            }
            batch.push(entry);
            if batch.len() == 1024 {
                wal.append(std::mem::take(&mut batch))?;
            }
        }
        wal.append(batch)?;
        drop(wal);
        std::fs::rename(&fresh, &dir)?;
        std::fs::File::open(data_dir)?.sync_all()?;
        tracing::info!(dir = %dir.display(), "moved the raft log's entries out of sled");
    }
    let wal = Wal::open(&dir, SEGMENT_BYTES, purged)?;
    if !legacy.is_empty() {
        legacy.clear()?;
        db.flush()?;
    }
    Ok(wal)
}
