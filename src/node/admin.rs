//! The operator service (ALPN `agentreg-admin/1`, mutual TLS): JSON requests in the agent
//! framing, one per stream.
//!
//! ```text
//! request:  {"command": "status"}
//! response: {"success": true, "status": NodeStatus}
//!       or: {"success": false, "code": "not_leader", "error": "..."}
//! ```
//!
//! A failure's `code` (see [`admin_code`]) tells the CLI whether another node may serve the
//! request (`shutting_down`, `unavailable`, `not_leader`) or the refusal is final.

use std::sync::Arc;

use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::Inner;
use crate::identity::Secret;
use crate::proto::agent::{ErrorCode, Refusal};
use crate::raft::backup::Backup;
use crate::registry::{Claim, Session, TableSizes, Tables};
use crate::registry::{Op, Outcome};
use crate::transport::frame::{read_stream_frame, write_frame};

/// Largest admin request or response, in bytes.
pub const MAX_ADMIN_FRAME: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    /// Whether the node serves, and what an operator should look at (`agentreg health`).
    Health,
    /// The signing keys: id, state, creation time (never the secrets).
    KeysList,
    /// Make a fresh key (from the OS random source) the active signing key.
    KeysRotate,
    /// Retire a validating key: the certificates it signed stop validating.
    KeysRetire {
        key_id: String,
    },
    /// The sessions, by agent id: node, session id, registration time (linearizable).
    AgentsList {
        #[serde(default, flatten)]
        only: ListFilter,
        /// Answer in frames of rows (see [`ListFrame`]) rather than one frame.
        #[serde(default, skip_serializing_if = "is_false")]
        stream: bool,
    },
    /// The claims, by agent id (linearizable).
    ClaimsList {
        #[serde(default, flatten)]
        only: ListFilter,
        /// As for `AgentsList`.
        #[serde(default, skip_serializing_if = "is_false")]
        stream: bool,
    },
    /// One claim and its session, if any (linearizable).
    ClaimsShow {
        agent_id: String,
    },
    /// Revoke the current certificate of an agent id and free the id.
    Revoke {
        agent_id: String,
    },
    /// Add a node as a voter: it joins as a learner, catches up, then votes. Leader only.
    MembersAdd {
        node_id: u64,
        addr: String,
    },
    /// Remove a node (dead or alive) from the membership. Leader only.
    MembersRemove {
        node_id: u64,
    },
    /// Hand the leadership to `node_id` (or to any caught-up voter), as a stopping leader
    /// does (`handover.rs`): before maintenance of the leader's host, say. Leader only.
    MembersMoveLeader {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node_id: Option<u64>,
    },
    /// A backup of the tables after a read barrier: the answer frame is followed by the
    /// backup file's bytes (see `raft::backup`) until the stream ends.
    SnapshotSave,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A session as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub agent_id: String,
    pub node_id: u64,
    pub session_id: u64,
    pub registered_at: u64,
    pub certificate_serial: Option<u64>,
    pub metadata: serde_json::Value,
}

/// A claim as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimInfo {
    pub agent_id: String,
    pub serial: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    pub key_id: String,
}

/// A signing key as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub state: String,
    pub created_at: u64,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub cluster_id: String,
    /// leader, follower, candidate, learner or shutdown.
    pub role: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    /// The log position the tables reflect.
    pub applied_index: Option<u64>,
    /// Digest of the tables at `applied_index` (see `Tables::digest`): nodes at the same
    /// applied index must report the same digest.
    pub state_digest: String,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub members: Vec<MemberStatus>,
    pub tables: TableSizes,
    pub heartbeat: HeartbeatStats,
    /// Its clock against its peers'; absent from nodes of builds before clock probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<super::ClockStatus>,
    /// When its TLS certificate chain stops verifying, seconds since the Unix epoch; absent
    /// from nodes of builds before TLS reloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_valid_until: Option<u64>,
    /// Its data dir's size and the room left beside it; absent from nodes of earlier builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<super::DiskUsage>,
    /// Its version and the newest kind of log entry it reads; absent from nodes of builds
    /// before build probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<crate::raft::network::BuildInfo>,
    /// On the leader, while expired claims are due to be forgotten but are not: which
    /// member does not read the entry that forgets them (mid-upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgetting_held_back: Option<String>,
}

