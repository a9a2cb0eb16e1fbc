//! Load-balanced VIPs against the real volume-mgr binary over HTTP: every refusal with its 4xx
//! and one-line reason, backends added, removed and drained, the `GET /v1/vips` watch (wakes
//! on VIP and backend changes, not on reports), the instances' reports (in answers while
//! fresh, gone after `--down-after`, not stored), durability across a restart, and the client
//! library's methods.

mod common;

use common::start;
use reqwest::blocking::Client;
use serde_json::{json, Value};
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
    fn post_empty(&self, path: &str) -> (u16, Value) {
        call(&self.c, "POST", &format!("{}{path}", self.url), None)
    }
    fn put(&self, path: &str, body: Value) -> (u16, Value) {
        call(&self.c, "PUT", &format!("{}{path}", self.url), Some(body))
    }
    fn delete(&self, path: &str) -> (u16, Value) {
        call(&self.c, "DELETE", &format!("{}{path}", self.url), None)
    }
    fn vip(&self, body: Value) -> (u16, Value) {
        self.post("/v1/vips", body)
    }
    fn backend(&self, vip: &str, body: Value) -> (u16, Value) {
        self.post(&format!("/v1/vips/{vip}/backends"), body)
    }
    fn revision(&self) -> u64 {
        self.get("/v1/vips").1["revision"].as_u64().unwrap()
    }
    fn names(&self) -> Vec<String> {
        self.get("/v1/vips").1["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }
}

const BAD: &str = "invalid_argument";

#[test]
fn vip_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    let web = |extra: Value| {
        let mut b = json!({"name": "web", "addr": "192.0.2.10:80", "proto": "tcp"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"name": "a/b"}),
            "invalid vip name \"a/b\": contains '/'; allowed: A-Z a-z 0-9 . _ -",
        ),
        (
            json!({"addr": "192.0.2.10"}),
            "addr \"192.0.2.10\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80)",
        ),
        (
            json!({"addr": "web.example:80"}),
            "addr \"web.example:80\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80)",
        ),
        (
            json!({"addr": "192.0.2.10:0"}),
            "addr 192.0.2.10:0 has port 0: give the port it listens on (1 to 65535)",
        ),
        (
            json!({"addr": "0.0.0.0:80"}),
            "addr 0.0.0.0:80: 0.0.0.0 is not a unicast address",
        ),
        (
            json!({"persist_secs": 86401}),
            "persist_secs 86401 is out of range: must be 0 to 86400 seconds",
        ),
        (
            json!({"drain_secs": 100000}),
            "drain_secs 100000 is out of range: must be 0 to 86400 seconds",
        ),
        (
            json!({"maglev_table_size": 65536}),
            "maglev_table_size 65536 is not a prime from 7 to 1048573 (default 65537)",
        ),
        (
            json!({"maglev_table_size": 5}),
            "maglev_table_size 5 is not a prime from 7 to 1048573 (default 65537)",
        ),
        (
            json!({"check": {"kind": "tcp", "http_path": "/"}}),
            "http_path and http_status are for http checks only",
        ),
        (
            json!({"check": {"kind": "http"}}),
            "an http check needs http_path (e.g. /healthz)",
        ),
        (
            json!({"check": {"kind": "http", "http_path": "health"}}),
            "http_path \"health\" must start with / and be printable ASCII without spaces, at most 1024 characters",
        ),
        (
            json!({"check": {"kind": "http", "http_path": "/", "http_status": 99}}),
            "http_status 99 is out of range: must be 100 to 599",
        ),
        (
            json!({"check": {"kind": "tcp", "interval_ms": 50}}),
            "check interval_ms 50 is out of range: must be 100 to 3600000",
        ),
        (
            json!({"check": {"kind": "tcp", "interval_ms": 1000, "timeout_ms": 1500}}),
            "check timeout_ms 1500 is out of range: must be 10 to the interval (1000 ms)",
        ),
        (
            json!({"check": {"kind": "tcp", "rise": 0}}),
            "check rise 0 is out of range: must be 1 to 100",
        ),
        (
            json!({"check": {"kind": "tcp", "fall": 101}}),
            "check fall 101 is out of range: must be 1 to 100",
        ),
        (json!({"network": "nope"}), "network nope does not exist"),
    ];
    for (extra, why) in cases {
        expect(a.vip(web(extra.clone())), 400, BAD, why);
    }
    // Wrong types and unknown values: the JSON checks, one line naming the field or value.
    expect_has(a.vip(web(json!({"proto": "sctp"}))), 400, BAD, "sctp");
    expect_has(a.vip(web(json!({"algo": "random"}))), 400, BAD, "random");
    expect_has(
        a.vip(web(json!({"algo": "source-hash"}))),
        400,
        BAD,
        "source-hash",
    );
    expect_has(a.vip(web(json!({"colour": 1}))), 400, BAD, "unknown field");
    expect_has(
        a.vip(web(json!({"persist_secs": -1}))),
        400,
        BAD,
        "persist_secs",
    );
    expect_has(
        a.vip(json!({"name": "web", "addr": "192.0.2.10:80"})),
        400,
        BAD,
        "proto",
    );
    // Nothing was made by any of those.
    assert!(a.names().is_empty());
    assert_eq!(a.revision(), a.get("/v1/cluster").1["revision"]);

    // Created with every default filled in.
    let (s, v) = a.vip(web(json!({})));
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (&v["addr"], &v["proto"], &v["algo"], &v["network"]),
        (
            &json!("192.0.2.10:80"),
            &json!("tcp"),
            &json!("rr"),
            &Value::Null
        )
    );
    assert_eq!(
        (&v["persist_secs"], &v["drain_secs"], &v["proxy_protocol"]),
        (&json!(0), &json!(30), &json!(false))
    );
    assert_eq!(v["maglev_table_size"], 65537);
    assert_eq!(
        v["check"],
        json!({"kind": "tcp", "http_path": null, "http_status": null, "interval_ms": 2000,
            "timeout_ms": 1000, "rise": 2, "fall": 3})
    );
    assert_eq!((&v["backends"], &v["reports"]), (&json!([]), &json!({})));

    // Duplicates: the name; the address and protocol (naming the holder, whatever the
    // spelling); the same address over the other protocol is another VIP.
    expect(
        a.vip(web(json!({"addr": "192.0.2.11:80"}))),
        409,
        "already_exists",
        "vip web already exists",
    );
    expect(
        a.vip(json!({"name": "web2", "addr": "192.0.2.10:80", "proto": "tcp"})),
        409,
        "in_use",
        "tcp 192.0.2.10:80 is already served by vip web",
    );
    assert_eq!(
        a.vip(
            json!({"name": "dns", "addr": "192.0.2.10:80", "proto": "udp", "algo": "source_hash"})
        )
        .0,
        201
    );
    let (s, v6) = a.vip(
        json!({"name": "v6", "addr": "[2001:DB8::0:1]:443", "proto": "tcp", "algo": "maglev"}),
    );
    assert_eq!((s, &v6["addr"]), (201, &json!("[2001:db8::1]:443")));
    expect(
        a.vip(json!({"name": "v6b", "addr": "[2001:db8:0::1]:443", "proto": "tcp"})),
        409,
        "in_use",
        "tcp [2001:db8::1]:443 is already served by vip v6",
    );

    // On an overlay network: inside the subnet, not a reserved address, the gateway or a
    // port's address.
    assert_eq!(
        a.post(
            "/v1/networks",
            json!({"name": "blue", "vni": 5, "subnet": "10.5.0.0/24", "gateway": "10.5.0.1"})
        )
        .0,
        201
    );
    assert_eq!(
        a.put(
            "/v1/switches/h1",
            json!({"underlay_ip": "198.18.0.2", "vxlan_port": 4789, "underlay_mtu": 1500})
        )
        .0,
        200
    );
    let (s, p) = a.post(
        "/v1/ports",
        json!({"name": "vm1", "network": "blue", "node": "h1", "kind": "tap", "ip": "10.5.0.7"}),
    );
    assert_eq!(s, 201, "{p}");
    let on_blue = |name: &str, addr: &str| {
        a.vip(json!({"name": name, "addr": addr, "proto": "tcp", "network": "blue"}))
    };
    expect(
        on_blue("b", "10.6.0.20:80"),
        400,
        BAD,
        "vip address 10.6.0.20 is outside subnet 10.5.0.0/24",
    );
    expect(
        on_blue("b", "10.5.0.255:80"),
        400,
        BAD,
        "vip address 10.5.0.255 is the broadcast address of subnet 10.5.0.0/24",
    );
    expect_has(
        on_blue("b", "10.5.0.254:80"),
        400,
        BAD,
        "vip address 10.5.0.254 is the DHCP server address of subnet 10.5.0.0/24",
    );
    expect(
        on_blue("b", "10.5.0.1:80"),
        400,
        BAD,
        "vip address 10.5.0.1 is the gateway of network blue",
    );
    expect(
        on_blue("b", "[2001:db8::5]:80"),
        400,
        BAD,
        "vip address 2001:db8::5 is not IPv4: overlay networks are IPv4",
    );
    expect(
        on_blue("b", "10.5.0.7:80"),
        409,
        "in_use",
        "vip address 10.5.0.7 is already used by port vm1 in network blue",
    );
    let (s, b) = on_blue("b", "10.5.0.20:80");
    assert_eq!((s, &b["network"]), (201, &json!("blue")), "{b}");
    assert_eq!(a.names(), ["b", "dns", "v6", "web"]);
    // The other way round: a port cannot take the VIP's address, allocation skips it, and the
    // network cannot go while the VIP is on it.
    expect(
        a.post(
            "/v1/ports",
            json!({"name": "vm2", "network": "blue", "node": "h1", "kind": "tap", "ip": "10.5.0.20"}),
        ),
        409,
        "in_use",
        "ip 10.5.0.20 is the address of vip b in network blue",
    );
    for i in 0..20 {
        let (s, p) = a.post(
            "/v1/ports",
            json!({"name": format!("auto{i}"), "network": "blue", "node": "h1", "kind": "tap"}),
        );
        assert_eq!(s, 201, "{p}");
        assert_ne!(
            p["ip"],
            json!("10.5.0.20"),
            "allocated the VIP's address: {p}"
        );
    }
    for i in 0..20 {
        assert_eq!(a.delete(&format!("/v1/ports/auto{i}")).0, 204);
    }
    assert_eq!(a.delete("/v1/ports/vm1").0, 204);
    expect(
        a.delete("/v1/networks/blue"),
        409,
        "in_use",
        "network blue has 1 vip: b; delete them first",
    );

    // The resource in the path: 404.
    expect(
        a.get("/v1/vips/nope"),
        404,
        "not_found",
        "vip nope not found",
    );
    expect(
        a.delete("/v1/vips/nope"),
        404,
        "not_found",
        "vip nope not found",
    );
    // Delete frees the address for another VIP.
    assert_eq!(a.delete("/v1/vips/web").0, 204);
    expect(a.get("/v1/vips/web"), 404, "not_found", "vip web not found");
    let (s, w) = a.vip(json!({"name": "web2", "addr": "192.0.2.10:80", "proto": "tcp"}));
    assert_eq!(s, 201, "{w}");
}

