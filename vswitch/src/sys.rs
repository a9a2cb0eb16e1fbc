//! The raw syscalls and ioctls of vswitch's I/O layer. Every `unsafe` block of the crate lives
//! here, each with a `// SAFETY:` comment; the modules above (`tap`, `packet`, `underlay`)
//! only see safe functions over `OwnedFd`s and slices.
//!
//! We call the tun ioctls directly (through `libc`) instead of using a tun crate: `tun-tap`
//! sits on tokio-core 0.1 and has no `IFF_VNET_HDR`, and `tun-rs` would bring its own device
//! abstraction, address management and async wrappers for the four ioctls we need
//! (`TUNSETIFF`, `TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`, plus interface MTU/MAC/flags); the
//! same ifreq helpers serve AF_PACKET ports, and tokio's `AsyncFd` over the raw fd is the
//! whole async story.

use std::ffi::CStr;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Checks an interface name the way the kernel will (`dev_valid_name`): 1..=15 bytes, no
/// NUL, `/`, `:` or whitespace, not `.` or `..`.
pub fn check_ifname(name: &str) -> io::Result<()> {
    let bad = name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace());
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    Ok(())
}

/// A zeroed `ifreq` carrying `name`.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    check_ifname(name)?;
    // SAFETY: ifreq is plain old data (integers, arrays and a union of such); all-zero is a
    // valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Takes ownership of a descriptor a syscall just returned (or its error).
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A throwaway socket for interface ioctls (SIOCGIFMTU and friends).
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the result is checked by `owned`.
    owned(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
}

/// Opens `/dev/net/tun` (non-blocking, close-on-exec) and attaches it to interface `name`
/// with `flags` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`…), creating the interface if there is
/// none of that name. Returns the fd; the interface lives until it is closed.
pub fn tun_open(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let mut req = ifreq(name)?;
    // SAFETY: the path is a NUL-terminated literal; the result is checked by `owned`.
    let fd = owned(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back the chosen name into) the ifreq, which is a
    // live local of the right type.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    })?;
    Ok(fd)
}

/// `TUNSETVNETHDRSZ`: size of the virtio-net header on reads and writes.
pub fn tun_set_vnet_hdr_size(fd: &OwnedFd, size: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, a live local.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &size as *const libc::c_int,
        )
    })?;
    Ok(())
}

/// `TUNSETOFFLOAD`: the offloads (`TUN_F_*`) we accept in frames read from the device.
pub fn tun_set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long); no memory is
    // touched.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) })?;
    Ok(())
}

/// Index of interface `name` in this thread's network namespace, if there is one.
pub fn if_index(name: &str) -> Option<u32> {
    check_ifname(name).ok()?;
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// MTU of interface `name`.
pub fn if_mtu(name: &str) -> io::Result<u32> {
    let mut req = ifreq(name)?;
    let s = ctl_socket()?;
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into the ifreq, a live local.
    cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCGIFMTU,
            &mut req as *mut libc::ifreq,
        )
    })?;
    // SAFETY: after a successful SIOCGIFMTU the union holds ifru_mtu.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Sets the MTU of interface `name`.
pub fn if_set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = i32::try_from(mtu)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "MTU out of range"))?;
    let s = ctl_socket()?;
    // SAFETY: SIOCSIFMTU reads the ifreq, a live local of the right type.
    cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCSIFMTU,
            &mut req as *mut libc::ifreq,
        )
    })?;
    Ok(())
}

/// Sets the Ethernet address of interface `name`.
pub fn if_set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: sockaddr is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr = unsafe { mem::zeroed() };
    sa.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in sa.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = sa;
    let s = ctl_socket()?;
    // SAFETY: SIOCSIFHWADDR reads the ifreq, a live local of the right type.
    cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCSIFHWADDR,
            &mut req as *mut libc::ifreq,
        )
    })?;
    Ok(())
}

/// Brings interface `name` up (keeping its other flags).
pub fn if_set_up(name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    let s = ctl_socket()?;
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into the ifreq.
    cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            &mut req as *mut libc::ifreq,
        )
    })?;
    // SAFETY: after a successful SIOCGIFFLAGS the union holds ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq, a live local of the right type.
    cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            &mut req as *mut libc::ifreq,
        )
    })?;
    Ok(())
}

