//! `fabctl up` as an operator runs it: one command brings the fabric up (volume-mgr, blockd,
//! vswitch, lb-vip), a volume created with fabctl is served over NBD (TCP and the unix
//! socket), a tap port appears in a namespace, a VIP forwards to a backend, Ctrl-C (SIGINT)
//! and SIGTERM stop everything cleanly, and a second `up` on the same data directory finds the
//! volume and its data.

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

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Up {
    child: Child,
    manager: String,
    nbd_port: u16,
    vswitch_http: String,
    lbvip_http: String,
    banner: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `up`'s stdout until its banner is complete (the daemons are ready) and checks it.
fn banner(child: &mut Child, dir: &Path) -> String {
    // `up` prints its banner once the daemons are ready.
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
    assert!(
        banner.contains("-netdev tap,"),
        "banner lacks the netdev port: {banner}"
    );
    banner
}

fn up(dir: &Path, node: &str) -> Up {
    let (mp, np, bp, hp) = (free_port(), free_port(), free_port(), free_port());
    let (vs_http, lb_http) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
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
        .args(["--vswitch-http-listen", &vs_http])
        .args(["--lbvip-http-listen", &lb_http])
        .args(["--vxlan-port", &free_udp_port().to_string()])
        .args(["--disk-size", "1G", "--node", node])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let banner = banner(&mut child, dir);
    assert!(
        banner.contains(&lb_http),
        "banner lacks lb-vip's address: {banner}"
    );
    Up {
        child,
        manager: format!("http://127.0.0.1:{mp}"),
        nbd_port: np,
        vswitch_http: vs_http,
        lbvip_http: lb_http,
        banner,
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

/// Sends `sig` (`INT`: what Ctrl-C sends; `TERM`: what systemd sends) and expects exit 0.
fn stop(mut u: Up, sig: &str) {
    let pid = u.child.id().to_string();
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    loop {
        if let Some(st) = u.child.try_wait().unwrap() {
            assert!(st.success(), "fabctl up exited with {st} after SIG{sig}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "fabctl up did not stop after SIG{sig}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn up_serves_volumes_and_restarts_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let u = up(dir.path(), "local");
    let (ok, out) = fabctl(&u.manager, &["volume", "create", "vm1", "--size", "64M"]);
    assert!(ok, "{out}");
    let sock = dir.path().join("nbd.sock");
    let unix_url = format!("nbd+unix:///vm1?socket={}", sock.display());
    qemu_io(&unix_url, "write -P 0x3c 1M 2M");
    qemu_io(
        &format!("nbd://127.0.0.1:{}/vm1", u.nbd_port),
        "read -P 0x3c 1M 2M",
    );
    stop(u, "INT");
    assert!(!sock.exists(), "the NBD socket is removed on a clean stop");

    let u = up(dir.path(), "local");
    let (ok, out) = fabctl(&u.manager, &["-o", "json", "volume", "ls"]);
    assert!(ok && out.contains("\"vm1\""), "{out}");
    qemu_io(&unix_url, "read -P 0x3c 1M 2M");
    qemu_io(&unix_url, "read -P 0 0 1M");
    stop(u, "INT");
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

/// A network namespace made by the test (deleted on drop) with `lo` up and an underlay
/// interface (one end of a veth pair inside it): `fabctl up` runs inside it on its default addresses (127.0.0.1:7700, :10809,
/// :7900, :7950), isolated from everything else on the machine.
struct Netns(String);

const UNDERLAY: &str = "198.18.7.1";

impl Netns {
    fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = Netns(name);
        for args in [
            vec!["netns", "add", &ns.0],
            vec!["-n", &ns.0, "link", "set", "lo", "up"],
            vec![
                "-n", &ns.0, "link", "add", "u0", "type", "veth", "peer", "name", "u1",
            ],
            vec!["-n", &ns.0, "addr", "add", "198.18.7.1/24", "dev", "u0"],
            vec!["-n", &ns.0, "link", "set", "u0", "up"],
            vec!["-n", &ns.0, "link", "set", "u1", "up"],
        ] {
            let st = Command::new("ip").args(&args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        }
        ns
    }

    /// `program args…` run inside the namespace.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Runs `program args…` in the namespace: (success, stdout + stderr).
    fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let out = self.cmd(program).args(args).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `curl` inside the namespace: the body of a 2xx answer.
    fn get(&self, url: &str) -> Option<String> {
        let (ok, out) = self.run("curl", &["-sf", "--max-time", "5", url]);
        ok.then_some(out)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Polls `f` every 100 ms until it gives Some, for at most `limit`.
fn wait<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// All four daemons of `fabctl up` (on their default addresses, in a namespace) answer:
/// blockd (nbdinfo over the unix socket and TCP), vswitch (a tap port created with fabctl
/// appears with the port's MAC; its metrics count it), lb-vip (a VIP created with fabctl
/// forwards HTTP to a backend; its metrics name the VIP); SIGTERM stops everything with exit 0
/// and the tap and the NBD socket go away.
#[test]
fn up_runs_all_four_daemons() {
    assert!(
        is_root(),
        "this test needs root (namespaces; vswitch creates taps)"
    );
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new(format!("fabup{}", std::process::id()));
    let mut child = ns
        .cmd(env!("CARGO_BIN_EXE_fabctl"))
        .args(["up", "--data-dir"])
        .arg(dir.path())
        .args([
            "--underlay-ip",
            UNDERLAY,
            "--disk-size",
            "1G",
            "--node",
            "upall",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let banner = banner(&mut child, dir.path());
    let u = Up {
        child,
        manager: "http://127.0.0.1:7700".into(),
        nbd_port: 10809,
        vswitch_http: "127.0.0.1:7900".into(),
        lbvip_http: "127.0.0.1:7950".into(),
        banner,
    };
    assert!(
        u.banner
            .contains(&format!("vswitch   underlay {UNDERLAY}:4789 (VXLAN)")),
        "{}",
        u.banner
    );
    let fab = |args: &[&str]| {
        let (ok, out) = ns.run(env!("CARGO_BIN_EXE_fabctl"), args);
        assert!(ok, "fabctl {args:?}: {out}");
        out
    };

    // blockd: NBD over the unix socket and TCP.
    fab(&["volume", "create", "vm1", "--size", "64M"]);
    let sock = dir.path().join("nbd.sock");
    for url in [
        format!("nbd+unix:///vm1?socket={}", sock.display()),
        format!("nbd://127.0.0.1:{}/vm1", u.nbd_port),
    ] {
        let (ok, out) = ns.run("nbdinfo", &["--size", &url]);
        assert!(
            ok && out.trim() == "67108864",
            "nbdinfo --size {url}: {out}"
        );
    }

    // vswitch: a tap port.
    fab(&[
        "net",
        "create",
        "upnet",
        "--vni",
        "4242",
        "--subnet",
        "192.0.2.0/24",
    ]);
    fab(&[
        "port", "create", "upvm1", "--net", "upnet", "--node", "upall", "--kind", "tap",
    ]);
    let show = fab(&["-o", "json", "port", "show", "upvm1"]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    let mac = v["mac"].as_str().unwrap().to_string();
    let link = wait(Duration::from_secs(15), || {
        let (ok, out) = ns.run("ip", &["-o", "link", "show", "upvm1"]);
        ok.then_some(out)
    })
    .expect("vswitch creates the tap of port upvm1");
    assert!(link.contains(&mac), "tap upvm1 lacks MAC {mac}: {link}");
    let metrics = wait(Duration::from_secs(10), || {
        ns.get(&format!("http://{}/metrics", u.vswitch_http))
            .filter(|b| b.contains("\nvswitch_ports 1\n"))
    });
    assert!(
        metrics.is_some(),
        "vswitch metrics do not count the port: {:?}",
        ns.get(&format!("http://{}/metrics", u.vswitch_http))
    );

    // lb-vip: a VIP whose backend is the manager's API.
    fab(&[
        "vip",
        "create",
        "web",
        "--addr",
        "127.0.0.1:8080",
        "--proto",
        "tcp",
    ]);
    fab(&["vip", "backend", "add", "web", "127.0.0.1:7700"]);
    let answer = wait(Duration::from_secs(15), || {
        ns.get("http://127.0.0.1:8080/v1/volumes/vm1")
    });
    assert!(
        answer.as_deref().is_some_and(|a| a.contains("\"vm1\"")),
        "the VIP does not forward: {answer:?}"
    );
    let body = ns
        .get(&format!("http://{}/metrics", u.lbvip_http))
        .expect("lb-vip metrics answer");
    assert!(
        body.contains("lbvip_vip_accepted_total{vip=\"web\"}"),
        "lb-vip metrics lack the VIP: {body}"
    );
    assert!(u.manager.starts_with("http://127.0.0.1:7700"));

    stop(u, "TERM");
    assert!(!sock.exists(), "the NBD socket is removed on a clean stop");
    let (left, out) = ns.run("ip", &["-o", "link", "show", "upvm1"]);
    assert!(!left, "tap upvm1 is left behind after SIGTERM: {out}");
}
