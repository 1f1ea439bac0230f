//! Heartbeats: each node pings its own agents and evicts, through the log, the ones that
//! stopped answering, and the sessions of its own that no connection holds any more (those
//! left by a previous run of the node, or by a connection that vanished).
//!
//! Nothing is removed on this node's say alone: an eviction is a committed
//! Evict{agent_id, session_id}, fenced by the session id, so a late eviction never removes
//! a newer session, and a node that cannot reach a quorum evicts nothing.

use futures::StreamExt;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::{Instant, MissedTickBehavior};

use super::{read, write, Inner};
use crate::proto::agent;
use crate::registry::{Command, ConnRef, Op, Outcome};
use crate::transport::frame::{read_stream_frame, write_frame, MAX_AGENT_FRAME};

/// Pings in flight at once, per node.
const MAX_CONCURRENT_PINGS: usize = 4096;

/// Silence is checked this many times per heartbeat interval.
const SILENCE_CHECKS_PER_INTERVAL: u32 = 4;

pub(super) fn spawn(inner: Arc<Inner>) {
    let tasks = inner.tasks.clone();
    tasks.spawn(ping_rounds(inner.clone()));
    tasks.spawn(silence_checks(inner));
}

/// Every interval: ping the agents, then sweep orphaned sessions.
async fn ping_rounds(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.config.heartbeat.interval());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut issued_last_round = 0;
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        ping_all(&inner).await;
        issued_last_round = sweep_orphans(&inner, issued_last_round).await;
    }
}

/// Apart from the pings, and more often than a round: an agent is evicted soon after its
/// agent_timeout of silence is over, not at the end of the round after that.
async fn silence_checks(inner: Arc<Inner>) {
    let every = inner.config.heartbeat.interval() / SILENCE_CHECKS_PER_INTERVAL;
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        evict_silent(&inner).await;
    }
}

/// Pings every registered agent once, spread evenly over the round: the pings start over
/// the first `interval - ping_timeout` of it, in connection order (so each agent keeps about
/// the same place in every round), and the last one is answered or timed out by the end of
/// the interval. A node with many agents thus sends a steady stream of pings, not a burst
/// at every tick whose last answers, on a busy machine, queue past the ping timeout and get
/// live agents evicted. An answer counts as a sign of life.
async fn ping_all(inner: &Arc<Inner>) {
    let mut agents = inner.conns.registered();
    agents.sort_unstable_by_key(|(conn_id, ..)| *conn_id);
    let timeout = inner.config.heartbeat.ping_timeout();
    let spread = inner.config.heartbeat.interval().saturating_sub(timeout);
    let start = Instant::now();
    let n = agents.len().max(1) as f64;
    futures::stream::iter(agents.into_iter().enumerate())
        .then(|(i, agent)| async move {
            // Absolute deadlines: timer granularity makes some pings late, never the round.
            tokio::time::sleep_until(start + spread.mul_f64(i as f64 / n)).await;
            agent
        })
        .for_each_concurrent(
            MAX_CONCURRENT_PINGS,
            |(conn_id, agent_id, conn, _)| async move {
                inner.counters.pings_sent.fetch_add(1, Ordering::Relaxed);
                match tokio::time::timeout(timeout, ping(&conn)).await {
                    Ok(Ok(())) => inner.conns.touch(conn_id),
                    Ok(Err(e)) => {
                        inner.counters.pings_missed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(agent_id, error = %e, "ping failed");
                    }
                    Err(_) => {
                        inner.counters.pings_missed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(agent_id, "ping timed out");
                    }
                }
            },
        )
        .await;
}