/// Names of the interfaces that hold IPv4 address `ip` (usually one).
pub fn interfaces_with_ipv4(ip: Ipv4Addr) -> io::Result<Vec<String>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `list`, which we free below.
    cvt(unsafe { libc::getifaddrs(&mut list) })?;
    let mut names = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: cur is a non-null node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points at a sockaddr owned by the list.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if family == libc::AF_INET as libc::sa_family_t {
                // SAFETY: an AF_INET address is a sockaddr_in; the list owns it.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == ip {
                    // SAFETY: ifa_name is a NUL-terminated string owned by the list.
                    let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
                    names.push(name.to_string_lossy().into_owned());
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: list came from getifaddrs and is freed exactly once; no reference into it
    // survives (names were copied).
    unsafe { libc::freeifaddrs(list) };
    Ok(names)
}

/// Registers an owned fd with the tokio reactor (readable and writable). Must be called from
/// within a tokio runtime.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    use tokio::io::Interest;
    // SAFETY: an OwnedFd holds a valid open descriptor, closes it only when dropped (after
    // the AsyncFd deregistered it) and always returns the same one from as_raw_fd.
    Ok(unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            fd,
            Interest::READABLE | Interest::WRITABLE,
        )
    }?)
}

/// read(2).
pub fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: writes at most buf.len() bytes into buf, which is live and exclusively borrowed.
    cvt_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// write(2).
pub fn write(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: reads at most buf.len() bytes from buf, which is live.
    cvt_size(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

/// readv(2).
pub fn readv(fd: &OwnedFd, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
    let n = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: IoSliceMut is ABI-compatible with struct iovec (std guarantees it on Unix);
    // each describes a live, exclusively borrowed buffer.
    cvt_size(unsafe { libc::readv(fd.as_raw_fd(), bufs.as_mut_ptr().cast(), n) })
}

/// writev(2).
pub fn writev(fd: &OwnedFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let n = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: IoSlice is ABI-compatible with struct iovec; each describes a live buffer.
    cvt_size(unsafe { libc::writev(fd.as_raw_fd(), bufs.as_ptr().cast(), n) })
}

/// An AF_PACKET raw socket for all protocols (non-blocking, close-on-exec), not yet bound.
pub fn packet_socket() -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    // SAFETY: plain syscall with constant arguments; the result is checked by `owned`.
    owned(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            proto,
        )
    })
}

