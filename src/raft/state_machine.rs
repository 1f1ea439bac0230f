//! openraft's state machine over the registry, with snapshots kept in sled.
//!
//! The tables live in memory ([`RegistryState`]); what makes them durable is the log plus
//! the latest snapshot, both in the node's sled database. On start the state machine loads
//! the snapshot and openraft re-applies the committed entries after it, so a restarted node
//! holds exactly the state it had acknowledged. The snapshot is flushed before openraft may
//! purge the entries it covers.
//!
//! ```text
//! snapshot   "meta" -> bincode(SnapshotMeta)   "data" -> bincode(SnapshotPayload)
//! ```

use std::io::Cursor;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, EntryPayload, OptionalSend, RaftLogId, RaftSnapshotBuilder,
    SnapshotMeta as RaftSnapshotMeta, StorageIOError,
};
use serde::{Deserialize, Serialize};

use super::types::{
    codec, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::registry::{Outcome, RegistryState, Response, SessionEnd, Tables};

const SNAP_META: &[u8] = b"meta";
const SNAP_DATA: &[u8] = b"data";
/// Version of the snapshot payload layout.
const SNAPSHOT_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    format: u32,
    tables: Tables,
}

/// What has been applied: the tables and the position in the log they reflect.
#[derive(Debug, Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: RegistryState,
}

/// Read access to the applied state, shared with the node's request handlers.
#[derive(Clone, Default)]
pub struct StateReader(Arc<RwLock<Applied>>);

impl StateReader {
    /// Locks the applied state for reading. Hold the guard briefly: apply waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        // A panic while holding the lock would already have taken the node down; a poisoned
        // lock still holds consistent data because apply mutates only after validating.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where applied session ends are reported (to close the connections they belonged to).
type EventSink = Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<SessionEnd>>>>;

/// The openraft state machine handle. Clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    applied: StateReader,
    events: EventSink,
    db: sled::Db,
    snapshots: sled::Tree,
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}

fn snap_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}

impl StateMachineStore {
    /// Opens the snapshot tree of `db` and loads the latest snapshot, if any.
    ///
    /// # Errors
    /// sled fails, or the stored snapshot cannot be decoded.
    pub fn open(db: &sled::Db) -> Result<Self, StorageError> {
        let snapshots = db.open_tree("snapshot").map_err(sm_read_err)?;
        let store = StateMachineStore {
            applied: StateReader::default(),
            events: EventSink::default(),
            db: db.clone(),
            snapshots,
        };
        if let Some((meta, data)) = store.stored_snapshot()? {
            store.load(&meta, &data)?;
        }
        Ok(store)
    }

    pub fn reader(&self) -> StateReader {
        self.applied.clone()
    }

    /// Reports every session that applied entries end from now on. Reporting is outside the
    /// state: it does not influence what apply computes. A later call replaces the receiver.
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<SessionEnd> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    fn stored_snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        let Some(meta) = self.snapshots.get(SNAP_META).map_err(sm_read_err)? else {
            return Ok(None);
        };
        let meta: SnapshotMeta = codec::decode(&meta).map_err(sm_read_err)?;
        let data = self
            .snapshots
            .get(SNAP_DATA)
            .map_err(sm_read_err)?
            .ok_or_else(|| sm_read_err(std::io::Error::other("snapshot data missing")))?;
        Ok(Some((meta, data.to_vec())))
    }

    /// Replaces the in-memory state with a snapshot's.
    fn load(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        let payload: SnapshotPayload = codec::decode(data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        if payload.format != SNAPSHOT_FORMAT {
            return Err(StorageIOError::read_snapshot(
                Some(meta.signature()),
                AnyError::error(format!("unsupported snapshot format {}", payload.format)),
            )
            .into());
        }
        let mut applied = self.applied.0.write().unwrap_or_else(|e| e.into_inner());
        applied.state = RegistryState::from_tables(payload.tables);
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
        Ok(())
    }

    /// Makes `meta`/`data` this store's current snapshot and state (a restore from backup).
    ///
    /// # Errors
    /// The payload does not decode, or sled fails.
    pub async fn restore_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.load(meta, data)?;
        self.persist_snapshot(meta, data).await
    }

    async fn persist_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        let meta_bytes = codec::encode(meta).map_err(snap_write_err)?;
        let mut batch = sled::Batch::default();
        batch.insert(SNAP_META, meta_bytes);
        batch.insert(SNAP_DATA, data);
        self.snapshots.apply_batch(batch).map_err(snap_write_err)?;
        self.db.flush_async().await.map_err(snap_write_err)?;
        Ok(())
    }
}

/// The applied state as a snapshot: its meta and its payload bytes (what `build_snapshot`
/// persists, and what a backup carries).
///
/// # Errors
/// The tables cannot be encoded.
pub fn capture(applied: &Applied) -> Result<(SnapshotMeta, Vec<u8>), StorageError> {
    let payload = SnapshotPayload {
        format: SNAPSHOT_FORMAT,
        tables: applied.state.tables().clone(),
    };
    let data = codec::encode(&payload).map_err(snap_write_err)?;
    let snapshot_id = match applied.last_applied {
        Some(id) => format!("{}-{}", id.leader_id, id.index),
        None => "empty".to_owned(),
    };
    let meta = RaftSnapshotMeta {
        last_log_id: applied.last_applied,
        last_membership: applied.membership.clone(),
        snapshot_id,
    };
    Ok((meta, data))
}

/// Decodes a snapshot payload into the tables it carries.
///
/// # Errors
/// The bytes are not a snapshot payload of a format this build reads.
pub fn decode_tables(data: &[u8]) -> Result<Tables, String> {
    let payload: SnapshotPayload =
        codec::decode(data).map_err(|e| format!("malformed snapshot payload: {e}"))?;
    if payload.format != SNAPSHOT_FORMAT {
        return Err(format!("unsupported snapshot format {}", payload.format));
    }
    Ok(payload.tables)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (meta, data) = capture(&self.applied.read())?;
        self.persist_snapshot(&meta, &data).await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.applied.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.0.write().unwrap_or_else(|e| e.into_inner());
        let events = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut results = Vec::new();
        for entry in entries {
            let log_id = *entry.get_log_id();
            applied.last_applied = Some(log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Noop),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(log_id), m);
                    Ok(Outcome::Noop)
                }
                EntryPayload::Normal(cmd) => {
                    let result = applied.state.apply(log_id.index, &cmd);
                    if let (Some(tx), Ok(outcome)) = (&events, &result) {
                        for end in SessionEnd::from_applied(&cmd.op, outcome) {
                            // A closed receiver means the node is stopping; nothing to tell.
                            let _ = tx.send(end);
                        }
                    }
                    result
                }
            };
            results.push(result);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        // Decode before persisting, so a corrupt snapshot replaces nothing.
        self.load(meta, &data)?;
        self.persist_snapshot(meta, &data).await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.stored_snapshot()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
