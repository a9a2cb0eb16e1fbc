//! The parts of "VIPs on an overlay network" (issue 5) outside lb-vip's daemon loop, with real
//! namespaces and the real daemons: `lb_vip::overlay`'s namespace and socket helpers, and a
//! VIP's own vswitch port (created and moved through the API with `ensure_vip_port_in`)
//! carrying the VIP's address into a namespace where a TCP echo listener made by
//! `tcp_listener_in` answers a namespace VM on the overlay network — on another host, then,
//! after the port moved, on the VM's own host. Every wait is bounded; namespaces and daemons
//! go on drop, also when a test fails.

use fabric_tests::overlay::{run_timeout, Overlay, Vm, SETTLE};
use lb_vip::overlay::{
    configure_vip_addr, ensure_netns, ensure_vip_port_in, link_exists, prepare_vip_in,
    run_in_netns, tcp_connect_in, tcp_listener_in, udp_socket_in, vip_addr_present, vip_ifname,
    vip_mac, NetnsSockets,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};
use volume_mgr::api;
use volume_mgr::client::Client;

/// A network namespace of the test's own, deleted on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let ns = Ns(format!("fovp{}-{tag}", std::process::id() % 100_000));
        let _ = Command::new("ip")
            .args(["netns", "del", &ns.0])
            .stderr(std::process::Stdio::null())
            .status();
        ns
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    fabric_tests::run(Command::new("ip").args(args));
}

/// A Python client run inside `ns`: connects to HOST:PORT, sends `msg` and a newline, prints
/// the line it gets back. Bounded (3 s socket timeout, 10 s for the whole run).
fn tcp_client_in(ns: &str, host: &str, port: u16, msg: &str) -> (bool, String) {
    const PY: &str = "import socket,sys\n\
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)\n\
s.sendall(sys.argv[3].encode()+b'\\n')\n\
f=s.makefile('rb')\n\
sys.stdout.write(f.readline().decode())\n";
    let (st, out) = run_timeout(
        Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "python3",
            "-c",
            PY,
            host,
            &port.to_string(),
            msg,
        ]),
        Duration::from_secs(10),
    );
    (st.is_some_and(|s| s.success()), out)
}

/// Echo server on `l`: each connection's first line comes back as `<peer ip> <line>`.
fn spawn_echo(l: std::net::TcpListener) {
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let peer = c
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let mut line = String::new();
                if BufReader::new(&mut c).read_line(&mut line).is_ok() {
                    let _ = c.write_all(format!("{peer} {line}").as_bytes());
                }
            });
        }
    });
}

