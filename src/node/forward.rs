//! Forwarding on a follower: writes that agents send to this node go to the leader in
//! batches, one peer stream for many of them.
//!
//! Like the leader's proposer (`propose.rs`), the forwarder keeps at most [`IN_FLIGHT`] calls
//! to a leader outstanding; writes that arrive meanwhile wait and go out together in the
//! next one, as a `ForwardBatch`. A write with nothing else waiting goes out alone, as a
//! plain `Forward`, without waiting for company. The leader proposes the commands of a batch
//! together, so they usually share one log entry too.
//!
//! Each leader has its own lane (queue, slots and task): calls to a leader that died hold
//! its slots until they time out, and must not hold up the writes for the next one.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::propose::{free_slot, next_batch};

use crate::raft::network::{ForwardError, Newer, PeerClient, PeerError, PeerRequest, PeerResponse};
use crate::raft::types::NodeId;
use crate::registry::{Command, Response};

/// Calls to the leader outstanding at once; more writes than this wait and are batched.
const IN_FLIGHT: usize = 4;
/// Most commands in one call.
const MAX_BATCH: usize = 256;
/// Rough upper bound on one call's encoded size.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// What the leader answered for one forwarded write.
pub(super) type Forwarded = Result<(u64, Response), ForwardError>;

struct Pending {
    cmd: Command,
    deadline: Instant,
    reply: oneshot::Sender<Result<Forwarded, PeerError>>,
}

/// Handle to the forwarder. Clones share it.
#[derive(Clone)]
pub(crate) struct Forwarder {
    /// One lane per leader and address (a node that moved gets a new lane).
    lanes: Arc<std::sync::Mutex<Lanes>>,
    stop: CancellationToken,
    counters: Counters,
}

/// The lanes by leader and address.
type Lanes = HashMap<(NodeId, String), mpsc::UnboundedSender<Pending>>;

/// What the forwarder counts.
type Counters = super::metrics::Forwarding;

impl Forwarder {
    /// A forwarder whose lanes stop when `stop` is cancelled.
    pub(crate) fn start(stop: CancellationToken, counters: Counters) -> Forwarder {
        Forwarder {
            lanes: Arc::default(),
            stop,
            counters,
        }
    }

    /// Queues `pending` in the lane of `leader`, starting the lane if need be. Gives it back
    /// if the forwarder has stopped.
    fn enqueue(&self, leader: Arc<PeerClient>, pending: Pending) -> Result<(), Pending> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let lane = (leader.target(), leader.addr().to_owned());
        let pending = match lanes.get(&lane) {
            Some(lane) => match lane.send(pending) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(p)) => p,
            },
            None => pending,
        };
        if self.stop.is_cancelled() {
            return Err(pending);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, leader, self.stop.clone(), self.counters.clone()));
        let sent = tx.send(pending).map_err(|mpsc::error::SendError(p)| p);
        lanes.insert(lane, tx);
        sent
    }

    /// Sends `cmd` to `leader` and waits for its answer until `deadline`. The errors are the
    /// peer link's: [`PeerError::Unreachable`] means the write was certainly not delivered.
    pub(super) async fn forward(
        &self,
        leader: Arc<PeerClient>,
        cmd: Command,
        deadline: Instant,
    ) -> Result<Forwarded, PeerError> {
        let target = leader.target();
        let after = deadline.saturating_duration_since(Instant::now());
        let timeout = || PeerError::Timeout { target, after };
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            cmd,
            deadline,
            reply,
        };
        if self.enqueue(leader, pending).is_err() {
            return Err(PeerError::Unreachable {
                target,
                addr: String::new(),
                reason: "this node is stopping".into(),
            });
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(r)) => r,
            // The forwarder stopped with the call outstanding: the write may have arrived.
            Ok(Err(_)) => Err(PeerError::Failed {
                target,
                reason: "this node stopped before the leader answered".into(),
            }),
            Err(_) => Err(timeout()),
        }
    }
}

