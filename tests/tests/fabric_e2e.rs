//! Issue 6: the whole fabric end to end, the way its users run it. Three namespace hosts
//! (blockd + vswitch each) and the manager; two QEMU guests (TCG) on hosts 1 and 2, each with
//! its own 3-replica volume as its virtio disk (host's blockd unix socket) and a `netdev` port
//! on one overlay network (address by DHCP). Inside the guests: guest 1 writes a pattern the
//! test recomputes, guest 2 pings guest 1, both serve a file with busybox httpd; every daemon
//! on host 3 (a replica of guest 1's disk, no guest) is killed -9 and guest 1's I/O goes on;
//! guest 1 is powered off, host 3's daemons come back, guest 1's port moves to host 3 and the
//! guest boots there on the same volume: its data is there, its address answers, and the old
//! host's gateway can no longer write.
//!
//! Run alone: `cargo build -p blockd -p volume-mgr -p vswitch -p lb-vip -p tools` then
//! `cargo test -p fabric-tests --test fabric_e2e -- --nocapture`.

use fabric_tests::fabric_e2e::{md5_hex, Fabric};
use fabric_tests::guest::{pattern, Assets, GuestSpec, Running, AGENT};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NET: &str = "app";
const SUBNET: &str = "192.0.2.0/24";
const SEED: &str = "e2e";
/// Regions (MiB) guest 1 writes before host 3 dies, and after.
const BEFORE: [u64; 4] = [0, 1, 2, 3];
const AFTER: [u64; 4] = [8, 9, 10, 11];

const BOOT: Duration = Duration::from_secs(180);
const STEP: Duration = Duration::from_secs(90);

/// Step timings, printed as the test goes (and at the end).
struct Steps {
    start: Instant,
    last: Instant,
    done: Vec<(String, f64)>,
}

impl Steps {
    fn new() -> Steps {
        let now = Instant::now();
        Steps {
            start: now,
            last: now,
            done: Vec::new(),
        }
    }

    fn step(&mut self, what: &str) {
        let s = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        eprintln!(
            "[e2e {:6.1} s] {what}: {s:.1} s",
            self.start.elapsed().as_secs_f64()
        );
        self.done.push((what.to_string(), s));
    }
}

/// A `netdev` port (address and MAC allocated by the manager): (ip, mac).
fn create_port(f: &Fabric, name: &str, node: &str) -> (String, String) {
    let p = f.json_ok(&[
        "port", "create", name, "--net", NET, "--node", node, "--kind", "netdev",
    ]);
    (
        p["ip"].as_str().unwrap().to_string(),
        p["mac"].as_str().unwrap().to_lowercase(),
    )
}

/// Boots the agent guest `name` on host `host`: disk = `volume` through that host's gateway,
/// NIC = the tap `port` (the vswitch attaches it).
fn boot(
    f: &Fabric,
    assets: &Assets,
    name: &str,
    host: usize,
    volume: &str,
    port: &str,
    mac: &str,
) -> Running {
    let url = f.url(host, volume);
    let qemu_args = [
        "-netdev".to_string(),
        format!("tap,id=n0,ifname={port},script=no,downscript=no"),
        "-device".to_string(),
        format!("virtio-net-pci,netdev=n0,mac={mac}"),
    ];
    assets.start(
        name,
        &GuestSpec {
            netns: Some(&f.host(host).ns),
            drive: Some(&url),
            qemu_args: &qemu_args,
            script: "agent",
            args: &[],
        },
    )
}

/// Waits for the agent, then configures eth0 by DHCP; checks it got `ip` and `mac`.
fn bring_up(f: &Fabric, g: &mut Running, ip: &str, mac: &str) {
    assert!(
        g.wait_marker("AGENT", BOOT).is_some(),
        "guest {} never got to its agent\n{}",
        g.name,
        g.describe()
    );
    let out = g.exec_ok("dhcp eth0", STEP);
    let want = format!("FABRIC-NET ip={ip}/24 mac={mac}");
    assert!(
        out.contains(&want),
        "guest {}: DHCP gave {out:?}, want {want:?}\n{}",
        g.name,
        f.logs()
    );
}

/// guest writes the pattern regions `offs` (checking each region's md5 against the host's
/// own computation of the pattern).
fn write_regions(g: &mut Running, offs: &[u64]) {
    let list: Vec<String> = offs.iter().map(|o| o.to_string()).collect();
    let out = g.exec_ok(
        &format!("sh /scripts/write-pattern {SEED} {}", list.join(" ")),
        STEP,
    );
    let wrote = fabric_tests::guest::markers(&out, "WROTE");
    assert_eq!(wrote.len(), offs.len(), "{out}");
    for (w, off) in wrote.iter().zip(offs) {
        assert_eq!(
            *w,
            format!("{off} {}", md5_hex(&pattern(SEED, *off))),
            "guest {} wrote another pattern than the host computes",
            g.name
        );
    }
}

