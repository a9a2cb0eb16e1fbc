//! Several volume-mgr instances over one real 3-member etcd cluster (issue 8):
//! - every manager answers the API with the same state; a change through one reaches an agent
//!   watching another;
//! - the controllers run on one elected leader: a blockd host is lost, and the leader is
//!   killed (kill -9) while the lost host's replicas are being re-homed; another manager takes
//!   over within 10 s, the API keeps answering, the re-homing completes with every set back at
//!   R members and no set given two replacements (no double action), and the data reads back;
//! - with etcd's quorum gone the API answers 503 `store_unavailable` (never stale data) and
//!   recovers when quorum returns.

use fabric_tests::cluster::{bin, fabctl, fabctl_json, http_get};
use fabric_tests::etcd::EtcdCluster;
use fabric_tests::{free_port, random_bytes, require, try_run, wait_for, Proc};
use std::process::Command;
use std::time::{Duration, Instant};

struct Manager {
    addr: String,
    proc: Option<Proc>,
}

struct Setup {
    etcd: EtcdCluster,
    managers: Vec<Manager>,
    nodes: Vec<Option<Proc>>,
    node_nbd: Vec<u16>,
    dir: tempfile::TempDir,
    prefix: String,
}

impl Setup {
    fn urls(&self) -> String {
        self.managers
            .iter()
            .map(|m| format!("http://{}", m.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    fn start_manager(&mut self, i: usize) {
        let addr = self.managers[i].addr.clone();
        let p = Proc::spawn(
            &format!("volume-mgr m{i}"),
            Command::new(bin("volume-mgr"))
                .args(["--listen", &addr, "--store", "etcd"])
                .args(["--etcd-endpoints", &self.etcd.endpoints().join(",")])
                .args(["--etcd-prefix", &self.prefix])
                .args(["--down-after", "2s", "--out-after", "3s"])
                .args(["--default-replicas", "2", "--no-rebalance"])
                .stdout(self.log(&format!("m{i}")))
                .stderr(self.log(&format!("m{i}"))),
        );
        self.managers[i].proc = Some(p);
        wait_for(&format!("m{i} /healthz"), Duration::from_secs(30), || {
            matches!(http_get(&addr, "/healthz"), Some((200, _)))
        });
    }

    fn start_node(&mut self, i: usize) {
        let d = self.dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let p = Proc::spawn(
            &format!("blockd n{i}"),
            Command::new(bin("blockd"))
                .args(["--manager", &self.urls(), "--node", &format!("n{i}")])
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--nbd-listen", &format!("127.0.0.1:{}", self.node_nbd[i])])
                .args(["--http-listen", "none"])
                .arg("--nbd-socket")
                .arg(d.join("nbd.sock"))
                .arg("--disk")
                .arg(format!("{}:1G", d.join("disk0.img").display()))
                .arg("--secret-file")
                .arg(self.dir.path().join("secret"))
                .args(["--heartbeat-interval", "300ms"])
                .stdout(self.log(&format!("n{i}")))
                .stderr(self.log(&format!("n{i}"))),
        );
        self.nodes[i] = Some(p);
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let t = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                out.push_str(&format!("--- {} (last 25 lines)\n", p.display()));
                for l in &lines[lines.len().saturating_sub(25)..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    fn json(&self, args: &[&str]) -> Option<serde_json::Value> {
        fabctl_json(&self.urls(), args)
    }

    /// The leader as the managers that answer see it (all must agree).
    fn leader(&self) -> Option<usize> {
        let mut seen = None;
        for m in self.managers.iter().filter(|m| m.proc.is_some()) {
            let (code, body) = http_get(&m.addr, "/v1/cluster")?;
            if code != 200 {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let l = v["leader"]
                .as_str()?
                .trim_start_matches("http://")
                .to_string();
            let i = self.managers.iter().position(|m| m.addr == l)?;
            if seen.is_some_and(|s| s != i) {
                return None;
            }
            seen = Some(i);
        }
        seen
    }
}

fn start(nodes: usize) -> Setup {
    require("qemu-io");
    let etcd = EtcdCluster::start(3);
    let dir = tempfile::Builder::new()
        .prefix("fabric-etcdm-")
        .tempdir()
        .unwrap();
    let secret: String = random_bytes(std::process::id() as u64 ^ 0xe7cd, 32)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(dir.path().join("secret"), secret).unwrap();
    let mut s = Setup {
        etcd,
        managers: (0..3)
            .map(|_| Manager {
                addr: format!("127.0.0.1:{}", free_port()),
                proc: None,
            })
            .collect(),
        nodes: (0..nodes).map(|_| None).collect(),
        node_nbd: (0..nodes).map(|_| free_port()).collect(),
        dir,
        prefix: format!("/fabric-test-{}/", std::process::id()),
    };
    for i in 0..3 {
        s.start_manager(i);
    }
    for i in 0..nodes {
        s.start_node(i);
    }
    wait_for("all nodes up", Duration::from_secs(60), || {
        s.json(&["node", "ls"]).is_some_and(|v| {
            let a = v.as_array().unwrap();
            a.len() == nodes && a.iter().all(|n| n["state"] == "up")
        })
    });
    s
}

fn qemu_io(url: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(url);
    let (ok, out) = try_run(&mut c);
    (ok && !out.contains("failed") && !out.contains("error"), out)
}

fn members(v: &serde_json::Value) -> Vec<Vec<(String, bool)>> {
    v["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["node"].as_str().unwrap().to_string(),
                        m["in_service"].as_bool().unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

#[test]
fn leader_killed_mid_recovery_another_finishes_it_once() {
    let mut s = start(4);
    let t = Instant::now();
    let leader = loop {
        if let Some(l) = s.leader() {
            break l;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no leader\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Every manager answers with the same state.
    let urls = s.urls();
    let (ok, out) = fabctl(&urls, &["volume", "create", "v", "--size", "64M"]);
    assert!(ok, "{out}\n{}", s.logs());
    for m in &s.managers {
        let url = format!("http://{}", m.addr);
        let v = fabctl_json(&url, &["volume", "show", "v"]).expect("every manager knows v");
        assert_eq!(v["size"], 64 << 20);
    }
    let v = s.json(&["volume", "show", "v"]).unwrap();
    let before = members(&v);
    // The gateway: a node that holds a replica of set 0; the victim: another replica holder
    // that is not the gateway.
    let gw: usize = before[0][0].0[1..].parse().unwrap();
    let url = format!("nbd://127.0.0.1:{}/v", s.node_nbd[gw]);
    let (ok, out) = qemu_io(&url, &["write -P 0x3c 0 64M"]);
    assert!(ok, "{out}\n{}", s.logs());
    let victim = (0..4)
        .filter(|&i| i != gw)
        .max_by_key(|&i| {
            before
                .iter()
                .filter(|m| m.iter().any(|(n, _)| n == &format!("n{i}")))
                .count()
        })
        .unwrap();
    let vname = format!("n{victim}");
    let affected = before
        .iter()
        .filter(|m| m.iter().any(|(n, _)| n == &vname))
        .count();
    assert!(affected > 0);

    // Lose the victim host; once the leader starts re-homing, kill the leader.
    s.nodes[victim].take();
    let lost = Instant::now();
    wait_for("re-homing to start", Duration::from_secs(30), || {
        s.json(&["volume", "show", "v"])
            .is_some_and(|v| members(&v).iter().any(|m| m.iter().any(|(_, ins)| !ins)))
    });
    let started = lost.elapsed();
    s.managers[leader].proc.take();
    let killed = Instant::now();
    // The API keeps answering through the others (fabctl fails over between URLs).
    let (mut answered, mut asked) = (0, 0);
    let mut new_leader = None;
    while killed.elapsed() < Duration::from_secs(10) {
        asked += 1;
        if s.json(&["volume", "ls"]).is_some() {
            answered += 1;
        }
        if new_leader.is_none() {
            new_leader = s.leader().filter(|&l| l != leader);
            if new_leader.is_some() {
                eprintln!("new leader after {:?}", killed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        asked >= 5 && answered == asked,
        "API answered {answered} of {asked} requests after the leader died"
    );
    assert!(
        new_leader.is_some(),
        "no new leader within 10 s\n{}",
        s.logs()
    );

    // The re-homing completes: every set back at 2 in-service members, none on the victim,
    // and each affected set got exactly one new member (never two replacements).
    wait_for("every set back at R", Duration::from_secs(90), || {
        s.json(&["volume", "show", "v"]).is_some_and(|v| {
            members(&v)
                .iter()
                .all(|m| m.len() == 2 && m.iter().all(|(n, ins)| *ins && n != &vname))
        })
    });
    let after = members(&s.json(&["volume", "show", "v"]).unwrap());
    for (b, a) in before.iter().zip(&after) {
        let kept: Vec<_> = b.iter().filter(|(n, _)| n != &vname).collect();
        for k in &kept {
            assert!(a.iter().any(|(n, _)| n == &k.0), "{b:?} -> {a:?}");
        }
    }
    eprintln!(
        "lost n{victim} ({affected} sets); re-homing began after {started:?}; leader m{leader} killed; all sets back at R {:?} after the kill",
        killed.elapsed()
    );
    let (ok, out) = qemu_io(&url, &["read -P 0x3c 0 64M"]);
    assert!(ok, "data after the failover: {out}\n{}", s.logs());
    let secret = s.dir.path().join("secret");
    let (ok, out) = fabctl(
        &s.urls(),
        &[
            "volume",
            "verify",
            "v",
            "--secret-file",
            secret.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}\n{}", s.logs());
}

#[test]
fn quorum_loss_is_503_until_it_returns() {
    let mut s = start(1);
    let urls = s.urls();
    let (ok, out) = fabctl(
        &urls,
        &["volume", "create", "q", "--size", "16M", "--replicas", "1"],
    );
    assert!(ok, "{out}");
    // A change through one manager wakes a watch on another (the store's change feed).
    let m0 = s.managers[0].addr.clone();
    let m2 = s.managers[2].addr.clone();
    let (code, body) = http_get(&m2, "/v1/volumes").unwrap();
    assert_eq!(code, 200);
    let r: u64 = serde_json::from_str::<serde_json::Value>(&body).unwrap()["revision"]
        .as_u64()
        .unwrap();
    let watcher = std::thread::spawn(move || {
        let t = Instant::now();
        let got = http_get(
            &m2,
            &format!("/v1/volumes?after_revision={r}&timeout_ms=20000"),
        );
        (t.elapsed(), got)
    });
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out) = fabctl(
        &format!("http://{m0}"),
        &["volume", "create", "w", "--size", "16M", "--replicas", "1"],
    );
    assert!(ok, "{out}");
    let (took, got) = watcher.join().unwrap();
    let (code, body) = got.unwrap();
    assert!(code == 200 && body.contains("\"w\""), "{code} {body}");
    assert!(took < Duration::from_secs(5), "watch woke after {took:?}");

    // Quorum gone: 503, never an answer from stale state.
    s.etcd.stop(1);
    s.etcd.kill(2);
    for m in &s.managers {
        let t = Instant::now();
        let (code, body) = http_get(&m.addr, "/v1/volumes").unwrap_or((0, String::new()));
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("store_unavailable"), "{body}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
    let (ok, out) = fabctl(&urls, &["volume", "create", "x", "--size", "16M"]);
    assert!(!ok && out.contains("store"), "{out}");
    s.etcd.restart(1);
    s.etcd.restart(2);
    wait_for(
        "API back after quorum returns",
        Duration::from_secs(60),
        || {
            s.json(&["volume", "ls"])
                .is_some_and(|v| v.as_array().unwrap().len() == 2)
        },
    );
}
