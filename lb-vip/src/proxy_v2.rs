//! PROXY protocol version 2 (HAProxy's `proxy-protocol.txt`, §2.2): the binary header lb-vip
//! may send first on a connection to a backend so that the backend learns the client's
//! address. Pure code: [`encode`] / [`encode_local`] for the proxy, [`parse`] for tests and
//! for backends written in Rust. Parsing any bytes never panics.
//!
//! ```text
//! offset  size  field
//!      0    12  signature \r\n\r\n\0\r\nQUIT\n
//!     12     1  version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY)
//!     13     1  family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
//!               | transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM)
//!     14     2  length of what follows (addresses + TLVs), network order
//!     16     …  INET:  src addr (4), dst addr (4),   src port (2), dst port (2) = 12
//!               INET6: src addr (16), dst addr (16), src port (2), dst port (2) = 36
//!               UNIX:  src path (108), dst path (108)                         = 216
//!      …     …  TLVs (skipped)
//! ```
//!
//! Only the family/transport bytes 0x00, 0x11, 0x12, 0x21, 0x22, 0x31 and 0x32 are valid;
//! the spec says receivers must reject the others. For LOCAL the family is ignored, as the
//! spec says.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

use crate::sched::Proto;

/// The 12-byte v2 signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Length of the fixed part (signature, version/command, family, length).
pub const FIXED_LEN: usize = 16;
/// Default limit on the declared length after the fixed part (addresses + TLVs). The field
/// allows 65,535; a header that long is not one lb-vip sends, and refusing it early keeps a
/// reader from buffering 64 KiB for it.
pub const DEFAULT_MAX_LEN: usize = 4096;

const VERSION: u8 = 0x2;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;

const UNSPEC: u8 = 0x00;
const TCP4: u8 = 0x11;
const UDP4: u8 = 0x12;
const TCP6: u8 = 0x21;
const UDP6: u8 = 0x22;
const UNIX_STREAM: u8 = 0x31;
const UNIX_DGRAM: u8 = 0x32;

const INET_LEN: usize = 12;
const INET6_LEN: usize = 36;
const UNIX_LEN: usize = 216;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProxyError {
    #[error("incomplete PROXY v2 header: {needed} bytes needed, {have} available")]
    Incomplete { needed: usize, have: usize },
    #[error("not a PROXY v2 header: bad signature")]
    BadSignature,
    #[error("unsupported PROXY protocol version {0}")]
    BadVersion(u8),
    #[error("unknown PROXY v2 command {0:#x}")]
    BadCommand(u8),
    #[error("invalid PROXY v2 address family and transport byte {0:#04x}")]
    BadFamily(u8),
    #[error("PROXY v2 address block of {len} bytes is shorter than the {need} its family needs")]
    AddressesTooShort { len: usize, need: usize },
    #[error(
        "PROXY v2 header declares {len} bytes after the fixed part, more than the limit {max}"
    )]
    TooLong { len: usize, max: usize },
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// LOCAL command (e.g. a health check from the proxy itself): the connection's real
    /// endpoints apply.
    Local,
    /// PROXY command with IPv4 or IPv6 addresses: the client (`src`) and the address it
    /// connected to (`dst`).
    Proxy {
        src: SocketAddr,
        dst: SocketAddr,
        proto: Proto,
    },
    /// PROXY command with family UNSPEC or UNIX: no IP addresses; the spec lets the receiver
    /// use the connection's real endpoints.
    ProxyUnspec,
}

impl Header {
    /// The client and destination addresses, for [`Header::Proxy`].
    pub fn addresses(&self) -> Option<(SocketAddr, SocketAddr)> {
        match *self {
            Header::Proxy { src, dst, .. } => Some((src, dst)),
            _ => None,
        }
    }
}