/// What `agentreg health` reports of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    /// Whether it serves agents: part of a quorum and caught up, its clock trusted, not
    /// stopping (what `/readyz` answers).
    pub ready: bool,
    /// Why not, and what will soon stop it (a certificate about to expire), in words.
    pub problems: Vec<String>,
}

/// Whether the node serves agents (see [`NodeHealth::ready`]); why not, if not.
pub(super) async fn readiness(inner: &Inner) -> Result<(), String> {
    if inner.draining.is_cancelled() {
        return Err("draining for shutdown".to_owned());
    }
    // A node that cannot vouch for its clock answers its agents clock_skew.
    super::write::now_checked(inner).map_err(|e| e.to_string())?;
    match tokio::time::timeout(
        std::time::Duration::from_secs(2),
        super::read::barrier(inner),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no quorum within 2s".to_owned()),
    }
}

async fn health(inner: &Inner) -> NodeHealth {
    let mut problems = Vec::new();
    let ready = readiness(inner).await.map_err(|e| problems.push(e)).is_ok();
    let until = inner.tls.valid_until();
    if super::tls_reload::expires_soon(until) {
        problems.push(format!(
            "its TLS certificate expires in {}",
            super::time_left(until)
        ));
    }
    problems.extend(super::DiskUsage::of(&inner.config.data_dir).problem());
    NodeHealth { ready, problems }
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
    let (applied_index, tables, state_digest) = {
        let applied = inner.state.read();
        (
            applied.last_applied.map(|l| l.index),
            applied.state.sizes(),
            applied.state.tables().digest(),
        )
    };
    NodeStatus {
        node_id: inner.id,
        cluster_id: inner.config.cluster_id.clone(),
        role: role.to_owned(),
        leader: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index,
        applied_index,
        state_digest,
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        members,
        tables,
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
        clock: Some(inner.clock.status(|| voters.len())),
        tls_valid_until: Some(inner.tls.valid_until()),
        disk: Some(super::DiskUsage::of(&inner.config.data_dir)),
        build: Some(crate::raft::network::BuildInfo::this()),
        forgetting_held_back: super::duties::forgetting_held_back(inner),
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
        // As for agents: counted by the drain, then admitted or refused as the stream
        // arrives, so a request that began before the drain is served, not refused because
        // its frame was read after the drain began.
        let in_drain = inner.requests.token();
        let admitted = !inner.draining.is_cancelled();
        let inner = inner.clone();
        tokio::spawn(async move {
            let _in_drain = in_drain;
            let answer = match read_stream_frame(&mut recv, MAX_ADMIN_FRAME).await {
                Ok(_) if !admitted => shutting_down(),
                Ok(bytes) => match serde_json::from_slice::<AdminRequest>(&bytes) {
                    Ok(AdminRequest::SnapshotSave) => {
                        let (answer, backup) = snapshot_save(&inner).await;
                        let bytes = answer.to_string().into_bytes();
                        if write_frame(&mut send, &bytes).await.is_ok()
                            && send.write_all(&backup).await.is_ok()
                        {
                            super::finish_and_wait(send).await;
                        }
                        return;
                    }
                    Ok(AdminRequest::AgentsList { only, stream: true }) => {
                        let sessions: fn(&Tables) -> &_ = |t| &t.sessions;
                        let name = ListFrame::AGENTS;
                        if stream_list(&inner, &mut send, &only, name, sessions, agent_info).await {
                            super::finish_and_wait(send).await;
                        }
                        return;
                    }
                    Ok(AdminRequest::ClaimsList { only, stream: true }) => {
                        let claims: fn(&Tables) -> &_ = |t| &t.claims;
                        let name = ListFrame::CLAIMS;
                        if stream_list(&inner, &mut send, &only, name, claims, claim_info).await {
                            super::finish_and_wait(send).await;
                        }
                        return;
                    }
                    Ok(req) => handle(&inner, req).await,
                    Err(e) => failed(admin_code::REFUSED, format!("bad admin request: {e}")),
                },
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "bad admin frame");
                    failed(admin_code::REFUSED, format!("bad frame: {e}"))
                }
            };
            let bytes = answer.to_string().into_bytes();
            if write_frame(&mut send, &bytes).await.is_ok() {
                super::finish_and_wait(send).await;
            }
        });
    }
}

