//! Self-healing storage (issue 7) on namespace hosts: four blockd hosts and volume-mgr
//! (`--down-after 2s --out-after 5s`), a 3-replica volume written through host 1's NBD with
//! qemu-io patterns.
//! - A host killed for good: its replicas are re-homed on the other hosts, copied by host 1's
//!   gateway, and recorded in service; `fabctl volume verify` finds every replica equal and
//!   the pattern reads back intact.
//! - A host that returns before `out_after`: only the chunks written meanwhile move (the bytes
//!   copied, as the blockds report them to the manager, stay far below the volume's size).
//!
//! Bounded (about a minute each); processes and namespaces go on drop, also on failure.

use fabric_tests::multihost::{qemu_io, Cluster};
use fabric_tests::require;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const FLAGS: &[&str] = &["--replica-timeout", "2s", "--min-replicas-wait", "10s"];
const SIZE: u64 = 64 << 20;

fn cluster(out_after: &str) -> Cluster {
    require("qemu-io");
    let mut c = Cluster::start(4, "1G", FLAGS);
    c.restart_manager_with(&["--out-after", out_after]);
    c.fabctl_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "64M",
        "--replicas",
        "3",
    ]);
    c
}

/// Writes `pattern` over the whole volume through host 1 (16 MiB per request).
fn write_all(c: &Cluster, pattern: u8) {
    let cmds: Vec<String> = (0..4)
        .map(|i| format!("write -P {pattern:#x} {} 16M", i * (16 << 20)))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let (ok, out) = qemu_io(&c.url(1, "vol"), &cmds);
    assert!(ok, "qemu-io write failed: {out}\n{}", c.logs());
}

/// Reads the whole volume through host 1 and checks the pattern (zero differences).
fn read_check(c: &Cluster, cmds: &[String]) {
    read_check_on(c, 1, cmds)
}

