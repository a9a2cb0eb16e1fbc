//! The replica protocol's wire format: pure code, no I/O.
//!
//! Every frame is a fixed 32-byte header, a typed body and an optional data payload:
//!
//! ```text
//!  0  magic "FRP1" (u32 LE 0x3150_5246)   4  version u8 (1)   5  kind u8   6  flags u16
//!  8  request id u64                      16 body length u32  20 payload length u32
//!  24 payload crc32 u32                   28 header crc32 u32 (over bytes 0..28 and the body)
//!  32 body (body length bytes)            …  payload (payload length bytes)
//! ```
//! All integers are little-endian. A frame whose header or payload fails its crc32 is
//! rejected as a whole; nothing in it is trusted. Requests carry the writer's lease epoch so a
//! replica can refuse a fenced gateway; writes carry the chunk version they produce.

pub const MAGIC: u32 = 0x3150_5246; // "FRP1"
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 32;
/// Largest body: the biggest typed message (a version list of a large volume is paged).
pub const MAX_BODY: u32 = 64 << 10;
/// Largest payload: one chunk image (written-block bitmap plus a whole chunk of data).
pub const MAX_PAYLOAD: u32 = (4 << 20) + BITMAP_LEN as u32;
/// Bytes of a chunk's written-block bitmap in a chunk image (1024 blocks of 4 KiB).
pub const BITMAP_LEN: usize = 128;
/// Blocks per chunk and block size, as in the chunk store.
pub const CHUNK_BLOCKS: usize = 1024;
pub const BLOCK: usize = 4096;
/// "No more entries" in `VersionList::next`.
pub const END: u64 = u64::MAX;
/// Entries of a `VersionList` that fit in one body.
pub const MAX_VERSION_ENTRIES: usize = (MAX_BODY as usize - 12) / 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("body of {0} bytes exceeds the limit")]
    BodyTooLarge(u32),
    #[error("payload of {0} bytes exceeds the limit")]
    PayloadTooLarge(u32),
    #[error("malformed {0} body")]
    Malformed(&'static str),
}

/// Chunk address on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub volume: u64,
    pub index: u64,
}

/// Typed messages (the body; data travels in the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame each side sends: who it is and a nonce for the peer to authenticate.
    Hello {
        cluster_id: String,
        node: String,
        nonce: [u8; 32],
    },
    /// Proof of the cluster secret: a MAC over the peer's nonce.
    Auth { mac: [u8; 32] },
    /// Read `len` bytes at `offset` of a chunk (payload of the reply: the data).
    Read {
        chunk: Chunk,
        offset: u32,
        len: u32,
        epoch: u64,
    },
    /// Write the payload at `offset`; the chunk's version becomes `version`.
    Write {
        chunk: Chunk,
        offset: u32,
        epoch: u64,
        version: u64,
        fua: bool,
    },
    /// Make everything written so far durable. `volume` (with `epoch`) is fenced like any
    /// I/O; 0 means no volume in particular.
    Flush { volume: u64, epoch: u64 },
    /// Version and digest of every chunk of a volume held here with index >= `start`
    /// (reply: `VersionList`, paged). A non-zero epoch is admitted (and raises the fence)
    /// like any I/O; 0 is a read-only query (verification) that checks no fence.
    Versions { volume: u64, start: u64, epoch: u64 },
    /// Per-block crc32s of a chunk (reply payload: LE u32 array) and its version.
    Checksums { chunk: Chunk },
    /// Copy a whole chunk from the peer (resync source side; reply payload: a chunk image,
    /// see `encode_image`).
    Fetch { chunk: Chunk, epoch: u64 },
    /// Answer to any request: 0 or an errno; the chunk version where one applies.
    Reply { status: u32, version: u64 },
    /// Answer to `Versions`: `(index, version, digest)` by index; `next` is the index to ask
    /// from for the next page, or `END`.
    VersionList { entries: Vec<ChunkState>, next: u64 },
    /// Zero (or with `punch`, deallocate) `len` bytes at `offset` of a chunk.
    Zero {
        chunk: Chunk,
        offset: u32,
        len: u32,
        epoch: u64,
        version: u64,
        punch: bool,
        fua: bool,
    },
    /// Replace a whole chunk with the image in the payload and set its version to exactly
    /// `version` (resync target side).
    Install {
        chunk: Chunk,
        epoch: u64,
        version: u64,
    },
}

