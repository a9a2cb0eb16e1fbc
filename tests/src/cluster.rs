//! A single-host fabric made of the real `volume-mgr` and `blockd` processes.

use crate::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace's binaries (built by `cargo test --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace` (cargo test --workspace builds it)",
        p.display()
    );
    p
}

pub struct Fabric {
    pub dir: tempfile::TempDir,
    pub manager_url: String,
    pub nbd_port: u16,
    pub socket: PathBuf,
    manager: Option<Child>,
    blockd: Option<Child>,
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Fabric {
    /// Starts volume-mgr and blockd (one `disk_size` file disk) and waits until blockd is up.
    pub fn start(disk_size: &str) -> Fabric {
        let dir = tempfile::tempdir().unwrap();
        let mport = free_port();
        let mut f = Fabric {
            manager_url: format!("http://127.0.0.1:{mport}"),
            nbd_port: free_port(),
            socket: dir.path().join("nbd.sock"),
            dir,
            manager: None,
            blockd: None,
        };
        let log = |n: &str| std::fs::File::create(f.dir.path().join(n)).unwrap();
        f.manager = Some(
            Command::new(bin("volume-mgr"))
                .args(["--listen", &format!("127.0.0.1:{mport}"), "--data-dir"])
                .arg(f.dir.path().join("manager"))
                .stdout(Stdio::null())
                .stderr(log("volume-mgr.log"))
                .spawn()
                .unwrap(),
        );
        wait_for("volume-mgr", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", mport)).is_ok()
        });
        f.blockd = Some(
            Command::new(bin("blockd"))
                .args([
                    "--manager",
                    &f.manager_url,
                    "--node",
                    "n1",
                    "--listen",
                    &format!("127.0.0.1:{}", free_port()),
                ])
                .args([
                    "--nbd-listen",
                    &format!("127.0.0.1:{}", f.nbd_port),
                    "--http-listen",
                    "none",
                    "--nbd-socket",
                ])
                .arg(&f.socket)
                .arg("--disk")
                .arg(format!(
                    "{}:{disk_size}",
                    f.dir.path().join("disk0.img").display()
                ))
                .stdout(Stdio::null())
                .stderr(log("blockd.log"))
                .spawn()
                .unwrap(),
        );
        let url = f.manager_url.clone();
        wait_for("blockd to register", Duration::from_secs(30), || {
            let (ok, out) = fabctl(&url, &["-o", "json", "node", "ls"]);
            ok && out.contains("\"up\"")
        });
        f
    }

    pub fn fabctl(&self, args: &[&str]) -> (bool, String) {
        fabctl(&self.manager_url, args)
    }

    pub fn unix_url(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.socket.display())
    }

    pub fn tcp_url(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.nbd_port)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn blockd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("blockd.log")).unwrap_or_default()
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for c in [self.blockd.as_mut(), self.manager.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `fabctl --manager URL ARGS…`; returns (success, stdout+stderr).
pub fn fabctl(manager: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("fabctl"))
        .args(["--manager", manager])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
