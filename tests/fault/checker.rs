//! Checks a recorded history against the invariants of DESIGN.md.
//!
//! - **Claims are linearizable per id.** Each agent id is a register: free, or held by the
//!   certificate serial of its current claim. Claims are compare-and-set (free -> serial),
//!   forced re-issues swap serials, releases and revocations free it, validations read it, and
//!   the final tables are a last read. A Wing-Gong-Lowe search looks for an order of the
//!   operations consistent with both their real-time order and the register; an operation
//!   with an unknown outcome may take effect at any point after its invocation, or never.
//! - **No revoked or superseded certificate validates** once its revocation, release or
//!   re-issue was acknowledged.
//! - **No acknowledged write is lost**: acknowledged claims, registrations and revocations
//!   are reflected in the final tables of every node.
//! - **Sessions are fenced** (one owner at a time): a connection whose session was taken over
//!   by an acknowledged registration cannot unregister it afterwards, and no two
//!   acknowledged registrations share a session id.
//! - **Replicas converge**: after healing, every node holds the same tables; samples taken
//!   during the run never show two different digests at one applied index.
//! - **A quorum answers** (see [`check_availability`]): the two nodes a fault left connected
//!   give every request a definite answer once a new leader has had time to take over.
//!   Failed in release runs (`scripts/fault-run.sh`), reported in debug ones (the short run
//!   of the suite).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use super::history::{FaultWindow, History, Op, OpKind, Ret, Serial};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub kind: &'static str,
    pub message: String,
    /// The smallest slice of history that shows it (indexes into `History::ops`).
    pub ops: Vec<usize>,
}

