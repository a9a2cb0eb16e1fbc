//! VIP holder leases against the real volume-mgr binary over HTTP: the first holder gets epoch
//! 1, the holder renewing keeps it, another node is refused with 409 `held` while it runs and
//! takes over with the next epoch once it expired (by the manager's clock), only the holder
//! releases, bad ttl and node names are 400, an unknown VIP 404; the lease shows in
//! `GET /v1/vips/{name}` and in the watch (a new holder wakes it, a renewal does not), survives
//! a restart, and goes with the VIP; the client library's methods.

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
    fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call(&self.c, method, &format!("{}{path}", self.url), body)
    }
    fn acquire(&self, vip: &str, node: &str, ttl_ms: u64) -> (u16, Value) {
        self.req(
            "POST",
            &format!("/v1/vips/{vip}/lease"),
            Some(json!({"node": node, "ttl_ms": ttl_ms})),
        )
    }
    fn release(&self, vip: &str, node: &str) -> (u16, Value) {
        self.req("DELETE", &format!("/v1/vips/{vip}/lease?node={node}"), None)
    }
    fn create(&self, name: &str, addr: &str) {
        let r = self.req(
            "POST",
            "/v1/vips",
            Some(json!({"name": name, "addr": addr, "proto": "tcp"})),
        );
        assert_eq!(r.0, 201, "{:?}", r.1);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn lease_takeover_renewal_refusal_release() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    a.create("web", "192.0.2.10:80");
    // No lease yet: the VIP has no `lease` field at all.
    let v = a.req("GET", "/v1/vips/web", None).1;
    assert!(v.get("lease").is_none(), "{v}");

    // First holder: epoch 1, expiry ttl from now by the manager's clock.
    let before = now_ms();
    let (st, l) = a.acquire("web", "h1", 1000);
    let after = now_ms();
    assert_eq!(st, 200, "{l}");
    assert_eq!(l["vip"], "web");
    assert_eq!(l["holder"], "h1");
    assert_eq!(l["epoch"], 1);
    let exp = l["expires_ms"].as_u64().unwrap();
    assert!(
        exp >= before + 1000 && exp <= after + 1000,
        "{exp} {before} {after}"
    );
    // It shows in GET and in the list.
    let v = a.req("GET", "/v1/vips/web", None).1;
    assert_eq!(v["lease"], l);
    let list = a.req("GET", "/v1/vips", None).1;
    assert_eq!(list["items"][0]["lease"], l);

    // Another node while it is held: 409 `held` naming the holder and the expiry.
    let r = a.acquire("web", "h2", 1000);
    expect_has(
        r.clone(),
        409,
        "held",
        "vip web is held by h1 (epoch 1) until ",
    );
    expect_has(r, 409, "held", "ms from now");
    // Another node cannot release it either.
    expect_has(a.release("web", "h2"), 409, "held", "held by h1");

    // The holder renews: same epoch, later expiry.
    std::thread::sleep(Duration::from_millis(300));
    let (st, r) = a.acquire("web", "h1", 1000);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["epoch"], 1);
    assert_eq!(r["holder"], "h1");
    let exp2 = r["expires_ms"].as_u64().unwrap();
    assert!(exp2 >= exp + 250, "{exp2} vs {exp}");

    // h2 keeps trying; it gets the lease only once h1's expired (by the manager's clock),
    // with the next epoch.
    let t = Instant::now();
    let taken = loop {
        let (st, r) = a.acquire("web", "h2", 1000);
        if st == 200 {
            break r;
        }
        assert_eq!(st, 409, "{r}");
        assert!(t.elapsed() < Duration::from_secs(5), "no takeover: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let at = now_ms();
    assert!(at >= exp2, "taken over at {at}, before the expiry {exp2}");
    assert_eq!(taken["holder"], "h2");
    assert_eq!(taken["epoch"], 2);
    // The old holder is now refused.
    expect_has(
        a.acquire("web", "h1", 1000),
        409,
        "held",
        "held by h2 (epoch 2)",
    );

    // Release by the holder: 204; the lease ends now and keeps its epoch; the next holder
    // (even h1 at once) gets epoch 3.
    let (st, body) = a.release("web", "h2");
    assert_eq!(st, 204, "{body}");
    let v = a.req("GET", "/v1/vips/web", None).1;
    assert_eq!(v["lease"]["holder"], "h2");
    assert_eq!(v["lease"]["epoch"], 2);
    assert!(v["lease"]["expires_ms"].as_u64().unwrap() <= now_ms());
    // Releasing what nobody holds changes nothing.
    assert_eq!(a.release("web", "h2").0, 204);
    assert_eq!(a.release("web", "h1").0, 204);
    let (st, r) = a.acquire("web", "h1", 60_000);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["epoch"], 3);
    assert_eq!(r["holder"], "h1");

    // Durable: a restarted manager has the same lease and still refuses h2.
    drop(m);
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    let v = a.req("GET", "/v1/vips/web", None).1;
    assert_eq!(v["lease"], r);
    expect_has(
        a.acquire("web", "h2", 1000),
        409,
        "held",
        "held by h1 (epoch 3)",
    );

    // The lease goes with the VIP: a re-created VIP of the same name starts without one.
    assert_eq!(a.req("DELETE", "/v1/vips/web", None).0, 204);
    a.create("web", "192.0.2.10:80");
    let v = a.req("GET", "/v1/vips/web", None).1;
    assert!(v.get("lease").is_none(), "{v}");
    let (st, r) = a.acquire("web", "h2", 1000);
    assert_eq!((st, r["epoch"].clone()), (200, json!(1)), "{r}");
}

