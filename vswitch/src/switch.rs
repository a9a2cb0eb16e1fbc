//! The forwarding state machine: per-VNI MAC and IP tables programmed from the control plane
//! (with learning from the underlay as a fallback), port security, the ARP responder, the
//! DHCP server hook, head-end replication and counters. Pure code driven by calls, like
//! smoltcp's `Interface`: the I/O layer hands frames in ([`Switch::from_port`],
//! [`Switch::from_underlay`]) and carries out the [`Action`]s that come back; time is an
//! argument. Nothing here allocates per forwarded frame (only for frames the switch makes).
//!
//! Rules (DESIGN "Network rules"): a port sends only from its own MAC and IPv4 address; nothing
//! crosses between VNIs; frames from the underlay are never sent back to the underlay (split
//! horizon); static entries from the control plane win over learned ones, and a learned entry
//! never takes a local port's MAC.

use crate::dhcp;
use crate::vxlan;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, ETHERNET_HEADER_LEN,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use volume_mgr::api::{NetState, NodeState, PortKind, PortStats};
use volume_mgr::net::{Mac, Subnet};

/// A local port's handle, stable while the port exists; never reused.
pub type PortId = u32;

/// Learned MAC, IP and VTEP entries are forgotten after this long without traffic.
pub const LEARN_AGE_MS: u64 = 300_000;
/// Most learned MAC (and, separately, IP) entries the switch keeps; more are not learned.
pub const LEARN_MAX: usize = 16_384;
/// Most learned VTEPs per network.
pub const LEARN_VTEPS_MAX: usize = 256;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_VLAN: u16 = 0x8100;
const VLAN_TAG_LEN: usize = 4;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;

/// The MAC the switch answers with for a network's DHCP server address: locally administered
/// unicast `06:fa:b0` + the 24-bit VNI, the same on every host, outside the manager's `02:…`
/// allocations.
pub fn service_mac(vni: u32) -> [u8; 6] {
    let v = vni.to_be_bytes();
    [0x06, 0xfa, 0xb0, v[1], v[2], v[3]]
}

/// Why a frame was dropped. The names are the API's `PortStats.drops` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    SpoofedMac,
    SpoofedIp,
    Oversize,
    Malformed,
    UnknownVni,
    NoDestination,
    QueueFull,
    /// A port is an access port: VLAN-tagged frames from it would carry addresses the port
    /// security checks do not look into, so they are refused.
    VlanTagged,
}

impl DropReason {
    pub const ALL: [DropReason; 8] = [
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::Oversize,
        DropReason::Malformed,
        DropReason::UnknownVni,
        DropReason::NoDestination,
        DropReason::QueueFull,
        DropReason::VlanTagged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::Oversize => "oversize",
            DropReason::Malformed => "malformed",
            DropReason::UnknownVni => "unknown_vni",
            DropReason::NoDestination => "no_destination",
            DropReason::QueueFull => "queue_full",
            DropReason::VlanTagged => "vlan_tagged",
        }
    }

    pub fn parse(s: &str) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Drop counters by reason: the known reasons in a fixed array, any other reason the I/O layer
/// names in a map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drops {
    known: [u64; DropReason::ALL.len()],
    other: BTreeMap<&'static str, u64>,
}

impl Drops {
    fn add(&mut self, reason: DropReason) {
        self.known[reason as usize] += 1;
    }

    fn add_named(&mut self, reason: &'static str) {
        match DropReason::parse(reason) {
            Some(r) => self.add(r),
            None => *self.other.entry(reason).or_default() += 1,
        }
    }

    /// The count for `reason` (0 if never counted).
    pub fn get(&self, reason: &str) -> u64 {
        match DropReason::parse(reason) {
            Some(r) => self.known[r as usize],
            None => self.other.get(reason).copied().unwrap_or(0),
        }
    }

    pub fn total(&self) -> u64 {
        self.known.iter().sum::<u64>() + self.other.values().sum::<u64>()
    }

    /// Non-zero counters, known reasons first.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.known[*r as usize]))
            .chain(self.other.iter().map(|(k, v)| (*k, *v)))
            .filter(|(_, n)| *n > 0)
    }

    fn to_map(&self) -> BTreeMap<String, u64> {
        self.iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortCounters {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
    drops: Drops,
}

/// Counters of one network on this switch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the network's local ports sent into the switch (dropped ones included).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames delivered to local ports (switch-made replies included).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// VXLAN packets of this VNI received from the underlay (inner frame bytes).
    pub underlay_rx_packets: u64,
    pub underlay_rx_bytes: u64,
    /// Copies sent to VTEPs (inner frame bytes, one per VTEP).
    pub underlay_tx_packets: u64,
    pub underlay_tx_bytes: u64,
    /// ARP requests the switch answered itself.
    pub arp_replied: u64,
    /// DHCP replies the switch sent.
    pub dhcp_replied: u64,
    /// DHCP frames that came over the underlay and were ignored.
    pub underlay_dhcp_ignored: u64,
    pub drops: Drops,
}

/// A port served by this switch, as the I/O layer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPort {
    pub id: PortId,
    pub name: String,
    pub network: String,
    pub kind: PortKind,
    pub ifname: String,
    pub netns: Option<String>,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    /// The network's prefix length and gateway (for configuring an interface by hand).
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub vni: u32,
    /// The network's MTU on this switch (its own, or underlay − 50).
    pub mtu: u32,
}

/// What the I/O layer does with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deliver the input frame (for `from_underlay`: the inner frame) unchanged to a local
    /// port.
    ToPort(PortId),
    /// Send the input frame encapsulated with `vni` to a VTEP (never produced by
    /// `from_underlay`: split horizon).
    ToVtep { vtep: SocketAddrV4, vni: u32 },
    /// A frame the switch made (ARP reply, DHCP offer/ack/nak) for a local port.
    Reply { port: PortId, frame: Vec<u8> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Local(PortId),
    Remote(SocketAddrV4),
    /// The switch's own DHCP/ARP identity in the network.
    Service,
}

#[derive(Debug, Clone, Copy)]
struct Learned<T> {
    value: T,
    seen_ms: u64,
}

impl<T> Learned<T> {
    fn fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.seen_ms) <= LEARN_AGE_MS
    }
}

struct PortEntry {
    info: LocalPort,
    created_ms: u64,
    counters: PortCounters,
}

struct Net {
    name: String,
    subnet: Subnet,
    mtu: u32,
    gateway: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
    server_ip: Ipv4Addr,
    server_mac: [u8; 6],
    /// Local ports, by id.
    local_ports: Vec<PortId>,
    /// VTEPs of the other up switches with ports in this network.
    static_vteps: Vec<SocketAddrV4>,
    learned_vteps: HashMap<SocketAddrV4, u64>,
    /// static ∪ learned, sorted: where broadcast and unknown unicast go.
    flood: Vec<SocketAddrV4>,
    stats: NetStats,
}

impl Net {
    fn rebuild_flood(&mut self) {
        self.flood.clear();
        self.flood.extend(self.static_vteps.iter().copied());
        for v in self.learned_vteps.keys() {
            if !self.flood.contains(v) {
                self.flood.push(*v);
            }
        }
        self.flood.sort();
    }

    /// Largest frame accepted: MTU + Ethernet header (+ a VLAN tag).
    fn max_frame(&self, ethertype: u16) -> usize {
        let tag = if ethertype == ETHERTYPE_VLAN {
            VLAN_TAG_LEN
        } else {
            0
        };
        self.mtu as usize + ETHERNET_HEADER_LEN + tag
    }
}

/// What port security found a frame from a port to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ingress {
    Forward,
    /// An ARP request for someone else's address.
    ArpRequest {
        sender_ip: Ipv4Addr,
        target_ip: Ipv4Addr,
    },
    /// A DHCP client message (UDP 68 -> 67): for the switch's server.
    Dhcp,
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

fn mac_at(frame: &[u8], at: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&frame[at..at + 6]);
    m
}

/// IPv4 header facts port security needs, without trusting the total length (GSO frames may
/// carry one that does not match the buffer).
struct Ipv4Facts {
    src: Ipv4Addr,
    dhcp_client: bool,
    dhcp_any: bool,
}

fn ipv4_facts(payload: &[u8]) -> Option<Ipv4Facts> {
    if payload.len() < 20 || payload[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(payload[0] & 0x0f) * 4;
    if ihl < 20 || ihl > payload.len() {
        return None;
    }
    let src = Ipv4Addr::new(payload[12], payload[13], payload[14], payload[15]);
    let first_fragment = u16::from_be_bytes([payload[6], payload[7]]) & 0x1fff == 0;
    let ports = if payload[9] == IPPROTO_UDP && first_fragment {
        payload.get(ihl..ihl + 4).map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        })
    } else {
        None
    };
    Some(Ipv4Facts {
        src,
        dhcp_client: ports == Some((68, 67)),
        dhcp_any: matches!(ports, Some((68, 67)) | Some((67, 68))),
    })
}

/// Port security and classification of a frame a port sent.
fn check_from_port(
    frame: &[u8],
    gso: bool,
    max_frame: impl Fn(u16) -> usize,
    mac: [u8; 6],
    ip: Ipv4Addr,
) -> Result<Ingress, DropReason> {
    if frame.len() < ETHERNET_HEADER_LEN {
        return Err(DropReason::Malformed);
    }
    let et = ethertype(frame);
    if !gso && frame.len() > max_frame(et) {
        return Err(DropReason::Oversize);
    }
    if frame[6..12] != mac {
        return Err(DropReason::SpoofedMac);
    }
    if et == ETHERTYPE_VLAN || et == ETHERTYPE_QINQ {
        return Err(DropReason::VlanTagged);
    }
    let payload = &frame[ETHERNET_HEADER_LEN..];
    match et {
        ETHERTYPE_ARP => {
            let pkt = ArpPacket::new_checked(payload).map_err(|_| DropReason::Malformed)?;
            let repr = ArpRepr::parse(&pkt).map_err(|_| DropReason::Malformed)?;
            let ArpRepr::EthernetIpv4 {
                operation,
                source_hardware_addr,
                source_protocol_addr,
                target_protocol_addr,
                ..
            } = repr
            else {
                return Err(DropReason::Malformed);
            };
            if source_hardware_addr.0 != mac {
                return Err(DropReason::SpoofedMac);
            }
            if source_protocol_addr != ip && !source_protocol_addr.is_unspecified() {
                return Err(DropReason::SpoofedIp);
            }
            if operation == ArpOperation::Request && target_protocol_addr != ip {
                Ok(Ingress::ArpRequest {
                    sender_ip: source_protocol_addr,
                    target_ip: target_protocol_addr,
                })
            } else {
                Ok(Ingress::Forward)
            }
        }
        ETHERTYPE_IPV4 => {
            let facts = ipv4_facts(payload).ok_or(DropReason::Malformed)?;
            if facts.src != ip && !(facts.src.is_unspecified() && facts.dhcp_client) {
                return Err(DropReason::SpoofedIp);
            }
            if facts.dhcp_client {
                Ok(Ingress::Dhcp)
            } else {
                Ok(Ingress::Forward)
            }
        }
        // IPv6 and everything else: the MAC check only.
        _ => Ok(Ingress::Forward),
    }
}

