//! Shared by the integration tests: runs the real `volume-mgr` binary on a free port.
#![allow(dead_code)] // each test file uses a part

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mgr {
    pub child: Child,
    pub url: String,
}

impl Drop for Mgr {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mgr {
    /// SIGTERM (what systemd and Ctrl-C-alikes send); `Child::kill` is SIGKILL.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_volume-mgr")
}

/// Starts volume-mgr on `dir` and waits for `/healthz`. Volumes get one replica unless
/// `extra` sets `--default-replicas` (most tests register a single node).
pub fn start(dir: &Path, extra: &[&str]) -> Mgr {
    // reqwest is built without a rustls crypto provider (volume-mgr picks ring): every
    // reqwest client of the tests needs it installed first.
    volume_mgr::tls::install_provider();
    let port = free_port();
    let default_replicas: &[&str] = if extra.contains(&"--default-replicas") {
        &[]
    } else {
        &["--default-replicas", "1"]
    };
    let mut child = Command::new(bin())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir)
        .args(default_replicas)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    while reqwest::blocking::get(format!("{url}/healthz")).is_err() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("volume-mgr exited at start-up: {s}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "volume-mgr did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Mgr { child, url }
}

/// A blocking reqwest client, with the rustls crypto provider installed first (reqwest is
/// built without one; building a client before it is installed panics).
#[allow(dead_code)]
pub fn client() -> reqwest::blocking::Client {
    volume_mgr::tls::install_provider();
    reqwest::blocking::Client::new()
}
