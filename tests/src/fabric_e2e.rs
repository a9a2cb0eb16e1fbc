//! The whole fabric as an operator runs it (issue 6): volume-mgr on namespace host h0, and on
//! each fabric host h1..=N a blockd (own disk file, replicas on its underlay address, NBD on a
//! unix socket QEMU opens) and a vswitch (overlay ports for QEMU's tap NICs), optionally lb-vip;
//! one more plain namespace host for a client. Every daemon of a host can be killed (-9) and
//! started again with the same state. Processes are SIGKILLed and namespaces deleted on drop,
//! also when a test fails; then the daemons' logs are printed.

use crate::cluster::bin;
use crate::netns::{Host, Net};
use crate::overlay::{no_ipv6, vswitch_bin};
use crate::{try_run, Proc};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The daemons of one fabric host.
#[derive(Default)]
struct Daemons {
    blockd: Option<Proc>,
    vswitch: Option<Proc>,
    lbvip: Option<Proc>,
}

pub struct Fabric {
    /// Declared first: the processes die before the namespaces and the directory go.
    hosts: Vec<Daemons>,
    manager: Option<Proc>,
    /// Namespaces made by [`Fabric::namespace`] (deleted on drop).
    extra_ns: Vec<String>,
    pub net: Net,
    dir: tempfile::TempDir,
    disk_size: String,
}

impl Fabric {
    /// volume-mgr in h0, blockd + vswitch in each of h1..=`n` (blockd disks of `disk_size`),
    /// and one plain host h`n+1` (a client). Waits until every blockd and vswitch is up.
    pub fn start(n: usize, disk_size: &str) -> Fabric {
        crate::require("busybox");
        let dir = tempfile::Builder::new()
            .prefix("fabric-e2e-")
            .tempdir()
            .unwrap();
        let secret: String = crate::random_bytes(std::process::id() as u64 ^ 0xe2e, 32)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(dir.path().join("secret"), secret).unwrap();
        for i in 1..=n {
            std::fs::create_dir_all(dir.path().join(format!("h{i}"))).unwrap();
            std::fs::write(
                dir.path().join(format!("vswitch-h{i}.toml")),
                "heartbeat-interval = \"250ms\"\n",
            )
            .unwrap();
        }
        let mut f = Fabric {
            hosts: (0..n).map(|_| Daemons::default()).collect(),
            manager: None,
            extra_ns: Vec::new(),
            net: Net::new(n + 2),
            dir,
            disk_size: disk_size.to_string(),
        };
        for h in &f.net.hosts {
            no_ipv6(&h.ns);
        }
        f.start_manager();
        for i in 1..=n {
            f.start_host(i);
        }
        f.wait_host_up(&(1..=n).collect::<Vec<_>>(), Duration::from_secs(30));
        f
    }

    /// A plain namespace of its own (e.g. a client "VM" on a tap port), deleted on drop.
    pub fn namespace(&mut self, name: &str) -> String {
        let h0 = &self.net.hosts[0].ns;
        let ns = format!("{}-{name}", h0.strip_suffix("-h0").unwrap_or(h0));
        crate::run(Command::new("ip").args(["netns", "add", &ns]));
        self.extra_ns.push(ns.clone());
        crate::run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        no_ipv6(&ns);
        ns
    }

    /// The `--overlay-netns-prefix` of the test's lb-vip instances: overlay VIPs of network
    /// N live in namespace `namespace("vip" + N)`.
    pub fn overlay_netns_prefix(&self) -> String {
        let h0 = &self.net.hosts[0].ns;
        format!("{}-vip", h0.strip_suffix("-h0").unwrap_or(h0))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.net.hosts[i]
    }