async fn ping(conn: &quinn::Connection) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = agent::request(
        agent::PING_AGENT,
        None,
        json!({ "timestamp": super::duties::unix_now_f64() })
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    write_frame(&mut send, &req)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = read_stream_frame(&mut recv, MAX_AGENT_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    agent::parse_response(&answer).map(|_| ())
}

/// Commits the eviction of `agent_id`'s session `session_id`.
pub(super) async fn evict(inner: &Inner, agent_id: &str, session_id: u64, why: &str) {
    let at = match write::now_checked(inner) {
        Ok(at) => at,
        Err(e) => {
            tracing::warn!(agent_id, session_id, error = %e, "eviction not proposed");
            return;
        }
    };
    inner
        .counters
        .evictions_proposed
        .fetch_add(1, Ordering::Relaxed);
    let cmd = Command {
        at,
        op: Op::Evict {
            agent_id: agent_id.to_owned(),
            session_id,
        },
    };
    match write::write(inner, cmd).await {
        Ok(w) => {
            if matches!(w.response, Ok(Outcome::SessionEnded { ended: Some(_) })) {
                inner
                    .counters
                    .evictions_committed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(agent_id, session_id, reason = why, "evicted");
            }
        }
        Err(e) => tracing::warn!(agent_id, session_id, error = %e, "eviction not committed"),
    }
}

/// Evicts the agents silent for longer than `agent_timeout`.
async fn evict_silent(inner: &Arc<Inner>) {
    let limit = inner.config.heartbeat.agent_timeout();
    let now = std::time::Instant::now();
    let silent: Vec<(u64, String)> = inner
        .conns
        .registered()
        .into_iter()
        .filter(|(_, _, _, seen)| now.saturating_duration_since(*seen) > limit)
        .map(|(id, agent, _, _)| (id, agent))
        .collect();
    futures::stream::iter(silent)
        .for_each_concurrent(MAX_CONCURRENT_PINGS, |(conn_id, agent_id)| async move {
            let me = ConnRef {
                node_id: inner.id,
                conn_id,
            };
            let session = inner
                .state
                .read()
                .state
                .session(&agent_id)
                .filter(|s| s.conn == me)
                .map(|s| s.session_id);
            match session {
                // The applied eviction closes the connection (see the session closer).
                Some(session_id) => evict(inner, &agent_id, session_id, "no sign of life").await,
                None => {
                    // Its session is already gone; just let go of the connection.
                    if let Some((conn, requests)) = inner.conns.detach(conn_id, &agent_id) {
                        super::agent_service::close_when_answered(
                            inner,
                            conn,
                            requests,
                            super::close_code::EVICTED,
                            "no sign of life; register again".to_owned(),
                        );
                    }
                }
            }
        })
        .await;
}

/// Evicts this node's sessions that no connection of this run holds: sessions left by a
/// previous run (after a restart, once caught up) or by connections that vanished. Only
/// sessions already applied by the previous round count, so a registration whose connection
/// is being recorded right now is not mistaken for an orphan. Returns the highest id issued
/// so far (the next round's watermark).
async fn sweep_orphans(inner: &Arc<Inner>, issued_last_round: u64) -> u64 {
    // Caught up first: the tables must include every acknowledged registration.
    if read::barrier(inner).await.is_err() {
        return issued_last_round;
    }
    let (applied, orphans): (u64, Vec<(String, u64)>) = {
        let guard = inner.state.read();
        // Session ids are command ids: every id issued so far is at most this.
        let applied = guard
            .state
            .last_issued_id(guard.last_applied.map_or(0, |l| l.index));
        let orphans = guard
            .state
            .tables()
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.conn.node_id == inner.id
                    && s.session_id <= issued_last_round
                    && !inner.conns.contains(s.conn.conn_id)
            })
            .map(|(id, s)| (id.clone(), s.session_id))
            .collect();
        (applied, orphans)
    };
    futures::stream::iter(orphans)
        .for_each_concurrent(MAX_CONCURRENT_PINGS, |(agent_id, session_id)| async move {
            evict(inner, &agent_id, session_id, "no connection holds it").await;
        })
        .await;
    applied
}

/// The leader's duty: evict the sessions of a node it has not heard from for
/// `agent_timeout`. A newly elected leader first gives every node that long to be heard
/// (learned from etcd issue 15247: a leader must not revoke what it had no chance to see
/// renewed).
pub(super) async fn evict_lost_nodes(inner: &Inner, leader_since: Instant) {
    let limit = inner.config.heartbeat.agent_timeout();
    let now = Instant::now();
    if now.saturating_duration_since(leader_since) <= limit {
        return;
    }
    // Members, and any node that still holds sessions (a node removed from the membership
    // while dead leaves its sessions behind; nobody will hear from it again).
    let nodes: std::collections::BTreeSet<u64> = {
        let m = inner.raft.metrics().borrow().membership_config.clone();
        let mut ids: std::collections::BTreeSet<u64> =
            m.membership().nodes().map(|(id, _)| *id).collect();
        ids.extend(
            inner
                .state
                .read()
                .state
                .tables()
                .sessions
                .values()
                .map(|s| s.conn.node_id),
        );
        ids
    };
    for node_id in nodes.into_iter().filter(|id| *id != inner.id) {
        let heard = inner
            .peers
            .last_ok(node_id)
            .filter(|t| *t >= leader_since)
            .unwrap_or(leader_since);
        if now.saturating_duration_since(heard) <= limit {
            continue;
        }
        let silent_ms = now.saturating_duration_since(heard).as_millis() as u64;
        match evict_node(inner, node_id).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                node_id,
                sessions = n,
                silent_ms,
                "evicted the sessions of a lost node"
            ),
            Err(e) => {
                tracing::warn!(node_id, error = %e, "could not evict the sessions of a lost node")
            }
        }
    }
}

/// Ends every session `node_id` holds, registered up to now, with one EvictNode through the
/// log. Returns how many sessions it ended (0 without proposing when there are none).
async fn evict_node(inner: &Inner, node_id: u64) -> Result<usize, write::WriteError> {
    let (applied, has_sessions) = {
        let guard = inner.state.read();
        // Session ids are command ids: every id issued so far is at most this.
        let applied = guard
            .state
            .last_issued_id(guard.last_applied.map_or(0, |l| l.index));
        let has = guard
            .state
            .tables()
            .sessions
            .values()
            .any(|s| s.conn.node_id == node_id);
        (applied, has)
    };
    if !has_sessions {
        return Ok(0);
    }
    let at = write::now_checked(inner).map_err(|e| write::WriteError::Refused(e.to_string()))?;
    inner
        .counters
        .evictions_proposed
        .fetch_add(1, Ordering::Relaxed);
    let cmd = Command {
        at,
        op: Op::EvictNode {
            node_id,
            max_session_id: applied,
        },
    };
    let w = write::write(inner, cmd).await?;
    let removed = match &w.response {
        Ok(Outcome::NodeEvicted { removed }) => removed.len(),
        _ => 0,
    };
    inner
        .counters
        .evictions_committed
        .fetch_add(removed as u64, Ordering::Relaxed);
    Ok(removed)
}

/// On a graceful shutdown, once the agents were told to move: hands this node's sessions
/// back, so the agents find their ids free wherever they reconnect. Bounded by the write
/// timeout; if it fails (no quorum), the leader evicts them later as those of a lost node.
pub(super) async fn release_own_sessions(inner: &Inner) {
    match evict_node(inner, inner.id).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(sessions = n, "handed this node's sessions back"),
        Err(e) => tracing::warn!(error = %e, "could not hand this node's sessions back"),
    }
}