/// The same through host `host`'s NBD.
fn read_check_on(c: &Cluster, host: usize, cmds: &[String]) {
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let (ok, out) = qemu_io(&c.url(host, "vol"), &cmds);
    assert!(
        ok,
        "qemu-io read-back found differences: {out}\n{}",
        c.logs()
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// (in-service members per set, nodes per set) from `fabctl volume show`.
fn sets(c: &Cluster) -> Vec<(usize, Vec<String>)> {
    let v = c.json(&["volume", "show", "vol"]).unwrap_or_default();
    v["sets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let m = s["members"].as_array().cloned().unwrap_or_default();
                    (
                        m.iter().filter(|m| m["in_service"] == true).count(),
                        m.iter()
                            .map(|m| m["node"].as_str().unwrap_or("").to_string())
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) until every set has 3 in-service members and none on `gone`.
fn wait_rehomed(c: &Cluster, gone: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let s = sets(c);
        if !s.is_empty()
            && s.iter()
                .all(|(i, n)| *i == 3 && n.len() == 3 && !n.contains(&gone.to_string()))
        {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "replicas not back to 3 without {gone} after {limit:?}: {s:?}\n{}\n{}",
            c.fabctl(&["volume", "show", "vol"]).1,
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Bytes host `node`'s disks hold in chunks, as its heartbeat reports them.
fn disk_used(c: &Cluster, node: &str) -> Option<u64> {
    let v = c.json(&["disk", "ls"])?;
    let items = v.as_array().or_else(|| v["items"].as_array())?;
    Some(
        items
            .iter()
            .filter(|d| d["node"] == node)
            .filter_map(|d| d["used"].as_u64())
            .sum(),
    )
}

fn recovery(c: &Cluster) -> serde_json::Value {
    c.json(&["status"]).unwrap_or_default()
}

#[test]
fn lost_host_is_rehomed_without_data_loss() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = cluster("5s");
    write_all(&c, 0xa5);
    let before = sets(&c);
    let on_h3 = before
        .iter()
        .filter(|(_, n)| n.contains(&"h3".to_string()))
        .count();
    assert!(on_h3 > 0, "h3 holds no replica: {before:?}");
    assert!(before.iter().all(|(i, _)| *i == 3), "{before:?}");

    c.kill_node(3);
    let killed = Instant::now();
    // Degraded first (the gateway is idle: the manager sees the sets degraded once it
    // re-homes them, or the gateway marks h3 out on the next write).
    let mut saw_recovering = false;
    loop {
        let s = sets(&c);
        let st = recovery(&c);
        if st["syncing_replicas"].as_u64().unwrap_or(0) > 0 {
            saw_recovering = true;
        }
        if !s.is_empty()
            && s.iter()
                .all(|(i, n)| *i == 3 && n.len() == 3 && !n.contains(&"h3".to_string()))
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "replicas not back to 3 without h3 after 60 s: {s:?}\n{}\n{}",
            c.fabctl(&["volume", "show", "vol"]).1,
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = killed.elapsed();
    eprintln!("redundancy restored {took:?} after the kill (down-after 2s + out-after 5s)");
    // Not before the node was out: down_after + out_after = 7 s.
    assert!(
        took >= Duration::from_secs(6),
        "re-homed too early: {took:?}"
    );
    let after = sets(&c);
    let on_h4_before = before
        .iter()
        .filter(|(_, n)| n.contains(&"h4".to_string()))
        .count();
    let on_h4_after = after
        .iter()
        .filter(|(_, n)| n.contains(&"h4".to_string()))
        .count();
    eprintln!("sets with a replica on h4: {on_h4_before} before, {on_h4_after} after; sets that were on h3: {on_h3}");
    assert!(on_h4_after > on_h4_before, "{before:?} -> {after:?}");

    let (equal, out) = c.verify("vol");
    assert!(equal, "replicas differ after re-replication:\n{out}");
    read_check(
        &c,
        &(0..4)
            .map(|i| format!("read -P 0xa5 {} 16M", i * (16 << 20)))
            .collect::<Vec<_>>(),
    );
    let st = recovery(&c);
    let copied = st["bytes_copied"].as_u64().unwrap_or(0);
    eprintln!(
        "recovery: {st}\nsaw syncing replicas while polling: {saw_recovering}; copied {copied} bytes"
    );
    assert!(st["degraded_sets"] == 0, "{st}");
    assert!(st["replaced"].as_u64().unwrap_or(0) >= on_h3 as u64, "{st}");
    let status = c.fabctl_ok(&["status"]);
    assert!(status.contains("h3 (out)"), "{status}");
}

#[test]
fn quick_return_moves_only_the_delta() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // out_after far beyond the test: the node is never re-homed.
    let mut c = cluster("10m");
    write_all(&c, 0x3c);
    let copied = |c: &Cluster| recovery(c)["bytes_copied"].as_u64().unwrap_or(0);
    // Under load a replica can miss part of the first write and be resynced: that copy and
    // its progress report (which lags up to a second) belong before the baseline.
    c.wait_converged("vol", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    let base = copied(&c);

    c.kill_node(3);
    // 1 MiB written while h3 is away (one chunk): the gateway records h3 out and goes on.
    let (ok, out) = qemu_io(&c.url(1, "vol"), &["write -P 0x77 8M 1M"]);
    assert!(ok, "write while h3 is down failed: {out}\n{}", c.logs());
    c.restart_node(3);
    c.wait_converged("vol", Duration::from_secs(60));
    // The progress report lags up to a second: wait for it (bounded).
    let t = Instant::now();
    let mut delta = copied(&c) - base;
    while delta == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        delta = copied(&c) - base;
    }
    eprintln!("delta resync copied {delta} bytes of a {SIZE}-byte volume");
    assert!(delta > 0, "no copy reported: the resync did not run?");
    assert!(
        delta <= 2 * (4 << 20),
        "copied {delta} bytes for a 1 MiB write: not a delta"
    );
    assert!(delta * 8 < SIZE);
    let st = recovery(&c);
    assert_eq!(st["replaced"], 0, "{st}");
    read_check(
        &c,
        &[
            "read -P 0x3c 0 8M".to_string(),
            "read -P 0x77 8M 1M".to_string(),
            format!("read -P 0x3c {} {}", 9 << 20, SIZE - (9 << 20)),
        ],
    );
}

#[test]
fn detached_volume_is_rehomed_and_the_returning_host_drops_its_copies() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = cluster("5s");
    write_all(&c, 0x5a);
    // A restart forgets the attachment: no gateway serves the volume now (h1 still holds
    // the lease and is up).
    c.restart_node(1);
    let before = sets(&c);
    let h3_sets = before
        .iter()
        .filter(|(_, n)| n.contains(&"h3".to_string()))
        .count();
    assert!(h3_sets > 0, "{before:?}");
    let used_before = disk_used(&c, "h3").unwrap_or(0);
    assert!(used_before > 0, "h3 holds no chunk");
    c.kill_node(3);
    let took = wait_rehomed(&c, "h3", Duration::from_secs(60));
    eprintln!("detached volume: redundancy restored {took:?} after the kill");
    let (equal, out) = c.verify("vol");
    assert!(equal, "replicas differ after re-replication:\n{out}");
    // h3 comes back after its sets moved: it drops its chunks of them (all of them here).
    c.restart_node(3);
    let t = Instant::now();
    loop {
        let used = disk_used(&c, "h3");
        if used == Some(0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "h3 still holds {used:?} bytes (had {used_before}) 30 s after it returned\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "h3 dropped {used_before} bytes of re-homed chunks in {:?}",
        t.elapsed()
    );
    read_check(
        &c,
        &(0..4)
            .map(|i| format!("read -P 0x5a {} 16M", i * (16 << 20)))
            .collect::<Vec<_>>(),
    );
    let (equal, out) = c.verify("vol");
    assert!(equal, "{out}");
}

#[test]
fn recovery_bandwidth_limits_the_copy_rate() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-io");
    let flags: Vec<&str> = FLAGS
        .iter()
        .copied()
        .chain(["--recovery-bandwidth", "4MiB/s"])
        .collect();
    let mut c = Cluster::start(4, "1G", &flags);
    c.restart_manager_with(&["--out-after", "3s"]);
    c.fabctl_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "64M",
        "--replicas",
        "3",
    ]);
    write_all(&c, 0x11);
    c.kill_node(3);
    // From the first re-homing recorded to redundancy restored.
    let t = Instant::now();
    while recovery(&c)["replaced"].as_u64().unwrap_or(0) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    // Writes while the copies run (to the new members too, mirrored from the barrier on):
    // every chunk rewritten with a new pattern, none of it may be lost.
    std::thread::sleep(Duration::from_millis(1500));
    let cmds: Vec<String> = (0..16)
        .map(|i| format!("write -P 0x22 {} 4M", i * (4 << 20)))
        .collect();
    let cmds_ref: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let (ok, out) = qemu_io(&c.url(1, "vol"), &cmds_ref);
    assert!(ok, "writes during the copy failed: {out}\n{}", c.logs());
    let syncing_after_writes = recovery(&c)["syncing_replicas"].as_u64().unwrap_or(0);
    eprintln!(
        "writes done {:?} into the copy; replicas still syncing: {syncing_after_writes}",
        started.elapsed()
    );
    assert!(
        syncing_after_writes > 0,
        "the copy ended before the writes: they did not race it"
    );
    wait_rehomed(&c, "h3", Duration::from_secs(90));
    let took = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1500)); // the last progress report
    let copied = recovery(&c)["bytes_copied"].as_u64().unwrap_or(0);
    let rate = copied as f64 / took;
    eprintln!(
        "throttled copy: {copied} bytes in {took:.1} s = {:.2} MiB/s (limit 4 MiB/s, burst 4 MiB)",
        rate / (1 << 20) as f64
    );
    assert!(copied >= 16 << 20, "too little copied: {copied}");
    // The burst (4 MiB) may pass at once; the rest at no more than 4 MiB/s.
    let floor = (copied - (4 << 20)) as f64 / (4 << 20) as f64;
    assert!(
        took >= floor * 0.95,
        "copied {copied} bytes in {took:.1} s: faster than 4 MiB/s"
    );
    let (equal, out) = c.verify("vol");
    assert!(equal, "{out}");
    read_check(
        &c,
        &(0..4)
            .map(|i| format!("read -P 0x22 {} 16M", i * (16 << 20)))
            .collect::<Vec<_>>(),
    );
}

