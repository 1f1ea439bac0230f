//! The openraft type configuration of agentreg and the encoding used on disk and between nodes.

use std::io::Cursor;

use crate::registry::{Command, Response};

openraft::declare_raft_types!(
    /// agentreg's Raft types: registry commands in, typed results out, nodes addressed by
    /// their QUIC address.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Node>;

/// bincode (2.x, standard configuration) through serde: the encoding of log entries,
/// snapshots and peer messages.
pub mod codec {
    use serde::{de::DeserializeOwned, Serialize};

    /// # Errors
    /// Only for types serde cannot encode (none of ours).
    pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
        bincode::serde::encode_to_vec(v, bincode::config::standard())
    }

    /// Decodes `bytes`, which must hold exactly one value.
    ///
    /// # Errors
    /// Malformed bytes, or bytes left over after the value.
    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::error::DecodeError> {
        let (v, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())?;
        if used != bytes.len() {
            return Err(bincode::error::DecodeError::OtherString(format!(
                "{} trailing bytes after the value",
                bytes.len() - used
            )));
        }
        Ok(v)
    }
}
