//! Rebalancing when a node is added (issue 7) on namespace hosts, plus `fabctl node ls` and
//! the progress of `fabctl volume verify [--repair]`.
//!
//! Three blockd hosts hold two volumes (`a`: 64 MiB, R=3; `b`: 32 MiB, R=2) written with
//! qemu-io patterns; volume-mgr runs with `--rebalance-after 3s`. A fourth host then joins
//! (a fresh registration): after it has been up for 3 s, the sets whose ideal placement now
//! lists it move to it, a few at a time, copy-then-switch. Polled throughout: no set ever
//! has fewer than R members in service; nothing moves before the damping delay; only sets
//! that gain h4 change, and they lose exactly one old member. It converges (the rebalancer
//! reports idle, nothing pending, and the placement stays put for the following passes), the
//! patterns read back (through h1 and through h4) and `fabctl volume verify` finds every
//! replica equal, printing progress lines (stderr is not a terminal). Finally h2's disk is
//! wiped (no gateway attached, so nothing resyncs it on its own): verify prints its progress
//! and exits 1 on the differences, `verify --repair` shows its own progress and puts them
//! right.
//!
//! Bounded (about a minute); processes and namespaces go on drop, also on failure.

use fabric_tests::multihost::{qemu_io, Cluster};
use fabric_tests::require;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const FLAGS: &[&str] = &["--replica-timeout", "2s", "--min-replicas-wait", "10s"];
const SETTLE: Duration = Duration::from_secs(3);

/// (volume, R, size in MiB, pattern)
const VOLUMES: [(&str, usize, u64, u8); 2] = [("a", 3, 64, 0xa1), ("b", 2, 32, 0xb2)];

/// Per set: (nodes, nodes in service), from `fabctl volume show`.
type Sets = Vec<(Vec<String>, Vec<String>)>;

fn sets(c: &Cluster, vol: &str) -> Option<Sets> {
    let v = c.json(&["volume", "show", vol])?;
    v["sets"].as_array().map(|a| {
        a.iter()
            .map(|s| {
                let m = s["members"].as_array().cloned().unwrap_or_default();
                let name = |m: &serde_json::Value| m["node"].as_str().unwrap_or("").to_string();
                (
                    m.iter().map(name).collect(),
                    m.iter()
                        .filter(|m| m["in_service"] == true)
                        .map(name)
                        .collect(),
                )
            })
            .collect()
    })
}

fn all_sets(c: &Cluster) -> Option<BTreeMap<&'static str, Sets>> {
    VOLUMES
        .iter()
        .map(|(v, ..)| sets(c, v).map(|s| (*v, s)))
        .collect()
}

fn reads(mib: u64, pattern: u8) -> Vec<String> {
    (0..mib / 16)
        .map(|i| format!("read -P {pattern:#x} {}M 16M", i * 16))
        .collect()
}

fn read_check(c: &Cluster, host: usize, vol: &str, mib: u64, pattern: u8) {
    let cmds = reads(mib, pattern);
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let (ok, out) = qemu_io(&c.url(host, vol), &cmds);
    assert!(
        ok && !out.contains("Pattern verification failed"),
        "read-back of {vol} through h{host}: {out}\n{}",
        c.logs()
    );
}

fn rebalance(c: &Cluster) -> serde_json::Value {
    c.json(&["status"]).unwrap_or_default()["rebalance"].clone()
}

/// Lines of fabctl's plain progress display for `label` (`fabctl: verify a: …`).
fn progress_lines(out: &str, label: &str) -> usize {
    out.lines()
        .filter(|l| l.starts_with(&format!("fabctl: {label}: ")))
        .count()
}