impl Violation {
    pub fn render(&self, history: &History) -> String {
        let mut out = format!("VIOLATION {}: {}\n", self.kind, self.message);
        for i in &self.ops {
            out.push_str(&format!("    {}\n", history.ops[*i]));
        }
        out
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

pub const DOUBLE_OWNER: &str = "double owner";
pub const LOST_WRITE: &str = "lost acknowledged write";
pub const STALE_VALIDATION: &str = "revoked certificate validated";
pub const NOT_LINEARIZABLE: &str = "claims not linearizable";
pub const DIVERGENCE: &str = "replicas diverge";
pub const UNAVAILABLE: &str = "no answer with a quorum up";

/// Requests sent this close to a fault's end are not judged either: the node coming back
/// (with a higher term, after an isolation) may move leadership once more.
const HEAL_MARGIN: u64 = 500_000;
/// How the workload reports its connection closed by the node on purpose (the session it
/// held ended: taken over, revoked, evicted): an answer of sorts, not unavailability.
const CLOSED_BY_NODE: &str = "closed by peer";

/// Runs every check; an empty answer means the history is correct.
pub fn check(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    out.extend(check_fencing(history));
    out.extend(check_stale_validations(history));
    out.extend(check_lost_writes(history));
    out.extend(check_convergence(history));
    out.extend(check_linearizable_claims(history));
    // Availability is judged against takeover times of the shipped Raft timings; a debug
    // build on two shared cores misses them on its own (a takeover measured 5.6 s against the
    // 3 s allowed), so there it is only reported.
    if !cfg!(debug_assertions) {
        out.extend(check_availability(history));
    }
    out
}

/// The requests [`check_availability`] judges for fault `f`.
fn judged<'h>(history: &'h History, f: &'h FaultWindow) -> impl Iterator<Item = &'h Op> + 'h {
    let from = f.settled;
    let until = f.end.saturating_sub(HEAL_MARGIN);
    history
        .ops
        .iter()
        .filter(move |o| f.quorum.contains(&o.node) && (from..=until).contains(&o.invoked))
}

/// How many faults and requests [`check_availability`] judged (for the run's summary).
pub fn availability_judged(history: &History) -> (usize, usize) {
    let mut faults = 0;
    let mut requests = 0;
    for f in &history.faults {
        let n = judged(history, f).count();
        if n > 0 {
            faults += 1;
            requests += n;
        }
    }
    (faults, requests)
}

/// Availability: a request sent to a node of a fault's quorum, from when a new leader has had
/// time to take over (`settled`) until [`HEAL_MARGIN`] before the fault ended, should get a
/// definite answer (a result or a refusal), not a timeout or "outcome unknown". A write stuck
/// behind calls to a dead leader shows here; the safety checks allow it, as an unknown
/// outcome may or may not have happened.
///
/// It found two causes of such stalls, both fixed: peer connections kept through a partition
/// that stayed mute for seconds after the heal (QUIC's retransmission backoff; see
/// `raft::network::SILENCE_LIMIT`), and the proposer's slots held for good by writes openraft
/// never answers (see `node::propose`). Ten-minute release runs found 10-28 unanswered
/// requests (about 1% of those judged) before, none after.
pub fn check_availability(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    for f in &history.faults {
        let stuck: Vec<usize> = judged(history, f)
            .filter(|o| matches!(&o.ret, Ret::Unknown(e) if !e.starts_with(CLOSED_BY_NODE)))
            .map(|o| o.index)
            .collect();
        if !stuck.is_empty() {
            out.push(Violation {
                kind: UNAVAILABLE,
                message: format!(
                    "during \"{}\" ({:.3}s..{:.3}s), {} request(s) to nodes {:?} got no definite answer",
                    f.what,
                    f.start as f64 / 1e6,
                    f.end as f64 / 1e6,
                    stuck.len(),
                    f.quorum
                ),
                ops: stuck,
            });
        }
    }
    out
}

/// The operations on each agent id, in history order.
fn by_agent(history: &History) -> BTreeMap<&str, Vec<&Op>> {
    let mut out: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &history.ops {
        out.entry(op.agent_id.as_str()).or_default().push(op);
    }
    out
}

/// Fencing: once a registration by another connection took the id over (acknowledged), the
/// old connection's unregister cannot succeed; session ids are never handed out twice.
pub fn check_fencing(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut by_session: BTreeMap<(String, u64), &Op> = BTreeMap::new();
    for op in &history.ops {
        if let (OpKind::Register { .. }, Ret::Registered { session_id, .. }) = (&op.kind, &op.ret) {
            if let Some(first) = by_session.insert((op.agent_id.clone(), *session_id), op) {
                if first.conn != op.conn {
                    out.push(Violation {
                        kind: DOUBLE_OWNER,
                        message: format!(
                            "{} got session {session_id} twice, on connections {} and {}",
                            op.agent_id, first.conn, op.conn
                        ),
                        ops: vec![first.index, op.index],
                    });
                }
            }
        }
    }
    let index = by_agent(history);
    for unreg in history
        .ops
        .iter()
        .filter(|o| o.kind == OpKind::Unregister && o.ret.is_ok())
    {
        let registrations: Vec<&Op> = index[unreg.agent_id.as_str()]
            .iter()
            .copied()
            .filter(|o| matches!(o.kind, OpKind::Register { .. }))
            .collect();
        // The newest session this connection may have held when it unregistered: its own
        // registrations invoked before, acknowledged or not (an unknown one may have won).
        let mine_unknown = registrations
            .iter()
            .any(|r| r.conn == unreg.conn && r.invoked < unreg.invoked && r.ret.is_unknown());
        if mine_unknown {
            continue;
        }
        let mine = registrations
            .iter()
            .filter(|r| r.conn == unreg.conn && r.completed <= unreg.invoked)
            .filter_map(|r| match r.ret {
                Ret::Registered { session_id, .. } => Some((session_id, r.index)),
                _ => None,
            })
            .max();
        let Some((my_session, my_op)) = mine else {
            continue;
        };
        let newer = registrations.iter().find(|r| {
            r.conn != unreg.conn
                && r.completed < unreg.invoked
                && matches!(r.ret, Ret::Registered { session_id, .. } if session_id > my_session)
        });
        if let Some(newer) = newer {
            out.push(Violation {
                kind: DOUBLE_OWNER,
                message: format!(
                    "connection {} unregistered {} (its session {my_session}) after connection {} had taken the id over",
                    unreg.conn, unreg.agent_id, newer.conn
                ),
                ops: vec![my_op, newer.index, unreg.index],
            });
        }
    }
    out
}

/// Once a revocation, release or re-issue of a certificate is acknowledged, no validation
/// invoked afterwards may call that certificate valid.
pub fn check_stale_validations(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    // serial -> the first acknowledged operation that ended it.
    let mut ended: BTreeMap<Serial, &Op> = BTreeMap::new();
    for op in history.ops.iter().filter(|o| o.ret.is_ok()) {
        let serial = match &op.kind {
            OpKind::Release { cert } | OpKind::Revoke { cert } => Some(*cert),
            OpKind::Claim {
                force: true,
                proof: Some(p),
            } => Some(*p),
            _ => None,
        };
        if let Some(s) = serial {
            let e = ended.entry(s).or_insert(op);
            if op.completed < e.completed {
                *e = op;
            }
        }
    }
    for v in &history.ops {
        if let (OpKind::Validate { cert }, Ret::Validated { valid: true, .. }) = (&v.kind, &v.ret) {
            if let Some(end) = ended.get(cert) {
                if end.completed < v.invoked {
                    out.push(Violation {
                        kind: STALE_VALIDATION,
                        message: format!(
                            "certificate {} of {} validated after it was ended",
                            cert.0, v.agent_id
                        ),
                        ops: vec![end.index, v.index],
                    });
                }
            }
        }
    }
    out
}

/// Acknowledged claims, registrations and revocations are in every node's final tables
/// (unless a later operation that may have happened undid them).
pub fn check_lost_writes(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let index = by_agent(history);
    for (node, tables) in &history.finals {
        for op in &history.ops {
            match (&op.kind, &op.ret) {
                (OpKind::Claim { .. }, Ret::Claimed(s)) => {
                    let undone = index[op.agent_id.as_str()].iter().any(|o| {
                        !matches!(o.ret, Ret::Refused(_))
                            && o.invoked > op.invoked
                            && matches!(o.kind, OpKind::Release { cert } | OpKind::Revoke { cert } if cert >= *s)
                    });
                    let lost = match tables.claims.get(&op.agent_id) {
                        Some(f) => f < s,
                        None => !undone,
                    };
                    if lost {
                        out.push(Violation {
                            kind: LOST_WRITE,
                            message: format!(
                                "node {node} lost the acknowledged claim {} of {} (final: {:?})",
                                s.0,
                                op.agent_id,
                                tables.claims.get(&op.agent_id).map(|s| s.0)
                            ),
                            ops: vec![op.index],
                        });
                    }
                }
                (OpKind::Register { .. }, Ret::Registered { session_id, .. }) => {
                    if let Some(f) = tables.sessions.get(&op.agent_id) {
                        if f < session_id {
                            out.push(Violation {
                                kind: LOST_WRITE,
                                message: format!(
                                    "node {node} holds session {f} of {} but session {session_id} was acknowledged after it",
                                    op.agent_id
                                ),
                                ops: vec![op.index],
                            });
                        }
                    }
                }
                (OpKind::Release { cert } | OpKind::Revoke { cert }, Ret::Done)
                    if !tables.revoked.contains(cert) =>
                {
                    out.push(Violation {
                        kind: LOST_WRITE,
                        message: format!(
                            "node {node} lost the acknowledged revocation of certificate {} of {}",
                            cert.0, op.agent_id
                        ),
                        ops: vec![op.index],
                    });
                }
                _ => {}
            }
        }
    }
    out
}

/// After healing every node holds the same tables; during the run, no two samples at one
/// applied index differ.
pub fn check_convergence(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut finals = history.finals.iter();
    if let Some((first_node, first)) = finals.next() {
        for (node, t) in finals {
            if t != first {
                out.push(Violation {
                    kind: DIVERGENCE,
                    message: format!(
                        "after healing, node {node} (index {}, digest {}) differs from node {first_node} (index {}, digest {})",
                        t.applied_index, t.digest, first.applied_index, first.digest
                    ),
                    ops: vec![],
                });
            }
        }
    }
    let mut at: BTreeMap<u64, (u64, &str)> = BTreeMap::new();
    for s in &history.samples {
        match at.get(&s.applied_index) {
            Some((node, digest)) if *digest != s.digest => out.push(Violation {
                kind: DIVERGENCE,
                message: format!(
                    "at applied index {} node {} had digest {} but node {node} had {digest}",
                    s.applied_index, s.node, s.digest
                ),
                ops: vec![],
            }),
            Some(_) => {}
            None => {
                at.insert(s.applied_index, (s.node, &s.digest));
            }
        }
    }
    out
}

// ---- linearizability of claims, per id ----

/// The register an agent id is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Reg {
    Free,
    Held(Serial),
    /// Claimed by an operation whose answer was lost, so its serial is unseen.
    Unseen,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// free -> serial
    Claim(Serial),
    /// held(proof) -> serial
    Reissue { proof: Serial, new: Serial },
    /// free -> unseen serial (a claim or re-issue whose answer was lost)
    ClaimUnseen { proof: Option<Serial> },
    /// "already claimed": not free
    NotFree,
    /// held(s) -> free
    Release(Serial),
    /// held(s) -> free; anything else unchanged
    Revoke(Serial),
    /// must be held(s)
    IsHeld(Serial),
    /// must not be held(s)
    NotHeld(Serial),
    /// the final tables
    Final(Option<Serial>),
}

