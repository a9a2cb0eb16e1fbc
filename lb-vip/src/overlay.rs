//! VIPs on an overlay network (issue 5): the VIP's address lives on a vswitch `tap` port of
//! its own, in a network namespace per network (`fabvip-<network>`) on the lb-vip host that
//! serves it, so VMs on the network reach it (the vswitches answer ARP for the port's IP and
//! deliver its traffic to the host) and overlapping subnets of different networks never meet.
//!
//! - Naming, pure: [`vip_port_name`], [`vip_ifname`], [`vip_mac`], [`vip_netns`].
//! - The port through the control plane: [`ensure_vip_port`] creates it, or moves it to this
//!   node (`PUT /v1/ports/{name}/node`) when another one had it. Deleting the VIP deletes it.
//! - The namespace: [`ensure_netns`] (`ip netns add`, idempotent, loopback up, non-local bind
//!   allowed so sockets can bind the VIP before its interface arrives) and
//!   [`configure_vip_addr`] (waits for the vswitch to move the tap in, then address, link up
//!   and the subnet's route).
//! - All of it at once when this node starts serving the VIP: [`prepare_vip`];
//!   [`vip_addr_present`] tells when to call it again (the interface was re-created).
//! - Sockets in the namespace from a tokio program: [`tcp_listener_in`], [`udp_socket_in`]
//!   and [`tcp_connect_in`] create the socket on a short-lived thread that entered the
//!   namespace (`setns(2)`); [`NetnsSockets`] keeps one such thread for sockets made often
//!   (backend connections). A socket keeps its namespace for life, and no runtime thread
//!   ever changes namespace.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use volume_mgr::api;
use volume_mgr::client::{Client, ClientError};

/// Prefix of the per-network VIP namespaces.
pub const NETNS_PREFIX: &str = "fabvip-";
/// Longest `ip netns` name the manager accepts (the volume name rules).
const NETNS_MAX: usize = 64;
/// Longest interface/port name (IFNAMSIZ − 1).
const IFNAME_MAX: usize = 15;

/// Why a VIP's port or namespace cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("vip {0} is on no overlay network")]
    NoNetwork(String),
    #[error("vip {vip}: address {addr} is not IPv4 (only IPv4 VIPs get an overlay port)")]
    NotIpv4 { vip: String, addr: String },
    #[error("vip {vip}: {source}")]
    Api {
        vip: String,
        #[source]
        source: ClientError,
    },
    #[error("vip {vip}: {source}")]
    Io {
        vip: String,
        #[source]
        source: io::Error,
    },
    #[error("vip {vip}: network {network} has a bad subnet {subnet:?}")]
    Subnet {
        vip: String,
        network: String,
        subnet: String,
    },
    #[error("port {port} is taken by something else than vip {vip} ({what})")]
    PortTaken {
        vip: String,
        port: String,
        what: String,
    },
}

