//! Overlay networks, ports and vswitches against the real volume-mgr binary over HTTP: every
//! refusal with its 4xx and one-line reason, MAC/IP/VNI allocation without duplicates (also
//! under concurrent requests), the netstate watch (wakes on real changes, not on heartbeats),
//! switch liveness, port counters from heartbeats, and the client library's methods.

mod common;

use common::start;
use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use volume_mgr::api;

fn call(c: &Client, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut rq = c.request(method.parse().unwrap(), url);
    if let Some(b) = body {
        rq = rq.json(&b);
    }
    let r = rq.send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts the status, code and exact one-line message.
#[track_caller]
fn expect(got: (u16, Value), status: u16, code: &str, message: &str) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["code"], code, "{:?}", got.1);
    assert_eq!(got.1["message"], message, "{:?}", got.1);
}

/// Asserts the status and code, and that the message is one line containing `part`.
#[track_caller]
fn expect_has(got: (u16, Value), status: u16, code: &str, part: &str) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["code"], code, "{:?}", got.1);
    let m = got.1["message"].as_str().unwrap_or_default();
    assert!(
        m.contains(part) && !m.contains('\n'),
        "{m:?} lacks {part:?}"
    );
}

struct Api {
    c: Client,
    url: String,
}

impl Api {
    fn new(url: &str) -> Api {
        Api {
            c: common::client(),
            url: url.to_string(),
        }
    }
    fn get(&self, path: &str) -> (u16, Value) {
        call(&self.c, "GET", &format!("{}{path}", self.url), None)
    }
    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        call(&self.c, "POST", &format!("{}{path}", self.url), Some(body))
    }
    fn put(&self, path: &str, body: Value) -> (u16, Value) {
        call(&self.c, "PUT", &format!("{}{path}", self.url), Some(body))
    }
    fn delete(&self, path: &str) -> (u16, Value) {
        call(&self.c, "DELETE", &format!("{}{path}", self.url), None)
    }
    fn network(&self, name: &str, vni: u32, subnet: &str) -> (u16, Value) {
        self.post(
            "/v1/networks",
            json!({"name": name, "vni": vni, "subnet": subnet}),
        )
    }
    fn switch(&self, node: &str, ip: &str) -> (u16, Value) {
        self.put(
            &format!("/v1/switches/{node}"),
            json!({"underlay_ip": ip, "vxlan_port": 4789, "underlay_mtu": 1500}),
        )
    }
    fn port(&self, body: Value) -> (u16, Value) {
        self.post("/v1/ports", body)
    }
    fn revision(&self) -> u64 {
        self.get("/v1/netstate").1["revision"].as_u64().unwrap()
    }
}