/// guest reads the regions `offs` back (O_DIRECT, caches dropped) and compares each md5 with
/// the host's.
fn verify_regions(g: &mut Running, offs: &[u64]) {
    let list: Vec<String> = offs.iter().map(|o| o.to_string()).collect();
    let r = g.exec(
        &format!("sh /scripts/verify-pattern {SEED} {}", list.join(" ")),
        STEP,
    );
    let out = match r {
        Ok((_, out)) => out,
        Err(e) => panic!("guest {} verify: {e}\n{}", g.name, g.describe()),
    };
    let read = fabric_tests::guest::markers(&out, "READ");
    assert_eq!(read.len(), offs.len(), "{out}");
    for (r, off) in read.iter().zip(offs) {
        assert_eq!(
            *r,
            format!("{off} {} ok", md5_hex(&pattern(SEED, *off))),
            "guest {}: region {off} MiB reads back wrong",
            g.name
        );
    }
}

/// `from` pings `ip`: single pings until one is answered (up to 30), then 3 more all answered.
fn ping(g: &mut Running, ip: &str) {
    g.exec_ok(
        &format!(
            "n=0; while ! ping -c 1 -W 1 {ip} >/dev/null 2>&1; do n=$((n+1)); [ $n -lt 30 ] || exit 1; done; ping -c 3 -W 2 {ip}"
        ),
        STEP,
    );
}

fn httpd(g: &mut Running, name: &str) {
    g.exec_ok(
        &format!("mkdir -p /www && echo {name} > /www/name && httpd -p 80 -h /www"),
        STEP,
    );
}

/// `from` fetches http://IP/name and must get `want` (an HTTP/1.0 GET through busybox nc:
/// the guest's static busybox wget crashes looking up the "http" service).
fn fetch(g: &mut Running, ip: &str, want: &str) {
    let out = g.exec_ok(
        &format!("printf 'GET /name HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 80"),
        STEP,
    );
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("HTTP/1.") && l.contains(" 200")),
        "guest {} fetching http://{ip}/name: {out:?}",
        g.name
    );
    assert_eq!(
        lines.iter().rev().find(|l| !l.is_empty()).copied(),
        Some(want),
        "guest {} fetching http://{ip}/name: {out:?}",
        g.name
    );
}

/// A long-lived qemu-io on a gateway (like a VM process that keeps running), fed commands on
/// stdin; its output goes to a file, read when it has exited.
struct QemuIo {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: std::path::PathBuf,
}

impl QemuIo {
    fn open(url: &str, out: std::path::PathBuf) -> QemuIo {
        let f = std::fs::File::create(&out).unwrap();
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", url])
            .stdin(Stdio::piped())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("qemu-io is installed");
        let stdin = child.stdin.take();
        QemuIo { child, stdin, out }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{cmd}").unwrap();
    }

