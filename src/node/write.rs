//! The write path: propose on the leader, or forward to it over the peer link.

use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::time::Instant;

use super::clock::ClockSkew;
use super::Inner;
use crate::proto::agent::{self, ErrorCode, Refusal};
use crate::raft::network::{ForwardError, PeerError};
use crate::raft::types::NodeId;
use crate::registry::{Command, RegistryError, Response};

/// A committed and applied write.
#[derive(Debug, Clone)]
pub struct Written {
    /// Log index of the entry.
    pub index: u64,
    /// What the state machine answered (a refusal is a committed no-op).
    pub response: Response,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// Certainly not applied.
    #[error("no leader could take the write within {0:?}; the cluster may have lost its quorum")]
    NoLeader(Duration),
    /// May or may not have been applied: the answer was lost.
    #[error("write outcome unknown: {0}")]
    Unknown(String),
    #[error("node is shutting down")]
    ShuttingDown,
    /// Certainly not applied: the leader could not read the write (during a rolling upgrade,
    /// a leader of an older build that does not know it).
    #[error("not applied: {0}")]
    Refused(String),
}

/// How long to wait between attempts while no leader is known.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// This node's time, in seconds, to stamp a command with or to judge a certificate by,
/// unless its clock disagrees with its peers' (see `clock.rs`).
pub(super) fn now_checked(inner: &Inner) -> Result<u64, ClockSkew> {
    inner.clock.checked_secs(|| {
        let metrics = inner.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().voter_ids().count()
    })
}

/// The refusal an agent or operator reads when this node's clock is off.
pub(super) fn skewed(e: &ClockSkew) -> Refusal {
    Refusal::new(ErrorCode::ClockSkew, e.to_string())
}

/// Commits `op` stamped with this node's clock; the registry's answer, or the refusal an
/// agent or operator reads for why there is none.
pub(super) async fn commit(
    inner: &Inner,
    op: crate::registry::Op,
) -> Result<crate::registry::Outcome, Refusal> {
    let cmd = Command {
        at: now_checked(inner).map_err(|e| skewed(&e))?,
        op,
    };
    match write(inner, cmd).await {
        Ok(w) => w
            .response
            .map_err(|e| Refusal::new(registry_code(&e), e.to_string())),
        Err(e) => Err(unanswered(&e)),
    }
}

/// The refusal an agent or operator reads for a write that got no answer. Its first words
/// are the protocol's (clients of builds before codes read them, `ErrorCode::of_answer`).
fn unanswered(e: &WriteError) -> Refusal {
    match e {
        WriteError::NoLeader(_) => Refusal::new(
            ErrorCode::Unavailable,
            format!("{}: {e}", agent::UNAVAILABLE_PREFIX),
        ),
        WriteError::ShuttingDown => Refusal::new(
            ErrorCode::ShuttingDown,
            format!("{e}; reconnect to another node"),
        ),
        WriteError::Unknown(_) => Refusal::new(ErrorCode::OutcomeUnknown, e.to_string()),
        WriteError::Refused(_) => Refusal::new(ErrorCode::NotApplied, e.to_string()),
    }
}

/// The code of a refusal the registry answered.
pub(super) fn registry_code(e: &RegistryError) -> ErrorCode {
    match e {
        RegistryError::InvalidAgentId(_) => ErrorCode::BadRequest,
        RegistryError::AlreadyClaimed { .. } => ErrorCode::AlreadyClaimed,
        RegistryError::ForceWithoutProof { .. } => ErrorCode::ForceNeedsCertificate,
        RegistryError::Certificate(why) => ErrorCode::of_invalid(*why),
        RegistryError::CertificateRequired { .. } => ErrorCode::CertificateRequired,
        RegistryError::AlreadyConnected { .. } => ErrorCode::AlreadyConnected,
        RegistryError::NotClaimed { .. } => ErrorCode::NotClaimed,
        RegistryError::NoSigningKey => ErrorCode::NoSigningKey,
        RegistryError::MetadataTooLarge(_) => ErrorCode::MetadataTooLarge,
        // An operator's keyring command refused on its merits (never an agent's request).
        RegistryError::Keyring(_) => ErrorCode::BadRequest,
        // The node's own settings or its own batching, never a request's doing.
        RegistryError::BadTtl | RegistryError::NestedBatch => ErrorCode::Internal,
    }
}

