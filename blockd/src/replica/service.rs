//! What a replica does with a request, independent of how it arrived: the TCP server calls it
//! for peers, and a gateway calls it directly for the replica on its own host (no socket, but
//! the same fencing, so a gateway that lost its lease is refused by its own disks too).

use super::wire::{self, Chunk, ChunkState};
use crate::buf::AlignedBuf;
use crate::chunkstore::layout::{ChunkKey, SLOT_SIZE};
use crate::chunkstore::ChunkStore;
use crate::uring::Buf;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// errno values of the protocol (Linux numbering, as NBD uses).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
/// The request carries an older lease epoch than one already seen: the sender is fenced.
pub const ESTALE: u32 = 116;

/// Highest lease epoch seen per volume. Loaded from volume-mgr's leases at start-up (so a
/// restart forgets nothing) and raised by every request that carries a newer epoch.
#[derive(Default)]
pub struct Fences {
    epochs: Mutex<HashMap<u64, u64>>,
}

impl Fences {
    /// Admits `epoch` for `volume` unless a newer one was seen; a newer one raises the fence.
    pub fn admit(&self, volume: u64, epoch: u64) -> bool {
        let mut m = self.epochs.lock().unwrap();
        let e = m.entry(volume).or_insert(0);
        if epoch < *e {
            return false;
        }
        *e = epoch;
        true
    }

    /// The highest epoch seen for `volume` (0 if none).
    pub fn current(&self, volume: u64) -> u64 {
        self.epochs
            .lock()
            .unwrap()
            .get(&volume)
            .copied()
            .unwrap_or(0)
    }
}

pub struct ReplicaService {
    pub store: Arc<ChunkStore>,
    pub fences: Fences,
    /// Per chunk, the version of the last image a resync installed here. A write that carries
    /// an older version was issued before that copy was taken (the copy is made under the
    /// chunk's lock, so every write issued earlier is in the image, and every later one has a
    /// higher version): it can only be a stale request arriving late — e.g. retransmitted by
    /// TCP from a gateway connection given up during a network cut — and must not overwrite
    /// the copied data. Memory only: a restart also ends every connection such requests could
    /// come on.
    floors: Mutex<HashMap<ChunkKey, u64>>,
    /// Writes refused by `floors` (`blockd_replica_stale_writes`).
    pub stale_writes: std::sync::atomic::AtomicU64,
}

fn key(c: Chunk) -> ChunkKey {
    ChunkKey {
        volume: c.volume,
        index: c.index,
    }
}

fn in_chunk(offset: u32, len: usize) -> bool {
    (offset as u64)
        .checked_add(len as u64)
        .is_some_and(|e| e <= SLOT_SIZE)
}

pub type RResult<T> = Result<T, u32>;

impl ReplicaService {
    pub fn new(store: Arc<ChunkStore>) -> ReplicaService {
        ReplicaService {
            store,
            fences: Fences::default(),
            floors: Mutex::new(HashMap::new()),
            stale_writes: Default::default(),
        }
    }

