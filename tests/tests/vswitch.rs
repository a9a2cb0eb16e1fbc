//! vswitch end to end (issue 4, "How it is tested"): volume-mgr in namespace host h0, the real
//! `vswitch` binary in h1.., networks and ports made with the real `fabctl`, "VMs" as network
//! namespaces on `tap` ports, a Linux kernel VXLAN device as a peer, raw frames injected and
//! captured with AF_PACKET (python3), busybox `ping`/`udhcpc`, and a QEMU guest (TCG) on a
//! `netdev` port. Every wait is bounded; namespaces and processes go on drop, also on failure.

use fabric_tests::guest::Assets;
use fabric_tests::overlay::{
    run_timeout, send_frames, set_tx_checksum, tcp_transfer, Capture, Guest, Overlay, Vm,
};
use fabric_tests::run;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// Metric names as vswitch/src/switch.rs defines them.
const PORT_RX: &str = "vswitch_port_rx_packets_total";
const PORT_TX: &str = "vswitch_port_tx_packets_total";
const PORT_DROPS: &str = "vswitch_port_drops_total";
const ARP_REPLIED: &str = "vswitch_arp_replied_total";

/// Frames a capture saw arrive (not the ones the interface sent).
fn incoming(frames: &[Value]) -> Vec<&Value> {
    frames.iter().filter(|f| f["pkttype"] != 4).collect()
}

fn outgoing(frames: &[Value]) -> Vec<&Value> {
    frames.iter().filter(|f| f["pkttype"] == 4).collect()
}

fn is_echo_request(f: &Value, src: &str, dst: &str) -> bool {
    f["icmp"]["type"] == 8 && f["ip"]["src"] == src && f["ip"]["dst"] == dst
}

