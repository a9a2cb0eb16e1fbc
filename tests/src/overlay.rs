//! Overlay networks across namespace hosts (issue 4): volume-mgr in host h0, one `vswitch` per
//! host h1..=N on the 198.18.0.0/24 underlay (`netns::Net`), optionally a few plain hosts with
//! no vswitch (for a Linux kernel VXLAN peer). "VMs" are network namespaces of their own whose
//! interface is a vswitch port (`fabctl port create … --kind tap --netns NS`). Tools used
//! inside the namespaces: `ip`, busybox (`ping`, `wget`, `udhcpc`) and python3 (raw AF_PACKET
//! capture and injection, a TCP transfer). Processes are SIGKILLed and every namespace (VMs,
//! hosts, the switch) deleted on drop, also when a test fails; then the daemons' logs are
//! printed.

use crate::cluster::bin;
use crate::netns::{Host, Net};
use crate::{try_run, Proc};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon, an interface or a first reply may take to appear.
pub const SETTLE: Duration = Duration::from_secs(20);

/// Port of every vswitch's `/metrics` (on its underlay address).
pub const METRICS_PORT: u16 = 7900;

/// A namespace "VM" whose interface is a vswitch port.
#[derive(Debug, Clone)]
pub struct Vm {
    /// Port name (also its interface name unless the port has another `ifname`).
    pub port: String,
    /// The VM's network namespace.
    pub ns: String,
    /// Interface name inside `ns`.
    pub ifname: String,
    /// The port's address (no prefix) and the subnet's prefix length.
    pub ip: String,
    pub prefix: u8,
    pub mac: String,
    /// Index of the host whose vswitch serves the port.
    pub host: usize,
}

impl Vm {
    /// A command that runs inside the VM's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// One `busybox ping` run: `count` echo requests, each waited for up to `wait_s`.
    pub fn ping(&self, ip: &str, count: u32, wait_s: u32) -> (bool, String) {
        try_run(self.command("busybox").args([
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            &wait_s.to_string(),
            ip,
        ]))
    }

    /// `ip -o addr show dev IF`, `ip link show dev IF` and the neighbour table, for messages.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for args in [
            vec!["-o", "addr", "show", "dev", &self.ifname],
            vec!["link", "show", "dev", &self.ifname],
            vec!["neigh", "show"],
        ] {
            s += &try_run(Command::new("ip").args(["-n", &self.ns]).args(args)).1;
        }
        s
    }

    /// The neighbour table entry for `ip` (`ip neigh show IP`), empty when there is none.
    pub fn neigh(&self, ip: &str) -> String {
        try_run(Command::new("ip").args(["-n", &self.ns, "neigh", "show", ip]))
            .1
            .trim()
            .to_string()
    }

    /// The interface's MTU as the kernel reports it.
    pub fn mtu(&self) -> Option<u32> {
        let out = try_run(Command::new("ip").args([
            "-n",
            &self.ns,
            "-o",
            "link",
            "show",
            "dev",
            &self.ifname,
        ]))
        .1;
        let mut w = out.split_whitespace();
        while let Some(x) = w.next() {
            if x == "mtu" {
                return w.next()?.parse().ok();
            }
        }
        None
    }
}

/// The fabric's control plane plus vswitches on namespace hosts.
pub struct Overlay {
    /// Declared first: the processes die before the namespaces and the directory go.
    switches: Vec<Option<Proc>>,
    manager: Option<Proc>,
    vms: RefCell<Vec<String>>,
    pub net: Net,
    dir: tempfile::TempDir,
}

