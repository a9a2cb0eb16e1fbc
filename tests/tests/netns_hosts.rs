//! The namespace-hosts harness: hosts reach each other over the bridge and nothing else, a cut
//! link isolates a host, and the Fabric daemons run across hosts (volume-mgr on one, blockd on
//! another, an NBD client on a third).

use fabric_tests::cluster::bin;
use fabric_tests::netns::Net;
use fabric_tests::{require, wait_for, Proc};
use std::process::Stdio;
use std::time::Duration;

fn ping(net: &Net, from: usize, to: usize) -> bool {
    net.hosts[from]
        .command("busybox")
        .args(["ping", "-c", "1", "-W", "1", &net.hosts[to].addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn hosts_reach_each_other_only_over_the_bridge() {
    require("ip");
    require("busybox");
    let net = Net::new(3);
    assert!(ping(&net, 0, 2));
    assert!(ping(&net, 2, 1));
    // No route out of the test network.
    for h in &net.hosts {
        let out = h.command("ip").args(["route"]).output().unwrap();
        let routes = String::from_utf8_lossy(&out.stdout);
        assert!(!routes.contains("default"), "{}: {routes}", h.ns);
    }
    net.link_down(2);
    assert!(!ping(&net, 0, 2), "a cut link must isolate the host");
    assert!(ping(&net, 0, 1));
    net.link_up(2);
    wait_for("link back up", Duration::from_secs(10), || ping(&net, 0, 2));
}

#[test]
fn fabric_daemons_across_namespace_hosts() {
    require("qemu-io");
    let net = Net::new(3);
    let dir = tempfile::tempdir().unwrap();
    let (m, b, c) = (&net.hosts[0], &net.hosts[1], &net.hosts[2]);
    let mgr_url = format!("http://{}:7700", m.addr);
    let _mgr = Proc::spawn(
        "volume-mgr",
        m.command(bin("volume-mgr"))
            .args(["--listen", &format!("{}:7700", m.addr), "--data-dir"])
            .arg(dir.path().join("mgr"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let _bd = Proc::spawn(
        "blockd",
        b.command(bin("blockd"))
            .args([
                "--manager",
                &mgr_url,
                "--node",
                "h1",
                "--listen",
                &format!("{}:7800", b.addr),
            ])
            .args([
                "--nbd-listen",
                &format!("{}:10809", b.addr),
                "--http-listen",
                "none",
                "--disk",
            ])
            .arg(format!("{}:1G", dir.path().join("h1.img").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    // fabctl from the client host talks to the manager host.
    let fabctl = |args: &[&str]| {
        c.command(bin("fabctl"))
            .args(["--manager", &mgr_url])
            .args(args)
            .output()
            .unwrap()
    };
    wait_for("blockd registered", Duration::from_secs(30), || {
        let o = fabctl(&["-o", "json", "node", "ls"]);
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"up\"")
    });
    let o = fabctl(&[
        "volume",
        "create",
        "xvol",
        "--size",
        "64M",
        "--replicas",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let url = format!("nbd://{}:10809/xvol", b.addr);
    let qio = |cmd: &str| {
        let o = c
            .command("qemu-io")
            .args(["-f", "raw", "-c", cmd, &url])
            .output()
            .unwrap();
        let t = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && !t.contains("fail") && !t.contains("error"),
            "qemu-io {cmd}: {t}"
        );
    };
    qio("write -P 0x7e 1M 1M");
    qio("read -P 0x7e 1M 1M");
    // With the client's link cut, the export is unreachable; back up, the data is there.
    net.link_down(2);
    let o = c
        .command("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &url])
        .output()
        .unwrap();
    assert!(!o.status.success());
    net.link_up(2);
    wait_for("client link back", Duration::from_secs(10), || {
        c.command("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k", &url])
            .output()
            .unwrap()
            .status
            .success()
    });
    qio("read -P 0x7e 1M 1M");
}
