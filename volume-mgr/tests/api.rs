//! The real volume-mgr binary over HTTP: every validation path answers with the right 4xx and
//! a JSON `{code, message}`, watches wake on change, node liveness follows heartbeats, and
//! kill -9 right after an acknowledged change loses nothing.

mod common;

use common::start;
use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

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

fn expect_err(got: (u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["code"], code, "{:?}", got.1);
    assert!(
        got.1["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty() && !m.contains('\n')),
        "{:?}",
        got.1
    );
}

fn register(c: &Client, url: &str, node: &str, capacity: u64) -> (u16, Value) {
    call(
        c,
        "PUT",
        &format!("{url}/v1/nodes/{node}"),
        Some(
            json!({"address": "127.0.0.1:7800", "nbd_address": "127.0.0.1:10809", "disks": [{"path": "/d0", "capacity": capacity, "used": 0}]}),
        ),
    )
}

#[test]
fn every_bad_request_gets_a_clear_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let c = common::client();
    let vols = format!("{}/v1/volumes", m.url);
    // No disks anywhere yet.
    expect_err(
        call(&c, "POST", &vols, Some(json!({"name": "a", "size": 4096}))),
        507,
        "no_capacity",
    );
    // Registration validation.
    expect_err(
        call(
            &c,
            "PUT",
            &format!("{}/v1/nodes/n1", m.url),
            Some(json!({"address": "nope", "nbd_address": "", "disks": []})),
        ),
        400,
        "invalid_argument",
    );
    expect_err(
        call(
            &c,
            "PUT",
            &format!("{}/v1/nodes/bad%20name", m.url),
            Some(json!({"address": "127.0.0.1:1", "nbd_address": "", "disks": []})),
        ),
        400,
        "invalid_argument",
    );
    expect_err(
        call(
            &c,
            "PUT",
            &format!("{}/v1/nodes/n1/heartbeat", m.url),
            Some(json!({"disks": []})),
        ),
        404,
        "not_found",
    );
    for (name, body) in [
        // used > capacity
        (
            "n1",
            json!({"address": "127.0.0.1:1", "nbd_address": "", "disks": [{"path": "/d", "capacity": 1, "used": 2}]}),
        ),
        // empty disk path
        (
            "n1",
            json!({"address": "127.0.0.1:1", "nbd_address": "", "disks": [{"path": "", "capacity": 1, "used": 0}]}),
        ),
        // bad NBD address
        (
            "n1",
            json!({"address": "127.0.0.1:1", "nbd_address": "x:y", "disks": []}),
        ),
        // names that could not be addressed or are too long
        (
            ".hidden",
            json!({"address": "127.0.0.1:1", "nbd_address": "", "disks": []}),
        ),
        (
            &"n".repeat(65),
            json!({"address": "127.0.0.1:1", "nbd_address": "", "disks": []}),
        ),
        // missing field, unknown field
        ("n1", json!({"address": "127.0.0.1:1", "disks": []})),
        (
            "n1",
            json!({"address": "127.0.0.1:1", "nbd_address": "", "disks": [], "x": 1}),
        ),
    ] {
        expect_err(
            call(&c, "PUT", &format!("{}/v1/nodes/{name}", m.url), Some(body)),
            400,
            "invalid_argument",
        );
    }
    let r = c
        .put(format!("{}/v1/nodes/n1", m.url))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    assert_eq!(r.json::<Value>().unwrap()["code"], "unsupported_media_type");
    expect_err(
        call(&c, "GET", &format!("{}/v1/nodes/n1", m.url), None),
        404,
        "not_found",
    );
    assert_eq!(register(&c, &m.url, "n1", 1 << 30).0, 200);
    let r = c
        .put(format!("{}/v1/nodes/n1/heartbeat", m.url))
        .header("content-type", "application/json")
        .body("[1,2")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.json::<Value>().unwrap()["code"], "invalid_argument");
    // A path segment that is not UTF-8.
    expect_err(
        call(&c, "GET", &format!("{}/v1/volumes/%FF", m.url), None),
        400,
        "invalid_argument",
    );
    // Volume validation.
    expect_err(
        call(
            &c,
            "POST",
            &vols,
            Some(json!({"name": "bad/name", "size": 4096})),
        ),
        400,
        "invalid_argument",
    );
    expect_err(
        call(&c, "POST", &vols, Some(json!({"name": "", "size": 4096}))),
        400,
        "invalid_argument",
    );
    expect_err(
        call(&c, "POST", &vols, Some(json!({"name": "a", "size": 0}))),
        400,
        "invalid_argument",
    );
    expect_err(
        call(&c, "POST", &vols, Some(json!({"name": "a", "size": 4097}))),
        400,
        "invalid_argument",
    );
    expect_err(
        call(
            &c,
            "POST",
            &vols,
            Some(json!({"name": "a", "size": 1u64 << 51})),
        ),
        400,
        "invalid_argument",
    );
    expect_err(
        call(
            &c,
            "POST",
            &vols,
            Some(json!({"name": "a", "size": 4096, "colour": "red"})),
        ),
        400,
        "invalid_argument",
    );
    expect_err(
        call(&c, "POST", &vols, Some(json!({"name": "a"}))),
        400,
        "invalid_argument",
    );
    expect_err(
        call(&c, "POST", &vols, Some(json!({"name": "a", "size": -1}))),
        400,
        "invalid_argument",
    );
    expect_err(
        call(&c, "POST", &vols, Some(json!({"name": "a", "size": "1G"}))),
        400,
        "invalid_argument",
    );
    let r = c
        .post(&vols)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.json::<Value>().unwrap()["code"], "invalid_argument");
    let r = c
        .post(&vols)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    assert_eq!(r.json::<Value>().unwrap()["code"], "unsupported_media_type");
    // Capacity, duplicates, unknown names, unknown routes and methods.
    let (s, v) = call(
        &c,
        "POST",
        &vols,
        Some(json!({"name": "a", "size": 512 << 20})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["id"], 1);
    expect_err(
        call(&c, "POST", &vols, Some(json!({"name": "a", "size": 4096}))),
        409,
        "already_exists",
    );
    expect_err(
        call(
            &c,
            "POST",
            &vols,
            Some(json!({"name": "b", "size": 768 << 20})),
        ),
        507,
        "no_capacity",
    );
    expect_err(
        call(&c, "GET", &format!("{vols}/zzz"), None),
        404,
        "not_found",
    );
    expect_err(
        call(&c, "DELETE", &format!("{vols}/zzz"), None),
        404,
        "not_found",
    );
    expect_err(
        call(&c, "GET", &format!("{}/v1/nope", m.url), None),
        404,
        "not_found",
    );
    expect_err(call(&c, "PATCH", &vols, None), 405, "method_not_allowed");
    expect_err(
        call(&c, "GET", &format!("{vols}?after_revision=x"), None),
        400,
        "invalid_argument",
    );
    // Delete, and ids are never reused.
    assert_eq!(call(&c, "DELETE", &format!("{vols}/a"), None).0, 204);
    let (s, v) = call(&c, "POST", &vols, Some(json!({"name": "a", "size": 4096})));
    assert_eq!((s, v["id"].clone()), (201, json!(2)));
    // Metrics count what happened.
    let text = c
        .get(format!("{}/metrics", m.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(text.contains("volume_mgr_volumes 1"), "{text}");
    assert!(text.contains("status=\"507\""), "{text}");
}

#[test]
fn watch_wakes_on_change_and_liveness_follows_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &["--down-after", "1500ms"]);
    let c = common::client();
    assert_eq!(register(&c, &m.url, "n1", 1 << 30).0, 200);
    let (_, l) = call(&c, "GET", &format!("{}/v1/volumes", m.url), None);
    let rev = l["revision"].as_u64().unwrap();
    // Nothing changes: the long-poll returns after its timeout with the same revision.
    let t = Instant::now();
    let (_, l2) = call(
        &c,
        "GET",
        &format!("{}/v1/volumes?after_revision={rev}&timeout_ms=400", m.url),
        None,
    );
    assert!(t.elapsed() >= Duration::from_millis(350));
    assert_eq!(l2["revision"].as_u64().unwrap(), rev);
    // A change wakes a waiting watcher at once.
    let url = m.url.clone();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let (_, l) = call(
            &common::client(),
            "GET",
            &format!("{url}/v1/volumes?after_revision={rev}&timeout_ms=20000"),
            None,
        );
        (t.elapsed(), l)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        call(
            &c,
            "POST",
            &format!("{}/v1/volumes", m.url),
            Some(json!({"name": "w", "size": 4096}))
        )
        .0,
        201
    );
    let (took, l) = waiter.join().unwrap();
    assert!(took < Duration::from_secs(5), "watch took {took:?}");
    assert!(l["revision"].as_u64().unwrap() > rev);
    assert_eq!(l["items"][0]["name"], "w");
    // liveness: up while heartbeating (every 300 ms), down once --down-after (1.5 s) passes without.
    let node =
        |c: &Client| call(c, "GET", &format!("{}/v1/nodes/n1", m.url), None).1["state"].clone();
    assert_eq!(node(&c), "up");
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            call(
                &c,
                "PUT",
                &format!("{}/v1/nodes/n1/heartbeat", m.url),
                Some(json!({"disks": []}))
            )
            .0,
            204
        );
        assert_eq!(node(&c), "up");
    }
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(node(&c), "down");
}