impl Overlay {
    /// volume-mgr in h0 and a vswitch in each of h1..=`switches`; `plain` more hosts after them
    /// have no vswitch. Waits until every vswitch is registered and up.
    pub fn start(switches: usize, plain: usize) -> Overlay {
        crate::require("busybox");
        crate::require("python3");
        let dir = tempfile::Builder::new()
            .prefix("fabric-ov-")
            .tempdir()
            .unwrap();
        let mut o = Overlay {
            switches: (0..switches).map(|_| None).collect(),
            manager: None,
            vms: RefCell::new(Vec::new()),
            net: Net::new(1 + switches + plain),
            dir,
        };
        // The underlay carries IPv4 only; no IPv6 chatter (router solicitations, MLD) from the
        // hosts either.
        for h in &o.net.hosts {
            no_ipv6(&h.ns);
        }
        o.start_manager();
        for i in 1..=switches {
            o.spawn_switch(i);
        }
        o.wait_switches_up();
        o
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.net.hosts[i]
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
                .args(["--down-after", "3s"])
                .env("NO_COLOR", "1")
                .stdout(self.log("volume-mgr"))
                .stderr(self.log("volume-mgr")),
        );
        self.manager = Some(p);
        self.wait("volume-mgr to answer", || self.fabctl(&["switch", "ls"]).0);
    }

    /// Starts (again) host `i`'s vswitch: `--config` holds the heartbeat interval, the rest
    /// are the contract's flags.
    pub fn spawn_switch(&mut self, i: usize) {
        self.switches[i - 1].take();
        let h = self.net.hosts[i].clone();
        let config = self.dir.path().join(format!("vswitch-h{i}.toml"));
        std::fs::write(&config, "heartbeat-interval = \"250ms\"\n").unwrap();
        let env_filter = std::env::var("FABRIC_VSWITCH_LOG").unwrap_or_else(|_| "info".into());
        let p = Proc::spawn(
            &format!("vswitch h{i}"),
            h.command(vswitch_bin())
                .args(["--manager", &self.manager_url()])
                .args(["--node", &format!("h{i}")])
                .args(["--underlay-ip", &h.addr])
                .args(["--vxlan-port", "4789"])
                .args(["--http-listen", &format!("{}:{METRICS_PORT}", h.addr)])
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", env_filter)
                .env("NO_COLOR", "1")
                .stdout(self.log(&format!("vswitch-h{i}")))
                .stderr(self.log(&format!("vswitch-h{i}"))),
        );
        self.switches[i - 1] = Some(p);
    }

    /// Waits until every started vswitch is listed up by `fabctl switch ls`.
    pub fn wait_switches_up(&mut self) {
        let want: Vec<String> = (1..=self.switches.len()).map(|i| format!("h{i}")).collect();
        let t = Instant::now();
        loop {
            for (i, s) in self.switches.iter_mut().enumerate() {
                if let Some(st) = s.as_mut().and_then(|p| p.try_wait()) {
                    panic!("vswitch h{} exited: {st}\n{}", i + 1, self.logs());
                }
            }
            let up: Vec<String> = self
                .json(&["switch", "ls"])
                .and_then(|v| {
                    Some(
                        v.as_array()?
                            .iter()
                            .filter(|s| s["state"] == "up")
                            .filter_map(|s| Some(s["node"].as_str()?.to_string()))
                            .collect(),
                    )
                })
                .unwrap_or_default();
            if want.iter().all(|w| up.contains(w)) {
                return;
            }
            assert!(
                t.elapsed() < SETTLE,
                "vswitches not all up after {SETTLE:?} (up: {up:?})\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `f` every 50 ms; panics with `what` and the daemons' logs after `SETTLE`.
    pub fn wait(&self, what: &str, f: impl FnMut() -> bool) {
        self.wait_for(what, SETTLE, f)
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
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

    /// `fabctl net create NAME --vni VNI --subnet SUBNET EXTRA…`.
    pub fn create_net(&self, name: &str, vni: u32, subnet: &str, extra: &[&str]) {
        let vni = vni.to_string();
        let mut args = vec!["net", "create", name, "--vni", &vni, "--subnet", subnet];
        args.extend_from_slice(extra);
        self.fabctl_ok(&args);
    }

    /// `fabctl port show NAME -o json`.
    pub fn port(&self, name: &str) -> serde_json::Value {
        self.json(&["port", "show", name])
            .unwrap_or_else(|| panic!("fabctl port show {name} failed\n{}", self.logs()))
    }

    /// A VM namespace on a `tap` port of `net` served by host `host`'s vswitch (`extra` goes to
    /// `port create`, e.g. `--ip`), with its address configured statically.
    pub fn vm(&self, name: &str, net: &str, host: usize, extra: &[&str]) -> Vm {
        let vm = self.vm_unconfigured(name, net, host, extra);
        let addr = format!("{}/{}", vm.ip, vm.prefix);
        crate::run(
            Command::new("ip").args(["-n", &vm.ns, "addr", "add", &addr, "dev", &vm.ifname]),
        );
        vm
    }

    /// A VM namespace on a `tap` port, its interface there and up but with no address (for
    /// DHCP).
    pub fn vm_unconfigured(&self, name: &str, net: &str, host: usize, extra: &[&str]) -> Vm {
        let ns = format!("{}-{name}", self.tag());
        crate::run(Command::new("ip").args(["netns", "add", &ns]));
        self.vms.borrow_mut().push(ns.clone());
        crate::run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        no_ipv6(&ns);
        let node = format!("h{host}");
        let mut args = vec![
            "port", "create", name, "--net", net, "--node", &node, "--kind", "tap", "--netns", &ns,
        ];
        args.extend_from_slice(extra);
        let p = self.json(&args).unwrap_or_else(|| {
            panic!(
                "fabctl port create {name} failed: {}\n{}",
                self.fabctl(&args).1,
                self.logs()
            )
        });
        let n = self
            .json(&["net", "show", net])
            .unwrap_or_else(|| panic!("fabctl net show {net} failed"));
        let subnet = n["subnet"]
            .as_str()
            .or_else(|| n["network"]["subnet"].as_str())
            .unwrap_or_else(|| panic!("no subnet in `net show {net}`: {n}"))
            .to_string();
        let vm = Vm {
            port: name.to_string(),
            ns,
            ifname: str_field(&p, "ifname"),
            ip: str_field(&p, "ip"),
            prefix: subnet
                .rsplit_once('/')
                .and_then(|(_, l)| l.parse().ok())
                .unwrap_or_else(|| panic!("bad subnet {subnet}")),
            mac: str_field(&p, "mac").to_lowercase(),
            host,
        };
        self.wait(
            &format!("vswitch h{host} to put {} into {}", vm.ifname, vm.ns),
            || {
                Command::new("ip")
                    .args(["-n", &vm.ns, "link", "show", "dev", &vm.ifname])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
        crate::run(Command::new("ip").args(["-n", &vm.ns, "link", "set", &vm.ifname, "up"]));
        vm
    }

    /// A plain namespace (deleted with the overlay), e.g. for a kernel VXLAN peer's VM.
    pub fn namespace(&self, name: &str) -> String {
        let ns = format!("{}-{name}", self.tag());
        crate::run(Command::new("ip").args(["netns", "add", &ns]));
        self.vms.borrow_mut().push(ns.clone());
        crate::run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        no_ipv6(&ns);
        ns
    }

    /// The namespace names' common prefix (unique per test).
    fn tag(&self) -> String {
        let h0 = &self.net.hosts[0].ns;
        h0.strip_suffix("-h0").unwrap_or(h0).to_string()
    }

    /// Waits until `from` gets an echo reply from `ip` (single pings, each waiting 1 s).
    pub fn wait_ping(&self, from: &Vm, ip: &str) {
        let t = Instant::now();
        loop {
            let (ok, out) = from.ping(ip, 1, 1);
            if ok {
                return;
            }
            if t.elapsed() > SETTLE {
                panic!(
                    "{} ({}) never got a reply from {ip} in {SETTLE:?}: {out}\n{}\n{}",
                    from.port,
                    from.ip,
                    from.describe(),
                    self.logs()
                );
            }
        }
    }

    /// Host `i`'s vswitch `/metrics` text (fetched with busybox wget inside host `i`).
    pub fn metrics(&self, i: usize) -> String {
        let h = &self.net.hosts[i];
        let url = format!("http://{}:{METRICS_PORT}/metrics", h.addr);
        // (busybox 1.35's wget crashes with -T: the bound is run_timeout's.)
        let (st, out) = run_timeout(
            h.command("busybox").args(["wget", "-q", "-O", "-", &url]),
            Duration::from_secs(10),
        );
        assert!(
            st.is_some_and(|s| s.success()),
            "GET {url} in h{i} failed ({st:?}): {out}\n{}",
            self.logs()
        );
        out
    }

    /// The sum of the series `name` whose labels include `labels` in host `i`'s `/metrics`
    /// (0 when there is none).
    pub fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(i), name, labels).unwrap_or(0.0)
    }

    /// Every daemon's log (the last lines), for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut names = vec!["volume-mgr".to_string()];
        names.extend((1..=self.switches.len()).map(|i| format!("vswitch-h{i}")));
        for n in names {
            let t = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(40).collect();
            s += &format!("--- {n}.log (last {} lines)\n", tail.len());
            for l in tail.iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        for s in &mut self.switches {
            s.take();
        }
        self.manager.take();
        for ns in self.vms.borrow().iter() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn str_field(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("no string {k:?} in {v}"))
        .to_string()
}

/// The vswitch binary: `$FABRIC_VSWITCH_BIN` (another build, e.g. with a fix under test) or
/// the workspace's.
pub fn vswitch_bin() -> PathBuf {
    match std::env::var_os("FABRIC_VSWITCH_BIN") {
        Some(p) => PathBuf::from(p),
        None => bin("vswitch"),
    }
}

/// Turns IPv6 off in a namespace (also for interfaces that move in later), so the only
/// traffic is what a test sends: counters and captures stay exact.
pub fn no_ipv6(ns: &str) {
    crate::run(Command::new("ip").args(["netns", "exec", ns]).args([
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; \
         echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
    ]));
}

/// `ethtool -K IFNAME tx on|off` inside `ns` (the legacy ETHTOOL_STXCSUM ioctl, from python3:
/// ethtool itself is not needed). A veth passes packets whose checksum is left to the
/// hardware (CHECKSUM_PARTIAL) to its peer as they are, so a kernel VXLAN device on a veth
/// underlay puts inner TCP/UDP checksums that were never filled in on the "wire"; turning
/// transmit checksumming off on the underlay makes the kernel fill them in, as a real NIC
/// does. Returns the setting read back.
pub fn set_tx_checksum(ns: &str, ifname: &str, on: bool) -> bool {
    const PY: &str = r#"
import ctypes, fcntl, socket, struct, sys
def call(cmd, value):
    ev = ctypes.create_string_buffer(struct.pack("II", cmd, value), 8)
    ifr = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(ev)) + bytes(16)
    fcntl.ioctl(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 0x8946, ifr)  # SIOCETHTOOL
    return struct.unpack("II", ev.raw[:8])[1]
call(0x17, int(sys.argv[2]))  # ETHTOOL_STXCSUM
print(call(0x16, 0))  # ETHTOOL_GTXCSUM
"#;
    let out = crate::run(
        Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", PY, ifname])
            .arg(if on { "1" } else { "0" }),
    );
    out.trim() == "1"
}

/// The sum of the Prometheus text series `name` whose labels include every `labels` pair;
/// None when no series matches.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<(&str, &str)> = l
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim(), v.trim().trim_matches('"')))
            })
            .collect();
        if labels.iter().all(|w| have.contains(w)) {
            if let Ok(v) = value.parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    sum
}

