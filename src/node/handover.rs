//! A leader hands its leadership to a follower: when it stops gracefully, and when an
//! operator asks (`agentreg members move-leader`).
//!
//! openraft 0.9 has no leader transfer, and its leader lease makes a follower refuse to vote
//! for `election_timeout_max` after it last heard from its leader. A leader that just
//! stopped left the cluster leaderless for that lease plus an election timeout (about
//! 450 ms as shipped), and every write waited: each rolling restart cost one such pause. A
//! stopping leader instead, once it has drained its own requests ([`hand_over`]), and a
//! leader asked to ([`transfer`]):
//!
//! 1. holds its proposer: the writes out are answered, new ones (forwarded by followers)
//!    queue, so its log stays as it is;
//! 2. waits (briefly) for a voter whose log holds all of its own;
//! 3. asks that voter to stand for election at once ([`PeerRequest::Campaign`]).
//!
//! The candidate's term is above the leader's and its log is as long, so the leader grants
//! its vote and steps down (openraft dates a leader's own lease from its election; a leader
//! elected less than a lease ago first waits it out): with the candidate's own vote that is
//! a majority of two or three voters. The other follower heard from the leader moments ago
//! and refuses on its lease, which changes nothing. The queued writes then find this node a
//! follower and are forwarded to the new leader. With more than three voters the two votes
//! are no majority and a refused candidate would only delay the election, so nothing is
//! tried; nor when no voter has answered this node lately. When a step fails the cluster
//! goes on as before (a stopping leader's then elects a leader once it is gone).

use std::time::{Duration, Instant};

use openraft::RaftMetrics;

use super::Inner;
use crate::raft::network::{PeerRequest, PeerResponse};
use crate::raft::types::{Node, NodeId};

/// How long each step may take before the hand-over is given up.
pub(super) const STEP: Duration = Duration::from_secs(1);

/// How a hand-over went.
#[derive(Debug)]
pub(super) struct Handed {
    pub new_leader: NodeId,
    pub term: u64,
    /// From the start, a wait for this leader's own lease included.
    pub took: Duration,
    /// How long new writes waited (queued) for it.
    pub writes_held: Duration,
}

/// Why leadership was not handed over.
#[derive(Debug, thiserror::Error)]
pub(super) enum NotHanded {
    /// This node does not lead.
    #[error("this node is not the leader")]
    NotLeader,
    /// Refused on its merits before anything was done (nothing changed).
    #[error("{0}")]
    Refused(String),
    /// Tried and given up: this node may still lead, or an election may follow.
    #[error("{0}")]
    Failed(String),
}

/// Hands leadership to a follower if this node leads, on its way to stopping (see the module
/// docs), and logs how it went. Returns once another node leads or the attempt is given up.
pub(super) async fn hand_over(inner: &Inner) {
    match transfer(inner, None).await {
        Ok(h) => tracing::info!(
            new_leader = h.new_leader,
            term = h.term,
            took_ms = h.took.as_millis() as u64,
            writes_held_ms = h.writes_held.as_millis() as u64,
            "handed leadership over"
        ),
        Err(NotHanded::NotLeader) => {}
        Err(e @ NotHanded::Refused(_)) => {
            tracing::info!(reason = %e, "not handing leadership over");
        }
        Err(e) => tracing::warn!(
            reason = %e,
            "leadership not handed over; the cluster elects a leader when this node is gone"
        ),
    }
}

/// Hands this leader's leadership to `to`, or to the first caught-up voter that agrees;
/// counted in the node's metrics.
///
/// # Errors
/// See [`NotHanded`].
pub(super) async fn transfer(inner: &Inner, to: Option<NodeId>) -> Result<Handed, NotHanded> {
    let result = try_transfer(inner, to).await;
    let counter = match &result {
        Ok(_) => Some(&inner.metrics.handovers.handed),
        Err(NotHanded::Failed(_)) => Some(&inner.metrics.handovers.failed),
        Err(_) => None,
    };
    if let Some(c) = counter {
        c.inc();
    }
    result
}