/// The codes of failed admin answers.
pub mod admin_code {
    /// The request is malformed or refused on its merits (a rule of membership or of the
    /// keyring): final.
    pub const REFUSED: &str = "refused";
    /// No claim or session for the agent id asked about: final.
    pub const NOT_FOUND: &str = "not_found";
    /// This node is stopping: another node may serve the request.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// This node cannot reach a quorum (nothing was applied): another node may serve it.
    pub const UNAVAILABLE: &str = "unavailable";
    /// Membership changes run on the leader, which this node is not.
    pub const NOT_LEADER: &str = "not_leader";
    /// A write's answer was lost in a failover: it may or may not have been applied.
    pub const OUTCOME_UNKNOWN: &str = "outcome_unknown";
    pub const INTERNAL: &str = "internal";
}

/// A failed admin answer.
fn failed(code: &str, error: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({"success": false, "code": code, "error": error.to_string()})
}

/// The answer when a linearizable read's barrier failed: nothing was read.
fn barrier_failed(e: &impl std::fmt::Display) -> serde_json::Value {
    failed(admin_code::UNAVAILABLE, format!("cluster unavailable: {e}"))
}

/// The admin code of a write's refusal.
fn write_failed(e: &Refusal) -> serde_json::Value {
    let code = match e.code {
        // Another node may serve it.
        ErrorCode::Unavailable | ErrorCode::NotApplied | ErrorCode::ClockSkew => {
            admin_code::UNAVAILABLE
        }
        ErrorCode::OutcomeUnknown => admin_code::OUTCOME_UNKNOWN,
        ErrorCode::ShuttingDown => admin_code::SHUTTING_DOWN,
        ErrorCode::NotClaimed => admin_code::NOT_FOUND,
        ErrorCode::Internal => admin_code::INTERNAL,
        _ => admin_code::REFUSED,
    };
    failed(code, &e.error)
}

/// The answer to an admin request that arrived once the node had begun to stop.
fn shutting_down() -> serde_json::Value {
    failed(
        admin_code::SHUTTING_DOWN,
        crate::proto::agent::SHUTTING_DOWN_ERROR,
    )
}

async fn handle(inner: &Inner, req: AdminRequest) -> serde_json::Value {
    use serde_json::json;
    let commit = |op: Op| super::write::commit(inner, op);
    let linearizable = matches!(
        req,
        AdminRequest::KeysList
            | AdminRequest::AgentsList { .. }
            | AdminRequest::ClaimsList { .. }
            | AdminRequest::ClaimsShow { .. }
    );
    if linearizable {
        if let Err(e) = super::read::barrier(inner).await {
            return barrier_failed(&e);
        }
    }
    match req {
        AdminRequest::Status => json!({"success": true, "status": status(inner)}),
        AdminRequest::Health => json!({"success": true, "health": health(inner).await}),
        AdminRequest::AgentsList { only, .. } => {
            let tables = tables(inner);
            let (agents, more) = only.pick(&tables.sessions, agent_info);
            json!({"success": true, "agents": agents, "more": more})
        }
        AdminRequest::ClaimsList { only, .. } => {
            let tables = tables(inner);
            let (claims, more) = only.pick(&tables.claims, claim_info);
            json!({"success": true, "claims": claims, "more": more})
        }
        AdminRequest::ClaimsShow { agent_id } => {
            let tables = tables(inner);
            let claim = tables
                .claims
                .get(&agent_id)
                .map(|c| claim_info(&agent_id, c));
            let session = tables
                .sessions
                .get(&agent_id)
                .map(|s| agent_info(&agent_id, s));
            if claim.is_none() && session.is_none() {
                failed(
                    admin_code::NOT_FOUND,
                    format!("Agent ID {agent_id} is neither claimed nor connected"),
                )
            } else {
                json!({"success": true, "claim": claim, "session": session})
            }
        }
        AdminRequest::SnapshotSave => failed(
            admin_code::INTERNAL,
            "snapshot_save is served with its data stream",
        ),
        AdminRequest::MembersAdd { node_id, addr } => members_add(inner, node_id, addr).await,
        AdminRequest::MembersRemove { node_id } => members_remove(inner, node_id).await,
        AdminRequest::MembersMoveLeader { node_id } => move_leader(inner, node_id).await,
        AdminRequest::Revoke { agent_id } => match commit(Op::RevokeAgent {
            agent_id: agent_id.clone(),
        })
        .await
        {
            Ok(Outcome::Revoked { serial, ended, .. }) => {
                json!({"success": true, "agent_id": agent_id, "serial": serial, "session_ended": ended.is_some()})
            }
            Ok(other) => failed(admin_code::INTERNAL, format!("unexpected result {other:?}")),
            Err(e) => write_failed(&e),
        },
        AdminRequest::KeysList => json!({"success": true, "keys": keys(inner)}),
        AdminRequest::KeysRotate => match commit(Op::RotateKey {
            secret: Secret::generate(),
        })
        .await
        {
            Ok(Outcome::KeyRotated { key_id }) => {
                tracing::info!(key_id, "signing key rotated");
                json!({"success": true, "key_id": key_id})
            }
            Ok(other) => failed(admin_code::INTERNAL, format!("unexpected result {other:?}")),
            Err(e) => write_failed(&e),
        },
        AdminRequest::KeysRetire { key_id } => match commit(Op::RetireKey { key_id }).await {
            Ok(Outcome::KeyRetired { key_id }) => {
                tracing::info!(key_id, "signing key retired");
                json!({"success": true, "key_id": key_id})
            }
            Ok(other) => failed(admin_code::INTERNAL, format!("unexpected result {other:?}")),
            Err(e) => write_failed(&e),
        },
    }
}

