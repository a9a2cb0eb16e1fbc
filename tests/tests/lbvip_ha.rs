//! lb-vip high availability (issue 5) on namespace hosts on one bridge (see
//! `fabric_tests::lbvip_ha`): volume-mgr on host 0, lb-vip with `--vip-interface eth0` on
//! hosts 1 and 2, HTTP backends on hosts 3 and 4, the client on host 5, the VIP
//! 198.18.0.100:80 on the same L2. Exactly one lb-vip holds the VIP's lease and address; when
//! it dies (kill -9 and its link cut) the other takes over within 3 s and Maglev sends each
//! client flow to the backend it had; a holder that loses the manager stops serving before
//! the other starts (the address is never on both hosts); a clean shutdown releases the lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fabric_tests::lbvip_ha::{holders, mac_of, neigh_mac, v4, HaNet, CLIENT, LB, MANAGER};

const VIP_IP: &str = "198.18.0.100";
const VIP: &str = "198.18.0.100:80";

/// Starts the cluster with VIP `web` and waits for one holder that answers; the holder.
fn setup() -> (HaNet, usize) {
    let h = HaNet::start();
    h.create_vip(v4(VIP));
    h.wait(
        "one lb-vip to hold the VIP address",
        Duration::from_secs(15),
        || h.holders_of(VIP_IP).len() == 1,
    );
    let holder = h.holders_of(VIP_IP)[0];
    let lease = h.lease().expect("a lease");
    assert_eq!(lease["holder"], HaNet::lb_node(holder), "{lease}");
    h.wait("the holder gauges", Duration::from_secs(2), || {
        h.lb_metric(holder, "lbvip_vip_holder") == Some(1.0)
            && h.lb_metric(1 - holder, "lbvip_vip_holder") == Some(0.0)
    });
    h.wait("the VIP to answer", Duration::from_secs(15), || {
        h.request(0, v4(VIP), Duration::from_millis(500)).is_ok()
    });
    (h, holder)
}