/// Binds an AF_PACKET socket to interface `ifindex`, all protocols.
pub fn packet_bind(fd: &OwnedFd, ifindex: u32) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    // SAFETY: the address points at a live sockaddr_ll and the length is its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// setsockopt(2) with an int value.
pub fn setsockopt_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value points at a live c_int and the length is its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// getsockopt(2) of an int value.
pub fn getsockopt_int(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals; the kernel writes at most `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// What recvmmsg reported for one message.
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgMeta {
    /// Bytes received into the slot.
    pub len: usize,
    /// Sender (None if it was not IPv4).
    pub src: Option<SocketAddrV4>,
    /// UDP GRO segment size: the slot holds several datagrams of this size (the last may be
    /// shorter).
    pub gro_size: Option<u16>,
    /// The message did not fit the slot (MSG_TRUNC); its data is incomplete.
    pub truncated: bool,
}

/// Control buffer per message: room for one UDP_GRO cmsg (an int) and then some, aligned
/// for cmsghdr.
type CmsgBuf = [u64; 8];

fn sockaddr_v4(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

/// recvmmsg(2) without waiting: receives up to `meta.len()` datagrams, the i-th into
/// `buf[i * slot..(i + 1) * slot]`, and describes each in `meta[i]` (with its UDP GRO
/// segment size, if any). Returns how many arrived; `WouldBlock` if none.
pub fn recvmmsg(
    fd: &impl AsRawFd,
    buf: &mut [u8],
    slot: usize,
    meta: &mut [MsgMeta],
) -> io::Result<usize> {
    if slot == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "zero slot size",
        ));
    }
    let count = meta.len().min(buf.len() / slot).min(1024);
    if count == 0 {
        return Ok(0);
    }
    let mut iovs: Vec<libc::iovec> = buf
        .chunks_exact_mut(slot)
        .take(count)
        .map(|c| libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: c.len(),
        })
        .collect();
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { mem::zeroed() }; count];
    let mut cmsgs: Vec<CmsgBuf> = vec![[0u64; 8]; count];
    let mut msgs: Vec<libc::mmsghdr> = (0..count)
        .map(|i| {
            // SAFETY: mmsghdr is plain old data; all-zero is valid (null pointers, zero
            // lengths), and every field that matters is set below.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = cmsgs[i].as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = mem::size_of::<CmsgBuf>();
            m
        })
        .collect();
    // SAFETY: every mmsghdr points at live, exclusively borrowed storage (addrs, iovs and
    // their slots of buf, cmsgs) that outlives the call and is not moved during it; vlen is
    // the length of msgs.
    let n = cvt(unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    })? as usize;
    for i in 0..n.min(count) {
        let m = &msgs[i];
        let mut gro = None;
        // SAFETY: msg_hdr was filled by the kernel; CMSG_FIRSTHDR/NXTHDR stay within
        // msg_controllen bytes of cmsgs[i], which is live and aligned for cmsghdr.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                    gro = u16::try_from(v).ok().filter(|&s| s > 0);
                }
                c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
            }
        }
        let from_v4 = addrs[i].sin_family == libc::AF_INET as libc::sa_family_t;
        meta[i] = MsgMeta {
            len: (m.msg_len as usize).min(slot),
            src: from_v4.then(|| sockaddr_v4(&addrs[i])),
            gro_size: gro,
            truncated: m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    Ok(n.min(count))
}

/// sendmsg(2) of `data` to `dst` without waiting; with `gso_size`, as a UDP GSO send
/// (`UDP_SEGMENT` cmsg): the kernel cuts `data` into datagrams of that size.
pub fn sendmsg_v4(
    fd: &impl AsRawFd,
    dst: SocketAddrV4,
    data: &[u8],
    gso_size: Option<u16>,
) -> io::Result<usize> {
    let mut sa = sockaddr_in(dst);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cmsg: CmsgBuf = [0u64; 8];
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&mut sa as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(size) = gso_size {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic on a constant size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as usize;
        // SAFETY: msg_control points at `cmsg`, which is live, aligned for cmsghdr and
        // larger than CMSG_SPACE(2); CMSG_FIRSTHDR is non-null because msg_controllen is at
        // least one cmsghdr, and the u16 written at CMSG_DATA lies within that space.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, size);
        }
    }
    // SAFETY: msg points at live locals (sa, iov, cmsg) and at data, which outlive the call;
    // the kernel only reads the iovec's buffer.
    cvt_size(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules() {
        for ok in ["eth0", "tap-web1", "a", "fifteen-chars-x"] {
            check_ifname(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-chars-xx",
            "a/b",
            "a b",
            "a:0",
            "a\0b",
        ] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
            assert_eq!(if_index(bad), None);
            assert!(if_mtu(bad).is_err());
        }
    }

    #[test]
    fn loopback_lookups() {
        let lo = if_index("lo").expect("lo exists");
        assert!(lo > 0);
        assert_eq!(if_mtu("lo").unwrap(), 65536);
        assert_eq!(
            interfaces_with_ipv4(Ipv4Addr::LOCALHOST).unwrap(),
            vec!["lo"]
        );
        assert!(interfaces_with_ipv4(Ipv4Addr::new(192, 0, 2, 250))
            .unwrap()
            .is_empty());
        assert_eq!(if_index("nosuchif0"), None);
        assert_eq!(
            if_mtu("nosuchif0").unwrap_err().raw_os_error(),
            Some(libc::ENODEV)
        );
    }

    #[test]
    fn recvmmsg_rejects_zero_slot_and_empty_batches() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut meta = [MsgMeta::default(); 2];
        assert!(recvmmsg(&s, &mut [0u8; 16], 0, &mut meta).is_err());
        assert_eq!(recvmmsg(&s, &mut [0u8; 4], 8, &mut meta).unwrap(), 0);
        let e = recvmmsg(&s, &mut [0u8; 16], 8, &mut meta).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