/// A backup of this node's tables once it has applied everything acknowledged so far.
async fn snapshot_save(inner: &Inner) -> (serde_json::Value, Vec<u8>) {
    use serde_json::json;
    if let Err(e) = super::read::barrier(inner).await {
        return (
            failed(admin_code::UNAVAILABLE, format!("cluster unavailable: {e}")),
            Vec::new(),
        );
    }
    // The copy shares the tables; encoding them (tens of milliseconds for a large registry)
    // runs on a blocking thread, not on a worker serving requests.
    let (applied, cluster_id, id) = (
        inner.state.copy(),
        inner.config.cluster_id.clone(),
        inner.id,
    );
    let backup = tokio::task::spawn_blocking(move || {
        let b = Backup::capture(&applied, &cluster_id, id)?;
        Ok::<_, String>((b.meta.last_log_id.map(|l| l.index), b.to_bytes()))
    })
    .await
    .unwrap_or_else(|e| Err(format!("encoding task failed: {e}")));
    match backup {
        Ok((index, bytes)) => {
            tracing::info!(
                target: "audit",
                event = "snapshot_save",
                node = inner.id,
                index,
                bytes = bytes.len(),
                "backup taken"
            );
            (
                json!({"success": true, "bytes": bytes.len(), "applied_index": index}),
                bytes,
            )
        }
        Err(e) => (
            failed(
                admin_code::INTERNAL,
                format!("cannot capture the tables: {e}"),
            ),
            Vec::new(),
        ),
    }
}

/// Why a membership change cannot run here, with the leader's address when known.
fn not_leader(inner: &Inner) -> Option<serde_json::Value> {
    let m = inner.raft.metrics().borrow().clone();
    if m.state == ServerState::Leader {
        return None;
    }
    let leader_addr = m.current_leader.and_then(|l| {
        m.membership_config
            .membership()
            .get_node(&l)
            .map(|n| n.addr.clone())
    });
    let mut refusal = failed(
        admin_code::NOT_LEADER,
        format!(
            "membership changes and leadership moves run on the leader; this node is not it (leader: {})",
            leader_addr.as_deref().unwrap_or("unknown")
        ),
    );
    refusal["leader_addr"] = leader_addr.into();
    Some(refusal)
}

async fn members_add(inner: &Inner, node_id: u64, addr: String) -> serde_json::Value {
    use serde_json::json;
    if let Some(refusal) = not_leader(inner) {
        return refusal;
    }
    let voters: std::collections::BTreeSet<u64> = inner
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    if voters.contains(&node_id) {
        return failed(
            admin_code::REFUSED,
            format!("node {node_id} is already a voting member"),
        );
    }
    tracing::info!(target: "audit", event = "member_add", node_id, %addr, "adding a member");
    // Blocking: returns once the learner has caught up, so it votes with a full log.
    if let Err(e) = inner
        .raft
        .add_learner(node_id, openraft::BasicNode::new(&addr), true)
        .await
    {
        return failed(
            admin_code::OUTCOME_UNKNOWN,
            format!("cannot add node {node_id} as a learner: {e}"),
        );
    }
    let change = openraft::ChangeMembers::AddVoterIds([node_id].into_iter().collect());
    match inner.raft.change_membership(change, false).await {
        Ok(r) => json!({"success": true, "node_id": node_id, "index": r.log_id.index}),
        Err(e) => failed(
            admin_code::OUTCOME_UNKNOWN,
            format!("cannot make node {node_id} a voter: {e}"),
        ),
    }
}

