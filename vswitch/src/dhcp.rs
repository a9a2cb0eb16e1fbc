//! The switch's DHCPv4 server (RFC 2131) as pure code: a client frame (Ethernet/IPv4/UDP
//! 68→67) from a port in, the reply frame out. Each port has exactly one lease, its own IP
//! from the control plane, so there is no lease table: DISCOVER gets an OFFER of the port's
//! address, REQUEST for it an ACK, REQUEST for anything else a NAK.
//!
//! Parsing uses `smoltcp::wire` packet views (Ethernet, IPv4, UDP, DHCP) and reads the few
//! options a server needs itself, so that client identifiers smoltcp's `DhcpRepr::parse`
//! refuses (non-Ethernet types) do not stop a client; the reply is emitted with `DhcpRepr`,
//! options it lacks (DNS beyond three servers, MTU 26, T1/T2) as `additional_options`.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DhcpMessageType, DhcpOpCode, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame,
    EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket,
    UdpRepr, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, ETHERNET_HEADER_LEN, IPV4_HEADER_LEN,
    UDP_HEADER_LEN,
};
use std::net::Ipv4Addr;
use thiserror::Error;

/// Lease time handed out (option 51).
pub const LEASE_SECS: u32 = 86_400;
/// BOOTP messages are at least this long (RFC 1542 section 3.3); replies are padded to it.
pub const BOOTP_MIN_LEN: usize = 300;

const OPT_SUBNET_MASK: u8 = 1;
const OPT_DNS: u8 = 6;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_RENEWAL: u8 = 58;
const OPT_REBINDING: u8 = 59;

/// What the server knows about the one client behind a port.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    /// The port's MAC: the Ethernet destination of replies.
    pub client_mac: [u8; 6],
    /// The port's address: the only one this client may have.
    pub client_ip: Ipv4Addr,
    /// Subnet prefix length (option 1).
    pub prefix: u8,
    /// Interface MTU (option 26).
    pub mtu: u32,
    /// Router (option 3), if the network has one.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers (option 6), if any.
    pub dns: &'a [Ipv4Addr],
    /// Server identifier (option 54) and IPv4 source of replies: the subnet's last usable
    /// address.
    pub server_ip: Ipv4Addr,
    /// Ethernet source of replies.
    pub server_mac: [u8; 6],
    /// Option 51.
    pub lease_secs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DhcpError {
    #[error("not a DHCP client frame (Ethernet/IPv4/UDP 68->67)")]
    NotDhcp,
    #[error("malformed DHCP client frame: {0}")]
    Malformed(&'static str),
    #[error("DHCP message type {0} is not one a client sends to a server")]
    UnexpectedMessage(u8),
}

/// What a client message was, for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Offer,
    Ack,
    Nak,
    /// RELEASE, DECLINE, or a REQUEST that selected another server: nothing to send.
    None,
}

/// Answers one client frame. `Ok((Answer::None, None))` for messages that need no reply.
pub fn handle(lease: &Lease<'_>, frame: &[u8]) -> Result<(Answer, Option<Vec<u8>>), DhcpError> {
    let msg = parse(frame)?;
    let answer = match msg.message_type {
        DhcpMessageType::Discover => Answer::Offer,
        DhcpMessageType::Request => {
            if msg.server_id.is_some_and(|s| s != lease.server_ip) {
                // SELECTING another server's offer.
                Answer::None
            } else {
                let wanted = msg
                    .requested_ip
                    .or((!msg.client_ip.is_unspecified()).then_some(msg.client_ip));
                if wanted == Some(lease.client_ip) {
                    Answer::Ack
                } else {
                    Answer::Nak
                }
            }
        }
        DhcpMessageType::Inform => Answer::Ack,
        DhcpMessageType::Release | DhcpMessageType::Decline => Answer::None,
        other => return Err(DhcpError::UnexpectedMessage(u8::from(other))),
    };
    let frame = match answer {
        Answer::None => None,
        _ => Some(reply(lease, &msg, answer)),
    };
    Ok((answer, frame))
}

