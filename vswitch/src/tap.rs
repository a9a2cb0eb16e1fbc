//! `tap` ports: a tap device that vswitch creates and owns. The fd side is ours (every read
//! and write carries a 12-byte virtio-net header, see [`crate::vnet`]); the interface side is
//! the VM's NIC, or the NIC of a network namespace standing in for one.
//!
//! Decision: no tun crate. We do not use `tun-tap` (tokio-core 0.1, no `IFF_VNET_HDR`) nor
//! `tun-rs`: what we need is four ioctls (`TUNSETIFF` with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, `TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`, and the interface MTU/MAC/flags
//! ioctls), which live in [`crate::sys`], plus tokio's `AsyncFd` over the fd.
//!
//! Offloads: `TUNSETOFFLOAD` with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN`, so
//! the interface side sends us TSO frames of up to 64 KiB with a GSO header and partial
//! checksums (`NEEDS_CSUM`); frames we write may carry a GSO header too (the kernel segments
//! them if the interface side wants it).
//!
//! Namespaces: the device is created in vswitch's namespace (where the fd stays), given its
//! MTU and MAC there, then moved with `ip link set dev X netns NS` and brought up with
//! `ip -n NS link set dev X up` (iproute2 is a dependency of the deployment anyway, and it
//! saves us setns-based netlink). The tap is not persistent: closing the fd (dropping the
//! [`Tap`]) deletes the interface, in whichever namespace it is.

use crate::sys;
use crate::vnet::VnetHdr;
use std::io;
use std::os::fd::OwnedFd;
use std::process::Command;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A tap device with IFF_VNET_HDR and TSO offloads; see the module documentation.
#[derive(Debug)]
pub struct Tap {
    fd: AsyncFd<OwnedFd>,
    name: String,
    netns: Option<String>,
}

/// Runs `ip ARGS`, returning stdout, or an error carrying ip's one-line complaint.
fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(io::Error::other(format!("ip {}: {msg}", args.join(" "))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `ip -n NS` prefix, or nothing for vswitch's own namespace.
fn ns_args(netns: Option<&str>) -> Vec<&str> {
    match netns {
        Some(ns) => vec!["-n", ns],
        None => Vec::new(),
    }
}

/// The link kind (`info_kind`, e.g. "tun", "veth"; "" for kindless devices such as
/// physical NICs or lo) of interface `name` in `netns`, or None if there is no such
/// interface.
fn link_kind(name: &str, netns: Option<&str>) -> io::Result<Option<String>> {
    if netns.is_none() && sys::if_index(name).is_none() {
        return Ok(None);
    }
    let mut args = ns_args(netns);
    args.extend(["-d", "-j", "link", "show", "dev", name]);
    let out = Command::new("ip").args(&args).output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("does not exist") {
            return Ok(None);
        }
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            err.trim()
        )));
    }
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| io::Error::other(format!("ip -j link show: {e}")))?;
    let kind = links
        .get(0)
        .and_then(|l| l.get("linkinfo"))
        .and_then(|l| l.get("info_kind"))
        .and_then(|k| k.as_str())
        .unwrap_or("");
    Ok(Some(kind.to_string()))
}

/// Deletes a leftover tun/tap device called `name` in `netns` (a persistent tap, or one
/// another process still holds); refuses to touch an interface of any other kind.
fn remove_stale(name: &str, netns: Option<&str>) -> io::Result<()> {
    match link_kind(name, netns)? {
        None => Ok(()),
        Some(kind) if kind == "tun" => {
            tracing::info!(ifname = name, netns, "deleting a leftover tap device");
            let mut args = ns_args(netns);
            args.extend(["link", "del", "dev", name]);
            ip(&args).map(drop)
        }
        Some(kind) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "interface {name} already exists{} and is not a tap (kind {kind:?})",
                netns.map(|n| format!(" in netns {n}")).unwrap_or_default()
            ),
        )),
    }
}