/// FNV-1a 64 over `s`, with a domain tag so that the names and the MAC differ.
fn hash(tag: &str, s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes().chain([0]).chain(s.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The VIP's port name: `vip-<vip>` when it fits 15 characters, else `vip-` and 8 hex digits
/// of a hash of the VIP name.
pub fn vip_port_name(vip: &str) -> String {
    let plain = format!("vip-{vip}");
    if plain.len() <= IFNAME_MAX {
        plain
    } else {
        format!("vip-{:08x}", hash("port", vip) as u32)
    }
}

/// The VIP's interface name: `fv` and 8 hex digits of a hash of the VIP name (10 characters).
pub fn vip_ifname(vip: &str) -> String {
    format!("fv{:08x}", hash("ifname", vip) as u32)
}

/// The VIP's MAC: locally administered unicast `02:fb:` and 32 bits of a hash of its name.
pub fn vip_mac(vip: &str) -> String {
    let b = (hash("mac", vip) as u32).to_be_bytes();
    format!("02:fb:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// The namespace of a network's VIPs on an lb-vip host: `fabvip-<network>`, or `fabvip-` and
/// 16 hex digits of a hash when that is longer than a namespace name may be.
pub fn vip_netns(network: &str) -> String {
    vip_netns_with(NETNS_PREFIX, network)
}

/// [`vip_netns`] with another prefix (`lb-vip --overlay-netns-prefix`).
pub fn vip_netns_with(prefix: &str, network: &str) -> String {
    let plain = format!("{prefix}{network}");
    if plain.len() <= NETNS_MAX {
        plain
    } else {
        format!("{prefix}{:016x}", hash("netns", network))
    }
}

/// The VIP's IPv4 address (its `addr` without the port).
pub fn vip_ip(vip: &api::Vip) -> Result<Ipv4Addr, OverlayError> {
    match vip.addr.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) => Ok(*a.ip()),
        _ => Err(OverlayError::NotIpv4 {
            vip: vip.name.clone(),
            addr: vip.addr.clone(),
        }),
    }
}

/// Makes sure VIP `vip` (on an overlay network) has its port on `node`, in namespace
/// [`vip_netns`] of its network: creates it, or moves it here from another node. Answers the
/// port as stored. Idempotent: call it whenever this instance starts serving the VIP (and
/// again when unsure); nothing to undo when it stops (the next server moves the port,
/// deleting the VIP deletes it).
pub async fn ensure_vip_port(
    client: &Client,
    vip: &api::Vip,
    node: &str,
) -> Result<api::Port, OverlayError> {
    let net = vip
        .network
        .as_deref()
        .ok_or_else(|| OverlayError::NoNetwork(vip.name.clone()))?;
    ensure_vip_port_in(client, vip, node, &vip_netns(net)).await
}

/// [`ensure_vip_port`] with the namespace given (tests: a namespace of their own).
pub async fn ensure_vip_port_in(
    client: &Client,
    vip: &api::Vip,
    node: &str,
    netns: &str,
) -> Result<api::Port, OverlayError> {
    let net = vip
        .network
        .as_deref()
        .ok_or_else(|| OverlayError::NoNetwork(vip.name.clone()))?;
    vip_ip(vip)?;
    let api_err = |source| OverlayError::Api {
        vip: vip.name.clone(),
        source,
    };
    let name = vip_port_name(&vip.name);
    let existing = match client.get_port(&name).await {
        Ok(p) => Some(p),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(api_err(e)),
    };
    let port = match existing {
        Some(p) => p,
        None => {
            let req = api::CreatePort {
                name: name.clone(),
                network: net.to_string(),
                node: node.to_string(),
                kind: api::PortKind::Tap,
                mac: Some(vip_mac(&vip.name)),
                ip: None,
                netns: Some(netns.to_string()),
                ifname: Some(vip_ifname(&vip.name)),
                vip: Some(vip.name.clone()),
            };
            match client.create_port(&req).await {
                Ok(p) => {
                    tracing::info!(vip = %vip.name, port = %p.name, node, ip = %p.ip, netns, "vip port created");
                    return Ok(p);
                }
                // Someone (another instance, an earlier try) created it meanwhile.
                Err(ClientError::Api { status: 409, .. }) => {
                    client.get_port(&name).await.map_err(api_err)?
                }
                Err(e) => return Err(api_err(e)),
            }
        }
    };
    if port.vip.as_deref() != Some(vip.name.as_str()) {
        return Err(OverlayError::PortTaken {
            vip: vip.name.clone(),
            port: name,
            what: match &port.vip {
                Some(v) => format!("the port of vip {v}"),
                None => format!("a port of network {}", port.network),
            },
        });
    }
    if port.node == node {
        return Ok(port);
    }
    let from = port.node.clone();
    let p = client.move_port(&name, node).await.map_err(api_err)?;
    tracing::info!(vip = %vip.name, port = %p.name, from = %from, to = node, "vip port moved here");
    Ok(p)
}

/// A VIP's overlay side, ready for sockets: its port on this node, the namespace it is in,
/// and its address configured there.
#[derive(Debug, Clone)]
pub struct OverlayVip {
    pub port: api::Port,
    /// Where to create the VIP's sockets ([`tcp_listener_in`], [`udp_socket_in`]) and the
    /// sockets to its backends and health checks ([`NetnsSockets`], [`tcp_connect_in`]):
    /// backends on the overlay network are reachable from there only.
    pub netns: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

/// Everything this node does when it starts serving VIP `vip` (on an overlay network):
/// [`ensure_vip_port`] (create, or move here), [`ensure_netns`], then
/// [`configure_vip_addr`] once the vswitch has put the interface in (bounded by
/// `timeout`). Idempotent: call it again when [`vip_addr_present`] says the address went
/// (the interface was re-created, e.g. by a vswitch restart).
pub async fn prepare_vip(
    client: &Client,
    vip: &api::Vip,
    node: &str,
    timeout: Duration,
) -> Result<OverlayVip, OverlayError> {
    let net = vip
        .network
        .as_deref()
        .ok_or_else(|| OverlayError::NoNetwork(vip.name.clone()))?;
    prepare_vip_in(client, vip, node, &vip_netns(net), timeout).await
}

/// [`prepare_vip`] with the namespace given.
pub async fn prepare_vip_in(
    client: &Client,
    vip: &api::Vip,
    node: &str,
    netns: &str,
    timeout: Duration,
) -> Result<OverlayVip, OverlayError> {
    let ip = vip_ip(vip)?;
    let port = ensure_vip_port_in(client, vip, node, netns).await?;
    let network = client
        .get_network(&port.network)
        .await
        .map_err(|source| OverlayError::Api {
            vip: vip.name.clone(),
            source,
        })?;
    let prefix = volume_mgr::net::Subnet::parse(&network.subnet)
        .map_err(|_| OverlayError::Subnet {
            vip: vip.name.clone(),
            network: network.name.clone(),
            subnet: network.subnet.clone(),
        })?
        .prefix();
    let (ns, ifname) = (netns.to_string(), port.ifname.clone());
    tokio::task::spawn_blocking(move || {
        ensure_netns(&ns)?;
        configure_vip_addr(&ns, &ifname, ip, prefix, timeout)
    })
    .await
    .map_err(io::Error::other)
    .and_then(|r| r)
    .map_err(|source| OverlayError::Io {
        vip: vip.name.clone(),
        source,
    })?;
    Ok(OverlayVip {
        port,
        netns: netns.to_string(),
        ip,
        prefix,
    })
}

/// Whether `ip` is configured on `ifname` in `netns` (false when either is missing).
/// Blocking (one `ip` run).
pub fn vip_addr_present(netns: &str, ifname: &str, ip_addr: Ipv4Addr) -> bool {
    Command::new("ip")
        .args(["-n", netns, "-o", "-4", "addr", "show", "dev", ifname])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            let want = format!("inet {ip_addr}/");
            String::from_utf8_lossy(&o.stdout).contains(&want)
        })
}

// ---- namespaces ----------------------------------------------------------------------------

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `ip ARGS`; its stderr is the error.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Creates network namespace `name` (`ip netns add`) unless it exists, brings its loopback
/// up and allows non-local binds in it (sockets may bind a VIP address before its interface
/// is there). Idempotent; blocking (a few `ip` runs).
pub fn ensure_netns(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad namespace name {name:?}"),
        ));
    }
    if !netns_path(name).exists() {
        if let Err(e) = ip(&["netns", "add", name]) {
            // Lost a race with another creator: fine if it is there now.
            if !netns_path(name).exists() {
                return Err(e);
            }
        }
        tracing::info!(netns = name, "network namespace created");
    }
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    run_in_netns(name, || {
        for f in [
            "/proc/sys/net/ipv4/ip_nonlocal_bind",
            "/proc/sys/net/ipv6/ip_nonlocal_bind",
        ] {
            // (No IPv6 in the namespace: nothing to allow.)
            if let Err(e) = std::fs::write(f, "1") {
                if f.contains("ipv4") {
                    return Err(e);
                }
            }
        }
        Ok(())
    })
}

