//! `fabctl net|port|switch …` as operators and scripts run it: the real fabctl binary against a
//! real volume-mgr (see cli.rs for which one). vswitches are played by the client library
//! (registration and heartbeats carrying port counters), as the vswitch daemon does it.

mod common;

use common::*;
use std::process::Command;
use volume_mgr::api;
use volume_mgr::client::Client;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn register_switch(m: &Mgr, node: &str, ip: &str) {
    let c = Client::new(vec![m.url.clone()]);
    rt().block_on(c.register_switch(
        node,
        &api::RegisterSwitch {
            underlay_ip: ip.into(),
            vxlan_port: 4789,
            underlay_mtu: 1500,
        },
    ))
    .unwrap();
}

fn heartbeat(m: &Mgr, node: &str, ports: &[(&str, api::PortStats)]) {
    let c = Client::new(vec![m.url.clone()]);
    rt().block_on(
        c.switch_heartbeat(
            node,
            &api::SwitchHeartbeat {
                ports: ports
                    .iter()
                    .map(|(n, s)| (n.to_string(), s.clone()))
                    .collect(),
            },
        ),
    )
    .unwrap();
}

#[test]
fn networks_ports_and_switches() {
    let m = start_manager();
    // Empty: headers only; JSON is an empty list.
    assert_eq!(
        ok(&m, &["net", "ls"]).trim(),
        "NAME  VNI  SUBNET  MTU  PORTS"
    );
    assert_eq!(
        ok(&m, &["port", "ls"]).trim(),
        "NAME  NET  NODE  KIND  MAC  IP  IFNAME"
    );
    assert_eq!(
        ok(&m, &["switch", "ls"]).trim(),
        "NODE  UNDERLAY  PORT  MTU  STATE"
    );
    assert_eq!(json(&m, &["net", "ls"]), serde_json::json!([]));
    assert_eq!(json(&m, &["switch", "ls"]), serde_json::json!([]));

    register_switch(&m, "host-a", "198.18.0.2");
    register_switch(&m, "b", "198.18.0.3");
    let sw = ok(&m, &["switch", "ls"]);
    assert_aligned(&sw, &["NODE", "UNDERLAY", "PORT", "MTU", "STATE"]);
    assert_aligned(&sw, &["host-a", "198.18.0.2", "4789", "1500", "up"]);
    assert_aligned(&sw, &["b ", "198.18.0.3", "4789", "1500", "up"]);
    assert_eq!(json(&m, &["switch", "ls"])[1]["underlay_ip"], "198.18.0.2");

    // Networks.
    assert_eq!(
        ok(
            &m,
            &[
                "net",
                "create",
                "blue",
                "--vni",
                "100",
                "--subnet",
                "10.0.0.0/24",
                "--gateway",
                "10.0.0.1",
                "--dns",
                "9.9.9.9",
                "--dns",
                "10.0.0.53"
            ]
        ),
        "created network blue (vni 100, subnet 10.0.0.0/24, mtu auto)\n"
    );
    let red = json(
        &m,
        &[
            "net",
            "create",
            "red",
            "--vni",
            "16777215",
            "--subnet",
            "10.0.0.0/24",
            "--mtu",
            "1400",
            "--dns",
            "1.1.1.1,8.8.8.8",
        ],
    );
    let red: api::Network = serde_json::from_value(red).unwrap();
    assert_eq!((red.vni, red.mtu), (16777215, Some(1400)));
    assert_eq!(red.dns, ["1.1.1.1", "8.8.8.8"]);

    // Ports: allocated and explicit addresses, both kinds.
    let out = ok(
        &m,
        &[
            "port", "create", "vm1", "--net", "blue", "--node", "host-a", "--kind", "tap",
            "--netns", "vm1",
        ],
    );
    let vm1 = json(&m, &["port", "show", "vm1"]);
    let mac1 = vm1["mac"].as_str().unwrap().to_string();
    assert!(mac1.starts_with("02:"), "{mac1}");
    assert_eq!(
        out,
        format!("created port vm1 on network blue (node host-a, tap, mac {mac1}, ip 10.0.0.2, ifname vm1)\n")
    );
    let p = json(
        &m,
        &[
            "port",
            "create",
            "qemu-vm2",
            "--net",
            "blue",
            "--node",
            "b",
            "--kind",
            "netdev",
            "--ifname",
            "vnet3",
            "--mac",
            "52:54:00:12:34:56",
            "--ip",
            "10.0.0.20",
        ],
    );
    let p: api::Port = serde_json::from_value(p).unwrap();
    assert_eq!(
        (
            p.kind,
            p.mac.as_str(),
            p.ip.as_str(),
            p.ifname.as_str(),
            p.netns
        ),
        (
            api::PortKind::Netdev,
            "52:54:00:12:34:56",
            "10.0.0.20",
            "vnet3",
            None
        )
    );
    ok(
        &m,
        &[
            "port", "create", "r1", "--net", "red", "--node", "b", "--kind", "tap",
        ],
    );

    let nets = ok(&m, &["net", "ls"]);
    assert_aligned(&nets, &["NAME", "VNI", "SUBNET", "MTU", "PORTS"]);
    assert_aligned(&nets, &["blue", "100", "10.0.0.0/24", "auto", "2"]);
    assert_aligned(&nets, &["red ", "16777215", "10.0.0.0/24", "1400", "1"]);
    let ports = ok(&m, &["port", "ls"]);
    assert_eq!(ports.lines().count(), 4, "{ports}");
    assert_aligned(
        &ports,
        &["NAME", "NET", "NODE", "KIND", "MAC", "IP", "IFNAME"],
    );
    assert_aligned(
        &ports,
        &["vm1", "blue", "host-a", "tap", &mac1, "10.0.0.2", "vm1"],
    );
    assert_aligned(
        &ports,
        &[
            "qemu-vm2",
            "blue",
            "b",
            "netdev",
            "52:54:00:12:34:56",
            "10.0.0.20",
            "vnet3",
        ],
    );
    // No gateway in red: its first port gets the first address.
    assert_aligned(&ports, &["r1", "red", "b", "tap", "02:", "10.0.0.1", "r1"]);
    let only = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["port", "ls"];
        a.extend_from_slice(args);
        json(&m, &a)
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(only(&["--net", "blue"]), ["qemu-vm2", "vm1"]);
    assert_eq!(only(&["--node", "b"]), ["qemu-vm2", "r1"]);
    assert_eq!(only(&["--net", "red", "--node", "b"]), ["r1"]);
    assert!(only(&["--node", "nowhere"]).is_empty());
    assert_eq!(ok(&m, &["port", "ls", "--net", "red"]).lines().count(), 2);

    // net show: the settings, the DHCP server address, then its ports.
    let show = ok(&m, &["net", "show", "blue"]);
    for line in [
        "name         blue\n",
        "vni          100\n",
        "subnet       10.0.0.0/24\n",
        "mtu          auto (underlay MTU - 50)\n",
        "gateway      10.0.0.1\n",
        "dns          9.9.9.9, 10.0.0.53\n",
        "dhcp server  10.0.0.254\n",
        "ports        2\n",
    ] {
        assert!(show.contains(line), "{line:?} in\n{show}");
    }
    let table = show.split("\n\n").nth(1).unwrap();
    assert_aligned(
        table,
        &["NAME", "NET", "NODE", "KIND", "MAC", "IP", "IFNAME"],
    );
    assert_aligned(
        table,
        &["vm1", "blue", "host-a", "tap", &mac1, "10.0.0.2", "vm1"],
    );
    let show = ok(&m, &["net", "show", "red"]);
    assert!(
        show.contains("mtu          1400\n") && show.contains("gateway      none\n"),
        "{show}"
    );
    let j = json(&m, &["net", "show", "blue"]);
    assert_eq!(j["vni"], 100);
    assert_eq!(j["ports"].as_array().unwrap().len(), 2);

    // port show: no counters until the vswitch reports them, then every counter.
    let show = ok(&m, &["port", "show", "vm1"]);
    for line in [
        "name         vm1\n",
        "network      blue\n",
        "node         host-a\n",
        "kind         tap\n",
        &format!("mac          {mac1}\n"),
        "ip           10.0.0.2\n",
        "ifname       vm1\n",
        "netns        vm1\n",
        "counters     no counters reported yet\n",
    ] {
        assert!(show.contains(line), "{line:?} in\n{show}");
    }
    assert!(ok(&m, &["port", "show", "qemu-vm2"]).contains("netns        - (host)\n"));
    let mut stats = api::PortStats {
        rx_packets: 12,
        rx_bytes: 1234,
        tx_packets: 10,
        tx_bytes: 980,
        attached: true,
        ..Default::default()
    };
    stats.drops.insert("spoofed_ip".into(), 3);
    stats.drops.insert("oversize".into(), 2);
    heartbeat(&m, "host-a", &[("vm1", stats.clone())]);
    let show = ok(&m, &["port", "show", "vm1"]);
    for line in [
        "attached     yes\n",
        "rx           12 packets, 1234 bytes (from the port)\n",
        "tx           10 packets, 980 bytes (to the port)\n",
        "drops        5 (oversize 2, spoofed_ip 3)\n",
    ] {
        assert!(show.contains(line), "{line:?} in\n{show}");
    }
    assert!(!show.contains("no counters"), "{show}");
    let j: api::Port = serde_json::from_value(json(&m, &["port", "show", "vm1"])).unwrap();
    assert_eq!(j.stats, Some(stats));
    heartbeat(&m, "b", &[("qemu-vm2", api::PortStats::default())]);
    let show = ok(&m, &["port", "show", "qemu-vm2"]);
    assert!(
        show.contains("attached     no\n") && show.contains("drops        0\n"),
        "{show}"
    );

    // A network with ports is not removed; the reason names them.
    let e = fails(fabctl(&m, &["net", "rm", "blue"]));
    assert_eq!(
        e,
        "fabctl: network blue has 2 ports: qemu-vm2, vm1; delete them first (in_use, HTTP 409)"
    );
    assert_eq!(ok(&m, &["port", "rm", "vm1"]), "deleted port vm1\n");
    assert_eq!(
        json(&m, &["port", "rm", "qemu-vm2"]),
        serde_json::json!({"deleted": "qemu-vm2"})
    );
    assert_eq!(ok(&m, &["net", "rm", "blue"]), "deleted network blue\n");
    // -o json changes nothing about failures.
    let e = fails(fabctl(&m, &["-o", "json", "net", "rm", "red"]));
    assert_eq!(
        e,
        "fabctl: network red has 1 port: r1; delete them first (in_use, HTTP 409)"
    );
}

