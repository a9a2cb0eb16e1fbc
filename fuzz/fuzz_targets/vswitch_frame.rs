//! vswitch frames: arbitrary bytes through VXLAN decapsulation, the switch's port and underlay
//! paths (port security, ARP responder, DHCP server, learning) and the DHCP server alone never
//! panic; the underlay path never sends back to the underlay (split horizon), and the switch
//! replies only to the port that asked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddrV4};
use volume_mgr::api::{NetState, Network, NodeState, Port, PortKind, Switch as SwitchRecord};
use vswitch::switch::{Action, Switch};
use vswitch::{dhcp, vxlan};

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
        netns: None,
        ifname: name.into(),
        created_ms: 1,
        stats: None,
    }
}

fn switch(node: &str, ip: &str) -> SwitchRecord {
    SwitchRecord {
        node: node.into(),
        underlay_ip: ip.into(),
        vxlan_port: 4789,
        underlay_mtu: 1500,
        state: NodeState::Up,
        last_heartbeat_ms: 0,
        registered_ms: 0,
    }
}

/// Host "a" with two local ports in VNI 100 and one in VNI 200 (overlapping subnets), and
/// remote ports on "b".
fn fixed_switch() -> Switch {
    let state = NetState {
        revision: 1,
        networks: vec![network("blue", 100, None), network("red", 200, Some(1400))],
        ports: vec![
            port("a1", "blue", "a", "02:00:00:00:01:01", "10.0.0.2"),
            port("a3", "blue", "a", "02:00:00:00:01:03", "10.0.0.5"),
            port("b1", "blue", "b", "02:00:00:00:01:02", "10.0.0.3"),
            port("a2", "red", "a", "02:00:00:00:02:01", "10.0.0.2"),
            port("b2", "red", "b", "02:00:00:00:02:02", "10.0.0.3"),
        ],
        switches: vec![switch("a", "198.18.0.1"), switch("b", "198.18.0.2")],
    };
    let mut sw = Switch::new("a", 1500);
    sw.apply(&state);
    sw
}

fuzz_target!(|data: &[u8]| {
    let _ = vxlan::decap(data);
    let _ = vxlan::flow_hash(data);

    let dns = [Ipv4Addr::new(10, 0, 0, 53)];
    let lease = dhcp::Lease {
        client_mac: [2, 0, 0, 0, 1, 1],
        client_ip: Ipv4Addr::new(10, 0, 0, 2),
        prefix: 24,
        mtu: 1450,
        gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
        dns: &dns,
        server_ip: Ipv4Addr::new(10, 0, 0, 254),
        server_mac: vswitch::switch::service_mac(100),
        lease_secs: dhcp::LEASE_SECS,
    };
    let _ = dhcp::handle(&lease, data);

    let mut sw = fixed_switch();
    let mut out = Vec::new();
    let gso = data.first().is_some_and(|b| b & 1 == 1);
    for p in sw.local_ports() {
        sw.from_port(p.id, data, gso, 1, &mut out);
        for a in &out {
            match a {
                Action::ToPort(to) => assert_ne!(*to, p.id, "back to the ingress port"),
                Action::Reply { port, .. } => assert_eq!(*port, p.id, "reply to another port"),
                Action::ToVtep { vni, .. } => assert_eq!(*vni, p.vni, "crossed VNIs"),
            }
        }
    }
    // As raw VXLAN from a registered and from a foreign VTEP, and encapsulated for each VNI.
    let peers = [
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000),
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 50000),
    ];
    for (i, src) in peers.into_iter().enumerate() {
        sw.from_underlay(src, data, 2, &mut out);
        assert!(out.iter().all(|a| matches!(a, Action::ToPort(_))));
        for vni in [100, 200, 300] {
            let mut pkt = vxlan::encap_header(vni).to_vec();
            pkt.extend_from_slice(data);
            sw.from_underlay(src, &pkt, 3 + i as u64, &mut out);
            assert!(out.iter().all(|a| matches!(a, Action::ToPort(_))));
        }
    }
    // Whatever was learned can be used and aged.
    for p in sw.local_ports() {
        sw.from_port(p.id, data, gso, 4, &mut out);
    }
    sw.tick(1_000_000);
    let mut text = String::new();
    sw.render_metrics(&mut text);
});