struct LinOp {
    op: Option<usize>,
    invoked: u64,
    /// `u64::MAX` when the outcome is unknown.
    completed: u64,
    optional: bool,
    step: Step,
}

fn apply(step: Step, r: Reg, known: &BTreeSet<Serial>) -> Option<Reg> {
    match (step, r) {
        (Step::Claim(s), Reg::Free) => Some(Reg::Held(s)),
        (Step::Reissue { proof, new }, Reg::Held(h)) if h == proof => Some(Reg::Held(new)),
        (Step::ClaimUnseen { proof: None }, Reg::Free) => Some(Reg::Unseen),
        (Step::ClaimUnseen { proof: Some(p) }, Reg::Held(h)) if h == p => Some(Reg::Unseen),
        (Step::NotFree, Reg::Held(_) | Reg::Unseen) => Some(r),
        (Step::Release(s), Reg::Held(h)) if h == s => Some(Reg::Free),
        (Step::Revoke(s), Reg::Held(h)) if h == s => Some(Reg::Free),
        (Step::Revoke(_), _) => Some(r),
        (Step::IsHeld(s), Reg::Held(h)) if h == s => Some(r),
        (Step::NotHeld(s), _) if r != Reg::Held(s) => Some(r),
        (Step::Final(None), Reg::Free) => Some(r),
        (Step::Final(Some(f)), Reg::Held(h)) if h == f => Some(r),
        (Step::Final(Some(f)), Reg::Unseen) if !known.contains(&f) => Some(r),
        _ => None,
    }
}

