//! Several hosts on one machine: one network namespace per host, each joined by a veth pair
//! to a bridge that lives in its own "switch" namespace, addressed in 198.18.0.0/24. Nothing
//! touches the root namespace and no namespace has a route out (no default route, no uplink),
//! so test traffic can only reach the namespaces the test made. Everything is deleted on
//! drop, also when the test fails. Groundwork for the multi-host tests of issue 3.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) is installed");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One namespace "host".
#[derive(Debug, Clone)]
pub struct Host {
    /// Network namespace name.
    pub ns: String,
    /// Its address on the test underlay.
    pub addr: String,
    /// Its interface name inside the namespace.
    pub ifname: String,
}

impl Host {
    /// A command that runs inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

pub struct Net {
    switch: String,
    pub hosts: Vec<Host>,
}

impl Net {
    /// Creates `n` hosts (`198.18.0.1` …) on one bridge.
    pub fn new(n: usize) -> Net {
        assert!((1..=200).contains(&n));
        // Unique per process and per call, short enough for interface names (15 chars).
        let tag = format!(
            "f{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{tag}-sw");
        let mut net = Net {
            switch: switch.clone(),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{tag}-h{i}");
            ip(&["netns", "add", &ns]);
            // Registered before the links, so a failure below still cleans this namespace up.
            let host = Host {
                ns: ns.clone(),
                addr: format!("198.18.0.{}", i + 1),
                ifname: "eth0".into(),
            };
            net.hosts.push(host.clone());
            let peer = format!("p{i}");
            ip(&[
                "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer,
                "netns", &switch,
            ]);
            ip(&["-n", &switch, "link", "set", &peer, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &peer, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", host.addr),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// Cuts a host's link (as a pulled cable: its namespace and processes stay).
    pub fn link_down(&self, host: usize) {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("p{host}"),
            "down",
        ]);
    }

    pub fn link_up(&self, host: usize) {
        ip(&["-n", &self.switch, "link", "set", &format!("p{host}"), "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth, and with it the peer.
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .status();
    }
}
