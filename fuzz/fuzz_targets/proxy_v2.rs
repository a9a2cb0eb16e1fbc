//! PROXY protocol v2: parsing arbitrary bytes never panics and never claims more bytes than
//! it was given; any PROXY header that parses re-encodes to a header that parses to the same
//! thing; and addresses built from the input round-trip through encode → parse.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_vip::proxy_v2::{self, Header};
use lb_vip::sched::Proto;
use libfuzzer_sys::fuzz_target;

fn ip(bytes: &[u8], v6: bool) -> IpAddr {
    if v6 {
        let mut a = [0u8; 16];
        a.copy_from_slice(&bytes[..16]);
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// What parse returns for encode(src, dst): IPv4-mapped counts as IPv4; mixed families are
/// both IPv6 (IPv4 mapped).
fn expected(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (src.ip().to_canonical(), dst.ip().to_canonical());
    let (s, d) = match (s, d) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (s, d),
        _ => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
                v6 => v6,
            };
            (v6(s), v6(d))
        }
    };
    (
        SocketAddr::new(s, src.port()),
        SocketAddr::new(d, dst.port()),
    )
}

fn check_round_trip(src: SocketAddr, dst: SocketAddr, proto: Proto) {
    let e = proxy_v2::encode(src, dst, proto);
    let (s, d) = expected(src, dst);
    assert_eq!(
        proxy_v2::parse(&e),
        Ok((
            Header::Proxy {
                src: s,
                dst: d,
                proto
            },
            e.len()
        ))
    );
}

fuzz_target!(|data: &[u8]| {
    for max in [proxy_v2::DEFAULT_MAX_LEN, 65_535] {
        if let Ok((h, used)) = proxy_v2::parse_with_max(data, max) {
            assert!(used >= proxy_v2::FIXED_LEN && used <= data.len());
            if let Header::Proxy { src, dst, proto } = h {
                check_round_trip(src, dst, proto);
            }
        }
    }
    // Addresses from the input: flags byte, then two addresses and two ports.
    if let Some((&flags, rest)) = data.split_first() {
        let (v6s, v6d) = (flags & 1 != 0, flags & 2 != 0);
        let proto = if flags & 4 != 0 {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        if rest.len() >= 36 {
            let src = SocketAddr::new(
                ip(&rest[0..], v6s),
                u16::from_be_bytes([rest[32], rest[33]]),
            );
            let dst = SocketAddr::new(
                ip(&rest[16..], v6d),
                u16::from_be_bytes([rest[34], rest[35]]),
            );
            check_round_trip(src, dst, proto);
        }
    }
});
