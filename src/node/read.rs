//! Linearizable reads: the read-index barrier every certificate validation passes.
//!
//! Why: once a revocation is acknowledged, no node may validate that certificate (DESIGN.md,
//! invariant 3). A node cannot know it has every acknowledged revocation by looking at its
//! own state: a follower may lag, a partitioned node may be far behind. So before
//! validating, a node asks the leader for its read index (openraft confirms leadership with a
//! quorum and returns a log position at or after every acknowledged write), then waits until
//! it has applied that far. A node that cannot reach a leader with a quorum answers
//! "unavailable" rather than "valid".

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};

use super::Inner;
use crate::raft::network::{ForwardError, PeerError, PeerRequest, PeerResponse};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("no leader with a quorum answered within {0:?}")]
    NoLeader(Duration),
    #[error("node is shutting down")]
    ShuttingDown,
}

/// The leader's read index, if this node leads.
async fn local_read_index(inner: &Inner) -> Result<u64, Option<(u64, String)>> {
    match inner.raft.get_read_log_id().await {
        Ok((read, _applied)) => Ok(read.map_or(0, |l| l.index)),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            Err(f.leader_id.zip(f.leader_node.map(|n| n.addr)))
        }
        Err(_) => Err(None),
    }
}

/// Serves a follower's read-index request.
pub(super) async fn serve_read_index(inner: &Inner) -> Result<u64, ForwardError> {
    local_read_index(inner)
        .await
        .map_err(|leader| ForwardError::NotLeader { leader })
}

/// Waits until this node has applied everything acknowledged before the call.
pub(super) async fn barrier(inner: &Inner) -> Result<(), ReadError> {
    let budget = inner.config.write_timeout();
    let deadline = tokio::time::Instant::now() + budget;
    let index = loop {
        match local_read_index(inner).await {
            Ok(i) => break i,
            Err(Some((leader, addr))) if leader != inner.id => {
                let client = inner.peers.client(leader, &addr);
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match client.call(&PeerRequest::ReadIndex, left).await {
                    Ok(PeerResponse::ReadIndex(Ok(i))) => break i,
                    Ok(_) | Err(PeerError::Unreachable { .. }) => {}
                    Err(_) => {}
                }
            }
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ReadError::NoLeader(budget));
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return Err(ReadError::ShuttingDown),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    inner
        .raft
        .wait(Some(left))
        .applied_index_at_least(Some(index), "read index")
        .await
        .map(|_| ())
        .map_err(|_| ReadError::NoLeader(budget))
}