#[test]
fn lost_gateway_host_is_rehomed_by_a_surviving_replica() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = cluster("5s");
    write_all(&c, 0x69);
    // The lease holder (the gateway host) dies: once it is out, the first up node with a
    // replica to copy to takes the lease and copies.
    c.kill_node(1);
    let took = wait_rehomed(&c, "h1", Duration::from_secs(60));
    eprintln!("gateway host lost: redundancy restored {took:?} after the kill");
    let (equal, out) = c.verify("vol");
    assert!(equal, "replicas differ after re-replication:\n{out}");
    read_check_on(
        &c,
        2,
        &(0..4)
            .map(|i| format!("read -P 0x69 {} 16M", i * (16 << 20)))
            .collect::<Vec<_>>(),
    );
}

#[test]
fn quick_return_of_a_detached_volume_moves_only_the_delta() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = cluster("10m");
    write_all(&c, 0x3c);
    c.kill_node(3);
    let (ok, out) = qemu_io(&c.url(1, "vol"), &["write -P 0x77 8M 1M"]);
    assert!(ok, "write while h3 is down failed: {out}\n{}", c.logs());
    // The gateway goes (its blockd restarts: no attachment) before h3 returns.
    c.restart_node(1);
    let base = recovery(&c)["bytes_copied"].as_u64().unwrap_or(0);
    c.restart_node(3);
    // h1 holds the lease and is up: its agent attaches the volume to resync h3.
    c.wait_converged("vol", Duration::from_secs(60));
    let t = Instant::now();
    let mut delta = 0;
    while delta == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        delta = recovery(&c)["bytes_copied"].as_u64().unwrap_or(0) - base;
    }
    eprintln!("detached delta resync copied {delta} bytes of a {SIZE}-byte volume");
    assert!(delta > 0 && delta <= 2 * (4 << 20), "copied {delta}");
    read_check(
        &c,
        &[
            "read -P 0x3c 0 8M".to_string(),
            "read -P 0x77 8M 1M".to_string(),
            format!("read -P 0x3c {} {}", 9 << 20, SIZE - (9 << 20)),
        ],
    );
}

