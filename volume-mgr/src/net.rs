//! Overlay-network rules as pure code (no store, no sockets): IPv4 subnets in CIDR form, MAC
//! addresses, the checks the manager applies to networks, ports and switch registrations,
//! MAC/IP allocation, and the switch liveness decision. The HTTP handlers
//! (`server::network`) call these; the vswitch may use [`Subnet`] and [`Mac`] too.
//!
//! Address conventions (shared with the vswitch):
//! - a subnet's DHCP server identity is its last usable address (broadcast − 1,
//!   [`Subnet::dhcp_server`]): never a port's address, answered by the vswitch;
//! - the gateway, if set, is never allocated to a port, but may be given explicitly (a router
//!   VM);
//! - allocated MACs are locally administered unicast (`02:…`), derived from the network and
//!   port names ([`derive_mac`]), the next probe on a collision.

use crate::api;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Shortest and longest prefix a network's subnet may have.
pub const PREFIX_MIN: u8 = 8;
pub const PREFIX_MAX: u8 = 30;
/// Network MTU bounds.
pub const MTU_MIN: u32 = 576;
pub const MTU_MAX: u32 = 9000;
/// Underlay MTU bounds of a registering vswitch.
pub const UNDERLAY_MTU_MIN: u32 = 576;
pub const UNDERLAY_MTU_MAX: u32 = 65535;
/// Longest port and interface name (Linux IFNAMSIZ − 1).
pub const IFNAME_MAX: usize = 15;
/// Most DNS servers a network hands out.
pub const DNS_MAX: usize = 8;

/// Why a network, port or switch registration is refused (each is a 400 with this line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("invalid {what} name {name:?}: {reason}")]
    Name {
        what: &'static str,
        name: String,
        reason: String,
    },
    #[error("vni {0} is out of range: must be {min} to {max}", min = api::VNI_MIN, max = api::VNI_MAX)]
    VniRange(u32),
    #[error("subnet {0:?} is not in CIDR form A.B.C.D/PREFIX (e.g. 10.0.0.0/24)")]
    NotCidr(String),
    #[error("subnet {subnet:?}: prefix /{prefix} is out of range: must be /{PREFIX_MIN} to /{PREFIX_MAX}")]
    PrefixRange { subnet: String, prefix: u32 },
    #[error("subnet {given} has host bits set; did you mean {canonical}?")]
    HostBits { given: String, canonical: Subnet },
    #[error("mtu {0} is out of range: must be {MTU_MIN} to {MTU_MAX}")]
    MtuRange(u32),
    #[error("{what} {value:?} is not an IPv4 address")]
    NotIpv4 { what: &'static str, value: String },
    #[error("{what} {ip} is outside subnet {subnet}")]
    Outside {
        what: &'static str,
        ip: Ipv4Addr,
        subnet: Subnet,
    },
    #[error("{what} {ip} is the {role} of subnet {subnet}{}", role.note())]
    Reserved {
        what: &'static str,
        ip: Ipv4Addr,
        subnet: Subnet,
        role: Role,
    },
    #[error("too many dns servers: at most {DNS_MAX}, got {0}")]
    TooManyDns(usize),
    #[error("mac {0:?} is not of the form xx:xx:xx:xx:xx:xx (hex digits)")]
    MacForm(String),
    #[error("mac {0} is a multicast address; a port needs a unicast one (first octet even)")]
    MacMulticast(Mac),
    #[error("mac 00:00:00:00:00:00 is not a usable port address")]
    MacZero,
    #[error("netns is for tap ports only: a netdev port attaches an interface that already exists in the host's namespace")]
    NetnsNotTap,
    #[error("underlay_ip {0} is not a unicast address")]
    NotUnicast(Ipv4Addr),
    #[error("vxlan_port must not be 0")]
    VxlanPortZero,
    #[error("underlay_mtu {0} is out of range: must be {UNDERLAY_MTU_MIN} to {UNDERLAY_MTU_MAX}")]
    UnderlayMtuRange(u32),
}