/// The PROXY header for a connection from `src` to `dst`. Both IPv4 (IPv4-mapped IPv6
/// addresses count as IPv4): AF_INET. Otherwise AF_INET6, an IPv4 address written in its
/// IPv4-mapped form. IPv6 flow info and scope ids are not carried. No TLVs.
pub fn encode(src: SocketAddr, dst: SocketAddr, proto: Proto) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + INET6_LEN);
    encode_into(&mut out, src, dst, proto);
    out
}

/// [`encode`], appending to `out`.
pub fn encode_into(out: &mut Vec<u8>, src: SocketAddr, dst: SocketAddr, proto: Proto) {
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION << 4 | CMD_PROXY);
    match (src.ip().to_canonical(), dst.ip().to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(match proto {
                Proto::Tcp => TCP4,
                Proto::Udp => UDP4,
            });
            out.extend_from_slice(&(INET_LEN as u16).to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(match proto {
                Proto::Tcp => TCP6,
                Proto::Udp => UDP6,
            });
            out.extend_from_slice(&(INET6_LEN as u16).to_be_bytes());
            out.extend_from_slice(&as_v6(s).octets());
            out.extend_from_slice(&as_v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// The LOCAL header (no addresses): for connections the proxy makes on its own behalf, such
/// as health checks.
pub fn encode_local() -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION << 4 | CMD_LOCAL);
    out.push(UNSPEC);
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// Parses a header at the start of `buf`, with the [`DEFAULT_MAX_LEN`] limit. Returns the
/// header and the number of bytes it takes (fixed part, addresses and TLVs); what follows
/// is the connection's payload.
pub fn parse(buf: &[u8]) -> Result<(Header, usize), ProxyError> {
    parse_with_max(buf, DEFAULT_MAX_LEN)
}

/// [`parse`] with a limit on the declared length after the fixed part.
///
/// Errors are reported as early as the bytes allow: a wrong signature, version, command or
/// family byte, or a length over `max_len`, is reported from the first bytes that show it;
/// [`ProxyError::Incomplete`] means "read more" (`needed` is the whole header's length when
/// known, else 16).
pub fn parse_with_max(buf: &[u8], max_len: usize) -> Result<(Header, usize), ProxyError> {
    let sig = buf.len().min(SIGNATURE.len());
    if buf[..sig] != SIGNATURE[..sig] {
        return Err(ProxyError::BadSignature);
    }
    if let Some(&vc) = buf.get(12) {
        if vc >> 4 != VERSION {
            return Err(ProxyError::BadVersion(vc >> 4));
        }
        if !matches!(vc & 0x0f, CMD_LOCAL | CMD_PROXY) {
            return Err(ProxyError::BadCommand(vc & 0x0f));
        }
    }
    let local = buf.get(12).is_some_and(|vc| vc & 0x0f == CMD_LOCAL);
    if let Some(&fam) = buf.get(13) {
        if !local
            && !matches!(
                fam,
                UNSPEC | TCP4 | UDP4 | TCP6 | UDP6 | UNIX_STREAM | UNIX_DGRAM
            )
        {
            return Err(ProxyError::BadFamily(fam));
        }
    }
    let Some(fixed) = buf.first_chunk::<FIXED_LEN>() else {
        return Err(ProxyError::Incomplete {
            needed: FIXED_LEN,
            have: buf.len(),
        });
    };
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > max_len {
        return Err(ProxyError::TooLong { len, max: max_len });
    }
    let total = FIXED_LEN + len;
    let Some(block) = buf.get(FIXED_LEN..total) else {
        return Err(ProxyError::Incomplete {
            needed: total,
            have: buf.len(),
        });
    };
    if local {
        return Ok((Header::Local, total));
    }
    let fam = fixed[13];
    let need = match fam {
        TCP4 | UDP4 => INET_LEN,
        TCP6 | UDP6 => INET6_LEN,
        UNIX_STREAM | UNIX_DGRAM => UNIX_LEN,
        _ => 0,
    };
    if len < need {
        return Err(ProxyError::AddressesTooShort { len, need });
    }
    let proto = match fam & 0x0f {
        0x1 => Proto::Tcp,
        _ => Proto::Udp,
    };
    let header = match fam {
        TCP4 | UDP4 => {
            let ip = |o: usize| Ipv4Addr::new(block[o], block[o + 1], block[o + 2], block[o + 3]);
            Header::Proxy {
                src: SocketAddr::new(ip(0).into(), port(block, 8)),
                dst: SocketAddr::new(ip(4).into(), port(block, 10)),
                proto,
            }
        }
        TCP6 | UDP6 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&block[o..o + 16]);
                Ipv6Addr::from(a)
            };
            Header::Proxy {
                src: SocketAddr::new(ip(0).into(), port(block, 32)),
                dst: SocketAddr::new(ip(16).into(), port(block, 34)),
                proto,
            }
        }
        // UNSPEC, UNIX: nothing an IP proxy can use.
        _ => Header::ProxyUnspec,
    };
    Ok((header, total))
}

