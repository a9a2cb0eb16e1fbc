//! The io_uring engine: one thread owns a ring and runs every disk operation of the process;
//! async callers hand it operations through a channel and await a oneshot completion.
//!
//! The thread sleeps in `io_uring_enter` waiting for completions. New work wakes it through an
//! eventfd whose read is always armed on the ring, but only when the thread is actually asleep
//! (a `sleeping` flag), so a busy ring costs no extra syscall per operation. Buffers and files
//! of operations in flight are owned by the engine until the kernel is done with them, so a
//! caller that gives up (drops its future) can never leave the kernel writing into freed memory.

use crate::buf::AlignedBuf;
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
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

struct Op {
    file: Arc<File>,
    kind: Kind,
    done: oneshot::Sender<(i32, Option<AlignedBuf>, Option<Buf>)>,
}

struct Shared {
    sleeping: AtomicBool,
    wake: OwnedFd,
}

/// A handle to the engine thread. Cheap to share (`Arc<Engine>`); the thread stops when the
/// last handle is dropped and every operation in flight has completed.
pub struct Engine {
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
}

const WAKE: u64 = u64::MAX;

impl Engine {
    /// Starts the engine thread with a ring of `entries` submission slots.
    pub fn new(entries: u32) -> io::Result<Arc<Engine>> {
        let ring = IoUring::new(entries)?;
        let shared = Arc::new(Shared {
            sleeping: AtomicBool::new(false),
            wake: crate::sys::eventfd()?,
        });
        let (tx, rx) = mpsc::channel();
        let s2 = shared.clone();
        std::thread::Builder::new()
            .name("blockd-uring".into())
            .spawn(move || run(ring, rx, s2))?;
        Ok(Arc::new(Engine { tx, shared }))
    }

    fn submit(&self, op: Op) -> io::Result<()> {
        self.tx
            .send(op)
            .map_err(|_| io::Error::other("io_uring engine stopped"))?;
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            crate::sys::eventfd_signal(&self.shared.wake);
        }
        Ok(())
    }

    async fn run_op(
        &self,
        file: &Arc<File>,
        kind: Kind,
    ) -> io::Result<(i32, Option<AlignedBuf>, Option<Buf>)> {
        let (done, rx) = oneshot::channel();
        self.submit(Op {
            file: file.clone(),
            kind,
            done,
        })?;
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
        // The channel closes with the sender; make sure a sleeping thread notices.
        crate::sys::eventfd_signal(&self.shared.wake);
    }
}

/// An operation the kernel owns: everything it points into stays alive here.
struct InFlight {
    _file: Arc<File>,
    read_buf: Option<AlignedBuf>,
    write_buf: Option<Buf>,
    done: oneshot::Sender<(i32, Option<AlignedBuf>, Option<Buf>)>,
}

fn prepare(op: Op, slot: u64) -> (io_uring::squeue::Entry, InFlight) {
    let fd = types::Fd(op.file.as_raw_fd());
    let mut inflight = InFlight {
        _file: op.file,
        read_buf: None,
        write_buf: None,
        done: op.done,
    };
    let entry = match op.kind {
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

fn run(mut ring: IoUring, rx: mpsc::Receiver<Op>, shared: Arc<Shared>) {
    let mut slots: Vec<Option<InFlight>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut inflight = 0usize;
    let mut wake_buf = [0u8; 8];
    let mut wake_armed = false;
    let mut closed = false;
    let capacity = ring.params().sq_entries() as usize;
    loop {
        if !wake_armed {
            let e = opcode::Read::new(types::Fd(shared.wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE);
            // SAFETY: wake_buf lives for the whole loop; the queue has room (we only push after
            // submitting below when it is full).
            if unsafe { ring.submission().push(&e) }.is_ok() {
                wake_armed = true;
            }
        }
        // Take new work, as much as the ring has room for (keep one slot for the wake read).
        loop {
            if inflight + 1 >= capacity {
                break;
            }
            let op = match rx.try_recv() {
                Ok(op) => op,
                Err(mpsc::TryRecvError::Empty) => {
                    // About to sleep: announce it, then look once more so a sender that saw
                    // `sleeping == false` cannot have its op missed.
                    shared.sleeping.store(true, Ordering::SeqCst);
                    match rx.try_recv() {
                        Ok(op) => {
                            shared.sleeping.store(false, Ordering::SeqCst);
                            op
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            };
            let idx = free.pop().unwrap_or_else(|| {
                slots.push(None);
                slots.len() - 1
            });
            let (entry, f) = prepare(op, idx as u64);
            slots[idx] = Some(f);
            inflight += 1;
            // SAFETY: the entry's buffers and fd are owned by slots[idx] until its completion.
            while unsafe { ring.submission().push(&entry) }.is_err() {
                if let Err(e) = ring.submit() {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
            }
        }
        if closed && inflight == 0 {
            return;
        }
        let r = ring.submit_and_wait(1);
        shared.sleeping.store(false, Ordering::SeqCst);
        if let Err(e) = r {
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!(error = %e, "io_uring_enter failed");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let mut completed = Vec::new();
        for cqe in ring.completion() {
            completed.push((cqe.user_data(), cqe.result()));
        }
        for (ud, res) in completed {
            if ud == WAKE {
                wake_armed = false;
                continue;
            }
            let idx = ud as usize;
            if let Some(f) = slots.get_mut(idx).and_then(Option::take) {
                inflight -= 1;
                free.push(idx);
                // A dropped receiver means the caller gave up; the buffers are freed here.
                let _ = f.done.send((res, f.read_buf, f.write_buf));
            }
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