#[test]
fn sigkill_loses_no_acknowledged_change() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::client();
    let mut acked = Vec::new();
    {
        let mut m = start(dir.path(), &[]);
        assert_eq!(register(&c, &m.url, "n1", 1 << 40).0, 200);
        for i in 0..30 {
            let (s, v) = call(
                &c,
                "POST",
                &format!("{}/v1/volumes", m.url),
                Some(json!({"name": format!("v{i}"), "size": 1 << 20})),
            );
            assert_eq!(s, 201);
            acked.push((format!("v{i}"), v["id"].as_u64().unwrap()));
        }
        assert_eq!(
            call(&c, "DELETE", &format!("{}/v1/volumes/v0", m.url), None).0,
            204
        );
        // SIGKILL right after the last acknowledgement.
        m.child.kill().unwrap();
        let _ = m.child.wait();
    }
    let m = start(dir.path(), &[]);
    let (_, l) = call(&c, "GET", &format!("{}/v1/volumes", m.url), None);
    let items = l["items"].as_array().unwrap();
    assert_eq!(items.len(), 29, "{l}");
    for (name, id) in &acked[1..] {
        assert!(
            items.iter().any(|v| v["name"] == *name && v["id"] == *id),
            "{name} lost"
        );
    }
    // A restarted manager places new replicas only on nodes that beat again.
    assert_eq!(register(&c, &m.url, "n1", 1 << 40).0, 200);
    let (_, v) = call(
        &c,
        "POST",
        &format!("{}/v1/volumes", m.url),
        Some(json!({"name": "after", "size": 4096})),
    );
    assert_eq!(v["id"], 31, "ids continue after a crash, never reused");
    let (_, cl) = call(&c, "GET", &format!("{}/v1/cluster", m.url), None);
    assert_eq!(cl["cluster_id"].as_str().unwrap().len(), 32);
}