fn dump(frames: &[&Value]) -> String {
    frames
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A namespace that is not a vswitch port (a kernel VXLAN peer) seen as a `Vm` for the helpers.
fn plain_vm(ns: &str, ifname: &str, ip: &str, prefix: u8, mac: &str) -> Vm {
    Vm {
        port: format!("{ns}/{ifname}"),
        ns: ns.to_string(),
        ifname: ifname.to_string(),
        ip: ip.to_string(),
        prefix,
        mac: mac.to_string(),
        host: 0,
    }
}

/// Pings in both directions, first until an answer comes (tables, ARP), then 5 in a row.
fn ping_both_ways(o: &Overlay, a: &Vm, b: &Vm) {
    o.wait_ping(a, &b.ip);
    o.wait_ping(b, &a.ip);
    for (x, y) in [(a, b), (b, a)] {
        let (ok, out) = x.ping(&y.ip, 5, 2);
        assert!(ok, "{} -> {}: {out}\n{}", x.port, y.port, o.logs());
        assert!(out.contains("5 packets received"), "{out}");
    }
}

#[test]
fn two_hosts_ping_both_ways_and_carry_tcp() {
    let o = Overlay::start(2, 0);
    o.create_net("t1", 100, "10.10.0.0/24", &[]);
    let a = o.vm("a1", "t1", 1, &[]);
    let b = o.vm("b2", "t1", 2, &[]);
    // Lowest free addresses; the last usable one (10.10.0.254) is the DHCP server's.
    assert_eq!((a.ip.as_str(), b.ip.as_str()), ("10.10.0.1", "10.10.0.2"));
    // No MTU on the network: underlay (1500) - 50, set on the interface by the vswitch.
    assert_eq!(a.mtu(), Some(1450), "{}", a.describe());
    assert_eq!(b.mtu(), Some(1450), "{}", b.describe());
    // The interface carries the port's MAC.
    assert!(
        a.describe().contains(&a.mac),
        "{}\nwant {}",
        a.describe(),
        a.mac
    );

    ping_both_ways(&o, &a, &b);
    // Bulk TCP both ways (segments at the MTU, and whatever offloads the taps use).
    tcp_transfer(&a, &b, 16 << 20);
    tcp_transfer(&b, &a, 4 << 20);

    // Counters: /metrics live, and `port show` from the heartbeat. Frames are counted as
    // the port's interface passes them (TSO and receive coalescing make them up to 64 KB),
    // so the packet counts are well below bytes / MTU: the byte counts are the firm check.
    let rx = o.metric(1, PORT_RX, &[("port", "a1")]);
    let tx = o.metric(1, PORT_TX, &[("port", "a1")]);
    assert!(
        rx >= 100.0 && tx >= 100.0,
        "a1 rx {rx} tx {tx}:\n{}",
        o.metrics(1)
    );
    o.wait("port show b2 to report the traffic", || {
        let p = o.port("b2");
        let s = &p["stats"];
        s["attached"] == true
            && s["rx_packets"].as_u64().unwrap_or(0) >= 100
            && s["tx_packets"].as_u64().unwrap_or(0) >= 100
            && s["rx_bytes"].as_u64().unwrap_or(0) >= 4 << 20
            && s["tx_bytes"].as_u64().unwrap_or(0) >= 16 << 20
    });
}

#[test]
fn three_hosts_all_pairs_ping() {
    let o = Overlay::start(3, 0);
    o.create_net("t3", 300, "10.30.0.0/24", &[]);
    let vms: Vec<Vm> = (1..=3)
        .map(|i| o.vm(&format!("v{i}"), "t3", i, &[]))
        .collect();
    for x in &vms {
        for y in &vms {
            if x.port != y.port {
                o.wait_ping(x, &y.ip);
                let (ok, out) = x.ping(&y.ip, 3, 2);
                assert!(ok, "{} -> {}: {out}\n{}", x.port, y.port, o.logs());
            }
        }
    }
    // Two VMs on one host talk too (switched locally).
    let w = o.vm("w1", "t3", 1, &[]);
    o.wait_ping(&w, &vms[0].ip);
    o.wait_ping(&vms[0], &w.ip);
}

#[test]
fn overlapping_subnets_in_two_networks_stay_isolated() {
    let o = Overlay::start(2, 0);
    o.create_net("red", 100, "192.0.2.0/24", &[]);
    o.create_net("blue", 200, "192.0.2.0/24", &[]);
    let r1 = o.vm("r1", "red", 1, &["--ip", "192.0.2.10"]);
    let r2 = o.vm("r2", "red", 2, &["--ip", "192.0.2.11"]);
    let b1 = o.vm("b1", "blue", 1, &["--ip", "192.0.2.10"]);
    let b2 = o.vm("b2", "blue", 2, &["--ip", "192.0.2.11"]);
    let b3 = o.vm("b3", "blue", 2, &["--ip", "192.0.2.12"]);
    ping_both_ways(&o, &r1, &r2);
    ping_both_ways(&o, &b1, &b2);

    // The same addresses in both networks: each echo reaches its own network's VM only, and
    // travels the underlay with its network's VNI.
    for (from, to, other, vni, other_vni) in [(&r1, &r2, &b2, 100, 200), (&b1, &b2, &r2, 200, 100)]
    {
        let under = Capture::start(&o.host(2).ns, "eth0");
        let cap_to = Capture::start(&to.ns, &to.ifname);
        let cap_other = Capture::start(&other.ns, &other.ifname);
        let tx_other = o.metric(2, PORT_TX, &[("port", &other.port)]);
        let (ok, out) = from.ping(&to.ip, 3, 2);
        assert!(ok, "{} -> {}: {out}", from.port, to.port);
        let settle = Duration::from_millis(300);
        let (to_f, other_f, under_f) = (
            cap_to.finish(settle),
            cap_other.finish(Duration::ZERO),
            under.finish(Duration::ZERO),
        );
        let got = incoming(&to_f)
            .into_iter()
            .filter(|f| is_echo_request(f, &from.ip, &to.ip))
            .count();
        assert_eq!(got, 3, "{} saw {got} of 3 echo requests", to.port);
        let leaked = incoming(&other_f);
        assert!(
            leaked.is_empty(),
            "{} (network VNI {other_vni}) received frames while {} pinged in VNI {vni}:\n{}",
            other.port,
            from.port,
            dump(&leaked)
        );
        assert_eq!(
            o.metric(2, PORT_TX, &[("port", &other.port)]),
            tx_other,
            "{}'s tx counter moved",
            other.port
        );
        let tunneled: Vec<&Value> = incoming(&under_f)
            .into_iter()
            .filter(|f| is_echo_request(&f["vxlan"]["inner"], &from.ip, &to.ip))
            .collect();
        assert_eq!(
            tunneled.len(),
            3,
            "underlay of h2:\n{}",
            dump(&incoming(&under_f))
        );
        for f in &tunneled {
            assert_eq!(f["vxlan"]["vni"], vni, "{f}");
            assert_eq!(f["vxlan"]["flags"], 0x08, "I flag only: {f}");
            assert_eq!(f["udp"]["dport"], 4789, "{f}");
            assert_eq!(f["vxlan"]["inner"]["src"], from.mac.as_str(), "{f}");
        }
    }

    // Across networks nothing arrives: r1 addresses b2's MAC directly (a static neighbour
    // entry for 192.0.2.11 with b2's MAC), and pings 192.0.2.12, which only blue has (b3).
    run(Command::new("ip").args([
        "-n",
        &r1.ns,
        "neigh",
        "replace",
        "192.0.2.11",
        "lladdr",
        &b2.mac,
        "dev",
        &r1.ifname,
        "nud",
        "permanent",
    ]));
    let caps = [
        Capture::start(&b2.ns, &b2.ifname),
        Capture::start(&b3.ns, &b3.ifname),
        Capture::start(&b1.ns, &b1.ifname),
    ];
    let tx_before: Vec<f64> = ["b2", "b3"]
        .iter()
        .map(|p| o.metric(2, PORT_TX, &[("port", p)]))
        .collect();
    let b1_tx = o.metric(1, PORT_TX, &[("port", "b1")]);
    let (ok, out) = r1.ping("192.0.2.11", 3, 1);
    assert!(!ok, "r1 reached 192.0.2.11 through b2's MAC (blue): {out}");
    let (ok, out) = r1.ping("192.0.2.12", 2, 1);
    assert!(!ok, "r1 reached blue's 192.0.2.12: {out}");
    let mut seen = Vec::new();
    for (c, name) in caps.into_iter().zip(["b2", "b3", "b1"]) {
        for f in c.finish(Duration::from_millis(300)) {
            if f["pkttype"] != 4 {
                seen.push(format!("{name}: {f}"));
            }
        }
    }
    assert!(
        seen.is_empty(),
        "frames from red arrived in blue:\n{}",
        seen.join("\n")
    );
    let tx_after: Vec<f64> = ["b2", "b3"]
        .iter()
        .map(|p| o.metric(2, PORT_TX, &[("port", p)]))
        .collect();
    assert_eq!(tx_after, tx_before, "blue ports' tx counters moved");
    assert_eq!(o.metric(1, PORT_TX, &[("port", "b1")]), b1_tx);
    assert_eq!(b3.neigh("192.0.2.10"), "", "b3 learnt of r1");
    // Red still works (the counters above are not just silent).
    run(Command::new("ip").args([
        "-n",
        &r1.ns,
        "neigh",
        "del",
        "192.0.2.11",
        "dev",
        &r1.ifname,
    ]));
    o.wait_ping(&r1, &r2.ip);
}

#[test]
fn kernel_vxlan_device_talks_to_a_vswitch_port() {
    // h1: vswitch; h2: no vswitch, a Linux VXLAN device with an address on it.
    let o = Overlay::start(1, 1);
    o.create_net("k", 4242, "192.0.2.0/24", &[]);
    let v = o.vm("v1", "k", 1, &["--ip", "192.0.2.10"]);
    let h1 = o.host(1).clone();
    let h2 = o.host(2).clone();
    let kmac = "02:4b:00:00:00:50";
    for args in [
        vec![
            "link", "add", "vx0", "type", "vxlan", "id", "4242", "dstport", "4789", "local",
            &h2.addr, "remote", &h1.addr, "dev", "eth0",
        ],
        vec!["link", "set", "vx0", "address", kmac],
        vec!["addr", "add", "192.0.2.50/24", "dev", "vx0"],
        vec!["link", "set", "vx0", "up"],
    ] {
        run(Command::new("ip").args(["-n", &h2.ns]).args(args));
    }
    // The kernel fills in the inner checksums before the underlay, as with a real NIC (see
    // set_tx_checksum: over a veth they would otherwise arrive unfilled).
    assert!(!set_tx_checksum(&h2.ns, "eth0", false));
    let k = plain_vm(&h2.ns, "vx0", "192.0.2.50", 24, kmac);
    let under = Capture::start(&h2.ns, "eth0");
    // The kernel side first: its ARP request reaches the vswitch (flooded to the VM port, the
    // kernel VTEP learnt), the VM's answer goes back to it.
    o.wait_ping(&k, &v.ip);
    o.wait_ping(&v, &k.ip);
    ping_both_ways(&o, &v, &k);
    tcp_transfer(&v, &k, 8 << 20);
    tcp_transfer(&k, &v, 8 << 20);

    // What the vswitch put on the wire is what the kernel expects: RFC 7348 header (I flag),
    // the VNI, UDP 4789.
    let frames = under.finish(Duration::from_millis(200));
    let from_vswitch: Vec<&Value> = incoming(&frames)
        .into_iter()
        .filter(|f| f["ip"]["src"] == h1.addr.as_str() && f["udp"]["dport"] == 4789)
        .collect();
    assert!(
        from_vswitch.len() > 100,
        "{} VXLAN packets",
        from_vswitch.len()
    );
    for f in &from_vswitch {
        assert_eq!(f["vxlan"]["flags"], 0x08, "{f}");
        assert_eq!(f["vxlan"]["vni"], 4242, "{f}");
    }
    // The kernel learnt the VM's MAC behind the vswitch's VTEP.
    let fdb = run(Command::new("bridge").args(["-n", &h2.ns, "fdb", "show", "dev", "vx0"]));
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(&v.mac) && l.contains(&format!("dst {}", h1.addr))),
        "vx0 fdb has no {} via {}:\n{fdb}",
        v.mac,
        h1.addr
    );
}

