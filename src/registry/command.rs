//! The commands of the replicated log and their typed results.
//!
//! Every command carries `at`, the proposer's wall clock in Unix seconds: time enters the
//! state machine only through this field, so apply stays deterministic.

use serde::{Deserialize, Serialize};

use crate::identity::{Certificate, Invalid, KeyringError, Secret};

/// Identifies one agent connection: the node it is on and that node's id for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnRef {
    pub node_id: u64,
    pub conn_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Proposer's wall clock, Unix seconds.
    pub at: u64,
    pub op: Op,
}

/// What a claim asks for. (`Op::Claim` held these as its own fields; a newtype variant of
/// this struct encodes byte for byte as that struct variant did.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimArgs {
    pub agent_id: String,
    pub ttl_secs: u64,
    pub force: bool,
    pub proof: Option<Certificate>,
    /// The connection asking, if any: a live session on another connection blocks the claim.
    pub conn: Option<ConnRef>,
}

/// SHA-256 of a claim token: the secret a claimant sends with a claim so that the same
/// claim sent again (its answer was lost) gets the same certificate. Only the hash enters
/// the log and the tables, so neither can be used to repeat someone else's claim.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> TokenHash {
        use sha2::{Digest, Sha256};
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Claim `agent_id` (or re-issue its certificate with `force` and a valid `proof`).
    Claim(ClaimArgs),
    /// Give up a claim; the certificate is revoked.
    Release {
        certificate: Certificate,
        /// The connection asking, if any: its own session ends quietly (it gets the answer).
        by: Option<ConnRef>,
    },
    /// Open a session for `agent_id` on `conn`. Its session id is the command id (see `Tables::next_id`).
    Register {
        agent_id: String,
        conn: ConnRef,
        /// The agent's metadata as JSON text.
        metadata: String,
        certificate: Option<Certificate>,
        force_reconnect: bool,
        /// Whether the proposing node lets `force_reconnect` without a certificate take over
        /// a session of an unclaimed id.
        allow_uncertified_takeover: bool,
    },
    /// The agent ends its own session.
    Unregister { agent_id: String, session_id: u64 },
    /// A node evicts a session that stopped answering or whose connection is gone.
    Evict { agent_id: String, session_id: u64 },
    /// Evict every session of `node_id` registered at or before `max_session_id`.
    EvictNode { node_id: u64, max_session_id: u64 },
    /// Revoke the certificate presented (whoever holds a certificate may revoke it).
    RevokeCertificate {
        certificate: Certificate,
        /// The connection asking, if any: its own session ends quietly (it gets the answer).
        by: Option<ConnRef>,
    },
    /// Operator action: revoke the current certificate of `agent_id` and free the id.
    RevokeAgent { agent_id: String },
    /// Installs the first signing key; does nothing when the keyring already has one.
    InitKeyring { secret: Secret },
    /// Makes a new signing key active; its id is `k<command id>`.
    RotateKey { secret: Secret },
    /// Retires a validating key.
    RetireKey { key_id: String },
    /// Several commands in one log entry (group commit): applied in order, each answered as
    /// if it had its own entry, with consecutive ids. Never nested.
    Batch(Vec<Command>),
    /// A claim with the hash of its claim token: if the id's live claim was made with the
    /// same token, the answer is that claim's certificate again and nothing changes
    /// ([`Outcome::ClaimRepeated`]); otherwise it is a claim like [`Op::Claim`] whose token
    /// is kept while its certificate is the id's current one. Last, so that the variants
    /// before it keep their tags: builds before it cannot read it (see docs/operations.md).
    ClaimWithToken { claim: ClaimArgs, token: TokenHash },
    /// Forgets claims whose certificates expired more than `EXPIRY_GRACE_SECS` before `at`
    /// and that no session holds (at most `MAX_FORGOTTEN_PER_COMMAND`, the earliest first):
    /// their ids were already free, and the tables would otherwise keep a row for every id
    /// ever claimed. Proposed by the leader while some are due ([`Outcome::ClaimsForgotten`]
    /// says whether more are). Last, like `ClaimWithToken`: builds before it cannot read it,
    /// so the leader writes it only once every member has said it reads it (`log_format` 2;
    /// node/builds.rs).
    ForgetExpiredClaims,
}