impl Tap {
    /// Creates tap `ifname` with interface MTU `mtu` and MAC `mac` (the VM's: the interface
    /// side carries the port's address), moves its interface into the named `ip netns`
    /// namespace `netns` if given, and brings it up. A leftover tap of that name (in
    /// vswitch's namespace or in `netns`; e.g. after a daemon restart) is deleted and
    /// recreated; an interface of that name of another kind is an `AlreadyExists` error.
    ///
    /// Blocking (ioctls and, with `netns`, two or three runs of `ip`); must be called from
    /// within a tokio runtime (the fd is registered with its reactor).
    pub fn create(ifname: &str, mtu: u32, mac: [u8; 6], netns: Option<&str>) -> io::Result<Tap> {
        sys::check_ifname(ifname)?;
        remove_stale(ifname, None)?;
        if netns.is_some() {
            remove_stale(ifname, netns)?;
        }
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let fd = sys::tun_open(ifname, flags)?;
        sys::tun_set_vnet_hdr_size(&fd, VnetHdr::LEN as libc::c_int)?;
        sys::tun_set_offload(
            &fd,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN,
        )?;
        sys::if_set_mtu(ifname, mtu)?;
        sys::if_set_mac(ifname, mac)?;
        match netns {
            Some(ns) => {
                ip(&["link", "set", "dev", ifname, "netns", ns])?;
                ip(&["-n", ns, "link", "set", "dev", ifname, "up"])?;
            }
            None => sys::if_set_up(ifname)?,
        }
        let fd = sys::async_fd(fd)?;
        tracing::info!(ifname, mtu, netns, "tap created");
        Ok(Tap {
            fd,
            name: ifname.to_string(),
            netns: netns.map(str::to_string),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace the interface side lives in (None: vswitch's own).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Receives one frame sent by the interface side: `buf` gets a [`VnetHdr`] and the
    /// Ethernet frame; returns their total length. `buf` should hold [`crate::vnet::BUF_LEN`]
    /// bytes (a longer frame is truncated). Errors for which [`crate::packet::is_gone`] is
    /// true mean the interface was deleted under us.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        check_buf(buf.len())?;
        loop {
            let mut guard = self.fd.ready(Interest::READABLE | Interest::ERROR).await?;
            match guard.try_io(|fd| sys::read(fd.get_ref(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Like [`Tap::recv`] without waiting: `WouldBlock` when nothing is queued. After one
    /// `recv`, call this until `WouldBlock` to take a whole batch.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        check_buf(buf.len())?;
        self.fd.try_io(Interest::READABLE, |fd| sys::read(fd, buf))
    }

    /// Delivers one frame to the interface side: `buf` is a [`VnetHdr`] followed by the
    /// Ethernet frame (a GSO header is fine: the kernel segments if it has to).
    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        check_buf(buf.len())?;
        loop {
            let mut guard = self.fd.ready(Interest::WRITABLE | Interest::ERROR).await?;
            match guard.try_io(|fd| sys::write(fd.get_ref(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Like [`Tap::send`] without waiting.
    pub fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        check_buf(buf.len())?;
        self.fd.try_io(Interest::WRITABLE, |fd| sys::write(fd, buf))
    }
}

fn check_buf(len: usize) -> io::Result<()> {
    if len < VnetHdr::LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "buffer shorter than the virtio-net header",
        ));
    }
    Ok(())
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Closing the fd (AsyncFd's drop) deletes the non-persistent device.
        tracing::info!(ifname = %self.name, netns = ?self.netns, "tap closed");
    }
}

/// Network namespaces and names for the I/O tests of this crate.
#[cfg(test)]
pub(crate) mod testns {
    use std::process::{Command, Output};
    use std::sync::atomic::{AtomicU32, Ordering};

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A name unique to this process and call: `{prefix}{pid}x{n}`, at most 15 bytes.
    pub fn unique(prefix: &str) -> String {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{}x{n}", std::process::id());
        assert!(name.len() < 16, "{name} too long for an interface name");
        name
    }

    /// Runs a command, panicking with its stderr if it fails.
    pub fn run(cmd: &str, args: &[&str]) -> Output {
        let out = Command::new(cmd).args(args).output().expect("spawn");
        assert!(
            out.status.success(),
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A named network namespace (`ip netns add`), deleted on drop. It has only lo and what
    /// a test puts in it: no route to the outside.
    pub struct NetNs(pub String);

    impl NetNs {
        pub fn new() -> NetNs {
            let name = format!("fabvs-{}", unique("n"));
            run("ip", &["netns", "add", &name]);
            let ns = NetNs(name);
            ns.ip(&["link", "set", "lo", "up"]);
            ns
        }

        pub fn name(&self) -> &str {
            &self.0
        }

        /// `ip -n NS ARGS`.
        pub fn ip(&self, args: &[&str]) -> Output {
            let mut a = vec!["-n", self.0.as_str()];
            a.extend_from_slice(args);
            run("ip", &a)
        }

        /// `ip netns exec NS ARGS` as a tokio child (not waited for).
        pub fn spawn(&self, args: &[&str]) -> tokio::process::Child {
            tokio::process::Command::new("ip")
                .args(["netns", "exec", &self.0])
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn ip netns exec")
        }

        /// `ip -j link show dev NAME` in the namespace, or None if there is no such link.
        pub fn link(&self, name: &str) -> Option<serde_json::Value> {
            let out = Command::new("ip")
                .args(["-n", &self.0, "-j", "link", "show", "dev", name])
                .output()
                .expect("spawn ip");
            if !out.status.success() {
                return None;
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v.get(0).cloned()
        }
    }

    impl Drop for NetNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// Deletes interface NAME of vswitch's namespace on drop (for veths a test creates).
    pub struct LinkGuard(pub String);

    impl Drop for LinkGuard {
        fn drop(&mut self) {
            if crate::sys::if_index(&self.0).is_some() {
                let _ = Command::new("ip")
                    .args(["link", "del", "dev", &self.0])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }

    pub fn mac_str(mac: [u8; 6]) -> String {
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

#[cfg(test)]
mod tests {
    use super::testns::*;
    use super::*;
    use crate::vnet::{testing, BUF_LEN};
    use std::time::Duration;
    use tokio::time::timeout;

    const VM_MAC: [u8; 6] = [0x02, 0xfa, 0xb0, 0, 0, 0x01];
    const PEER_MAC: [u8; 6] = [0x02, 0xfa, 0xb0, 0, 0, 0x02];
    const PEER_IP: [u8; 4] = [192, 0, 2, 2];
    const VM_IP: [u8; 4] = [192, 0, 2, 1];

    fn with_hdr(frame: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; VnetHdr::LEN];
        VnetHdr::NONE.emit(&mut b).unwrap();
        b.extend_from_slice(frame);
        b
    }

    /// Answers ARP and ICMP echo for PEER_IP on `tap` until `ping` exits; returns ping's
    /// output and (ARP replies, echo replies) sent.
    async fn answer_pings(
        tap: &Tap,
        ping: tokio::process::Child,
    ) -> (std::process::Output, usize, usize) {
        let mut buf = vec![0u8; BUF_LEN];
        let (mut arps, mut echoes) = (0, 0);
        let wait = ping.wait_with_output();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                out = &mut wait => return (out.unwrap(), arps, echoes),
                n = tap.recv(&mut buf) => {
                    let n = n.unwrap();
                    assert!(n >= VnetHdr::LEN);
                    let frame = &buf[VnetHdr::LEN..n];
                    if let Some(r) = testing::arp_reply(frame, PEER_MAC, PEER_IP) {
                        arps += 1;
                        tap.send(&with_hdr(&r)).await.unwrap();
                    } else if let Some(r) = testing::icmp_echo_reply(frame, PEER_IP) {
                        echoes += 1;
                        tap.send(&with_hdr(&r)).await.unwrap();
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn ping_through_a_tap_in_a_namespace() {
        let ns = NetNs::new();
        let name = unique("vt");
        let tap = Tap::create(&name, 1400, VM_MAC, Some(ns.name())).unwrap();
        assert_eq!(tap.name(), name);
        assert_eq!(tap.netns(), Some(ns.name()));
        assert_eq!(sys::if_index(&name), None, "moved out of our namespace");
        let link = ns.link(&name).expect("tap in the namespace");
        assert_eq!(link["mtu"], 1400);
        assert_eq!(link["address"], mac_str(VM_MAC));
        assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"));

        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &name]);
        let ping = ns.spawn(&[
            "busybox",
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-w",
            "10",
            "192.0.2.2",
        ]);
        let (out, arps, echoes) = timeout(Duration::from_secs(20), answer_pings(&tap, ping))
            .await
            .expect("ping finishes");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ping: {stdout}");
        assert!(stdout.contains("3 packets received"), "{stdout}");
        assert!(arps >= 1, "the kernel resolved the peer through us");
        assert_eq!(echoes, 3);
        // Nothing left queued that would block a batch loop.
        let mut buf = vec![0u8; BUF_LEN];
        while tap.try_recv(&mut buf).is_ok() {}
        assert_eq!(
            tap.try_recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[tokio::test]
    async fn tso_frames_from_the_namespace_segment_into_valid_frames() {
        const MTU: usize = 1400;
        let ns = NetNs::new();
        let name = unique("vt");
        let tap = Tap::create(&name, MTU as u32, VM_MAC, Some(ns.name())).unwrap();
        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &name]);
        ns.ip(&[
            "neigh",
            "add",
            "192.0.2.2",
            "lladdr",
            &mac_str(PEER_MAC),
            "dev",
            &name,
            "nud",
            "permanent",
        ]);
        const BYTES: usize = 400_000;
        let client = ns.spawn(&[
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/192.0.2.2/5001 && head -c {BYTES} /dev/zero >&3"),
        ]);
        let mut sink = testing::TcpSink::new(PEER_MAC, PEER_IP, 5001);
        let mut buf = vec![0u8; BUF_LEN];
        let run = async {
            while !(sink.fin && sink.bytes == BYTES) {
                let n = tap.recv(&mut buf).await.unwrap();
                for r in sink.handle(&buf[..n], MTU) {
                    tap.send(&with_hdr(&r)).await.unwrap();
                }
            }
        };
        timeout(Duration::from_secs(30), run)
            .await
            .unwrap_or_else(|_| panic!("stream incomplete: {} bytes", sink.bytes));
        eprintln!(
            "{} bytes: {} GSO frames, largest {} bytes, {} segments",
            sink.bytes, sink.gso_frames, sink.largest, sink.segments
        );
        let out = client.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sink.bytes, BYTES);
        assert!(sink.gso_frames > 0, "no GSO frames");
        assert!(
            sink.largest > MTU + 14,
            "largest frame {} bytes",
            sink.largest
        );
        assert!(
            sink.segments > BYTES / (MTU - 40),
            "segments {}",
            sink.segments
        );
    }

    /// The other direction: a GSO frame we write (one 3000-byte TCP segment with
    /// `gso_size` 1000 and a partial checksum) is taken whole by the namespace's TCP stack.
    #[tokio::test]
    async fn gso_frames_we_send_reach_the_namespace_stack() {
        use crate::vnet::{F_NEEDS_CSUM, GSO_TCPV4};
        let ns = NetNs::new();
        let name = unique("vt");
        let tap = Tap::create(&name, 1500, VM_MAC, Some(ns.name())).unwrap();
        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &name]);
        ns.ip(&[
            "neigh",
            "add",
            "192.0.2.2",
            "lladdr",
            &mac_str(PEER_MAC),
            "dev",
            &name,
            "nud",
            "permanent",
        ]);
        let server = ns.spawn(&["busybox", "nc", "-l", "-p", "5002"]);
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let frame_to_vm = |tcp_hdr: Vec<u8>, data: &[u8]| {
            with_hdr(&testing::tcp4_frame(
                VM_MAC, PEER_MAC, PEER_IP, VM_IP, tcp_hdr, data,
            ))
        };
        let mut buf = vec![0u8; BUF_LEN];
        // Handshake: SYN (repeated until nc listens), SYN-ACK, ACK.
        let server_seq = timeout(Duration::from_secs(10), async {
            loop {
                let mut syn = testing::tcp(40000, 5002, 5000, 0, 0x02, 65535);
                syn[12] = 0x60;
                syn.extend_from_slice(&[2, 4, 0x05, 0xb4]);
                tap.send(&frame_to_vm(syn, &[])).await.unwrap();
                let deadline = tokio::time::sleep(Duration::from_millis(200));
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        n = tap.recv(&mut buf) => {
                            let f = &buf[VnetHdr::LEN..n.unwrap()];
                            if f.len() >= 54 && f[12..14] == [8, 0] && f[23] == 6
                                && f[36..38] == 40000u16.to_be_bytes() && f[47] == 0x12 {
                                return u32::from_be_bytes(f[38..42].try_into().unwrap()) + 1;
                            }
                        }
                    }
                }
            }
        })
        .await
        .expect("SYN-ACK from the namespace");
        let ack = testing::tcp(40000, 5002, 5001, server_seq, 0x10, 65535);
        tap.send(&frame_to_vm(ack, &[])).await.unwrap();

        // One GSO frame: full checksums computed, then the TCP one replaced by the partial
        // (pseudo-header) sum, as a kernel would hand it out.
        let data = testing::tcp(40000, 5002, 5001, server_seq, 0x18, 65535);
        let mut gso = frame_to_vm(data, &payload);
        let f = &mut gso[VnetHdr::LEN..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&PEER_IP);
        pseudo.extend_from_slice(&VM_IP);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        f[50..52].copy_from_slice(&testing::rfc1071(&[&pseudo]).to_be_bytes());
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
        .emit(&mut gso)
        .unwrap();
        assert!(gso.len() > 1500 + 14 + VnetHdr::LEN);
        tap.send(&gso).await.unwrap();

        // The namespace acknowledges all 3000 bytes.
        timeout(Duration::from_secs(10), async {
            loop {
                let n = tap.recv(&mut buf).await.unwrap();
                let f = &buf[VnetHdr::LEN..n];
                if f.len() >= 54 && f[12..14] == [8, 0] && f[23] == 6 && f[47] & 0x10 != 0 {
                    let acked = u32::from_be_bytes(f[42..46].try_into().unwrap());
                    if acked == 5001 + 3000 {
                        return;
                    }
                }
            }
        })
        .await
        .expect("the namespace acknowledged the GSO frame's 3000 bytes");
        let fin = testing::tcp(40000, 5002, 8001, server_seq, 0x11, 65535);
        tap.send(&frame_to_vm(fin, &[])).await.unwrap();
        let out = timeout(Duration::from_secs(10), server.wait_with_output())
            .await
            .expect("nc exits")
            .unwrap();
        assert_eq!(out.stdout, payload, "nc received the payload in order");
    }

    #[tokio::test]
    async fn deleted_namespace_is_recognised() {
        let ns = NetNs::new();
        let name = unique("vt");
        let tap = Tap::create(&name, 1500, VM_MAC, Some(ns.name())).unwrap();
        let mut buf = vec![0u8; BUF_LEN];
        let err = timeout(Duration::from_secs(10), async {
            let ns = ns;
            let deleter = async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(ns);
                std::future::pending::<()>().await
            };
            tokio::pin!(deleter);
            loop {
                tokio::select! {
                    _ = &mut deleter => unreachable!(),
                    r = tap.recv(&mut buf) => match r {
                        Ok(_) => continue, // IPv6 chatter from the namespace side
                        Err(e) => return e,
                    },
                }
            }
        })
        .await
        .expect("recv wakes up when the namespace goes");
        assert!(crate::packet::is_gone(&err), "{err}");
        let err = tap.send(&with_hdr(&[0u8; 60])).await.unwrap_err();
        assert!(crate::packet::is_gone(&err), "{err}");
    }

    #[tokio::test]
    async fn drop_deletes_the_interface() {
        let ns = NetNs::new();
        let name = unique("vt");
        let tap = Tap::create(&name, 1500, VM_MAC, Some(ns.name())).unwrap();
        assert!(ns.link(&name).is_some());
        drop(tap);
        assert!(ns.link(&name).is_none(), "gone with the fd");

        // Without a namespace the interface stays in ours.
        let name = unique("vt");
        let tap = Tap::create(&name, 1500, VM_MAC, None).unwrap();
        assert!(sys::if_index(&name).is_some());
        assert_eq!(sys::if_mtu(&name).unwrap(), 1500);
        drop(tap);
        assert_eq!(sys::if_index(&name), None);
    }

    #[tokio::test]
    async fn leftover_taps_are_replaced_other_interfaces_refused() {
        let ns = NetNs::new();
        // A persistent tap of the same name in the target namespace (and one in ours).
        let name = unique("vt");
        ns.ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let tap = Tap::create(&name, 1450, VM_MAC, Some(ns.name())).unwrap();
        assert_eq!(ns.link(&name).unwrap()["mtu"], 1450);
        drop(tap);
        assert!(
            ns.link(&name).is_none(),
            "the replacement is not persistent"
        );

        let name = unique("vt");
        let _guard = LinkGuard(name.clone());
        run("ip", &["tuntap", "add", "dev", &name, "mode", "tap"]);
        let tap = Tap::create(&name, 1450, VM_MAC, Some(ns.name())).unwrap();
        assert!(ns.link(&name).is_some());
        assert_eq!(sys::if_index(&name), None);
        drop(tap);

        // A veth of that name is somebody else's: refused, and left alone.
        let name = unique("vt");
        let peer = unique("vp");
        ns.ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
        let err = Tap::create(&name, 1450, VM_MAC, Some(ns.name())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(ns.link(&name).is_some());
        // So is lo in our namespace.
        let err = Tap::create("lo", 1450, VM_MAC, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
    }

    #[tokio::test]
    async fn bad_arguments_are_errors() {
        assert!(Tap::create("", 1500, VM_MAC, None).is_err());
        assert!(Tap::create("much-too-long-name", 1500, VM_MAC, None).is_err());
        let name = unique("vt");
        // Multicast MAC, MTU too small, unknown namespace: errors, no interface left behind.
        // Closing the fd unregisters the device, which the kernel may finish a moment later.
        let gone = |name: &str| {
            (0..100).any(|_| {
                let gone = sys::if_index(name).is_none();
                if !gone {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                gone
            })
        };
        assert!(Tap::create(&name, 1500, [0x01, 0, 0, 0, 0, 1], None).is_err());
        assert!(gone(&name));
        assert!(Tap::create(&name, 10, VM_MAC, None).is_err());
        assert!(gone(&name));
        assert!(Tap::create(&name, 1500, VM_MAC, Some("fabvs-no-such-ns")).is_err());
        assert!(gone(&name));
        let tap = Tap::create(&name, 1500, VM_MAC, None).unwrap();
        let mut short = [0u8; 4];
        assert!(tap.try_recv(&mut short).is_err());
        assert!(tap.send(&short).await.is_err());
    }
}