    /// Refuses (EIO) a write whose version is older than the image a resync installed.
    fn check_floor(&self, chunk: Chunk, version: u64) -> RResult<()> {
        let floor = self.floors.lock().unwrap().get(&key(chunk)).copied();
        match floor {
            Some(f) if version < f => {
                self.stale_writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    volume = chunk.volume,
                    chunk = chunk.index,
                    version,
                    installed = f,
                    "stale write refused: older than the chunk's resynced copy"
                );
                Err(EIO)
            }
            _ => Ok(()),
        }
    }

    fn admit(&self, volume: u64, epoch: u64) -> RResult<()> {
        if self.fences.admit(volume, epoch) {
            Ok(())
        } else {
            Err(ESTALE)
        }
    }

    /// Reads `len` bytes at `offset` of a chunk into `buf[start..start+len]`.
    pub async fn read_into(
        &self,
        chunk: Chunk,
        offset: u32,
        len: u32,
        epoch: u64,
        buf: AlignedBuf,
        start: usize,
    ) -> (AlignedBuf, RResult<u64>) {
        if let Err(e) = self.admit(chunk.volume, epoch) {
            return (buf, Err(e));
        }
        if !in_chunk(offset, len as usize) || start + len as usize > buf.len() {
            return (buf, Err(EINVAL));
        }
        let (b, r) = self
            .store
            .read_into(key(chunk), offset as u64, buf, start, len as usize)
            .await;
        let version = self.store.chunk_version(key(chunk)).unwrap_or(0);
        (b, r.map(|()| version).map_err(|e| e.nbd_errno()))
    }

    /// Writes `data[start..start+len]` at `offset`; the chunk's version becomes at least
    /// `version`. Returns the chunk's version after the write.
    #[allow(clippy::too_many_arguments)]
    pub async fn write(
        &self,
        chunk: Chunk,
        offset: u32,
        data: Buf,
        start: usize,
        len: usize,
        epoch: u64,
        version: u64,
        fua: bool,
    ) -> RResult<u64> {
        self.admit(chunk.volume, epoch)?;
        if len == 0 || !in_chunk(offset, len) {
            return Err(EINVAL);
        }
        self.check_floor(chunk, version)?;
        self.store
            .write_versioned(key(chunk), offset as u64, data, start, len, fua, version)
            .await
            .map_err(|e| e.nbd_errno())?;
        Ok(self.store.chunk_version(key(chunk)).unwrap_or(0))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn zero(
        &self,
        chunk: Chunk,
        offset: u32,
        len: u32,
        epoch: u64,
        version: u64,
        punch: bool,
        fua: bool,
    ) -> RResult<u64> {
        self.admit(chunk.volume, epoch)?;
        if len == 0 || !in_chunk(offset, len as usize) {
            return Err(EINVAL);
        }
        self.check_floor(chunk, version)?;
        self.store
            .zero_versioned(key(chunk), offset as u64, len as u64, punch, fua, version)
            .await
            .map_err(|e| e.nbd_errno())?;
        Ok(self.store.chunk_version(key(chunk)).unwrap_or(0))
    }

    pub async fn flush(&self, volume: Option<u64>, epoch: u64) -> RResult<()> {
        if let Some(v) = volume {
            self.admit(v, epoch)?;
        }
        self.store.flush().await.map_err(|e| e.nbd_errno())
    }

    /// One page of chunk states of a volume (see `wire::Message::Versions`).
    pub fn versions(&self, volume: u64, start: u64, epoch: u64) -> RResult<(Vec<ChunkState>, u64)> {
        if epoch != 0 {
            self.admit(volume, epoch)?;
        }
        Ok(self
            .store
            .chunk_states(volume, start, wire::MAX_VERSION_ENTRIES))
    }

    /// Version and per-block crc32s of a chunk (empty when not stored).
    pub fn checksums(&self, chunk: Chunk) -> (u64, Vec<u32>) {
        self.store
            .chunk_checksums(key(chunk))
            .unwrap_or((0, Vec::new()))
    }

    /// A chunk image (`wire::encode_image`) and its version.
    pub async fn fetch(&self, chunk: Chunk, epoch: u64) -> RResult<(u64, Vec<u8>)> {
        self.admit(chunk.volume, epoch)?;
        let (version, bm, blocks) = self
            .store
            .fetch_image(key(chunk))
            .await
            .map_err(|e| e.nbd_errno())?;
        Ok((version, wire::encode_image(&bm, &blocks)))
    }

    /// Replaces a chunk with an image; its version becomes exactly `version`.
    pub async fn install(
        &self,
        chunk: Chunk,
        epoch: u64,
        version: u64,
        image: &[u8],
    ) -> RResult<()> {
        self.admit(chunk.volume, epoch)?;
        let (bm, blocks) = wire::parse_image(image).map_err(|_| EINVAL)?;
        self.store
            .install_image(key(chunk), version, &bm, blocks)
            .await
            .map_err(|e| e.nbd_errno())?;
        let mut f = self.floors.lock().unwrap();
        let e = f.entry(key(chunk)).or_insert(0);
        *e = (*e).max(version);
        Ok(())
    }
}