#[test]
fn spoofed_source_mac_and_ip_are_dropped_and_counted() {
    let o = Overlay::start(2, 0);
    o.create_net("s", 500, "10.20.0.0/24", &[]);
    let a = o.vm("a1", "s", 1, &[]);
    let b = o.vm("a2", "s", 2, &[]);
    ping_both_ways(&o, &a, &b);

    let drops = |reason: &str| o.metric(1, PORT_DROPS, &[("port", "a1"), ("reason", reason)]);
    let (mac0, ip0) = (drops("spoofed_mac"), drops("spoofed_ip"));
    let cap = Capture::start(&b.ns, &b.ifname);
    let udp = |sip: &str, payload: &str| json!({"sip": sip, "dip": b.ip, "dport": 9999, "payload": payload});
    send_frames(
        &a,
        &json!([
            // Another MAC, a1's own IP.
            {"dst": b.mac, "src": "02:66:66:66:66:01", "count": 20, "udp": udp(&a.ip, "SPOOF-MAC")},
            // a1's MAC, another IP.
            {"dst": b.mac, "src": a.mac, "count": 20, "udp": udp("10.20.0.99", "SPOOF-IP")},
            // ARP poisoning: a1's MAC claims a2's address.
            {"dst": "ff:ff:ff:ff:ff:ff", "src": a.mac, "count": 5,
             "arp": {"op": 2, "sip": b.ip, "tip": b.ip, "tha": "ff:ff:ff:ff:ff:ff"}},
            // The control: a1 as itself, the same way.
            {"dst": b.mac, "src": a.mac, "count": 5, "udp": udp(&a.ip, "LEGIT")},
        ]),
    );
    o.wait("the legitimate frames at a2", || {
        cap.frames()
            .iter()
            .filter(|f| f["payload"] == "LEGIT")
            .count()
            == 5
    });
    let frames = cap.finish(Duration::from_millis(500));
    let got = incoming(&frames);
    let bad: Vec<&&Value> = got
        .iter()
        .filter(|f| {
            f["payload"] == "SPOOF-MAC"
                || f["payload"] == "SPOOF-IP"
                || (f["arp"]["spa"] == b.ip.as_str() && f["arp"]["sha"] == a.mac.as_str())
                || f["src"] == "02:66:66:66:66:01"
        })
        .collect();
    assert!(
        bad.is_empty(),
        "spoofed frames reached a2:\n{}",
        bad.iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mac_d = drops("spoofed_mac") - mac0;
    let ip_d = drops("spoofed_ip") - ip0;
    assert_eq!(mac_d, 20.0, "spoofed_mac drops\n{}", o.metrics(1));
    assert_eq!(
        ip_d,
        25.0,
        "spoofed_ip drops (20 UDP + 5 ARP)\n{}",
        o.metrics(1)
    );
    o.wait("port show a1 to count the drops", || {
        let s = &o.port("a1")["stats"]["drops"];
        s["spoofed_mac"].as_u64() >= Some(20) && s["spoofed_ip"].as_u64() >= Some(25)
    });
    // And a1 still works as itself.
    o.wait_ping(&a, &b.ip);
}

#[test]
fn arp_for_a_known_remote_ip_is_answered_locally() {
    let o = Overlay::start(2, 0);
    o.create_net("arp", 600, "10.60.0.0/24", &[]);
    let a = o.vm("a1", "arp", 1, &[]);
    let b = o.vm("a2", "arp", 2, &[]);
    ping_both_ways(&o, &a, &b);

    run(Command::new("ip").args(["-n", &a.ns, "neigh", "flush", "all"]));
    assert!(!a.neigh(&b.ip).contains(&b.mac), "{}", a.neigh(&b.ip));
    let replied = o.metric(1, ARP_REPLIED, &[]);
    let cap_b = Capture::start(&b.ns, &b.ifname);
    let cap_h1 = Capture::start(&o.host(1).ns, "eth0");
    let cap_a = Capture::start(&a.ns, &a.ifname);
    let (ok, out) = a.ping(&b.ip, 1, 2);
    assert!(ok, "{out}\n{}", o.logs());
    let b_f = cap_b.finish(Duration::from_millis(300));
    let h1_f = cap_h1.finish(Duration::ZERO);
    let a_f = cap_a.finish(Duration::ZERO);

    // a1 did ask (broadcast), and got a2's MAC back.
    let asked = outgoing(&a_f)
        .into_iter()
        .filter(|f| f["arp"]["op"] == 1 && f["arp"]["tpa"] == b.ip.as_str())
        .count();
    assert!(
        asked >= 1,
        "a1 sent no ARP request:\n{}",
        dump(&outgoing(&a_f))
    );
    let answer: Vec<&Value> = incoming(&a_f)
        .into_iter()
        .filter(|f| f["arp"]["op"] == 2 && f["arp"]["spa"] == b.ip.as_str())
        .collect();
    assert!(
        !answer.is_empty() && answer.iter().all(|f| f["arp"]["sha"] == b.mac.as_str()),
        "ARP replies for {} at a1:\n{}",
        b.ip,
        dump(&answer)
    );
    assert!(a.neigh(&b.ip).contains(&b.mac), "{}", a.neigh(&b.ip));
    assert!(
        o.metric(1, ARP_REPLIED, &[]) > replied,
        "{ARP_REPLIED} did not move on h1:\n{}",
        o.metrics(1)
    );
    // No broadcast left h1 (the echo request did, so the capture works), none reached a2.
    let sent: Vec<&Value> = outgoing(&h1_f)
        .into_iter()
        .filter(|f| f["vxlan"].is_object())
        .collect();
    assert!(
        sent.iter()
            .any(|f| is_echo_request(&f["vxlan"]["inner"], &a.ip, &b.ip)),
        "the echo request did not leave h1:\n{}",
        dump(&sent)
    );
    let bcast: Vec<&&Value> = sent
        .iter()
        .filter(|f| f["vxlan"]["inner"]["dst"] == "ff:ff:ff:ff:ff:ff")
        .collect();
    assert!(
        bcast.is_empty(),
        "broadcast left h1:\n{}",
        bcast
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let at_b: Vec<&Value> = incoming(&b_f)
        .into_iter()
        .filter(|f| f["dst"] == "ff:ff:ff:ff:ff:ff")
        .collect();
    assert!(at_b.is_empty(), "a2 got broadcasts:\n{}", dump(&at_b));
}

/// The udhcpc script: records what the server handed out, then applies it.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    {
      echo "ip=$ip"; echo "mask=$mask"; echo "subnet=$subnet"; echo "router=$router"
      echo "dns=$dns"; echo "mtu=$mtu"; echo "serverid=$serverid"; echo "lease=$lease"
    } > "$FABRIC_DHCP_OUT"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    ;;
esac
exit 0
"#;

#[test]
fn dhcp_configures_a_udhcpc_namespace() {
    let o = Overlay::start(2, 0);
    o.create_net(
        "d",
        700,
        "192.0.2.0/24",
        &[
            "--mtu",
            "1400",
            "--gateway",
            "192.0.2.1",
            "--dns",
            "192.0.2.53",
        ],
    );
    let d1 = o.vm_unconfigured("d1", "d", 1, &[]);
    let d2 = o.vm("d2", "d", 2, &[]);
    // The gateway is never allocated: the first two ports get .2 and .3.
    assert_eq!((d1.ip.as_str(), d2.ip.as_str()), ("192.0.2.2", "192.0.2.3"));
    assert_eq!(d1.mtu(), Some(1400), "{}", d1.describe());

    let script = o.dir().join("udhcpc.script");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    run(Command::new("chmod").arg("755").arg(&script));
    let out_file = o.dir().join("dhcp.env");
    let (st, out) = run_timeout(
        d1.command("busybox")
            .args([
                "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "2", "-O", "mtu",
            ])
            .args(["-i", &d1.ifname, "-s"])
            .arg(&script)
            .env("FABRIC_DHCP_OUT", &out_file),
        Duration::from_secs(30),
    );
    assert!(
        st.is_some_and(|s| s.success()),
        "udhcpc got no lease (timed out: {}): {out}\n{}",
        st.is_none(),
        o.logs()
    );
    let env = std::fs::read_to_string(&out_file).unwrap_or_default();
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    assert_eq!(get("ip"), "192.0.2.2", "{env}");
    assert_eq!(get("mask"), "24", "{env}");
    assert_eq!(get("subnet"), "255.255.255.0", "{env}");
    assert_eq!(get("router"), "192.0.2.1", "{env}");
    assert_eq!(get("dns"), "192.0.2.53", "{env}");
    assert_eq!(get("mtu"), "1400", "{env}");
    assert_eq!(
        get("serverid"),
        "192.0.2.254",
        "the subnet's last usable address: {env}"
    );
    assert!(get("lease").parse::<u64>().is_ok_and(|l| l > 0), "{env}");

    let addrs =
        run(Command::new("ip").args(["-n", &d1.ns, "-o", "addr", "show", "dev", &d1.ifname]));
    assert!(addrs.contains("192.0.2.2/24"), "{addrs}");
    let routes = run(Command::new("ip").args(["-n", &d1.ns, "route"]));
    assert!(routes.contains("default via 192.0.2.1"), "{routes}");
    ping_both_ways(&o, &d1, &d2);
}

/// Guest side of the QEMU test: ARGS = IP/PREFIX PEER MTU [listen]. Configures eth0, pings the
/// peer, then (with `listen`) waits for one TCP message from it on port 7000.
const NET_PING: &str = r#". /lib/fabric.sh
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -e /sys/class/net/eth0 ] || { echo "FABRIC-ERROR no eth0"; exit 2; }
ip link set lo up
ip link set eth0 mtu $3
ip link set eth0 up
ip addr add $1 dev eth0
echo "FABRIC-NET mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu)"
n=0
while ! ping -c 1 -W 1 $2 >/dev/null 2>&1; do
  n=$((n+1))
  [ $n -lt 60 ] || { echo "FABRIC-ERROR no reply from $2"; exit 1; }
