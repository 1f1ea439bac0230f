//! Group commit on the leader: commands proposed while an earlier log write is in flight are
//! gathered into one log entry ([`Op::Batch`]), so that one append, one fsync and one
//! replication round carry many of them.
//!
//! openraft 0.9 appends (and flushes) every `client_write` on its own before it looks at the
//! next one, so without this the leader's throughput is one fsync per command. The proposer
//! sends one write at a time: whatever arrives meanwhile waits in the queue and goes out
//! together in the next one. With nothing else in flight a command goes out alone, as a
//! plain entry, without waiting for company. Only a write that has been out for longer than
//! [`OVERLAP_AFTER`] (a slow disk, a lost quorum) lets a second one go out beside it, up to
//! [`IN_FLIGHT`] at once. Two writes overlapping all the time carried fewer commands each
//! and cost more per command: at 64 claims in flight spread over the nodes, 15 claims an
//! entry against 24 with one at a time, and some 10% more CPU per claim (docs/benchmarks.md).
//!
//! A write holds its slot until openraft answers it or the write timeout has passed (when
//! every command in it has been answered "unknown" anyway). openraft answers a write when its
//! entry is applied or truncated on this node; an entry written by this node as a leader cut
//! off from its quorum, whose place in the log a snapshot from the next leader then covers
//! (this node's log being behind the snapshot), is neither, and its write is never answered.
//! Without the bound two such writes held both slots for good, and the node, leading again,
//! proposed nothing (seen in fault runs; `tests/partition.rs` makes it happen). This is
//! openraft's issue #1761 (in 0.10's alphas the next apply panics instead); its fix there
//! (#1762) answers such writes when their entries are purged. 0.9.25 does not have it.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, OwnedRwLockWriteGuard, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::raft::types::{Node, NodeId, Raft};
use crate::registry::{Command, Op, Outcome, Response};

/// Log writes outstanding at once, counting those past [`OVERLAP_AFTER`].
const IN_FLIGHT: usize = 2;
/// How long a write has the proposer to itself; after that the next may go out beside it. A
/// commit takes a few milliseconds on a healthy cluster under load.
const OVERLAP_AFTER: Duration = Duration::from_millis(10);
/// Most commands in one entry.
const MAX_BATCH: usize = 256;
/// Commands stop being added to an entry once it holds this many bytes (it then holds this
/// plus at most one command, itself under the 64 KiB agent frame): it bounds one log write
/// and one AppendEntries. At 64 claims in flight an entry holds a few KiB.
const MAX_BATCH_BYTES: usize = 32 * 1024;

pub(super) type ProposeError = RaftError<NodeId, ClientWriteError<NodeId, Node>>;

/// The answer to one proposed command: the log index of the entry that carried it and what
/// the state machine answered.
pub(super) type Proposed = Result<(u64, Response), ProposeError>;

struct Pending {
    cmd: Command,
    reply: oneshot::Sender<Proposed>,
}

/// Handle to the proposer task. Clones share it.
#[derive(Clone)]
pub(crate) struct Proposer {
    tx: mpsc::UnboundedSender<Pending>,
    /// Read by every write while it is out; written by [`Proposer::hold`].
    gate: Arc<RwLock<()>>,
}

impl Proposer {
    /// Starts the proposer task; it stops when `stop` is cancelled. A write not answered
    /// within `write_timeout` gives up its slot (and its commands' answers).
    pub(crate) fn start(raft: Raft, write_timeout: Duration, stop: CancellationToken) -> Proposer {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(RwLock::new(()));
        tokio::spawn(run(raft, write_timeout, rx, gate.clone(), stop));
        Proposer { tx, gate }
    }

    /// Waits until every write out has been answered, then keeps new ones from going out
    /// (they queue) until the guard is dropped: the log stays as it is meanwhile, as a
    /// leadership hand-over needs (`handover.rs`). A write openraft never answers holds it
    /// up to the write timeout; callers bound the wait.
    pub(super) async fn hold(&self) -> OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    /// Proposes `cmd` and waits until it is committed and applied. `None` if the node is
    /// stopping (the command was not proposed, or its outcome will never be known here).
    pub(super) async fn propose(&self, cmd: Command) -> Option<Proposed> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Pending { cmd, reply }).ok()?;
        answer.await.ok()
    }
}