/// A chunk's state as replicas compare it: its version and a digest of its content
/// (`digest_of`); a chunk that is not stored reads as `(0, EMPTY_DIGEST)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkState {
    pub index: u64,
    pub version: u64,
    pub digest: u32,
}

/// The digest of a chunk: crc32 over, for each block in order, the block's crc32 if it is
/// written and 0 if not. Equal digests mean equal content (up to crc32 collisions), holes
/// included.
pub fn digest_of(written: impl Fn(usize) -> bool, crcs: &[u32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (b, c) in crcs.iter().enumerate() {
        let v = if written(b) { *c } else { 0 };
        h.update(&v.to_le_bytes());
    }
    h.finalize()
}

/// Digest of a chunk with nothing written (also of a chunk that is not stored).
pub fn empty_digest() -> u32 {
    digest_of(|_| false, &[0u32; CHUNK_BLOCKS])
}

/// A chunk image: the written-block bitmap (bit b of byte b/8) followed by the data of the
/// written blocks only, in block order.
pub fn encode_image(bitmap: &[u8; BITMAP_LEN], blocks: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BITMAP_LEN + blocks.len());
    out.extend_from_slice(bitmap);
    out.extend_from_slice(blocks);
    out
}

/// Splits a chunk image into its bitmap and block data, checking that the data holds exactly
/// one block per set bit.
pub fn parse_image(p: &[u8]) -> Result<([u8; BITMAP_LEN], &[u8]), WireError> {
    if p.len() < BITMAP_LEN {
        return Err(WireError::Malformed("chunk image"));
    }
    let mut bm = [0u8; BITMAP_LEN];
    bm.copy_from_slice(&p[..BITMAP_LEN]);
    let n: usize = bm.iter().map(|b| b.count_ones() as usize).sum();
    if p.len() - BITMAP_LEN != n * BLOCK {
        return Err(WireError::Malformed("chunk image"));
    }
    Ok((bm, &p[BITMAP_LEN..]))
}

/// Whether block `b` is set in an image bitmap.
pub fn bit(bm: &[u8; BITMAP_LEN], b: usize) -> bool {
    bm[b / 8] & (1 << (b % 8)) != 0
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Auth { .. } => 2,
            Message::Read { .. } => 3,
            Message::Write { .. } => 4,
            Message::Flush { .. } => 5,
            Message::Versions { .. } => 6,
            Message::Checksums { .. } => 7,
            Message::Fetch { .. } => 8,
            Message::Reply { .. } => 9,
            Message::VersionList { .. } => 10,
            Message::Zero { .. } => 11,
            Message::Install { .. } => 12,
        }
    }
}

/// A whole frame: request id, message and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: u64,
    pub msg: Message,
    pub payload: Vec<u8>,
}

/// The parsed fixed header (what a reader needs to know how much more to read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u16,
    pub id: u64,
    pub body_len: u32,
    pub payload_len: u32,
    pub payload_crc: u32,
    pub header_crc: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Parses and bounds-checks the 32-byte header (its crc is checked with the body).
pub fn parse_header(b: &[u8]) -> Result<Header, WireError> {
    if b.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            need: HEADER_LEN,
            have: b.len(),
        });
    }
    let magic = u32_at(b, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if b[4] != VERSION {
        return Err(WireError::Version(b[4]));
    }
    let h = Header {
        kind: b[5],
        flags: u16_at(b, 6),
        id: u64_at(b, 8),
        body_len: u32_at(b, 16),
        payload_len: u32_at(b, 20),
        payload_crc: u32_at(b, 24),
        header_crc: u32_at(b, 28),
    };
    if !(1..=12).contains(&h.kind) {
        return Err(WireError::UnknownKind(h.kind));
    }
    if h.flags != 0 {
        return Err(WireError::Malformed("header flags (reserved, must be 0)"));
    }
    if h.body_len > MAX_BODY {
        return Err(WireError::BodyTooLarge(h.body_len));
    }
    if h.payload_len > MAX_PAYLOAD {
        return Err(WireError::PayloadTooLarge(h.payload_len));
    }
    Ok(h)
}