fn arp_reply(from_mac: [u8; 6], from_ip: Ipv4Addr, to_mac: [u8; 6], to_ip: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(from_mac),
        source_protocol_addr: from_ip,
        target_hardware_addr: EthernetAddress(to_mac),
        target_protocol_addr: to_ip,
    };
    // 14 + 28 = 42 bytes; the tap pads if it must.
    let mut buf = vec![0u8; ETHERNET_HEADER_LEN + arp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: EthernetAddress(from_mac),
        dst_addr: EthernetAddress(to_mac),
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    buf
}

/// The per-host virtual switch. See the module docs.
pub struct Switch {
    node: String,
    underlay_mtu: u32,
    /// Destination port of VTEPs learned from the underlay (not registered switches).
    vxlan_port: u16,
    own_vtep_ip: Option<Ipv4Addr>,
    next_id: PortId,
    ports: HashMap<PortId, PortEntry>,
    by_name: HashMap<String, PortId>,
    nets: HashMap<u32, Net>,
    /// Registered switches (other than this one): underlay IP -> VTEP.
    switch_vteps: HashMap<Ipv4Addr, SocketAddrV4>,
    macs: HashMap<([u8; 6], u32), Dest>,
    ips: HashMap<(Ipv4Addr, u32), [u8; 6]>,
    learned_macs: HashMap<([u8; 6], u32), Learned<SocketAddrV4>>,
    learned_ips: HashMap<(Ipv4Addr, u32), Learned<[u8; 6]>>,
    /// Underlay packets dropped before a network was known (malformed VXLAN, unknown VNI).
    underlay_drops: Drops,
}

impl Switch {
    /// `node`: this host's name (ports with `port.node == node` are local);
    /// `underlay_mtu`: default network MTU = underlay_mtu - 50.
    pub fn new(node: &str, underlay_mtu: u32) -> Switch {
        Switch {
            node: node.to_string(),
            underlay_mtu,
            vxlan_port: vxlan::VXLAN_PORT,
            own_vtep_ip: None,
            next_id: 1,
            ports: HashMap::new(),
            by_name: HashMap::new(),
            nets: HashMap::new(),
            switch_vteps: HashMap::new(),
            macs: HashMap::new(),
            ips: HashMap::new(),
            learned_macs: HashMap::new(),
            learned_ips: HashMap::new(),
            underlay_drops: Drops::default(),
        }
    }

    /// The UDP port VTEPs learned from the underlay (kernel VXLAN devices, which send from
    /// ephemeral source ports) are sent to: this switch's own VXLAN port (default 4789).
    pub fn set_vxlan_port(&mut self, port: u16) {
        self.vxlan_port = port;
    }

    /// Programs everything from the control plane's state (idempotent; called on every watch
    /// answer). Local ports keep their PortId across calls while they exist (ids are never
    /// reused; a port deleted and created again under the same name gets a new one); remote
    /// ports become static MAC -> VTEP and IP -> MAC entries of their VNI; the flood list of a
    /// VNI = VTEPs (`Switch.underlay_ip:vxlan_port`) of the other UP switches that have ports
    /// in that VNI, plus VTEPs learned for the VNI. Entries that do not parse are skipped with
    /// a warning (the manager validates them, so this does not happen).
    pub fn apply(&mut self, state: &NetState) {
        // Switches.
        let mut node_vtep: HashMap<&str, SocketAddrV4> = HashMap::new();
        let mut up: HashSet<&str> = HashSet::new();
        self.switch_vteps.clear();
        self.own_vtep_ip = None;
        for s in &state.switches {
            let Ok(ip) = s.underlay_ip.parse::<Ipv4Addr>() else {
                tracing::warn!(node = %s.node, "switch with an unparsable underlay IP skipped");
                continue;
            };
            if s.node == self.node {
                self.own_vtep_ip = Some(ip);
                continue;
            }
            let vtep = SocketAddrV4::new(ip, s.vxlan_port);
            node_vtep.insert(&s.node, vtep);
            self.switch_vteps.insert(ip, vtep);
            if s.state == NodeState::Up {
                up.insert(&s.node);
            }
        }

        // Networks, keeping counters and learned VTEPs of those that stay.
        let mut old_nets = std::mem::take(&mut self.nets);
        let mut vni_of: HashMap<&str, u32> = HashMap::new();
        for n in &state.networks {
            let Ok(subnet) = Subnet::parse(&n.subnet) else {
                tracing::warn!(network = %n.name, "network with an unparsable subnet skipped");
                continue;
            };
            if !(volume_mgr::api::VNI_MIN..=volume_mgr::api::VNI_MAX).contains(&n.vni)
                || self.nets.contains_key(&n.vni)
            {
                tracing::warn!(network = %n.name, vni = n.vni, "network with a bad or duplicate VNI skipped");
                continue;
            }
            let (stats, learned_vteps) = match old_nets.remove(&n.vni) {
                Some(old) if old.name == n.name => (old.stats, old.learned_vteps),
                _ => Default::default(),
            };
            let mtu = n
                .mtu
                .unwrap_or_else(|| self.underlay_mtu.saturating_sub(vxlan::OVERHEAD));
            self.nets.insert(
                n.vni,
                Net {
                    name: n.name.clone(),
                    subnet,
                    mtu,
                    gateway: n.gateway.as_deref().and_then(|g| g.parse().ok()),
                    dns: n.dns.iter().filter_map(|d| d.parse().ok()).collect(),
                    server_ip: subnet.dhcp_server(),
                    server_mac: service_mac(n.vni),
                    local_ports: Vec::new(),
                    static_vteps: Vec::new(),
                    learned_vteps,
                    flood: Vec::new(),
                    stats,
                },
            );
            vni_of.insert(&n.name, n.vni);
        }

        // Ports: local ones first so that their MACs win any (invalid) duplicate.
        self.macs.clear();
        self.ips.clear();
        for (vni, net) in &self.nets {
            self.macs.insert((net.server_mac, *vni), Dest::Service);
        }
        let mut old_ports = std::mem::take(&mut self.ports);
        self.by_name.clear();
        let parsed = state.ports.iter().filter_map(|p| {
            let vni = *vni_of.get(p.network.as_str())?;
            let (Ok(mac), Ok(ip)) = (Mac::parse_port(&p.mac), p.ip.parse::<Ipv4Addr>()) else {
                tracing::warn!(port = %p.name, "port with an unparsable MAC or IP skipped");
                return None;
            };
            Some((p, vni, mac.0, ip))
        });
        let (local, remote): (Vec<_>, Vec<_>) = parsed.partition(|(p, ..)| p.node == self.node);
        for (p, vni, mac, ip) in local {
            let Some(net) = self.nets.get_mut(&vni) else {
                continue;
            };
            if self.by_name.contains_key(&p.name) {
                continue;
            }
            let old = old_ports
                .iter()
                .find(|(_, e)| e.info.name == p.name && e.created_ms == p.created_ms)
                .map(|(id, _)| *id);
            let (id, counters) = match old.and_then(|id| old_ports.remove(&id).map(|e| (id, e))) {
                Some((id, e)) => (id, e.counters),
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    (id, PortCounters::default())
                }
            };
            let info = LocalPort {
                id,
                name: p.name.clone(),
                network: p.network.clone(),
                kind: p.kind,
                ifname: p.ifname.clone(),
                netns: p.netns.clone(),
                mac,
                ip,
                prefix: net.subnet.prefix(),
                gateway: net.gateway,
                vni,
                mtu: net.mtu,
            };
            net.local_ports.push(id);
            self.macs.entry((mac, vni)).or_insert(Dest::Local(id));
            self.ips.entry((ip, vni)).or_insert(mac);
            self.by_name.insert(p.name.clone(), id);
            self.ports.insert(
                id,
                PortEntry {
                    info,
                    created_ms: p.created_ms,
                    counters,
                },
            );
        }
        for (p, vni, mac, ip) in remote {
            let Some(net) = self.nets.get_mut(&vni) else {
                continue;
            };
            self.ips.entry((ip, vni)).or_insert(mac);
            if let Some(vtep) = node_vtep.get(p.node.as_str()) {
                self.macs.entry((mac, vni)).or_insert(Dest::Remote(*vtep));
                if up.contains(p.node.as_str()) && !net.static_vteps.contains(vtep) {
                    net.static_vteps.push(*vtep);
                }
            }
        }
        for net in self.nets.values_mut() {
            net.local_ports.sort_unstable();
            net.static_vteps.sort_unstable();
            let statics = &net.static_vteps;
            net.learned_vteps.retain(|v, _| !statics.contains(v));
            net.rebuild_flood();
        }