async fn run(
    raft: Raft,
    write_timeout: Duration,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    gate: Arc<RwLock<()>>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // The right to send the next write: a write keeps it until it is answered or
    // OVERLAP_AFTER has passed.
    let turn = Arc::new(Semaphore::new(1));
    loop {
        // Wait for a free slot and the turn first: meanwhile commands pile up in the queue.
        let Some(slot) = free_slot(&slots, &stop).await else {
            return;
        };
        let Some(my_turn) = free_slot(&turn, &stop).await else {
            return;
        };
        let Some(batch) = next_batch(
            &mut rx,
            &stop,
            || MAX_BATCH,
            MAX_BATCH_BYTES,
            |p| p.cmd.size_hint(),
        )
        .await
        else {
            return;
        };
        // Not while the proposer is held (the lock is fair: a hold waiting goes first).
        let out = tokio::select! {
            _ = stop.cancelled() => return,
            g = gate.clone().read_owned() => g,
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            // Every caller in the batch waits at most the write timeout from before it was
            // sent: past it nobody is left to answer, and a write openraft will never answer
            // (see the module docs) must not keep the slot.
            let write = tokio::time::timeout(write_timeout, commit(&raft, batch));
            tokio::pin!(write);
            let answered = tokio::select! {
                done = &mut write => Some(done),
                () = tokio::time::sleep(OVERLAP_AFTER) => None,
            };
            drop(my_turn);
            let done = match answered {
                Some(done) => done,
                None => write.await,
            };
            if done.is_err() {
                tracing::warn!(
                    after = ?write_timeout,
                    "a proposed write got no answer from Raft; its slot is freed"
                );
            }
            drop((slot, out));
        });
    }
}

/// Waits for one of `slots` to be free; `None` once `stop` is cancelled. Shared by the
/// proposer, the forwarder and the coalescer, which each keep a few calls in flight.
pub(super) async fn free_slot(
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    tokio::select! {
        _ = stop.cancelled() => None,
        s = slots.clone().acquire_owned() => s.ok(),
    }
}

/// Waits for the next item of `rx`, then takes whatever else is queued already, up to `most()`
/// items (asked once the first is there) or until they add up to `max_bytes` (by `size`). `None` once `stop` is cancelled
/// or the queue is closed. Shared by the proposer and the forwarder.
pub(super) async fn next_batch<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    stop: &CancellationToken,
    most: impl FnOnce() -> usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Option<Vec<T>> {
    let first = tokio::select! {
        _ = stop.cancelled() => return None,
        p = rx.recv() => p?,
    };
    let most = most();
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < most && bytes < max_bytes {
        match rx.try_recv() {
            Ok(p) => {
                bytes += size(&p);
                batch.push(p);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Writes `batch` as one entry and answers every command in it.
async fn commit(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Pending { cmd, reply } = batch.remove(0);
        let answer = raft
            .client_write(cmd)
            .await
            .map(|r| (r.log_id.index, r.data));
        let _ = reply.send(answer);
        return;
    }
    let (cmds, replies): (Vec<Command>, Vec<oneshot::Sender<Proposed>>) =
        batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let at = cmds.iter().map(|c| c.at).max().unwrap_or_default();
    let n = cmds.len();
    let entry = Command {
        at,
        op: Op::Batch(cmds),
    };
    match raft.client_write(entry).await {
        Ok(r) => {
            let index = r.log_id.index;
            match r.data {
                Ok(Outcome::Batch(answers)) if answers.len() == n => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(Ok((index, answer)));
                    }
                }
                // The state machine answers a batch with a batch of the same length; anything
                // else is a bug, and its waiters learn nothing certain.
                other => {
                    tracing::error!(index, answer = ?other, "a batch entry was not answered per command");
                    drop(replies);
                }
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClaimArgs, ConnRef};

    /// A full entry of claims is cut by the count, not by the bytes: with a claim counted
    /// as 512 bytes the byte limit cut entries at 64 claims.
    #[test]
    fn a_full_entry_of_claims_fits_the_byte_limit() {
        let claim = |i: u64| Command {
            at: 1_800_000_000,
            op: Op::Claim(ClaimArgs {
                agent_id: format!("agent-{i:020}"),
                ttl_secs: 3600,
                force: false,
                proof: None,
                conn: Some(ConnRef {
                    node_id: 3,
                    conn_id: u64::MAX,
                }),
            }),
        };
        let bytes: usize = (0..MAX_BATCH as u64).map(|i| claim(i).size_hint()).sum();
        assert!(
            bytes < MAX_BATCH_BYTES,
            "{MAX_BATCH} claims count {bytes} bytes, over the limit of {MAX_BATCH_BYTES}"
        );
    }
}