#[test]
fn backends_are_added_removed_and_drained() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    let (s, _) = a.vip(
        json!({"name": "web", "addr": "192.0.2.10:80", "proto": "tcp",
        "drain_secs": 5, "maglev_table_size": 7}),
    );
    assert_eq!(s, 201);

    // Added: defaults, order kept, canonical addresses.
    let (s, v) = a.backend("web", json!({"addr": "10.0.0.1:8080"}));
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        v["backends"],
        json!([{"addr": "10.0.0.1:8080", "weight": 1, "max_conns": null, "state": "active",
            "drain_started_ms": null}])
    );
    let (s, v) = a.backend(
        "web",
        json!({"addr": "[::1]:8080", "weight": 256, "max_conns": 100}),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["backends"][1]["addr"], "[::1]:8080");
    assert_eq!(
        (&v["backends"][1]["weight"], &v["backends"][1]["max_conns"]),
        (&json!(256), &json!(100))
    );

    // Refusals.
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"addr": "10.0.0.1:8080"}),
            409,
            "already_exists",
            "backend 10.0.0.1:8080 is already in vip web (active)",
        ),
        (
            json!({"addr": "[0:0::1]:8080"}),
            409,
            "already_exists",
            "backend [::1]:8080 is already in vip web (active)",
        ),
        (
            json!({"addr": "10.0.0.2:8080", "weight": 0}),
            400,
            BAD,
            "weight 0 is out of range: must be 1 to 256",
        ),
        (
            json!({"addr": "10.0.0.2:8080", "weight": 257}),
            400,
            BAD,
            "weight 257 is out of range: must be 1 to 256",
        ),
        (
            json!({"addr": "10.0.0.2:8080", "max_conns": 0}),
            400,
            BAD,
            "max_conns must be at least 1 (leave it out for no limit)",
        ),
        (
            json!({"addr": "10.0.0.2"}),
            400,
            BAD,
            "backend \"10.0.0.2\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80)",
        ),
        (
            json!({"addr": "10.0.0.2:0"}),
            400,
            BAD,
            "backend 10.0.0.2:0 has port 0: give the port it listens on (1 to 65535)",
        ),
        (
            json!({"addr": "224.0.0.9:80"}),
            400,
            BAD,
            "backend 224.0.0.9:80: 224.0.0.9 is not a unicast address",
        ),
    ];
    for (body, status, code, why) in cases {
        expect(a.backend("web", body), status, code, why);
    }
    expect_has(
        a.backend("web", json!({"addr": "10.0.0.2:80", "weight": -1})),
        400,
        BAD,
        "weight",
    );
    expect(
        a.backend("nope", json!({"addr": "10.0.0.2:80"})),
        404,
        "not_found",
        "vip nope not found",
    );
    assert_eq!(
        a.get("/v1/vips/web").1["backends"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Drain: state and start time; again changes nothing (same time, same revision).
    let rev = a.revision();
    let t0 = volume_mgr::server::now_ms();
    let (s, v) = a.post_empty("/v1/vips/web/backends/10.0.0.1:8080/drain");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["backends"][0]["state"], "draining");
    let started = v["backends"][0]["drain_started_ms"].as_u64().unwrap();
    assert!(started >= t0 && started <= volume_mgr::server::now_ms());
    assert_eq!(v["backends"][1]["state"], "active");
    let rev2 = a.revision();
    assert!(rev2 > rev);
    std::thread::sleep(Duration::from_millis(20));
    let (s, v) = a.post_empty("/v1/vips/web/backends/10.0.0.1:8080/drain");
    assert_eq!(s, 200);
    assert_eq!(v["backends"][0]["drain_started_ms"], started);
    assert_eq!(a.revision(), rev2);
    expect(
        a.backend("web", json!({"addr": "10.0.0.1:8080"})),
        409,
        "already_exists",
        "backend 10.0.0.1:8080 is already in vip web (draining)",
    );
    // Paths: IPv6 escaped, unknown backend or VIP, bad address.
    let (s, v) = a.post_empty("/v1/vips/web/backends/%5B::1%5D:8080/drain");
    assert_eq!((s, &v["backends"][1]["state"]), (200, &json!("draining")));
    expect(
        a.post_empty("/v1/vips/web/backends/10.0.0.9:8080/drain"),
        404,
        "not_found",
        "backend 10.0.0.9:8080 is not in vip web",
    );
    expect(
        a.post_empty("/v1/vips/nope/backends/10.0.0.1:8080/drain"),
        404,
        "not_found",
        "vip nope not found",
    );
    expect(
        a.delete("/v1/vips/web/backends/10.0.0.1"),
        400,
        BAD,
        "backend \"10.0.0.1\" is not an IP:PORT address (e.g. 192.0.2.10:80 or [2001:db8::1]:80)",
    );
    expect(
        a.delete("/v1/vips/web/backends/10.0.0.1:0"),
        400,
        BAD,
        "backend 10.0.0.1:0 has port 0: give the port it listens on (1 to 65535)",
    );

    // Remove: gone, the other kept; again is a 404.
    let (s, v) = a.delete("/v1/vips/web/backends/10.0.0.1:8080");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["backends"].as_array().unwrap().len(), 1);
    assert_eq!(v["backends"][0]["addr"], "[::1]:8080");
    expect(
        a.delete("/v1/vips/web/backends/10.0.0.1:8080"),
        404,
        "not_found",
        "backend 10.0.0.1:8080 is not in vip web",
    );
    // Re-added after removal: active again.
    let (s, v) = a.backend("web", json!({"addr": "10.0.0.1:8080"}));
    assert_eq!((s, &v["backends"][1]["state"]), (201, &json!("active")));

    // A Maglev table of 7 holds at most 6 backends.
    for i in 3..=6 {
        assert_eq!(
            a.backend("web", json!({"addr": format!("10.0.0.{i}:80")}))
                .0,
            201
        );
    }
    expect(
        a.backend("web", json!({"addr": "10.0.0.7:80"})),
        400,
        BAD,
        "vip web has 6 backends: at most 6 (maglev_table_size 7 must exceed the backend count, and a vip has at most 1024)",
    );
    // All of it is stored.
    let v: api::Vip = serde_json::from_value(a.get("/v1/vips/web").1).unwrap();
    assert_eq!(v.backends.len(), 6);
    assert_eq!(v.backends[0].state, api::BackendState::Draining);
}