/// Runs `cmd` as its own process group with output to a file; SIGKILLs it after `timeout`.
/// Returns (exit status, None if killed; stdout + stderr).
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> (Option<ExitStatus>, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut p = Proc::spawn(
        "command",
        cmd.stdout(out.reopen().unwrap())
            .stderr(out.reopen().unwrap()),
    );
    let t = Instant::now();
    let st = loop {
        if let Some(s) = p.try_wait() {
            break Some(s);
        }
        if t.elapsed() > timeout {
            p.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (st, std::fs::read_to_string(out.path()).unwrap_or_default())
}

/// Decodes every frame an interface sees (AF_PACKET, all protocols, both directions) into one
/// JSON line: dst, src, type, pkttype (0 to us, 1 broadcast, 2 multicast, 3 other host,
/// 4 outgoing), arp {op, sha, spa, tha, tpa}, ip {src, dst, proto}, icmp {type}, udp {sport,
/// dport}, payload (first 32 bytes, latin-1), vxlan {flags, vni, inner: the same for the inner
/// frame}.
const CAPTURE_PY: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], 0))
print("ready", flush=True)
def mac(b): return ":".join("%02x" % x for x in b)
def ip4(b): return socket.inet_ntoa(bytes(b))
def decode(f):
    d = {"len": len(f)}
    if len(f) < 14: return d
    d["dst"], d["src"] = mac(f[0:6]), mac(f[6:12])
    t = struct.unpack("!H", f[12:14])[0]; p = f[14:]
    d["type"] = t
    if t == 0x0806 and len(p) >= 28:
        d["arp"] = {"op": struct.unpack("!H", p[6:8])[0], "sha": mac(p[8:14]), "spa": ip4(p[14:18]),
                    "tha": mac(p[18:24]), "tpa": ip4(p[24:28])}
    elif t == 0x0800 and len(p) >= 20:
        ihl = (p[0] & 15) * 4
        d["ip"] = {"src": ip4(p[12:16]), "dst": ip4(p[16:20]), "proto": p[9]}
        l4 = p[ihl:]
        if p[9] == 1 and len(l4) >= 1:
            d["icmp"] = {"type": l4[0]}
        elif p[9] == 17 and len(l4) >= 8:
            sp, dp = struct.unpack("!HH", l4[0:4])
            d["udp"] = {"sport": sp, "dport": dp}
            pl = l4[8:]
            d["payload"] = bytes(pl[:32]).decode("latin-1")
            if dp == 4789 and len(pl) >= 8:
                d["vxlan"] = {"flags": pl[0], "vni": int.from_bytes(pl[4:7], "big"),
                              "inner": decode(pl[8:])}
    return d