/// The fields of a client message the server uses.
#[derive(Debug, Clone, Copy)]
struct ClientMessage {
    message_type: DhcpMessageType,
    transaction_id: u32,
    chaddr: EthernetAddress,
    client_ip: Ipv4Addr,
    broadcast: bool,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
}

fn ipv4_opt(data: &[u8]) -> Option<Ipv4Addr> {
    let b: [u8; 4] = data.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

fn parse(frame: &[u8]) -> Result<ClientMessage, DhcpError> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| DhcpError::NotDhcp)?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return Err(DhcpError::NotDhcp);
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).map_err(|_| DhcpError::Malformed("IPv4"))?;
    // Checksums are not verified: a tap with offloads hands over partial checksums.
    let ip_repr = Ipv4Repr::parse(&ip, &ChecksumCapabilities::ignored())
        .map_err(|_| DhcpError::Malformed("IPv4"))?;
    if ip_repr.next_header != IpProtocol::Udp {
        return Err(DhcpError::NotDhcp);
    }
    let udp = UdpPacket::new_checked(ip.payload()).map_err(|_| DhcpError::Malformed("UDP"))?;
    if udp.src_port() != DHCP_CLIENT_PORT || udp.dst_port() != DHCP_SERVER_PORT {
        return Err(DhcpError::NotDhcp);
    }
    let dhcp = DhcpPacket::new_checked(udp.payload())
        .map_err(|_| DhcpError::Malformed("DHCP too short"))?;
    if dhcp.opcode() != DhcpOpCode::Request {
        return Err(DhcpError::Malformed("BOOTP op is not BOOTREQUEST"));
    }
    if dhcp.hardware_len() != 6 || u16::from(dhcp.hardware_type()) != 1 {
        return Err(DhcpError::Malformed("hardware type is not Ethernet"));
    }
    if dhcp.magic_number() != 0x6382_5363 {
        return Err(DhcpError::Malformed("magic cookie"));
    }
    let mut message_type = None;
    let mut requested_ip = None;
    let mut server_id = None;
    for opt in dhcp.options() {
        match opt.kind {
            OPT_MESSAGE_TYPE if opt.data.len() == 1 => {
                message_type = Some(DhcpMessageType::from(opt.data[0]))
            }
            OPT_REQUESTED_IP => requested_ip = ipv4_opt(opt.data),
            OPT_SERVER_ID => server_id = ipv4_opt(opt.data),
            _ => {}
        }
    }
    let message_type = message_type.ok_or(DhcpError::Malformed("no message type option"))?;
    Ok(ClientMessage {
        message_type,
        transaction_id: dhcp.transaction_id(),
        chaddr: dhcp.client_hardware_address(),
        client_ip: dhcp.client_ip(),
        broadcast: dhcp.flags().contains(smoltcp::wire::DhcpFlags::BROADCAST),
        requested_ip,
        server_id,
    })
}

fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

