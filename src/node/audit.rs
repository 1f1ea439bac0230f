//! The audit trail: one log line (target `audit`) for every identity event this node
//! proposed — claims, registrations and takeovers, releases, revocations, evictions, key
//! changes — with the agent id, the node, the session id or serial and the outcome.
//!
//! Only identifiers are logged: never a secret, a signature or a certificate hash.

use super::write::{WriteError, Written};
use crate::registry::{Command, Op, Outcome};

/// Logs the outcome of proposing `cmd` from node `node_id`.
pub(super) fn record(node_id: u64, cmd: &Command, result: &Result<Written, WriteError>) {
    let (mut event, agent_id, mut session_id, mut serial) = describe(&cmd.op);
    let mut detail = String::new();
    let (index, outcome) = match result {
        Ok(w) => match &w.response {
            Ok(o) => {
                match o {
                    Outcome::Claimed { certificate } => serial = Some(certificate.serial),
                    Outcome::ClaimRepeated { certificate } => {
                        serial = Some(certificate.serial);
                        detail = "repeated: the same claim token, the same certificate".into()
                    }
                    Outcome::Registered {
                        session_id: s,
                        replaced,
                    } => {
                        session_id = Some(*s);
                        if let Some(old) = replaced {
                            event = "takeover";
                            detail = format!(
                                "replaced session {} on node {}",
                                old.session_id, old.conn.node_id
                            );
                        }
                    }
                    Outcome::SessionEnded { ended: None } => {
                        detail = "no such session (fenced)".into()
                    }
                    Outcome::NodeEvicted { removed } => {
                        detail = format!("{} sessions", removed.len())
                    }
                    Outcome::ClaimsForgotten { forgotten, more } => {
                        detail = format!(
                            "{forgotten} claims{}",
                            if *more { ", more due" } else { "" }
                        )
                    }
                    Outcome::Revoked {
                        serial: s, newly, ..
                    } => {
                        serial = Some(*s);
                        if !newly {
                            detail = "already revoked".into()
                        }
                    }
                    Outcome::Released { serial: s, .. } => serial = Some(*s),
                    Outcome::KeyRotated { key_id } | Outcome::KeyRetired { key_id } => {
                        detail = format!("key {key_id}")
                    }
                    Outcome::KeyringInitialized { key_id, created } => {
                        detail = format!(
                            "key {key_id}{}",
                            if *created { "" } else { " (already present)" }
                        )
                    }
                    _ => {}
                }
                (Some(w.index), "ok".to_owned())
            }
            Err(e) => (Some(w.index), format!("refused: {e}")),
        },
        Err(e) => (None, format!("failed: {e}")),
    };
    tracing::info!(
        target: "audit",
        event,
        node_id,
        agent_id = agent_id.unwrap_or(""),
        session_id,
        serial,
        index,
        outcome = %outcome,
        detail = %detail,
        "identity event"
    );
}

/// Event name and the identifiers a command carries.
fn describe(op: &Op) -> (&'static str, Option<&str>, Option<u64>, Option<u64>) {
    match op {
        Op::Claim(claim) | Op::ClaimWithToken { claim, .. } => (
            if claim.force { "reissue" } else { "claim" },
            Some(&claim.agent_id),
            None,
            None,
        ),
        Op::Release { certificate, .. } => (
            "release",
            Some(&certificate.agent_id),
            None,
            Some(certificate.serial),
        ),
        Op::Register { agent_id, .. } => ("register", Some(agent_id), None, None),
        Op::Unregister {
            agent_id,
            session_id,
        } => ("unregister", Some(agent_id), Some(*session_id), None),
        Op::Evict {
            agent_id,
            session_id,
        } => ("evict", Some(agent_id), Some(*session_id), None),
        Op::EvictNode { .. } => ("evict_node", None, None, None),
        Op::RevokeCertificate { certificate, .. } => (
            "revoke",
            Some(&certificate.agent_id),
            None,
            Some(certificate.serial),
        ),
        Op::RevokeAgent { agent_id } => ("revoke", Some(agent_id), None, None),
        Op::InitKeyring { .. } => ("keyring_init", None, None, None),
        Op::RotateKey { .. } => ("key_rotate", None, None, None),
        Op::RetireKey { .. } => ("key_retire", None, None, None),
        // Batches are formed below the audit log: each command in one was recorded alone.
        Op::Batch(_) => ("batch", None, None, None),
        Op::ForgetExpiredClaims => ("forget_expired_claims", None, None, None),
    }
}