fn lin_ops(ops: &[&Op]) -> (Vec<LinOp>, BTreeSet<Serial>) {
    let mut out = Vec::new();
    let mut known = BTreeSet::new();
    for op in ops.iter().copied() {
        let unknown = op.ret.is_unknown();
        let refused_cert =
            matches!(&op.ret, Ret::Refused(e) if e.starts_with("certificate validation failed"));
        let step = match (&op.kind, &op.ret) {
            (OpKind::Claim { force: false, .. }, Ret::Claimed(s)) => Step::Claim(*s),
            (
                OpKind::Claim {
                    force: true,
                    proof: Some(p),
                },
                Ret::Claimed(s),
            ) => Step::Reissue { proof: *p, new: *s },
            (OpKind::Claim { force: false, .. }, Ret::Refused(e))
                if e.contains("is already claimed") =>
            {
                Step::NotFree
            }
            (
                OpKind::Claim {
                    force: true,
                    proof: Some(p),
                },
                Ret::Refused(_),
            ) if refused_cert => Step::NotHeld(*p),
            (OpKind::Claim { force, proof }, Ret::Unknown(_)) => Step::ClaimUnseen {
                proof: if *force { *proof } else { None },
            },
            (OpKind::Release { cert }, Ret::Done | Ret::Unknown(_)) => Step::Release(*cert),
            (OpKind::Release { cert }, Ret::Refused(_)) if refused_cert => Step::NotHeld(*cert),
            (OpKind::Revoke { cert }, Ret::Done | Ret::Unknown(_)) => Step::Revoke(*cert),
            (OpKind::Validate { cert }, Ret::Validated { valid: true, .. }) => Step::IsHeld(*cert),
            (OpKind::Validate { cert }, Ret::Validated { valid: false, .. }) => {
                Step::NotHeld(*cert)
            }
            _ => continue,
        };
        if let Ret::Claimed(s) = op.ret {
            known.insert(s);
        }
        out.push(LinOp {
            op: Some(op.index),
            invoked: op.invoked,
            completed: if unknown { u64::MAX } else { op.completed },
            optional: unknown,
            step,
        });
    }
    (out, known)
}