#[test]
fn net_failures_are_exit_1_and_one_line() {
    let m = start_manager();
    register_switch(&m, "h1", "198.18.0.2");
    ok(
        &m,
        &[
            "net",
            "create",
            "blue",
            "--vni",
            "5",
            "--subnet",
            "10.5.0.0/24",
        ],
    );
    ok(
        &m,
        &[
            "port", "create", "vm1", "--net", "blue", "--node", "h1", "--kind", "tap",
        ],
    );
    for (args, want) in [
        (
            &["net", "create", "x", "--vni", "0", "--subnet", "10.0.0.0/24"][..],
            "fabctl: vni 0 is out of range: must be 1 to 16777215 (invalid_argument, HTTP 400)",
        ),
        (
            &["net", "create", "x", "--vni", "5", "--subnet", "10.0.0.0/24"],
            "fabctl: vni 5 is already used by network blue (in_use, HTTP 409)",
        ),
        (
            &["net", "create", "blue", "--vni", "6", "--subnet", "10.0.0.0/24"],
            "fabctl: network blue already exists (already_exists, HTTP 409)",
        ),
        (
            &["net", "create", "x", "--vni", "6", "--subnet", "10.0.0.1/24"],
            "fabctl: subnet 10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24? (invalid_argument, HTTP 400)",
        ),
        (
            &["net", "create", "x", "--vni", "6", "--subnet", "10.0.0.0/24", "--mtu", "100"],
            "fabctl: mtu 100 is out of range: must be 576 to 9000 (invalid_argument, HTTP 400)",
        ),
        (
            &["net", "create", "x", "--vni", "6", "--subnet", "10.0.0.0/24", "--gateway", "10.1.0.1"],
            "fabctl: gateway 10.1.0.1 is outside subnet 10.0.0.0/24 (invalid_argument, HTTP 400)",
        ),
        (
            &["net", "create", "x", "--vni", "6", "--subnet", "10.0.0.0/24", "--dns", "::1"],
            "fabctl: dns server \"::1\" is not an IPv4 address (invalid_argument, HTTP 400)",
        ),
        (
            &["net", "show", "nope"],
            "fabctl: network nope not found (not_found, HTTP 404)",
        ),
        (
            &["net", "rm", "nope"],
            "fabctl: network nope not found (not_found, HTTP 404)",
        ),
        (
            &["port", "create", "vm2", "--net", "nope", "--node", "h1", "--kind", "tap"],
            "fabctl: network nope does not exist (invalid_argument, HTTP 400)",
        ),
        (
            &["port", "create", "vm2", "--net", "blue", "--node", "h9", "--kind", "tap"],
            "fabctl: node h9 is not a registered vswitch or blockd node; known: h1 (invalid_argument, HTTP 400)",
        ),
        (
            &["port", "create", "vm2", "--net", "blue", "--node", "h1", "--kind", "tap", "--ip", "10.5.0.1"],
            "fabctl: ip 10.5.0.1 is already used by port vm1 in network blue (in_use, HTTP 409)",
        ),
        (
            &["port", "create", "vm2", "--net", "blue", "--node", "h1", "--kind", "tap", "--ip", "10.6.0.2"],
            "fabctl: ip 10.6.0.2 is outside subnet 10.5.0.0/24 (invalid_argument, HTTP 400)",
        ),
        (
            &["port", "create", "vm2", "--net", "blue", "--node", "h1", "--kind", "tap", "--mac", "ff:ff:ff:ff:ff:ff"],
            "fabctl: mac ff:ff:ff:ff:ff:ff is a multicast address; a port needs a unicast one (first octet even) (invalid_argument, HTTP 400)",
        ),
        (
            &["port", "create", "vm2", "--net", "blue", "--node", "h1", "--kind", "netdev", "--netns", "ns"],
            "fabctl: netns is for tap ports only: a netdev port attaches an interface that already exists in the host's namespace (invalid_argument, HTTP 400)",
        ),
        (
            &["port", "create", "vm2", "--net", "blue", "--node", "h1", "--kind", "tap", "--ifname", "vm1"],
            "fabctl: interface vm1 on node h1 is already used by port vm1 (in_use, HTTP 409)",
        ),
        (
            &["port", "create", "a-too-long-name1", "--net", "blue", "--node", "h1", "--kind", "tap"],
            "fabctl: invalid port name \"a-too-long-name1\": at most 15 characters (it names the interface by default), got 16 (invalid_argument, HTTP 400)",
        ),
        (
            &["port", "show", "nope"],
            "fabctl: port nope not found (not_found, HTTP 404)",
        ),
        (
            &["port", "rm", "nope"],
            "fabctl: port nope not found (not_found, HTTP 404)",
        ),
    ] {
        assert_eq!(fails(fabctl(&m, args)), want, "fabctl {args:?}");
    }
    // Nothing half-made.
    assert_eq!(json(&m, &["net", "ls"]).as_array().unwrap().len(), 1);
    assert_eq!(json(&m, &["port", "ls"]).as_array().unwrap().len(), 1);
    // The manager is unreachable.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let o = Command::new(fabctl_bin())
        .env_remove("FABRIC_MANAGER")
        .args(["--manager", &dead, "switch", "ls"])
        .output()
        .unwrap();
    let e = fails(o);
    assert!(
        e.starts_with(&format!("fabctl: cannot reach volume-mgr at {dead}: ")),
        "{e}"
    );
}

