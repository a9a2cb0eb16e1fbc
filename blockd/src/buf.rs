//! `AlignedBuf`: a heap buffer aligned for O_DIRECT I/O (4096 bytes), owned and `Send`,
//! so it can be handed to the io_uring engine and back without copies.
//!
//! Buffers for request data come from a small pool (`for_overwrite`): power-of-two size
//! classes, at most `POOL_BYTES` kept, so the hot path neither zeroes nor page-faults fresh
//! memory and the allocator does not hoard freed megabytes per thread.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every buffer: the largest logical block size O_DIRECT may require.
pub const ALIGN: usize = 4096;
/// Bytes of free buffers the pool keeps at most (the "cache" of the memory budget).
pub const POOL_BYTES: usize = 32 << 20;
/// Largest buffer that goes back to the pool.
const POOL_MAX_BUF: usize = 32 << 20;
const CLASSES: usize = 14; // 4 KiB .. 32 MiB

struct Pool {
    free: [Vec<NonNull<u8>>; CLASSES],
    bytes: usize,
}

// SAFETY: the pool only stores pointers to allocations nobody else references.
unsafe impl Send for Pool {}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    bytes: 0,
});

fn class_of(cap: usize) -> usize {
    (cap / ALIGN).trailing_zeros() as usize
}

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    pooled: bool,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no interior aliasing.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes (capacity rounded up to `ALIGN`).
    pub fn zeroed(len: usize) -> Self {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size (cap >= ALIGN).
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            cap,
            pooled: false,
        }
    }

    /// A buffer of `len` bytes whose contents are unspecified (earlier data of this process,
    /// or zeroes): for callers that overwrite every byte before reading any.
    pub fn for_overwrite(len: usize) -> Self {
        let cap = len.max(ALIGN).next_power_of_two();
        if cap > POOL_MAX_BUF {
            return Self::zeroed(len);
        }
        let c = class_of(cap);
        let reused = {
            let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let r = p.free[c].pop();
            if r.is_some() {
                p.bytes -= cap;
            }
            r
        };
        match reused {
            Some(ptr) => AlignedBuf {
                ptr,
                len,
                cap,
                pooled: true,
            },
            None => {
                let mut b = Self::zeroed(cap);
                b.len = len;
                b.pooled = true;
                b
            }
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity (a multiple of `ALIGN`).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the length within the capacity; new bytes are whatever the buffer held
    /// (zero for a fresh buffer).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity");
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The whole capacity as a mutable slice (for reads rounded up to a block).
    pub fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap bytes, initialised (zeroed at allocation), owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.pooled {
            let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if p.bytes + self.cap <= POOL_BYTES {
                p.bytes += self.cap;
                p.free[class_of(self.cap)].push(self.ptr);
                return;
            }
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("buffer layout");
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf(len={}, cap={})", self.len, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert!(b.iter().all(|&x| x == 0));
        let e = AlignedBuf::zeroed(0);
        assert!(e.is_empty());
        assert_eq!(e.capacity(), ALIGN);
    }

    #[test]
    fn pooled_buffers_are_reused_and_bounded() {
        let mut a = AlignedBuf::for_overwrite(5000);
        assert_eq!(a.capacity(), 8192);
        assert_eq!(a.len(), 5000);
        a[0] = 42;
        let p = a.as_ptr();
        drop(a);
        let b = AlignedBuf::for_overwrite(8000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        // Same class: normally the same allocation comes back (another test thread may
        // have taken it, so only alignment and size are guaranteed).
        let _ = p;
        assert_eq!(b.capacity(), 8192);
        let big = AlignedBuf::for_overwrite(64 << 20);
        assert_eq!(big.len(), 64 << 20);
        drop(big);
        assert!(POOL.lock().unwrap().bytes <= POOL_BYTES);
    }

    #[test]
    fn from_slice_copies() {
        let b = AlignedBuf::from_slice(b"hello");
        assert_eq!(&b[..], b"hello");
    }
}