struct Reader<'a> {
    b: &'a [u8],
    o: usize,
    what: &'static str,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        let end = self
            .o
            .checked_add(n)
            .ok_or(WireError::Malformed(self.what))?;
        let s = self
            .b
            .get(self.o..end)
            .ok_or(WireError::Malformed(self.what))?;
        self.o = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32_at(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64_at(self.take(8)?, 0))
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        if n > 255 {
            return Err(WireError::Malformed(self.what));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| WireError::Malformed(self.what))
    }
    fn arr32(&mut self) -> Result<[u8; 32], WireError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn chunk(&mut self) -> Result<Chunk, WireError> {
        Ok(Chunk {
            volume: self.u64()?,
            index: self.u64()?,
        })
    }
    fn done(&self) -> Result<(), WireError> {
        if self.o == self.b.len() {
            Ok(())
        } else {
            Err(WireError::Malformed(self.what))
        }
    }
}

fn parse_body(kind: u8, body: &[u8]) -> Result<Message, WireError> {
    let names = [
        "",
        "hello",
        "auth",
        "read",
        "write",
        "flush",
        "versions",
        "checksums",
        "fetch",
        "reply",
        "version list",
        "zero",
        "install",
    ];
    let mut r = Reader {
        b: body,
        o: 0,
        what: names.get(kind as usize).copied().unwrap_or("unknown"),
    };
    let m = match kind {
        1 => Message::Hello {
            cluster_id: r.str()?,
            node: r.str()?,
            nonce: r.arr32()?,
        },
        2 => Message::Auth { mac: r.arr32()? },
        3 => Message::Read {
            chunk: r.chunk()?,
            offset: r.u32()?,
            len: r.u32()?,
            epoch: r.u64()?,
        },
        4 => Message::Write {
            chunk: r.chunk()?,
            offset: r.u32()?,
            epoch: r.u64()?,
            version: r.u64()?,
            fua: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Malformed("write")),
            },
        },
        5 => Message::Flush {
            volume: r.u64()?,
            epoch: r.u64()?,
        },
        6 => Message::Versions {
            volume: r.u64()?,
            start: r.u64()?,
            epoch: r.u64()?,
        },
        7 => Message::Checksums { chunk: r.chunk()? },
        8 => Message::Fetch {
            chunk: r.chunk()?,
            epoch: r.u64()?,
        },
        9 => Message::Reply {
            status: r.u32()?,
            version: r.u64()?,
        },
        10 => {
            let n = r.u32()? as usize;
            if n > MAX_VERSION_ENTRIES {
                return Err(WireError::Malformed("version list"));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(ChunkState {
                    index: r.u64()?,
                    version: r.u64()?,
                    digest: r.u32()?,
                });
            }
            Message::VersionList {
                entries,
                next: r.u64()?,
            }
        }
        11 => {
            let chunk = r.chunk()?;
            let offset = r.u32()?;
            let len = r.u32()?;
            let epoch = r.u64()?;
            let version = r.u64()?;
            let flags = r.u8()?;
            if flags & !3 != 0 {
                return Err(WireError::Malformed("zero"));
            }
            Message::Zero {
                chunk,
                offset,
                len,
                epoch,
                version,
                punch: flags & 1 != 0,
                fua: flags & 2 != 0,
            }
        }
        12 => Message::Install {
            chunk: r.chunk()?,
            epoch: r.u64()?,
            version: r.u64()?,
        },
        k => return Err(WireError::UnknownKind(k)),
    };
    r.done()?;
    Ok(m)
}

/// Parses a complete frame from `b` (header, body, payload); returns it and the bytes used.
pub fn parse_frame(b: &[u8]) -> Result<(Frame, usize), WireError> {
    let h = parse_header(b)?;
    let body_end = HEADER_LEN + h.body_len as usize;
    let end = body_end + h.payload_len as usize;
    if b.len() < end {
        return Err(WireError::Truncated {
            need: end,
            have: b.len(),
        });
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&b[..28]);
    hasher.update(&b[HEADER_LEN..body_end]);
    if hasher.finalize() != h.header_crc {
        return Err(WireError::HeaderChecksum);
    }
    let payload = &b[body_end..end];
    if crc32fast::hash(payload) != h.payload_crc {
        return Err(WireError::PayloadChecksum);
    }
    let msg = parse_body(h.kind, &b[HEADER_LEN..body_end])?;
    if h.payload_len > 0
        && !matches!(
            msg,
            Message::Write { .. } | Message::Reply { .. } | Message::Install { .. }
        )
    {
        return Err(WireError::Malformed("payload on a message that takes none"));
    }
    Ok((
        Frame {
            id: h.id,
            msg,
            payload: payload.to_vec(),
        },
        end,
    ))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(255)];
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_chunk(out: &mut Vec<u8>, c: &Chunk) {
    out.extend_from_slice(&c.volume.to_le_bytes());
    out.extend_from_slice(&c.index.to_le_bytes());
}

