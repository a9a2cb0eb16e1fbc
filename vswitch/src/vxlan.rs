//! VXLAN encapsulation (RFC 7348) as pure code: the 8-byte header, decapsulation of a UDP
//! payload, and the inner-flow hash that picks the outer UDP source port (so that one flow
//! keeps one source port and ECMP/RSS on the underlay spread flows, as Linux does).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use smoltcp::wire::ETHERNET_HEADER_LEN;
use thiserror::Error;

/// IANA-assigned VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;
/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The "I" flag: the VNI is valid.
pub const FLAG_I: u8 = 0x08;
/// Bytes VXLAN adds in front of the inner frame on an IPv4 underlay: outer IPv4 (20) + UDP (8)
/// + VXLAN (8) + inner Ethernet header (14) = 50, hence "overlay MTU = underlay MTU − 50".
pub const OVERHEAD: u32 = 50;
/// Linux's default ephemeral port range, which its VXLAN driver uses for source ports.
pub const SOURCE_PORT_MIN: u16 = 32768;
pub const SOURCE_PORT_MAX: u16 = 60999;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VxlanError {
    #[error("VXLAN packet of {len} bytes is shorter than its 8-byte header")]
    TooShort { len: usize },
    #[error("VXLAN header without the I flag (flags {flags:#04x})")]
    NoIFlag { flags: u8 },
    #[error("inner frame of {len} bytes is shorter than an Ethernet header")]
    InnerTooShort { len: usize },
}

