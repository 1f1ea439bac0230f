//! Length-prefixed frames: a 4-byte big-endian length N, then N bytes.

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
    let mut header = [0u8; 4];
    read_exact(r, &mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    read_exact(r, &mut body).await?;
    Ok(body)
}

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
    let body = read_frame(recv, max).await?;
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