impl Command {
    /// Whether this is a claim with a claim token (which builds before it cannot read).
    pub fn has_claim_token(&self) -> bool {
        matches!(self.op, Op::ClaimWithToken { .. })
    }

    /// The same command without its claim token, for a leader of an earlier build: a plain
    /// claim (not repeatable). Any other command is returned as it is.
    pub fn without_claim_token(self) -> Command {
        match self.op {
            Op::ClaimWithToken { claim, .. } => Command {
                at: self.at,
                op: Op::Claim(claim),
            },
            _ => self,
        }
    }

    /// An upper bound on the command's encoded size in the log (bincode's standard
    /// configuration), to keep batches bounded without encoding them. Every integer, tag,
    /// flag and length prefix takes at most [`VARINT_MAX`] bytes; strings and secrets add
    /// their length. (It was a flat 512 bytes a command, over ten times a claim's real size,
    /// which cut entries at 64 claims where the byte limit allows several hundred.)
    pub fn size_hint(&self) -> usize {
        const N: usize = VARINT_MAX;
        let text = |s: &str| N + s.len();
        let cert = |c: &Certificate| {
            text(&c.agent_id)
                + text(&c.key_id)
                + text(&c.certificate_hash)
                + text(&c.signature)
                + 3 * N
        };
        let opt_cert = |c: &Option<Certificate>| 1 + c.as_ref().map_or(0, cert);
        let opt_conn = 1 + 2 * N;
        let claim_hint = |c: &ClaimArgs| text(&c.agent_id) + N + 1 + opt_cert(&c.proof) + opt_conn;
        let op = match &self.op {
            Op::Claim(claim) => claim_hint(claim),
            Op::ClaimWithToken { claim, .. } => claim_hint(claim) + 32,
            Op::Release { certificate, .. } | Op::RevokeCertificate { certificate, .. } => {
                cert(certificate) + opt_conn
            }
            Op::Register {
                agent_id,
                metadata,
                certificate,
                ..
            } => text(agent_id) + 2 * N + text(metadata) + opt_cert(certificate) + 2,
            Op::Unregister { agent_id, .. } | Op::Evict { agent_id, .. } => text(agent_id) + N,
            Op::EvictNode { .. } => 2 * N,
            Op::RevokeAgent { agent_id } => text(agent_id),
            Op::InitKeyring { secret } | Op::RotateKey { secret } => N + secret.len(),
            Op::RetireKey { key_id } => text(key_id),
            Op::Batch(cmds) => N + cmds.iter().map(Command::size_hint).sum::<usize>(),
            Op::ForgetExpiredClaims => 0,
        };
        // `at` and the variant's tag.
        2 * N + op
    }
}

/// Most bytes bincode's standard configuration takes for an integer (a u64 as a varint) or
/// a length prefix.
const VARINT_MAX: usize = 9;

/// The newest kind of log entry this build writes and reads ([`Op::log_format`]): 1 is every
/// kind up to claim tokens (batches, `ClaimWithToken`), 2 adds `ForgetExpiredClaims`.
pub const LOG_FORMAT: u32 = 2;