    /// quit, wait (bounded), return everything it printed.
    fn finish(mut self, timeout: Duration) -> String {
        let _ = writeln!(self.stdin.as_mut().unwrap(), "quit");
        self.stdin.take();
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if t.elapsed() > timeout {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.wait();
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The VIP steps: a TCP VIP on the overlay (`--net`) balancing across both guests' httpd
/// (backends IP:80), lb-vip on the fabric hosts with `--vip-interface`, and a client in a
/// namespace of its own (a tap port on host 2) that must get answers from both guests.
/// Called once with everything up (creates the VIP and starts lb-vip) and once after host 3's
/// daemons died (the VIP must keep answering).
fn vip_checks(f: &mut Fabric, backends: &[(&str, &str)], first: bool) {
    const VIP: &str = "192.0.2.200";
    if first {
        let ns = f.namespace("client");
        f.json_ok(&[
            "port",
            "create",
            "client",
            "--net",
            NET,
            "--node",
            "h2",
            "--kind",
            "tap",
            "--netns",
            &ns,
            "--ip",
            "192.0.2.250",
        ]);
        f.wait_for("the client port in its namespace", STEP, || {
            Command::new("ip")
                .args(["-n", &ns, "addr", "add", "192.0.2.250/24", "dev", "client"])
                .status()
                .is_ok_and(|s| s.success())
        });
        fabric_tests::run(Command::new("ip").args(["-n", &ns, "link", "set", "client", "up"]));
        f.fabctl_ok(&[
            "vip",
            "create",
            "web",
            "--addr",
            &format!("{VIP}:80"),
            "--proto",
            "tcp",
            "--net",
            NET,
            "--check",
            "http:/name",
            "--check-interval",
            "500ms",
            "--check-timeout",
            "400ms",
        ]);
        for (ip, _) in backends {
            f.fabctl_ok(&["vip", "backend", "add", "web", &format!("{ip}:80")]);
        }
        // The namespace lb-vip keeps the VIP's socket and port in (made here: a namespace
        // added from inside a host's `ip netns exec` would only be mounted there).
        f.namespace(&format!("vip{NET}"));
        // Host 3 (whose daemons die next) serves the VIP first, so the check after that
        // is a failover to another host.
        f.start_lbvip(3, "eth0");
        f.wait_for("lb-vip on h3 holds VIP web", STEP, || {
            f.json(&["vip", "show", "web"])
                .is_some_and(|v| v["lease"]["holder"] == "h3")
        });
        for i in 1..=2 {
            f.start_lbvip(i, "eth0");
        }
    }
    let ns = format!(
        "{}-client",
        f.net.hosts[0].ns.strip_suffix("-h0").unwrap_or("")
    );
    let mut seen = std::collections::BTreeSet::new();
    let t = Instant::now();
    while seen.len() < backends.len() {
        assert!(
            t.elapsed() < STEP,
            "VIP {VIP}:80 answered only {seen:?} in {STEP:?}\n{}",
            f.logs()
        );
        let (ok, out) = fabric_tests::try_run(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "python3",
            "-c",
            "import sys,urllib.request as u; print(u.urlopen(sys.argv[1], timeout=3).read().decode())",
            &format!("http://{VIP}/name"),
        ]));
        if ok {
            let name = out.trim().to_string();
            assert!(
                backends.iter().any(|(_, n)| *n == name),
                "the VIP answered {name:?}"
            );
            seen.insert(name);
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn two_guests_across_hosts_survive_a_host_and_move() {
    let mut steps = Steps::new();
    let assets = Assets::with_scripts(&[("agent", AGENT)]);
    steps.step("kernel + initramfs ready");
    let mut f = Fabric::start(3, "1G");
    f.fabctl_ok(&["net", "create", NET, "--vni", "600", "--subnet", SUBNET]);
    for v in ["vol1", "vol2"] {
        f.fabctl_ok(&["volume", "create", v, "--size", "64M", "--replicas", "3"]);
    }
    let replicas = f.replica_nodes("vol1");
    assert_eq!(replicas, ["h1", "h2", "h3"], "vol1's replicas");
    let (ip1, mac1) = create_port(&f, "g1", "h1");
    let (ip2, mac2) = create_port(&f, "g2", "h2");
    steps.step("fabric up (manager, 3 x blockd + vswitch), net, 2 volumes, 2 ports");

    let mut g1 = boot(&f, &assets, "guest1", 1, "vol1", "g1", &mac1);
    let mut g2 = boot(&f, &assets, "guest2", 2, "vol2", "g2", &mac2);
    bring_up(&f, &mut g1, &ip1, &mac1);
    bring_up(&f, &mut g2, &ip2, &mac2);
    steps.step("both guests booted, addresses by DHCP");

    write_regions(&mut g1, &BEFORE);
    verify_regions(&mut g1, &BEFORE);
    steps.step("guest 1 wrote 4 MiB of pattern to its disk and read it back");
    ping(&mut g2, &ip1);
    steps.step("guest 2 pings guest 1 over the overlay");
    httpd(&mut g1, "guest1");
    httpd(&mut g2, "guest2");
    fetch(&mut g2, &ip1, "guest1");
    fetch(&mut g1, &ip2, "guest2");
    steps.step("both guests serve httpd, each fetches the other's");
    vip_checks(&mut f, &[(&ip1, "guest1"), (&ip2, "guest2")], true);
    steps.step("a VIP on the overlay answers the client from both guests");

    // Host 3 holds a replica of guest 1's disk and no guest: every daemon there dies.
    f.kill_host(3);
    let kill = Instant::now();
    write_regions(&mut g1, &AFTER);
    let all: Vec<u64> = BEFORE.iter().chain(AFTER.iter()).copied().collect();
    verify_regions(&mut g1, &all);
    eprintln!(
        "guest 1 wrote and read back 4 MiB more {:.1} s after host 3's daemons died",
        kill.elapsed().as_secs_f64()
    );
    // The writes really went on without host 3: its replicas of vol1 are recorded out of
    // service (by host 1's gateway, before it acknowledged them).
    let v = f.json_ok(&["volume", "show", "vol1"]);
    let h3_out = v["sets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["members"].as_array().into_iter().flatten())
        .any(|m| m["node"] == "h3" && m["in_service"] == false);
    assert!(h3_out, "no replica on h3 recorded out of service: {v}");
    assert_eq!(v["lease"]["holder"], "h1", "{v}");
    ping(&mut g2, &ip1);
    steps.step("host 3 killed -9: guest 1 writes + reads on, guest 2 still pings it");
    vip_checks(&mut f, &[(&ip1, "guest1"), (&ip2, "guest2")], false);
    steps.step("the VIP still answers from both guests with host 3 dead");

    // Power guest 1 off, bring host 3 back, move guest 1's port there.
    g1.kill();
    drop(g1);
    f.start_host(3);
    f.wait_host_up(&[3], Duration::from_secs(30));
    // PUT /v1/ports/g1/node: MAC, IP and interface name stay.
    let moved = f.json_ok(&["port", "move", "g1", "--node", "h3"]);
    assert_eq!(moved["node"], "h3", "{moved}");
    assert_eq!(moved["ip"].as_str(), Some(ip1.as_str()), "{moved}");
    assert_eq!(
        moved["mac"].as_str().map(str::to_lowercase).as_deref(),
        Some(mac1.as_str()),
        "{moved}"
    );
    steps.step("guest 1 off, host 3's daemons back, port g1 moved to h3");

    // The old host's gateway, still attached (a client that kept the volume open there, as a
    // QEMU that did not really die would).
    let mut stale = QemuIo::open(&f.url(1, "vol1"), f.dir().join("stale-qemu-io.out"));
    stale.send("read 0 4k");
    std::thread::sleep(Duration::from_secs(2));

    let epoch_h1 = f.json_ok(&["volume", "show", "vol1"])["lease"]["epoch"]
        .as_u64()
        .unwrap();
    let mut g1 = boot(&f, &assets, "guest1@h3", 3, "vol1", "g1", &mac1);
    bring_up(&f, &mut g1, &ip1, &mac1);
    verify_regions(&mut g1, &all);
    let lease = f.json_ok(&["volume", "show", "vol1"])["lease"].clone();
    assert_eq!(lease["holder"], "h3", "{lease}");
    assert!(lease["epoch"].as_u64().unwrap() > epoch_h1, "{lease}");
    steps.step("guest 1 booted on host 3: its 8 MiB are there");
    ping(&mut g2, &ip1);
    httpd(&mut g1, "guest1");
    fetch(&mut g2, &ip1, "guest1");
    steps.step("guest 1's address answers guest 2 from host 3 (ping, httpd)");

    // The old gateway can no longer write.
    stale.send("write -P 0x44 0 64k");
    stale.send(&format!("write -P 0x44 {} 4k", 9 << 20));
    let text = stale.finish(Duration::from_secs(60));
    let refused = text
        .matches("write failed: Operation not permitted")
        .count()
        + text.matches("write failed: Input/output error").count();
    assert_eq!(
        refused,
        2,
        "the old host's gateway must refuse every write:\n{text}\n{}",
        f.logs()
    );
    for l in text.lines().filter(|l| l.contains("failed")) {
        eprintln!("old host's gateway: {l}");
    }
    assert!(
        text.contains("read 4096/4096 bytes at offset 0"),
        "the old host's client was never attached:\n{text}"
    );
    assert!(
        !text.contains("wrote "),
        "a stale write was acknowledged:\n{text}"
    );
    verify_regions(&mut g1, &all);
    steps.step("host 1's gateway refuses writes; guest 1 reads its data unchanged through host 3");

    // Host 3's replica, out of service since the kill, was brought back by the gateway now
    // on host 3: all three replicas are in service and equal.
    f.wait_converged("vol1", STEP);
    steps.step("vol1's three replicas in service again and equal (fabctl volume verify)");

    g1.kill();
    g2.kill();
    eprintln!("step timings:");
    for (what, s) in &steps.done {
        eprintln!("  {s:6.1} s  {what}");
    }
    eprintln!("  total {:.1} s", steps.start.elapsed().as_secs_f64());
    assert!(
        steps.start.elapsed() < Duration::from_secs(360),
        "the end-to-end test took longer than 6 minutes"
    );
}
