//! The underlay: UDP sockets on the host's underlay address that carry VXLAN datagrams.
//!
//! - One receive socket bound to `ip:port` (4789) with a big kernel buffer, read in batches
//!   with `recvmmsg`, with UDP GRO on (`UDP_GRO`): the kernel may hand us several datagrams
//!   of one flow coalesced in one buffer with their segment size in a cmsg; [`RecvBatch`]
//!   splits them back, so callers only ever see single datagrams.
//! - A pool of send sockets bound to `ip:0`, each with its own ephemeral source port, chosen
//!   by `flow_hash % n`: the outer UDP source port follows the inner flow (RFC 7348 §5; what
//!   Linux's VXLAN does), which spreads flows over the receivers' RSS queues and ECMP paths.
//! - UDP GSO (`UDP_SEGMENT`) for a run of equal-size datagrams to one destination (the
//!   segments of one TSO frame): one sendmsg, segmented by the kernel (or the NIC). If the
//!   kernel refuses, each datagram is sent on its own.

use crate::sys::{self, MsgMeta};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Kernel buffer sizes asked for (`SO_*BUFFORCE`, falling back to the capped `SO_*BUF`).
const SOCKET_BUF: i32 = 8 << 20;
/// One receive slot: the largest UDP payload GRO can coalesce (64 KiB).
const SLOT: usize = 65_536;
/// Most segments in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on older
/// kernels, 128 on newer).
const MAX_GSO_SEGMENTS: usize = 64;
/// Largest UDP payload of one IPv4 datagram (and so of one GSO send).
const MAX_UDP_PAYLOAD: usize = 65_507;

/// Receive buffers for [`Underlay::recv_batch`]: up to `count` receive slots of 64 KiB.
/// Iterating yields `(source, datagram)` for every datagram received, GRO-coalesced ones
/// split back apart.
#[derive(Debug)]
pub struct RecvBatch {
    buf: Vec<u8>,
    meta: Vec<MsgMeta>,
    filled: usize,
}

impl RecvBatch {
    /// Room for `count` (at least 1) messages; each takes a 64 KiB slot.
    pub fn new(count: usize) -> RecvBatch {
        let count = count.max(1);
        RecvBatch {
            buf: vec![0u8; count * SLOT],
            meta: vec![MsgMeta::default(); count],
            filled: 0,
        }
    }

    /// Messages (buffers) in the last batch; with GRO one message may hold many datagrams.
    pub fn messages(&self) -> usize {
        self.filled
    }

    /// No messages in the last batch.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Messages of the last batch dropped because they were cut short (never expected:
    /// slots are as big as a UDP datagram).
    pub fn truncated(&self) -> usize {
        self.meta[..self.filled]
            .iter()
            .filter(|m| m.truncated)
            .count()
    }

    /// The datagrams of the last batch, in order.
    pub fn iter(&self) -> RecvIter<'_> {
        RecvIter {
            batch: self,
            msg: 0,
            off: 0,
        }
    }
}

impl<'a> IntoIterator for &'a RecvBatch {
    type Item = (SocketAddrV4, &'a [u8]);
    type IntoIter = RecvIter<'a>;
    fn into_iter(self) -> RecvIter<'a> {
        self.iter()
    }
}

/// Iterator over the datagrams of a [`RecvBatch`].
#[derive(Debug)]
pub struct RecvIter<'a> {
    batch: &'a RecvBatch,
    msg: usize,
    off: usize,
}

impl<'a> Iterator for RecvIter<'a> {
    type Item = (SocketAddrV4, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        while self.msg < self.batch.filled {
            let m = self.batch.meta[self.msg];
            let data = &self.batch.buf[self.msg * SLOT..self.msg * SLOT + m.len];
            let src = match m.src {
                Some(src) if !m.truncated && self.off < data.len() => src,
                _ => {
                    // Empty, truncated or not IPv4: nothing (more) to yield from it.
                    self.msg += 1;
                    self.off = 0;
                    continue;
                }
            };
            let seg = m.gro_size.map(usize::from).unwrap_or(data.len());
            let end = data.len().min(self.off + seg);
            let d = &data[self.off..end];
            self.off = end;
            return Some((src, d));
        }
        None
    }
}

/// The underlay sockets; see the module documentation.
#[derive(Debug)]
pub struct Underlay {
    rx: UdpSocket,
    tx: Vec<UdpSocket>,
    local: SocketAddrV4,
    gro: bool,
    gso: AtomicBool,
}