/// Outcome of a search: found an order, found none, or gave up.
#[derive(Debug, PartialEq, Eq)]
enum Search {
    Linearizable,
    Not,
    TooBig,
}

const SEARCH_BUDGET: usize = 2_000_000;

fn search(ops: &[LinOp], known: &BTreeSet<Serial>) -> Search {
    let required = ops.iter().filter(|o| !o.optional).count();
    let words = ops.len().div_ceil(64);
    let mut done = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Reg)> = HashSet::new();
    // Explicit stack: (candidate position to try next, register before it).
    let mut stack: Vec<(usize, Reg, usize)> = vec![(0, Reg::Free, usize::MAX)];
    let mut left = required;
    let is_done = |d: &[u64], i: usize| d[i / 64] & (1 << (i % 64)) != 0;
    loop {
        if left == 0 {
            return Search::Linearizable;
        }
        if seen.len() > SEARCH_BUDGET {
            return Search::TooBig;
        }
        let Some(&mut (ref mut next, reg, _)) = stack.last_mut() else {
            return Search::Not;
        };
        let start = *next;
        // An operation may go next only if no pending one completed before it was invoked.
        let min_completed = (0..ops.len())
            .filter(|i| !is_done(&done, *i))
            .map(|i| ops[i].completed)
            .min()
            .unwrap_or(u64::MAX);
        let mut advanced = false;
        for i in start..ops.len() {
            if is_done(&done, i) || ops[i].invoked > min_completed {
                continue;
            }
            if let Some(r2) = apply(ops[i].step, reg, known) {
                done[i / 64] |= 1 << (i % 64);
                if seen.insert((done.clone(), r2)) {
                    stack.last_mut().expect("non-empty").0 = i + 1;
                    if !ops[i].optional {
                        left -= 1;
                    }
                    stack.push((0, r2, i));
                    advanced = true;
                    break;
                }
                done[i / 64] &= !(1 << (i % 64));
            }
        }
        if !advanced {
            // Backtrack: undo the operation that led here.
            let (_, _, via) = stack.pop().expect("non-empty");
            if via == usize::MAX {
                return Search::Not;
            }
            done[via / 64] &= !(1 << (via % 64));
            if !ops[via].optional {
                left += 1;
            }
        }
    }
}