#[test]
fn lease_epochs_only_move_forward_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::client();
    let lease = |url: &str, node: &str| {
        call(
            &c,
            "POST",
            &format!("{url}/v1/volumes/vol/lease"),
            Some(json!({"node": node})),
        )
    };
    {
        let m = start(dir.path(), &[]);
        assert_eq!(register(&c, &m.url, "n1", 1 << 30).0, 200);
        expect_err(lease(&m.url, "n1"), 404, "not_found");
        assert_eq!(
            call(
                &c,
                "POST",
                &format!("{}/v1/volumes", m.url),
                Some(json!({"name": "vol", "size": 4096}))
            )
            .0,
            201
        );
        expect_err(
            call(&c, "GET", &format!("{}/v1/volumes/vol/lease", m.url), None),
            404,
            "not_found",
        );
        expect_err(lease(&m.url, "bad name"), 400, "invalid_argument");
        let (s, l) = lease(&m.url, "n1");
        assert_eq!(
            (s, l["epoch"].clone(), l["holder"].clone()),
            (200, json!(1), json!("n1"))
        );
        // Re-attach by the holder keeps the epoch; a takeover bumps it.
        assert_eq!(lease(&m.url, "n1").1["epoch"], 1);
        assert_eq!(lease(&m.url, "n2").1["epoch"], 2);
        assert_eq!(lease(&m.url, "n1").1["epoch"], 3);
    }
    // After a restart the epoch continues; it never goes back.
    let m = start(dir.path(), &[]);
    let (_, l) = call(&c, "GET", &format!("{}/v1/volumes/vol/lease", m.url), None);
    assert_eq!(
        (l["epoch"].clone(), l["holder"].clone()),
        (json!(3), json!("n1"))
    );
    assert_eq!(lease(&m.url, "n3").1["epoch"], 4);
    // Deleting the volume drops its lease.
    assert_eq!(
        call(&c, "DELETE", &format!("{}/v1/volumes/vol", m.url), None).0,
        204
    );
    expect_err(
        call(&c, "GET", &format!("{}/v1/volumes/vol/lease", m.url), None),
        404,
        "not_found",
    );
}

