//! A VIP's own overlay port (`CreatePort::vip`) and moving a port (`PUT /v1/ports/{name}/node`)
//! against the real volume-mgr binary over HTTP: who may take a VIP's address, one port per
//! VIP, the VIP's delete taking its port along (and waking netstate watches), a move's index
//! claims and refusals.

mod common;

use common::start;
use reqwest::blocking::Client;
use serde_json::{json, Value};

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

#[test]
fn vip_ports_and_port_moves() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let c = common::client();
    let u = |p: &str| format!("{}{p}", m.url);
    let post = |p: &str, b: Value| call(&c, "POST", &u(p), Some(b));
    let put = |p: &str, b: Value| call(&c, "PUT", &u(p), Some(b));
    let get = |p: &str| call(&c, "GET", &u(p), None);
    let del = |p: &str| call(&c, "DELETE", &u(p), None);
    let rev = || get("/v1/netstate").1["revision"].as_u64().unwrap();

    for (n, ip) in [("h1", "198.18.0.1"), ("h2", "198.18.0.2")] {
        let r = put(
            &format!("/v1/switches/{n}"),
            json!({"underlay_ip": ip, "vxlan_port": 4789, "underlay_mtu": 1500}),
        );
        assert_eq!(r.0, 200, "{:?}", r.1);
    }
    for (n, vni, s) in [("blue", 100, "10.1.0.0/24"), ("red", 200, "10.2.0.0/24")] {
        let r = post("/v1/networks", json!({"name": n, "vni": vni, "subnet": s}));
        assert_eq!(r.0, 201, "{:?}", r.1);
    }
    let vip = |name: &str, addr: &str, net: Option<&str>| {
        let mut b = json!({"name": name, "addr": addr, "proto": "tcp"});
        if let Some(n) = net {
            b["network"] = json!(n);
        }
        let r = post("/v1/vips", b);
        assert_eq!(r.0, 201, "{:?}", r.1);
    };
    vip("web", "10.1.0.50:80", Some("blue"));
    vip("host", "192.0.2.7:80", None);
    let port = |name: &str, extra: Value| {
        let mut b = json!({"name": name, "network": "blue", "node": "h2", "kind": "tap"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post("/v1/ports", b)
    };

    // Refusals.
    expect_has(
        port("imp", json!({"ip": "10.1.0.50"})),
        409,
        "in_use",
        "is the address of vip web",
    );
    expect_has(
        port("imp", json!({"vip": "nosuch"})),
        400,
        "invalid_argument",
        "vip nosuch does not exist",
    );
    expect_has(
        port("imp", json!({"vip": "host"})),
        400,
        "invalid_argument",
        "it is on no overlay network",
    );
    expect_has(
        post(
            "/v1/ports",
            json!({"name": "imp", "network": "red", "node": "h2", "kind": "tap", "vip": "web"}),
        ),
        400,
        "invalid_argument",
        "vip web is not on network red (it is on network blue)",
    );
    expect_has(
        port("imp", json!({"vip": "web", "ip": "10.1.0.51"})),
        400,
        "invalid_argument",
        "must have the vip's address 10.1.0.50",
    );
    let r = post(
        "/v1/ports",
        json!({"name": "x", "network": "blue", "node": "h2", "kind": "tap", "vip": 7}),
    );
    assert_eq!(r.0, 400, "{:?}", r.1);

    // The VIP's port: its address comes from the VIP.
    let r = port(
        "vip-web",
        json!({"vip": "web", "netns": "fabvip-blue", "ifname": "fvabc", "mac": "02:fb:00:00:00:01"}),
    );
    assert_eq!(r.0, 201, "{:?}", r.1);
    assert_eq!(r.1["ip"], "10.1.0.50");
    assert_eq!(r.1["vip"], "web");
    assert_eq!(get("/v1/ports/vip-web").1["vip"], "web");
    expect_has(
        port("vip-web2", json!({"vip": "web", "ifname": "fvabd"})),
        409,
        "in_use",
        "vip web already has port vip-web",
    );
    // An ordinary port never gets the VIP's address allocated.
    let r = port("vm1", json!({}));
    assert_eq!(r.0, 201, "{:?}", r.1);
    assert_ne!(r.1["ip"], "10.1.0.50");
    // Without the vip field, ports do not show one.
    assert!(r.1.get("vip").is_none(), "{:?}", r.1);

    // Moves.
    expect_has(
        put("/v1/ports/vip-web/node", json!({"node": "h9"})),
        400,
        "invalid_argument",
        "node h9 is not a registered",
    );
    expect_has(
        put("/v1/ports/nosuch/node", json!({"node": "h1"})),
        404,
        "not_found",
        "port nosuch not found",
    );
    let r = put("/v1/ports/vip-web/node", json!({"node": "h1", "x": 1}));
    assert_eq!(r.0, 400, "{:?}", r.1);
    let r = put("/v1/ports/vip-web/node", json!({}));
    assert_eq!(r.0, 400, "{:?}", r.1);
    let before = rev();
    let r = put("/v1/ports/vip-web/node", json!({"node": "h2"}));
    assert_eq!((r.0, r.1["node"].clone()), (200, json!("h2")));
    assert_eq!(rev(), before, "a move to the same node is not a write");
    // An interface name taken on the target node refuses the move.
    let r = post(
        "/v1/ports",
        json!({"name": "clash", "network": "red", "node": "h1", "kind": "tap", "ifname": "fvabc"}),
    );
    assert_eq!(r.0, 201, "{:?}", r.1);
    expect_has(
        put("/v1/ports/vip-web/node", json!({"node": "h1"})),
        409,
        "in_use",
        "interface fvabc on node h1 is already used by port clash",
    );
    assert_eq!(del("/v1/ports/clash").0, 204);
    let r = put("/v1/ports/vip-web/node", json!({"node": "h1"}));
    assert_eq!(r.0, 200, "{:?}", r.1);
    assert_eq!(
        (
            r.1["node"].clone(),
            r.1["ip"].clone(),
            r.1["ifname"].clone()
        ),
        (json!("h1"), json!("10.1.0.50"), json!("fvabc"))
    );
    assert!(rev() > before);
    // The old node's interface name is free again, the new node's taken.
    let r = post(
        "/v1/ports",
        json!({"name": "reuse", "network": "red", "node": "h2", "kind": "tap", "ifname": "fvabc"}),
    );
    assert_eq!(r.0, 201, "{:?}", r.1);
    expect_has(
        post(
            "/v1/ports",
            json!({"name": "reuse2", "network": "red", "node": "h1", "kind": "tap", "ifname": "fvabc"}),
        ),
        409,
        "in_use",
        "already used by port vip-web",
    );
    let ns = get("/v1/netstate").1;
    let p = ns["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "vip-web")
        .unwrap()
        .clone();
    assert_eq!(p["node"], "h1");

    // Deleting the VIP deletes its port (one commit, seen by netstate watchers).
    let before = rev();
    assert_eq!(del("/v1/vips/web").0, 204);
    assert!(rev() > before);
    assert_eq!(get("/v1/ports/vip-web").0, 404);
    // Its claims went too: the address, the MAC and the interface are free.
    let r = port(
        "again",
        json!({"ip": "10.1.0.50", "mac": "02:fb:00:00:00:01", "ifname": "fvabc", "node": "h1"}),
    );
    assert_eq!(r.0, 201, "{:?}", r.1);
    // A VIP without a port deletes as before; the network empties.
    assert_eq!(del("/v1/vips/host").0, 204);
    for p in ["again", "vm1"] {
        assert_eq!(del(&format!("/v1/ports/{p}")).0, 204);
    }
    assert_eq!(del("/v1/networks/blue").0, 204);
}