/// What a reserved address of a subnet is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Network,
    Broadcast,
    DhcpServer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Network => "network address",
            Role::Broadcast => "broadcast address",
            Role::DhcpServer => "DHCP server address",
        })
    }
}

impl Role {
    /// What the reader may not know about this role.
    fn note(&self) -> &'static str {
        match self {
            Role::DhcpServer => " (its last usable address, which the vswitch answers for)",
            _ => "",
        }
    }
}

/// An IPv4 subnet with its host bits zero and a prefix in `PREFIX_MIN..=PREFIX_MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: u32,
    prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/P`; refuses host bits (naming the canonical form) and prefixes outside
    /// `PREFIX_MIN..=PREFIX_MAX`.
    pub fn parse(s: &str) -> Result<Subnet, NetError> {
        let not_cidr = || NetError::NotCidr(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(not_cidr)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| not_cidr())?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(not_cidr());
        }
        let prefix: u32 = prefix.parse().map_err(|_| not_cidr())?;
        if !(PREFIX_MIN as u32..=PREFIX_MAX as u32).contains(&prefix) {
            return Err(NetError::PrefixRange {
                subnet: s.to_string(),
                prefix,
            });
        }
        let canonical = Subnet {
            network: u32::from(addr) & mask(prefix as u8),
            prefix: prefix as u8,
        };
        if canonical.network != u32::from(addr) {
            return Err(NetError::HostBits {
                given: s.to_string(),
                canonical,
            });
        }
        Ok(canonical)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network.into()
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        (self.network | !mask(self.prefix)).into()
    }

    /// The DHCP server identity of a network on this subnet: its last usable address.
    pub fn dhcp_server(&self) -> Ipv4Addr {
        (u32::from(self.broadcast()) - 1).into()
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == self.network
    }

    /// The reserved role of `ip` in this subnet, if it has one.
    pub fn role(&self, ip: Ipv4Addr) -> Option<Role> {
        if ip == self.network() {
            Some(Role::Network)
        } else if ip == self.broadcast() {
            Some(Role::Broadcast)
        } else if ip == self.dhcp_server() {
            Some(Role::DhcpServer)
        } else {
            None
        }
    }

    /// Addresses a port could have: every host address but the DHCP server's.
    pub fn port_addresses(&self) -> u32 {
        (!mask(self.prefix)) - 2
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// A MAC address; `Display` is the lowercase `xx:xx:xx:xx:xx:xx` form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `xx:xx:xx:xx:xx:xx` (either case), nothing else.
    pub fn parse(s: &str) -> Result<Mac, NetError> {
        let form = || NetError::MacForm(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(form)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(form());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| form())?;
        }
        if parts.next().is_some() {
            return Err(form());
        }
        Ok(Mac(out))
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// A port's MAC: well-formed, unicast, not all-zero.
    pub fn parse_port(s: &str) -> Result<Mac, NetError> {
        let m = Mac::parse(s)?;
        if m.is_zero() {
            return Err(NetError::MacZero);
        }
        if m.is_multicast() {
            return Err(NetError::MacMulticast(m));
        }
        Ok(m)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// An IPv4 address in dotted-quad form.
pub fn parse_ipv4(what: &'static str, s: &str) -> Result<Ipv4Addr, NetError> {
    s.parse().map_err(|_| NetError::NotIpv4 {
        what,
        value: s.to_string(),
    })
}

fn name_err(what: &'static str, name: &str, reason: String) -> NetError {
    NetError::Name {
        what,
        name: name.to_string(),
        reason,
    }
}

/// Network (and netns) names follow the volume name rules.
fn check_name(what: &'static str, name: &str) -> Result<(), NetError> {
    api::validate_volume_name(name)
        .map_err(|e| name_err(what, name, e.trim_start_matches("volume name ").to_string()))
}

/// Port names: the volume name rules, at most 15 characters (a port names its interface by
/// default).
pub fn check_port_name(name: &str) -> Result<(), NetError> {
    if name.len() > IFNAME_MAX {
        return Err(name_err(
            "port",
            name,
            format!(
                "at most {IFNAME_MAX} characters (it names the interface by default), got {}",
                name.len()
            ),
        ));
    }
    check_name("port", name)
}

/// Interface names: 1 to 15 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn check_ifname(name: &str) -> Result<(), NetError> {
    let ok = (1..=IFNAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(name_err(
            "interface",
            name,
            format!("must be 1 to {IFNAME_MAX} characters of A-Z a-z 0-9 . _ - (not . or ..)"),
        ))
    }
}

/// Checks a `CreateNetwork` and returns the network as stored: canonical subnet, gateway and
/// DNS addresses.
pub fn check_network(req: &api::CreateNetwork, created_ms: u64) -> Result<api::Network, NetError> {
    check_name("network", &req.name)?;
    if !(api::VNI_MIN..=api::VNI_MAX).contains(&req.vni) {
        return Err(NetError::VniRange(req.vni));
    }
    let subnet = Subnet::parse(&req.subnet)?;
    if let Some(m) = req.mtu {
        if !(MTU_MIN..=MTU_MAX).contains(&m) {
            return Err(NetError::MtuRange(m));
        }
    }
    let gateway = match &req.gateway {
        None => None,
        Some(g) => {
            let ip = parse_ipv4("gateway", g)?;
            check_in_subnet("gateway", ip, subnet)?;
            Some(ip.to_string())
        }
    };
    if req.dns.len() > DNS_MAX {
        return Err(NetError::TooManyDns(req.dns.len()));
    }
    let dns = req
        .dns
        .iter()
        .map(|d| parse_ipv4("dns server", d).map(|ip| ip.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(api::Network {
        name: req.name.clone(),
        vni: req.vni,
        subnet: subnet.to_string(),
        mtu: req.mtu,
        gateway,
        dns,
        created_ms,
    })
}

/// Inside the subnet and none of its network, broadcast or DHCP server addresses.
pub fn check_in_subnet(what: &'static str, ip: Ipv4Addr, subnet: Subnet) -> Result<(), NetError> {
    if !subnet.contains(ip) {
        return Err(NetError::Outside { what, ip, subnet });
    }
    if let Some(role) = subnet.role(ip) {
        return Err(NetError::Reserved {
            what,
            ip,
            subnet,
            role,
        });
    }
    Ok(())
}

/// The parts of a `CreatePort` that can be checked without the store's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRequest {
    /// The interface name (the port's name unless given).
    pub ifname: String,
    pub mac: Option<Mac>,
    /// The IP as given (checked against the subnet by [`check_port_ip`]).
    pub ip: Option<Ipv4Addr>,
}

/// Checks a `CreatePort` on its own: names, netns, MAC and IP syntax.
pub fn check_port(req: &api::CreatePort) -> Result<PortRequest, NetError> {
    check_port_name(&req.name)?;
    let ifname = req.ifname.clone().unwrap_or_else(|| req.name.clone());
    check_ifname(&ifname)?;
    if let Some(ns) = &req.netns {
        if req.kind != api::PortKind::Tap {
            return Err(NetError::NetnsNotTap);
        }
        check_name("netns", ns)?;
    }
    let mac = req.mac.as_deref().map(Mac::parse_port).transpose()?;
    let ip = req.ip.as_deref().map(|s| parse_ipv4("ip", s)).transpose()?;
    Ok(PortRequest { ifname, mac, ip })
}

/// An explicit port IP: inside the subnet, not its network, broadcast or DHCP server address
/// (the gateway is allowed: a router VM).
pub fn check_port_ip(ip: Ipv4Addr, subnet: Subnet) -> Result<(), NetError> {
    check_in_subnet("ip", ip, subnet)
}

/// The lowest address a new port may get: a host address of `subnet` that is not the DHCP
/// server's, not the gateway and not `taken`. `None` when every one is in use.
pub fn allocate_ip(
    subnet: Subnet,
    gateway: Option<Ipv4Addr>,
    taken: &std::collections::HashSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let first = u32::from(subnet.network()) + 1;
    let last = u32::from(subnet.dhcp_server()) - 1;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| Some(*ip) != gateway && !taken.contains(ip))
}

/// The `attempt`-th candidate MAC of port `port` in network `network`: locally administered
/// unicast (`02:` then 40 bits of an FNV-1a hash of the names and the attempt), the same on
/// every manager and every release.
pub fn derive_mac(network: &str, port: &str, attempt: u32) -> Mac {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(network.as_bytes());
    feed(&[0]);
    feed(port.as_bytes());
    feed(&[0]);
    feed(&attempt.to_le_bytes());
    let b = h.to_be_bytes();
    Mac([0x02, b[0], b[1], b[2], b[3], b[4]])
}

/// Probes [`derive_mac`] candidates until one is not `taken`; `None` only if the first 65536
/// candidates are all taken (a network that large does not exist).
pub fn allocate_mac(network: &str, port: &str, mut taken: impl FnMut(&Mac) -> bool) -> Option<Mac> {
    (0..=u32::from(u16::MAX))
        .map(|i| derive_mac(network, port, i))
        .find(|m| !taken(m))
}

/// A switch registration's checks; returns the canonical underlay address.
pub fn check_register_switch(req: &api::RegisterSwitch) -> Result<Ipv4Addr, NetError> {
    let ip = parse_ipv4("underlay_ip", &req.underlay_ip)?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
        return Err(NetError::NotUnicast(ip));
    }
    if req.vxlan_port == 0 {
        return Err(NetError::VxlanPortZero);
    }
    if !(UNDERLAY_MTU_MIN..=UNDERLAY_MTU_MAX).contains(&req.underlay_mtu) {
        return Err(NetError::UnderlayMtuRange(req.underlay_mtu));
    }
    Ok(ip)
}

/// The state a switch should be recorded in now.
///
/// `recorded`: the state in the store; `last_heartbeat_ms`: its last heartbeat (or
/// registration) seen by this manager process, `None` if none since `started_ms`. A switch is
/// up while its last heartbeat is younger than `down_after`. A switch this process has not
/// heard from keeps its recorded state until `down_after` has passed since start (a restarted
/// manager does not flap every switch down and up again), then it is down.
pub fn switch_state(
    recorded: api::NodeState,
    last_heartbeat_ms: Option<u64>,
    started_ms: u64,
    now_ms: u64,
    down_after: Duration,
) -> api::NodeState {
    let limit = down_after.as_millis() as u64;
    match last_heartbeat_ms {
        Some(t) if now_ms.saturating_sub(t) < limit => api::NodeState::Up,
        Some(_) => api::NodeState::Down,
        None if now_ms.saturating_sub(started_ms) < limit => recorded,
        None => api::NodeState::Down,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn subnets() {
        let s = Subnet::parse("10.1.2.0/24").unwrap();
        assert_eq!(s.to_string(), "10.1.2.0/24");
        assert_eq!(s.network(), ip("10.1.2.0"));
        assert_eq!(s.broadcast(), ip("10.1.2.255"));
        assert_eq!(s.dhcp_server(), ip("10.1.2.254"));
        assert_eq!(s.port_addresses(), 253);
        assert!(s.contains(ip("10.1.2.77")) && !s.contains(ip("10.1.3.1")));
        assert_eq!(s.role(ip("10.1.2.0")), Some(Role::Network));
        assert_eq!(s.role(ip("10.1.2.255")), Some(Role::Broadcast));
        assert_eq!(s.role(ip("10.1.2.254")), Some(Role::DhcpServer));
        assert_eq!(s.role(ip("10.1.2.1")), None);
        let s = Subnet::parse("192.0.2.4/30").unwrap();
        assert_eq!(
            (s.broadcast(), s.dhcp_server()),
            (ip("192.0.2.7"), ip("192.0.2.6"))
        );
        assert_eq!(s.port_addresses(), 1);
        let s = Subnet::parse("10.0.0.0/8").unwrap();
        assert_eq!(s.broadcast(), ip("10.255.255.255"));
    }

    #[test]
    fn subnet_errors() {
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "/24",
            "10.0.0/24",
            "10.0.0.0/x",
            "10.0.0.0/+4",
            "10.0.0.0/024",
            "10.0.0.0/24/1",
            "10.0.0.256/24",
            "fe80::/64",
            " 10.0.0.0/24",
            "10.0.0.0/ 24",
            "10.0.0.0/99999999999",
        ] {
            let e = Subnet::parse(bad).unwrap_err();
            assert_eq!(e, NetError::NotCidr(bad.into()), "{bad}");
            assert!(e.to_string().contains("CIDR form"), "{e}");
        }
        for (bad, prefix) in [
            ("10.0.0.0/7", 7),
            ("10.0.0.0/31", 31),
            ("0.0.0.0/0", 0),
            ("10.0.0.0/32", 32),
        ] {
            let e = Subnet::parse(bad).unwrap_err();
            assert_eq!(
                e,
                NetError::PrefixRange {
                    subnet: bad.into(),
                    prefix
                }
            );
            assert!(e.to_string().contains("must be /8 to /30"), "{e}");
        }
        let e = Subnet::parse("10.1.2.3/16").unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 10.1.2.3/16 has host bits set; did you mean 10.1.0.0/16?"
        );
    }

    #[test]
    fn macs() {
        let m = Mac::parse("02:AB:cd:00:0f:10").unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:0f:10");
        assert!(!m.is_multicast());
        assert_eq!(Mac::parse_port("02:ab:cd:00:0f:10"), Ok(m));
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02-00-00-00-00-01",
            "2:0:0:0:0:1",
            "02:00:00:00:00:0g",
            "0200.0000.0001",
            "02:00:00:00:00:+1",
            "02:00:00:00:00:01:",
        ] {
            assert_eq!(
                Mac::parse_port(bad),
                Err(NetError::MacForm(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(Mac::parse_port("00:00:00:00:00:00"), Err(NetError::MacZero));
        for mc in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "33:33:00:00:00:01",
        ] {
            let e = Mac::parse_port(mc).unwrap_err();
            assert!(matches!(e, NetError::MacMulticast(_)), "{mc}");
            assert!(e.to_string().contains("multicast"), "{e}");
        }
    }

    fn create(subnet: &str) -> api::CreateNetwork {
        api::CreateNetwork {
            name: "blue".into(),
            vni: 100,
            subnet: subnet.into(),
            mtu: None,
            gateway: None,
            dns: vec![],
        }
    }

    #[test]
    fn networks() {
        let mut r = create("10.0.0.0/24");
        r.gateway = Some("10.0.0.1".into());
        r.dns = vec!["9.9.9.9".into(), "10.0.0.53".into()];
        r.mtu = Some(1450);
        let n = check_network(&r, 7).unwrap();
        assert_eq!(n.subnet, "10.0.0.0/24");
        assert_eq!(n.gateway.as_deref(), Some("10.0.0.1"));
        assert_eq!(n.dns, ["9.9.9.9", "10.0.0.53"]);
        assert_eq!((n.vni, n.mtu, n.created_ms), (100, Some(1450), 7));
        // Bounds that are allowed.
        for (vni, mtu) in [(api::VNI_MIN, MTU_MIN), (api::VNI_MAX, MTU_MAX)] {
            let mut r = create("10.0.0.0/24");
            r.vni = vni;
            r.mtu = Some(mtu);
            assert!(check_network(&r, 0).is_ok());
        }
    }

    #[test]
    fn network_errors() {
        let err = |f: &dyn Fn(&mut api::CreateNetwork)| {
            let mut r = create("10.0.0.0/24");
            f(&mut r);
            check_network(&r, 0).unwrap_err().to_string()
        };
        assert_eq!(
            err(&|r| r.name = "a/b".into()),
            "invalid network name \"a/b\": contains '/'; allowed: A-Z a-z 0-9 . _ -"
        );
        assert!(err(&|r| r.name = String::new()).contains("must be 1 to 64 characters"));
        assert_eq!(
            err(&|r| r.vni = 0),
            "vni 0 is out of range: must be 1 to 16777215"
        );
        assert!(err(&|r| r.vni = 1 << 24).contains("out of range"));
        assert!(err(&|r| r.subnet = "10.0.0.1/24".into()).contains("did you mean 10.0.0.0/24"));
        assert_eq!(
            err(&|r| r.mtu = Some(575)),
            "mtu 575 is out of range: must be 576 to 9000"
        );
        assert!(err(&|r| r.mtu = Some(9001)).contains("out of range"));
        assert_eq!(
            err(&|r| r.gateway = Some("10.0.0.x".into())),
            "gateway \"10.0.0.x\" is not an IPv4 address"
        );
        assert_eq!(
            err(&|r| r.gateway = Some("10.0.1.1".into())),
            "gateway 10.0.1.1 is outside subnet 10.0.0.0/24"
        );
        assert_eq!(
            err(&|r| r.gateway = Some("10.0.0.0".into())),
            "gateway 10.0.0.0 is the network address of subnet 10.0.0.0/24"
        );
        assert_eq!(
            err(&|r| r.gateway = Some("10.0.0.255".into())),
            "gateway 10.0.0.255 is the broadcast address of subnet 10.0.0.0/24"
        );
        assert!(err(&|r| r.gateway = Some("10.0.0.254".into()))
            .starts_with("gateway 10.0.0.254 is the DHCP server address of subnet 10.0.0.0/24"));
        assert_eq!(
            err(&|r| r.dns = vec!["1.1.1.1".into(), "2001:db8::1".into()]),
            "dns server \"2001:db8::1\" is not an IPv4 address"
        );
        assert_eq!(
            err(&|r| r.dns = vec!["1.1.1.1".into(); 9]),
            "too many dns servers: at most 8, got 9"
        );
    }

    fn port(name: &str) -> api::CreatePort {
        api::CreatePort {
            name: name.into(),
            network: "blue".into(),
            node: "h1".into(),
            kind: api::PortKind::Tap,
            mac: None,
            ip: None,
            netns: None,
            ifname: None,
            vip: None,
        }
    }

    #[test]
    fn ports() {
        let p = check_port(&port("vm1")).unwrap();
        assert_eq!(
            p,
            PortRequest {
                ifname: "vm1".into(),
                mac: None,
                ip: None
            }
        );
        let mut r = port("vm1");
        r.ifname = Some("tap-vm1.0".into());
        r.mac = Some("02:00:00:00:00:0A".into());
        r.ip = Some("10.0.0.9".into());
        r.netns = Some("ns-vm1".into());
        let p = check_port(&r).unwrap();
        assert_eq!(p.ifname, "tap-vm1.0");
        assert_eq!(p.mac.unwrap().to_string(), "02:00:00:00:00:0a");
        assert_eq!(p.ip, Some(ip("10.0.0.9")));
        assert!(check_port_name(&"p".repeat(15)).is_ok());
    }

    #[test]
    fn port_errors() {
        let err = |f: &dyn Fn(&mut api::CreatePort)| {
            let mut r = port("vm1");
            f(&mut r);
            check_port(&r).unwrap_err().to_string()
        };
        assert_eq!(
            err(&|r| r.name = "a-very-long-name".into()),
            "invalid port name \"a-very-long-name\": at most 15 characters (it names the interface by default), got 16"
        );
        assert!(err(&|r| r.name = "".into()).contains("invalid port name"));
        assert!(err(&|r| r.name = "-x".into()).contains("must not start with"));
        assert!(err(&|r| r.name = "a b".into()).contains("allowed: A-Z"));
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx", "é"] {
            assert_eq!(
                err(&|r| r.ifname = Some(bad.into())),
                format!("invalid interface name {bad:?}: must be 1 to 15 characters of A-Z a-z 0-9 . _ - (not . or ..)")
            );
        }
        assert!(err(&|r| r.mac = Some("02:00:00:00:00".into())).contains("xx:xx:xx:xx:xx:xx"));
        assert!(err(&|r| r.mac = Some("01:00:00:00:00:01".into())).contains("multicast"));
        assert!(err(&|r| r.mac = Some("00:00:00:00:00:00".into())).contains("not a usable"));
        assert_eq!(
            err(&|r| r.ip = Some("10.0.0.300".into())),
            "ip \"10.0.0.300\" is not an IPv4 address"
        );
        assert!(err(&|r| r.ip = Some("::1".into())).contains("not an IPv4"));
        assert!(err(&|r| {
            r.kind = api::PortKind::Netdev;
            r.netns = Some("ns1".into());
        })
        .starts_with("netns is for tap ports only"));
        assert!(err(&|r| r.netns = Some("a/b".into())).starts_with("invalid netns name \"a/b\""));
        assert!(err(&|r| r.netns = Some("..".into())).starts_with("invalid netns name"));
        assert!(err(&|r| r.netns = Some(String::new())).starts_with("invalid netns name"));
        // A netdev port without netns, with a given ifname, is fine.
        let mut r = port("vm1");
        r.kind = api::PortKind::Netdev;
        r.ifname = Some("vnet0".into());
        assert!(check_port(&r).is_ok());
    }

    #[test]
    fn port_ips() {
        let s = Subnet::parse("10.0.0.0/24").unwrap();
        assert!(check_port_ip(ip("10.0.0.1"), s).is_ok());
        assert!(check_port_ip(ip("10.0.0.253"), s).is_ok());
        assert_eq!(
            check_port_ip(ip("10.0.1.5"), s).unwrap_err().to_string(),
            "ip 10.0.1.5 is outside subnet 10.0.0.0/24"
        );
        for (a, role) in [
            ("10.0.0.0", Role::Network),
            ("10.0.0.255", Role::Broadcast),
            ("10.0.0.254", Role::DhcpServer),
        ] {
            assert_eq!(
                check_port_ip(ip(a), s),
                Err(NetError::Reserved {
                    what: "ip",
                    ip: ip(a),
                    subnet: s,
                    role
                })
            );
        }
    }

    #[test]
    fn ip_allocation() {
        let s = Subnet::parse("10.0.0.0/29").unwrap(); // hosts .1-.6, .6 = DHCP server
        let mut taken = HashSet::new();
        assert_eq!(allocate_ip(s, None, &taken), Some(ip("10.0.0.1")));
        assert_eq!(
            allocate_ip(s, Some(ip("10.0.0.1")), &taken),
            Some(ip("10.0.0.2"))
        );
        taken.insert(ip("10.0.0.2"));
        assert_eq!(
            allocate_ip(s, Some(ip("10.0.0.1")), &taken),
            Some(ip("10.0.0.3"))
        );
        // Lowest free, also below a taken one.
        taken.insert(ip("10.0.0.4"));
        assert_eq!(allocate_ip(s, None, &taken), Some(ip("10.0.0.1")));
        taken.extend([ip("10.0.0.1"), ip("10.0.0.3")]);
        assert_eq!(allocate_ip(s, None, &taken), Some(ip("10.0.0.5")));
        // Never the DHCP server address or the gateway: full.
        assert_eq!(allocate_ip(s, Some(ip("10.0.0.5")), &taken), None);
        taken.insert(ip("10.0.0.5"));
        assert_eq!(allocate_ip(s, None, &taken), None);
        // The smallest subnet has exactly one port address.
        let s = Subnet::parse("10.0.0.4/30").unwrap();
        assert_eq!(allocate_ip(s, None, &HashSet::new()), Some(ip("10.0.0.5")));
        assert_eq!(allocate_ip(s, Some(ip("10.0.0.5")), &HashSet::new()), None);
        // A /8 starts at .0.0.1 and steps over .0.0.255 like any other address.
        let s = Subnet::parse("10.0.0.0/8").unwrap();
        let taken: HashSet<Ipv4Addr> = (1..=255).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(allocate_ip(s, None, &taken), Some(ip("10.0.1.0")));
    }

    #[test]
    fn mac_allocation() {
        let m = derive_mac("blue", "vm1", 0);
        assert_eq!(m, derive_mac("blue", "vm1", 0), "deterministic");
        assert_eq!(m.0[0], 0x02, "locally administered unicast");
        assert!(!m.is_multicast() && !m.is_zero());
        // Stable across releases (the manager may be upgraded between two creates).
        assert_eq!(m.to_string(), derive_mac("blue", "vm1", 0).to_string());
        assert_ne!(m, derive_mac("blue", "vm2", 0));
        assert_ne!(m, derive_mac("red", "vm1", 0));
        assert_ne!(m, derive_mac("blue", "vm1", 1));
        // The name boundary counts: ("ab","c") and ("a","bc") differ.
        assert_ne!(derive_mac("ab", "c", 0), derive_mac("a", "bc", 0));
        // Probing skips taken candidates.
        let taken: HashSet<Mac> =
            [derive_mac("blue", "vm1", 0), derive_mac("blue", "vm1", 1)].into();
        assert_eq!(
            allocate_mac("blue", "vm1", |c| taken.contains(c)),
            Some(derive_mac("blue", "vm1", 2))
        );
        assert_eq!(allocate_mac("blue", "vm1", |_| false), Some(m));
        assert_eq!(allocate_mac("blue", "vm1", |_| true), None);
        // Every candidate is a usable port MAC.
        for i in 0..1000 {
            let c = derive_mac("n", "p", i);
            assert_eq!(Mac::parse_port(&c.to_string()), Ok(c));
        }
    }

    #[test]
    fn switch_registrations() {
        let r = |ip: &str, port: u16, mtu: u32| api::RegisterSwitch {
            underlay_ip: ip.into(),
            vxlan_port: port,
            underlay_mtu: mtu,
        };
        assert_eq!(
            check_register_switch(&r("198.18.0.2", 4789, 1500)),
            Ok(ip("198.18.0.2"))
        );
        assert!(check_register_switch(&r("198.18.0.2", 1, 65535)).is_ok());
        assert!(check_register_switch(&r("198.18.0.2", 1, 576)).is_ok());
        let e = |r: api::RegisterSwitch| check_register_switch(&r).unwrap_err().to_string();
        assert_eq!(
            e(r("h1", 4789, 1500)),
            "underlay_ip \"h1\" is not an IPv4 address"
        );
        assert_eq!(
            e(r("0.0.0.0", 4789, 1500)),
            "underlay_ip 0.0.0.0 is not a unicast address"
        );
        assert!(e(r("239.1.1.1", 4789, 1500)).contains("not a unicast"));
        assert!(e(r("255.255.255.255", 4789, 1500)).contains("not a unicast"));
        assert_eq!(e(r("10.0.0.1", 0, 1500)), "vxlan_port must not be 0");
        assert_eq!(
            e(r("10.0.0.1", 4789, 575)),
            "underlay_mtu 575 is out of range: must be 576 to 65535"
        );
        assert!(e(r("10.0.0.1", 4789, 65536)).contains("out of range"));
    }

    #[test]
    fn switch_liveness() {
        use api::NodeState::{Down, Up};
        let d = Duration::from_secs(5);
        // Heard from: up while the heartbeat is younger than down_after.
        assert_eq!(switch_state(Down, Some(10_000), 0, 14_999, d), Up);
        assert_eq!(switch_state(Up, Some(10_000), 0, 15_000, d), Down);
        assert_eq!(switch_state(Down, Some(20_000), 0, 10_000, d), Up); // clock step back
                                                                        // Not heard from since start: recorded state during the grace period, then down.
        assert_eq!(switch_state(Up, None, 100_000, 104_999, d), Up);
        assert_eq!(switch_state(Down, None, 100_000, 104_999, d), Down);
        assert_eq!(switch_state(Up, None, 100_000, 105_000, d), Down);
    }
}