impl Op {
    /// The log format that first had this kind of entry: a member of a build that reads
    /// less cannot decode it (see node/builds.rs).
    pub fn log_format(&self) -> u32 {
        match self {
            Op::ForgetExpiredClaims => 2,
            Op::Batch(cmds) => cmds.iter().map(|c| c.op.log_format()).max().unwrap_or(1),
            _ => 1,
        }
    }

    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Claim(_) | Op::ClaimWithToken { .. } => "claim",
            Op::Release { .. } => "release",
            Op::Register { .. } => "register",
            Op::Unregister { .. } => "unregister",
            Op::Evict { .. } => "evict",
            Op::EvictNode { .. } => "evict_node",
            Op::RevokeCertificate { .. } => "revoke_certificate",
            Op::RevokeAgent { .. } => "revoke_agent",
            Op::InitKeyring { .. } => "init_keyring",
            Op::RotateKey { .. } => "rotate_key",
            Op::RetireKey { .. } => "retire_key",
            Op::Batch(_) => "batch",
            Op::ForgetExpiredClaims => "forget_expired_claims",
        }
    }
}

/// A session as the sessions table holds it, enough to find and close its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    pub session_id: u64,
    pub conn: ConnRef,
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Membership and blank entries.
    Noop,
    Claimed {
        certificate: Certificate,
    },
    Released {
        serial: u64,
        /// The session registered with that certificate, now ended.
        ended: Option<(String, SessionRef)>,
    },
    Registered {
        session_id: u64,
        /// The session this registration took over, whose connection must be closed.
        replaced: Option<SessionRef>,
    },
    /// Unregister or Evict: the session, if it was still there with that id.
    SessionEnded {
        ended: Option<SessionRef>,
    },
    NodeEvicted {
        removed: Vec<(String, SessionRef)>,
    },
    Revoked {
        serial: u64,
        /// False when it had been revoked before (revocation is idempotent).
        newly: bool,
        /// The session registered with that certificate, now ended.
        ended: Option<(String, SessionRef)>,
    },
    KeyringInitialized {
        key_id: String,
        created: bool,
    },
    KeyRotated {
        key_id: String,
    },
    KeyRetired {
        key_id: String,
    },
    /// The answers to the commands of a batch, in order.
    Batch(Vec<Response>),
    /// A claim sent again with the token of the id's live claim: that claim's certificate,
    /// issued again byte for byte; nothing changed. Last, so that the variants before it
    /// keep their tags (only `ClaimWithToken`, which earlier builds never send, yields it).
    ClaimRepeated {
        certificate: Certificate,
    },
    /// Expired claims forgotten; `more` when others were due beyond the command's maximum.
    ClaimsForgotten {
        forgotten: u64,
        more: bool,
    },
}

/// Why a command was refused. Refusals change nothing. `Display` is the text agents see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid agent_id: {0}")]
    InvalidAgentId(String),
    #[error("Agent ID {agent_id} is already claimed")]
    AlreadyClaimed { agent_id: String },
    #[error("Agent ID {agent_id} is already claimed; force needs a valid certificate for it")]
    ForceWithoutProof { agent_id: String },
    #[error("certificate validation failed: {0}")]
    Certificate(Invalid),
    #[error("Agent ID {agent_id} is claimed; register with its certificate")]
    CertificateRequired { agent_id: String },
    #[error("Agent ID {agent_id} is already connected (node {node_id}); present its certificate to take over")]
    AlreadyConnected { agent_id: String, node_id: u64 },
    #[error("Agent ID {agent_id} is not claimed")]
    NotClaimed { agent_id: String },
    #[error("the cluster has no signing key yet; retry shortly")]
    NoSigningKey,
    #[error("certificate ttl must be between 1 second and 10 years")]
    BadTtl,
    #[error("metadata is too large ({0} bytes, at most 16384)")]
    MetadataTooLarge(usize),
    #[error("{0}")]
    Keyring(KeyringError),
    #[error("a batch may not contain a batch")]
    NestedBatch,
}

/// The result every log entry produces.
pub type Response = Result<Outcome, RegistryError>;

/// Why a session ended, as told to the node holding its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndCause {
    /// A newer registration of the same id (on any node) replaced it.
    TakenOver { by_session: u64 },
    /// Its certificate was revoked or released.
    Revoked,
    /// The agent unregistered.
    Unregistered,
    /// It was evicted (missed heartbeats, lost connection, or its node was lost).
    Evicted,
}

