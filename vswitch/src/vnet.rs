//! The virtio-net header that tap devices (`IFF_VNET_HDR`) and AF_PACKET sockets
//! (`PACKET_VNET_HDR`) put in front of every frame, and what to do with the frames it
//! describes when they have to leave the host as ordinary packets: software segmentation of
//! TSO frames ([`segment`]) and completion of partial checksums ([`complete_checksum`]).
//!
//! Pure code: no syscalls. Nothing here panics on any input (the `never_panics_*` tests feed it
//! garbage); malformed frames are [`VnetError`]s.
//!
//! We use the 12-byte form (`struct virtio_net_hdr_v1`, i.e. `virtio_net_hdr_mrg_rxbuf`) on
//! every fd: `tap.rs` sets `TUNSETVNETHDRSZ` to 12 and `packet.rs` sets `PACKET_VNET_HDR_SZ`
//! to 12 (or, on kernels before 6.2, maps the 10-byte header into this layout), so every
//! buffer the I/O layer hands out starts with [`VnetHdr::LEN`] bytes of header.
//!
//! Byte order: tun (without `TUNSETVNETLE`/`TUNSETVNETBE`) and AF_PACKET use the "legacy"
//! virtio convention, which is the host's native byte order; so do we.

use thiserror::Error;

/// Flag: the checksum at `csum_start + csum_offset` is partial (pseudo-header sum only) and
/// must be completed over `csum_start..`.
pub const F_NEEDS_CSUM: u8 = 1;
/// Flag: the checksum has been validated (receive side).
pub const F_DATA_VALID: u8 = 2;

/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 segmentation offload.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation offload (UFO, obsolete).
pub const GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6 segmentation offload.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation offload (USO).
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP stream uses ECN (CWR must stay on the first segment only).
pub const GSO_ECN: u8 = 0x80;

/// Room for one frame plus its header when reading from a tap or packet socket: a GSO frame
/// is at most 64 KiB of IP packet, plus Ethernet and VLAN headers.
pub const BUF_LEN: usize = VnetHdr::LEN + 65_536 + 64;

/// Segments one GSO frame may turn into. Linux's smallest MSS (88) cuts a 64 KiB packet into
/// fewer than 800; more is a malformed header, not a frame worth the memory.
pub const MAX_SEGMENTS: usize = 1024;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a header or frame was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VnetError {
    #[error("buffer of {0} bytes is shorter than the virtio-net header")]
    ShortHeader(usize),
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("unsupported GSO type {0}")]
    UnsupportedGso(u8),
    #[error("GSO size 0")]
    ZeroGsoSize,
    #[error("GSO frame would make {0} segments")]
    TooManySegments(usize),
    #[error("checksum offset {start}+{offset} outside a {len}-byte frame")]
    BadChecksumOffset {
        start: usize,
        offset: usize,
        len: usize,
    },
}

/// `struct virtio_net_hdr_v1` (12 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers (Ethernet + IP + L4) of a GSO frame; advisory, never trusted.
    pub hdr_len: u16,
    /// Payload bytes per segment of a GSO frame (the MSS for TCP).
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// Only meaningful with mergeable receive buffers; 0 otherwise.
    pub num_buffers: u16,
}

impl VnetHdr {
    /// Size of the header on every fd of this crate.
    pub const LEN: usize = 12;

    /// Header of a frame that needs nothing done (no GSO, checksum complete).
    pub const NONE: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
        num_buffers: 0,
    };

    /// Reads the header from the first [`VnetHdr::LEN`] bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<VnetHdr, VnetError> {
        let b = buf
            .get(..Self::LEN)
            .ok_or(VnetError::ShortHeader(buf.len()))?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        })
    }

    /// Writes the header into the first [`VnetHdr::LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), VnetError> {
        let len = buf.len();
        let b = buf
            .get_mut(..Self::LEN)
            .ok_or(VnetError::ShortHeader(len))?;
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_ne_bytes());
        Ok(())
    }

    /// The GSO type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    /// Is this a GSO frame (bigger than one packet, to be segmented before it leaves)?
    pub fn is_gso(&self) -> bool {
        self.gso_kind() != GSO_NONE
    }

    /// Does the frame carry a partial checksum that someone must complete?
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }
}

