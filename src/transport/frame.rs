//! Length-prefixed frames: a 4-byte big-endian length N, then N bytes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame of the agent protocol.
pub const MAX_AGENT_FRAME: usize = 65536;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame length is zero")]
    Empty,
    #[error("frame length {len} is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("frame not received in full within {} ms", .0.as_millis())]
    TimedOut(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The error of type `T` (quinn's `ReadError` or `WriteError`, say) behind an IO failure.
    pub fn source_of<T: std::error::Error + 'static>(&self) -> Option<&T> {
        match self {
            FrameError::Io(e) => e.get_ref()?.downcast_ref::<T>(),
            _ => None,
        }
    }
}

/// Prefixes `payload` with its length.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads one frame of at most `max` bytes. The length is checked before the body is read.
///
/// # Errors
/// Zero or over-long length, end of stream inside the frame, or an IO error.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    read_frame_within(r, max, None).await
}

/// Bytes that the frames over 4 KiB being read from one sender may hold at once
/// (see [`read_stream_frame_within`]).
pub struct FrameBudget {
    bytes: tokio::sync::Semaphore,
    total: usize,
}

impl FrameBudget {
    #[must_use]
    pub fn new(total: usize) -> FrameBudget {
        FrameBudget {
            bytes: tokio::sync::Semaphore::new(total),
            total,
        }
    }
}

async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    budget: Option<&FrameBudget>,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    read_exact(r, &mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len <= SMALL_FRAME {
        let mut body = vec![0u8; len];
        read_exact(r, &mut body).await?;
        return Ok(body);
    }
    // Its share of the budget, held until it has arrived whole (waited for in turn: the
    // semaphore is fair). Never more than the whole budget, so a frame always fits.
    let _share = match budget {
        Some(b) => {
            let share = u32::try_from(len.min(b.total)).unwrap_or(u32::MAX);
            b.bytes.acquire_many(share).await.ok()
        }
        None => None,
    };
    // A bigger one is grown as it arrives, not sized by the length announced: a sender that
    // announces large frames and sends little (on many streams at once) holds only what it
    // sent.
    let mut body = Vec::with_capacity(SMALL_FRAME);
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(FrameError::Truncated);
    }
    Ok(body)
}

/// Frames up to this size are read into a buffer of their announced size at once (most
/// frames; an agent's requests are a few hundred bytes).
const SMALL_FRAME: usize = 4096;

/// Reads the one frame a QUIC stream carries (a request or its answer), then the end of the
/// stream if it has arrived with it (see [`read_end_if_there`]). Only for streams that carry
/// nothing after their frame (a backup, say, follows its answer frame: use [`read_frame`]).
///
/// # Errors
/// As [`read_frame`].
pub async fn read_stream_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    read_stream_frame_within(recv, max, None).await
}

/// As [`read_stream_frame`], where the frames over 4 KiB read at once with
/// the same `budget` (an agent connection's requests) hold at most its bytes between them
/// while they arrive: a frame that would take more waits, unread, until others are whole.
/// Waiting, it leaves its bytes with QUIC, whose flow control then stops the sender.
///
/// # Errors
/// As [`read_frame`].
pub async fn read_stream_frame_within(
    recv: &mut quinn::RecvStream,
    max: usize,
    budget: Option<&FrameBudget>,
) -> Result<Vec<u8>, FrameError> {
    let body = read_frame_within(recv, max, budget).await?;
    read_end_if_there(recv);
    Ok(body)
}

/// Reads the end of a stream whose frame has been read, if the end has arrived; never waits.
///
/// Both sides finish their send side right after their frame, so the end is nearly always
/// there. Reading it matters: quinn answers a receive stream dropped before its end was read
/// with a STOP_SENDING frame, even when the end had arrived, and that frame went out in a
/// packet of its own after every answer a node gave (measured at 64 claims in flight: 2.1
/// datagrams to the client per claim, 1.1 without it). If data follows the frame instead of
/// the end, some of it is read and dropped: only for streams whose frame is all they carry.
pub fn read_end_if_there(recv: &mut quinn::RecvStream) {
    use futures::FutureExt;
    let _ = recv.read_chunk(1, true).now_or_never();
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Writes one frame.
///
/// # Errors
/// An empty or over-long payload, or an IO error.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    if payload.len() > u32::MAX as usize {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: u32::MAX as usize,
        });
    }
    w.write_all(&encode_frame(payload)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_arrive_whole_in_pieces_and_are_refused_when_cut_or_too_long() {
        // A big frame, written in small pieces while it is read.
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let (mut w, mut r) = tokio::io::duplex(1000);
        let sent = payload.clone();
        let writer = tokio::spawn(async move { write_frame(&mut w, &sent).await });
        assert_eq!(read_frame(&mut r, 1 << 20).await.unwrap(), payload);
        writer.await.unwrap().unwrap();

        // The stream ends inside the body.
        let mut cut = encode_frame(b"0123456789");
        cut.truncate(9);
        let e = read_frame(&mut &cut[..], 100).await.unwrap_err();
        assert!(matches!(e, FrameError::Truncated), "{e}");
        // Longer than allowed: refused on its length, before the body.
        let e = read_frame(&mut &encode_frame(&[7; 101])[..], 100)
            .await
            .unwrap_err();
        assert!(
            matches!(e, FrameError::TooLarge { len: 101, max: 100 }),
            "{e}"
        );
        let e = read_frame(&mut &[0u8, 0, 0, 0][..], 100).await.unwrap_err();
        assert!(matches!(e, FrameError::Empty), "{e}");
    }
}
