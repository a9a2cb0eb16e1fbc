//! lb-vip end to end (issue 5): the real volume-mgr and lb-vip binaries, VIPs created through
//! the API, HTTP backends on 127.0.0.x (see `fabric_tests::lbvip`). Health checks run every
//! 200 ms with rise 2 / fall 3 so that thresholds pass quickly.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::Duration;

use fabric_tests::lbvip::{free_port_on, request, wait, Backend, Lb, Load, UdpEcho};
use serde_json::json;

/// Connections per distribution run: 10,000 as the issue asks (`FABRIC_LBVIP_CONNS` to
/// change it, e.g. on a slow machine).
fn conns() -> usize {
    std::env::var("FABRIC_LBVIP_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// A VIP address on `127.N.0.host` with a free port.
fn vip_addr(lb: &Lb, host: u8) -> String {
    let ip = lb.ip(host);
    format!("{ip}:{}", free_port_on(&ip))
}

/// Waits until requests through `vip` are answered.
fn wait_serving(lb: &Lb, vip: &str) {
    wait(
        &format!("VIP {vip} to answer\n{}", lb.logs()),
        Duration::from_secs(15),
        || request(vip, "/").is_ok(),
    );
}

/// `n` requests through `vip` from `threads` clients; responses counted by body.
fn spread(vip: &str, n: usize, threads: usize) -> BTreeMap<String, usize> {
    let per = n / threads;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let vip = vip.to_string();
            std::thread::spawn(move || {
                let mut m = BTreeMap::new();
                for _ in 0..per {
                    let body = request(&vip, "/").unwrap_or_else(|e| panic!("request: {e}"));
                    *m.entry(body).or_insert(0usize) += 1;
                }
                m
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for h in handles {
        for (k, v) in h.join().unwrap() {
            *all.entry(k).or_insert(0) += v;
        }
    }
    all
}

fn assert_within_5pct(got: &BTreeMap<String, usize>, weights: &[(&str, u32)], what: &str) {
    let total: usize = got.values().sum();
    let wsum: u32 = weights.iter().map(|(_, w)| w).sum();
    for (name, w) in weights {
        let want = total as f64 * f64::from(*w) / f64::from(wsum);
        let have = *got.get(*name).unwrap_or(&0) as f64;
        assert!(
            (have - want).abs() <= 0.05 * want,
            "{what}: backend {name} got {have} of {total}, expected {want:.0} ± 5%: {got:?}"
        );
    }
}

#[test]
fn rr_and_wrr_distribution_within_5pct() {
    let lb = Lb::start(61);
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| Backend::start(&lb.ip(2 + i as u8), n))
        .collect();
    let rr = vip_addr(&lb, 10);
    let wrr = vip_addr(&lb, 11);
    lb.create_vip("rr", &rr, "tcp", json!({"algo": "rr"}));
    lb.create_vip("wrr", &wrr, "tcp", json!({"algo": "wrr"}));
    for (b, w) in backends.iter().zip([1, 2, 3]) {
        lb.add_backend("rr", &b.addr, 1);
        lb.add_backend("wrr", &b.addr, w);
    }
    let addrs: Vec<&str> = backends.iter().map(|b| b.addr.as_str()).collect();
    lb.wait_backends("rr", &addrs, &[]);
    lb.wait_backends("wrr", &addrs, &[]);
    wait_serving(&lb, &rr);
    wait_serving(&lb, &wrr);
    let n = conns();
    let got = spread(&rr, n, 4);
    assert_within_5pct(&got, &[("a", 1), ("b", 1), ("c", 1)], "rr");
    let got = spread(&wrr, n, 4);
    assert_within_5pct(&got, &[("a", 1), ("b", 2), ("c", 3)], "wrr");
}

#[test]
fn least_connections_favours_the_fast_backend() {
    let lb = Lb::start(62);
    let slow = Backend::start_slow(&lb.ip(2), "slow", Duration::from_millis(150));
    let fast = Backend::start(&lb.ip(3), "fast");
    let vip = vip_addr(&lb, 10);
    lb.create_vip("lc", &vip, "tcp", json!({"algo": "lc"}));
    lb.add_backend("lc", &slow.addr, 1);
    lb.add_backend("lc", &fast.addr, 1);
    lb.wait_backends("lc", &[&slow.addr, &fast.addr], &[]);
    wait_serving(&lb, &vip);
    let (s0, f0) = (slow.hits(), fast.hits());
    let load = Load::start(&vip, "/", 4);
    std::thread::sleep(Duration::from_secs(3));
    let res = load.finish();
    let failed = res.iter().filter(|(_, r)| r.is_err()).count();
    assert_eq!(failed, 0, "failed requests\n{}", lb.logs());
    let (s, f) = (slow.hits() - s0, fast.hits() - f0);
    // Round robin would give both the same count; least connections keeps the slow backend
    // at about one connection while the fast one takes the rest.
    assert!(s >= 1, "the slow backend got nothing (slow {s}, fast {f})");
    assert!(
        f >= 5 * s,
        "least connections: fast backend {f} requests vs slow {s}; expected >= 5x"
    );
}

#[test]
fn killed_backend_costs_no_request_after_the_fall_threshold() {
    let lb = Lb::start(63);
    let a = Backend::start(&lb.ip(2), "a");
    let mut b = Backend::start(&lb.ip(3), "b");
    let c = Backend::start(&lb.ip(4), "c");
    let vip = vip_addr(&lb, 10);
    lb.create_vip("k", &vip, "tcp", json!({"algo": "rr"}));
    for x in [&a, &b, &c] {
        lb.add_backend("k", &x.addr, 1);
    }
    lb.wait_backends("k", &[&a.addr, &b.addr, &c.addr], &[]);
    wait_serving(&lb, &vip);
    let load = Load::start(&vip, "/", 4);
    std::thread::sleep(Duration::from_secs(1));
    let killed_at = load.start.elapsed();
    b.kill();
    std::thread::sleep(Duration::from_secs(3));
    let res = load.finish();
    // fall (3) x interval (200 ms), plus one check timeout and some slack.
    let threshold = killed_at + Duration::from_millis(3 * 200 + 150 + 250);
    let before: Vec<_> = res
        .iter()
        .filter(|(t, r)| *t < threshold && r.is_err())
        .collect();
    let after: Vec<_> = res
        .iter()
        .filter(|(t, r)| *t >= threshold && r.is_err())
        .collect();
    let served_after = res.iter().filter(|(t, _)| *t >= threshold).count();
    assert!(
        served_after > 100,
        "only {served_after} requests after the threshold"
    );
    assert!(
        after.is_empty(),
        "{} failed requests after the fall threshold (first {:?}); {} before it\n{}",
        after.len(),
        after.first(),
        before.len(),
        lb.logs()
    );
    eprintln!(
        "kill under load: {} requests, {} failed before the threshold, 0 after",
        res.len(),
        before.len()
    );
    assert_eq!(
        lb.backend_metric("lbvip_backend_up", "k", &b.addr),
        Some(0.0)
    );
    assert!(res
        .iter()
        .filter(|(t, _)| *t >= threshold)
        .all(|(_, r)| r.as_deref() != Ok("b")));
}

#[test]
fn drain_keeps_established_connections_and_takes_no_new_ones() {
    let lb = Lb::start(64);
    let hold = Duration::from_millis(1500);
    let a = Backend::start_slow(&lb.ip(2), "a", hold);
    let b = Backend::start_slow(&lb.ip(3), "b", hold);
    let vip = vip_addr(&lb, 10);
    lb.create_vip("d", &vip, "tcp", json!({"algo": "rr", "drain_secs": 30}));
    lb.add_backend("d", &a.addr, 1);
    lb.add_backend("d", &b.addr, 1);
    lb.wait_backends("d", &[&a.addr, &b.addr], &[]);
    wait_serving(&lb, &vip);
    let a0 = a.hits();
    // 10 slow requests in flight, half on each backend.
    let first: Vec<_> = (0..10)
        .map(|_| {
            let vip = vip.clone();
            std::thread::spawn(move || request(&vip, "/"))
        })
        .collect();
    wait("10 established connections", Duration::from_secs(5), || {
        a.open.load(std::sync::atomic::Ordering::SeqCst)
            + b.open.load(std::sync::atomic::Ordering::SeqCst)
            >= 10
    });
    lb.drain_backend("d", &a.addr);
    lb.wait_backends("d", &[&b.addr], &[&a.addr]);
    let second: Vec<_> = (0..10)
        .map(|_| {
            let vip = vip.clone();
            std::thread::spawn(move || request(&vip, "/"))
        })
        .collect();
    let first: Vec<_> = first.into_iter().map(|t| t.join().unwrap()).collect();
    let second: Vec<_> = second.into_iter().map(|t| t.join().unwrap()).collect();
    let on_a = first.iter().filter(|r| r.as_deref() == Ok("a")).count();
    assert!(
        first.iter().all(|r| r.is_ok()),
        "established connections failed: {first:?}\n{}",
        lb.logs()
    );
    assert_eq!(on_a, 5, "rr put {on_a} of the first 10 on a: {first:?}");
    assert!(
        second.iter().all(|r| r.as_deref() == Ok("b")),
        "new connections after the drain: {second:?}"
    );
    assert_eq!(a.hits() - a0, 5);

    // Drain time runs out: established connections are closed.
    let vip2 = vip_addr(&lb, 11);
    let c = Backend::start_slow(&lb.ip(4), "c", Duration::from_secs(6));
    lb.create_vip("d2", &vip2, "tcp", json!({"drain_secs": 1}));
    lb.add_backend("d2", &c.addr, 1);
    lb.wait_backends("d2", &[&c.addr], &[]);
    let t = std::time::Instant::now();
    let long = {
        let vip2 = vip2.clone();
        std::thread::spawn(move || request(&vip2, "/"))
    };
    wait("the long connection", Duration::from_secs(5), || {
        c.open.load(std::sync::atomic::Ordering::SeqCst) >= 1
    });
    lb.drain_backend("d2", &c.addr);
    let r = long.join().unwrap();
    assert!(r.is_err(), "the connection outlived its drain: {r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "closed after {:?}, drain was 1 s",
        t.elapsed()
    );
}

#[test]
fn persistence_keeps_a_client_on_its_backend() {
    let lb = Lb::start(65);
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| Backend::start(&lb.ip(2 + i as u8), n))
        .collect();
    let vip = vip_addr(&lb, 10);
    lb.create_vip("p", &vip, "tcp", json!({"algo": "rr", "persist_secs": 60}));
    for b in &backends {
        lb.add_backend("p", &b.addr, 1);
    }
    let addrs: Vec<&str> = backends.iter().map(|b| b.addr.as_str()).collect();
    lb.wait_backends("p", &addrs, &[]);
    wait_serving(&lb, &vip);
    let got = spread(&vip, 60, 1);
    assert_eq!(got.len(), 1, "one client went to several backends: {got:?}");
    // The instance reports the VIP's counters to the manager.
    wait("lb-vip's status report", Duration::from_secs(10), || {
        let (_, v) = lb.api("GET", "/v1/vips/p", None);
        let r = &v["reports"]["lb1"];
        let total: u64 = r["backends"]
            .as_array()
            .map(|bs| bs.iter().filter_map(|b| b["total_conns"].as_u64()).sum())
            .unwrap_or(0);
        r["holder"] == true && total >= 60
    });
    // Its backend drained: the client moves, and sticks to the new one.
    let first = got.keys().next().unwrap().clone();
    let drained = backends.iter().find(|b| b.name == first).unwrap();
    lb.drain_backend("p", &drained.addr);
    lb.wait_backends("p", &[], &[&drained.addr]);
    let got = spread(&vip, 60, 1);
    assert_eq!(got.len(), 1, "after the drain: {got:?}");
    assert!(!got.contains_key(&first), "{got:?}");
}

#[test]
fn hot_reload_under_load_drops_nothing() {
    let lb = Lb::start(66);
    let a = Backend::start(&lb.ip(2), "a");
    let b = Backend::start(&lb.ip(3), "b");
    let c = Backend::start(&lb.ip(4), "c");
    let vip = vip_addr(&lb, 10);
    lb.create_vip("h", &vip, "tcp", json!({"algo": "wrr"}));
    lb.add_backend("h", &a.addr, 1);
    lb.add_backend("h", &b.addr, 1);
    lb.wait_backends("h", &[&a.addr, &b.addr], &[]);
    wait_serving(&lb, &vip);
    let load = Load::start(&vip, "/", 4);
    std::thread::sleep(Duration::from_millis(500));
    lb.add_backend("h", &c.addr, 2);
    lb.wait_backends("h", &[&a.addr, &b.addr, &c.addr], &[]);
    std::thread::sleep(Duration::from_millis(500));
    lb.remove_backend("h", &a.addr);
    lb.wait_backends("h", &[&b.addr, &c.addr], &[&a.addr]);
    let removed = load.start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let readd = load.start.elapsed();
    lb.add_backend("h", &a.addr, 1);
    lb.wait_backends("h", &[&a.addr, &b.addr, &c.addr], &[]);
    std::thread::sleep(Duration::from_millis(500));
    let res = load.finish();
    let failed: Vec<_> = res.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across reloads (first {:?})\n{}",
        failed.len(),
        res.len(),
        failed.first(),
        lb.logs()
    );
    let count = |name: &str, from: Duration, to: Duration| {
        res.iter()
            .filter(|(t, r)| *t >= from && *t < to && r.as_deref() == Ok(name))
            .count()
    };
    let end = Duration::from_secs(3600);
    assert!(c.hits() > 0, "the added backend got nothing");
    // Requests take a few ms: 100 ms after the removal applied, none may reach a.
    assert_eq!(
        count("a", removed + Duration::from_millis(100), readd),
        0,
        "the removed backend kept getting connections"
    );
    assert!(
        count("a", readd, end) > 0,
        "the re-added backend got nothing"
    );
}

#[test]
fn bad_input_never_stops_the_daemon() {
    use std::io::Write;
    let mut lb = Lb::start(67);
    let a = Backend::start(&lb.ip(2), "a");
    let echo = UdpEcho::start(&lb.ip(3), "u1");
    let tcp = vip_addr(&lb, 10);
    let udp = {
        let ip = lb.ip(11);
        let s = UdpSocket::bind((ip.as_str(), 0)).unwrap();
        s.local_addr().unwrap().to_string()
    };
    lb.create_vip("t", &tcp, "tcp", json!({}));
    lb.add_backend("t", &a.addr, 1);
    lb.create_vip("u", &udp, "udp", json!({}));
    lb.add_backend("u", &echo.addr, 1);
    // An address that is not on this host (TEST-NET-1): logged and skipped, nothing else
    // suffers.
    lb.create_vip("far", "192.0.2.10:80", "tcp", json!({}));
    lb.add_backend("far", &a.addr, 1);
    lb.wait_backends("t", &[&a.addr], &[]);
    lb.wait_backends("u", &[&echo.addr], &[]);
    lb.wait_backends("far", &[&a.addr], &[]);
    wait_serving(&lb, &tcp);
    assert!(lb
        .metrics()
        .contains("lbvip_vip_listening{vip=\"far\",proto=\"tcp\"} 0"));

    // TCP garbage: random bytes, half-closed, connect-and-drop, PROXY-looking junk.
    let junk = fabric_tests::random_bytes(7, 64 * 1024);
    for i in 0..30 {
        let mut s = std::net::TcpStream::connect(&tcp).unwrap();
        match i % 3 {
            0 => {
                let _ = s.write_all(&junk);
            }
            1 => {
                let _ = s.write_all(b"\r\n\r\n\x00\r\nQUIT\n\xff\xff");
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            _ => {
                let _ = s.write_all(&junk[..13]);
            }
        }
    }
    // UDP: empty, largest, garbage datagrams; then a normal one must be echoed from the VIP.
    let client = UdpSocket::bind((lb.ip(20).as_str(), 0)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for d in [&[][..], &junk[..65_507], &junk[..1], &junk[100..1500]] {
        client.send_to(d, &udp).unwrap();
    }
    let mut buf = vec![0u8; 70_000];
    // One try: the first datagram of a flow must not be lost (loopback does not drop);
    // the echoes of the datagrams above come first.
    client.send_to(b"hello", &udp).unwrap();
    let mut answer = None;
    while let Ok((n, from)) = client.recv_from(&mut buf) {
        if &buf[..n] == b"u1:hello" {
            answer = Some(from.to_string());
            break;
        }
    }
    assert_eq!(
        answer.as_deref(),
        Some(udp.as_str()),
        "no UDP answer from the VIP\n{}",
        lb.logs()
    );
    assert!(lb.lbvip_alive(), "lb-vip died\n{}", lb.logs());
    assert_eq!(request(&tcp, "/").as_deref(), Ok("a"));
    assert!(lb
        .metrics()
        .contains("lbvip_vip_listening{vip=\"u\",proto=\"udp\"} 1"));
}