while True:
    f, addr = s.recvfrom(65535)
    d = decode(f)
    d["pkttype"] = addr[2]
    print(json.dumps(d), flush=True)
"#;

/// Sends hand-made frames from an AF_PACKET socket: argv[1] the interface, argv[2] a JSON
/// list of {dst, src, count, and either udp: {sip, dip, dport, payload} or arp: {op, sip,
/// tip, tha}}.
const SEND_PY: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
def mac(m): return bytes(int(x, 16) for x in m.split(":"))
def csum(b):
    if len(b) % 2: b += b"\0"
    n = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while n >> 16: n = (n & 0xffff) + (n >> 16)
    return ~n & 0xffff
for f in json.loads(sys.argv[2]):
    eth = mac(f["dst"]) + mac(f["src"])
    if "udp" in f:
        u = f["udp"]; pl = u["payload"].encode()
        udp = struct.pack("!HHHH", 40000, u["dport"], 8 + len(pl), 0) + pl
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                          socket.inet_aton(u["sip"]), socket.inet_aton(u["dip"]))
        hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
        frame = eth + b"\x08\x00" + hdr + udp
    else:
        a = f["arp"]
        frame = eth + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, a["op"]) + \
            mac(f["src"]) + socket.inet_aton(a["sip"]) + mac(a["tha"]) + socket.inet_aton(a["tip"])
    for _ in range(f["count"]):
        s.send(frame)
