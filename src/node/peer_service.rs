//! The callee side of the peer transport: Raft RPCs and forwarded writes from other nodes.

use std::sync::Arc;

use super::{read, write, Inner};
use crate::raft::network::{PeerRequest, PeerResponse, BAD_FRAME, MAX_PEER_FRAME};
use crate::raft::types::codec;
use crate::transport::frame::{read_stream_frame, write_frame, FrameError};

/// Application error code for a stream whose request was served but whose answer could not
/// be encoded (not [`BAD_FRAME`]: the caller must not think the request was not read).
const ANSWER_LOST: quinn::VarInt = quinn::VarInt::from_u32(0x11);

pub(super) async fn serve(inner: Arc<Inner>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    tracing::debug!(%remote, "peer connected");
    loop {
        let (send, recv) = tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "peer connection ended");
                    break;
                }
            },
        };
        let inner = inner.clone();
        inner.tasks.clone().spawn(async move {
            serve_stream(&inner, send, recv, remote).await;
        });
    }
}

async fn serve_stream(
    inner: &Inner,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    remote: std::net::SocketAddr,
) {
    let req: PeerRequest = match read_stream_frame(&mut recv, MAX_PEER_FRAME).await {
        Ok(bytes) => match codec::decode(&bytes) {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "malformed peer request; closing the stream");
                let _ = recv.stop(BAD_FRAME);
                let _ = send.reset(BAD_FRAME);
                return;
            }
        },
        Err(e) if connection_gone(&e) => {
            // The caller closed the connection (a peer giving up on it, see
            // raft::network::SILENCE_LIMIT) or it timed out: nobody to answer.
            tracing::debug!(%remote, error = %e, "peer connection gone before its request arrived");
            return;
        }
        Err(e) => {
            tracing::warn!(%remote, error = %e, "bad peer frame; closing the stream");
            let _ = recv.stop(BAD_FRAME);
            let _ = send.reset(BAD_FRAME);
            return;
        }
    };
    if matches!(req, PeerRequest::Build)
        && inner
            .act_as_earlier_build
            .load(std::sync::atomic::Ordering::Relaxed)
    {
        // What a build before build probes does with a request it cannot decode (above).
        let _ = recv.stop(BAD_FRAME);
        let _ = send.reset(BAD_FRAME);
        return;
    }
    let raft = &inner.raft;
    // A forwarded write is tracked until its answer is out: see `Inner::forwards`.
    let forward = matches!(req, PeerRequest::Forward(_) | PeerRequest::ForwardBatch(_))
        .then(|| inner.forwards.token());
    let resp = match req {
        PeerRequest::AppendEntries(r) => PeerResponse::AppendEntries(raft.append_entries(r).await),
        PeerRequest::Vote(r) => PeerResponse::Vote(raft.vote(r).await),
        PeerRequest::InstallSnapshot(r) => {
            PeerResponse::InstallSnapshot(raft.install_snapshot(r).await)
        }
        PeerRequest::Forward(cmd) => {
            tracing::debug!(%remote, op = cmd.op.name(), "forwarded write");
            PeerResponse::Forward(write::serve_forward(inner, cmd).await)
        }
        PeerRequest::ForwardBatch(cmds) => {
            tracing::debug!(%remote, writes = cmds.len(), "forwarded writes");
            // Proposed all at once, so that they reach the proposer together.
            let answers = cmds.into_iter().map(|cmd| write::serve_forward(inner, cmd));
            PeerResponse::ForwardBatch(futures::future::join_all(answers).await)
        }
        PeerRequest::ReadIndex => PeerResponse::ReadIndex(read::serve_read_index(inner).await),
        PeerRequest::Clock => PeerResponse::Clock(inner.clock.unix_millis()),
        PeerRequest::Campaign { leader, term } => {
            PeerResponse::Campaign(super::handover::campaign(inner, leader, term).await)
        }
        PeerRequest::Build => PeerResponse::Build(crate::raft::network::BuildInfo::this()),
    };
    let bytes = match codec::encode(&resp) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode peer response");
            let _ = send.reset(ANSWER_LOST);
            return;
        }
    };
    if let Err(e) = write_frame(&mut send, &bytes).await {
        tracing::debug!(%remote, error = %e, "peer went away before the answer");
        return;
    }
    if forward.is_some() && inner.draining.is_cancelled() {
        // Its connection closes soon: the answer must have arrived by then.
        super::finish_and_wait(send).await;
    } else {
        let _ = send.finish();
    }
    drop(forward);
}

/// Whether reading a request failed because the whole connection went away, rather than
/// because of what the peer sent.
fn connection_gone(e: &FrameError) -> bool {
    matches!(
        e.source_of::<quinn::ReadError>(),
        Some(quinn::ReadError::ConnectionLost(_))
    )
}
