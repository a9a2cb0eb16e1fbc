//! The io_uring engine: one ring per chunk store, driven from the async runtime itself.
//!
//! A task submits its operation with `io_uring_enter` right where it runs (no hand-off to
//! another thread), and completions are reaped by a small task that waits for the ring's fd
//! to become readable through tokio's reactor (and opportunistically by every submitter).
//! Compared with a dedicated ring thread this saves a thread wake-up and an eventfd write per
//! operation, which is most of the difference at queue depth 1.
//!
//! Buffers and files of operations in flight are owned by the engine until the kernel is done
//! with them, so a caller that gives up (drops its future) can never leave the kernel writing
//! into freed memory; if the engine is dropped with operations still in flight their buffers
//! are leaked rather than freed.

use crate::buf::AlignedBuf;
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

/// Data handed to the kernel for a write, or filled by a read.
pub enum Buf {
    Aligned(AlignedBuf),
    Shared(Arc<AlignedBuf>),
    Vec(Vec<u8>),
}

impl Buf {
    /// The valid bytes of the buffer.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Buf::Aligned(b) => b,
            Buf::Shared(b) => b,
            Buf::Vec(v) => v,
        }
    }
    fn as_ptr(&self) -> *const u8 {
        match self {
            Buf::Aligned(b) => b.as_ptr(),
            Buf::Shared(b) => b.as_ptr(),
            Buf::Vec(v) => v.as_ptr(),
        }
    }
    fn len(&self) -> usize {
        match self {
            Buf::Aligned(b) => b.capacity(),
            Buf::Shared(b) => b.capacity(),
            Buf::Vec(v) => v.len(),
        }
    }
}

enum Kind {
    Read {
        buf: AlignedBuf,
        start: usize,
        len: u32,
        offset: u64,
    },
    Write {
        buf: Buf,
        start: usize,
        len: u32,
        offset: u64,
        dsync: bool,
    },
    Fdatasync,
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
    },
}

type Done = oneshot::Sender<(i32, Option<AlignedBuf>, Option<Buf>)>;

/// An operation the kernel owns: everything it points into stays alive here.
struct InFlight {
    _file: Arc<File>,
    read_buf: Option<AlignedBuf>,
    write_buf: Option<Buf>,
    done: Done,
}

struct Ring {
    ring: IoUring,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    inflight: usize,
}

struct RingFd(RawFd);
impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

struct Shared {
    /// Registered with the runtime on first use (the engine may be created outside one).
    /// Declared before `ring` so it is deregistered before the ring's fd closes.
    afd: OnceLock<AsyncFd<RingFd>>,
    ring: Mutex<Ring>,
    fd: RawFd,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let r = self.ring.get_mut().unwrap_or_else(|e| e.into_inner());
        if r.inflight > 0 {
            // The kernel may still write into these buffers: never free them.
            std::mem::forget(std::mem::take(&mut r.slots));
        }
    }
}

/// A handle to the ring. Share it as `Arc<Engine>`.
pub struct Engine {
    shared: Arc<Shared>,
    reaper: OnceLock<tokio::task::AbortHandle>,
    /// Serialises the first use (registering the ring fd, spawning the reaper): the first
    /// operations often start on several threads at once, and a second registration of the
    /// same fd fails with EEXIST.
    init: Mutex<()>,
}

fn reap(r: &mut Ring) -> usize {
    let mut n = 0;
    // Collect first: completing wakes tasks, which must not race with the CQ borrow.
    let done: Vec<(u64, i32)> = r
        .ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    for (ud, res) in done {
        let idx = ud as usize;
        if let Some(f) = r.slots.get_mut(idx).and_then(Option::take) {
            r.inflight -= 1;
            r.free.push(idx);
            n += 1;
            // A dropped receiver means the caller gave up; the buffers are freed here.
            let _ = f.done.send((res, f.read_buf, f.write_buf));
        }
    }
    n
}

async fn reaper(shared: Arc<Shared>) {
    let Some(afd) = shared.afd.get() else { return };
    loop {
        let mut guard = match afd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "io_uring reaper stopped");
                return;
            }
        };
        let n = reap(&mut shared.ring.lock().unwrap_or_else(|e| e.into_inner()));
        if n == 0 {
            guard.clear_ready();
        }
    }
}