#[test]
fn sockets_made_in_a_namespace_live_there() {
    fabric_tests::require("python3");
    let ns = Ns::new("a");
    ensure_netns(&ns.0).unwrap();
    ensure_netns(&ns.0).unwrap(); // idempotent
                                  // An address that exists only in the namespace (on a veth pair made there).
    ip(&[
        "-n", &ns.0, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    ip(&["-n", &ns.0, "link", "set", "d1", "up"]);
    let addr = Ipv4Addr::new(192, 0, 2, 1);
    // Not there: a bounded wait that fails.
    let t = Instant::now();
    let e = configure_vip_addr(&ns.0, "nosuch0", addr, 24, Duration::from_millis(300)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // Binding the address before it is configured works (non-local bind in the namespace).
    let early = tcp_listener_in(&ns.0, SocketAddr::from((addr, 0))).unwrap();
    configure_vip_addr(&ns.0, "d0", addr, 24, Duration::from_secs(5)).unwrap();
    configure_vip_addr(&ns.0, "d0", addr, 24, Duration::from_secs(5)).unwrap(); // idempotent
    let routes = String::from_utf8(
        Command::new("ip")
            .args(["-n", &ns.0, "route", "show", "192.0.2.0/24"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(routes.contains("dev d0"), "no subnet route: {routes:?}");
    // The host namespace has no such address: binding it here fails.
    assert!(std::net::TcpListener::bind((addr, 0)).is_err());

    // TCP: a listener made in the namespace answers a client inside it.
    let l = tcp_listener_in(&ns.0, SocketAddr::from((addr, 0))).unwrap();
    let port = l.local_addr().unwrap().port();
    spawn_echo(l);
    let (ok, out) = tcp_client_in(&ns.0, "192.0.2.1", port, "hello");
    assert!(ok, "client in {} failed: {out}", ns.0);
    assert_eq!(out.trim(), "192.0.2.1 hello");
    let early_port = early.local_addr().unwrap().port();
    spawn_echo(early);
    let (ok, out) = tcp_client_in(&ns.0, "192.0.2.1", early_port, "early");
    assert!(ok, "client of the early listener failed: {out}");
    assert_eq!(out.trim(), "192.0.2.1 early");

    // UDP: a datagram sent inside the namespace arrives.
    let u = udp_socket_in(&ns.0, SocketAddr::from((addr, 0))).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let uport = u.local_addr().unwrap().port();
    let (st, out) = run_timeout(
        Command::new("ip").args([
            "netns",
            "exec",
            &ns.0,
            "python3",
            "-c",
            "import socket,sys;socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'dgram',('192.0.2.1',int(sys.argv[1])))",
            &uport.to_string(),
        ]),
        Duration::from_secs(10),
    );
    assert!(st.is_some_and(|s| s.success()), "udp sender: {out}");
    let mut buf = [0u8; 64];
    let (n, from) = u.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"dgram");
    assert_eq!(from.ip(), std::net::IpAddr::V4(addr));

    // tcp_connect_in: tokio connects from the namespace (the runtime's threads stay here).
    let l2 = tcp_listener_in(&ns.0, SocketAddr::from((addr, 0))).unwrap();
    let p2 = l2.local_addr().unwrap().port();
    spawn_echo(l2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let s = tcp_connect_in(&ns.0, SocketAddr::from((addr, p2)), Duration::from_secs(5))
            .await
            .unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"tokio\n").await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::BufReader::new(r).read_line(&mut line),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(line.trim(), "192.0.2.1 tokio");
        // Nothing listens on port 1 there: refused, not a hang.
        let e = tcp_connect_in(&ns.0, SocketAddr::from((addr, 1)), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        // The same through a long-lived namespace thread.
        let f = NetnsSockets::new(&ns.0).unwrap();
        for i in 0..3 {
            let s = f
                .tcp_connect(SocketAddr::from((addr, p2)), Duration::from_secs(5))
                .await
                .unwrap();
            let (r, mut w) = s.into_split();
            w.write_all(format!("f{i}\n").as_bytes()).await.unwrap();
            let mut line = String::new();
            tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::BufReader::new(r).read_line(&mut line),
            )
            .await
            .unwrap()
            .unwrap();
            assert_eq!(line.trim(), format!("192.0.2.1 f{i}"));
        }
        let l3 = f.tcp_listener(SocketAddr::from((addr, 0))).await.unwrap();
        assert!(l3.local_addr().unwrap().ip() == std::net::IpAddr::V4(addr));
        let u3 = f.udp_socket(SocketAddr::from((addr, 0))).await.unwrap();
        assert!(u3.local_addr().is_ok());
        let e = NetnsSockets::new("fabric-no-such-ns").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        // A namespace that does not exist is an error.
        let e = tcp_connect_in(
            "fabric-no-such-ns",
            SocketAddr::from((addr, p2)),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    });
    // The process's own threads never left the host namespace.
    let mine = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let init = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_eq!(mine, init);
    let mut s = String::new();
    std::fs::File::open("/proc/self/net/dev")
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert!(
        !s.contains("d0:"),
        "the test thread sees the namespace's veth"
    );
}

/// Runs `f` with a manager client on a thread inside the manager's namespace host h0 (the
/// manager listens on the underlay only), on a runtime of its own.
fn api<T, F, Fut>(o: &Overlay, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let url = o.manager_url();
    run_in_netns(&o.host(0).ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(async move { f(Client::new(vec![url])).await }))
    })
    .unwrap()
}

/// Waits until the VM's connection to VIP:port is echoed, and checks it came from the VM.
fn wait_echo(o: &Overlay, vm: &Vm, vip: &str, port: u16, msg: &str) {
    let mut last = String::new();
    o.wait(&format!("{} to reach {vip}:{port}", vm.port), || {
        let (ok, out) = tcp_client_in(&vm.ns, vip, port, msg);
        last = out.clone();
        ok && !out.trim().is_empty()
    });
    assert_eq!(
        last.trim(),
        format!("{} {msg}", vm.ip),
        "echo through the VIP: {last}\n{}",
        vm.describe()
    );
}

#[test]
fn vip_port_on_an_overlay_answers_vms_and_moves() {
    let o = Overlay::start(2, 0);
    o.create_net("blue", 4242, "192.0.2.0/24", &[]);
    let vm = o.vm("vma", "blue", 1, &[]);
    o.fabctl_ok(&[
        "vip",
        "create",
        "web",
        "--addr",
        "192.0.2.50:8080",
        "--proto",
        "tcp",
        "--net",
        "blue",
    ]);
    // The VIP's address is refused to a port that is not the VIP's, and a VIP's port must
    // have its VIP's address and network.
    let (ok, out) = o.fabctl(&[
        "port",
        "create",
        "imp",
        "--net",
        "blue",
        "--node",
        "h1",
        "--kind",
        "tap",
        "--ip",
        "192.0.2.50",
    ]);
    assert!(!ok && out.contains("vip web"), "{out}");
    let (ok, out) = o.fabctl(&[
        "port",
        "create",
        "imp",
        "--net",
        "blue",
        "--node",
        "h1",
        "--kind",
        "tap",
        "--ip",
        "192.0.2.51",
        "--vip",
        "web",
    ]);
    assert!(!ok && out.contains("192.0.2.50"), "{out}");
    let (ok, out) = o.fabctl(&[
        "port", "create", "imp", "--net", "blue", "--node", "h1", "--kind", "tap", "--vip",
        "nosuch",
    ]);
    assert!(!ok && out.contains("does not exist"), "{out}");

    let vipns = o.namespace("vipblue");
    ensure_netns(&vipns).unwrap();
    let vip: api::Vip = api(&o, |c| async move { c.get_vip("web").await }).unwrap();

    // Served on h2: the port is created there.
    let ns = vipns.clone();
    let v = vip.clone();
    let p = api(&o, move |c| async move {
        ensure_vip_port_in(&c, &v, "h2", &ns).await
    })
    .unwrap();
    assert_eq!(
        (p.name.as_str(), p.node.as_str(), p.ip.as_str()),
        ("vip-web", "h2", "192.0.2.50")
    );
    assert_eq!(p.ifname, vip_ifname("web"));
    assert_eq!(p.mac.to_lowercase(), vip_mac("web"));
    assert_eq!(p.vip.as_deref(), Some("web"));
    assert_eq!(p.netns.as_deref(), Some(vipns.as_str()));
    // Again: nothing changes.
    let (ns, v) = (vipns.clone(), vip.clone());
    let again = api(&o, move |c| async move {
        ensure_vip_port_in(&c, &v, "h2", &ns).await
    })
    .unwrap();
    assert_eq!(again.created_ms, p.created_ms);
    assert!(o.fabctl_ok(&["port", "ls"]).contains("vip-web"));
    assert_eq!(o.port("vip-web")["vip"], "web");
    // A second port for the VIP is refused.
    let (ok, out) = o.fabctl(&[
        "port", "create", "imp", "--net", "blue", "--node", "h1", "--kind", "tap", "--vip", "web",
    ]);
    assert!(!ok && out.contains("already has port vip-web"), "{out}");

    let ifname = p.ifname.clone();
    let addr = Ipv4Addr::new(192, 0, 2, 50);
    configure_vip_addr(&vipns, &ifname, addr, 24, SETTLE).unwrap();
    let l = tcp_listener_in(&vipns, SocketAddr::from((addr, 8080))).unwrap();
    spawn_echo(l);
    wait_echo(&o, &vm, "192.0.2.50", 8080, "via-h2");
    assert!(
        vm.neigh("192.0.2.50").contains(&vip_mac("web")),
        "the VM did not resolve the VIP to its port's MAC: {}",
        vm.neigh("192.0.2.50")
    );

    // Moved to h1 (the VM's host): h2 removes its tap, h1 creates it; the address goes with
    // the old interface and is configured again on the new one.
    let (ns, v) = (vipns.clone(), vip.clone());
    let moved = api(&o, move |c| async move {
        ensure_vip_port_in(&c, &v, "h1", &ns).await
    })
    .unwrap();
    assert_eq!(moved.node, "h1");
    assert_eq!(
        (moved.ip.as_str(), moved.mac.as_str()),
        (p.ip.as_str(), p.mac.as_str())
    );
    o.wait("h1's vswitch to attach vip-web", || {
        let p = o.port("vip-web");
        p["node"] == "h1" && p["stats"]["attached"] == true
    });
    // (Both "hosts" share /run/netns here, so h2's old interface may linger in the namespace
    // until h1's is attached: only then is the address configured.)
    assert!(
        !vip_addr_present(&vipns, &ifname, addr),
        "the new interface has no address yet"
    );
    let (ns, v) = (vipns.clone(), vip.clone());
    let ov = api(&o, move |c| async move {
        prepare_vip_in(&c, &v, "h1", &ns, SETTLE).await
    })
    .unwrap();
    assert_eq!(
        (ov.ip, ov.prefix, ov.netns.as_str()),
        (addr, 24, vipns.as_str())
    );
    assert_eq!(ov.port.node, "h1");
    assert!(vip_addr_present(&vipns, &ifname, addr));
    wait_echo(&o, &vm, "192.0.2.50", 8080, "via-h1");
    // Moving to an unknown node is refused and leaves it where it is.
    let e = api(&o, |c| async move { c.move_port("vip-web", "h9").await }).unwrap_err();
    assert!(e.to_string().contains("h9"), "{e}");
    assert_eq!(o.port("vip-web")["node"], "h1");

    // Deleting the VIP deletes its port; the vswitch removes the interface.
    o.fabctl_ok(&["vip", "rm", "web"]);
    assert!(o.json(&["port", "show", "vip-web"]).is_none());
    o.wait("the VIP's interface to go", || {
        !link_exists(&vipns, &ifname)
    });
    // The address is free for ordinary ports again.
    o.fabctl_ok(&[
        "port",
        "create",
        "imp",
        "--net",
        "blue",
        "--node",
        "h1",
        "--kind",
        "tap",
        "--ip",
        "192.0.2.50",
    ]);
}
