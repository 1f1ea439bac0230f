//! What the workload's clients saw: every operation with its invocation and completion time
//! and its result, plus the tables every node holds at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A certificate as the history needs it: which id, which serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// `claim_agent_id`; `proof` is the serial of the certificate sent along with `force`.
    Claim {
        force: bool,
        proof: Option<Serial>,
    },
    Release {
        cert: Serial,
    },
    Revoke {
        cert: Serial,
    },
    Validate {
        cert: Serial,
    },
    Register {
        cert: Option<Serial>,
    },
    Unregister,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ret {
    /// A claim that returned a certificate.
    Claimed(Serial),
    Registered {
        session_id: u64,
        took_over: bool,
    },
    Validated {
        valid: bool,
        reason: Option<String>,
    },
    /// Any other success (release, revoke, unregister).
    Done,
    /// A definite refusal: the operation changed nothing.
    Refused(String),
    /// The client cannot tell whether it happened (timeout, lost connection, "write outcome
    /// unknown"). For a read: it simply has no answer.
    Unknown(String),
}

impl Ret {
    pub fn is_unknown(&self) -> bool {
        matches!(self, Ret::Unknown(_))
    }
    pub fn is_ok(&self) -> bool {
        !matches!(self, Ret::Refused(_) | Ret::Unknown(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub index: usize,
    /// The connection (one per simulated agent session) that sent it.
    pub conn: u64,
    pub node: u64,
    pub agent_id: String,
    pub kind: OpKind,
    /// Microseconds since the run started.
    pub invoked: u64,
    pub completed: u64,
    pub ret: Ret,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:<5} [{:>9.3}s..{:>9.3}s] conn {:<4} node {} {:<14} {:?} -> {:?}",
            self.index,
            self.invoked as f64 / 1e6,
            self.completed as f64 / 1e6,
            self.conn,
            self.node,
            self.agent_id,
            self.kind,
            self.ret
        )
    }
}

/// One node's tables after the run, once healed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalTables {
    /// agent_id -> serial of its current claim.
    pub claims: BTreeMap<String, Serial>,
    /// agent_id -> session id.
    pub sessions: BTreeMap<String, u64>,
    /// Serials the node refuses as revoked (for the certificates the workload revoked).
    pub revoked: BTreeSet<Serial>,
    pub applied_index: u64,
    pub digest: String,
}

/// A sample of a node's applied index and table digest, taken during the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestSample {
    pub node: u64,
    pub applied_index: u64,
    pub digest: String,
}

/// A fault as the checker needs it: when it held, and the nodes it left connected to each
/// other as a quorum (empty when there is no such quorum to name, as for a cut link, or the
/// cluster had not settled on one leader when it began).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultWindow {
    pub what: String,
    /// Microseconds since the run started.
    pub start: u64,
    pub end: u64,
    pub quorum: Vec<u64>,
    /// When the quorum should answer again: a new leader has had time to take over.
    pub settled: u64,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    pub ops: Vec<Op>,
    pub faults: Vec<FaultWindow>,
    /// Node id -> its final tables.
    pub finals: BTreeMap<u64, FinalTables>,
    pub samples: Vec<DigestSample>,
}

impl History {
    pub fn push(&mut self, mut op: Op) {
        op.index = self.ops.len();
        self.ops.push(op);
    }

    /// Counts of operations by kind and outcome, for the summary.
    pub fn counts(&self) -> BTreeMap<(String, String), usize> {
        let mut out = BTreeMap::new();
        for op in &self.ops {
            let kind = match &op.kind {
                OpKind::Claim { force: false, .. } => "claim",
                OpKind::Claim { force: true, .. } => "claim --force",
                OpKind::Release { .. } => "release",
                OpKind::Revoke { .. } => "revoke",
                OpKind::Validate { .. } => "validate",
                OpKind::Register { cert: Some(_) } => "register (cert)",
                OpKind::Register { cert: None } => "register",
                OpKind::Unregister => "unregister",
            };
            let outcome = match &op.ret {
                Ret::Refused(_) => "refused",
                Ret::Unknown(_) => "unknown",
                Ret::Validated { valid: true, .. } => "ok (valid)",
                Ret::Validated { valid: false, .. } => "ok (invalid)",
                _ => "ok",
            };
            *out.entry((kind.to_owned(), outcome.to_owned()))
                .or_default() += 1;
        }
        out
    }
}
