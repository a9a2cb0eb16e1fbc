//! The files under `deploy/` cannot drift from the daemons: every key of each example config
//! (`deploy/config/*.toml`, also the commented-out ones) is a flag of its daemon's `--help`;
//! each daemon, started with `--config` on its example (in a namespace host; only the
//! addresses and paths that belong to a real machine overridden by flags), loads it with its
//! own loader and comes up (blockd and vswitch register with the volume-mgr that loaded its
//! example, lb-vip answers /healthz); each systemd unit starts its binary with
//! `--config /etc/fabric/NAME.toml`; the libvirt snippets name blockd's socket.

use fabric_tests::cluster::bin;
use fabric_tests::netns::{Host, Net};
use fabric_tests::Proc;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DAEMONS: [&str; 4] = ["volume-mgr", "blockd", "vswitch", "lb-vip"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let p = deploy().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Keys of a TOML example: `key = …` lines, also commented out (`# key = …`).
fn keys(toml: &str) -> Vec<String> {
    toml.lines()
        .filter_map(|l| {
            let l = l.trim().trim_start_matches('#').trim();
            let (k, _) = l.split_once(" = ")?;
            k.chars()
                .all(|c| c.is_ascii_lowercase() || c == '-')
                .then(|| k.to_string())
        })
        .collect()
}

#[test]
fn example_keys_are_flags() {
    for d in DAEMONS {
        let text = read(&format!("config/{d}.toml"));
        let keys = keys(&text);
        assert!(keys.len() >= 3, "{d}.toml: too few keys found: {keys:?}");
        let out = Command::new(bin(d)).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for k in &keys {
            assert!(
                help.contains(&format!("--{k} ")) || help.contains(&format!("--{k}\n")),
                "{d}.toml key {k:?} is not a flag of `{d} --help`:\n{help}"
            );
        }
    }
}

#[test]
fn units_and_snippets_match_the_configs() {
    for d in DAEMONS {
        let unit = read(&format!("systemd/fabric-{d}.service"));
        let exec = format!("ExecStart=/usr/local/bin/{d} --config /etc/fabric/{d}.toml\n");
        assert!(unit.contains(&exec), "fabric-{d}.service lacks {exec}");
        for line in [
            "Wants=network-online.target",
            "Restart=on-failure",
            "LimitNOFILE=",
        ] {
            assert!(unit.contains(line), "fabric-{d}.service lacks {line}");
        }
        assert!(
            unit.contains("After=network-online.target"),
            "fabric-{d}.service"
        );
    }
    let socket = read("config/blockd.toml")
        .lines()
        .find_map(|l| l.strip_prefix("nbd-socket = "))
        .expect("blockd.toml sets nbd-socket")
        .trim_matches('"')
        .to_string();
    let disk = read("libvirt/disk-nbd.xml");
    assert!(
        disk.contains(&format!("<host transport='unix' socket='{socket}'/>")),
        "disk-nbd.xml does not use blockd's socket {socket}"
    );
    let nic = read("libvirt/interface-netdev.xml");
    assert!(nic.contains("<interface type='ethernet'>") && nic.contains("<target dev='"));
    // XML comments may not contain "--" (libvirt would refuse the snippet).
    for (name, xml) in [("disk-nbd.xml", &disk), ("interface-netdev.xml", &nic)] {
        for c in xml.split("<!--").skip(1) {
            let body = c.split("-->").next().unwrap();
            assert!(!body.contains("--"), "{name}: \"--\" inside a comment");
        }
    }
}

struct Daemons {
    host: Host,
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
}

impl Daemons {
    fn start(&mut self, d: &str, flags: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{d}.log"))).unwrap();
        let cfg = deploy().join(format!("config/{d}.toml"));
        let p = Proc::spawn(
            d,
            self.host
                .command(bin(d))
                .arg("--config")
                .arg(&cfg)
                .args(flags)
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        self.procs.push(p);
    }

    fn logs(&self) -> String {
        DAEMONS
            .iter()
            .map(|d| {
                let l = std::fs::read_to_string(self.dir.path().join(format!("{d}.log")))
                    .unwrap_or_default();
                format!("--- {d}:\n{l}")
            })
            .collect()
    }

    /// Waits until `check` holds; fails naming a daemon that exited, with the logs.
    fn wait(&mut self, what: &str, mut check: impl FnMut(&Host) -> bool) {
        let t = Instant::now();
        while !check(&self.host) {
            for p in &mut self.procs {
                if let Some(st) = p.try_wait() {
                    let name = p.name.clone();
                    panic!(
                        "{name} exited ({st}) with its example config\n{}",
                        self.logs()
                    );
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{what} not within 30 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `fabctl -o json VERB ls` in the namespace (manager at the example's 127.0.0.1:7700): whether
/// an entry has `key` = kvm1 and state up.
fn up_in(host: &Host, verb: &str, key: &str) -> bool {
    let out = host
        .command(bin("fabctl"))
        .args(["-o", "json", verb, "ls"])
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            Some(
                v.as_array()?
                    .iter()
                    .any(|n| n[key] == "kvm1" && n["state"] == "up"),
            )
        })
        .unwrap_or(false)
}

#[test]
fn daemons_start_with_the_examples() {
    let net = Net::new(1);
    let host = net.hosts[0].clone();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (mgr_dir, sock, disk, secret) = (p("mgr"), p("nbd.sock"), p("d0.img:1G"), p("secret"));
    std::fs::write(&secret, b"0123456789abcdef-example-secret").unwrap();
    let listen = format!("{}:7800", host.addr);
    let manager = "http://127.0.0.1:7700";
    let mut d = Daemons {
        host: host.clone(),
        dir,
        procs: Vec::new(),
    };
    // volume-mgr's example listens on 127.0.0.1:7700 (here: in the namespace).
    d.start("volume-mgr", &["--data-dir", &mgr_dir]);
    d.start(
        "blockd",
        &[
            "--manager",
            manager,
            "--listen",
            &listen,
            "--nbd-socket",
            &sock,
            "--disk",
            &disk,
            "--secret-file",
            &secret,
        ],
    );
    d.start(
        "vswitch",
        &["--manager", manager, "--underlay-ip", &host.addr],
    );
    d.start("lb-vip", &["--manager", manager]);
    d.wait("blockd kvm1 up", |h| up_in(h, "node", "name"));
    d.wait("vswitch kvm1 up", |h| up_in(h, "switch", "node"));
    d.wait("lb-vip /healthz on 127.0.0.1:7950", |h| {
        h.command("curl")
            .args(["-sf", "--max-time", "2", "http://127.0.0.1:7950/healthz"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(Path::new(&sock).exists(), "blockd made its NBD socket");
}