/// One request from source port `port` (retried on connect errors only, bounded): the body.
fn answer(h: &HaNet, port: u16) -> String {
    let mut last = String::new();
    for _ in 0..5 {
        match h.request(port, v4(VIP), Duration::from_secs(2)) {
            Ok(b) => return b,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no answer from source port {port}: {last}\n{}", h.logs());
}

#[test]
fn holder_killed_and_cut_off_other_takes_over_within_3s_and_maglev_keeps_flows() {
    let (mut h, holder) = setup();
    let other = 1 - holder;
    let epoch = h.lease().unwrap()["epoch"].as_u64().unwrap();

    // Client flows from fixed source ports: both backends answer.
    let ports: Vec<u16> = (41_000..41_024).collect();
    let before: Vec<(u16, String)> = ports.iter().map(|&p| (p, answer(&h, p))).collect();
    for b in ["b1", "b2"] {
        assert!(
            before.iter().any(|(_, n)| n == b),
            "backend {b} never answered: {before:?}"
        );
    }

    // kill -9 the holder and cut its link: the address it leaves behind is unreachable.
    let t0 = Instant::now();
    h.kill_lbvip(holder);
    h.net.link_down(LB[holder]);
    let took: Mutex<Option<Duration>> = Mutex::new(None);
    let done = AtomicBool::new(false);
    let answered = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(10) {
                if h.holders_of(VIP_IP).contains(&other) {
                    *took.lock().unwrap() = Some(t0.elapsed());
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        // The client reconnects (new connections, 300 ms connect timeout) until answered.
        let mut answered = None;
        let mut tries = 0;
        while t0.elapsed() < Duration::from_secs(10) {
            tries += 1;
            if h.request(0, v4(VIP), Duration::from_millis(300)).is_ok() {
                answered = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done.store(true, Ordering::SeqCst);
        eprintln!("client tries until answered: {tries}");
        answered
    });
    let took = took.into_inner().unwrap();
    eprintln!("failover: address on the other host after {took:?}, client answered after {answered:?} (from the kill)");
    let took = took.unwrap_or_else(|| panic!("no takeover within 10 s\n{}", h.logs()));
    let answered = answered.unwrap_or_else(|| panic!("no answer within 10 s\n{}", h.logs()));
    assert!(
        took <= Duration::from_secs(3),
        "takeover took {took:?}\n{}",
        h.logs()
    );
    assert!(
        answered <= Duration::from_secs(3),
        "client answered only after {answered:?}\n{}",
        h.logs()
    );
    let lease = h.lease().unwrap();
    assert_eq!(lease["holder"], HaNet::lb_node(other), "{lease}");
    assert_eq!(lease["epoch"].as_u64().unwrap(), epoch + 1, "{lease}");
    h.wait("the new holder's gauges", Duration::from_secs(2), || {
        h.lb_metric(other, "lbvip_vip_holder") == Some(1.0)
            && h.lb_metric(other, "lbvip_vip_lease_acquired_total") == Some(1.0)
    });

    // Maglev: every flow (same source address and port) lands on the backend it had.
    let after: Vec<(u16, String)> = ports.iter().map(|&p| (p, answer(&h, p))).collect();
    assert_eq!(
        before, after,
        "flows moved to other backends after failover"
    );

    // The VIP deleted: the holder removes its address; re-created on another address: it
    // holds and serves that one.
    let (st, v) = h.api("DELETE", "/v1/vips/web", None);
    assert_eq!(st, 204, "{v}");
    h.wait(
        "the address of a deleted VIP to go",
        Duration::from_secs(5),
        || !h.holders_of(VIP_IP).contains(&other),
    );
    let moved = v4("198.18.0.101:80");
    h.create_vip(moved);
    h.wait(
        "the re-created VIP's address",
        Duration::from_secs(5),
        || h.holders_of("198.18.0.101") == vec![other],
    );
    assert!(!h.holders_of(VIP_IP).contains(&other));
    h.wait(
        "the re-created VIP to answer",
        Duration::from_secs(5),
        || h.request(0, moved, Duration::from_millis(300)).is_ok(),
    );
}

#[test]
fn holder_losing_the_manager_stops_before_the_other_starts_and_shutdown_releases() {
    let (mut h, first) = setup();
    let second = 1 - first;
    // Samples of which hosts have the address, every few ms, for the whole test.
    let samples: Mutex<Vec<(Duration, Vec<usize>)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let t_start = Instant::now();
    let lb_hosts = h.lb_hosts();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) && t_start.elapsed() < Duration::from_secs(60) {
                let hs = holders(&lb_hosts, VIP_IP);
                samples.lock().unwrap().push((t_start.elapsed(), hs));
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            phases(&mut h, first, second, t_start, &samples)
        }));
        stop.store(true, Ordering::SeqCst);
        if let Err(e) = res {
            std::panic::resume_unwind(e);
        }
    });
    let samples = samples.into_inner().unwrap();
    let both: Vec<_> = samples.iter().filter(|(_, hs)| hs.len() > 1).collect();
    assert!(
        both.is_empty(),
        "the address was on both hosts at {:?}",
        both.iter().map(|(t, _)| *t).collect::<Vec<_>>()
    );
    eprintln!("{} address samples, never on both hosts", samples.len());
}

/// First and last sample time at which `pred` held, from `from` on.
fn span(
    samples: &Mutex<Vec<(Duration, Vec<usize>)>>,
    from: Duration,
    pred: impl Fn(&[usize]) -> bool,
) -> Option<(Duration, Duration)> {
    let s = samples.lock().unwrap();
    let hits: Vec<Duration> = s
        .iter()
        .filter(|(t, hs)| *t >= from && pred(hs))
        .map(|(t, _)| *t)
        .collect();
    Some((*hits.first()?, *hits.last()?))
}