/// Appends a frame to `out`. Panics only on a payload over `MAX_PAYLOAD` (a caller bug).
pub fn emit_frame(out: &mut Vec<u8>, id: u64, msg: &Message, payload: &[u8]) {
    assert!(
        payload.len() <= MAX_PAYLOAD as usize,
        "replica payload over the limit"
    );
    let mut body = Vec::with_capacity(64);
    match msg {
        Message::Hello {
            cluster_id,
            node,
            nonce,
        } => {
            put_str(&mut body, cluster_id);
            put_str(&mut body, node);
            body.extend_from_slice(nonce);
        }
        Message::Auth { mac } => body.extend_from_slice(mac),
        Message::Read {
            chunk,
            offset,
            len,
            epoch,
        } => {
            put_chunk(&mut body, chunk);
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            body.extend_from_slice(&epoch.to_le_bytes());
        }
        Message::Write {
            chunk,
            offset,
            epoch,
            version,
            fua,
        } => {
            put_chunk(&mut body, chunk);
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&epoch.to_le_bytes());
            body.extend_from_slice(&version.to_le_bytes());
            body.push(*fua as u8);
        }
        Message::Flush { volume, epoch } => {
            body.extend_from_slice(&volume.to_le_bytes());
            body.extend_from_slice(&epoch.to_le_bytes());
        }
        Message::Versions {
            volume,
            start,
            epoch,
        } => {
            body.extend_from_slice(&volume.to_le_bytes());
            body.extend_from_slice(&start.to_le_bytes());
            body.extend_from_slice(&epoch.to_le_bytes());
        }
        Message::Checksums { chunk } => put_chunk(&mut body, chunk),
        Message::Fetch { chunk, epoch } => {
            put_chunk(&mut body, chunk);
            body.extend_from_slice(&epoch.to_le_bytes());
        }
        Message::Reply { status, version } => {
            body.extend_from_slice(&status.to_le_bytes());
            body.extend_from_slice(&version.to_le_bytes());
        }
        Message::VersionList { entries, next } => {
            // Entries beyond one body are cut off and `next` points at the first of them.
            let n = entries.len().min(MAX_VERSION_ENTRIES);
            body.extend_from_slice(&(n as u32).to_le_bytes());
            for e in &entries[..n] {
                body.extend_from_slice(&e.index.to_le_bytes());
                body.extend_from_slice(&e.version.to_le_bytes());
                body.extend_from_slice(&e.digest.to_le_bytes());
            }
            let next = if n < entries.len() {
                entries[n].index
            } else {
                *next
            };
            body.extend_from_slice(&next.to_le_bytes());
        }
        Message::Zero {
            chunk,
            offset,
            len,
            epoch,
            version,
            punch,
            fua,
        } => {
            put_chunk(&mut body, chunk);
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&len.to_le_bytes());
            body.extend_from_slice(&epoch.to_le_bytes());
            body.extend_from_slice(&version.to_le_bytes());
            body.push(*punch as u8 | (*fua as u8) << 1);
        }
        Message::Install {
            chunk,
            epoch,
            version,
        } => {
            put_chunk(&mut body, chunk);
            body.extend_from_slice(&epoch.to_le_bytes());
            body.extend_from_slice(&version.to_le_bytes());
        }
    }
    let start = out.len();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(VERSION);
    out.push(msg.kind());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[start..start + 28]);
    hasher.update(&body);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Message> {
        let c = Chunk {
            volume: 3,
            index: 9,
        };
        vec![
            Message::Hello {
                cluster_id: "c0ffee".into(),
                node: "host-a".into(),
                nonce: [7; 32],
            },
            Message::Auth { mac: [9; 32] },
            Message::Read {
                chunk: c,
                offset: 4096,
                len: 8192,
                epoch: 5,
            },
            Message::Write {
                chunk: c,
                offset: 0,
                epoch: 5,
                version: 77,
                fua: true,
            },
            Message::Flush {
                volume: 3,
                epoch: 5,
            },
            Message::Versions {
                volume: 3,
                start: 17,
                epoch: 0,
            },
            Message::Checksums { chunk: c },
            Message::Fetch { chunk: c, epoch: 6 },
            Message::Reply {
                status: 0,
                version: 77,
            },
            Message::VersionList {
                entries: vec![
                    ChunkState {
                        index: 0,
                        version: 1,
                        digest: 5,
                    },
                    ChunkState {
                        index: 5,
                        version: 99,
                        digest: 0xdead_beef,
                    },
                ],
                next: END,
            },
            Message::Zero {
                chunk: c,
                offset: 512,
                len: 4096,
                epoch: 5,
                version: 78,
                punch: true,
                fua: false,
            },
            Message::Install {
                chunk: c,
                epoch: 5,
                version: 79,
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (i, m) in all_messages().into_iter().enumerate() {
            let payload: Vec<u8> = if matches!(
                m,
                Message::Write { .. } | Message::Reply { .. } | Message::Install { .. }
            ) {
                vec![i as u8; 4096]
            } else {
                vec![]
            };
            let mut out = Vec::new();
            emit_frame(&mut out, 1000 + i as u64, &m, &payload);
            out.extend_from_slice(b"next");
            let (f, used) = parse_frame(&out).unwrap();
            assert_eq!(used, out.len() - 4);
            assert_eq!(
                f,
                Frame {
                    id: 1000 + i as u64,
                    msg: m,
                    payload
                }
            );
        }
    }

    #[test]
    fn every_corruption_is_caught() {
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::Write {
                chunk: Chunk {
                    volume: 1,
                    index: 2,
                },
                offset: 0,
                epoch: 1,
                version: 2,
                fua: false,
            },
            &[5u8; 100],
        );
        // Any single flipped bit anywhere in the frame is rejected.
        for byte in 0..out.len() {
            let mut bad = out.clone();
            bad[byte] ^= 0x10;
            assert!(parse_frame(&bad).is_err(), "flip at byte {byte} accepted");
        }
        // Truncation at every length.
        for n in 0..out.len() {
            assert!(
                matches!(parse_frame(&out[..n]), Err(WireError::Truncated { .. })),
                "truncated to {n}"
            );
        }
    }

    #[test]
    fn header_errors() {
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::Flush {
                volume: 1,
                epoch: 1,
            },
            &[],
        );
        let mut b = out.clone();
        b[0] = 0;
        assert!(matches!(parse_header(&b), Err(WireError::BadMagic(_))));
        let mut b = out.clone();
        b[4] = 2;
        assert_eq!(parse_header(&b), Err(WireError::Version(2)));
        let mut b = out.clone();
        b[5] = 42;
        assert_eq!(parse_header(&b), Err(WireError::UnknownKind(42)));
        let mut b = out.clone();
        b[6] = 1;
        assert!(matches!(parse_header(&b), Err(WireError::Malformed(_))));
        let mut b = out.clone();
        b[16..20].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert_eq!(parse_header(&b), Err(WireError::BodyTooLarge(MAX_BODY + 1)));
        let mut b = out.clone();
        b[20..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert_eq!(
            parse_header(&b),
            Err(WireError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
    }

    /// Re-seals a frame's header crc after editing its body, to reach the body parser.
    fn reseal(b: &mut [u8]) {
        let body_len = u32_at(b, 16) as usize;
        let mut h = crc32fast::Hasher::new();
        h.update(&b[..28]);
        h.update(&b[32..32 + body_len]);
        let c = h.finalize();
        b[28..32].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn malformed_bodies_are_rejected() {
        // A bad bool in a write.
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::Write {
                chunk: Chunk {
                    volume: 1,
                    index: 2,
                },
                offset: 0,
                epoch: 1,
                version: 2,
                fua: true,
            },
            &[],
        );
        let last = 32 + u32_at(&out, 16) as usize - 1;
        out[last] = 7;
        reseal(&mut out);
        assert_eq!(
            parse_frame(&out).unwrap_err(),
            WireError::Malformed("write")
        );
        // A string longer than the body; a name over 255 bytes.
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::Hello {
                cluster_id: "x".into(),
                node: "n".into(),
                nonce: [0; 32],
            },
            &[],
        );
        out[32..36].copy_from_slice(&1000u32.to_le_bytes());
        reseal(&mut out);
        assert_eq!(
            parse_frame(&out).unwrap_err(),
            WireError::Malformed("hello")
        );
        // A version list claiming more entries than present.
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::VersionList {
                entries: vec![ChunkState {
                    index: 1,
                    version: 1,
                    digest: 1,
                }],
                next: END,
            },
            &[],
        );
        out[32..36].copy_from_slice(&3u32.to_le_bytes());
        reseal(&mut out);
        assert_eq!(
            parse_frame(&out).unwrap_err(),
            WireError::Malformed("version list")
        );
        // Trailing body bytes.
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::Flush {
                volume: 1,
                epoch: 1,
            },
            &[],
        );
        out[16..20].copy_from_slice(&17u32.to_le_bytes());
        out.insert(48, 0);
        reseal(&mut out);
        assert_eq!(
            parse_frame(&out).unwrap_err(),
            WireError::Malformed("flush")
        );
        // A payload on a message that takes none.
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::Flush {
                volume: 1,
                epoch: 1,
            },
            &[1, 2, 3],
        );
        assert!(matches!(parse_frame(&out), Err(WireError::Malformed(_))));
    }

    #[test]
    fn parser_survives_random_input() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut valid = Vec::new();
        emit_frame(
            &mut valid,
            9,
            &Message::Read {
                chunk: Chunk {
                    volume: 1,
                    index: 1,
                },
                offset: 0,
                len: 1,
                epoch: 1,
            },
            &[],
        );
        for _ in 0..20_000 {
            let len = (next() % 96) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && b.len() >= 8 {
                b[..8].copy_from_slice(&valid[..8]); // reach past the magic check
            }
            let _ = parse_frame(&b);
        }
    }

    #[test]
    fn version_lists_page() {
        let entries: Vec<ChunkState> = (0..MAX_VERSION_ENTRIES as u64 + 10)
            .map(|i| ChunkState {
                index: i * 2,
                version: i,
                digest: i as u32,
            })
            .collect();
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::VersionList {
                entries: entries.clone(),
                next: END,
            },
            &[],
        );
        let (f, _) = parse_frame(&out).unwrap();
        let Message::VersionList { entries: got, next } = f.msg else {
            panic!("not a version list")
        };
        assert_eq!(got.len(), MAX_VERSION_ENTRIES);
        assert_eq!(got[..], entries[..MAX_VERSION_ENTRIES]);
        assert_eq!(next, entries[MAX_VERSION_ENTRIES].index);
    }

    #[test]
    fn zero_flags_are_checked() {
        let mut out = Vec::new();
        emit_frame(
            &mut out,
            1,
            &Message::Zero {
                chunk: Chunk {
                    volume: 1,
                    index: 0,
                },
                offset: 0,
                len: 4096,
                epoch: 1,
                version: 1,
                punch: true,
                fua: true,
            },
            &[],
        );
        let last = 32 + u32_at(&out, 16) as usize - 1;
        assert_eq!(out[last], 3);
        out[last] = 4;
        reseal(&mut out);
        assert_eq!(parse_frame(&out).unwrap_err(), WireError::Malformed("zero"));
    }

    #[test]
    fn chunk_images() {
        let mut bm = [0u8; BITMAP_LEN];
        bm[0] = 0b101; // blocks 0 and 2
        let data = vec![9u8; 2 * BLOCK];
        let img = encode_image(&bm, &data);
        let (b2, d2) = parse_image(&img).unwrap();
        assert_eq!(b2, bm);
        assert_eq!(d2, &data[..]);
        assert!(bit(&bm, 0) && !bit(&bm, 1) && bit(&bm, 2));
        // Too short for the bitmap; data not matching the bitmap's count.
        assert!(parse_image(&img[..10]).is_err());
        assert!(parse_image(&img[..img.len() - 1]).is_err());
        let mut more = img.clone();
        more.extend_from_slice(&[0u8; BLOCK]);
        assert!(parse_image(&more).is_err());
        // An empty image is a chunk with nothing written.
        let (b3, d3) = parse_image(&[0u8; BITMAP_LEN]).unwrap();
        assert!(b3.iter().all(|b| *b == 0) && d3.is_empty());
    }

    #[test]
    fn digests_see_content_and_holes() {
        let crcs = vec![7u32; CHUNK_BLOCKS];
        let all = digest_of(|_| true, &crcs);
        let one_hole = digest_of(|b| b != 3, &crcs);
        assert_ne!(all, one_hole);
        assert_eq!(digest_of(|_| false, &crcs), empty_digest());
        let mut other = crcs.clone();
        other[1000] = 8;
        assert_ne!(digest_of(|_| true, &other), all);
    }
}
