//! The operator service (ALPN `agentreg-admin/1`, mutual TLS): JSON requests in the agent
//! framing, one per stream.
//!
//! ```text
//! request:  {"command": "status"}
//! response: {"success": true, "status": NodeStatus}   or   {"success": false, "error": "..."}
//! ```

use std::sync::Arc;

use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::Inner;
use crate::registry::TableSizes;
use crate::transport::frame::{read_frame, write_frame};

/// Largest admin request or response, in bytes.
pub const MAX_ADMIN_FRAME: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
}

/// What a node's heartbeat loop did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatStats {
    /// Agents registered on this node's connections.
    pub agents_connected: u64,
    pub pings_sent: u64,
    pub pings_missed: u64,
    pub evictions_proposed: u64,
    pub evictions_committed: u64,
}

/// One node's view of itself and the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub cluster_id: String,
    /// leader, follower, candidate, learner or shutdown.
    pub role: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub members: Vec<MemberStatus>,
    pub tables: TableSizes,
    pub heartbeat: HeartbeatStats,
}

pub(super) fn status(inner: &Inner) -> NodeStatus {
    let m = inner.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| MemberStatus {
            id: *id,
            addr: node.addr.clone(),
            voter: voters.contains(id),
        })
        .collect();
    let role = match m.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    NodeStatus {
        node_id: inner.id,
        cluster_id: inner.config.cluster_id.clone(),
        role: role.to_owned(),
        leader: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index,
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        members,
        tables: inner.state.read().state.sizes(),
        heartbeat: {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &inner.counters;
            HeartbeatStats {
                agents_connected: inner.conns.agents() as u64,
                pings_sent: c.pings_sent.load(Relaxed),
                pings_missed: c.pings_missed.load(Relaxed),
                evictions_proposed: c.evictions_proposed.load(Relaxed),
                evictions_committed: c.evictions_committed.load(Relaxed),
            }
        },
    }
}

pub(super) async fn serve(inner: Arc<Inner>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    loop {
        let (mut send, mut recv) = tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let inner = inner.clone();
        inner.tasks.clone().spawn(async move {
            let answer = match read_frame(&mut recv, MAX_ADMIN_FRAME).await {
                Ok(bytes) => match serde_json::from_slice::<AdminRequest>(&bytes) {
                    Ok(req) => handle(&inner, req).await,
                    Err(e) => serde_json::json!({"success": false, "error": format!("bad admin request: {e}")}),
                },
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "bad admin frame");
                    serde_json::json!({"success": false, "error": format!("bad frame: {e}")})
                }
            };
            let bytes = answer.to_string().into_bytes();
            if write_frame(&mut send, &bytes).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

async fn handle(inner: &Inner, req: AdminRequest) -> serde_json::Value {
    match req {
        AdminRequest::Status => serde_json::json!({"success": true, "status": status(inner)}),
    }
}