        // Learned entries of networks that are gone, or that static entries now cover.
        let nets = &self.nets;
        let macs = &self.macs;
        let ips = &self.ips;
        self.learned_macs
            .retain(|k, _| nets.contains_key(&k.1) && !macs.contains_key(k));
        self.learned_ips
            .retain(|k, _| nets.contains_key(&k.1) && !ips.contains_key(k));
    }

    /// The ports this switch serves, by id.
    pub fn local_ports(&self) -> Vec<LocalPort> {
        let mut v: Vec<LocalPort> = self.ports.values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|p| p.id);
        v
    }

    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.by_name.get(name).copied()
    }

    pub fn network_mtu(&self, vni: u32) -> Option<u32> {
        self.nets.get(&vni).map(|n| n.mtu)
    }

    /// Where broadcast and unknown unicast of `vni` go on the underlay (sorted).
    pub fn flood_list(&self, vni: u32) -> Vec<SocketAddrV4> {
        self.nets
            .get(&vni)
            .map(|n| n.flood.clone())
            .unwrap_or_default()
    }

    /// Learned MAC entries (all networks).
    pub fn learned_macs(&self) -> usize {
        self.learned_macs.len()
    }

    fn lookup_mac(&self, mac: [u8; 6], vni: u32, now_ms: u64) -> Option<Dest> {
        if let Some(d) = self.macs.get(&(mac, vni)) {
            return Some(*d);
        }
        self.learned_macs
            .get(&(mac, vni))
            .filter(|l| l.fresh(now_ms))
            .map(|l| Dest::Remote(l.value))
    }

    fn lookup_ip(&self, ip: Ipv4Addr, vni: u32, now_ms: u64) -> Option<[u8; 6]> {
        if let Some(m) = self.ips.get(&(ip, vni)) {
            return Some(*m);
        }
        self.learned_ips
            .get(&(ip, vni))
            .filter(|l| l.fresh(now_ms))
            .map(|l| l.value)
    }

    fn drop_port(&mut self, port: PortId, vni: u32, reason: DropReason) {
        if let Some(e) = self.ports.get_mut(&port) {
            e.counters.drops.add(reason);
        }
        if let Some(n) = self.nets.get_mut(&vni) {
            n.stats.drops.add(reason);
        }
    }

    /// Counts a delivery of `len` bytes to a local port.
    fn count_tx(ports: &mut HashMap<PortId, PortEntry>, net: &mut Net, port: PortId, len: usize) {
        if let Some(e) = ports.get_mut(&port) {
            e.counters.tx_packets += 1;
            e.counters.tx_bytes += len as u64;
        }
        net.stats.tx_packets += 1;
        net.stats.tx_bytes += len as u64;
    }

    fn reply(&mut self, port: PortId, vni: u32, frame: Vec<u8>, out: &mut Vec<Action>) {
        if let Some(net) = self.nets.get_mut(&vni) {
            Self::count_tx(&mut self.ports, net, port, frame.len());
        }
        out.push(Action::Reply { port, frame });
    }

    /// A frame the port's interface sent (from the VM). `gso`: the frame carries a virtio-net
    /// GSO request (it may be longer than the MTU; the I/O layer segments it if it goes to a
    /// VTEP). Pushes what to do with it into `out` (cleared first). Unknown port ids are
    /// ignored.
    pub fn from_port(
        &mut self,
        port: PortId,
        frame: &[u8],
        gso: bool,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        out.clear();
        let Some(entry) = self.ports.get_mut(&port) else {
            return;
        };
        entry.counters.rx_packets += 1;
        entry.counters.rx_bytes += frame.len() as u64;
        let (vni, mac, ip) = (entry.info.vni, entry.info.mac, entry.info.ip);
        let Some(net) = self.nets.get_mut(&vni) else {
            return;
        };
        net.stats.rx_packets += 1;
        net.stats.rx_bytes += frame.len() as u64;

        match check_from_port(frame, gso, |et| net.max_frame(et), mac, ip) {
            Err(reason) => {
                self.drop_port(port, vni, reason);
                return;
            }
            Ok(Ingress::Dhcp) => {
                self.dhcp(port, vni, frame, out);
                return;
            }
            Ok(Ingress::ArpRequest {
                sender_ip,
                target_ip,
            }) => {
                if self.answer_arp(port, vni, mac, sender_ip, target_ip, now_ms, out) {
                    return;
                }
            }
            Ok(Ingress::Forward) => {}
        }

        let dst = mac_at(frame, 0);
        if dst[0] & 1 == 0 {
            match self.lookup_mac(dst, vni, now_ms) {
                Some(Dest::Local(p)) if p != port => {
                    if let Some(net) = self.nets.get_mut(&vni) {
                        Self::count_tx(&mut self.ports, net, p, frame.len());
                    }
                    out.push(Action::ToPort(p));
                    return;
                }
                Some(Dest::Remote(vtep)) => {
                    if let Some(net) = self.nets.get_mut(&vni) {
                        net.stats.underlay_tx_packets += 1;
                        net.stats.underlay_tx_bytes += frame.len() as u64;
                    }
                    out.push(Action::ToVtep { vtep, vni });
                    return;
                }
                // Back to the sender, or to the switch's service MAC (not a DHCP message).
                Some(Dest::Local(_)) | Some(Dest::Service) => {
                    self.drop_port(port, vni, DropReason::NoDestination);
                    return;
                }
                None => {}
            }
        }

        // Broadcast, multicast, unknown unicast: every other local port of the VNI, and one
        // copy per flood-list VTEP (head-end replication).
        let Some(net) = self.nets.get_mut(&vni) else {
            return;
        };
        for &p in &net.local_ports {
            if p != port {
                out.push(Action::ToPort(p));
            }
        }
        let local = out.len();
        for p in out.iter() {
            if let Action::ToPort(p) = p {
                Self::count_tx(&mut self.ports, net, *p, frame.len());
            }
        }
        for &vtep in &net.flood {
            out.push(Action::ToVtep { vtep, vni });
        }
        let copies = (out.len() - local) as u64;
        net.stats.underlay_tx_packets += copies;
        net.stats.underlay_tx_bytes += copies * frame.len() as u64;
        if out.is_empty() {
            net.stats.drops.add(DropReason::NoDestination);
            if let Some(e) = self.ports.get_mut(&port) {
                e.counters.drops.add(DropReason::NoDestination);
            }
        }
    }

    /// Answers an ARP request from a local port if the target is known in the VNI. Returns
    /// whether it did (then the request goes nowhere else).
    #[allow(clippy::too_many_arguments)]
    fn answer_arp(
        &mut self,
        port: PortId,
        vni: u32,
        asker_mac: [u8; 6],
        asker_ip: Ipv4Addr,
        target_ip: Ipv4Addr,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(net) = self.nets.get(&vni) else {
            return false;
        };
        let target_mac = if target_ip == net.server_ip {
            Some(net.server_mac)
        } else {
            self.lookup_ip(target_ip, vni, now_ms)
        };
        let Some(target_mac) = target_mac else {
            return false;
        };
        let frame = arp_reply(target_mac, target_ip, asker_mac, asker_ip);
        if let Some(net) = self.nets.get_mut(&vni) {
            net.stats.arp_replied += 1;
        }
        self.reply(port, vni, frame, out);
        true
    }

    fn dhcp(&mut self, port: PortId, vni: u32, frame: &[u8], out: &mut Vec<Action>) {
        let (Some(net), Some(entry)) = (self.nets.get(&vni), self.ports.get(&port)) else {
            return;
        };
        let lease = dhcp::Lease {
            client_mac: entry.info.mac,
            client_ip: entry.info.ip,
            prefix: net.subnet.prefix(),
            mtu: net.mtu,
            gateway: net.gateway,
            dns: &net.dns,
            server_ip: net.server_ip,
            server_mac: net.server_mac,
            lease_secs: dhcp::LEASE_SECS,
        };
        match dhcp::handle(&lease, frame) {
            Ok((answer, Some(reply))) => {
                tracing::debug!(port = %entry.info.name, ?answer, "DHCP reply");
                if let Some(net) = self.nets.get_mut(&vni) {
                    net.stats.dhcp_replied += 1;
                }
                self.reply(port, vni, reply, out);
            }
            Ok((_, None)) => {}
            Err(_) => self.drop_port(port, vni, DropReason::Malformed),
        }
    }

    /// The VTEP a packet from `src` came from: a registered switch's VXLAN address, or the
    /// sender's IP at this switch's VXLAN port (Linux VXLAN devices send from ephemeral ports
    /// but listen on the configured one).
    fn vtep_of(&self, src: SocketAddrV4) -> SocketAddrV4 {
        self.switch_vteps
            .get(src.ip())
            .copied()
            .unwrap_or_else(|| SocketAddrV4::new(*src.ip(), self.vxlan_port))
    }

    fn learn(&mut self, vni: u32, src_mac: [u8; 6], vtep: SocketAddrV4, inner: &[u8], now_ms: u64) {
        // Source MAC -> VTEP, unless the control plane knows the MAC.
        let key = (src_mac, vni);
        if !self.macs.contains_key(&key) {
            let room = self.learned_macs.len() < LEARN_MAX;
            match self.learned_macs.get_mut(&key) {
                Some(l) => {
                    l.value = vtep;
                    l.seen_ms = now_ms;
                }
                None if room => {
                    self.learned_macs.insert(
                        key,
                        Learned {
                            value: vtep,
                            seen_ms: now_ms,
                        },
                    );
                }
                None => {}
            }
        }
        // The VTEP joins the VNI's flood list.
        if let Some(net) = self.nets.get_mut(&vni) {
            if let Some(seen) = net.learned_vteps.get_mut(&vtep) {
                *seen = now_ms;
            } else if !net.static_vteps.contains(&vtep) && net.learned_vteps.len() < LEARN_VTEPS_MAX
            {
                net.learned_vteps.insert(vtep, now_ms);
                net.rebuild_flood();
            }
        }
        // ARP sender IP -> MAC, unless the control plane knows the IP.
        if ethertype(inner) == ETHERTYPE_ARP {
            let Ok(pkt) = ArpPacket::new_checked(&inner[ETHERNET_HEADER_LEN..]) else {
                return;
            };
            let Ok(ArpRepr::EthernetIpv4 {
                source_hardware_addr,
                source_protocol_addr,
                ..
            }) = ArpRepr::parse(&pkt)
            else {
                return;
            };
            let sha = source_hardware_addr.0;
            if source_protocol_addr.is_unspecified()
                || sha[0] & 1 == 1
                || sha != src_mac
                || self.ips.contains_key(&(source_protocol_addr, vni))
            {
                return;
            }
            let key = (source_protocol_addr, vni);
            let room = self.learned_ips.len() < LEARN_MAX;
            match self.learned_ips.get_mut(&key) {
                Some(l) => {
                    l.value = sha;
                    l.seen_ms = now_ms;
                }
                None if room => {
                    self.learned_ips.insert(
                        key,
                        Learned {
                            value: sha,
                            seen_ms: now_ms,
                        },
                    );
                }
                None => {}
            }
        }
    }

    /// A VXLAN packet (UDP payload) from `src` on the underlay. Delivers to local ports only
    /// (split horizon).
    pub fn from_underlay(
        &mut self,
        src: SocketAddrV4,
        udp_payload: &[u8],
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        out.clear();
        let (vni, inner) = match vxlan::decap(udp_payload) {
            Ok(x) => x,
            Err(_) => {
                self.underlay_drops.add(DropReason::Malformed);
                return;
            }
        };
        let Some(net) = self.nets.get_mut(&vni) else {
            self.underlay_drops.add(DropReason::UnknownVni);
            return;
        };
        net.stats.underlay_rx_packets += 1;
        net.stats.underlay_rx_bytes += inner.len() as u64;
        let et = ethertype(inner);
        if inner.len() > net.max_frame(et) {
            net.stats.drops.add(DropReason::Oversize);
            return;
        }
        let src_mac = mac_at(inner, 6);
        if src_mac[0] & 1 == 1 || src_mac == [0; 6] {
            net.stats.drops.add(DropReason::Malformed);
            return;
        }
        if et == ETHERTYPE_IPV4 {
            match ipv4_facts(&inner[ETHERNET_HEADER_LEN..]) {
                None => {
                    net.stats.drops.add(DropReason::Malformed);
                    return;
                }
                Some(f) if f.dhcp_any => {
                    net.stats.underlay_dhcp_ignored += 1;
                    return;
                }
                Some(_) => {}
            }
        }
        if Some(*src.ip()) != self.own_vtep_ip {
            let vtep = self.vtep_of(src);
            self.learn(vni, src_mac, vtep, inner, now_ms);
        }

        let dst = mac_at(inner, 0);
        let Some(net) = self.nets.get_mut(&vni) else {
            return;
        };
        if dst[0] & 1 == 0 {
            match self.macs.get(&(dst, vni)) {
                Some(Dest::Local(p)) => {
                    Self::count_tx(&mut self.ports, net, *p, inner.len());
                    out.push(Action::ToPort(*p));
                }
                _ => net.stats.drops.add(DropReason::NoDestination),
            }
            return;
        }
        out.extend(net.local_ports.iter().map(|&p| Action::ToPort(p)));
        for a in out.iter() {
            if let Action::ToPort(p) = a {
                Self::count_tx(&mut self.ports, net, *p, inner.len());
            }
        }
        if out.is_empty() {
            net.stats.drops.add(DropReason::NoDestination);
        }
    }

    pub fn port_stats(&self, port: PortId) -> Option<PortStats> {
        let c = &self.ports.get(&port)?.counters;
        Some(PortStats {
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            tx_packets: c.tx_packets,
            tx_bytes: c.tx_bytes,
            drops: c.drops.to_map(),
            // Only the I/O layer knows; it fills this in.
            attached: false,
        })
    }

    /// Counters per network, by VNI.
    pub fn network_stats(&self) -> Vec<(u32, String, NetStats)> {
        let mut v: Vec<(u32, String, NetStats)> = self
            .nets
            .iter()
            .map(|(vni, n)| (*vni, n.name.clone(), n.stats.clone()))
            .collect();
        v.sort_by_key(|(vni, ..)| *vni);
        v
    }

    /// Underlay packets dropped before a network was known: `malformed` (not VXLAN),
    /// `unknown_vni`.
    pub fn underlay_drops(&self) -> &Drops {
        &self.underlay_drops
    }

    /// Count frames the I/O layer had to drop (tap queue full etc.). A frame for a port counts
    /// there and in its network; the reason is usually one of [`DropReason`]'s names.
    pub fn count_drop(&mut self, port: PortId, reason: &'static str) {
        let Some(e) = self.ports.get_mut(&port) else {
            return;
        };
        e.counters.drops.add_named(reason);
        if let Some(n) = self.nets.get_mut(&e.info.vni) {
            n.stats.drops.add_named(reason);
        }
    }

    /// Prometheus text: per port and per network rx/tx packets/bytes and drops{reason}, ARP
    /// and DHCP replies, underlay drops, table sizes.
    pub fn render_metrics(&self, out: &mut String) {
        let mut ports: Vec<&PortEntry> = self.ports.values().collect();
        ports.sort_by_key(|e| e.info.id);
        let mut nets: Vec<(&u32, &Net)> = self.nets.iter().collect();
        nets.sort_by_key(|(vni, _)| **vni);

        for (i, (name, help)) in PORT_COUNTERS.iter().enumerate() {
            family(out, name, "counter", help);
            for e in &ports {
                let c = &e.counters;
                let v = [c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes][i];
                let (port, net) = (esc(&e.info.name), esc(&e.info.network));
                let _ = writeln!(out, "{name}{{port=\"{port}\",network=\"{net}\"}} {v}");
            }
        }
        let name = "vswitch_port_drops_total";
        family(
            out,
            name,
            "counter",
            "Frames of the port dropped, by reason.",
        );
        for e in &ports {
            let (port, net) = (esc(&e.info.name), esc(&e.info.network));
            for (reason, n) in e.counters.drops.iter() {
                let reason = esc(reason);
                let _ = writeln!(
                    out,
                    "{name}{{port=\"{port}\",network=\"{net}\",reason=\"{reason}\"}} {n}"
                );
            }
        }

        for (i, (name, help)) in NET_COUNTERS.iter().enumerate() {
            family(out, name, "counter", help);
            for (vni, n) in &nets {
                let s = &n.stats;
                let v = [
                    s.rx_packets,
                    s.rx_bytes,
                    s.tx_packets,
                    s.tx_bytes,
                    s.underlay_rx_packets,
                    s.underlay_rx_bytes,
                    s.underlay_tx_packets,
                    s.underlay_tx_bytes,
                    s.arp_replied,
                    s.dhcp_replied,
                    s.underlay_dhcp_ignored,
                ][i];
                let net = esc(&n.name);
                let _ = writeln!(out, "{name}{{network=\"{net}\",vni=\"{vni}\"}} {v}");
            }
        }
        let name = "vswitch_network_drops_total";
        family(
            out,
            name,
            "counter",
            "Frames of the network dropped, by reason.",
        );
        for (vni, n) in &nets {
            let net = esc(&n.name);
            for (reason, c) in n.stats.drops.iter() {
                let reason = esc(reason);
                let _ = writeln!(
                    out,
                    "{name}{{network=\"{net}\",vni=\"{vni}\",reason=\"{reason}\"}} {c}"
                );
            }
        }
        let name = "vswitch_underlay_drops_total";
        let help = "Underlay packets dropped before a network was known.";
        family(out, name, "counter", help);
        for reason in [DropReason::Malformed, DropReason::UnknownVni] {
            let (r, v) = (reason.as_str(), self.underlay_drops.get(reason.as_str()));
            let _ = writeln!(out, "{name}{{reason=\"{r}\"}} {v}");
        }
        let gauges = [
            ("vswitch_ports", "Local ports.", self.ports.len()),
            ("vswitch_networks", "Networks programmed.", self.nets.len()),
            (
                "vswitch_learned_macs",
                "Learned MAC entries.",
                self.learned_macs.len(),
            ),
            (
                "vswitch_learned_ips",
                "Learned IP entries.",
                self.learned_ips.len(),
            ),
        ];
        for (name, help, v) in gauges {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
    }

    /// Ages out learned entries (called about once a second).
    pub fn tick(&mut self, now_ms: u64) {
        self.learned_macs.retain(|_, l| l.fresh(now_ms));
        self.learned_ips.retain(|_, l| l.fresh(now_ms));
        for net in self.nets.values_mut() {
            let before = net.learned_vteps.len();
            net.learned_vteps
                .retain(|_, seen| now_ms.saturating_sub(*seen) <= LEARN_AGE_MS);
            if net.learned_vteps.len() != before {
                net.rebuild_flood();
            }
        }
    }
}

