//! NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): pure code, no I/O.
//!
//! Parsers take byte slices and return typed values or a typed error; they never panic on
//! any input. Emitters append to a `Vec<u8>`.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply types and flags.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Block status flags for base:allocation.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

// Errors.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload we accept (and advertise as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload we read; bigger ones are refused without being buffered.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Context id of `base:allocation` (the only context).
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const BASE_ALLOCATION: &str = "base:allocation";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("client does not speak fixed newstyle")]
    NotFixedNewstyle,
    #[error("{0}")]
    Invalid(&'static str),
}

fn u16_at(b: &[u8], o: usize) -> Result<u16, WireError> {
    b.get(o..o + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(WireError::Truncated {
            need: o + 2,
            have: b.len(),
        })
}
fn u32_at(b: &[u8], o: usize) -> Result<u32, WireError> {
    b.get(o..o + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(WireError::Truncated {
            need: o + 4,
            have: b.len(),
        })
}
fn u64_at(b: &[u8], o: usize) -> Result<u64, WireError> {
    b.get(o..o + 8)
        .map(|s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
        .ok_or(WireError::Truncated {
            need: o + 8,
            have: b.len(),
        })
}

/// The server's greeting.
pub fn emit_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// Client flags after the greeting: returns whether the client asked for NO_ZEROES.
pub fn parse_client_flags(b: &[u8]) -> Result<bool, WireError> {
    let f = u32_at(b, 0)?;
    if f & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(WireError::UnknownClientFlags(f));
    }
    if f & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(WireError::NotFixedNewstyle);
    }
    Ok(f & CLIENT_NO_ZEROES != 0)
}

/// The 16-byte header of a client option: `(option, payload length)`.
pub fn parse_option_header(b: &[u8]) -> Result<(u32, u32), WireError> {
    let magic = u64_at(b, 0)?;
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic(magic));
    }
    Ok((u32_at(b, 8)?, u32_at(b, 12)?))
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

fn parse_name(b: &[u8], o: usize) -> Result<(String, usize), WireError> {
    let n = u32_at(b, o)? as usize;
    let start = o + 4;
    let s = b
        .get(
            start
                ..start
                    .checked_add(n)
                    .ok_or(WireError::Invalid("name length overflows"))?,
        )
        .ok_or(WireError::Invalid("name length exceeds option length"))?;
    let name = std::str::from_utf8(s).map_err(|_| WireError::Invalid("name is not UTF-8"))?;
    Ok((name.to_string(), start + n))
}

pub fn parse_info_request(b: &[u8]) -> Result<InfoRequest, WireError> {
    let (name, o) = parse_name(b, 0)?;
    let n = u16_at(b, o)
        .map_err(|_| WireError::Invalid("missing number of information requests"))?
        as usize;
    let mut requests = Vec::with_capacity(n.min(64));
    for i in 0..n {
        requests.push(
            u16_at(b, o + 2 + 2 * i)
                .map_err(|_| WireError::Invalid("information requests exceed option length"))?,
        );
    }
    if o + 2 + 2 * n != b.len() {
        return Err(WireError::Invalid(
            "trailing bytes after information requests",
        ));
    }
    Ok(InfoRequest { name, requests })
}

/// Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(b: &[u8]) -> Result<MetaRequest, WireError> {
    let (name, mut o) = parse_name(b, 0)?;
    let n = u32_at(b, o).map_err(|_| WireError::Invalid("missing number of queries"))?;
    o += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let (q, next) =
            parse_name(b, o).map_err(|_| WireError::Invalid("query exceeds option length"))?;
        queries.push(q);
        o = next;
    }
    if o != b.len() {
        return Err(WireError::Invalid("trailing bytes after queries"));
    }
    Ok(MetaRequest { name, queries })
}

/// Does a meta-context query select `base:allocation`? (`base:` lists the whole namespace,
/// which LIST allows.)
pub fn query_matches_base_allocation(q: &str, listing: bool) -> bool {
    q == BASE_ALLOCATION || (listing && q == "base:")
}