fn big_buffers(sock: &std::net::UdpSocket) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if sys::setsockopt_int(sock, libc::SOL_SOCKET, force, SOCKET_BUF).is_err() {
            // Without CAP_NET_ADMIN: as much as net.core.[rw]mem_max allows.
            let _ = sys::setsockopt_int(sock, libc::SOL_SOCKET, plain, SOCKET_BUF);
        }
    }
}

fn bind(addr: SocketAddrV4) -> io::Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    big_buffers(&s);
    Ok(s)
}

impl Underlay {
    /// Binds the receive socket to `ip:port` and `tx_sockets` (at least 1) send sockets to
    /// `ip:0`. Must be called from within a tokio runtime.
    pub fn bind(ip: Ipv4Addr, port: u16, tx_sockets: usize) -> io::Result<Underlay> {
        let rx = bind(SocketAddrV4::new(ip, port))?;
        let local = match rx.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => return Err(io::Error::other("bound to IPv6")),
        };
        let gro = match sys::setsockopt_int(&rx, libc::SOL_UDP, libc::UDP_GRO, 1) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(error = %e, "UDP GRO not available on the underlay socket");
                false
            }
        };
        let tx = (0..tx_sockets.max(1))
            .map(|_| bind(SocketAddrV4::new(ip, 0)).and_then(UdpSocket::from_std))
            .collect::<io::Result<Vec<_>>>()?;
        tracing::info!(%local, tx_sockets = tx.len(), gro, "underlay bound");
        Ok(Underlay {
            rx: UdpSocket::from_std(rx)?,
            tx,
            local,
            gro,
            gso: AtomicBool::new(true),
        })
    }

    /// The receive socket's address (with the actual port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Source ports of the send sockets, in pool order (`hash % n` picks one).
    pub fn tx_ports(&self) -> Vec<u16> {
        self.tx
            .iter()
            .filter_map(|s| s.local_addr().ok().map(|a| a.port()))
            .collect()
    }

    /// Is UDP GRO on for the receive socket?
    pub fn gro_enabled(&self) -> bool {
        self.gro
    }

    /// Is UDP GSO used by [`Underlay::send_gso`]? (Turned off for good once the kernel says
    /// it does not support it.)
    pub fn gso_enabled(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Turns UDP GSO on or off (for benchmarks and tests of the fallback).
    pub fn set_gso(&self, on: bool) {
        self.gso.store(on, Ordering::Relaxed);
    }

    /// Waits for at least one datagram, then takes as many as are queued and fit in `batch`
    /// (one recvmmsg). Replaces the previous contents of `batch`.
    pub async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        batch.filled = 0;
        let n = self
            .rx
            .async_io(Interest::READABLE, || {
                sys::recvmmsg(&self.rx, &mut batch.buf, SLOT, &mut batch.meta)
            })
            .await?;
        batch.filled = n;
        Ok(())
    }

    /// Like [`Underlay::recv_batch`] without waiting: `WouldBlock` if nothing is queued.
    pub fn try_recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        batch.filled = 0;
        let n = self.rx.try_io(Interest::READABLE, || {
            sys::recvmmsg(&self.rx, &mut batch.buf, SLOT, &mut batch.meta)
        })?;
        batch.filled = n;
        Ok(())
    }

    fn tx_for(&self, hash: u32) -> &UdpSocket {
        &self.tx[hash as usize % self.tx.len()]
    }

    /// Sends one datagram to `dst` from the send socket that `hash` (the inner flow's)
    /// picks.
    pub async fn send(&self, hash: u32, dst: SocketAddrV4, datagram: &[u8]) -> io::Result<()> {
        let sock = self.tx_for(hash);
        sock.async_io(Interest::WRITABLE, || {
            sys::sendmsg_v4(sock, dst, datagram, None)
        })
        .await?;
        Ok(())
    }

    /// Sends `datagrams` — consecutive datagrams of `seg_size` bytes each, the last one
    /// possibly shorter — to `dst` from the socket `hash` picks, with UDP GSO (one syscall
    /// per up to 64 datagrams). When the kernel refuses GSO, sends them one by one.
    pub async fn send_gso(
        &self,
        hash: u32,
        dst: SocketAddrV4,
        datagrams: &[u8],
        seg_size: u16,
    ) -> io::Result<()> {
        let seg = usize::from(seg_size);
        if seg == 0 || seg > MAX_UDP_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("GSO segment size {seg}"),
            ));
        }
        let sock = self.tx_for(hash);
        let per_send = (MAX_UDP_PAYLOAD / seg).clamp(1, MAX_GSO_SEGMENTS) * seg;
        for run in datagrams.chunks(per_send) {
            if run.len() > seg && self.gso_enabled() {
                let r = sock
                    .async_io(Interest::WRITABLE, || {
                        sys::sendmsg_v4(sock, dst, run, Some(seg_size))
                    })
                    .await;
                match r {
                    Ok(_) => continue,
                    Err(e) => match e.raw_os_error() {
                        // No UDP GSO in this kernel, or the device cannot checksum: for good.
                        Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EIO) => {
                            tracing::warn!(error = %e, "UDP GSO refused; sending datagrams one by one");
                            self.set_gso(false);
                        }
                        // This send only (e.g. segments bigger than the path MTU).
                        Some(libc::EINVAL) => {}
                        _ => return Err(e),
                    },
                }
            }
            for d in run.chunks(seg) {
                sock.async_io(Interest::WRITABLE, || sys::sendmsg_v4(sock, dst, d, None))
                    .await?;
            }
        }
        Ok(())
    }
}