done
ping -c 3 -W 2 $2 > /tmp/ping 2>&1 || { echo "FABRIC-ERROR ping: $(cat /tmp/ping)"; exit 1; }
echo "FABRIC-PING ok $(grep 'packets received' /tmp/ping)"
[ "$4" = listen ] || exit 0
echo "FABRIC-LISTEN"
timeout 120 nc -l -p 7000 > /tmp/msg
echo "FABRIC-MSG $(cat /tmp/msg)"
"#;

const SEND_LINE_PY: &str = r#"
import socket, sys, time
end = time.time() + 60
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError:
        if time.time() > end: raise
        time.sleep(0.5)
c.sendall(sys.argv[3].encode() + b"\n"); c.close()
"#;

#[test]
fn qemu_guest_on_a_netdev_port_pings_a_namespace_vm() {
    let o = Overlay::start(2, 0);
    o.create_net("g", 800, "192.0.2.0/24", &[]);
    // The port first: the vswitch attaches vm1 as soon as QEMU creates it.
    let p = o
        .json(&[
            "port", "create", "vm1", "--net", "g", "--node", "h1", "--kind", "netdev",
        ])
        .unwrap_or_else(|| panic!("port create vm1: {}", o.fabctl(&["port", "show", "vm1"]).1));
    let (gip, gmac) = (
        p["ip"].as_str().unwrap().to_string(),
        p["mac"].as_str().unwrap().to_lowercase(),
    );
    assert_eq!(p["ifname"], "vm1", "{p}");
    let peer = o.vm("peer", "g", 2, &[]);
    let assets = Assets::with_scripts(&[("net-ping", NET_PING)]);
    let boot = |listen: &str| {
        Guest::start(
            &o.host(1).ns,
            &assets,
            &[
                "-netdev".into(),
                "tap,id=n0,ifname=vm1,script=no,downscript=no".into(),
                "-device".into(),
                format!("virtio-net-pci,netdev=n0,mac={gmac}"),
            ],
            "net-ping",
            &[&format!("{gip}/24"), &peer.ip, "1450", listen],
        )
    };
    let mut g = boot("listen");
    o.wait_for("vm1 attached (port show)", Duration::from_secs(60), || {
        o.port("vm1")["stats"]["attached"] == true
    });
    let boot_timeout = Duration::from_secs(240);
    let net = g.wait_marker("NET", boot_timeout);
    assert!(
        net.as_deref() == Some(&format!("mac={gmac} mtu=1450")),
        "{net:?}\n{}",
        g.describe()
    );
    let ping = g.wait_marker("PING", Duration::from_secs(90));
    assert!(
        ping.as_deref()
            .is_some_and(|p| p.starts_with("ok ") && p.contains(" 3 packets received")),
        "guest ping: {ping:?}\n{}\n{}",
        g.describe(),
        o.logs()
    );
    // The other way: the namespace VM reaches the guest (ping and a TCP message).
    assert!(
        g.wait_marker("LISTEN", Duration::from_secs(30)).is_some(),
        "{}",
        g.describe()
    );
    o.wait_ping(&peer, &gip);
    let (st, out) = run_timeout(
        peer.command("python3")
            .args(["-c", SEND_LINE_PY, &gip, "7000", "hello-from-h2"]),
        Duration::from_secs(70),
    );
    assert!(st.is_some_and(|s| s.success()), "{out}\n{}", g.describe());
    let msg = g.wait_marker("MSG", Duration::from_secs(30));
    assert_eq!(msg.as_deref(), Some("hello-from-h2"), "{}", g.describe());
    assert!(g.wait_exit(Duration::from_secs(60)), "{}", g.describe());
    let console = g.console();
    assert!(
        console.contains("FABRIC-RESULT: ok net-ping") && !console.contains("FABRIC-ERROR"),
        "{}",
        g.describe()
    );
    // QEMU is gone: the port is detached again; a new QEMU (the VM restarted) is attached
    // again and reaches the peer.
    o.wait("vm1 detached after QEMU exited", || {
        o.port("vm1")["stats"]["attached"] == false
    });
    let mut g = boot("no");
    let ping = g.wait_marker("PING", boot_timeout);
    assert!(
        ping.as_deref()
            .is_some_and(|p| p.starts_with("ok ") && p.contains(" 3 packets received")),
        "guest ping after the restart: {ping:?}\n{}\n{}",
        g.describe(),
        o.logs()
    );
    assert!(g.wait_exit(Duration::from_secs(60)), "{}", g.describe());
    assert!(
        g.console().contains("FABRIC-RESULT: ok net-ping"),
        "{}",
        g.describe()
    );
}