/// `fabctl node drain`: every replica on h4 moves to the other hosts (h4's copy serving until
/// the new one is in service), the pattern reads back and every replica is equal; `node rm`
/// of a node that still holds replicas is refused naming the volume, and of the drained node
/// (its blockd stopped) succeeds.
#[test]
fn drained_node_empties_and_can_be_removed() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // out_after far beyond the test: only the drain moves replicas.
    let mut c = cluster("10m");
    write_all(&c, 0x6b);
    c.wait_converged("vol", Duration::from_secs(30));
    let on_h4 = sets(&c)
        .iter()
        .filter(|(_, n)| n.contains(&"h4".to_string()))
        .count();
    assert!(on_h4 > 0, "placement put nothing on h4: {:?}", sets(&c));
    let (ok, out) = c.fabctl(&["node", "rm", "h1"]);
    assert!(
        !ok && out.contains("vol"),
        "rm of a node holding replicas: {out}"
    );
    let t = Instant::now();
    let out = c.fabctl_ok(&["node", "drain", "h4", "--timeout", "60s"]);
    eprintln!("{out}drained {on_h4} sets in {:?}", t.elapsed());
    assert!(out.contains("drained"), "{out}");
    let s = sets(&c);
    assert!(
        s.iter()
            .all(|(i, n)| *i == 3 && n.len() == 3 && !n.contains(&"h4".to_string())),
        "{s:?}"
    );
    c.wait_converged("vol", Duration::from_secs(30));
    read_check(
        &c,
        &(0..4)
            .map(|i| format!("read -P 0x6b {} 16M", i * (16 << 20)))
            .collect::<Vec<_>>(),
    );
    // The drained node drops its copies (its agent sees the sets no longer list it).
    let t = Instant::now();
    while disk_used(&c, "h4").unwrap_or(1) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "h4 still holds {:?} bytes",
            disk_used(&c, "h4")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    c.kill_node(4);
    c.fabctl_ok(&["node", "rm", "h4"]);
    let nodes = c.fabctl_ok(&["node", "ls"]);
    assert!(!nodes.contains("h4"), "{nodes}");
}