#[test]
fn vip_watch_wakes_on_changes_not_on_reports() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    assert_eq!(
        a.vip(json!({"name": "web", "addr": "192.0.2.10:80", "proto": "tcp"}))
            .0,
        201
    );

    // Waits in the background; returns (how long it took, the answer).
    let watch = |after: u64, timeout_ms: u64| {
        let url = m.url.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let (s, v) = Api::new(&url).get(&format!(
                "/v1/vips?after_revision={after}&timeout_ms={timeout_ms}"
            ));
            assert_eq!(s, 200, "{v}");
            (t.elapsed(), v)
        })
    };
    let report = || {
        assert_eq!(
            a.put(
                "/v1/vips/web/status/h1",
                json!({"holder": true, "backends": []})
            )
            .0,
            204
        );
    };

    // Reports and changes elsewhere (a network) do not wake it; it answers unchanged at the
    // timeout.
    let rev = a.revision();
    let w = watch(rev, 1500);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(200));
        report();
    }
    assert_eq!(
        a.post(
            "/v1/networks",
            json!({"name": "blue", "vni": 5, "subnet": "10.5.0.0/24"})
        )
        .0,
        201
    );
    let (took, v) = w.join().unwrap();
    assert!(took >= Duration::from_millis(1400), "woke after {took:?}");
    assert!(v["revision"].as_u64().unwrap() >= rev);
    assert_eq!(v["items"][0]["backends"], json!([]));

    // A backend add wakes it at once, and the answer has the backend.
    let rev = a.revision();
    let w = watch(rev, 20_000);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(a.backend("web", json!({"addr": "10.0.0.1:80"})).0, 201);
    let (took, v) = w.join().unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(v["revision"].as_u64().unwrap() > rev);
    assert_eq!(v["items"][0]["backends"][0]["addr"], "10.0.0.1:80");

    // So do a drain, a removal, a new VIP and a deleted one.
    let steps: Vec<Box<dyn Fn() -> u16>> = vec![
        Box::new(|| a.post_empty("/v1/vips/web/backends/10.0.0.1:80/drain").0),
        Box::new(|| a.delete("/v1/vips/web/backends/10.0.0.1:80").0),
        Box::new(|| {
            a.vip(json!({"name": "dns", "addr": "192.0.2.10:53", "proto": "udp"}))
                .0
        }),
        Box::new(|| a.delete("/v1/vips/dns").0),
    ];
    for (i, step) in steps.iter().enumerate() {
        let rev = a.revision();
        let w = watch(rev, 20_000);
        std::thread::sleep(Duration::from_millis(150));
        assert!([200, 201, 204].contains(&step()), "step {i}");
        let (took, v) = w.join().unwrap();
        assert!(took < Duration::from_secs(5), "step {i}: {took:?}");
        assert!(v["revision"].as_u64().unwrap() > rev, "step {i}");
    }
    // A watch from an old revision answers at once.
    let (took, v) = watch(0, 20_000).join().unwrap();
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    // A bad query is a 400.
    expect_has(
        a.get("/v1/vips?after_revision=x"),
        400,
        BAD,
        "after_revision",
    );
}