    /// The plain client host (after the fabric hosts).
    pub fn client(&self) -> &Host {
        self.net.hosts.last().unwrap()
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

    fn start_manager(&mut self) {
        let h = &self.net.hosts[0];
        let p = Proc::spawn(
            "volume-mgr",
            h.command(bin("volume-mgr"))
                .args(["--listen", &format!("{}:7700", h.addr)])
                .arg("--data-dir")
                .arg(self.dir.path().join("manager"))
                .args(["--down-after", "2s"])
                .env("NO_COLOR", "1")
                .stdout(self.log("volume-mgr"))
                .stderr(self.log("volume-mgr")),
        );
        self.manager = Some(p);
        self.wait_for("volume-mgr to answer", Duration::from_secs(20), || {
            self.fabctl(&["node", "ls"]).0
        });
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

    /// Starts (again) host `i`'s blockd and vswitch, same disk and state (does not wait).
    pub fn start_host(&mut self, i: usize) {
        let h = self.net.hosts[i].clone();
        let disk = self.dir.path().join(format!("h{i}/disk0.img"));
        let blockd = Proc::spawn(
            &format!("blockd h{i}"),
            h.command(bin("blockd"))
                .args(["--manager", &self.manager_url(), "--node", &format!("h{i}")])
                .args(["--listen", &format!("{}:7800", h.addr)])
                .args(["--nbd-listen", "none", "--http-listen", "none"])
                .arg("--nbd-socket")
                .arg(self.socket(i))
                .arg("--disk")
                .arg(format!("{}:{}", disk.display(), self.disk_size))
                .arg("--secret-file")
                .arg(self.secret_path())
                .args(["--heartbeat-interval", "300ms"])
                .env("NO_COLOR", "1")
                .stdout(self.log(&format!("blockd-h{i}")))
                .stderr(self.log(&format!("blockd-h{i}"))),
        );
        let vswitch = Proc::spawn(
            &format!("vswitch h{i}"),
            h.command(vswitch_bin())
                .args(["--manager", &self.manager_url()])
                .args(["--node", &format!("h{i}")])
                .args(["--underlay-ip", &h.addr])
                .args(["--vxlan-port", "4789"])
                .args(["--http-listen", &format!("{}:7900", h.addr)])
                .arg("--config")
                .arg(self.dir.path().join(format!("vswitch-h{i}.toml")))
                .env("NO_COLOR", "1")
                .stdout(self.log(&format!("vswitch-h{i}")))
                .stderr(self.log(&format!("vswitch-h{i}"))),
        );
        let d = &mut self.hosts[i - 1];
        d.blockd = Some(blockd);
        d.vswitch = Some(vswitch);
    }

    /// Starts lb-vip on host `i` (node name `hI`, as its blockd and vswitch: an overlay VIP's
    /// port is a tap port on that node) with `--vip-interface IF` (does not wait).
    pub fn start_lbvip(&mut self, i: usize, vip_interface: &str) {
        let h = self.net.hosts[i].clone();
        let p = Proc::spawn(
            &format!("lb-vip h{i}"),
            h.command(bin("lb-vip"))
                .args(["--manager", &self.manager_url()])
                .args(["--node", &format!("h{i}")])
                .args(["--http-listen", &format!("{}:7950", h.addr)])
                .args(["--vip-interface", vip_interface])
                // Overlay VIPs' namespaces: the test's own (all hosts share /run/netns here;
                // create them with `namespace("vip<network>")` first, from outside the hosts).
                .args(["--overlay-netns-prefix", &self.overlay_netns_prefix()])
                .env("NO_COLOR", "1")
                .stdout(self.log(&format!("lbvip-h{i}")))
                .stderr(self.log(&format!("lbvip-h{i}"))),
        );
        self.hosts[i - 1].lbvip = Some(p);
    }

    /// kill -9 of every fabric daemon on host `i` (blockd, vswitch, lb-vip); their state
    /// (disk, config) stays for [`Fabric::start_host`].
    pub fn kill_host(&mut self, i: usize) {
        let d = &mut self.hosts[i - 1];
        d.blockd.take();
        d.vswitch.take();
        d.lbvip.take();
    }

    /// Node states (blockd) and switch states (vswitch) as volume-mgr lists them.
    fn states(&self, what: &str) -> Vec<(String, String)> {
        let key = if what == "node" { "name" } else { "node" };
        self.json(&[what, "ls"])
            .and_then(|v| {
                Some(
                    v.as_array()?
                        .iter()
                        .map(|n| {
                            (
                                n[key].as_str().unwrap_or("").to_string(),
                                n["state"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    /// Waits until the blockd and the vswitch of each of `hosts` are registered and up.
    pub fn wait_host_up(&mut self, hosts: &[usize], timeout: Duration) {
        let t = Instant::now();
        loop {
            let mut exited = None;
            for &i in hosts {
                let d = &mut self.hosts[i - 1];
                for p in [d.blockd.as_mut(), d.vswitch.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    if let Some(st) = p.try_wait() {
                        exited = Some(format!("{} exited: {st}", p.name));
                    }
                }
            }
            if let Some(e) = exited {
                panic!("{e}\n{}", self.logs());
            }
            let (nodes, switches) = (self.states("node"), self.states("switch"));
            let up = |l: &[(String, String)], i: usize| {
                l.iter().any(|(n, s)| *n == format!("h{i}") && s == "up")
            };
            if hosts.iter().all(|&i| up(&nodes, i) && up(&switches, i)) {
                return;
            }
            assert!(
                t.elapsed() < timeout,
                "hosts {hosts:?} not up after {timeout:?}: nodes {nodes:?} switches {switches:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `f` every 100 ms; panics with `what` and the daemons' logs after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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

    /// `fabctl -o json ARGS…`, parsed; None on failure.
    pub fn json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let out = self.net.hosts[0]
            .command(bin("fabctl"))
            .args(["--manager", &self.manager_url(), "-o", "json"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn json_ok(&self, args: &[&str]) -> serde_json::Value {
        self.json(args).unwrap_or_else(|| {
            panic!(
                "fabctl {args:?} failed: {}\n{}",
                self.fabctl(args).1,
                self.logs()
            )
        })
    }

    /// The nodes holding a replica of any chunk set of `volume`.
    pub fn replica_nodes(&self, volume: &str) -> Vec<String> {
        let v = self.json_ok(&["volume", "show", volume]);
        let mut nodes: Vec<String> = v["sets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["members"].as_array().into_iter().flatten())
            .filter_map(|m| m["node"].as_str().map(str::to_string))
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
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

    /// Waits (bounded) until every replica of `volume` is in service again and `fabctl volume
    /// verify` (with the cluster secret) finds them all equal.
    pub fn wait_converged(&self, volume: &str, timeout: Duration) {
        let secret = self.secret_path();
        let secret = secret.to_str().unwrap();
        let t = Instant::now();
        loop {
            let (ok, out) = if self.all_in_service(volume) {
                self.fabctl(&["volume", "verify", volume, "--secret-file", secret])
            } else {
                (false, self.fabctl(&["volume", "show", volume]).1)
            };
            if ok {
                return;
            }
            assert!(
                t.elapsed() < timeout,
                "replicas of {volume} not in service and equal after {timeout:?}:\n{out}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Every daemon's log (the last lines), for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter_map(|n| n.strip_suffix(".log").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for n in names {
            let t = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(25).collect();
            s += &format!("--- {n}.log (last {} lines)\n", tail.len());
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for d in &mut self.hosts {
            d.blockd.take();
            d.vswitch.take();
            d.lbvip.take();
        }
        self.manager.take();
        for ns in &self.extra_ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The md5 of `bytes` as `md5sum` prints it (the guests' scripts print busybox md5sum's).
pub fn md5_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum (coreutils) is installed");
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}