async fn try_transfer(inner: &Inner, to: Option<NodeId>) -> Result<Handed, NotHanded> {
    let started = Instant::now();
    let (term, voters) = {
        let metrics = inner.raft.metrics();
        let m = metrics.borrow();
        if m.current_leader != Some(inner.id) {
            return Err(NotHanded::NotLeader);
        }
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        (m.current_term, voters)
    };
    if !(2..=3).contains(&voters.len()) {
        return Err(NotHanded::Refused(format!(
            "leadership can be handed over with two or three voters only ({} vote)",
            voters.len()
        )));
    }
    match to {
        Some(id) if id == inner.id => {
            return Err(NotHanded::Refused(format!("node {id} leads already")))
        }
        Some(id) if !voters.contains(&id) => {
            return Err(NotHanded::Refused(format!(
                "node {id} is not a voting member"
            )))
        }
        _ => {}
    }
    // A voter that has not answered lately (down, cut off) would keep writes held for a
    // step and then decline: refused at once instead, nothing held.
    let wanted = |id: &NodeId| to.is_none_or(|t| t == *id);
    let lately = STEP.max(2 * Duration::from_millis(inner.raft.config().heartbeat_interval));
    let answering = voters
        .iter()
        .filter(|id| **id != inner.id && wanted(id))
        .any(|id| {
            node_addr(inner, *id)
                .and_then(|addr| inner.peers.client(*id, &addr).last_ok())
                .is_some_and(|at| at.elapsed() < lately)
        });
    if !answering {
        return Err(NotHanded::Refused(match to {
            Some(id) => format!("node {id} has not answered this node in the last {lately:?}"),
            None => format!("no other voter has answered this node in the last {lately:?}"),
        }));
    }
    // 0. openraft dates a leader's own lease from its election: a leader elected less than
    //    a lease ago would refuse the candidate its vote. Writes go on meanwhile.
    let lease = Duration::from_millis(inner.raft.config().election_timeout_max);
    if let Ok(Some(since)) = inner.raft.with_raft_state(|s| s.vote_last_modified()).await {
        tokio::time::sleep_until(since + lease + Duration::from_millis(1)).await;
    }
    let held_from = Instant::now();
    // 1. The log stays as it is from here on.
    let Ok(_held) = tokio::time::timeout(STEP, inner.proposer.hold()).await else {
        return Err(NotHanded::Failed(format!(
            "a write was still out after {STEP:?}"
        )));
    };
    // 2. The followers (or the one asked for) whose logs hold all of this node's.
    let ready = inner
        .raft
        .wait(Some(STEP))
        .metrics(
            |m| m.current_leader != Some(inner.id) || caught_up(m, inner.id).iter().any(wanted),
            "a follower with all of the leader's log",
        )
        .await;
    let candidates: Vec<NodeId> = match ready {
        Ok(m) if m.current_leader == Some(inner.id) && m.current_term == term => {
            caught_up(&m, inner.id).into_iter().filter(wanted).collect()
        }
        Ok(m) => {
            return Err(NotHanded::Failed(format!(
                "leadership moved meanwhile (to {:?}, term {})",
                m.current_leader, m.current_term
            )))
        }
        Err(_) => {
            return Err(NotHanded::Failed(format!(
                "no follower had all of the leader's log within {STEP:?}"
            )))
        }
    };
    // 3. The first that agrees stands for election.
    let mut declined = Vec::new();
    for target in candidates {
        let Some(addr) = node_addr(inner, target) else {
            continue;
        };
        let client = inner.peers.client(target, &addr);
        let request = PeerRequest::Campaign {
            leader: inner.id,
            term,
        };
        match client.call(&request, STEP).await {
            Ok(PeerResponse::Campaign(Ok(()))) => {}
            Ok(PeerResponse::Campaign(Err(why))) => {
                declined.push(format!("node {target} declined: {why}"));
                continue;
            }
            Ok(other) => {
                declined.push(format!("node {target} answered {}", other.kind()));
                continue;
            }
            Err(e) => {
                declined.push(format!("node {target}: {e}"));
                continue;
            }
        }
        let moved = inner
            .raft
            .wait(Some(STEP))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != inner.id),
                "leadership handed over",
            )
            .await;
        return match moved {
            Ok(m) => Ok(Handed {
                new_leader: m.current_leader.unwrap_or(target),
                term: m.current_term,
                took: started.elapsed(),
                writes_held: held_from.elapsed(),
            }),
            Err(_) => Err(NotHanded::Failed(format!(
                "node {target} stood for election but no new leader was known within {STEP:?}"
            ))),
        };
    }
    Err(NotHanded::Failed(format!(
        "no follower stood for election ({})",
        declined.join("; ")
    )))
}

/// The voters other than `me` whose matched log is this leader's last entry, lowest id first.
fn caught_up(m: &RaftMetrics<NodeId, Node>, me: NodeId) -> Vec<NodeId> {
    let Some(replication) = &m.replication else {
        return Vec::new();
    };
    let last = m.last_log_index;
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    replication
        .iter()
        .filter(|(id, matched)| {
            **id != me && voters.contains(id) && matched.map(|l| l.index) == last && last.is_some()
        })
        .map(|(id, _)| *id)
        .collect()
}

fn node_addr(inner: &Inner, id: NodeId) -> Option<String> {
    let metrics = inner.raft.metrics();
    let m = metrics.borrow();
    Some(m.membership_config.membership().get_node(&id)?.addr.clone())
}

/// A follower asked by `leader` (at `term`) to stand for election: it does so only if that is
/// still the leader it follows, it votes, it is not stopping and its clock can be trusted
/// (a leader whose clock is off could not stamp writes).
pub(super) async fn campaign(inner: &Inner, leader: NodeId, term: u64) -> Result<(), String> {
    {
        let metrics = inner.raft.metrics();
        let m = metrics.borrow();
        if m.current_leader != Some(leader) || m.current_term != term {
            return Err(format!(
                "this node follows {:?} at term {}, not node {leader} at term {term}",
                m.current_leader, m.current_term
            ));
        }
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == inner.id)
        {
            return Err("this node does not vote".to_owned());
        }
    }
    if inner.draining.is_cancelled() {
        return Err("this node is stopping too".to_owned());
    }
    super::write::now_checked(inner).map_err(|e| e.to_string())?;
    inner
        .raft
        .trigger()
        .elect()
        .await
        .map_err(|e| format!("raft stopped: {e}"))?;
    tracing::info!(
        leader,
        term,
        "standing for election at the leader's request"
    );
    Ok(())
}