/// Commits `cmd` (forwarding it to the leader if need be) and records it in the audit log.
pub(super) async fn write(inner: &Inner, cmd: Command) -> Result<Written, WriteError> {
    let result = write_unaudited(inner, cmd.clone()).await;
    super::audit::record(inner.id, &cmd, &result);
    result
}

async fn write_unaudited(inner: &Inner, cmd: Command) -> Result<Written, WriteError> {
    let budget = inner.config.write_timeout();
    let deadline = Instant::now() + budget;
    // A follower that knows the leader forwards straight away; proposing here first would
    // only be told the same, one round through Raft later.
    let mut known_leader = super::read::leader_elsewhere(&inner.raft, inner.id);
    let mut redirected = false;
    loop {
        let leader = match known_leader.take() {
            Some(leader) => Some(leader),
            None => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match propose_locally(inner, cmd.clone(), remaining).await {
                    Ok(w) => return Ok(w),
                    Err(Attempt::Elsewhere(leader)) => leader,
                    Err(Attempt::Failed(e)) => return Err(e),
                }
            }
        };
        if let Some((leader_id, addr)) = leader.filter(|(id, _)| *id != inner.id) {
            let client = inner.peers.client(leader_id, &addr);
            match inner.forwarder.forward(client, cmd.clone(), deadline).await {
                Ok(Ok((index, response))) => {
                    // Read your writes: answer only once this node has applied the entry
                    // too, so the agent's next request here sees it.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if let Err(e) = inner
                        .raft
                        .wait(Some(left))
                        .applied_index_at_least(Some(index), "forwarded write applied locally")
                        .await
                    {
                        tracing::debug!(index, error = %e, "forwarded write not yet applied here");
                    }
                    return Ok(Written { index, response });
                }
                Ok(Err(ForwardError::NotLeader { leader })) => {
                    // Leadership moved (handed over, say): go to the one named at once,
                    // once; after that, wait for the cluster to settle.
                    if !redirected && leader.as_ref().is_some_and(|(id, _)| *id != leader_id) {
                        redirected = true;
                        // (This node itself: propose here.)
                        known_leader = leader.filter(|(id, _)| *id != inner.id);
                        continue;
                    }
                }
                Ok(Err(ForwardError::Unknown(e))) => return Err(WriteError::Unknown(e)),
                // Not delivered: safe to try again once a leader is known.
                Err(PeerError::Unreachable { .. }) => {}
                Err(e @ PeerError::Refused { .. }) => {
                    return Err(WriteError::Refused(e.to_string()))
                }
                Err(PeerError::Timeout { .. }) if Instant::now() >= deadline => {
                    return Err(WriteError::Unknown(format!(
                        "leader {leader_id} did not answer within {budget:?}"
                    )))
                }
                Err(e) => return Err(WriteError::Unknown(e.to_string())),
            }
        }
        if Instant::now() >= deadline {
            return Err(WriteError::NoLeader(budget));
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return Err(WriteError::ShuttingDown),
            _ = tokio::time::sleep(RETRY_PAUSE) => {}
        }
    }
}

enum Attempt {
    /// This node is not the leader; the leader as far as it knows.
    Elsewhere(Option<(NodeId, String)>),
    Failed(WriteError),
}

/// Proposes `cmd` if this node leads and waits up to `budget` for it to be applied.
///
/// openraft answers ForwardToLeader either before proposing or after the entry was
/// truncated as a conflict: in both cases it was not applied, so a retry is safe. An entry
/// that is neither committed nor truncated within `budget` (a leader cut off from its
/// quorum) has an unknown outcome.
async fn propose_locally(
    inner: &Inner,
    cmd: Command,
    budget: Duration,
) -> Result<Written, Attempt> {
    let result = match tokio::time::timeout(budget, inner.proposer.propose(cmd)).await {
        Ok(Some(r)) => r,
        Ok(None) if inner.shutdown.is_cancelled() => {
            return Err(Attempt::Failed(WriteError::ShuttingDown))
        }
        Ok(None) => {
            return Err(Attempt::Failed(WriteError::Unknown(
                "the write was proposed but its answer was lost".into(),
            )))
        }
        Err(_) => {
            return Err(Attempt::Failed(WriteError::Unknown(format!(
                "not committed within {budget:?}; this node may have lost its quorum"
            ))))
        }
    };
    match result {
        Ok((index, response)) => Ok(Written { index, response }),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(Attempt::Elsewhere(
            f.leader_id.zip(f.leader_node.map(|n| n.addr)),
        )),
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Err(Attempt::Failed(WriteError::Unknown(e.to_string())))
        }
        Err(RaftError::Fatal(e)) => {
            if inner.shutdown.is_cancelled() {
                Err(Attempt::Failed(WriteError::ShuttingDown))
            } else {
                Err(Attempt::Failed(WriteError::Unknown(format!(
                    "raft stopped: {e}"
                ))))
            }
        }
    }
}

