//! `netdev` ports: an interface someone else created (typically the tap QEMU or libvirt made
//! for a VM's NIC), attached through an AF_PACKET socket the way Open vSwitch's userspace
//! datapath does it:
//! - `SOCK_RAW`, bound to the interface's ifindex for all protocols (`ETH_P_ALL`); the socket
//!   is created with protocol 0 and only starts receiving at `bind`, so no frame of another
//!   interface slips in between;
//! - `PACKET_VNET_HDR_SZ` = 12 (Linux 6.2+; before that `PACKET_VNET_HDR`, whose 10-byte
//!   header we map into the 12-byte layout with readv/writev), so the VM's TSO frames arrive
//!   whole with a GSO header, exactly like a [`crate::tap::Tap`]'s, and ours may leave whole;
//! - `PACKET_IGNORE_OUTGOING`: we don't read back our own transmissions (nor what the host
//!   stack sends out of the interface);
//! - `PACKET_QDISC_BYPASS`: our frames go straight to the device's transmit, as a tap write
//!   would.
//!
//! Frames the VM sends may have `NEEDS_CSUM` set: completing the checksum is the caller's
//! job ([`crate::vnet::complete_checksum`]), as is segmentation.
//!
//! When the interface vanishes (QEMU exits) the kernel unbinds the socket: the next receive
//! fails with `ENETDOWN` and sends fail with `ENXIO`; [`is_gone`] recognises those, and the
//! daemon polls [`ifindex`] to attach again when the interface comes back.

use crate::sys;
use crate::vnet::VnetHdr;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::OwnedFd;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Kernel receive buffer asked for (`SO_RCVBUFFORCE`, falling back to `SO_RCVBUF`).
const RCVBUF: i32 = 4 << 20;

/// Did this error from a [`PacketPort`] (or a [`crate::tap::Tap`]) mean the interface is
/// gone (deleted, its namespace destroyed, or set down) rather than a passing failure? The
/// port is then dead: drop it and open a new one when [`ifindex`] finds the interface again.
pub fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETDOWN | libc::ENODEV | libc::ENXIO | libc::EBADFD)
    )
}

/// Index of interface `name` in vswitch's namespace, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    sys::if_index(name)
}

/// An AF_PACKET socket attached to one interface; see the module documentation.
#[derive(Debug)]
pub struct PacketPort {
    fd: AsyncFd<OwnedFd>,
    name: String,
    ifindex: u32,
    /// The kernel has only the 10-byte header: map it into our 12-byte layout.
    short_hdr: bool,
}

impl PacketPort {
    /// Attaches to interface `ifname`: sets its MTU (if given), brings it up, and binds a
    /// packet socket to it. An interface that does not exist is an error with
    /// [`is_gone`] true (`ENODEV`). Blocking (a few ioctls); must be called from within a
    /// tokio runtime.
    pub fn open(ifname: &str, mtu: Option<u32>) -> io::Result<PacketPort> {
        Self::open_with(ifname, mtu, true)
    }