fn phases(
    h: &mut HaNet,
    first: usize,
    second: usize,
    t_start: Instant,
    samples: &Mutex<Vec<(Duration, Vec<usize>)>>,
) {
    let ns = h.host(LB[first]).ns.clone();
    let mgr_ip = h.host(MANAGER).addr.clone();
    // 1. The holder alone loses the manager (a blackhole route to it); the other still
    // reaches it and takes over only after the holder stopped serving.
    let client = h.host(CLIENT).clone();
    assert_eq!(
        neigh_mac(&client, VIP_IP),
        Some(mac_of(h.host(LB[first]))),
        "the client reached the VIP through the holder"
    );
    let cut = t_start.elapsed();
    fabric_tests::run(std::process::Command::new("ip").args([
        "-n",
        &ns,
        "route",
        "add",
        "blackhole",
        &format!("{mgr_ip}/32"),
    ]));
    h.wait(
        "the other lb-vip to take over",
        Duration::from_secs(5),
        || h.holders_of(VIP_IP) == vec![second],
    );
    let took = t_start.elapsed() - cut;
    // Let the sampler see it too.
    std::thread::sleep(Duration::from_millis(100));
    let (_, first_last) = span(samples, cut, |hs| hs.contains(&first))
        .unwrap_or_else(|| panic!("the holder had no address after the cut\n{}", h.logs()));
    let (second_first, _) = span(samples, cut, |hs| hs.contains(&second))
        .unwrap_or_else(|| panic!("the other never had the address\n{}", h.logs()));
    eprintln!(
        "manager lost by the holder: it stopped {:?} after the cut, the other started {:?} after the cut (takeover seen {took:?})",
        first_last - cut,
        second_first - cut
    );
    assert!(
        first_last < second_first,
        "overlap: {first_last:?} >= {second_first:?}"
    );
    assert!(took <= Duration::from_secs(3), "takeover took {took:?}");
    // Gratuitous ARP: the client's neighbour entry moves to the new holder before the client
    // sent anything to it.
    let new_mac = mac_of(h.host(LB[second]));
    h.wait(
        "the client's neighbour entry to follow the gratuitous ARP",
        Duration::from_secs(2),
        || neigh_mac(&client, VIP_IP).as_ref() == Some(&new_mac),
    );
    assert_eq!(h.lb_metric(first, "lbvip_vip_holder"), Some(0.0));
    assert_eq!(h.lb_metric(first, "lbvip_vip_lease_lost_total"), Some(1.0));
    h.wait(
        "the VIP to answer from the other host",
        Duration::from_secs(5),
        || h.request(0, v4(VIP), Duration::from_millis(300)).is_ok(),
    );
    fabric_tests::run(std::process::Command::new("ip").args([
        "-n",
        &ns,
        "route",
        "del",
        "blackhole",
        &format!("{mgr_ip}/32"),
    ]));

    // 2. The manager's link is cut: nobody can renew, so the holder stops serving within the
    // ttl and nobody takes over until the link is back.
    let cut = Instant::now();
    h.net.link_down(MANAGER);
    h.wait("the holder to stop serving", Duration::from_secs(3), || {
        h.holders_of(VIP_IP).is_empty()
    });
    let stopped = cut.elapsed();
    eprintln!("manager link cut: the holder stopped serving after {stopped:?}");
    assert!(
        stopped <= Duration::from_millis(1600),
        "stopped after {stopped:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        h.holders_of(VIP_IP).is_empty(),
        "a holder without the manager"
    );
    let back = Instant::now();
    h.net.link_up(MANAGER);
    h.wait(
        "a holder once the manager is back",
        Duration::from_secs(5),
        || h.holders_of(VIP_IP).len() == 1,
    );
    eprintln!("manager back: a holder after {:?}", back.elapsed());
    let holder = h.holders_of(VIP_IP)[0];
    h.wait("the VIP to answer again", Duration::from_secs(5), || {
        h.request(0, v4(VIP), Duration::from_millis(300)).is_ok()
    });

    // 3. SIGTERM: the holder removes the address and releases the lease, so the other takes
    // over within one renewal period instead of after the ttl.
    let other = 1 - holder;
    // Both instances back in step (a lease request sent while the link was down may hang
    // until its 750 ms timeout).
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let status = h.terminate_lbvip(holder, Duration::from_secs(10));
    eprintln!("SIGTERM of the holder: exited after {:?}", t.elapsed());
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?}\n{}",
        h.logs()
    );
    // Released: by the time it exited its lease had ended (or the other already has it).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let lease = h.lease().expect("a lease record");
    assert!(
        lease["holder"] == HaNet::lb_node(other) || lease["expires_ms"].as_u64().unwrap() <= now_ms,
        "not released: {lease}\n{}",
        h.logs()
    );
    assert!(
        !h.holders_of(VIP_IP).contains(&holder),
        "address left behind"
    );
    h.wait(
        "the other to take over after a release",
        Duration::from_secs(3),
        || h.holders_of(VIP_IP) == vec![other],
    );
    let took = t.elapsed();
    eprintln!("SIGTERM of the holder: the other serves after {took:?}");
    assert!(
        took < Duration::from_millis(1000),
        "takeover took {took:?}: no release? (without one it takes at least 1 s)\n{}",
        h.logs()
    );
}
