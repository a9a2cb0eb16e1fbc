//! A single-host fabric made of the real `volume-mgr` and `blockd` processes, started from the
//! workspace's target directory with the agreed flags (DESIGN.md), and `fabctl` to drive it.

use crate::nbd::NbdServer;
use crate::{free_port, try_run, wait_for, Proc};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A workspace binary (built by `cargo build --workspace`; `cargo test --workspace` builds it
/// too), found beside the test executable: `target/<profile>/deps/<test>` ->
/// `target/<profile>/<name>`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace`",
        p.display()
    );
    p
}

/// `GET path` over HTTP/1.0; returns (status code, body) or None when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Some((code, body.unwrap_or_default()))
}

/// volume-mgr + one blockd (node `n1`, one sparse file disk) in a temporary directory; both
/// processes are SIGKILLed on drop and the directory removed.
pub struct Fabric {
    pub manager_url: String,
    pub manager_addr: String,
    pub blockd_http: String,
    pub nbd_port: u16,
    pub socket: PathBuf,
    disk_size: String,
    // Declared before `dir`: the processes die before their directory is removed.
    blockd: Option<Proc>,
    manager: Option<Proc>,
    dir: tempfile::TempDir,
}

impl Fabric {
    /// Starts volume-mgr and blockd with a `disk_size` (e.g. "4G") file disk, waits for
    /// volume-mgr's `/healthz`, blockd's `/healthz` and blockd's registration (`up` in
    /// `fabctl node ls`).
    pub fn start(disk_size: &str) -> Fabric {
        let dir = tempfile::Builder::new()
            .prefix("fabric-")
            .tempdir()
            .unwrap();
        let mport = free_port();
        let mut f = Fabric {
            manager_url: format!("http://127.0.0.1:{mport}"),
            manager_addr: format!("127.0.0.1:{mport}"),
            blockd_http: format!("127.0.0.1:{}", free_port()),
            nbd_port: free_port(),
            socket: dir.path().join("nbd.sock"),
            disk_size: disk_size.to_string(),
            blockd: None,
            manager: None,
            dir,
        };
        f.start_manager();
        f.start_blockd();
        f
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .unwrap()
    }

    /// (Re)starts volume-mgr on the same address and data directory.
    pub fn start_manager(&mut self) {
        let p = Proc::spawn(
            "volume-mgr",
            Command::new(bin("volume-mgr"))
                .args(["--listen", &self.manager_addr, "--default-replicas", "1"])
                .arg("--data-dir")
                .arg(self.dir.path().join("manager"))
                .stdout(self.log("volume-mgr.log"))
                .stderr(self.log("volume-mgr.log")),
        );
        self.manager = Some(p);
        let addr = self.manager_addr.clone();
        self.wait_alive("volume-mgr /healthz", Duration::from_secs(30), |_| {
            matches!(http_get(&addr, "/healthz"), Some((200, _)))
        });
    }

    /// (Re)starts blockd with the same node name, addresses and disk.
    pub fn start_blockd(&mut self) {
        let disk = format!(
            "{}:{}",
            self.dir.path().join("disk0.img").display(),
            self.disk_size
        );
        let p = Proc::spawn(
            "blockd",
            Command::new(bin("blockd"))
                .args(["--manager", &self.manager_url, "--node", "n1"])
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--nbd-listen", &format!("127.0.0.1:{}", self.nbd_port)])
                .arg("--nbd-socket")
                .arg(&self.socket)
                .args(["--http-listen", &self.blockd_http])
                .args(["--disk", &disk])
                .stdout(self.log("blockd.log"))
                .stderr(self.log("blockd.log")),
        );
        self.blockd = Some(p);
        let http = self.blockd_http.clone();
        self.wait_alive("blockd /healthz", Duration::from_secs(30), |_| {
            matches!(http_get(&http, "/healthz"), Some((200, _)))
        });
        let url = self.manager_url.clone();
        self.wait_alive(
            "blockd to register (fabctl node ls)",
            Duration::from_secs(30),
            |_| {
                fabctl_json(&url, &["node", "ls"])
                    .and_then(|v| {
                        v.as_array()?
                            .iter()
                            .find(|n| n["name"] == "n1")
                            .map(|n| n["state"] == "up")
                    })
                    .unwrap_or(false)
            },
        );
    }

    /// Like `wait_for`, but fails at once (with the logs) if a daemon exits meanwhile.
    fn wait_alive(&mut self, what: &str, timeout: Duration, mut f: impl FnMut(&Self) -> bool) {
        let mut dead = None;
        wait_for(what, timeout, || {
            for p in [self.manager.as_mut(), self.blockd.as_mut()]
                .into_iter()
                .flatten()
            {
                if let Some(st) = p.try_wait() {
                    dead = Some(format!("{} exited ({st})", p.name));
                    return true;
                }
            }
            f(self)
        });
        if let Some(d) = dead {
            panic!("{d} while waiting for {what}\n{}", self.logs());
        }
    }

    /// SIGKILLs blockd (a crash, not a clean stop).
    pub fn kill_blockd(&mut self) {
        self.blockd.take();
    }

    /// SIGKILLs volume-mgr.
    pub fn kill_manager(&mut self) {
        self.manager.take();
    }

    /// Runs `fabctl --manager URL ARGS…`; returns (success, stdout+stderr).
    pub fn fabctl(&self, args: &[&str]) -> (bool, String) {
        fabctl(&self.manager_url, args)
    }

    /// Runs fabctl and panics (with the daemons' logs) unless it succeeds.
    pub fn fabctl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.fabctl(args);
        assert!(ok, "fabctl {args:?} failed: {out}\n{}", self.logs());
        out
    }

    /// `fabctl -o json ARGS…` parsed; panics unless it succeeds with JSON on stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        fabctl_json(&self.manager_url, args)
            .unwrap_or_else(|| panic!("fabctl -o json {args:?} failed\n{}", self.logs()))
    }

    /// `fabctl volume create NAME --size SIZE`, then waits until blockd serves the export.
    pub fn create_volume(&self, name: &str, size: &str) {
        self.fabctl_ok(&["volume", "create", name, "--size", size]);
        let url = self.unix_url(name);
        wait_for(&format!("export {name}"), Duration::from_secs(20), || {
            try_run(Command::new("nbdinfo").args(["--size", &url])).0
        });
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn blockd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("blockd.log")).unwrap_or_default()
    }

    /// Both daemons' logs (for failure messages).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in ["volume-mgr.log", "blockd.log"] {
            let t = std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(40).collect();
            s += &format!("--- {n} (last {} lines)\n", tail.len());
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl NbdServer for Fabric {
    fn name(&self) -> &str {
        "fabric"
    }
    fn unix_url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
    fn tcp_url(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }
    fn diagnostics(&self) -> String {
        self.logs()
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.blockd.take();
        self.manager.take();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Runs `fabctl --manager URL ARGS…`; returns (success, stdout+stderr).
pub fn fabctl(manager: &str, args: &[&str]) -> (bool, String) {
    try_run(
        Command::new(bin("fabctl"))
            .args(["--manager", manager])
            .args(args),
    )
}

/// `fabctl --manager URL -o json ARGS…`: stdout parsed as JSON, None on failure.
pub fn fabctl_json(manager: &str, args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(bin("fabctl"))
        .args(["--manager", manager, "-o", "json"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}
