//! `GET /v1/watch` (changes after a revision) and the client's incremental watches against the
//! real volume-mgr binary: a copy kept from one list plus the watched deltas always equals a
//! fresh list; bad input is a 400; the client falls back to whole lists when it has no copy.

mod common;

use common::start;
use std::time::{Duration, Instant};
use volume_mgr::api;
use volume_mgr::client::{Client, ClientError};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

fn vol(name: &str) -> api::CreateVolume {
    api::CreateVolume {
        name: name.into(),
        size: 8 << 20,
        replicas: Some(1),
        min_replicas: None,
    }
}

#[test]
fn watch_api_and_incremental_client() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    block_on(run(&m.url));
}

async fn run(url: &str) {
    let c = Client::new(vec![url.to_string()]);
    c.register_node(
        "n1",
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
    c.create_volume(&vol("a")).await.unwrap();
    let l0 = c.list_volumes().await.unwrap();

    // Nothing changed: the watch answers empty at its timeout, at the same revision.
    let t = Instant::now();
    let ev = c
        .watch("volume", l0.revision, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(ev.events.is_empty() && ev.revision >= l0.revision, "{ev:?}");
    assert!(t.elapsed() >= Duration::from_millis(250));

    // A create wakes it at once with the new record.
    let w = {
        let c = c.clone();
        let r = l0.revision;
        tokio::spawn(async move {
            let t = Instant::now();
            (c.watch("volume", r, Duration::from_secs(10)).await, t)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = c.create_volume(&vol("b")).await.unwrap();
    let (ev, t) = w.await.unwrap();
    let ev = ev.unwrap();
    let woke = t.elapsed();
    assert!(woke < Duration::from_secs(2), "{woke:?}");
    assert_eq!(ev.events.len(), 1, "{ev:?}");
    let e = &ev.events[0];
    assert_eq!(
        (e.kind.as_str(), e.name.as_str(), e.deleted),
        ("volume", "b", false)
    );
    let got: api::Volume = serde_json::from_value(e.object.clone().unwrap()).unwrap();
    assert_eq!(got, b);
    // Kinds filter: a network change is not a volume event, but moves the revision on.
    let n = c
        .create_network(&api::CreateNetwork {
            name: "net".into(),
            vni: 7,
            subnet: "192.0.2.0/24".into(),
            mtu: None,
            gateway: None,
            dns: vec![],
        })
        .await
        .unwrap();
    let ev2 = c
        .watch("volume", ev.revision, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(ev2.events.is_empty(), "{ev2:?}");
    let ev3 = c
        .watch("network,port", ev.revision, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(ev3.events.len(), 1);
    assert_eq!(ev3.events[0].object.as_ref().unwrap()["vni"], n.vni);
    // Deletes are events without an object.
    c.delete_volume("a").await.unwrap();
    let ev4 = c
        .watch("volume", ev2.revision, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ev4.events.len(), 1, "{ev4:?}");
    assert!(ev4.events[0].deleted && ev4.events[0].object.is_none());

    // Bad input: 400 with a reason.
    for (q, want) in [
        ("/v1/watch?since=0&kinds=bogus", "unknown kind"),
        ("/v1/watch?since=999999999&timeout_ms=10", "past the store"),
        ("/v1/watch?kinds=volume", "since"),
        ("/v1/watch?since=x", "since"),
    ] {
        let r = reqwest::get(format!("{url}{q}")).await.unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains(want) && body.contains("invalid_argument"),
            "{q}: {body}"
        );
    }
    match c.watch("lease,meta", 0, Duration::from_millis(10)).await {
        Err(ClientError::Api { status: 400, .. }) => {}
        o => panic!("meta is not watchable: {o:?}"),
    }

    // The client's incremental watch_volumes: its copy plus deltas equals a fresh list, through
    // many changes (creates, replica updates, deletes).
    let watcher = Client::new(vec![url.to_string()]);
    let mut cur = watcher.list_volumes().await.unwrap();
    let mut rev = cur.revision;
    for i in 0..20 {
        match i % 3 {
            0 | 1 => {
                c.create_volume(&vol(&format!("v{i}"))).await.unwrap();
            }
            _ => c.delete_volume(&format!("v{}", i - 2)).await.unwrap(),
        }
        cur = watcher
            .watch_volumes(rev, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(cur.revision > rev);
        rev = cur.revision;
        let fresh = c.list_volumes().await.unwrap();
        assert_eq!(cur.items, fresh.items, "after change {i}");
    }
    // An unknown revision (no copy at it): the whole state, as before.
    let whole = Client::new(vec![url.to_string()])
        .watch_volumes(0, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(whole.items, c.list_volumes().await.unwrap().items);

    // The net state the same way (vswitch's watch).
    let ns = watcher.net_state().await.unwrap();
    let first = watcher
        .watch_net_state(ns.revision, Duration::from_millis(200))
        .await
        .unwrap();
    c.create_port(&api::CreatePort {
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
    let after = watcher
        .watch_net_state(first.revision, Duration::from_secs(5))
        .await
        .unwrap();
    let fresh = c.net_state().await.unwrap();
    assert_eq!(after.ports, fresh.ports);
    assert_eq!(after.networks, fresh.networks);
    assert_eq!(after.ports.len(), 1);
}
