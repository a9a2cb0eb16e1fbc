//! A multi-host fabric on one machine: volume-mgr in namespace host 0, one blockd per
//! namespace host 1..=N (own disk file, replica protocol on its underlay address, NBD on a unix
//! socket that clients in the root namespace reach through the shared filesystem), all on
//! one bridge in 198.18.0.0/24 with no route out. Daemons are killed (SIGKILL) and namespaces
//! deleted on drop, also when a test fails.

use crate::cluster::bin;
use crate::netns::Net;
use crate::{try_run, wait_for, Proc};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Cluster {
    /// Declared first: the processes die before the namespaces and the directory go.
    nodes: Vec<Option<Proc>>,
    manager: Option<Proc>,
    pub net: Net,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl Cluster {
    /// volume-mgr plus `n` blockd hosts `h1..hn`, each with a `disk_size` file disk; `extra`
    /// flags go to every blockd. Waits until every node is registered and up.
    pub fn start(n: usize, disk_size: &str, extra: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("fabric-mh-")
            .tempdir()
            .unwrap();
        let secret: String = crate::random_bytes(std::process::id() as u64 ^ 0x5eed, 32)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(dir.path().join("secret"), secret).unwrap();
        for i in 1..=n {
            std::fs::create_dir_all(dir.path().join(format!("h{i}"))).unwrap();
        }
        let mut c = Cluster {
            nodes: (0..n).map(|_| None).collect(),
            manager: None,
            net: Net::new(n + 1),
            dir,
            extra: extra
                .iter()
                .map(|s| s.to_string())
                .chain(std::iter::once(format!("--disk-size={disk_size}")))
                .collect(),
        };
        c.start_manager();
        for i in 1..=n {
            c.spawn_node(i);
        }
        c.wait_nodes_up();
        c
    }

    pub fn manager_url(&self) -> String {
        format!("http://{}:7700", self.net.hosts[0].addr)
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    pub fn start_manager(&mut self) {
        let h = &self.net.hosts[0];
        let p = Proc::spawn(
            "volume-mgr",
            h.command(bin("volume-mgr"))
                .args(["--listen", &format!("{}:7700", h.addr)])
                .arg("--data-dir")
                .arg(self.dir.path().join("manager"))
                .args(["--down-after", "2s"])
                .stdout(self.log("volume-mgr"))
                .stderr(self.log("volume-mgr")),
        );
        self.manager = Some(p);
        wait_for("volume-mgr", Duration::from_secs(20), || {
            self.fabctl(&["node", "ls"]).0
        });
    }

    /// Restarts volume-mgr (SIGKILL, same state) with `extra` flags after the usual ones
    /// (e.g. `--out-after 5s`) and waits until it answers and every host is up again.
    pub fn restart_manager_with(&mut self, extra: &[&str]) {
        self.manager.take();
        let h = &self.net.hosts[0];
        let p = Proc::spawn(
            "volume-mgr",
            h.command(bin("volume-mgr"))
                .args(["--listen", &format!("{}:7700", h.addr)])
                .arg("--data-dir")
                .arg(self.dir.path().join("manager"))
                .args(["--down-after", "2s"])
                .args(extra)
                .stdout(self.log("volume-mgr"))
                .stderr(self.log("volume-mgr")),
        );
        self.manager = Some(p);
        wait_for("volume-mgr", Duration::from_secs(20), || {
            self.fabctl(&["node", "ls"]).0
        });
        self.wait_nodes_up();
    }

    /// Path of host `i`'s NBD unix socket.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("h{i}/nbd.sock"))
    }

    /// `nbd+unix:///VOLUME?socket=…` through host `i`'s gateway.
    pub fn url(&self, i: usize, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.socket(i).display())
    }

    pub fn secret_path(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    fn spawn_node(&mut self, i: usize) {
        let h = self.net.hosts[i].clone();
        let disk_size = self
            .extra
            .iter()
            .find_map(|e| e.strip_prefix("--disk-size="))
            .unwrap_or("1G")
            .to_string();
        let flags: Vec<&String> = self
            .extra
            .iter()
            .filter(|e| !e.starts_with("--disk-size="))
            .collect();
        let p = Proc::spawn(
            &format!("blockd h{i}"),
            h.command(bin("blockd"))
                .args(["--manager", &self.manager_url(), "--node", &format!("h{i}")])
                .args(["--listen", &format!("{}:7800", h.addr)])
                .args(["--nbd-listen", "none", "--http-listen", "none"])
                .arg("--nbd-socket")
                .arg(self.socket(i))
                .arg("--disk")
                .arg(format!(
                    "{}:{disk_size}",
                    self.dir.path().join(format!("h{i}/disk0.img")).display()
                ))
                .arg("--secret-file")
                .arg(self.secret_path())
                .args(["--heartbeat-interval", "300ms"])
                .args(flags)
                .stdout(self.log(&format!("h{i}")))
                .stderr(self.log(&format!("h{i}"))),
        );
        self.nodes[i - 1] = Some(p);
    }

    /// Node states from `fabctl node ls`.
    fn node_states(&self) -> Vec<(String, String)> {
        self.json(&["node", "ls"])
            .and_then(|v| {
                Some(
                    v.as_array()?
                        .iter()
                        .map(|n| {
                            (
                                n["name"].as_str().unwrap_or("").to_string(),
                                n["state"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    pub fn wait_nodes_up(&self) {
        let all: Vec<usize> = (1..=self.nodes.len()).collect();
        self.wait_up(&all);
    }

    /// Waits until the given hosts' blockd are registered and up.
    pub fn wait_up(&self, hosts: &[usize]) {
        let t = Instant::now();
        loop {
            let st = self.node_states();
            let up = hosts.iter().all(|i| {
                st.iter()
                    .any(|(name, s)| *name == format!("h{i}") && s == "up")
            });
            if up {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "nodes not up after 30 s: {st:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs host `i`'s blockd (a crash: its disk stays).
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i - 1].take();
    }

    /// Starts host `i`'s blockd again with the same disk and flags and waits until it is up.
    pub fn restart_node(&mut self, i: usize) {
        self.kill_node(i);
        self.spawn_node(i);
        self.wait_up(&[i]);
    }

    /// Pulls host `i`'s cable (its processes keep running).
    pub fn link_down(&self, i: usize) {
        self.net.link_down(i);
    }

    pub fn link_up(&self, i: usize) {
        self.net.link_up(i);
    }

    /// `fabctl --manager URL ARGS…` run inside the manager's namespace.
    pub fn fabctl(&self, args: &[&str]) -> (bool, String) {
        try_run(
            self.net.hosts[0]
                .command(bin("fabctl"))
                .args(["--manager", &self.manager_url()])
                .args(args),
        )
    }

    pub fn fabctl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.fabctl(args);
        assert!(ok, "fabctl {args:?} failed: {out}\n{}", self.logs());
        out
    }

    pub fn json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let out = self.net.hosts[0]
            .command(bin("fabctl"))
            .args(["--manager", &self.manager_url(), "-o", "json"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `fabctl volume verify` with the cluster secret: (all equal, output).
    pub fn verify(&self, volume: &str) -> (bool, String) {
        let secret = self.secret_path();
        self.fabctl(&[
            "volume",
            "verify",
            volume,
            "--secret-file",
            secret.to_str().unwrap(),
        ])
    }

    /// Whether every replica of every chunk set of `volume` is recorded in service.
    pub fn all_in_service(&self, volume: &str) -> bool {
        self.json(&["volume", "show", volume])
            .and_then(|v| {
                Some(v["sets"].as_array()?.iter().all(|s| {
                    s["members"]
                        .as_array()
                        .is_some_and(|m| m.iter().all(|m| m["in_service"] == true))
                }))
            })
            .unwrap_or(false)
    }

    /// Waits (bounded) until every replica is back in service and `verify` finds them equal.
    pub fn wait_converged(&self, volume: &str, timeout: Duration) {
        let t = Instant::now();
        loop {
            if self.all_in_service(volume) {
                let (ok, out) = self.verify(volume);
                if ok {
                    return;
                }
                if t.elapsed() > timeout {
                    panic!("replicas of {volume} differ:\n{out}\n{}", self.logs());
                }
            } else if t.elapsed() > timeout {
                let show = self.fabctl(&["volume", "show", volume]).1;
                panic!(
                    "replicas of {volume} not all back in service after {timeout:?}:\n{show}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// An HTTP request to host `i`'s blockd (started with `--http-listen 0.0.0.0:7801` in the
    /// extra flags), made with curl inside that host's namespace: (2xx, body).
    pub fn node_http(&self, i: usize, method: &str, path: &str) -> (bool, String) {
        let out = self.net.hosts[i]
            .command("curl")
            .args(["-sS", "-f", "--max-time", "5", "-X", method])
            .arg(format!("http://127.0.0.1:7801{path}"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("curl: {e}"));
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// A metric's value on host `i`'s blockd `/metrics` (a line `NAME VALUE`, NAME with its
    /// labels as written there); None if absent or unreachable.
    pub fn node_metric(&self, i: usize, name: &str) -> Option<f64> {
        let (ok, body) = self.node_http(i, "GET", "/metrics");
        if !ok {
            return None;
        }
        body.lines().find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
    }

    /// Every daemon's log (the last lines), for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut names = vec!["volume-mgr".to_string()];
        names.extend((1..=self.nodes.len()).map(|i| format!("h{i}")));
        for n in names {
            let t = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(30).collect();
            s += &format!("--- {n}.log (last {} lines)\n", tail.len());
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.take();
        }
        self.manager.take();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// `qemu-io -f raw URL -c CMD…`: (success and no command failed, output).
pub fn qemu_io(url: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(url);
    let (ok, out) = try_run(&mut c);
    let failed = out.contains("failed") || out.contains("error");
    (ok && !failed, out)
}

/// Helpers of the torture test (tests/tests/torture.rs).
impl Cluster {
    /// SIGKILLs volume-mgr and leaves it down (`restart_manager_with` starts it again).
    pub fn kill_manager(&mut self) {
        self.manager.take();
    }

    /// Daemons that exited although nobody stopped them: ("h2", status) / ("volume-mgr", …).
    /// A killed node (`kill_node`) is not running and not listed.
    pub fn exited(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(m) = &mut self.manager {
            if let Some(s) = m.try_wait() {
                out.push(("volume-mgr".to_string(), s.to_string()));
            }
        }
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(p) = n {
                if let Some(s) = p.try_wait() {
                    out.push((format!("h{}", i + 1), s.to_string()));
                }
            }
        }
        out
    }

    /// The directory holding the daemons' logs (`volume-mgr.log`, `h1.log`, …).
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}