fn prepare(
    file: Arc<File>,
    kind: Kind,
    done: Done,
    slot: u64,
) -> (io_uring::squeue::Entry, InFlight) {
    let fd = types::Fd(file.as_raw_fd());
    let mut inflight = InFlight {
        _file: file,
        read_buf: None,
        write_buf: None,
        done,
    };
    let entry = match kind {
        Kind::Read {
            mut buf,
            start,
            len,
            offset,
        } => {
            // SAFETY: start+len <= capacity was asserted by the caller; the buffer moves into
            // `inflight` (its heap allocation does not move) and lives until the completion.
            let ptr = unsafe { buf.as_mut_ptr().add(start) };
            inflight.read_buf = Some(buf);
            opcode::Read::new(fd, ptr, len).offset(offset).build()
        }
        Kind::Write {
            buf,
            start,
            len,
            offset,
            dsync,
        } => {
            // SAFETY: as for reads: in bounds, and the heap allocation outlives the operation.
            let ptr = unsafe { buf.as_ptr().add(start) };
            inflight.write_buf = Some(buf);
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, ptr, len)
                .offset(offset)
                .rw_flags(flags)
                .build()
        }
        Kind::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Kind::Fallocate { offset, len, mode } => opcode::Fallocate::new(fd, len)
            .offset(offset)
            .mode(mode)
            .build(),
    };
    (entry.user_data(slot), inflight)
}

impl Engine {
    /// Creates a ring with `entries` submission slots. Operations must be awaited inside a
    /// tokio runtime (the first one registers the ring with it).
    pub fn new(entries: u32) -> io::Result<Arc<Engine>> {
        let ring = IoUring::new(entries)?;
        let fd = ring.as_raw_fd();
        let shared = Arc::new(Shared {
            afd: OnceLock::new(),
            ring: Mutex::new(Ring {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                inflight: 0,
            }),
            fd,
        });
        Ok(Arc::new(Engine {
            shared,
            reaper: OnceLock::new(),
            init: Mutex::new(()),
        }))
    }