fn reply(lease: &Lease<'_>, msg: &ClientMessage, answer: Answer) -> Vec<u8> {
    let inform = msg.message_type == DhcpMessageType::Inform;
    let nak = answer == Answer::Nak;
    let message_type = match answer {
        Answer::Offer => DhcpMessageType::Offer,
        Answer::Nak => DhcpMessageType::Nak,
        _ => DhcpMessageType::Ack,
    };

    // Options smoltcp's Repr does not emit itself.
    let mut dns = [0u8; 252];
    let dns_n = lease.dns.len().min(dns.len() / 4);
    for (i, d) in lease.dns.iter().take(dns_n).enumerate() {
        dns[i * 4..i * 4 + 4].copy_from_slice(&d.octets());
    }
    let mtu = u16::try_from(lease.mtu.clamp(68, u32::from(u16::MAX)))
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    let t1 = (lease.lease_secs / 2).to_be_bytes();
    let t2 = (lease.lease_secs / 8 * 7).to_be_bytes();
    let mask = netmask(lease.prefix).octets();
    let mut extra: Vec<DhcpOption<'_>> = Vec::with_capacity(5);
    if !nak {
        // The subnet mask goes through additional_options too, so that INFORM, OFFER and ACK
        // all carry it in the same place.
        extra.push(DhcpOption {
            kind: OPT_SUBNET_MASK,
            data: &mask,
        });
        if dns_n > 0 {
            extra.push(DhcpOption {
                kind: OPT_DNS,
                data: &dns[..dns_n * 4],
            });
        }
        extra.push(DhcpOption {
            kind: OPT_MTU,
            data: &mtu,
        });
        if !inform {
            extra.push(DhcpOption {
                kind: OPT_RENEWAL,
                data: &t1,
            });
            extra.push(DhcpOption {
                kind: OPT_REBINDING,
                data: &t2,
            });
        }
    }

    let repr = DhcpRepr {
        message_type,
        transaction_id: msg.transaction_id,
        secs: 0,
        client_hardware_address: msg.chaddr,
        client_ip: if inform {
            msg.client_ip
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        your_ip: if nak || inform {
            Ipv4Addr::UNSPECIFIED
        } else {
            lease.client_ip
        },
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: if nak { None } else { lease.gateway },
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: msg.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(lease.server_ip),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: if nak || inform {
            None
        } else {
            Some(lease.lease_secs)
        },
        renew_duration: None,
        rebind_duration: None,
        additional_options: &extra,
    };

    // RFC 2131 4.1: NAKs are broadcast; a client that has an address (INFORM, RENEWING) is
    // answered at it unless it asked for broadcast; one without an address gets broadcast.
    let dst_ip = if !nak && !msg.broadcast && !msg.client_ip.is_unspecified() {
        msg.client_ip
    } else {
        Ipv4Addr::BROADCAST
    };

    let dhcp_len = repr.buffer_len().max(BOOTP_MIN_LEN);
    let udp_len = UDP_HEADER_LEN + dhcp_len;
    let ip_repr = Ipv4Repr {
        src_addr: lease.server_ip,
        dst_addr: dst_ip,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let eth_repr = EthernetRepr {
        src_addr: EthernetAddress(lease.server_mac),
        dst_addr: EthernetAddress(lease.client_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + udp_len];
    let caps = ChecksumCapabilities::default();
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    eth_repr.emit(&mut eth);
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip_repr.emit(&mut ip, &caps);
    let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
    let mut emitted = Ok(());
    UdpRepr {
        src_port: DHCP_SERVER_PORT,
        dst_port: DHCP_CLIENT_PORT,
    }
    .emit(
        &mut udp,
        &IpAddress::Ipv4(lease.server_ip),
        &IpAddress::Ipv4(dst_ip),
        dhcp_len,
        |payload| {
            let mut pkt = DhcpPacket::new_unchecked(payload);
            emitted = repr.emit(&mut pkt);
        },
        &caps,
    );
    // The buffer is sized from repr.buffer_len(), so emitting cannot run out of room.
    debug_assert!(emitted.is_ok());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const SERVER_MAC: [u8; 6] = [0x06, 0xfa, 0xb0, 0, 0, 100];
    const DNS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 0, 53), Ipv4Addr::new(9, 9, 9, 9)];

    fn lease() -> Lease<'static> {
        Lease {
            client_mac: CLIENT_MAC,
            client_ip: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            mtu: 1450,
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: &DNS,
            server_ip: Ipv4Addr::new(10, 0, 0, 254),
            server_mac: SERVER_MAC,
            lease_secs: LEASE_SECS,
        }
    }

    /// A client message as busybox udhcpc builds it: from 0.0.0.0 (or its address when
    /// renewing) to 255.255.255.255, client identifier type 1 + MAC, parameter request list
    /// 1,3,6,12,15,28,42, max size 576, no broadcast flag.
    fn client_frame(
        message_type: DhcpMessageType,
        ciaddr: Ipv4Addr,
        requested: Option<Ipv4Addr>,
        server_id: Option<Ipv4Addr>,
    ) -> Vec<u8> {
        let params = [1u8, 3, 6, 12, 15, 28, 42];
        let repr = DhcpRepr {
            message_type,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: EthernetAddress(CLIENT_MAC),
            client_ip: ciaddr,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: requested,
            client_identifier: Some(EthernetAddress(CLIENT_MAC)),
            server_identifier: server_id,
            parameter_request_list: Some(&params),
            dns_servers: None,
            max_size: Some(576),
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let dhcp_len = repr.buffer_len();
        let src = ciaddr;
        let dst = Ipv4Addr::BROADCAST;
        let mut buf = vec![0u8; 14 + 20 + 8 + dhcp_len];
        let caps = ChecksumCapabilities::default();
        let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
        EthernetRepr {
            src_addr: EthernetAddress(CLIENT_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: 8 + dhcp_len,
            hop_limit: 64,
        }
        .emit(&mut ip, &caps);
        let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
        UdpRepr {
            src_port: 68,
            dst_port: 67,
        }
        .emit(
            &mut udp,
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            dhcp_len,
            |p| repr.emit(&mut DhcpPacket::new_unchecked(p)).unwrap(),
            &caps,
        );
        buf
    }

    /// A parsed reply with its addressing, every checksum verified.
    struct Parsed {
        eth_dst: [u8; 6],
        eth_src: [u8; 6],
        ip_src: Ipv4Addr,
        ip_dst: Ipv4Addr,
        dhcp_len: usize,
        options: Vec<(u8, Vec<u8>)>,
        message_type: DhcpMessageType,
        xid: u32,
        yiaddr: Ipv4Addr,
        chaddr: [u8; 6],
    }

    fn parse_reply(frame: &[u8]) -> Parsed {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr())
        ));
        assert_eq!((udp.src_port(), udp.dst_port()), (67, 68));
        let dhcp = DhcpPacket::new_checked(udp.payload()).unwrap();
        assert_eq!(dhcp.opcode(), DhcpOpCode::Reply);
        let options: Vec<(u8, Vec<u8>)> =
            dhcp.options().map(|o| (o.kind, o.data.to_vec())).collect();
        // smoltcp itself understands it.
        let repr = DhcpRepr::parse(&dhcp).unwrap();
        Parsed {
            eth_dst: eth.dst_addr().0,
            eth_src: eth.src_addr().0,
            ip_src: ip.src_addr(),
            ip_dst: ip.dst_addr(),
            dhcp_len: udp.payload().len(),
            options,
            message_type: repr.message_type,
            xid: repr.transaction_id,
            yiaddr: repr.your_ip,
            chaddr: repr.client_hardware_address.0,
        }
    }

    impl Parsed {
        fn opt(&self, kind: u8) -> Option<&[u8]> {
            self.options
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, d)| d.as_slice())
        }
    }

    #[test]
    fn discover_gets_an_offer_with_every_option() {
        let l = lease();
        let f = client_frame(DhcpMessageType::Discover, Ipv4Addr::UNSPECIFIED, None, None);
        let (answer, reply) = handle(&l, &f).unwrap();
        assert_eq!(answer, Answer::Offer);
        let r = parse_reply(&reply.unwrap());
        assert_eq!(r.message_type, DhcpMessageType::Offer);
        assert_eq!(r.xid, 0x1234_5678);
        assert_eq!(r.chaddr, CLIENT_MAC);
        assert_eq!(r.yiaddr, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(r.eth_dst, CLIENT_MAC);
        assert_eq!(r.eth_src, SERVER_MAC);
        assert_eq!(r.ip_src, Ipv4Addr::new(10, 0, 0, 254));
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST, "client without an address");
        assert!(r.dhcp_len >= BOOTP_MIN_LEN);
        assert_eq!(r.opt(53), Some(&[2u8][..]));
        assert_eq!(r.opt(1), Some(&[255u8, 255, 255, 0][..]));
        assert_eq!(r.opt(3), Some(&[10u8, 0, 0, 1][..]));
        assert_eq!(r.opt(6), Some(&[10u8, 0, 0, 53, 9, 9, 9, 9][..]));
        assert_eq!(r.opt(51), Some(&86_400u32.to_be_bytes()[..]));
        assert_eq!(r.opt(54), Some(&[10u8, 0, 0, 254][..]));
        assert_eq!(r.opt(26), Some(&1450u16.to_be_bytes()[..]));
        assert_eq!(r.opt(58), Some(&43_200u32.to_be_bytes()[..]));
        assert_eq!(r.opt(59), Some(&75_600u32.to_be_bytes()[..]));
    }

    #[test]
    fn request_for_the_ports_ip_is_acked() {
        let l = lease();
        // SELECTING: requested IP + our server id.
        let f = client_frame(
            DhcpMessageType::Request,
            Ipv4Addr::UNSPECIFIED,
            Some(l.client_ip),
            Some(l.server_ip),
        );
        let (answer, reply) = handle(&l, &f).unwrap();
        assert_eq!(answer, Answer::Ack);
        let r = parse_reply(&reply.unwrap());
        assert_eq!(r.message_type, DhcpMessageType::Ack);
        assert_eq!(r.yiaddr, l.client_ip);
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST);
        assert!(r.opt(51).is_some() && r.opt(26).is_some() && r.opt(1).is_some());

        // RENEWING: ciaddr only, answered at the client's address.
        let f = client_frame(DhcpMessageType::Request, l.client_ip, None, None);
        let (answer, reply) = handle(&l, &f).unwrap();
        assert_eq!(answer, Answer::Ack);
        let r = parse_reply(&reply.unwrap());
        assert_eq!(r.ip_dst, l.client_ip);
        assert_eq!(r.yiaddr, l.client_ip);

        // INIT-REBOOT: requested IP, no server id.
        let f = client_frame(
            DhcpMessageType::Request,
            Ipv4Addr::UNSPECIFIED,
            Some(l.client_ip),
            None,
        );
        assert_eq!(handle(&l, &f).unwrap().0, Answer::Ack);
    }

    #[test]
    fn request_for_another_ip_is_naked() {
        let l = lease();
        for f in [
            client_frame(
                DhcpMessageType::Request,
                Ipv4Addr::UNSPECIFIED,
                Some(Ipv4Addr::new(10, 0, 0, 9)),
                Some(l.server_ip),
            ),
            client_frame(
                DhcpMessageType::Request,
                Ipv4Addr::new(192, 168, 1, 7),
                None,
                None,
            ),
            client_frame(DhcpMessageType::Request, Ipv4Addr::UNSPECIFIED, None, None),
        ] {
            let (answer, reply) = handle(&l, &f).unwrap();
            assert_eq!(answer, Answer::Nak);
            let r = parse_reply(&reply.unwrap());
            assert_eq!(r.message_type, DhcpMessageType::Nak);
            assert_eq!(r.yiaddr, Ipv4Addr::UNSPECIFIED);
            assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST, "NAKs are broadcast");
            assert_eq!(r.opt(54), Some(&[10u8, 0, 0, 254][..]));
            assert_eq!(r.opt(51), None);
            assert_eq!(r.opt(1), None);
        }
    }

    #[test]
    fn request_selecting_another_server_release_and_decline_get_no_reply() {
        let l = lease();
        let other = client_frame(
            DhcpMessageType::Request,
            Ipv4Addr::UNSPECIFIED,
            Some(l.client_ip),
            Some(Ipv4Addr::new(10, 0, 0, 250)),
        );
        assert_eq!(handle(&l, &other).unwrap(), (Answer::None, None));
        let release = client_frame(
            DhcpMessageType::Release,
            l.client_ip,
            None,
            Some(l.server_ip),
        );
        assert_eq!(handle(&l, &release).unwrap(), (Answer::None, None));
        let decline = client_frame(
            DhcpMessageType::Decline,
            Ipv4Addr::UNSPECIFIED,
            Some(l.client_ip),
            Some(l.server_ip),
        );
        assert_eq!(handle(&l, &decline).unwrap(), (Answer::None, None));
    }

    #[test]
    fn inform_gets_an_ack_without_lease() {
        let l = lease();
        let f = client_frame(DhcpMessageType::Inform, l.client_ip, None, None);
        let (answer, reply) = handle(&l, &f).unwrap();
        assert_eq!(answer, Answer::Ack);
        let r = parse_reply(&reply.unwrap());
        assert_eq!(r.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.ip_dst, l.client_ip);
        assert_eq!(r.opt(51), None);
        assert_eq!(r.opt(3), Some(&[10u8, 0, 0, 1][..]));
    }

    #[test]
    fn no_gateway_no_dns_no_router_option() {
        let mut l = lease();
        l.gateway = None;
        l.dns = &[];
        let f = client_frame(DhcpMessageType::Discover, Ipv4Addr::UNSPECIFIED, None, None);
        let r = parse_reply(&handle(&l, &f).unwrap().1.unwrap());
        assert_eq!(r.opt(3), None);
        assert_eq!(r.opt(6), None);
        assert!(r.opt(26).is_some());
    }

    #[test]
    fn broadcast_flag_is_honoured() {
        let l = lease();
        let mut f = client_frame(DhcpMessageType::Request, l.client_ip, None, None);
        // Set the BOOTP broadcast flag (and fix nothing else: checksums are not verified).
        let off = 14 + 20 + 8 + 10;
        f[off] = 0x80;
        let r = parse_reply(&handle(&l, &f).unwrap().1.unwrap());
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST);
        let eth = EthernetFrame::new_checked(&handle(&l, &f).unwrap().1.unwrap()[..])
            .unwrap()
            .dst_addr();
        assert_eq!(eth.0, CLIENT_MAC, "always to the port's MAC");
    }

    #[test]
    fn not_dhcp_and_garbage_get_no_reply_and_no_panic() {
        let l = lease();
        assert_eq!(handle(&l, &[]), Err(DhcpError::NotDhcp));
        let good = client_frame(DhcpMessageType::Discover, Ipv4Addr::UNSPECIFIED, None, None);
        // Every truncation fails cleanly (the IPv4 total length covers the whole message).
        for n in 0..good.len() {
            let r = handle(&l, &good[..n]);
            assert!(r.is_err(), "truncated to {n}: {r:?}");
        }
        // Wrong ports.
        let mut f = good.clone();
        f[14 + 20 + 3] = 68;
        assert_eq!(handle(&l, &f), Err(DhcpError::NotDhcp));
        // Not IPv4.
        let mut f = good.clone();
        f[12] = 0x86;
        f[13] = 0xdd;
        assert_eq!(handle(&l, &f), Err(DhcpError::NotDhcp));
        // Bad magic cookie.
        let mut f = good.clone();
        f[14 + 20 + 8 + 236] = 0;
        assert_eq!(handle(&l, &f), Err(DhcpError::Malformed("magic cookie")));
        // A server message sent to the server port.
        let f = client_frame(DhcpMessageType::Offer, Ipv4Addr::UNSPECIFIED, None, None);
        assert!(handle(&l, &f).is_err());
        // No message type option.
        let mut f = good.clone();
        f[14 + 20 + 8 + 240] = 0; // 53 -> pad
        f[14 + 20 + 8 + 241] = 0;
        f[14 + 20 + 8 + 242] = 0;
        assert_eq!(
            handle(&l, &f),
            Err(DhcpError::Malformed("no message type option"))
        );
        // Pseudo-random bytes behind valid headers and alone.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let mut f = good.clone();
            let n = 1 + round % 16;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % f.len();
                f[i] = (x >> 32) as u8;
            }
            let _ = handle(&l, &f);
            let _ = handle(&l, &f[..(x as usize >> 8) % f.len()]);
        }
    }
}