async fn members_remove(inner: &Inner, node_id: u64) -> serde_json::Value {
    use serde_json::json;
    if let Some(refusal) = not_leader(inner) {
        return refusal;
    }
    let membership = inner
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    if membership.get_node(&node_id).is_none() {
        return failed(
            admin_code::REFUSED,
            format!("node {node_id} is not a member"),
        );
    }
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    if voters.len() <= 1 && voters.contains(&node_id) {
        return failed(admin_code::REFUSED, "cannot remove the last voting member");
    }
    tracing::info!(target: "audit", event = "member_remove", node_id, "removing a member");
    let change = if voters.contains(&node_id) {
        openraft::ChangeMembers::RemoveVoters([node_id].into_iter().collect())
    } else {
        openraft::ChangeMembers::RemoveNodes([node_id].into_iter().collect())
    };
    match inner.raft.change_membership(change, false).await {
        Ok(r) => json!({"success": true, "node_id": node_id, "index": r.log_id.index}),
        Err(e) => failed(
            admin_code::OUTCOME_UNKNOWN,
            format!("cannot remove node {node_id}: {e}"),
        ),
    }
}

async fn move_leader(inner: &Inner, to: Option<u64>) -> serde_json::Value {
    use super::handover::{transfer, NotHanded};
    use serde_json::json;
    if let Some(refusal) = not_leader(inner) {
        return refusal;
    }
    tracing::info!(target: "audit", event = "move_leader", to, "moving the leadership");
    match transfer(inner, to).await {
        Ok(h) => {
            tracing::info!(
                new_leader = h.new_leader,
                term = h.term,
                writes_held_ms = h.writes_held.as_millis() as u64,
                "handed leadership over"
            );
            json!({
                "success": true,
                "leader": h.new_leader,
                "term": h.term,
                "took_ms": h.took.as_millis() as u64,
                "writes_held_ms": h.writes_held.as_millis() as u64,
            })
        }
        Err(NotHanded::NotLeader) => not_leader(inner).unwrap_or_else(|| {
            failed(
                admin_code::NOT_LEADER,
                "this node stopped leading meanwhile",
            )
        }),
        Err(e @ NotHanded::Refused(_)) => failed(admin_code::REFUSED, e),
        Err(e @ NotHanded::Failed(_)) => failed(
            admin_code::UNAVAILABLE,
            format!("leadership not handed over: {e}"),
        ),
    }
}

/// Which part of a table a list asks for: the agent ids that start with `prefix`, in order,
/// at most `limit` of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl ListFilter {
    /// The entries of `table` whose agent id starts with the prefix, in agent id order (the
    /// limit is the caller's to apply).
    pub fn matching<'t, V>(
        &self,
        table: &'t imbl::OrdMap<String, V>,
    ) -> impl Iterator<Item = (&'t String, &'t V)> + 't {
        let prefix = self.prefix.clone().unwrap_or_default();
        table
            .range::<_, str>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(id, _)| id.starts_with(&prefix))
    }

    /// The rows of `table` this filter picks, made by `row`, and how many more matched
    /// beyond the limit.
    pub fn pick<V, R>(
        &self,
        table: &imbl::OrdMap<String, V>,
        row: impl Fn(&str, &V) -> R,
    ) -> (Vec<R>, usize) {
        let mut matching = self.matching(table);
        let rows: Vec<R> = matching
            .by_ref()
            .take(self.limit.unwrap_or(usize::MAX))
            .map(|(id, v)| row(id, v))
            .collect();
        (rows, matching.count())
    }
}

/// A streamed list's frames after the first (`{"success": true, "stream": true}`, or a
/// failure as for any request): rows in agent id order, [`LIST_FRAME_ROWS`] at most in each,
/// under the table's name (`{"agents": [...]}`, `{"claims": [...]}`), then
/// `{"end": true, "rows": N, "more": M}`, then the stream ends. A stream that ends without
/// the last frame was cut short. The rows are read from one copy of the tables, taken after
/// the read barrier: the list is consistent however long it takes to send.
pub struct ListFrame;

impl ListFrame {
    pub const AGENTS: &'static str = "agents";
    pub const CLAIMS: &'static str = "claims";
}

