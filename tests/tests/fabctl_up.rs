//! `fabctl up`: the four daemons as one supervised group in one process. Started in a temp
//! directory on free ports; a volume, a network with a tap port and a VIP are made through
//! fabctl; each daemon is checked to answer (NBD with nbdinfo, vswitch and lb-vip /metrics);
//! SIGTERM stops it with exit 0. And a daemon that cannot start stops `up` with a non-zero
//! exit and a line naming it.

use fabric_tests::cluster::{bin, fabctl, http_get};
use fabric_tests::{free_port, require, wait_for, Proc};
use std::process::Command;
use std::time::{Duration, Instant};

struct Up {
    proc: Proc,
    manager: String,
    nbd: String,
    vswitch_http: String,
    lbvip_http: String,
    dir: tempfile::TempDir,
}

fn start_up(extra: &[&str], lbvip_http: Option<String>) -> Up {
    let dir = tempfile::Builder::new().prefix("fabup-").tempdir().unwrap();
    let port = |_: &str| format!("127.0.0.1:{}", free_port());
    let manager_addr = port("m");
    let nbd = port("nbd");
    let vswitch_http = port("vs");
    let lbvip_http = lbvip_http.unwrap_or_else(|| port("lb"));
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let proc = Proc::spawn(
        "fabctl up",
        Command::new(bin("fabctl"))
            .arg("up")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", &manager_addr, "--nbd-listen", &nbd])
            .args([
                "--blockd-listen",
                &port("b"),
                "--blockd-http-listen",
                &port("bh"),
            ])
            .args(["--vswitch-http-listen", &vswitch_http])
            .args(["--lbvip-http-listen", &lbvip_http])
            .args(["--vxlan-port", &free_port().to_string()])
            .args(["--disk-size", "1G", "--node", "up1"])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    Up {
        proc,
        manager: format!("http://{manager_addr}"),
        nbd,
        vswitch_http,
        lbvip_http,
        dir,
    }
}

impl Up {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }
    fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = fabctl(&self.manager, args);
        assert!(ok, "fabctl {args:?}: {out}\n--- up log:\n{}", self.log());
        out
    }
    /// Waits (bounded) for the process to exit; its status.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.proc.try_wait() {
                return s;
            }
            assert!(
                t.elapsed() < limit,
                "fabctl up did not exit within {limit:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn up_runs_all_four_daemons_and_stops_on_sigterm() {
    require("nbdinfo");
    let mut up = start_up(&[], None);
    wait_for(
        "fabctl up to print its summary",
        Duration::from_secs(60),
        || {
            assert!(
                up.proc.try_wait().is_none(),
                "fabctl up exited:\n{}",
                up.log()
            );
            up.log().contains("Ctrl-C stops everything.")
        },
    );
    let log = up.log();
    for what in [
        "manager",
        "NBD",
        "blockd",
        "vswitch",
        "lb-vip",
        "qemu-system-x86_64",
    ] {
        assert!(log.contains(what), "summary lacks {what}:\n{log}");
    }
    assert!(log.contains("-netdev tap"), "{log}");

    // A volume, served over NBD.
    up.ok(&["volume", "create", "vm1", "--size", "64M"]);
    let url = format!("nbd://{}/vm1", up.nbd);
    wait_for("nbdinfo to open vm1", Duration::from_secs(20), || {
        Command::new("nbdinfo")
            .args(["--size", &url])
            .output()
            .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "67108864")
            .unwrap_or(false)
    });

    // A network and a tap port on this host; vswitch answers its /metrics.
    up.ok(&[
        "net",
        "create",
        "net1",
        "--vni",
        "4100",
        "--subnet",
        "192.0.2.0/24",
    ]);
    up.ok(&[
        "port", "create", "fabup-p1", "--net", "net1", "--node", "up1", "--kind", "tap",
    ]);
    let ports = up.ok(&["port", "ls"]);
    assert!(ports.contains("fabup-p1"), "{ports}");
    let (code, body) = http_get(&up.vswitch_http, "/metrics").expect("vswitch /metrics");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("vswitch_"), "{body}");

    // A VIP on loopback: lb-vip binds it and says so in its /metrics.
    let vip = format!("127.0.0.1:{}", free_port());
    up.ok(&["vip", "create", "web", "--addr", &vip, "--proto", "tcp"]);
    wait_for("lb-vip to serve VIP web", Duration::from_secs(20), || {
        http_get(&up.lbvip_http, "/metrics").is_some_and(|(c, b)| {
            c == 200 && b.contains(r#"lbvip_vip_listening{vip="web",proto="tcp"} 1"#)
        })
    });
    assert!(
        std::net::TcpStream::connect(&vip).is_ok(),
        "VIP {vip} not bound"
    );

    // SIGTERM: everything stops, exit 0.
    let (ok, out) =
        fabric_tests::try_run(Command::new("kill").args(["-TERM", &up.proc.id().to_string()]));
    assert!(ok, "{out}");
    let st = up.wait_exit(Duration::from_secs(40));
    assert!(st.success(), "fabctl up exit {st:?}\n{}", up.log());
    assert!(up.log().contains("stopped."), "{}", up.log());
    // Its listeners are gone.
    assert!(http_get(&up.lbvip_http, "/metrics").is_none());
    assert!(std::net::TcpStream::connect(&up.nbd).is_err());
}

#[test]
fn up_stops_with_an_error_when_lb_vip_cannot_start() {
    // lb-vip's metrics address is taken: up must fail, naming lb-vip, and not hang.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut up = start_up(&[], Some(addr));
    let st = up.wait_exit(Duration::from_secs(60));
    assert!(!st.success(), "{}", up.log());
    let log = up.log();
    let last = log.lines().last().unwrap_or("");
    assert!(
        last.starts_with("fabctl: ") && last.contains("lb-vip"),
        "last line: {last:?}\n{log}"
    );
}