    fn start_reaper(&self) -> io::Result<()> {
        if self.reaper.get().is_some() {
            return Ok(());
        }
        let _init = self.init.lock().unwrap_or_else(|e| e.into_inner());
        if self.reaper.get().is_some() {
            return Ok(()); // another thread finished the set-up while this one waited
        }
        if self.shared.afd.get().is_none() {
            // SAFETY: the fd is the ring's, owned by `Shared.ring`, which outlives `Shared.afd`
            // (field order) and never replaces or closes it.
            let afd = unsafe {
                AsyncFd::register_with_interest(
                    RingFd(self.shared.fd),
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| e.into_parts().1)?;
            let _ = self.shared.afd.set(afd);
        }
        let h = tokio::spawn(reaper(self.shared.clone()));
        let _ = self.reaper.set(h.abort_handle()); // unset: checked under `init`
        Ok(())
    }

    async fn run_op(
        &self,
        file: &Arc<File>,
        kind: Kind,
    ) -> io::Result<(i32, Option<AlignedBuf>, Option<Buf>)> {
        self.start_reaper()?;
        let (done, rx) = oneshot::channel();
        {
            let mut r = self.shared.ring.lock().unwrap_or_else(|e| e.into_inner());
            let idx = r.free.pop().unwrap_or_else(|| {
                r.slots.push(None);
                r.slots.len() - 1
            });
            let (entry, f) = prepare(file.clone(), kind, done, idx as u64);
            r.slots[idx] = Some(f);
            r.inflight += 1;
            // SAFETY: the entry's buffers and fd are owned by slots[idx] until its completion.
            while unsafe { r.ring.submission().push(&entry) }.is_err() {
                // Queue full: hand what is queued to the kernel, make room in the CQ.
                let _ = r.ring.submit();
                reap(&mut r);
            }
            loop {
                match r.ring.submit() {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) =>
                    {
                        // Completion queue backed up: drain it and try again.
                        reap(&mut r);
                        std::thread::yield_now();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "io_uring submit failed");
                        break;
                    }
                }
            }
            reap(&mut r);
        }
        rx.await
            .map_err(|_| io::Error::other("io_uring engine stopped"))
    }
    /// Reads into `buf[start..start+len]` from `offset` until done or EOF; returns the buffer
    /// and the bytes read (less than `len` only at end of file).
    pub async fn read(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: AlignedBuf,
        start: usize,
        len: usize,
    ) -> (AlignedBuf, io::Result<usize>) {
        assert!(start + len <= buf.capacity(), "read beyond buffer");
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(1 << 30) as u32;
            let kind = Kind::Read {
                buf,
                start: start + done,
                len: chunk,
                offset: offset + done as u64,
            };
            match self.run_op(file, kind).await {
                Ok((res, Some(b), _)) => {
                    buf = b;
                    if res < 0 {
                        return (buf, Err(io::Error::from_raw_os_error(-res)));
                    }
                    if res == 0 {
                        break;
                    }
                    done += res as usize;
                }
                Ok(_) => unreachable!("read completion carries its buffer"),
                Err(e) => return (AlignedBuf::zeroed(0), Err(e)),
            }
        }
        (buf, Ok(done))
    }

    /// Writes `buf[start..start+len]` at `offset` completely (`RWF_DSYNC` with `dsync`).
    pub async fn write(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: Buf,
        start: usize,
        len: usize,
        dsync: bool,
    ) -> (Buf, io::Result<()>) {
        assert!(start + len <= buf.len(), "write beyond buffer");
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(1 << 30) as u32;
            let kind = Kind::Write {
                buf,
                start: start + done,
                len: chunk,
                offset: offset + done as u64,
                dsync,
            };
            match self.run_op(file, kind).await {
                Ok((res, _, Some(b))) => {
                    buf = b;
                    if res < 0 {
                        return (buf, Err(io::Error::from_raw_os_error(-res)));
                    }
                    if res == 0 {
                        return (
                            buf,
                            Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
                        );
                    }
                    done += res as usize;
                }
                Ok(_) => unreachable!("write completion carries its buffer"),
                Err(e) => return (Buf::Vec(Vec::new()), Err(e)),
            }
        }
        (buf, Ok(()))
    }

    /// fdatasync(2) through the ring.
    pub async fn fdatasync(&self, file: &Arc<File>) -> io::Result<()> {
        let (res, _, _) = self.run_op(file, Kind::Fdatasync).await?;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(())
    }

    /// fallocate(2) through the ring (punch holes, zero ranges).
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> io::Result<()> {
        let (res, _, _) = self
            .run_op(file, Kind::Fallocate { offset, len, mode })
            .await?;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(h) = self.reaper.get() {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_read_sync_punch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap(),
        );
        file.set_len(1 << 20).unwrap();
        let eng = Engine::new(64).unwrap();
        let data = AlignedBuf::from_slice(&[7u8; 8192]);
        let (_, r) = eng
            .write(&file, 4096, Buf::Aligned(data), 0, 8192, false)
            .await;
        r.unwrap();
        eng.fdatasync(&file).await.unwrap();
        let (buf, n) = eng
            .read(&file, 4096, AlignedBuf::zeroed(8192), 0, 8192)
            .await;
        assert_eq!(n.unwrap(), 8192);
        assert!(buf.iter().all(|&b| b == 7));
        eng.fallocate(&file, 4096, 4096, crate::sys::PUNCH_HOLE)
            .await
            .unwrap();
        let mut check = [1u8; 4096];
        file.read_exact_at(&mut check, 4096).unwrap();
        assert!(check.iter().all(|&b| b == 0));
        // Reads at EOF return what exists.
        let (_, n) = eng
            .read(&file, (1 << 20) - 100, AlignedBuf::zeroed(4096), 0, 4096)
            .await;
        assert_eq!(n.unwrap(), 100);
        // Many concurrent operations.
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let eng = eng.clone();
            let file = file.clone();
            tasks.push(tokio::spawn(async move {
                let b = AlignedBuf::from_slice(&[(i % 251) as u8; 4096]);
                let (_, r) = eng
                    .write(&file, i * 4096, Buf::Aligned(b), 0, 4096, false)
                    .await;
                r.unwrap();
                let (b, n) = eng
                    .read(&file, i * 4096, AlignedBuf::zeroed(4096), 0, 4096)
                    .await;
                assert_eq!(n.unwrap(), 4096);
                assert!(b.iter().all(|&x| x == (i % 251) as u8));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// The first operations on a fresh engine, issued at once from several worker threads,
    /// must all succeed: registering the ring with the runtime happens exactly once (a second
    /// registration of the same fd fails with EEXIST, which used to reach NBD clients as EIO).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_operations_on_a_fresh_engine() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        file.set_len(1 << 20).unwrap();
        let mut failures = Vec::new();
        for round in 0..1500 {
            let eng = Engine::new(64).unwrap();
            let start = Arc::new(tokio::sync::Barrier::new(8));
            let tasks: Vec<_> = (0..8u64)
                .map(|i| {
                    let (eng, file, start) = (eng.clone(), file.clone(), start.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        let b = AlignedBuf::from_slice(&[i as u8; 4096]);
                        let (_, r) = eng
                            .write(&file, i * 4096, Buf::Aligned(b), 0, 4096, false)
                            .await;
                        r
                    })
                })
                .collect();
            for t in tasks {
                if let Err(e) = t.await.unwrap() {
                    failures.push(format!("round {round}: {e}"));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of 12000 first writes failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }

    #[tokio::test]
    async fn errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, b"x").unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let eng = Engine::new(8).unwrap();
        let (_, r) = eng
            .write(&file, 0, Buf::Vec(vec![1; 10]), 0, 10, false)
            .await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }
}
