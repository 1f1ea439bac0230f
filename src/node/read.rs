//! Linearizable reads: the read-index barrier every certificate validation passes.
//!
//! Why: once a revocation is acknowledged, no node may validate that certificate (DESIGN.md,
//! invariant 3). A node cannot know it has every acknowledged revocation by looking at its
//! own state: a follower may lag, a partitioned node may be far behind. So before
//! validating, a node asks the leader for its read index (openraft confirms leadership with a
//! quorum and returns a log position at or after every acknowledged write), then waits until
//! it has applied that far. A node that cannot reach a leader with a quorum answers
//! "unavailable" rather than "valid".
//!
//! Fetching a read index costs a round of messages (openraft confirms leadership by sending
//! every follower a heartbeat; a follower first calls the leader), so validations waiting at
//! the same time share one round ([`ReadIndexes`], `coalesce.rs`). A validation joins only a
//! round that starts after it arrived: the position that round names is at or after every
//! write acknowledged before the validation began, which is all linearizability asks.

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio_util::sync::CancellationToken;

use super::coalesce::Coalescer;
use super::Inner;
use crate::raft::network::{ForwardError, PeerRequest, PeerResponse, Peers};
use crate::raft::types::{NodeId, Raft};

/// How long a follower's call to the leader for its read index may take before the
/// validations waiting for it try again.
const READ_INDEX_CALL_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("no leader with a quorum answered within {0:?}")]
    NoLeader(Duration),
    #[error("node is shutting down")]
    ShuttingDown,
}

/// The leader's read index, if this node leads; else the leader this node knows of.
async fn local_read_index(raft: &Raft) -> Result<u64, Option<(NodeId, String)>> {
    match raft.get_read_log_id().await {
        Ok((read, _applied)) => Ok(read.map_or(0, |l| l.index)),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            Err(f.leader_id.zip(f.leader_node.map(|n| n.addr)))
        }
        Err(_) => Err(None),
    }
}

/// The leader, if this node knows it and it is another node.
pub(super) fn leader_elsewhere(raft: &Raft, me: NodeId) -> Option<(NodeId, String)> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let leader = m.current_leader.filter(|l| *l != me)?;
    let node = m.membership_config.membership().get_node(&leader)?;
    Some((leader, node.addr.clone()))
}

/// Read indexes, asked for in rounds that every validation waiting at the time shares (see
/// `coalesce.rs`): one leadership confirmation (two heartbeats) or one call to the leader
/// per round rather than per validation.
#[derive(Clone)]
pub(crate) struct ReadIndexes {
    /// This node's own, if it leads; else the leader it knows of.
    local: Coalescer<Result<u64, Option<(NodeId, String)>>>,
    /// The leader's, asked over the peer link; `None` if no leader answered.
    remote: Coalescer<Option<u64>>,
    /// Reads that asked for a read index (rounds are counted by the coalescers).
    reads: prometheus_client::metrics::counter::Counter,
}

impl ReadIndexes {
    pub(crate) fn start(
        raft: Raft,
        me: NodeId,
        peers: Peers,
        counters: super::metrics::ReadIndex,
        stop: CancellationToken,
    ) -> Self {
        let local = {
            let raft = raft.clone();
            Coalescer::start(
                move || {
                    let raft = raft.clone();
                    async move { local_read_index(&raft).await }
                },
                counters.rounds.clone(),
                stop.clone(),
            )
        };
        let remote = Coalescer::start(
            move || {
                let (raft, peers) = (raft.clone(), peers.clone());
                async move {
                    let (leader, addr) = leader_elsewhere(&raft, me)?;
                    match peers
                        .client(leader, &addr)
                        .call(&PeerRequest::ReadIndex, READ_INDEX_CALL_TIMEOUT)
                        .await
                    {
                        Ok(PeerResponse::ReadIndex(Ok(i))) => Some(i),
                        _ => None,
                    }
                }
            },
            counters.rounds,
            stop,
        );
        ReadIndexes {
            local,
            remote,
            reads: counters.reads,
        }
    }
}

/// Serves a follower's read-index request.
pub(super) async fn serve_read_index(inner: &Inner) -> Result<u64, ForwardError> {
    match inner.reads.local.get().await {
        Some(Ok(i)) => Ok(i),
        Some(Err(leader)) => Err(ForwardError::NotLeader { leader }),
        None => Err(ForwardError::NotLeader { leader: None }),
    }
}

/// Waits until this node has applied everything acknowledged before the call.
pub(super) async fn barrier(inner: &Inner) -> Result<(), ReadError> {
    inner.reads.reads.inc();
    let budget = inner.config.write_timeout();
    let deadline = tokio::time::Instant::now() + budget;
    let index = loop {
        let attempt = async {
            if leader_elsewhere(&inner.raft, inner.id).is_some() {
                inner.reads.remote.get().await.flatten()
            } else {
                inner.reads.local.get().await.and_then(Result::ok)
            }
        };
        let got = tokio::select! {
            _ = inner.shutdown.cancelled() => return Err(ReadError::ShuttingDown),
            r = tokio::time::timeout_at(deadline, attempt) => r.ok().flatten(),
        };
        if let Some(i) = got {
            break i;
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