/// One leader's lane: batches its writes, at most [`IN_FLIGHT`] calls at once.
async fn run(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    leader: Arc<PeerClient>,
    stop: CancellationToken,
    counters: Counters,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Some(slot) = free_slot(&slots, &stop).await else {
            return;
        };
        // Asked once a write is there: a refusal may have been learnt while this waited.
        let most = || {
            if leader.takes(Newer::Batches) {
                MAX_BATCH
            } else {
                1
            }
        };
        let Some(batch) =
            next_batch(&mut rx, &stop, most, MAX_BATCH_BYTES, |p| p.cmd.size_hint()).await
        else {
            return;
        };
        counters.calls.inc();
        counters.writes.inc_by(batch.len() as u64);
        let leader = leader.clone();
        tokio::spawn(async move {
            call(&leader, batch).await;
            drop(slot);
        });
    }
}

/// Sends `batch` to `leader` in one call and answers every write in it.
async fn call(leader: &PeerClient, batch: Vec<Pending>) {
    let deadline = batch
        .iter()
        .map(|p| p.deadline)
        .max()
        .unwrap_or_else(Instant::now);
    let (mut cmds, replies): (Vec<Command>, Vec<_>) =
        batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    if !leader.takes(Newer::ClaimTokens) {
        cmds = cmds.into_iter().map(Command::without_claim_token).collect();
    }
    let answers = forward_all(leader, cmds, deadline).await;
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}

/// Forwards `cmds` in one call and gives an answer for each, in order. A leader of an
/// earlier build (a rolling upgrade: docs/operations.md) refuses unread a call it cannot
/// decode, which changes nothing; the writes then go again in what it reads: first without
/// claim tokens, then one by one.
async fn forward_all(
    leader: &PeerClient,
    cmds: Vec<Command>,
    deadline: Instant,
) -> Vec<Result<Forwarded, PeerError>> {
    let n = cmds.len();
    let (mut reason, mut cmds) = match send(leader, cmds, deadline).await {
        Sent::Answered(answers) => return answers,
        Sent::Refused { reason, cmds } => (reason, cmds),
    };
    if cmds.iter().any(Command::has_claim_token) {
        tracing::info!(
            leader = leader.target(),
            reason,
            "the leader does not take claim tokens; forwarding claims without them (not repeatable until it is upgraded)"
        );
        leader.refused(Newer::ClaimTokens);
        let plain = cmds.into_iter().map(Command::without_claim_token).collect();
        (reason, cmds) = match send(leader, plain, deadline).await {
            Sent::Answered(answers) => return answers,
            Sent::Refused { reason, cmds } => (reason, cmds),
        };
    }
    if n == 1 {
        return vec![Err(PeerError::Refused {
            target: leader.target(),
            reason,
        })];
    }
    tracing::info!(
        leader = leader.target(),
        reason,
        "the leader does not take batched forwards; forwarding one by one"
    );
    leader.refused(Newer::Batches);
    let singles = cmds.into_iter().map(|cmd| async move {
        match send(leader, vec![cmd], deadline).await {
            Sent::Answered(mut answers) => answers.pop().expect("one answer for one write"),
            Sent::Refused { reason, .. } => Err(PeerError::Refused {
                target: leader.target(),
                reason,
            }),
        }
    });
    futures::future::join_all(singles).await
}

/// What one call to the leader came to.
enum Sent {
    /// An answer for each write, in order.
    Answered(Vec<Result<Forwarded, PeerError>>),
    /// The leader refused the call unread: the writes, back.
    Refused { reason: String, cmds: Vec<Command> },
}

/// One call: a single write as a plain `Forward` (which every build reads), several as a
/// `ForwardBatch`.
async fn send(leader: &PeerClient, mut cmds: Vec<Command>, deadline: Instant) -> Sent {
    let n = cmds.len();
    let budget = deadline.saturating_duration_since(Instant::now());
    let (req, sent) = if n == 1 {
        (PeerRequest::Forward(cmds.remove(0)), "forward")
    } else {
        (PeerRequest::ForwardBatch(cmds), "forward_batch")
    };
    let answers = match (leader.call(&req, budget).await, req) {
        (Ok(PeerResponse::Forward(r)), PeerRequest::Forward(_)) => Ok(vec![r]),
        (Ok(PeerResponse::ForwardBatch(rs)), PeerRequest::ForwardBatch(_)) if rs.len() == n => {
            Ok(rs)
        }
        (Ok(PeerResponse::ForwardBatch(rs)), PeerRequest::ForwardBatch(_)) => {
            Err(PeerError::Failed {
                target: leader.target(),
                reason: format!("answered {} results for {n} forwarded writes", rs.len()),
            })
        }
        (Ok(other), _) => Err(mismatch(leader, sent, other.kind())),
        (Err(PeerError::Refused { reason, .. }), req) => {
            let cmds = match req {
                PeerRequest::Forward(cmd) => vec![cmd],
                PeerRequest::ForwardBatch(cmds) => cmds,
                _ => unreachable!("built above"),
            };
            return Sent::Refused { reason, cmds };
        }
        (Err(e), _) => Err(e),
    };
    Sent::Answered(match answers {
        Ok(rs) => rs.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(e); n],
    })
}