/// Whether interface `ifname` exists in namespace `netns`.
pub fn link_exists(netns: &str, ifname: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", "dev", ifname])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits (up to `timeout`, polling every 50 ms) for the vswitch to move interface `ifname`
/// into `netns`, then gives it `ip/prefix`, sets it up and routes the network's subnet
/// through it. Idempotent (call it again after the interface was re-created, e.g. when the
/// port came back to this node); blocking.
pub fn configure_vip_addr(
    netns: &str,
    ifname: &str,
    ip_addr: Ipv4Addr,
    prefix: u8,
    timeout: Duration,
) -> io::Result<()> {
    if prefix > 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("prefix /{prefix} is not an IPv4 prefix"),
        ));
    }
    let deadline = Instant::now() + timeout;
    while !link_exists(netns, ifname) {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "interface {ifname} did not appear in namespace {netns} within {timeout:?}"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    let subnet = Ipv4Addr::from(u32::from(ip_addr) & mask);
    let addr = format!("{ip_addr}/{prefix}");
    let net = format!("{subnet}/{prefix}");
    let src = ip_addr.to_string();
    ip(&["-n", netns, "addr", "replace", &addr, "dev", ifname])?;
    ip(&["-n", netns, "link", "set", ifname, "up"])?;
    ip(&[
        "-n", netns, "route", "replace", &net, "dev", ifname, "scope", "link", "src", &src,
    ])?;
    tracing::info!(netns, ifname, addr = %addr, "vip address configured");
    Ok(())
}