/// Each agent id, as a register, must have a linearization of its operations and of the
/// final tables.
pub fn check_linearizable_claims(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let final_view = history.finals.values().next();
    let end = history.ops.iter().map(|o| o.completed).max().unwrap_or(0) + 1;
    for (id, id_ops) in by_agent(history) {
        let (mut ops, known) = lin_ops(&id_ops);
        if ops.is_empty() {
            continue;
        }
        ops.sort_by_key(|o| o.invoked);
        match search(&ops, &known) {
            Search::Not => {
                out.push(Violation {
                    kind: NOT_LINEARIZABLE,
                    message: format!("no order of the operations on {id} fits a register"),
                    ops: smallest_failing_prefix(&ops, &known),
                });
                continue;
            }
            Search::TooBig => {
                eprintln!("checker: linearizability of {id} not decided within the search budget");
                continue;
            }
            Search::Linearizable => {}
        }
        if let Some(tables) = final_view {
            ops.push(LinOp {
                op: None,
                invoked: end,
                completed: end,
                optional: false,
                step: Step::Final(tables.claims.get(id).copied()),
            });
            if search(&ops, &known) == Search::Not {
                let tail = ops.len().saturating_sub(12);
                out.push(Violation {
                    kind: LOST_WRITE,
                    message: format!(
                        "the final claim of {id} ({:?}) fits no order of the operations on it",
                        tables.claims.get(id).map(|s| s.0)
                    ),
                    ops: ops[tail..].iter().filter_map(|o| o.op).collect(),
                });
            }
        }
    }
    out
}