print("sent", flush=True)
"#;

/// A running capture on one interface of one namespace.
pub struct Capture {
    proc: Proc,
    out: PathBuf,
    _file: tempfile::NamedTempFile,
}

impl Capture {
    /// Starts capturing on `ifname` inside `ns`; returns once the socket is bound.
    pub fn start(ns: &str, ifname: &str) -> Capture {
        let file = tempfile::NamedTempFile::new().unwrap();
        let out = file.path().to_path_buf();
        let mut proc = Proc::spawn(
            "capture",
            Command::new("ip")
                .args([
                    "netns", "exec", ns, "python3", "-u", "-c", CAPTURE_PY, ifname,
                ])
                .stdout(file.reopen().unwrap())
                .stderr(file.reopen().unwrap()),
        );
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.starts_with("ready") {
                break;
            }
            if let Some(st) = proc.try_wait() {
                panic!("capture on {ns}/{ifname} exited ({st}): {text}");
            }
            assert!(
                t.elapsed() < SETTLE,
                "capture on {ns}/{ifname} not ready: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture {
            proc,
            out,
            _file: file,
        }
    }

    /// The frames seen so far (the capture keeps running).
    pub fn frames(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits `settle` for frames in flight, stops, and returns every frame seen.
    pub fn finish(mut self, settle: Duration) -> Vec<serde_json::Value> {
        std::thread::sleep(settle);
        self.proc.kill();
        self.frames()
    }
}

/// Sends `frames` (see `SEND_PY`) from the VM's interface.
pub fn send_frames(vm: &Vm, frames: &serde_json::Value) {
    let (st, out) = run_timeout(
        vm.command("python3")
            .args(["-c", SEND_PY, &vm.ifname, &frames.to_string()]),
        SETTLE,
    );
    assert!(
        st.is_some_and(|s| s.success()) && out.contains("sent"),
        "sending raw frames from {} failed: {out}",
        vm.port
    );
}

const TCP_SERVER_PY: &str = r#"
import hashlib, json, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(60)
h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(json.dumps({"bytes": n, "sha256": h.hexdigest()}), flush=True)
"#;

const TCP_CLIENT_PY: &str = r#"
import hashlib, json, random, socket, sys, time
ip, port, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = random.Random(seed).randbytes(n)
end = time.time() + 20
while True:
    try:
        c = socket.create_connection((ip, port), timeout=5); break
    except OSError:
        if time.time() > end: raise
        time.sleep(0.2)
c.settimeout(60); c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(json.dumps({"bytes": n, "sha256": hashlib.sha256(data).hexdigest()}), flush=True)
"#;

/// Sends `len` pseudo-random bytes over TCP from `from` to `to` (port 5001 on its address) and
/// checks that the receiver got exactly those bytes (count and SHA-256). Bounded to 60 s.
pub fn tcp_transfer(from: &Vm, to: &Vm, len: usize) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut server = Proc::spawn(
        "tcp server",
        to.command("python3")
            .args(["-u", "-c", TCP_SERVER_PY, &to.ip, "5001"])
            .stdout(file.reopen().unwrap())
            .stderr(file.reopen().unwrap()),
    );
    let (st, sent) = run_timeout(
        from.command("python3").args([
            "-c",
            TCP_CLIENT_PY,
            &to.ip,
            "5001",
            &len.to_string(),
            &(len as u64 ^ 0x5eed).to_string(),
        ]),
        Duration::from_secs(60),
    );
    let t = Instant::now();
    while server.try_wait().is_none() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    let got = std::fs::read_to_string(file.path()).unwrap_or_default();
    assert!(
        st.is_some_and(|s| s.success()),
        "TCP client {} -> {} failed (timed out: {}): {sent}\nserver: {got}",
        from.port,
        to.port,
        st.is_none()
    );
    let sent: serde_json::Value = serde_json::from_str(sent.trim()).unwrap();
    let got_json: Option<serde_json::Value> = got.lines().find_map(|l| {
        serde_json::from_str(l)
            .ok()
            .filter(|v: &serde_json::Value| v.is_object())
    });
    assert_eq!(
        got_json.as_ref(),
        Some(&sent),
        "TCP {} -> {}: the receiver got other bytes (server said {got:?})",
        from.port,
        to.port
    );
}

