//! PATCH of volumes and networks, GET of one vswitch, against the real volume-mgr binary: the
//! fields that may change do, the others are refused with a reason, and the answer is the
//! stored record.

mod common;

use common::start;
use serde_json::{json, Value};
use volume_mgr::api;
use volume_mgr::client::Client;

async fn call(url: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let c = reqwest::Client::new();
    let mut rq = c.request(method.parse().unwrap(), format!("{url}{path}"));
    if let Some(b) = body {
        rq = rq.json(&b);
    }
    let r = rq.send().await.unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn patch_volume_and_network_get_switch() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(run(&m.url));
}

async fn run(url: &str) {
    let c = Client::new(vec![url.to_string()]);
    for n in ["n1", "n2", "n3"] {
        c.register_node(
            n,
            &api::RegisterNode {
                address: "127.0.0.1:7800".into(),
                nbd_address: String::new(),
                nbd_socket: None,
                zone: None,
                disks: vec![api::DiskSpec {
                    path: "/d".into(),
                    capacity: 1 << 30,
                    used: 0,
                }],
            },
        )
        .await
        .unwrap();
    }
    c.create_volume(&api::CreateVolume {
        name: "v".into(),
        size: 8 << 20,
        replicas: Some(3),
        min_replicas: None,
    })
    .await
    .unwrap();
    // Volume: min_replicas changes; size and replicas are refused with the way to do it.
    let (st, v) = call(
        url,
        "PATCH",
        "/v1/volumes/v",
        Some(json!({"min_replicas": 3})),
    )
    .await;
    assert_eq!((st, v["min_replicas"].as_u64()), (200, Some(3)), "{v}");
    assert_eq!(c.get_volume("v").await.unwrap().min_replicas, 3);
    for (body, want) in [
        (
            json!({"min_replicas": 4}),
            "min_replicas must be 1 to replicas",
        ),
        (
            json!({"min_replicas": 0}),
            "min_replicas must be 1 to replicas",
        ),
        (json!({"size": 1}), "size cannot change"),
        (json!({"replicas": 1}), "replicas cannot change"),
        (json!({"name": "w"}), "unknown field"),
    ] {
        let (st, e) = call(url, "PATCH", "/v1/volumes/v", Some(body.clone())).await;
        assert_eq!(st, 400, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(want), "{body}: {e}");
    }
    let (st, e) = call(url, "PATCH", "/v1/volumes/nope", Some(json!({}))).await;
    assert_eq!((st, e["code"].as_str()), (404, Some("not_found")));
    assert_eq!(c.get_volume("v").await.unwrap().min_replicas, 3);

    // Network: mtu, dns and gateway change; vni/subnet are refused; the gateway may not be a
    // port's address.
    c.create_network(&api::CreateNetwork {
        name: "net".into(),
        vni: 9,
        subnet: "192.0.2.0/24".into(),
        mtu: None,
        gateway: None,
        dns: vec![],
    })
    .await
    .unwrap();
    let p = c
        .create_port(&api::CreatePort {
            name: "p1".into(),
            network: "net".into(),
            node: "n1".into(),
            kind: api::PortKind::Tap,
            mac: None,
            ip: None,
            netns: None,
            ifname: None,
            vip: None,
        })
        .await
        .unwrap();
    let (st, n) = call(
        url,
        "PATCH",
        "/v1/networks/net",
        Some(json!({"mtu": 1400, "dns": ["192.0.2.53"], "gateway": "192.0.2.200"})),
    )
    .await;
    assert_eq!(st, 200, "{n}");
    assert_eq!(n["mtu"], 1400);
    assert_eq!(n["gateway"], "192.0.2.200");
    assert_eq!(c.get_network("net").await.unwrap().dns, vec!["192.0.2.53"]);
    let (st, n) = call(
        url,
        "PATCH",
        "/v1/networks/net",
        Some(json!({"mtu": 0, "gateway": ""})),
    )
    .await;
    assert_eq!(st, 200, "{n}");
    assert!(n["mtu"].is_null() && n["gateway"].is_null(), "{n}");
    let ip = p.ip.clone();
    for (body, st_want, want) in [
        (json!({"vni": 10}), 400, "vni cannot change"),
        (
            json!({"subnet": "10.0.0.0/24"}),
            400,
            "subnet cannot change",
        ),
        (json!({"mtu": 100}), 400, "mtu"),
        (json!({"gateway": "10.9.9.9"}), 400, "gateway"),
        (json!({"gateway": ip}), 409, "p1"),
    ] {
        let (st, e) = call(url, "PATCH", "/v1/networks/net", Some(body.clone())).await;
        assert_eq!(st, st_want, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(want), "{body}: {e}");
    }
    // A change through PATCH wakes net-state watchers (vswitch hands the new MTU out).
    let ns = c.net_state().await.unwrap();
    let w = {
        let c = c.clone();
        tokio::spawn(async move {
            c.watch_net_state(ns.revision, std::time::Duration::from_secs(10))
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (st, _) = call(url, "PATCH", "/v1/networks/net", Some(json!({"mtu": 1300}))).await;
    assert_eq!(st, 200);
    let got = w.await.unwrap().unwrap();
    assert_eq!(got.networks[0].mtu, Some(1300));

    // One vswitch.
    let (st, _) = call(url, "GET", "/v1/switches/n1", None).await;
    assert_eq!(st, 404);
    c.register_switch(
        "n1",
        &api::RegisterSwitch {
            underlay_ip: "198.18.0.2".into(),
            vxlan_port: 4789,
            underlay_mtu: 1500,
        },
    )
    .await
    .unwrap();
    let (st, s) = call(url, "GET", "/v1/switches/n1", None).await;
    assert_eq!(
        (st, s["underlay_ip"].as_str()),
        (200, Some("198.18.0.2")),
        "{s}"
    );
}