/// Serves a write forwarded by a follower: propose it here if this node leads.
pub(super) async fn serve_forward(
    inner: &Inner,
    cmd: Command,
) -> Result<(u64, Response), ForwardError> {
    match propose_locally(inner, cmd, inner.config.write_timeout()).await {
        Ok(w) => Ok((w.index, w.response)),
        Err(Attempt::Elsewhere(leader)) => Err(ForwardError::NotLeader { leader }),
        Err(Attempt::Failed(e)) => Err(ForwardError::Unknown(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claimant (`AgentClient`) sends a claim again, with its claim token, on the codes
    /// that say its outcome is unknown or that no quorum took it; never on the others. A
    /// client of a build before codes reads the same from the texts.
    #[test]
    fn unanswered_writes_say_which_are_worth_repeating() {
        use ErrorCode::*;
        let cases = [
            (
                WriteError::Unknown("x".into()),
                OutcomeUnknown,
                OutcomeUnknown,
            ),
            (
                WriteError::NoLeader(Duration::from_secs(5)),
                Unavailable,
                Unavailable,
            ),
            (WriteError::Refused("x".into()), NotApplied, Unrecognized),
            (WriteError::ShuttingDown, ShuttingDown, ShuttingDown),
        ];
        for (e, code, from_text) in cases {
            let r = unanswered(&e);
            assert_eq!(r.code, code, "{e}");
            assert_eq!(ErrorCode::of_answer(None, &r.error), from_text, "{e}");
        }
        assert!(OutcomeUnknown.worth_repeating() && Unavailable.worth_repeating());
        assert!(!NotApplied.worth_repeating() && !ShuttingDown.worth_repeating());
        assert_eq!(
            unanswered(&WriteError::ShuttingDown).error,
            agent::SHUTTING_DOWN_ERROR,
            "sent again on the next connection by the client's transport"
        );
    }

    /// What the node answers for each refusal of the registry is what docs/protocol.md's
    /// error table says: the refusal's text is the example in its code's row (with the
    /// table's X and N for the agent id and numbers).
    #[test]
    fn registry_refusals_carry_the_code_and_text_the_protocol_documents() {
        use crate::identity::Invalid;
        let doc = include_str!("../../docs/protocol.md");
        let x = || "X".to_owned();
        let mut refusals = vec![
            RegistryError::InvalidAgentId("...".into()),
            RegistryError::AlreadyClaimed { agent_id: x() },
            RegistryError::ForceWithoutProof { agent_id: x() },
            RegistryError::CertificateRequired { agent_id: x() },
            RegistryError::AlreadyConnected {
                agent_id: x(),
                node_id: 7,
            },
            RegistryError::NotClaimed { agent_id: x() },
            RegistryError::NoSigningKey,
            RegistryError::MetadataTooLarge(7),
        ];
        refusals.extend(
            [
                Invalid::Expired,
                Invalid::BadSignature,
                Invalid::OtherAgent,
                Invalid::Revoked,
                Invalid::UnknownKey,
                Invalid::RetiredKey,
                Invalid::Superseded,
                Invalid::NotClaimed,
            ]
            .map(RegistryError::Certificate),
        );
        for e in refusals {
            let code = registry_code(&e);
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{code}` |")))
                .unwrap_or_else(|| panic!("no row for {code}"));
            let text = e.to_string().replace('7', "N");
            assert!(
                row.contains(&format!("`{text}`")),
                "{code}: {text:?} is not in {row}"
            );
        }
        // The node's own settings and operator commands: never an agent's doing.
        for e in [RegistryError::BadTtl, RegistryError::NestedBatch] {
            assert_eq!(registry_code(&e), ErrorCode::Internal);
        }
    }
}