pub fn emit_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An error reply with a human-readable message.
pub fn emit_option_error(out: &mut Vec<u8>, option: u32, reply: u32, msg: &str) {
    emit_option_reply(out, option, reply, msg.as_bytes());
}

pub fn emit_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    emit_option_reply(out, option, REP_INFO, &d);
}

pub fn emit_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&max.to_be_bytes());
    emit_option_reply(out, option, REP_INFO, &d);
}

pub fn emit_info_name(out: &mut Vec<u8>, option: u32, name: &str) {
    let mut d = Vec::with_capacity(2 + name.len());
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    emit_option_reply(out, option, REP_INFO, &d);
}

pub fn emit_server_entry(out: &mut Vec<u8>, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    emit_option_reply(out, OPT_LIST, REP_SERVER, &d);
}

pub fn emit_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    emit_option_reply(out, option, REP_META_CONTEXT, &d);
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zero bytes.
pub fn emit_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A command as it arrives, before semantic checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a 28-byte request header. A bad magic means the stream is out of sync.
pub fn parse_request(b: &[u8]) -> Result<Request, WireError> {
    if b.len() < REQUEST_LEN {
        return Err(WireError::Truncated {
            need: REQUEST_LEN,
            have: b.len(),
        });
    }
    let magic = u32_at(b, 0)?;
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic(magic as u64));
    }
    Ok(Request {
        flags: u16_at(b, 4)?,
        kind: u16_at(b, 6)?,
        cookie: u64_at(b, 8)?,
        offset: u64_at(b, 16)?,
        length: u32_at(b, 24)?,
    })
}

/// The flags each command may carry.
pub fn allowed_flags(kind: u16) -> Option<u16> {
    Some(match kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_DISC | CMD_FLUSH | CMD_CACHE => 0,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

/// Why a well-framed request is refused (the connection goes on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Error code to send.
    Errno(u32),
}

/// Semantic checks of a request against an export of `size` bytes. `Ok` means: run it.
/// For WRITE the payload still has to be consumed by the caller even when refused.
pub fn check_request(
    r: &Request,
    size: u64,
    structured: bool,
    meta_ok: bool,
) -> Result<(), Refusal> {
    let Some(allowed) = allowed_flags(r.kind) else {
        return Err(Refusal::Errno(EINVAL));
    };
    if r.flags & !allowed != 0 {
        return Err(Refusal::Errno(EINVAL));
    }
    if r.kind == CMD_READ && r.flags & CMD_FLAG_DF != 0 && !structured {
        return Err(Refusal::Errno(EINVAL));
    }
    match r.kind {
        CMD_DISC | CMD_FLUSH => {
            if r.offset != 0 || r.length != 0 {
                return Err(Refusal::Errno(EINVAL));
            }
            return Ok(());
        }
        CMD_BLOCK_STATUS if !meta_ok => return Err(Refusal::Errno(EINVAL)),
        _ => {}
    }
    if r.length == 0 {
        return Err(Refusal::Errno(EINVAL));
    }
    if matches!(r.kind, CMD_READ | CMD_WRITE) && r.length > MAX_PAYLOAD {
        return Err(Refusal::Errno(EINVAL));
    }
    match r.offset.checked_add(r.length as u64) {
        Some(end) if end <= size => Ok(()),
        // Writes past the end are ENOSPC per the spec; everything else EINVAL.
        _ if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) => Err(Refusal::Errno(ENOSPC)),
        _ => Err(Refusal::Errno(EINVAL)),
    }
}

pub fn emit_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Header of an OFFSET_DATA chunk (flagged DONE) carrying `len` data bytes that follow.
pub fn emit_offset_data_header(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32) {
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len + 8,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// A final NONE chunk (success without payload).
pub fn emit_structured_done(out: &mut Vec<u8>, cookie: u64) {
    chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// A final ERROR chunk with a message.
pub fn emit_structured_error(out: &mut Vec<u8>, cookie: u64, error: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A final BLOCK_STATUS chunk: `(length, flags)` descriptors for one context.
pub fn emit_block_status(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * extents.len() as u32,
    );
    out.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

#[cfg(test)]
mod tests;