/// Completes the partial checksum of a `NEEDS_CSUM` frame (`frame` without the vnet header):
/// the 16-bit field at `csum_start + csum_offset` holds the pseudo-header sum; the one's
/// complement sum of everything from `csum_start` to the end is folded into it (as the
/// kernel's `skb_checksum_help` does, a result of 0 is written as 0xffff). Frames without
/// `NEEDS_CSUM` are left alone.
pub fn complete_checksum(hdr: &VnetHdr, frame: &mut [u8]) -> Result<(), VnetError> {
    if !hdr.needs_csum() {
        return Ok(());
    }
    let start = hdr.csum_start as usize;
    let at = start + hdr.csum_offset as usize;
    if at + 2 > frame.len() {
        return Err(VnetError::BadChecksumOffset {
            start,
            offset: hdr.csum_offset as usize,
            len: frame.len(),
        });
    }
    let folded = fold(sum(0, &frame[start..]));
    let csum = match !folded {
        0 => 0xffff,
        c => c,
    };
    frame[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

/// Software TSO: cuts a GSO frame (`frame` is the Ethernet frame after the vnet header) into
/// frames of at most `gso_size` payload bytes each, appended to `out`. Every segment is a full
/// Ethernet + IP + TCP frame: IPv4 total length, identification (+1 per segment) and header
/// checksum, IPv6 payload length, TCP sequence number (+payload per segment), FIN and PSH on
/// the last segment only, CWR on the first only, and a complete TCP checksum. A frame that is
/// not GSO is copied to `out` as one frame, with its checksum completed if it needs it.
///
/// Supported: `GSO_TCPV4`, `GSO_TCPV6` (without extension headers), with or without the ECN
/// bit, behind an optional 802.1Q tag. Nothing is appended on error.
pub fn segment(hdr: &VnetHdr, frame: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), VnetError> {
    let mut buf = Vec::new();
    let segs = segment_into(hdr, frame, &[], &mut buf)?;
    out.reserve(segs.count);
    if segs.count == 1 {
        out.push(buf);
        return Ok(());
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        let (seg, tail) = rest.split_at(segs.seg_len.min(rest.len()));
        out.push(seg.to_vec());
        rest = tail;
    }
    Ok(())
}

/// What [`segment_into`] wrote: `count` segments, each `seg_len` bytes long (prefix
/// included) except the last, which may be shorter: the layout UDP GSO wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segmented {
    pub count: usize,
    pub seg_len: usize,
}

/// [`segment`] into one buffer: `out` is cleared, then gets every segment back to back, each
/// preceded by a copy of `prefix` (e.g. a VXLAN header). No allocation once `out` has grown
/// to its working size. `out` is left empty on error.
pub fn segment_into(
    hdr: &VnetHdr,
    frame: &[u8],
    prefix: &[u8],
    out: &mut Vec<u8>,
) -> Result<Segmented, VnetError> {
    out.clear();
    let res = match hdr.gso_kind() {
        GSO_NONE => {
            out.extend_from_slice(prefix);
            out.extend_from_slice(frame);
            complete_checksum(hdr, &mut out[prefix.len()..]).map(|()| Segmented {
                count: 1,
                seg_len: prefix.len() + frame.len(),
            })
        }
        GSO_TCPV4 => segment_tcp(hdr, frame, prefix, out, false),
        GSO_TCPV6 => segment_tcp(hdr, frame, prefix, out, true),
        other => Err(VnetError::UnsupportedGso(other)),
    };
    if res.is_err() {
        out.clear();
    }
    res
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Ethernet header length (14, or 18 with one 802.1Q tag) and the EtherType after it.
fn l2(frame: &[u8]) -> Result<(usize, u16), VnetError> {
    if frame.len() < ETH_LEN {
        return Err(VnetError::Truncated("ethernet header"));
    }
    let ty = be16(frame, 12);
    if ty != ETHERTYPE_VLAN {
        return Ok((ETH_LEN, ty));
    }
    if frame.len() < ETH_LEN + 4 {
        return Err(VnetError::Truncated("802.1Q tag"));
    }
    Ok((ETH_LEN + 4, be16(frame, 16)))
}

fn segment_tcp(
    hdr: &VnetHdr,
    frame: &[u8],
    prefix: &[u8],
    out: &mut Vec<u8>,
    v6: bool,
) -> Result<Segmented, VnetError> {
    let mss = hdr.gso_size as usize;
    if mss == 0 {
        return Err(VnetError::ZeroGsoSize);
    }
    let (l3, ethertype) = l2(frame)?;
    // l4: start of TCP; end: end of the IP packet (Ethernet padding excluded).
    let (l4, end) = if v6 {
        if ethertype != ETHERTYPE_IPV6 {
            return Err(VnetError::Malformed("GSO_TCPV6 frame is not IPv6"));
        }
        let ip = frame
            .get(l3..l3 + 40)
            .ok_or(VnetError::Truncated("IPv6 header"))?;
        if ip[0] >> 4 != 6 {
            return Err(VnetError::Malformed("IPv6 version"));
        }
        if ip[6] != PROTO_TCP {
            return Err(VnetError::Malformed("IPv6 next header is not TCP"));
        }
        let plen = be16(ip, 4) as usize;
        // A payload length of 0 is how BIG TCP (jumbograms) marks it: use the frame length.
        let end = if plen == 0 {
            frame.len()
        } else {
            l3 + 40 + plen
        };
        (l3 + 40, end)
    } else {
        if ethertype != ETHERTYPE_IPV4 {
            return Err(VnetError::Malformed("GSO_TCPV4 frame is not IPv4"));
        }
        let ip = frame
            .get(l3..l3 + 20)
            .ok_or(VnetError::Truncated("IPv4 header"))?;
        if ip[0] >> 4 != 4 {
            return Err(VnetError::Malformed("IPv4 version"));
        }
        let ihl = (ip[0] & 0x0f) as usize * 4;
        if ihl < 20 {
            return Err(VnetError::Malformed("IPv4 header length"));
        }
        if ip[9] != PROTO_TCP {
            return Err(VnetError::Malformed("IPv4 protocol is not TCP"));
        }
        if be16(ip, 6) & 0x3fff != 0 {
            return Err(VnetError::Malformed("IPv4 fragment"));
        }
        let tot = be16(ip, 2) as usize;
        let end = if tot == 0 { frame.len() } else { l3 + tot };
        if tot != 0 && tot < ihl {
            return Err(VnetError::Malformed("IPv4 total length"));
        }
        (l3 + ihl, end)
    };
    if end > frame.len() {
        return Err(VnetError::Truncated("IP packet"));
    }
    let tcp = frame
        .get(l4..l4 + 20)
        .ok_or(VnetError::Truncated("TCP header"))?;
    let thl = (tcp[12] >> 4) as usize * 4;
    if thl < 20 {
        return Err(VnetError::Malformed("TCP data offset"));
    }
    let payload_at = l4 + thl;
    if payload_at > end {
        return Err(VnetError::Truncated("TCP header"));
    }
    let payload = &frame[payload_at..end];
    let count = payload.len().div_ceil(mss).max(1);
    if count > MAX_SEGMENTS {
        return Err(VnetError::TooManySegments(count));
    }

    let headers = &frame[..payload_at];
    let seq0 = be32(frame, l4 + 4);
    let flags0 = frame[l4 + 13];
    let id0 = if v6 { 0 } else { be16(frame, l3 + 4) };
    let pseudo = if v6 {
        sum(0, &frame[l3 + 8..l3 + 40])
    } else {
        sum(0, &frame[l3 + 12..l3 + 20])
    };
    out.reserve(count * (prefix.len() + headers.len()) + payload.len());
    for i in 0..count {
        let chunk = payload
            .get(i * mss..payload.len().min((i + 1) * mss))
            .unwrap_or(&[]);
        out.extend_from_slice(prefix);
        let at = out.len();
        out.extend_from_slice(headers);
        out.extend_from_slice(chunk);
        let seg = &mut out[at..];
        let tcp_len = thl + chunk.len();
        if v6 {
            seg[l3 + 4..l3 + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        } else {
            let ihl = l4 - l3;
            let tot = (ihl + tcp_len) as u16;
            seg[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
            let id = id0.wrapping_add(i as u16);
            seg[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            seg[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(0, &seg[l3..l4]));
            seg[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 != count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            flags &= !TCP_CWR;
        }
        seg[l4 + 13] = flags;
        seg[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let mut s = pseudo + u32::from(PROTO_TCP) + tcp_len as u32;
        s = sum(s, &seg[l4..]);
        let c = !fold(s);
        seg[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    }
    Ok(Segmented {
        count,
        seg_len: prefix.len() + headers.len() + mss.min(payload.len()),
    })
}

/// Receive-side coalescing (what the kernel's GRO and wireguard-go's tun GRO do): frames
/// headed for one tap, pushed in arrival order, come out as few large frames as possible.
/// Consecutive TCP/IPv4 segments of one flow become one `GSO_TCPV4` frame with a
/// `NEEDS_CSUM` header, so the receiving stack handles one 64 KiB packet instead of ~45 small
/// ones; [`segment`] of a merged frame gives back the original segments byte for byte.
///
/// A segment joins the frame being built when: untagged Ethernet, IPv4 without options nor
/// fragmentation, a valid IP header checksum and a valid TCP checksum (a corrupted segment
/// is never hidden under a fresh checksum: it passes through as it came, and the receiver
/// drops it), flags ACK or ACK|PSH, a non-empty payload; and against the frame being built:
/// same MACs, same IP header apart from total length, ID (+1 per segment) and checksum, same
/// ports, ack, window, urgent pointer and TCP options, the next sequence number, a payload no
/// larger than the first segment's, and at most 64 KiB of IP packet in all. A segment with PSH
/// or a shorter payload ends the frame. Everything else passes through unchanged (behind a
/// zero virtio-net header), order preserved: a frame that cannot join first flushes the one
/// being built.
///
/// Emitted buffers start with a [`VnetHdr`]. Pure code, no allocation after warm-up; never
/// panics.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// Header space + the frame being built (empty when none).
    buf: Vec<u8>,
    /// Header space + a frame passing through.
    pass: Vec<u8>,
    flow: Option<Flow>,
}

/// The frame being built.
#[derive(Debug, Clone, Copy)]
struct Flow {
    /// Payload bytes of the first segment (the gso_size).
    mss: usize,
    count: usize,
    next_seq: u32,
    next_id: u16,
    /// IP packet length so far.
    ip_len: usize,
}

/// A TCP/IPv4 segment that may be coalesced (see [`Coalescer`]).
struct TcpSeg {
    payload_len: usize,
    seq: u32,
    id: u16,
    psh: bool,
}

const TCP_ACK: u8 = 0x10;
/// Offset of the TCP header in a coalescable frame (Ethernet 14 + IPv4 20).
const CO_L4: usize = ETH_LEN + 20;

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Is a frame being built (to be emitted by [`Coalescer::flush`])?
    pub fn is_pending(&self) -> bool {
        self.flow.is_some()
    }

    /// Adds one Ethernet frame; calls `emit` with every buffer (virtio-net header + frame)
    /// that is complete because of it, in order.
    pub fn push(&mut self, frame: &[u8], emit: &mut impl FnMut(&[u8])) {
        let Some(seg) = coalescable(frame) else {
            self.flush(emit);
            self.pass.clear();
            self.pass.extend_from_slice(&[0; VnetHdr::LEN]);
            self.pass.extend_from_slice(frame);
            emit(&self.pass);
            return;
        };
        if let Some(flow) = self.flow {
            if self.joins(&flow, &seg, frame) {
                let payload_at = frame.len() - seg.payload_len;
                self.buf.extend_from_slice(&frame[payload_at..]);
                let flow = Flow {
                    count: flow.count + 1,
                    next_seq: seg.seq.wrapping_add(seg.payload_len as u32),
                    next_id: seg.id.wrapping_add(1),
                    ip_len: flow.ip_len + seg.payload_len,
                    mss: flow.mss,
                };
                self.flow = Some(flow);
                if seg.psh || seg.payload_len < flow.mss {
                    if seg.psh {
                        // The merged header carries the last segment's flags.
                        let at = VnetHdr::LEN + CO_L4 + 13;
                        self.buf[at] |= TCP_PSH;
                    }
                    self.flush(emit);
                }
                return;
            }
            self.flush(emit);
        }
        self.buf.clear();
        self.buf.extend_from_slice(&[0; VnetHdr::LEN]);
        self.buf.extend_from_slice(frame);
        self.flow = Some(Flow {
            mss: seg.payload_len,
            count: 1,
            next_seq: seg.seq.wrapping_add(seg.payload_len as u32),
            next_id: seg.id.wrapping_add(1),
            ip_len: frame.len() - ETH_LEN,
        });
        if seg.psh {
            self.flush(emit);
        }
    }

    /// Emits the frame being built, if any: as it came if it is one segment, else as one
    /// `GSO_TCPV4` frame.
    pub fn flush(&mut self, emit: &mut impl FnMut(&[u8])) {
        let Some(flow) = self.flow.take() else { return };
        if flow.count > 1 {
            let f = &mut self.buf[VnetHdr::LEN..];
            let ip_len = flow.ip_len as u16;
            f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&ip_len.to_be_bytes());
            f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(0, &f[ETH_LEN..CO_L4]));
            f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
            let tcp_len = flow.ip_len - 20;
            let thl = usize::from(f[CO_L4 + 12] >> 4) * 4;
            let pseudo =
                sum(0, &f[ETH_LEN + 12..ETH_LEN + 20]) + u32::from(PROTO_TCP) + tcp_len as u32;
            f[CO_L4 + 16..CO_L4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: (CO_L4 + thl) as u16,
                gso_size: flow.mss as u16,
                csum_start: CO_L4 as u16,
                csum_offset: 16,
                num_buffers: 0,
            };
            let _ = hdr.emit(&mut self.buf);
        }
        emit(&self.buf);
        self.buf.clear();
    }

    fn joins(&self, flow: &Flow, seg: &TcpSeg, frame: &[u8]) -> bool {
        let Some(first) = self.buf.get(VnetHdr::LEN..) else {
            return false;
        };
        let payload_at = frame.len() - seg.payload_len;
        let first_payload_at = CO_L4 + usize::from(first[CO_L4 + 12] >> 4) * 4;
        let ip = ETH_LEN;
        let t = CO_L4;
        seg.seq == flow.next_seq
            && seg.id == flow.next_id
            && seg.payload_len <= flow.mss
            && flow.ip_len + seg.payload_len <= usize::from(u16::MAX)
            && payload_at == first_payload_at
            && frame[..ETH_LEN] == first[..ETH_LEN]
            && frame[ip..ip + 2] == first[ip..ip + 2]
            && frame[ip + 6..ip + 10] == first[ip + 6..ip + 10]
            && frame[ip + 12..ip + 20] == first[ip + 12..ip + 20]
            && frame[t..t + 4] == first[t..t + 4]
            && frame[t + 8..t + 13] == first[t + 8..t + 13]
            && frame[t + 14..t + 16] == first[t + 14..t + 16]
            && frame[t + 18..payload_at] == first[t + 18..payload_at]
    }
}

/// The facts [`Coalescer`] needs about `frame` if it is a coalescable TCP/IPv4 segment with
/// valid checksums, else None.
fn coalescable(frame: &[u8]) -> Option<TcpSeg> {
    let ip = frame.get(ETH_LEN..CO_L4)?;
    if be16(frame, 12) != ETHERTYPE_IPV4 || ip[0] != 0x45 || ip[9] != PROTO_TCP {
        return None;
    }
    // No fragments (DF is fine).
    if be16(ip, 6) & 0x3fff != 0 {
        return None;
    }
    // Exactly one IP packet: no Ethernet padding (a segment with data is never padded).
    let tot = usize::from(be16(ip, 2));
    if ETH_LEN + tot != frame.len() {
        return None;
    }
    let tcp = frame.get(CO_L4..CO_L4 + 20)?;
    let thl = usize::from(tcp[12] >> 4) * 4;
    // Low nibble of byte 12: reserved bits and AE (accurate ECN), kept out.
    if thl < 20 || tcp[12] & 0x0f != 0 {
        return None;
    }
    let flags = tcp[13];
    if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
        return None;
    }
    let payload_at = CO_L4 + thl;
    if payload_at >= frame.len() {
        return None;
    }
    if fold(sum(0, ip)) != 0xffff {
        return None;
    }
    let tcp_len = frame.len() - CO_L4;
    let s = sum(0, &ip[12..20]) + u32::from(PROTO_TCP) + tcp_len as u32;
    if fold(sum(s, &frame[CO_L4..])) != 0xffff {
        return None;
    }
    Some(TcpSeg {
        payload_len: frame.len() - payload_at,
        seq: be32(frame, CO_L4 + 4),
        id: be16(ip, 4),
        psh: flags & TCP_PSH != 0,
    })
}

/// One's complement sum of `data` as big-endian 16-bit words (odd tail padded with zero),
/// added to `acc`; carries are kept in the upper bits until [`fold`].
///
/// The bulk is summed as native-endian 32-bit words into a u64 (a loop the compiler
/// vectorizes): the one's complement sum does not depend on where the carries go, so the
/// sum of 32-bit words folded to 16 bits is the sum of the 16-bit words (2^16 = 1 modulo
/// 0xffff), and summing in native order gives the byte-swapped sum on little-endian hosts
/// (RFC 1071 §2(B)), swapped back once at the end.
fn sum(acc: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(4);
    let mut wide: u64 = 0;
    for w in &mut words {
        wide += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    // Fold the native-order sum to 16 bits, then put it in network order.
    while wide > 0xffff {
        wide = (wide & 0xffff) + (wide >> 16);
    }
    let bulk = u16::from_be(wide as u16);
    let mut acc = u64::from(acc) + u64::from(bulk);
    let mut rest = words.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    while acc > 0x7fff_ffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u32
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Frame builders and an independent checksum verifier for the tests of this crate's I/O
/// modules (and the segmentation tests below).
#[cfg(test)]
pub(crate) mod testing {
    /// Internet checksum written the slow, obvious way (RFC 1071), independent of `sum`/`fold`
    /// above: a correct packet sums to 0xffff.
    pub fn rfc1071(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let mut total: u64 = 0;
        for i in (0..bytes.len()).step_by(2) {
            let hi = bytes[i] as u64;
            let lo = bytes.get(i + 1).copied().unwrap_or(0) as u64;
            total += (hi << 8) | lo;
        }
        while total >> 16 != 0 {
            total = (total & 0xffff) + (total >> 16);
        }
        total as u16
    }

    /// Panics unless `frame` is Ethernet + IPv4 + TCP with a correct IP header checksum,
    /// matching lengths, and a correct TCP checksum. Returns (seq, flags, payload).
    pub fn check_tcp4(frame: &[u8]) -> (u32, u8, Vec<u8>) {
        assert_eq!(&frame[12..14], &[0x08, 0x00], "not IPv4");
        let ip = &frame[14..];
        let ihl = (ip[0] & 0xf) as usize * 4;
        assert_eq!(rfc1071(&[&ip[..ihl]]), 0xffff, "IPv4 header checksum");
        let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        assert_eq!(tot, ip.len(), "IPv4 total length matches the frame");
        let tcp = &ip[ihl..tot];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        assert_eq!(rfc1071(&[&pseudo, tcp]), 0xffff, "TCP checksum");
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let thl = (tcp[12] >> 4) as usize * 4;
        (seq, tcp[13], tcp[thl..].to_vec())
    }

    /// Like [`check_tcp4`] for Ethernet + IPv6 + TCP.
    pub fn check_tcp6(frame: &[u8]) -> (u32, u8, Vec<u8>) {
        assert_eq!(&frame[12..14], &[0x86, 0xdd], "not IPv6");
        let ip = &frame[14..];
        let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        assert_eq!(plen + 40, ip.len(), "IPv6 payload length matches the frame");
        let tcp = &ip[40..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[8..40]);
        pseudo.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
        assert_eq!(rfc1071(&[&pseudo, tcp]), 0xffff, "TCP checksum");
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let thl = (tcp[12] >> 4) as usize * 4;
        (seq, tcp[13], tcp[thl..].to_vec())
    }

    /// Ethernet header.
    pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
        let mut f = Vec::with_capacity(14);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// Appends an IPv4 header (checksum filled in) for `payload_len` bytes of `proto`.
    pub fn ipv4(f: &mut Vec<u8>, src: [u8; 4], dst: [u8; 4], proto: u8, payload_len: usize) {
        let at = f.len();
        let tot = (20 + payload_len) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&tot.to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        let c = !rfc1071(&[&f[at..]]);
        f[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
    }

    /// A TCP header with the given fields and a zero checksum.
    pub fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16) -> Vec<u8> {
        let mut t = Vec::with_capacity(20);
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&ack.to_be_bytes());
        t.extend_from_slice(&[0x50, flags]);
        t.extend_from_slice(&window.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]);
        t
    }

    /// A complete Ethernet + IPv4 + TCP frame with correct checksums.
    #[allow(clippy::too_many_arguments)]
    pub fn tcp4_frame(
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        src: [u8; 4],
        dst: [u8; 4],
        mut tcp_hdr: Vec<u8>,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = eth(dst_mac, src_mac, 0x0800);
        ipv4(&mut f, src, dst, 6, tcp_hdr.len() + payload.len());
        let len = (tcp_hdr.len() + payload.len()) as u16;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&len.to_be_bytes());
        let c = !rfc1071(&[&pseudo, &tcp_hdr, payload]);
        tcp_hdr[16..18].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&tcp_hdr);
        f.extend_from_slice(payload);
        f
    }

    /// The reply to an ARP request for `ip`, as host `mac`; None for any other frame.
    pub fn arp_reply(frame: &[u8], mac: [u8; 6], ip: [u8; 4]) -> Option<Vec<u8>> {
        let arp = frame.get(14..42)?;
        if frame[12..14] != [0x08, 0x06] || arp[6..8] != [0, 1] || arp[24..28] != ip {
            return None;
        }
        let mut f = eth(frame[6..12].try_into().ok()?, mac, 0x0806);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&arp[8..18]); // sender MAC + IP become the target
        Some(f)
    }

    /// The reply to an ICMP echo request to `ip`; None for any other frame.
    pub fn icmp_echo_reply(frame: &[u8], ip: [u8; 4]) -> Option<Vec<u8>> {
        if frame.get(12..14)? != [0x08, 0x00] {
            return None;
        }
        let ip_hdr = frame.get(14..34)?;
        let ihl = (ip_hdr[0] & 0xf) as usize * 4;
        let tot = u16::from_be_bytes([ip_hdr[2], ip_hdr[3]]) as usize;
        if ip_hdr[9] != 1 || ip_hdr[16..20] != ip || frame.len() < 14 + tot {
            return None;
        }
        let icmp = frame.get(14 + ihl..14 + tot)?;
        if icmp.first() != Some(&8) {
            return None;
        }
        let mut reply_icmp = icmp.to_vec();
        reply_icmp[0] = 0;
        reply_icmp[2..4].copy_from_slice(&[0, 0]);
        let c = !rfc1071(&[&reply_icmp]);
        reply_icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = eth(
            frame[6..12].try_into().ok()?,
            frame[0..6].try_into().ok()?,
            0x0800,
        );
        let src: [u8; 4] = ip_hdr[12..16].try_into().ok()?;
        ipv4(&mut f, ip, src, 1, reply_icmp.len());
        f.extend_from_slice(&reply_icmp);
        Some(f)
    }

    /// The receiving end of one TCP connection, just enough to take a stream from the
    /// kernel: answers the SYN, checks every segment (after software segmentation of GSO
    /// frames) for checksums and order, acknowledges with a 64 KiB window, counts what came.
    pub struct TcpSink {
        pub mac: [u8; 6],
        pub ip: [u8; 4],
        pub port: u16,
        /// Next expected sequence number (None before the SYN).
        pub expect: Option<u32>,
        pub bytes: usize,
        pub fin: bool,
        /// GSO frames seen, and the largest frame.
        pub gso_frames: usize,
        pub largest: usize,
        pub segments: usize,
    }

    impl TcpSink {
        pub fn new(mac: [u8; 6], ip: [u8; 4], port: u16) -> TcpSink {
            TcpSink {
                mac,
                ip,
                port,
                expect: None,
                bytes: 0,
                fin: false,
                gso_frames: 0,
                largest: 0,
                segments: 0,
            }
        }

        /// Takes one frame (with its vnet header), returns the frames to send back.
        pub fn handle(&mut self, buf: &[u8], mtu: usize) -> Vec<Vec<u8>> {
            let hdr = super::VnetHdr::parse(buf).unwrap();
            let frame = &buf[super::VnetHdr::LEN..];
            if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
                return Vec::new();
            }
            if frame[30..34] != self.ip || frame[36..38] != self.port.to_be_bytes() {
                return Vec::new();
            }
            self.largest = self.largest.max(frame.len());
            if hdr.is_gso() {
                self.gso_frames += 1;
            }
            let mut segs = Vec::new();
            super::segment(&hdr, frame, &mut segs).unwrap();
            let mut replies = Vec::new();
            for seg in segs {
                assert!(seg.len() <= mtu + 14, "segment of {} bytes", seg.len());
                let (seq, flags, data) = check_tcp4(&seg);
                self.segments += 1;
                let peer_mac: [u8; 6] = seg[6..12].try_into().unwrap();
                let peer_ip: [u8; 4] = seg[26..30].try_into().unwrap();
                let peer_port = u16::from_be_bytes([seg[34], seg[35]]);
                let mut ack_flags = 0x10;
                let mut my_seq = 1001;
                if flags & 0x02 != 0 {
                    // SYN: answer with SYN-ACK, MSS option for our MTU.
                    self.expect = Some(seq.wrapping_add(1));
                    ack_flags |= 0x02;
                    my_seq = 1000;
                } else if let Some(expect) = self.expect {
                    if seq == expect {
                        self.bytes += data.len();
                        let mut next = expect.wrapping_add(data.len() as u32);
                        if flags & 0x01 != 0 {
                            self.fin = true;
                            next = next.wrapping_add(1);
                        }
                        self.expect = Some(next);
                    } else {
                        // A retransmission or a gap: just acknowledge what we have.
                        assert!(
                            seq.wrapping_sub(expect) > 0x8000_0000,
                            "segment from the future: seq {seq} expected {expect}"
                        );
                    }
                } else {
                    continue;
                }
                let mut t = tcp(
                    self.port,
                    peer_port,
                    my_seq,
                    self.expect.unwrap(),
                    ack_flags,
                    65535,
                );
                if ack_flags & 0x02 != 0 {
                    t[12] = 0x60;
                    t.extend_from_slice(&[2, 4]);
                    t.extend_from_slice(&((mtu - 40) as u16).to_be_bytes());
                }
                replies.push(tcp4_frame(peer_mac, self.mac, self.ip, peer_ip, t, &[]));
            }
            replies
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    const IP_A: [u8; 4] = [192, 0, 2, 10];
    const IP_B: [u8; 4] = [192, 0, 2, 11];

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A GSO frame the way the kernel hands it out: IPv4 total length of the whole thing,
    /// TCP checksum partial (pseudo-header only), NEEDS_CSUM set.
    fn gso4(payload: &[u8], flags: u8, mss: u16) -> (VnetHdr, Vec<u8>) {
        let mut f = eth(B, A, 0x0800);
        ipv4(&mut f, IP_A, IP_B, 6, 20 + payload.len());
        let mut t = tcp(40000, 5001, 0xffff_f000, 77, flags, 512);
        let len = (20 + payload.len()) as u16;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&IP_A);
        pseudo.extend_from_slice(&IP_B);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&len.to_be_bytes());
        t[16..18].copy_from_slice(&rfc1071(&[&pseudo]).to_be_bytes());
        f.extend_from_slice(&t);
        f.extend_from_slice(payload);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: mss,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        (hdr, f)
    }

    #[test]
    fn header_round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 74,
            gso_size: 1440,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 1,
        };
        let mut buf = [0u8; 20];
        h.emit(&mut buf).unwrap();
        assert_eq!(VnetHdr::parse(&buf).unwrap(), h);
        assert_eq!(buf[0], 1);
        assert_eq!(buf[1], 0x84);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 1440);
        assert!(h.is_gso() && h.needs_csum());
        assert_eq!(h.gso_kind(), GSO_TCPV6);
        assert!(!VnetHdr::NONE.is_gso());
        assert_eq!(VnetHdr::parse(&buf[..11]), Err(VnetError::ShortHeader(11)));
        assert_eq!(h.emit(&mut [0u8; 3]), Err(VnetError::ShortHeader(3)));
    }

    #[test]
    fn three_segments_each_valid() {
        let payload = pattern(3000);
        let (hdr, frame) = gso4(&payload, TCP_PSH | TCP_FIN | TCP_CWR | 0x10, 1200);
        let mut out = Vec::new();
        segment(&hdr, &frame, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut joined = Vec::new();
        for (i, seg) in out.iter().enumerate() {
            let (seq, flags, data) = check_tcp4(seg);
            assert_eq!(
                seq,
                0xffff_f000u32.wrapping_add(i as u32 * 1200),
                "seq wraps"
            );
            let id = u16::from_be_bytes([seg[18], seg[19]]);
            assert_eq!(id, 0x1234 + i as u16);
            assert_eq!(flags & 0x10, 0x10, "ACK on every segment");
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
            assert_eq!(
                flags & (TCP_FIN | TCP_PSH) != 0,
                i == 2,
                "FIN/PSH only on the last"
            );
            if i == 2 {
                assert_eq!(flags & (TCP_FIN | TCP_PSH), TCP_FIN | TCP_PSH);
            }
            assert_eq!(data.len(), if i < 2 { 1200 } else { 600 });
            assert_eq!(&seg[..14], &frame[..14], "Ethernet header kept");
            joined.extend_from_slice(&data);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn odd_lengths() {
        for (len, mss) in [(1, 1448), (1447, 1448), (1449, 1448), (4097, 1023), (13, 3)] {
            let payload = pattern(len);
            let (hdr, frame) = gso4(&payload, 0x18, mss);
            let mut out = Vec::new();
            segment(&hdr, &frame, &mut out).unwrap();
            assert_eq!(out.len(), len.div_ceil(mss as usize), "len {len} mss {mss}");
            let mut joined = Vec::new();
            for seg in &out {
                let (_, _, data) = check_tcp4(seg);
                assert!(data.len() <= mss as usize);
                joined.extend_from_slice(&data);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        // A small frame padded to 60 bytes: IPv4 total length says 41 bytes of IP.
        let (hdr, mut frame) = gso4(&[0xaa], 0x18, 1000);
        frame.resize(60, 0);
        let mut out = Vec::new();
        segment(&hdr, &frame, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        let (_, _, data) = check_tcp4(&out[0]);
        assert_eq!(data, vec![0xaa]);
    }

    #[test]
    fn vlan_tagged_and_options() {
        let payload = pattern(2500);
        let (hdr, frame) = gso4(&payload, 0x10, 1000);
        // Insert an 802.1Q tag and 12 bytes of TCP options (NOP NOP timestamp).
        let mut f = frame[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        f.extend_from_slice(&frame[12..34]);
        let ip_tot = u16::from_be_bytes([f[20], f[21]]) + 12;
        f[20..22].copy_from_slice(&ip_tot.to_be_bytes());
        let mut t = frame[34..54].to_vec();
        t[12] = 0x80;
        f.extend_from_slice(&t);
        f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        f.extend_from_slice(&payload);
        let mut out = Vec::new();
        segment(&hdr, &f, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut joined = Vec::new();
        for seg in &out {
            // Strip the tag to reuse the untagged verifier.
            let mut plain = seg[..12].to_vec();
            plain.extend_from_slice(&seg[16..]);
            let (_, _, data) = check_tcp4(&plain);
            assert_eq!(&seg[12..16], &[0x81, 0x00, 0x00, 0x05]);
            assert_eq!(
                &seg[54 + 4..54 + 4 + 12],
                &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]
            );
            joined.extend_from_slice(&data);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn tcpv6_segments() {
        let payload = pattern(2900);
        let src: [u8; 16] = [0x20, 0x01, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst: [u8; 16] = [0x20, 0x01, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut f = eth(B, A, 0x86dd);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&tcp(1, 2, 100, 0, 0x19, 100));
        f.extend_from_slice(&payload);
        let hdr = VnetHdr {
            gso_type: GSO_TCPV6,
            gso_size: 1000,
            ..VnetHdr::NONE
        };
        let mut out = Vec::new();
        segment(&hdr, &f, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut joined = Vec::new();
        for (i, seg) in out.iter().enumerate() {
            let (seq, flags, data) = check_tcp6(seg);
            assert_eq!(seq, 100 + 1000 * i as u32);
            assert_eq!(flags & TCP_FIN != 0, i == 2);
            joined.extend_from_slice(&data);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn not_gso_is_copied_with_checksum_completed() {
        let payload = pattern(101);
        let (mut hdr, frame) = gso4(&payload, 0x18, 0);
        hdr.gso_type = GSO_NONE;
        let mut out = Vec::new();
        segment(&hdr, &frame, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        check_tcp4(&out[0]);
    }

    #[test]
    fn complete_checksum_tcp_and_udp() {
        let payload = pattern(333);
        let (hdr, mut frame) = gso4(&payload, 0x18, 0);
        complete_checksum(&hdr, &mut frame).unwrap();
        check_tcp4(&frame);
        // Without NEEDS_CSUM nothing changes.
        let before = frame.clone();
        complete_checksum(&VnetHdr::NONE, &mut frame).unwrap();
        assert_eq!(frame, before);

        // UDP whose checksum comes out as 0 must be sent as 0xffff. Payload chosen so the
        // sum of pseudo-header + header + data is 0xffff: the complement is 0.
        let mut f = eth(B, A, 0x0800);
        ipv4(&mut f, [0, 0, 0, 0], [0, 0, 0, 0], 17, 10);
        // UDP header: ports 0, length 10, checksum field = pseudo sum (proto 17 + len 10).
        let pseudo_sum: u16 = 17 + 10;
        f.extend_from_slice(&[0, 0, 0, 0, 0, 10]);
        f.extend_from_slice(&pseudo_sum.to_be_bytes());
        // Data word makes the total 0xffff: pseudo_sum (in the checksum field) + length 10.
        let fill: u16 = 0xffff - pseudo_sum - 10;
        f.extend_from_slice(&fill.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHdr::NONE
        };
        complete_checksum(&hdr, &mut f).unwrap();
        assert_eq!(&f[40..42], &[0xff, 0xff]);
    }

    #[test]
    fn bad_headers_are_errors() {
        let payload = pattern(3000);
        let (hdr, frame) = gso4(&payload, 0x10, 1000);
        let mut out = Vec::new();
        let seg = |h: &VnetHdr, f: &[u8], out: &mut Vec<Vec<u8>>| segment(h, f, out);

        let zero = VnetHdr { gso_size: 0, ..hdr };
        assert_eq!(seg(&zero, &frame, &mut out), Err(VnetError::ZeroGsoSize));
        let udp = VnetHdr {
            gso_type: GSO_UDP,
            ..hdr
        };
        assert_eq!(
            seg(&udp, &frame, &mut out),
            Err(VnetError::UnsupportedGso(GSO_UDP))
        );
        let v6 = VnetHdr {
            gso_type: GSO_TCPV6,
            ..hdr
        };
        assert!(matches!(
            seg(&v6, &frame, &mut out),
            Err(VnetError::Malformed(_))
        ));
        assert!(matches!(
            seg(&hdr, &frame[..40], &mut out),
            Err(VnetError::Truncated(_))
        ));
        assert!(matches!(
            seg(&hdr, &frame[..10], &mut out),
            Err(VnetError::Truncated(_))
        ));
        // IPv4 total length beyond the frame.
        assert!(matches!(
            seg(&hdr, &frame[..1000], &mut out),
            Err(VnetError::Truncated(_))
        ));
        let mut f = frame.clone();
        f[14] = 0x44; // IHL 4
        assert!(matches!(
            seg(&hdr, &f, &mut out),
            Err(VnetError::Malformed(_))
        ));
        let mut f = frame.clone();
        f[14 + 9] = 17; // UDP
        assert!(matches!(
            seg(&hdr, &f, &mut out),
            Err(VnetError::Malformed(_))
        ));
        let mut f = frame.clone();
        f[34 + 12] = 0x40; // TCP data offset 16
        assert!(matches!(
            seg(&hdr, &f, &mut out),
            Err(VnetError::Malformed(_))
        ));
        let mut f = frame.clone();
        f[20] = 0x20; // More fragments
        assert!(matches!(
            seg(&hdr, &f, &mut out),
            Err(VnetError::Malformed(_))
        ));
        let tiny = VnetHdr { gso_size: 1, ..hdr };
        assert_eq!(
            seg(&tiny, &frame, &mut out),
            Err(VnetError::TooManySegments(3000))
        );
        assert!(out.is_empty(), "nothing appended on error");

        let mut f = frame.clone();
        let bad = VnetHdr {
            csum_start: 3050,
            ..hdr
        };
        assert!(matches!(
            complete_checksum(&bad, &mut f),
            Err(VnetError::BadChecksumOffset { .. })
        ));
        let bad = VnetHdr {
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..hdr
        };
        assert!(complete_checksum(&bad, &mut f).is_err());
    }

    /// xorshift: deterministic garbage for the no-panic tests.
    fn rng(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let (_, valid) = gso4(&pattern(2000), 0x18, 500);
        let mut out = Vec::new();
        for round in 0..3000 {
            // Half the inputs are mutations of a valid frame (to get past the first checks).
            let mut f = if round % 2 == 0 {
                let n = (rng(&mut s) % 200) as usize;
                (0..n).map(|_| rng(&mut s) as u8).collect::<Vec<_>>()
            } else {
                let mut f = valid.clone();
                for _ in 0..(rng(&mut s) % 6) {
                    let i = (rng(&mut s) as usize) % f.len();
                    f[i] = rng(&mut s) as u8;
                }
                f.truncate((rng(&mut s) as usize) % (f.len() + 1));
                f
            };
            let mut hb = [0u8; 12];
            for b in hb.iter_mut() {
                *b = rng(&mut s) as u8;
            }
            hb[1] &= 0x87;
            let hdr = VnetHdr::parse(&hb).unwrap();
            out.clear();
            let _ = segment(&hdr, &f, &mut out);
            let _ = complete_checksum(&hdr, &mut f);
        }
    }

    /// Pushes `frames` through a coalescer and flushes; returns every emitted buffer.
    fn coalesce(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut c = Coalescer::new();
        let mut out = Vec::new();
        for f in frames {
            c.push(f, &mut |b: &[u8]| out.push(b.to_vec()));
        }
        c.flush(&mut |b: &[u8]| out.push(b.to_vec()));
        assert!(!c.is_pending());
        out
    }

    /// The segments of a TSO frame of `len` payload bytes, as a peer's kernel sends them.
    fn segments(len: usize, mss: u16, flags: u8) -> Vec<Vec<u8>> {
        let (hdr, frame) = gso4(&pattern(len), flags, mss);
        let mut segs = Vec::new();
        segment(&hdr, &frame, &mut segs).unwrap();
        segs
    }

    /// Segments an emitted buffer again (what the receiving kernel does, in effect).
    fn resegment(buf: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VnetHdr::parse(buf).unwrap();
        let mut out = Vec::new();
        segment(&hdr, &buf[VnetHdr::LEN..], &mut out).unwrap();
        out
    }

    #[test]
    fn fast_sum_matches_rfc1071() {
        for len in [0, 1, 2, 7, 8, 9, 15, 16, 17, 1449, 65_535] {
            let data = pattern(len);
            assert_eq!(fold(sum(0, &data)), rfc1071(&[&data]), "len {len}");
            assert_eq!(
                fold(sum(0xfffe, &data)),
                rfc1071(&[&[0xff, 0xfe], &data]),
                "len {len} with carry in"
            );
        }
        let ones = vec![0xffu8; 70_001];
        assert_eq!(
            fold(sum(0x1_fffe, &ones)),
            rfc1071(&[&[0xff, 0xff, 0xff, 0xff], &ones])
        );
    }

    #[test]
    fn segment_into_lays_segments_out_for_udp_gso() {
        let (hdr, frame) = gso4(&pattern(3000), 0x18, 1200);
        let prefix = [0xaa; 8];
        let mut buf = vec![1, 2, 3];
        let segs = segment_into(&hdr, &frame, &prefix, &mut buf).unwrap();
        assert_eq!(
            segs,
            Segmented {
                count: 3,
                seg_len: 8 + 54 + 1200
            }
        );
        assert_eq!(buf.len(), 2 * segs.seg_len + 8 + 54 + 600);
        let mut want = Vec::new();
        segment(&hdr, &frame, &mut want).unwrap();
        for (i, w) in want.iter().enumerate() {
            let at = i * segs.seg_len;
            assert_eq!(&buf[at..at + 8], &prefix);
            assert_eq!(&buf[at + 8..at + 8 + w.len()], &w[..]);
        }
        // Errors leave the buffer empty.
        let bad = VnetHdr { gso_size: 0, ..hdr };
        assert!(segment_into(&bad, &frame, &prefix, &mut buf).is_err());
        assert!(buf.is_empty());
    }

    #[test]
    fn coalesced_frame_segments_back_to_the_originals() {
        for (len, mss) in [
            (20_000, 1448),
            (1448 * 7, 1448),
            (3001, 1000),
            (65_535 - 40, 1460),
        ] {
            let segs = segments(len, mss, TCP_ACK | TCP_PSH);
            let out = coalesce(&segs);
            assert_eq!(out.len(), 1, "len {len} mss {mss}: one merged frame");
            let hdr = VnetHdr::parse(&out[0]).unwrap();
            assert_eq!(hdr.gso_type, GSO_TCPV4);
            assert_eq!(hdr.flags, F_NEEDS_CSUM);
            assert_eq!(hdr.gso_size, mss);
            assert_eq!((hdr.csum_start, hdr.csum_offset, hdr.hdr_len), (34, 16, 54));
            let f = &out[0][VnetHdr::LEN..];
            assert_eq!(usize::from(be16(f, 16)), f.len() - 14, "IP total length");
            assert_eq!(rfc1071(&[&f[14..34]]), 0xffff, "IP header checksum");
            assert_eq!(f[47], TCP_ACK | TCP_PSH, "the last segment's flags");
            // Completing the partial checksum gives a valid TCP checksum over everything.
            let mut full = f.to_vec();
            complete_checksum(&hdr, &mut full).unwrap();
            let (_, _, data) = check_tcp4(&full);
            assert_eq!(data, pattern(len));
            assert_eq!(resegment(&out[0]), segs, "byte for byte");
        }
    }

    #[test]
    fn single_and_unmergeable_frames_pass_through_unchanged() {
        let mut frames = segments(1000, 1448, TCP_ACK);
        // SYN, pure ACK, FIN, UDP, ARP, a runt.
        frames.push(tcp4_frame(
            B,
            A,
            IP_A,
            IP_B,
            tcp(1, 2, 3, 0, 0x02, 100),
            &[],
        ));
        frames.push(tcp4_frame(
            B,
            A,
            IP_A,
            IP_B,
            tcp(1, 2, 3, 4, 0x10, 100),
            &[],
        ));
        frames.push(tcp4_frame(
            B,
            A,
            IP_A,
            IP_B,
            tcp(1, 2, 3, 4, 0x11, 100),
            b"x",
        ));
        let mut udp = eth(B, A, 0x0800);
        ipv4(&mut udp, IP_A, IP_B, 17, 12);
        udp.extend_from_slice(&[0, 1, 0, 2, 0, 12, 0, 0, 1, 2, 3, 4]);
        frames.push(udp);
        let mut arp = eth([0xff; 6], A, 0x0806);
        arp.extend_from_slice(&[0; 28]);
        frames.push(arp);
        frames.push(vec![1, 2, 3]);
        let out = coalesce(&frames);
        assert_eq!(out.len(), frames.len());
        for (o, f) in out.iter().zip(&frames) {
            assert_eq!(&o[..VnetHdr::LEN], &[0; VnetHdr::LEN]);
            assert_eq!(&o[VnetHdr::LEN..], &f[..]);
        }
    }

    /// Every emitted buffer, segmented again, concatenated: must be the input, in order.
    fn flatten(out: &[Vec<u8>]) -> Vec<Vec<u8>> {
        out.iter()
            .flat_map(|b| {
                if VnetHdr::parse(b).unwrap().is_gso() {
                    resegment(b)
                } else {
                    vec![b[VnetHdr::LEN..].to_vec()]
                }
            })
            .collect()
    }

    #[test]
    fn corrupted_segment_is_not_merged_and_order_is_kept() {
        let mut segs = segments(10 * 1448, 1448, TCP_ACK);
        segs[4][100] ^= 0x40;
        let out = coalesce(&segs);
        assert_eq!(out.len(), 3, "4 merged, the bad one alone, 5 merged");
        assert_eq!(
            &out[1][VnetHdr::LEN..],
            &segs[4][..],
            "passed through as it came"
        );
        assert_eq!(&out[1][..VnetHdr::LEN], &[0; VnetHdr::LEN], "no DATA_VALID");
        assert_eq!(flatten(&out), segs);
        // A bad IP header checksum likewise.
        let mut segs = segments(4 * 1448, 1448, TCP_ACK);
        segs[2][24] ^= 1;
        assert_eq!(flatten(&coalesce(&segs)), segs);
        assert_eq!(coalesce(&segs).len(), 3);
    }

    #[test]
    fn flows_gaps_and_boundaries_end_frames() {
        // Two interleaved flows: nothing merges, order kept.
        let a = segments(3 * 1000, 1000, TCP_ACK);
        let mut b = segments(3 * 1000, 1000, TCP_ACK);
        for f in &mut b {
            f[34] ^= 1; // another source port
            f[50..52].copy_from_slice(&[0, 0]);
            let tcp_len = (f.len() - 34) as u32;
            let s = sum(0, &f[26..34]) + 6 + tcp_len;
            let c = !fold(sum(s, &f[34..]));
            f[50..52].copy_from_slice(&c.to_be_bytes());
        }
        let mixed: Vec<Vec<u8>> = a
            .iter()
            .zip(&b)
            .flat_map(|(x, y)| [x.clone(), y.clone()])
            .collect();
        let out = coalesce(&mixed);
        assert_eq!(out.len(), 6);
        assert_eq!(flatten(&out), mixed);

        // A gap in the sequence numbers (a lost segment): two frames.
        let mut segs = segments(6 * 1000, 1000, TCP_ACK);
        segs.remove(3);
        let out = coalesce(&segs);
        assert_eq!(out.len(), 2);
        assert_eq!(flatten(&out), segs);

        // A short segment ends the frame; so does PSH.
        let mut segs = segments(2500, 1000, TCP_ACK);
        segs.extend(
            segments(2000, 1000, TCP_ACK | TCP_PSH)
                .into_iter()
                .map(|mut f| {
                    // Continue the first run's sequence space: not contiguous (the short one ended it).
                    f[38] ^= 0x80;
                    f
                }),
        );
        let out = coalesce(&segs);
        assert_eq!(flatten(&out), segs);
        assert!(out.len() >= 2);

        // More than 64 KiB of one flow: several frames, none over the IP limit.
        let mut segs = Vec::new();
        let mut seq = 1u32;
        let mut id = 7u16;
        for _ in 0..100 {
            let mut f = tcp4_frame(
                B,
                A,
                IP_A,
                IP_B,
                tcp(1, 2, seq, 9, TCP_ACK, 300),
                &pattern(1448),
            );
            f[18..20].copy_from_slice(&id.to_be_bytes());
            f[24..26].copy_from_slice(&[0, 0]);
            let c = !fold(sum(0, &f[14..34]));
            f[24..26].copy_from_slice(&c.to_be_bytes());
            segs.push(f);
            seq = seq.wrapping_add(1448);
            id = id.wrapping_add(1);
        }
        let out = coalesce(&segs);
        assert_eq!(out.len(), 3, "45 + 45 + 10 segments");
        for o in &out {
            assert!(o.len() - VnetHdr::LEN - 14 <= 65_535);
        }
        assert_eq!(flatten(&out), segs);
    }

    #[test]
    fn coalescer_never_panics_on_garbage() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let valid = segments(8 * 700, 700, TCP_ACK);
        let mut c = Coalescer::new();
        let mut n = 0usize;
        for round in 0..5000 {
            let mut f = valid[round % valid.len()].clone();
            if round % 3 != 0 {
                for _ in 0..(rng(&mut s) % 4) {
                    let i = (rng(&mut s) as usize) % f.len();
                    f[i] = rng(&mut s) as u8;
                }
                f.truncate((rng(&mut s) as usize) % (f.len() + 1));
            }
            c.push(&f, &mut |b: &[u8]| {
                n += 1;
                if VnetHdr::parse(b).unwrap().is_gso() {
                    resegment(b);
                }
            });
        }
        c.flush(&mut |_: &[u8]| n += 1);
        assert!(n > 0);
    }
}