// ---- sockets in a namespace ----------------------------------------------------------------

/// Runs `f` on a new thread that entered network namespace `netns` (`/run/netns/<netns>`)
/// and answers its result. Sockets `f` creates belong to that namespace for life. Blocks the
/// caller for the thread's life (well under a millisecond plus `f`).
pub fn run_in_netns<T, F>(netns: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = netns.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || run_in_netns_here(&ns, f))?
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// A TCP listener bound to `addr` in namespace `netns` (std, blocking mode: for tokio set it
/// non-blocking and use `tokio::net::TcpListener::from_std`). SO_REUSEADDR as std sets it.
pub fn tcp_listener_in(netns: &str, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    run_in_netns(netns, move || std::net::TcpListener::bind(addr))
}

/// A UDP socket bound to `addr` in namespace `netns` (std, blocking mode).
pub fn udp_socket_in(netns: &str, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    run_in_netns(netns, move || std::net::UdpSocket::bind(addr))
}

/// A TCP connection to `addr` from namespace `netns`: the socket is created there (on a
/// thread of its own, not a runtime thread), the non-blocking connect is tokio's, bounded by
/// `timeout`.
pub async fn tcp_connect_in(
    netns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<tokio::net::TcpStream> {
    let ns = netns.to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // The thread only creates a socket; joining it is not needed (the answer comes by `rx`).
    std::thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || {
            let r = run_in_netns_here(&ns, || {
                if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
            });
            let _ = tx.send(r);
        })?;
    let sock = rx
        .await
        .map_err(|_| io::Error::other("the namespace thread ended without an answer"))??;
    connect_bounded(sock, addr, netns, timeout).await
}

/// Enters `netns` on the current thread and runs `f` (only for threads that end right after).
fn run_in_netns_here<T>(netns: &str, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let path = netns_path(netns);
    let ns = std::fs::File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    sys::enter_netns(&ns)
        .map_err(|e| io::Error::new(e.kind(), format!("setns {}: {e}", path.display())))?;
    f()
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that stays in one network namespace and creates sockets there on request: for
/// sockets made often (a connection to a backend per client connection), cheaper than a
/// thread each ([`tcp_connect_in`]). Cloning shares the thread; it ends when the last clone
/// goes.
#[derive(Clone)]
pub struct NetnsSockets {
    netns: String,
    jobs: std::sync::mpsc::Sender<Job>,
}

impl std::fmt::Debug for NetnsSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetnsSockets")
            .field("netns", &self.netns)
            .finish()
    }
}

impl NetnsSockets {
    /// Starts the thread and enters `netns` (an error if it cannot).
    pub fn new(netns: &str) -> io::Result<NetnsSockets> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = netns.to_string();
        std::thread::Builder::new()
            .name(format!("netns-{netns}"))
            .spawn(move || {
                let entered = (|| {
                    let path = netns_path(&ns);
                    let f = std::fs::File::open(&path).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                    sys::enter_netns(&f).map_err(|e| {
                        io::Error::new(e.kind(), format!("setns {}: {e}", path.display()))
                    })
                })();
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended"))??;
        Ok(NetnsSockets {
            netns: netns.to_string(),
            jobs,
        })
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Runs `f` on the namespace thread and answers its result (without blocking a runtime
    /// thread on the thread's work: the answer comes through a oneshot).
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("the namespace thread ended"))?;
        rx.await
            .map_err(|_| io::Error::other("the namespace thread dropped the request"))?
    }

    /// A TCP connection to `addr` from the namespace, bounded by `timeout`.
    pub async fn tcp_connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let sock = self
            .run(move || {
                if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
            })
            .await?;
        connect_bounded(sock, addr, &self.netns, timeout).await
    }

