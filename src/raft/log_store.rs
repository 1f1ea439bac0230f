//! The Raft log and vote in sled.
//!
//! Trees of the node's sled database used here:
//!
//! ```text
//! log    u64 big-endian index -> bincode(Entry)
//! meta   "vote" -> bincode(Vote)   "committed" -> bincode(LogId)   "last_purged" -> bincode(LogId)
//! ```
//!
//! A vote or an append is acknowledged to openraft only after it is on disk: a node that
//! crashes or loses power right after never forgets a vote it cast or an entry it
//! acknowledged. sled's own flush is not enough for the second: on Linux it writes its
//! buffers with `sync_file_range`, which neither flushes the disk's write cache nor the
//! file's size (sled itself calls `fsync` only every 500 ms), so [`LogStore::sync`] follows it
//! with an `fdatasync` of sled's data file.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogId, RaftLogReader, StorageIOError};

use super::types::{codec, Entry, LogId, StorageError, TypeConfig, Vote};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The file in a sled 0.34 directory that holds its log-structured data.
const SLED_DATA_FILE: &str = "db";

/// Handle to the log; clones share the same trees.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, for `fdatasync` (see the module docs).
    data_file: Arc<std::fs::File>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

impl LogStore {
    /// Opens the log trees of `db`, the sled database in directory `db_dir`.
    ///
    /// # Errors
    /// sled cannot open the trees, or its data file cannot be opened.
    pub fn open(db: &sled::Db, db_dir: &Path) -> Result<Self, sled::Error> {
        Ok(LogStore {
            db: db.clone(),
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            data_file: Arc::new(std::fs::File::open(db_dir.join(SLED_DATA_FILE))?),
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

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        match self.log.last().map_err(read_err)? {
            None => Ok(None),
            Some((_, bytes)) => {
                let e: Entry = codec::decode(&bytes).map_err(read_err)?;
                Ok(Some(*e.get_log_id()))
            }
        }
    }

    /// Index of the newest entry on disk, if any (for status output).
    pub fn last_index(&self) -> Option<u64> {
        self.last_entry_id().ok().flatten().map(|id| id.index)
    }

    /// The last index openraft reported committed (saved as a hint, see `save_committed`).
    pub fn committed_index(&self) -> Option<u64> {
        self.get_meta::<LogId>(COMMITTED)
            .ok()
            .flatten()
            .map(|l| l.index)
    }

    /// Whether this log has ever been written: a vote or any entry.
    ///
    /// # Errors
    /// Reading the trees failed.
    pub fn is_pristine(&self) -> Result<bool, StorageError> {
        Ok(self.meta.get(VOTE).map_err(read_err)?.is_none()
            && self.log.is_empty()
            && self.meta.get(LAST_PURGED).map_err(read_err)?.is_none())
    }
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
            Bound::Included(i) => Bound::Included(i.to_be_bytes()),
            Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for kv in self.log.range((Bound::Included(start.to_be_bytes()), end)) {
            let (_, bytes) = kv.map_err(read_err)?;
            out.push(codec::decode(&bytes).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(LAST_PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
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
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(write_err)?;
            batch.insert(&entry.get_log_id().index.to_be_bytes(), bytes);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        callback.log_io_completed(self.sync().await);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash in between leaves entries that are merely
        // redundant, never a log that seems to start later than it does.
        self.put_meta(LAST_PURGED, &log_id)?;
        self.flush().await?;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.flush().await
    }
}