/// The VXLAN header for `vni` (only its low 24 bits are used): I flag set, reserved bits zero.
pub fn encap_header(vni: u32) -> [u8; HEADER_LEN] {
    let v = vni.to_be_bytes();
    [FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// Splits a VXLAN UDP payload into its VNI and inner Ethernet frame. Reserved bits are ignored
/// on receipt, as RFC 7348 says.
pub fn decap(udp_payload: &[u8]) -> Result<(u32, &[u8]), VxlanError> {
    let Some((header, inner)) = udp_payload.split_first_chunk::<HEADER_LEN>() else {
        return Err(VxlanError::TooShort {
            len: udp_payload.len(),
        });
    };
    if header[0] & FLAG_I == 0 {
        return Err(VxlanError::NoIFlag { flags: header[0] });
    }
    if inner.len() < ETHERNET_HEADER_LEN {
        return Err(VxlanError::InnerTooShort { len: inner.len() });
    }
    let vni = u32::from_be_bytes([0, header[4], header[5], header[6]]);
    Ok((vni, inner))
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

fn fnv(mut h: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Final avalanche (MurmurHash3 fmix32) so that the high bits, which [`source_port`] uses,
/// depend on every input bit.
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// A stable (unseeded) hash of the inner flow: destination and source MAC, the EtherType and,
/// for IPv4, source and destination address, protocol and (TCP/UDP, first fragment or
/// unfragmented) the ports. Never panics; a short frame hashes what it has.
pub fn flow_hash(inner_frame: &[u8]) -> u32 {
    let l2 = inner_frame.len().min(ETHERNET_HEADER_LEN);
    let mut h = fnv(FNV_OFFSET, &inner_frame[..l2]);
    if inner_frame.len() >= ETHERNET_HEADER_LEN && inner_frame[12..14] == [0x08, 0x00] {
        let ip = &inner_frame[ETHERNET_HEADER_LEN..];
        if ip.len() >= 20 && ip[0] >> 4 == 4 {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let proto = ip[9];
            // Addresses and protocol.
            h = fnv(h, &ip[12..20]);
            h = fnv(h, &[proto]);
            let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            if (proto == 6 || proto == 17) && frag_offset == 0 && ihl >= 20 {
                if let Some(ports) = ip.get(ihl..ihl + 4) {
                    h = fnv(h, ports);
                }
            }
        }
    }
    fmix(h)
}

/// Maps a flow hash onto `min..=max` (bounds in either order), as Linux's
/// `udp_flow_src_port` does: the hash's high bits pick the port.
pub fn source_port(hash: u32, min: u16, max: u16) -> u16 {
    let (lo, hi) = if min <= max { (min, max) } else { (max, min) };
    let range = u64::from(hi - lo) + 1;
    let off = (u64::from(hash) * range) >> 32;
    // off < range <= 65536, and lo + off <= hi.
    lo + off as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Ipv4Packet, UdpPacket};

    /// An ICMP echo request from 10.0.0.1 (02:00:00:00:00:01) to 10.0.0.2 (02:00:00:00:00:02),
    /// VNI 100, as a Linux `vxlan` device (`id 100 dstport 4789`, default `udpcsum off`, no
    /// DF, TTL 64) sends it from underlay 198.18.0.1 to 198.18.0.2, source port 50000,
    /// written out from the RFC 7348 figure (section 5).
    const LINUX_VXLAN: &[u8] = &[
        // Outer IPv4: version 4, IHL 5, TOS 0, total length 20+8+8+98 = 134 (0x86), ID 0x1234,
        // no flags, TTL 64, protocol UDP (17), checksum, 198.18.0.1 -> 198.18.0.2.
        0x45, 0x00, 0x00, 0x86, 0x12, 0x34, 0x00, 0x00, 0x40, 0x11, 0xdc, 0x0b, 198, 18, 0, 1, 198,
        18, 0, 2, //
        // Outer UDP: 50000 -> 4789, length 8+8+98 = 114 (0x72), checksum 0 (not computed).
        0xc3, 0x50, 0x12, 0xb5, 0x00, 0x72, 0x00, 0x00, //
        // VXLAN: flags I, reserved, VNI 100 (0x000064), reserved.
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x64, 0x00, //
        // Inner Ethernet: dst, src, IPv4.
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00,
        // Inner IPv4: total length 84, ICMP, 10.0.0.1 -> 10.0.0.2 (checksum not checked here).
        0x45, 0x00, 0x00, 0x54, 0x00, 0x01, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 10, 0, 0, 1, 10, 0,
        0, 2, //
        // ICMP echo request header + 56 bytes of payload.
        0x08, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, //
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
        25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,
        48, 49, 50, 51, 52, 53, 54, 55,
    ];

    #[test]
    fn linux_packet_decaps() {
        let ip = Ipv4Packet::new_checked(LINUX_VXLAN).unwrap();
        assert!(ip.verify_checksum(), "hand-written outer IPv4 checksum");
        assert_eq!(ip.total_len() as usize, LINUX_VXLAN.len());
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(udp.dst_port(), VXLAN_PORT);
        let (vni, inner) = decap(udp.payload()).unwrap();
        assert_eq!(vni, 100);
        assert_eq!(inner.len(), 14 + 84);
        assert_eq!(&inner[..6], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(&inner[6..12], &[2, 0, 0, 0, 0, 1]);
        // Our header is byte-for-byte Linux's.
        assert_eq!(encap_header(100), udp.payload()[..8]);
    }

    #[test]
    fn header_layout() {
        assert_eq!(encap_header(0xabcdef), [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(encap_header(1), [0x08, 0, 0, 0, 0, 0, 1, 0]);
        // Only 24 bits exist on the wire.
        assert_eq!(encap_header(0x0100_0001), encap_header(1));
        for vni in [1, 4096, 0xff_ffff] {
            let mut pkt = encap_header(vni).to_vec();
            pkt.extend_from_slice(&[0u8; 14]);
            assert_eq!(decap(&pkt).unwrap().0, vni);
        }
    }

    #[test]
    fn decap_errors() {
        assert_eq!(decap(&[]), Err(VxlanError::TooShort { len: 0 }));
        assert_eq!(
            decap(&[0x08, 0, 0, 0, 0, 0, 1]),
            Err(VxlanError::TooShort { len: 7 })
        );
        let mut pkt = vec![0x00, 0, 0, 0, 0, 0, 1, 0];
        pkt.extend_from_slice(&[0u8; 14]);
        assert_eq!(decap(&pkt), Err(VxlanError::NoIFlag { flags: 0 }));
        pkt[0] = 0xf7; // every bit but I
        assert_eq!(decap(&pkt), Err(VxlanError::NoIFlag { flags: 0xf7 }));
        let short = [
            0x08, 0, 0, 0, 0, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
        ];
        assert_eq!(decap(&short), Err(VxlanError::InnerTooShort { len: 13 }));
        assert_eq!(
            decap(&encap_header(5)),
            Err(VxlanError::InnerTooShort { len: 0 })
        );
        // Errors print one line with the numbers.
        assert!(VxlanError::TooShort { len: 3 }.to_string().contains('3'));
    }

    #[test]
    fn reserved_bits_are_ignored() {
        let mut pkt = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 7, 0xff];
        pkt.extend_from_slice(&[0u8; 14]);
        assert_eq!(decap(&pkt).unwrap().0, 7);
    }

    fn udp_frame(src_port: u16, dst_port: u16) -> Vec<u8> {
        let mut f = LINUX_VXLAN[36..].to_vec(); // the inner frame
        f[14 + 9] = 17; // UDP
        f[34..36].copy_from_slice(&src_port.to_be_bytes());
        f[36..38].copy_from_slice(&dst_port.to_be_bytes());
        f
    }

    #[test]
    fn flow_hash_is_stable_and_flow_sensitive() {
        let a = udp_frame(1000, 2000);
        // Stable: a fixed value (no random seed), the same for the same flow with other payload.
        let h = flow_hash(&a);
        assert_eq!(h, flow_hash(&a));
        let mut a2 = a.clone();
        a2[60] ^= 0xff;
        assert_eq!(flow_hash(&a2), h, "payload bytes are not part of the flow");
        // Each part of the flow changes it.
        assert_ne!(flow_hash(&udp_frame(1001, 2000)), h);
        assert_ne!(flow_hash(&udp_frame(1000, 2001)), h);
        let mut b = a.clone();
        b[14 + 15] = 9; // source IP
        assert_ne!(flow_hash(&b), h);
        let mut c = a.clone();
        c[0] = 6; // destination MAC
        assert_ne!(flow_hash(&c), h);
        // Ports are not read for fragments after the first.
        let mut frag = a.clone();
        frag[14 + 6] = 0x00;
        frag[14 + 7] = 0x10;
        let mut frag2 = frag.clone();
        frag2[34] ^= 1;
        assert_eq!(flow_hash(&frag), flow_hash(&frag2));
        // Short and odd input never panics.
        for n in 0..a.len() {
            let _ = flow_hash(&a[..n]);
        }
        let mut bad_ihl = a.clone();
        bad_ihl[14] = 0x4f; // IHL 60 > what is there
        let _ = flow_hash(&bad_ihl[..40]);
        bad_ihl[14] = 0x41; // IHL 4 < 20
        let _ = flow_hash(&bad_ihl);
    }

    #[test]
    fn source_ports_stay_in_range_and_spread() {
        assert_eq!(
            source_port(0, SOURCE_PORT_MIN, SOURCE_PORT_MAX),
            SOURCE_PORT_MIN
        );
        assert_eq!(
            source_port(u32::MAX, SOURCE_PORT_MIN, SOURCE_PORT_MAX),
            SOURCE_PORT_MAX
        );
        assert_eq!(source_port(12345, 7, 7), 7);
        assert_eq!(source_port(u32::MAX, 0, u16::MAX), u16::MAX);
        assert_eq!(
            source_port(u32::MAX, 100, 50),
            100,
            "bounds in either order"
        );
        let mut seen = std::collections::HashSet::new();
        for p in 0..64u16 {
            let port = source_port(flow_hash(&udp_frame(p, 80)), 32768, 60999);
            assert!((32768..=60999).contains(&port));
            seen.insert(port);
        }
        assert!(
            seen.len() > 50,
            "64 flows spread over the range: {}",
            seen.len()
        );
    }
}