    /// A TCP listener bound to `addr` in the namespace (std, blocking mode).
    pub async fn tcp_listener(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        self.run(move || std::net::TcpListener::bind(addr)).await
    }

    /// A UDP socket bound to `addr` in the namespace (std, blocking mode).
    pub async fn udp_socket(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        self.run(move || std::net::UdpSocket::bind(addr)).await
    }
}

async fn connect_bounded(
    sock: tokio::net::TcpSocket,
    addr: SocketAddr,
    netns: &str,
    timeout: Duration,
) -> io::Result<tokio::net::TcpStream> {
    tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} in namespace {netns}: no answer within {timeout:?}"),
            )
        })?
}

mod sys {
    use std::io;
    use std::os::fd::AsRawFd;

    /// `setns(fd, CLONE_NEWNET)`: the calling thread (only it) enters the network namespace
    /// `ns` (an open `/run/netns/<name>` or `/proc/<pid>/ns/net`).
    pub fn enter_netns(ns: &std::fs::File) -> io::Result<()> {
        // SAFETY: setns takes a file descriptor (`ns` keeps it open for the call) and a flag
        // constant; it touches no memory of ours and changes only this thread's namespace.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_fit_an_interface_name() {
        assert_eq!(vip_port_name("web"), "vip-web");
        assert_eq!(vip_port_name("abcdefghijk"), "vip-abcdefghijk");
        let long = vip_port_name("a-rather-long-vip-name");
        assert_eq!(long.len(), 12);
        assert!(long.starts_with("vip-"), "{long}");
        assert_ne!(long, vip_port_name("a-rather-long-vip-namf"));
        assert_eq!(long, vip_port_name("a-rather-long-vip-name"));
        for v in ["a", "web", "a-rather-long-vip-name", &"x".repeat(64)] {
            let n = vip_port_name(v);
            volume_mgr::net::check_port_name(&n).unwrap();
            let i = vip_ifname(v);
            assert_eq!(i.len(), 10);
            assert!(i.starts_with("fv"));
            volume_mgr::net::check_ifname(&i).unwrap();
        }
        assert_ne!(vip_ifname("web"), vip_ifname("web2"));
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let m = vip_mac("web");
        assert_eq!(m, vip_mac("web"));
        assert_ne!(m, vip_mac("web2"));
        assert!(m.starts_with("02:fb:"), "{m}");
        let parsed = volume_mgr::net::Mac::parse_port(&m).unwrap();
        assert_eq!(parsed.0[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(parsed.to_string().to_lowercase(), m);
    }

    #[test]
    fn netns_names_fit_the_name_rules() {
        assert_eq!(vip_netns("blue"), "fabvip-blue");
        let long = "n".repeat(64);
        let ns = vip_netns(&long);
        assert_eq!(ns.len(), NETNS_PREFIX.len() + 16);
        assert_ne!(ns, vip_netns(&"m".repeat(64)));
        for n in ["blue", long.as_str()] {
            volume_mgr::api::validate_volume_name(&vip_netns(n)).unwrap();
        }
    }

    #[test]
    fn vip_ips_are_ipv4_only() {
        let mut v: api::Vip = serde_json::from_value(serde_json::json!({
            "name": "web", "addr": "192.0.2.10:80", "proto": "tcp", "network": "blue",
            "algo": "rr", "persist_secs": 0, "drain_secs": 30,
            "check": {"kind": "tcp"}, "proxy_protocol": false, "maglev_table_size": 65537,
            "created_ms": 0
        }))
        .unwrap();
        assert_eq!(vip_ip(&v).unwrap(), Ipv4Addr::new(192, 0, 2, 10));
        v.addr = "[2001:db8::1]:80".into();
        assert!(matches!(vip_ip(&v), Err(OverlayError::NotIpv4 { .. })));
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(ensure_netns("").is_err());
        assert!(ensure_netns("a/b").is_err());
        assert!(configure_vip_addr("x", "y", Ipv4Addr::LOCALHOST, 33, Duration::ZERO).is_err());
        let e = run_in_netns("fabric-no-such-namespace-here", || Ok(())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