#[test]
fn network_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    let net = |body: Value| a.post("/v1/networks", body);
    let bad = "invalid_argument";
    expect(
        net(json!({"name": "a/b", "vni": 1, "subnet": "10.0.0.0/24"})),
        400,
        bad,
        "invalid network name \"a/b\": contains '/'; allowed: A-Z a-z 0-9 . _ -",
    );
    expect_has(
        net(json!({"name": "", "vni": 1, "subnet": "10.0.0.0/24"})),
        400,
        bad,
        "invalid network name \"\": must be 1 to 64 characters",
    );
    for vni in [0u64, 1 << 24] {
        expect(
            net(json!({"name": "n", "vni": vni, "subnet": "10.0.0.0/24"})),
            400,
            bad,
            &format!("vni {vni} is out of range: must be 1 to 16777215"),
        );
    }
    // Negative or > u32: the JSON type check.
    expect_has(
        net(json!({"name": "n", "vni": -1, "subnet": "10.0.0.0/24"})),
        400,
        bad,
        "vni",
    );
    expect(
        net(json!({"name": "n", "vni": 5, "subnet": "10.0.0.0"})),
        400,
        bad,
        "subnet \"10.0.0.0\" is not in CIDR form A.B.C.D/PREFIX (e.g. 10.0.0.0/24)",
    );
    expect(
        net(json!({"name": "n", "vni": 5, "subnet": "10.0.0.7/24"})),
        400,
        bad,
        "subnet 10.0.0.7/24 has host bits set; did you mean 10.0.0.0/24?",
    );
    for p in [7, 31, 32] {
        expect(
            net(json!({"name": "n", "vni": 5, "subnet": format!("10.0.0.0/{p}")})),
            400,
            bad,
            &format!("subnet \"10.0.0.0/{p}\": prefix /{p} is out of range: must be /8 to /30"),
        );
    }
    for mtu in [575, 9001] {
        expect(
            net(json!({"name": "n", "vni": 5, "subnet": "10.0.0.0/24", "mtu": mtu})),
            400,
            bad,
            &format!("mtu {mtu} is out of range: must be 576 to 9000"),
        );
    }
    for (gw, why) in [
        ("10.0.0", "gateway \"10.0.0\" is not an IPv4 address"),
        ("10.0.1.1", "gateway 10.0.1.1 is outside subnet 10.0.0.0/24"),
        (
            "10.0.0.0",
            "gateway 10.0.0.0 is the network address of subnet 10.0.0.0/24",
        ),
        (
            "10.0.0.255",
            "gateway 10.0.0.255 is the broadcast address of subnet 10.0.0.0/24",
        ),
        (
            "10.0.0.254",
            "gateway 10.0.0.254 is the DHCP server address of subnet 10.0.0.0/24 (its last usable address, which the vswitch answers for)",
        ),
    ] {
        expect(
            net(json!({"name": "n", "vni": 5, "subnet": "10.0.0.0/24", "gateway": gw})),
            400,
            bad,
            why,
        );
    }
    expect(
        net(
            json!({"name": "n", "vni": 5, "subnet": "10.0.0.0/24", "dns": ["1.1.1.1", "dns.example"]}),
        ),
        400,
        bad,
        "dns server \"dns.example\" is not an IPv4 address",
    );
    expect_has(
        net(json!({"name": "n", "vni": 5, "subnet": "10.0.0.0/24", "colour": "blue"})),
        400,
        bad,
        "unknown field",
    );
    // Nothing was made by any of those.
    assert_eq!(a.get("/v1/networks").1["items"], json!([]));

    // Created: canonical addresses, 201.
    let (s, n) = net(json!({"name": "blue", "vni": 100, "subnet": "10.0.0.0/24",
        "gateway": "10.0.0.1", "dns": ["9.9.9.9"], "mtu": 1400}));
    assert_eq!(s, 201, "{n}");
    assert_eq!(
        (
            &n["name"],
            &n["vni"],
            &n["subnet"],
            &n["mtu"],
            &n["gateway"],
            &n["dns"]
        ),
        (
            &json!("blue"),
            &json!(100),
            &json!("10.0.0.0/24"),
            &json!(1400),
            &json!("10.0.0.1"),
            &json!(["9.9.9.9"])
        )
    );
    expect(
        a.network("blue", 101, "10.1.0.0/24"),
        409,
        "already_exists",
        "network blue already exists",
    );
    expect(
        a.network("red", 100, "10.1.0.0/24"),
        409,
        "in_use",
        "vni 100 is already used by network blue",
    );
    // Overlapping subnets on different VNIs are fine (tenants pick their own).
    assert_eq!(a.network("red", 200, "10.0.0.0/24").0, 201);
    // MTU None: each vswitch picks its underlay MTU - 50.
    assert_eq!(a.get("/v1/networks/red").1["mtu"], Value::Null);
    let l = a.get("/v1/networks").1;
    assert_eq!(l["items"].as_array().unwrap().len(), 2);
    assert!(l["revision"].as_u64().unwrap() > 0);
    expect(
        a.get("/v1/networks/green"),
        404,
        "not_found",
        "network green not found",
    );
    expect(
        a.delete("/v1/networks/green"),
        404,
        "not_found",
        "network green not found",
    );
    // Deleted, the VNI and name are free again.
    assert_eq!(a.delete("/v1/networks/red").0, 204);
    assert_eq!(a.network("green", 200, "10.2.0.0/16").0, 201);
}