/// A QEMU guest (TCG, the kernel and initramfs of `guest::Assets`) started inside a host's
/// namespace, so a `-netdev tap,ifname=…` it creates appears in that host, where the vswitch
/// attaches it. Its serial console goes to a file that can be watched while it runs; it is
/// SIGKILLed on drop.
pub struct Guest {
    proc: Proc,
    dir: tempfile::TempDir,
    pub script: String,
}

impl Guest {
    /// Boots `script ARGS…` (see `guest::Assets::with_scripts`) with `qemu_args` added (the
    /// network devices).
    pub fn start(
        ns: &str,
        assets: &crate::guest::Assets,
        qemu_args: &[String],
        script: &str,
        args: &[&str],
    ) -> Guest {
        crate::require("qemu-system-x86_64");
        for a in args {
            assert!(
                !a.is_empty() && !a.contains([' ', ',', '"']),
                "bad guest arg {a:?}"
            );
        }
        let dir = tempfile::Builder::new().prefix("guest-").tempdir().unwrap();
        let mut append = format!("console=ttyS0 panic=-1 quiet fabric.script={script}");
        if !args.is_empty() {
            append += &format!(" fabric.args={}", args.join(","));
        }
        let proc = Proc::spawn(
            "qemu-system-x86_64",
            Command::new("ip")
                .args(["netns", "exec", ns, "qemu-system-x86_64"])
                .args(["-accel", "tcg", "-m", "256", "-smp", "1"])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "stdio", "-no-reboot"])
                .arg("-kernel")
                .arg(&assets.kernel.boot_image)
                .arg("-initrd")
                .arg(&assets.initrd)
                .args(["-append", &append])
                .args(qemu_args)
                .stdout(std::fs::File::create(dir.path().join("serial.log")).unwrap())
                .stderr(std::fs::File::create(dir.path().join("qemu.stderr")).unwrap()),
        );
        Guest {
            proc,
            dir,
            script: script.to_string(),
        }
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.dir.path().join("serial.log")).unwrap_or_default(),
        )
        .replace('\r', "")
    }

    /// QEMU's own stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default()
    }

    /// Waits (up to `timeout`) for a `FABRIC-<tag>` line; returns its text, or None when the
    /// guest ended or the time ran out first.
    pub fn wait_marker(&mut self, tag: &str, timeout: Duration) -> Option<String> {
        let t = Instant::now();
        loop {
            let text = self.console();
            if let Some(m) = crate::guest::markers(&text, tag).first() {
                return Some(m.to_string());
            }
            if self.proc.try_wait().is_some() || t.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (up to `timeout`) for QEMU to exit; false if it had to be killed.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let t = Instant::now();
        while self.proc.try_wait().is_none() {
            if t.elapsed() > timeout {
                self.proc.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// The console and QEMU's stderr, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "guest {} console:\n{}\nqemu stderr:\n{}",
            self.script,
            self.console(),
            self.stderr()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn metric_sum_matches_label_subsets() {
        let t = "# HELP x y\n# TYPE a counter\n\
                 a{port=\"p1\",reason=\"spoofed_mac\"} 3\n\
                 a{port=\"p1\",reason=\"spoofed_ip\"} 4\n\
                 a{port=\"p2\",reason=\"spoofed_ip\"} 10\n\
                 ab 7\nb 1.5\n";
        assert_eq!(metric_sum(t, "a", &[("port", "p1")]), Some(7.0));
        assert_eq!(
            metric_sum(t, "a", &[("port", "p1"), ("reason", "spoofed_ip")]),
            Some(4.0)
        );
        assert_eq!(metric_sum(t, "a", &[]), Some(17.0));
        assert_eq!(metric_sum(t, "b", &[]), Some(1.5));
        assert_eq!(metric_sum(t, "a", &[("port", "p3")]), None);
        assert_eq!(metric_sum(t, "c", &[]), None);
    }
}
