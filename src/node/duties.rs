//! Work driven by Raft's state: installing the first signing key of a new cluster (the
//! leader), evicting the sessions of lost nodes (the leader), forgetting claims long expired
//! (the leader), and stopping service when Raft stops on a fault of its own (every node).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::ServerState;

use super::Inner;
use crate::identity::Secret;
use crate::registry::{Command, Op, Outcome, EXPIRY_GRACE_SECS};

/// Wall clock as fractional Unix seconds (ping timestamps, renewal schedule).
pub fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(super) fn spawn(inner: Arc<Inner>) {
    spawn_lost_node_watch(inner.clone());
    spawn_expired_claims_sweep(inner.clone());
    // One task for what follows Raft's metrics: they change at every commit and apply, and
    // each task watching them is woken each time.
    let tasks = inner.tasks.clone();
    tasks.spawn(async move {
        let mut metrics = inner.raft.metrics();
        loop {
            let (leads, fault) = {
                let m = metrics.borrow_and_update();
                let fault = m.running_state.as_ref().err().map(ToString::to_string);
                (m.state == ServerState::Leader, fault)
            };
            if let Some(fault) = fault {
                stop_serving(&inner, fault);
                break;
            }
            if leads && inner.state.read().state.keyring().is_empty() {
                init_keyring(&inner).await;
            }
            tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                changed = metrics.changed() => if changed.is_err() {
                    stop_serving(&inner, "Raft's metrics ended".to_owned());
                    break;
                },
            }
        }
    });
}

async fn init_keyring(inner: &Inner) {
    // The secret comes from the configured file or the OS random source, here on the
    // proposer: apply must not draw randomness. InitKeyring is a no-op if a key exists, so a
    // second leader racing this one changes nothing.
    let secret = inner
        .initial_secret
        .clone()
        .unwrap_or_else(Secret::generate);
    let at = match super::write::now_checked(inner) {
        Ok(at) => at,
        Err(e) => {
            // Tried again at the next change of Raft's metrics: the clock's own warning says
            // what is wrong, once.
            tracing::debug!(error = %e, "signing keyring not initialised");
            return;
        }
    };
    let cmd = Command {
        at,
        op: Op::InitKeyring { secret },
    };
    match super::write::write(inner, cmd).await {
        Ok(w) => {
            tracing::info!(index = w.index, result = ?w.response, "signing keyring initialised")
        }
        Err(e) => tracing::warn!(error = %e, "could not initialise the signing keyring yet"),
    }
}

/// Every heartbeat interval, while leading: evict the sessions of nodes not heard from.
fn spawn_lost_node_watch(inner: Arc<Inner>) {
    let tasks = inner.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(inner.config.heartbeat.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // (term, since when) of this node's current leadership.
        let mut leadership: Option<(u64, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let (state, term) = {
                let m = inner.raft.metrics();
                let m = m.borrow();
                (m.state, m.current_term)
            };
            if state != ServerState::Leader {
                leadership = None;
                continue;
            }
            let since = match leadership {
                Some((t, since)) if t == term => since,
                _ => {
                    let now = tokio::time::Instant::now();
                    leadership = Some((term, now));
                    now
                }
            };
            super::heartbeat::evict_lost_nodes(&inner, since).await;
        }
    });
}

/// How often the leader looks whether a claim has come due to be forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// While leading: forgets the claims whose certificates expired over `EXPIRY_GRACE_SECS` ago
/// and that no session holds ([`Op::ForgetExpiredClaims`]), once a second as they come due,
/// and command after command while more are due (a backlog after an upgrade). Without it
/// every id ever claimed would keep its row, in every node's memory, snapshot and backup.
fn spawn_expired_claims_sweep(inner: Arc<Inner>) {
    let tasks = inner.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut held_back = None;
            while !inner.draining.is_cancelled() && claims_due(&inner) {
                // A member that cannot read the entry would stop following at it.
                if let Err(why) = super::builds::members_read(&inner, FORGET.log_format()) {
                    held_back = Some(why);
                    break;
                }
                if !forget_expired_claims(&inner).await {
                    break;
                }
            }
            let before = std::mem::replace(
                &mut *inner
                    .forgetting_held_back
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
                held_back.clone(),
            );
            // Said once each time the reason changes.
            if let Some(why) = held_back.filter(|why| before.as_ref() != Some(why)) {
                tracing::warn!(
                    reason = %why,
                    "expired claims are kept until every member reads the entry that forgets them"
                );
            }
        }
    });
}

const FORGET: Op = Op::ForgetExpiredClaims;

/// Why the last sweep kept expired claims that were due to be forgotten, if it did: a member
/// does not read the entry yet (mid-upgrade).
pub(super) fn forgetting_held_back(inner: &Inner) -> Option<String> {
    inner
        .forgetting_held_back
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Whether this node leads and, by its tables and clock, some claim is due to be forgotten.
fn claims_due(inner: &Inner) -> bool {
    if inner.raft.metrics().borrow().state != ServerState::Leader {
        return false;
    }
    let Some(first) = inner.state.read().state.first_unheld_expiry() else {
        return false;
    };
    // An untrusted clock proposes nothing; the clock's own warning says why.
    super::write::now_checked(inner).is_ok_and(|now| first.saturating_add(EXPIRY_GRACE_SECS) < now)
}

/// Proposes one [`Op::ForgetExpiredClaims`] (the audit trail records it); whether more are
/// due at once.
async fn forget_expired_claims(inner: &Inner) -> bool {
    let Ok(at) = super::write::now_checked(inner) else {
        return false;
    };
    let cmd = Command { at, op: FORGET };
    match super::write::write(inner, cmd).await {
        Ok(w) => matches!(w.response, Ok(Outcome::ClaimsForgotten { more: true, .. })),
        // Tried again at the next tick, by whichever node leads then.
        Err(e) => {
            tracing::debug!(error = %e, "expired claims not forgotten yet");
            false
        }
    }
}

/// When Raft stops on its own (a log or state-machine write failed, a fault in openraft):
/// this node can no longer commit, and its applied tables no longer change, so a local
/// validation here would go on answering from them. The node stops serving agents at once,
/// as when it drains: their connections close with 0x103 (move to another node) and new ones
/// are closed unread; new requests are answered "node is shutting down". Then it reports the
/// fault ([`super::Node::fault`]); `agentreg node` exits non-zero on it, for its supervisor
/// to restart it. Nothing to do if Raft stopped because the node is stopping.
fn stop_serving(inner: &Inner, fault: String) {
    if inner.shutdown.is_cancelled() {
        return;
    }
    tracing::error!(
        node_id = inner.id,
        error = %fault,
        "raft stopped on a fault; this node stops serving (agents are told to move)"
    );
    inner.draining.cancel();
    inner.conns.close_all(
        quinn::VarInt::from_u32(super::close_code::SHUTTING_DOWN),
        crate::proto::agent::FAULT_REASON.as_bytes(),
    );
    inner.fault.send_replace(Some(fault));
}