#[test]
fn added_node_takes_its_share_without_losing_redundancy() {
    require("qemu-io");
    let start = Instant::now();
    let mut c = Cluster::start(4, "1G", FLAGS);
    c.restart_manager_with(&["--out-after", "10m", "--rebalance-after", "3s"]);
    // h4 leaves before any data exists: it comes back below as a new node.
    c.kill_node(4);
    let t = Instant::now();
    loop {
        let (ok, out) = c.fabctl(&["node", "rm", "h4"]);
        if ok {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "node rm h4: {out}");
        std::thread::sleep(Duration::from_millis(300));
    }
    for (v, r, mib, pattern) in VOLUMES {
        c.fabctl_ok(&[
            "volume",
            "create",
            v,
            "--size",
            &format!("{mib}M"),
            "--replicas",
            &r.to_string(),
        ]);
        let cmds: Vec<String> = (0..mib / 16)
            .map(|i| format!("write -P {pattern:#x} {}M 16M", i * 16))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
        let (ok, out) = qemu_io(&c.url(1, v), &cmds);
        assert!(ok, "qemu-io write {v}: {out}\n{}", c.logs());
        c.wait_converged(v, Duration::from_secs(30));
    }
    let before = all_sets(&c).expect("volume show");
    for (v, s) in &before {
        assert!(
            s.iter().all(|(n, _)| !n.contains(&"h4".to_string())),
            "{v}: {s:?}"
        );
    }
    // Balanced over three hosts: nothing to do.
    let rb = rebalance(&c);
    assert_eq!(rb["pending"], 0, "{rb}");
    assert_eq!(rb["in_progress"], 0, "{rb}");

    // A fourth host joins.
    c.restart_node(4);
    let up = Instant::now();
    eprintln!("h4 up after {:?}", start.elapsed());
    let mut first_move: Option<Duration> = None;
    let mut saw_waiting = false;
    let mut most_moving = 0usize;
    let (converged, after) = loop {
        let now = all_sets(&c).expect("volume show");
        for (v, r, ..) in VOLUMES {
            for (i, (nodes, ins)) in now[v].iter().enumerate() {
                assert!(
                    ins.len() >= r,
                    "{v} set {i} has {} members in service ({nodes:?}, in service {ins:?})\n{}",
                    ins.len(),
                    c.logs()
                );
                // The old copies stay until the new one serves: a set is R (settled), or R
                // in service and one more (moving).
                assert!(nodes.len() <= r + 1, "{v} set {i}: {nodes:?}");
            }
        }
        let moving = now
            .iter()
            .map(|(v, s)| {
                let r = VOLUMES.iter().find(|x| x.0 == *v).unwrap().1;
                s.iter().filter(|(n, _)| n.len() > r).count()
            })
            .sum::<usize>();
        most_moving = most_moving.max(moving);
        let on_h4 = now
            .values()
            .flatten()
            .any(|(n, _)| n.contains(&"h4".to_string()));
        if on_h4 && first_move.is_none() {
            first_move = Some(up.elapsed());
        }
        let rb = rebalance(&c);
        if first_move.is_none() && rb["state"] == "waiting" && rb["pending"].as_u64() > Some(0) {
            saw_waiting = true;
        }
        if on_h4
            && moving == 0
            && rb["state"] == "idle"
            && rb["pending"] == 0
            && rb["in_progress"] == 0
        {
            break (up.elapsed(), now);
        }
        assert!(
            up.elapsed() < Duration::from_secs(90),
            "no convergence after 90 s: {rb}\n{now:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let first_move = first_move.unwrap();
    eprintln!(
        "first set moved {first_move:?} after h4 was up, converged after {converged:?}, \
         at most {most_moving} sets moving at once"
    );
    assert!(
        first_move >= SETTLE - Duration::from_millis(1000),
        "data moved to h4 {first_move:?} after it came up (--rebalance-after 3s)"
    );
    assert!(saw_waiting, "the rebalancer never reported waiting for h4");
    assert!(most_moving <= 4, "{most_moving} sets moving at once");
    // Minimal movement: a set changed only by gaining h4 and losing one old member.
    let mut moved = 0;
    for (v, r, ..) in VOLUMES {
        for (i, ((old, _), (new, ins))) in before[v].iter().zip(&after[v]).enumerate() {
            assert_eq!(new.len(), r, "{v} set {i}: {new:?}");
            assert_eq!(ins.len(), r, "{v} set {i}: {new:?}");
            let mut o = old.clone();
            let mut n = new.clone();
            o.sort();
            n.sort();
            if o == n {
                continue;
            }
            moved += 1;
            assert!(
                n.contains(&"h4".to_string()),
                "{v} set {i}: {old:?} -> {new:?}"
            );
            let kept = old.iter().filter(|x| new.contains(x)).count();
            assert_eq!(kept, r - 1, "{v} set {i}: {old:?} -> {new:?}");
        }
    }
    let total: usize = before.values().map(|s| s.len()).sum();
    eprintln!("{moved} of {total} sets moved to h4");
    assert!(moved > 0 && moved < total, "{moved} of {total}");
    // It stops: the following passes change nothing and report the moves done.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        all_sets(&c).unwrap(),
        after,
        "placement changed after convergence"
    );
    let rb = rebalance(&c);
    assert_eq!(rb["moved"].as_u64(), Some(moved as u64), "{rb}");
    assert_eq!(rb["pending"], 0, "{rb}");
    let status = c.fabctl_ok(&["status"]);
    assert!(
        status.contains(&format!("rebalance: idle; {moved} moved")),
        "{status}"
    );

    // The data: every pattern reads back, through h1 and through h4 (its own copies first).
    for (v, _, mib, pattern) in VOLUMES {
        read_check(&c, 1, v, mib, pattern);
        read_check(&c, 4, v, mib, pattern);
        let (ok, out) = c.verify(v);
        assert!(ok, "verify {v}: {out}\n{}", c.logs());
        assert!(out.contains("all replicas equal"), "{out}");
        assert!(progress_lines(&out, &format!("verify {v}")) >= 2, "{out}");
        assert!(out.contains(&format!("fabctl: verify {v}: ")) && out.contains("done in"));
    }

    // fabctl node ls: h4 holds sets now, nobody is out, draining or full.
    let ls = c.fabctl_ok(&["node", "ls"]);
    eprintln!("{ls}");
    assert!(
        ls.contains("FLAGS") && ls.contains("SETS") && ls.contains("CHUNKS"),
        "{ls}"
    );
    let nodes = c.json(&["node", "ls"]).expect("node ls json");
    let h4 = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "h4"))
        .expect("h4 listed")
        .clone();
    let h4_sets = after
        .values()
        .flatten()
        .filter(|(n, _)| n.contains(&"h4".to_string()))
        .count();
    assert_eq!(h4["sets"].as_u64(), Some(h4_sets as u64), "{h4}");
    assert_eq!(h4["state"], "up", "{h4}");
    assert_eq!(h4["draining"], false, "{h4}");
    assert_eq!(h4["full"], false, "{h4}");
    assert!(
        h4["used"].as_u64() > Some(0) && h4["capacity"].as_u64() > Some(0),
        "{h4}"
    );

    // h2 loses its disk: verify shows progress and exits 1 on the differences; --repair fixes.
    // The gateways (h1, h4) restart first: an attached gateway that saw h2 go would resync it
    // on its own, racing the check.
    c.restart_node(1);
    c.restart_node(4);
    c.kill_node(2);
    let disk = c.secret_path().parent().unwrap().join("h2/disk0.img");
    std::fs::remove_file(&disk).unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    c.restart_node(2);
    let secret = c.secret_path();
    let secret = secret.to_str().unwrap();
    // `restart_node` returns once the manager sees the node up, which an old heartbeat can
    // still claim for a moment: wait until verify reaches every replica.
    let t = Instant::now();
    let (ok, out) = loop {
        let (ok, out) = c.verify("a");
        if !out.contains("UNREACHABLE") {
            break (ok, out);
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{out}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(!ok, "verify of a wiped replica passed: {out}");
    assert!(out.contains("DIFF chunk"), "{out}");
    assert!(progress_lines(&out, "verify a") >= 2, "{out}");
    let (ok, out) = c.fabctl(&["volume", "verify", "a", "--repair", "--secret-file", secret]);
    assert!(ok, "verify --repair: {out}\n{}", c.logs());
    assert!(
        out.contains("REPAIRED chunk") && out.contains("all replicas equal"),
        "{out}"
    );
    assert!(progress_lines(&out, "repair a") >= 2, "{out}");
    read_check(&c, 2, "a", 64, 0xa1);
    eprintln!("test done in {:?}", start.elapsed());
}