/// The shortest prefix (in invocation order) that already has no linearization.
fn smallest_failing_prefix(ops: &[LinOp], known: &BTreeSet<Serial>) -> Vec<usize> {
    let (mut lo, mut hi) = (1, ops.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if search(&ops[..mid], known) == Search::Not {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    ops[..hi].iter().filter_map(|o| o.op).collect()
}

#[cfg(test)]
mod tests {
    use super::super::history::{FaultWindow, FinalTables, History, Op, OpKind, Ret, Serial};
    use super::*;

    struct Builder(History);

    impl Builder {
        fn new() -> Self {
            Builder(History::default())
        }
        fn op(mut self, conn: u64, id: &str, kind: OpKind, t: (u64, u64), ret: Ret) -> Self {
            self.0.push(Op {
                index: 0,
                conn,
                node: 1,
                agent_id: id.into(),
                kind,
                invoked: t.0,
                completed: t.1,
                ret,
            });
            self
        }
        fn finals(mut self, claims: &[(&str, u64)], revoked: &[u64]) -> History {
            for node in 1..=3 {
                self.0.finals.insert(
                    node,
                    FinalTables {
                        claims: claims
                            .iter()
                            .map(|(i, s)| ((*i).into(), Serial(*s)))
                            .collect(),
                        revoked: revoked.iter().map(|s| Serial(*s)).collect(),
                        ..FinalTables::default()
                    },
                );
            }
            self.0
        }
    }

    fn claim() -> OpKind {
        OpKind::Claim {
            force: false,
            proof: None,
        }
    }

    fn kinds(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_correct_concurrent_history_passes() {
        let h = Builder::new()
            .op(1, "x", claim(), (0, 10), Ret::Claimed(Serial(5)))
            .op(
                2,
                "x",
                claim(),
                (2, 12),
                Ret::Refused("Agent ID x is already claimed".into()),
            )
            .op(3, "x", claim(), (3, 40), Ret::Unknown("timed out".into()))
            .op(
                1,
                "x",
                OpKind::Validate { cert: Serial(5) },
                (11, 13),
                Ret::Validated {
                    valid: true,
                    reason: None,
                },
            )
            .op(
                1,
                "x",
                OpKind::Release { cert: Serial(5) },
                (14, 16),
                Ret::Done,
            )
            .op(
                2,
                "x",
                OpKind::Validate { cert: Serial(5) },
                (17, 18),
                Ret::Validated {
                    valid: false,
                    reason: Some("revoked".into()),
                },
            )
            .op(2, "x", claim(), (19, 21), Ret::Claimed(Serial(9)))
            .op(
                1,
                "x",
                OpKind::Register {
                    cert: Some(Serial(9)),
                },
                (22, 23),
                Ret::Registered {
                    session_id: 10,
                    took_over: false,
                },
            )
            .finals(&[("x", 9)], &[5]);
        let v = check(&h);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn an_unknown_claim_may_have_won() {
        // The answer to claim 1 was lost, but it took the id: the final serial is unseen.
        let h = Builder::new()
            .op(
                1,
                "x",
                claim(),
                (0, 100),
                Ret::Unknown("connection lost".into()),
            )
            .op(
                2,
                "x",
                claim(),
                (5, 6),
                Ret::Refused("Agent ID x is already claimed".into()),
            )
            .finals(&[("x", 3)], &[]);
        assert!(check(&h).is_empty());
    }

    #[test]
    fn reports_a_double_owner() {
        let h = Builder::new()
            .op(
                1,
                "x",
                OpKind::Register { cert: None },
                (0, 1),
                Ret::Registered {
                    session_id: 5,
                    took_over: false,
                },
            )
            .op(
                2,
                "x",
                OpKind::Register {
                    cert: Some(Serial(3)),
                },
                (2, 3),
                Ret::Registered {
                    session_id: 7,
                    took_over: true,
                },
            )
            .op(1, "x", OpKind::Unregister, (4, 5), Ret::Done)
            .finals(&[], &[]);
        assert_eq!(kinds(&check_fencing(&h)), vec![DOUBLE_OWNER]);
        let h = Builder::new()
            .op(
                1,
                "y",
                OpKind::Register { cert: None },
                (0, 1),
                Ret::Registered {
                    session_id: 5,
                    took_over: false,
                },
            )
            .op(
                2,
                "y",
                OpKind::Register { cert: None },
                (0, 2),
                Ret::Registered {
                    session_id: 5,
                    took_over: false,
                },
            )
            .finals(&[], &[]);
        assert_eq!(kinds(&check_fencing(&h)), vec![DOUBLE_OWNER]);
    }

    #[test]
    fn reports_a_lost_acknowledged_claim() {
        let h = Builder::new()
            .op(1, "x", claim(), (0, 1), Ret::Claimed(Serial(5)))
            .finals(&[], &[]);
        assert!(kinds(&check_lost_writes(&h)).contains(&LOST_WRITE));
        assert!(kinds(&check(&h)).iter().all(|k| *k == LOST_WRITE));
    }

    #[test]
    fn reports_a_lost_revocation() {
        let h = Builder::new()
            .op(1, "x", claim(), (0, 1), Ret::Claimed(Serial(5)))
            .op(
                1,
                "x",
                OpKind::Revoke { cert: Serial(5) },
                (2, 3),
                Ret::Done,
            )
            .finals(&[], &[]);
        assert_eq!(kinds(&check_lost_writes(&h)), vec![LOST_WRITE; 3]);
    }

    #[test]
    fn reports_a_revoked_certificate_validated_afterwards() {
        let h = Builder::new()
            .op(1, "x", claim(), (0, 1), Ret::Claimed(Serial(5)))
            .op(
                1,
                "x",
                OpKind::Revoke { cert: Serial(5) },
                (2, 3),
                Ret::Done,
            )
            .op(
                2,
                "x",
                OpKind::Validate { cert: Serial(5) },
                (4, 5),
                Ret::Validated {
                    valid: true,
                    reason: None,
                },
            )
            .finals(&[], &[5]);
        assert_eq!(kinds(&check_stale_validations(&h)), vec![STALE_VALIDATION]);
        // Concurrent with the revocation, "valid" is fine.
        let h = Builder::new()
            .op(1, "x", claim(), (0, 1), Ret::Claimed(Serial(5)))
            .op(
                1,
                "x",
                OpKind::Revoke { cert: Serial(5) },
                (2, 6),
                Ret::Done,
            )
            .op(
                2,
                "x",
                OpKind::Validate { cert: Serial(5) },
                (4, 5),
                Ret::Validated {
                    valid: true,
                    reason: None,
                },
            )
            .finals(&[], &[5]);
        assert!(check(&h).is_empty());
    }

    #[test]
    fn reports_a_non_linearizable_claim_sequence() {
        // Two claims of one id both succeed, one after the other, with nothing freeing it.
        let h = Builder::new()
            .op(1, "x", claim(), (0, 1), Ret::Claimed(Serial(5)))
            .op(3, "z", claim(), (0, 1), Ret::Claimed(Serial(6)))
            .op(2, "x", claim(), (2, 3), Ret::Claimed(Serial(7)))
            .op(
                1,
                "x",
                OpKind::Validate { cert: Serial(5) },
                (4, 5),
                Ret::Validated {
                    valid: true,
                    reason: None,
                },
            )
            .finals(&[("x", 7), ("z", 6)], &[]);
        let v = check_linearizable_claims(&h);
        assert_eq!(kinds(&v), vec![NOT_LINEARIZABLE]);
        // The slice names the two claims of x, not z's.
        assert_eq!(v[0].ops, vec![0, 2]);
        // A read that sees the id free right after a claim completed is caught too.
        let h = Builder::new()
            .op(1, "x", claim(), (0, 1), Ret::Claimed(Serial(5)))
            .op(
                2,
                "x",
                claim(),
                (2, 3),
                Ret::Refused("Agent ID x is already claimed".into()),
            )
            .op(
                2,
                "x",
                OpKind::Validate { cert: Serial(5) },
                (4, 5),
                Ret::Validated {
                    valid: false,
                    reason: Some("not claimed".into()),
                },
            )
            .finals(&[("x", 5)], &[]);
        assert_eq!(
            kinds(&check_linearizable_claims(&h)),
            vec![NOT_LINEARIZABLE]
        );
    }

    #[test]
    fn reports_requests_a_quorum_left_unanswered() {
        let unknown = || Ret::Unknown("write outcome unknown: timed out".into());
        let mut h = Builder::new()
            // Node 1 is in the quorum: unknown right after the fault began (a leader was
            // being elected), then answered, then stuck; node 3 was cut off.
            .op(1, "a", claim(), (10_200_000, 13_200_000), unknown())
            .op(
                1,
                "b",
                claim(),
                (11_600_000, 11_601_000),
                Ret::Claimed(Serial(1)),
            )
            .op(1, "c", claim(), (11_700_000, 14_700_000), unknown())
            .op(2, "d", claim(), (11_800_000, 14_800_000), unknown())
            // The node closed the connection: its session was taken over.
            .op(
                1,
                "f",
                claim(),
                (11_900_000, 11_900_000),
                Ret::Unknown(
                    "closed by peer: session 7 of agent f ended: taken over (code 259)".into(),
                ),
            )
            // Sent just before the fault ended.
            .op(1, "e", claim(), (12_700_000, 15_700_000), unknown())
            .finals(&[], &[]);
        h.ops[3].node = 3;
        h.faults.push(FaultWindow {
            what: "isolate node 3".into(),
            start: 10_000_000,
            end: 13_000_000,
            quorum: vec![1, 2],
            settled: 11_500_000,
        });
        let v = check_availability(&h);
        assert_eq!(kinds(&v), vec![UNAVAILABLE]);
        assert_eq!(v[0].ops, vec![2]);
        // A fault without a quorum to name is not judged.
        h.faults[0].quorum.clear();
        assert!(check_availability(&h).is_empty());
    }

    #[test]
    fn reports_diverging_replicas() {
        let mut h = Builder::new().finals(&[("x", 5)], &[]);
        h.finals.get_mut(&2).unwrap().claims.clear();
        assert_eq!(kinds(&check_convergence(&h)), vec![DIVERGENCE]);
    }
}