impl std::fmt::Display for EndCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndCause::TakenOver { by_session } => write!(
                f,
                "taken over by a newer registration (session {by_session})"
            ),
            EndCause::Revoked => f.write_str("its certificate was revoked"),
            EndCause::Unregistered => f.write_str("unregistered"),
            EndCause::Evicted => f.write_str("evicted"),
        }
    }
}

/// A session that an applied command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    pub agent_id: String,
    pub session: SessionRef,
    pub cause: EndCause,
}

impl SessionEnd {
    /// The sessions that applying `op` with result `outcome` ended.
    pub fn from_applied(op: &Op, outcome: &Outcome) -> Vec<SessionEnd> {
        let end = |agent_id: &str, session: SessionRef, cause| SessionEnd {
            agent_id: agent_id.to_owned(),
            session,
            cause,
        };
        match (op, outcome) {
            (Op::Batch(cmds), Outcome::Batch(answers)) => cmds
                .iter()
                .zip(answers)
                .filter_map(|(c, a)| a.as_ref().ok().map(|o| (c, o)))
                .flat_map(|(c, o)| SessionEnd::from_applied(&c.op, o))
                .collect(),
            (
                Op::Register { agent_id, .. },
                Outcome::Registered {
                    session_id,
                    replaced: Some(old),
                },
            ) => {
                vec![end(
                    agent_id,
                    *old,
                    EndCause::TakenOver {
                        by_session: *session_id,
                    },
                )]
            }
            (Op::Unregister { agent_id, .. }, Outcome::SessionEnded { ended: Some(s) }) => {
                vec![end(agent_id, *s, EndCause::Unregistered)]
            }
            (Op::Evict { agent_id, .. }, Outcome::SessionEnded { ended: Some(s) }) => {
                vec![end(agent_id, *s, EndCause::Evicted)]
            }
            (_, Outcome::NodeEvicted { removed }) => removed
                .iter()
                .map(|(id, s)| end(id, *s, EndCause::Evicted))
                .collect(),
            (
                Op::RevokeCertificate { by, .. } | Op::Release { by, .. },
                Outcome::Revoked {
                    ended: Some((id, s)),
                    ..
                }
                | Outcome::Released {
                    ended: Some((id, s)),
                    ..
                },
            ) => {
                // The connection that asked ends its own session: it is answered, not closed.
                let cause = if *by == Some(s.conn) {
                    EndCause::Unregistered
                } else {
                    EndCause::Revoked
                };
                vec![end(id, *s, cause)]
            }
            (
                _,
                Outcome::Revoked {
                    ended: Some((id, s)),
                    ..
                },
            ) => vec![end(id, *s, EndCause::Revoked)],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::codec;

    fn certificate() -> Certificate {
        Certificate {
            agent_id: "agent-with-a-rather-long-name-0001".into(),
            serial: u64::MAX,
            issued_at: u64::MAX,
            expires_at: u64::MAX,
            key_id: "k18446744073709551615".into(),
            certificate_hash: "h".repeat(64),
            signature: "s".repeat(64),
        }
    }

    fn max_conn() -> ConnRef {
        ConnRef {
            node_id: u64::MAX,
            conn_id: u64::MAX,
        }
    }

    fn claim_args() -> ClaimArgs {
        ClaimArgs {
            agent_id: "agent-with-a-rather-long-name-0001".into(),
            ttl_secs: u64::MAX,
            force: true,
            proof: Some(certificate()),
            conn: Some(max_conn()),
        }
    }

    /// One command of every kind, with the largest integers and every option set.
    fn every_kind() -> Vec<Command> {
        let conn = max_conn();
        let id = || "agent-with-a-rather-long-name-0001".to_string();
        let ops = vec![
            Op::Claim(claim_args()),
            Op::Release {
                certificate: certificate(),
                by: Some(conn),
            },
            Op::Register {
                agent_id: id(),
                conn,
                metadata: r#"{"role":"planner","tags":["a","b"]}"#.into(),
                certificate: Some(certificate()),
                force_reconnect: true,
                allow_uncertified_takeover: true,
            },
            Op::Unregister {
                agent_id: id(),
                session_id: u64::MAX,
            },
            Op::Evict {
                agent_id: id(),
                session_id: u64::MAX,
            },
            Op::EvictNode {
                node_id: u64::MAX,
                max_session_id: u64::MAX,
            },
            Op::RevokeCertificate {
                certificate: certificate(),
                by: Some(conn),
            },
            Op::RevokeAgent { agent_id: id() },
            Op::InitKeyring {
                secret: Secret::new(vec![0xff; 32]),
            },
            Op::RotateKey {
                secret: Secret::new(vec![0xff; 32]),
            },
            Op::RetireKey {
                key_id: "k18446744073709551615".into(),
            },
            Op::ClaimWithToken {
                claim: claim_args(),
                token: TokenHash([0xff; 32]),
            },
        ];
        ops.into_iter()
            .map(|op| Command { at: u64::MAX, op })
            .collect()
    }

    /// The hint bounds the encoded size of every kind of command, and of a batch of them,
    /// so a batch cut by it never holds more bytes than its limit says.
    #[test]
    fn size_hint_bounds_the_encoded_size() {
        let cmds = every_kind();
        for cmd in &cmds {
            let len = codec::encode(cmd).unwrap().len();
            assert!(
                len <= cmd.size_hint(),
                "{}: encoded {len} bytes, hint {}",
                cmd.op.name(),
                cmd.size_hint()
            );
        }
        let batch = Command {
            at: u64::MAX,
            op: Op::Batch(cmds),
        };
        assert!(codec::encode(&batch).unwrap().len() <= batch.size_hint());
    }

    /// The hint of a plain claim is near its size (a flat 512 bytes a command was over ten
    /// times it, and cut the leader's entries at 64 claims: see `node::propose`'s tests).
    #[test]
    fn size_hint_of_a_claim_is_close() {
        let claim = Command {
            at: 1_800_000_000,
            op: Op::Claim(ClaimArgs {
                agent_id: "agent-0001".into(),
                ttl_secs: 3600,
                force: false,
                proof: None,
                conn: Some(ConnRef {
                    node_id: 2,
                    conn_id: 123_456,
                }),
            }),
        };
        let len = codec::encode(&claim).unwrap().len();
        assert!(
            claim.size_hint() <= 4 * len,
            "hint {} for {len} bytes",
            claim.size_hint()
        );
    }

    /// A claim encodes as builds before claim tokens wrote it (frozen from such a build), so
    /// every node reads the claims already in the log.
    #[test]
    fn a_claim_encodes_as_earlier_builds_wrote_it() {
        let claim = every_kind().remove(0);
        const EARLIER: &str = concat!(
            "fdffffffffffffffff00226167656e742d776974682d612d7261746865722d6c6f6e672d6e616d65",
            "2d30303031fdffffffffffffffff0101226167656e742d776974682d612d7261746865722d6c6f6e",
            "672d6e616d652d30303031fdfffffffffffffffffdfffffffffffffffffdffffffffffffffff156b",
            "31383434363734343037333730393535313631354068686868686868686868686868686868686868",
            "68686868686868686868686868686868686868686868686868686868686868686868686868686868",
            "68686868684073737373737373737373737373737373737373737373737373737373737373737373",
            "73737373737373737373737373737373737373737373737373737373737301fdffffffffffffffff",
            "fdffffffffffffffff",
        );
        let bytes = hex::decode(EARLIER).unwrap();
        assert_eq!(codec::encode(&claim).unwrap(), bytes);
        assert_eq!(codec::decode::<Command>(&bytes).unwrap(), claim);
    }
}
