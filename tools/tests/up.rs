//! `fabctl up` as an operator runs it: one command brings the fabric up, a volume created with
//! fabctl is served over NBD (TCP and the unix socket), Ctrl-C (SIGINT) stops everything
//! cleanly, and a second `up` on the same data directory finds the volume and its data.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Up {
    child: Child,
    manager: String,
    nbd_port: u16,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn up(dir: &Path) -> Up {
    let (mp, np, bp, hp) = (free_port(), free_port(), free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_fabctl"))
        .args(["up", "--data-dir"])
        .arg(dir)
        .args([
            "--listen",
            &format!("127.0.0.1:{mp}"),
            "--nbd-listen",
            &format!("127.0.0.1:{np}"),
        ])
        .args([
            "--blockd-listen",
            &format!("127.0.0.1:{bp}"),
            "--blockd-http-listen",
            &format!("127.0.0.1:{hp}"),
        ])
        .args(["--disk-size", "1G", "--node", "local"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // `up` prints its banner once both daemons are ready.
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let t = Instant::now();
    let mut banner = String::new();
    while !banner.contains("Ctrl-C stops everything") {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("fabctl up did not come up in time; printed: {banner}"));
        banner.push_str(&line);
        banner.push('\n');
        assert!(t.elapsed() < Duration::from_secs(60));
    }
    assert!(
        banner.contains("format=raw,if=virtio,cache=none"),
        "banner lacks the QEMU -drive line: {banner}"
    );
    assert!(
        banner.contains(&dir.join("nbd.sock").display().to_string()),
        "{banner}"
    );
    Up {
        child,
        manager: format!("http://127.0.0.1:{mp}"),
        nbd_port: np,
    }
}

fn fabctl(manager: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fabctl"))
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

fn qemu_io(url: &str, cmd: &str) -> String {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, url])
        .output()
        .expect("qemu-io is installed (tests/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("error"),
        "qemu-io {cmd} on {url}: {text}"
    );
    text
}

fn interrupt(mut u: Up) {
    // What Ctrl-C sends.
    let pid = u.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    loop {
        if let Some(st) = u.child.try_wait().unwrap() {
            assert!(st.success(), "fabctl up exited with {st} after Ctrl-C");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "fabctl up did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn up_serves_volumes_and_restarts_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let u = up(dir.path());
    let (ok, out) = fabctl(&u.manager, &["volume", "create", "vm1", "--size", "64M"]);
    assert!(ok, "{out}");
    let sock = dir.path().join("nbd.sock");
    let unix_url = format!("nbd+unix:///vm1?socket={}", sock.display());
    qemu_io(&unix_url, "write -P 0x3c 1M 2M");
    qemu_io(
        &format!("nbd://127.0.0.1:{}/vm1", u.nbd_port),
        "read -P 0x3c 1M 2M",
    );
    interrupt(u);
    assert!(!sock.exists(), "the NBD socket is removed on a clean stop");

    let u = up(dir.path());
    let (ok, out) = fabctl(&u.manager, &["-o", "json", "volume", "ls"]);
    assert!(ok && out.contains("\"vm1\""), "{out}");
    qemu_io(&unix_url, "read -P 0x3c 1M 2M");
    qemu_io(&unix_url, "read -P 0 0 1M");
    interrupt(u);
}

#[test]
fn up_reports_a_busy_port() {
    let dir = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_fabctl"))
        .args(["up", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fabctl:") && err.contains(&port.to_string()),
        "{err}"
    );
}