fn register_in(c: &Client, url: &str, node: &str, zone: Option<&str>, capacity: u64) {
    let mut body = json!({"address": "127.0.0.1:7800", "nbd_address": "",
                          "disks": [{"path": "/d0", "capacity": capacity, "used": 0}]});
    if let Some(z) = zone {
        body["zone"] = json!(z);
    }
    let (s, v) = call(c, "PUT", &format!("{url}/v1/nodes/{node}"), Some(body));
    assert!(s < 300, "{v:?}");
}

/// `node`'s in-service flag in every set that has it, in set order.
fn in_service(v: &Value, node: &str) -> Vec<bool> {
    v["sets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            s["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["node"] == node)
                .map(|m| m["in_service"].as_bool().unwrap())
        })
        .collect()
}

fn members(set: &Value) -> Vec<&str> {
    set["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node"].as_str().unwrap())
        .collect()
}

/// Three nodes without a zone label are three failure domains (zone = node name): every set
/// of a 3-replica volume is on all three, all in service, placed deterministically; set count
/// is min(chunks, 32); the capacity check counts size x replicas.
#[test]
fn placement_over_three_nodes() {
    let d = tempfile::tempdir().unwrap();
    let m = start(d.path(), &["--default-replicas", "3"]);
    let c = common::client();
    let vols = format!("{}/v1/volumes", m.url);
    for n in ["n1", "n2", "n3"] {
        register_in(&c, &m.url, n, None, 4 << 30);
    }
    let (s, v) = call(
        &c,
        "POST",
        &vols,
        Some(json!({"name": "big", "size": 1u64 << 30})),
    );
    assert_eq!(s, 201, "{v:?}");
    assert_eq!(
        (v["replicas"].as_u64(), v["min_replicas"].as_u64()),
        (Some(3), Some(2))
    );
    let sets = v["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 32, "256 chunks: capped at 32 sets");
    for set in sets {
        let mut ms = members(set);
        ms.sort_unstable();
        assert_eq!(ms, ["n1", "n2", "n3"]);
        assert!(set["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["in_service"] == true));
    }
    // Placement order (best first) varies between sets: the primaries are spread.
    let firsts: std::collections::BTreeSet<&str> = sets.iter().map(|s| members(s)[0]).collect();
    assert!(firsts.len() > 1, "{firsts:?}");
    // Small volumes: one set per chunk; explicit replica counts.
    let (s, v) = call(
        &c,
        "POST",
        &vols,
        Some(json!({"name": "small", "size": 12u64 << 20, "replicas": 2, "min_replicas": 1})),
    );
    assert_eq!(s, 201, "{v:?}");
    assert_eq!(v["sets"].as_array().unwrap().len(), 3);
    assert_eq!(
        (v["replicas"].as_u64(), v["min_replicas"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(v["sets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| members(s).len() == 2));
    let (s, v) = call(
        &c,
        "POST",
        &vols,
        Some(json!({"name": "one", "size": 4096, "replicas": 1})),
    );
    assert_eq!(s, 201, "{v:?}");
    assert_eq!(
        (
            v["sets"].as_array().unwrap().len(),
            v["min_replicas"].as_u64()
        ),
        (1, Some(1))
    );
    // 12 GiB of disk: 3 GiB + 24 MiB + 4 KiB raw provisioned; 3 GiB x 3 no longer fits.
    let (s, e) = call(
        &c,
        "POST",
        &vols,
        Some(json!({"name": "huge", "size": 3u64 << 30})),
    );
    expect_err((s, e.clone()), 507, "no_capacity");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("3 GiB x 3 replicas (9 GiB of disk)"), "{msg}");
    // The placement is stored, not recomputed: the same after a restart.
    let (_, before) = call(&c, "GET", &format!("{vols}/big"), None);
    drop(m);
    let m = start(d.path(), &["--default-replicas", "3"]);
    let (_, after) = call(&c, "GET", &format!("{}/v1/volumes/big", m.url), None);
    assert_eq!(before, after);
    // After a restart no node has beaten yet: nothing is up, creation says so.
    let (s, e) = call(
        &c,
        "POST",
        &format!("{}/v1/volumes", m.url),
        Some(json!({"name": "x", "size": 4096})),
    );
    expect_err((s, e.clone()), 507, "no_capacity");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("only 0 available: none"),
        "{e:?}"
    );
}

/// Replicated volumes: R replicas per chunk set on distinct zones, a clear 507 when the zones
/// are too few, and replica state changes only from the lease holder, never dropping the last
/// in-service copy; the change is durable and wakes watches.
#[test]
fn placement_and_replica_state() {
    let d = tempfile::tempdir().unwrap();
    let m = start(d.path(), &["--default-replicas", "3"]);
    let c = common::client();
    let vols = format!("{}/v1/volumes", m.url);
    register_in(&c, &m.url, "a1", Some("rack-a"), 8 << 30);
    register_in(&c, &m.url, "a2", Some("rack-a"), 8 << 30);
    register_in(&c, &m.url, "b1", Some("rack-b"), 8 << 30);
    // Two zones cannot hold three replicas.
    let r = call(
        &c,
        "POST",
        &vols,
        Some(json!({"name": "v", "size": 64 << 20})),
    );
    expect_err(r.clone(), 507, "no_capacity");
    assert_eq!(
        r.1["message"],
        "need 3 failure domains (zones) with free capacity for 3 replicas, only 2 available: rack-a (a1, a2), rack-b (b1)"
    );
    // Bad replica counts.
    for (body, want) in [
        (
            json!({"name": "v", "size": 4096, "replicas": 0}),
            "replicas must be 1 to 16, got 0",
        ),
        (
            json!({"name": "v", "size": 4096, "replicas": 17}),
            "replicas must be 1 to 16, got 17",
        ),
        (
            json!({"name": "v", "size": 4096, "replicas": 2, "min_replicas": 3}),
            "min_replicas must be 1 to replicas (2), got 3",
        ),
        (
            json!({"name": "v", "size": 4096, "replicas": 2, "min_replicas": 0}),
            "min_replicas must be 1 to replicas (2), got 0",
        ),
        (
            json!({"name": "v", "size": 4096, "min_replicas": 4}),
            "min_replicas must be 1 to replicas (3), got 4",
        ),
    ] {
        let r = call(&c, "POST", &vols, Some(body));
        expect_err(r.clone(), 400, "invalid_argument");
        assert_eq!(r.1["message"], want);
    }
    register_in(&c, &m.url, "c1", Some("rack-c"), 8 << 30);
    let (s, v) = call(
        &c,
        "POST",
        &vols,
        Some(json!({"name": "v", "size": 64 << 20})),
    );
    assert_eq!(s, 201, "{v:?}");
    assert_eq!(
        (v["replicas"].as_u64(), v["min_replicas"].as_u64()),
        (Some(3), Some(2))
    );
    let sets = v["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 16); // 64 MiB = 16 chunks of 4 MiB
    for s in sets {
        let members = members(s);
        assert_eq!(members.len(), 3);
        assert!(
            members.contains(&"b1") && members.contains(&"c1"),
            "{members:?}"
        );
        assert!(
            !(members.contains(&"a1") && members.contains(&"a2")),
            "one per zone: {members:?}"
        );
    }
    let node_a = members(&sets[0])
        .into_iter()
        .find(|n| n.starts_with('a'))
        .unwrap()
        .to_string();
    // Replica updates need a lease, and its current epoch.
    let upd = format!("{}/v1/volumes/v/replicas", m.url);
    let out = json!({"epoch": 1, "node": "b1", "in_service": false});
    expect_err(
        call(&c, "POST", &upd, Some(out.clone())),
        409,
        "stale_lease",
    );
    let (s, l) = call(
        &c,
        "POST",
        &format!("{}/v1/volumes/v/lease", m.url),
        Some(json!({"node": "c1"})),
    );
    assert_eq!((s, l["epoch"].as_u64()), (200, Some(1)), "{l:?}");
    let (s, l) = call(
        &c,
        "POST",
        &format!("{}/v1/volumes/v/lease", m.url),
        Some(json!({"node": "b1"})),
    );
    assert_eq!((s, l["epoch"].as_u64()), (200, Some(2)), "{l:?}");
    // The old holder's epoch is refused, naming the holder.
    let r = call(&c, "POST", &upd, Some(out.clone()));
    expect_err(r.clone(), 409, "stale_lease");
    assert!(
        r.1["message"]
            .as_str()
            .unwrap()
            .contains("b1 holds the lease of v with epoch 2"),
        "{r:?}"
    );
    let out = json!({"epoch": 2, "node": "b1", "in_service": false});
    expect_err(
        call(
            &c,
            "POST",
            &upd,
            Some(json!({"epoch": 2, "node": "zz", "in_service": false})),
        ),
        400,
        "invalid_argument",
    );
    expect_err(
        call(
            &c,
            "POST",
            &upd,
            Some(json!({"epoch": 2, "node": "b1", "in_service": false, "sets": [16]})),
        ),
        400,
        "invalid_argument",
    );
    expect_err(
        call(
            &c,
            "POST",
            &format!("{}/v1/volumes/nope/replicas", m.url),
            Some(out.clone()),
        ),
        404,
        "not_found",
    );
    expect_err(
        call(
            &c,
            "POST",
            &upd,
            Some(json!({"epoch": 2, "node": "b1", "in_service": false, "bogus": 1})),
        ),
        400,
        "invalid_argument",
    );
    let (_, before) = call(&c, "GET", &vols, None);
    let rev0 = before["revision"].as_u64().unwrap();
    let (s, v) = call(&c, "POST", &upd, Some(out.clone()));
    assert_eq!(s, 200, "{v:?}");
    assert_eq!(in_service(&v, "b1"), vec![false; 16]);
    assert_eq!(in_service(&v, "c1"), vec![true; 16]);
    // The watch sees the change.
    let (_, after) = call(
        &c,
        "GET",
        &format!("{vols}?after_revision={rev0}&timeout_ms=2000"),
        None,
    );
    let rev1 = after["revision"].as_u64().unwrap();
    assert!(rev1 > rev0);
    // Idempotent: the same update again answers the same volume and changes nothing.
    let (s, again) = call(&c, "POST", &upd, Some(out));
    assert_eq!((s, &again), (200, &v));
    let (_, now) = call(&c, "GET", &vols, None);
    assert_eq!(now["revision"].as_u64(), Some(rev1));
    // c1 goes out too; then the a-node is the last in-service copy of set 0 and stays in.
    let (s, _) = call(
        &c,
        "POST",
        &upd,
        Some(json!({"epoch": 2, "node": "c1", "in_service": false})),
    );
    assert_eq!(s, 200);
    let (s, v) = call(
        &c,
        "POST",
        &upd,
        Some(json!({"epoch": 2, "node": node_a, "in_service": false, "sets": [0]})),
    );
    assert_eq!(s, 200);
    assert!(
        in_service(&v, &node_a)[0],
        "the last in-service copy was dropped"
    );
    assert!(v["sets"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["in_service"] == true));
    // Back in service, set by set; the durable record survives a restart.
    let (s, v) = call(
        &c,
        "POST",
        &upd,
        Some(json!({"epoch": 2, "node": "b1", "in_service": true, "sets": [0, 1]})),
    );
    assert_eq!(s, 200);
    let b = in_service(&v, "b1");
    assert!(b[0] && b[1] && !b[2], "{b:?}");
    drop(m);
    let m = start(d.path(), &[]);
    let (_, v2) = call(&c, "GET", &format!("{}/v1/volumes/v", m.url), None);
    assert_eq!(v2, v);
    // Leases are listed (blockd loads its fences from them), and go with their volume.
    let leases = format!("{}/v1/leases", m.url);
    let (s, l) = call(&c, "GET", &leases, None);
    assert_eq!(s, 200);
    assert_eq!(l["items"].as_array().unwrap().len(), 1, "{l:?}");
    assert_eq!(l["items"][0]["volume"], "v");
    assert_eq!(l["items"][0]["holder"], "b1");
    assert_eq!(l["items"][0]["epoch"], 2);
    assert!(l["revision"].as_u64().is_some());
    let (s, _) = call(&c, "DELETE", &format!("{}/v1/volumes/v", m.url), None);
    assert_eq!(s, 204);
    let (_, l) = call(&c, "GET", &leases, None);
    assert_eq!(l["items"], json!([]));
}