#[test]
fn lease_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let a = Api::new(&m.url);
    a.create("web", "192.0.2.10:80");
    for ttl in [0u64, 499, 60_001] {
        expect_has(
            a.acquire("web", "h1", ttl),
            400,
            "invalid_argument",
            &format!("ttl_ms {ttl} is out of range: must be 500 to 60000"),
        );
    }
    // The bounds themselves are fine.
    assert_eq!(a.acquire("web", "h1", 500).0, 200);
    assert_eq!(a.acquire("web", "h1", 60_000).0, 200);
    expect_has(
        a.acquire("web", "-h", 1000),
        400,
        "invalid_argument",
        "invalid node name \"-h\"",
    );
    expect_has(
        a.req(
            "POST",
            "/v1/vips/web/lease",
            Some(json!({"node": "h1", "ttl_ms": 1000, "x": 1})),
        ),
        400,
        "invalid_argument",
        "unknown field",
    );
    expect_has(
        a.req("POST", "/v1/vips/web/lease", Some(json!({"node": "h1"}))),
        400,
        "invalid_argument",
        "ttl_ms",
    );
    expect_has(
        a.req("DELETE", "/v1/vips/web/lease", None),
        400,
        "invalid_argument",
        "node",
    );
    expect_has(
        a.release("web", "-h"),
        400,
        "invalid_argument",
        "invalid node name",
    );
    // Unknown VIP: 404 for both.
    expect_has(
        a.acquire("nope", "h1", 1000),
        404,
        "not_found",
        "vip nope not found",
    );
    expect_has(
        a.release("nope", "h1"),
        404,
        "not_found",
        "vip nope not found",
    );
    // Refusals changed nothing: h1 still holds it with epoch 1.
    let v = a.req("GET", "/v1/vips/web", None).1;
    assert_eq!(v["lease"]["holder"], "h1");
    assert_eq!(v["lease"]["epoch"], 1);
    // A renewal naming its epoch: kept while it is the holder's, else 409 `lease_lost`.
    let renew = |node: &str, epoch: u64| {
        a.req(
            "POST",
            "/v1/vips/web/lease",
            Some(json!({"node": node, "ttl_ms": 1000, "epoch": epoch})),
        )
    };
    let (st, r) = renew("h1", 1);
    assert_eq!((st, r["epoch"].clone()), (200, json!(1)), "{r}");
    expect_has(
        renew("h1", 2),
        409,
        "lease_lost",
        "h1 no longer holds vip web with epoch 2",
    );
    expect_has(
        renew("h2", 1),
        409,
        "lease_lost",
        "now held by h1 (epoch 1)",
    );
    // Released, a late renewal starts nothing; a plain acquire does.
    assert_eq!(a.release("web", "h1").0, 204);
    expect_has(
        renew("h1", 1),
        409,
        "lease_lost",
        "(it expired or was released; now held by nobody)",
    );
    let (st, r) = a.acquire("web", "h1", 1000);
    assert_eq!((st, r["epoch"].clone()), (200, json!(2)), "{r}");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

#[test]
fn client_methods_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &[]);
    let c = volume_mgr::client::Client::new(vec![m.url.clone()]);
    block_on(async {
        c.create_vip(&api::CreateVip {
            name: "web".into(),
            addr: "192.0.2.10:80".into(),
            proto: api::VipProto::Tcp,
            network: None,
            algo: None,
            persist_secs: None,
            drain_secs: None,
            check: None,
            proxy_protocol: None,
            maglev_table_size: None,
        })
        .await
        .unwrap();
        let req = |node: &str, ttl_ms| api::VipLeaseRequest {
            node: node.into(),
            ttl_ms,
            epoch: None,
        };
        let rev = c.list_vips().await.unwrap().revision;
        // A new holder wakes a watch, and the answer carries the lease.
        let w = {
            let c = c.clone();
            tokio::spawn(async move { c.watch_vips(rev, Duration::from_secs(20)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let l = c.acquire_vip_lease("web", &req("h1", 5000)).await.unwrap();
        assert_eq!((l.holder.as_str(), l.epoch), ("h1", 1));
        let t = Instant::now();
        let got = w.await.unwrap().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(got.items[0].lease.as_ref(), Some(&l));
        // A renewal does not wake it (answers at the timeout), but is shown.
        let rev = got.revision;
        let w = {
            let c = c.clone();
            tokio::spawn(async move { c.watch_vips(rev, Duration::from_millis(800)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = c.acquire_vip_lease("web", &req("h1", 5000)).await.unwrap();
        assert_eq!(r.epoch, 1);
        let t = Instant::now();
        let got = w.await.unwrap().unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "woken by a renewal"
        );
        assert_eq!(got.items[0].lease.as_ref(), Some(&r));
        // Refusal and release through the client.
        match c.acquire_vip_lease("web", &req("h2", 5000)).await {
            Err(volume_mgr::client::ClientError::Api {
                status,
                code,
                message,
            }) => {
                assert_eq!((status, code.as_str()), (409, "held"));
                assert!(message.contains("held by h1"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(c.release_vip_lease("web", "h2").await.is_err());
        c.release_vip_lease("web", "h1").await.unwrap();
        // A client without kept connections works the same.
        let fresh = volume_mgr::client::Client::new_unpooled(vec![m.url.clone()]);
        let l = fresh
            .acquire_vip_lease("web", &req("h2", 5000))
            .await
            .unwrap();
        assert_eq!((l.holder.as_str(), l.epoch), ("h2", 2));
        let r = fresh
            .acquire_vip_lease("web", &req("h2", 5000))
            .await
            .unwrap();
        assert_eq!(r.epoch, 2);
        assert_eq!(c.get_vip("web").await.unwrap().lease, Some(r));
        assert!(c
            .acquire_vip_lease("nope", &req("h2", 5000))
            .await
            .unwrap_err()
            .is_not_found());
    });
}