#[test]
fn net_usage_errors_are_exit_2() {
    for args in [
        &["net"][..],
        &["net", "create", "x", "--subnet", "10.0.0.0/24"],
        &["net", "create", "x", "--vni", "5"],
        &[
            "net",
            "create",
            "x",
            "--vni",
            "-1",
            "--subnet",
            "10.0.0.0/24",
        ],
        &[
            "net",
            "create",
            "x",
            "--vni",
            "4294967296",
            "--subnet",
            "10.0.0.0/24",
        ],
        &["port", "create", "p", "--net", "n", "--node", "h"],
        &[
            "port", "create", "p", "--net", "n", "--node", "h", "--kind", "vhost",
        ],
        &["port", "ls", "extra"],
        &["switch", "rm", "h1"],
    ] {
        let o = Command::new(fabctl_bin())
            .env_remove("FABRIC_MANAGER")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "fabctl {args:?}");
    }
    let o = Command::new(fabctl_bin())
        .args(["port", "create", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    assert!(help.contains("tap") && help.contains("netdev"), "{help}");
}

#[test]
fn net_set_changes_mtu_gateway_dns() {
    let m = start_manager();
    ok(
        &m,
        &[
            "net",
            "create",
            "red",
            "--vni",
            "6",
            "--subnet",
            "10.6.0.0/24",
        ],
    );
    let out = ok(
        &m,
        &[
            "net",
            "set",
            "red",
            "--mtu",
            "1400",
            "--gateway",
            "10.6.0.1",
            "--dns",
            "10.6.0.53",
        ],
    );
    assert!(
        out.contains("mtu 1400") && out.contains("gateway 10.6.0.1") && out.contains("10.6.0.53"),
        "{out}"
    );
    let n = json(&m, &["net", "show", "red"]);
    assert_eq!(
        (n["mtu"].as_u64(), n["gateway"].as_str()),
        (Some(1400), Some("10.6.0.1"))
    );
    let out = ok(&m, &["net", "set", "red", "--mtu", "0", "--gateway", ""]);
    assert!(
        out.contains("underlay - 50") && out.contains("gateway none"),
        "{out}"
    );
    let e = fails(fabctl(&m, &["net", "set", "red"]));
    assert!(e.contains("nothing to change"), "{e}");
    let e = fails(fabctl(&m, &["net", "set", "red", "--mtu", "10"]));
    assert!(e.contains("mtu"), "{e}");
}