#[test]
fn reports_appear_while_fresh_and_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = start(dir.path(), &["--down-after", "1s"]);
    let a = Api::new(&m.url);
    assert_eq!(
        a.vip(json!({"name": "web", "addr": "192.0.2.10:80", "proto": "tcp"}))
            .0,
        201
    );
    assert_eq!(a.backend("web", json!({"addr": "10.0.0.1:80"})).0, 201);
    let stats = json!({"addr": "10.0.0.1:80", "healthy": true, "active_conns": 3,
        "total_conns": 40, "bytes_in": 1000, "bytes_out": 5000, "health_transitions": 1,
        "errors": 2});
    let rev = a.revision();
    assert_eq!(
        a.put(
            "/v1/vips/web/status/h1",
            json!({"holder": true, "backends": [stats]})
        )
        .0,
        204
    );
    assert_eq!(
        a.put("/v1/vips/web/status/h2", json!({"holder": false})).0,
        204
    );
    assert_eq!(a.revision(), rev, "reports are not writes");
    let v = a.get("/v1/vips/web").1;
    assert_eq!(v["reports"]["h1"]["holder"], true);
    assert_eq!(v["reports"]["h1"]["backends"][0], stats);
    assert_eq!(v["reports"]["h2"], json!({"holder": false, "backends": []}));
    let l = a.get("/v1/vips").1;
    assert_eq!(l["items"][0]["reports"]["h1"]["holder"], true);
    // /metrics sums them.
    let text = common::client()
        .get(format!("{}/metrics", m.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for line in [
        "volume_mgr_vips 1",
        "volume_mgr_vip_holders{vip=\"web\"} 1",
        "volume_mgr_vip_backends{vip=\"web\",state=\"active\"} 1",
        "volume_mgr_vip_backend_active_conns{vip=\"web\",backend=\"10.0.0.1:80\"} 3",
        "volume_mgr_vip_backend_bytes_out{vip=\"web\",backend=\"10.0.0.1:80\"} 5000",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }

    // Refusals: unknown VIP (404, so an instance learns it is gone), bad node, bad body.
    expect(
        a.put("/v1/vips/nope/status/h1", json!({"holder": false})),
        404,
        "not_found",
        "vip nope not found",
    );
    expect_has(
        a.put("/v1/vips/web/status/-h", json!({"holder": false})),
        400,
        BAD,
        "invalid node name \"-h\"",
    );
    expect_has(
        a.put("/v1/vips/web/status/h1", json!({"holder": "yes"})),
        400,
        BAD,
        "holder",
    );
    expect_has(
        a.put(
            "/v1/vips/web/status/h1",
            json!({"holder": true, "backends": [{"addr": "x"}]}),
        ),
        400,
        BAD,
        "missing field",
    );

    // Older than --down-after: left out.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(a.get("/v1/vips/web").1["reports"], json!({}));
    assert_eq!(
        a.put("/v1/vips/web/status/h2", json!({"holder": true})).0,
        204
    );
    let r = a.get("/v1/vips/web").1["reports"].clone();
    assert_eq!(r.as_object().unwrap().keys().collect::<Vec<_>>(), ["h2"]);

    // A deleted and re-created VIP starts without the old reports.
    assert_eq!(a.delete("/v1/vips/web").0, 204);
    assert_eq!(
        a.vip(json!({"name": "web", "addr": "192.0.2.10:80", "proto": "tcp"}))
            .0,
        201
    );
    assert_eq!(a.get("/v1/vips/web").1["reports"], json!({}));
    assert_eq!(
        a.backend("web", json!({"addr": "10.0.0.1:80", "weight": 3}))
            .0,
        201
    );
    assert_eq!(
        a.put("/v1/vips/web/status/h1", json!({"holder": true})).0,
        204
    );

    // Restart: VIPs and backends are durable, reports are not.
    m.terminate();
    assert!(m.wait_exit(Duration::from_secs(10)).is_some());
    drop(m);
    let m = start(dir.path(), &["--down-after", "1s"]);
    let a = Api::new(&m.url);
    let v: api::Vip = serde_json::from_value(a.get("/v1/vips/web").1).unwrap();
    assert_eq!(v.backends.len(), 1);
    assert_eq!(v.backends[0].weight, 3);
    assert!(v.reports.is_empty());
    // The address index survived too.
    expect(
        a.vip(json!({"name": "other", "addr": "192.0.2.10:80", "proto": "tcp"})),
        409,
        "in_use",
        "tcp 192.0.2.10:80 is already served by vip web",
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
        let v = c
            .create_vip(&api::CreateVip {
                name: "web".into(),
                addr: "127.0.0.10:8080".into(),
                proto: api::VipProto::Tcp,
                network: None,
                algo: Some(api::VipAlgo::SourceHash),
                persist_secs: Some(60),
                drain_secs: Some(10),
                check: Some(api::HealthCheck {
                    kind: api::CheckKind::Http,
                    http_path: Some("/healthz".into()),
                    http_status: Some(204),
                    interval_ms: 500,
                    timeout_ms: 200,
                    rise: 1,
                    fall: 2,
                }),
                proxy_protocol: Some(true),
                maglev_table_size: Some(251),
            })
            .await
            .unwrap();
        assert_eq!(v.algo, api::VipAlgo::SourceHash);
        assert_eq!(
            (v.persist_secs, v.drain_secs, v.proxy_protocol),
            (60, 10, true)
        );
        assert_eq!(v.check.http_status, Some(204));
        let e = c
            .create_vip(&api::CreateVip {
                name: "web".into(),
                ..serde_json::from_value(
                    json!({"name": "x", "addr": "127.0.0.11:1", "proto": "udp"}),
                )
                .unwrap()
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "vip web already exists (already_exists, HTTP 409)"
        );

        let list = c.list_vips().await.unwrap();
        assert_eq!(list.items, vec![v.clone()]);
        // The watch: times out unchanged, wakes on a backend add.
        let same = c
            .watch_vips(list.revision, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(same.revision, list.revision);
        let watcher = {
            let c = c.clone();
            let rev = list.revision;
            tokio::spawn(async move { c.watch_vips(rev, Duration::from_secs(20)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let v = c
            .add_backend(
                "web",
                &api::AddBackend {
                    addr: "127.0.0.2:80".into(),
                    weight: Some(5),
                    max_conns: Some(10),
                },
            )
            .await
            .unwrap();
        let woke = watcher.await.unwrap().unwrap();
        assert!(woke.revision > list.revision);
        assert_eq!(woke.items[0].backends, v.backends);
        assert_eq!(v.backends[0].weight, 5);
        c.add_backend(
            "web",
            &api::AddBackend {
                addr: "[::1]:80".into(),
                weight: None,
                max_conns: None,
            },
        )
        .await
        .unwrap();
        // Addresses with ':' and '[' travel in the path.
        let v = c.drain_backend("web", "[::1]:80").await.unwrap();
        assert_eq!(v.backends[1].state, api::BackendState::Draining);
        assert!(v.backends[1].drain_started_ms.is_some());
        let v = c.remove_backend("web", "127.0.0.2:80").await.unwrap();
        assert_eq!(v.backends.len(), 1);
        let e = c.remove_backend("web", "127.0.0.2:80").await.unwrap_err();
        assert!(e.is_not_found(), "{e}");

        let report = api::VipReport {
            holder: true,
            backends: vec![api::BackendStats {
                addr: "[::1]:80".into(),
                healthy: true,
                active_conns: 1,
                ..Default::default()
            }],
        };
        c.report_vip("web", "h1", &report).await.unwrap();
        let got = c.get_vip("web").await.unwrap();
        assert_eq!(got.reports.get("h1"), Some(&report));
        c.delete_vip("web").await.unwrap();
        assert!(c.get_vip("web").await.unwrap_err().is_not_found());
        assert!(c
            .report_vip("web", "h1", &report)
            .await
            .unwrap_err()
            .is_not_found());
        assert!(c.delete_vip("web").await.unwrap_err().is_not_found());
    });
}