/// Rows in a frame of a streamed list: some 100 KB with small metadata, 8 MB at most (16 KiB
/// of metadata a session).
pub const LIST_FRAME_ROWS: usize = 500;

/// Answers a streamed list of `table`'s rows made by `row`; whether the answer went out
/// whole. The first frame comes after the read barrier, as for any list.
async fn stream_list<V, R: Serialize>(
    inner: &Inner,
    send: &mut quinn::SendStream,
    only: &ListFilter,
    name: &str,
    table: fn(&Tables) -> &imbl::OrdMap<String, V>,
    row: fn(&str, &V) -> R,
) -> bool {
    use serde_json::json;
    if let Err(e) = super::read::barrier(inner).await {
        return write_frame(send, barrier_failed(&e).to_string().as_bytes())
            .await
            .is_ok();
    }
    let tables = tables(inner);
    let first = json!({"success": true, "stream": true}).to_string();
    if write_frame(send, first.as_bytes()).await.is_err() {
        return false;
    }
    let mut matching = only.matching(table(&tables));
    let mut left = only.limit.unwrap_or(usize::MAX);
    let mut sent = 0;
    while left > 0 {
        let rows: Vec<R> = matching
            .by_ref()
            .take(left.min(LIST_FRAME_ROWS))
            .map(|(id, v)| row(id, v))
            .collect();
        if rows.is_empty() {
            break;
        }
        left -= rows.len();
        sent += rows.len();
        let mut frame = format!("{{\"{name}\":").into_bytes();
        serde_json::to_writer(&mut frame, &rows).expect("rows always encode");
        frame.push(b'}');
        if write_frame(send, &frame).await.is_err() {
            return false;
        }
    }
    let end = json!({"end": true, "rows": sent, "more": matching.count()}).to_string();
    write_frame(send, end.as_bytes()).await.is_ok()
}

/// The applied tables, copied under the lock (persistent maps: the copy shares them), so
/// that building a long answer does not hold up apply.
fn tables(inner: &Inner) -> Tables {
    inner.state.read().state.tables().clone()
}

fn agent_info(agent_id: &str, s: &Session) -> AgentInfo {
    AgentInfo {
        agent_id: agent_id.to_owned(),
        node_id: s.conn.node_id,
        session_id: s.session_id,
        registered_at: s.registered_at,
        certificate_serial: s.cert_serial,
        metadata: serde_json::from_str(&s.metadata).unwrap_or(serde_json::Value::Null),
    }
}

fn claim_info(agent_id: &str, c: &Claim) -> ClaimInfo {
    ClaimInfo {
        agent_id: agent_id.to_owned(),
        serial: c.serial,
        issued_at: c.issued_at,
        expires_at: c.expires_at,
        key_id: c.key_id.clone(),
    }
}

fn keys(inner: &Inner) -> Vec<KeyInfo> {
    inner
        .state
        .read()
        .state
        .keyring()
        .iter()
        .map(|(id, k)| KeyInfo {
            key_id: id.clone(),
            state: k.state.to_string(),
            created_at: k.created_at,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list without a filter is the request earlier builds sent and took, both ways; a
    /// filter adds fields.
    #[test]
    fn lists_without_a_filter_keep_the_earlier_request() {
        let plain = AdminRequest::AgentsList {
            only: ListFilter::default(),
            stream: false,
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"command": "agents_list"})
        );
        let earlier: AdminRequest = serde_json::from_str(r#"{"command": "claims_list"}"#).unwrap();
        assert_eq!(
            earlier,
            AdminRequest::ClaimsList {
                only: ListFilter::default(),
                stream: false,
            }
        );
        let filtered: AdminRequest =
            serde_json::from_str(r#"{"command": "claims_list", "prefix": "a", "limit": 2}"#)
                .unwrap();
        assert_eq!(
            filtered,
            AdminRequest::ClaimsList {
                only: ListFilter {
                    prefix: Some("a".into()),
                    limit: Some(2)
                },
                stream: false,
            }
        );
        // A streamed list says so; a node of an earlier build ignores the field.
        let streamed = AdminRequest::AgentsList {
            only: ListFilter::default(),
            stream: true,
        };
        assert_eq!(
            serde_json::to_value(&streamed).unwrap(),
            serde_json::json!({"command": "agents_list", "stream": true})
        );
        assert_eq!(
            serde_json::from_value::<AdminRequest>(serde_json::to_value(&streamed).unwrap())
                .unwrap(),
            streamed
        );
    }
}