#[test]
fn port_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    let bad = "invalid_argument";
    let p = |extra: Value| {
        let mut b = json!({"name": "vm1", "network": "blue", "node": "h1", "kind": "tap"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        a.port(b)
    };
    // No network, no node yet.
    expect(p(json!({})), 400, bad, "network blue does not exist");
    assert_eq!(
        a.post(
            "/v1/networks",
            json!({"name": "blue", "vni": 7, "subnet": "10.0.0.0/24", "gateway": "10.0.0.1"})
        )
        .0,
        201
    );
    expect(
        p(json!({})),
        400,
        bad,
        "node h1 is not a registered vswitch or blockd node (none is registered yet)",
    );
    // Switch registration refusals.
    for (body, why) in [
        (
            json!({"underlay_ip": "h1", "vxlan_port": 4789, "underlay_mtu": 1500}),
            "underlay_ip \"h1\" is not an IPv4 address",
        ),
        (
            json!({"underlay_ip": "0.0.0.0", "vxlan_port": 4789, "underlay_mtu": 1500}),
            "underlay_ip 0.0.0.0 is not a unicast address",
        ),
        (
            json!({"underlay_ip": "198.18.0.2", "vxlan_port": 0, "underlay_mtu": 1500}),
            "vxlan_port must not be 0",
        ),
        (
            json!({"underlay_ip": "198.18.0.2", "vxlan_port": 4789, "underlay_mtu": 100}),
            "underlay_mtu 100 is out of range: must be 576 to 65535",
        ),
    ] {
        expect(a.put("/v1/switches/h1", body), 400, bad, why);
    }
    expect_has(
        a.put(
            "/v1/switches/h1",
            json!({"underlay_ip": "198.18.0.2", "vxlan_port": 70000, "underlay_mtu": 1500}),
        ),
        400,
        bad,
        "vxlan_port",
    );
    expect_has(a.switch(".h", "198.18.0.2"), 400, bad, "invalid node name");
    expect(
        a.put("/v1/switches/h1/heartbeat", json!({})),
        404,
        "not_found",
        "switch h1 is not registered",
    );
    assert_eq!(a.switch("h1", "198.18.0.2").0, 200);
    assert_eq!(a.switch("h2", "198.18.0.3").0, 200);
    expect(
        p(json!({"node": "h9"})),
        400,
        bad,
        "node h9 is not a registered vswitch or blockd node; known: h1, h2",
    );
    // A blockd node counts too.
    assert_eq!(
        a.put(
            "/v1/nodes/b1",
            json!({"address": "127.0.0.1:7800", "nbd_address": "", "disks": []})
        )
        .0,
        200
    );
    expect(
        p(json!({"node": "h9"})),
        400,
        bad,
        "node h9 is not a registered vswitch or blockd node; known: b1, h1, h2",
    );
    for (extra, why) in [
        (
            json!({"name": "a-very-long-name"}),
            "invalid port name \"a-very-long-name\": at most 15 characters (it names the interface by default), got 16",
        ),
        (
            json!({"name": "vm 1"}),
            "invalid port name \"vm 1\": contains ' '; allowed: A-Z a-z 0-9 . _ -",
        ),
        (
            json!({"ifname": "tap/0"}),
            "invalid interface name \"tap/0\": must be 1 to 15 characters of A-Z a-z 0-9 . _ - (not . or ..)",
        ),
        (
            json!({"ifname": "0123456789abcdef"}),
            "invalid interface name \"0123456789abcdef\": must be 1 to 15 characters of A-Z a-z 0-9 . _ - (not . or ..)",
        ),
        (
            json!({"mac": "02:00:00:00:01"}),
            "mac \"02:00:00:00:01\" is not of the form xx:xx:xx:xx:xx:xx (hex digits)",
        ),
        (
            json!({"mac": "01:00:5e:00:00:01"}),
            "mac 01:00:5e:00:00:01 is a multicast address; a port needs a unicast one (first octet even)",
        ),
        (
            json!({"mac": "00:00:00:00:00:00"}),
            "mac 00:00:00:00:00:00 is not a usable port address",
        ),
        (json!({"ip": "10.0.0"}), "ip \"10.0.0\" is not an IPv4 address"),
        (json!({"ip": "10.9.0.1"}), "ip 10.9.0.1 is outside subnet 10.0.0.0/24"),
        (
            json!({"ip": "10.0.0.0"}),
            "ip 10.0.0.0 is the network address of subnet 10.0.0.0/24",
        ),
        (
            json!({"ip": "10.0.0.255"}),
            "ip 10.0.0.255 is the broadcast address of subnet 10.0.0.0/24",
        ),
        (
            json!({"ip": "10.0.0.254"}),
            "ip 10.0.0.254 is the DHCP server address of subnet 10.0.0.0/24 (its last usable address, which the vswitch answers for)",
        ),
        (
            json!({"kind": "netdev", "netns": "ns1"}),
            "netns is for tap ports only: a netdev port attaches an interface that already exists in the host's namespace",
        ),
        (
            json!({"netns": "../etc"}),
            "invalid netns name \"../etc\": must not start with '.' or '-'",
        ),
        (
            json!({"netns": "a/b"}),
            "invalid netns name \"a/b\": contains '/'; allowed: A-Z a-z 0-9 . _ -",
        ),
    ] {
        expect(p(extra), 400, bad, why);
    }
    expect_has(p(json!({"kind": "vhost"})), 400, bad, "unknown variant");
    expect_has(p(json!({"node": "a/b"})), 400, bad, "invalid node name");
    // Nothing was made.
    assert_eq!(a.get("/v1/ports").1["items"], json!([]));

    // The gateway itself is allowed when given (a router VM), never allocated.
    let (s, gw) = p(json!({"name": "router", "ip": "10.0.0.1", "mac": "02:AA:00:00:00:01"}));
    assert_eq!(s, 201, "{gw}");
    assert_eq!(
        (&gw["ip"], &gw["mac"]),
        (&json!("10.0.0.1"), &json!("02:aa:00:00:00:01"))
    );
    let (s, v) = p(json!({}));
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["ip"], "10.0.0.2");
    assert_eq!(v["ifname"], "vm1");
    expect(
        p(json!({})),
        409,
        "already_exists",
        "port vm1 already exists",
    );
    expect(
        p(json!({"name": "vm2", "ip": "10.0.0.2"})),
        409,
        "in_use",
        "ip 10.0.0.2 is already used by port vm1 in network blue",
    );
    expect(
        p(json!({"name": "vm2", "mac": "02:aa:00:00:00:01"})),
        409,
        "in_use",
        "mac 02:aa:00:00:00:01 is already used by port router in network blue",
    );
    expect(
        p(json!({"name": "vm2", "ifname": "vm1"})),
        409,
        "in_use",
        "interface vm1 on node h1 is already used by port vm1",
    );
    // The same interface name on another node, the same MAC/IP in another network: fine.
    assert_eq!(
        p(json!({"name": "vm2", "ifname": "vm1", "node": "h2"})).0,
        201
    );
    assert_eq!(
        a.network("red", 8, "10.0.0.0/24").0,
        201,
        "overlapping subnet, other VNI"
    );
    let (s, r) = p(json!({"name": "r1", "network": "red", "node": "h2",
        "ip": "10.0.0.2", "mac": "02:aa:00:00:00:01", "ifname": "r1"}));
    assert_eq!(s, 201, "{r}");
    // A netdev port, ifname given (QEMU's tap).
    let (s, nd) = p(json!({"name": "vm3", "kind": "netdev", "ifname": "vnet7", "node": "b1"}));
    assert_eq!(s, 201, "{nd}");
    assert_eq!(
        (&nd["kind"], &nd["netns"]),
        (&json!("netdev"), &Value::Null)
    );

    // Filters.
    let names = |q: &str| -> Vec<String> {
        let (s, l) = a.get(&format!("/v1/ports{q}"));
        assert_eq!(s, 200, "{l}");
        l["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(""), ["r1", "router", "vm1", "vm2", "vm3"]);
    assert_eq!(names("?network=blue"), ["router", "vm1", "vm2", "vm3"]);
    assert_eq!(names("?node=h2"), ["r1", "vm2"]);
    assert_eq!(names("?network=blue&node=h2"), ["vm2"]);
    assert!(names("?network=nope").is_empty());
    expect_has(a.get("/v1/ports?colour=red"), 400, bad, "unknown field");
    expect(
        a.get("/v1/ports/nope"),
        404,
        "not_found",
        "port nope not found",
    );
    expect(
        a.delete("/v1/ports/nope"),
        404,
        "not_found",
        "port nope not found",
    );

    // A network with ports is not deleted; the message names them.
    expect(
        a.delete("/v1/networks/blue"),
        409,
        "in_use",
        "network blue has 4 ports: router, vm1, vm2, vm3; delete them first",
    );
    expect(
        a.delete("/v1/networks/red"),
        409,
        "in_use",
        "network red has 1 port: r1; delete them first",
    );
    for n in ["router", "vm1", "vm2", "vm3"] {
        assert_eq!(a.delete(&format!("/v1/ports/{n}")).0, 204);
    }
    assert_eq!(a.delete("/v1/networks/blue").0, 204);
    // Its claims are gone with the ports: the same names, MAC, IP, interface are free again.
    assert_eq!(
        a.post(
            "/v1/networks",
            json!({"name": "blue", "vni": 7, "subnet": "10.0.0.0/24"})
        )
        .0,
        201
    );
    let (s, v) = p(json!({"ip": "10.0.0.1", "mac": "02:aa:00:00:00:01"}));
    assert_eq!(s, 201, "{v}");
    assert_eq!(a.get("/v1/networks/red").0, 200);
}

#[test]
fn allocation_never_duplicates_even_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    assert_eq!(a.switch("h1", "198.18.0.2").0, 200);
    // A /27 has 30 host addresses: minus the DHCP server (.30) and the gateway (.1), 28.
    assert_eq!(
        a.post(
            "/v1/networks",
            json!({"name": "n", "vni": 9, "subnet": "10.9.0.0/27", "gateway": "10.9.0.1"})
        )
        .0,
        201
    );
    // Deterministic MAC: the same network and port name give the same MAC after a delete.
    let (_, first) = a.port(json!({"name": "d", "network": "n", "node": "h1", "kind": "tap"}));
    assert_eq!(first["ip"], "10.9.0.2");
    assert_eq!(a.delete("/v1/ports/d").0, 204);
    let (_, again) = a.port(json!({"name": "d", "network": "n", "node": "h1", "kind": "tap"}));
    assert_eq!(again["mac"], first["mac"]);
    assert!(first["mac"].as_str().unwrap().starts_with("02:"));
    assert_eq!(a.delete("/v1/ports/d").0, 204);

    // 28 concurrent creates: every one succeeds, every address and MAC is distinct.
    let ports: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..28)
            .map(|i| {
                let url = m.url.clone();
                s.spawn(move || {
                    let a = Api::new(&url);
                    a.port(json!({"name": format!("p{i}"), "network": "n", "node": "h1", "kind": "tap"}))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                let (s, p) = h.join().unwrap();
                assert_eq!(s, 201, "{p}");
                p
            })
            .collect()
    });
    let ips: HashSet<&str> = ports.iter().map(|p| p["ip"].as_str().unwrap()).collect();
    let macs: HashSet<&str> = ports.iter().map(|p| p["mac"].as_str().unwrap()).collect();
    assert_eq!((ips.len(), macs.len()), (28, 28));
    let want: HashSet<String> = (2..=29).map(|i| format!("10.9.0.{i}")).collect();
    assert_eq!(ips, want.iter().map(|s| s.as_str()).collect());
    // Full: the next one is refused with the reason.
    expect(
        a.port(json!({"name": "extra", "network": "n", "node": "h1", "kind": "tap"})),
        507,
        "no_capacity",
        "no free address in subnet 10.9.0.0/27 of network n: its 28 ports, the gateway and the DHCP server address hold all of them",
    );
    // The lowest free address comes back first.
    assert_eq!(a.delete("/v1/ports/p7").0, 204);
    assert_eq!(a.delete("/v1/ports/p3").0, 204);
    let freed: HashSet<String> = ports
        .iter()
        .filter(|p| p["name"] == "p7" || p["name"] == "p3")
        .map(|p| p["ip"].as_str().unwrap().to_string())
        .collect();
    let (_, x) = a.port(json!({"name": "x", "network": "n", "node": "h1", "kind": "tap"}));
    let lowest = freed
        .iter()
        .min_by_key(|s| s.parse::<std::net::Ipv4Addr>().unwrap())
        .unwrap();
    assert_eq!(x["ip"].as_str().unwrap(), lowest);

    // Concurrent creates asking for the same IP, MAC or VNI: exactly one wins each.
    let race = |bodies: Vec<(&'static str, Value)>| -> Vec<(u16, Value)> {
        std::thread::scope(|s| {
            let hs: Vec<_> = bodies
                .into_iter()
                .map(|(path, body)| {
                    let url = m.url.clone();
                    s.spawn(move || Api::new(&url).post(path, body))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let spare = (2..=29)
        .map(|i| format!("10.9.0.{i}"))
        .find(|ip| ip != lowest && freed.contains(ip))
        .unwrap();
    let got = race(
        (0..8)
            .map(|i| {
                (
                    "/v1/ports",
                    json!({"name": format!("q{i}"), "network": "n", "node": "h1", "kind": "tap", "ip": spare}),
                )
            })
            .collect(),
    );
    assert_eq!(got.iter().filter(|r| r.0 == 201).count(), 1, "{got:?}");
    for r in got.iter().filter(|r| r.0 != 201) {
        assert_eq!((r.0, &r.1["code"]), (409, &json!("in_use")), "{r:?}");
    }
    let got = race(
        (0..8)
            .map(|i| {
                (
                    "/v1/networks",
                    json!({"name": format!("v{i}"), "vni": 4242, "subnet": "10.4.0.0/16"}),
                )
            })
            .collect(),
    );
    assert_eq!(got.iter().filter(|r| r.0 == 201).count(), 1, "{got:?}");
    assert!(got.iter().filter(|r| r.0 != 201).all(|r| r.0 == 409
        && r.1["message"]
            .as_str()
            .unwrap()
            .starts_with("vni 4242 is already used by network v")));
    assert_eq!(a.network("m", 43, "10.43.0.0/24").0, 201);
    let got = race(
        (0..8)
            .map(|i| {
                (
                    "/v1/ports",
                    json!({"name": format!("m{i}"), "network": "m", "node": "h1", "kind": "tap", "mac": "02:42:00:00:00:01"}),
                )
            })
            .collect(),
    );
    assert_eq!(got.iter().filter(|r| r.0 == 201).count(), 1, "{got:?}");
    // The final state agrees: no two ports of a network share an IP or MAC.
    let l = a.get("/v1/ports").1;
    let mut seen = HashSet::new();
    for p in l["items"].as_array().unwrap() {
        let net = p["network"].as_str().unwrap();
        assert!(seen.insert((net.to_string(), p["ip"].to_string())), "{p}");
        assert!(seen.insert((net.to_string(), p["mac"].to_string())), "{p}");
    }
}

#[test]
fn netstate_watch_wakes_on_changes_not_on_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &["--down-after", "1500ms"]);
    let a = Api::new(&m.url);
    assert_eq!(a.network("blue", 5, "10.5.0.0/24").0, 201);
    assert_eq!(a.switch("h1", "198.18.0.2").0, 200);

    // Waits in the background; returns (how long it took, the answer).
    let watch = |after: u64, timeout_ms: u64| {
        let url = m.url.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let (s, v) = Api::new(&url).get(&format!(
                "/v1/netstate?after_revision={after}&timeout_ms={timeout_ms}"
            ));
            assert_eq!(s, 200, "{v}");
            (t.elapsed(), v)
        })
    };
    let hb = |stats: Value| {
        assert_eq!(
            a.put("/v1/switches/h1/heartbeat", json!({"ports": stats}))
                .0,
            204
        );
    };

    // Heartbeats and an unchanged re-registration do not wake a watcher.
    let rev = a.revision();
    let w = watch(rev, 1500);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(250));
        hb(json!({}));
    }
    assert_eq!(a.switch("h1", "198.18.0.2").0, 200);
    let (took, v) = w.join().unwrap();
    assert!(took >= Duration::from_millis(1400), "woke after {took:?}");
    assert_eq!(v["revision"], rev);
    assert_eq!(a.revision(), rev);

    // A port create wakes it at once, and the answer has the port.
    let rev = a.revision();
    let w = watch(rev, 20_000);
    std::thread::sleep(Duration::from_millis(200));
    let (s, p) = a.port(json!({"name": "vm1", "network": "blue", "node": "h1", "kind": "tap"}));
    assert_eq!(s, 201, "{p}");
    let (took, v) = w.join().unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(v["revision"].as_u64().unwrap() > rev);
    assert_eq!(v["ports"][0]["name"], "vm1");
    assert_eq!(
        v["ports"][0]["stats"],
        Value::Null,
        "no counters in netstate"
    );
    assert_eq!(v["networks"][0]["name"], "blue");

    // A switch registering wakes it.
    let rev = v["revision"].as_u64().unwrap();
    let w = watch(rev, 20_000);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(a.switch("h2", "198.18.0.3").0, 200);
    let (took, v) = w.join().unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    let switches: Vec<&str> = v["switches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["node"].as_str().unwrap())
        .collect();
    assert_eq!(switches, ["h1", "h2"]);
    assert_eq!(v["switches"][1]["state"], "up");
    // So does a re-registration that changes something (the MTU).
    let rev = v["revision"].as_u64().unwrap();
    let w = watch(rev, 20_000);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        a.put(
            "/v1/switches/h2",
            json!({"underlay_ip": "198.18.0.3", "vxlan_port": 4789, "underlay_mtu": 9000})
        )
        .0,
        200
    );
    let (took, v) = w.join().unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(v["switches"][1]["underlay_mtu"], 9000);

    // h2 stops beating (h1 goes on): after --down-after it is recorded down, which wakes
    // the watch; h1 stays up.
    let rev = v["revision"].as_u64().unwrap();
    let w = watch(rev, 20_000);
    let t = Instant::now();
    let beat = std::thread::scope(|s| {
        let h = s.spawn(|| {
            for _ in 0..8 {
                hb(json!({}));
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let r = w.join().unwrap();
        h.join().unwrap();
        r
    });
    let (took, v) = beat;
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(v["switches"][0]["state"], "up", "{v}");
    assert_eq!(v["switches"][1]["state"], "down", "{v}");
    let l = a.get("/v1/switches").1;
    assert_eq!(l["items"][1]["state"], "down");
    let text = common::client()
        .get(format!("{}/metrics", m.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for line in [
        "volume_mgr_networks 1\n",
        "volume_mgr_ports 1\n",
        "volume_mgr_switches{state=\"down\"} 1\n",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    // Its next heartbeat records it up again, and wakes the watch.
    let rev = v["revision"].as_u64().unwrap();
    let w = watch(rev, 20_000);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.put("/v1/switches/h2/heartbeat", json!({})).0, 204);
    let (took, v) = w.join().unwrap();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(v["switches"][1]["state"], "up", "{v}");
    // The same revision always gives the same answer.
    let now = a.get("/v1/netstate").1;
    if now["revision"] == v["revision"] {
        assert_eq!(now, v);
    }
    expect_has(
        a.get("/v1/netstate?after_revision=x"),
        400,
        "invalid_argument",
        "after_revision",
    );
}

#[test]
fn port_counters_come_from_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    assert_eq!(a.network("blue", 5, "10.5.0.0/24").0, 201);
    assert_eq!(a.switch("h1", "198.18.0.2").0, 200);
    assert_eq!(
        a.port(json!({"name": "vm1", "network": "blue", "node": "h1", "kind": "tap"}))
            .0,
        201
    );
    assert_eq!(a.get("/v1/ports/vm1").1["stats"], Value::Null);
    let stats = json!({"rx_packets": 10, "rx_bytes": 1000, "tx_packets": 7, "tx_bytes": 700,
        "drops": {"spoofed_mac": 2, "oversize": 1}, "attached": true});
    assert_eq!(
        a.put(
            "/v1/switches/h1/heartbeat",
            json!({"ports": {"vm1": stats, "gone": {"rx_packets": 1, "rx_bytes": 1, "tx_packets": 0, "tx_bytes": 0}}})
        )
        .0,
        204
    );
    assert_eq!(a.get("/v1/ports/vm1").1["stats"], stats);
    assert_eq!(a.get("/v1/ports").1["items"][0]["stats"], stats);
    // A port's counters come from its own node's switch only.
    assert_eq!(a.switch("h2", "198.18.0.3").0, 200);
    assert_eq!(
        a.put(
            "/v1/switches/h2/heartbeat",
            json!({"ports": {"vm1": {"rx_packets": 99, "rx_bytes": 99, "tx_packets": 0, "tx_bytes": 0}}})
        )
        .0,
        204
    );
    assert_eq!(a.get("/v1/ports/vm1").1["stats"], stats);
    // The next heartbeat replaces them.
    assert_eq!(
        a.put("/v1/switches/h1/heartbeat", json!({"ports": {}})).0,
        204
    );
    assert_eq!(a.get("/v1/ports/vm1").1["stats"], Value::Null);
    expect_has(
        a.put(
            "/v1/switches/h1/heartbeat",
            json!({"ports": {"vm1": {"rx_packets": 1}}}),
        ),
        400,
        "invalid_argument",
        "missing field",
    );
}

#[test]
fn state_survives_a_restart_and_switches_get_a_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let m = start(dir.path(), &["--down-after", "1s"]);
        let a = Api::new(&m.url);
        assert_eq!(a.network("blue", 5, "10.5.0.0/24").0, 201);
        assert_eq!(a.switch("h1", "198.18.0.2").0, 200);
        assert_eq!(a.switch("h2", "198.18.0.3").0, 200);
        assert_eq!(
            a.port(json!({"name": "vm1", "network": "blue", "node": "h1", "kind": "tap"}))
                .0,
            201
        );
        a.get("/v1/netstate").1
    }; // SIGKILL
    let m = start(dir.path(), &["--down-after", "1s"]);
    let a = Api::new(&m.url);
    let t = Instant::now();
    // Right after the restart the switches keep their recorded state…
    assert_eq!(a.get("/v1/netstate").1, before);
    // …h1 beats and stays up; h2 does not and is recorded down after --down-after.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(a.put("/v1/switches/h1/heartbeat", json!({})).0, 204);
        let v = a.get("/v1/netstate").1;
        assert_eq!(v["switches"][0]["state"], "up");
        if v["switches"][1]["state"] == "down" {
            assert!(
                t.elapsed() >= Duration::from_millis(900),
                "{:?}",
                t.elapsed()
            );
            break;
        }
        assert!(Instant::now() < deadline, "h2 never recorded down: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The claims survived too.
    expect(
        a.port(json!({"name": "vm2", "network": "blue", "node": "h1", "kind": "tap", "ip": "10.5.0.1"})),
        409,
        "in_use",
        "ip 10.5.0.1 is already used by port vm1 in network blue",
    );
    expect(
        a.network("red", 5, "10.6.0.0/24"),
        409,
        "in_use",
        "vni 5 is already used by network blue",
    );
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

#[test]
fn client_methods() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    block_on(async {
        let c = volume_mgr::client::Client::new(vec![m.url.clone()]);
        let n = c
            .create_network(&api::CreateNetwork {
                name: "blue".into(),
                vni: 10,
                subnet: "10.10.0.0/24".into(),
                mtu: None,
                gateway: Some("10.10.0.1".into()),
                dns: vec!["10.10.0.53".into()],
            })
            .await
            .unwrap();
        assert_eq!(c.get_network("blue").await.unwrap(), n);
        assert_eq!(c.list_networks().await.unwrap().items, vec![n.clone()]);
        let e = c.get_network("nope").await.unwrap_err();
        assert!(e.is_not_found(), "{e}");
        let sw = c
            .register_switch(
                "h1",
                &api::RegisterSwitch {
                    underlay_ip: "198.18.0.2".into(),
                    vxlan_port: 4789,
                    underlay_mtu: 1500,
                },
            )
            .await
            .unwrap();
        assert_eq!((sw.node.as_str(), sw.state), ("h1", api::NodeState::Up));
        let e = c
            .switch_heartbeat("h9", &api::SwitchHeartbeat::default())
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        let p = c
            .create_port(&api::CreatePort {
                name: "vm1".into(),
                network: "blue".into(),
                node: "h1".into(),
                kind: api::PortKind::Tap,
                mac: None,
                ip: None,
                netns: Some("vm1".into()),
                ifname: None,
                vip: None,
            })
            .await
            .unwrap();
        assert_eq!((p.ip.as_str(), p.ifname.as_str()), ("10.10.0.2", "vm1"));
        let e = c
            .create_port(&api::CreatePort {
                name: "vm2".into(),
                network: "blue".into(),
                node: "h1".into(),
                kind: api::PortKind::Netdev,
                mac: Some(p.mac.clone()),
                ip: None,
                netns: None,
                ifname: None,
                vip: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "mac {} is already used by port vm1 in network blue (in_use, HTTP 409)",
                p.mac
            )
        );
        let st = c.net_state().await.unwrap();
        assert_eq!(st.networks, vec![n.clone()]);
        assert_eq!(st.ports, vec![p.clone()]);
        assert_eq!(st.switches.len(), 1);
        // The watch: times out unchanged, wakes on a change.
        let t = Instant::now();
        let same = c
            .watch_net_state(st.revision, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(250));
        assert_eq!(same, st);
        let mut stats = api::PortStats {
            rx_packets: 3,
            attached: true,
            ..Default::default()
        };
        stats.drops.insert("unknown_vni".into(), 4);
        c.switch_heartbeat(
            "h1",
            &api::SwitchHeartbeat {
                ports: [("vm1".to_string(), stats.clone())].into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(c.get_port("vm1").await.unwrap().stats, Some(stats.clone()));
        let l = c.list_ports(Some("blue"), Some("h1")).await.unwrap();
        assert_eq!(l.items.len(), 1);
        assert_eq!(l.items[0].stats, Some(stats));
        assert!(c
            .list_ports(Some("blue"), Some("h2"))
            .await
            .unwrap()
            .items
            .is_empty());
        assert!(c
            .list_ports(Some("a b&c"), None)
            .await
            .unwrap()
            .items
            .is_empty());
        assert_eq!(c.list_ports(None, None).await.unwrap().items.len(), 1);
        assert_eq!(c.list_switches().await.unwrap().items[0].node, "h1");
        let watcher = {
            let c = c.clone();
            let rev = st.revision;
            tokio::spawn(async move { c.watch_net_state(rev, Duration::from_secs(20)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = c.delete_network("blue").await.unwrap_err();
        assert!(e.to_string().contains("in_use"), "{e}");
        c.delete_port("vm1").await.unwrap();
        let woke = watcher.await.unwrap().unwrap();
        assert!(woke.revision > st.revision && woke.ports.is_empty());
        c.delete_network("blue").await.unwrap();
        assert!(c.delete_port("vm1").await.unwrap_err().is_not_found());
        assert!(c.list_networks().await.unwrap().items.is_empty());
    });
}