/// Per-port counter families, in `PortCounters` field order.
const PORT_COUNTERS: [(&str, &str); 4] = [
    (
        "vswitch_port_rx_packets_total",
        "Frames the port's interface sent into the switch.",
    ),
    (
        "vswitch_port_rx_bytes_total",
        "Bytes the port's interface sent into the switch.",
    ),
    (
        "vswitch_port_tx_packets_total",
        "Frames the switch delivered to the port.",
    ),
    (
        "vswitch_port_tx_bytes_total",
        "Bytes the switch delivered to the port.",
    ),
];

/// Per-network counter families, in `NetStats` field order.
const NET_COUNTERS: [(&str, &str); 11] = [
    (
        "vswitch_network_rx_packets_total",
        "Frames local ports sent into the network.",
    ),
    (
        "vswitch_network_rx_bytes_total",
        "Bytes local ports sent into the network.",
    ),
    (
        "vswitch_network_tx_packets_total",
        "Frames delivered to local ports.",
    ),
    (
        "vswitch_network_tx_bytes_total",
        "Bytes delivered to local ports.",
    ),
    (
        "vswitch_network_underlay_rx_packets_total",
        "VXLAN packets received.",
    ),
    (
        "vswitch_network_underlay_rx_bytes_total",
        "Inner bytes of VXLAN packets received.",
    ),
    (
        "vswitch_network_underlay_tx_packets_total",
        "VXLAN packets sent (one per VTEP).",
    ),
    (
        "vswitch_network_underlay_tx_bytes_total",
        "Inner bytes of VXLAN packets sent.",
    ),
    (
        "vswitch_arp_replied_total",
        "ARP requests answered by the switch itself.",
    ),
    (
        "vswitch_dhcp_replied_total",
        "DHCP replies sent by the switch.",
    ),
    (
        "vswitch_network_underlay_dhcp_ignored_total",
        "DHCP frames from the underlay, ignored.",
    ),
];

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    //! A deterministic in-memory network (smoltcp `netsim` style): several switches whose
    //! `ToVtep` actions are encapsulated and fed into the addressed switch's `from_underlay`.

    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        DhcpMessageType, DhcpPacket, DhcpRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
        UdpPacket, UdpRepr,
    };
    use volume_mgr::api::{Network, Port, Switch as SwitchRecord};

    const BLUE: u32 = 100;
    const RED: u32 = 200;
    const BCAST: [u8; 6] = [0xff; 6];

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn mac(s: &str) -> [u8; 6] {
        Mac::parse(s).unwrap().0
    }

    fn vtep(host: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, host), 4789)
    }

    fn network(name: &str, vni: u32, mtu: Option<u32>) -> Network {
        Network {
            name: name.into(),
            vni,
            subnet: "10.0.0.0/24".into(),
            mtu,
            gateway: Some("10.0.0.1".into()),
            dns: vec!["10.0.0.53".into()],
            created_ms: 1,
        }
    }

    fn port(name: &str, net: &str, node: &str, mac: &str, ip: &str) -> Port {
        Port {
            name: name.into(),
            network: net.into(),
            node: node.into(),
            kind: PortKind::Tap,
            mac: mac.into(),
            ip: ip.into(),
            netns: Some(format!("ns-{name}")),
            ifname: name.into(),
            created_ms: 10,
            vip: None,
            stats: None,
        }
    }

    fn switch(node: &str, host: u8, state: NodeState) -> SwitchRecord {
        SwitchRecord {
            node: node.into(),
            underlay_ip: format!("198.18.0.{host}"),
            vxlan_port: 4789,
            underlay_mtu: 1500,
            state,
            last_heartbeat_ms: 0,
            registered_ms: 0,
        }
    }

    /// Hosts a, b, c. Two networks on the same subnet 10.0.0.0/24: blue (VNI 100, MTU from the
    /// underlay: 1450) with ports on every host, red (VNI 200, MTU 1400) on a and b only, whose
    /// ports reuse blue's addresses.
    fn fixture() -> NetState {
        NetState {
            revision: 1,
            networks: vec![network("blue", BLUE, None), network("red", RED, Some(1400))],
            ports: vec![
                port("a1", "blue", "a", "02:00:00:00:01:01", "10.0.0.2"),
                port("a3", "blue", "a", "02:00:00:00:01:03", "10.0.0.5"),
                port("b1", "blue", "b", "02:00:00:00:01:02", "10.0.0.3"),
                port("c1", "blue", "c", "02:00:00:00:01:04", "10.0.0.4"),
                port("a2", "red", "a", "02:00:00:00:02:01", "10.0.0.2"),
                port("b2", "red", "b", "02:00:00:00:02:02", "10.0.0.3"),
            ],
            switches: vec![
                switch("a", 1, NodeState::Up),
                switch("b", 2, NodeState::Up),
                switch("c", 3, NodeState::Up),
            ],
        }
    }

    struct Host {
        node: &'static str,
        vtep: SocketAddrV4,
        sw: Switch,
    }

    /// What happened to one frame, network-wide.
    #[derive(Debug, Default)]
    struct Trace {
        /// (node, port, frame) deliveries.
        delivered: Vec<(String, String, Vec<u8>)>,
        /// (node, port, frame) frames the switch made.
        replies: Vec<(String, String, Vec<u8>)>,
        /// (from, to, vni) VXLAN packets on the underlay.
        wire: Vec<(SocketAddrV4, SocketAddrV4, u32)>,
    }

    impl Trace {
        fn ports(&self) -> Vec<String> {
            let mut v: Vec<String> = self
                .delivered
                .iter()
                .map(|(n, p, _)| format!("{n}/{p}"))
                .collect();
            v.sort();
            v
        }
        fn wire_to(&self) -> Vec<SocketAddrV4> {
            let mut v: Vec<SocketAddrV4> = self.wire.iter().map(|w| w.1).collect();
            v.sort();
            v
        }
    }

    struct Sim {
        hosts: Vec<Host>,
        now: u64,
    }

    impl Sim {
        fn new(state: &NetState) -> Sim {
            let hosts = [("a", 1), ("b", 2), ("c", 3)]
                .into_iter()
                .map(|(node, h)| {
                    let mut sw = Switch::new(node, 1500);
                    sw.apply(state);
                    Host {
                        node,
                        vtep: vtep(h),
                        sw,
                    }
                })
                .collect();
            Sim { hosts, now: 1_000 }
        }

        fn apply(&mut self, state: &NetState) {
            for h in &mut self.hosts {
                h.sw.apply(state);
            }
        }

        fn host(&mut self, node: &str) -> &mut Switch {
            &mut self.hosts.iter_mut().find(|h| h.node == node).unwrap().sw
        }

        fn port_name(sw: &Switch, id: PortId) -> String {
            sw.local_ports()
                .into_iter()
                .find(|p| p.id == id)
                .unwrap()
                .name
        }

        /// `frame` sent by local port `port` of `node`, followed through the network.
        fn send(&mut self, node: &str, port: &str, frame: &[u8], gso: bool) -> Trace {
            let mut trace = Trace::default();
            let now = self.now;
            let hi = self.hosts.iter().position(|h| h.node == node).unwrap();
            let id = self.hosts[hi].sw.port_id(port).expect("port");
            let mut out = Vec::new();
            self.hosts[hi].sw.from_port(id, frame, gso, now, &mut out);
            let from = self.hosts[hi].vtep;
            for a in out.clone() {
                match a {
                    Action::ToPort(p) => {
                        assert_ne!(p, id, "never back to the ingress port");
                        let name = Self::port_name(&self.hosts[hi].sw, p);
                        trace.delivered.push((node.into(), name, frame.to_vec()));
                    }
                    Action::Reply { port: p, frame: f } => {
                        assert_eq!(p, id, "replies go to the asking port");
                        trace.replies.push((node.into(), port.into(), f));
                    }
                    Action::ToVtep { vtep, vni } => {
                        trace.wire.push((from, vtep, vni));
                        let mut pkt = vxlan::encap_header(vni).to_vec();
                        pkt.extend_from_slice(frame);
                        let sport = vxlan::source_port(vxlan::flow_hash(frame), 32768, 60999);
                        let src = SocketAddrV4::new(*from.ip(), sport);
                        if let Some(h) = self.hosts.iter_mut().find(|h| h.vtep == vtep) {
                            let mut out2 = Vec::new();
                            h.sw.from_underlay(src, &pkt, now, &mut out2);
                            for a in out2 {
                                let Action::ToPort(p) = a else {
                                    panic!("from_underlay made {a:?}: split horizon");
                                };
                                let name = Self::port_name(&h.sw, p);
                                trace.delivered.push((h.node.into(), name, frame.to_vec()));
                            }
                        }
                    }
                }
            }
            trace
        }

        fn stats(&mut self, node: &str, port: &str) -> PortStats {
            let sw = self.host(node);
            let id = sw.port_id(port).unwrap();
            sw.port_stats(id).unwrap()
        }
    }

    fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + payload.len());
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp(op: ArpOperation, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
        let repr = ArpRepr::EthernetIpv4 {
            operation: op,
            source_hardware_addr: EthernetAddress(sha),
            source_protocol_addr: spa,
            target_hardware_addr: EthernetAddress(tha),
            target_protocol_addr: tpa,
        };
        let mut p = vec![0u8; repr.buffer_len()];
        repr.emit(&mut ArpPacket::new_unchecked(&mut p[..]));
        let dst = if op == ArpOperation::Request {
            BCAST
        } else {
            tha
        };
        eth(dst, sha, ETHERTYPE_ARP, &p)
    }

    fn arp_request(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        arp(ArpOperation::Request, sha, spa, [0; 6], tpa)
    }

    /// An IPv4/UDP frame with `payload_len` bytes of payload.
    fn udp(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ports: (u16, u16),
        payload_len: usize,
    ) -> Vec<u8> {
        let mut ipbuf = vec![0u8; 20 + 8 + payload_len];
        let caps = ChecksumCapabilities::default();
        let mut ipp = Ipv4Packet::new_unchecked(&mut ipbuf[..]);
        Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload_len,
            hop_limit: 64,
        }
        .emit(&mut ipp, &caps);
        UdpRepr {
            src_port: ports.0,
            dst_port: ports.1,
        }
        .emit(
            &mut UdpPacket::new_unchecked(ipp.payload_mut()),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            payload_len,
            |p| p.fill(0xab),
            &caps,
        );
        eth(dst_mac, src_mac, ETHERTYPE_IPV4, &ipbuf)
    }

    fn parse_arp_reply(frame: &[u8]) -> ([u8; 6], Ipv4Addr, [u8; 6], Ipv4Addr) {
        assert_eq!(ethertype(frame), ETHERTYPE_ARP);
        let pkt = ArpPacket::new_checked(&frame[14..]).unwrap();
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_hardware_addr,
            target_protocol_addr,
        } = ArpRepr::parse(&pkt).unwrap()
        else {
            unreachable!()
        };
        assert_eq!(operation, ArpOperation::Reply);
        assert_eq!(frame[6..12], source_hardware_addr.0, "Ethernet source");
        assert_eq!(frame[0..6], target_hardware_addr.0, "Ethernet destination");
        (
            source_hardware_addr.0,
            source_protocol_addr,
            target_hardware_addr.0,
            target_protocol_addr,
        )
    }

    fn a1() -> ([u8; 6], Ipv4Addr) {
        (mac("02:00:00:00:01:01"), ip("10.0.0.2"))
    }

    #[test]
    fn arp_for_a_known_ip_is_answered_locally() {
        let mut sim = Sim::new(&fixture());
        let (m, i) = a1();
        for (target, want_mac) in [
            ("10.0.0.3", mac("02:00:00:00:01:02")), // b1, remote
            ("10.0.0.5", mac("02:00:00:00:01:03")), // a3, local
            ("10.0.0.254", service_mac(BLUE)),      // the DHCP server address
        ] {
            let t = sim.send("a", "a1", &arp_request(m, i, ip(target)), false);
            assert!(t.wire.is_empty(), "{target}: nothing leaves the host");
            assert!(t.delivered.is_empty(), "{target}: no other port sees it");
            assert_eq!(t.replies.len(), 1);
            let (sha, spa, tha, tpa) = parse_arp_reply(&t.replies[0].2);
            assert_eq!((sha, spa, tha, tpa), (want_mac, ip(target), m, i));
        }
        // An ARP probe (sender 0.0.0.0) for a taken address is answered too (conflict).
        let t = sim.send(
            "a",
            "a1",
            &arp_request(m, ip("0.0.0.0"), ip("10.0.0.3")),
            false,
        );
        assert_eq!(t.replies.len(), 1);
        assert_eq!(parse_arp_reply(&t.replies[0].2).3, ip("0.0.0.0"));
        // A probe for its own address is not answered: it floods (nobody else has it).
        let t = sim.send("a", "a1", &arp_request(m, ip("0.0.0.0"), i), false);
        assert!(t.replies.is_empty());
        assert_eq!(t.ports(), ["a/a3", "b/b1", "c/c1"]);

        let stats = sim.host("a").network_stats();
        assert_eq!(stats[0].0, BLUE);
        assert_eq!(stats[0].2.arp_replied, 4);
        assert_eq!(stats[1].2.arp_replied, 0);
        let s = sim.stats("a", "a1");
        assert_eq!((s.rx_packets, s.tx_packets), (5, 4));
        let mut text = String::new();
        sim.host("a").render_metrics(&mut text);
        assert!(text.contains("vswitch_arp_replied_total{network=\"blue\",vni=\"100\"} 4\n"));
        assert!(text.contains("vswitch_arp_replied_total{network=\"red\",vni=\"200\"} 0\n"));
    }

    #[test]
    fn unknown_ip_floods_to_exactly_the_vteps_with_ports_in_the_vni() {
        let mut sim = Sim::new(&fixture());
        let (m, i) = a1();
        let t = sim.send("a", "a1", &arp_request(m, i, ip("10.0.0.77")), false);
        assert!(t.replies.is_empty());
        assert_eq!(t.wire_to(), [vtep(2), vtep(3)]);
        assert!(t.wire.iter().all(|w| w.0 == vtep(1) && w.2 == BLUE));
        assert_eq!(t.ports(), ["a/a3", "b/b1", "c/c1"]);
        assert_eq!(sim.host("a").flood_list(BLUE), [vtep(2), vtep(3)]);

        // Red has no port on c: c gets nothing.
        let t = sim.send(
            "a",
            "a2",
            &arp_request(mac("02:00:00:00:02:01"), ip("10.0.0.2"), ip("10.0.0.77")),
            false,
        );
        assert_eq!(t.wire_to(), [vtep(2)]);
        assert_eq!(t.ports(), ["b/b2"]);

        // A switch recorded down leaves the flood list.
        let mut state = fixture();
        state.switches[2].state = NodeState::Down;
        sim.apply(&state);
        let t = sim.send("a", "a1", &arp_request(m, i, ip("10.0.0.77")), false);
        assert_eq!(t.wire_to(), [vtep(2)]);
        assert_eq!(t.ports(), ["a/a3", "b/b1"]);
    }

    #[test]
    fn unicast_goes_to_one_vtep_or_one_port() {
        let mut sim = Sim::new(&fixture());
        let (m, i) = a1();
        let b1 = mac("02:00:00:00:01:02");
        let f = udp(m, b1, i, ip("10.0.0.3"), (5000, 6000), 100);
        let t = sim.send("a", "a1", &f, false);
        assert_eq!(t.wire, [(vtep(1), vtep(2), BLUE)]);
        assert_eq!(t.delivered, [("b".into(), "b1".into(), f.clone())]);
        // And back.
        let back = udp(b1, m, ip("10.0.0.3"), i, (6000, 5000), 10);
        let t = sim.send("b", "b1", &back, false);
        assert_eq!(t.wire, [(vtep(2), vtep(1), BLUE)]);
        assert_eq!(t.ports(), ["a/a1"]);
        // Local unicast stays local.
        let a3 = mac("02:00:00:00:01:03");
        let t = sim.send("a", "a1", &udp(m, a3, i, ip("10.0.0.5"), (1, 2), 0), false);
        assert!(t.wire.is_empty());
        assert_eq!(t.ports(), ["a/a3"]);
        // To itself: dropped, never back to the ingress port.
        let t = sim.send("a", "a1", &udp(m, m, i, i, (1, 2), 0), false);
        assert!(t.delivered.is_empty() && t.wire.is_empty());
        assert_eq!(sim.stats("a", "a1").drops.get("no_destination"), Some(&1));

        let s = sim.stats("b", "b1");
        assert_eq!((s.tx_packets, s.tx_bytes), (1, f.len() as u64));
        assert_eq!((s.rx_packets, s.rx_bytes), (1, back.len() as u64));
        let s = sim.stats("a", "a1");
        assert_eq!((s.rx_packets, s.tx_packets), (3, 1));
        let net = &sim.host("a").network_stats()[0].2;
        assert_eq!(net.underlay_tx_packets, 1);
        assert_eq!(net.underlay_rx_packets, 1);
        assert_eq!(net.tx_packets, 2);
    }

    #[test]
    fn overlapping_subnets_in_two_vnis_never_cross() {
        let mut sim = Sim::new(&fixture());
        let (m, i) = a1();
        let (m2, i2) = (mac("02:00:00:00:02:01"), ip("10.0.0.2"));
        assert_eq!(i, i2, "the same address in both networks");
        // The same question gets each network's own answer.
        let t = sim.send("a", "a1", &arp_request(m, i, ip("10.0.0.3")), false);
        assert_eq!(parse_arp_reply(&t.replies[0].2).0, mac("02:00:00:00:01:02"));
        let t = sim.send("a", "a2", &arp_request(m2, i2, ip("10.0.0.3")), false);
        assert_eq!(parse_arp_reply(&t.replies[0].2).0, mac("02:00:00:00:02:02"));
        // Unicast from blue to red's MAC is unknown in blue: flooded in blue only, and the
        // remote switches, which know it for no local blue port, drop it.
        let b2 = mac("02:00:00:00:02:02");
        let t = sim.send("a", "a1", &udp(m, b2, i, ip("10.0.0.3"), (1, 2), 8), false);
        assert_eq!(t.ports(), ["a/a3"]);
        assert_eq!(t.wire_to(), [vtep(2), vtep(3)]);
        assert!(t.wire.iter().all(|w| w.2 == BLUE));
        assert_eq!(sim.stats("b", "b2").tx_packets, 0);
        let b = &sim.host("b").network_stats()[0].2;
        assert_eq!(b.drops.get("no_destination"), 1);
        // Broadcast from red reaches red only.
        let t = sim.send(
            "a",
            "a2",
            &udp(m2, BCAST, i2, ip("10.0.0.255"), (1, 2), 8),
            false,
        );
        assert_eq!(t.ports(), ["b/b2"]);
        assert!(t.wire.iter().all(|w| w.2 == RED));
        // A VXLAN packet of blue addressed to red's MAC is not delivered to red.
        let a2 = mac("02:00:00:00:02:01");
        let mut pkt = vxlan::encap_header(BLUE).to_vec();
        pkt.extend_from_slice(&udp(
            mac("02:00:00:00:01:02"),
            a2,
            ip("10.0.0.3"),
            i,
            (1, 2),
            8,
        ));
        let mut out = vec![Action::ToPort(99)];
        let sw = sim.host("a");
        sw.from_underlay(vtep(2), &pkt, 1_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(sw.network_stats()[0].2.drops.get("no_destination"), 1);
    }

    #[test]
    fn spoofed_and_malformed_frames_are_dropped_and_counted() {
        let mut sim = Sim::new(&fixture());
        let (m, i) = a1();
        let a3 = mac("02:00:00:00:01:03");
        let b1 = mac("02:00:00:00:01:02");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            // Another port's MAC.
            (
                udp(a3, b1, ip("10.0.0.5"), ip("10.0.0.3"), (1, 2), 8),
                "spoofed_mac",
            ),
            // Own MAC, another IP.
            (
                udp(m, b1, ip("10.0.0.9"), ip("10.0.0.3"), (1, 2), 8),
                "spoofed_ip",
            ),
            // 0.0.0.0 is only for DHCP.
            (
                udp(m, BCAST, ip("0.0.0.0"), ip("255.255.255.255"), (68, 53), 8),
                "spoofed_ip",
            ),
            // ARP: sender IP, sender MAC.
            (arp_request(m, ip("10.0.0.9"), ip("10.0.0.3")), "spoofed_ip"),
            (
                {
                    let mut f = arp_request(a3, i, ip("10.0.0.3"));
                    f[6..12].copy_from_slice(&m);
                    f
                },
                "spoofed_mac",
            ),
            // IPv6 from another MAC.
            (eth(b1, a3, 0x86dd, &[0x60; 40]), "spoofed_mac"),
            // Malformed: short Ethernet, truncated IPv4, truncated ARP, bad IHL, not IPv4.
            (vec![0xff; 10], "malformed"),
            (eth(b1, m, ETHERTYPE_IPV4, &[0x45, 0, 0, 20]), "malformed"),
            (
                arp_request(m, i, ip("10.0.0.3"))[..30].to_vec(),
                "malformed",
            ),
            (eth(b1, m, ETHERTYPE_IPV4, &[0x4f; 40]), "malformed"),
            (eth(b1, m, ETHERTYPE_IPV4, &[0x65; 40]), "malformed"),
        ];
        for (n, (frame, reason)) in cases.iter().enumerate() {
            let before = sim
                .stats("a", "a1")
                .drops
                .get(*reason)
                .copied()
                .unwrap_or(0);
            let t = sim.send("a", "a1", frame, false);
            assert!(
                t.delivered.is_empty() && t.wire.is_empty() && t.replies.is_empty(),
                "case {n} ({reason}) went somewhere: {t:?}"
            );
            let after = sim.stats("a", "a1").drops[*reason];
            assert_eq!(after, before + 1, "case {n} counted as {reason}");
        }
        let s = sim.stats("a", "a1");
        assert_eq!(s.rx_packets, cases.len() as u64);
        assert_eq!(s.drops.values().sum::<u64>(), cases.len() as u64);
        let net = &sim.host("a").network_stats()[0].2;
        assert_eq!(net.drops.get("spoofed_ip"), 3);
        assert_eq!(net.drops.total(), cases.len() as u64);
        let mut text = String::new();
        sim.host("a").render_metrics(&mut text);
        assert!(text.contains(
            "vswitch_port_drops_total{port=\"a1\",network=\"blue\",reason=\"spoofed_mac\"} 3\n"
        ));

        // What is allowed: own MAC/IP, gratuitous ARP, ARP probes, IPv6 with the own MAC.
        let ok: Vec<Vec<u8>> = vec![
            udp(m, b1, i, ip("10.0.0.3"), (1, 2), 8),
            arp(ArpOperation::Reply, m, i, b1, ip("10.0.0.3")),
            arp_request(m, i, i),
            arp_request(m, ip("0.0.0.0"), ip("10.0.0.66")),
            eth(b1, m, 0x86dd, &[0x60; 40]),
        ];
        for f in ok {
            let t = sim.send("a", "a1", &f, false);
            assert!(!t.delivered.is_empty(), "{f:?} was dropped");
        }
        assert_eq!(
            sim.stats("a", "a1").drops.values().sum::<u64>(),
            cases.len() as u64
        );
    }

    #[test]
    fn oversize_frames_are_dropped_both_ways() {
        let mut sim = Sim::new(&fixture());
        let (m, i) = a1();
        let b1 = mac("02:00:00:00:01:02");
        assert_eq!(sim.host("a").network_mtu(BLUE), Some(1450));
        assert_eq!(sim.host("a").network_mtu(RED), Some(1400));
        assert_eq!(sim.host("a").network_mtu(7), None);
        // 1450 bytes of IP: 20 + 8 + 1422.
        let fits = udp(m, b1, i, ip("10.0.0.3"), (1, 2), 1422);
        assert_eq!(fits.len(), 1464);
        assert_eq!(sim.send("a", "a1", &fits, false).ports(), ["b/b1"]);
        let big = udp(m, b1, i, ip("10.0.0.3"), (1, 2), 1423);
        let t = sim.send("a", "a1", &big, false);
        assert!(t.delivered.is_empty() && t.wire.is_empty());
        assert_eq!(sim.stats("a", "a1").drops["oversize"], 1);
        // Ports are access ports: a VLAN-tagged frame (whose inner IPv4 source the port
        // security checks would not see) is refused whatever its size.
        let tagged = eth(b1, m, ETHERTYPE_VLAN, &[0u8; 100]);
        assert!(sim.send("a", "a1", &tagged, false).delivered.is_empty());
        assert_eq!(sim.stats("a", "a1").drops["vlan_tagged"], 1);
        let qinq = eth(b1, m, ETHERTYPE_QINQ, &[0u8; 100]);
        assert!(sim.send("a", "a1", &qinq, false).delivered.is_empty());
        assert_eq!(sim.stats("a", "a1").drops["vlan_tagged"], 2);
        assert_eq!(sim.stats("a", "a1").drops["oversize"], 1);
        // GSO frames may be longer: the I/O layer segments them.
        let gso = udp(m, b1, i, ip("10.0.0.3"), (1, 2), 60_000);
        let t = sim.send("a", "a1", &gso, true);
        assert_eq!(t.wire, [(vtep(1), vtep(2), BLUE)]);
        // Red's MTU is its own.
        let red_big = udp(
            mac("02:00:00:00:02:01"),
            mac("02:00:00:00:02:02"),
            i,
            ip("10.0.0.3"),
            (1, 2),
            1373,
        );
        assert!(sim.send("a", "a2", &red_big, false).delivered.is_empty());
        // From the underlay.
        let mut pkt = vxlan::encap_header(BLUE).to_vec();
        pkt.extend_from_slice(&udp(b1, m, ip("10.0.0.3"), i, (1, 2), 1423));
        let mut out = Vec::new();
        let sw = sim.host("a");
        sw.from_underlay(vtep(2), &pkt, 1_000, &mut out);
        assert!(out.is_empty());
        // One from the port, one from the underlay.
        assert_eq!(sw.network_stats()[0].2.drops.get("oversize"), 2);
    }

    #[test]
    fn learning_from_a_foreign_vtep_and_aging() {
        // A Linux kernel VXLAN device at 198.18.0.9 (no registered switch) on VNI 100, sending
        // from an ephemeral source port.
        let mut sim = Sim::new(&fixture());
        let kernel_src = SocketAddrV4::new(ip("198.18.0.9"), 41234);
        let kernel_vtep = SocketAddrV4::new(ip("198.18.0.9"), 4789);
        let k_mac = mac("02:99:00:00:00:01");
        let k_ip = ip("10.0.0.99");
        let (m, i) = a1();
        let mut out = Vec::new();
        let encap = |vni: u32, f: &[u8]| {
            let mut p = vxlan::encap_header(vni).to_vec();
            p.extend_from_slice(f);
            p
        };
        let t0 = 10_000;
        let a = sim.host("a");
        a.from_underlay(
            kernel_src,
            &encap(BLUE, &arp_request(k_mac, k_ip, i)),
            t0,
            &mut out,
        );
        let a1_id = a.port_id("a1").unwrap();
        let a3_id = a.port_id("a3").unwrap();
        assert_eq!(out, [Action::ToPort(a1_id), Action::ToPort(a3_id)]);
        assert_eq!(a.flood_list(BLUE), [vtep(2), vtep(3), kernel_vtep]);
        assert_eq!(a.flood_list(RED), [vtep(2)], "learned per VNI");
        assert_eq!(a.learned_macs(), 1);

        // Unicast to the learned MAC goes to the kernel's VTEP at port 4789, once.
        sim.now = t0 + 1_000;
        let f = udp(m, k_mac, i, k_ip, (1, 2), 8);
        let t = sim.send("a", "a1", &f, false);
        assert_eq!(t.wire, [(vtep(1), kernel_vtep, BLUE)]);
        // ARP for the learned IP is answered locally.
        let t = sim.send("a", "a1", &arp_request(m, i, k_ip), false);
        assert_eq!(parse_arp_reply(&t.replies[0].2).0, k_mac);
        assert!(t.wire.is_empty());
        // Learning never overrides static entries: the kernel claims a1's and b1's MACs.
        let b1 = mac("02:00:00:00:01:02");
        let a = sim.host("a");
        a.from_underlay(
            kernel_src,
            &encap(BLUE, &udp(m, BCAST, i, i, (1, 2), 0)),
            t0,
            &mut out,
        );
        a.from_underlay(
            kernel_src,
            &encap(BLUE, &udp(b1, BCAST, i, i, (1, 2), 0)),
            t0,
            &mut out,
        );
        let a3 = mac("02:00:00:00:01:03");
        let t = sim.send("a", "a3", &udp(a3, m, ip("10.0.0.5"), i, (1, 2), 0), false);
        assert_eq!(t.ports(), ["a/a1"]);
        assert!(t.wire.is_empty());
        let t = sim.send(
            "a",
            "a3",
            &udp(a3, b1, ip("10.0.0.5"), ip("10.0.0.3"), (1, 2), 0),
            false,
        );
        assert_eq!(t.wire, [(vtep(1), vtep(2), BLUE)]);
        assert_eq!(sim.host("a").learned_macs(), 1);

        // Traffic refreshes entries; 300 s of silence ages them out.
        sim.now = t0 + 200_000;
        let a = sim.host("a");
        a.from_underlay(
            kernel_src,
            &encap(BLUE, &udp(k_mac, m, k_ip, i, (1, 2), 0)),
            t0 + 200_000,
            &mut out,
        );
        assert_eq!(out, [Action::ToPort(a1_id)]);
        a.tick(t0 + 400_000);
        assert_eq!(a.learned_macs(), 1, "refreshed at +200 s");
        // The learned IP was not refreshed (no ARP since t0): it is gone.
        sim.now = t0 + 400_000;
        let t = sim.send("a", "a1", &arp_request(m, i, k_ip), false);
        assert!(t.replies.is_empty());
        assert_eq!(t.wire_to(), [vtep(2), vtep(3), kernel_vtep]);
        sim.host("a").tick(t0 + 500_001);
        assert_eq!(sim.host("a").learned_macs(), 0);
        assert_eq!(sim.host("a").flood_list(BLUE), [vtep(2), vtep(3)]);
        // Unknown unicast again: flooded to the registered VTEPs only.
        sim.now = t0 + 500_001;
        let t = sim.send("a", "a1", &f, false);
        assert_eq!(t.wire_to(), [vtep(2), vtep(3)]);
    }

    #[test]
    fn underlay_edge_cases() {
        let mut sim = Sim::new(&fixture());
        let (m, i) = a1();
        let b1 = mac("02:00:00:00:01:02");
        let encap = |vni: u32, f: &[u8]| {
            let mut p = vxlan::encap_header(vni).to_vec();
            p.extend_from_slice(f);
            p
        };
        let sw = sim.host("a");
        let mut out = vec![Action::ToPort(1)];
        // Unknown VNI, not VXLAN.
        sw.from_underlay(
            vtep(2),
            &encap(4242, &udp(b1, m, i, i, (1, 2), 0)),
            0,
            &mut out,
        );
        assert!(out.is_empty());
        sw.from_underlay(vtep(2), &[0u8; 30], 0, &mut out);
        assert_eq!(sw.underlay_drops().get("unknown_vni"), 1);
        assert_eq!(sw.underlay_drops().get("malformed"), 1);
        // DHCP over the underlay is ignored, both directions.
        let dhcp_c = udp(
            b1,
            BCAST,
            ip("0.0.0.0"),
            ip("255.255.255.255"),
            (68, 67),
            300,
        );
        let dhcp_s = udp(
            b1,
            BCAST,
            ip("10.0.0.254"),
            ip("255.255.255.255"),
            (67, 68),
            300,
        );
        sw.from_underlay(vtep(2), &encap(BLUE, &dhcp_c), 0, &mut out);
        assert!(out.is_empty());
        sw.from_underlay(vtep(2), &encap(BLUE, &dhcp_s), 0, &mut out);
        assert!(out.is_empty());
        assert_eq!(sw.network_stats()[0].2.underlay_dhcp_ignored, 2);
        // Unicast to a remote MAC or an unknown one: never back to the underlay.
        let c1 = mac("02:00:00:00:01:04");
        sw.from_underlay(
            vtep(2),
            &encap(BLUE, &udp(b1, c1, i, i, (1, 2), 0)),
            0,
            &mut out,
        );
        assert!(out.is_empty());
        sw.from_underlay(
            vtep(2),
            &encap(BLUE, &udp(b1, [2, 7, 7, 7, 7, 7], i, i, (1, 2), 0)),
            0,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(sw.network_stats()[0].2.drops.get("no_destination"), 2);
        // Multicast source MAC: malformed.
        sw.from_underlay(
            vtep(2),
            &encap(BLUE, &udp(BCAST, m, i, i, (1, 2), 0)),
            0,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(sw.network_stats()[0].2.drops.get("malformed"), 1);
        // Broadcast to a network with no local port: dropped as no_destination.
        let mut state = fixture();
        state.ports.retain(|p| p.network != "red" || p.node != "a");
        sw.apply(&state);
        let b2 = mac("02:00:00:00:02:02");
        sw.from_underlay(
            vtep(2),
            &encap(RED, &udp(b2, BCAST, i, i, (1, 2), 0)),
            0,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(sw.network_stats()[1].2.drops.get("no_destination"), 1);
    }

    #[test]
    fn port_ids_are_stable_and_removed_ports_stop_receiving() {
        let mut state = fixture();
        let mut sim = Sim::new(&state);
        let a = sim.host("a");
        let ids: Vec<(String, PortId)> = a
            .local_ports()
            .into_iter()
            .map(|p| (p.name, p.id))
            .collect();
        assert_eq!(
            ids.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a1", "a3", "a2"]
        );
        let lp = &a.local_ports()[0];
        assert_eq!(lp.mac, mac("02:00:00:00:01:01"));
        assert_eq!(
            (lp.ip, lp.prefix, lp.mtu, lp.vni),
            (ip("10.0.0.2"), 24, 1450, BLUE)
        );
        assert_eq!(lp.netns.as_deref(), Some("ns-a1"));
        assert_eq!(lp.gateway, Some(ip("10.0.0.1")));
        // Counters survive re-application.
        let (m, i) = a1();
        sim.send("a", "a1", &arp_request(m, i, ip("10.0.0.3")), false);
        sim.apply(&state);
        sim.apply(&state);
        let a = sim.host("a");
        let again: Vec<(String, PortId)> = a
            .local_ports()
            .into_iter()
            .map(|p| (p.name, p.id))
            .collect();
        assert_eq!(ids, again);
        assert_eq!(sim.stats("a", "a1").rx_packets, 1);

        // a3 removed: it stops receiving, its id is gone, its counters too.
        let a3_id = sim.host("a").port_id("a3").unwrap();
        state.ports.retain(|p| p.name != "a3");
        state
            .ports
            .push(port("a4", "blue", "a", "02:00:00:00:01:05", "10.0.0.6"));
        sim.apply(&state);
        let a = sim.host("a");
        assert_eq!(a.port_id("a3"), None);
        assert!(a.port_stats(a3_id).is_none());
        let a4 = a.port_id("a4").unwrap();
        assert!(a4 > a3_id, "ids are never reused");
        assert_eq!(a.port_id("a1"), Some(ids[0].1));
        let t = sim.send("a", "a1", &arp_request(m, i, ip("10.0.0.77")), false);
        assert_eq!(t.ports(), ["a/a4", "b/b1", "c/c1"]);
        // Unicast to the removed port's MAC is unknown now: flooded, not delivered to it.
        let t = sim.send(
            "a",
            "a1",
            &udp(m, mac("02:00:00:00:01:03"), i, ip("10.0.0.5"), (1, 2), 0),
            false,
        );
        assert_eq!(t.ports(), ["a/a4"]);
        assert_eq!(t.wire_to(), [vtep(2), vtep(3)]);
        // ARP for its address is no longer answered.
        assert!(sim
            .send("a", "a1", &arp_request(m, i, ip("10.0.0.5")), false)
            .replies
            .is_empty());
        // Frames from the old id are ignored.
        let mut out = vec![Action::ToPort(1)];
        sim.host("a").from_port(
            a3_id,
            &arp_request(m, i, ip("10.0.0.3")),
            false,
            0,
            &mut out,
        );
        assert!(out.is_empty());

        // Deleted and created again under the same name (new created_ms): a new id.
        let mut p = port("a4", "blue", "a", "02:00:00:00:01:05", "10.0.0.6");
        p.created_ms = 99;
        state.ports.retain(|p| p.name != "a4");
        state.ports.push(p);
        sim.apply(&state);
        assert!(sim.host("a").port_id("a4").unwrap() > a4);

        // A network removed takes its ports and counters with it.
        state.networks.retain(|n| n.name != "red");
        state.ports.retain(|p| p.network != "red");
        sim.apply(&state);
        let a = sim.host("a");
        assert_eq!(a.network_mtu(RED), None);
        assert_eq!(a.network_stats().len(), 1);
        assert_eq!(a.port_id("a2"), None);
    }

    fn dhcp_discover(client: [u8; 6]) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type: DhcpMessageType::Discover,
            transaction_id: 7,
            secs: 0,
            client_hardware_address: EthernetAddress(client),
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: None,
            client_identifier: Some(EthernetAddress(client)),
            server_identifier: None,
            parameter_request_list: Some(&[1, 3, 6, 26]),
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let n = repr.buffer_len();
        let mut f = udp(
            client,
            BCAST,
            ip("0.0.0.0"),
            ip("255.255.255.255"),
            (68, 67),
            n,
        );
        repr.emit(&mut DhcpPacket::new_unchecked(&mut f[42..]))
            .unwrap();
        f
    }

    #[test]
    fn dhcp_is_answered_by_the_switch_and_never_forwarded() {
        let mut sim = Sim::new(&fixture());
        let (m, _) = a1();
        let t = sim.send("a", "a1", &dhcp_discover(m), false);
        assert!(t.wire.is_empty() && t.delivered.is_empty());
        assert_eq!(t.replies.len(), 1);
        let f = &t.replies[0].2;
        assert_eq!(f[0..6], m);
        assert_eq!(f[6..12], service_mac(BLUE));
        let ipp = Ipv4Packet::new_checked(&f[14..]).unwrap();
        let dhcp =
            DhcpPacket::new_checked(UdpPacket::new_checked(ipp.payload()).unwrap().payload())
                .unwrap();
        let repr = DhcpRepr::parse(&dhcp).unwrap();
        assert_eq!(repr.message_type, DhcpMessageType::Offer);
        assert_eq!(repr.your_ip, ip("10.0.0.2"));
        assert_eq!(repr.server_identifier, Some(ip("10.0.0.254")));
        assert_eq!(repr.router, Some(ip("10.0.0.1")));
        let mtu: Vec<u8> = dhcp.options().find(|o| o.kind == 26).unwrap().data.to_vec();
        assert_eq!(mtu, 1450u16.to_be_bytes());
        // Red: the same address, its own MTU, its own server MAC.
        let t = sim.send("a", "a2", &dhcp_discover(mac("02:00:00:00:02:01")), false);
        let f = &t.replies[0].2;
        assert_eq!(f[6..12], service_mac(RED));
        let ipp = Ipv4Packet::new_checked(&f[14..]).unwrap();
        let dhcp =
            DhcpPacket::new_checked(UdpPacket::new_checked(ipp.payload()).unwrap().payload())
                .unwrap();
        let mtu: Vec<u8> = dhcp.options().find(|o| o.kind == 26).unwrap().data.to_vec();
        assert_eq!(mtu, 1400u16.to_be_bytes());
        // A broken DHCP frame is malformed and goes nowhere.
        let mut bad = dhcp_discover(m);
        bad.truncate(60);
        let ipl = (bad.len() - 14) as u16;
        bad[16..18].copy_from_slice(&ipl.to_be_bytes());
        let t = sim.send("a", "a1", &bad, false);
        assert!(t.wire.is_empty() && t.delivered.is_empty() && t.replies.is_empty());
        assert_eq!(sim.stats("a", "a1").drops["malformed"], 1);
        assert_eq!(sim.host("a").network_stats()[0].2.dhcp_replied, 1);
        // Traffic to the service MAC that is not DHCP goes nowhere.
        let t = sim.send(
            "a",
            "a1",
            &udp(
                m,
                service_mac(BLUE),
                ip("10.0.0.2"),
                ip("10.0.0.254"),
                (1, 2),
                0,
            ),
            false,
        );
        assert!(t.wire.is_empty() && t.delivered.is_empty());
    }

    #[test]
    fn io_layer_drops_and_metrics() {
        let mut sim = Sim::new(&fixture());
        let a = sim.host("a");
        let id = a.port_id("a1").unwrap();
        a.count_drop(id, "queue_full");
        a.count_drop(id, "queue_full");
        a.count_drop(id, "tap_gone");
        a.count_drop(9999, "queue_full");
        let s = a.port_stats(id).unwrap();
        assert_eq!(s.drops["queue_full"], 2);
        assert_eq!(s.drops["tap_gone"], 1);
        assert_eq!(s.drops.len(), 2, "only non-zero reasons: {:?}", s.drops);
        assert!(!s.attached);
        let mut text = String::new();
        a.render_metrics(&mut text);
        for line in [
            "vswitch_port_drops_total{port=\"a1\",network=\"blue\",reason=\"queue_full\"} 2",
            "vswitch_port_drops_total{port=\"a1\",network=\"blue\",reason=\"tap_gone\"} 1",
            "vswitch_network_drops_total{network=\"blue\",vni=\"100\",reason=\"queue_full\"} 2",
            "vswitch_port_rx_packets_total{port=\"a2\",network=\"red\"} 0",
            "vswitch_network_tx_bytes_total{network=\"red\",vni=\"200\"} 0",
            "vswitch_underlay_drops_total{reason=\"unknown_vni\"} 0",
            "# TYPE vswitch_port_tx_bytes_total counter",
            "vswitch_ports 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is `name{labels} value` or `name value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            v.parse::<u64>().unwrap();
        }
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn random_input_never_panics() {
        let state = fixture();
        let mut sw = Switch::new("a", 1500);
        sw.apply(&state);
        let ids: Vec<PortId> = sw.local_ports().iter().map(|p| p.id).collect();
        let (m, i) = a1();
        let seeds = [
            arp_request(m, i, ip("10.0.0.3")),
            udp(m, BCAST, i, ip("10.0.0.255"), (68, 67), 40),
            dhcp_discover(m),
            eth(BCAST, m, ETHERTYPE_VLAN, &[0; 60]),
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out = Vec::new();
        for round in 0..3000 {
            let mut f = seeds[round % seeds.len()].clone();
            for _ in 0..(1 + round % 8) {
                let r = next();
                let at = (r as usize) % f.len();
                f[at] = (r >> 40) as u8;
            }
            let cut = (next() as usize) % (f.len() + 1);
            let port = ids[round % ids.len()];
            sw.from_port(port, &f[..cut], round % 2 == 0, round as u64, &mut out);
            sw.from_port(port, &f, false, round as u64, &mut out);
            let mut pkt = vxlan::encap_header(if round % 3 == 0 { BLUE } else { RED }).to_vec();
            pkt.extend_from_slice(&f[..cut]);
            let src = SocketAddrV4::new(Ipv4Addr::from(next() as u32), next() as u16);
            sw.from_underlay(src, &pkt, round as u64, &mut out);
            assert!(out.iter().all(|a| matches!(a, Action::ToPort(_))));
        }
        sw.tick(u64::MAX);
        sw.tick(0);
        let mut text = String::new();
        sw.render_metrics(&mut text);
    }
}
