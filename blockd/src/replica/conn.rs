//! Reading and writing whole frames on an async stream.

use super::wire::{self, Frame, Message, WireError};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn invalid(e: WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Reads one frame; any checksum or format error is an `InvalidData` error (the caller closes
/// the connection: after a bad frame the stream cannot be trusted).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Frame> {
    let mut buf = vec![0u8; wire::HEADER_LEN];
    r.read_exact(&mut buf).await?;
    let h = wire::parse_header(&buf).map_err(invalid)?;
    let rest = h.body_len as usize + h.payload_len as usize;
    buf.resize(wire::HEADER_LEN + rest, 0);
    r.read_exact(&mut buf[wire::HEADER_LEN..]).await?;
    let (f, _) = wire::parse_frame(&buf).map_err(invalid)?;
    Ok(f)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    id: u64,
    msg: &Message,
    payload: &[u8],
) -> io::Result<()> {
    let mut out = Vec::with_capacity(wire::HEADER_LEN + 128 + payload.len());
    wire::emit_frame(&mut out, id, msg, payload);
    w.write_all(&out).await
}