fn mismatch(leader: &PeerClient, sent: &'static str, got: &'static str) -> PeerError {
    PeerError::Mismatch {
        target: leader.target(),
        sent,
        got,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    use super::*;
    use crate::raft::network::{PeerDialer, BAD_FRAME, MAX_PEER_FRAME};
    use crate::raft::types::codec;
    use crate::registry::{ClaimArgs, Op, Outcome, TokenHash};
    use crate::transport::frame::{read_frame, write_frame};
    use crate::transport::tls::{self, NodeTls, TlsFiles};

    fn node_tls(dir: &std::path::Path, id: u64) -> NodeTls {
        NodeTls::load(&TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("node{id}.pem")),
            key: dir.join(format!("node{id}.key")),
        })
        .unwrap()
    }

    /// A leader of a build before `ForwardBatch`: it answers every `Forward` and closes the
    /// stream of anything else with `BAD_FRAME`, unread. Counts what it got.
    #[derive(Default)]
    struct OldLeader {
        singles: AtomicUsize,
        batches: AtomicUsize,
    }

    /// Accepts peer connections on `endpoint` and hands every stream, with the request it
    /// carried, to `handle`.
    async fn serve<F, Fut>(endpoint: quinn::Endpoint, handle: F)
    where
        F: Fn(quinn::SendStream, quinn::RecvStream, Vec<u8>) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            tls::widen_streams(&conn);
            let handle = handle.clone();
            tokio::spawn(async move {
                while let Ok((send, mut recv)) = conn.accept_bi().await {
                    let bytes = read_frame(&mut recv, MAX_PEER_FRAME).await.unwrap();
                    tokio::spawn(handle(send, recv, bytes));
                }
            });
        }
    }

    async fn serve_old_leader(endpoint: quinn::Endpoint, seen: Arc<OldLeader>) {
        serve(endpoint, move |mut send, mut recv, bytes| {
            let seen = seen.clone();
            async move {
                match codec::decode::<PeerRequest>(&bytes).unwrap() {
                    PeerRequest::Forward(_) => {
                        let n = seen.singles.fetch_add(1, SeqCst) as u64;
                        let answer = PeerResponse::Forward(Ok((100 + n, Ok(Outcome::Noop))));
                        write_frame(&mut send, &codec::encode(&answer).unwrap())
                            .await
                            .unwrap();
                        let _ = send.finish();
                    }
                    _ => {
                        seen.batches.fetch_add(1, SeqCst);
                        let _ = recv.stop(BAD_FRAME);
                        let _ = send.reset(BAD_FRAME);
                    }
                }
            }
        })
        .await
    }

    /// A leader that reads every request and never answers (a paused or dead process).
    async fn serve_black_hole(endpoint: quinn::Endpoint, seen: Arc<AtomicUsize>) {
        serve(endpoint, move |send, recv, _| {
            seen.fetch_add(1, SeqCst);
            async move {
                let _open = (send, recv);
                std::future::pending::<()>().await
            }
        })
        .await
    }

    fn server(dir: &std::path::Path) -> quinn::Endpoint {
        quinn::Endpoint::server(
            node_tls(dir, 1)
                .server_config(Duration::from_secs(60))
                .unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap()
    }

    fn client(dir: &std::path::Path, target: u64, server: &quinn::Endpoint) -> Arc<PeerClient> {
        Arc::new(PeerClient::new(
            target,
            server.local_addr().unwrap().to_string(),
            PeerDialer {
                endpoint: quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(),
                client_config: node_tls(dir, 2).peer_client_config().unwrap(),
                server_name: tls::DEFAULT_SERVER_NAME.into(),
            },
        ))
    }

    /// Calls to a leader that stopped answering hold its lane's slots until they time out;
    /// the writes for the next leader go through meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_old_leader_does_not_hold_up_writes_for_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        crate::transport::devcerts::write_dev_material(dir.path(), &[1, 2], &[], false).unwrap();
        let silent = server(dir.path());
        let reached_silent = Arc::new(AtomicUsize::new(0));
        tokio::spawn(serve_black_hole(silent.clone(), reached_silent.clone()));
        let new = server(dir.path());
        tokio::spawn(serve_old_leader(new.clone(), Arc::default()));
        let (old_leader, new_leader) =
            (client(dir.path(), 1, &silent), client(dir.path(), 3, &new));

        let stop = CancellationToken::new();
        let forwarder = Forwarder::start(stop.clone(), Counters::default());
        // One at a time until every slot of the silent leader's lane holds a call, then as
        // many more waiting in its queue.
        let until = Instant::now() + Duration::from_secs(20);
        let mut stuck = Vec::new();
        for i in 0..2 * IN_FLIGHT {
            let (f, l) = (forwarder.clone(), old_leader.clone());
            stuck.push(tokio::spawn(async move {
                f.forward(l, write(i as u64), Instant::now() + Duration::from_secs(60))
                    .await
            }));
            while i < IN_FLIGHT && reached_silent.load(SeqCst) <= i {
                assert!(Instant::now() < until, "the silent leader was not called");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        let deadline = Instant::now() + Duration::from_secs(20);
        all_answered(&forwarder, &new_leader, (100..110).map(write), deadline).await;
        assert!(
            stuck.iter().all(|t| !t.is_finished()),
            "the silent leader answered"
        );
        stop.cancel();
        for t in stuck {
            t.abort();
        }
    }

    /// A leader of the build before claim tokens: it reads batched forwards, but refuses
    /// unread (`BAD_FRAME`) any call holding a claim with a token, as that build cannot
    /// decode it. Counts what it refused and keeps the claims it answered.
    #[derive(Default)]
    struct TokenlessLeader {
        refused: AtomicUsize,
        batches: AtomicUsize,
        claims: std::sync::Mutex<Vec<Command>>,
    }

    async fn serve_tokenless_leader(endpoint: quinn::Endpoint, seen: Arc<TokenlessLeader>) {
        serve(endpoint, move |mut send, mut recv, bytes| {
            let seen = seen.clone();
            async move {
                let (cmds, batched) = match codec::decode::<PeerRequest>(&bytes).unwrap() {
                    PeerRequest::Forward(cmd) => (vec![cmd], false),
                    PeerRequest::ForwardBatch(cmds) => (cmds, true),
                    _ => unreachable!("only forwards are sent"),
                };
                if cmds.iter().any(Command::has_claim_token) {
                    seen.refused.fetch_add(1, SeqCst);
                    let _ = recv.stop(BAD_FRAME);
                    let _ = send.reset(BAD_FRAME);
                    return;
                }
                let n = cmds.len();
                seen.claims.lock().unwrap().extend(cmds);
                let answer = |i| Ok((i as u64, Ok(Outcome::Noop)));
                let answer = if batched {
                    seen.batches.fetch_add(1, SeqCst);
                    PeerResponse::ForwardBatch((0..n).map(answer).collect())
                } else {
                    PeerResponse::Forward(answer(0))
                };
                write_frame(&mut send, &codec::encode(&answer).unwrap())
                    .await
                    .unwrap();
                let _ = send.finish();
            }
        })
        .await
    }

    fn claim_with_token(i: u64) -> Command {
        Command {
            at: i,
            op: Op::ClaimWithToken {
                claim: ClaimArgs {
                    agent_id: format!("agent-{i}"),
                    ttl_secs: 3600,
                    force: false,
                    proof: None,
                    conn: None,
                },
                token: TokenHash::of(&format!("token-of-claim-{i:08}")),
            },
        }
    }

    /// During a rolling upgrade, a claim with a token that reaches a leader of the build
    /// before claim tokens goes again without its token (a plain claim), once refused; the
    /// claims after it go without one from the start, still in batches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_cannot_read_claim_tokens_gets_plain_claims() {
        let dir = tempfile::tempdir().unwrap();
        crate::transport::devcerts::write_dev_material(dir.path(), &[1, 2], &[], false).unwrap();
        let server = server(dir.path());
        let seen = Arc::new(TokenlessLeader::default());
        tokio::spawn(serve_tokenless_leader(server.clone(), seen.clone()));
        let leader = client(dir.path(), 1, &server);
        let stop = CancellationToken::new();
        let forwarder = Forwarder::start(stop.clone(), Counters::default());
        let deadline = Instant::now() + Duration::from_secs(10);

        let answer = forwarder
            .forward(leader.clone(), claim_with_token(0), deadline)
            .await;
        assert!(matches!(answer, Ok(Ok(_))), "{answer:?}");
        assert_eq!(seen.refused.load(SeqCst), 1);
        assert!(!leader.takes(Newer::ClaimTokens));
        assert!(
            leader.takes(Newer::Batches),
            "batches were not what it refused"
        );

        all_answered(&forwarder, &leader, (1..40).map(claim_with_token), deadline).await;
        assert_eq!(seen.refused.load(SeqCst), 1, "refused again");
        assert!(seen.batches.load(SeqCst) >= 1, "no batch");
        // Each claim arrived once, as a plain claim of the same agent.
        let claims = seen.claims.lock().unwrap();
        let mut agents: Vec<String> = claims
            .iter()
            .map(|c| match &c.op {
                Op::Claim(claim) => claim.agent_id.clone(),
                other => panic!("not a plain claim: {other:?}"),
            })
            .collect();
        agents.sort();
        let mut expected: Vec<String> = (0..40).map(|i| format!("agent-{i}")).collect();
        expected.sort();
        assert_eq!(agents, expected);
        stop.cancel();
        server.close(0u32.into(), b"done");
    }

    /// Forwards `cmds` to `leader` all at once; each must be answered by the leader.
    async fn all_answered(
        forwarder: &Forwarder,
        leader: &Arc<PeerClient>,
        cmds: impl Iterator<Item = Command>,
        deadline: Instant,
    ) {
        let answers = futures::future::join_all(
            cmds.map(|cmd| forwarder.forward(leader.clone(), cmd, deadline)),
        )
        .await;
        assert!(
            answers.iter().all(|a| matches!(a, Ok(Ok(_)))),
            "{answers:?}"
        );
    }

    fn write(i: u64) -> Command {
        Command {
            at: i,
            op: Op::Unregister {
                agent_id: format!("agent-{i}"),
                session_id: i,
            },
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_refuses_batches_gets_every_write_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        crate::transport::devcerts::write_dev_material(dir.path(), &[1, 2], &[], false).unwrap();
        let server = quinn::Endpoint::server(
            node_tls(dir.path(), 1)
                .server_config(Duration::from_secs(10))
                .unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let seen = Arc::new(OldLeader::default());
        tokio::spawn(serve_old_leader(server.clone(), seen.clone()));

        let leader = Arc::new(PeerClient::new(
            1,
            addr.to_string(),
            PeerDialer {
                endpoint: quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(),
                client_config: node_tls(dir.path(), 2).peer_client_config().unwrap(),
                server_name: tls::DEFAULT_SERVER_NAME.into(),
            },
        ));
        let stop = CancellationToken::new();
        let counters = Counters::default();
        let forwarder = Forwarder::start(stop.clone(), counters.clone());
        let deadline = Instant::now() + Duration::from_secs(10);

        // Sent all at once: the first goes alone, the rest wait for it and go as a batch,
        // which this leader refuses; they are then sent again one by one.
        let answers = futures::future::join_all(
            (0..50).map(|i| forwarder.forward(leader.clone(), write(i), deadline)),
        )
        .await;
        let mut indexes = std::collections::BTreeSet::new();
        for (i, a) in answers.into_iter().enumerate() {
            match a {
                Ok(Ok((index, Ok(Outcome::Noop)))) => assert!(indexes.insert(index)),
                other => panic!("write {i}: {other:?}"),
            }
        }
        assert!(seen.batches.load(SeqCst) >= 1, "no batch was tried");
        assert_eq!(
            seen.singles.load(SeqCst),
            50,
            "every write read exactly once"
        );
        assert!(!leader.takes(Newer::Batches));

        // Known now: no more batches to this leader on this connection.
        let tried = seen.batches.load(SeqCst);
        all_answered(&forwarder, &leader, (50..80).map(write), deadline).await;
        assert_eq!(seen.batches.load(SeqCst), tried);
        assert_eq!(seen.singles.load(SeqCst), 80);
        stop.cancel();
        server.close(0u32.into(), b"done");
    }
}
