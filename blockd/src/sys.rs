//! The few raw syscalls blockd needs that std does not wrap. Every `unsafe` block of the
//! crate outside `buf.rs` lives here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE`: deallocate a range, reads give zeroes.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
/// `FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE`: zero a range, keeping it allocated.
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_ZERO_RANGE;

/// A non-blocking eventfd (used to wake the io_uring thread).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant flags; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd counter.
pub fn eventfd_signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an fd we own; failure (EAGAIN when the counter
    // would overflow) only means a wake-up is already pending.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

/// fallocate(2) on a file or block device.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own; arguments are integers.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub fn block_device_size(file: &File) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}