    /// [`PacketPort::open`], optionally without trying the 12-byte header (to test the
    /// fallback of older kernels).
    fn open_with(ifname: &str, mtu: Option<u32>, try_hdr_sz: bool) -> io::Result<PacketPort> {
        sys::check_ifname(ifname)?;
        let ifindex =
            sys::if_index(ifname).ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        if let Some(mtu) = mtu {
            sys::if_set_mtu(ifname, mtu)?;
        }
        sys::if_set_up(ifname)?;
        let fd = sys::packet_socket()?;
        let hdr_sz = if try_hdr_sz {
            sys::setsockopt_int(
                &fd,
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR_SZ,
                VnetHdr::LEN as i32,
            )
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOPROTOOPT))
        };
        let short_hdr = match hdr_sz {
            Ok(()) => false,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EINVAL)) => {
                sys::setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
                true
            }
            Err(e) => return Err(e),
        };
        sys::setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
        sys::setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)?;
        if sys::setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF).is_err() {
            sys::setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF)?;
        }
        sys::packet_bind(&fd, ifindex)?;
        let fd = sys::async_fd(fd)?;
        tracing::info!(ifname, ifindex, mtu, short_hdr, "netdev port attached");
        Ok(PacketPort {
            fd,
            name: ifname.to_string(),
            ifindex,
            short_hdr,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index it was opened with (a new interface of the same name gets a new
    /// one).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Receives one frame the interface received (sent by the VM): `buf` gets a
    /// [`VnetHdr`] and the Ethernet frame; returns their total length. `buf` should hold
    /// [`crate::vnet::BUF_LEN`] bytes (a longer frame is truncated).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        check_buf(buf.len())?;
        loop {
            // ERROR too: a vanished interface only raises EPOLLERR.
            let mut guard = self.fd.ready(Interest::READABLE | Interest::ERROR).await?;
            match guard.try_io(|fd| self.read(fd.get_ref(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Like [`PacketPort::recv`] without waiting: `WouldBlock` when nothing is queued.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        check_buf(buf.len())?;
        self.fd.try_io(Interest::READABLE, |fd| self.read(fd, buf))
    }

    /// Transmits one frame on the interface (to the VM): `buf` is a [`VnetHdr`] followed by
    /// the Ethernet frame (a GSO header is fine).
    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        check_buf(buf.len())?;
        loop {
            let mut guard = self.fd.ready(Interest::WRITABLE | Interest::ERROR).await?;
            match guard.try_io(|fd| self.write(fd.get_ref(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Like [`PacketPort::send`] without waiting.
    pub fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        check_buf(buf.len())?;
        self.fd.try_io(Interest::WRITABLE, |fd| self.write(fd, buf))
    }

    fn read(&self, fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
        if !self.short_hdr {
            return sys::read(fd, buf);
        }
        let (hdr, rest) = buf.split_at_mut(10);
        let (num_buffers, frame) = rest.split_at_mut(2);
        let n = sys::readv(fd, &mut [IoSliceMut::new(hdr), IoSliceMut::new(frame)])?;
        num_buffers.fill(0);
        Ok(n + 2)
    }

    fn write(&self, fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
        if !self.short_hdr {
            return sys::write(fd, buf);
        }
        let n = sys::writev(fd, &[IoSlice::new(&buf[..10]), IoSlice::new(&buf[12..])])?;
        Ok(if n >= 10 { n + 2 } else { n })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::testns::*;
    use crate::vnet::{testing, BUF_LEN};
    use std::time::Duration;
    use tokio::time::timeout;

    const PEER_MAC: [u8; 6] = [0x02, 0xfa, 0xb1, 0, 0, 0x02];
    const PEER_IP: [u8; 4] = [192, 0, 2, 2];

    fn with_hdr(frame: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; VnetHdr::LEN];
        b.extend_from_slice(frame);
        b
    }

    /// A veth pair: `outer` in our namespace (the "netdev" we attach to), `inner` in a fresh
    /// namespace with 192.0.2.1/24 and MTU `mtu`.
    struct Veth {
        // Dropped first: delete our end before the namespace goes.
        _guard: LinkGuard,
        ns: NetNs,
        outer: String,
        inner: String,
    }

    fn veth(mtu: u32) -> Veth {
        let ns = NetNs::new();
        let outer = unique("po");
        let inner = unique("pi");
        run(
            "ip",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ],
        );
        let guard = LinkGuard(outer.clone());
        run("ip", &["link", "set", "dev", &inner, "netns", ns.name()]);
        let mtu = mtu.to_string();
        ns.ip(&["link", "set", "dev", &inner, "mtu", &mtu, "up"]);
        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", &inner]);
        Veth {
            _guard: guard,
            ns,
            outer,
            inner,
        }
    }

    #[tokio::test]
    async fn exchange_frames_with_a_namespace_over_veth() {
        let v = veth(1500);
        let port = PacketPort::open(&v.outer, Some(1500)).unwrap();
        assert_eq!(port.name(), v.outer);
        assert_eq!(Some(port.ifindex()), ifindex(&v.outer));
        let ping = v.ns.spawn(&[
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
        let wait = ping.wait_with_output();
        tokio::pin!(wait);
        let mut buf = vec![0u8; BUF_LEN];
        let (mut arps, mut echoes) = (0, 0);
        let out = timeout(Duration::from_secs(20), async {
            loop {
                tokio::select! {
                    out = &mut wait => return out.unwrap(),
                    n = port.recv(&mut buf) => {
                        let n = n.unwrap();
                        let frame = &buf[VnetHdr::LEN..n];
                        // Our own replies are never read back (PACKET_IGNORE_OUTGOING).
                        assert_ne!(&frame[6..12], &PEER_MAC, "read back our own frame");
                        if let Some(r) = testing::arp_reply(frame, PEER_MAC, PEER_IP) {
                            arps += 1;
                            port.send(&with_hdr(&r)).await.unwrap();
                        } else if let Some(r) = testing::icmp_echo_reply(frame, PEER_IP) {
                            echoes += 1;
                            port.send(&with_hdr(&r)).await.unwrap();
                        }
                    }
                }
            }
        })
        .await
        .expect("ping finishes");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("3 packets received"), "{stdout}");
        assert!(arps >= 1);
        assert_eq!(echoes, 3);
    }

    #[tokio::test]
    async fn tso_frames_arrive_whole_and_segment_into_valid_frames() {
        tso_stream(true).await;
    }

    /// The same through the 10-byte header of kernels before 6.2, mapped to 12 bytes.
    #[tokio::test]
    async fn tso_frames_with_the_short_header_fallback() {
        tso_stream(false).await;
    }

    async fn tso_stream(try_hdr_sz: bool) {
        const MTU: usize = 1400;
        let v = veth(MTU as u32);
        let port = PacketPort::open_with(&v.outer, Some(MTU as u32), try_hdr_sz).unwrap();
        assert_eq!(port.short_hdr, !try_hdr_sz);
        v.ns.ip(&[
            "neigh",
            "add",
            "192.0.2.2",
            "lladdr",
            &mac_str(PEER_MAC),
            "dev",
            &v.inner,
            "nud",
            "permanent",
        ]);
        const BYTES: usize = 400_000;
        let client = v.ns.spawn(&[
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/192.0.2.2/5001 && head -c {BYTES} /dev/zero >&3"),
        ]);
        let mut sink = testing::TcpSink::new(PEER_MAC, PEER_IP, 5001);
        let mut buf = vec![0u8; BUF_LEN];
        let run = async {
            while !(sink.fin && sink.bytes == BYTES) {
                let n = port.recv(&mut buf).await.unwrap();
                for r in sink.handle(&buf[..n], MTU) {
                    port.send(&with_hdr(&r)).await.unwrap();
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
        assert!(sink.gso_frames > 0, "no GSO frames");
        assert!(
            sink.largest > MTU + 14,
            "largest frame {} bytes",
            sink.largest
        );
    }

    #[tokio::test]
    async fn vanished_interface_is_recognised() {
        let v = veth(1500);
        let port = PacketPort::open(&v.outer, None).unwrap();
        let outer = v.outer.clone();
        let mut buf = vec![0u8; BUF_LEN];
        let deleter = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            run("ip", &["link", "del", "dev", &outer]);
        });
        // A receive that is waiting when the interface goes wakes up with an error.
        let err = timeout(Duration::from_secs(10), async {
            loop {
                match port.recv(&mut buf).await {
                    Ok(_) => continue, // IPv6 chatter from the namespace side
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("recv wakes up");
        deleter.await.unwrap();
        assert!(is_gone(&err), "{err}");
        let err = port.send(&with_hdr(&[0u8; 60])).await.unwrap_err();
        assert!(is_gone(&err), "{err}");
        assert_eq!(ifindex(&v.outer), None);
        let err = PacketPort::open(&v.outer, None).unwrap_err();
        assert!(is_gone(&err), "{err}");
        assert!(!is_gone(&io::Error::from(io::ErrorKind::WouldBlock)));
    }

    #[tokio::test]
    async fn bad_arguments_are_errors() {
        assert!(PacketPort::open("", None).is_err());
        assert!(PacketPort::open("a/b", None).is_err());
        let v = veth(1500);
        assert!(
            PacketPort::open(&v.outer, Some(10)).is_err(),
            "MTU below the minimum"
        );
        let port = PacketPort::open(&v.outer, None).unwrap();
        assert!(port.try_recv(&mut [0u8; 11]).is_err());
        assert!(port.try_send(&[0u8; 11]).is_err());
    }
}
