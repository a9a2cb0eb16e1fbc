//! The client library (what blockd and fabctl use) against the real volume-mgr binary: every
//! method, server errors carried as code + message, transport errors, failover, watches.

mod common;

use common::start;
use std::time::{Duration, Instant};
use volume_mgr::api;
use volume_mgr::client::{Client, ClientError};

fn node(capacity: u64) -> api::RegisterNode {
    api::RegisterNode {
        address: "127.0.0.1:7800".into(),
        nbd_address: "127.0.0.1:10809".into(),
        nbd_socket: Some("/run/fabric/nbd.sock".into()),
        zone: None,
        disks: vec![api::DiskSpec {
            path: "/dev/vdb".into(),
            capacity,
            used: 0,
        }],
    }
}

fn api_err(e: ClientError) -> (u16, String, String) {
    let line = e.to_string();
    assert!(!line.contains('\n'), "{line:?}");
    match e {
        ClientError::Api {
            status,
            code,
            message,
        } => {
            assert!(line.contains(&message) && line.contains(&code), "{line}");
            (status, code, message)
        }
        other => panic!("want an API error, got {other}"),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    // The blocking start-up helper runs outside the runtime.
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

#[test]
fn every_method_against_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    block_on(every_method(&m.url));
}

async fn every_method(url: &str) {
    let c = Client::new(vec![format!("{url}/")]); // a trailing slash is fine

    // Nodes and disks.
    let e = c
        .heartbeat("n1", &api::Heartbeat { disks: vec![] })
        .await
        .unwrap_err();
    assert!(e.is_not_found());
    let n = c.register_node("n1", &node(1 << 30)).await.unwrap();
    assert_eq!((n.zone.as_str(), n.state), ("n1", api::NodeState::Up));
    let hb = api::Heartbeat {
        disks: vec![api::DiskSpec {
            path: "/dev/vdb".into(),
            capacity: 1 << 30,
            used: 4 << 20,
        }],
    };
    c.heartbeat("n1", &hb).await.unwrap();
    assert_eq!(
        c.list_nodes().await.unwrap().items,
        vec![c.get_node("n1").await.unwrap()]
    );
    let disks = c.list_disks().await.unwrap().items;
    assert_eq!(disks.len(), 1);
    assert_eq!((disks[0].node.as_str(), disks[0].used), ("n1", 4 << 20));
    assert!(c.get_node("n2").await.unwrap_err().is_not_found());

    // Volumes.
    let v = c
        .create_volume(&api::CreateVolume {
            name: "vm1".into(),
            size: 256 << 20,
            replicas: Some(1),
            min_replicas: None,
        })
        .await
        .unwrap();
    assert_eq!(
        (v.id, v.size, v.chunk_size, v.replicas),
        (1, 256 << 20, api::DEFAULT_CHUNK_SIZE, 1)
    );
    assert_eq!(c.get_volume("vm1").await.unwrap(), v);
    let l = c.list_volumes().await.unwrap();
    assert_eq!(l.items, vec![v.clone()]);
    let dup = api::CreateVolume {
        name: "vm1".into(),
        size: 4096,
        replicas: Some(1),
        min_replicas: None,
    };
    let (s, code, msg) = api_err(c.create_volume(&dup).await.unwrap_err());
    assert_eq!((s, code.as_str()), (409, "already_exists"));
    assert!(msg.contains("vm1"), "{msg}");
    let big = api::CreateVolume {
        name: "big".into(),
        size: 1 << 30,
        replicas: Some(1),
        min_replicas: None,
    };
    let (s, code, msg) = api_err(c.create_volume(&big).await.unwrap_err());
    assert_eq!((s, code.as_str()), (507, "no_capacity"));
    assert!(msg.contains("1 GiB"), "{msg}");
    // Names are sent as typed: a slash is a bad name, not another route.
    let slash = api::CreateVolume {
        name: "a/b".into(),
        size: 4096,
        replicas: Some(1),
        min_replicas: None,
    };
    let (s, code, _) = api_err(c.create_volume(&slash).await.unwrap_err());
    assert_eq!((s, code.as_str()), (400, "invalid_argument"));
    let (s, _, msg) = api_err(c.get_volume("a/b?x").await.unwrap_err());
    assert_eq!((s, msg.as_str()), (404, "volume a/b?x not found"));

    // Watches: a change wakes the watcher; no change answers after the timeout.
    let t = Instant::now();
    let same = c
        .watch_volumes(l.revision, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(250));
    assert_eq!(same.revision, l.revision);
    let watcher = {
        let c = c.clone();
        let rev = l.revision;
        tokio::spawn(async move {
            let t = Instant::now();
            let r = c.watch_volumes(rev, Duration::from_secs(30)).await;
            (t.elapsed(), r)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.delete_volume("vm1").await.unwrap();
    let (took, r) = watcher.await.unwrap();
    let r = r.unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(r.revision > l.revision && r.items.is_empty());
    assert!(c.delete_volume("vm1").await.unwrap_err().is_not_found());
    assert!(c.get_volume("vm1").await.unwrap_err().is_not_found());

    // Leases and replica state.
    let v = c
        .create_volume(&api::CreateVolume {
            name: "vm2".into(),
            size: 8 << 20,
            replicas: None, // this manager's --default-replicas: 1
            min_replicas: None,
        })
        .await
        .unwrap();
    assert_eq!((v.replicas, v.min_replicas, v.sets.len()), (1, 1, 2));
    assert!(c.list_leases().await.unwrap().items.is_empty());
    let out = api::ReplicaUpdate {
        epoch: 1,
        node: "n1".into(),
        in_service: false,
        sets: None,
    };
    let (s, code, msg) = api_err(c.update_replicas("vm2", &out).await.unwrap_err());
    assert_eq!((s, code.as_str()), (409, "stale_lease"), "{msg}");
    let lease = c.acquire_lease("vm2", "n1").await.unwrap();
    assert_eq!(lease.epoch, 1);
    assert_eq!(c.list_leases().await.unwrap().items, vec![lease.clone()]);
    // The only replica is the last in-service one: it stays in.
    let after = c.update_replicas("vm2", &out).await.unwrap();
    assert_eq!(after, v);
    let (s, code, _) = api_err(
        c.update_replicas(
            "vm2",
            &api::ReplicaUpdate {
                sets: Some(vec![2]),
                ..out.clone()
            },
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((s, code.as_str()), (400, "invalid_argument"));
    c.delete_volume("vm2").await.unwrap();
    assert!(c.list_leases().await.unwrap().items.is_empty());
}

#[test]
fn transport_errors_and_failover() {
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    block_on(transport_errors(dead, m.url.clone()));
}

async fn transport_errors(dead: String, live: String) {
    let c = Client::new(vec![dead.clone()]);
    let e = c.list_volumes().await.unwrap_err();
    let line = e.to_string();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{line}");
    assert!(
        line.starts_with(&format!("cannot reach volume-mgr at {dead}: ")),
        "{line}"
    );
    assert!(!line.contains('\n'), "{line:?}");
    let e = Client::new(vec![]).list_volumes().await.unwrap_err();
    assert!(e.to_string().contains("no manager URL"), "{e}");

    // The first URL is down: the client goes on to the next one.
    let c = Client::new(vec![dead, live]);
    assert!(c.list_volumes().await.unwrap().items.is_empty());
}
