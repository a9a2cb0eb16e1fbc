//! A real etcd cluster for tests: `EtcdCluster::start(3)` runs three `etcd` members (Debian's
//! `etcd-server`) on free loopback ports with their data in a temp dir (on tmpfs when there is
//! one), waits until every member is healthy, and on drop SIGKILLs them and removes the dir,
//! also when the test panics. Members can be killed (SIGKILL), stopped (SIGTERM) and
//! restarted (same data dir and ports) for quorum-loss tests.

use crate::{try_run, Proc};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    proc: Option<Proc>,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    initial_cluster: String,
    members: Vec<Member>,
}

/// Fails (not skips) without the etcd binaries.
pub fn require_etcd() {
    for tool in ["etcd", "etcdctl"] {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{tool} is not installed: install etcd-server (apt-get install etcd-server etcd-client), \
             as .ci/run does"
        );
    }
}

/// Ports for `n` members: a client and a peer port each, all distinct.
fn ports(n: usize) -> Vec<(u16, u16)> {
    let mut taken = std::collections::HashSet::new();
    let mut next = || loop {
        let p = crate::free_port();
        if taken.insert(p) {
            return p;
        }
    };
    (0..n).map(|_| (next(), next())).collect()
}

impl EtcdCluster {
    /// Starts an `n`-member cluster and waits (up to 60 s) until every member is healthy.
    pub fn start(n: usize) -> EtcdCluster {
        require_etcd();
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("fabric-etcd-")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::Builder::new().prefix("fabric-etcd-").tempdir()
        }
        .expect("temp dir for etcd");
        let members: Vec<Member> = ports(n)
            .into_iter()
            .enumerate()
            .map(|(i, (client_port, peer_port))| Member {
                name: format!("m{i}"),
                client_port,
                peer_port,
                proc: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            dir,
            initial_cluster,
            members,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_healthy(&(0..n).collect::<Vec<_>>(), Duration::from_secs(60));
        c
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "fabric-test"])
            // A loaded 2-core CI machine: raft timing with room to spare.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let name = format!("etcd {}", m.name);
        self.members[i].proc = Some(Proc::spawn(&name, &mut cmd));
    }

    /// Client URLs of all members (running or not), `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Whether member `i` answers a health check (it has a leader and serves reads).
    pub fn healthy(&self, i: usize) -> bool {
        try_run(
            Command::new("etcdctl")
                .args(["--endpoints", &self.endpoint(i)])
                .args(["--command-timeout", "2s", "--dial-timeout", "1s"])
                .args(["endpoint", "health"]),
        )
        .0
    }

    /// Waits until the members `which` are all healthy; panics with their logs' tails after
    /// `timeout`.
    pub fn wait_healthy(&mut self, which: &[usize], timeout: Duration) {
        let t = Instant::now();
        loop {
            if which.iter().all(|&i| self.healthy(i)) {
                return;
            }
            for &i in which {
                if let Some(p) = self.members[i].proc.as_mut() {
                    if let Some(st) = p.try_wait() {
                        panic!("etcd member {i} exited ({st}):\n{}", self.log_tail(i));
                    }
                }
            }
            if t.elapsed() > timeout {
                let logs: Vec<String> = which.iter().map(|&i| self.log_tail(i)).collect();
                panic!(
                    "etcd members {which:?} not healthy after {timeout:?}:\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of member `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- {} log:\n{}",
            self.members[i].name,
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// SIGKILLs member `i` (no-op if it is not running).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Stops member `i` with SIGTERM, waiting up to 10 s (then SIGKILL).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            // SAFETY: kill(2) takes no pointers; the pid is a child we started and have not
            // reaped (try_wait below reaps it).
            unsafe { libc::kill(p.id() as libc::pid_t, libc::SIGTERM) };
            let t = Instant::now();
            while p.try_wait().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            p.kill();
        }
    }

    /// Starts member `i` again on its data dir and ports (no wait; see `wait_healthy`).
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].proc.is_none(), "etcd member {i} is running");
        self.spawn(i);
    }

    /// Whether member `i` is running (started and not killed or stopped by the test).
    pub fn running(&self, i: usize) -> bool {
        self.members[i].proc.is_some()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Processes first (Proc's drop SIGKILLs and reaps), then the temp dir goes.
        for m in &mut self.members {
            m.proc.take();
        }
    }
}