fn port(block: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([block[at], block[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: [u8; 12] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
    ];

    fn tcp4_vector() -> Vec<u8> {
        // 192.0.2.1:56324 -> 198.51.100.10:443 over TCP, written out from the spec.
        let mut v = SIG.to_vec();
        v.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        v.extend_from_slice(&[0xc0, 0x00, 0x02, 0x01]);
        v.extend_from_slice(&[0xc6, 0x33, 0x64, 0x0a]);
        v.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        v
    }

    fn udp6_vector() -> Vec<u8> {
        // [2001:db8::1]:5353 -> [2001:db8::2]:53 over UDP.
        let mut v = SIG.to_vec();
        v.extend_from_slice(&[0x21, 0x22, 0x00, 0x24]);
        v.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
        ]);
        v.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
        ]);
        v.extend_from_slice(&[0x14, 0xe9, 0x00, 0x35]);
        v
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn signature_constant_matches_the_spec() {
        assert_eq!(SIGNATURE, SIG);
    }

    #[test]
    fn encode_tcp4_byte_exact() {
        let e = encode(sa("192.0.2.1:56324"), sa("198.51.100.10:443"), Proto::Tcp);
        assert_eq!(e, tcp4_vector());
        assert_eq!(e.len(), 28);
    }

    #[test]
    fn encode_udp6_byte_exact() {
        let e = encode(sa("[2001:db8::1]:5353"), sa("[2001:db8::2]:53"), Proto::Udp);
        assert_eq!(e, udp6_vector());
        assert_eq!(e.len(), 52);
    }

    #[test]
    fn encode_local_byte_exact() {
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(encode_local(), want);
        assert_eq!(parse(&want), Ok((Header::Local, 16)));
    }

    #[test]
    fn encode_mixed_and_mapped_families() {
        // IPv4-mapped on both sides (a dual-stack listener): sent as AF_INET.
        let e = encode(
            sa("[::ffff:192.0.2.1]:56324"),
            sa("[::ffff:198.51.100.10]:443"),
            Proto::Tcp,
        );
        assert_eq!(e, tcp4_vector());
        // One side IPv4, the other IPv6: AF_INET6 with the IPv4 address mapped.
        let e = encode(sa("192.0.2.1:1"), sa("[2001:db8::2]:2"), Proto::Tcp);
        assert_eq!(e[13], 0x21);
        assert_eq!(
            parse(&e).unwrap().0.addresses(),
            Some((sa("[::ffff:192.0.2.1]:1"), sa("[2001:db8::2]:2")))
        );
    }

    #[test]
    fn parse_tcp4_and_udp6_vectors() {
        let mut v = tcp4_vector();
        v.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&v),
            Ok((
                Header::Proxy {
                    src: sa("192.0.2.1:56324"),
                    dst: sa("198.51.100.10:443"),
                    proto: Proto::Tcp
                },
                28
            ))
        );
        assert_eq!(&v[28..], b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&udp6_vector()),
            Ok((
                Header::Proxy {
                    src: sa("[2001:db8::1]:5353"),
                    dst: sa("[2001:db8::2]:53"),
                    proto: Proto::Udp
                },
                52
            ))
        );
    }

    #[test]
    fn tlvs_are_skipped() {
        let mut v = tcp4_vector();
        v[15] = 12 + 6 + 7; // addresses + the two TLVs below
        v.extend_from_slice(&[0x04, 0x00, 0x03, 0xaa, 0xbb, 0xcc]); // PP2_TYPE_NOOP, 3 bytes
        v.extend_from_slice(&[0x01, 0x00, 0x04, b'h', b't', b't', b'p']); // PP2_TYPE_ALPN
        assert_eq!(v.len(), 16 + usize::from(v[15]));
        v.extend_from_slice(b"payload");
        let (h, used) = parse(&v).unwrap();
        assert_eq!(used, 16 + 12 + 6 + 7);
        assert_eq!(h.addresses().unwrap().0, sa("192.0.2.1:56324"));
        assert_eq!(&v[used..], b"payload");
    }

    #[test]
    fn bad_signature() {
        let mut v = tcp4_vector();
        v[7] = b'q';
        assert_eq!(parse(&v), Err(ProxyError::BadSignature));
        // PROXY v1 text and plain HTTP are not v2, detected from the first byte that differs.
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Err(ProxyError::BadSignature));
        assert_eq!(parse(b"GET"), Err(ProxyError::BadSignature));
        assert_eq!(parse(b"\r\n\r\n\0\r\nX"), Err(ProxyError::BadSignature));
    }

    #[test]
    fn bad_version() {
        let mut v = tcp4_vector();
        v[12] = 0x11;
        assert_eq!(parse(&v), Err(ProxyError::BadVersion(1)));
        v[12] = 0x31;
        assert_eq!(parse(&v), Err(ProxyError::BadVersion(3)));
        // Reported from the first 13 bytes.
        assert_eq!(parse(&v[..13]), Err(ProxyError::BadVersion(3)));
    }

    #[test]
    fn bad_command() {
        let mut v = tcp4_vector();
        v[12] = 0x22;
        assert_eq!(parse(&v), Err(ProxyError::BadCommand(2)));
        v[12] = 0x2f;
        assert_eq!(parse(&v[..13]), Err(ProxyError::BadCommand(0xf)));
    }

    #[test]
    fn bad_family() {
        for fam in [0x10u8, 0x13, 0x01, 0x02, 0x20, 0x41, 0xff, 0x30, 0x33] {
            let mut v = tcp4_vector();
            v[13] = fam;
            assert_eq!(parse(&v), Err(ProxyError::BadFamily(fam)), "{fam:#x}");
            assert_eq!(parse(&v[..14]), Err(ProxyError::BadFamily(fam)));
        }
        // LOCAL ignores the family byte, as the spec says.
        let mut v = encode_local();
        v[13] = 0xff;
        assert_eq!(parse(&v), Ok((Header::Local, 16)));
    }

    #[test]
    fn short_buffers_are_incomplete() {
        let v = tcp4_vector();
        for n in 0..16 {
            assert_eq!(
                parse(&v[..n]),
                Err(ProxyError::Incomplete {
                    needed: 16,
                    have: n
                }),
                "{n} bytes"
            );
        }
        for n in 16..28 {
            assert_eq!(
                parse(&v[..n]),
                Err(ProxyError::Incomplete {
                    needed: 28,
                    have: n
                })
            );
        }
        assert!(parse(&v).is_ok());
    }

    #[test]
    fn length_too_large() {
        let mut v = tcp4_vector();
        v[14] = 0xff;
        v[15] = 0xff;
        // Refused from the fixed part alone, without waiting for 64 KiB.
        assert_eq!(
            parse(&v[..16]),
            Err(ProxyError::TooLong {
                len: 65_535,
                max: DEFAULT_MAX_LEN
            })
        );
        // A larger limit accepts it once the bytes are there (65,535 = addresses + padding TLV).
        assert_eq!(
            parse_with_max(&v, 65_535),
            Err(ProxyError::Incomplete {
                needed: 16 + 65_535,
                have: 28
            })
        );
        v.resize(16 + 65_535, 0);
        assert_eq!(parse_with_max(&v, 65_535).unwrap().1, 16 + 65_535);
        // Exactly at the limit is fine.
        let mut v = tcp4_vector();
        v[14..16].copy_from_slice(&(DEFAULT_MAX_LEN as u16).to_be_bytes());
        v.resize(16 + DEFAULT_MAX_LEN, 0);
        assert_eq!(parse(&v).unwrap().1, 16 + DEFAULT_MAX_LEN);
    }

    #[test]
    fn address_block_too_short_for_its_family() {
        let mut v = tcp4_vector();
        v[15] = 11;
        assert_eq!(
            parse(&v),
            Err(ProxyError::AddressesTooShort { len: 11, need: 12 })
        );
        let mut v = udp6_vector();
        v[15] = 12;
        assert_eq!(
            parse(&v),
            Err(ProxyError::AddressesTooShort { len: 12, need: 36 })
        );
        let mut v = SIG.to_vec();
        v.extend_from_slice(&[0x21, 0x31, 0x00, 0x10]);
        v.resize(32, 0);
        assert_eq!(
            parse(&v),
            Err(ProxyError::AddressesTooShort { len: 16, need: 216 })
        );
    }

    #[test]
    fn unspec_and_unix_give_no_addresses() {
        let mut v = SIG.to_vec();
        v.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&v), Ok((Header::ProxyUnspec, 16)));
        let mut v = SIG.to_vec();
        v.extend_from_slice(&[0x21, 0x32, 0x00, 0xd8]);
        v.resize(16 + 216, b'/');
        assert_eq!(parse(&v), Ok((Header::ProxyUnspec, 232)));
        assert_eq!(Header::ProxyUnspec.addresses(), None);
        assert_eq!(Header::Local.addresses(), None);
    }

    #[test]
    fn local_with_a_block_skips_it() {
        let mut v = SIG.to_vec();
        v.extend_from_slice(&[0x20, 0x11, 0x00, 0x0c]);
        v.extend_from_slice(&[1; 12]);
        v.extend_from_slice(b"x");
        assert_eq!(parse(&v), Ok((Header::Local, 28)));
    }

    #[test]
    fn round_trips() {
        for (s, d) in [
            ("10.0.0.1:1", "10.0.0.2:65535"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
            ("[::1]:80", "[fe80::1]:443"),
            ("[::]:0", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        ] {
            for proto in [Proto::Tcp, Proto::Udp] {
                let e = encode(sa(s), sa(d), proto);
                let mut appended = b"abc".to_vec();
                encode_into(&mut appended, sa(s), sa(d), proto);
                assert_eq!(&appended[3..], &e[..]);
                assert_eq!(
                    parse(&e),
                    Ok((
                        Header::Proxy {
                            src: sa(s),
                            dst: sa(d),
                            proto
                        },
                        e.len()
                    ))
                );
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap in-tree sweep (the fuzz target goes further): every prefix of valid
        // headers with every single byte changed.
        let mut x: u64 = 0x1234_5678;
        for base in [tcp4_vector(), udp6_vector(), encode_local()] {
            for pos in 0..base.len() {
                for val in [0u8, 1, 0x0c, 0x21, 0x22, 0xff] {
                    let mut v = base.clone();
                    v[pos] = val;
                    for n in 0..=v.len() {
                        let _ = parse(&v[..n]);
                    }
                }
            }
        }
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut v = SIG.to_vec();
            v.extend_from_slice(&x.to_le_bytes());
            if let Ok((_, used)) = parse(&v) {
                assert!(used <= v.len());
            }
        }
    }
}