/// MTU of the interface that holds `ip` (the underlay MTU; the overlay's default is 50 less).
pub fn interface_mtu(ip: Ipv4Addr) -> io::Result<u32> {
    let names = sys::interfaces_with_ipv4(ip)?;
    let name = names.first().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface holds address {ip}"),
        )
    })?;
    sys::if_mtu(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;
    use tokio::time::timeout;

    const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

    fn pair() -> (Underlay, Underlay) {
        (
            Underlay::bind(LO, 0, 4).unwrap(),
            Underlay::bind(LO, 0, 4).unwrap(),
        )
    }

    /// Receives until `want` datagrams came (or 5 s), returning (source, datagram) pairs.
    async fn collect(u: &Underlay, want: usize) -> Vec<(SocketAddrV4, Vec<u8>)> {
        let mut batch = RecvBatch::new(8);
        let mut got = Vec::new();
        timeout(Duration::from_secs(5), async {
            while got.len() < want {
                u.recv_batch(&mut batch).await.unwrap();
                assert!(!batch.is_empty());
                assert_eq!(batch.truncated(), 0);
                got.extend(batch.iter().map(|(s, d)| (s, d.to_vec())));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("only {} of {want} datagrams arrived", got.len()));
        got
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    #[tokio::test]
    async fn exchange_batches_both_ways() {
        let (a, b) = pair();
        assert_ne!(a.local_addr().port(), 0);
        for i in 0..20 {
            a.send(7, b.local_addr(), &datagram(i, 100 + i))
                .await
                .unwrap();
        }
        let got = collect(&b, 20).await;
        assert_eq!(got.len(), 20);
        for (i, (src, d)) in got.iter().enumerate() {
            assert_eq!(*d, datagram(i, 100 + i), "datagram {i} intact and in order");
            assert_eq!(*src.ip(), LO);
            assert_eq!(src.port(), a.tx_ports()[7 % 4]);
        }
        b.send(1, a.local_addr(), b"back").await.unwrap();
        let got = collect(&a, 1).await;
        assert_eq!(got[0].1, b"back");
        let mut batch = RecvBatch::new(2);
        let e = a.try_recv_batch(&mut batch).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(batch.is_empty() && batch.iter().next().is_none());
    }

    #[tokio::test]
    async fn source_port_follows_the_hash() {
        let (a, b) = pair();
        let ports: HashSet<u16> = a.tx_ports().into_iter().collect();
        assert_eq!(ports.len(), 4, "four distinct ephemeral ports");
        for hash in 0..8u32 {
            a.send(hash, b.local_addr(), &hash.to_be_bytes())
                .await
                .unwrap();
        }
        let got = collect(&b, 8).await;
        let mut seen = HashSet::new();
        for (src, d) in got {
            let hash = u32::from_be_bytes(d.try_into().unwrap());
            assert_eq!(src.port(), a.tx_ports()[hash as usize % 4], "hash {hash}");
            seen.insert(src.port());
        }
        assert_eq!(seen, ports);
        // The same hash always leaves from the same port.
        assert_eq!(
            a.tx_for(5).local_addr().unwrap(),
            a.tx_for(9).local_addr().unwrap()
        );
    }

    /// 10 datagrams of 1000 bytes and a last one of 123, one GSO send.
    fn gso_run() -> Vec<u8> {
        let mut run = Vec::new();
        for i in 0..10 {
            run.extend_from_slice(&datagram(i, 1000));
        }
        run.extend_from_slice(&datagram(10, 123));
        run
    }

    fn check_run(got: &[(SocketAddrV4, Vec<u8>)]) {
        assert_eq!(got.len(), 11);
        for (i, (_, d)) in got.iter().enumerate() {
            let len = if i < 10 { 1000 } else { 123 };
            assert_eq!(*d, datagram(i, len), "datagram {i}");
        }
    }

    #[tokio::test]
    async fn gso_send_arrives_as_separate_datagrams() {
        let (a, b) = pair();
        assert!(a.gso_enabled());
        a.send_gso(3, b.local_addr(), &gso_run(), 1000)
            .await
            .unwrap();
        assert!(a.gso_enabled(), "the kernel took it");
        // Through our receive path (which may get them GRO-coalesced and splits them)...
        check_run(&collect(&b, 11).await);

        // ...and as a plain socket without GRO sees them: eleven separate datagrams.
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let dst = match plain.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        a.send_gso(3, dst, &gso_run(), 1000).await.unwrap();
        let mut buf = [0u8; 65536];
        let mut got = Vec::new();
        for _ in 0..11 {
            let (n, src) = plain.recv_from(&mut buf).unwrap();
            assert_eq!(src.port(), a.tx_ports()[3]);
            got.push((dst, buf[..n].to_vec()));
        }
        check_run(&got);
    }

    #[tokio::test]
    async fn gro_coalesced_buffers_are_split() {
        let (a, b) = pair();
        if !b.gro_enabled() {
            eprintln!("UDP GRO unavailable in this kernel; splitting not exercised");
            return;
        }
        // Over loopback a GSO send reaches a GRO socket as one buffer: check that it did.
        a.send_gso(0, b.local_addr(), &gso_run(), 1000)
            .await
            .unwrap();
        let mut batch = RecvBatch::new(4);
        let mut got = Vec::new();
        let mut messages = 0;
        timeout(Duration::from_secs(5), async {
            while got.len() < 11 {
                b.recv_batch(&mut batch).await.unwrap();
                messages += batch.messages();
                got.extend(batch.iter().map(|(s, d)| (s, d.to_vec())));
            }
        })
        .await
        .unwrap();
        check_run(&got);
        assert!(
            messages < 11,
            "expected coalescing, got {messages} messages"
        );
    }

    #[tokio::test]
    async fn large_runs_and_the_fallback() {
        let (a, b) = pair();
        // 150 datagrams of 1400 bytes: more than one GSO send (64 segments each).
        let mut run = Vec::new();
        for i in 0..150 {
            run.extend_from_slice(&datagram(i, 1400));
        }
        a.send_gso(1, b.local_addr(), &run, 1400).await.unwrap();
        let got = collect(&b, 150).await;
        for (i, (_, d)) in got.iter().enumerate() {
            assert_eq!(*d, datagram(i, 1400), "datagram {i}");
        }
        // With GSO off the same call sends one datagram at a time.
        a.set_gso(false);
        a.send_gso(1, b.local_addr(), &gso_run(), 1000)
            .await
            .unwrap();
        let got = collect(&b, 11).await;
        check_run(&got);
        // Bad segment sizes are refused, not sent.
        assert!(a.send_gso(1, b.local_addr(), &run, 0).await.is_err());
        // One datagram shorter than the segment size is just sent.
        a.set_gso(true);
        a.send_gso(1, b.local_addr(), b"short", 1000).await.unwrap();
        assert_eq!(collect(&b, 1).await[0].1, b"short");
    }

    #[test]
    fn mtu_of_the_interface_holding_an_address() {
        assert_eq!(interface_mtu(LO).unwrap(), 65536);
        let e = interface_mtu(Ipv4Addr::new(198, 18, 255, 254)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn recv_batch_iteration_skips_bad_messages() {
        let mut b = RecvBatch::new(3);
        let src = SocketAddrV4::new(LO, 9);
        b.buf[..5].copy_from_slice(b"hello");
        b.meta[0] = MsgMeta {
            len: 5,
            src: Some(src),
            gro_size: Some(2),
            truncated: false,
        };
        b.meta[1] = MsgMeta {
            len: 4,
            src: Some(src),
            gro_size: None,
            truncated: true,
        };
        b.buf[2 * SLOT..2 * SLOT + 3].copy_from_slice(b"abc");
        b.meta[2] = MsgMeta {
            len: 3,
            src: None,
            gro_size: None,
            truncated: false,
        };
        b.filled = 3;
        let got: Vec<&[u8]> = b.iter().map(|(_, d)| d).collect();
        assert_eq!(got, vec![&b"he"[..], b"ll", b"o"]);
        assert_eq!(b.truncated(), 1);
        assert_eq!(b.messages(), 3);
    }
}