/// The harness itself, without a vswitch: two plain namespace hosts on the bridge. The capture
/// sees injected frames with the fields the tests read, a spoofed frame injected from one
/// host is seen by the other (so "not seen" in the tests means dropped), and the TCP check
/// passes on a working path.
#[test]
fn harness_captures_injected_frames_and_checks_tcp() {
    let net = fabric_tests::netns::Net::new(2);
    for h in &net.hosts {
        fabric_tests::overlay::no_ipv6(&h.ns);
    }
    let mac = |i: usize| {
        let out =
            run(Command::new("ip").args(["-n", &net.hosts[i].ns, "-o", "link", "show", "eth0"]));
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap()
            .to_string()
    };
    let vm = |i: usize| plain_vm(&net.hosts[i].ns, "eth0", &net.hosts[i].addr, 24, &mac(i));
    let (a, b) = (vm(0), vm(1));
    let cap = Capture::start(&b.ns, "eth0");
    send_frames(
        &a,
        &json!([
            {"dst": b.mac, "src": "02:66:66:66:66:01", "count": 3,
             "udp": {"sip": "198.18.0.99", "dip": b.ip, "dport": 9999, "payload": "SPOOF-MAC"}},
            {"dst": "ff:ff:ff:ff:ff:ff", "src": a.mac, "count": 2,
             "arp": {"op": 2, "sip": b.ip, "tip": b.ip, "tha": "ff:ff:ff:ff:ff:ff"}},
        ]),
    );
    let (ok, out) = a.ping(&b.ip, 2, 2);
    assert!(ok, "{out}");
    let frames = cap.finish(Duration::from_millis(300));
    let got = incoming(&frames);
    assert_eq!(
        got.iter()
            .filter(|f| f["payload"] == "SPOOF-MAC"
                && f["src"] == "02:66:66:66:66:01"
                && f["udp"]["dport"] == 9999
                && f["ip"]["src"] == "198.18.0.99")
            .count(),
        3,
        "{}",
        dump(&got)
    );
    assert_eq!(
        got.iter()
            .filter(|f| f["arp"]["op"] == 2
                && f["arp"]["spa"] == b.ip.as_str()
                && f["arp"]["sha"] == a.mac.as_str()
                && f["dst"] == "ff:ff:ff:ff:ff:ff")
            .count(),
        2,
        "{}",
        dump(&got)
    );
    assert_eq!(
        got.iter()
            .filter(|f| is_echo_request(f, &a.ip, &b.ip))
            .count(),
        2,
        "{}",
        dump(&got)
    );
    assert!(
        outgoing(&frames).iter().any(|f| f["icmp"]["type"] == 0),
        "{}",
        dump(&outgoing(&frames))
    );
    tcp_transfer(&a, &b, 1 << 20);

    // VXLAN decoding, on two kernel VXLAN devices.
    for (i, peer) in [(0, 1), (1, 0)] {
        let h = &net.hosts[i];
        let remote = &net.hosts[peer].addr;
        let addr = format!("192.0.2.{}/24", i + 1);
        for args in [
            vec![
                "link", "add", "vx0", "type", "vxlan", "id", "77", "dstport", "4789", "local",
                &h.addr, "remote", remote, "dev", "eth0",
            ],
            vec!["addr", "add", &addr, "dev", "vx0"],
            vec!["link", "set", "vx0", "up"],
        ] {
            run(Command::new("ip").args(["-n", &h.ns]).args(args));
        }
    }
    let cap = Capture::start(&b.ns, "eth0");
    let (ok, out) = a.ping("192.0.2.2", 2, 2);
    assert!(ok, "{out}");
    let frames = cap.finish(Duration::from_millis(200));
    let tunneled: Vec<&Value> = incoming(&frames)
        .into_iter()
        .filter(|f| {
            f["vxlan"]["vni"] == 77
                && f["vxlan"]["flags"] == 0x08
                && is_echo_request(&f["vxlan"]["inner"], "192.0.2.1", "192.0.2.2")
        })
        .collect();
    assert_eq!(tunneled.len(), 2, "{}", dump(&incoming(&frames)));
}
